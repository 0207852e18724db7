//! `baton-bench` end to end: runs the real tool for a short time against the
//! tokio backend and checks the report's structure, that baton's rows have no
//! failed request while the restart-without-handoff baseline has some, and
//! that every timeline SVG was written. No timing is asserted: the numbers
//! depend on the machine, the structure and the failure counts do not.

use std::path::{Path, PathBuf};
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_baton-bench");
const SERVER: &str = env!("CARGO_BIN_EXE_baton-demo");

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
    command.args(["--connections", "8", "--server", SERVER, "--out"]);
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

    for scenario in ["steady", "upgrades", "restart without handoff"] {
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

    for name in [
        "tokio-steady.svg",
        "tokio-upgrades.svg",
        "tokio-restart.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{context}"));
        assert!(svg.starts_with("<svg"), "{name} is no SVG\n{context}");
        assert!(svg.contains("</svg>"), "{name} is cut short\n{context}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
