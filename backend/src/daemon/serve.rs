//! `xenvirtio-backend serve`: its options, and the real daemon over the Linux Xen devices and
//! xenstored.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use xenvirtio_xen::DomId;
use xenvirtio_xen::platform::Platform;
use xenvirtio_xenstore::xenbus;
use xenvirtio_xenstore::{TxId, XenStore};

use super::{
    DEFAULT_CONTROL_SOCKET, Daemon, DaemonConfig, DomainSelector, RESTART_TIMEOUT, SHUTDOWN_GRACE,
};

/// Options of `xenvirtio-backend serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Unix socket on which the daemon answers `xenvirtio-backend stats` (created mode 0600,
    /// its folder created if missing).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,

    /// Trust this frontend domain (a domid or a domain name) with the `direct` DMA strategy,
    /// which lets the backend map any page of it. Repeat for several domains. `direct` is
    /// also refused unless this backend is Dom0 and the device has `grant_usage = 0`
    /// (attach --dma direct).
    #[arg(long = "allow-direct", value_name = "DOMAIN")]
    pub allow_direct: Vec<DomainSelector>,

    /// Largest queue size offered to frontends (`max-queue-size`): a power of two up to
    /// 1024. blk's `seg_max` is this minus 2.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_queue_size: u32,

    /// Grants of a persistent arena kept mapped per device (`max-persistent-grants`); beyond
    /// this, buffers are mapped per request. 0 turns persistent grants off.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_persistent_grants: u32,

    /// Grant-mapped pages all devices of one frontend domain may hold at once: rings, bounce
    /// pools and their directories, persistent and per-request grants. Mappings are
    /// refused before the map call once a domain holds this many (a connect that needs more
    /// is refused with an `error` node; a request, with a protocol error). The default, 1024
    /// (4 MiB), keeps 100 guests within Dom0's default maptrack table (about 256K entries)
    /// next to blkback and netback; see docs/OPERATING.md. Published to frontends as
    /// `max-pages-per-domain`, and less 16 as `max-bounce-pages`.
    #[arg(long, value_name = "PAGES", default_value_t = crate::budget::DEFAULT_MAX_PAGES_PER_DOMAIN)]
    pub max_pages_per_domain: u64,

    /// This backend's domain id. By default it is read from xenstore (`domid` in the domain's
    /// home, which Xen's init writes for Dom0).
    #[arg(long, value_name = "DOMID")]
    pub domid: Option<DomId>,

    /// The xenstored socket: filled from the global `--xenstore` option.
    #[arg(skip)]
    pub xenstore: Option<PathBuf>,

    /// The state directory: filled from the global `--state-dir` option.
    #[arg(skip)]
    pub state_dir: Option<PathBuf>,

    /// Seconds a restarted backend waits for a frontend to answer the reset of a device an
    /// earlier instance was serving (PROTOCOL.md 8.5).
    #[arg(long, value_name = "SECONDS", default_value_t = RESTART_TIMEOUT.as_secs())]
    pub restart_timeout: u64,

    /// Seconds shutdown (SIGTERM, SIGINT) waits for connected frontends to close before it
    /// drops their mappings anyway.
    #[arg(long, value_name = "SECONDS", default_value_t = SHUTDOWN_GRACE.as_secs())]
    pub shutdown_grace: u64,
}

impl ServeArgs {
    /// The daemon configuration these options describe.
    pub fn config(&self) -> DaemonConfig {
        DaemonConfig {
            allow_direct: self.allow_direct.clone(),
            max_queue_size: self.max_queue_size,
            max_persistent_grants: self.max_persistent_grants,
            max_pages_per_domain: self.max_pages_per_domain,
            control_socket: Some(self.socket.clone()),
            restart_timeout: Duration::from_secs(self.restart_timeout),
            shutdown_grace: Duration::from_secs(self.shutdown_grace),
            state_dir: self.state_dir.clone(),
        }
    }
}

/// Opens, once, every Xen device the daemon will need: gntdev (grant maps and copies), evtchn,
/// and privcmd when some guest may use `direct`. So a daemon that cannot work fails at start
/// instead of publishing devices it cannot serve.
pub fn xen_devices_usable<P: Platform>(
    platform: &P,
    config: &DaemonConfig,
) -> Result<(), xenvirtio_xen::XenError> {
    drop(platform.grant_mapper()?);
    drop(platform.event_channels()?);
    if !config.allow_direct.is_empty() {
        drop(platform.foreign_mapper()?);
    }
    Ok(())
}

