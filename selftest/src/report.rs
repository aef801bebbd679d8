//! Result lines: `PASS <name> [detail]` and `FAIL <name> [detail]`, one per check, on stdout.
//!
//! This module owns the line format that the e2e harness turns into check lines
//! (`xv_check_lines` in `scripts/xen-qemu/guest/xv-lib.sh`): a name without blanks, then a
//! detail on the same line. It never decides what passes; the checks do. Each line is flushed
//! as soon as it is written, so a check that crashes the process later cannot lose the lines
//! before it.

use std::fmt::Display;
use std::io::Write;

/// The longest detail written; the harness cuts at 300 characters anyway.
const MAX_DETAIL: usize = 280;

/// Collects and prints the results of one run.
pub struct Report {
    out: Box<dyn Write + Send>,
    passed: usize,
    failed: usize,
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report")
            .field("passed", &self.passed)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Report {
    /// Results go to stdout.
    pub fn stdout() -> Self {
        Self::to(Box::new(std::io::stdout()))
    }

    /// Results go to `out`.
    pub fn to(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            passed: 0,
            failed: 0,
        }
    }

    /// Records a passed check.
    pub fn pass(&mut self, name: &str, detail: impl Display) {
        self.passed += 1;
        self.line("PASS", name, &detail.to_string());
    }

    /// Records a failed check.
    pub fn fail(&mut self, name: &str, detail: impl Display) {
        self.failed += 1;
        self.line("FAIL", name, &detail.to_string());
    }

    /// Records a check that passed if `ok`.
    pub fn check(&mut self, name: &str, ok: bool, detail: impl Display) {
        if ok {
            self.pass(name, detail);
        } else {
            self.fail(name, detail);
        }
    }

    /// Records a check that passed if `result` is `Ok`, with the detail `describe` gives for
    /// the value, or the error chain; hands the value on.
    pub fn result<T>(
        &mut self,
        name: &str,
        result: anyhow::Result<T>,
        describe: impl FnOnce(&T) -> String,
    ) -> Option<T> {
        match result {
            Ok(value) => {
                self.pass(name, describe(&value));
                Some(value)
            }
            Err(e) => {
                self.fail(name, format!("{e:#}"));
                None
            }
        }
    }

    /// Number of failed checks so far.
    pub fn failed(&self) -> usize {
        self.failed
    }

    /// Number of passed checks so far.
    #[cfg(test)]
    pub fn passed(&self) -> usize {
        self.passed
    }

    fn line(&mut self, status: &str, name: &str, detail: &str) {
        let name = one_word(name);
        let detail = one_line(detail);
        let line = if detail.is_empty() {
            format!("{status} {name}\n")
        } else {
            format!("{status} {name} {detail}\n")
        };
        // A report that cannot be written is lost anyway; the exit status still tells.
        let _ = self.out.write_all(line.as_bytes());
        let _ = self.out.flush();
    }
}

/// A check name as one word: blanks become `-` (the harness refuses names with blanks).
fn one_word(name: &str) -> String {
    if name.is_empty() {
        return "unnamed".into();
    }
    name.chars()
        .map(|c| if c.is_whitespace() { '-' } else { c })
        .collect()
}

/// A detail on one line, without control characters, at most [`MAX_DETAIL`] characters.
pub fn one_line(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len().min(MAX_DETAIL));
    let mut last_blank = true;
    for c in detail.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && last_blank {
            continue;
        }
        last_blank = c == ' ';
        if out.chars().count() >= MAX_DETAIL {
            out.push_str("...");
            break;
        }
        out.push(c);
    }
    out.trim_end().to_owned()
}

/// A report's output kept in memory, for the tests of every check module.
#[cfg(test)]
#[derive(Clone, Default, Debug)]
pub(crate) struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Sink {
    /// Everything written so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[cfg(test)]
impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::report::Sink;

    #[test]
    fn lines_have_the_harness_format() {
        let sink = Sink::default();
        let mut r = Report::to(Box::new(sink.clone()));
        r.pass("grant-map", "pattern ok\nover 2 pages");
        r.fail("evtchn back", "");
        r.check("x", true, "  padded\t detail  ");
        let v = r.result(
            "y",
            Err::<(), _>(anyhow::anyhow!("inner").context("outer")),
            |_| unreachable!(),
        );
        assert!(v.is_none());
        assert_eq!(r.result("z", Ok(5), |v| format!("v={v}")), Some(5));
        let text = sink.text();
        assert_eq!(
            text,
            "PASS grant-map pattern ok over 2 pages\n\
             FAIL evtchn-back\n\
             PASS x padded detail\n\
             FAIL y outer: inner\n\
             PASS z v=5\n"
        );
        assert_eq!((r.passed(), r.failed()), (3, 2));
    }

    #[test]
    fn long_details_are_cut() {
        let long = "x".repeat(1000);
        let l = one_line(&long);
        assert_eq!(l.len(), MAX_DETAIL + 3);
        assert!(l.ends_with("..."));
    }
}
