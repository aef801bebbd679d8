//! A test frontend: the driver side of one xenvirtio device, written from `docs/PROTOCOL.md`
//! alone, for the backend's tests and the cross-crate tests.
//!
//! It owns everything a frontend owns: its grants, bounce pool, pinned memory, event channels
//! and rings ([`DriverRing`]). It connects with the strategy a test chooses
//! ([`TestStrategy`]), serves requests one at a time (blk, console, rng), closes cleanly
//! (8.2), and can also misbehave on purpose ([`Hostile`]) to provoke the backend's protocol
//! errors. Requests are synchronous: a request is published, the backend is notified if it
//! asked, and the frontend waits for the used entry on the queue's event channel.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenvirtio_virtio::blk::{
    DiscardWriteZeroes, ID_BYTES, ReqHeader, S_OK, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES,
};
use xenvirtio_virtio::console::{RECEIVEQ, TRANSMITQ};
use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};
use xenvirtio_virtio::features::{self, transport};
use xenvirtio_virtio::protocol::{
    self, PAGE_SIZE, backend_keys as bk, directory_pages, encode_directory_page,
    frontend_keys as fk,
};
use xenvirtio_virtio::split::{Descriptor, RingLayout, VIRTQ_DESC_F_NEXT};
use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{
    BoundPort, EventChannels, GrantAllocator, GrantedPages, PinnedAllocator, PinnedPages, Platform,
};
use xenvirtio_xen::{Access, DomId, XenError};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{TxId, XenStore, XsError, transaction};

use super::driver_ring::{DriverRing, DriverRingError, Segment};

/// How long the test frontend waits for the backend by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The DMA strategy (and grant flavour) the test frontend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestStrategy {
    /// `grant`, a fresh grant for every buffer, revoked after the request.
    GrantPerRequest,
    /// `grant` with `feature-persistent = 1`: buffers from an arena granted once.
    GrantPersistent,
    /// `bounce`: buffers in a pool granted once, described by directory pages.
    Bounce,
    /// `direct`: buffers in pinned memory named by guest-physical address.
    Direct,
}

impl TestStrategy {
    /// Every strategy.
    pub const ALL: [TestStrategy; 4] = [
        TestStrategy::GrantPerRequest,
        TestStrategy::GrantPersistent,
        TestStrategy::Bounce,
        TestStrategy::Direct,
    ];

    /// The `dma` value.
    pub fn dma(self) -> DmaStrategy {
        match self {
            TestStrategy::GrantPerRequest | TestStrategy::GrantPersistent => DmaStrategy::Grant,
            TestStrategy::Bounce => DmaStrategy::Bounce,
            TestStrategy::Direct => DmaStrategy::Direct,
        }
    }
}

/// How the test frontend connects.
#[derive(Debug, Clone)]
pub struct FrontendOptions {
    /// The strategy.
    pub strategy: TestStrategy,
    /// Queues to set up (`None`: `max-queues`).
    pub num_queues: Option<u32>,
    /// Size of every queue.
    pub queue_size: u32,
    /// `driver-features` to write instead of what the frontend would accept (hostile tests).
    pub features_override: Option<u64>,
    /// Send requests through indirect tables (when negotiated).
    pub indirect: bool,
    /// Accept EVENT_IDX if offered.
    pub event_idx: bool,
    /// Pages of the persistent arena, the bounce pool or the pinned memory.
    pub arena_pages: usize,
    /// How long to wait for the backend.
    pub timeout: Duration,
}

