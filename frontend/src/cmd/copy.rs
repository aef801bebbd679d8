//! `copy`: an image file onto a blk device, or a device into a file.
#![allow(clippy::wildcard_imports)]

use super::progress::Progress;
use crate::*;

pub(crate) fn copy(global: &Global, args: &CopyArgs) -> Result<i32> {
    let open = || {
        std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))
    };
    let length = open()?.metadata()?.len();
    let frontend = open_frontend(global)?;
    let devid = first_blk(&frontend, args.devid)?;
    let dev = connect_blk(&frontend, global, &args.dma, devid, None, None)?;
    if args
        .offset
        .checked_add(length)
        .is_none_or(|e| e > dev.size())
    {
        bail!(
            "{} ({length} bytes) at offset {} does not fit on the disk ({} bytes)",
            args.file.display(),
            args.offset,
            dev.size()
        );
    }
    let before = dev.stats();
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let mut back = vec![0u8; chunk];
    // The file onto the disk.
    let started = Instant::now();
    let mut file = open()?;
    let mut at = args.offset;
    let mut progress = Progress::new("writing", length);
    loop {
        let n = read_full(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        dev.write_at(&buf[..n], at)
            .with_context(|| format!("write of {n} bytes at {at} failed"))?;
        at += n as u64;
        progress.add(n as u64);
    }
    dev.flush().context("flush failed")?;
    drop(progress);
    let wrote = started.elapsed().as_secs_f64();
    // And back, compared with the file.
    let started = Instant::now();
    let mut file = open()?;
    let mut at = args.offset;
    let mut first_difference = None;
    let mut progress = Progress::new("reading back", length);
    loop {
        let n = read_full(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        dev.read_at(&mut back[..n], at)
            .with_context(|| format!("read of {n} bytes at {at} failed"))?;
        if first_difference.is_none() {
            first_difference = buf[..n]
                .iter()
                .zip(&back[..n])
                .position(|(a, b)| a != b)
                .map(|i| at + i as u64);
        }
        at += n as u64;
        progress.add(n as u64);
    }
    drop(progress);
    let read = started.elapsed().as_secs_f64();
    let n = dev.negotiated();
    let mib = length as f64 / (1 << 20) as f64;
    println!(
        "copied {length} bytes of {} to device {devid} at offset {} over dma {}{}",
        args.file.display(),
        args.offset,
        n.strategy,
        if n.persistent {
            " (persistent grants)"
        } else {
            ""
        }
    );
    println!(
        "write: {wrote:.3}s ({:.1} MiB/s), read back: {read:.3}s ({:.1} MiB/s)",
        mib / wrote.max(1e-9),
        mib / read.max(1e-9)
    );
    let after = dev.stats();
    println!(
        "frontend counts: {} requests, {} notifications sent, {} received, {} bytes copied, {} grants held",
        after.requests - before.requests,
        after.events.sent - before.events.sent,
        after.events.received - before.events.received,
        after.dma.bytes_bounced - before.dma.bytes_bounced,
        after.dma.grants_held
    );
    dev.close().context("closing the device")?;
    match first_difference {
        None => {
            println!("OK: the device holds the file's {length} bytes");
            Ok(0)
        }
        Some(at) => {
            println!("MISMATCH: the device differs from the file at byte {at}");
            Ok(1)
        }
    }
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
pub(crate) fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the file failed"),
        }
    }
    Ok(filled)
}
