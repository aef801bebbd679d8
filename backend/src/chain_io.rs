//! Sequential access to the buffers of one mapped descriptor chain.
//!
//! A device model sees a request as two byte streams: the device-readable buffers, read front
//! to back by a [`ChainReader`], and the device-writable buffers, written front to back by a
//! [`ChainWriter`]. Both work on [`SharedMem`] windows that the address resolver produced, so
//! a device model never learns which DMA strategy or which domain the bytes come from. Every
//! read copies out of shared memory exactly once.

use std::fs::File;
use std::io;

use xenvirtio_xen::mem::{MemError, SharedMem};

/// A stream ran out of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the chain's {side} buffers hold {available} more bytes, {wanted} were needed")]
pub struct ShortChain {
    /// `device-readable` or `device-writable`.
    pub side: &'static str,
    /// Bytes wanted.
    pub wanted: usize,
    /// Bytes left.
    pub available: usize,
}

/// A cursor over a list of windows.
#[derive(Debug, Clone)]
struct Cursor<'a, 'm> {
    segments: &'a [SharedMem<'m>],
    index: usize,
    offset: usize,
    remaining: usize,
}

impl<'a, 'm> Cursor<'a, 'm> {
    fn new(segments: &'a [SharedMem<'m>]) -> Self {
        let remaining = segments.iter().map(SharedMem::len).sum();
        Self {
            segments,
            index: 0,
            offset: 0,
            remaining,
        }
    }

    /// Splits off the next `len` bytes as windows, advancing the cursor.
    fn take(&mut self, len: usize, side: &'static str) -> Result<Vec<SharedMem<'m>>, ShortChain> {
        if len > self.remaining {
            return Err(ShortChain {
                side,
                wanted: len,
                available: self.remaining,
            });
        }
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let seg = self.segments[self.index];
            let n = (seg.len() - self.offset).min(left);
            if n > 0 {
                out.push(
                    seg.slice(self.offset, n)
                        .expect("the cursor stays inside its segment"),
                );
            }
            self.offset += n;
            left -= n;
            if self.offset == seg.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
        self.remaining -= len;
        Ok(out)
    }
}

/// Reads the device-readable buffers of a chain in order.
#[derive(Debug, Clone)]
pub struct ChainReader<'a, 'm> {
    cursor: Cursor<'a, 'm>,
}

impl<'a, 'm> ChainReader<'a, 'm> {
    /// A reader over `segments`.
    pub fn new(segments: &'a [SharedMem<'m>]) -> Self {
        Self {
            cursor: Cursor::new(segments),
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.cursor.remaining
    }

    /// Copies the next `dst.len()` bytes into `dst`.
    pub fn read_exact(&mut self, dst: &mut [u8]) -> Result<(), ShortChain> {
        let mut done = 0;
        for seg in self.cursor.take(dst.len(), "device-readable")? {
            let n = seg.len();
            seg.read(0, &mut dst[done..done + n])
                .expect("a taken window is readable whole");
            done += n;
        }
        Ok(())
    }

    /// Reads the next `N` bytes.
    pub fn read_array<const N: usize>(&mut self) -> Result<[u8; N], ShortChain> {
        let mut a = [0u8; N];
        self.read_exact(&mut a)?;
        Ok(a)
    }

    /// Takes the next `len` bytes as windows, for zero-copy consumers such as `pwrite`.
    pub fn take_windows(&mut self, len: usize) -> Result<Vec<SharedMem<'m>>, ShortChain> {
        self.cursor.take(len, "device-readable")
    }
}

/// Writes the device-writable buffers of a chain in order, counting what was written (the
/// `len` of the used-ring element).
#[derive(Debug, Clone)]
pub struct ChainWriter<'a, 'm> {
    cursor: Cursor<'a, 'm>,
    written: usize,
}

