//! A PID file naming the process that serves now, for supervisors that track
//! one.
//!
//! The new generation writes it once it is ready (temporary file + rename,
//! so a reader never sees it half-written); a graceful stop removes it; an
//! exit after an upgrade leaves it to the new generation.
//!
//! A server often runs as root and its PID file sits in a directory others
//! may write to, so the file is handled as untrusted:
//!
//! - the temporary file has an unpredictable name and is created with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW`: a symlink or file planted at that name
//!   is never opened, let alone written through;
//! - the final path is replaced by `rename(2)`, which replaces a symlink
//!   there with the new file instead of writing to its target (refusing
//!   would let anyone who can plant a link stop the server from starting,
//!   and writing through it is the attack; replacing does neither);
//! - the old file is read with `O_NOFOLLOW | O_NONBLOCK`, at most a few
//!   bytes, and only if it is a regular file: a symlink, a FIFO or a device
//!   there neither blocks nor misleads the claim;
//! - a pid in it counts as a conflict only while that process is alive and
//!   runs this server's program ([`PidFile::claim`]), so a stale file whose
//!   pid was reused by an unrelated process does not stop a start.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys;

/// Why the PID file could not be claimed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PidFileError {
    /// The file names another live generation of this server (or a live
    /// process that cannot be told apart from one): two servers would share
    /// it.
    #[error("PID file {} names process {pid}, which is running", path.display())]
    Running {
        /// The file.
        path: PathBuf,
        /// The live process it names.
        pid: u32,
    },
    /// Reading or writing the file failed.
    #[error("PID file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// The PID file this process wrote.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Write this process's pid to `path`.
    ///
    /// The file is replaced when it names this process, `predecessor`, a
    /// dead process, a live process that does not run this server's
    /// program (its pid was reused; logged), or nothing readable; one
    /// naming another live generation of this server is
    /// [`PidFileError::Running`].
    ///
    /// `predecessor` is the process this one takes the file over from: the
    /// generation it replaces, when a new generation becomes ready; or,
    /// when an upgrade failed after the new generation had already claimed
    /// the file, that failed child, so the old generation claims the file
    /// back (`PidFile::claim(path, Some(child_pid))`).
    ///
    /// "Runs this server's program" compares the *file names* of the
    /// programs: of `/proc/PID/exe` (the running binary, with the
    /// ` (deleted)` the kernel appends once a deploy replaced it stripped)
    /// and of `argv[0]` from `/proc/PID/cmdline`, against the same two for
    /// this process. File names rather than whole paths, because the next
    /// generation of a server deployed as `releases/v2/app` behind a
    /// `current` symlink runs from another directory than the previous one;
    /// and `argv[0]` too, because another user's `/proc/PID/exe` is not
    /// readable without privileges while `cmdline` is. A process that can
    /// be told nothing about (`/proc` mounted with `hidepid`) is taken for
    /// a conflict: two servers on one PID file are worse than a refused
    /// start. A zombie is dead.
    pub fn claim(
        path: impl Into<PathBuf>,
        predecessor: Option<u32>,
    ) -> Result<PidFile, PidFileError> {
        let path = path.into();
        let io_error = |source| PidFileError::Io {
            path: path.clone(),
            source,
        };
        let me = std::process::id();
        match read_pid(&path) {
            Ok(Some(pid)) if pid != me && Some(pid) != predecessor && sys::process_exists(pid) => {
                match identify(pid) {
                    Identity::ThisProgram | Identity::Unknown => {
                        return Err(PidFileError::Running { path, pid });
                    }
                    Identity::Other => log::info!(
                        "PID file {} names process {pid}, which runs another program: replacing it",
                        path.display()
                    ),
                    Identity::Dead => {}
                }
            }
            Ok(_) => {}
            Err(e) => return Err(io_error(e)),
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            log::warn!(
                "PID file {} is a symlink: replacing the link, not writing through it",
                path.display()
            );
        }
        write_replacing(&path, me).map_err(io_error)?;
        Ok(PidFile { path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the file if it still names this process (a newer generation
    /// may have claimed it since).
    pub fn remove(self) -> io::Result<()> {
        match read_pid(&self.path)? {
            Some(pid) if pid == std::process::id() => std::fs::remove_file(&self.path),
            _ => Ok(()),
        }
    }
}

/// The pid in `path`; `None` if the file is missing, holds no number, or is
/// not a regular file (a symlink is not followed, a FIFO not waited on).
fn read_pid(path: &Path) -> io::Result<Option<u32>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // ELOOP: the path is a symlink.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        // ENXIO: a FIFO or socket without a writer, ENODEV…: not a file.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut text = String::new();
    // A pid has at most 10 digits; anything much longer is not a PID file.
    match file.take(64).read_to_string(&mut text) {
        Ok(_) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write `pid` to a new, exclusively created temporary file next to `path`
/// (mode 0644) and rename it over `path`.
fn write_replacing(path: &Path, pid: u32) -> io::Result<()> {
    // A name already taken (planted, or a leftover) is skipped, never
    // opened; a few attempts are plenty with 64 random bits per name.
    let mut last_error = None;
    for _ in 0..8 {
        let tmp = tmp_path(path, pid, nonce());
        let mut file = match create_exclusive(&tmp) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last_error = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let written = file
            // Whatever the umask: supervisors run as other users.
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .and_then(|()| file.write_all(format!("{pid}\n").as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return written;
    }
    Err(last_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// Create `path`, failing if anything exists there, a symlink included
/// (`O_CREAT | O_EXCL` never follows one; `O_NOFOLLOW` says so twice).
fn create_exclusive(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// `<path>.tmp.<pid>.<nonce in hex>`.
fn tmp_path(path: &Path, pid: u32, nonce: u64) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{pid}.{nonce:016x}"));
    path.with_file_name(name)
}

/// 64 unpredictable bits: std's `RandomState` is seeded from the OS's random
/// source, mixed with the clock, the pid and a counter so two calls never
/// repeat.
fn nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    hasher.finish()
}

/// What a live pid runs, as far as `/proc` tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    /// This server's program: another generation of it.
    ThisProgram,
    /// Something else: the pid was reused.
    Other,
    /// Nothing readable about it.
    Unknown,
    /// Gone meanwhile, or a zombie.
    Dead,
}

fn identify(pid: u32) -> Identity {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if is_zombie(&proc_dir) {
        return Identity::Dead;
    }
    let exe = match std::fs::read_link(proc_dir.join("exe")) {
        Ok(exe) => Some(exe),
        // A live process without a binary is a kernel thread: not ours.
        Err(e) if e.kind() == io::ErrorKind::NotFound && proc_dir.exists() => {
            return Identity::Other
        }
        // Not readable without privileges: `cmdline` still is.
        Err(_) => None,
    };
    let theirs = program_names(exe, std::fs::read(proc_dir.join("cmdline")).ok());
    if theirs.is_empty() {
        return if sys::process_exists(pid) {
            Identity::Unknown
        } else {
            Identity::Dead
        };
    }
    let ours = program_names(
        std::fs::read_link("/proc/self/exe").ok(),
        std::fs::read("/proc/self/cmdline").ok(),
    );
    if theirs.iter().any(|name| ours.contains(name)) {
        Identity::ThisProgram
    } else {
        Identity::Other
    }
}

/// The file names of a process's binary (`exe`, without the ` (deleted)`
/// suffix) and of its `argv[0]` (first NUL-terminated field of `cmdline`).
fn program_names(exe: Option<PathBuf>, cmdline: Option<Vec<u8>>) -> Vec<OsString> {
    let mut names = Vec::new();
    if let Some(exe) = exe {
        let bytes = exe.as_os_str().as_bytes();
        let bytes = bytes.strip_suffix(b" (deleted)").unwrap_or(bytes);
        if let Some(name) = Path::new(std::ffi::OsStr::from_bytes(bytes)).file_name() {
            names.push(name.to_owned());
        }
    }
    if let Some(cmdline) = cmdline {
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        if let Some(name) = Path::new(std::ffi::OsStr::from_bytes(argv0)).file_name() {
            names.push(name.to_owned());
        }
    }
    names
}

/// `State: Z` in `/proc/PID/stat` (the field after the `(comm)`).
fn is_zombie(proc_dir: &Path) -> bool {
    std::fs::read(proc_dir.join("stat")).is_ok_and(|stat| {
        stat.iter()
            .rposition(|&b| b == b')')
            .and_then(|close| stat.get(close + 2))
            .is_some_and(|&state| state == b'Z')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn claims_writes_and_removes() {
        let path = temp("a.pid");
        let file = PidFile::claim(&path, None).unwrap();
        assert_eq!(read_pid(&path).unwrap(), Some(std::process::id()));
        file.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_or_garbage_file_is_replaced() {
        let path = temp("stale.pid");
        // No process has pid u32::MAX - 1 (above pid_max).
        std::fs::write(&path, format!("{}\n", u32::MAX - 1)).unwrap();
        PidFile::claim(&path, None).unwrap();
        std::fs::write(&path, "garbage").unwrap();
        PidFile::claim(&path, None).unwrap();
        assert_eq!(read_pid(&path).unwrap(), Some(std::process::id()));
    }

    /// Set in the environment of a re-run of this test binary that only
    /// waits: a live process running the same program.
    const HELPER: &str = "BATON_PIDFILE_HELPER";

    /// In the re-run only: block until stdin is closed.
    #[test]
    fn helper_waits_for_stdin() {
        if std::env::var_os(HELPER).is_some() {
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        }
    }

    /// This test binary again, alive until its stdin is dropped.
    fn same_program() -> std::process::Child {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "pidfile::tests::helper_waits_for_stdin",
                "--test-threads=1",
            ])
            .env(HELPER, "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Close its stdin (it exits on its own) and reap it.
    fn finish(mut child: std::process::Child) {
        drop(child.stdin.take());
        child.wait().unwrap();
    }

    #[test]
    fn a_live_generation_of_this_program_is_an_error_unless_it_is_the_predecessor() {
        let path = temp("live.pid");
        let child = same_program();
        std::fs::write(&path, format!("{}\n", child.id())).unwrap();
        let err = PidFile::claim(&path, None).unwrap_err();
        assert!(
            matches!(err, PidFileError::Running { pid, .. } if pid == child.id()),
            "{err}"
        );
        assert_eq!(read_pid(&path).unwrap(), Some(child.id()), "left as it was");
        PidFile::claim(&path, Some(child.id())).unwrap();
        assert_eq!(read_pid(&path).unwrap(), Some(std::process::id()));
        finish(child);
    }

    #[test]
    fn a_reused_pid_of_an_unrelated_process_does_not_stop_the_claim() {
        let path = temp("reused.pid");
        // A live process that is not this program: the stale file's pid was
        // reused by it.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&path, format!("{}\n", child.id())).unwrap();
        let claimed = PidFile::claim(&path, None);
        child.kill().unwrap();
        child.wait().unwrap();
        claimed.unwrap();
        assert_eq!(read_pid(&path).unwrap(), Some(std::process::id()));
        // pid 1 is alive and is not this test binary either.
        std::fs::write(&path, "1\n").unwrap();
        PidFile::claim(&path, None).unwrap();
        assert_eq!(read_pid(&path).unwrap(), Some(std::process::id()));
    }

    #[test]
    fn program_names_survive_a_deploy_and_a_release_directory() {
        let names = |exe: &str, cmdline: &[u8]| {
            program_names(Some(PathBuf::from(exe)), Some(cmdline.to_vec()))
        };
        assert_eq!(
            names(
                "/srv/releases/v1/app (deleted)",
                b"/srv/current/app\0--listen\0x\0"
            ),
            vec![OsString::from("app"), OsString::from("app")]
        );
        assert_eq!(
            names("/usr/bin/sleep", b"sleep\x0030\0"),
            vec!["sleep", "sleep"]
        );
        assert_eq!(
            program_names(None, Some(Vec::new())),
            Vec::<OsString>::new()
        );
        assert_eq!(program_names(None, None), Vec::<OsString>::new());
        let ours = program_names(
            std::fs::read_link("/proc/self/exe").ok(),
            std::fs::read("/proc/self/cmdline").ok(),
        );
        assert!(!ours.is_empty());
        assert_eq!(identify(std::process::id()), Identity::ThisProgram);
    }

    #[test]
    fn temporary_names_are_unpredictable() {
        let path = Path::new("/run/app.pid");
        let a = tmp_path(path, 7, nonce());
        let b = tmp_path(path, 7, nonce());
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().starts_with("/run/app.pid.tmp.7."));
    }

    #[test]
    fn exclusive_creation_never_opens_what_is_already_there() {
        let victim = temp("victim-of-create");
        std::fs::write(&victim, "precious\n").unwrap();
        let link = temp("planted-link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let dangling = temp("planted-dangling");
        let dangling_target = temp("dangling-target");
        std::os::unix::fs::symlink(&dangling_target, &dangling).unwrap();
        assert!(create_exclusive(&link).is_err());
        assert!(create_exclusive(&dangling).is_err());
        assert!(create_exclusive(&victim).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(!dangling_target.exists(), "a dangling link was followed");
    }

    #[test]
    fn a_symlink_at_the_temporary_name_is_never_followed() {
        let path = temp("symlink-tmp.pid");
        let victim = temp("victim-of-tmp");
        std::fs::write(&victim, "precious\n").unwrap();
        // The name the temporary file used to have, and names like it.
        let predictable = [
            format!("{}.tmp.{}", path.display(), std::process::id()),
            format!("{}.tmp", path.display()),
        ];
        for name in &predictable {
            let _ = std::fs::remove_file(name);
            std::os::unix::fs::symlink(&victim, name).unwrap();
        }
        PidFile::claim(&path, None).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(read_pid(&path).unwrap(), Some(std::process::id()));
        for name in &predictable {
            assert!(std::fs::symlink_metadata(name).unwrap().is_symlink());
            std::fs::remove_file(name).unwrap();
        }
    }

    #[test]
    fn the_file_is_a_regular_file_readable_by_all() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp("mode.pid");
        PidFile::claim(&path, None).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        let dir = path.parent().unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("mode.pid.tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// The final path as a symlink is replaced, not written through: the
    /// rename swaps the link itself for the new file.
    #[test]
    fn a_symlink_at_the_final_path_is_replaced_not_written_through() {
        let path = temp("symlink-final.pid");
        let victim = temp("victim-of-final");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        PidFile::claim(&path, None).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(read_pid(&path).unwrap(), Some(std::process::id()));
        // A link to a file naming a live generation is not believed either.
        std::fs::write(&victim, format!("{}\n", std::process::id())).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let file = PidFile::claim(&path, None).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        file.remove().unwrap();
        assert!(victim.exists(), "remove never follows the link");
    }

    #[test]
    fn a_fifo_at_the_path_does_not_block_the_claim() {
        let path = temp("fifo.pid");
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let claim_path = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(PidFile::claim(&claim_path, None).map(drop));
        });
        let result = rx.recv_timeout(std::time::Duration::from_secs(10));
        if result.is_err() {
            // Unblock the reader before failing: a writer that closes at once.
            let _ = std::fs::OpenOptions::new().write(true).open(&path);
        }
        result.expect("claim blocked on a FIFO").unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    }

    #[test]
    fn remove_leaves_a_file_another_process_claimed() {
        let path = temp("newer.pid");
        let file = PidFile::claim(&path, None).unwrap();
        std::fs::write(&path, "1\n").unwrap();
        file.remove().unwrap();
        assert!(path.exists());
    }
}
