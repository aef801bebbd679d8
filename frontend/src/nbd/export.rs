//! What an NBD export needs from a block device: [`BlockExport`], and [`FileExport`] over a file.
//!
//! The server validates every request against [`BlockExport::size`] and
//! [`BlockExport::block_size`] before it calls the device, so an implementation sees only
//! aligned, in-range requests no longer than the server's request cap (except trim, which may
//! span the whole export). An implementation must still not trust its inputs for memory safety:
//! it is a separate component and may be called by other code.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A block device as the NBD server sees it.
///
/// Offsets and lengths are in bytes. Every call may come from several connection threads at
/// once, hence `Send + Sync`. Errors are plain `io::Error`s; the server maps them to NBD error
/// values: `EROFS`, `EPERM` and `EACCES` become `EPERM`; `ENOSPC`, `EDQUOT` and `EFBIG` become
/// `ENOSPC`; `EINVAL`, `EOPNOTSUPP` and `ErrorKind::Unsupported`/`InvalidInput` become `EINVAL`;
/// `ESHUTDOWN` (a device going away) stays `ESHUTDOWN`; anything else is `EIO`.
pub trait BlockExport: Send + Sync {
    /// Size of the device in bytes. The server reads it at each connection's handshake.
    fn size(&self) -> u64;

    /// Whether the device refuses writes.
    fn read_only(&self) -> bool;

    /// Minimum I/O alignment in bytes: a power of two from 1 to 65536 (512 for virtio-blk).
    /// Advertised as the NBD minimum block size; misaligned requests are refused with `EINVAL`.
    fn block_size(&self) -> u32 {
        512
    }

    /// The smallest size with efficient I/O (no read-modify-write): a power of two at least
    /// `max(block_size(), 512)`. Advertised as the NBD preferred block size.
    fn preferred_block_size(&self) -> u32 {
        self.block_size().max(4096)
    }

    /// Fills `buf` from the device at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes `buf` to the device at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Whether [`flush`](Self::flush) reaches stable storage (advertises `NBD_CMD_FLUSH` and
    /// `NBD_CMD_FLAG_FUA`).
    fn can_flush(&self) -> bool;

    /// Makes every completed write stable.
    fn flush(&self) -> io::Result<()>;

    /// Whether the device takes discard hints (advertises `NBD_CMD_TRIM`).
    fn can_trim(&self) -> bool {
        false
    }

    /// Discards `len` bytes at `offset`; the contents afterwards are unspecified.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Whether [`write_zeroes`](Self::write_zeroes) is supported (advertises
    /// `NBD_CMD_WRITE_ZEROES`). The default implementation writes zero buffers, so the default
    /// answer is yes.
    fn can_write_zeroes(&self) -> bool {
        true
    }

    /// Makes `len` bytes at `offset` read as zeroes. With `may_trim` the device may deallocate
    /// them; without it (`NBD_CMD_FLAG_NO_HOLE`) they must stay allocated. The default writes
    /// zero buffers with [`write_at`](Self::write_at).
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        let _ = may_trim;
        write_zero_buffers(|buf, at| self.write_at(buf, at), offset, len)
    }

    /// Whether several connections may be used at once with a shared view: a flush on one
    /// connection makes the writes completed on all of them stable, and there is no
    /// per-connection cache (advertises `NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool {
        false
    }

    /// The unallocated ranges (holes, which read as zeroes) in `offset..offset + len`, in
    /// order, at most `max_holes` of them, and the end of the range the answer covers: the
    /// end of the request, or less when the list was cut short. Served as NBD's
    /// `base:allocation` metadata context. The default reports everything as data, which is
    /// always true.
    fn holes(&self, offset: u64, len: u64, max_holes: usize) -> io::Result<(Vec<Range<u64>>, u64)> {
        let _ = max_holes;
        Ok((Vec::new(), offset.saturating_add(len)))
    }
}

