//! The soak of `xenvirtio-loopback soak`: many guests' devices at depth, every byte verified,
//! for a long time, with the process's memory watched.
//!
//! This module owns the workload and its oracle. Each device belongs to a guest of its own
//! (domains 10, 11, …), uses one DMA strategy (they take turns: per-request grants, persistent
//! grants, bounce, direct) and runs one thread that keeps `depth` requests in flight: 4 KiB
//! reads and writes at random blocks, and a flush now and then. A block never has two requests
//! in flight, so every read has one right answer: the block as the last completed write left
//! it (zeros before any). Every write carries a pattern that names its device, block and
//! generation, so a mismatch says whose data was found instead. At the end each device reads
//! back every block, is closed, and its image file is compared with the model byte for byte.
//! It asserts nothing about speed; it counts mismatches and samples the resident memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xenvirtio_backend::admin::{AttachRequest, DetachRequest};
use xenvirtio_backend::daemon::{DaemonConfig, DomainSelector};
use xenvirtio_frontend::ConnectOptions;
use xenvirtio_frontend::blk::{BlkDevice, BlkError, BlkOptions, Completion};
use xenvirtio_frontend::dma::DmaBuf;
use xenvirtio_xen::DomId;
use xenvirtio_xen::loopback::{LoopbackConfig, LoopbackDomain};

use crate::bench::Variant;
use crate::pair::{Pair, PairError};
use crate::role::RoleName;

/// Bytes per request, and the unit the model tracks.
pub const BLOCK: usize = 4096;
/// The first guest's domain id; device `i` belongs to domain `FIRST_DOMID + i`.
pub const FIRST_DOMID: DomId = 10;
/// One request in this many is a flush.
const FLUSH_EVERY: u64 = 64;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Devices, one guest each.
    pub devices: u32,
    /// Requests in flight per device.
    pub depth: u32,
    /// How long the verified I/O runs.
    pub duration: Duration,
    /// Size of each device's image (a multiple of [`BLOCK`]).
    pub image_size: u64,
    /// How often the resident memory is sampled.
    pub sample_every: Duration,
}

impl Default for SoakConfig {
    fn default() -> Self {
        SoakConfig {
            devices: 8,
            depth: 64,
            duration: Duration::from_secs(20),
            image_size: 8 << 20,
            sample_every: Duration::from_secs(1),
        }
    }
}

/// Why the soak could not run (a mismatch is not an error: it is counted in the report).
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// The configuration cannot run.
    #[error("{0}")]
    Config(String),
    /// The pair could not be set up.
    #[error(transparent)]
    Pair(#[from] PairError),
    /// An image could not be made or read.
    #[error("image {}", path.display())]
    Image {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Attach, connect, I/O or detach of one device failed.
    #[error("device {device} ({variant}, domain {domid}): {what}")]
    Device {
        /// Which device.
        device: u32,
        /// Its strategy.
        variant: &'static str,
        /// Its domain.
        domid: DomId,
        /// What failed, with its causes.
        what: String,
    },
}

/// One device's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceReport {
    /// Its domain.
    pub domid: DomId,
    /// Its strategy.
    pub variant: &'static str,
    /// Reads completed and checked (the final read-back included).
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Reads that returned something other than the model's block.
    pub mismatches: u64,
    /// The first few mismatches, described.
    pub first_mismatches: Vec<String>,
    /// Bytes of the image file that differ from the model after close.
    pub image_mismatched_blocks: u64,
}

/// What the soak measured.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    /// Per device.
    pub devices: Vec<DeviceReport>,
    /// Time the verified I/O ran.
    pub elapsed: Duration,
    /// Resident memory of the process, sampled while I/O ran (KiB).
    pub rss_kib: Vec<u64>,
}

