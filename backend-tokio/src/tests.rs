//! Unit tests of baton-tokio: listeners, the upgrade path against small
//! shell scripts standing in for the next generation (ready, exit, silence,
//! stop while waiting), and the successor watch after a handover.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use super::*;

/// Bound on every wait in these tests.
const BOUND: Duration = Duration::from_secs(10);

/// The scripts, written once before any test forks, so no forked child holds
/// one open for writing while another test execs it (ETXTBSY).
fn scripts() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("baton-tokio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the script dir");
        let scripts = [
            (
                "ready.sh",
                r#"[ "$LISTEN_FDS $LISTEN_FDNAMES $BATON_GENERATION" = "1 http 1" ] || exit 7
printf 1 >&"$BATON_READY_FD"; exec sleep 30"#,
            ),
            ("exit3.sh", "exit 3"),
            ("silent.sh", "exec sleep 30"),
            (
                "ready_then_exit5.sh",
                r#"printf 1 >&"$BATON_READY_FD"; exit 5"#,
            ),
            (
                "ready_then_exit0.sh",
                r#"printf 1 >&"$BATON_READY_FD"; exit 0"#,
            ),
        ];
        for (name, body) in scripts {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write a script");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("chmod a script");
        }
        dir
    })
}

/// A generation listening on `http`, whose upgrades run the script `name`.
fn baton_with_script(name: &str, timeout: Duration) -> Baton {
    let path = scripts().join(name);
    let config = Config::default()
        .program(&path)
        .args(vec![OsString::from(&path)])
        .upgrade_timeout(timeout);
    let baton = Baton::from_env(config).expect("a generation");
    baton
        .listen("http", &"127.0.0.1:0".parse().expect("address"))
        .expect("listen");
    baton
}

async fn bounded<T>(work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, work)
        .await
        .expect("bounded wait")
}

#[test]
fn listening_outside_a_runtime_is_an_error_not_a_panic() {
    let baton = Baton::from_env(Config::default()).expect("a generation");
    let err = baton
        .listen("http", &"127.0.0.1:0".parse().expect("address"))
        .unwrap_err();
    assert!(err.to_string().contains("inside a tokio runtime"), "{err}");
}

#[tokio::test]
async fn upgrade_to_a_ready_child_stops_this_generation() {
    let baton = baton_with_script("ready.sh", BOUND);
    let upgraded = bounded(baton.upgrade()).await.expect("upgrade");
    assert_eq!(upgraded.generation, 1);
    assert!(baton.is_stopped());
    assert_eq!(baton.stop_token().reason(), Some(StopReason::Upgraded));
    let _ = std::process::Command::new("kill")
        .arg(upgraded.pid.to_string())
        .status();
}

#[tokio::test]
async fn a_child_that_exits_fails_the_upgrade_and_we_serve_on() {
    let baton = baton_with_script("exit3.sh", BOUND);
    let err = bounded(baton.upgrade()).await.unwrap_err();
    assert!(
        matches!(
            err,
            UpgradeError::ChildExited {
                status: ExitStatus::Exited(3),
                ..
            }
        ),
        "{err}"
    );
    assert!(!baton.is_stopped());
}

#[tokio::test]
async fn a_silent_child_times_out_and_a_second_upgrade_is_refused_meanwhile() {
    let baton = baton_with_script("silent.sh", Duration::from_millis(300));
    let pending = baton.start_upgrade().expect("start");
    let refused = baton.start_upgrade().unwrap_err();
    assert!(
        matches!(refused, UpgradeError::AlreadyRunning { .. }),
        "{refused}"
    );
    let err = bounded(pending.ready()).await.unwrap_err();
    assert!(matches!(err, UpgradeError::Timeout { .. }), "{err}");
    assert!(!baton.is_stopped());
}

#[tokio::test]
async fn a_stop_while_waiting_abandons_the_upgrade() {
    let baton = baton_with_script("silent.sh", BOUND);
    let pending = baton.start_upgrade().expect("start");
    baton.stop();
    let err = bounded(pending.ready()).await.unwrap_err();
    assert!(matches!(err, UpgradeError::Stopping), "{err}");
}

#[tokio::test]
async fn a_successor_that_dies_while_we_drain_makes_us_serve_again() {
    let baton = baton_with_script("ready_then_exit5.sh", BOUND);
    let upgraded = bounded(baton.upgrade()).await.expect("upgrade");
    let outcome = bounded(baton.drain_watching(BOUND, BOUND))
        .await
        .expect("watch");
    assert_eq!(
        outcome,
        DrainOutcome::Resumed {
            successor: upgraded.pid,
            status: ExitStatus::Exited(5)
        }
    );
    assert!(!baton.is_stopped(), "serving again");
    baton.reopen("http").expect("the held listener is reopened");
}

#[tokio::test]
async fn a_successor_that_exits_cleanly_handed_over_and_we_exit() {
    let baton = baton_with_script("ready_then_exit0.sh", BOUND);
    bounded(baton.upgrade()).await.expect("upgrade");
    let outcome = bounded(baton.drain_watching(BOUND, Duration::from_millis(200)))
        .await
        .expect("watch");
    assert!(matches!(outcome, DrainOutcome::Drained(_)), "{outcome:?}");
    assert!(baton.is_stopped());
}
