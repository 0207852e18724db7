//! Stop signalling: one cloneable token that says "stop accepting and drain".

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_listener::Event;

/// Why a process stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The next generation reported ready and serves now.
    Upgraded,
    /// SIGTERM, SIGINT or an explicit request.
    Shutdown,
}

/// The runtime-free stop token: an atomic flag plus an [`Event`], so it can
/// be awaited from any executor ([`StopToken::stopped`]), waited on from a
/// plain thread, or hooked to a reactor's waker ([`StopToken::on_stop`]).
#[derive(Clone, Default)]
pub struct StopToken {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    stopped: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    event: Event,
    hooks: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

impl fmt::Debug for StopToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopToken")
            .field("stopped", &self.is_stopped())
            .field("reason", &self.reason())
            .finish()
    }
}

impl StopToken {
    /// A token that has not stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask everything holding a clone of this token to stop
    /// ([`StopReason::Shutdown`]). Idempotent.
    pub fn stop(&self) {
        self.stop_with(StopReason::Shutdown);
    }

    /// True once stopped.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }

    /// Stop with a reason; the first reason given is kept.
    pub fn stop_with(&self, reason: StopReason) {
        {
            let mut slot = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(reason);
        }
        // Release pairs with the Acquire in `is_stopped`: whoever sees the
        // flag also sees the reason written above.
        if self.inner.stopped.swap(true, Ordering::Release) {
            return;
        }
        self.inner.event.notify(usize::MAX);
        let hooks = self.inner.hooks.lock().unwrap_or_else(|e| e.into_inner());
        for hook in hooks.iter() {
            hook();
        }
    }

    /// Undo a stop, for a generation that serves again because its
    /// successor died while it drained. Hooks run again at the next stop.
    pub(crate) fn resume(&self) {
        let mut reason = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
        *reason = None;
        self.inner.stopped.store(false, Ordering::Release);
    }

    /// Why it stopped, once it has.
    pub fn reason(&self) -> Option<StopReason> {
        *self.inner.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once the token is stopped. Works on any executor.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn stopped(&self) {
        // Check, listen, check again: a stop between the first check and
        // the listen is not lost.
        while !self.is_stopped() {
            let listener = self.inner.event.listen();
            if self.is_stopped() {
                break;
            }
            listener.await;
        }
    }

    /// Call `hook` when the token stops (at once if it already has). For
    /// reactors that are woken by a handle rather than a future, such as
    /// `mio::Waker`. The hook runs on the thread that calls `stop`.
    pub fn on_stop(&self, hook: impl Fn() + Send + Sync + 'static) {
        let mut hooks = self.inner.hooks.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock that `stop_with` takes after setting the
        // flag, so the hook runs exactly once either way.
        if self.is_stopped() {
            drop(hooks);
            hook();
        } else {
            hooks.push(Box::new(hook));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn stop_is_seen_by_clones_and_keeps_first_reason() {
        let token = StopToken::new();
        let clone = token.clone();
        assert!(!clone.is_stopped());
        token.stop_with(StopReason::Upgraded);
        token.stop();
        assert!(clone.is_stopped());
        assert_eq!(clone.reason(), Some(StopReason::Upgraded));
    }

    #[test]
    fn stopped_future_wakes_a_waiting_thread() {
        let token = StopToken::new();
        let waiter = {
            let token = token.clone();
            std::thread::spawn(move || event_listener_block_on(token))
        };
        token.stop();
        waiter.join().unwrap();
    }

    fn event_listener_block_on(token: StopToken) {
        // A minimal executor: poll the future, park until woken.
        use std::future::Future;
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = std::pin::pin!(token.stopped());
        while fut.as_mut().poll(&mut cx) == Poll::Pending {
            std::thread::park();
        }
    }

    #[test]
    fn resume_rearms_the_token_and_its_hooks() {
        let token = StopToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        token.on_stop(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        token.stop_with(StopReason::Upgraded);
        token.resume();
        assert!(!token.is_stopped());
        assert_eq!(token.reason(), None);
        token.stop();
        assert_eq!(token.reason(), Some(StopReason::Shutdown));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn hooks_run_once_whether_registered_before_or_after() {
        let token = StopToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let before = calls.clone();
        token.on_stop(move || {
            before.fetch_add(1, Ordering::SeqCst);
        });
        token.stop();
        token.stop();
        let after = calls.clone();
        token.on_stop(move || {
            after.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
