//! The byte format of every fuzz input: a reader that builds structured inputs (rings,
//! descriptor chains, requests) from the fuzzer's bytes, and a writer that is its exact inverse.
//!
//! libFuzzer mutates bytes; the targets want structures. [`Reader`] turns any byte string into
//! a structure (it never fails: past the end it reads zeros), and [`Writer`] turns a structure
//! back into the bytes that read as it. The inverse is what lets seed corpora come from the unit
//! tests' cases: a seed is written as a structure and stored as bytes (`examples/write_seeds.rs`).
//! The `arbitrary` crate drives the targets ([`structured_input!`] implements its trait through
//! the reader), so `cargo fuzz fmt` prints a crash as its structure.

/// Reads structured values from fuzzer bytes. Integers are little-endian; a missing byte reads
/// as zero, so every input is valid.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    /// A flag (the low bit of a byte).
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// A choice among `n` (at most 256) alternatives.
    pub fn choice(&mut self, n: usize) -> usize {
        debug_assert!((1..=256).contains(&n));
        usize::from(self.u8()) % n
    }

    /// A count of at most `max` (at most 255), for the length of a list.
    pub fn count(&mut self, max: usize) -> usize {
        debug_assert!(max < 256);
        usize::from(self.u8()) % (max + 1)
    }

    /// A byte string of at most `max` bytes (a `u16` length, then the bytes; shorter if the
    /// input ends first).
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let want = usize::from(self.u16()) % (max + 1);
        let n = want.min(self.data.len());
        let out = self.data[..n].to_vec();
        self.data = &self.data[n..];
        out
    }

    /// A list of at most `max` items read by `item`.
    pub fn list<T>(&mut self, max: usize, mut item: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let n = self.count(max);
        (0..n).map(|_| item(self)).collect()
    }
}

/// Writes structured values as the bytes a [`Reader`] reads back as them.
#[derive(Debug, Default)]
pub struct Writer {
    out: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes written.
    pub fn finish(self) -> Vec<u8> {
        self.out
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A flag.
    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// Choice `index` of `n`.
    pub fn choice(&mut self, index: usize, n: usize) {
        assert!(index < n && n <= 256, "choice {index} of {n}");
        self.u8(index as u8);
    }

    /// A count of at most `max`.
    pub fn count(&mut self, n: usize, max: usize) {
        assert!(n <= max && max < 256, "count {n} over {max}");
        self.u8(n as u8);
    }

    /// A byte string of at most `max` bytes.
    pub fn bytes(&mut self, b: &[u8], max: usize) {
        assert!(
            b.len() <= max && max <= usize::from(u16::MAX),
            "{} bytes over {max}",
            b.len()
        );
        self.u16(b.len() as u16);
        self.out.extend_from_slice(b);
    }

    /// A list of at most `max` items written by `item`.
    pub fn list<T>(&mut self, items: &[T], max: usize, mut item: impl FnMut(&mut Self, &T)) {
        self.count(items.len(), max);
        for i in items {
            item(self, i);
        }
    }
}

/// A fuzz input with a byte format: `read` accepts any bytes, and `read(write(x)) == x`.
pub trait Structured: Sized {
    /// Builds the input from the reader.
    fn read(r: &mut Reader<'_>) -> Self;
    /// Writes the bytes that read back as `self`.
    fn write(&self, w: &mut Writer);

    /// Reads a whole byte string.
    fn from_bytes(data: &[u8]) -> Self {
        Self::read(&mut Reader::new(data))
    }

    /// Writes `self` as a byte string.
    fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.write(&mut w);
        w.finish()
    }
}

/// Implements `arbitrary::Arbitrary` for a [`Structured`] input, so libFuzzer targets take the
/// structure directly and `cargo fuzz fmt` prints it.
#[macro_export]
macro_rules! structured_input {
    ($t:ty) => {
        impl<'a> ::arbitrary::Arbitrary<'a> for $t {
            fn arbitrary(u: &mut ::arbitrary::Unstructured<'a>) -> ::arbitrary::Result<Self> {
                let data = u.bytes(u.len())?;
                Ok(<$t as $crate::input::Structured>::from_bytes(data))
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_is_the_readers_inverse() {
        let mut w = Writer::new();
        w.u8(7);
        w.u16(0xbeef);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 1);
        w.bool(true);
        w.choice(2, 3);
        w.bytes(b"abc", 10);
        w.list(&[1u16, 2, 3], 5, |w, v| w.u16(*v));
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        assert_eq!(
            (r.u8(), r.u16(), r.u32(), r.u64()),
            (7, 0xbeef, 0xdead_beef, u64::MAX - 1)
        );
        assert!(r.bool());
        assert_eq!(r.choice(3), 2);
        assert_eq!(r.bytes(10), b"abc");
        assert_eq!(r.list(5, |r| r.u16()), vec![1, 2, 3]);
        assert_eq!(r.remaining(), 0);
        // Past the end everything reads as zero or empty.
        assert_eq!(
            (r.u64(), r.bytes(10), r.list(5, |r| r.u8())),
            (0, vec![], vec![])
        );
    }
}
