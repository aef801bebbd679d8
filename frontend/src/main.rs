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
use xenvirtio_frontend::knbd::{KernelNbd, KernelNbdConfig, NbdInterface};
use xenvirtio_frontend::nbd::{BlockExport, NbdAddress, NbdClient, NbdServer, NbdServerConfig};
use xenvirtio_frontend::pattern::{self, Comparer};
use xenvirtio_frontend::supervisor::{DEFAULT_RETRY_WAIT, SupervisedBlk};
use xenvirtio_frontend::transport::{ConnectOptions, DeviceInfo, self_domid};
use xenvirtio_frontend::vduse::VduseBlk;
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xen::linux::LinuxXen;
use xenvirtio_xen::role::DomainRole;
use xenvirtio_xenstore::{XENBUS_DEVICE, XenStore, XsClient};

mod cmd;
use cmd::bench::bench;
use cmd::copy::copy;
use cmd::serve::serve;
use cmd::stdio::{console, rng};
use cmd::verify::verify;

const ABOUT: &str = "Drive xenvirtio devices (virtio over xenbus) from the domain they belong to.";
const LONG_ABOUT: &str = "\
Drive xenvirtio devices (virtio over xenbus) from the domain they belong to: a \
guest, or Dom0.

Devices are found under /local/domain/<self>/device/virtio/ in xenstore, where the \
toolstack (`xenvirtio-backend attach`) creates them. Each device's memory is shared \
with the backend by one DMA strategy:
  grant   pages of an arena granted to the backend (x86 guests' default;
          persistent grants when the backend offers them)
  bounce  a pool granted once, data copied in and out (Dom0's default)
  direct  guest-physical addresses of pinned memory (Arm guests with a trusted
          Dom0 backend; refused on x86 PV, with a backend that is not Dom0, or
          when the device offers ACCESS_PLATFORM)
The choice and its reason are logged and written to the device's `dma` and \
`dma-reason` keys. A blk device's NBD export is named after its vdev: xvda for \
device 0, xvdb for device 1 (the default export \"\" is the same one).

Exit codes: 0 done; 1 it ran but found a problem (data differ, a device failed); \
2 it could not do what was asked (docs/OPERATING.md, \"Exit codes\").

Logging: RUST_LOG (e.g. RUST_LOG=info, RUST_LOG=xenvirtio_frontend=debug).";

#[derive(Parser, Debug)]
#[command(
    name = "xenvirtio-frontend",
    version,
    max_term_width = 80,
    about = ABOUT,
    long_about = LONG_ABOUT
)]
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
    /// Show which ways this domain's kernel can take a disk: its NBD driver (nbd.ko, over
    /// netlink: `serve --kernel-nbd`) and VDUSE (vduse.ko, vdpa.ko and virtio_vdpa.ko: the
    /// kernel's own virtio-blk driver, Debian 13's kernel and later). Prints one line per
    /// path, "available" or "not available" with the reason and what to load; exits 0.
    KernelPaths {
        /// Also create a small VDUSE virtio-blk device and destroy it again, which proves that
        /// the kernel accepts this frontend's device configuration (needs root).
        #[arg(long)]
        probe: bool,
    },
}

const COPY_HELP: &str = "\
Example:
  # Put a file at byte 1 MiB of the first blk device, and check it from Dom0
  # in the backend's image (the same bytes at the same offset):
  xenvirtio-frontend copy /usr/bin/xenvirtio-frontend --offset 1048576";

const CONSOLE_HELP: &str = "\
Exit status: 0 when --lines lines arrived (or, without --lines, when stopped by \
a signal or at the end of --wait); 1 when --wait ran out before --lines lines \
arrived; 2 on an error.

Examples:
  # Send a line to the host side (the pty in the backend's `tty` key) and
  # print the first line that comes back, giving up after 30 s:
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
    /// Also give each blk device to this domain's kernel as /dev/nbdN, through the kernel's NBD
    /// netlink interface (needs nbd.ko, loaded with modprobe if missing): `auto` takes the
    /// first free device, a number N takes /dev/nbdN (N, N+1, ... for several blk devices). A
    /// device already connected by an earlier run of this frontend to the same export gets the
    /// new connections (a pause, not an error, for a mounted filesystem).
    #[arg(long, value_name = "auto|N", value_parser = parse_kernel_nbd)]
    kernel_nbd: Option<KernelNbdIndex>,
    /// Which of the kernel's NBD interfaces connects the /dev/nbdN of --kernel-nbd (and of
    /// --kernel where it picks NBD): `auto` takes netlink where the kernel has it, else the
    /// old ioctls on /dev/nbdN (kernels before 4.12). Only netlink hands a connected device
    /// the new connections of a restarted frontend and holds requests while none is left;
    /// under ioctl a restarted frontend takes another device. The one used is printed.
    #[arg(
        long,
        value_name = "auto|netlink|ioctl",
        default_value = "auto",
        value_parser = str::parse::<NbdInterface>
    )]
    nbd_interface: NbdInterface,
    /// Also give each blk device to this domain's kernel as its own virtio-blk disk (/dev/vdX,
    /// bound by the kernel's virtio_blk driver), through VDUSE: needs vduse.ko, vdpa.ko and
    /// virtio_vdpa.ko (loaded with modprobe if missing), which Debian 13's kernel has and
    /// Debian 12's does not (`xenvirtio-frontend kernel-paths` tells). The VDUSE device is
    /// named xenvirtio-<vdev>, and its virtio serial is the vdev name (xvda, ...).
    #[arg(long, conflicts_with = "kernel_nbd")]
    kernel_vduse: bool,
    /// Also give each blk device to this domain's kernel the best way it has: through VDUSE
    /// (its own virtio_blk) where the kernel has it, else as the first free /dev/nbdN. Missing
    /// modules are loaded with modprobe first. The choice and its reason are printed.
    #[arg(long, conflicts_with_all = ["kernel_nbd", "kernel_vduse"])]
    kernel: bool,
    /// How long a blk device may be gone from xenstore (detached) before serve gives it up:
    /// its kernel device is removed (a mounted filesystem then gets I/O errors at once instead
    /// of waiting) and its export closed. A detach and an attach back to back within it are a
    /// pause. serve exits once no device is left.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    detach_grace: u64,
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
    /// The name of the network interface (a TAP) a net device gets in this domain; with
    /// several net devices, `.<devid>` is appended [default: xvnet<devid>]. It takes the
    /// device's MAC address and MTU and is up; its IP address is the operator's to give.
    #[arg(long, value_name = "NAME")]
    net_ifname: Option<String>,
}

/// Which kernel NBD device `serve --kernel-nbd` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelNbdIndex {
    Auto,
    From(u32),
}

fn parse_kernel_nbd(s: &str) -> std::result::Result<KernelNbdIndex, String> {
    match s {
        "auto" => Ok(KernelNbdIndex::Auto),
        n => n
            .strip_prefix("/dev/nbd")
            .unwrap_or(n)
            .parse()
            .map(KernelNbdIndex::From)
            .map_err(|_| format!("{s:?} is neither `auto` nor a device number such as 0")),
    }
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
        Command::KernelPaths { probe } => cmd::kernel_paths::kernel_paths(probe),
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