impl SoakReport {
    /// Mismatches of every device: reads and the image files.
    pub fn mismatches(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| d.mismatches + d.image_mismatched_blocks)
            .sum()
    }

    /// Requests completed by every device.
    pub fn requests(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| d.reads + d.writes + d.flushes)
            .sum()
    }

    /// The resident memory once the soak settled (the sample a quarter of the way in, the
    /// devices connected and their caches warm), and the highest sample after it, in KiB.
    pub fn rss_settled_and_peak(&self) -> Option<(u64, u64)> {
        let settled = *self.rss_kib.get(self.rss_kib.len() / 4)?;
        let peak = self.rss_kib[self.rss_kib.len() / 4..]
            .iter()
            .copied()
            .max()?;
        Some((settled, peak))
    }

    /// A report for people.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let secs = self.elapsed.as_secs_f64().max(f64::EPSILON);
        let _ = writeln!(
            out,
            "soak: {} device(s), {:.1} s of verified I/O, {} requests ({:.0}/s), {} mismatches",
            self.devices.len(),
            secs,
            self.requests(),
            self.requests() as f64 / secs,
            self.mismatches()
        );
        for d in &self.devices {
            let _ = writeln!(
                out,
                "  domain {:>3} {:<16} {:>8} reads {:>8} writes {:>6} flushes  {} mismatched reads, {} mismatched image blocks",
                d.domid,
                d.variant,
                d.reads,
                d.writes,
                d.flushes,
                d.mismatches,
                d.image_mismatched_blocks
            );
            for m in &d.first_mismatches {
                let _ = writeln!(out, "    {m}");
            }
        }
        if let Some((settled, peak)) = self.rss_settled_and_peak() {
            let _ = writeln!(
                out,
                "  resident memory: {} MiB settled, {} MiB peak after it, {} MiB at the end ({} samples)",
                settled / 1024,
                peak / 1024,
                self.rss_kib.last().copied().unwrap_or(0) / 1024,
                self.rss_kib.len()
            );
            let step = self.rss_kib.len().div_ceil(20).max(1);
            let series: Vec<String> = self
                .rss_kib
                .iter()
                .step_by(step)
                .map(|k| (k / 1024).to_string())
                .collect();
            let _ = writeln!(
                out,
                "  resident memory over time (MiB, every {step} sample(s)): {}",
                series.join(" ")
            );
        }
        out
    }
}

