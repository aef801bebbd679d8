//! The benchmark of `xenvirtio-loopback bench`: the same blk workload over every DMA strategy
//! in one run, with what each request cost in map calls, notifications and copies.
//!
//! This module owns the workload (zero-copy requests through [`BlkQueue`], one thread per
//! queue, for a fixed time per run after a fixed number of warm-up requests), the order of the runs (strategies interleaved
//! round by round, so that a noisy neighbour hurts every strategy alike), and the report: the
//! median of each strategy's rounds, the counts per request, and the ratios between
//! strategies. It asserts nothing about speed: it measures and prints. Each run attaches a
//! fresh device with the real toolstack and detaches it afterwards, so no run inherits another's
//! mappings.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use xenvirtio_backend::admin::{AdminError, AttachRequest, DetachRequest};
use xenvirtio_frontend::blk::{BlkDevice, BlkError, BlkOptions};
use xenvirtio_frontend::dma::DmaError;
use xenvirtio_frontend::{ConnectError, ConnectOptions};
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_xen::loopback::LoopbackDomain;
use xenvirtio_xen::mem::MemError;

use crate::counters::{BackendCounts, Counters, FrontendCounts, HypervisorCounts, PerRequest};
use crate::pair::{Pair, PairError};
use crate::role::RoleName;

/// How long to wait for the daemon to publish the counters of requests the frontend already
/// saw complete (it publishes after each batch).
const SETTLE: Duration = Duration::from_secs(2);

/// A way to hand memory to the backend: a DMA strategy, and for `grant` whether the arena is
/// offered as persistent grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// `grant`, the backend maps and unmaps each request's pages.
    GrantPerRequest,
    /// `grant` with `feature-persistent`: the backend keeps the arena mapped.
    GrantPersistent,
    /// `bounce`: a pool granted and mapped once.
    Bounce,
    /// `direct`: guest-physical addresses, foreign-mapped in 2 MiB chunks and cached.
    Direct,
}

impl Variant {
    /// Every variant, in the order reports list them.
    pub const ALL: [Variant; 4] = [
        Variant::GrantPerRequest,
        Variant::GrantPersistent,
        Variant::Bounce,
        Variant::Direct,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Variant::GrantPerRequest => "grant",
            Variant::GrantPersistent => "grant-persistent",
            Variant::Bounce => "bounce",
            Variant::Direct => "direct",
        }
    }

    /// The DMA strategy.
    pub fn strategy(self) -> DmaStrategy {
        match self {
            Variant::GrantPerRequest | Variant::GrantPersistent => DmaStrategy::Grant,
            Variant::Bounce => DmaStrategy::Bounce,
            Variant::Direct => DmaStrategy::Direct,
        }
    }

    /// Whether persistent grants are offered.
    pub fn persistent(self) -> bool {
        self == Variant::GrantPersistent
    }
}

impl FromStr for Variant {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Variant, BenchError> {
        Variant::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| BenchError::BadVariant(s.to_owned()))
    }
}

/// An access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

impl Pattern {
    /// The name in a workload (`randread:4k`).
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
        }
    }

    fn writes(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::Write)
    }

    fn random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

/// A pattern and a request size: `randread:4k`, `write:64k`, `read:131072`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Workload {
    /// The pattern.
    pub pattern: Pattern,
    /// Bytes per request, a positive multiple of 512.
    pub block_size: usize,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.block_size % 1024 == 0 {
            write!(f, "{}:{}k", self.pattern.name(), self.block_size / 1024)
        } else {
            write!(f, "{}:{}", self.pattern.name(), self.block_size)
        }
    }
}

