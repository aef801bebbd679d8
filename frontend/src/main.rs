//! `xenvirtio-frontend`: list, connect, serve, verify and benchmark xenvirtio devices from the
//! domain that drives them.
//!
//! This binary only parses arguments, installs the tracing subscriber (`RUST_LOG`), opens
//! xenstore and the Xen devices, and calls the library. It never touches shared memory itself.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use xenvirtio_frontend::Frontend;
use xenvirtio_frontend::blk::{BlkDevice, BlkOptions};
use xenvirtio_frontend::nbd::{BlockExport, NbdAddress, NbdClient, NbdServer, NbdServerConfig};
use xenvirtio_frontend::pattern::{self, Comparer};
use xenvirtio_frontend::supervisor::{DEFAULT_RETRY_WAIT, SupervisedBlk};
use xenvirtio_frontend::transport::{ConnectOptions, DeviceInfo, self_domid};
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xen::linux::LinuxXen;
use xenvirtio_xen::role::DomainRole;
use xenvirtio_xenstore::{XENBUS_DEVICE, XenStore, XsClient};

const ABOUT: &str = "Drive xenvirtio devices (virtio over xenbus) from the domain they belong to.";
const LONG_ABOUT: &str = "\
Drive xenvirtio devices (virtio over xenbus) from the domain they belong to: a guest, or Dom0.

Devices are found under /local/domain/<self>/device/virtio/ in xenstore, where the toolstack
(`xenvirtio-backend attach`) creates them. Each device's memory is shared with the backend by
one DMA strategy:
  grant   pages of an arena granted to the backend (x86 guests' default; persistent grants
          when the backend offers them)
  bounce  a pool granted once, data copied in and out (Dom0's default)
  direct  guest-physical addresses of pinned memory (Arm guests with a trusted Dom0 backend;
          refused on x86 PV, with a backend that is not Dom0, or when the device offers
          ACCESS_PLATFORM)
The choice and its reason are logged and written to the device's `dma` and `dma-reason` keys.

Logging: RUST_LOG (e.g. RUST_LOG=info, RUST_LOG=xenvirtio_frontend=debug).";

#[derive(Parser, Debug)]
#[command(name = "xenvirtio-frontend", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// xenstored's unix socket (Dom0). Without it: $XENSTORED_PATH, /run/xenstored/socket,
    /// /var/run/xenstored/socket, then /dev/xen/xenbus (inside a guest).
    #[arg(long, global = true, value_name = "PATH")]
    xenstore: Option<PathBuf>,
    /// Seconds each handshake step waits for the backend before giving up.
    #[arg(long, global = true, default_value_t = 10, value_name = "SECONDS")]
    timeout: u64,
}

#[derive(Args, Debug, Clone)]
struct DmaArgs {
    /// DMA strategy: auto (the role policy), grant, bounce or direct. A strategy the role does
    /// not allow is refused with the reason.
    #[arg(long, default_value = "auto", value_name = "STRATEGY")]
    dma: String,
    /// Pages of DMA memory per device (grant arena, bounce pool, or pinned memory rounded up
    /// to 2 MiB). Keep grant+bounce totals under gntalloc's limit (1024 by default).
    #[arg(long, default_value_t = 256, value_name = "PAGES")]
    dma_pages: usize,
    /// Do not offer persistent grants even if the backend supports them.
    #[arg(long)]
    no_persistent: bool,
}

impl DmaArgs {
    fn strategy(&self) -> Result<Option<DmaStrategy>> {
        match self.dma.as_str() {
            "auto" => Ok(None),
            s => Ok(Some(s.parse().map_err(|e| anyhow!("--dma: {e}"))?)),
        }
    }

