//! Target `handshake`: the xenstore keys each side reads from the other at connect.
//!
//! Three parsers, over the in-memory store holding whatever the input writes:
//! - the backend's [`read_frontend_setup`] over the frontend directory (a frontend that lies
//!   in `driver-features`, `dma`, `num-queues`, queue sizes, ring lists, event channels,
//!   `feature-persistent`, the bounce pool);
//! - the backend's [`read_toolstack_config`] over the backend directory;
//! - the frontend's [`Frontend::read_offer`] over the backend directory (a backend that lies
//!   in `device-features`, `max-queues`, `max-queue-size`, `dma`, `config`).
//!
//! Values are mostly near-valid (numbers, hex, lists of refs or frames, strategy names) and
//! sometimes raw bytes. Checked: nothing panics, and whatever is accepted obeys
//! `docs/PROTOCOL.md` sections 2, 10 and 11, and is what the keys say (an independent
//! re-reading of each accepted value).

use std::sync::Arc;

use xenvirtio_backend::handshake::{
    ConsoleTarget, DirectTrust, DmaPin, Offer, RingLocation, ToolstackConfig, read_frontend_setup,
    read_toolstack_config,
};
use xenvirtio_frontend::Frontend;
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::features::{bit, has, transport};
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::protocol::{
    MAX_BOUNCE_PAGES, MAX_QUEUE_SIZE, MAX_QUEUES, decode_hex, directory_pages,
};
use xenvirtio_xen::loopback::LoopbackXen;
use xenvirtio_xen::role::{Arch, DomainRole, GuestType, XenVersion};
use xenvirtio_xenstore::xenbus;
use xenvirtio_xenstore::{MemStore, TxId, XenStore};

use crate::input::{Reader, Structured, Writer};

const FRONT: u16 = 5;

/// Which parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `read_frontend_setup`.
    FrontendSetup,
    /// `read_toolstack_config`.
    Toolstack,
    /// `Frontend::read_offer`.
    Offer,
}

/// A value to write, built from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Decimal.
    Dec(u32),
    /// `0x` hex.
    Hex(u64),
    /// `count` decimal numbers from `base`, space-separated.
    DecList(u16, u32),
    /// `count` hex numbers from `base`, space-separated.
    HexList(u16, u64),
    /// One of a few words the parsers know (strategy names, modes, types, ...).
    Word(u8),
    /// Hex of `n` bytes (a config space).
    HexBytes(Vec<u8>),
    /// Raw bytes.
    Raw(Vec<u8>),
}

const WORDS: [&str; 16] = [
    "grant",
    "bounce",
    "direct",
    "auto",
    "r",
    "w",
    "pty",
    "socket:/tmp/console.sock",
    "socket:",
    "virtio,device2",
    "virtio,device3",
    "virtio,device4",
    "virtio,device1",
    "xenbus",
    "/local/domain/5/device/virtio/0",
    "",
];

/// The keys a parser may read, relative to its directory.
const KEYS: [&str; 31] = [
    // The frontend directory.
    "driver-features",
    "dma",
    "num-queues",
    "feature-persistent",
    "bounce/pages",
    "bounce/dir-ref",
    "queue-0/size",
    "queue-0/ring-ref",
    "queue-0/ring-gfn",
    "queue-0/event-channel",
    "queue-1/size",
    "queue-1/ring-ref",
    "queue-1/ring-gfn",
    "queue-1/event-channel",
    // The backend directory (toolstack and offer).
    "frontend",
    "frontend-id",
    "type",
    "transport",
    "grant_usage",
    "mode",
    "params",
    "console",
    "requested-queues",
    "device-features",
    "max-queues",
    "max-queue-size",
    "max-persistent-grants",
    "config",
    "config-generation",
    "queue-2/size",
    "queue-2/ring-ref",
];

