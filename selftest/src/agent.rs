//! The DomU end of the e2e command channel (`agent`): runs the commands Dom0 writes into
//! xenstore and writes back their output and exit status. Dom0's end is `xv_domu_run` in
//! `scripts/xen-qemu/guest/xv-lib.sh`; docs/E2E.md ("The command channel") is the reference.
//!
//! The keys, below `B = /local/domain/<domid>/data/xenvirtio-agent`:
//! - `B/ready = 1`, written by the agent once it serves requests;
//! - `B/req/<seq>/timeout` (seconds) and `B/req/<seq>/cmd` (base64 of a command for `sh`),
//!   written by Dom0;
//! - `B/rsp/<seq>/out/<i>` (base64 of output bytes `[1500*i, 1500*(i+1))`, at most the last
//!   24 KiB), `B/rsp/<seq>/chunks`, and `B/rsp/<seq>/rc` (the exit status, the completion
//!   marker), written by the agent in one transaction.
//!
//! Requests run one at a time, in the order their `cmd` nodes appear; a request is served once.
//! A command that outlives its timeout gets SIGTERM, then SIGKILL 5 s later; its status is then
//! 128 + the signal (143 or 137), as a shell reports it. The agent never interprets a command
//! and never runs one outside `B/req`. It speaks xenstore through the project's own client, so
//! a DomU image needs no xenstore tools.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use xenvirtio_xenstore::{TxId, XenStore, transaction};

use crate::base64;

/// The agent's directory below a domain's home.
pub const AGENT_KEY: &str = "data/xenvirtio-agent";
/// Output bytes sent back: the tail.
const MAX_OUTPUT: usize = 24576;
/// Bytes per `out/<i>` node: a multiple of 3, so the chunks concatenate into one base64 text,
/// and small enough for a guest's node: xenstored refuses (ENOSPC) a guest's node record of
/// 2048 bytes or more, header and permissions included, which leaves about 2000 bytes of value.
/// 1500 bytes are 2000 base64 characters.
const CHUNK: usize = 1500;
/// The timeout of a request whose `timeout` node is missing or not a number.
const DEFAULT_TIMEOUT: u64 = 60;
/// Between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// The watch token.
const TOKEN: &str = "xenvirtio-agent";
/// Status of a request the agent could not run (the channel-error status of `xv_domu_run`).
const RC_NOT_RUN: i32 = 125;

/// Where and how the agent serves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `B`: the absolute path of the agent's directory.
    pub base: String,
    /// Where commands and their output are kept while they run.
    pub state_dir: PathBuf,
    /// Lines about each request go here (the DomU console).
    pub log: fn(&str),
}

/// Prints a log line on stdout, with `@@` broken up so that a command's text never looks like
/// a check line on the console (as `xv_oneline` does).
pub fn log_to_stdout(line: &str) {
    println!("{}", crate::report::one_line(line).replace("@@", "@ @"));
}

/// The agent. It remembers which requests it has served across reconnections, so that a
/// request is never run twice.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    taken: HashSet<u64>,
}

impl Agent {
    /// An agent serving `config.base`.
    pub fn new(config: AgentConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        Ok(Self {
            config,
            taken: HashSet::new(),
        })
    }

    /// Publishes `ready` and serves through `store` until `stop` is set or the connection
    /// fails (the error says why; the caller reconnects and calls this again).
    pub fn serve(&mut self, store: &dyn XenStore, stop: &AtomicBool) -> Result<()> {
        let mut conn = Connection { agent: self, store };
        conn.serve(stop)
    }
}

/// The agent on one connection.
struct Connection<'a> {
    agent: &'a mut Agent,
    store: &'a dyn XenStore,
}

