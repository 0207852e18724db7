//! Binaries of other packages of the workspace, for process-level tests.
//!
//! Cargo says where a package's own binaries are (`CARGO_BIN_EXE_…`) only
//! to that package's tests. Another package's binary is looked for next to
//! the running test (`target/<profile>/NAME`, where `cargo test --workspace`
//! and `cargo build -p PACKAGE` put it); if it is missing, `cargo build -p
//! PACKAGE --bin NAME` builds it into the same target directory, and fails
//! with that advice if another cargo holds the build directory (a running
//! `cargo test` does). A stale binary is not rebuilt.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The binary `bin` of the workspace package `package`, built if missing.
///
/// # Panics
///
/// When it is missing and cannot be built, with the command that builds it.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test executable");
    // deps/TEST-HASH -> deps -> <profile>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let binary = dir.join(bin);
    if !binary.is_file() {
        build(dir, package, bin);
    }
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo build -p {package} --bin {bin}`",
        binary.display()
    );
    binary
}

/// `cargo build -p PACKAGE --bin BIN` into `profile_dir`'s target
/// directory, given up at once if another cargo holds the build directory.
fn build(profile_dir: &Path, package: &str, bin: &str) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "-p", package, "--bin", bin])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        command.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        command.env("CARGO_TARGET_DIR", target);
    }
    let spawned = {
        let _guard = crate::tempdir::spawn_guard();
        command.spawn()
    };
    let mut child = spawned.unwrap_or_else(|e| panic!("run cargo build -p {package}: {e}"));
    let stderr = child.stderr.take().expect("cargo's stderr");
    // Bounded by cargo's output, which ends when cargo does.
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        if line.contains("Blocking waiting for file lock") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{bin} is not built and the build directory is locked: \
                 run `cargo build -p {package} --bin {bin}` first"
            );
        }
    }
    let status = child.wait().expect("wait for cargo build");
    assert!(status.success(), "cargo build -p {package}: {status}");
}
