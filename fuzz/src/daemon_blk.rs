//! Target `daemon_blk`: the whole backend daemon serving a blk device to a frontend that lies.
//!
//! Each input starts a daemon (Dom0 of a loopback hypervisor, in-memory xenstore), attaches a
//! blk device, and connects the backend's own test frontend with the input's strategy, indirect
//! tables and queue count. Then the frontend runs the script: requests with any readable
//! buffers and writable lengths, raw blk requests (any type, sector, payload), and the hostile
//! moves of `test_utils::Hostile` (wrong tags, bad addresses, loops, `avail.idx` jumps,
//! writable buffers on read-only grants, heads out of range). Checked:
//! - nothing panics, on any daemon or device thread;
//! - every request is answered or the device is closed with an `error` node (a protocol error
//!   for that device only); a blk status is OK, IOERR or UNSUPP, and the used length never
//!   exceeds the writable buffers;
//! - after the frontend closes and the daemon stops, the backend holds nothing: no grant or
//!   foreign mapping, no port, no event handle (the loopback's counters);
//! - the image keeps its size;
//! - the byte budget (issue 13, finding 2): a request of aliased bounce descriptors over the
//!   device's cap (`size_max × seg_max + 17`) is answered IOERR, counted in `oversized`, and
//!   moves no image byte; one within the cap moves at most its length.

use std::sync::Arc;
use std::time::Duration;

use xenvirtio_backend::daemon::{Daemon, DaemonConfig, DomainSelector};
use xenvirtio_backend::test_utils::{
    FrontendOptions, Hostile, TestDevice, TestError, TestFrontend, TestStrategy, attach,
};
use xenvirtio_virtio::blk::{ReqHeader, S_IOERR, S_OK, S_UNSUPP, T_IN, T_OUT};
use xenvirtio_xen::loopback::LoopbackXen;
use xenvirtio_xenstore::xenbus::XenbusState;
use xenvirtio_xenstore::{MemStore, TxId, XenStore};

use crate::input::{Reader, Structured, Writer};

const FRONT: u16 = 4;

/// The hostile moves that break section 11 on a blk queue (`RepeatHead` is about a console's
/// receive buffers: a blk device completes every copy).
const HOSTILE: [Hostile; 6] = [
    Hostile::WrongTag,
    Hostile::BadAddress,
    Hostile::LoopingChain,
    Hostile::AvailJump,
    Hostile::WriteIntoReadOnlyGrant,
    Hostile::HeadOutOfRange,
];

/// One step of the frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A request of readable buffers and writable lengths (each at most 8 KiB).
    Request {
        /// Queue (modulo the queues).
        queue: u8,
        /// Device-readable buffers.
        readable: Vec<Vec<u8>>,
        /// Device-writable lengths.
        writable: Vec<u16>,
    },
    /// A blk request through `blk_raw`.
    Raw {
        /// Queue.
        queue: u8,
        /// Request type.
        req_type: u32,
        /// Sector.
        sector: u64,
        /// Payload after the header.
        payload: Vec<u8>,
        /// Bytes to read back (at most 8 KiB).
        in_len: u16,
    },
    /// A hostile move (`% 6`) on a queue.
    Provoke(u8, u8),
}

/// One fuzz input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInput {
    /// `% 4`: per-request grants, persistent grants, bounce, direct.
    pub strategy: u8,
    /// Requests through indirect tables.
    pub indirect: bool,
    /// Queues: `1 + n % 2`.
    pub queues: u8,
    /// Image sectors: `1 + n % 64`.
    pub sectors: u8,
    /// The frontend's steps.
    pub steps: Vec<Step>,
    /// Then, under `bounce` only, requests of aliased descriptors (read last, so that inputs
    /// saved before it existed read as none).
    pub aliased: Vec<Aliased>,
}

/// A blk request of `1 + count % 60` device-readable (a write) or device-writable (a read)
/// descriptors, each `len` bytes (at most the pool) at pool offset 0, after a header at offset
/// 0 and before a status byte at the pool's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aliased {
    /// A write (the descriptors are device-readable), or a read.
    pub write: bool,
    /// Descriptors: `1 + count % 60`.
    pub count: u8,
    /// Bytes per descriptor (clamped to 4096..=pool).
    pub len: u32,
    /// The request's sector.
    pub sector: u8,
}

