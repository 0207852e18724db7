//! The environment of the application's own subprocesses:
//! [`baton_core::clear_inherited_env`] keeps the variables a server
//! inherited from its parent generation or from systemd (`LISTEN_*`,
//! `BATON_*`, `NOTIFY_SOCKET`) out of a `Command` it spawns, and leaves
//! every other variable alone.
//!
//! The variables are set on the `Command` itself (the test never mutates
//! its own environment), then the helper runs, then `/bin/sh -c env` prints
//! what the subprocess really got.

use std::process::{Command, Stdio};

use baton_core::protocol::INHERITED_VARS;

/// The names of the variables `command` passes, from `env` in the child.
fn child_env(command: &mut Command) -> Vec<(String, String)> {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run /bin/sh -c env");
    assert!(output.status.success(), "{:?}: {}", command, output.status);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn sh_env() -> Command {
    let mut command = Command::new("/bin/sh");
    command.args(["-c", "env"]);
    command
}

#[test]
fn inherited_variables_do_not_reach_the_subprocess() {
    let mut command = sh_env();
    for name in INHERITED_VARS {
        command.env(name, "inherited");
    }
    command.env("BATON_TEST_KEPT", "kept");
    // Without the helper, they all arrive: the test can fail.
    let before = child_env(&mut command);
    for name in INHERITED_VARS {
        assert!(
            before.iter().any(|(k, _)| k == name),
            "{name} was set but did not arrive: {before:?}"
        );
    }

    let returned: *const Command = baton_core::clear_inherited_env(&mut command);
    assert!(std::ptr::eq(returned, &command), "returns the same Command");
    let after = child_env(&mut command);
    for name in INHERITED_VARS {
        assert!(
            !after.iter().any(|(k, _)| k == name),
            "{name} reached the subprocess: {after:?}"
        );
    }
    assert!(
        after
            .iter()
            .any(|(k, v)| k == "BATON_TEST_KEPT" && v == "kept"),
        "another variable was removed: {after:?}"
    );
}

#[test]
fn every_protocol_variable_and_notify_socket_is_cleared() {
    for name in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "BATON_READY_FD",
        "BATON_GENERATION",
        "NOTIFY_SOCKET",
    ] {
        assert!(INHERITED_VARS.contains(&name), "{name}");
    }
    for name in INHERITED_VARS {
        assert!(
            baton_core::protocol::is_protocol_var(name) || *name == "NOTIFY_SOCKET",
            "{name}"
        );
    }
}

#[test]
fn chains_like_the_other_command_builders() {
    let mut command = sh_env();
    command.env("LISTEN_PID", "1");
    let after = child_env(baton_core::clear_inherited_env(&mut command).env("EXTRA", "1"));
    assert!(!after.iter().any(|(k, _)| k == "LISTEN_PID"), "{after:?}");
    assert!(after.iter().any(|(k, _)| k == "EXTRA"), "{after:?}");
}

/// Set in the environment of the re-run of this test binary that
/// [`variables_inherited_by_the_process_itself_are_cleared`] starts.
const HELPER: &str = "BATON_CHILD_ENV_HELPER";

/// Only does something in the re-run: spawns `sh -c env` through the
/// helper and prints what arrived, between markers.
#[test]
fn helper_spawns_env_with_the_inherited_variables_cleared() {
    if std::env::var_os(HELPER).is_none() {
        return;
    }
    let mut command = sh_env();
    let after = child_env(baton_core::clear_inherited_env(&mut command));
    println!("--- child env ---");
    for (k, v) in after {
        println!("{k}={v}");
    }
    println!("--- end ---");
}

/// The real case: the variables are in the server's own environment (put
/// there by its parent generation or systemd), not set on the `Command`.
/// The test binary re-runs itself with them, and the re-run spawns `env`.
#[test]
fn variables_inherited_by_the_process_itself_are_cleared() {
    let exe = std::env::current_exe().expect("current_exe");
    let mut rerun = Command::new(exe);
    rerun
        .args([
            "--exact",
            "helper_spawns_env_with_the_inherited_variables_cleared",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER, "1")
        .env("BATON_TEST_KEPT", "kept");
    for name in INHERITED_VARS {
        rerun.env(name, "inherited");
    }
    let output = rerun
        .stdin(Stdio::null())
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}\n{stdout}", output.status);
    let env: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.ends_with("--- child env ---"))
        .skip(1)
        .take_while(|l| *l != "--- end ---")
        .collect();
    assert!(!env.is_empty(), "no environment printed:\n{stdout}");
    for name in INHERITED_VARS {
        assert!(
            !env.iter().any(|l| l.starts_with(&format!("{name}="))),
            "{name} reached the subprocess:\n{stdout}"
        );
    }
    assert!(env.contains(&"BATON_TEST_KEPT=kept"), "{stdout}");
}
