//! Temporary directories for binary copies, and replacing a binary the way
//! deploy tools do (write next to it, then `rename`).

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

/// Held for reading around every spawn of this process and for writing
/// while a binary is open for writing: a child forked meanwhile by another
/// test thread inherits the write fd until its exec, and running the binary
/// then fails with ETXTBSY ("Text file busy").
static WRITING_BINARY: RwLock<()> = RwLock::new(());

/// Hold while spawning a process (until `spawn` returns: the child has
/// exec'd, and closed what it inherited close-on-exec).
pub fn spawn_guard() -> RwLockReadGuard<'static, ()> {
    WRITING_BINARY
        .read()
        .unwrap_or_else(PoisonError::into_inner)
}

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Create `$TMPDIR/baton-test-PID-N-LABEL`.
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("baton-test-{}-{n}-{label}", std::process::id()));
        // A leftover from an earlier run with the same pid: start clean.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Replace `target` as deploy tools do: write a new file next to it
/// (mode 0755), then `rename` it over the old one.
pub fn deploy_bytes(target: &Path, contents: &[u8]) {
    let tmp = sibling(target);
    let writing = WRITING_BINARY
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(&tmp)
        .expect("create the new binary");
    file.write_all(contents).expect("write the new binary");
    file.sync_all().expect("sync the new binary");
    drop(file);
    drop(writing);
    std::fs::rename(&tmp, target).expect("rename the new binary into place");
}

/// Replace `target` with a copy of `source` (copy next to it, then `rename`).
pub fn deploy_copy(source: &Path, target: &Path) {
    let tmp = sibling(target);
    let writing = WRITING_BINARY
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    std::fs::copy(source, &tmp).expect("copy the binary");
    drop(writing);
    std::fs::rename(&tmp, target).expect("rename the binary into place");
}

fn sibling(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .unwrap_or_else(|| OsStr::new("binary"))
        .to_string_lossy();
    target.with_file_name(format!(".{name}.new"))
}
