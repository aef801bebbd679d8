//! The one mio event-loop helper of the backend (STYLE #7): it owns the `Poll`, the waker that
//! other threads use to stop or poke the loop, and the retry on `EINTR`.
//!
//! A loop's owner names its event sources with a token enum ([`LoopToken`]) and implements
//! [`EventHandler`]; [`EventLoop::run`] then turns readiness into `handle_event(token)` calls
//! and deadlines into `handle_timeout()` until the handler breaks. This module never looks at
//! what a source is; it only waits.

use std::io;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Registry, Token, Waker};

/// The tokens of one loop, as an enum: the waker has its own variant.
pub trait LoopToken: Copy + std::fmt::Debug {
    /// The variant the waker fires.
    const WAKE: Self;
    /// The mio token of this variant.
    fn token(self) -> Token;
    /// The variant of a mio token (`None` for a token this loop never registered).
    fn from_token(token: Token) -> Option<Self>;
}

/// What a loop's owner does with readiness and deadlines.
pub trait EventHandler<T: LoopToken> {
    /// When the loop must call [`EventHandler::handle_timeout`] at the latest (`None`: only on
    /// events).
    fn deadline(&self) -> Option<Instant>;
    /// One source is ready (the waker included). Breaking stops the loop.
    fn handle_event(&mut self, token: T, registry: &Registry) -> ControlFlow<()>;
    /// The deadline passed, or a batch of events was handled: re-evaluate. Breaking stops the
    /// loop.
    fn handle_timeout(&mut self, registry: &Registry) -> ControlFlow<()>;
}

/// A `Poll` with its waker.
#[derive(Debug)]
pub struct EventLoop<T: LoopToken> {
    poll: Poll,
    events: Events,
    waker: Arc<Waker>,
    _tokens: std::marker::PhantomData<T>,
}

impl<T: LoopToken> EventLoop<T> {
    /// A new loop whose waker fires `T::WAKE`.
    pub fn new() -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), T::WAKE.token())?);
        Ok(Self {
            poll,
            events: Events::with_capacity(64),
            waker,
            _tokens: std::marker::PhantomData,
        })
    }

    /// Where sources are registered.
    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// The waker: any thread may call `wake()` on it to make the loop run its handler.
    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Waits until a source is ready or `deadline` passes, retrying `EINTR`; returns the ready
    /// tokens (empty on a timeout).
    pub fn wait(&mut self, deadline: Option<Instant>) -> io::Result<Vec<T>> {
        loop {
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let mut out: Vec<T> = Vec::new();
        for ev in self.events.iter() {
            if let Some(t) = T::from_token(ev.token()) {
                if !out.iter().any(|o| o.token() == t.token()) {
                    out.push(t);
                }
            }
        }
        Ok(out)
    }

    /// Runs `handler` until it breaks. After every batch of events (and on every deadline) it
    /// calls [`EventHandler::handle_timeout`], so a handler re-evaluates its state machine in
    /// one place.
    pub fn run(&mut self, handler: &mut impl EventHandler<T>) -> io::Result<()> {
        loop {
            if handler.handle_timeout(self.poll.registry()).is_break() {
                return Ok(());
            }
            let deadline = handler.deadline();
            // A deadline far away is as good as none; capping it keeps `Instant` arithmetic
            // in range.
            let deadline = deadline.map(|d| d.min(Instant::now() + Duration::from_secs(3600)));
            for token in self.wait(deadline)? {
                if handler.handle_event(token, self.poll.registry()).is_break() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Tok {
        Wake,
        Other,
    }

    impl LoopToken for Tok {
        const WAKE: Self = Tok::Wake;
        fn token(self) -> Token {
            Token(self as usize)
        }
        fn from_token(token: Token) -> Option<Self> {
            match token.0 {
                0 => Some(Tok::Wake),
                1 => Some(Tok::Other),
                _ => None,
            }
        }
    }

    struct Counter {
        wakes: u32,
        timeouts: u32,
        deadline: Option<Instant>,
    }

    impl EventHandler<Tok> for Counter {
        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }
        fn handle_event(&mut self, token: Tok, _: &Registry) -> ControlFlow<()> {
            assert_eq!(token, Tok::Wake);
            self.wakes += 1;
            ControlFlow::Break(())
        }
        fn handle_timeout(&mut self, _: &Registry) -> ControlFlow<()> {
            self.timeouts += 1;
            if self.timeouts == 3 {
                self.deadline = None;
            }
            ControlFlow::Continue(())
        }
    }

    #[test]
    fn deadlines_then_a_wake_from_another_thread_stop_the_loop() {
        let mut lp: EventLoop<Tok> = EventLoop::new().unwrap();
        let waker = lp.waker();
        let mut h = Counter {
            wakes: 0,
            timeouts: 0,
            deadline: Some(Instant::now()),
        };
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.wake().unwrap();
        });
        lp.run(&mut h).unwrap();
        t.join().unwrap();
        assert_eq!(h.wakes, 1);
        assert_eq!(
            h.timeouts, 3,
            "two deadlines passed, then it slept until the wake"
        );
    }
}