    fn connect(&self, global: &Global) -> Result<ConnectOptions> {
        Ok(ConnectOptions {
            dma: self.strategy()?,
            dma_pages: self.dma_pages,
            persistent: !self.no_persistent,
            timeout: Duration::from_secs(global.timeout),
            ..ConnectOptions::default()
        })
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List this domain's devices: type, both states, and the DMA strategy in use (or the one
    /// the policy would pick, with its reason).
    List {
        #[command(flatten)]
        dma: DmaArgs,
    },
    /// Connect devices and export them until SIGINT/SIGTERM, then close them cleanly: blk over
    /// NBD, the console to stdio or a new pty, rng to a fifo. A blk device whose backend goes
    /// away (restart, re-attach) is connected again by itself; NBD requests meanwhile wait up
    /// to 60 s for it.
    Serve(ServeArgs),
    /// Write seeded pseudo-random data over a blk device (or a range of it), read it back and
    /// compare checksums; exit 1 on any mismatch. With --check-image, check an image file
    /// against the same pattern instead (no device needed).
    Verify(VerifyArgs),
    /// Measure a blk device with zero-copy requests: throughput, IOPS, latency percentiles,
    /// and what the frontend counted (notifications, bytes copied, grants).
    Bench(BenchArgs),
    /// Relay a console device once, for scripts: stdin goes to port 0, what port 0 sends goes
    /// to stdout, until --lines lines arrived (or --wait seconds passed, or SIGINT/SIGTERM);
    /// then the device is closed.
    #[command(after_help = CONSOLE_HELP)]
    Console(ConsoleArgs),
    /// Write random bytes from an rng device to stdout, then close the device.
    #[command(after_help = RNG_HELP)]
    Rng(RngArgs),
    /// Copy a file onto a blk device (at an offset), read it back and compare; exit 1 if the
    /// bytes differ. Prints the time, throughput and what the frontend counted.
    #[command(after_help = COPY_HELP)]
    Copy(CopyArgs),
}

const COPY_HELP: &str = "\
Example:
  # Put a file at byte 1 MiB of the first blk device, and check it from Dom0 in the backend's
  # image (the same bytes at the same offset):
  xenvirtio-frontend copy /usr/bin/xenvirtio-frontend --offset 1048576";

const CONSOLE_HELP: &str = "\
Exit status: 0 when --lines lines arrived (or, without --lines, when stopped by a signal or at \
the end of --wait); 1 when --wait ran out before --lines lines arrived; 2 on an error.

Examples:
  # Send a line to the host side (the pty in the backend's `tty` key) and print the first line
  # that comes back, giving up after 30 s:
  echo hello | xenvirtio-frontend console --devid 1 --lines 1 --wait 30
  # An interactive relay until Ctrl-C:
  xenvirtio-frontend console";

const RNG_HELP: &str = "\
Example:
  xenvirtio-frontend rng --bytes 4096 > /tmp/random.bin";

#[derive(Args, Debug)]
struct ServeArgs {
    /// Devices to serve (repeatable); default: all of this domain's devices.
    #[arg(long = "devid", value_name = "N")]
    devids: Vec<u32>,
    #[command(flatten)]
    dma: DmaArgs,
    /// NBD unix socket for blk devices; with several, the devid is appended (PATH.N).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/xenvirtio-frontend/nbd.sock"
    )]
    nbd_socket: PathBuf,
    /// Also export blk over NBD on 127.0.0.1:PORT (PORT+N for device N).
    #[arg(long, value_name = "PORT")]
    nbd_tcp: Option<u16>,
    /// Where the console's port 0 goes: stdio, or a new pty whose path is printed.
    #[arg(long, value_enum, default_value_t = ConsoleSink::Stdio)]
    console: ConsoleSink,
    /// A fifo (created if missing) from which readers get the rng device's random bytes.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/xenvirtio-frontend/rng.fifo"
    )]
    rng_fifo: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum ConsoleSink {
    /// This process's stdin and stdout.
    Stdio,
    /// A new pseudo-terminal (its path is printed).
    Pty,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// The blk device; default: the first one.
    #[arg(long, value_name = "N")]
    devid: Option<u32>,
    #[command(flatten)]
    dma: DmaArgs,
    /// Seed of the pattern (see the pattern module: per 512-byte disk sector, xorshift64 seeded
    /// by splitmix64(splitmix64(seed) ^ sector)).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// First byte of the range.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    offset: u64,
    /// Bytes of the range; default: to the end of the disk (or of the image).
    #[arg(long, value_name = "BYTES")]
    length: Option<u64>,
    /// Go through an NBD server's unix socket instead of the device.
    #[arg(long, value_name = "SOCKET", conflicts_with = "check_image")]
    nbd: Option<PathBuf>,
    /// Check this image file against the pattern; no device, no xenstore.
    #[arg(long, value_name = "PATH")]
    check_image: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ConsoleArgs {
    /// The console device; default: the first one.
    #[arg(long, value_name = "N")]
    devid: Option<u32>,
    #[command(flatten)]
    dma: DmaArgs,
    /// Stop once this many lines (newline-terminated) came from the device.
    #[arg(long, value_name = "N")]
    lines: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    wait: Option<u64>,
}

#[derive(Args, Debug)]
struct RngArgs {
    /// The rng device; default: the first one.
    #[arg(long, value_name = "N")]
    devid: Option<u32>,
    #[command(flatten)]
    dma: DmaArgs,
    /// How many random bytes to write to stdout.
    #[arg(long, value_name = "N")]
    bytes: u64,
}

#[derive(Args, Debug)]
struct CopyArgs {
    /// The file to copy.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The blk device; default: the first one.
    #[arg(long, value_name = "N")]
    devid: Option<u32>,
    #[command(flatten)]
    dma: DmaArgs,
    /// Where on the device the file goes, in bytes.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    offset: u64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum BenchPattern {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// The blk device; default: the first one.
    #[arg(long, value_name = "N")]
    devid: Option<u32>,
    #[command(flatten)]
    dma: DmaArgs,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = BenchPattern::Randread)]
    pattern: BenchPattern,
    /// Request size in bytes (a multiple of 512).
    #[arg(long, default_value_t = 4096, value_name = "BYTES")]
    bs: usize,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    depth: u32,
    /// Queues (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Duration.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Copy each request's data between a private buffer and DMA memory, as a caller with its
    /// own buffers would (what the bounce strategy costs); default: zero-copy.
    #[arg(long)]
    copy: bool,
}

