//! Shared helpers of the NBD integration tests: images, servers, real client tools.
#![allow(dead_code)]

pub mod raw;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenvirtio_frontend::nbd::{BlockExport, FileExport, NbdServer, NbdServerConfig};

/// Export name used by the tests.
pub const EXPORT: &str = "xvda";

/// A small deterministic generator (xorshift64*), so that expected images are built
/// independently of whatever wrote the export.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A temporary directory with a disk image in it.
pub struct Image {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Image {
    /// An image of `size` bytes filled by `seed` (or zeroes if `seed` is `None`).
    pub fn new(size: usize, seed: Option<u64>) -> Image {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let mut data = vec![0u8; size];
        if let Some(seed) = seed {
            Rng::new(seed).fill(&mut data);
        }
        std::fs::write(&path, &data).expect("write image");
        Image { dir, path }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read image")
    }

    /// A read-write `FileExport` of the image.
    pub fn export(&self, read_only: bool) -> Arc<dyn BlockExport> {
        Arc::new(FileExport::open(&self.path, read_only).expect("open export"))
    }

    /// A server of the image on its unix socket, under the name `EXPORT`.
    pub fn serve(&self, read_only: bool) -> NbdServer {
        let config = NbdServerConfig::new(EXPORT).unix(self.socket());
        NbdServer::start(self.export(read_only), config).expect("start NBD server")
    }
}

/// The NBD URI of the export `name` on unix socket `socket`.
pub fn unix_uri(socket: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// The absolute path of a client tool; a missing tool fails the test with the fix.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "{name} is not installed: the NBD tests need Debian's qemu-utils and libnbd-bin \
         (run scripts/install-deps.sh)"
    );
}

/// Runs a tool, failing the test with its output unless it exits 0.
pub fn run(name: &str, args: &[&str]) -> Output {
    let out = run_status(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a tool and returns its output whatever the exit status.
pub fn run_status(name: &str, args: &[&str]) -> Output {
    Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