/// Pages of the frontend's pool when the input has aliased requests (2 MiB: 60 descriptors
/// of it pass the 64 MiB cap of the default `max-queue-size`).
const ALIASED_POOL_PAGES: usize = 512;

impl Structured for DaemonInput {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            strategy: r.u8(),
            indirect: r.bool(),
            queues: r.u8(),
            sectors: r.u8(),
            steps: r.list(8, |r| match r.choice(4) {
                0 => Step::Request {
                    queue: r.u8(),
                    readable: r.list(3, |r| r.bytes(1024)),
                    writable: r.list(3, |r| r.u16() % 8193),
                },
                1 | 2 => Step::Raw {
                    queue: r.u8(),
                    req_type: r.u32(),
                    sector: r.u64(),
                    payload: r.bytes(2048),
                    in_len: r.u16() % 8193,
                },
                _ => Step::Provoke(r.u8(), r.u8()),
            }),
            aliased: r.list(4, |r| Aliased {
                write: r.bool(),
                count: r.u8(),
                len: r.u32(),
                sector: r.u8(),
            }),
        }
    }

    fn write(&self, w: &mut Writer) {
        w.u8(self.strategy);
        w.bool(self.indirect);
        w.u8(self.queues);
        w.u8(self.sectors);
        w.list(&self.steps, 8, |w, s| match s {
            Step::Request {
                queue,
                readable,
                writable,
            } => {
                w.choice(0, 4);
                w.u8(*queue);
                w.list(readable, 3, |w, b| w.bytes(b, 1024));
                w.list(writable, 3, |w, l| w.u16(*l));
            }
            Step::Raw {
                queue,
                req_type,
                sector,
                payload,
                in_len,
            } => {
                w.choice(1, 4);
                w.u8(*queue);
                w.u32(*req_type);
                w.u64(*sector);
                w.bytes(payload, 2048);
                w.u16(*in_len);
            }
            Step::Provoke(q, h) => {
                w.choice(3, 4);
                w.u8(*q);
                w.u8(*h);
            }
        });
        w.list(&self.aliased, 4, |w, a| {
            w.bool(a.write);
            w.u8(a.count);
            w.u32(a.len);
            w.u8(a.sector);
        });
    }
}

crate::structured_input!(DaemonInput);