/// Runs the real daemon: the Linux Xen devices, xenstored, until SIGTERM or SIGINT.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // Before any thread exists (the xenstore client starts one), so that every thread
    // inherits the blocked signals and only the waiter thread receives them.
    let signals = xenvirtio_xen::signals::StopSignals::block()
        .context("blocking SIGINT and SIGTERM failed")?;
    let client = match &args.xenstore {
        Some(path) => xenvirtio_xenstore::XsClient::connect_socket(path)
            .with_context(|| format!("connecting to xenstored at {}", path.display()))?,
        None => xenvirtio_xenstore::XsClient::open().context("connecting to xenstored")?,
    };
    let store: Arc<dyn XenStore> = Arc::new(client);
    let domid = match args.domid {
        Some(d) => d,
        None => xenbus::read_u32(&*store, TxId::NONE, "domid")
            .ok()
            .and_then(|d| DomId::try_from(d).ok())
            .context("cannot read this domain's id from xenstore (key `domid`); pass --domid")?,
    };
    let platform = xenvirtio_xen::linux::LinuxXen::new(domid);
    let config = args.config();
    xen_devices_usable(&platform, &config).with_context(|| {
        format!(
            "cannot serve as domain {domid}: the Xen devices it needs cannot be opened (this \
             must run in Dom0 or a driver domain on Xen, as root); nothing was published"
        )
    })?;
    let daemon = Daemon::new(platform, store, config)?;
    let handle = daemon.handle();
    signals.spawn_waiter("xv-signals", move |signal| {
        tracing::info!(signal, "shutting down");
        let _ = xenvirtio_xen::service::notify("STOPPING=1");
        handle.stop();
    })?;
    // Xenstore is reached, the watches are set and the Xen devices open: a systemd
    // `Type=notify` unit is up (devices are taken as the first scan finds them).
    if let Err(e) = xenvirtio_xen::service::notify("READY=1\nSTATUS=serving") {
        tracing::warn!(error = %e, "cannot tell the service manager that the daemon is ready");
    }
    daemon.run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{DaemonError, StatsArgs};
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::path::Path;

    #[derive(Parser, Debug)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[derive(Parser, Debug)]
    struct Stats {
        #[command(flatten)]
        args: StatsArgs,
    }

    #[test]
    fn every_option_is_documented_and_parses() {
        Serve::command().debug_assert();
        Stats::command().debug_assert();
        let help = Serve::command().render_long_help().to_string();
        for opt in [
            "--socket",
            "--allow-direct",
            "--max-queue-size",
            "--max-persistent-grants",
            "--max-pages-per-domain",
            "--domid",
            "--restart-timeout",
            "--shutdown-grace",
        ] {
            let line = help
                .lines()
                .position(|l| l.trim_start().starts_with(opt))
                .unwrap_or_else(|| panic!("{opt} missing from --help:\n{help}"));
            let explained = help
                .lines()
                .nth(line + 1)
                .is_some_and(|l| !l.trim().is_empty());
            assert!(explained, "{opt} has no explanation:\n{help}");
        }
        let s = Serve::try_parse_from([
            "serve",
            "--allow-direct",
            "7",
            "--allow-direct",
            "web1",
            "--max-queue-size",
            "256",
        ])
        .unwrap();
        let c = s.args.config();
        assert_eq!(
            c.allow_direct,
            vec![DomainSelector::Id(7), DomainSelector::Name("web1".into())]
        );
        assert_eq!(c.max_queue_size, 256);
        assert_eq!(
            c.control_socket.as_deref(),
            Some(Path::new(DEFAULT_CONTROL_SOCKET))
        );
        let st = Stats::try_parse_from(["stats", "--json"]).unwrap();
        assert!(st.args.json);
        assert!(
            Stats::command()
                .render_long_help()
                .to_string()
                .contains("--json")
        );
    }

    #[test]
    fn a_bad_queue_size_is_refused_before_anything_starts() {
        let hv = xenvirtio_xen::loopback::LoopbackXen::new();
        let xs = xenvirtio_xenstore::MemStore::new();
        let store: Arc<dyn XenStore> = Arc::new(xs.connect(0).unwrap());
        let config = DaemonConfig {
            max_queue_size: 100,
            ..Default::default()
        };
        assert!(matches!(
            Daemon::new(hv.domain(0), store, config),
            Err(DaemonError::BadQueueSize(100))
        ));
    }
}