impl FromStr for Workload {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Workload, BenchError> {
        let bad = |why: &str| BenchError::BadWorkload {
            text: s.to_owned(),
            why: why.to_owned(),
        };
        let (p, bs) = s
            .split_once(':')
            .ok_or_else(|| bad("write PATTERN:SIZE, e.g. randread:4k"))?;
        let pattern = [
            Pattern::RandRead,
            Pattern::RandWrite,
            Pattern::Read,
            Pattern::Write,
        ]
        .into_iter()
        .find(|x| x.name() == p)
        .ok_or_else(|| bad("the pattern is randread, randwrite, read or write"))?;
        let (digits, unit) = match bs.strip_suffix(['k', 'K']) {
            Some(d) => (d, 1024),
            None => (bs, 1),
        };
        let block_size = digits
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_mul(unit))
            .ok_or_else(|| bad("the size is a number of bytes, or of KiB with a k"))?;
        if block_size == 0 || block_size % 512 != 0 {
            return Err(bad("the size must be a positive multiple of 512"));
        }
        Ok(Workload {
            pattern,
            block_size,
        })
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchConfig {
    /// The workloads, each run over every variant.
    pub workloads: Vec<Workload>,
    /// The variants, in report order (the first is the baseline of the ratios).
    pub variants: Vec<Variant>,
    /// How long each timed run lasts.
    pub duration: Duration,
    /// Untimed requests before each run (fills persistent-grant and direct-map caches).
    pub warmup: u64,
    /// Requests in flight per queue.
    pub depth: u32,
    /// Queues, one thread each.
    pub queues: u32,
    /// Rounds: every variant runs once per round, interleaved; the report shows medians.
    pub rounds: u32,
    /// Copy each request's data between a private buffer and DMA memory, as a caller with its
    /// own buffers does (what NBD clients cost); default zero-copy.
    pub copy: bool,
    /// The frontend's role (it must allow every variant: `x86-pvh` does here).
    pub role: RoleName,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            workloads: vec![
                Workload {
                    pattern: Pattern::RandRead,
                    block_size: 4096,
                },
                Workload {
                    pattern: Pattern::RandWrite,
                    block_size: 4096,
                },
                Workload {
                    pattern: Pattern::Read,
                    block_size: 65536,
                },
            ],
            variants: Variant::ALL.to_vec(),
            duration: Duration::from_secs(1),
            warmup: 2_000,
            depth: 32,
            queues: 1,
            rounds: 3,
            copy: false,
            role: RoleName::X86Pvh,
        }
    }
}

impl BenchConfig {
    /// Pages of DMA memory a run needs: every request's buffer in flight at once, plus room
    /// for the request slots and indirect tables.
    pub fn dma_pages(&self, workload: &Workload) -> usize {
        let per_request = workload.block_size.div_ceil(xenvirtio_xen::mem::PAGE_SIZE);
        let in_flight = self.depth as usize * self.queues as usize;
        (in_flight * (per_request + 1) + 64).max(xenvirtio_frontend::dma::DEFAULT_DMA_PAGES)
    }
}

