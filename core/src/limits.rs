//! Process limits a server should lift at start-up.

use crate::sys;

/// The soft `RLIMIT_NOFILE` before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit found.
    pub before: u64,
    /// The soft limit now in force.
    pub now: u64,
}

/// Raise the soft open-file limit to the hard limit, as Go's runtime does at
/// start: systemd's default soft limit (1024) is far below what a server
/// holding thousands of connections needs, and the hard limit is what the
/// operator allows. The next generation inherits the raised limit.
///
/// Programs using `select(2)` cannot handle fds above 1023; a server that
/// starts such programs should lower the limit for them.
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let (soft, hard) = sys::nofile_limit()?;
    // An unlimited hard limit is refused above the kernel's nr_open.
    let target = if hard == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    if soft >= target {
        return Ok(FdLimit {
            before: soft,
            now: soft,
        });
    }
    sys::set_nofile_soft_limit(target, hard)?;
    Ok(FdLimit {
        before: soft,
        now: target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_the_soft_limit_to_the_hard_one() {
        let (soft, hard) = sys::nofile_limit().unwrap();
        // Start from a low soft limit, as under systemd's default.
        let low = soft.min(hard).min(256);
        sys::set_nofile_soft_limit(low, hard).unwrap();
        let raised = raise_fd_limit().unwrap();
        assert_eq!(raised.before, low);
        assert!(raised.now >= low);
        let (now, hard_now) = sys::nofile_limit().unwrap();
        assert_eq!(hard_now, hard, "the hard limit is never touched");
        assert_eq!(now, raised.now);
        if hard != libc::RLIM_INFINITY {
            assert_eq!(now, hard);
        }
        // Idempotent: nothing left to raise.
        let again = raise_fd_limit().unwrap();
        assert_eq!((again.before, again.now), (now, now));
    }
}