fn main() {
    // Block SIGINT/SIGTERM before any thread starts, so that only the signal thread of `serve`
    // takes them; other commands restore the default disposition.
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::List { dma } => list(&cli.global, &dma),
        Command::Serve(args) => serve(&cli.global, &args),
        Command::Verify(args) => verify(&cli.global, &args),
        Command::Bench(args) => bench(&cli.global, &args),
        Command::Console(args) => console(&cli.global, &args),
        Command::Rng(args) => rng(&cli.global, &args),
        Command::Copy(args) => copy(&cli.global, &args),
    };
    match result {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("xenvirtio-frontend: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Opens xenstore; returns the store and this domain's id.
fn open_store(global: &Global) -> Result<(Arc<dyn XenStore>, u16)> {
    let (client, socket) = match &global.xenstore {
        Some(p) => (
            XsClient::connect_socket(p)
                .with_context(|| format!("cannot connect to xenstored at {}", p.display()))?,
            true,
        ),
        None => {
            let c = XsClient::open().context("cannot reach xenstore")?;
            let socket = c.description() != XENBUS_DEVICE;
            (c, socket)
        }
    };
    let store: Arc<dyn XenStore> = Arc::new(client);
    let domid = self_domid(&*store, socket).context("cannot read this domain's id")?;
    Ok((store, domid))
}

fn open_frontend(global: &Global) -> Result<Frontend<LinuxXen>> {
    let (store, domid) = open_store(global)?;
    let role = DomainRole::detect(domid).context("cannot determine this domain's role")?;
    tracing::info!(%role, "frontend starting");
    Ok(Frontend::new(LinuxXen::new(domid), store, role))
}

fn kind_name(info: &DeviceInfo) -> String {
    match (info.kind, &info.type_string) {
        (Some(k), _) => k.name().to_string(),
        (None, Some(t)) => t.clone(),
        (None, None) => "?".into(),
    }
}

fn state_name(s: Option<xenvirtio_xenstore::xenbus::XenbusState>) -> String {
    s.map_or_else(|| "-".into(), |s| s.to_string())
}

fn list(global: &Global, dma: &DmaArgs) -> Result<i32> {
    let (store, domid) = open_store(global)?;
    let role = DomainRole::detect(domid);
    let requested = dma.strategy()?;
    let frontend = role
        .as_ref()
        .ok()
        .map(|r| Frontend::new(LinuxXen::new(domid), Arc::clone(&store), r.clone()));
    match &role {
        Ok(r) => println!("domain {domid}: {r}"),
        Err(e) => println!("domain {domid}: role unknown ({e})"),
    }
    let lister = Frontend::new(
        LinuxXen::new(domid),
        Arc::clone(&store),
        role.as_ref()
            .cloned()
            .unwrap_or_else(|_| placeholder_role(domid)),
    );
    let devices = lister.devices()?;
    if devices.is_empty() {
        println!("no virtio devices under /local/domain/{domid}/device/virtio/");
        return Ok(0);
    }
    println!(
        "{:<6} {:<8} {:<8} {:<18} {:<18} DMA",
        "DEVID", "TYPE", "BACKEND", "FRONTEND STATE", "BACKEND STATE"
    );
    for d in devices {
        let dma_text = match (&d.dma, &frontend) {
            (Some(s), _)
                if d.frontend_state
                    .is_some_and(|s| s.value() >= 3 && s.value() <= 4) =>
            {
                format!("{s} (in use): {}", d.dma_reason.clone().unwrap_or_default())
            }
            (_, Some(fe)) => match fe.preview_dma(d.devid, requested) {
                Ok(c) => format!("{} (policy): {}", c.strategy, c.reason),
                Err(e) => format!("none: {e:#}"),
            },
            (_, None) => "unknown (role unknown)".into(),
        };
        println!(
            "{:<6} {:<8} {:<8} {:<18} {:<18} {}",
            d.devid,
            kind_name(&d),
            d.backend_id.map_or("-".into(), |b| b.to_string()),
            state_name(d.frontend_state),
            state_name(d.backend_state),
            dma_text
        );
        for (who, e) in [
            ("frontend", &d.frontend_error),
            ("backend", &d.backend_error),
        ] {
            if let Some(e) = e {
                println!("       {who} error: {e}");
            }
        }
    }
    Ok(0)
}

fn placeholder_role(domid: u16) -> DomainRole {
    DomainRole {
        domid,
        is_dom0: domid == 0,
        guest_type: xenvirtio_xen::role::GuestType::Pvh,
        arch: xenvirtio_xen::role::Arch::current().unwrap_or(xenvirtio_xen::role::Arch::X86_64),
        xen_version: xenvirtio_xen::role::XenVersion {
            major: 0,
            minor: 0,
            extra: String::new(),
        },
    }
}

fn first_blk(frontend: &Frontend<LinuxXen>, devid: Option<u32>) -> Result<u32> {
    first_of_kind(frontend, devid, DeviceKind::Block)
}

/// `devid`, or the first device of `kind`.
fn first_of_kind(
    frontend: &Frontend<LinuxXen>,
    devid: Option<u32>,
    kind: DeviceKind,
) -> Result<u32> {
    if let Some(d) = devid {
        return Ok(d);
    }
    frontend
        .devices()?
        .into_iter()
        .find(|d| d.kind == Some(kind))
        .map(|d| d.devid)
        .ok_or_else(|| {
            anyhow!(
                "this domain has no {} device; see `xenvirtio-frontend list`",
                kind.name()
            )
        })
}

fn connect_blk(
    frontend: &Frontend<LinuxXen>,
    global: &Global,
    dma: &DmaArgs,
    devid: u32,
    queues: Option<u32>,
    depth: Option<u32>,
) -> Result<BlkDevice<LinuxXen>> {
    let mut options = BlkOptions {
        connect: dma.connect(global)?,
        ..BlkOptions::default()
    };
    options.connect.num_queues = queues;
    if let Some(d) = depth {
        options.depth = d;
        options.connect.queue_size = Some(d.next_power_of_two().max(64));
    }
    let dev = frontend
        .connect_blk(devid, &options)
        .with_context(|| format!("cannot connect blk device {devid}"))?;
    describe_blk(devid, &dev);
    Ok(dev)
}

/// One line on stderr about a connected blk device: size, queues and the DMA strategy.
fn describe_blk(devid: u32, dev: &BlkDevice<LinuxXen>) {
    let n = dev.negotiated();
    eprintln!(
        "device {devid}: {} bytes, {} queue(s) of {}, dma {}{} ({})",
        dev.size(),
        dev.num_queues(),
        n.queue_size,
        n.strategy,
        if n.persistent { " persistent" } else { "" },
        n.reason
    );
}

// ---- verify ---------------------------------------------------------------------------------

fn verify(global: &Global, args: &VerifyArgs) -> Result<i32> {
    if let Some(image) = &args.check_image {
        let size = std::fs::metadata(image)
            .with_context(|| format!("cannot read {}", image.display()))?
            .len();
        let length = args.length.unwrap_or(size.saturating_sub(args.offset));
        let started = Instant::now();
        let cmp = pattern::check_image(image, args.seed, args.offset, length)
            .with_context(|| format!("cannot check {}", image.display()))?;
        return Ok(report(
            &format!("image {}", image.display()),
            args,
            &cmp,
            started,
        ));
    }
    if let Some(socket) = &args.nbd {
        return verify_nbd(socket, args);
    }
    let frontend = open_frontend(global)?;
    let devid = first_blk(&frontend, args.devid)?;
    let dev = connect_blk(&frontend, global, &args.dma, devid, None, None)?;
    let size = dev.size();
    let length = args.length.unwrap_or(size.saturating_sub(args.offset));
    if args.offset.checked_add(length).is_none_or(|e| e > size) {
        bail!(
            "{length} bytes at offset {} go past the end of the disk ({size} bytes)",
            args.offset
        );
    }
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let started = Instant::now();
    let mut at = args.offset;
    while at < args.offset + length {
        let n = ((args.offset + length - at) as usize).min(chunk);
        pattern::fill(args.seed, at, &mut buf[..n]);
        dev.write_at(&buf[..n], at)
            .with_context(|| format!("write of {n} bytes at {at} failed"))?;
        at += n as u64;
    }
    dev.flush().context("flush failed")?;
    let wrote = started.elapsed();
    let mut cmp = Comparer::new(args.seed);
    let mut at = args.offset;
    while at < args.offset + length {
        let n = ((args.offset + length - at) as usize).min(chunk);
        dev.read_at(&mut buf[..n], at)
            .with_context(|| format!("read of {n} bytes at {at} failed"))?;
        cmp.add(at, &buf[..n]);
        at += n as u64;
    }
    let cmp = cmp.finish();
    let n = dev.negotiated();
    println!(
        "wrote {length} bytes at offset {} (seed {}) in {:.3}s over dma {}{}",
        args.offset,
        args.seed,
        wrote.as_secs_f64(),
        n.strategy,
        if n.persistent {
            " (persistent grants)"
        } else {
            ""
        }
    );
    let stats = dev.stats();
    println!(
        "frontend counts: {} requests, {} notifications sent, {} received, {} bytes copied, {} grants held",
        stats.requests,
        stats.events.sent,
        stats.events.received,
        stats.dma.bytes_bounced,
        stats.dma.grants_held
    );
    let code = report(&format!("device {devid}"), args, &cmp, started);
    dev.close().context("closing the device")?;
    Ok(code)
}

/// `verify --nbd`: the same pattern through an NBD server's unix socket (its first export).
fn verify_nbd(socket: &Path, args: &VerifyArgs) -> Result<i32> {
    let address = NbdAddress::Unix(socket.to_path_buf());
    let name = NbdClient::list_exports(&address)
        .ok()
        .and_then(|l| l.into_iter().next().map(|(name, _)| name))
        .unwrap_or_default();
    let mut client = NbdClient::connect(&address, &name)
        .with_context(|| format!("cannot connect to the NBD server at {}", socket.display()))?;
    let size = client.size();
    let length = args.length.unwrap_or(size.saturating_sub(args.offset));
    if args.offset.checked_add(length).is_none_or(|e| e > size) {
        bail!(
            "{length} bytes at offset {} go past the end of the export ({size} bytes)",
            args.offset
        );
    }
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let started = Instant::now();
    let mut at = args.offset;
    while at < args.offset + length {
        let n = ((args.offset + length - at) as usize).min(chunk);
        pattern::fill(args.seed, at, &mut buf[..n]);
        client
            .write_at(&buf[..n], at)
            .with_context(|| format!("NBD write at {at} failed"))?;
        at += n as u64;
    }
    if client.can_flush() {
        client.flush().context("NBD flush failed")?;
    }
    println!(
        "wrote {length} bytes at offset {} (seed {}) through NBD export {name:?} in {:.3}s",
        args.offset,
        args.seed,
        started.elapsed().as_secs_f64()
    );
    let mut cmp = Comparer::new(args.seed);
    let mut at = args.offset;
    while at < args.offset + length {
        let n = ((args.offset + length - at) as usize).min(chunk);
        client
            .read_at(&mut buf[..n], at)
            .with_context(|| format!("NBD read at {at} failed"))?;
        cmp.add(at, &buf[..n]);
        at += n as u64;
    }
    Ok(report(
        &format!("NBD {}", socket.display()),
        args,
        &cmp.finish(),
        started,
    ))
}

fn report(what: &str, args: &VerifyArgs, cmp: &pattern::Comparison, started: Instant) -> i32 {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{what}: checked {} bytes at offset {} in {secs:.3}s ({:.1} MiB/s): expected checksum {:#018x}, found {:#018x}",
        cmp.bytes,
        args.offset,
        cmp.bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
        cmp.expected_checksum,
        cmp.actual_checksum
    );
    if cmp.matches() {
        println!("OK: the data matches the pattern of seed {}", args.seed);
        0
    } else {
        println!(
            "MISMATCH: {} sector(s) differ, the first at byte {}",
            cmp.mismatched_sectors,
            cmp.first_mismatch.map_or("?".into(), |b| b.to_string())
        );
        1
    }
}

// ---- bench ----------------------------------------------------------------------------------

fn bench(global: &Global, args: &BenchArgs) -> Result<i32> {
    if args.bs == 0 || args.bs % 512 != 0 {
        bail!("--bs must be a positive multiple of 512");
    }
    let frontend = open_frontend(global)?;
    let devid = first_blk(&frontend, args.devid)?;
    let dev = connect_blk(
        &frontend,
        global,
        &args.dma,
        devid,
        Some(args.queues),
        Some(args.depth),
    )?;
    if args.bs > dev.max_request_bytes() {
        bail!(
            "--bs {} is larger than one request may carry here ({} bytes)",
            args.bs,
            dev.max_request_bytes()
        );
    }
    let blocks = dev.size() / args.bs as u64;
    if blocks == 0 {
        bail!("the disk is smaller than one block of {} bytes", args.bs);
    }
    let write = matches!(args.pattern, BenchPattern::Randwrite | BenchPattern::Write);
    let random = matches!(
        args.pattern,
        BenchPattern::Randread | BenchPattern::Randwrite
    );
    let before = dev.stats();
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let results: Vec<Result<(Vec<Duration>, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..dev.num_queues())
            .map(|q| {
                let dev = &dev;
                s.spawn(move || bench_queue(dev, q, args, blocks, write, random, deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a bench thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut copied = 0;
    for r in results {
        let (l, c) = r?;
        latencies.extend(l);
        copied += c;
    }
    latencies.sort_unstable();
    let ops = latencies.len() as u64;
    let after = dev.stats();
    let n = dev.negotiated();
    let pct = |p: f64| -> String {
        if latencies.is_empty() {
            return "-".into();
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        format!("{:.1}us", latencies[i].as_secs_f64() * 1e6)
    };
    println!(
        "{:?} bs={} depth={} queues={} dma={}{} for {elapsed:.2}s{}",
        args.pattern,
        args.bs,
        args.depth,
        dev.num_queues(),
        n.strategy,
        if n.persistent { " (persistent)" } else { "" },
        if args.copy {
            ", copying through private buffers"
        } else {
            ", zero-copy"
        }
    );
    println!(
        "  {ops} requests: {:.0} IOPS, {:.1} MiB/s",
        ops as f64 / elapsed,
        (ops * args.bs as u64) as f64 / (1 << 20) as f64 / elapsed
    );
    println!(
        "  latency: p50 {} p90 {} p99 {} p99.9 {} max {}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    let per = |x: u64| if ops == 0 { 0.0 } else { x as f64 / ops as f64 };
    let sent = after.events.sent - before.events.sent;
    let received = after.events.received - before.events.received;
    let bounced = after.dma.bytes_bounced - before.dma.bytes_bounced + copied;
    println!(
        "  frontend: {sent} notifications sent ({:.3}/request), {received} received ({:.3}/request), \
         {} suppressed kicks, {bounced} bytes copied ({:.0}/request), {} grants held, {} allocated since connect",
        per(sent),
        per(received),
        after.events.suppressed - before.events.suppressed,
        per(bounced),
        after.dma.grants_held,
        after.dma.grants_allocated
    );
    println!(
        "  backend: grant maps and unmaps happen in the backend; see `xenvirtio-backend stats` in domain {}",
        dev.backend()
    );
    dev.close().context("closing the device")?;
    Ok(0)
}

fn bench_queue(
    dev: &BlkDevice<LinuxXen>,
    q: usize,
    args: &BenchArgs,
    blocks: u64,
    write: bool,
    random: bool,
    deadline: Instant,
) -> Result<(Vec<Duration>, u64)> {
    let mut queue = dev.lock_queue(q);
    let sectors_per_block = args.bs as u64 / 512;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (q as u64 + 1);
    let mut next_block = (q as u64 * blocks / dev.num_queues() as u64) % blocks;
    let mut pick = move || {
        if random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            let b = next_block;
            next_block = (next_block + 1) % blocks;
            b
        }
    };
    let mut private = vec![0x5au8; args.bs];
    let mut copied = 0u64;
    let mut latencies = Vec::new();
    let mut free = Vec::new();
    for _ in 0..queue.depth() {
        let b = queue
            .alloc(args.bs)
            .context("DMA memory is too small for this depth and block size (raise --dma-pages)")?;
        b.write(0, &private)?;
        free.push(b);
    }
    let mut in_flight = 0usize;
    loop {
        while Instant::now() < deadline {
            let Some(buf) = free.pop() else { break };
            if write && args.copy {
                buf.write(0, &private)?;
                copied += args.bs as u64;
            }
            let sector = pick() * sectors_per_block;
            let r = if write {
                queue.submit_write(buf, sector)
            } else {
                queue.submit_read(buf, sector)
            };
            match r {
                Ok(_) => in_flight += 1,
                Err(rejected) => {
                    free.extend(rejected.buf);
                    if matches!(
                        rejected.error,
                        xenvirtio_frontend::blk::BlkError::QueueFull { .. }
                    ) {
                        break;
                    }
                    return Err(rejected.error.into());
                }
            }
        }
        if in_flight == 0 {
            break;
        }
        for c in queue.wait(Some(Duration::from_secs(30)))? {
            in_flight -= 1;
            c.result?;
            latencies.push(c.latency);
            if let Some(buf) = c.buf {
                if !write && args.copy {
                    buf.read(0, &mut private)?;
                    copied += args.bs as u64;
                }
                free.push(buf);
            }
        }
    }
    Ok((latencies, copied))
}

// ---- copy -----------------------------------------------------------------------------------

fn copy(global: &Global, args: &CopyArgs) -> Result<i32> {
    let open = || {
        std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))
    };
    let length = open()?.metadata()?.len();
    let frontend = open_frontend(global)?;
    let devid = first_blk(&frontend, args.devid)?;
    let dev = connect_blk(&frontend, global, &args.dma, devid, None, None)?;
    if args
        .offset
        .checked_add(length)
        .is_none_or(|e| e > dev.size())
    {
        bail!(
            "{} ({length} bytes) at offset {} does not fit on the disk ({} bytes)",
            args.file.display(),
            args.offset,
            dev.size()
        );
    }
    let before = dev.stats();
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let mut back = vec![0u8; chunk];
    // The file onto the disk.
    let started = Instant::now();
    let mut file = open()?;
    let mut at = args.offset;
    loop {
        let n = read_full(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        dev.write_at(&buf[..n], at)
            .with_context(|| format!("write of {n} bytes at {at} failed"))?;
        at += n as u64;
    }
    dev.flush().context("flush failed")?;
    let wrote = started.elapsed().as_secs_f64();
    // And back, compared with the file.
    let started = Instant::now();
    let mut file = open()?;
    let mut at = args.offset;
    let mut first_difference = None;
    loop {
        let n = read_full(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        dev.read_at(&mut back[..n], at)
            .with_context(|| format!("read of {n} bytes at {at} failed"))?;
        if first_difference.is_none() {
            first_difference = buf[..n]
                .iter()
                .zip(&back[..n])
                .position(|(a, b)| a != b)
                .map(|i| at + i as u64);
        }
        at += n as u64;
    }
    let read = started.elapsed().as_secs_f64();
    let n = dev.negotiated();
    let mib = length as f64 / (1 << 20) as f64;
    println!(
        "copied {length} bytes of {} to device {devid} at offset {} over dma {}{}",
        args.file.display(),
        args.offset,
        n.strategy,
        if n.persistent {
            " (persistent grants)"
        } else {
            ""
        }
    );
    println!(
        "write: {wrote:.3}s ({:.1} MiB/s), read back: {read:.3}s ({:.1} MiB/s)",
        mib / wrote.max(1e-9),
        mib / read.max(1e-9)
    );
    let after = dev.stats();
    println!(
        "frontend counts: {} requests, {} notifications sent, {} received, {} bytes copied, {} grants held",
        after.requests - before.requests,
        after.events.sent - before.events.sent,
        after.events.received - before.events.received,
        after.dma.bytes_bounced - before.dma.bytes_bounced,
        after.dma.grants_held
    );
    dev.close().context("closing the device")?;
    match first_difference {
        None => {
            println!("OK: the device holds the file's {length} bytes");
            Ok(0)
        }
        Some(at) => {
            println!("MISMATCH: the device differs from the file at byte {at}");
            Ok(1)
        }
    }
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the file failed"),
        }
    }
    Ok(filled)
}

// ---- console and rng --------------------------------------------------------------------------

fn console(global: &Global, args: &ConsoleArgs) -> Result<i32> {
    let stop = stop_on_signals()?;
    let frontend = open_frontend(global)?;
    let devid = first_of_kind(&frontend, args.devid, DeviceKind::Console)?;
    let dev = Arc::new(
        frontend
            .connect_console(devid, &args.dma.connect(global)?)
            .with_context(|| format!("cannot connect console device {devid}"))?,
    );
    let n = dev.negotiated();
    eprintln!(
        "console {devid}: connected, dma {} ({})",
        n.strategy, n.reason
    );
    let deadline = args.wait.map(|s| Instant::now() + Duration::from_secs(s));
    // stdin -> port 0. The reader of stdin blocks in read() and holds no device; the sender
    // hands what it read to the device, and on stop it still sends what was read already.
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let sender_stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let dev = Arc::clone(&dev);
        let sender_stop = Arc::clone(&sender_stop);
        std::thread::spawn(move || -> Result<()> {
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(data) => dev.write(&data).context("sending to the console failed")?,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if sender_stop.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
        })
    };
    // port 0 -> stdout.
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    let mut lines = 0u64;
    let mut result: Result<i32> = Ok(0);
    loop {
        if args.lines.is_some_and(|want| lines >= want) {
            break;
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if let Some(want) = args.lines {
                eprintln!(
                    "console {devid}: {lines} of {want} line(s) arrived within {}s",
                    args.wait.unwrap_or(0)
                );
                result = Ok(1);
            }
            break;
        }
        let got = dev
            .rx()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .read(&mut buf, Some(Duration::from_millis(200)));
        match got {
            Ok(0) => {}
            Ok(n) => {
                lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                if let Err(e) = out.write_all(&buf[..n]).and_then(|()| out.flush()) {
                    result = Err(e).context("writing to stdout failed");
                    break;
                }
            }
            Err(e) => {
                result = Err(e).context("reading from the console failed");
                break;
            }
        }
    }
    sender_stop.store(true, Ordering::SeqCst);
    match sender.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => result = result.and(Err(e)),
        Err(_) => result = result.and(Err(anyhow!("the console sender panicked"))),
    }
    Arc::try_unwrap(dev)
        .map_err(|_| anyhow!("console {devid} is still in use"))?
        .close()
        .context("closing the console")?;
    result
}

fn rng(global: &Global, args: &RngArgs) -> Result<i32> {
    let frontend = open_frontend(global)?;
    let devid = first_of_kind(&frontend, args.devid, DeviceKind::Rng)?;
    let mut dev = frontend
        .connect_rng(devid, &args.dma.connect(global)?)
        .with_context(|| format!("cannot connect rng device {devid}"))?;
    let n = dev.negotiated();
    eprintln!("rng {devid}: connected, dma {} ({})", n.strategy, n.reason);
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 16 * 1024];
    let mut left = args.bytes;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let got = dev
            .read(&mut buf[..want], Some(Duration::from_secs(10)))
            .context("reading from the rng device failed")?;
        if got == 0 {
            bail!(
                "the rng device gave no bytes within 10s ({} of {} written)",
                args.bytes - left,
                args.bytes
            );
        }
        out.write_all(&buf[..got])
            .and_then(|()| out.flush())
            .context("writing to stdout failed")?;
        left -= got as u64;
    }
    dev.close().context("closing the rng device")?;
    Ok(0)
}

// ---- serve ----------------------------------------------------------------------------------

/// A flag set once SIGINT or SIGTERM arrives; both are blocked in this thread and in every
/// thread started afterwards, so only the waiter thread receives them.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    xenvirtio_xen::signals::StopSignals::block()
        .context("cannot block SIGINT/SIGTERM")?
        .spawn_flag("signals", |signal| {
            if let Some(name) = signal {
                eprintln!("{name}: closing the devices");
            }
        })
        .context("cannot start the signal thread")
}