impl FrontendOptions {
    /// Defaults for `strategy`: all queues, size 64, EVENT_IDX, no indirect tables, 64 pages.
    pub fn new(strategy: TestStrategy) -> Self {
        Self {
            strategy,
            num_queues: None,
            queue_size: 64,
            features_override: None,
            indirect: false,
            event_idx: true,
            arena_pages: 64,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// With indirect tables.
    pub fn indirect(mut self) -> Self {
        self.indirect = true;
        self
    }

    /// With `n` queues.
    pub fn queues(mut self, n: u32) -> Self {
        self.num_queues = Some(n);
        self
    }
}

/// What went wrong on the frontend's side of a test.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// Xenstore failed.
    #[error("xenstore")]
    Xenstore(#[from] XsError),
    /// The Xen platform failed.
    #[error("xen")]
    Xen(#[from] XenError),
    /// The ring failed.
    #[error("ring")]
    Ring(#[from] DriverRingError),
    /// The frontend's own memory could not be accessed.
    #[error("frontend memory")]
    Mem(#[source] xenvirtio_xen::mem::MemError),
    /// The backend went to Closing or Closed instead of answering; its `error` node.
    #[error("the backend closed the device (state {state}): {error}")]
    BackendClosed {
        /// The backend's state.
        state: XenbusState,
        /// Its `error` node (empty if none).
        error: String,
    },
    /// Nothing happened in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// A blk request's status was not OK.
    #[error("blk status {0}")]
    BlkStatus(u8),
    /// The backend's keys are unusable.
    #[error("bad backend key {key}: {why}")]
    BadKey {
        /// The key.
        key: &'static str,
        /// Why.
        why: String,
    },
}

/// A misbehaviour the test frontend can commit on a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// A descriptor address whose tag names another strategy.
    WrongTag,
    /// A grant that was never issued, a bounce offset past the pool, or a frame outside RAM.
    BadAddress,
    /// A chain whose `next` points back to its own head.
    LoopingChain,
    /// `avail.idx` jumps more than the queue size ahead.
    AvailJump,
    /// A device-writable buffer backed by a read-only grant (grant strategies only).
    WriteIntoReadOnlyGrant,
    /// A head index beyond the descriptor table.
    HeadOutOfRange,
    /// One valid device-writable chain offered again and again, more times than the queue
    /// holds (a console's receive queue, whose buffers the backend holds).
    RepeatHead,
}

/// Memory of the frontend that the backend can reach.
enum Backing<P: Platform> {
    Granted(<P::GrantAlloc as GrantAllocator>::Grant),
    Pinned(<P::Pinned as PinnedAllocator>::Pinned),
}

impl<P: Platform> Backing<P> {
    fn mem(&self) -> SharedMem<'_> {
        match self {
            Backing::Granted(g) => g.mem(),
            Backing::Pinned(p) => p.mem(),
        }
    }
}

/// A page-granular allocator over one backing (persistent arena, bounce pool, pinned memory).
struct Arena<P: Platform> {
    backing: Backing<P>,
    free: Vec<usize>,
    /// Bounce only: the directory pages, kept granted while connected.
    _directory: Option<<P::GrantAlloc as GrantAllocator>::Grant>,
}

/// Where a buffer's pages are.
enum BufPages<P: Platform> {
    /// A grant of its own (per-request).
    Own(<P::GrantAlloc as GrantAllocator>::Grant),
    /// Pages of the arena.
    Arena(Vec<usize>),
}

/// One buffer of a request.
struct Buf<P: Platform> {
    pages: BufPages<P>,
    len: usize,
    writable: bool,
}

/// One queue.
struct Queue<P: Platform> {
    ring_mem: Backing<P>,
    ring: DriverRing,
    port: BoundPort<P::Events>,
    /// Buffers of chains in flight, by head.
    pending: BTreeMap<u16, Vec<Buf<P>>>,
}

/// The driver side of one device.
pub struct TestFrontend<P: Platform> {
    platform: P,
    store: Arc<dyn XenStore>,
    backend: DomId,
    devid: u32,
    fdir: String,
    bdir: String,
    options: FrontendOptions,
    features: u64,
    config: Vec<u8>,
    events: Arc<P::Events>,
    grants: P::GrantAlloc,
    queues: Vec<Queue<P>>,
    arena: Option<Arena<P>>,
    console_rx: Vec<u8>,
    hostile_grants: Vec<<P::GrantAlloc as GrantAllocator>::Grant>,
    hostile_buffers: Vec<Buf<P>>,
}

impl<P: Platform> std::fmt::Debug for TestFrontend<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestFrontend")
            .field("fdir", &self.fdir)
            .field("strategy", &self.options.strategy)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

/// Waits until the state at `path` satisfies `until`; a backend that goes to Closing or Closed
/// instead (when `fail_on_close`) is an error carrying its `error` node.
fn wait_backend(
    store: &dyn XenStore,
    bdir: &str,
    until: impl Fn(XenbusState) -> bool,
    fail_on_close: bool,
    timeout: Duration,
) -> Result<XenbusState, TestError> {
    let path = xenbus::state_path(bdir);
    let state = match xenbus::wait_for_state(
        store,
        &path,
        |s| until(s) || (fail_on_close && matches!(s, XenbusState::Closing | XenbusState::Closed)),
        timeout,
    ) {
        Ok(s) => s,
        Err(XsError::WaitTimeout { .. }) => {
            let now = xenbus::read_state(store, TxId::NONE, &path).ok();
            return Err(TestError::Timeout(format!(
                "{path} (now {})",
                now.map_or("absent".into(), |s| s.to_string())
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if until(state) {
        return Ok(state);
    }
    let error = store
        .read_string(TxId::NONE, &format!("{bdir}/{}", bk::ERROR))
        .unwrap_or_default();
    Err(TestError::BackendClosed { state, error })
}

impl<P: Platform> TestFrontend<P> {
    /// Connects device `devid` of the domain `platform` acts as, served by `backend`: waits for
    /// the backend's InitWait, sets everything up, publishes it with `Sf = 3` in one
    /// transaction, waits for Connected and writes `Sf = 4`.
    pub fn connect(
        platform: P,
        store: Arc<dyn XenStore>,
        backend: DomId,
        devid: u32,
        options: FrontendOptions,
    ) -> Result<Self, TestError> {
        let me = platform.domid();
        let fdir = xenbus::frontend_dir(me, devid);
        let bdir = xenbus::backend_dir(backend, me, devid);
        wait_backend(
            &*store,
            &bdir,
            |s| s == XenbusState::InitWait,
            false,
            options.timeout,
        )?;
        let bkey = |k: &'static str| format!("{bdir}/{k}");
        let offered = xenbus::read_hex_u64(&*store, TxId::NONE, &bkey(bk::DEVICE_FEATURES))?;
        let max_queues = xenbus::read_u32(&*store, TxId::NONE, &bkey(bk::MAX_QUEUES))?;
        let persistent_offered =
            xenbus::read_bool(&*store, TxId::NONE, &bkey(bk::FEATURE_PERSISTENT))?;
        let config_hex = store.read_string(TxId::NONE, &bkey(bk::CONFIG))?;
        let config = protocol::decode_hex(&config_hex).map_err(|e| TestError::BadKey {
            key: bk::CONFIG,
            why: e.to_string(),
        })?;
        let mut accepted = offered;
        if !options.event_idx {
            accepted &= !features::bit(transport::RING_EVENT_IDX);
        }
        let features = options.features_override.unwrap_or(accepted);
        let strategy = options.strategy;
        let num_queues = options.num_queues.unwrap_or(max_queues);

        let grants = platform.grant_allocator()?;
        let events = Arc::new(platform.event_channels()?);
        let layout = RingLayout::new(options.queue_size, 1024).map_err(|e| TestError::BadKey {
            key: "queue size",
            why: e.to_string(),
        })?;
        let mut queues = Vec::new();
        for _ in 0..num_queues {
            let ring_mem = if strategy == TestStrategy::Direct {
                Backing::Pinned(platform.pinned_allocator()?.alloc_pinned(layout.pages())?)
            } else {
                Backing::Granted(grants.grant(backend, layout.pages(), Access::ReadWrite)?)
            };
            ring_mem
                .mem()
                .fill(0, layout.pages() * PAGE_SIZE, 0)
                .map_err(TestError::Mem)?;
            queues.push(Queue {
                ring: DriverRing::new(layout, features),
                ring_mem,
                port: BoundPort::bind_unbound(&events, backend)?,
                pending: BTreeMap::new(),
            });
        }
        let pages = options.arena_pages.max(1);
        let arena = match strategy {
            TestStrategy::GrantPerRequest => None,
            TestStrategy::GrantPersistent => Some(Arena {
                backing: Backing::Granted(grants.grant(backend, pages, Access::ReadWrite)?),
                free: (0..pages).rev().collect(),
                _directory: None,
            }),
            TestStrategy::Bounce => {
                let pool = grants.grant(backend, pages, Access::ReadWrite)?;
                // The backend only reads the directory: it is granted read-only, and written
                // here, by the domain that granted it.
                let dir = grants.grant(backend, directory_pages(pages), Access::ReadOnly)?;
                for i in 0..directory_pages(pages) {
                    dir.mem()
                        .write(i * PAGE_SIZE, &encode_directory_page(pool.refs(), i))
                        .map_err(TestError::Mem)?;
                }
                Some(Arena {
                    backing: Backing::Granted(pool),
                    free: (0..pages).rev().collect(),
                    _directory: Some(dir),
                })
            }
            TestStrategy::Direct => Some(Arena {
                backing: Backing::Pinned(platform.pinned_allocator()?.alloc_pinned(pages)?),
                free: (0..pages).rev().collect(),
                _directory: None,
            }),
        };

        let fe = TestFrontend {
            platform,
            store,
            backend,
            devid,
            fdir,
            bdir,
            options,
            features,
            config,
            events,
            grants,
            queues,
            arena,
            console_rx: Vec::new(),
            hostile_grants: Vec::new(),
            hostile_buffers: Vec::new(),
        };
        fe.publish(num_queues, persistent_offered)?;
        wait_backend(
            &*fe.store,
            &fe.bdir,
            |s| s == XenbusState::Connected,
            true,
            fe.options.timeout,
        )?;
        xenbus::switch_state(&*fe.store, &fe.fdir, XenbusState::Connected)?;
        Ok(fe)
    }

    /// Writes section 2.3 and `Sf = 3` in one transaction.
    fn publish(&self, num_queues: u32, persistent_offered: bool) -> Result<(), TestError> {
        let store = &*self.store;
        let key = |k: &str| format!("{}/{k}", self.fdir);
        let strategy = self.options.strategy;
        transaction(store, 16, |tx| {
            for child in store.directory(tx, &self.fdir)? {
                if child.starts_with("queue-")
                    || child == "bounce"
                    || child == fk::FEATURE_PERSISTENT
                {
                    store.rm(tx, &key(&child))?;
                }
            }
            store.write_str(
                tx,
                &key(fk::DRIVER_FEATURES),
                &protocol::format_features(self.features),
            )?;
            store.write_str(tx, &key(fk::DMA), strategy.dma().name())?;
            store.write_str(tx, &key(fk::DMA_REASON), "chosen by the test")?;
            store.write_str(tx, &key(fk::NUM_QUEUES), &num_queues.to_string())?;
            for (n, q) in self.queues.iter().enumerate() {
                let n = n as u32;
                let qk = |leaf: &str| key(&fk::queue(n, leaf));
                store.write_str(tx, &qk(fk::QUEUE_SIZE), &q.ring.layout().size().to_string())?;
                match &q.ring_mem {
                    Backing::Granted(g) => {
                        let refs: Vec<String> = g.refs().iter().map(u32::to_string).collect();
                        store.write_str(tx, &qk(fk::QUEUE_RING_REF), &refs.join(" "))?;
                    }
                    Backing::Pinned(p) => {
                        let gfns: Vec<String> = p.gfns().iter().map(|g| format!("{g:x}")).collect();
                        store.write_str(tx, &qk(fk::QUEUE_RING_GFN), &gfns.join(" "))?;
                    }
                }
                store.write_str(tx, &qk(fk::QUEUE_EVENT_CHANNEL), &q.port.port().to_string())?;
            }
            if strategy == TestStrategy::GrantPersistent && persistent_offered {
                store.write_str(tx, &key(fk::FEATURE_PERSISTENT), "1")?;
            }
            if let (TestStrategy::Bounce, Some(arena)) = (strategy, &self.arena) {
                let Backing::Granted(pool) = &arena.backing else {
                    unreachable!("the bounce pool is granted")
                };
                store.write_str(tx, &key(fk::BOUNCE_PAGES), &pool.pages().to_string())?;
                if let Some(dir) = &arena._directory {
                    let refs: Vec<String> = dir.refs().iter().map(u32::to_string).collect();
                    store.write_str(tx, &key(fk::BOUNCE_DIR_REF), &refs.join(" "))?;
                }
            }
            store.write_str(
                tx,
                &xenbus::state_path(&self.fdir),
                &XenbusState::Initialised.value().to_string(),
            )
        })?;
        Ok(())
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The device config the backend published.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// The frontend directory.
    pub fn frontend_dir(&self) -> &str {
        &self.fdir
    }

    /// The backend directory.
    pub fn backend_dir(&self) -> &str {
        &self.bdir
    }

    /// The device number.
    pub fn devid(&self) -> u32 {
        self.devid
    }

    /// The backend's state now.
    pub fn backend_state(&self) -> Option<XenbusState> {
        xenbus::read_state(&*self.store, TxId::NONE, &xenbus::state_path(&self.bdir)).ok()
    }

    /// The backend's `error` node, if any.
    pub fn backend_error(&self) -> Option<String> {
        self.store
            .read_string(TxId::NONE, &format!("{}/{}", self.bdir, bk::ERROR))
            .ok()
    }

    /// Waits for the backend to reach a state `until` accepts.
    pub fn wait_backend_state(
        &self,
        until: impl Fn(XenbusState) -> bool,
        timeout: Duration,
    ) -> Result<XenbusState, TestError> {
        wait_backend(&*self.store, &self.bdir, until, false, timeout)
    }

    fn alloc_buf(&mut self, len: usize, writable: bool) -> Result<Buf<P>, TestError> {
        let pages = len.div_ceil(PAGE_SIZE).max(1);
        let bp = match &mut self.arena {
            None => {
                let access = if writable {
                    Access::ReadWrite
                } else {
                    Access::ReadOnly
                };
                BufPages::Own(self.grants.grant(self.backend, pages, access)?)
            }
            Some(arena) => {
                if arena.free.len() < pages {
                    return Err(TestError::Timeout(format!(
                        "{pages} free arena pages (only {} left)",
                        arena.free.len()
                    )));
                }
                let mut v: Vec<usize> = (0..pages)
                    .map(|_| arena.free.pop().expect("counted above"))
                    .collect();
                v.sort_unstable();
                BufPages::Arena(v)
            }
        };
        Ok(Buf {
            pages: bp,
            len,
            writable,
        })
    }

    fn free_buf(&mut self, buf: Buf<P>) {
        if let (BufPages::Arena(pages), Some(arena)) = (buf.pages, &mut self.arena) {
            arena.free.extend(pages);
        }
    }

    /// The window of page `i` of `buf`.
    fn page_mem<'s>(&'s self, buf: &'s Buf<P>, i: usize) -> SharedMem<'s> {
        let (mem, index) = match &buf.pages {
            BufPages::Own(g) => (g.mem(), i),
            BufPages::Arena(pages) => (
                self.arena
                    .as_ref()
                    .expect("arena buffers have an arena")
                    .backing
                    .mem(),
                pages[i],
            ),
        };
        mem.slice(index * PAGE_SIZE, PAGE_SIZE)
            .expect("buffer pages are inside their memory")
    }

    fn buf_write(&self, buf: &Buf<P>, data: &[u8]) {
        for (i, chunk) in data.chunks(PAGE_SIZE).enumerate() {
            self.page_mem(buf, i)
                .write(0, chunk)
                .expect("frontend memory is writable");
        }
    }

    fn buf_read(&self, buf: &Buf<P>, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len.min(buf.len)];
        for (i, chunk) in out.chunks_mut(PAGE_SIZE).enumerate() {
            self.page_mem(buf, i)
                .read(0, chunk)
                .expect("frontend memory is readable");
        }
        out
    }

    /// The DMA address of byte 0 of page `i` of `buf`.
    fn page_addr(&self, buf: &Buf<P>, i: usize) -> u64 {
        match (&buf.pages, self.options.strategy) {
            (BufPages::Own(g), _) => DmaAddr::Grant {
                gref: g.refs()[i],
                offset: 0,
            }
            .encode(),
            (BufPages::Arena(pages), TestStrategy::GrantPersistent) => {
                let Some(Arena {
                    backing: Backing::Granted(g),
                    ..
                }) = &self.arena
                else {
                    unreachable!("the persistent arena is granted")
                };
                DmaAddr::Grant {
                    gref: g.refs()[pages[i]],
                    offset: 0,
                }
                .encode()
            }
            (BufPages::Arena(pages), TestStrategy::Bounce) => DmaAddr::Bounce {
                offset: (pages[i] * PAGE_SIZE) as u64,
            }
            .encode(),
            (BufPages::Arena(pages), _) => {
                let Some(Arena {
                    backing: Backing::Pinned(p),
                    ..
                }) = &self.arena
                else {
                    unreachable!("direct memory is pinned")
                };
                DmaAddr::Direct {
                    gpa: p.gfns()[pages[i]] * PAGE_SIZE as u64,
                }
                .encode()
            }
        }
    }

    /// The descriptors of `buf`: one per page under `grant`; contiguous pages merged under
    /// `bounce` and `direct` (a buffer may span pages there).
    fn segments(&self, buf: &Buf<P>) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::new();
        let mut left = buf.len;
        let mut i = 0;
        let merge = matches!(
            self.options.strategy,
            TestStrategy::Bounce | TestStrategy::Direct
        );
        while left > 0 {
            let n = left.min(PAGE_SIZE);
            let addr = self.page_addr(buf, i);
            match out.last_mut() {
                Some((a, l, _)) if merge && *a + u64::from(*l) == addr => *l += n as u32,
                _ => out.push((addr, n as u32, buf.writable)),
            }
            left -= n;
            i += 1;
        }
        out
    }

    /// Makes a chain of `readable` buffers then `writable` lengths available on `queue`,
    /// notifies, and returns its head (the request stays in flight).
    fn submit(
        &mut self,
        queue: u16,
        readable: &[&[u8]],
        writable: &[usize],
    ) -> Result<u16, TestError> {
        let mut bufs = Vec::new();
        for data in readable {
            let b = self.alloc_buf(data.len(), false)?;
            self.buf_write(&b, data);
            bufs.push(b);
        }
        for &len in writable {
            bufs.push(self.alloc_buf(len, true)?);
        }
        let mut segs = Vec::new();
        for b in &bufs {
            segs.extend(self.segments(b));
        }
        // No bytes, no descriptor: refused like an empty chain (an empty indirect table made
        // this panic; found by the `daemon_blk` fuzz target).
        if segs.is_empty() {
            for b in bufs {
                self.free_buf(b);
            }
            return Err(DriverRingError::Empty.into());
        }
        let indirect = self.options.indirect
            && features::has(self.features, transport::RING_INDIRECT_DESC)
            && segs.len() <= PAGE_SIZE / 16;
        let q = usize::from(queue);
        let head = if indirect {
            let table = DriverRing::indirect_table(&segs);
            let tb = self.alloc_buf(table.len(), false)?;
            self.buf_write(&tb, &table);
            let (addr, len, _) = self.segments(&tb)[0];
            let qr = &mut self.queues[q];
            let head = qr.ring.add_indirect(&qr.ring_mem.mem(), addr, len)?;
            bufs.push(tb);
            head
        } else {
            let qr = &mut self.queues[q];
            qr.ring.add(&qr.ring_mem.mem(), &segs)?
        };
        let qr = &mut self.queues[q];
        qr.pending.insert(head, bufs);
        qr.ring.want_notification(&qr.ring_mem.mem())?;
        if qr.ring.publish(&qr.ring_mem.mem())? {
            qr.port.notify()?;
        }
        Ok(head)
    }

    /// Waits for the next used entry of `queue`: `(head, written length, its buffers)`.
    fn wait_used(
        &mut self,
        queue: u16,
        timeout: Duration,
    ) -> Result<(u16, u32, Vec<Buf<P>>), TestError> {
        let q = usize::from(queue);
        let deadline = Instant::now() + timeout;
        loop {
            let qr = &mut self.queues[q];
            let mut used = qr.ring.pop_used(&qr.ring_mem.mem())?;
            if used.is_none() {
                // Ask for a notification, then look again (the device may have just added).
                qr.ring.want_notification(&qr.ring_mem.mem())?;
                used = qr.ring.pop_used(&qr.ring_mem.mem())?;
            }
            if let Some((head, len)) = used {
                let bufs = qr.pending.remove(&head).unwrap_or_default();
                return Ok((head, len, bufs));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TestError::Timeout(format!("a used entry on queue {queue}")));
            }
            if let Some(state) = self.backend_state() {
                if matches!(state, XenbusState::Closing | XenbusState::Closed) {
                    return Err(TestError::BackendClosed {
                        state,
                        error: self.backend_error().unwrap_or_default(),
                    });
                }
            }
            self.wait_event((deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// Sleeps until an event arrives on any of this frontend's ports, or `timeout`.
    fn wait_event(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        if let Ok(ports) = self.events.pending() {
            let _ = self.events.unmask(&ports);
        }
    }

    /// One request: `readable` buffers out, `writable` lengths in; returns the used length and
    /// the bytes of each writable buffer.
    pub fn request(
        &mut self,
        queue: u16,
        readable: &[&[u8]],
        writable: &[usize],
    ) -> Result<(u32, Vec<Vec<u8>>), TestError> {
        let head = self.submit(queue, readable, writable)?;
        let (got, used, bufs) = self.wait_used(queue, self.options.timeout)?;
        if got != head {
            return Err(TestError::Ring(DriverRingError::BadUsed(u32::from(got))));
        }
        let mut out = Vec::new();
        for b in &bufs {
            if b.writable {
                out.push(self.buf_read(b, b.len));
            }
        }
        for b in bufs {
            self.free_buf(b);
        }
        Ok((used, out))
    }

    /// A raw blk request: header, payload out, `in_len` bytes in; returns the status and the
    /// bytes read.
    pub fn blk_raw(
        &mut self,
        queue: u16,
        req_type: u32,
        sector: u64,
        payload: &[u8],
        in_len: usize,
    ) -> Result<(u8, Vec<u8>), TestError> {
        let hdr = ReqHeader {
            req_type,
            reserved: 0,
            sector,
        }
        .to_bytes();
        let mut readable: Vec<&[u8]> = vec![&hdr];
        if !payload.is_empty() {
            readable.push(payload);
        }
        let writable: Vec<usize> = if in_len > 0 { vec![in_len, 1] } else { vec![1] };
        let (used, mut data) = self.request(queue, &readable, &writable)?;
        let status = data.pop().and_then(|s| s.first().copied()).unwrap_or(0xff);
        let mut body = data.pop().unwrap_or_default();
        body.truncate((used as usize).saturating_sub(1));
        Ok((status, body))
    }

    fn blk_ok(status: u8) -> Result<(), TestError> {
        if status == S_OK {
            Ok(())
        } else {
            Err(TestError::BlkStatus(status))
        }
    }

    /// Reads `len` bytes at `sector` on `queue`.
    pub fn blk_read(&mut self, queue: u16, sector: u64, len: usize) -> Result<Vec<u8>, TestError> {
        let (s, data) = self.blk_raw(queue, T_IN, sector, &[], len)?;
        Self::blk_ok(s)?;
        Ok(data)
    }

    /// Writes `data` at `sector` on `queue`.
    pub fn blk_write(&mut self, queue: u16, sector: u64, data: &[u8]) -> Result<(), TestError> {
        let (s, _) = self.blk_raw(queue, T_OUT, sector, data, 0)?;
        Self::blk_ok(s)
    }

    /// Flushes.
    pub fn blk_flush(&mut self, queue: u16) -> Result<(), TestError> {
        let (s, _) = self.blk_raw(queue, T_FLUSH, 0, &[], 0)?;
        Self::blk_ok(s)
    }

    fn ranges(
        &mut self,
        queue: u16,
        kind: u32,
        sector: u64,
        sectors: u32,
        flags: u32,
    ) -> Result<(), TestError> {
        let seg = DiscardWriteZeroes {
            sector,
            num_sectors: sectors,
            flags,
        }
        .to_bytes();
        let (s, _) = self.blk_raw(queue, kind, 0, &seg, 0)?;
        Self::blk_ok(s)
    }

    /// Discards `sectors` sectors at `sector`.
    pub fn blk_discard(&mut self, queue: u16, sector: u64, sectors: u32) -> Result<(), TestError> {
        self.ranges(queue, T_DISCARD, sector, sectors, 0)
    }

    /// Zeroes `sectors` sectors at `sector` (`unmap`: may punch a hole).
    pub fn blk_write_zeroes(
        &mut self,
        queue: u16,
        sector: u64,
        sectors: u32,
        unmap: bool,
    ) -> Result<(), TestError> {
        self.ranges(queue, T_WRITE_ZEROES, sector, sectors, u32::from(unmap))
    }

    /// The device id string (`GET_ID`), without trailing NULs.
    pub fn blk_get_id(&mut self, queue: u16) -> Result<String, TestError> {
        let (s, data) = self.blk_raw(queue, T_GET_ID, 0, &[], ID_BYTES)?;
        Self::blk_ok(s)?;
        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        Ok(String::from_utf8_lossy(&data[..end]).into_owned())
    }

    /// `len` bytes of entropy.
    pub fn rng_read(&mut self, len: usize) -> Result<Vec<u8>, TestError> {
        let (used, mut data) = self.request(0, &[], &[len])?;
        let mut d = data.pop().unwrap_or_default();
        d.truncate(used as usize);
        Ok(d)
    }

    /// Sends `data` to the console's host side (transmitq).
    pub fn console_write(&mut self, data: &[u8]) -> Result<(), TestError> {
        self.request(TRANSMITQ, &[data], &[])?;
        Ok(())
    }

    /// Reads console input (receiveq) until at least `want` bytes arrived or `timeout`,
    /// keeping `buffers` receive buffers of 64 bytes posted.
    pub fn console_read(&mut self, want: usize, timeout: Duration) -> Result<Vec<u8>, TestError> {
        const BUFFERS: usize = 4;
        let deadline = Instant::now() + timeout;
        let q = usize::from(RECEIVEQ);
        loop {
            while self.queues[q].pending.len() < BUFFERS {
                let b = self.alloc_buf(64, true)?;
                let segs = self.segments(&b);
                let qr = &mut self.queues[q];
                let head = qr.ring.add(&qr.ring_mem.mem(), &segs)?;
                qr.pending.insert(head, vec![b]);
                if qr.ring.publish(&qr.ring_mem.mem())? {
                    qr.port.notify()?;
                }
            }
            if self.console_rx.len() >= want {
                return Ok(std::mem::take(&mut self.console_rx));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(std::mem::take(&mut self.console_rx));
            }
            match self.wait_used(RECEIVEQ, (deadline - now).min(Duration::from_millis(100))) {
                Ok((_, used, bufs)) => {
                    for b in bufs {
                        let d = self.buf_read(&b, used as usize);
                        self.console_rx.extend_from_slice(&d);
                        self.free_buf(b);
                    }
                }
                Err(TestError::Timeout(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Commits `what` on `queue`: publishes the bad chain (or index) and notifies. The backend
    /// should answer with a protocol error; nothing is waited for.
    pub fn provoke(&mut self, queue: u16, what: Hostile) -> Result<(), TestError> {
        let q = usize::from(queue);
        let strategy = self.options.strategy;
        match what {
            Hostile::WrongTag => {
                let addr = match strategy.dma() {
                    DmaStrategy::Grant => DmaAddr::Bounce { offset: 0 }.encode(),
                    DmaStrategy::Bounce | DmaStrategy::Direct => {
                        DmaAddr::Grant { gref: 1, offset: 0 }.encode()
                    }
                };
                self.raw_chain(q, &[(addr, 16, false), (addr, 1, true)])?;
            }
            Hostile::BadAddress => {
                let addr = match strategy.dma() {
                    DmaStrategy::Grant => DmaAddr::Grant {
                        gref: 0x0fff_fff0,
                        offset: 0,
                    }
                    .encode(),
                    DmaStrategy::Bounce => DmaAddr::Bounce { offset: 1 << 40 }.encode(),
                    DmaStrategy::Direct => DmaAddr::Direct { gpa: 1 << 50 }.encode(),
                };
                self.raw_chain(q, &[(addr, 16, false), (addr, 1, true)])?;
            }
            Hostile::WriteIntoReadOnlyGrant => {
                let ro = self.grants.grant(self.backend, 1, Access::ReadOnly)?;
                let addr = DmaAddr::Grant {
                    gref: ro.refs()[0],
                    offset: 0,
                }
                .encode();
                self.raw_chain(q, &[(addr, 512, true)])?;
                // Kept granted until the frontend goes away.
                self.hostile_grants.push(ro);
            }
            Hostile::LoopingChain => {
                let qr = &mut self.queues[q];
                let mem = qr.ring_mem.mem();
                let Some(a) = qr.ring.take_free() else {
                    return Err(DriverRingError::Full { wanted: 1, free: 0 }.into());
                };
                let b = qr.ring.take_free().unwrap_or(a);
                qr.ring.write_raw_descriptor(
                    &mem,
                    a,
                    Descriptor {
                        addr: 0,
                        len: 0,
                        flags: VIRTQ_DESC_F_NEXT,
                        next: b,
                    },
                )?;
                qr.ring.write_raw_descriptor(
                    &mem,
                    b,
                    Descriptor {
                        addr: 0,
                        len: 0,
                        flags: VIRTQ_DESC_F_NEXT,
                        next: a,
                    },
                )?;
                qr.ring.offer_raw(&mem, a)?;
                self.kick(q)?;
            }
            Hostile::AvailJump => {
                let qr = &mut self.queues[q];
                let size = qr.ring.layout().size();
                qr.ring.skip_avail(size.wrapping_add(1));
                self.kick(q)?;
            }
            Hostile::RepeatHead => {
                let buf = self.alloc_buf(64, true)?;
                let segs = self.segments(&buf);
                let qr = &mut self.queues[q];
                let mem = qr.ring_mem.mem();
                let head = qr.ring.add(&mem, &segs)?;
                let size = qr.ring.layout().size();
                for _ in 1..size {
                    qr.ring.offer_raw(&mem, head)?;
                }
                self.kick(q)?;
                // Once the device has taken all of them (it asks to hear about the next one
                // through avail_event), offer the head once more.
                let qr = &mut self.queues[q];
                let layout = qr.ring.layout();
                let deadline = Instant::now() + self.options.timeout;
                while qr
                    .ring_mem
                    .mem()
                    .load_u16(layout.avail_event(), std::sync::atomic::Ordering::Acquire)
                    .map_err(TestError::Mem)?
                    != size
                {
                    if Instant::now() > deadline {
                        return Err(TestError::Timeout("the device to take the ring".into()));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                qr.ring.offer_raw(&qr.ring_mem.mem(), head)?;
                self.kick(q)?;
                self.hostile_buffers.push(buf);
            }
            Hostile::HeadOutOfRange => {
                let qr = &mut self.queues[q];
                let size = qr.ring.layout().size();
                qr.ring.offer_raw(&qr.ring_mem.mem(), size + 3)?;
                self.kick(q)?;
            }
        }
        Ok(())
    }

    /// Hostile, `bounce` only: writes `prefix` at pool offset 0, then offers one chain of
    /// `segs` (pool offset, length, device-writable) on `queue` and kicks. The descriptors may
    /// overlap each other and the prefix, and each may be as long as the whole pool. Returns
    /// the head; the chain's used entry is read with [`Self::wait_raw_used`]. With
    /// `indirect_at`, the descriptors go in an indirect table written at that pool offset and
    /// the chain takes one ring descriptor.
    pub fn offer_bounce_chain(
        &mut self,
        queue: u16,
        prefix: &[u8],
        segs: &[(u64, u32, bool)],
        indirect_at: Option<u64>,
    ) -> Result<u16, TestError> {
        let Some(Arena {
            backing: Backing::Granted(pool),
            ..
        }) = &self.arena
        else {
            return Err(TestError::Timeout(
                "a bounce pool (bounce strategy only)".into(),
            ));
        };
        if self.options.strategy != TestStrategy::Bounce {
            return Err(TestError::Timeout(
                "a bounce pool (bounce strategy only)".into(),
            ));
        }
        pool.mem().write(0, prefix).map_err(TestError::Mem)?;
        let raw: Vec<Segment> = segs
            .iter()
            .map(|&(offset, len, w)| (DmaAddr::Bounce { offset }.encode(), len, w))
            .collect();
        let q = usize::from(queue);
        let qr = &mut self.queues[q];
        let head = match indirect_at {
            None => qr.ring.add(&qr.ring_mem.mem(), &raw)?,
            Some(at) => {
                let table = DriverRing::indirect_table(&raw);
                pool.mem()
                    .write(at as usize, &table)
                    .map_err(TestError::Mem)?;
                let addr = DmaAddr::Bounce { offset: at }.encode();
                qr.ring
                    .add_indirect(&qr.ring_mem.mem(), addr, table.len() as u32)?
            }
        };
        self.kick(q)?;
        Ok(head)
    }

    /// The bytes of the bounce pool from `offset` (`bounce` only; empty otherwise).
    pub fn bounce_pool_read(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        if let Some(Arena {
            backing: Backing::Granted(pool),
            ..
        }) = &self.arena
        {
            if pool.mem().read(offset, &mut out).is_ok() {
                return out;
            }
        }
        Vec::new()
    }

    /// The size of the bounce pool in bytes (`bounce` only; 0 otherwise).
    pub fn bounce_pool_bytes(&self) -> usize {
        match (&self.arena, self.options.strategy) {
            (
                Some(Arena {
                    backing: Backing::Granted(pool),
                    ..
                }),
                TestStrategy::Bounce,
            ) => pool.pages() * PAGE_SIZE,
            _ => 0,
        }
    }

    /// Waits for the next used entry of `queue` and returns `(head, written length)`; the
    /// buffers of a chain offered through [`Self::request`] are released.
    pub fn wait_raw_used(
        &mut self,
        queue: u16,
        timeout: Duration,
    ) -> Result<(u16, u32), TestError> {
        let (head, len, bufs) = self.wait_used(queue, timeout)?;
        for b in bufs {
            self.free_buf(b);
        }
        Ok((head, len))
    }

    fn raw_chain(&mut self, q: usize, segs: &[Segment]) -> Result<(), TestError> {
        let qr = &mut self.queues[q];
        qr.ring.add(&qr.ring_mem.mem(), segs)?;
        self.kick(q)
    }

    fn kick(&mut self, q: usize) -> Result<(), TestError> {
        let qr = &mut self.queues[q];
        qr.ring.publish(&qr.ring_mem.mem())?;
        // Hostile chains notify unconditionally.
        qr.port.notify()?;
        Ok(())
    }

    /// 8.2: `Sf = 5`, wait for `Sb = 6`, then revoke everything and write `Sf = 6`.
    pub fn close(self) -> Result<(), TestError> {
        let store = Arc::clone(&self.store);
        let fdir = self.fdir.clone();
        let bdir = self.bdir.clone();
        let timeout = self.options.timeout;
        xenbus::switch_state(&*store, &fdir, XenbusState::Closing)?;
        wait_backend(&*store, &bdir, |s| s == XenbusState::Closed, false, timeout)?;
        // Only now: revoke grants, close ports.
        drop(self);
        xenbus::switch_state(&*store, &fdir, XenbusState::Closed)?;
        Ok(())
    }

    /// The platform this frontend acts on.
    pub fn platform(&self) -> &P {
        &self.platform
    }
}
