//! Binding a Unix listener with its final permissions, never following a
//! symbolic link.
//!
//! `bind(2)` creates the socket file with `0777 & ~umask`, and a `chmod`
//! by path afterwards leaves a window in which anyone may connect, and
//! follows a symbolic link planted at the path. Instead the socket is bound
//! under a fresh private directory (mode 0700, created next to the target
//! with `mkdir`, which never follows a link), made `mode` there, where
//! nobody else can reach it, and only then renamed to its final path.
//! `rename(2)` replaces the final path's entry itself: it never follows a
//! link either.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use super::BACKLOG;

/// Names of the private directories start with this.
const DIR_PREFIX: &str = ".baton-";
/// Attempts at a fresh directory name before giving up.
const DIR_ATTEMPTS: usize = 16;

/// Bind a listening Unix socket at `path` with permissions `mode`
/// (non-blocking, close-on-exec). A symbolic link at `path` is an error; a
/// stale socket file is replaced; a live one (a server answers on it) is
/// `AddrInUse`; anything else there is `AlreadyExists`.
pub(super) fn bind(path: &Path, mode: u32) -> io::Result<OwnedFd> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a Unix socket path needs a file name",
        )
    })?;
    check_target(path)?;
    let parent = path.parent().unwrap_or(Path::new(""));
    let dir = private_dir(parent)?;
    let temporary = dir.join(file_name);
    let bound = bind_at(&temporary, mode).and_then(|socket| {
        // Checked again just before the rename: what appeared meanwhile is
        // refused rather than replaced.
        check_target(path)?;
        std::fs::rename(&temporary, path)?;
        Ok(socket)
    });
    if bound.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    if let Err(e) = std::fs::remove_dir(&dir) {
        log::warn!("cannot remove the directory {}: {e}", dir.display());
    }
    bound
}

/// True if `have`, the address a Unix socket reports, is where [`bind`]
/// bound it for `want` before renaming it there.
pub(super) fn was_bound_for(have: &Path, want: &Path) -> bool {
    let dir = have.parent();
    have.file_name() == want.file_name()
        && dir.and_then(Path::file_name).is_some_and(|name| {
            name.to_str()
                .is_some_and(|name| name.starts_with(DIR_PREFIX))
        })
        && dir.and_then(Path::parent) == want.parent()
}

fn bind_at(path: &Path, mode: u32) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    // By path, inside a directory only this user can enter: nobody can have
    // replaced the socket file by a link.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// What is at `path` may be replaced: nothing, or a stale socket file.
fn check_target(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is a symbolic link: not following it", path.display()),
        ));
    }
    if !kind.is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is serving on this socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("replacing stale socket file {}", path.display());
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Create a fresh directory in `parent`, mode 0700, under a random name.
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    let mut last = None;
    for _ in 0..DIR_ATTEMPTS {
        let dir = parent.join(format!("{DIR_PREFIX}{:016x}", random()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no fresh directory name")))
}

/// 64 unpredictable bits, from the standard library's per-process random
/// hash keys; unpredictability is not what makes this safe (`mkdir` fails on
/// an existing name), it only keeps another user from making it fail.
fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.finish()
}
