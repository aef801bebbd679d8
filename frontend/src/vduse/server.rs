//! A VDUSE virtio-blk device in this domain's kernel, served from a [`BlockExport`]: the
//! control thread answers the kernel (status, queue state, IOTLB changes) at all times, even
//! while the export waits for Dom0's backend; one thread per virtqueue takes the requests the
//! kernel's `virtio_blk` driver queues, and a pool of workers per queue serves them at once.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use xenvirtio_virtio::blk::{BlkConfig, SECTOR_SIZE};
use xenvirtio_virtio::device_queue::{Chain, DeviceQueue, QueueError};
use xenvirtio_virtio::features::{self, bit};
use xenvirtio_virtio::split::RingLayout;
use xenvirtio_xen::mem::SharedMem;

use super::device::{QueueInfo, Request, VduseDevice};
use super::iova::IovaMap;
use super::request::{self, ChainIo, MAX_REQUEST_BYTES};
use super::{VdpaBus, VduseControl, VduseError, blk_spec};
use crate::nbd::BlockExport;

/// `VIRTIO_CONFIG_S_DRIVER_OK`.
const DRIVER_OK: u8 = 4;
/// How often the threads look at their stop flag.
const TICK: Duration = Duration::from_millis(200);
/// Each queue's size.
const QUEUE_SIZE: u16 = 128;
/// Requests each queue serves at the same time (fio's QD32 on a single queue).
const WORKERS: usize = 32;
/// The most data segments in one request: with the header and the status, a chain of direct
/// descriptors (indirect ones are not offered) must fit in the ring.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The largest segment.
const SIZE_MAX: u32 = 32 << 10;
// The driver can never build a request larger than what `request` serves.
const _: () = assert!(SEG_MAX as usize * SIZE_MAX as usize <= MAX_REQUEST_BYTES);

/// What the control thread and the queue threads share.
struct Shared {
    dev: VduseDevice,
    iova: IovaMap,
    export: Arc<dyn BlockExport>,
    serial: String,
    /// Each queue's next available index, for `VDUSE_GET_VQ_STATE`.
    next_avail: Vec<AtomicU16>,
}

