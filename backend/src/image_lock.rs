//! Image locks: one writer or any number of readers per image, across processes.
//!
//! A read-write image is locked exclusively and a read-only one shared, with open-file-
//! description (OFD) locks over the whole file, as QEMU locks its images. So a second writer is
//! refused whether it is another device of this daemon, another daemon or loopback, or QEMU
//! (`qemu-io`, `qemu-img`): QEMU's own locks on bytes 100 and up conflict with a whole-file
//! lock. The lock belongs to the open file itself and goes when the file is closed, also when
//! the process is killed.
//!
//! A conflict names its holder where it can: a device of this process from an in-process
//! registry, another process from the `lock:` lines of `/proc/<pid>/fdinfo/*`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// How long a conflicting lock is waited for when its holder may be on its way out: a device
/// that was just detached (its daemon drops the image a moment after the directories go), or a
/// daemon that was just stopped.
pub const RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// How an image is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Readers only: any number of shared locks.
    Shared,
    /// One writer, and no reader beside it.
    Exclusive,
}

impl LockMode {
    /// The mode for an image opened read-only (`true`) or read-write.
    pub fn for_read_only(read_only: bool) -> LockMode {
        if read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        }
    }

    fn fcntl_type(self) -> libc::c_short {
        match self {
            LockMode::Shared => libc::F_RDLCK as libc::c_short,
            LockMode::Exclusive => libc::F_WRLCK as libc::c_short,
        }
    }

    fn use_of(self) -> &'static str {
        match self {
            LockMode::Shared => "read-only",
            LockMode::Exclusive => "read-write",
        }
    }
}

/// Who holds the lock that refused ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Something in this process, as it registered itself (`domain 5 device 0`).
    ThisProcess(String),
    /// Another process.
    Process {
        /// Its pid.
        pid: u32,
        /// Its command name (`/proc/<pid>/comm`).
        comm: String,
    },
    /// Nobody could be named (the lock went meanwhile, or `/proc` is not readable).
    Unknown,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::ThisProcess(who) => write!(f, "{who} of this process"),
            Holder::Process { pid, comm } => write!(f, "process {pid} ({comm})"),
            Holder::Unknown => f.write_str("another process (lslocks shows which)"),
        }
    }
}

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone holds a lock that conflicts with ours.
    #[error(
        "image {} is in use: {holder} has it {}, so it cannot also be used {} (two writers, \
         or a writer beside a reader, would see or cause a corrupt image); stop that user or \
         detach its device first, or give --force-share if every user really coordinates",
        path.display(),
        held.use_of(),
        wanted.use_of()
    )]
    Held {
        /// The image.
        path: PathBuf,
        /// The lock we asked for.
        wanted: LockMode,
        /// The conflicting lock.
        held: LockMode,
        /// Who holds it.
        holder: Holder,
    },
    /// The lock call itself failed (a filesystem without locks, for one).
    #[error("cannot lock image {}", path.display())]
    Io {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A taken lock's entry in this process's registry of holders. The lock itself is the open
/// file's and goes when the file is closed; dropping this only forgets the holder's name, so
/// keep it next to the file.
#[derive(Debug)]
pub struct ImageLock {
    key: FileKey,
    id: u64,
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        let mut holders = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = holders.get_mut(&self.key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                holders.remove(&self.key);
            }
        }
    }
}

/// (device, inode) of a file.
type FileKey = (u64, u64);

type Registry = Mutex<BTreeMap<FileKey, Vec<(u64, String)>>>;

fn registry() -> &'static Registry {
    static REGISTRY: Registry = Mutex::new(BTreeMap::new());
    &REGISTRY
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Locks `file` (opened from `path`) in `mode` over its whole length, without waiting. `who`
/// names the holder for a later conflict in this process (`domain 5 device 0`).
pub fn lock(file: &File, path: &Path, mode: LockMode, who: &str) -> Result<ImageLock, LockError> {
    let io_err = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(io_err)?;
    let key = (meta.dev(), meta.ino());
    match ofd_lock(file, libc::F_OFD_SETLK, mode.fcntl_type()) {
        Ok(_) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            return Err(conflict(file, path, mode, key));
        }
        Err(e) => return Err(io_err(e)),
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_default()
        .push((id, who.to_owned()));
    Ok(ImageLock { key, id })
}

