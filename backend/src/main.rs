//! `xenvirtio-backend`: the xenvirtio device side's command line.
//!
//! This file owns parsing the command line, connecting to xenstore, installing the tracing
//! subscriber, printing results and choosing the exit code. The work itself is in the library
//! (`xenvirtio_backend::admin` for `attach`, `detach` and `list`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use xenvirtio_backend::admin::{
    self, AttachRequest, ConsoleOutput, DetachRequest, DmaSetting, DomainRef, Removal,
};
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::net::MacAddr;
use xenvirtio_xenstore::{XenStore, XsClient};

const ABOUT: &str = "Serve virtio devices to Xen guests over xenbus, and manage them";

const LONG_ABOUT: &str = "\
Serve virtio devices (blk, console, rng, net) to Xen guests over xenbus, and manage them.

The attach, detach and list commands are the toolstack: run them in Dom0. They create and \
remove a device's xenstore directories (docs/PROTOCOL.md section 2) the way xl does for PV \
devices; the backend daemon then serves what they created.";

const AFTER_HELP: &str = "\
Examples:
  xenvirtio-backend attach guest1 /srv/guest1.img xvdb
  xenvirtio-backend list
  xenvirtio-backend detach guest1 xvdb

Logs go to stderr (--log-format json: one JSON object per line); set RUST_LOG \
(default: info), e.g. RUST_LOG=xenvirtio_backend=debug. Exit codes: 0 done, 2 the \
command could not do what was asked (docs/OPERATING.md, \"Exit codes\"). See \
docs/OPERATING.md.";

#[derive(Debug, Parser)]
#[command(
    name = "xenvirtio-backend",
    version,
    max_term_width = 80,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP
)]
struct Cli {
    /// Path of xenstored's unix socket. Without it: $XENSTORED_PATH, /run/xenstored/socket,
    /// /var/run/xenstored/socket, then /dev/xen/xenbus.
    #[arg(long, global = true, value_name = "PATH", display_order = 100)]
    xenstore: Option<PathBuf>,

    /// Where the device book lives: DIR/domains/<name>.json lists the devices each domain
    /// gets back when it is created again (attach writes it, detach prunes it, the daemon
    /// reads it).
    #[arg(long, global = true, value_name = "DIR", default_value = admin::book::DEFAULT_STATE_DIR,
          display_order = 101)]
    state_dir: PathBuf,

    /// How log lines on stderr are written: text, or one JSON object per line.
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        default_value = "text",
        display_order = 102
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a virtio device for a guest (writes its xenstore directories).
    #[command(after_help = ATTACH_HELP)]
    Attach(AttachArgs),
    /// Remove a virtio device from a guest, letting the backend close it first.
    #[command(after_help = DETACH_HELP)]
    Detach(DetachArgs),
    /// List the virtio devices this backend domain serves.
    #[command(after_help = LIST_HELP)]
    List(ListArgs),
    /// Run the backend daemon: serve every virtio device of this domain until SIGTERM.
    Serve(xenvirtio_backend::daemon::ServeArgs),
    /// Show the devices and counters of a running daemon (through its control socket).
    Stats(xenvirtio_backend::daemon::StatsArgs),
}

const ATTACH_HELP: &str = "\
Both directories, their permissions and every key are written in one xenstore \
transaction. The backend directory /local/domain/<B>/backend/virtio/<F>/<devid> is \
owned by the backend domain and readable by the guest; the frontend directory \
/local/domain/<F>/device/virtio/<devid> is owned by the guest and readable by the \
backend. On success it prints the devid (and a blk device's vdev) and both paths.

The short form is xl's: attach DOMAIN IMAGE [VDEV] gives a blk device; VDEV is a \
name like xvdb or vdb (devid 1) or a devid.

