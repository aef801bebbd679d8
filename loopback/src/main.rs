//! `xenvirtio-loopback`: both ends of xenvirtio in one process, without Xen. It exports a blk
//! device over NBD from the loopback pair, or benchmarks the DMA strategies.
//!
//! This binary parses arguments, installs the tracing subscriber (`RUST_LOG`), handles
//! SIGINT/SIGTERM, and drives the library: the pair, the real toolstack calls, the real
//! frontend and its NBD server. It never touches shared memory itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use xenvirtio_backend::admin::{AttachRequest, DetachRequest, Removal};
use xenvirtio_backend::daemon::{DaemonConfig, DomainSelector};
use xenvirtio_frontend::ConnectOptions;
use xenvirtio_frontend::blk::{BlkDevice, BlkOptions};
use xenvirtio_frontend::nbd::{BlockExport, NbdServer, NbdServerConfig};
use xenvirtio_loopback::bench::{self, BenchConfig, Variant, Workload};
use xenvirtio_loopback::counters::{BackendCounts, Counters, FrontendCounts, HypervisorCounts};
use xenvirtio_loopback::pair::{BACKEND_DOMID, Pair};
use xenvirtio_loopback::role::RoleName;
use xenvirtio_loopback::soak;
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_xen::DomId;
use xenvirtio_xen::loopback::{LoopbackConfig, LoopbackDomain};

const ABOUT: &str = "Try xenvirtio without Xen: the backend daemon and a frontend in one process, \
                     a blk device exported over NBD.";

const LONG_ABOUT: &str = "\
Try xenvirtio without Xen. This runs both ends of the transport in one process: \
the real backend daemon plays Dom0, the real frontend plays a guest (domain 1, or \
Dom0 itself with --role dom0), and they talk exactly as on Xen, through an \
in-memory xenstore and a loopback hypervisor that enforces Xen's grant, \
foreign-mapping and event-channel rules on shared memory of this process. No Xen, \
no root and no /dev/xen are needed.

The toolstack (xenvirtio-backend attach) attaches IMAGE as a blk device of the \
guest; the frontend connects it with a DMA strategy chosen by the guest's role (or \
--dma) and exports it over NBD on SOCKET as xvda (a device's export is named after \
its vdev, as in a guest), so ordinary tools work on it:

  qemu-io -f raw -c 'write -P 0xab 0 64k' 'nbd+unix:///xvda?socket=SOCKET'
  qemu-img compare -f raw -F raw IMAGE 'nbd+unix:///xvda?socket=SOCKET'
  nbdinfo 'nbd+unix:///xvda?socket=SOCKET'