/// The resident memory of this process in KiB, from `/proc/self/status`.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The bytes a write of generation `generation` leaves in `block` of `device`: a header that
/// names all three, then a xorshift stream seeded by them. Generation 0 is the zeroed image.
pub fn pattern(device: u32, block: u64, generation: u64, out: &mut [u8]) {
    if generation == 0 {
        out.fill(0);
        return;
    }
    out[..4].copy_from_slice(&device.to_le_bytes());
    out[4..12].copy_from_slice(&block.to_le_bytes());
    out[12..20].copy_from_slice(&generation.to_le_bytes());
    let mut x = (u64::from(device) << 48) ^ (block << 20) ^ generation ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out[20..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// What a mismatched block holds, as far as its header tells.
fn describe(device: u32, block: u64, expected: u64, got: &[u8]) -> String {
    if got.iter().all(|&b| b == 0) {
        return format!("device {device} block {block}: zeros, expected generation {expected}");
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&got[r]);
        u64::from_le_bytes(b)
    };
    format!(
        "device {device} block {block}: found a block that says device {} block {} generation {}, expected generation {expected}",
        word(0..4),
        word(4..12),
        word(12..20)
    )
}

/// Starts a pair whose daemon trusts the soak's guests with `direct`.
pub fn start_pair(config: &SoakConfig) -> Result<Pair, SoakError> {
    let domains = FIRST_DOMID..FIRST_DOMID + config.devices as DomId;
    let daemon = DaemonConfig {
        allow_direct: domains.map(DomainSelector::Id).collect(),
        ..DaemonConfig::default()
    };
    Ok(Pair::start(LoopbackConfig::default(), daemon)?)
}

/// Runs the soak on `pair` (see the module documentation), with images in `dir`. `progress`
/// gets a line now and then.
pub fn run(
    pair: &Pair,
    dir: &Path,
    config: &SoakConfig,
    progress: &(dyn Fn(String) + Sync),
) -> Result<SoakReport, SoakError> {
    if config.devices == 0 || config.depth == 0 || config.duration.is_zero() {
        return Err(SoakError::Config(
            "the devices, depth and duration must be positive".into(),
        ));
    }
    if config.devices > 64 {
        return Err(SoakError::Config("at most 64 devices".into()));
    }
    let blocks = config.image_size / BLOCK as u64;
    if blocks < u64::from(config.depth) * 2 || config.image_size % BLOCK as u64 != 0 {
        return Err(SoakError::Config(format!(
            "each image must be a multiple of {BLOCK} bytes with at least twice --depth blocks"
        )));
    }
    let started = Instant::now();
    let until = started + config.duration;
    let (results, rss) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..config.devices)
            .map(|i| s.spawn(move || soak_device(pair, dir, config, i, until, progress)))
            .collect();
        // Samples while the verified I/O runs; polls for the threads' end in between.
        let mut rss = Vec::new();
        let mut next_sample = Instant::now();
        while handles.iter().any(|h| !h.is_finished()) {
            let now = Instant::now();
            if now < until && now >= next_sample {
                rss.extend(rss_kib());
                next_sample = now + config.sample_every;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let results: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(SoakError::Device {
                        device: i as u32,
                        variant: variant_of(i as u32).name(),
                        domid: FIRST_DOMID + i as DomId,
                        what: "its thread panicked".into(),
                    })
                })
            })
            .collect();
        (results, rss)
    });
    let mut report = SoakReport {
        elapsed: config.duration,
        rss_kib: rss,
        ..SoakReport::default()
    };
    for r in results {
        report.devices.push(r?);
    }
    Ok(report)
}

fn variant_of(device: u32) -> Variant {
    Variant::ALL[device as usize % Variant::ALL.len()]
}

/// What one device's thread knows: the model, and the requests in flight.
struct Model {
    device: u32,
    generation: Vec<u64>,
    busy: Vec<bool>,
    next_generation: u64,
    in_flight: HashMap<xenvirtio_frontend::blk::RequestId, (u64, u64)>,
    report: DeviceReport,
    scratch: Vec<u8>,
    expect: Vec<u8>,
}

impl Model {
    /// Checks a completed request against the model and frees its block.
    fn complete(&mut self, c: &Completion) -> Result<(), String> {
        if let Err(e) = &c.result {
            return Err(format!("{:?} failed: {}", c.op, chain(e)));
        }
        let Some((block, generation)) = self.in_flight.remove(&c.id) else {
            self.report.flushes += 1;
            return Ok(());
        };
        self.busy[block as usize] = false;
        if generation != 0 {
            self.generation[block as usize] = generation;
            self.report.writes += 1;
            return Ok(());
        }
        let buf = c
            .buf
            .as_ref()
            .ok_or("a read came back without its buffer")?;
        buf.read(0, &mut self.scratch)
            .map_err(|e| format!("reading a completed buffer: {e}"))?;
        self.verify(block);
        Ok(())
    }

