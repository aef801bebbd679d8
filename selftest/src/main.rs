//! `xenvirtio-selftest`: proves the Xen device wrappers and the xenstore client on a real Xen
//! host, and serves the e2e harness's command channel inside DomUs.
//!
//! Each check subcommand prints one `PASS <name> [detail]` or `FAIL <name> [detail]` line per
//! check on stdout (the format `xv_check_lines` of the e2e harness reads) and exits 1 if any
//! check failed. This file only parses arguments, opens xenstore and the devices, installs the
//! tracing subscriber (stderr, `RUST_LOG`) and chooses the exit status; the checks live in the
//! modules. docs/E2E.md says what each check proves.

mod agent;
mod base64;
mod cross;
mod dom0;
mod events;
mod ioreq;
mod pattern;
mod probe;
mod report;
mod role;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use xenvirtio_xen::DomId;
use xenvirtio_xen::linux::LinuxXen;
use xenvirtio_xen::role::{Arch, GuestType};
use xenvirtio_xenstore::XsClient;

use crate::cross::{ForeignExpect, Timeouts};
use crate::report::Report;

const ABOUT: &str = "Check the Xen devices and xenstore on a real Xen host (the e2e smoke checks)";

const AFTER_HELP: &str = "\
Each check prints `PASS <name> [detail]` or `FAIL <name> [detail]`; the exit \
status is 1 if any check failed (a setup that fails is a failed check). Run as \
root: the checks open /dev/xen/* and read /proc/self/pagemap.

Examples:
  xenvirtio-selftest dom0
  xenvirtio-selftest role --expect-dom0 no --expect-type PVH \\
      --expect-arch x86_64
  # In a DomU; then, in Dom0:
  xenvirtio-selftest cross-domu --foreign works
  xenvirtio-selftest cross-dom0 --domid 3 --foreign works

Logs go to stderr; set RUST_LOG (default: warn). See docs/E2E.md.";