Every write goes from the NBD client through the frontend's virtqueue, the \
backend's mapping of the frontend's memory and the backend's blk model into IMAGE. \
SIGINT (Ctrl-C) or SIGTERM stops it cleanly through the protocol (frontend \
Closing, backend Closed, grants revoked, device detached) and prints what both \
ends counted. Exit codes: 0 done; 1 something was left mapped, bound or granted; \
2 it could not start (a bad option, a missing or locked image); 130 bench was \
interrupted (docs/OPERATING.md, \"Exit codes\").

DMA strategies (--dma):
  grant    the frontend grants pages of an arena; the backend maps each
           request's pages (per-request) or keeps the arena mapped
           (--persistent, the default)
  bounce   a pool granted and mapped once; callers' data is copied through it
  direct   guest-physical addresses of pinned memory, foreign-mapped by the
           backend (the loopback backend is Dom0 and trusts the guest, as
           `serve --allow-direct` does)
  auto     the role policy decides (x86-pvh: grant; dom0: bounce;
           arm-domu: direct)
A strategy the role forbids is refused with the reason (for example --role \
x86-pv --dma direct), as it would be on Xen.

`xenvirtio-loopback bench` runs the same workload over every strategy and prints \
IOPS, throughput, latencies, the ratios between strategies, and per-request map, \
unmap, notification and copy counts. Map costs here are mmap/munmap of this \
process's memory, not Xen's hypercalls: compare strategies within one run, not \
with real Xen.

Logging: RUST_LOG (default info; RUST_LOG=debug shows both ends' events).";

#[derive(Parser, Debug)]
#[command(
    name = "xenvirtio-loopback",
    version,
    max_term_width = 80,
    about = ABOUT,
    long_about = LONG_ABOUT,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the same blk workload over each DMA strategy in one run and print IOPS, MiB/s,
    /// latencies, the ratios between strategies, and per-request map, unmap, notification and
    /// copy counts (from the loopback hypervisor's records and the daemon's statistics).
    ///
    /// SIGINT (Ctrl-C) or SIGTERM stops it: the run in progress is cut short and left out, the
    /// completed runs are reported, the scratch image is removed, and it exits with 130.
    Bench(BenchArgs),
    /// Run many guests' blk devices at depth for a long time (every strategy in turn), verify
    /// every read against a model of what was written, compare each image file with the model
    /// at the end, and print the counts and the process's resident memory. Exits 1 on any
    /// mismatch.
    Soak(SoakArgs),
}

/// A DMA strategy, or the role's default.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum DmaArg {
    /// The role policy decides.
    Auto,
    /// Grants of an arena (per-request or persistent).
    Grant,
    /// A pool granted once; data is copied through it.
    Bounce,
    /// Guest-physical addresses of pinned memory.
    Direct,
}

impl DmaArg {
    fn strategy(self) -> Option<DmaStrategy> {
        match self {
            DmaArg::Auto => None,
            DmaArg::Grant => Some(DmaStrategy::Grant),
            DmaArg::Bounce => Some(DmaStrategy::Bounce),
            DmaArg::Direct => Some(DmaStrategy::Direct),
        }
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The disk image (a file or block device) the backend serves; writes change it.
    #[arg(long, value_name = "PATH", required = true)]
    image: Option<PathBuf>,
    /// The unix socket of the NBD export (created mode 0600; a stale socket is replaced).
    #[arg(long, value_name = "SOCKET", required = true)]
    nbd: Option<PathBuf>,
    /// Also export on 127.0.0.1:PORT (0 picks a free port, which is printed).
    #[arg(long, value_name = "PORT")]
    tcp: Option<u16>,
    /// The NBD export's name (the default export "" is the same export).
    #[arg(long, value_name = "NAME", default_value = "xvda")]
    export_name: String,
    /// DMA strategy of the frontend.
    #[arg(long, value_enum, default_value_t = DmaArg::Auto, value_name = "STRATEGY")]
    dma: DmaArg,
    /// Under grant, offer the arena as persistent grants (the default).
    #[arg(long, overrides_with = "no_persistent")]
    persistent: bool,
    /// Under grant, let the backend map and unmap every request's pages.
    #[arg(long, overrides_with = "persistent")]
    no_persistent: bool,
    /// Request queues of the blk device (1 to 16), one event channel each.
    #[arg(long, default_value_t = 1, value_name = "N")]
    queues: u32,
    /// Attach the image read-only (writes fail with EPERM).
    #[arg(long)]
    readonly: bool,
    /// Take no image lock (by default a read-write image has one user and a read-only one
    /// only readers, as QEMU's locks enforce): for users that coordinate among themselves.
    #[arg(long)]
    force_share: bool,
    /// The role the frontend domain plays, which decides the default strategy and what is
    /// refused: dom0 (the frontend in Dom0 itself), x86-pv, x86-pvh, arm-domu (guests are
    /// domain 1).
    #[arg(long, value_enum, default_value_t = RoleName::X86Pvh, value_name = "ROLE")]
    role: RoleName,
    /// Pages of DMA memory (grant arena, bounce pool, or pinned memory rounded up to 2 MiB);
    /// grant and bounce stay under the 1024 grants a domain may hold.
    #[arg(long, default_value_t = 256, value_name = "PAGES")]
    dma_pages: usize,
    /// Also answer `xenvirtio-backend stats --socket PATH` (the daemon's control socket).
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// The image to run on (its contents are overwritten by write workloads); default: a
    /// scratch image of --size bytes in a temporary directory.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Size of the scratch image.
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    size: u64,
    /// Workloads as PATTERN:SIZE (randread, randwrite, read, write; SIZE in bytes or with k),
    /// comma-separated or repeated.
    #[arg(
        long = "workload",
        value_delimiter = ',',
        default_value = "randread:4k,randwrite:4k,read:64k",
        value_name = "PATTERN:SIZE"
    )]
    workloads: Vec<Workload>,
    /// Strategies to compare, comma-separated; the first is the baseline of the ratios.
    #[arg(
        long = "strategies",
        value_delimiter = ',',
        default_value = "grant,grant-persistent,bounce,direct",
        value_name = "LIST"
    )]
    variants: Vec<Variant>,
    /// Seconds each timed run lasts (fractions allowed).
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    seconds: f64,
    /// Untimed requests before each run (warms persistent-grant and direct-map caches).
    #[arg(long, default_value_t = 2_000, value_name = "N")]
    warmup: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    depth: u32,
    /// Queues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Rounds: each strategy runs once per round, interleaved; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Copy each request's data through a private buffer, as an NBD client's data is;
    /// default: zero-copy buffers of the frontend's DMA memory.
    #[arg(long)]
    copy: bool,
    /// The frontend's role (it must allow every strategy compared).
    #[arg(long, value_enum, default_value_t = RoleName::X86Pvh, value_name = "ROLE")]
    role: RoleName,
}

