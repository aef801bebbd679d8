//! A tiny scripted backend for the frontend's tests, written from `docs/PROTOCOL.md` alone
//! (the backend crate is never used here). It plays the toolstack (creates both directories),
//! publishes an offer, checks what the frontend publishes at Initialised, maps the rings (and
//! the pool) over the loopback platform, and serves blk (on an in-memory disk) and rng
//! requests, resolving every descriptor address by the strategy's rules. It also records
//! what it saw, so tests can assert on it.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xenvirtio_virtio::blk::{
    BlkConfig, DiscardWriteZeroes, ReqHeader, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH,
    T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};
use xenvirtio_virtio::features::{bit, blk as fb, transport as ft};
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::protocol::{PAGE_SIZE, decode_directory_page, encode_hex};
use xenvirtio_virtio::split::{Descriptor, RingLayout, UsedElem};
use xenvirtio_xen::loopback::{LoopbackDomain, LoopbackXen};
use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{EventChannels, ForeignMapper, GrantMapper, MappedPages, Platform};
use xenvirtio_xen::role::{Arch, DomainRole, GuestType, XenVersion};
use xenvirtio_xen::{Access, DomId};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{MemStore, Perm, TxId, XenStore, XsError, transaction};

pub const BACKEND: DomId = 0;
pub const GUEST: DomId = 5;

/// The environment: a store, a loopback hypervisor, connections for both domains.
pub struct Env {
    pub store: MemStore,
    pub xen: LoopbackXen,
    pub dom0: Arc<dyn XenStore>,
    pub guest: Arc<dyn XenStore>,
}

impl Env {
    pub fn new() -> Self {
        Self::with_xen(LoopbackXen::new())
    }

    pub fn with_xen(xen: LoopbackXen) -> Self {
        let store = MemStore::new();
        store.start_guest(GUEST).unwrap();
        let dom0: Arc<dyn XenStore> = Arc::new(store.connect(0).unwrap());
        dom0.write(
            TxId::NONE,
            &format!("/local/domain/{GUEST}/domid"),
            GUEST.to_string().as_bytes(),
        )
        .unwrap();
        let guest: Arc<dyn XenStore> = Arc::new(store.connect(GUEST).unwrap());
        Self {
            store,
            xen,
            dom0,
            guest,
        }
    }

    pub fn guest_platform(&self) -> LoopbackDomain {
        self.xen.domain(GUEST)
    }

    /// The toolstack's part: both directories, with PROTOCOL.md 2.1's permissions.
    pub fn attach(&self, devid: u32, kind: DeviceKind, grant_usage: bool, dma: &str) {
        let be = xenbus::backend_dir(BACKEND, GUEST, devid);
        let fe = xenbus::frontend_dir(GUEST, devid);
        let s = &*self.dom0;
        transaction(s, 8, |tx| {
            s.mkdir(tx, &be)?;
            s.set_perms(tx, &be, &[Perm::owner(BACKEND), Perm::read(GUEST)])?;
            s.mkdir(tx, &fe)?;
            s.set_perms(tx, &fe, &[Perm::owner(GUEST), Perm::read(BACKEND)])?;
            for (k, v) in [
                ("frontend", fe.clone()),
                ("frontend-id", GUEST.to_string()),
                ("online", "1".into()),
                ("state", "1".into()),
                ("type", kind.type_string()),
                ("transport", "xenbus".into()),
                ("grant_usage", if grant_usage { "1" } else { "0" }.into()),
                ("dma", dma.into()),
            ] {
                s.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
            }
            for (k, v) in [
                ("backend", be.clone()),
                ("backend-id", BACKEND.to_string()),
                ("state", "1".into()),
            ] {
                s.write(tx, &format!("{fe}/{k}"), v.as_bytes())?;
            }
            Ok(())
        })
        .unwrap();
    }
}

pub fn role(is_dom0: bool, arch: Arch, guest_type: GuestType) -> DomainRole {
    DomainRole {
        domid: GUEST,
        is_dom0,
        guest_type,
        arch,
        xen_version: XenVersion {
            major: 4,
            minor: 17,
            extra: ".0".into(),
        },
    }
}