Examples:
  # A disk from an image file, picked up by the backend daemon in Dom0:
  xenvirtio-backend attach guest1 /srv/guest1.img
  xenvirtio-backend attach --domain guest1 --type blk --image /srv/guest1.img
  # Read-only, two request queues, as xvdd (devid 3):
  xenvirtio-backend attach --domain 5 --image /dev/vg0/data --readonly \\
      --queues 2 --devid xvdd
  # A console on a unix socket, and an entropy source:
  xenvirtio-backend attach guest1 --type console \\
      --console socket:/run/guest1-hvc.sock
  xenvirtio-backend attach guest1 --type rng
  # A NIC whose TAP (xvn<domid>.<devid>) joins the bridge xenbr0, like a vif:
  xenvirtio-backend attach guest1 --type net --bridge xenbr0 \\
      --mac 00:16:3e:12:34:56
  # Served by a driver domain (paths are in that domain):
  xenvirtio-backend attach guest1 /srv/img --backend-domain storage
  # In a script:
  devid=$(xenvirtio-backend attach --quiet guest1 --type rng)";

const DETACH_HELP: &str = "\
Detach writes online=0 and state=5 (Closing) in the backend directory, waits for \
the backend to reach Closed (6), then removes both directories in one transaction. \
A device the backend never took (state Initialising) or that is Closed already is \
removed at once. If the backend does not reach Closed within --timeout, the device \
is left Closing and detach fails, unless --force is given: then both directories \
are removed anyway, with a warning (like `xl block-detach -f`).

Examples:
  xenvirtio-backend detach guest1 xvdb
  xenvirtio-backend detach --domain guest1 --devid 1
  # The backend daemon is gone: do not wait long, remove anyway.
  xenvirtio-backend detach guest1 0 --timeout 2 --force";

const LIST_HELP: &str = "\
One line per device: frontend domain (and name), devid, type, backend and frontend \
states, the DMA strategy in use (or, in parentheses, the one pinned at attach), the \
image or console, and any error node. What guests wrote is shown escaped. A domain \
that does not exist and has no device here is an error.

Examples:
  xenvirtio-backend list
  xenvirtio-backend list guest1
  xenvirtio-backend list --domain guest1 --json | jq '.[].backend_state'";

/// Device types, as on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DeviceType {
    /// virtio-blk over an image file or a block device (--image).
    Blk,
    /// virtio-console, port 0 on a pty or a unix socket (--console).
    Console,
    /// virtio-rng, fed by getrandom(2).
    Rng,
    /// virtio-net, a TAP in this domain on a bridge (--bridge, --mac, --mtu).
    Net,
}

impl From<DeviceType> for DeviceKind {
    fn from(t: DeviceType) -> DeviceKind {
        match t {
            DeviceType::Blk => DeviceKind::Block,
            DeviceType::Console => DeviceKind::Console,
            DeviceType::Rng => DeviceKind::Rng,
            DeviceType::Net => DeviceKind::Net,
        }
    }
}

/// DMA settings, as on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DmaArg {
    /// The guest's frontend picks by its role (Dom0: bounce; x86 DomU: grant; Arm DomU:
    /// direct when a Dom0 daemon trusts it with --allow-direct, else grant).
    Auto,
    /// Grant references per buffer (or a persistent arena of grants).
    Grant,
    /// A bounce pool granted once; one copy per I/O.
    Bounce,
    /// Guest-physical addresses, foreign-mapped by a Dom0 backend; the daemon must also be
    /// started with --allow-direct naming this guest.
    Direct,
}

impl From<DmaArg> for DmaSetting {
    fn from(d: DmaArg) -> DmaSetting {
        match d {
            DmaArg::Auto => DmaSetting::Auto,
            DmaArg::Grant => DmaSetting::Pinned(DmaStrategy::Grant),
            DmaArg::Bounce => DmaSetting::Pinned(DmaStrategy::Bounce),
            DmaArg::Direct => DmaSetting::Pinned(DmaStrategy::Direct),
        }
    }
}

#[derive(Debug, Args)]
struct AttachArgs {
    /// The guest, a domid or a domain name (the same as --domain).
    #[arg(value_name = "DOMAIN")]
    domain_pos: Option<DomainRef>,

    /// blk: the image (the same as --image; the type is then blk).
    #[arg(value_name = "IMAGE")]
    image_pos: Option<PathBuf>,

    /// The device: a vdev name (xvdb, vdb) or a devid (the same as --devid).
    #[arg(value_name = "VDEV", value_parser = parse_devid)]
    vdev_pos: Option<u32>,

    /// The guest: a domid or a domain name.
    #[arg(long, value_name = "DOMAIN", conflicts_with = "domain_pos")]
    domain: Option<DomainRef>,