#[derive(Debug, Parser)]
#[command(
    name = "xenvirtio-selftest",
    version,
    max_term_width = 80,
    about = ABOUT,
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// In Dom0 (or any domain, as its own peer): grants out and in with data both ways, grant
    /// copy, unmap notification, a read-only grant that faults on a store, event-channel
    /// ping-pong and masking, xenstore read/write/watch/transactions.
    Dom0 {
        /// xenstored's unix socket (default: $XENSTORED_PATH, /run/xenstored/socket, ...).
        #[arg(long, value_name = "PATH")]
        xenstore: Option<PathBuf>,
    },
    /// In a DomU, through /dev/xen/xenbus: grant a page and offer a port to Dom0, pin a page,
    /// publish them, and check what Dom0 does with them (run `cross-dom0` in Dom0).
    CrossDomu {
        /// What Dom0's foreign mapping of the pinned page must do: `works` on PVH and Arm,
        /// `refused` on x86 PV.
        #[arg(long, value_enum)]
        foreign: ForeignExpect,
        /// Seconds to wait for Dom0.
        #[arg(long, default_value_t = 400, value_name = "SECONDS")]
        timeout: u64,
    },
    /// In Dom0: map what DomU `--domid` published, reply, notify, foreign-map its pinned page.
    CrossDom0 {
        /// The DomU running `cross-domu`.
        #[arg(long)]
        domid: DomId,
        /// `works` (PVH, Arm) or `refused` (x86 PV: frame numbers are not machine frames).
        #[arg(long, value_enum)]
        foreign: ForeignExpect,
        /// Seconds to wait for the DomU's keys.
        #[arg(long, default_value_t = 120, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Detect this domain's role (Dom0, x86 PV, x86 PVH/HVM or Arm DomU), print it, and assert it.
    Role {
        /// Whether this is Dom0.
        #[arg(long, value_enum)]
        expect_dom0: YesNo,
        /// PV, PVH or HVM (arm64 guests are HVM).
        #[arg(long, value_parser = parse_guest_type)]
        expect_type: GuestType,
        /// x86_64 or aarch64.
        #[arg(long, value_parser = parse_arch)]
        expect_arch: Arch,
        /// The hypervisor's major.minor, e.g. 4.17.
        #[arg(long, value_name = "MAJOR.MINOR")]
        expect_xen: Option<String>,
        /// The domain's name in xenstore.
        #[arg(long, value_name = "NAME")]
        expect_name: Option<String>,
    },
    /// In Dom0: ask Xen for an IOREQ server for DomU `--domid` (and destroy it again), the
    /// thing a trapped virtio-mmio or virtio-pci device model needs and this project does not.
    Ioreq {
        /// The DomU to ask for (on x86, an HVM or PVH one: PV domains have no IOREQ servers).
        #[arg(long)]
        domid: DomId,
        /// What Xen must answer for the check to pass.
        #[arg(long, value_enum)]
        expect: ioreq::IoreqExpect,
    },
    /// The DomU end of the e2e command channel (replaces xv-agent.sh; same xenstore keys).
    Agent {
        /// Where commands and their output are kept while they run.
        #[arg(long, default_value = "/run/xv/agent", value_name = "DIR")]
        state_dir: PathBuf,
    },
    /// (internal) Map a grant read-only and store into it: run by `dom0` as the fault probe.
    #[command(hide = true)]
    ProbeWrite {
        #[arg(long)]
        peer: DomId,
        #[arg(long)]
        gref: u32,
        #[arg(long)]
        offset: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum YesNo {
    Yes,
    No,
}

fn parse_guest_type(s: &str) -> Result<GuestType, String> {
    GuestType::parse(s).ok_or_else(|| format!("{s:?} is not PV, PVH or HVM"))
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    match s {
        "x86_64" => Ok(Arch::X86_64),
        "aarch64" | "arm64" => Ok(Arch::Aarch64),
        _ => Err(format!("{s:?} is not x86_64 or aarch64")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut report = Report::stdout();
    match cli.command {
        Cmd::ProbeWrite { peer, gref, offset } => return probe::run_child(peer, gref, offset),
        Cmd::Agent { state_dir } => return run_agent(state_dir),
        Cmd::Ioreq { domid, expect } => ioreq::run(domid, expect, &mut report),
        Cmd::Dom0 { xenstore } => {
            if let Err(e) = run_dom0(xenstore.as_deref(), &mut report) {
                report.fail("setup", format!("{e:#}"));
            }
        }
        Cmd::CrossDomu { foreign, timeout } => {
            let timeouts = Timeouts {
                peer: Duration::from_secs(timeout),
                step: Duration::from_secs(60),
            };
            if let Err(e) = run_cross_domu(foreign, timeouts, &mut report) {
                report.fail("setup", format!("{e:#}"));
            }
        }
        Cmd::CrossDom0 {
            domid,
            foreign,
            timeout,
        } => {
            let timeouts = Timeouts {
                peer: Duration::from_secs(timeout),
                step: Duration::from_secs(60),
            };
            match XsClient::open().context("connecting to xenstore") {
                Ok(store) => cross::run_dom0(
                    &LinuxXen::new(0),
                    &store,
                    domid,
                    foreign,
                    timeouts,
                    &mut report,
                ),
                Err(e) => report.fail("setup", format!("{e:#}")),
            }
        }
        Cmd::Role {
            expect_dom0,
            expect_type,
            expect_arch,
            expect_xen,
            expect_name,
        } => {
            let expect = role::RoleExpect {
                dom0: expect_dom0 == YesNo::Yes,
                guest_type: expect_type,
                arch: expect_arch,
                xen: expect_xen,
                name: expect_name,
            };
            match XsClient::open()
                .context("connecting to xenstore")
                .and_then(|s| role::identity(&s))
            {
                Ok(who) => role::run(Path::new("/"), &who, &expect, &mut report),
                Err(e) => report.fail("role-detect", format!("{e:#}")),
            }
        }
    }
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_dom0(xenstore: Option<&Path>, report: &mut Report) -> Result<()> {
    let store = match xenstore {
        Some(p) => XsClient::connect_socket(p),
        None => XsClient::open(),
    }
    .context("connecting to xenstore")?;
    report.check(
        "xenstore-transport",
        store.description().starts_with("unix socket"),
        format!(
            "{} (Dom0 talks to xenstored over its socket)",
            store.description()
        ),
    );
    let domid = role::own_domid(&store)?;
    let probe = probe::ChildProcessProbe::this_program()?;
    dom0::run(&LinuxXen::new(domid), &store, &probe, report);
    Ok(())
}

fn run_cross_domu(foreign: ForeignExpect, timeouts: Timeouts, report: &mut Report) -> Result<()> {
    let store = XsClient::open_xenbus().context("opening /dev/xen/xenbus")?;
    let domid = role::own_domid(&store)?;
    report.pass(
        "xenbus",
        format!("{}: this is domain {domid}", store.description()),
    );
    cross::run_domu(&LinuxXen::new(domid), &store, foreign, timeouts, report);
    Ok(())
}

/// Serves forever, reconnecting to xenstore after a failure (xenstored restarted, say).
fn run_agent(state_dir: PathBuf) -> ExitCode {
    let never = AtomicBool::new(false);
    let mut agent: Option<agent::Agent> = None;
    loop {
        let result = XsClient::open()
            .context("connecting to xenstore")
            .and_then(|store| {
                let domid = role::own_domid(&store)?;
                let a = match agent.as_mut() {
                    Some(a) => a,
                    None => agent.insert(agent::Agent::new(agent::AgentConfig {
                        base: format!("/local/domain/{domid}/{}", agent::AGENT_KEY),
                        state_dir: state_dir.clone(),
                        log: agent::log_to_stdout,
                    })?),
                };
                a.serve(&store, &never)
            });
        if let Err(e) = result {
            agent::log_to_stdout(&format!("xv-agent: {e:#}; reconnecting in 1 s"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "xenvirtio-selftest",
            "role",
            "--expect-dom0",
            "no",
            "--expect-type",
            "PVH",
            "--expect-arch",
            "arm64",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Role {
                expect_dom0: YesNo::No,
                expect_type: GuestType::Pvh,
                expect_arch: Arch::Aarch64,
                ..
            }
        ));
        assert!(
            Cli::try_parse_from([
                "x",
                "role",
                "--expect-dom0",
                "no",
                "--expect-type",
                "KVM",
                "--expect-arch",
                "x86_64"
            ])
            .is_err()
        );
        let cli = Cli::try_parse_from(["x", "cross-dom0", "--domid", "3", "--foreign", "refused"])
            .unwrap();
        assert!(matches!(
            cli.command,
            Cmd::CrossDom0 {
                domid: 3,
                foreign: ForeignExpect::Refused,
                timeout: 120
            }
        ));
    }
}
