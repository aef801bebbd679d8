//! `serve`: every device of the domain, kept connected: blk as an NBD export (and a kernel
//! block device), console on a terminal or pty, rng on a FIFO, net as a TAP interface.
#![allow(clippy::wildcard_imports)]

use xenvirtio_frontend::supervisor::Waits;

use super::serve_blk::{KernelPath, ServedBlk};
use crate::*;

/// A flag set once SIGINT or SIGTERM arrives; both are blocked in this thread and in every
/// thread started afterwards, so only the waiter thread receives them.
pub(crate) fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    xenvirtio_xen::signals::StopSignals::block()
        .context("cannot block SIGINT/SIGTERM")?
        .spawn_flag("signals", |signal| {
            if let Some(name) = signal {
                eprintln!("{name}: closing the devices");
            }
        })
        .context("cannot start the signal thread")
}

pub(crate) fn serve(global: &Global, args: &ServeArgs) -> Result<i32> {
    let (kernel_nbd, kernel_vduse) = kernel_choice(args);
    let stop = stop_on_signals()?;
    let frontend = open_frontend(global)?;
    let devices = frontend.devices()?;
    let wanted: Vec<DeviceInfo> = if args.devids.is_empty() {
        devices
    } else {
        let mut out = Vec::new();
        for id in &args.devids {
            match devices.iter().find(|d| d.devid == *id) {
                Some(d) => out.push(d.clone()),
                None => {
                    frontend.device(*id)?;
                }
            }
        }
        out
    };
    if wanted.is_empty() {
        bail!("this domain has no virtio devices to serve; see `xenvirtio-frontend list`");
    }
    let connect = args.dma.connect(global)?;
    if kernel_nbd.is_some() || kernel_vduse {
        // Before the export and the supervisor start their threads, so that they inherit it.
        if let Err(e) = xenvirtio_frontend::knbd::mark_io_flusher() {
            eprintln!(
                "warning: cannot mark the frontend as an I/O flusher ({e}); under memory \
                 pressure the kernel NBD device may stall"
            );
        }
    }
    let waits = Waits {
        retry: DEFAULT_RETRY_WAIT,
        detach_grace: Duration::from_secs(args.detach_grace),
    };
    let mut kernel_devices = 0u32;
    let mut blks: Vec<ServedBlk> = Vec::new();
    let mut workers = Vec::new();
    let mut closers: Vec<Box<dyn FnOnce() -> Result<()>>> = Vec::new();
    for d in &wanted {
        match d.kind {
            Some(DeviceKind::Block) => {
                let options = BlkOptions {
                    connect: connect.clone(),
                    ..BlkOptions::default()
                };
                let own = Frontend::new(
                    *frontend.platform(),
                    Arc::clone(frontend.store()),
                    frontend.role().clone(),
                );
                let blk_count = wanted
                    .iter()
                    .filter(|w| w.kind == Some(DeviceKind::Block))
                    .count();
                let socket = if blk_count > 1 {
                    PathBuf::from(format!("{}.{}", args.nbd_socket.display(), d.devid))
                } else {
                    args.nbd_socket.clone()
                };
                let tcp = match args.nbd_tcp {
                    None => None,
                    Some(port) => Some(
                        port.checked_add(if blk_count > 1 { d.devid as u16 } else { 0 })
                            .ok_or_else(|| anyhow!("--nbd-tcp port out of range"))?,
                    ),
                };
                let path = match kernel_nbd {
                    Some(which) => {
                        let index = match which {
                            KernelNbdIndex::Auto => None,
                            KernelNbdIndex::From(n) => Some(n + kernel_devices),
                        };
                        kernel_devices += 1;
                        KernelPath::Nbd(index, args.nbd_interface)
                    }
                    None if kernel_vduse => KernelPath::Vduse,
                    None => KernelPath::None,
                };
                blks.push(ServedBlk::start(
                    own, d.devid, options, waits, &socket, tcp, path,
                )?);
            }
            Some(DeviceKind::Console) => {
                let dev = Arc::new(frontend.connect_console(d.devid, &connect)?);
                let (input, output): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match args
                    .console
                {
                    ConsoleSink::Stdio => (Box::new(std::io::stdin()), Box::new(std::io::stdout())),
                    ConsoleSink::Pty => {
                        let (master, path) = open_pty()?;
                        println!("device {}: console on {}", d.devid, path.display());
                        (Box::new(master.try_clone()?), Box::new(master))
                    }
                };
                workers.extend(pump_console(&dev, input, output, &stop));
                let devid = d.devid;
                closers.push(Box::new(move || {
                    Arc::try_unwrap(dev)
                        .map_err(|_| anyhow!("console {devid} is still in use"))?
                        .close()
                        .map_err(Into::into)
                }));
            }
            Some(DeviceKind::Rng) => {
                let dev = frontend.connect_rng(d.devid, &connect)?;
                let path = if wanted
                    .iter()
                    .filter(|w| w.kind == Some(DeviceKind::Rng))
                    .count()
                    > 1
                {
                    PathBuf::from(format!("{}.{}", args.rng_fifo.display(), d.devid))
                } else {
                    args.rng_fifo.clone()
                };
                make_fifo(&path)?;
                println!(
                    "device {}: random bytes on fifo {}",
                    d.devid,
                    path.display()
                );
                let stop = Arc::clone(&stop);
                let (done_tx, done_rx) = mpsc::channel();
                workers.push(std::thread::spawn(move || {
                    let mut dev = dev;
                    if let Err(e) = feed_fifo(&mut dev, &path, &stop) {
                        eprintln!("rng fifo {}: {e:#}", path.display());
                    }
                    let _ = done_tx.send(dev);
                }));
                closers.push(Box::new(move || {
                    let dev = done_rx.recv().map_err(|_| anyhow!("the rng worker died"))?;
                    dev.close().map_err(Into::into)
                }));
            }
            Some(DeviceKind::Net) => {
                let dev = Arc::new(frontend.connect_net(d.devid, &connect)?);
                let nets = wanted
                    .iter()
                    .filter(|w| w.kind == Some(DeviceKind::Net))
                    .count();
                let name = match &args.net_ifname {
                    Some(n) if nets > 1 => format!("{n}.{}", d.devid),
                    Some(n) => n.clone(),
                    None => xenvirtio_frontend::net::tap_relay::default_name(d.devid),
                };
                let relay = xenvirtio_frontend::net::tap_relay::TapRelay::start(
                    Arc::clone(&dev),
                    &name,
                    Arc::clone(&stop),
                )
                .with_context(|| format!("device {}", d.devid))?;
                println!(
                    "device {}: net on interface {} (mac {}, mtu {}, {} DMA)",
                    d.devid,
                    relay.name(),
                    dev.mac(),
                    dev.mtu(),
                    dev.negotiated().strategy.name()
                );
                let devid = d.devid;
                closers.push(Box::new(move || {
                    relay.log_counters(&dev);
                    relay.stop();
                    Arc::try_unwrap(dev)
                        .map_err(|_| anyhow!("net device {devid} is still in use"))?
                        .close()
                        .map_err(Into::into)
                }));
            }
            None => eprintln!(
                "device {}: skipped, its type {:?} is not one this frontend drives",
                d.devid, d.type_string
            ),
        }
    }
    // Every device is connected and exported: a systemd `Type=notify` unit is up.
    let status = format!("READY=1\nSTATUS=serving {} device(s)", wanted.len());
    if let Err(e) = xenvirtio_xen::service::notify(&status) {
        eprintln!("warning: cannot tell the service manager that serve is ready: {e}");
    }
    // The same for a plain init script (packaging/sysvinit), which waits for this line.
    println!("serve: ready, serving {} device(s)", wanted.len());
    let mut failed = false;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        // A blk device detached for good: the kernel and the export let go of it now.
        while let Some((i, why)) = blks
            .iter()
            .enumerate()
            .find_map(|(i, b)| b.detached().map(|why| (i, why)))
        {
            let b = blks.swap_remove(i);
            eprintln!(
                "device {}: {why}; taking it from the kernel and closing its export",
                b.devid()
            );
            if let Err(e) = b.close() {
                eprintln!("closing: {e:#}");
                failed = true;
            }
            if blks.is_empty() && closers.is_empty() {
                println!("no device left to serve");
                stop.store(true, Ordering::SeqCst);
            }
        }
    }
    let _ = xenvirtio_xen::service::notify("STOPPING=1");
    for w in workers {
        let _ = w.join();
    }
    for b in blks {
        if let Err(e) = b.close() {
            eprintln!("closing: {e:#}");
            failed = true;
        }
    }
    for close in closers {
        if let Err(e) = close() {
            eprintln!("closing: {e:#}");
            failed = true;
        }
    }
    Ok(i32::from(failed))
}

