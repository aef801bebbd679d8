//! `verify`: write a pattern to a device (or an NBD export) and check it reads back.
#![allow(clippy::wildcard_imports)]

use super::progress::Progress;
use crate::*;

pub(crate) fn verify(global: &Global, args: &VerifyArgs) -> Result<i32> {
    if let Some(image) = &args.check_image {
        let size = std::fs::metadata(image)
            .with_context(|| format!("cannot read {}", image.display()))?
            .len();
        let length = args.length.unwrap_or(size.saturating_sub(args.offset));
        let started = Instant::now();
        let cmp = pattern::check_image(image, args.seed, args.offset, length)
            .with_context(|| format!("cannot check {}", image.display()))?;
        return Ok(report(
            &format!("image {}", image.display()),
            args,
            &cmp,
            started,
        ));
    }
    if let Some(socket) = &args.nbd {
        return verify_nbd(socket, args);
    }
    let frontend = open_frontend(global)?;
    let devid = first_blk(&frontend, args.devid)?;
    let dev = connect_blk(&frontend, global, &args.dma, devid, None, None)?;
    let size = dev.size();
    let length = args.length.unwrap_or(size.saturating_sub(args.offset));
    if args.offset.checked_add(length).is_none_or(|e| e > size) {
        bail!(
            "{length} bytes at offset {} go past the end of the disk ({size} bytes)",
            args.offset
        );
    }
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let started = Instant::now();
    let mut at = args.offset;
    let mut progress = Progress::new("writing", length);
    while at < args.offset + length {
        let n = ((args.offset + length - at) as usize).min(chunk);
        pattern::fill(args.seed, at, &mut buf[..n]);
        dev.write_at(&buf[..n], at)
            .with_context(|| format!("write of {n} bytes at {at} failed"))?;
        at += n as u64;
        progress.add(n as u64);
    }
    dev.flush().context("flush failed")?;
    drop(progress);
    let wrote = started.elapsed();
    let mut cmp = Comparer::new(args.seed);
    let mut at = args.offset;
    let mut progress = Progress::new("reading back", length);
    while at < args.offset + length {
        let n = ((args.offset + length - at) as usize).min(chunk);
        dev.read_at(&mut buf[..n], at)
            .with_context(|| format!("read of {n} bytes at {at} failed"))?;
        cmp.add(at, &buf[..n]);
        at += n as u64;
        progress.add(n as u64);
    }
    drop(progress);
    let cmp = cmp.finish();
    let n = dev.negotiated();
    println!(
        "wrote {length} bytes at offset {} (seed {}) in {:.3}s over dma {}{}",
        args.offset,
        args.seed,
        wrote.as_secs_f64(),
        n.strategy,
        if n.persistent {
            " (persistent grants)"
        } else {
            ""
        }
    );
    let stats = dev.stats();
    println!(
        "frontend counts: {} requests, {} notifications sent, {} received, {} bytes copied, {} grants held",
        stats.requests,
        stats.events.sent,
        stats.events.received,
        stats.dma.bytes_bounced,
        stats.dma.grants_held
    );
    let code = report(&format!("device {devid}"), args, &cmp, started);
    dev.close().context("closing the device")?;
    Ok(code)
}

/// `verify --nbd`: the same pattern through an NBD server's unix socket (its first export).
pub(crate) fn verify_nbd(socket: &Path, args: &VerifyArgs) -> Result<i32> {
    let address = NbdAddress::Unix(socket.to_path_buf());
    let name = NbdClient::list_exports(&address)
        .ok()
        .and_then(|l| l.into_iter().next().map(|(name, _)| name))
        .unwrap_or_default();
    let mut client = NbdClient::connect(&address, &name)
        .with_context(|| format!("cannot connect to the NBD server at {}", socket.display()))?;
    let size = client.size();
    let length = args.length.unwrap_or(size.saturating_sub(args.offset));
    if args.offset.checked_add(length).is_none_or(|e| e > size) {
        bail!(
            "{length} bytes at offset {} go past the end of the export ({size} bytes)",
            args.offset
        );
    }
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let started = Instant::now();
    let mut at = args.offset;
    let mut progress = Progress::new("writing", length);
    while at < args.offset + length {
        let n = ((args.offset + length - at) as usize).min(chunk);
        pattern::fill(args.seed, at, &mut buf[..n]);
        client
            .write_at(&buf[..n], at)
            .with_context(|| format!("NBD write at {at} failed"))?;
        at += n as u64;
        progress.add(n as u64);
    }
    drop(progress);
    if client.can_flush() {
        client.flush().context("NBD flush failed")?;
    }
    println!(
        "wrote {length} bytes at offset {} (seed {}) through NBD export {name:?} in {:.3}s",
        args.offset,
        args.seed,
        started.elapsed().as_secs_f64()
    );
    let mut cmp = Comparer::new(args.seed);
    let mut at = args.offset;
    let mut progress = Progress::new("reading back", length);
    while at < args.offset + length {
        let n = ((args.offset + length - at) as usize).min(chunk);
        client
            .read_at(&mut buf[..n], at)
            .with_context(|| format!("NBD read at {at} failed"))?;
        cmp.add(at, &buf[..n]);
        at += n as u64;
        progress.add(n as u64);
    }
    drop(progress);
    Ok(report(
        &format!("NBD {}", socket.display()),
        args,
        &cmp.finish(),
        started,
    ))
}

pub(crate) fn report(
    what: &str,
    args: &VerifyArgs,
    cmp: &pattern::Comparison,
    started: Instant,
) -> i32 {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{what}: checked {} bytes at offset {} in {secs:.3}s ({:.1} MiB/s): expected checksum {:#018x}, found {:#018x}",
        cmp.bytes,
        args.offset,
        cmp.bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
        cmp.expected_checksum,
        cmp.actual_checksum
    );
    if cmp.matches() {
        println!("OK: the data matches the pattern of seed {}", args.seed);
        0
    } else {
        println!(
            "MISMATCH: {} sector(s) differ, the first at byte {}",
            cmp.mismatched_sectors,
            cmp.first_mismatch.map_or("?".into(), |b| b.to_string())
        );
        1
    }
}