    /// The device type [default: blk when an image is given].
    #[arg(long = "type", value_name = "TYPE")]
    device_type: Option<DeviceType>,

    /// blk only, required: the image file or block device. Stored as an absolute path
    /// (a relative one is resolved here, symbolic links included).
    #[arg(long, value_name = "PATH", conflicts_with = "image_pos")]
    image: Option<PathBuf>,

    /// blk only: attach read-only (mode=r; the guest sees VIRTIO_BLK_F_RO).
    #[arg(long)]
    readonly: bool,

    /// blk only: share the image with every other user, taking no lock and checking no other
    /// attachment. Without it a read-write image has one user (and a read-only one only
    /// readers), as QEMU's image locks enforce; with it, the users must coordinate (a cluster
    /// filesystem), or the image gets corrupted.
    #[arg(long)]
    force_share: bool,

    /// The device within the guest, a devid or a vdev name (xvda is 0, xvdb 1)
    /// [default: the smallest free one].
    #[arg(long, value_name = "N|VDEV", value_parser = parse_devid, conflicts_with = "vdev_pos")]
    devid: Option<u32>,

    /// Number of queues: blk 1 to 16 (requested-queues); console and net are always 2, rng
    /// always 1.
    #[arg(long, value_name = "N")]
    queues: Option<u32>,

    /// The DMA strategy the guest must use; auto lets its role policy choose.
    #[arg(long, value_name = "STRATEGY", default_value = "auto")]
    dma: DmaArg,

    /// console only: where port 0 goes, `pty` (the backend publishes the pty in `tty`) or
    /// `socket:PATH` (a unix socket; its directory must exist) [default: pty].
    #[arg(long, value_name = "pty|socket:PATH", value_parser = parse_console)]
    console: Option<ConsoleOutput>,

    /// net only: the guest's MAC address [default: 00:16:3e and three random bytes, as xl
    /// draws one; it is remembered, so the guest keeps it].
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Option<MacAddr>,

    /// net only: the bridge the device's TAP joins [default: xenbr0, as xl's vif].
    #[arg(long, value_name = "BRIDGE")]
    bridge: Option<String>,

    /// net only: the MTU, 68 to 9000 [default: 1500].
    #[arg(long, value_name = "BYTES")]
    mtu: Option<u16>,

    /// net only: the TAP's name, at most 15 characters [default: xvn<domid>.<devid>].
    #[arg(long, value_name = "NAME")]
    vifname: Option<String>,

    /// net only: hand the frames to this listening SOCK_SEQPACKET unix socket (one frame
    /// behind a 12-byte virtio-net header per packet) instead of a TAP.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// The domain that runs the backend: a domid or a name [default: this domain, read from
    /// xenstore's `domid` key].
    #[arg(long, value_name = "DOMAIN")]
    backend_domain: Option<DomainRef>,

    /// Do not remember the device: it goes with this domid, and a domain created again with
    /// the same name does not get it back.
    #[arg(long)]
    transient: bool,

    /// Print only the devid.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct DetachArgs {
    /// The guest, a domid or a domain name (the same as --domain).
    #[arg(value_name = "DOMAIN")]
    domain_pos: Option<DomainRef>,

    /// The device, a devid or a vdev name (the same as --devid).
    #[arg(value_name = "DEVID|VDEV", value_parser = parse_devid)]
    devid_pos: Option<u32>,

    /// The guest: a domid or a domain name.
    #[arg(long, value_name = "DOMAIN", conflicts_with = "domain_pos")]
    domain: Option<DomainRef>,

    /// The device within the guest, a devid or a vdev name (see `list`).
    #[arg(long, value_name = "N|VDEV", value_parser = parse_devid, conflicts_with = "devid_pos")]
    devid: Option<u32>,

    /// How long to wait for the backend to reach Closed, in seconds (fractions allowed).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    timeout: Duration,

    /// Remove the device even if the backend does not reach Closed in time (the guest may
    /// lose in-flight I/O). With --timeout 0 it does not wait at all.
    #[arg(long, short)]
    force: bool,

    /// The domain that runs the backend [default: this domain].
    #[arg(long, value_name = "DOMAIN")]
    backend_domain: Option<DomainRef>,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only the devices of this guest, a domid or a name (the same as --domain).
    #[arg(value_name = "DOMAIN")]
    domain_pos: Option<DomainRef>,