/// Why the benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A variant name that does not exist.
    #[error("{0:?} is not a strategy: use grant, grant-persistent, bounce or direct")]
    BadVariant(String),
    /// A workload that does not parse.
    #[error("workload {text:?} is not valid: {why}")]
    BadWorkload {
        /// What was given.
        text: String,
        /// Why.
        why: String,
    },
    /// Nothing to measure.
    #[error("{0}")]
    Empty(&'static str),
    /// The image cannot be read.
    #[error("cannot use the image {}", path.display())]
    Image {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image is smaller than one request.
    #[error("the image ({size} bytes) is smaller than one {block_size}-byte request")]
    ImageTooSmall {
        /// Its size.
        size: u64,
        /// The request size.
        block_size: usize,
    },
    /// The run needs more grants than the loopback hypervisor allows a domain.
    #[error(
        "{workload} with depth {depth} on {queues} queue(s) needs {pages} pages of DMA memory, \
         more than the {limit} grants a domain may hold (gntalloc's default limit); lower \
         --depth or --queues"
    )]
    TooManyGrants {
        /// The workload.
        workload: Workload,
        /// Depth per queue.
        depth: u32,
        /// Queues.
        queues: u32,
        /// Pages needed.
        pages: usize,
        /// The limit.
        limit: usize,
    },
    /// The pair could not be set up.
    #[error(transparent)]
    Pair(#[from] PairError),
    /// Attach or detach failed.
    #[error("the toolstack failed")]
    Admin(#[from] AdminError),
    /// The frontend could not connect or close.
    #[error("{variant}: the frontend failed")]
    Connect {
        /// The variant.
        variant: &'static str,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// A request failed.
    #[error("{variant}: a request failed")]
    Io {
        /// The variant.
        variant: &'static str,
        /// Why.
        #[source]
        source: BlkError,
    },
    /// DMA memory ran out or could not be touched.
    #[error("{variant}: DMA memory")]
    Dma {
        /// The variant.
        variant: &'static str,
        /// Why.
        #[source]
        source: DmaError,
    },
    /// A DMA buffer could not be read or written.
    #[error("{variant}: a DMA buffer could not be accessed")]
    Mem {
        /// The variant.
        variant: &'static str,
        /// Why.
        #[source]
        source: MemError,
    },
    /// A benchmark thread panicked.
    #[error("a benchmark thread panicked")]
    Panicked,
}

/// One timed run of one variant.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The workload.
    pub workload: Workload,
    /// The variant.
    pub variant: Variant,
    /// The round (from 0).
    pub round: u32,
    /// Requests completed.
    pub requests: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time of the timed part.
    pub elapsed: Duration,
    /// Median latency from submission to completion.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// What both ends and the hypervisor counted during the timed part.
    pub counters: Counters,
}

impl Sample {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// MiB per second.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 20) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `config` against `image` (its contents are overwritten by write workloads), calling
/// `progress` after each run. The pair's daemon must trust the role's domain with `direct`
/// if a direct variant is asked for.
///
/// Once `interrupt` is set (SIGINT), the run in progress stops within a request's time, is
/// dropped (a cut run's figures would mislead), its device is detached, and the runs completed
/// so far are returned.
pub fn run(
    pair: &Pair,
    image: &Path,
    config: &BenchConfig,
    interrupt: &AtomicBool,
    mut progress: impl FnMut(&Sample),
) -> Result<Vec<Sample>, BenchError> {
    if config.workloads.is_empty() || config.variants.is_empty() {
        return Err(BenchError::Empty(
            "give at least one workload and one strategy",
        ));
    }
    if config.duration.is_zero() || config.rounds == 0 || config.depth == 0 || config.queues == 0 {
        return Err(BenchError::Empty(
            "the duration, rounds, depth and queues must be positive",
        ));
    }
    let size = std::fs::metadata(image)
        .map_err(|source| BenchError::Image {
            path: image.to_path_buf(),
            source,
        })?
        .len();
    let limit = pair.hypervisor().config().max_grants;
    for w in &config.workloads {
        if size < w.block_size as u64 {
            return Err(BenchError::ImageTooSmall {
                size,
                block_size: w.block_size,
            });
        }
        let pages = config.dma_pages(w);
        let grants_needed = config
            .variants
            .iter()
            .any(|v| v.strategy() != DmaStrategy::Direct);
        // Rings and the bounce directory take a few more grants.
        if grants_needed && pages + 16 + config.queues as usize * 2 > limit {
            return Err(BenchError::TooManyGrants {
                workload: *w,
                depth: config.depth,
                queues: config.queues,
                pages,
                limit,
            });
        }
    }
    let domid = config.role.domid();
    pair.add_guest(domid, "bench")?;
    let frontend = pair.frontend(config.role.role())?;
    let mut samples = Vec::new();
    for workload in &config.workloads {
        for round in 0..config.rounds {
            for &variant in &config.variants {
                if interrupt.load(Ordering::Relaxed) {
                    return Ok(samples);
                }
                let mut req = AttachRequest::blk(domid, image);
                req.queues = Some(config.queues);
                let devid = pair.attach(&req)?.devid;
                let run = Run {
                    workload: *workload,
                    variant,
                    round,
                    config,
                    interrupt,
                };
                let result = run_one(pair, &frontend, devid, &run);
                let detached = pair.detach(&DetachRequest::new(domid, devid));
                let sample = result?;
                detached?;
                if interrupt.load(Ordering::Relaxed) {
                    return Ok(samples);
                }
                progress(&sample);
                samples.push(sample);
            }
        }
    }
    Ok(samples)
}

/// One timed run: what it runs, and the flag that cuts it short.
struct Run<'a> {
    workload: Workload,
    variant: Variant,
    round: u32,
    config: &'a BenchConfig,
    interrupt: &'a AtomicBool,
}

fn run_one(
    pair: &Pair,
    frontend: &xenvirtio_frontend::Frontend<LoopbackDomain>,
    devid: u32,
    run: &Run<'_>,
) -> Result<Sample, BenchError> {
    let Run {
        workload,
        variant,
        round,
        config,
        ..
    } = *run;
    let name = variant.name();
    let options = BlkOptions {
        connect: ConnectOptions {
            dma: Some(variant.strategy()),
            persistent: variant.persistent(),
            dma_pages: config.dma_pages(&workload),
            num_queues: Some(config.queues),
            // Room for every request in flight as a direct chain (header, data, status and
            // a spare), so that short requests need no indirect table.
            queue_size: Some((config.depth * 4).next_power_of_two().clamp(64, 1024)),
            ..ConnectOptions::default()
        },
        depth: config.depth,
        io_timeout: Some(Duration::from_secs(60)),
    };
    let dev = frontend
        .connect_blk(devid, &options)
        .map_err(|source| BenchError::Connect {
            variant: name,
            source,
        })?;
    let domid = frontend.domid();
    let snapshot = |dev: &BlkDevice<LoopbackDomain>| -> Counters {
        let frontend = FrontendCounts::from_blk(&dev.stats());
        let backend = settled_backend(pair, domid, devid, frontend.requests);
        Counters {
            frontend,
            backend,
            hypervisor: HypervisorCounts::read(pair.hypervisor(), domid),
        }
    };
    let outcome = (|| -> Result<Sample, BenchError> {
        if config.warmup > 0 {
            drive(&dev, run, Stop::After(config.warmup))?;
        }
        pair.hypervisor().clear_records();
        let before = snapshot(&dev);
        let started = Instant::now();
        let until = Stop::At(Instant::now() + config.duration);
        let (mut latencies, copied) = drive(&dev, run, until)?;
        let elapsed = started.elapsed();
        let mut counters = snapshot(&dev).since(&before);
        counters.frontend.bytes_copied += copied;
        latencies.sort_unstable();
        let pct = |p: f64| -> Duration {
            if latencies.is_empty() {
                return Duration::ZERO;
            }
            let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[i]
        };
        Ok(Sample {
            workload,
            variant,
            round,
            requests: counters.frontend.requests,
            bytes: counters.frontend.bytes,
            elapsed,
            p50: pct(0.5),
            p99: pct(0.99),
            counters,
        })
    })();
    let closed = dev.close().map_err(|source| BenchError::Connect {
        variant: name,
        source,
    });
    let sample = outcome?;
    closed?;
    Ok(sample)
}

/// The daemon's counts once they include the `requests` the frontend saw complete.
fn settled_backend(pair: &Pair, domid: u16, devid: u32, requests: u64) -> BackendCounts {
    let deadline = Instant::now() + SETTLE;
    loop {
        let counts = pair
            .device_stats(domid, devid)
            .map(|s| BackendCounts::from_device(&s))
            .unwrap_or_default();
        if counts.requests >= requests || Instant::now() >= deadline {
            return counts;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// When a queue's thread stops submitting.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// After this many requests over all queues.
    After(u64),
    /// At this instant.
    At(Instant),
}

/// Runs `workload` on every queue of the device, one thread each, until `stop`. Returns the
/// latencies and the bytes the caller copied (`copy` mode).
fn drive(
    dev: &BlkDevice<LoopbackDomain>,
    run: &Run<'_>,
    stop: Stop,
) -> Result<(Vec<Duration>, u64), BenchError> {
    let (workload, config, round, variant) =
        (run.workload, run.config, run.round, run.variant.name());
    let interrupt = run.interrupt;
    let queues = dev.num_queues() as u64;
    let blocks = dev.size() / workload.block_size as u64;
    let results: Vec<Result<(Vec<Duration>, u64), BenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..queues)
            .map(|q| {
                let share = match stop {
                    Stop::After(n) => Stop::After(n / queues + u64::from(q < n % queues)),
                    at => at,
                };
                let seed = 0x9e37_79b9_7f4a_7c15u64 ^ ((u64::from(round) << 32) | (q + 1));
                s.spawn(move || {
                    drive_queue(
                        dev, q as usize, workload, config, share, blocks, seed, variant, interrupt,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(BenchError::Panicked)))
            .collect()
    });
    let mut latencies = Vec::new();
    let mut copied = 0;
    for r in results {
        let (l, c) = r?;
        latencies.extend(l);
        copied += c;
    }
    Ok((latencies, copied))
}

#[allow(clippy::too_many_arguments)]
fn drive_queue(
    dev: &BlkDevice<LoopbackDomain>,
    q: usize,
    workload: Workload,
    config: &BenchConfig,
    stop: Stop,
    blocks: u64,
    seed: u64,
    variant: &'static str,
    interrupt: &AtomicBool,
) -> Result<(Vec<Duration>, u64), BenchError> {
    let io = |source| BenchError::Io { variant, source };
    let mem = |source| BenchError::Mem { variant, source };
    let bs = workload.block_size;
    let write = workload.pattern.writes();
    let random = workload.pattern.random();
    let sectors_per_block = bs as u64 / 512;
    let mut rng = seed | 1;
    let mut next_block = (q as u64 * blocks / dev.num_queues() as u64) % blocks;
    let mut pick = move || {
        if random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            let b = next_block;
            next_block = (next_block + 1) % blocks;
            b
        }
    };
    let mut queue = dev.lock_queue(q);
    let mut private = vec![0x5au8; bs];
    let mut copied = 0u64;
    let mut latencies = Vec::new();
    let mut free = Vec::new();
    for _ in 0..queue.depth() {
        let b = queue
            .alloc(bs)
            .map_err(|source| BenchError::Dma { variant, source })?;
        b.write(0, &private).map_err(mem)?;
        free.push(b);
    }
    let mut submitted = 0u64;
    let mut in_flight = 0usize;
    let more = |submitted: u64| {
        !interrupt.load(Ordering::Relaxed)
            && match stop {
                Stop::After(n) => submitted < n,
                Stop::At(t) => Instant::now() < t,
            }
    };
    while more(submitted) || in_flight > 0 {
        while more(submitted) {
            let Some(buf) = free.pop() else { break };
            if write && config.copy {
                buf.write(0, &private).map_err(mem)?;
                copied += bs as u64;
            }
            let sector = pick() * sectors_per_block;
            let r = if write {
                queue.submit_write(buf, sector)
            } else {
                queue.submit_read(buf, sector)
            };
            match r {
                Ok(_) => {
                    in_flight += 1;
                    submitted += 1;
                }
                Err(rejected) => {
                    free.extend(rejected.buf);
                    if matches!(rejected.error, BlkError::QueueFull { .. }) {
                        break;
                    }
                    return Err(io(rejected.error));
                }
            }
        }
        if in_flight == 0 {
            break;
        }
        for c in queue.wait(Some(Duration::from_secs(30))).map_err(io)? {
            in_flight -= 1;
            c.result.map_err(io)?;
            latencies.push(c.latency);
            if let Some(buf) = c.buf {
                if !write && config.copy {
                    buf.read(0, &mut private).map_err(mem)?;
                    copied += bs as u64;
                }
                free.push(buf);
            }
        }
    }
    Ok((latencies, copied))
}

/// The median of a variant's samples for one workload, and its counts per request over all
/// of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The workload.
    pub workload: Workload,
    /// The variant.
    pub variant: Variant,
    /// Median IOPS over the rounds.
    pub iops: f64,
    /// Lowest and highest IOPS of a round (how noisy the machine was).
    pub iops_range: (f64, f64),
    /// Median MiB/s over the rounds.
    pub mib_per_sec: f64,
    /// Median of the rounds' median latencies.
    pub p50: Duration,
    /// Median of the rounds' 99th percentiles.
    pub p99: Duration,
    /// Counts per request, over every round.
    pub per_request: PerRequest,
    /// Rounds.
    pub rounds: usize,
    /// The hypervisor's record buffer overflowed in some round: its counts are low.
    pub truncated: bool,
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn median_duration(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// One [`Summary`] per (workload, variant), in the order of `config`.
pub fn summarize(config: &BenchConfig, samples: &[Sample]) -> Vec<Summary> {
    let mut out = Vec::new();
    for w in &config.workloads {
        for &v in &config.variants {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.workload == *w && s.variant == v)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let total = mine
                .iter()
                .fold(Counters::default(), |t, s| t.plus(&s.counters));
            out.push(Summary {
                workload: *w,
                variant: v,
                iops: median_f64(mine.iter().map(|s| s.iops()).collect()),
                iops_range: mine
                    .iter()
                    .map(|s| s.iops())
                    .fold((f64::INFINITY, 0.0), |(lo, hi), x| (lo.min(x), hi.max(x))),
                mib_per_sec: median_f64(mine.iter().map(|s| s.mib_per_sec()).collect()),
                p50: median_duration(mine.iter().map(|s| s.p50).collect()),
                p99: median_duration(mine.iter().map(|s| s.p99).collect()),
                per_request: PerRequest::of(&total),
                rounds: mine.len(),
                truncated: total.hypervisor.truncated,
            });
        }
    }
    out
}

/// The report: per workload, a table of the variants (median IOPS, MiB/s, latencies, counts
/// per request), then the ratios of their IOPS (row divided by column).
pub fn render(config: &BenchConfig, summaries: &[Summary]) -> String {
    let mut o = String::new();
    for w in &config.workloads {
        let rows: Vec<&Summary> = summaries.iter().filter(|s| s.workload == *w).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            o,
            "\n{w}: depth {} x {} queue(s), {:.1}s per run, median of {} round(s), {}",
            config.depth,
            config.queues,
            config.duration.as_secs_f64(),
            rows[0].rounds,
            if config.copy {
                "copying through private buffers"
            } else {
                "zero-copy"
            }
        );
        let _ = writeln!(
            o,
            "  {:<17} {:>9} {:>17} {:>9} {:>8} {:>8} | per request: {:>6} {:>6} {:>6} {:>7} {:>6} {:>6} {:>7}",
            "strategy",
            "IOPS",
            "(rounds min-max)",
            "MiB/s",
            "p50 us",
            "p99 us",
            "maps",
            "gmaps",
            "unmaps",
            "foreign",
            "ntf>be",
            "ntf>fe",
            "copied"
        );
        for s in &rows {
            let p = &s.per_request;
            let _ = writeln!(
                o,
                "  {:<17} {:>9.0} {:>17} {:>9.1} {:>8.1} {:>8.1} |              {:>6.2} {:>6.2} {:>6.2} {:>7.3} {:>6.2} {:>6.2} {:>7.0}",
                s.variant.name(),
                s.iops,
                format!("({:.0}-{:.0})", s.iops_range.0, s.iops_range.1),
                s.mib_per_sec,
                s.p50.as_secs_f64() * 1e6,
                s.p99.as_secs_f64() * 1e6,
                p.map_calls,
                p.grant_maps,
                p.grant_unmaps,
                p.foreign_maps,
                p.notifications_to_backend,
                p.notifications_to_frontend,
                p.bytes_copied
            );
        }
        if rows.iter().any(|s| s.truncated) {
            let _ = writeln!(
                o,
                "  (the hypervisor's record buffer overflowed: gmaps/unmaps/foreign are low; \
                 use fewer --seconds)"
            );
        }
        if rows.len() > 1 {
            let _ = writeln!(o, "  IOPS ratios (row / column):");
            let _ = write!(o, "  {:<17}", "");
            for c in &rows {
                let _ = write!(o, " {:>16}", c.variant.name());
            }
            let _ = writeln!(o);
            for r in &rows {
                let _ = write!(o, "  {:<17}", r.variant.name());
                for c in &rows {
                    let _ = write!(o, " {:>16.2}", r.iops / c.iops.max(1e-9));
                }
                let _ = writeln!(o);
            }
        }
    }
    o
}

/// A temporary image for the benchmark when none is given: `size` bytes (rounded down to
/// whole MiB, at least one) in `dir`, every byte written, so reads find data rather than
/// holes.
pub fn scratch_image(dir: &Path, size: u64) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    let path = dir.join("bench.img");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..(size >> 20).max(1) {
        f.write_all(&chunk)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse_and_print_back() {
        for (text, pattern, bs) in [
            ("randread:4k", Pattern::RandRead, 4096),
            ("randwrite:512", Pattern::RandWrite, 512),
            ("read:64k", Pattern::Read, 65536),
            ("write:128K", Pattern::Write, 131072),
        ] {
            let w: Workload = text.parse().unwrap();
            assert_eq!(w.pattern, pattern);
            assert_eq!(w.block_size, bs);
            let again: Workload = w.to_string().parse().unwrap();
            assert_eq!(again, w);
        }
        for bad in [
            "randread",
            "seek:4k",
            "read:0",
            "read:1000",
            "read:k",
            "read:-4k",
        ] {
            let e = bad.parse::<Workload>().unwrap_err();
            assert!(matches!(e, BenchError::BadWorkload { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn variants_parse_from_their_names() {
        for v in Variant::ALL {
            assert_eq!(v.name().parse::<Variant>().unwrap(), v);
        }
        assert!("persistent".parse::<Variant>().is_err());
        assert!(Variant::GrantPersistent.persistent());
        assert_eq!(Variant::Direct.strategy(), DmaStrategy::Direct);
    }

    #[test]
    fn medians() {
        assert_eq!(median_f64(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_f64(vec![4.0, 1.0]), 2.5);
        assert_eq!(median_f64(vec![]), 0.0);
        let ms = Duration::from_millis;
        assert_eq!(median_duration(vec![ms(5), ms(1), ms(3)]), ms(3));
        assert_eq!(median_duration(vec![]), Duration::ZERO);
    }

    #[test]
    fn dma_pages_cover_the_requests_in_flight() {
        let c = BenchConfig {
            depth: 32,
            queues: 2,
            ..BenchConfig::default()
        };
        let w: Workload = "read:64k".parse().unwrap();
        assert!(c.dma_pages(&w) >= 32 * 2 * 16);
        let small: Workload = "read:4k".parse().unwrap();
        assert_eq!(
            c.dma_pages(&small),
            xenvirtio_frontend::dma::DEFAULT_DMA_PAGES
        );
    }
}