/// One fuzz input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeInput {
    /// Which parser (`% 3`).
    pub side: u8,
    /// The device (`% 3`: blk, console, rng).
    pub kind: u8,
    /// What the backend offered: extra feature bits (transport bits are always offered).
    pub offered: u64,
    /// `max-queues` offered (`1 + n % 16`).
    pub max_queues: u8,
    /// `max-queue-size` offered (`1 << (n % 11)`).
    pub max_queue_size_log2: u8,
    /// `max-persistent-grants` offered.
    pub max_persistent: u16,
    /// `grant_usage` of the toolstack.
    pub grant_usage: bool,
    /// The toolstack's pin (`% 4`: auto, grant, bounce, direct).
    pub pin: u8,
    /// Bit 0: the backend is Dom0; bit 1: the operator allows direct.
    pub trust: u8,
    /// The keys written: (index into the key list, value).
    pub keys: Vec<(u8, Value)>,
}

fn read_value(r: &mut Reader<'_>) -> Value {
    match r.choice(7) {
        0 => Value::Dec(r.u32()),
        1 => Value::Hex(r.u64()),
        2 => Value::DecList(r.u16(), r.u32()),
        3 => Value::HexList(r.u16(), r.u64()),
        4 => Value::Word(r.u8()),
        5 => Value::HexBytes(r.bytes(96)),
        _ => Value::Raw(r.bytes(64)),
    }
}

fn write_value(w: &mut Writer, v: &Value) {
    match v {
        Value::Dec(n) => {
            w.choice(0, 7);
            w.u32(*n);
        }
        Value::Hex(n) => {
            w.choice(1, 7);
            w.u64(*n);
        }
        Value::DecList(c, b) => {
            w.choice(2, 7);
            w.u16(*c);
            w.u32(*b);
        }
        Value::HexList(c, b) => {
            w.choice(3, 7);
            w.u16(*c);
            w.u64(*b);
        }
        Value::Word(i) => {
            w.choice(4, 7);
            w.u8(*i);
        }
        Value::HexBytes(b) => {
            w.choice(5, 7);
            w.bytes(b, 96);
        }
        Value::Raw(b) => {
            w.choice(6, 7);
            w.bytes(b, 64);
        }
    }
}

impl Structured for HandshakeInput {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            side: r.u8(),
            kind: r.u8(),
            offered: r.u64(),
            max_queues: r.u8(),
            max_queue_size_log2: r.u8(),
            max_persistent: r.u16(),
            grant_usage: r.bool(),
            pin: r.u8(),
            trust: r.u8(),
            keys: r.list(24, |r| (r.u8(), read_value(r))),
        }
    }

    fn write(&self, w: &mut Writer) {
        w.u8(self.side);
        w.u8(self.kind);
        w.u64(self.offered);
        w.u8(self.max_queues);
        w.u8(self.max_queue_size_log2);
        w.u16(self.max_persistent);
        w.bool(self.grant_usage);
        w.u8(self.pin);
        w.u8(self.trust);
        w.list(&self.keys, 24, |w, (k, v)| {
            w.u8(*k);
            write_value(w, v);
        });
    }
}

crate::structured_input!(HandshakeInput);

impl Value {
    fn bytes(&self) -> Vec<u8> {
        let list = |count: u16, f: &dyn Fn(u64) -> String| -> Vec<u8> {
            // Up to 20 entries: enough for every list the protocol defines (and one more).
            (0..u64::from(count % 21))
                .map(f)
                .collect::<Vec<_>>()
                .join(" ")
                .into_bytes()
        };
        match self {
            Value::Dec(n) => n.to_string().into_bytes(),
            Value::Hex(n) => format!("{n:#x}").into_bytes(),
            Value::DecList(c, b) => list(*c, &|i| (u64::from(*b) + i).to_string()),
            Value::HexList(c, b) => list(*c, &|i| format!("{:#x}", b.wrapping_add(i))),
            Value::Word(i) => WORDS[usize::from(*i) % WORDS.len()].as_bytes().to_vec(),
            Value::HexBytes(b) => xenvirtio_virtio::protocol::encode_hex(b).into_bytes(),
            Value::Raw(b) => b.clone(),
        }
    }
}

fn kind(input: &HandshakeInput) -> DeviceKind {
    [DeviceKind::Block, DeviceKind::Console, DeviceKind::Rng][usize::from(input.kind % 3)]
}

/// Runs one input.
pub fn run(input: &HandshakeInput) {
    accepted(input);
}