/// Runs one input.
pub fn run(input: &DaemonInput) {
    let dir = crate::temp_dir("xenvirtio-fuzz-daemon");
    let image = dir.path().join("disk.img");
    let sectors = 1 + u64::from(input.sectors % 64);
    let data: Vec<u8> = (0..sectors * 512)
        .map(|i| (i * 7 + i / 512) as u8)
        .collect();
    std::fs::write(&image, &data).expect("the image");

    let hv = LoopbackXen::new();
    let xs = MemStore::new();
    let dom0: Arc<dyn XenStore> = Arc::new(xs.connect(0).expect("dom0"));
    dom0.write_str(TxId::NONE, "/local/domain/0/domid", "0")
        .expect("domid");
    let config = DaemonConfig {
        shutdown_grace: Duration::from_millis(200),
        allow_direct: vec![DomainSelector::Id(FRONT)],
        ..DaemonConfig::default()
    };
    let daemon = Daemon::new(hv.domain(0), Arc::new(xs.connect(0).expect("dom0")), config)
        .expect("a daemon")
        .spawn()
        .expect("the daemon starts");
    xs.start_guest(FRONT).expect("the guest");

    let strategy = TestStrategy::ALL[usize::from(input.strategy % 4)];
    let queues = 1 + u32::from(input.queues % 2);
    let mut device = TestDevice::blk(&image).with_queues(queues);
    if strategy == TestStrategy::Direct {
        device = device.without_grant_usage();
    }
    attach(&*dom0, 0, FRONT, 0, &device).expect("attach");
    let mut options = FrontendOptions::new(strategy).queues(queues);
    options.indirect = input.indirect;
    options.timeout = Duration::from_secs(5);
    if !input.aliased.is_empty() {
        options.arena_pages = ALIASED_POOL_PAGES;
    }
    let guest: Arc<dyn XenStore> = Arc::new(xs.connect(FRONT).expect("the guest's store"));
    let mut frontend = TestFrontend::connect(hv.domain(FRONT), guest, 0, 0, options)
        .unwrap_or_else(|e| panic!("a well-behaved {strategy:?} frontend could not connect: {e}"));

    let mut closed = false;
    for step in &input.steps {
        let result = match step {
            Step::Request {
                queue,
                readable,
                writable,
            } => {
                let q = u16::from(*queue) % queues as u16;
                let readable: Vec<&[u8]> = readable.iter().map(Vec::as_slice).collect();
                let writable: Vec<usize> = writable.iter().map(|l| usize::from(*l)).collect();
                frontend.request(q, &readable, &writable).map(|(used, _)| {
                    let room: usize = writable.iter().sum();
                    assert!(
                        used as usize <= room,
                        "used length {used} over {room} writable bytes"
                    );
                })
            }
            Step::Raw {
                queue,
                req_type,
                sector,
                payload,
                in_len,
            } => {
                let q = u16::from(*queue) % queues as u16;
                frontend
                    .blk_raw(q, *req_type, *sector, payload, usize::from(*in_len))
                    .map(|(status, body)| {
                        assert!(
                            [S_OK, S_IOERR, S_UNSUPP].contains(&status),
                            "status {status:#x}"
                        );
                        assert!(body.len() <= usize::from(*in_len));
                    })
            }
            Step::Provoke(q, h) => {
                let hostile = HOSTILE[usize::from(*h) % HOSTILE.len()];
                let q = u16::from(*q) % queues as u16;
                match frontend.provoke(q, hostile) {
                    // Section 11: a protocol error for the device, with a reason.
                    Ok(()) => {
                        let state = frontend
                            .wait_backend_state(
                                |s| matches!(s, XenbusState::Closing | XenbusState::Closed),
                                Duration::from_secs(5),
                            )
                            .unwrap_or_else(|e| panic!("{hostile:?} was not refused: {e}"));
                        let error = frontend.backend_error().unwrap_or_default();
                        assert!(
                            !error.is_empty(),
                            "{hostile:?}: {state} without an error node"
                        );
                        closed = true;
                        break;
                    }
                    Err(TestError::Timeout(e)) => panic!("{hostile:?}: {e}"),
                    // A move this strategy cannot make (no read-only grants under bounce, ...).
                    Err(_) => Ok(()),
                }
            }
        };
        match result {
            Ok(()) => {}
            // A protocol error closes the device, with a reason.
            Err(TestError::BackendClosed { error, .. }) => {
                assert!(
                    !error.is_empty(),
                    "the backend closed the device without an error node"
                );
                closed = true;
                break;
            }
            // Requests the frontend itself refuses (too many buffers for the queue, ...).
            Err(e) if !matches!(e, TestError::Timeout(_)) => {}
            Err(e) => panic!("the backend did not answer {step:?}: {e}"),
        }
    }
    if !closed && strategy == TestStrategy::Bounce {
        for a in &input.aliased {
            if !aliased_request(&daemon, &mut frontend, a, sectors) {
                closed = true;
                break;
            }
        }
    }
    if closed {
        drop(frontend);
    } else if let Err(e) = frontend.close() {
        assert!(
            matches!(e, TestError::BackendClosed { .. }),
            "closing a connected device failed: {e}"
        );
    }
    daemon.stop().expect("the daemon stops");
    let stats = hv.stats(0);
    assert!(
        stats.grant_maps == 0 && stats.foreign_maps == 0 && stats.bound_ports == 0,
        "the backend still holds {stats:?}"
    );
    let len = std::fs::metadata(&image).expect("the image").len();
    assert_eq!(len, sectors * 512, "the image changed size");
}