/// A PVH x86 DomU: grants by default.
pub fn pvh() -> DomainRole {
    role(false, Arch::X86_64, GuestType::Pvh)
}

/// What the scripted backend offers and does.
#[derive(Debug, Clone)]
pub struct Script {
    pub devid: u32,
    pub kind: DeviceKind,
    pub disk_sectors: u64,
    pub max_queues: u32,
    pub max_queue_size: u32,
    pub persistent: bool,
    pub grant_usage: bool,
    pub read_only: bool,
    /// Stop after publishing InitWait (a backend that vanishes mid-handshake).
    pub stall_at_init_wait: bool,
    /// Start in this backend state instead of publishing (for the restart rule).
    pub initial_state: Option<XenbusState>,
}

impl Script {
    pub fn blk(devid: u32) -> Self {
        Self {
            devid,
            kind: DeviceKind::Block,
            disk_sectors: 8192, // 4 MiB
            max_queues: 4,
            max_queue_size: 256,
            persistent: true,
            grant_usage: true,
            read_only: false,
            stall_at_init_wait: false,
            initial_state: None,
        }
    }

    pub fn console(devid: u32) -> Self {
        Self {
            kind: DeviceKind::Console,
            max_queues: 2,
            ..Self::blk(devid)
        }
    }

    pub fn rng(devid: u32) -> Self {
        Self {
            kind: DeviceKind::Rng,
            max_queues: 1,
            ..Self::blk(devid)
        }
    }

    fn features(&self) -> u64 {
        let mut f = bit(ft::VERSION_1) | bit(ft::RING_EVENT_IDX) | bit(ft::RING_INDIRECT_DESC);
        if self.grant_usage {
            f |= bit(ft::ACCESS_PLATFORM);
        }
        if self.kind == DeviceKind::Block {
            f |= bit(fb::SIZE_MAX)
                | bit(fb::SEG_MAX)
                | bit(fb::BLK_SIZE)
                | bit(fb::FLUSH)
                | bit(fb::DISCARD)
                | bit(fb::WRITE_ZEROES)
                | bit(fb::MQ);
            if self.read_only {
                f |= bit(fb::RO);
            }
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        match self.kind {
            DeviceKind::Block => BlkConfig {
                capacity: self.disk_sectors,
                size_max: 65536,
                seg_max: self.max_queue_size - 2,
                blk_size: 512,
                num_queues: self.max_queues as u16,
                max_discard_sectors: 1 << 22,
                max_discard_seg: 1,
                max_write_zeroes_sectors: 1 << 22,
                max_write_zeroes_seg: 1,
                write_zeroes_may_unmap: 1,
                ..Default::default()
            }
            .to_bytes()
            .to_vec(),
            _ => Vec::new(),
        }
    }
}

/// What the backend recorded.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every frontend state it observed, in order (deduplicated).
    pub frontend_states: Vec<XenbusState>,
    /// The frontend directory's keys at the moment it first saw `state = 3`.
    pub published: BTreeMap<String, String>,
    /// Every descriptor address of a data buffer, decoded.
    pub addresses: Vec<DmaAddr>,
    /// Requests served.
    pub requests: u64,
    /// Errors the backend hit (a protocol violation by the frontend).
    pub errors: Vec<String>,
    pub connections: u32,
    /// Console: what the driver sent to port 0.
    pub console_in: Vec<u8>,
}

pub struct Backend {
    /// Console: bytes port 0 sends to the driver (taken as receive buffers arrive).
    pub console_out: Arc<Mutex<Vec<u8>>>,
    pub seen: Arc<Mutex<Seen>>,
    pub disk: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub be: String,
}

