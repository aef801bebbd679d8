//! A net device over the loopback pair with both TAPs real: the daemon's in this network
//! namespace on the bridge BRIDGE, the guest's (the frontend's TAP relay) named IFNAME. Runs until
//! killed, printing both counters every 2 s. Needs root. For trying the net path on a host:
//! move IFNAME into another namespace and send traffic across.
//!
//!   cargo run -p xenvirtio-loopback --example net_relay -- BRIDGE IFNAME [grant|bounce|direct]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use xenvirtio_backend::admin::{AttachRequest, NetOptions};
use xenvirtio_backend::daemon::{DaemonConfig, DomainSelector};
use xenvirtio_frontend::ConnectOptions;
use xenvirtio_frontend::net::tap_relay::TapRelay;
use xenvirtio_loopback::pair::Pair;
use xenvirtio_loopback::role::RoleName;
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xen::loopback::LoopbackConfig;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (bridge, ifname) = match args.as_slice() {
        [b, i, ..] => (b.clone(), i.clone()),
        _ => anyhow::bail!("usage: net_relay BRIDGE IFNAME [grant|bounce|direct]"),
    };
    let dma = match args.get(2).map(String::as_str) {
        Some("bounce") => Some(DmaStrategy::Bounce),
        Some("direct") => Some(DmaStrategy::Direct),
        Some("grant") | None => Some(DmaStrategy::Grant),
        Some(o) => anyhow::bail!("unknown strategy {o}"),
    };
    let role = RoleName::X86Pvh;
    let config = DaemonConfig {
        allow_direct: vec![DomainSelector::Id(role.domid())],
        ..DaemonConfig::default()
    };
    let pair = Pair::start(LoopbackConfig::default(), config)?;
    pair.add_guest(role.domid(), "guest1")?;
    let mut req = AttachRequest::new(role.domid(), DeviceKind::Net);
    req.net = NetOptions {
        mac: Some("00:16:3e:00:01:03".parse()?),
        bridge: Some(bridge),
        ..NetOptions::default()
    };
    let devid = pair.attach(&req)?.devid;
    let fe = pair.frontend(role.role())?;
    let opts = ConnectOptions {
        dma,
        ..ConnectOptions::default()
    };
    let dev = Arc::new(fe.connect_net(devid, &opts)?);
    let stop = Arc::new(AtomicBool::new(false));
    let relay = TapRelay::start(Arc::clone(&dev), &ifname, Arc::clone(&stop))?;
    println!(
        "net_relay: {} up ({} DMA); the daemon's TAP is on the bridge",
        relay.name(),
        dev.negotiated().strategy.name()
    );
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let c = dev.counters();
        let s = pair.device_stats(role.domid(), devid);
        println!(
            "driver rx {} tx {} dropped {} | daemon {:?}",
            c.rx_frames.load(Ordering::Relaxed),
            c.tx_frames.load(Ordering::Relaxed),
            c.dropped.load(Ordering::Relaxed),
            s.map(|s| (
                s.requests,
                s.bytes_read,
                s.bytes_written,
                s.dropped,
                s.state
            ))
        );
        if let Some(why) = dev.stopped() {
            println!("stopped: {why}");
            break;
        }
    }
    relay.stop();
    Ok(())
}
