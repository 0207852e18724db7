//! The binary the next generation runs: the path this process was started
//! from, made absolute once, at start-up.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The path this process was started from, made absolute against the
/// working directory at start-up, and not resolved through symlinks: after a
/// deploy replaces the file, or a `current -> releases/v2` link is switched,
/// the next generation runs the new release. (`/proc/self/exe` would name the
/// old, possibly deleted, file.) Falls back to `/proc/self/exe` only when
/// `argv[0]` leads nowhere.
///
/// A bare `argv[0]` is looked up in `PATH` as the shell did; an empty or
/// relative entry there (`PATH=:/usr/bin`, `PATH=.:/usr/bin`) names a
/// directory relative to the working directory *now*, so it is joined with
/// it here: the result is always absolute and does not depend on where the
/// process has `chdir`ed by the time it upgrades.
pub fn current_program() -> std::io::Result<PathBuf> {
    let argv0 = std::env::args_os().next();
    let cwd = std::env::current_dir().ok();
    let path = std::env::var_os("PATH");
    match resolve_program(argv0.as_deref(), path.as_deref(), cwd.as_deref()) {
        Some(path) if path.is_file() => Ok(path),
        _ => std::env::current_exe(),
    }
}

/// Where `argv0` leads, absolute: joined with `cwd` when it has a `/`,
/// looked up in `path_var` when it has none. `None` without a `cwd` for a
/// relative result.
fn resolve_program(
    argv0: Option<&OsStr>,
    path_var: Option<&OsStr>,
    cwd: Option<&Path>,
) -> Option<PathBuf> {
    let argv0 = Path::new(argv0?);
    if argv0.as_os_str().as_encoded_bytes().contains(&b'/') {
        absolute(argv0, cwd)
    } else {
        search_path(argv0, path_var?, cwd?)
    }
}

/// `path` if absolute, else `cwd/path` (`None` without a `cwd`).
fn absolute(path: &Path, cwd: Option<&Path>) -> Option<PathBuf> {
    if path.is_absolute() {
        Some(path.to_owned())
    } else {
        Some(cwd?.join(path))
    }
}

/// Look `name` up in the `PATH` value `path_var`, as the shell did when it
/// started us: the first executable file `DIR/name`. An empty entry means
/// the working directory (POSIX), and a relative entry is relative to it,
/// so both are joined with `cwd`: the result is always absolute.
fn search_path(name: &Path, path_var: &OsStr, cwd: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path_var)
        // `cwd.join` keeps an absolute `dir` as it is, and `cwd.join("")`
        // is `cwd` itself.
        .map(|dir| cwd.join(dir).join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory with an executable `prog` in `bin/` and a
    /// non-executable `data` next to it.
    fn tree(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("baton-program-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let prog = dir.join("bin/prog");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("bin/data"), "").unwrap();
        dir
    }

    #[test]
    fn empty_dot_and_relative_path_entries_resolve_against_the_start_up_cwd() {
        let dir = tree("relative");
        let bin = dir.join("bin");
        let expected = bin.join("prog");
        // Not the test process's cwd: the lookup must not depend on it.
        for path_var in ["", ":/nonexistent", "/nonexistent:", ".", "/nonexistent:."] {
            let found = search_path(Path::new("prog"), OsStr::new(path_var), &bin);
            assert_eq!(
                found.as_deref(),
                Some(expected.as_path()),
                "PATH={path_var:?}"
            );
        }
        let found = search_path(Path::new("prog"), OsStr::new("bin"), &dir);
        assert_eq!(found, Some(expected.clone()));
        let found = search_path(Path::new("prog"), OsStr::new("./bin"), &dir);
        assert!(found.as_deref().is_some_and(Path::is_absolute), "{found:?}");
        assert!(found.unwrap().ends_with("bin/prog"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn absolute_entries_and_executability() {
        let dir = tree("absolute");
        let bin = dir.join("bin");
        let path_var = format!("/nonexistent:{}", bin.display());
        let elsewhere = Path::new("/");
        assert_eq!(
            search_path(Path::new("prog"), OsStr::new(&path_var), elsewhere),
            Some(bin.join("prog"))
        );
        assert_eq!(
            search_path(Path::new("data"), OsStr::new(&path_var), elsewhere),
            None
        );
        assert_eq!(
            search_path(Path::new("missing"), OsStr::new(&path_var), elsewhere),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn argv0_with_a_slash_is_joined_with_the_cwd() {
        let cwd = Path::new("/srv/app");
        assert_eq!(
            resolve_program(Some(OsStr::new("./bin/server")), None, Some(cwd)),
            Some(PathBuf::from("/srv/app/./bin/server"))
        );
        assert_eq!(
            resolve_program(Some(OsStr::new("/usr/bin/server")), None, None),
            Some(PathBuf::from("/usr/bin/server"))
        );
        assert_eq!(resolve_program(Some(OsStr::new("bin/x")), None, None), None);
        assert_eq!(resolve_program(None, None, Some(cwd)), None);
        assert_eq!(
            resolve_program(Some(OsStr::new("x")), None, Some(cwd)),
            None
        );
    }

    #[test]
    fn current_program_is_absolute() {
        assert!(current_program().unwrap().is_absolute());
    }
}