/// One aliased request and the byte budget's oracle; false when the device closed.
fn aliased_request(
    daemon: &xenvirtio_backend::daemon::RunningDaemon,
    frontend: &mut TestFrontend<xenvirtio_xen::loopback::LoopbackDomain>,
    a: &Aliased,
    sectors: u64,
) -> bool {
    let pool = frontend.bounce_pool_bytes() as u64;
    let stats = || daemon.handle().device(FRONT, 0).unwrap_or_default();
    // The counters are published after each batch, so those of the request before this one
    // may still be on their way: wait until they hold still before taking the baseline.
    let mut before = stats();
    let settle = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let again = stats();
        let same = (again.requests, again.bytes_read, again.bytes_written)
            == (before.requests, before.bytes_read, before.bytes_written);
        before = again;
        if same || std::time::Instant::now() > settle {
            break;
        }
    }
    let len = u64::from(a.len).clamp(4096, pool);
    let count = 1 + u64::from(a.count % 60);
    let mut segs = vec![(0, 16, false)];
    segs.extend((0..count).map(|_| (0, len as u32, !a.write)));
    segs.push((pool - 1, 1, true));
    let header = ReqHeader {
        req_type: if a.write { T_OUT } else { T_IN },
        reserved: 0,
        sector: u64::from(a.sector) % sectors,
    }
    .to_bytes();
    if frontend
        .offer_bounce_chain(0, &header, &segs, None)
        .is_err()
    {
        // More descriptors than the ring has free: the frontend's own refusal.
        return true;
    }
    let used = match frontend.wait_raw_used(0, Duration::from_secs(30)) {
        Ok((_, used)) => used,
        Err(TestError::BackendClosed { error, .. }) => {
            assert!(!error.is_empty(), "closed without an error node");
            return false;
        }
        Err(e) => panic!("the backend did not answer {a:?}: {e}"),
    };
    let status = frontend.bounce_pool_read(pool as usize - 1, 1)[0];
    // The counters are published after the batch the frontend already saw completed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut after = stats();
    while after.requests <= before.requests && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        after = stats();
    }
    let moved =
        (after.bytes_read - before.bytes_read) + (after.bytes_written - before.bytes_written);
    let total = 16 + count * len + 1;
    // The offer of the default `max-queue-size` (1024): seg_max 1022, size_max 65536.
    let cap = 1022 * 65536 + 17;
    if total > cap {
        assert_eq!(
            (status, used, after.oversized - before.oversized, moved),
            (S_IOERR, 1, 1, 0),
            "a request of {total} bytes over the cap {cap}"
        );
    } else {
        assert!(
            moved <= total && [S_OK, S_IOERR].contains(&status),
            "a request of {total} bytes moved {moved} (status {status})"
        );
    }
    true
}

/// Seeds: the backend's loopback device tests, per strategy, and each hostile move.
pub fn seeds() -> Vec<(&'static str, DaemonInput)> {
    let raw = |req_type, sector, payload: Vec<u8>, in_len| Step::Raw {
        queue: 0,
        req_type,
        sector,
        payload,
        in_len,
    };
    let io = vec![
        raw(1, 3, vec![0xab; 1024], 0),
        raw(0, 3, vec![], 1024),
        raw(4, 0, vec![], 0),
        raw(8, 0, vec![], 20),
        raw(99, 0, vec![], 0),
        Step::Request {
            queue: 1,
            readable: vec![vec![0; 16]],
            writable: vec![512, 1],
        },
    ];
    let mut out = Vec::new();
    for (i, name) in ["io_grant", "io_persistent", "io_bounce", "io_direct"]
        .into_iter()
        .enumerate()
    {
        out.push((
            name,
            DaemonInput {
                strategy: i as u8,
                indirect: i % 2 == 1,
                queues: 1,
                sectors: 15,
                steps: io.clone(),
                aliased: Vec::new(),
            },
        ));
    }
    let names = [
        "hostile_wrong_tag",
        "hostile_bad_address",
        "hostile_loop",
        "hostile_avail_jump",
        "hostile_read_only_grant",
        "hostile_head_out_of_range",
    ];
    for (h, name) in names.into_iter().enumerate() {
        out.push((
            name,
            DaemonInput {
                strategy: (h % 4) as u8,
                indirect: false,
                queues: 0,
                sectors: 7,
                steps: vec![raw(0, 0, vec![], 512), Step::Provoke(0, h as u8)],
                aliased: Vec::new(),
            },
        ));
    }
    // The byte budget: aliased 2 MiB descriptors, under and over the cap, both directions.
    out.push((
        "aliased_bounce_over_and_under_the_cap",
        DaemonInput {
            strategy: 2,
            indirect: false,
            queues: 0,
            sectors: 15,
            steps: vec![raw(0, 0, vec![], 512)],
            aliased: vec![
                Aliased {
                    write: true,
                    count: 59,
                    len: 2 << 20,
                    sector: 0,
                },
                Aliased {
                    write: false,
                    count: 59,
                    len: 2 << 20,
                    sector: 1,
                },
                Aliased {
                    write: false,
                    count: 1,
                    len: 4096,
                    sector: 2,
                },
            ],
        },
    ));
    out
}
