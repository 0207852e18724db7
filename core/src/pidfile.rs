//! A PID file naming the process that serves now, for supervisors that track
//! one.
//!
//! The new generation writes it once it is ready (temporary file + rename,
//! so a reader never sees it half-written); a graceful stop removes it; an
//! exit after an upgrade leaves it to the new generation.

use std::io;
use std::path::{Path, PathBuf};

use crate::sys;

/// Why the PID file could not be claimed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PidFileError {
    /// The file names another live process: two servers would share it.
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
    /// Write this process's pid to `path`. A file naming `predecessor` (the
    /// generation this one replaces), a dead process, or nothing readable is
    /// replaced; one naming another live process is an error.
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
                return Err(PidFileError::Running { path, pid });
            }
            Ok(_) => {}
            Err(e) => return Err(io_error(e)),
        }
        let tmp = tmp_path(&path, me);
        std::fs::write(&tmp, format!("{me}\n")).map_err(io_error)?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_error(e)
        })?;
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

/// The pid in `path`; `None` if the file is missing or holds no number.
fn read_pid(path: &Path) -> io::Result<Option<u32>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn tmp_path(path: &Path, pid: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{pid}"));
    path.with_file_name(name)
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

    #[test]
    fn a_live_other_process_is_an_error_unless_it_is_the_predecessor() {
        let path = temp("live.pid");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&path, format!("{}\n", child.id())).unwrap();
        let err = PidFile::claim(&path, None).unwrap_err();
        assert!(
            matches!(err, PidFileError::Running { pid, .. } if pid == child.id()),
            "{err}"
        );
        PidFile::claim(&path, Some(child.id())).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
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