impl Connection<'_> {
    fn serve(&mut self, stop: &AtomicBool) -> Result<()> {
        let req = format!("{}/req", self.agent.config.base);
        let events = self.store.watch_events_for(TOKEN)?;
        self.store
            .watch(&req, TOKEN)
            .with_context(|| format!("watching {req}"))?;
        self.store
            .write(
                TxId::NONE,
                &format!("{}/ready", self.agent.config.base),
                b"1",
            )
            .with_context(|| format!("writing {}/ready", self.agent.config.base))?;
        (self.agent.config.log)(&format!("xv-agent: serving {}", self.agent.config.base));
        while !stop.load(Ordering::Relaxed) {
            if events.next_timeout(Duration::from_millis(500))?.is_none() {
                continue;
            }
            // Events of one token fold into one while unread (xenstore's watch queue keeps at
            // most one pending per token), so an event names "something under req changed",
            // not which request: look at every request not served yet.
            self.serve_pending()?;
        }
        let _ = self.store.unwatch(&req, TOKEN);
        Ok(())
    }

    /// Serves every request not taken yet, oldest first.
    fn serve_pending(&mut self) -> Result<()> {
        let req = format!("{}/req", self.agent.config.base);
        let listed = match self.store.directory(TxId::NONE, &req) {
            Ok(l) => l,
            Err(e) if e.is_enoent() => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("listing {req}")),
        };
        let mut seqs: Vec<u64> = listed.iter().filter_map(|s| s.parse().ok()).collect();
        seqs.sort_unstable();
        // Forget requests Dom0 has removed: the set stays as small as the backlog.
        self.agent.taken.retain(|s| seqs.contains(s));
        for seq in seqs {
            self.serve_one(seq)?;
        }
        Ok(())
    }

    /// Serves request `seq` unless it was served already or is not complete yet. Only a
    /// failing connection is an error; a failing command is its answer.
    fn serve_one(&mut self, seq: u64) -> Result<()> {
        if self.agent.taken.contains(&seq) {
            return Ok(());
        }
        let dir = format!("{}/req/{seq}", self.agent.config.base);
        let Some(cmd) = self
            .store
            .read_optional(TxId::NONE, &format!("{dir}/cmd"))?
        else {
            return Ok(()); // served when its cmd node appears
        };
        let timeout = self
            .store
            .read_optional(TxId::NONE, &format!("{dir}/timeout"))?
            .and_then(|t| String::from_utf8(t).ok())
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_TIMEOUT);
        self.agent.taken.insert(seq);
        let (output, rc) = match base64::decode(&cmd) {
            Ok(script) => {
                (self.agent.config.log)(&format!(
                    "xv-agent: [{seq}] (timeout {timeout}s) {}",
                    String::from_utf8_lossy(&script)
                ));
                self.run(seq, &script, Duration::from_secs(timeout))
            }
            Err(e) => (
                format!("xv-agent: request {seq}: {e}\n").into_bytes(),
                RC_NOT_RUN,
            ),
        };
        self.answer(seq, &output, rc)
    }

    /// Runs `script` with `sh`, output and errors merged, bounded by `timeout`.
    fn run(&self, seq: u64, script: &[u8], timeout: Duration) -> (Vec<u8>, i32) {
        let cmd_path = self.agent.config.state_dir.join(format!("{seq}.cmd"));
        let out_path = self.agent.config.state_dir.join(format!("{seq}.out"));
        let result = run_script(&cmd_path, &out_path, script, timeout);
        let _ = std::fs::remove_file(&cmd_path);
        let _ = std::fs::remove_file(&out_path);
        match result {
            Ok(r) => r,
            Err(e) => (
                format!("xv-agent: running request {seq} failed: {e:#}\n").into_bytes(),
                RC_NOT_RUN,
            ),
        }
    }

    /// Writes the answer: the output's tail in chunks, their count, and the status, in one
    /// transaction.
    fn answer(&self, seq: u64, output: &[u8], rc: i32) -> Result<()> {
        let tail = &output[output.len().saturating_sub(MAX_OUTPUT)..];
        let rsp = format!("{}/rsp/{seq}", self.agent.config.base);
        let chunks: Vec<String> = tail.chunks(CHUNK).map(base64::encode).collect();
        transaction(self.store, 8, |tx| {
            for (i, chunk) in chunks.iter().enumerate() {
                self.store.write_str(tx, &format!("{rsp}/out/{i}"), chunk)?;
            }
            self.store
                .write_str(tx, &format!("{rsp}/chunks"), &chunks.len().to_string())?;
            self.store
                .write_str(tx, &format!("{rsp}/rc"), &rc.to_string())
        })
        .with_context(|| format!("writing the answer to request {seq}"))
    }
}

