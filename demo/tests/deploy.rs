//! Deploying a new release as deploy tools leave the binary, once per
//! compiled backend: an upgrade runs the file at the path the server was
//! started from, as it is *now*, and not the old (possibly deleted) file the
//! running process maps.
//!
//! - Replaced by rename (`cp` to a temporary name, then `mv` over it).
//! - Replaced by copying over it: plain `cp` onto a running binary fails
//!   with ETXTBSY ("Text file busy") and leaves the old one in place;
//!   `cp --remove-destination` and `install` unlink it first and write a
//!   new file, which the upgrade then runs.
//! - Started through a symlink (`current/baton-demo`, `current ->
//!   releases/v1`) that is switched to `releases/v2`: the new generation
//!   runs v2, as `/proc/PID/exe` shows.
//! - Started by a relative path from another working directory.
//! - `--next-binary PATH` overrides the path; a missing or non-executable
//!   one fails the upgrade before anything is started, and the old process
//!   serves on.
//!
//! "Runs the new file" is checked by inode: `/proc/PID/exe` of the new
//! generation is the file now at the path.

mod common;

use testkit::per_backend;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{deploy_copy, Server, TempDir, BINARY, LINE_TIMEOUT};
use nix::sys::signal::Signal;

per_backend! {
    fn replaced_by_rename;
    fn replaced_by_copy;
    fn symlink_switched_to_new_release;
    fn relative_path_from_another_directory;
    fn next_binary_overrides;
}

/// The inode of the file `pid` executes (followed even if deleted).
fn exe_inode(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("stat /proc/{pid}/exe: {e}"))
        .ino()
}

