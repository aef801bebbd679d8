//! Progress of a long transfer (`copy`, `verify`) on stderr, only when stderr is a terminal:
//! one line redrawn at most four times a second, then left in place. Logs and pipes see none
//! of it.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_millis(250);
const MIB: f64 = (1u64 << 20) as f64;

pub(crate) struct Progress {
    what: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    last: Option<Instant>,
    out: Option<Box<dyn Write>>,
}

impl Progress {
    /// Progress of `what` (`writing`, `reading back`) over `total` bytes, drawn if stderr is
    /// a terminal.
    pub(crate) fn new(what: &'static str, total: u64) -> Progress {
        let err = std::io::stderr();
        let out: Option<Box<dyn Write>> = if err.is_terminal() {
            Some(Box::new(err))
        } else {
            None
        };
        Progress::to(what, total, out)
    }

    fn to(what: &'static str, total: u64, out: Option<Box<dyn Write>>) -> Progress {
        Progress {
            what,
            total,
            done: 0,
            started: Instant::now(),
            last: None,
            out,
        }
    }

    /// `n` more bytes are done.
    pub(crate) fn add(&mut self, n: u64) {
        self.done += n;
        let due = self.last.is_none_or(|t| t.elapsed() >= EVERY) || self.done >= self.total;
        if due {
            self.draw();
        }
    }

    fn draw(&mut self) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let pct = self
            .done
            .saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100);
        let _ = write!(
            out,
            "\r{}: {:.1} of {:.1} MiB ({pct}%), {:.1} MiB/s ",
            self.what,
            self.done as f64 / MIB,
            self.total as f64 / MIB,
            self.done as f64 / MIB / secs
        );
        let _ = out.flush();
        self.last = Some(Instant::now());
    }
}

impl Drop for Progress {
    /// The line stays; what follows starts on a line of its own.
    fn drop(&mut self) {
        if self.last.is_some() {
            if let Some(out) = self.out.as_mut() {
                let _ = writeln!(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_terminal_sees_a_redrawn_line_and_a_pipe_sees_nothing() {
        let seen = Shared::default();
        {
            let mut p = Progress::to("writing", 4 << 20, Some(Box::new(seen.clone())));
            for _ in 0..4 {
                p.add(1 << 20);
            }
        }
        let text = String::from_utf8(seen.0.lock().unwrap().clone()).unwrap();
        // The first chunk and the last are drawn (the others come within 250 ms).
        assert!(
            text.starts_with("\rwriting: 1.0 of 4.0 MiB (25%), "),
            "{text:?}"
        );
        assert!(
            text.contains("\rwriting: 4.0 of 4.0 MiB (100%), "),
            "{text:?}"
        );
        assert!(text.ends_with('\n'), "{text:?}");
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        // Not a terminal: nothing, and no panic.
        let mut quiet = Progress::to("writing", 10, None);
        quiet.add(10);
    }
}