#[derive(Args, Debug)]
struct SoakArgs {
    /// Devices, each in a guest of its own (domains 10, 11, ...); their strategies take turns:
    /// grant, grant-persistent, bounce, direct.
    #[arg(long, default_value_t = 8, value_name = "N")]
    devices: u32,
    /// Requests in flight per device.
    #[arg(long, default_value_t = 64, value_name = "N")]
    depth: u32,
    /// Seconds of verified I/O (fractions allowed).
    #[arg(
        long,
        default_value_t = 20.0,
        value_name = "SECONDS",
        conflicts_with = "minutes"
    )]
    seconds: f64,
    /// Minutes of verified I/O, for the long soak.
    #[arg(long, value_name = "MINUTES")]
    minutes: Option<f64>,
    /// Size of each device's image, in bytes (a multiple of 4096).
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    image_size: u64,
    /// Where the images go (default: a temporary directory, removed at the end).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Some(Command::Bench(args)) => run_bench(&args),
        Some(Command::Soak(args)) => run_soak(&args),
        None => serve(&cli.serve),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("xenvirtio-loopback: {e:#}");
            std::process::exit(2);
        }
    }
}

/// A flag set once SIGINT or SIGTERM arrives; both are blocked in this thread and in every
/// thread started afterwards, so only the waiter thread receives them.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    xenvirtio_xen::signals::StopSignals::block()
        .context("cannot block SIGINT/SIGTERM")?
        .spawn_flag("signals", |signal| {
            if let Some(name) = signal {
                println!("{name}: shutting down through the protocol");
            }
        })
        .context("cannot start the signal thread")
}

/// A pair whose daemon trusts `frontend` with `direct` (as `serve --allow-direct` would).
fn start_pair(
    frontend: DomId,
    stats_socket: Option<PathBuf>,
    loopback: LoopbackConfig,
) -> Result<Pair> {
    let config = DaemonConfig {
        allow_direct: vec![DomainSelector::Id(frontend)],
        control_socket: stats_socket,
        ..DaemonConfig::default()
    };
    Pair::start(loopback, config).context("cannot start the loopback pair")
}

fn nbd_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

