//! The read-only fault probe: proof that a read-only grant mapping is enforced by the MMU.
//!
//! `SharedMem::write` refuses to write a read-only window before touching it, so it proves
//! nothing about the mapping itself. The probe makes a real CPU store into the mapping, in a
//! process that exists only to take the fault: on Linux a child (`xenvirtio-selftest
//! probe-write`) maps the grant read-only by itself, reads it, then stores into it. The store
//! must kill the child with SIGSEGV (or SIGBUS). The child maps the grant itself rather than
//! inheriting the parent's mapping through `fork`, because gntdev marks its mappings
//! `VM_DONTCOPY` on PV: a forked child would fault on an empty address and prove nothing.
//!
//! This module never stores into shared memory of the calling process.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xenvirtio_xen::linux::LinuxXen;
use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{Access, GrantMapper, MappedPages, Platform};
use xenvirtio_xen::{DomId, GrantRef};

/// What the child printed once it had mapped and read the page.
const MAPPED_MARK: &str = "probe-write: mapped read-only";
/// What the child printed if its store went through.
const WROTE_MARK: &str = "probe-write: the store went through";

/// How a store into a read-only mapping ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The store faulted: the process got `signal` (SIGSEGV or SIGBUS).
    Faulted {
        /// The signal number.
        signal: i32,
    },
    /// The store went through: the mapping is writable after all.
    Wrote,
}

/// A way of storing into a read-only grant mapping in a process that may die of it.
pub trait WriteProbe {
    /// Stores a byte at `offset` of the page `gref` of `peer`, mapped read-only; `mapping` is
    /// the caller's own read-only mapping of the same page (for probes that can use it).
    fn store_into_read_only(
        &self,
        peer: DomId,
        gref: GrantRef,
        offset: usize,
        mapping: SharedMem<'_>,
    ) -> Result<ProbeOutcome>;
}

/// The probe on real Xen: this program, run again as `probe-write`.
#[derive(Debug)]
pub struct ChildProcessProbe {
    exe: PathBuf,
    timeout: Duration,
}

impl ChildProcessProbe {
    /// Runs `/proc/self/exe` (this very binary) as the child.
    pub fn this_program() -> Result<Self> {
        Ok(Self {
            exe: std::env::current_exe().context("finding this program's path")?,
            timeout: Duration::from_secs(30),
        })
    }
}

impl WriteProbe for ChildProcessProbe {
    fn store_into_read_only(
        &self,
        peer: DomId,
        gref: GrantRef,
        offset: usize,
        _mapping: SharedMem<'_>,
    ) -> Result<ProbeOutcome> {
        let mut child = Command::new(&self.exe)
            .args(["probe-write", "--peer", &peer.to_string()])
            .args(["--gref", &gref.to_string(), "--offset", &offset.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} probe-write", self.exe.display()))?;
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for the probe")? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the probe child did not end within {:?}", self.timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut out);
        }
        let out = crate::report::one_line(&out);
        if !out.contains(MAPPED_MARK) {
            bail!("the probe child never mapped the page ({status}): {out}");
        }
        match status.signal() {
            Some(signal) if signal == libc::SIGSEGV || signal == libc::SIGBUS => {
                Ok(ProbeOutcome::Faulted { signal })
            }
            Some(signal) => bail!("the probe child died of signal {signal}: {out}"),
            None if out.contains(WROTE_MARK) => Ok(ProbeOutcome::Wrote),
            None => bail!("the probe child ended with {status} before storing: {out}"),
        }
    }
}

/// The child's side (`probe-write`): maps `gref` of `peer` read-only, reads the byte at
/// `offset`, then stores its complement there. It only returns if the store went through.
pub fn run_child(peer: DomId, gref: GrantRef, offset: usize) -> ExitCode {
    let xen = LinuxXen::new(0); // only the devices are used; the id is not
    let mapping = match xen
        .grant_mapper()
        .and_then(|m| m.map(peer, &[gref], Access::ReadOnly))
    {
        Ok(m) => m,
        Err(e) => {
            println!("probe-write: mapping ref {gref} of domain {peer} read-only failed: {e}");
            return ExitCode::from(3);
        }
    };
    let mem = mapping.mem();
    let before = match mem.read_array::<1>(offset) {
        Ok([b]) => b,
        Err(e) => {
            println!("probe-write: reading byte {offset} failed: {e}");
            return ExitCode::from(3);
        }
    };
    println!("{MAPPED_MARK}: ref {gref} of domain {peer}, byte {offset} is {before:#04x}; storing");
    // SAFETY: this process exists to take the fault (the parent runs it as a probe and
    // expects it to die of SIGSEGV); if the store goes through, that is the finding.
    let stored = unsafe { mem.write_byte_bypassing_protection(offset, !before) };
    let after = mem.read_array::<1>(offset).map(|[b]| b).unwrap_or(before);
    println!("{WROTE_MARK}: {stored:?}, byte {offset} is now {after:#04x}");
    ExitCode::SUCCESS
}

/// A probe for tests: a forked child stores through the caller's own mapping (fine where
/// mappings are inherited, as the loopback platform's are).
#[cfg(test)]
#[derive(Debug)]
pub struct ForkProbe;

#[cfg(test)]
impl WriteProbe for ForkProbe {
    fn store_into_read_only(
        &self,
        _peer: DomId,
        _gref: GrantRef,
        offset: usize,
        mapping: SharedMem<'_>,
    ) -> Result<ProbeOutcome> {
        // SAFETY: the child only stores and calls _exit, both async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork failed: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: this is the forked child, which exists to take the fault.
            let _ = unsafe { mapping.write_byte_bypassing_protection(offset, 0xee) };
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: pid is our child; status is a valid out-pointer.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            bail!("waitpid failed: {}", std::io::Error::last_os_error());
        }
        if libc::WIFSIGNALED(status) {
            Ok(ProbeOutcome::Faulted {
                signal: libc::WTERMSIG(status),
            })
        } else {
            Ok(ProbeOutcome::Wrote)
        }
    }
}