/// Runs one input; returns whether the parser accepted the keys.
pub fn accepted(input: &HandshakeInput) -> bool {
    let store = MemStore::new();
    let dom0 = store.connect(0).expect("dom0");
    let fdir = xenbus::frontend_dir(FRONT, 0);
    let bdir = xenbus::backend_dir(0, FRONT, 0);
    let dir = match input.side % 3 {
        0 => &fdir,
        _ => &bdir,
    };
    for (k, v) in &input.keys {
        let path = format!("{dir}/{}", KEYS[usize::from(*k) % KEYS.len()]);
        // Values over the store's limits are refused by the store, as by xenstored.
        let _ = dom0.write(TxId::NONE, &path, &v.bytes());
    }
    match input.side % 3 {
        0 => frontend_setup(input, &dom0, &fdir),
        1 => toolstack(&dom0, &bdir),
        _ => offer(&store, &bdir),
    }
}

fn frontend_setup(input: &HandshakeInput, store: &dyn XenStore, fdir: &str) -> bool {
    let kind = kind(input);
    let pin = match input.pin % 4 {
        0 => DmaPin::Auto,
        n => DmaPin::Only(DmaStrategy::ALL[usize::from(n - 1)]),
    };
    let toolstack = ToolstackConfig {
        kind,
        grant_usage: input.grant_usage,
        dma: pin,
        image: None,
        read_only: false,
        force_share: false,
        console: ConsoleTarget::Pty,
        net: None,
        queues: 1 + u32::from(input.max_queues % 16),
    };
    let trust = DirectTrust {
        backend_is_dom0: input.trust & 1 != 0,
        operator_allows: input.trust & 2 != 0,
    };
    let offer = Offer::new(
        &toolstack,
        trust,
        input.offered & !(bit(transport::ACCESS_PLATFORM)),
        vec![],
        1 << (input.max_queue_size_log2 % 11),
        u32::from(input.max_persistent),
    );
    let Ok(setup) = read_frontend_setup(store, fdir, &offer, &toolstack, trust) else {
        return false;
    };
    let key = |k: &str| format!("{fdir}/{k}");
    // Section 11, at connect.
    let f = setup.features;
    assert_eq!(f & !offer.features, 0, "features not offered were accepted");
    assert!(has(f, transport::VERSION_1), "VERSION_1 is required");
    if has(offer.features, transport::ACCESS_PLATFORM) {
        assert!(
            has(f, transport::ACCESS_PLATFORM),
            "ACCESS_PLATFORM offered but not taken"
        );
    }
    assert_eq!(
        xenbus::read_hex_u64(store, TxId::NONE, &key("driver-features")).ok(),
        Some(f)
    );
    let dma = store
        .read_string(TxId::NONE, &key("dma"))
        .expect("dma was read");
    assert_eq!(
        dma.trim(),
        setup.strategy.name(),
        "the strategy is what dma says"
    );
    assert!(
        pin.allows(setup.strategy),
        "{} accepted against the pin",
        setup.strategy
    );
    if setup.strategy == DmaStrategy::Direct {
        assert!(
            trust.backend_is_dom0
                && trust.operator_allows
                && !toolstack.grant_usage
                && !has(offer.features, transport::ACCESS_PLATFORM),
            "direct accepted without the trust of section 10.5"
        );
        assert!(
            !offer.grant_usage,
            "direct under an effective grant_usage of 1"
        );
    }
    let n = setup.queues.len() as u32;
    assert!((1..=offer.max_queues).contains(&n) && n <= MAX_QUEUES);
    if kind == DeviceKind::Console {
        assert_eq!(n, 2, "a console has two queues");
    }
    for (q, setup_q) in setup.queues.iter().enumerate() {
        let size = u32::from(setup_q.layout.size());
        assert!(size.is_power_of_two() && size <= offer.max_queue_size && size <= MAX_QUEUE_SIZE);
        let pages = match &setup_q.ring {
            RingLocation::Grants(r) => {
                assert_ne!(setup.strategy, DmaStrategy::Direct);
                r.len()
            }
            RingLocation::Frames(g) => {
                assert_eq!(setup.strategy, DmaStrategy::Direct);
                g.len()
            }
        };
        assert_eq!(pages, setup_q.layout.pages(), "queue {q}: ring pages");
        assert_eq!(
            xenbus::read_u32(store, TxId::NONE, &key(&format!("queue-{q}/event-channel"))).ok(),
            Some(setup_q.event_channel)
        );
    }
    if setup.persistent {
        assert_eq!(setup.strategy, DmaStrategy::Grant);
        assert!(offer.max_persistent_grants > 0);
    }
    match &setup.bounce {
        Some(pool) => {
            assert_eq!(setup.strategy, DmaStrategy::Bounce);
            assert!((1..=MAX_BOUNCE_PAGES).contains(&pool.pages));
            assert_eq!(pool.dir_refs.len(), directory_pages(pool.pages as usize));
        }
        None => assert_ne!(setup.strategy, DmaStrategy::Bounce),
    }
    true
}