/// Which kernel path `serve` takes: `--kernel-nbd`, `--kernel-vduse`, or for `--kernel` VDUSE
/// where this kernel has it and the first free NBD device otherwise, with the reason printed.
/// The modules of the path are loaded first where they are missing and `modprobe` exists.
fn kernel_choice(args: &ServeArgs) -> (Option<KernelNbdIndex>, bool) {
    if args.kernel_nbd.is_some() {
        ensure_nbd();
    }
    if !args.kernel && !args.kernel_vduse {
        return (args.kernel_nbd, false);
    }
    let mut paths = xenvirtio_frontend::vduse::probe(None);
    if !paths.usable() {
        modprobe(&["vduse", "virtio_vdpa", "virtio_blk"]);
        paths = xenvirtio_frontend::vduse::probe(None);
    }
    if !args.kernel {
        return (None, true);
    }
    if paths.usable() {
        println!(
            "kernel path: VDUSE (vduse, vdpa and virtio_vdpa are there: the kernel's own virtio_blk)"
        );
        (None, true)
    } else {
        let why = match (&paths.control, &paths.vdpa) {
            (Err(e), _) | (Ok(_), Err(e)) => e.to_string(),
            _ => "virtio_vdpa is not loaded (modprobe virtio_vdpa)".to_string(),
        };
        ensure_nbd();
        println!("kernel path: NBD, the first free /dev/nbdN (no VDUSE: {why})");
        (Some(KernelNbdIndex::Auto), false)
    }
}

