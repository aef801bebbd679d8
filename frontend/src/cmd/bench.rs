//! `bench`: I/O figures of one blk device at depth.
#![allow(clippy::wildcard_imports)]

use crate::*;

pub(crate) fn bench(global: &Global, args: &BenchArgs) -> Result<i32> {
    if args.bs == 0 || args.bs % 512 != 0 {
        bail!("--bs must be a positive multiple of 512");
    }
    let frontend = open_frontend(global)?;
    let devid = first_blk(&frontend, args.devid)?;
    let dev = connect_blk(
        &frontend,
        global,
        &args.dma,
        devid,
        Some(args.queues),
        Some(args.depth),
    )?;
    if args.bs > dev.max_request_bytes() {
        bail!(
            "--bs {} is larger than one request may carry here ({} bytes)",
            args.bs,
            dev.max_request_bytes()
        );
    }
    let blocks = dev.size() / args.bs as u64;
    if blocks == 0 {
        bail!("the disk is smaller than one block of {} bytes", args.bs);
    }
    let write = matches!(args.pattern, BenchPattern::Randwrite | BenchPattern::Write);
    let random = matches!(
        args.pattern,
        BenchPattern::Randread | BenchPattern::Randwrite
    );
    let before = dev.stats();
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let results: Vec<Result<(Vec<Duration>, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..dev.num_queues())
            .map(|q| {
                let dev = &dev;
                s.spawn(move || bench_queue(dev, q, args, blocks, write, random, deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a bench thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut copied = 0;
    for r in results {
        let (l, c) = r?;
        latencies.extend(l);
        copied += c;
    }
    latencies.sort_unstable();
    let ops = latencies.len() as u64;
    let after = dev.stats();
    let n = dev.negotiated();
    let pct = |p: f64| -> String {
        if latencies.is_empty() {
            return "-".into();
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        format!("{:.1}us", latencies[i].as_secs_f64() * 1e6)
    };
    println!(
        "{:?} bs={} depth={} queues={} dma={}{} for {elapsed:.2}s{}",
        args.pattern,
        args.bs,
        args.depth,
        dev.num_queues(),
        n.strategy,
        if n.persistent { " (persistent)" } else { "" },
        if args.copy {
            ", copying through private buffers"
        } else {
            ", zero-copy"
        }
    );
    println!(
        "  {ops} requests: {:.0} IOPS, {:.1} MiB/s",
        ops as f64 / elapsed,
        (ops * args.bs as u64) as f64 / (1 << 20) as f64 / elapsed
    );
    println!(
        "  latency: p50 {} p90 {} p99 {} p99.9 {} max {}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    let per = |x: u64| if ops == 0 { 0.0 } else { x as f64 / ops as f64 };
    let sent = after.events.sent - before.events.sent;
    let received = after.events.received - before.events.received;
    let bounced = after.dma.bytes_bounced - before.dma.bytes_bounced + copied;
    println!(
        "  frontend: {sent} notifications sent ({:.3}/request), {received} received ({:.3}/request), \
         {} suppressed kicks, {bounced} bytes copied ({:.0}/request), {} grants held, {} allocated since connect",
        per(sent),
        per(received),
        after.events.suppressed - before.events.suppressed,
        per(bounced),
        after.dma.grants_held,
        after.dma.grants_allocated
    );
    println!(
        "  backend: grant maps and unmaps happen in the backend; see `xenvirtio-backend stats` in domain {}",
        dev.backend()
    );
    dev.close().context("closing the device")?;
    Ok(0)
}

pub(crate) fn bench_queue(
    dev: &BlkDevice<LinuxXen>,
    q: usize,
    args: &BenchArgs,
    blocks: u64,
    write: bool,
    random: bool,
    deadline: Instant,
) -> Result<(Vec<Duration>, u64)> {
    let mut queue = dev.lock_queue(q);
    let sectors_per_block = args.bs as u64 / 512;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (q as u64 + 1);
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
    let mut private = vec![0x5au8; args.bs];
    let mut copied = 0u64;
    let mut latencies = Vec::new();
    let mut free = Vec::new();
    for _ in 0..queue.depth() {
        let b = queue
            .alloc(args.bs)
            .context("DMA memory is too small for this depth and block size (raise --dma-pages)")?;
        b.write(0, &private)?;
        free.push(b);
    }
    let mut in_flight = 0usize;
    loop {
        while Instant::now() < deadline {
            let Some(buf) = free.pop() else { break };
            if write && args.copy {
                buf.write(0, &private)?;
                copied += args.bs as u64;
            }
            let sector = pick() * sectors_per_block;
            let r = if write {
                queue.submit_write(buf, sector)
            } else {
                queue.submit_read(buf, sector)
            };
            match r {
                Ok(_) => in_flight += 1,
                Err(rejected) => {
                    free.extend(rejected.buf);
                    if matches!(
                        rejected.error,
                        xenvirtio_frontend::blk::BlkError::QueueFull { .. }
                    ) {
                        break;
                    }
                    return Err(rejected.error.into());
                }
            }
        }
        if in_flight == 0 {
            break;
        }
        for c in queue.wait(Some(Duration::from_secs(30)))? {
            in_flight -= 1;
            c.result?;
            latencies.push(c.latency);
            if let Some(buf) = c.buf {
                if !write && args.copy {
                    buf.read(0, &mut private)?;
                    copied += args.bs as u64;
                }
                free.push(buf);
            }
        }
    }
    Ok((latencies, copied))
}
