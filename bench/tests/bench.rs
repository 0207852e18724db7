//! `baton-bench` end to end: runs the real tool for a short time against the
//! tokio backend and checks the report's structure, that baton's rows have no
//! failed request while the restart-without-handoff baseline has some, that
//! with the live handover no client reconnects while with it off they do,
//! and that every timeline SVG was written. No timing is asserted: the numbers
//! depend on the machine, the structure and the failure counts do not.
//!
//! **Where the demo binary comes from.** A test in this package cannot use
//! `CARGO_BIN_EXE_baton-demo` (that is only set for the demo's own tests),
//! and artifact dependencies are unstable. So the test takes `baton-demo`
//! from the directory cargo put `baton-bench` in (`target/debug/`). Under
//! `cargo test --workspace` cargo has built it there already, fresh, before
//! any test runs (the demo's own integration tests need it). Under
//! `cargo test -p baton-bench` on a fresh clone it is missing: the test then
//! runs `cargo build -p baton-demo --all-features` itself (the `CARGO` that
//! runs the tests, same target directory) and fails with that command's
//! output if it cannot. An existing binary is used as it is: after changing
//! the demo, test the workspace, or build the demo, to bench the new code.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BENCH: &str = env!("CARGO_BIN_EXE_baton-bench");

/// `baton-demo` next to `baton-bench`, built first if it is missing.
fn server() -> PathBuf {
    let server = Path::new(BENCH).with_file_name("baton-demo");
    if server.is_file() {
        return server;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "-p", "baton-demo", "--all-features"]);
    // The same target directory as this test, wherever CARGO_TARGET_DIR points.
    if let Some(target) = Path::new(BENCH).parent().and_then(Path::parent) {
        command.arg("--target-dir").arg(target);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    command.arg("--manifest-path").arg(manifest);
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success() && server.is_file(),
        "{command:?}: {}, no {}\n{}",
        output.status,
        server.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    server
}

/// The cells of the table row for `scenario`, after the leading `| backend |`.
fn row<'a>(table: &'a str, backend: &str, scenario: &str) -> Option<Vec<&'a str>> {
    table.lines().find_map(|line| {
        let cells: Vec<&str> = line
            .trim()
            .strip_prefix('|')?
            .strip_suffix('|')?
            .split('|')
            .map(str::trim)
            .collect();
        (cells.first() == Some(&backend) && cells.get(1) == Some(&scenario)).then_some(cells)
    })
}

/// Failed requests from a "failed requests" cell: `0` or `N: kind n, …`.
fn failed(cell: &str) -> u64 {
    let total = cell.split(':').next().unwrap_or_default();
    total
        .parse()
        .unwrap_or_else(|_| panic!("bad failures cell {cell:?}"))
}

/// A fresh directory for this test's SVGs.
fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn short_run_reports_every_scenario() {
    let out = out_dir();
    let mut command = Command::new(BENCH);
    command.args([
        "--duration",
        "2s",
        "--upgrade-every",
        "300ms",
        "--backend",
        "tokio",
    ]);
    command.args(["--connections", "8", "--server"]);
    command.arg(server()).arg("--out");
    command.arg(&out);
    let output = command.output().expect("run baton-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!(
        "command: {command:?}\nstatus: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    assert!(output.status.success(), "{context}");

    let header = stdout
        .lines()
        .find(|l| l.starts_with("| backend | scenario |"))
        .unwrap_or_else(|| panic!("no table header\n{context}"));
    let columns: Vec<&str> = header.split('|').map(str::trim).collect();
    for column in [
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "failed requests",
        "restarts",
        "restart median ms",
        "restart max ms",
        "reconnects per restart",
        "old gen held connections: median ms",
        "peak RSS MiB",
        "server CPU s",
        "client CPU s",
    ] {
        assert!(columns.contains(&column), "no column {column:?}\n{context}");
    }
    let failures_at = columns
        .iter()
        .position(|c| *c == "failed requests")
        .expect("column")
        - 1;

    let reconnects_at = columns
        .iter()
        .position(|c| *c == "reconnects per restart")
        .expect("column")
        - 1;
    for scenario in [
        "steady",
        "upgrades",
        "upgrades, handover off",
        "restart without handoff",
    ] {
        let cells = row(&stdout, "tokio", scenario)
            .unwrap_or_else(|| panic!("no row for {scenario}\n{context}"));
        assert_eq!(cells.len(), columns.len() - 2, "{scenario}\n{context}");
        let failed = failed(cells[failures_at]);
        if scenario == "restart without handoff" {
            assert!(failed > 0, "the baseline lost nothing?\n{context}");
        } else {
            assert_eq!(failed, 0, "baton failed requests in {scenario}\n{context}");
        }
    }
    // At least one upgrade ran, and none failed (a failure shows as "N (M failed)").
    let upgrades = row(&stdout, "tokio", "upgrades").expect("row");
    let restarts_at = failures_at + 1;
    let count: u64 = upgrades[restarts_at]
        .parse()
        .unwrap_or_else(|_| panic!("upgrades cell {:?}\n{context}", upgrades[restarts_at]));
    assert!(count >= 1, "no upgrade ran\n{context}");
    // Connections move with the handover; without it, every upgrade makes
    // the keep-alive clients connect again.
    assert_eq!(upgrades[reconnects_at], "0.0", "{context}");
    let drained = row(&stdout, "tokio", "upgrades, handover off").expect("row");
    let reconnects: f64 = drained[reconnects_at]
        .parse()
        .unwrap_or_else(|_| panic!("reconnects cell {:?}\n{context}", drained[reconnects_at]));
    assert!(
        reconnects > 0.0,
        "no reconnect without the handover?\n{context}"
    );

    for name in [
        "tokio-steady.svg",
        "tokio-upgrades.svg",
        "tokio-upgrades-drain.svg",
        "tokio-restart.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{context}"));
        assert!(svg.starts_with("<svg"), "{name} is no SVG\n{context}");
        assert!(svg.contains("</svg>"), "{name} is cut short\n{context}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
