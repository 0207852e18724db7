//! Counts from `/proc`: open fds of a process (and those it inherited from
//! the test process), process state and zombie children. Linux only.

use std::collections::BTreeMap;
use std::io;

/// Open file descriptors of `pid`, from `/proc/PID/fd`.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Open fds of `pid` and what each points to, from `/proc/PID/fd`.
pub fn fd_links(pid: &str) -> BTreeMap<u32, String> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Fds (3 and up) that `pid` inherited from this test process: those of
/// ours without close-on-exec, at the same number with the same target.
/// Generation 0 gets them from whatever runs the tests (a shell, CI); baton
/// rightly does not pass them on, so fd counts leave them out.
pub fn inherited_from_tests(pid: u32) -> Vec<(u32, String)> {
    let theirs = fd_links(&pid.to_string());
    fd_links("self")
        .into_iter()
        .filter(|(fd, target)| {
            *fd >= 3
                && theirs.get(fd) == Some(target)
                && std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).is_ok_and(|info| {
                    info.lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                        .is_some_and(|flags| flags & 0o2_000_000 == 0)
                })
        })
        .collect()
}

/// `(state, ppid)` of `pid` from `/proc/PID/stat`; None if there is no such process.
pub fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Zombie children of `pid`: processes in state `Z` whose parent is `pid`.
pub fn zombie_children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| matches!(proc_state(p), Some(('Z', parent)) if parent == pid))
        .collect()
}