/// Zero bytes for [`write_zero_buffers`], shared so that zeroing allocates nothing.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Writes `len` zero bytes at `offset` through `write_at`, 64 KiB at a time.
pub fn write_zero_buffers(
    mut write_at: impl FnMut(&[u8], u64) -> io::Result<()>,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut at = offset;
    while at < end {
        let n = usize::try_from(end - at).map_or(ZEROES.len(), |rest| rest.min(ZEROES.len()));
        write_at(&ZEROES[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// A [`BlockExport`] over a regular file or a block device, with positioned I/O on one shared
/// descriptor (so it is safe for several connections: [`BlockExport::can_multi_conn`]).
#[derive(Debug)]
pub struct FileExport {
    file: File,
    size: u64,
    read_only: bool,
    block_size: u32,
}

impl FileExport {
    /// Opens `path` read-write, or read-only when `read_only` is set. The size is the file's
    /// size now; the block size is 512.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<FileExport> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        FileExport::from_file(file, read_only)
    }

    /// Wraps an open file. `read_only` must be set if `file` was not opened for writing.
    pub fn from_file(mut file: File, read_only: bool) -> io::Result<FileExport> {
        // A block device reports 0 in its metadata; seeking to its end works for both.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileExport {
            file,
            size,
            read_only,
            block_size: 512,
        })
    }

    /// Sets the block size (a power of two from 1 to 65536; the server checks it).
    pub fn with_block_size(mut self, block_size: u32) -> FileExport {
        self.block_size = block_size;
        self
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid())?;
        let len = libc::off_t::try_from(len).map_err(|_| invalid())?;
        loop {
            // SAFETY: fallocate reads only its scalar arguments; the descriptor is owned by
            // `self.file` and stays open for the call.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Where the next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) at or after `offset` starts: `None`
/// when there is none before the end of the file (`ENXIO`).
fn seek_extent(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek reads only its scalar arguments; the descriptor is owned by `file` and
    // stays open for the call. It moves the descriptor's file position, which FileExport never
    // uses (all its I/O is positioned).
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

/// Errors that mean "this file system or device cannot do that", after which a fallback applies.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV)
    )
}

impl BlockExport for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writable()?;
        self.check(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)
    }

    fn can_flush(&self) -> bool {
        true
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn can_trim(&self) -> bool {
        !self.read_only
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        self.check(offset, len)?;
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Trim is a hint: a file system that cannot punch holes loses nothing.
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    fn can_write_zeroes(&self) -> bool {
        !self.read_only
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.writable()?;
        self.check(offset, len)?;
        let mode = if may_trim {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if unsupported(&e) => {
                write_zero_buffers(|buf, at| self.file.write_all_at(buf, at), offset, len)
            }
            other => other,
        }
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn holes(&self, offset: u64, len: u64, max_holes: usize) -> io::Result<(Vec<Range<u64>>, u64)> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut holes = Vec::new();
        let mut at = offset;
        while at < end {
            let data = match seek_extent(&self.file, at, libc::SEEK_DATA) {
                Ok(data) => data.map_or(end, |d| d.min(end)),
                // Block devices and file systems without SEEK_DATA: all data.
                Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok((holes, end));
                }
                Err(e) => return Err(e),
            };
            if data > at {
                if holes.len() == max_holes {
                    return Ok((holes, at));
                }
                holes.push(at..data);
                at = data;
                continue;
            }
            at = match seek_extent(&self.file, at, libc::SEEK_HOLE)? {
                Some(hole) if hole > at => hole.min(end),
                // A hole at `at` right after SEEK_DATA said data: the file changed under us;
                // what is left is reported as data.
                _ => end,
            };
        }
        Ok((holes, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, data).unwrap();
        (dir, path)
    }

    #[test]
    fn file_export_reads_writes_and_zeroes() {
        let (_dir, path) = image(64 * 1024);
        let e = FileExport::open(&path, false).unwrap();
        assert_eq!(e.size(), 64 * 1024);
        assert!(!e.read_only() && e.can_flush() && e.can_trim() && e.can_multi_conn());
        e.write_at(&[0xaa; 512], 1024).unwrap();
        let mut buf = [0u8; 512];
        e.read_at(&mut buf, 1024).unwrap();
        assert_eq!(buf, [0xaa; 512]);
        e.write_zeroes(4096, 8192, false).unwrap();
        e.write_zeroes(16384, 4096, true).unwrap();
        e.flush().unwrap();
        let all = std::fs::read(&path).unwrap();
        assert!(all[4096..12288].iter().all(|&b| b == 0));
        assert!(all[16384..20480].iter().all(|&b| b == 0));
        assert_eq!(
            all[12288],
            (12288 % 251) as u8 + 1,
            "bytes past the range are untouched"
        );
        assert_eq!(all[20480], (20480 % 251) as u8 + 1);
        e.trim(0, 4096).unwrap();
    }

    #[test]
    fn file_export_refuses_out_of_range_and_read_only_writes() {
        let (_dir, path) = image(4096);
        let e = FileExport::open(&path, true).unwrap();
        assert!(e.read_only() && !e.can_trim() && !e.can_write_zeroes());
        let err = e.write_at(&[1; 512], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        let mut buf = [0u8; 512];
        let err = e.read_at(&mut buf, 4096 - 256).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let err = e.read_at(&mut buf, u64::MAX - 10).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn default_write_zeroes_goes_through_write_at() {
        let mut written = Vec::new();
        write_zero_buffers(
            |buf, at| {
                assert!(buf.iter().all(|&b| b == 0));
                written.push((at, buf.len()));
                Ok(())
            },
            512,
            150 * 1024,
        )
        .unwrap();
        assert_eq!(
            written,
            vec![(512, 65536), (512 + 65536, 65536), (512 + 131072, 22528)]
        );
    }
}
