//! Byte patterns that make a page recognisable: every byte depends on a seed and on its
//! position, so a page shifted, truncated, zeroed or taken from another frame never matches.
//!
//! This module only computes and compares; it reaches shared memory through `SharedMem` copies.

use xenvirtio_xen::mem::{MemError, SharedMem};

/// The byte at position `i` of the pattern `seed`.
pub fn byte(seed: u8, i: usize) -> u8 {
    // Position bytes mixed so that neither a page offset nor a 256-byte shift keeps it equal.
    let lo = i as u8;
    let hi = (i >> 8) as u8;
    seed ^ lo ^ hi.wrapping_mul(31).rotate_left(3)
}

/// The pattern `seed` over `len` bytes starting at position `from`.
pub fn bytes(seed: u8, from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| byte(seed, i)).collect()
}

/// Writes the pattern `seed` into `mem[offset..offset + len]` (positions counted from
/// `offset`'s own value, so a region checked later at the same offset matches).
pub fn fill(mem: &SharedMem<'_>, offset: usize, len: usize, seed: u8) -> Result<(), MemError> {
    mem.write(offset, &bytes(seed, offset, len))
}

/// The first byte of `mem[offset..offset + len]` that differs from the pattern `seed`, as
/// (position, found, expected).
pub fn first_mismatch(
    mem: &SharedMem<'_>,
    offset: usize,
    len: usize,
    seed: u8,
) -> Result<Option<(usize, u8, u8)>, MemError> {
    let mut found = vec![0u8; len];
    mem.read(offset, &mut found)?;
    Ok(found
        .iter()
        .enumerate()
        .map(|(k, &b)| (offset + k, b, byte(seed, offset + k)))
        .find(|(_, b, want)| b != want))
}

/// "ok" or a description of the first mismatch, for a result line.
pub fn verdict(mismatch: Option<(usize, u8, u8)>) -> String {
    match mismatch {
        None => "ok".into(),
        Some((at, found, want)) => {
            format!("byte {at} is {found:#04x}, expected {want:#04x}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvirtio_xen::mem::PageBuf;

    #[test]
    fn patterns_tell_pages_and_shifts_apart() {
        let a = bytes(0x5a, 0, 4096);
        assert_ne!(a, bytes(0x5b, 0, 4096));
        assert_ne!(a[..4000], bytes(0x5a, 1, 4000)[..]);
        assert_ne!(a[..3840], a[256..4096]);
        assert!(a.contains(&0) && a.iter().any(|&b| b != 0));
    }

    #[test]
    fn fill_and_compare_over_shared_memory() {
        let buf = PageBuf::new(2);
        let m = buf.mem();
        fill(&m, 100, 5000, 7).unwrap();
        assert_eq!(first_mismatch(&m, 100, 5000, 7).unwrap(), None);
        assert_eq!(first_mismatch(&m, 200, 100, 7).unwrap(), None);
        m.write(4100, &[byte(7, 4100) ^ 1]).unwrap();
        let mm = first_mismatch(&m, 100, 5000, 7).unwrap();
        assert_eq!(mm, Some((4100, byte(7, 4100) ^ 1, byte(7, 4100))));
        assert!(verdict(mm).starts_with("byte 4100 is"));
        assert_eq!(verdict(None), "ok");
    }
}