fn serve(global: &Global, args: &ServeArgs) -> Result<i32> {
    let stop = stop_on_signals()?;
    let frontend = open_frontend(global)?;
    let devices = frontend.devices()?;
    let wanted: Vec<DeviceInfo> = if args.devids.is_empty() {
        devices
    } else {
        let mut out = Vec::new();
        for id in &args.devids {
            match devices.iter().find(|d| d.devid == *id) {
                Some(d) => out.push(d.clone()),
                None => {
                    frontend.device(*id)?;
                }
            }
        }
        out
    };
    if wanted.is_empty() {
        bail!("this domain has no virtio devices to serve; see `xenvirtio-frontend list`");
    }
    let connect = args.dma.connect(global)?;
    let mut workers = Vec::new();
    let mut closers: Vec<Box<dyn FnOnce() -> Result<()>>> = Vec::new();
    for d in &wanted {
        match d.kind {
            Some(DeviceKind::Block) => {
                // Kept connected: a backend restart or a re-attach is a pause, not an error.
                let options = BlkOptions {
                    connect: connect.clone(),
                    ..BlkOptions::default()
                };
                let own = Frontend::new(
                    *frontend.platform(),
                    Arc::clone(frontend.store()),
                    frontend.role().clone(),
                );
                let dev = Arc::new(
                    SupervisedBlk::connect(own, d.devid, options, DEFAULT_RETRY_WAIT)
                        .with_context(|| format!("cannot connect blk device {}", d.devid))?,
                );
                if let Some(c) = dev.current() {
                    describe_blk(d.devid, &c);
                }
                let blk_count = wanted
                    .iter()
                    .filter(|w| w.kind == Some(DeviceKind::Block))
                    .count();
                let socket = if blk_count > 1 {
                    PathBuf::from(format!("{}.{}", args.nbd_socket.display(), d.devid))
                } else {
                    args.nbd_socket.clone()
                };
                if let Some(parent) = socket.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("cannot create {}", parent.display()))?;
                }
                let mut config =
                    NbdServerConfig::new(format!("xenvirtio-{}", d.devid)).unix(&socket);
                if let Some(port) = args.nbd_tcp {
                    let port = port
                        .checked_add(if blk_count > 1 { d.devid as u16 } else { 0 })
                        .ok_or_else(|| anyhow!("--nbd-tcp port out of range"))?;
                    config = config.tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
                }
                let export: Arc<dyn BlockExport> = Arc::clone(&dev) as Arc<dyn BlockExport>;
                let server = NbdServer::start(export, config).with_context(|| {
                    format!("cannot start the NBD export of device {}", d.devid)
                })?;
                println!(
                    "device {}: NBD export {:?} on unix socket {}{}",
                    d.devid,
                    server.export_name(),
                    socket.display(),
                    server
                        .tcp_addr()
                        .map(|a| format!(" and tcp {a}"))
                        .unwrap_or_default()
                );
                let devid = d.devid;
                closers.push(Box::new(move || {
                    server.shutdown();
                    Arc::try_unwrap(dev)
                        .map_err(|_| anyhow!("blk device {devid} is still in use"))?
                        .close()
                        .map_err(Into::into)
                }));
            }
            Some(DeviceKind::Console) => {
                let dev = Arc::new(frontend.connect_console(d.devid, &connect)?);
                let (input, output): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match args
                    .console
                {
                    ConsoleSink::Stdio => (Box::new(std::io::stdin()), Box::new(std::io::stdout())),
                    ConsoleSink::Pty => {
                        let (master, path) = open_pty()?;
                        println!("device {}: console on {}", d.devid, path.display());
                        (Box::new(master.try_clone()?), Box::new(master))
                    }
                };
                workers.extend(pump_console(&dev, input, output, &stop));
                let devid = d.devid;
                closers.push(Box::new(move || {
                    Arc::try_unwrap(dev)
                        .map_err(|_| anyhow!("console {devid} is still in use"))?
                        .close()
                        .map_err(Into::into)
                }));
            }
            Some(DeviceKind::Rng) => {
                let dev = frontend.connect_rng(d.devid, &connect)?;
                let path = if wanted
                    .iter()
                    .filter(|w| w.kind == Some(DeviceKind::Rng))
                    .count()
                    > 1
                {
                    PathBuf::from(format!("{}.{}", args.rng_fifo.display(), d.devid))
                } else {
                    args.rng_fifo.clone()
                };
                make_fifo(&path)?;
                println!(
                    "device {}: random bytes on fifo {}",
                    d.devid,
                    path.display()
                );
                let stop = Arc::clone(&stop);
                let (done_tx, done_rx) = mpsc::channel();
                workers.push(std::thread::spawn(move || {
                    let mut dev = dev;
                    if let Err(e) = feed_fifo(&mut dev, &path, &stop) {
                        eprintln!("rng fifo {}: {e:#}", path.display());
                    }
                    let _ = done_tx.send(dev);
                }));
                closers.push(Box::new(move || {
                    let dev = done_rx.recv().map_err(|_| anyhow!("the rng worker died"))?;
                    dev.close().map_err(Into::into)
                }));
            }
            None => eprintln!(
                "device {}: skipped, its type {:?} is not one this frontend drives",
                d.devid, d.type_string
            ),
        }
    }
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for w in workers {
        let _ = w.join();
    }
    let mut failed = false;
    for close in closers {
        if let Err(e) = close() {
            eprintln!("closing: {e:#}");
            failed = true;
        }
    }
    Ok(i32::from(failed))
}