fn exe_link(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/exe: {e}"))
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// Run a deploy command; its status and stderr.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Upgrade and check the new generation runs the file now at `path`.
#[track_caller]
fn upgrade_runs(server: &mut Server, path: &Path) -> u32 {
    let expected = inode(path);
    let old = server.pid();
    server.check(
        exe_inode(old) != expected,
        "the test should have replaced the binary",
    );
    let new = server.upgrade();
    server.check(
        exe_inode(new) == expected,
        format_args!(
            "new generation {new} runs {:?} (inode {}), not the file now at {} (inode {expected})",
            exe_link(new),
            exe_inode(new),
            path.display()
        ),
    );
    new
}

fn replaced_by_rename(backend: &str) {
    let dir = TempDir::new("deploy-mv");
    let binary = dir.path().join("baton-demo");
    deploy_copy(Path::new(BINARY), &binary);
    let mut server = Server::start(&binary, backend, &[]);
    assert_eq!(exe_inode(server.pid()), inode(&binary));

    // What a deploy tool does: copy next to it, then rename over it.
    let staged = dir.path().join(".baton-demo.staged");
    let (ok, err) = run("cp", &[BINARY.as_ref(), staged.as_os_str()]);
    assert!(ok, "cp: {err}");
    let (ok, err) = run("mv", &[staged.as_os_str(), binary.as_os_str()]);
    assert!(ok, "mv: {err}");
    let old = server.pid();
    upgrade_runs(&mut server, &binary);
    // The old process ran the file that was renamed over, now deleted.
    if let Ok(link) = std::fs::read_link(format!("/proc/{old}/exe")) {
        assert!(
            link.to_string_lossy().ends_with(" (deleted)"),
            "old generation's exe: {link:?}"
        );
    }
}

fn replaced_by_copy(backend: &str) {
    let dir = TempDir::new("deploy-cp");
    let binary = dir.path().join("baton-demo");
    deploy_copy(Path::new(BINARY), &binary);
    let mut server = Server::start(&binary, backend, &[]);
    let before = inode(&binary);

    // Plain `cp` opens the running binary for writing: ETXTBSY.
    let (ok, err) = run("cp", &[BINARY.as_ref(), binary.as_os_str()]);
    server.check(
        !ok && err.contains("Text file busy"),
        format_args!("cp over a running binary: success={ok}, stderr={err:?}"),
    );
    server.check(inode(&binary) == before, "a failed cp left another file");

    // `cp --remove-destination` unlinks it and writes a new file.
    let (ok, err) = run(
        "cp",
        &[
            "--remove-destination".as_ref(),
            BINARY.as_ref(),
            binary.as_os_str(),
        ],
    );
    assert!(ok, "cp --remove-destination: {err}");
    upgrade_runs(&mut server, &binary);

    // `install` unlinks a busy destination too.
    let (ok, err) = run(
        "install",
        &[
            "-m".as_ref(),
            "0755".as_ref(),
            BINARY.as_ref(),
            binary.as_os_str(),
        ],
    );
    assert!(ok, "install: {err}");
    upgrade_runs(&mut server, &binary);
}

fn symlink_switched_to_new_release(backend: &str) {
    let dir = TempDir::new("deploy-symlink");
    let releases = dir.path().join("releases");
    for release in ["v1", "v2"] {
        std::fs::create_dir_all(releases.join(release)).unwrap();
        deploy_copy(
            Path::new(BINARY),
            &releases.join(release).join("baton-demo"),
        );
    }
    let current = dir.path().join("current");
    std::os::unix::fs::symlink("releases/v1", &current).unwrap();
    let mut server = Server::start(current.join("baton-demo"), backend, &[]);
    let v1 = releases.join("v1").join("baton-demo");
    let v2 = releases.join("v2").join("baton-demo");
    assert_eq!(exe_link(server.pid()), v1);

    // Switch atomically: a new link renamed over the old one.
    let next = dir.path().join("current.next");
    std::os::unix::fs::symlink("releases/v2", &next).unwrap();
    std::fs::rename(&next, &current).unwrap();
    let new = upgrade_runs(&mut server, &v2);
    server.check(
        exe_link(new) == v2,
        format_args!("new generation runs {:?}, expected {v2:?}", exe_link(new)),
    );
}

fn relative_path_from_another_directory(backend: &str) {
    let dir = TempDir::new("deploy-relative");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let binary = bin.join("baton-demo");
    deploy_copy(Path::new(BINARY), &binary);
    // The shell starts it as `./bin/baton-demo` from `dir` (exec: same pid).
    let mut command = Command::new("sh");
    command
        .current_dir(dir.path())
        .args(["-c", "exec ./bin/baton-demo \"$@\"", "sh"])
        .args(["--listen", "127.0.0.1:0", "--backend", backend]);
    let mut server = Server::spawn(command);
    server.wait_serving();
    assert_eq!(exe_inode(server.pid()), inode(&binary));
    deploy_copy(Path::new(BINARY), &binary);
    upgrade_runs(&mut server, &binary);
}

fn next_binary_overrides(backend: &str) {
    let dir = TempDir::new("deploy-next");
    let started = dir.path().join("baton-demo");
    let next = dir.path().join("baton-demo-next");
    deploy_copy(Path::new(BINARY), &started);
    deploy_copy(Path::new(BINARY), &next);
    let mut server = Server::start(
        &started,
        backend,
        &["--next-binary", next.to_str().unwrap()],
    );
    let new = upgrade_runs(&mut server, &next);
    server.check(
        exe_link(new) == next,
        "the next generation runs --next-binary",
    );

    // Missing, then not executable: refused before fork, still serving.
    std::fs::remove_file(&next).unwrap();
    for problem in ["No such file", "not executable"] {
        let pid = server.pid();
        server.signal(pid, Signal::SIGHUP);
        let failed = server.wait_for_pid(pid, "upgrade failed: ", LINE_TIMEOUT);
        server.check(
            failed.message().contains(next.to_str().unwrap()) && failed.message().contains(problem),
            format_args!("unclear failure line: {}", failed.text),
        );
        let forked = server.find(pid, |m| m.starts_with("upgrade started"));
        server.check(
            forked.is_none(),
            format_args!("a process was started for a bad binary: {forked:?}"),
        );
        let generation = server.generation();
        server.wait_answered_by(generation);
        // Now a file that exists but cannot be executed.
        std::fs::write(&next, b"not a program\n").unwrap();
    }
}
