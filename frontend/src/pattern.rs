//! The seeded data pattern of `xenvirtio-frontend verify`, and checks against it.
//!
//! The pattern is defined per 512-byte sector of the **disk** (not of the range written), so
//! any tool can recompute what a byte at a given disk offset must hold:
//!
//! 1. `x = splitmix64(splitmix64(seed) ^ sector)`, where `sector = disk offset / 512`, and
//!    `x = 0x9e3779b97f4a7c15` if that is 0;
//! 2. for `i` in `0..64`: `x ^= x << 13; x ^= x >> 7; x ^= x << 17;` then bytes
//!    `8 * i .. 8 * i + 8` of the sector are `x` in little-endian order.
//!
//! `splitmix64(z)` is Vigna's: `z += 0x9e3779b97f4a7c15; z = (z ^ (z >> 30)) *
//! 0xbf58476d1ce4e5b9; z = (z ^ (z >> 27)) * 0x94d049bb133111eb; z ^ (z >> 31)` (wrapping).
//!
//! [`checksum`] is FNV-1a over little-endian 64-bit words (the tail zero-padded), then xored
//! with the length. This module only computes; it never touches a device.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The pattern's unit.
pub const PATTERN_SECTOR: u64 = 512;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 512 bytes that disk sector `sector` holds under `seed`.
pub fn sector_pattern(seed: u64, sector: u64) -> [u8; PATTERN_SECTOR as usize] {
    let mut out = [0u8; PATTERN_SECTOR as usize];
    let mut x = splitmix64(splitmix64(seed) ^ sector);
    if x == 0 {
        x = 0x9e37_79b9_7f4a_7c15;
    }
    for word in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// Fills `buf` with the pattern of the disk bytes starting at `offset` (any alignment).
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut at = 0usize;
    while at < buf.len() {
        let pos = offset + at as u64;
        let sector = pos / PATTERN_SECTOR;
        let in_sector = (pos % PATTERN_SECTOR) as usize;
        let pattern = sector_pattern(seed, sector);
        let n = (PATTERN_SECTOR as usize - in_sector).min(buf.len() - at);
        buf[at..at + n].copy_from_slice(&pattern[in_sector..in_sector + n]);
        at += n;
    }
}

/// A running checksum (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    hash: u64,
    len: u64,
    /// Bytes of an unfinished word.
    pending: [u8; 8],
    pending_len: usize,
}

impl Default for Checksum {
    fn default() -> Self {
        Self {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
            pending: [0; 8],
            pending_len: 0,
        }
    }
}

impl Checksum {
    fn word(&mut self, w: u64) {
        self.hash = (self.hash ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }

    /// Adds bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.pending_len > 0 {
            let n = (8 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + n].copy_from_slice(&data[..n]);
            self.pending_len += n;
            data = &data[n..];
            if self.pending_len < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.pending));
            self.pending_len = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().expect("chunks of 8")));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The checksum of everything added.
    pub fn finish(mut self) -> u64 {
        if self.pending_len > 0 {
            self.pending[self.pending_len..].fill(0);
            self.word(u64::from_le_bytes(self.pending));
        }
        self.hash ^ self.len
    }
}

/// The checksum of `data`.
pub fn checksum(data: &[u8]) -> u64 {
    let mut c = Checksum::default();
    c.update(data);
    c.finish()
}

/// What comparing data with the pattern found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Comparison {
    /// Bytes compared.
    pub bytes: u64,
    /// Checksum of the pattern over the range.
    pub expected_checksum: u64,
    /// Checksum of the data found.
    pub actual_checksum: u64,
    /// Sectors (or partial sectors at the edges) that differ.
    pub mismatched_sectors: u64,
    /// Disk offset of the first differing byte.
    pub first_mismatch: Option<u64>,
}

impl Comparison {
    /// Whether the data matched.
    pub fn matches(&self) -> bool {
        self.mismatched_sectors == 0 && self.expected_checksum == self.actual_checksum
    }
}

/// Compares data read range by range with the pattern.
#[derive(Debug, Default)]
pub struct Comparer {
    seed: u64,
    expected: Checksum,
    actual: Checksum,
    result: Comparison,
}