/// Loads nbd.ko when the kernel has neither the NBD netlink family nor NBD devices yet.
fn ensure_nbd() {
    use xenvirtio_frontend::knbd;
    if !matches!(knbd::available(), Ok(true)) && !knbd::devices_available() {
        modprobe(&["nbd"]);
    }
}

/// `modprobe -a MODULES`, said on stdout; a guest without modprobe (or a kernel without the
/// modules) is not an error here: the path's own check says what is missing.
fn modprobe(modules: &[&str]) {
    match std::process::Command::new("modprobe")
        .arg("-q")
        .arg("-a")
        .args(modules)
        .stdin(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => println!("kernel modules: loaded {}", modules.join(" ")),
        Ok(s) => println!(
            "kernel modules: modprobe {} failed ({s})",
            modules.join(" ")
        ),
        Err(e) => println!(
            "kernel modules: cannot run modprobe ({e}); load {} by hand",
            modules.join(" ")
        ),
    }
}

pub(crate) fn pump_console(
    dev: &Arc<xenvirtio_frontend::console::ConsoleDevice<LinuxXen>>,
    mut input: Box<dyn Read + Send>,
    mut output: Box<dyn Write + Send>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    // The reader of stdin or the pty blocks in read(); it holds no device and is left behind
    // at shutdown.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = input.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let to_device = {
        let dev = Arc::clone(dev);
        let stop = Arc::clone(stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(data) => {
                        if let Err(e) = dev.write(&data) {
                            eprintln!("console: {e}");
                            break;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        })
    };
    let from_device = {
        let dev = Arc::clone(dev);
        let stop = Arc::clone(stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                let r = dev
                    .rx()
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .read(&mut buf, Some(Duration::from_millis(200)));
                match r {
                    Ok(0) => {}
                    Ok(n) => {
                        if output
                            .write_all(&buf[..n])
                            .and_then(|()| output.flush())
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        eprintln!("console: {e}");
                        break;
                    }
                }
            }
        })
    };
    vec![to_device, from_device]
}

/// Opens a new pseudo-terminal; returns its master side and the path of its slave.
pub(crate) fn open_pty() -> Result<(std::fs::File, PathBuf)> {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt returns a new fd or -1; no memory is involved.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("posix_openpt failed");
    }
    // SAFETY: fd is a freshly opened descriptor that nothing else owns.
    let master = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt take the master fd; ptsname_r writes at most name.len() bytes
    // (NUL included) into `name`.
    let rc = unsafe {
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            -1
        } else {
            libc::ptsname_r(fd, name.as_mut_ptr(), name.len())
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting up the pty failed");
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Ok((master, PathBuf::from(path.to_string_lossy().into_owned())))
}

pub(crate) fn make_fifo(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_fifo() => return Ok(()),
        Ok(_) => bail!("{} exists and is not a fifo", path.display()),
        Err(_) => {}
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .context("the fifo path contains a NUL byte")?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot create the fifo {}", path.display()));
    }
    Ok(())
}

/// Writes random bytes into the fifo whenever a reader has it open, until `stop`.
pub(crate) fn feed_fifo(
    dev: &mut xenvirtio_frontend::rng::RngDevice<LinuxXen>,
    path: &Path,
    stop: &AtomicBool,
) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        // Non-blocking open fails with ENXIO until a reader opens the fifo.
        let fifo = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
        let mut fifo = match fifo {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        'reader: while !stop.load(Ordering::SeqCst) {
            let n = dev.read(&mut buf, Some(Duration::from_secs(5)))?;
            let mut at = 0;
            while at < n {
                match fifo.write(&buf[at..n]) {
                    Ok(w) => at += w,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if stop.load(Ordering::SeqCst) {
                            break 'reader;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    // The reader went away: wait for the next one.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break 'reader,
                    Err(e) => return Err(e).context("writing the fifo failed"),
                }
            }
        }
    }
    Ok(())
}