fn serve(args: &ServeArgs) -> Result<i32> {
    let image = args
        .image
        .as_deref()
        .ok_or_else(|| anyhow!("--image is required"))?;
    let socket = args
        .nbd
        .as_deref()
        .ok_or_else(|| anyhow!("--nbd is required"))?;
    // Absolute, so that the URIs printed work from any directory.
    let socket = &std::path::absolute(socket)
        .with_context(|| format!("cannot resolve {}", socket.display()))?;
    let persistent = !args.no_persistent;
    let stop = stop_on_signals()?;
    let role = args.role;
    let domid = role.domid();
    println!(
        "xenvirtio-loopback: a try-out without Xen: backend daemon as Dom0 and frontend as \
         domain {domid} ({role}) in this process, over the loopback hypervisor and an in-memory \
         xenstore"
    );
    let mut pair = start_pair(domid, args.stats_socket.clone(), LoopbackConfig::default())?;
    pair.add_guest(domid, "loopback-guest")
        .context("cannot create the guest domain")?;
    let mut req = AttachRequest::blk(domid, image);
    req.readonly = args.readonly;
    req.force_share = args.force_share;
    req.queues = Some(args.queues);
    let attached = pair
        .attach(&req)
        .with_context(|| format!("cannot attach {}", image.display()))?;
    let devid = attached.devid;
    println!(
        "attached {} as blk device {devid} of domain {domid} ({}, {} queue(s)): {}",
        image.display(),
        if args.readonly {
            "read-only"
        } else {
            "read-write"
        },
        args.queues,
        attached.backend_dir
    );
    let options = BlkOptions {
        connect: ConnectOptions {
            dma: args.dma.strategy(),
            persistent,
            dma_pages: args.dma_pages,
            num_queues: Some(args.queues),
            ..ConnectOptions::default()
        },
        ..BlkOptions::default()
    };
    let frontend = pair.frontend(role.role())?;
    let dev = match frontend.connect_blk(devid, &options) {
        Ok(dev) => dev,
        Err(e) => {
            let e = anyhow::Error::new(e).context(format!(
                "the frontend ({role}, --dma {}) cannot connect blk device {devid}",
                args.dma
                    .to_possible_value()
                    .map_or("?".into(), |v| v.get_name().to_owned())
            ));
            if let Err(d) = pair.detach(&DetachRequest::new(domid, devid)) {
                eprintln!("detaching after the failure: {d:#}");
            }
            return Err(e);
        }
    };
    let n = dev.negotiated();
    println!(
        "frontend connected: dma {}{}: {}",
        n.strategy,
        if n.persistent {
            " (persistent grants)"
        } else if n.strategy == DmaStrategy::Grant {
            " (per-request grants)"
        } else {
            ""
        },
        n.reason
    );
    let dev = Arc::new(dev);
    let mut config = NbdServerConfig::new(args.export_name.clone()).unix(socket);
    config.description = Some(format!(
        "xenvirtio blk device {devid} of loopback domain {domid} over {}",
        image.display()
    ));
    if let Some(port) = args.tcp {
        config = config.tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let export: Arc<dyn BlockExport> = Arc::clone(&dev) as Arc<dyn BlockExport>;
    let server = match NbdServer::start(export, config) {
        Ok(s) => s,
        Err(e) => {
            let e = anyhow::Error::new(e).context("cannot start the NBD export");
            drop(dev);
            if let Err(d) = pair.detach(&DetachRequest::new(domid, devid)) {
                eprintln!("detaching after the failure: {d:#}");
            }
            return Err(e);
        }
    };
    let uri = nbd_uri(socket, server.export_name());
    println!(
        "NBD export {:?} ({} bytes{}) on unix socket {}{}",
        server.export_name(),
        dev.size(),
        if dev.read_only() { ", read-only" } else { "" },
        socket.display(),
        server
            .tcp_addr()
            .map(|a| format!(" and tcp {a}"))
            .unwrap_or_default()
    );
    println!("  try: qemu-io -f raw -c 'read -v 0 512' '{uri}'");
    println!("       nbdinfo '{uri}'");
    println!("ready; SIGINT (Ctrl-C) or SIGTERM stops it");

    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }

    let served = server.stats();
    server.shutdown();
    println!(
        "NBD export closed: {} connection(s) served, {} requests ({} failed), {} bytes read, \
         {} bytes written",
        served.connections_accepted,
        served.requests,
        served.request_errors,
        served.bytes_read,
        served.bytes_written
    );
    let dev = Arc::try_unwrap(dev).map_err(|_| anyhow!("the blk device is still in use"))?;
    teardown(&mut pair, dev, domid, devid)
}