impl Comparer {
    /// A comparison against the pattern of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    /// Adds `data`, found at disk offset `offset`. Call in increasing offset order.
    pub fn add(&mut self, offset: u64, data: &[u8]) {
        let mut want = vec![0u8; data.len()];
        fill(self.seed, offset, &mut want);
        self.expected.update(&want);
        self.actual.update(data);
        self.result.bytes += data.len() as u64;
        // Count differing sectors, aligned to the disk's sectors.
        let mut at = 0usize;
        while at < data.len() {
            let pos = offset + at as u64;
            let n = ((PATTERN_SECTOR - pos % PATTERN_SECTOR) as usize).min(data.len() - at);
            if let Some(i) = (at..at + n).find(|&i| data[i] != want[i]) {
                self.result.mismatched_sectors += 1;
                self.result.first_mismatch.get_or_insert(offset + i as u64);
            }
            at += n;
        }
    }

    /// The result.
    pub fn finish(mut self) -> Comparison {
        self.result.expected_checksum = self.expected.finish();
        self.result.actual_checksum = self.actual.finish();
        self.result
    }
}

/// Checks `length` bytes of the image file at `path`, from `offset`, against the pattern of
/// `seed` (what Dom0 runs on the backend's image after a guest's `verify`).
pub fn check_image(path: &Path, seed: u64, offset: u64, length: u64) -> io::Result<Comparison> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{length} bytes at offset {offset} go past the end of {} ({size} bytes)",
                path.display()
            ),
        ));
    }
    let mut cmp = Comparer::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < offset + length {
        let n = ((offset + length - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        cmp.add(at, &buf[..n]);
        at += n as u64;
    }
    Ok(cmp.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_is_what_the_module_docs_define() {
        // Recomputed by hand from the definition for seed 1, sector 0.
        let mut x = splitmix64(splitmix64(1));
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let s = sector_pattern(1, 0);
        assert_eq!(&s[..8], &x.to_le_bytes());
        // Deterministic, and different per seed and per sector.
        assert_eq!(sector_pattern(7, 100), sector_pattern(7, 100));
        assert_ne!(sector_pattern(7, 100), sector_pattern(8, 100));
        assert_ne!(sector_pattern(7, 100), sector_pattern(7, 101));
        // splitmix64's published first output for state 0.
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn fill_is_addressed_by_disk_offset() {
        let mut whole = vec![0u8; 4096];
        fill(3, 8192, &mut whole);
        let mut part = vec![0u8; 1000];
        fill(3, 8192 + 700, &mut part);
        assert_eq!(&whole[700..1700], &part[..]);
        assert_eq!(&whole[512..1024], &sector_pattern(3, 17)[..]);
    }

    #[test]
    fn checksums_do_not_depend_on_how_data_is_split() {
        let mut data = vec![0u8; 10_000];
        fill(9, 0, &mut data);
        let whole = checksum(&data);
        let mut c = Checksum::default();
        for part in data.chunks(333) {
            c.update(part);
        }
        assert_eq!(c.finish(), whole);
        assert_ne!(checksum(&data[..9999]), whole);
        assert_ne!(checksum(&[0]), checksum(&[0, 0]), "the length counts");
    }

    #[test]
    fn image_checks_find_the_first_bad_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut data = vec![0u8; 64 * 1024];
        fill(42, 0, &mut data);
        std::fs::write(&path, &data).unwrap();
        let ok = check_image(&path, 42, 4096, 32 * 1024).unwrap();
        assert!(ok.matches(), "{ok:?}");
        assert_eq!(ok.bytes, 32 * 1024);
        assert!(!check_image(&path, 43, 4096, 512).unwrap().matches());
        data[5000] ^= 1;
        data[9000] ^= 1;
        std::fs::write(&path, &data).unwrap();
        let bad = check_image(&path, 42, 4096, 32 * 1024).unwrap();
        assert!(!bad.matches());
        assert_eq!(bad.first_mismatch, Some(5000));
        assert_eq!(bad.mismatched_sectors, 2);
        assert!(check_image(&path, 42, 60 * 1024, 8 * 1024).is_err());
    }
}