    /// Only the devices of this guest (a domid or a name).
    #[arg(long, value_name = "DOMAIN", conflicts_with = "domain_pos")]
    domain: Option<DomainRef>,

    /// Print a JSON array of objects instead of a table.
    #[arg(long)]
    json: bool,

    /// The backend domain whose devices to list [default: this domain].
    #[arg(long, value_name = "DOMAIN")]
    backend_domain: Option<DomainRef>,
}

fn parse_devid(s: &str) -> Result<u32, String> {
    xenvirtio_virtio::vdev::parse(s).ok_or_else(|| {
        format!("{s:?} is not a device: give a devid (0, 1, ...) or a vdev name (xvda, vdb, ...)")
    })
}

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    s.parse()
        .map_err(|e: xenvirtio_virtio::net::BadMac| e.to_string())
}

fn parse_console(s: &str) -> Result<ConsoleOutput, String> {
    s.parse().map_err(|e: admin::AdminError| e.to_string())
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} is not a duration of 0 seconds or more"))
}

fn install_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // One JSON object per line, the fields (domid, devid, ...) as keys: for journald
        // exporters and log shippers.
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line.
    Json,
}

fn connect(socket: Option<&PathBuf>) -> anyhow::Result<XsClient> {
    match socket {
        Some(path) => XsClient::connect_socket(path)
            .with_context(|| format!("cannot reach xenstore at {}", path.display())),
        None => XsClient::open().context("cannot reach xenstore (is this Dom0, with xenstored?)"),
    }
}

/// The name under which `frontend`'s devices are remembered, if they are: the device book is
/// the daemon's of this domain, so a device served by a driver domain is not remembered here.
fn book_name(
    store: &dyn XenStore,
    frontend: xenvirtio_xenstore::DomId,
    backend: Option<&DomainRef>,
) -> Result<String, String> {
    let own = admin::own_domid(store).map_err(|e| e.to_string())?;
    if let Some(b) = backend {
        if admin::resolve_domain(store, b).map_err(|e| e.to_string())? != own {
            return Err("it is served by a driver domain, whose daemon has its own book".into());
        }
    }
    match admin::domain_name(store, frontend) {
        Ok(Some(name)) => Ok(name),
        Ok(None) => Err(format!("domain {frontend} has no name")),
        Err(e) => Err(e.to_string()),
    }
}

fn run_attach(store: &dyn XenStore, args: AttachArgs, state_dir: &Path) -> anyhow::Result<()> {
    let image = args.image.or(args.image_pos);
    let kind = match (args.device_type, &image) {
        (Some(t), _) => t.into(),
        (None, Some(_)) => DeviceKind::Block,
        (None, None) => anyhow::bail!(
            "give the device type (--type blk|console|rng|net), or an image for a blk device \
             (attach DOMAIN IMAGE)"
        ),
    };
    let mut request = AttachRequest {
        frontend: args
            .domain
            .or(args.domain_pos)
            .context("give the guest: DOMAIN or --domain DOMAIN")?,
        backend: args.backend_domain,
        kind,
        image,
        readonly: args.readonly,
        devid: args.devid.or(args.vdev_pos),
        queues: args.queues,
        dma: args.dma.into(),
        console: args.console,
        force_share: args.force_share,
        net: admin::NetOptions {
            mac: args.mac,
            bridge: args.bridge,
            mtu: args.mtu,
            vifname: args.vifname,
            socket: args.socket,
        },
    };
    if kind == DeviceKind::Net && request.net.mac.is_none() {
        // Drawn here, so that the book remembers the address the guest got.
        request.net.mac = Some(admin::random_mac());
    }
    let out = admin::attach(store, &request)?;
    if !args.transient {
        let remembered =
            book_name(store, out.frontend, request.backend.as_ref()).and_then(|name| {
                admin::DeviceBook::new(state_dir)
                    .record(&name, admin::BookEntry::of(&request, out.devid))
                    .map_err(|e| e.to_string())
            });
        if let Err(why) = remembered {
            eprintln!(
                "warning: device {} of domain {} is attached but not remembered ({why}): a \
                 domain created again will not get it back",
                out.devid, out.frontend
            );
        }
    }
    if args.quiet {
        println!("{}", out.devid);
    } else {
        println!("devid: {}", out.devid);
        if out.kind == DeviceKind::Block {
            println!("vdev: {}", xenvirtio_virtio::vdev::name(out.devid));
        }
        println!("backend: {}", out.backend_dir);
        println!("frontend: {}", out.frontend_dir);
    }
    Ok(())
}

