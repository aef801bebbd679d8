//! `console` and `rng`: the byte devices on the terminal and a FIFO.
#![allow(clippy::wildcard_imports)]

use super::serve::stop_on_signals;
use crate::*;

pub(crate) fn console(global: &Global, args: &ConsoleArgs) -> Result<i32> {
    let stop = stop_on_signals()?;
    let frontend = open_frontend(global)?;
    let devid = first_of_kind(&frontend, args.devid, DeviceKind::Console)?;
    let dev = Arc::new(
        frontend
            .connect_console(devid, &args.dma.connect(global)?)
            .with_context(|| format!("cannot connect console device {devid}"))?,
    );
    let n = dev.negotiated();
    eprintln!(
        "console {devid}: connected, dma {} ({})",
        n.strategy, n.reason
    );
    let deadline = args.wait.map(|s| Instant::now() + Duration::from_secs(s));
    // stdin -> port 0. The reader of stdin blocks in read() and holds no device; the sender
    // hands what it read to the device, and on stop it still sends what was read already.
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let sender_stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let dev = Arc::clone(&dev);
        let sender_stop = Arc::clone(&sender_stop);
        std::thread::spawn(move || -> Result<()> {
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(data) => dev.write(&data).context("sending to the console failed")?,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if sender_stop.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
        })
    };
    // port 0 -> stdout.
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    let mut lines = 0u64;
    let mut result: Result<i32> = Ok(0);
    loop {
        if args.lines.is_some_and(|want| lines >= want) {
            break;
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if let Some(want) = args.lines {
                eprintln!(
                    "console {devid}: {lines} of {want} line(s) arrived within {}s",
                    args.wait.unwrap_or(0)
                );
                result = Ok(1);
            }
            break;
        }
        let got = dev
            .rx()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .read(&mut buf, Some(Duration::from_millis(200)));
        match got {
            Ok(0) => {}
            Ok(n) => {
                lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                if let Err(e) = out.write_all(&buf[..n]).and_then(|()| out.flush()) {
                    result = Err(e).context("writing to stdout failed");
                    break;
                }
            }
            Err(e) => {
                result = Err(e).context("reading from the console failed");
                break;
            }
        }
    }
    sender_stop.store(true, Ordering::SeqCst);
    match sender.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => result = result.and(Err(e)),
        Err(_) => result = result.and(Err(anyhow!("the console sender panicked"))),
    }
    Arc::try_unwrap(dev)
        .map_err(|_| anyhow!("console {devid} is still in use"))?
        .close()
        .context("closing the console")?;
    result
}

pub(crate) fn rng(global: &Global, args: &RngArgs) -> Result<i32> {
    let frontend = open_frontend(global)?;
    let devid = first_of_kind(&frontend, args.devid, DeviceKind::Rng)?;
    let mut dev = frontend
        .connect_rng(devid, &args.dma.connect(global)?)
        .with_context(|| format!("cannot connect rng device {devid}"))?;
    let n = dev.negotiated();
    eprintln!("rng {devid}: connected, dma {} ({})", n.strategy, n.reason);
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 16 * 1024];
    let mut left = args.bytes;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let got = dev
            .read(&mut buf[..want], Some(Duration::from_secs(10)))
            .context("reading from the rng device failed")?;
        if got == 0 {
            bail!(
                "the rng device gave no bytes within 10s ({} of {} written)",
                args.bytes - left,
                args.bytes
            );
        }
        out.write_all(&buf[..got])
            .and_then(|()| out.flush())
            .context("writing to stdout failed")?;
        left -= got as u64;
    }
    dev.close().context("closing the rng device")?;
    Ok(0)
}