/// [`probe`], again until `wait` has passed while it finds a conflict.
pub fn probe_waiting(
    file: &File,
    path: &Path,
    mode: LockMode,
    wait: std::time::Duration,
) -> Result<(), LockError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match probe(file, path, mode) {
            Err(LockError::Held { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Whether `file` could be locked in `mode` now (nothing is taken): the conflict if not.
pub fn probe(file: &File, path: &Path, mode: LockMode) -> Result<(), LockError> {
    let meta = file.metadata().map_err(|source| LockError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match ofd_lock(file, libc::F_OFD_GETLK, mode.fcntl_type()) {
        Ok(fl) if i32::from(fl.l_type) == libc::F_UNLCK => Ok(()),
        Ok(_) => Err(conflict(file, path, mode, (meta.dev(), meta.ino()))),
        Err(source) => Err(LockError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn conflict(file: &File, path: &Path, wanted: LockMode, key: FileKey) -> LockError {
    // What kind of lock refused ours; a write lock if it is already gone.
    let held = match ofd_lock(file, libc::F_OFD_GETLK, wanted.fcntl_type()) {
        Ok(fl) if i32::from(fl.l_type) == libc::F_RDLCK => LockMode::Shared,
        _ => LockMode::Exclusive,
    };
    let in_process = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .and_then(|list| list.first().map(|(_, who)| who.clone()));
    let holder = match in_process {
        Some(who) => Holder::ThisProcess(who),
        None => find_holder(key, std::process::id()).unwrap_or(Holder::Unknown),
    };
    LockError::Held {
        path: path.to_path_buf(),
        wanted,
        held,
        holder,
    }
}

/// `fcntl(fd, cmd, &flock)` over the whole file; returns the flock the kernel wrote back.
fn ofd_lock(file: &File, cmd: libc::c_int, l_type: libc::c_short) -> io::Result<libc::flock> {
    // SAFETY: an all-zero flock is a valid value of this plain C struct; l_pid must be 0 for
    // OFD locks, l_start = l_len = 0 covers the whole file.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: the fd is open for as long as `file` is borrowed, and `fl` is a valid flock the
    // kernel reads (SETLK) or reads and overwrites (GETLK); nothing else is touched.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// The `MAJOR:MINOR:INODE` text `/proc/locks` and fdinfo print for a file.
fn lock_text(key: FileKey) -> String {
    let (dev, ino) = key;
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    format!("{major:02x}:{minor:02x}:{ino} ")
}

/// The first process other than `me` with an OFD lock on the file, from its fdinfo.
fn find_holder(key: FileKey, me: u32) -> Option<Holder> {
    let needle = lock_text(key);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if info
                .lines()
                .any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains(&needle))
            {
                let comm = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_else(|_| "?".to_owned());
                return Some(Holder::Process { pid, comm });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::process::{Command, Stdio};

    fn image(dir: &tempfile::TempDir) -> PathBuf {
        let p = dir.path().join("disk.img");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        p
    }

    fn open(p: &Path, write: bool) -> File {
        OpenOptions::new().read(true).write(write).open(p).unwrap()
    }

    #[test]
    fn one_writer_or_many_readers_and_the_holder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(&dir);
        let (a, b, c) = (open(&p, true), open(&p, true), open(&p, false));
        let la = lock(&a, &p, LockMode::Exclusive, "domain 5 device 0").unwrap();
        for (f, mode) in [(&b, LockMode::Exclusive), (&c, LockMode::Shared)] {
            let e = lock(f, &p, mode, "domain 6 device 0").unwrap_err();
            let LockError::Held { held, holder, .. } = &e else {
                panic!("{e}")
            };
            assert_eq!(*held, LockMode::Exclusive);
            assert_eq!(*holder, Holder::ThisProcess("domain 5 device 0".into()));
            assert!(
                e.to_string()
                    .contains("domain 5 device 0 of this process has it read-write")
            );
            assert!(probe(f, &p, mode).is_err());
        }
        drop(la);
        drop(a);
        // The writer closed: readers share.
        let d = open(&p, false);
        let _lc = lock(&c, &p, LockMode::Shared, "domain 6 device 0").unwrap();
        let _ld = lock(&d, &p, LockMode::Shared, "domain 7 device 0").unwrap();
        probe(&d, &p, LockMode::Shared).unwrap();
        let e = lock(&b, &p, LockMode::Exclusive, "domain 8 device 0").unwrap_err();
        let LockError::Held { held, .. } = e else {
            panic!("{e}")
        };
        assert_eq!(held, LockMode::Shared);
    }

    #[test]
    fn qemu_and_we_refuse_each_other() {
        if Command::new("qemu-io").arg("--version").output().is_err() {
            panic!("qemu-io is missing: install qemu-utils (scripts/install-deps.sh does)");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = image(&dir);
        // We hold it: qemu-io cannot open it.
        {
            let f = open(&p, true);
            let _l = lock(&f, &p, LockMode::Exclusive, "domain 5 device 0").unwrap();
            let out = Command::new("qemu-io")
                .args(["-f", "raw", "-c", "read 0 512"])
                .arg(&p)
                .output()
                .unwrap();
            assert!(!out.status.success(), "qemu-io opened a locked image");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("lock"),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // qemu-io holds it (interactive, waiting on stdin): we cannot lock it, and we name it.
        let mut q = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(&p)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let f = open(&p, true);
        // Wait, without taking anything, until qemu-io has opened and locked it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while probe(&f, &p, LockMode::Exclusive).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io never locked it"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let e = lock(&f, &p, LockMode::Exclusive, "domain 5 device 0").unwrap_err();
        let _ = q.kill();
        let _ = q.wait();
        let LockError::Held { holder, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(
            *holder,
            Holder::Process {
                pid: q.id(),
                comm: "qemu-io".into()
            },
            "{e}"
        );
    }

    #[test]
    fn the_lock_text_matches_what_the_kernel_prints() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(&dir);
        let f = open(&p, true);
        let _l = lock(&f, &p, LockMode::Exclusive, "t").unwrap();
        let m = f.metadata().unwrap();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd())).unwrap();
        assert!(info.contains(&lock_text((m.dev(), m.ino()))), "{info}");
    }
}