fn run_detach(store: &dyn XenStore, args: DetachArgs, state_dir: &Path) -> anyhow::Result<()> {
    let request = DetachRequest {
        frontend: args
            .domain
            .or(args.domain_pos)
            .context("give the guest: DOMAIN or --domain DOMAIN")?,
        backend: args.backend_domain,
        devid: args
            .devid
            .or(args.devid_pos)
            .context("give the device: DEVID|VDEV or --devid N|VDEV")?,
        timeout: args.timeout,
        force: args.force,
    };
    // Forgotten first, so that a daemon restoring devices meanwhile does not attach it again;
    // remembered again if the detach fails.
    let book = admin::DeviceBook::new(state_dir);
    let frontend = admin::domid_of(store, &request.frontend).ok();
    let name = frontend.and_then(|f| book_name(store, f, request.backend.as_ref()).ok());
    let forgotten = name.as_deref().and_then(|n| {
        let entry = book
            .entries(n)
            .ok()?
            .into_iter()
            .find(|e| e.devid == request.devid)?;
        book.forget(n, request.devid).ok()?.then_some((n, entry))
    });
    let out = match admin::detach(store, &request) {
        Ok(out) => out,
        Err(e) => {
            if let Some((n, entry)) = forgotten {
                let _ = book.record(n, entry);
            }
            return Err(e.into());
        }
    };
    let what = format!("virtio device {} of domain {}", out.devid, out.frontend);
    match &out.removal {
        Removal::Forced { last, timeout } => eprintln!(
            "warning: the backend did not reach Closed within {}s (state: {last}); \
             removed {what} anyway (--force)",
            timeout.as_secs_f64()
        ),
        Removal::RemovedMeanwhile => {
            eprintln!("note: the backend directory of {what} was removed by someone else")
        }
        Removal::OrphanFrontend => {
            eprintln!("note: only the frontend directory of {what} was left; removed it")
        }
        Removal::Immediate { .. } | Removal::Closed { .. } => {}
    }
    println!("detached {what}");
    Ok(())
}

fn run_list(store: &dyn XenStore, args: ListArgs) -> anyhow::Result<()> {
    let backend = match &args.backend_domain {
        Some(b) => admin::resolve_domain(store, b)?,
        None => admin::own_domid(store)?,
    };
    let frontend = args
        .domain
        .or(args.domain_pos)
        .as_ref()
        .map(|d| admin::domid_of(store, d))
        .transpose()?;
    let entries = admin::list(store, backend, frontend)?;
    if let Some(f) = frontend {
        // A domid that names no domain and no device here is a mistake, not an empty list.
        if entries.is_empty() && admin::resolve_domain(store, &DomainRef::Id(f)).is_err() {
            return Err(admin::AdminError::UnknownDomain { domid: f }.into());
        }
    }
    if args.json {
        let json = serde_json::to_string_pretty(&entries).context("encoding the list as JSON")?;
        println!("{json}");
    } else {
        print!("{}", admin::render_table(&entries));
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let xenstore = cli.xenstore.as_ref();
    match cli.command {
        Command::Attach(args) => run_attach(&connect(xenstore)?, args, &cli.state_dir),
        Command::Detach(args) => run_detach(&connect(xenstore)?, args, &cli.state_dir),
        Command::List(args) => run_list(&connect(xenstore)?, args),
        Command::Serve(mut args) => {
            args.xenstore = xenstore.cloned();
            args.state_dir = Some(cli.state_dir.clone());
            xenvirtio_backend::daemon::run(&args)
        }
        Command::Stats(args) => xenvirtio_backend::daemon::stats(&args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    install_tracing(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // docs/OPERATING.md, "Exit codes": 2 for a command that could not do what was asked.
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_parse() {
        assert_eq!(parse_seconds("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_seconds("0.25").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_seconds("0").unwrap(), Duration::ZERO);
        for bad in ["-1", "soon", "NaN", "inf", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