impl Backend {
    pub fn start(env: &Env, script: Script) -> Self {
        env.attach(script.devid, script.kind, script.grant_usage, "auto");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let disk = Arc::new(Mutex::new(vec![0u8; (script.disk_sectors * 512) as usize]));
        let stop = Arc::new(AtomicBool::new(false));
        let be = xenbus::backend_dir(BACKEND, GUEST, script.devid);
        let console_out = Arc::new(Mutex::new(Vec::new()));
        let ctx = Ctx {
            console_out: Arc::clone(&console_out),
            store: Arc::clone(&env.dom0),
            dom: env.xen.domain(BACKEND),
            script,
            seen: Arc::clone(&seen),
            disk: Arc::clone(&disk),
            stop: Arc::clone(&stop),
            be: be.clone(),
            fe: xenbus::frontend_dir(GUEST, 0),
        };
        let thread = std::thread::spawn(move || ctx.run());
        Self {
            console_out,
            seen,
            disk,
            stop,
            thread: Some(thread),
            be,
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Ctx {
    console_out: Arc<Mutex<Vec<u8>>>,
    store: Arc<dyn XenStore>,
    dom: LoopbackDomain,
    script: Script,
    seen: Arc<Mutex<Seen>>,
    disk: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    be: String,
    fe: String,
}

type GMapping = <<LoopbackDomain as Platform>::GrantMap as GrantMapper>::Mapping;
type FMapping = <<LoopbackDomain as Platform>::Foreign as ForeignMapper>::Mapping;

enum Ring {
    Granted(GMapping),
    Foreign(FMapping),
}

impl Ring {
    fn mem(&self) -> SharedMem<'_> {
        match self {
            Ring::Granted(m) => m.mem(),
            Ring::Foreign(m) => m.mem(),
        }
    }
}

struct Queue {
    layout: RingLayout,
    ring: Ring,
    last_avail: u16,
    used: u16,
    port: u32,
}

struct Connection {
    strategy: DmaStrategy,
    queues: Vec<Queue>,
    pool: Option<GMapping>,
    pool_len: u64,
    events: <LoopbackDomain as Platform>::Events,
    gmap: <LoopbackDomain as Platform>::GrantMap,
    fmap: <LoopbackDomain as Platform>::Foreign,
}

impl Ctx {
    fn key(&self, dir: &str, k: &str) -> String {
        format!("{dir}/{k}")
    }

    fn fstate(&self) -> Option<XenbusState> {
        let fe = xenbus::frontend_dir(GUEST, self.script.devid);
        let s = xenbus::read_state(&*self.store, TxId::NONE, &xenbus::state_path(&fe)).ok();
        if let Some(s) = s {
            let mut seen = self.seen.lock().unwrap();
            if seen.frontend_states.last() != Some(&s) {
                seen.frontend_states.push(s);
            }
        }
        s
    }

    fn set_state(&self, s: XenbusState) {
        self.store
            .write(
                TxId::NONE,
                &xenbus::state_path(&self.be),
                s.value().to_string().as_bytes(),
            )
            .unwrap();
    }

    fn publish(&self) {
        let s = &*self.store;
        let be = &self.be;
        let sc = &self.script;
        transaction(s, 8, |tx| {
            s.write(
                tx,
                &format!("{be}/device-features"),
                format!("{:#x}", sc.features()).as_bytes(),
            )?;
            s.write(
                tx,
                &format!("{be}/max-queues"),
                sc.max_queues.to_string().as_bytes(),
            )?;
            s.write(
                tx,
                &format!("{be}/max-queue-size"),
                sc.max_queue_size.to_string().as_bytes(),
            )?;
            s.write(
                tx,
                &format!("{be}/feature-persistent"),
                if sc.persistent { b"1" } else { b"0" },
            )?;
            s.write(tx, &format!("{be}/max-persistent-grants"), b"1024")?;
            s.write(
                tx,
                &format!("{be}/config"),
                encode_hex(&sc.config()).as_bytes(),
            )?;
            s.write(tx, &format!("{be}/config-generation"), b"1")?;
            s.write(tx, &format!("{be}/state"), b"2")
        })
        .unwrap();
    }

    fn sleep(&self) {
        std::thread::sleep(Duration::from_micros(300));
    }

    fn run(mut self) {
        self.fe = xenbus::frontend_dir(GUEST, self.script.devid);
        if let Some(s) = self.script.initial_state {
            self.set_state(s);
        } else {
            self.publish();
        }
        let mut conn: Option<Connection> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let sf = self.fstate();
            let sb =
                xenbus::read_state(&*self.store, TxId::NONE, &xenbus::state_path(&self.be)).ok();
            match (sb, sf) {
                (Some(XenbusState::InitWait), Some(XenbusState::Initialised))
                    if !self.script.stall_at_init_wait =>
                {
                    match self.connect() {
                        Ok(c) => {
                            conn = Some(c);
                            self.seen.lock().unwrap().connections += 1;
                            self.set_state(XenbusState::Connected);
                        }
                        Err(e) => {
                            self.seen.lock().unwrap().errors.push(e.clone());
                            self.store
                                .write(TxId::NONE, &self.key(&self.be, "error"), e.as_bytes())
                                .unwrap();
                            self.set_state(XenbusState::Closing);
                        }
                    }
                }
                (Some(XenbusState::Connected), Some(XenbusState::Closing))
                | (Some(XenbusState::Closing), Some(XenbusState::Closing | XenbusState::Closed))
                | (Some(XenbusState::InitWait), Some(XenbusState::Closing)) => {
                    conn = None; // unmap and unbind everything
                    self.set_state(XenbusState::Closed);
                }
                (
                    Some(XenbusState::Closed),
                    Some(XenbusState::Closed | XenbusState::Initialising),
                ) => {
                    self.publish();
                }
                (Some(XenbusState::Connected), _) => {
                    if let Some(c) = conn.as_mut() {
                        if let Err(e) = self.serve(c) {
                            self.seen.lock().unwrap().errors.push(e);
                        }
                    }
                }
                _ => {}
            }
            self.sleep();
        }
    }

    fn connect(&self) -> Result<Connection, String> {
        let s = &*self.store;
        let fe = &self.fe;
        // Everything the frontend published, as it was when state 3 appeared.
        let mut published = BTreeMap::new();
        fn walk(s: &dyn XenStore, dir: &str, prefix: &str, out: &mut BTreeMap<String, String>) {
            for child in s.directory(TxId::NONE, dir).unwrap_or_default() {
                let path = format!("{dir}/{child}");
                let name = if prefix.is_empty() {
                    child.clone()
                } else {
                    format!("{prefix}/{child}")
                };
                if let Ok(v) = s.read(TxId::NONE, &path) {
                    if !v.is_empty() {
                        out.insert(name.clone(), String::from_utf8_lossy(&v).into_owned());
                    }
                }
                walk(s, &path, &name, out);
            }
        }
        walk(s, fe, "", &mut published);
        self.seen.lock().unwrap().published = published.clone();
        let get = |k: &str| published.get(k).cloned().ok_or(format!("missing {k}"));
        let features = u64::from_str_radix(get("driver-features")?.trim_start_matches("0x"), 16)
            .map_err(|e| e.to_string())?;
        if features & !self.script.features() != 0 {
            return Err("driver-features not a subset".into());
        }
        let strategy: DmaStrategy = get("dma")?
            .parse()
            .map_err(|e: xenvirtio_virtio::dma::UnknownStrategy| e.to_string())?;
        let n: u32 = get("num-queues")?.parse().map_err(|_| "num-queues")?;
        let gmap = self.dom.grant_mapper().unwrap();
        let fmap = self.dom.foreign_mapper().unwrap();
        let events = self.dom.event_channels().unwrap();
        let mut queues = Vec::new();
        for q in 0..n {
            let size: u32 = get(&format!("queue-{q}/size"))?
                .parse()
                .map_err(|_| "size")?;
            let layout =
                RingLayout::new(size, self.script.max_queue_size).map_err(|e| e.to_string())?;
            let ring = match strategy {
                DmaStrategy::Direct => {
                    let gfns: Vec<u64> = get(&format!("queue-{q}/ring-gfn"))?
                        .split(' ')
                        .map(|g| u64::from_str_radix(g, 16).unwrap())
                        .collect();
                    Ring::Foreign(
                        fmap.map(GUEST, &gfns, Access::ReadWrite)
                            .map_err(|e| e.to_string())?,
                    )
                }
                _ => {
                    let refs: Vec<u32> = get(&format!("queue-{q}/ring-ref"))?
                        .split(' ')
                        .map(|r| r.parse().unwrap())
                        .collect();
                    if refs.len() != layout.pages() {
                        return Err("wrong number of ring refs".into());
                    }
                    Ring::Granted(
                        gmap.map(GUEST, &refs, Access::ReadWrite)
                            .map_err(|e| e.to_string())?,
                    )
                }
            };
            let remote: u32 = get(&format!("queue-{q}/event-channel"))?
                .parse()
                .map_err(|_| "port")?;
            let port = events
                .bind_interdomain(GUEST, remote)
                .map_err(|e| e.to_string())?;
            queues.push(Queue {
                layout,
                ring,
                last_avail: 0,
                used: 0,
                port,
            });
        }
        let (pool, pool_len) = if strategy == DmaStrategy::Bounce {
            let pages: usize = get("bounce/pages")?.parse().map_err(|_| "pages")?;
            let dir: Vec<u32> = get("bounce/dir-ref")?
                .split(' ')
                .map(|r| r.parse().unwrap())
                .collect();
            let dmap = gmap
                .map(GUEST, &dir, Access::ReadOnly)
                .map_err(|e| e.to_string())?;
            let mut refs = Vec::new();
            for (i, _) in dir.iter().enumerate() {
                let page: [u8; PAGE_SIZE] = dmap.mem().read_array(i * PAGE_SIZE).unwrap();
                refs.extend(decode_directory_page(&page, pages - refs.len()));
            }
            let pool = gmap
                .map(GUEST, &refs, Access::ReadWrite)
                .map_err(|e| e.to_string())?;
            (Some(pool), (pages * PAGE_SIZE) as u64)
        } else {
            (None, 0)
        };
        Ok(Connection {
            strategy,
            queues,
            pool,
            pool_len,
            events,
            gmap,
            fmap,
        })
    }

    /// Runs `f` on `len` bytes at descriptor address `addr`.
    fn with_buf<R>(
        &self,
        c: &Connection,
        addr: u64,
        len: u32,
        writable: bool,
        f: impl FnOnce(SharedMem<'_>) -> R,
    ) -> Result<R, String> {
        let a =
            DmaAddr::decode_range(c.strategy, addr, len, c.pool_len).map_err(|e| e.to_string())?;
        let access = if writable {
            Access::ReadWrite
        } else {
            Access::ReadOnly
        };
        match a {
            DmaAddr::Grant { gref, offset } => {
                let m = c
                    .gmap
                    .map(GUEST, &[gref], access)
                    .map_err(|e| e.to_string())?;
                Ok(f(m.mem().slice(usize::from(offset), len as usize).unwrap()))
            }
            DmaAddr::Bounce { offset } => {
                let pool = c.pool.as_ref().ok_or("no pool")?;
                Ok(f(pool.mem().slice(offset as usize, len as usize).unwrap()))
            }
            DmaAddr::Direct { gpa } => {
                let first = gpa >> 12;
                let last = (gpa + u64::from(len) - 1) >> 12;
                let gfns: Vec<u64> = (first..=last).collect();
                let m = c
                    .fmap
                    .map(GUEST, &gfns, access)
                    .map_err(|e| e.to_string())?;
                Ok(f(m
                    .mem()
                    .slice((gpa & 0xfff) as usize, len as usize)
                    .unwrap()))
            }
        }
    }

    fn read_desc(&self, c: &Connection, mem: SharedMem<'_>, off: usize) -> Descriptor {
        let _ = c;
        Descriptor::from_bytes(&mem.read_array::<16>(off).unwrap())
    }

    fn serve(&self, c: &mut Connection) -> Result<(), String> {
        for qi in 0..c.queues.len() {
            loop {
                let (layout, ring_mem_idx) = {
                    let q = &c.queues[qi];
                    (
                        q.layout,
                        q.ring
                            .mem()
                            .load_u16(q.layout.avail_idx(), Ordering::Acquire)
                            .unwrap(),
                    )
                };
                let q = &c.queues[qi];
                if ring_mem_idx == q.last_avail {
                    break;
                }
                if self.script.kind == DeviceKind::Console
                    && qi == 0
                    && self.console_out.lock().unwrap().is_empty()
                {
                    break; // receive buffers wait for output
                }
                let ring = q.ring.mem();
                let head = ring
                    .load_u16(layout.avail_ring(q.last_avail), Ordering::Acquire)
                    .unwrap();
                // Gather the chain (following an indirect table).
                let mut descs = Vec::new();
                let d = self.read_desc(c, ring, layout.desc(head));
                if d.is_indirect() {
                    let table = self.with_buf(c, d.addr, d.len, false, |m| {
                        let mut t = vec![0u8; m.len()];
                        m.read(0, &mut t).unwrap();
                        t
                    })?;
                    let mut i = 0usize;
                    loop {
                        let dd =
                            Descriptor::from_bytes(table[i * 16..i * 16 + 16].try_into().unwrap());
                        descs.push(dd);
                        if !dd.has_next() {
                            break;
                        }
                        i = usize::from(dd.next);
                        if descs.len() > 256 {
                            return Err("indirect loop".into());
                        }
                    }
                } else {
                    let mut dd = d;
                    loop {
                        descs.push(dd);
                        if !dd.has_next() {
                            break;
                        }
                        dd = self.read_desc(c, ring, layout.desc(dd.next));
                        if descs.len() > usize::from(layout.size()) {
                            return Err("chain loop".into());
                        }
                    }
                }
                let written = self.handle(c, &descs)?;
                let q = &mut c.queues[qi];
                let ring = q.ring.mem();
                ring.write(
                    layout.used_ring(q.used),
                    &UsedElem {
                        id: u32::from(head),
                        len: written,
                    }
                    .to_bytes(),
                )
                .unwrap();
                q.used = q.used.wrapping_add(1);
                q.last_avail = q.last_avail.wrapping_add(1);
                ring.store_u16(layout.used_idx(), q.used, Ordering::Release)
                    .unwrap();
                // EVENT_IDX: ask to hear about the next buffer.
                ring.store_u16(layout.avail_event(), q.last_avail, Ordering::Release)
                    .unwrap();
                let port = q.port;
                c.events.notify(port).map_err(|e| e.to_string())?;
                self.seen.lock().unwrap().requests += 1;
            }
        }
        Ok(())
    }

    /// Serves one chain; returns the bytes written into device-writable buffers.
    fn handle(&self, c: &Connection, descs: &[Descriptor]) -> Result<u32, String> {
        let readable: Vec<&Descriptor> = descs.iter().filter(|d| !d.is_write_only()).collect();
        let writable: Vec<&Descriptor> = descs.iter().filter(|d| d.is_write_only()).collect();
        {
            let mut seen = self.seen.lock().unwrap();
            for d in descs {
                seen.addresses
                    .push(DmaAddr::decode(c.strategy, d.addr).map_err(|e| e.to_string())?);
            }
        }
        let read_all = |ds: &[&Descriptor]| -> Result<Vec<u8>, String> {
            let mut out = Vec::new();
            for d in ds {
                let part = self.with_buf(c, d.addr, d.len, false, |m| {
                    let mut v = vec![0u8; m.len()];
                    m.read(0, &mut v).unwrap();
                    v
                })?;
                out.extend(part);
            }
            Ok(out)
        };
        let write_all = |ds: &[&Descriptor], data: &[u8]| -> Result<(), String> {
            let mut at = 0;
            for d in ds {
                let n = (d.len as usize).min(data.len() - at);
                if n == 0 {
                    break;
                }
                self.with_buf(c, d.addr, d.len, true, |m| {
                    m.write(0, &data[at..at + n]).unwrap()
                })?;
                at += n;
            }
            Ok(())
        };
        if self.script.kind == DeviceKind::Console {
            if writable.is_empty() {
                let data = read_all(&readable)?;
                self.seen.lock().unwrap().console_in.extend(data);
                return Ok(0);
            }
            let cap: usize = writable.iter().map(|d| d.len as usize).sum();
            let mut out = self.console_out.lock().unwrap();
            let n = cap.min(out.len());
            let data: Vec<u8> = out.drain(..n).collect();
            drop(out);
            write_all(&writable, &data)?;
            return Ok(n as u32);
        }
        if self.script.kind == DeviceKind::Rng {
            let total: usize = writable.iter().map(|d| d.len as usize).sum();
            let data: Vec<u8> = (0..total)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(7))
                .collect();
            write_all(&writable, &data)?;
            return Ok(total as u32);
        }
        let input = read_all(&readable)?;
        let (status_desc, data_out) = writable.split_last().ok_or("no status")?;
        let hdr = ReqHeader::from_bytes(input[..16].try_into().map_err(|_| "short header")?);
        let body = &input[16..];
        let mut disk = self.disk.lock().unwrap();
        let mut written = 0u32;
        let status = match hdr.req_type {
            T_IN => {
                let len: usize = data_out.iter().map(|d| d.len as usize).sum();
                let at = (hdr.sector * 512) as usize;
                if at + len > disk.len() {
                    S_IOERR
                } else {
                    write_all(data_out, &disk[at..at + len])?;
                    written = len as u32;
                    S_OK
                }
            }
            T_OUT => {
                let at = (hdr.sector * 512) as usize;
                if self.script.read_only || at + body.len() > disk.len() {
                    S_IOERR
                } else {
                    disk[at..at + body.len()].copy_from_slice(body);
                    S_OK
                }
            }
            T_FLUSH => S_OK,
            T_GET_ID => {
                write_all(data_out, b"scripted-disk")?;
                written = 13;
                S_OK
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let seg = DiscardWriteZeroes::from_bytes(body[..16].try_into().unwrap());
                let at = (seg.sector * 512) as usize;
                let len = seg.num_sectors as usize * 512;
                if at + len > disk.len() {
                    S_IOERR
                } else {
                    disk[at..at + len].fill(0);
                    S_OK
                }
            }
            _ => S_UNSUPP,
        };
        drop(disk);
        write_all(&[status_desc], &[status])?;
        Ok(written + 1)
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn read_str(s: &dyn XenStore, path: &str) -> Option<String> {
    s.read_optional(TxId::NONE, path)
        .unwrap()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// One write-side operation the frontend made: (operation, transaction, path).
pub type Op = (&'static str, TxId, String);

/// A store that records every write-side operation the frontend makes, with its transaction.
pub struct Recorder {
    pub inner: Arc<dyn XenStore>,
    pub ops: Mutex<Vec<Op>>,
    pub commits: Mutex<Vec<(TxId, bool)>>,
}

impl Recorder {
    pub fn new(inner: Arc<dyn XenStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            ops: Mutex::new(Vec::new()),
            commits: Mutex::new(Vec::new()),
        })
    }
}

impl XenStore for Recorder {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError> {
        self.inner.read(tx, path)
    }
    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.ops
            .lock()
            .unwrap()
            .push(("write", tx, path.to_owned()));
        self.inner.write(tx, path, value)
    }
    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        self.ops
            .lock()
            .unwrap()
            .push(("mkdir", tx, path.to_owned()));
        self.inner.mkdir(tx, path)
    }
    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        self.ops.lock().unwrap().push(("rm", tx, path.to_owned()));
        self.inner.rm(tx, path)
    }
    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
        self.inner.directory(tx, path)
    }
    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Perm>, XsError> {
        self.inner.get_perms(tx, path)
    }
    fn set_perms(&self, tx: TxId, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.inner.set_perms(tx, path, perms)
    }
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.inner.watch(path, token)
    }
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.inner.unwatch(path, token)
    }
    fn transaction_start(&self) -> Result<TxId, XsError> {
        self.inner.transaction_start()
    }
    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XsError> {
        let r = self.inner.transaction_end(tx, commit);
        self.commits.lock().unwrap().push((tx, commit && r.is_ok()));
        r
    }
    fn get_domain_path(&self, domid: u16) -> Result<String, XsError> {
        self.inner.get_domain_path(domid)
    }
    fn is_domain_introduced(&self, domid: u16) -> Result<bool, XsError> {
        self.inner.is_domain_introduced(domid)
    }
    fn reset_watches(&self) -> Result<(), XsError> {
        self.inner.reset_watches()
    }
    fn watch_events(&self) -> xenvirtio_xenstore::WatchEvents {
        self.inner.watch_events()
    }
    fn watch_events_for(&self, token: &str) -> Result<xenvirtio_xenstore::WatchEvents, XsError> {
        self.inner.watch_events_for(token)
    }
}