fn pump_console(
    dev: &Arc<xenvirtio_frontend::console::ConsoleDevice<LinuxXen>>,
    mut input: Box<dyn Read + Send>,
    mut output: Box<dyn Write + Send>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    // The reader of stdin or the pty blocks in read(); it holds no device and is left behind
    // at shutdown.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = input.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let to_device = {
        let dev = Arc::clone(dev);
        let stop = Arc::clone(stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(data) => {
                        if let Err(e) = dev.write(&data) {
                            eprintln!("console: {e}");
                            break;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        })
    };
    let from_device = {
        let dev = Arc::clone(dev);
        let stop = Arc::clone(stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                let r = dev
                    .rx()
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .read(&mut buf, Some(Duration::from_millis(200)));
                match r {
                    Ok(0) => {}
                    Ok(n) => {
                        if output
                            .write_all(&buf[..n])
                            .and_then(|()| output.flush())
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        eprintln!("console: {e}");
                        break;
                    }
                }
            }
        })
    };
    vec![to_device, from_device]
}

/// Opens a new pseudo-terminal; returns its master side and the path of its slave.
fn open_pty() -> Result<(std::fs::File, PathBuf)> {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt returns a new fd or -1; no memory is involved.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("posix_openpt failed");
    }
    // SAFETY: fd is a freshly opened descriptor that nothing else owns.
    let master = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt take the master fd; ptsname_r writes at most name.len() bytes
    // (NUL included) into `name`.
    let rc = unsafe {
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            -1
        } else {
            libc::ptsname_r(fd, name.as_mut_ptr(), name.len())
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting up the pty failed");
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Ok((master, PathBuf::from(path.to_string_lossy().into_owned())))
}

fn make_fifo(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_fifo() => return Ok(()),
        Ok(_) => bail!("{} exists and is not a fifo", path.display()),
        Err(_) => {}
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .context("the fifo path contains a NUL byte")?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot create the fifo {}", path.display()));
    }
    Ok(())
}

/// Writes random bytes into the fifo whenever a reader has it open, until `stop`.
fn feed_fifo(
    dev: &mut xenvirtio_frontend::rng::RngDevice<LinuxXen>,
    path: &Path,
    stop: &AtomicBool,
) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        // Non-blocking open fails with ENXIO until a reader opens the fifo.
        let fifo = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
        let mut fifo = match fifo {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        'reader: while !stop.load(Ordering::SeqCst) {
            let n = dev.read(&mut buf, Some(Duration::from_secs(5)))?;
            let mut at = 0;
            while at < n {
                match fifo.write(&buf[at..n]) {
                    Ok(w) => at += w,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if stop.load(Ordering::SeqCst) {
                            break 'reader;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    // The reader went away: wait for the next one.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break 'reader,
                    Err(e) => return Err(e).context("writing the fifo failed"),
                }
            }
        }
    }
    Ok(())
}