    fn verify(&mut self, block: u64) {
        let expected = self.generation[block as usize];
        pattern(self.device, block, expected, &mut self.expect);
        self.report.reads += 1;
        if self.scratch != self.expect {
            self.report.mismatches += 1;
            if self.report.first_mismatches.len() < 5 {
                let d = describe(self.device, block, expected, &self.scratch);
                self.report.first_mismatches.push(d);
            }
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn soak_device(
    pair: &Pair,
    dir: &Path,
    config: &SoakConfig,
    device: u32,
    until: Instant,
    progress: &(dyn Fn(String) + Sync),
) -> Result<DeviceReport, SoakError> {
    let variant = variant_of(device);
    let domid = FIRST_DOMID + device as DomId;
    let fail = |what: String| SoakError::Device {
        device,
        variant: variant.name(),
        domid,
        what,
    };
    let path = dir.join(format!("soak-{device}.img"));
    let image_err = |source| SoakError::Image {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::create(&path).map_err(image_err)?;
    file.set_len(config.image_size).map_err(image_err)?;
    drop(file);
    pair.add_guest(domid, &format!("soak{device}"))?;
    let devid = pair
        .attach(&AttachRequest::blk(domid, &path))
        .map_err(|e| fail(format!("attach: {}", chain(&e))))?
        .devid;
    let mut role = RoleName::X86Pvh.role();
    role.domid = domid;
    let frontend = pair.frontend(role)?;
    let options = BlkOptions {
        connect: ConnectOptions {
            dma: Some(variant.strategy()),
            persistent: variant.persistent(),
            dma_pages: config.depth as usize * 2 + 64,
            queue_size: Some((config.depth * 4).next_power_of_two().clamp(64, 1024)),
            ..ConnectOptions::default()
        },
        depth: config.depth,
        io_timeout: Some(Duration::from_secs(60)),
    };
    let dev = frontend
        .connect_blk(devid, &options)
        .map_err(|e| fail(format!("connect: {}", chain(&e))))?;
    let blocks = config.image_size / BLOCK as u64;
    let mut model = Model {
        device,
        generation: vec![0; blocks as usize],
        busy: vec![false; blocks as usize],
        next_generation: 1,
        in_flight: HashMap::new(),
        report: DeviceReport {
            domid,
            variant: variant.name(),
            ..DeviceReport::default()
        },
        scratch: vec![0; BLOCK],
        expect: vec![0; BLOCK],
    };
    let io = drive(&dev, &mut model, until, blocks).map_err(&fail);
    let read_back = io.and_then(|()| read_back(&dev, &mut model, blocks).map_err(&fail));
    let closed = dev
        .close()
        .map_err(|e| fail(format!("close: {}", chain(&e))));
    read_back?;
    closed?;
    pair.detach(&DetachRequest::new(domid, devid))
        .map_err(|e| fail(format!("detach: {}", chain(&e))))?;
    // What the backend wrote is what the model says, byte for byte.
    let image = std::fs::read(&path).map_err(image_err)?;
    let mut expect = vec![0u8; BLOCK];
    for (b, got) in image.chunks(BLOCK).enumerate() {
        pattern(device, b as u64, model.generation[b], &mut expect);
        if got != expect {
            model.report.image_mismatched_blocks += 1;
        }
    }
    let _ = std::fs::remove_file(&path);
    progress(format!(
        "device {device} ({}, domain {domid}) done: {} reads, {} writes, {} mismatches",
        variant.name(),
        model.report.reads,
        model.report.writes,
        model.report.mismatches + model.report.image_mismatched_blocks
    ));
    Ok(model.report)
}

fn drive(
    dev: &BlkDevice<LoopbackDomain>,
    model: &mut Model,
    until: Instant,
    blocks: u64,
) -> Result<(), String> {
    let mut queue = dev.lock_queue(0);
    let mut free: Vec<DmaBuf> = (0..queue.depth())
        .map(|_| queue.alloc(BLOCK))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("allocating buffers: {e}"))?;
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ (u64::from(model.device) << 32 | 1);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut submitted = 0u64;
    loop {
        let running = Instant::now() < until;
        while running && queue.can_submit() {
            submitted += 1;
            if submitted % FLUSH_EVERY == 0 {
                queue
                    .submit_flush()
                    .map_err(|r| format!("submitting a flush: {}", chain(&r.error)))?;
                continue;
            }
            let Some(buf) = free.pop() else { break };
            // A block with nothing in flight (the image is at least twice the depth).
            let block = loop {
                let b = next() % blocks;
                if !model.busy[b as usize] {
                    break b;
                }
            };
            let write = next() & 1 == 0;
            let generation = if write {
                let g = model.next_generation;
                model.next_generation += 1;
                pattern(model.device, block, g, &mut model.expect);
                buf.write(0, &model.expect)
                    .map_err(|e| format!("filling a buffer: {e}"))?;
                g
            } else {
                0
            };
            let sector = block * (BLOCK as u64 / 512);
            let r = if write {
                queue.submit_write(buf, sector)
            } else {
                queue.submit_read(buf, sector)
            };
            match r {
                Ok(id) => {
                    model.busy[block as usize] = true;
                    model.in_flight.insert(id, (block, generation));
                }
                Err(rejected) => {
                    free.extend(rejected.buf);
                    if matches!(rejected.error, BlkError::QueueFull { .. }) {
                        break;
                    }
                    return Err(format!("submitting: {}", chain(&rejected.error)));
                }
            }
        }
        if queue.in_flight() == 0 {
            if running {
                continue;
            }
            return Ok(());
        }
        let done = queue
            .wait(Some(Duration::from_secs(60)))
            .map_err(|e| format!("waiting: {}", chain(&e)))?;
        if done.is_empty() {
            return Err(format!(
                "no completion in 60 s with {} requests in flight",
                queue.in_flight()
            ));
        }
        for c in done {
            model.complete(&c)?;
            free.extend(c.buf);
        }
    }
}

/// Reads every block back through the device and checks it against the model.
fn read_back(
    dev: &BlkDevice<LoopbackDomain>,
    model: &mut Model,
    blocks: u64,
) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * BLOCK];
    for first in (0..blocks).step_by(64) {
        let n = (blocks - first).min(64) as usize;
        dev.read_at(&mut buf[..n * BLOCK], first * BLOCK as u64)
            .map_err(|e| format!("reading back: {}", chain(&e)))?;
        for (i, got) in buf[..n * BLOCK].chunks(BLOCK).enumerate() {
            model.scratch.copy_from_slice(got);
            model.verify(first + i as u64);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_name_their_device_block_and_generation() {
        let mut a = vec![0u8; BLOCK];
        let mut b = vec![0u8; BLOCK];
        pattern(1, 2, 3, &mut a);
        pattern(1, 2, 4, &mut b);
        assert_ne!(a, b);
        pattern(2, 2, 3, &mut b);
        assert_ne!(a, b);
        assert_eq!(
            describe(1, 2, 4, &a),
            "device 1 block 2: found a block that says device 1 block 2 generation 3, expected generation 4"
        );
        pattern(1, 2, 0, &mut a);
        assert!(a.iter().all(|&x| x == 0));
        assert!(describe(1, 2, 5, &a).contains("zeros"));
    }

    #[test]
    fn the_model_counts_a_block_that_is_not_the_last_write() {
        let mut m = Model {
            device: 3,
            generation: vec![0, 7],
            busy: vec![false; 2],
            next_generation: 8,
            in_flight: HashMap::new(),
            report: DeviceReport::default(),
            scratch: vec![0; BLOCK],
            expect: vec![0; BLOCK],
        };
        m.verify(0);
        assert_eq!(m.report.mismatches, 0);
        // Block 1 holds generation 6, the model says 7: a lost write.
        pattern(3, 1, 6, &mut m.scratch);
        m.verify(1);
        pattern(3, 1, 7, &mut m.scratch);
        m.verify(1);
        assert_eq!((m.report.reads, m.report.mismatches), (3, 1));
        assert!(m.report.first_mismatches[0].contains("generation 6, expected generation 7"));
    }

    #[test]
    fn settled_memory_is_a_quarter_in() {
        let r = SoakReport {
            rss_kib: vec![10, 20, 30, 40, 35, 50, 45, 44],
            ..SoakReport::default()
        };
        assert_eq!(r.rss_settled_and_peak(), Some((30, 50)));
        assert_eq!(SoakReport::default().rss_settled_and_peak(), None);
    }
}