fn toolstack(store: &dyn XenStore, bdir: &str) -> bool {
    let Ok(config) = read_toolstack_config(store, bdir, FRONT, 0) else {
        return false;
    };
    let ty = store
        .read_string(TxId::NONE, &format!("{bdir}/type"))
        .expect("type was read");
    assert_eq!(
        DeviceKind::parse_type_string(ty.trim()),
        Some(config.kind.device_id()),
        "the device is what type says"
    );
    assert!((1..=MAX_QUEUES).contains(&config.queues));
    match config.kind {
        DeviceKind::Block => assert!(config.image.is_some(), "blk without an image"),
        DeviceKind::Console => assert_eq!(config.queues, 2),
        DeviceKind::Rng => assert_eq!(config.queues, 1),
        DeviceKind::Net => {
            assert_eq!(config.queues, 2);
            let net = config.net.as_ref().expect("a net device has its target");
            assert!(
                !net.mac.is_multicast() && !net.mac.is_zero(),
                "a NIC's MAC is unicast"
            );
            assert!((68..=9000).contains(&net.mtu));
        }
    }
    if let ConsoleTarget::Socket(p) = &config.console {
        assert!(!p.as_os_str().is_empty());
    }
    true
}

fn offer(store: &MemStore, bdir: &str) -> bool {
    let hv = LoopbackXen::new();
    let role = DomainRole {
        domid: FRONT,
        is_dom0: false,
        guest_type: GuestType::Pvh,
        arch: Arch::X86_64,
        xen_version: XenVersion {
            major: 4,
            minor: 17,
            extra: ".0".into(),
        },
    };
    let conn = store.connect(0).expect("dom0");
    let frontend = Frontend::new(hv.domain(FRONT), Arc::new(conn), role);
    let Ok(offer) = frontend.read_offer(0, bdir) else {
        return false;
    };
    let conn = store.connect(0).expect("dom0");
    let key = |k: &str| format!("{bdir}/{k}");
    assert!((1..=MAX_QUEUES).contains(&offer.max_queues));
    assert!(
        offer.max_queue_size.is_power_of_two() && offer.max_queue_size <= MAX_QUEUE_SIZE,
        "max-queue-size {}",
        offer.max_queue_size
    );
    assert_eq!(
        xenbus::read_hex_u64(&conn, TxId::NONE, &key("device-features")).ok(),
        Some(offer.device_features)
    );
    let config = conn
        .read_optional(TxId::NONE, &key("config"))
        .expect("config was read")
        .unwrap_or_default();
    assert_eq!(
        decode_hex(&String::from_utf8_lossy(&config)).ok(),
        Some(offer.config.clone()),
        "config is the hex the key holds"
    );
    if let Some(p) = offer.pinned {
        let dma = conn
            .read_string(TxId::NONE, &key("dma"))
            .expect("dma was read");
        assert_eq!(dma.trim(), p.name());
    }
    true
}

