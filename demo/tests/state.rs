//! Application state without connections moves to the next generation, once
//! per compiled backend: the demo counts the requests every generation so far
//! has served (`/stats` answers `requests N`) and hands the count on as the
//! state item `"requests"`, received before the new generation reports
//! ready.
//!
//! - Some requests, an upgrade: the new generation's count is at least what
//!   the old one had served, and the old one logs the commit.
//! - An upgrade to a generation of another state version: nothing moves,
//!   the upgrade still succeeds, the count starts again, and the old
//!   generation logs why.

mod common;

use testkit::per_backend;

use common::{get, Server, TempDir, BINARY};

per_backend! {
    fn request_count_moves_to_the_next_generation;
    fn another_state_version_moves_nothing_and_the_upgrade_succeeds;
}

/// `/stats` of whoever serves: its count and generation.
#[track_caller]
fn stats(server: &Server) -> (u64, Option<u64>) {
    let reply = get(server.addr(), "/stats").unwrap_or_else(|e| server.fail(e));
    server.check(reply.status == 200, format_args!("/stats: {reply:?}"));
    let count = reply
        .body
        .trim()
        .strip_prefix("requests ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| server.fail(format_args!("/stats body: {:?}", reply.body)));
    (count, reply.generation)
}

/// `/stats` of generation `expected`: the old generation may still answer
/// a connection it accepted before it stopped (bounded).
#[track_caller]
fn stats_of(server: &Server, expected: u64) -> u64 {
    for _ in 0..1000 {
        if let (count, Some(generation)) = stats(server) {
            if generation == expected {
                return count;
            }
        }
    }
    server.fail(format_args!("generation {expected} never answered /stats"))
}

#[track_caller]
fn serve_requests(server: &Server, n: usize) {
    for _ in 0..n {
        let reply = get(server.addr(), "/").unwrap_or_else(|e| server.fail(e));
        server.check(reply.status == 200, format_args!("GET /: {reply:?}"));
    }
}

fn request_count_moves_to_the_next_generation(backend: &str) {
    let mut server = Server::start(BINARY, backend, &[]);
    serve_requests(&server, 20);
    let (before, generation) = stats(&server);
    server.check(
        before >= 21 && generation == Some(0),
        format_args!("generation 0 counted {before} (generation {generation:?})"),
    );
    let old = server.pid();
    let new = server.upgrade();
    let received = server.find(new, |m| m.starts_with("state: received \"requests\" v1 ("));
    server.check(
        received.is_some(),
        "the new generation logs what it received",
    );
    let committed = server.find(old, |m| m.starts_with("state: committed"));
    server.check(committed.is_some(), "the old generation logs the commit");
    let after = stats_of(&server, 1);
    server.check(
        after > before,
        format_args!("generation 1 counts {after}, generation 0 had served {before}"),
    );
}

fn another_state_version_moves_nothing_and_the_upgrade_succeeds(backend: &str) {
    let dir = TempDir::new("state-version");
    let file = dir.path().join("state-version");
    std::fs::write(&file, "1\n").unwrap();
    let mut server = Server::start(
        BINARY,
        backend,
        &["--state-version-file", file.to_str().unwrap()],
    );
    serve_requests(&server, 50);
    let (before, _) = stats(&server);
    std::fs::write(&file, "2\n").unwrap();
    let old = server.pid();
    let new = server.upgrade();
    let why = server.find(old, |m| {
        m.starts_with("state: not moved: new process") && m.contains("shares no state version")
    });
    server.check(why.is_some(), "the old generation logs why nothing moved");
    let none = server.find(new, |m| m.contains("no state version in common"));
    server.check(none.is_some(), "the new generation logs that nothing moved");
    let after = stats_of(&server, 1);
    server.check(
        after < before,
        format_args!(
            "generation 1 counts {after}: it should start again (generation 0 had {before})"
        ),
    );
}