impl<'a, 'm> ChainWriter<'a, 'm> {
    /// A writer over `segments`.
    pub fn new(segments: &'a [SharedMem<'m>]) -> Self {
        Self {
            cursor: Cursor::new(segments),
            written: 0,
        }
    }

    /// Bytes of room left.
    pub fn remaining(&self) -> usize {
        self.cursor.remaining
    }

    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.written
    }

    /// Writes all of `src`.
    pub fn write_all(&mut self, src: &[u8]) -> Result<(), ChainWriteError> {
        let mut done = 0;
        for seg in self.cursor.take(src.len(), "device-writable")? {
            let n = seg.len();
            seg.write(0, &src[done..done + n])?;
            done += n;
            self.written += n;
        }
        Ok(())
    }

    /// Writes `len` copies of `byte`.
    pub fn fill(&mut self, len: usize, byte: u8) -> Result<(), ChainWriteError> {
        for seg in self.cursor.take(len, "device-writable")? {
            seg.fill(0, seg.len(), byte)?;
            self.written += seg.len();
        }
        Ok(())
    }

    /// Takes the next `len` bytes as windows for a zero-copy producer such as `pread`; the
    /// caller reports what it really wrote with [`ChainWriter::account`].
    pub fn take_windows(&mut self, len: usize) -> Result<Vec<SharedMem<'m>>, ShortChain> {
        self.cursor.take(len, "device-writable")
    }

    /// Counts `n` bytes written through windows from [`ChainWriter::take_windows`].
    pub fn account(&mut self, n: usize) {
        self.written += n;
    }

    /// Splits off the last `n` bytes of the stream (a status trailer), leaving this writer
    /// over the bytes before them.
    pub fn split_trailer(&mut self, n: usize) -> Result<ChainWriter<'a, 'm>, ShortChain> {
        if n > self.cursor.remaining {
            return Err(ShortChain {
                side: "device-writable",
                wanted: n,
                available: self.cursor.remaining,
            });
        }
        let mut tail = self.clone();
        tail.written = 0;
        let body = self.cursor.remaining - n;
        tail.cursor.take(body, "device-writable")?;
        self.cursor.remaining = body;
        Ok(tail)
    }
}

/// A write into the chain failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainWriteError {
    /// Not enough room.
    #[error(transparent)]
    Short(#[from] ShortChain),
    /// A window refused the write (read-only mapping).
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// Reads `file` at `pos` straight into the windows (`preadv`, one call for a whole chain in
/// the common case), stopping early at end of file. Returns the bytes read.
pub fn pread_into(windows: &[SharedMem<'_>], file: &File, pos: u64) -> io::Result<usize> {
    xenvirtio_xen::mem::read_vectored_from_file_at(windows, file, pos)
}

/// Writes the windows to `file` at `pos` (`pwritev`). Returns the bytes written.
pub fn pwrite_from(windows: &[SharedMem<'_>], file: &File, pos: u64) -> io::Result<usize> {
    xenvirtio_xen::mem::write_vectored_to_file_at(windows, file, pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvirtio_xen::mem::PageBuf;

    #[test]
    fn reader_crosses_segments() {
        let buf = PageBuf::new(1);
        let m = buf.mem();
        m.write(0, b"0123456789").unwrap();
        let segs = [
            m.slice(0, 3).unwrap(),
            m.slice(3, 0).unwrap(),
            m.slice(3, 7).unwrap(),
        ];
        let mut r = ChainReader::new(&segs);
        assert_eq!(r.remaining(), 10);
        assert_eq!(&r.read_array::<5>().unwrap(), b"01234");
        let w = r.take_windows(4).unwrap();
        assert_eq!(w.iter().map(|s| s.len()).sum::<usize>(), 4);
        assert_eq!(r.remaining(), 1);
        assert_eq!(
            r.read_array::<2>(),
            Err(ShortChain {
                side: "device-readable",
                wanted: 2,
                available: 1
            })
        );
    }

    #[test]
    fn writer_counts_and_splits_a_trailer() {
        let buf = PageBuf::new(1);
        let m = buf.mem();
        let segs = [m.slice(0, 4).unwrap(), m.slice(100, 3).unwrap()];
        let mut w = ChainWriter::new(&segs);
        let mut status = w.split_trailer(1).unwrap();
        assert_eq!((w.remaining(), status.remaining()), (6, 1));
        w.write_all(b"abcde").unwrap();
        w.fill(1, b'!').unwrap();
        assert!(w.write_all(b"x").is_err());
        status.write_all(&[7]).unwrap();
        assert_eq!(w.written() + status.written(), 7);
        assert_eq!(&m.read_array::<4>(0).unwrap(), b"abcd");
        assert_eq!(&m.read_array::<3>(100).unwrap(), &[b'e', b'!', 7]);
        let ro = [m.slice(0, 4).unwrap().read_only()];
        assert!(matches!(
            ChainWriter::new(&ro).write_all(b"z"),
            Err(ChainWriteError::Mem(_))
        ));
    }

    #[test]
    fn file_io_through_windows() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("xenvirtio-chainio-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(b"hello world").unwrap();
        let buf = PageBuf::new(1);
        let m = buf.mem();
        let wins = [m.slice(0, 5).unwrap(), m.slice(50, 100).unwrap()];
        assert_eq!(
            pread_into(&wins, &f, 0).unwrap(),
            11,
            "stops at end of file"
        );
        assert_eq!(&m.read_array::<6>(50).unwrap(), b" world");
        assert_eq!(pwrite_from(&wins[..1], &f, 6).unwrap(), 5);
        let mut back = String::new();
        use std::io::{Read, Seek};
        f.rewind().unwrap();
        f.read_to_string(&mut back).unwrap();
        assert_eq!(back, "hello hello");
    }
}