/// Seeds: the handshake unit tests' keys (`backend/src/handshake.rs`, `frontend/src/transport.rs`).
pub fn seeds() -> Vec<(&'static str, HandshakeInput)> {
    let key = |name: &str| KEYS.iter().position(|k| *k == name).expect("a known key") as u8;
    let word =
        |w: &str| Value::Word(WORDS.iter().position(|x| *x == w).expect("a known word") as u8);
    let base = |side, kind, keys| HandshakeInput {
        side,
        kind,
        offered: 0,
        max_queues: 3,
        max_queue_size_log2: 8,
        max_persistent: 256,
        grant_usage: true,
        pin: 0,
        trust: 0,
        keys,
    };
    let features = bit(transport::VERSION_1)
        | bit(transport::ACCESS_PLATFORM)
        | bit(transport::RING_EVENT_IDX);
    let grant_blk = base(
        0,
        0,
        vec![
            (key("driver-features"), Value::Hex(features)),
            (key("dma"), word("grant")),
            (key("num-queues"), Value::Dec(1)),
            (key("queue-0/size"), Value::Dec(256)),
            (key("queue-0/ring-ref"), Value::DecList(2, 8)),
            (key("queue-0/event-channel"), Value::Dec(11)),
            (key("feature-persistent"), Value::Dec(1)),
        ],
    );
    let bounce_console = base(
        0,
        1,
        vec![
            (key("driver-features"), Value::Hex(features)),
            (key("dma"), word("bounce")),
            (key("num-queues"), Value::Dec(2)),
            (key("queue-0/size"), Value::Dec(16)),
            (key("queue-0/ring-ref"), Value::DecList(1, 8)),
            (key("queue-0/event-channel"), Value::Dec(11)),
            (key("queue-1/size"), Value::Dec(16)),
            (key("queue-1/ring-ref"), Value::DecList(1, 9)),
            (key("queue-1/event-channel"), Value::Dec(12)),
            (key("bounce/pages"), Value::Dec(1500)),
            (key("bounce/dir-ref"), Value::DecList(2, 100)),
        ],
    );
    let mut direct = base(
        0,
        2,
        vec![
            (
                key("driver-features"),
                Value::Hex(bit(transport::VERSION_1)),
            ),
            (key("dma"), word("direct")),
            (key("num-queues"), Value::Dec(1)),
            (key("queue-0/size"), Value::Dec(64)),
            (key("queue-0/ring-gfn"), Value::HexList(1, 0x40000)),
            (key("queue-0/event-channel"), Value::Dec(3)),
        ],
    );
    direct.grant_usage = false;
    direct.trust = 3;
    let toolstack_blk = base(
        1,
        0,
        vec![
            (key("frontend"), word("/local/domain/5/device/virtio/0")),
            (key("frontend-id"), Value::Dec(5)),
            (key("type"), word("virtio,device2")),
            (key("transport"), word("xenbus")),
            (key("grant_usage"), Value::Dec(0)),
            (key("mode"), word("r")),
            (key("params"), Value::Raw(b"/srv/disk.img".to_vec())),
            (key("requested-queues"), Value::Dec(4)),
        ],
    );
    let toolstack_console = base(
        1,
        1,
        vec![
            (key("type"), word("virtio,device3")),
            (key("console"), word("socket:/tmp/console.sock")),
        ],
    );
    let offer = base(
        2,
        0,
        vec![
            (key("device-features"), Value::Hex(features | 1 << 9)),
            (key("max-queues"), Value::Dec(4)),
            (key("max-queue-size"), Value::Dec(256)),
            (key("feature-persistent"), Value::Dec(1)),
            (key("dma"), word("auto")),
            (key("config"), Value::HexBytes((0..72).collect())),
            (key("config-generation"), Value::Dec(3)),
        ],
    );
    vec![
        ("grant_blk", grant_blk),
        ("bounce_console", bounce_console),
        ("direct_rng", direct),
        ("toolstack_blk", toolstack_blk),
        ("toolstack_console", toolstack_console),
        ("offer", offer),
    ]
}

#[cfg(test)]
mod tests {
    /// The seeds reach the checks: every one is accepted (the checks of an accepted setup are
    /// the point of the target).
    #[test]
    fn every_seed_is_accepted() {
        for (name, input) in super::seeds() {
            assert!(super::accepted(&input), "seed {name} was refused");
        }
    }
}
