//! `serve`'s blk devices: each one kept connected ([`SupervisedBlk`]), exported over NBD, and
//! given to this domain's kernel as a block device when asked (kernel NBD or VDUSE). A device
//! that was detached for good is taken away from the kernel and its export closed, so that a
//! filesystem mounted on it sees the disk go, instead of requests that wait for ever.
#![allow(clippy::wildcard_imports)]

use xenvirtio_frontend::supervisor::Waits;

use crate::*;

/// Which kernel block device `serve` gives each blk device.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KernelPath {
    /// None: the NBD export only.
    None,
    /// A kernel NBD device: the first free one, or this one, through this interface.
    Nbd(Option<u32>, NbdInterface),
    /// A VDUSE virtio-blk device, bound by the kernel's own virtio_blk.
    Vduse,
}

/// One blk device as `serve` serves it.
pub(crate) struct ServedBlk {
    devid: u32,
    dev: Arc<SupervisedBlk<LinuxXen>>,
    server: NbdServer,
    kernel: Option<KernelNbd>,
    vduse: Option<VduseBlk>,
}

impl ServedBlk {
    /// Connects blk device `devid`, exports it on `socket` (and `tcp`), and gives it to the
    /// kernel by `path`.
    pub(crate) fn start(
        frontend: Frontend<LinuxXen>,
        devid: u32,
        options: BlkOptions,
        waits: Waits,
        socket: &Path,
        tcp: Option<u16>,
        path: KernelPath,
    ) -> Result<Self> {
        // Kept connected: a backend restart or a re-attach is a pause, not an error.
        let dev = Arc::new(
            SupervisedBlk::connect_with(frontend, devid, options, waits)
                .with_context(|| format!("cannot connect blk device {devid}"))?,
        );
        if let Some(c) = dev.current() {
            describe_blk(devid, &c);
        }
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let mut config = NbdServerConfig::new(xenvirtio_virtio::vdev::name(devid)).unix(socket);
        if let Some(port) = tcp {
            config = config.tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        }
        let export: Arc<dyn BlockExport> = Arc::clone(&dev) as Arc<dyn BlockExport>;
        let server = NbdServer::start(export, config)
            .with_context(|| format!("cannot start the NBD export of device {devid}"))?;
        println!(
            "device {devid}: NBD export {:?} on unix socket {}{}",
            server.export_name(),
            socket.display(),
            server
                .tcp_addr()
                .map(|a| format!(" and tcp {a}"))
                .unwrap_or_default()
        );
        let (kernel, vduse) = match path {
            KernelPath::None => (None, None),
            KernelPath::Nbd(index, interface) => {
                // One connection (a kernel hardware queue) per virtqueue.
                let connections = dev.current().map_or(1, |c| c.num_queues());
                let k = connect_kernel_nbd(
                    devid,
                    socket,
                    server.export_name(),
                    (index, interface),
                    connections,
                )?;
                (Some(k), None)
            }
            KernelPath::Vduse => (None, Some(start_vduse(devid, &dev)?)),
        };
        Ok(Self {
            devid,
            dev,
            server,
            kernel,
            vduse,
        })
    }

    /// The device number.
    pub(crate) fn devid(&self) -> u32 {
        self.devid
    }

    /// Why the device was given up, once it was detached for good.
    pub(crate) fn detached(&self) -> Option<String> {
        self.dev.detached()
    }

    /// Takes the device from the kernel first (so that it stops sending), then closes the
    /// export and the device.
    pub(crate) fn close(self) -> Result<()> {
        let devid = self.devid;
        if let Some(v) = self.vduse {
            let node = v.node().map(|p| p.display().to_string());
            v.stop()
                .with_context(|| format!("cannot remove the VDUSE device of device {devid}"))?;
            println!(
                "device {devid}: {} removed",
                node.unwrap_or_else(|| "the VDUSE device".into())
            );
        }
        if let Some(k) = self.kernel {
            let device = k.device();
            println!("device {devid}: disconnecting {}", device.display());
            k.disconnect().with_context(|| {
                format!("cannot disconnect {} of device {devid}", device.display())
            })?;
            println!("device {devid}: {} disconnected", device.display());
        }
        self.server.shutdown();
        println!("device {devid}: NBD export closed");
        Arc::try_unwrap(self.dev)
            .map_err(|_| anyhow!("blk device {devid} is still in use"))?
            .close()
            .map_err(Into::into)
    }
}

/// Gives blk device `devid` to this domain's kernel as a VDUSE virtio-blk disk and says which.
fn start_vduse(devid: u32, dev: &Arc<SupervisedBlk<LinuxXen>>) -> Result<VduseBlk> {
    let vdev = xenvirtio_virtio::vdev::name(devid);
    let name = format!("xenvirtio-{vdev}");
    let queues = dev.current().map_or(1, |c| c.num_queues());
    let export: Arc<dyn BlockExport> = Arc::clone(dev) as Arc<dyn BlockExport>;
    let v = VduseBlk::start(export, &name, &vdev, u32::try_from(queues).unwrap_or(1))
        .with_context(|| format!("cannot give device {devid} to the kernel through VDUSE"))?;
    println!(
        "device {devid}: kernel block device {} (VDUSE virtio-blk {name}, {} queue(s))",
        v.node().map_or_else(
            || "(no /dev node found)".to_string(),
            |p| p.display().to_string()
        ),
        v.queues()
    );
    Ok(v)
}

/// Connects blk device `devid`'s export on `socket` to a kernel NBD device and says which.
fn connect_kernel_nbd(
    devid: u32,
    socket: &Path,
    export: &str,
    (index, interface): (Option<u32>, NbdInterface),
    connections: usize,
) -> Result<KernelNbd> {
    let config = KernelNbdConfig {
        index,
        interface,
        connections: connections.max(1),
        ..KernelNbdConfig::new(export)
    };
    let address = NbdAddress::Unix(socket.to_path_buf());
    let k = KernelNbd::connect(&address, export, &config)
        .with_context(|| format!("cannot give blk device {devid} to the kernel over NBD"))?;
    let ready = k.wait_ready(Duration::from_secs(5));
    println!(
        "device {devid}: kernel block device {} (NBD {}, {} connection{}{}){}",
        k.device().display(),
        k.interface(),
        connections.max(1),
        if connections > 1 { "s" } else { "" },
        if k.reconfigured() {
            ", reconfigured: it was connected before"
        } else {
            ""
        },
        if ready {
            ""
        } else {
            "; sysfs does not show its size yet"
        }
    );
    Ok(k)
}