/// Closes the device through the protocol, detaches it, stops the daemon, prints the counters
/// and checks that nothing is left. Returns the exit status.
fn teardown(
    pair: &mut Pair,
    dev: BlkDevice<LoopbackDomain>,
    domid: DomId,
    devid: u32,
) -> Result<i32> {
    let mut clean = true;
    let frontend = FrontendCounts::from_blk(&dev.stats());
    let grants_before = pair.domain_stats(domid).grants;
    match dev.close() {
        Ok(()) => println!(
            "frontend closed device {devid}: Closing, the backend reached Closed, then the \
             frontend revoked its grants ({grants_before} held before, {} now) and went Closed",
            pair.domain_stats(domid).grants
        ),
        Err(e) => {
            clean = false;
            println!("closing the frontend failed: {e:#}");
        }
    }
    let backend = pair
        .device_stats(domid, devid)
        .map(|s| BackendCounts::from_device(&s))
        .unwrap_or_default();
    let counters = Counters {
        frontend,
        backend,
        hypervisor: HypervisorCounts::read(pair.hypervisor(), domid),
    };
    match pair.detach(&DetachRequest::new(domid, devid)) {
        Ok(out) => println!("detached device {devid}: {}", removal_text(&out.removal)),
        Err(e) => {
            clean = false;
            println!("detach failed: {e:#}");
        }
    }
    if let Err(e) = pair.stop_daemon() {
        clean = false;
        println!("stopping the daemon failed: {e:#}");
    }
    println!("final counters:");
    for line in counters.render().lines() {
        println!("  {line}");
    }
    let holdings = pair.backend_holdings(domid);
    let backend_left = pair.domain_stats(BACKEND_DOMID);
    let frontend_left = pair.domain_stats(domid);
    let backend_idle = backend_left.grant_maps == 0
        && backend_left.foreign_maps == 0
        && backend_left.bound_ports == 0
        && backend_left.event_handles == 0;
    if holdings.is_nothing() && backend_idle && frontend_left.is_idle() {
        println!(
            "leak check: the backend holds nothing of domain {domid}, and domain {domid} \
             holds no grants, ports or pinned pages"
        );
    } else {
        clean = false;
        println!(
            "leak check FAILED: backend holds {holdings:?}; Dom0 {backend_left:?}; domain \
             {domid} {frontend_left:?}"
        );
    }
    Ok(if clean { 0 } else { 1 })
}

fn removal_text(removal: &Removal) -> String {
    match removal {
        Removal::Immediate { backend_state } => format!(
            "removed at once, the backend held nothing (state {})",
            backend_state.map_or("absent".into(), |s| s.to_string())
        ),
        Removal::Closed { waited } => {
            format!("the backend reached Closed in {waited:?}, both directories removed")
        }
        Removal::Forced { last, .. } => format!("forced (the backend was {last})"),
        Removal::RemovedMeanwhile => "someone else removed it meanwhile".into(),
        Removal::OrphanFrontend => "only the frontend directory was left; removed".into(),
    }
}