/// Writes `script` to `cmd_path` and runs `sh cmd_path` with stdin from /dev/null and stdout
/// and stderr into `out_path`; returns the output and the shell-style status.
fn run_script(
    cmd_path: &PathBuf,
    out_path: &PathBuf,
    script: &[u8],
    timeout: Duration,
) -> Result<(Vec<u8>, i32)> {
    File::create(cmd_path)
        .and_then(|mut f| f.write_all(script))
        .with_context(|| format!("writing {}", cmd_path.display()))?;
    let out = File::create(out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let err = out.try_clone().context("duplicating the output file")?;
    // The output goes to a file, not a pipe: a daemon the command starts in the background may
    // keep its stdout, and the agent must not wait for it.
    let mut child = Command::new("sh")
        .arg(cmd_path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("starting sh")?;
    let start = Instant::now();
    let mut term_sent: Option<Instant> = None;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for sh")? {
            break status;
        }
        match term_sent {
            None if start.elapsed() >= timeout => {
                // SAFETY: kill(2) on our own child's pid, which has not been reaped (try_wait
                // returned None), so the pid cannot have been reused.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                term_sent = Some(Instant::now());
            }
            Some(t) if t.elapsed() >= KILL_GRACE => {
                let _ = child.kill();
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let rc = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(RC_NOT_RUN);
    let output =
        std::fs::read(out_path).with_context(|| format!("reading {}", out_path.display()))?;
    Ok((output, rc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use xenvirtio_xenstore::MemStore;

    fn quiet(_: &str) {}

    /// What Dom0's `xv_domu_run` does: write timeout and cmd in one transaction, wait for rc,
    /// read chunks, concatenate and decode.
    fn run_via_channel(
        dom0: &dyn XenStore,
        base: &str,
        seq: u64,
        timeout: u64,
        cmd: &str,
    ) -> (String, i32) {
        transaction(dom0, 8, |tx| {
            dom0.write_str(
                tx,
                &format!("{base}/req/{seq}/timeout"),
                &timeout.to_string(),
            )?;
            dom0.write_str(
                tx,
                &format!("{base}/req/{seq}/cmd"),
                &base64::encode(cmd.as_bytes()),
            )
        })
        .unwrap();
        let rc_path = format!("{base}/rsp/{seq}/rc");
        let deadline = Instant::now() + Duration::from_secs(30);
        let rc = loop {
            if let Some(rc) = dom0.read_optional(TxId::NONE, &rc_path).unwrap() {
                break String::from_utf8(rc).unwrap().parse::<i32>().unwrap();
            }
            assert!(Instant::now() < deadline, "no answer to {seq}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let chunks: usize = dom0
            .read_string(TxId::NONE, &format!("{base}/rsp/{seq}/chunks"))
            .unwrap()
            .parse()
            .unwrap();
        let mut text = Vec::new();
        for i in 0..chunks {
            text.extend(
                dom0.read(TxId::NONE, &format!("{base}/rsp/{seq}/out/{i}"))
                    .unwrap(),
            );
        }
        let out = String::from_utf8(base64::decode(&text).unwrap()).unwrap();
        dom0.rm(TxId::NONE, &format!("{base}/req/{seq}")).unwrap();
        dom0.rm(TxId::NONE, &format!("{base}/rsp/{seq}")).unwrap();
        (out, rc)
    }

    /// The agent serves Dom0's requests over the in-memory store exactly as the shell agent
    /// did: output verbatim, exit status, a request written before it started, big output cut
    /// to its tail, a timeout, and a bad request.
    #[test]
    fn the_agent_answers_like_the_shell_agent() {
        let daemon = MemStore::new();
        daemon.start_guest(9).unwrap();
        let guest = daemon.connect(9).unwrap();
        let dom0 = daemon.connect(0).unwrap();
        let base = format!("/local/domain/9/{AGENT_KEY}");
        let state = std::env::temp_dir().join(format!("xv-agent-test-{}", std::process::id()));
        // A request already waiting when the agent starts.
        transaction(&dom0, 8, |tx| {
            dom0.write_str(tx, &format!("{base}/req/1/timeout"), "10")?;
            dom0.write_str(
                tx,
                &format!("{base}/req/1/cmd"),
                &base64::encode(b"echo early"),
            )
        })
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            let agent_stop = stop.clone();
            let config = AgentConfig {
                base: base.clone(),
                state_dir: state.clone(),
                log: quiet,
            };
            let guest = &guest;
            let h = s.spawn(move || Agent::new(config).unwrap().serve(guest, &agent_stop));

            let (out, rc) = run_via_channel(
                &dom0,
                &base,
                2,
                10,
                r#"echo "to stdout \\ \$x"; echo to-stderr >&2; exit 3"#,
            );
            assert_eq!((out.as_str(), rc), ("to stdout \\ $x\nto-stderr\n", 3));
            assert_eq!(
                dom0.read_string(TxId::NONE, &format!("{base}/ready"))
                    .unwrap(),
                "1"
            );
            // the early one was answered too
            let early = dom0
                .read_string(TxId::NONE, &format!("{base}/rsp/1/rc"))
                .unwrap();
            assert_eq!(early, "0");

            let (out, rc) = run_via_channel(
                &dom0,
                &base,
                3,
                10,
                "i=0; while [ $i -lt 5000 ]; do echo line-$i; i=$((i+1)); done",
            );
            assert_eq!(rc, 0);
            assert!(
                out.len() <= MAX_OUTPUT && out.len() > MAX_OUTPUT - 20,
                "{}",
                out.len()
            );
            assert!(out.ends_with("line-4999\n"), "{}", &out[out.len() - 30..]);

            let t = Instant::now();
            let (_, rc) = run_via_channel(&dom0, &base, 4, 1, "sleep 20");
            assert_eq!(rc, 143);
            assert!(t.elapsed() < Duration::from_secs(10));

            dom0.write_str(TxId::NONE, &format!("{base}/req/5/cmd"), "not*base64")
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while dom0
                .read_optional(TxId::NONE, &format!("{base}/rsp/5/rc"))
                .unwrap()
                .is_none()
            {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(
                dom0.read_string(TxId::NONE, &format!("{base}/rsp/5/rc"))
                    .unwrap(),
                "125"
            );

            stop.store(true, Ordering::Relaxed);
            h.join().unwrap().unwrap();
        });
        let _ = std::fs::remove_dir_all(&state);
    }
}