/// A running VDUSE block device.
pub struct VduseBlk {
    name: String,
    node: Option<PathBuf>,
    queues: u32,
    stop: Arc<AtomicBool>,
    control_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VduseBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VduseBlk")
            .field("name", &self.name)
            .field("node", &self.node)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl VduseBlk {
    /// Creates VDUSE device `name` with `queues` virtqueues over `export`, adds it to the vDPA
    /// bus, and waits for the kernel's virtio-blk driver to bind it. `serial` is its virtio
    /// serial (`GET_ID`, at most 20 bytes kept).
    pub fn start(
        export: Arc<dyn BlockExport>,
        name: &str,
        serial: &str,
        queues: u32,
    ) -> Result<VduseBlk, VduseError> {
        let block = export.block_size();
        let mut offered = bit(features::blk::SEG_MAX)
            | bit(features::blk::SIZE_MAX)
            | bit(features::blk::BLK_SIZE);
        let mut config = BlkConfig {
            capacity: export.size() / SECTOR_SIZE,
            size_max: SIZE_MAX,
            seg_max: SEG_MAX,
            blk_size: block,
            num_queues: u16::try_from(queues.max(1)).unwrap_or(1),
            ..BlkConfig::default()
        };
        if export.read_only() {
            offered |= bit(features::blk::RO);
        }
        if export.can_flush() {
            offered |= bit(features::blk::FLUSH);
        }
        if export.can_trim() && !export.read_only() {
            offered |= bit(features::blk::DISCARD);
            config.max_discard_sectors = u32::MAX >> 9;
            config.max_discard_seg = 1;
            config.discard_sector_alignment = block / 512;
        }
        if export.can_write_zeroes() && !export.read_only() {
            offered |= bit(features::blk::WRITE_ZEROES);
            config.max_write_zeroes_sectors = (MAX_REQUEST_BYTES / 512) as u32;
            config.max_write_zeroes_seg = 1;
            config.write_zeroes_may_unmap = 1;
        }
        if queues > 1 {
            offered |= bit(features::blk::MQ);
        }
        let spec = blk_spec(name, &config, offered, QUEUE_SIZE);
        let control = VduseControl::open()?;
        control.create(&spec)?;
        let started = Self::run(export, name, serial, spec.queues);
        match started {
            Ok(s) => Ok(s),
            Err(e) => {
                if let Err(d) = control.destroy(name) {
                    tracing::warn!(device = name, "cannot destroy the VDUSE device: {d}");
                }
                Err(e)
            }
        }
    }

    fn run(
        export: Arc<dyn BlockExport>,
        name: &str,
        serial: &str,
        queues: u32,
    ) -> Result<VduseBlk, VduseError> {
        let shared = Arc::new(Shared {
            dev: VduseDevice::open(name)?,
            iova: IovaMap::default(),
            export,
            serial: serial.to_string(),
            next_avail: (0..queues).map(|_| AtomicU16::new(0)).collect(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("vduse-{name}"))
                .spawn(move || control_loop(&shared, &stop))
                .map_err(|source| VduseError::Io {
                    what: "starting the VDUSE control thread",
                    source,
                })?
        };
        let mut blk = VduseBlk {
            name: name.to_string(),
            node: None,
            queues,
            stop,
            control_thread: Some(thread),
        };
        drop(shared);
        let mut bus = VdpaBus::open()?;
        if let Err(e) = bus.add(name) {
            blk.stop_threads();
            return Err(e);
        }
        blk.node = find_node(name);
        Ok(blk)
    }

    /// The kernel's block device for it (`/dev/vda`, ...), once its driver bound it.
    pub fn node(&self) -> Option<&PathBuf> {
        self.node.as_ref()
    }

    /// How many virtqueues the device has.
    pub fn queues(&self) -> u32 {
        self.queues
    }

    /// Takes the device off the vDPA bus (the kernel's driver lets go of it), stops serving it
    /// and destroys it.
    pub fn stop(mut self) -> Result<(), VduseError> {
        let removed = VdpaBus::open().and_then(|mut bus| bus.remove(&self.name));
        self.stop_threads();
        removed?;
        // The device's fd closed with the last thread: now it can be destroyed.
        VduseControl::open()?.destroy(&self.name)
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.control_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VduseBlk {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// `/dev/<disk>` of the virtio device under `/sys/bus/vdpa/devices/<name>`.
fn find_node(name: &str) -> Option<PathBuf> {
    let dev = PathBuf::from(format!("/sys/bus/vdpa/devices/{name}"));
    for _ in 0..50 {
        for entry in std::fs::read_dir(&dev).ok()?.flatten() {
            let n = entry.file_name();
            if !n.to_string_lossy().starts_with("virtio") {
                continue;
            }
            if let Some(disk) = std::fs::read_dir(entry.path().join("block"))
                .ok()
                .and_then(|mut d| d.next())
                .and_then(Result::ok)
            {
                return Some(PathBuf::from("/dev").join(disk.file_name()));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The control thread: answers every message of the kernel; starts the queue threads at
/// `DRIVER_OK` and stops them at a reset.
fn control_loop(shared: &Arc<Shared>, stop: &AtomicBool) {
    let mut workers: Vec<(Arc<AtomicBool>, JoinHandle<()>)> = Vec::new();
    let stop_workers = |workers: &mut Vec<(Arc<AtomicBool>, JoinHandle<()>)>| {
        for (flag, _) in workers.iter() {
            flag.store(true, Ordering::SeqCst);
        }
        for (_, t) in workers.drain(..) {
            let _ = t.join();
        }
    };
    let name = shared.dev.name().to_string();
    while !stop.load(Ordering::SeqCst) {
        let (id, req) = match shared.dev.next_request(TICK) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(device = %name, "VDUSE control: {e}");
                std::thread::sleep(TICK);
                continue;
            }
        };
        let (ok, state) = match req {
            Request::GetVqState { index } => {
                let avail = shared
                    .next_avail
                    .get(index as usize)
                    .map_or(0, |a| a.load(Ordering::SeqCst));
                (true, Some((index, avail)))
            }
            Request::SetStatus(status) => {
                tracing::debug!(device = %name, status, "VDUSE status");
                if status & DRIVER_OK != 0 && workers.is_empty() {
                    for index in 0..shared.next_avail.len() as u32 {
                        match start_queue(shared, index) {
                            Ok(w) => workers.push(w),
                            Err(e) => {
                                tracing::error!(device = %name, queue = index, "cannot start the queue: {e}")
                            }
                        }
                    }
                } else if status == 0 {
                    stop_workers(&mut workers);
                    shared.iova.clear();
                    for a in &shared.next_avail {
                        a.store(0, Ordering::SeqCst);
                    }
                }
                (true, None)
            }
            Request::UpdateIotlb { start, last } => {
                shared.iova.invalidate(start, last);
                (true, None)
            }
            Request::Unknown(kind) => {
                tracing::warn!(device = %name, kind, "unknown VDUSE request");
                (false, None)
            }
        };
        if let Err(e) = shared.dev.respond(id, ok, state) {
            tracing::error!(device = %name, "VDUSE control: {e}");
        }
    }
    stop_workers(&mut workers);
}

/// An eventfd for one queue's kicks.
fn eventfd() -> Result<OwnedFd, VduseError> {
    // SAFETY: eventfd(2) takes only scalars; a non-negative result is a new fd nobody owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(VduseError::Io {
            what: "eventfd",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits up to TICK for a kick on `fd` and consumes it.
fn wait_kick(fd: &OwnedFd) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, as the count says.
    let n = unsafe { libc::poll(&raw mut pfd, 1, TICK.as_millis() as i32) };
    if n > 0 {
        let mut v = 0u64;
        // SAFETY: an eventfd read fills exactly 8 bytes into `v`, which is 8 bytes.
        let _ = unsafe { libc::read(fd.as_raw_fd(), (&raw mut v).cast(), 8) };
    }
}

fn start_queue(
    shared: &Arc<Shared>,
    index: u32,
) -> Result<(Arc<AtomicBool>, JoinHandle<()>), VduseError> {
    let info = shared.dev.queue_info(index)?;
    let layout = RingLayout::new(info.num, 32768).map_err(|e| VduseError::Spec {
        why: format!("queue {index}: {e}"),
    })?;
    check_layout(index, &info, &layout)?;
    let kick = eventfd()?;
    shared.dev.set_kick(index, &kick)?;
    let flag = Arc::new(AtomicBool::new(false));
    let thread = {
        let shared = Arc::clone(shared);
        let flag = Arc::clone(&flag);
        std::thread::Builder::new()
            .name(format!("vduse-q{index}"))
            .spawn(move || {
                if let Err(e) = serve_queue(&shared, index, info, layout, &kick, &flag) {
                    tracing::error!(device = %shared.dev.name(), queue = index, "queue stopped: {e}");
                }
            })
            .map_err(|source| VduseError::Io {
                what: "starting a VDUSE queue thread",
                source,
            })?
    };
    Ok((flag, thread))
}

/// The kernel laid the queue out as `RingLayout` does (one allocation, used ring 4-byte
/// aligned after the available ring: what `vq_align` 4 asks for).
fn check_layout(index: u32, info: &QueueInfo, layout: &RingLayout) -> Result<(), VduseError> {
    let driver = info.desc + layout.avail_offset() as u64;
    let device = info.desc + layout.used_offset() as u64;
    if info.driver != driver || info.device != device {
        return Err(VduseError::Spec {
            why: format!(
                "queue {index}: the kernel laid the ring out at desc {:#x}, avail {:#x}, used {:#x}; \
                 expected avail {driver:#x} and used {device:#x}",
                info.desc, info.driver, info.device
            ),
        });
    }
    Ok(())
}

/// Serves queue `index` until `stop`: this thread takes the chains the driver makes available
/// and hands them to [`WORKERS`] workers, which serve them at the same time and complete each
/// on the used ring as soon as it is done, in any order (virtio 1.2 section 2.7.13). Served one
/// at a time, every request would wait for the one before it to come back from Dom0, and a
/// driver's queue depth would buy nothing.
fn serve_queue(
    shared: &Shared,
    index: u32,
    info: QueueInfo,
    layout: RingLayout,
    kick: &OwnedFd,
    stop: &AtomicBool,
) -> Result<(), VduseError> {
    let ring_region = shared
        .iova
        .region(&shared.dev, info.desc, layout.total_len() as u64)?;
    let ring = ring_region.window(info.desc, layout.total_len());
    let queue = Mutex::new(DeviceQueue::new(layout, 0));
    let (jobs, inbox) = mpsc::channel::<Chain>();
    let inbox = Mutex::new(inbox);
    let failure: Mutex<Option<VduseError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for w in 0..WORKERS {
            let (queue, inbox, ring, failure) = (&queue, &inbox, &ring, &failure);
            let spawned = std::thread::Builder::new()
                .name(format!("vduse-q{index}w{w}"))
                .spawn_scoped(s, move || {
                    if let Err(e) = complete_requests(shared, index, queue, ring, inbox) {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                });
            if let Err(source) = spawned {
                // the workers already started serve alone; say why there are fewer
                tracing::warn!(device = %shared.dev.name(), queue = index, "only {w} request workers: {source}");
                break;
            }
        }
        let taken = take_requests(shared, index, &queue, &ring, kick, stop, &jobs, &failure);
        // the workers finish what they hold, then see the closed channel and return
        drop(jobs);
        taken
    })?;
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The queue thread's part: every chain the driver makes available goes to the workers, with
/// notifications off while there is more to take; then it sleeps until a kick (or a tick, to
/// look at `stop` and at a worker's failure).
#[allow(clippy::too_many_arguments)]
fn take_requests(
    shared: &Shared,
    index: u32,
    queue: &Mutex<DeviceQueue>,
    ring: &SharedMem<'_>,
    kick: &OwnedFd,
    stop: &AtomicBool,
    jobs: &mpsc::Sender<Chain>,
    failure: &Mutex<Option<VduseError>>,
) -> Result<(), VduseError> {
    let qerr = |e: QueueError| queue_error(index, e);
    let lock = || queue.lock().unwrap_or_else(|p| p.into_inner());
    while !stop.load(Ordering::SeqCst) {
        if failure.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Ok(()); // serve_queue reports it
        }
        lock().disable_notification(ring).map_err(qerr)?;
        loop {
            let mut no_indirect = |_: u64, _: u32| -> Result<Vec<u8>, String> {
                Err("indirect descriptors were not offered".into())
            };
            loop {
                let mut q = lock();
                let Some(chain) = q.pop_chain(ring, &mut no_indirect).map_err(qerr)? else {
                    break;
                };
                shared.next_avail[index as usize].store(q.next_avail(), Ordering::SeqCst);
                drop(q);
                if jobs.send(chain).is_err() {
                    return Ok(()); // no worker left: each said why
                }
            }
            if !lock().enable_notification(ring).map_err(qerr)? {
                break;
            }
            lock().disable_notification(ring).map_err(qerr)?;
        }
        wait_kick(kick);
    }
    Ok(())
}

/// A worker: serves the chains it takes from `inbox` from the export, each completed on the
/// used ring (and the driver interrupted if it asked to be) as soon as it is served. Returns
/// when the queue thread closes the channel.
fn complete_requests(
    shared: &Shared,
    index: u32,
    queue: &Mutex<DeviceQueue>,
    ring: &SharedMem<'_>,
    inbox: &Mutex<mpsc::Receiver<Chain>>,
) -> Result<(), VduseError> {
    let mut scratch = Vec::new();
    loop {
        let next = inbox.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(chain) = next else {
            return Ok(());
        };
        let io = ChainIo::new(&shared.dev, &shared.iova, &chain);
        let served = request::serve(&io, shared.export.as_ref(), &shared.serial, &mut scratch);
        let written = match served {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(device = %shared.dev.name(), queue = index, "bad request: {e}");
                0
            }
        };
        let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
        q.add_used(ring, chain.head, written)
            .map_err(|e| queue_error(index, e))?;
        if q.needs_notification(ring)
            .map_err(|e| queue_error(index, e))?
        {
            shared.dev.inject_irq(index)?;
        }
    }
}

fn queue_error(index: u32, e: QueueError) -> VduseError {
    VduseError::Spec {
        why: format!("queue {index}: {e}"),
    }
}