fn run_bench(args: &BenchArgs) -> Result<i32> {
    // Before any thread: SIGINT and SIGTERM then end the bench cleanly (scratch image removed,
    // what was measured printed) instead of killing it.
    let interrupt = xenvirtio_xen::signals::StopSignals::block()
        .context("cannot block SIGINT/SIGTERM")?
        .spawn_flag("signals", |signal| {
            if let Some(name) = signal {
                eprintln!("{name}: stopping after the run in progress is cut short");
            }
        })
        .context("cannot start the signal thread")?;
    let config = BenchConfig {
        workloads: args.workloads.clone(),
        variants: args.variants.clone(),
        duration: Duration::try_from_secs_f64(args.seconds)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow!("--seconds must be a positive number of seconds"))?,
        warmup: args.warmup,
        depth: args.depth,
        queues: args.queues,
        rounds: args.rounds,
        copy: args.copy,
        role: args.role,
    };
    let scratch;
    let image = match &args.image {
        Some(p) => p.clone(),
        None => {
            scratch = tempfile::Builder::new()
                .prefix("xenvirtio-loopback-bench.")
                .tempdir()
                .context("cannot create a temporary directory")?;
            bench::scratch_image(scratch.path(), args.size)
                .context("cannot create the scratch image")?
        }
    };
    // Per-request grants leave two records per request: keep enough for a few seconds.
    let loopback = LoopbackConfig {
        record_limit: 500_000,
        ..LoopbackConfig::default()
    };
    let pair = start_pair(args.role.domid(), None, loopback)?;
    println!(
        "xenvirtio-loopback bench: backend daemon (Dom0) and frontend (domain {}, {}) in this \
         process over the loopback hypervisor; image {}",
        args.role.domid(),
        args.role,
        image.display()
    );
    println!(
        "map costs here are mmap/munmap of this process's memory and notifications are \
         eventfds, not Xen hypercalls: compare strategies within this run, not with real Xen"
    );
    let samples = bench::run(&pair, &image, &config, &interrupt, |s| {
        eprintln!(
            "  {} round {} {}: {:.0} IOPS, {:.1} MiB/s",
            s.workload,
            s.round + 1,
            s.variant.name(),
            s.iops(),
            s.mib_per_sec()
        );
    })?;
    let planned = config.workloads.len() * config.variants.len() * config.rounds as usize;
    let interrupted = interrupt.load(std::sync::atomic::Ordering::Relaxed);
    if interrupted {
        println!(
            "\ninterrupted: {} of {planned} runs completed (the run that was cut short is left \
             out); the figures below are of those runs only{}",
            samples.len(),
            if args.image.is_none() {
                "; the scratch image is removed"
            } else {
                ""
            }
        );
    }
    print!(
        "{}",
        bench::render(&config, &bench::summarize(&config, &samples))
    );
    if interrupted {
        return Ok(130);
    }
    println!(
        "\ncolumns per request: maps = the daemon's map calls; gmaps/unmaps/foreign = the \
         hypervisor's grant maps, grant unmaps and foreign maps of the guest's memory; \
         ntf>be/ntf>fe = notifications to the backend / to the frontend; copied = bytes copied \
         by the frontend"
    );
    Ok(0)
}

fn run_soak(args: &SoakArgs) -> Result<i32> {
    let secs = args.minutes.map_or(args.seconds, |m| m * 60.0);
    let duration = Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow!("--seconds and --minutes must be positive"))?;
    let config = soak::SoakConfig {
        devices: args.devices,
        depth: args.depth,
        duration,
        image_size: args.image_size,
        ..soak::SoakConfig::default()
    };
    let scratch;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            scratch = tempfile::Builder::new()
                .prefix("xenvirtio-loopback-soak.")
                .tempdir()
                .context("cannot create a temporary directory")?;
            scratch.path().to_path_buf()
        }
    };
    println!(
        "xenvirtio-loopback soak: {} device(s) x depth {}, {:.0} s of verified 4 KiB I/O, images in {}",
        config.devices,
        config.depth,
        duration.as_secs_f64(),
        dir.display()
    );
    let pair = soak::start_pair(&config).context("cannot start the loopback pair")?;
    let report = soak::run(&pair, &dir, &config, &|line| eprintln!("  {line}"))?;
    print!("{}", report.render());
    Ok(if report.mismatches() == 0 { 0 } else { 1 })
}
