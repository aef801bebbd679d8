//! The virtio-blk device model (virtio 1.2 section 5.2) over a raw image file or block device.
//!
//! This module owns the image file and the meaning of blk requests. It sees a request only as
//! device-readable and device-writable windows ([`SharedMem`]), so it never knows the DMA
//! strategy or the peer. Anything wrong with a request that still leaves room for a status byte
//! is answered in that byte (`IOERR`, `UNSUPP`); only a chain without room for the status is
//! refused as malformed, because the device has no way to answer it.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use xenvirtio_virtio::blk::{
    BlkConfig, DISCARD_SEGMENT_SIZE, DiscardWriteZeroes, ID_BYTES, REQ_HEADER_SIZE, ReqHeader,
    S_IOERR, S_OK, S_UNSUPP, SECTOR_SIZE, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES, WRITE_ZEROES_FLAG_UNMAP,
};
use xenvirtio_virtio::features::{bit, blk as fb};
use xenvirtio_xen::mem::SharedMem;

use crate::chain_io::{ChainReader, ChainWriter, pread_into, pwrite_from};
use crate::image_lock::{self, ImageLock, LockError, LockMode};

/// Largest segment size offered (`size_max`).
pub const SIZE_MAX: u32 = 65536;
/// Largest discard or write-zeroes range, in sectors (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Segments per discard or write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlkOpenError {
    /// The file could not be opened.
    #[error("cannot open image {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Its size could not be read.
    #[error("cannot read the size of image {path}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It is neither a regular file nor a block device.
    #[error("image {0} is neither a regular file nor a block device")]
    NotAnImage(PathBuf),
    /// Someone else uses the image in a way ours would conflict with (or it cannot be locked).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Its size is 0 or not a whole number of 512-byte sectors.
    #[error("image {} is {bytes} bytes: {}", path.display(), image_size_problem(*bytes).unwrap_or_default())]
    BadSize {
        /// The image path.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
}

/// Why an image of `bytes` cannot be served, if it cannot: virtio-blk counts 512-byte sectors,
/// so an empty image has nothing to serve and a partial last sector could never be read or
/// written. Such images are refused rather than silently cut (issue 16, item 6).
pub fn image_size_problem(bytes: u64) -> Option<String> {
    if bytes == 0 {
        return Some(
            "an empty image has no sector to serve; give it a size first (truncate -s 1G FILE)"
                .to_owned(),
        );
    }
    let tail = bytes % SECTOR_SIZE;
    (tail != 0).then(|| {
        format!(
            "not a whole number of 512-byte sectors: its last {tail} bytes could never be read \
             or written; resize it to {} or {} bytes (truncate -s)",
            bytes - tail,
            bytes - tail + SECTOR_SIZE
        )
    })
}

/// A request chain the device cannot even answer.
#[derive(Debug, thiserror::Error)]
pub enum BlkChainError {
    /// No device-writable byte for the status.
    #[error("blk request without room for the status byte")]
    NoStatus,
    /// The status byte is in a read-only window.
    #[error("blk status byte is not writable")]
    StatusNotWritable,
}

/// Counters of one blk device, for `stats` and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkCounters {
    /// Requests answered.
    pub requests: u64,
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Requests answered with IOERR or UNSUPP.
    pub errors: u64,
}

/// How an opened image is shared with other users (module `image_lock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sharing {
    /// Locked: exclusively when read-write, shared when read-only. `who` names this user in a
    /// later conflict (`domain 5 device 0`).
    Lock {
        /// This user, for conflict messages.
        who: String,
    },
    /// No lock taken and none respected (`force-share`): the operator coordinates the users.
    ForceShare,
}

/// An opened image.
#[derive(Debug)]
pub struct BlockDevice {
    file: File,
    /// This process's record of the lock on `file` (the lock goes with the file).
    _lock: Option<ImageLock>,
    path: PathBuf,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    counters: BlkCounters,
}

impl BlockDevice {
    /// Opens `path` (a regular file or a block device), read-only if `read_only`, and locks it
    /// for "a blk device" of this process.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlkOpenError> {
        let who = "a blk device".to_owned();
        Self::open_shared(path, read_only, &Sharing::Lock { who })
    }

    /// Opens `path` (a regular file or a block device), read-only if `read_only`, shared with
    /// other users as `sharing` says.
    pub fn open_shared(
        path: &Path,
        read_only: bool,
        sharing: &Sharing,
    ) -> Result<Self, BlkOpenError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlkOpenError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlkOpenError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(BlkOpenError::NotAnImage(path.to_path_buf()));
        }
        let lock = match sharing {
            Sharing::Lock { who } => Some(image_lock::lock(
                &file,
                path,
                LockMode::for_read_only(read_only),
                who,
            )?),
            Sharing::ForceShare => None,
        };
        // For a block device the metadata size is 0; seeking to the end gives its size.
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlkOpenError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if image_size_problem(bytes).is_some() {
            return Err(BlkOpenError::BadSize {
                path: path.to_path_buf(),
                bytes,
            });
        }
        let mut id = [0u8; ID_BYTES];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self {
            file,
            _lock: lock,
            path: path.to_path_buf(),
            read_only,
            capacity: bytes / SECTOR_SIZE,
            id,
            counters: BlkCounters::default(),
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The counters so far.
    pub fn counters(&self) -> BlkCounters {
        self.counters
    }

    /// The device-specific feature bits offered (the transport adds its own).
    pub fn features(&self, num_queues: u16) -> u64 {
        let mut f = bit(fb::SIZE_MAX)
            | bit(fb::SEG_MAX)
            | bit(fb::BLK_SIZE)
            | bit(fb::FLUSH)
            | bit(fb::DISCARD)
            | bit(fb::WRITE_ZEROES);
        if num_queues > 1 {
            f |= bit(fb::MQ);
        }
        if self.read_only {
            f |= bit(fb::RO);
        }
        f
    }

    /// The config space for `num_queues` queues of up to `queue_size` entries.
    pub fn config(&self, num_queues: u16, queue_size: u16) -> BlkConfig {
        BlkConfig {
            capacity: self.capacity,
            size_max: SIZE_MAX,
            seg_max: u32::from(queue_size).saturating_sub(2).max(1),
            blk_size: SECTOR_SIZE as u32,
            num_queues,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEGMENTS,
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    /// Serves one request. Returns the bytes written into the device-writable buffers (the used
    /// length), status byte included.
    pub fn handle(
        &mut self,
        readable: &[SharedMem<'_>],
        writable: &[SharedMem<'_>],
    ) -> Result<u32, BlkChainError> {
        let mut reader = ChainReader::new(readable);
        let mut body = ChainWriter::new(writable);
        let mut status = body.split_trailer(1).map_err(|_| BlkChainError::NoStatus)?;
        // Validate before acting: a request that cannot be answered is not executed either
        // (the `blk_request` fuzz target found WRITE_ZEROES reaching the image before the
        // read-only status byte was refused; `test_regression_unanswerable_request_is_not_executed`).
        let status_window = status
            .take_windows(1)
            .map_err(|_| BlkChainError::NoStatus)?;
        if !status_window.iter().all(SharedMem::is_writable) {
            return Err(BlkChainError::StatusNotWritable);
        }
        let code = self.execute(&mut reader, &mut body);
        self.counters.requests += 1;
        if code != S_OK {
            self.counters.errors += 1;
        }
        for w in &status_window {
            w.write(0, &[code])
                .map_err(|_| BlkChainError::StatusNotWritable)?;
        }
        // Both counts are bounded by the chain's length, validated to fit in u32.
        Ok((body.written() + 1) as u32)
    }

    fn execute(&mut self, r: &mut ChainReader<'_, '_>, w: &mut ChainWriter<'_, '_>) -> u8 {
        let Ok(hdr) = r.read_array::<REQ_HEADER_SIZE>() else {
            tracing::debug!("blk request shorter than its header");
            return S_IOERR;
        };
        let hdr = ReqHeader::from_bytes(&hdr);
        match hdr.req_type {
            T_IN => self.read(hdr.sector, w),
            T_OUT => self.write(hdr.sector, r),
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => S_OK,
                Err(e) => {
                    tracing::warn!(image = %self.path.display(), "flush failed: {e}");
                    S_IOERR
                }
            },
            T_GET_ID => {
                let n = w.remaining().min(ID_BYTES);
                match w.write_all(&self.id[..n]) {
                    Ok(()) => S_OK,
                    Err(_) => S_IOERR,
                }
            }
            T_DISCARD | T_WRITE_ZEROES => self.ranges(hdr.req_type, r),
            other => {
                tracing::debug!(req_type = other, "unsupported blk request");
                S_UNSUPP
            }
        }
    }

    /// Checks that `len` bytes at `sector` are whole sectors inside the capacity; returns the
    /// byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR_SIZE != 0 {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.capacity).then(|| sector * SECTOR_SIZE)
    }

    fn read(&mut self, sector: u64, w: &mut ChainWriter<'_, '_>) -> u8 {
        let len = w.remaining();
        let Some(pos) = self.check_range(sector, len as u64) else {
            tracing::debug!(
                sector,
                len,
                capacity = self.capacity,
                "blk read outside the image"
            );
            return S_IOERR;
        };
        let windows = match w.take_windows(len) {
            Ok(ws) if ws.iter().all(SharedMem::is_writable) => ws,
            _ => return S_IOERR,
        };
        match pread_into(&windows, &self.file, pos) {
            Ok(n) if n == len => {
                w.account(n);
                self.counters.bytes_read += n as u64;
                S_OK
            }
            Ok(n) => {
                tracing::warn!(image = %self.path.display(), sector, "short read: {n} of {len} bytes");
                w.account(n);
                S_IOERR
            }
            Err(e) => {
                tracing::warn!(image = %self.path.display(), sector, "read failed: {e}");
                S_IOERR
            }
        }
    }

    fn write(&mut self, sector: u64, r: &mut ChainReader<'_, '_>) -> u8 {
        if self.read_only {
            return S_IOERR;
        }
        let len = r.remaining();
        let Some(pos) = self.check_range(sector, len as u64) else {
            tracing::debug!(
                sector,
                len,
                capacity = self.capacity,
                "blk write outside the image"
            );
            return S_IOERR;
        };
        let Ok(windows) = r.take_windows(len) else {
            return S_IOERR;
        };
        match pwrite_from(&windows, &self.file, pos) {
            Ok(n) => {
                self.counters.bytes_written += n as u64;
                S_OK
            }
            Err(e) => {
                tracing::warn!(image = %self.path.display(), sector, "write failed: {e}");
                S_IOERR
            }
        }
    }

    fn ranges(&mut self, kind: u32, r: &mut ChainReader<'_, '_>) -> u8 {
        if self.read_only {
            return S_IOERR;
        }
        let n = r.remaining() / DISCARD_SEGMENT_SIZE;
        if n == 0 || r.remaining() % DISCARD_SEGMENT_SIZE != 0 || n > MAX_DISCARD_SEGMENTS as usize
        {
            return S_IOERR;
        }
        for _ in 0..n {
            let Ok(raw) = r.read_array::<DISCARD_SEGMENT_SIZE>() else {
                return S_IOERR;
            };
            let seg = DiscardWriteZeroes::from_bytes(&raw);
            let unmap = seg.flags & WRITE_ZEROES_FLAG_UNMAP != 0;
            // 5.2.6.2: unknown flags, or UNMAP on a discard, are unsupported.
            if seg.flags & !WRITE_ZEROES_FLAG_UNMAP != 0 || (kind == T_DISCARD && unmap) {
                return S_UNSUPP;
            }
            if seg.num_sectors > MAX_DISCARD_SECTORS {
                return S_IOERR;
            }
            let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
            let Some(pos) = self.check_range(seg.sector, len) else {
                return S_IOERR;
            };
            // An empty range is done: fallocate refuses a zero length with EINVAL, which made a
            // valid request fail and log a warning a guest could repeat at will (found by the
            // `blk_request` fuzz target; `test_regression_empty_ranges_succeed`).
            if len == 0 {
                continue;
            }
            let result = if kind == T_DISCARD {
                // Discard is a hint: a filesystem that cannot punch holes loses nothing.
                match punch_hole(&self.file, pos, len) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                    other => other,
                }
            } else {
                self.write_zeroes(pos, len, unmap)
            };
            if let Err(e) = result {
                tracing::warn!(image = %self.path.display(), "discard/write-zeroes failed: {e}");
                return S_IOERR;
            }
        }
        S_OK
    }

    fn write_zeroes(&mut self, pos: u64, len: u64, unmap: bool) -> io::Result<()> {
        let first = if unmap {
            punch_hole(&self.file, pos, len)
        } else {
            zero_range(&self.file, pos, len)
        };
        match first {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeros = vec![0u8; 1 << 16];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    std::os::unix::fs::FileExt::write_all_at(&self.file, &zeros[..n], pos + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            other => other,
        }
    }
}

fn fallocate(file: &File, mode: libc::c_int, pos: u64, len: u64) -> io::Result<()> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate only reads its scalar arguments; the descriptor is owned by `file`.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, pos, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn punch_hole(file: &File, pos: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        pos,
        len,
    )
}

fn zero_range(file: &File, pos: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        pos,
        len,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use xenvirtio_xen::mem::PageBuf;

    struct Img {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    fn image(sectors: u64) -> Img {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(sectors * 512).unwrap();
        for s in 0..sectors {
            f.write_all_at(&[s as u8; 512], s * 512).unwrap();
        }
        Img { _dir: dir, path }
    }

    /// Lays out one request in a page buffer: header (+ data) readable, then writable data and
    /// the status byte. Returns (readable windows, writable windows).
    fn request<'m>(
        m: &SharedMem<'m>,
        hdr: ReqHeader,
        out_data: &[u8],
        in_len: usize,
    ) -> (Vec<SharedMem<'m>>, Vec<SharedMem<'m>>) {
        m.write(0, &hdr.to_bytes()).unwrap();
        m.write(16, out_data).unwrap();
        let readable = vec![
            m.slice(0, 16).unwrap(),
            m.slice(16, out_data.len()).unwrap(),
        ];
        let base = 16 + out_data.len();
        let writable = vec![
            m.slice(base, in_len).unwrap(),
            m.slice(base + in_len, 1).unwrap(),
        ];
        (readable, writable)
    }

    fn status(m: &SharedMem<'_>, at: usize) -> u8 {
        m.read_array::<1>(at).unwrap()[0]
    }

    #[test]
    fn read_and_write_reach_the_image() {
        let img = image(16);
        let mut dev = BlockDevice::open(&img.path, false).unwrap();
        assert_eq!(dev.capacity(), 16);
        let buf = PageBuf::new(4);
        let m = buf.mem();
        let (r, w) = request(
            &m,
            ReqHeader {
                req_type: T_IN,
                reserved: 0,
                sector: 3,
            },
            &[],
            1024,
        );
        assert_eq!(dev.handle(&r, &w).unwrap(), 1025);
        assert_eq!(status(&m, 16 + 1024), S_OK);
        assert_eq!(m.read_array::<1>(16).unwrap(), [3]);
        assert_eq!(m.read_array::<1>(16 + 1023).unwrap(), [4]);

        let data = vec![0xabu8; 512];
        let (r, w) = request(
            &m,
            ReqHeader {
                req_type: T_OUT,
                reserved: 0,
                sector: 15,
            },
            &data,
            0,
        );
        assert_eq!(dev.handle(&r, &w).unwrap(), 1);
        assert_eq!(status(&m, 16 + 512), S_OK);
        let mut back = [0u8; 512];
        File::open(&img.path)
            .unwrap()
            .read_exact_at(&mut back, 15 * 512)
            .unwrap();
        assert_eq!(back, [0xab; 512]);
        let c = dev.counters();
        assert_eq!(
            (c.requests, c.bytes_read, c.bytes_written, c.errors),
            (2, 1024, 512, 0)
        );
    }

    #[test]
    fn bad_requests_get_a_status_not_a_crash() {
        let img = image(8);
        let mut dev = BlockDevice::open(&img.path, false).unwrap();
        let buf = PageBuf::new(4);
        let m = buf.mem();
        let cases: Vec<(ReqHeader, Vec<u8>, usize, u8)> = vec![
            // Past the end, straddling the end, not whole sectors, sector overflow.
            (
                ReqHeader {
                    req_type: T_IN,
                    reserved: 0,
                    sector: 8,
                },
                vec![],
                512,
                S_IOERR,
            ),
            (
                ReqHeader {
                    req_type: T_IN,
                    reserved: 0,
                    sector: 7,
                },
                vec![],
                1024,
                S_IOERR,
            ),
            (
                ReqHeader {
                    req_type: T_IN,
                    reserved: 0,
                    sector: 0,
                },
                vec![],
                100,
                S_IOERR,
            ),
            (
                ReqHeader {
                    req_type: T_OUT,
                    reserved: 0,
                    sector: u64::MAX,
                },
                vec![0; 512],
                0,
                S_IOERR,
            ),
            (
                ReqHeader {
                    req_type: 99,
                    reserved: 0,
                    sector: 0,
                },
                vec![],
                0,
                S_UNSUPP,
            ),
        ];
        for (hdr, out, in_len, want) in cases {
            let (r, w) = request(&m, hdr, &out, in_len);
            dev.handle(&r, &w).unwrap();
            assert_eq!(status(&m, 16 + out.len() + in_len), want, "{hdr:?}");
        }
        // No room for the status: malformed, refused.
        let r = vec![m.slice(0, 16).unwrap()];
        assert!(matches!(dev.handle(&r, &[]), Err(BlkChainError::NoStatus)));
        // A header that is too short still gets IOERR.
        let w = vec![m.slice(100, 1).unwrap()];
        dev.handle(&[m.slice(0, 8).unwrap()], &w).unwrap();
        assert_eq!(status(&m, 100), S_IOERR);
    }

    /// Fuzz finding (`blk_request`): a WRITE_ZEROES whose status byte sat in a read-only
    /// window zeroed the image, and only then was refused as unanswerable.
    #[test]
    fn test_regression_unanswerable_request_is_not_executed() {
        let img = image(16);
        let mut dev = BlockDevice::open(&img.path, false).unwrap();
        let buf = PageBuf::new(2);
        let m = buf.mem();
        let seg = DiscardWriteZeroes {
            sector: 10,
            num_sectors: 2,
            flags: 0,
        };
        let (r, w) = request(
            &m,
            ReqHeader {
                req_type: T_WRITE_ZEROES,
                reserved: 0,
                sector: 0,
            },
            &seg.to_bytes(),
            0,
        );
        let w: Vec<_> = w.into_iter().map(SharedMem::read_only).collect();
        assert!(matches!(
            dev.handle(&r, &w),
            Err(BlkChainError::StatusNotWritable)
        ));
        let mut back = [0u8; 1024];
        File::open(&img.path)
            .unwrap()
            .read_exact_at(&mut back, 10 * 512)
            .unwrap();
        assert!(back[..512].iter().all(|b| *b == 10) && back[512..].iter().all(|b| *b == 11));
        assert_eq!(dev.counters().requests, 0, "nothing was executed");
    }

    /// Fuzz finding (`blk_request`): a DISCARD or WRITE_ZEROES of zero sectors inside the
    /// disk got IOERR (fallocate's EINVAL) and a warning, instead of OK.
    #[test]
    fn test_regression_empty_ranges_succeed() {
        let img = image(16);
        let mut dev = BlockDevice::open(&img.path, false).unwrap();
        let buf = PageBuf::new(2);
        let m = buf.mem();
        for kind in [T_DISCARD, T_WRITE_ZEROES] {
            let seg = DiscardWriteZeroes {
                sector: 13,
                num_sectors: 0,
                flags: 0,
            };
            let (r, w) = request(
                &m,
                ReqHeader {
                    req_type: kind,
                    reserved: 0,
                    sector: 0,
                },
                &seg.to_bytes(),
                0,
            );
            assert_eq!(dev.handle(&r, &w).unwrap(), 1);
            assert_eq!(status(&m, 32), S_OK, "kind {kind}");
        }
        assert_eq!(dev.counters().errors, 0);
    }

    #[test]
    fn read_only_images_refuse_writes() {
        let img = image(8);
        let mut dev = BlockDevice::open(&img.path, true).unwrap();
        assert!(dev.features(1) & bit(fb::RO) != 0);
        let buf = PageBuf::new(2);
        let m = buf.mem();
        let (r, w) = request(
            &m,
            ReqHeader {
                req_type: T_OUT,
                reserved: 0,
                sector: 0,
            },
            &[1; 512],
            0,
        );
        dev.handle(&r, &w).unwrap();
        assert_eq!(status(&m, 16 + 512), S_IOERR);
        let mut back = [0u8; 1];
        File::open(&img.path)
            .unwrap()
            .read_exact_at(&mut back, 0)
            .unwrap();
        assert_eq!(back, [0]);
    }

    #[test]
    fn flush_get_id_discard_and_write_zeroes() {
        let img = image(64);
        let mut dev = BlockDevice::open(&img.path, false).unwrap();
        let buf = PageBuf::new(2);
        let m = buf.mem();
        let (r, w) = request(
            &m,
            ReqHeader {
                req_type: T_FLUSH,
                reserved: 0,
                sector: 0,
            },
            &[],
            0,
        );
        dev.handle(&r, &w).unwrap();
        assert_eq!(status(&m, 16), S_OK);
        let (r, w) = request(
            &m,
            ReqHeader {
                req_type: T_GET_ID,
                reserved: 0,
                sector: 0,
            },
            &[],
            20,
        );
        assert_eq!(
            dev.handle(&r, &w).unwrap(),
            20 + 1,
            "the id is 20 bytes, zero-padded"
        );
        assert_eq!(&m.read_array::<9>(16).unwrap(), b"disk.img\0");

        let seg = |sector, num_sectors, flags| {
            DiscardWriteZeroes {
                sector,
                num_sectors,
                flags,
            }
            .to_bytes()
            .to_vec()
        };
        let file = File::open(&img.path).unwrap();
        let sector_byte = |s: u64| {
            let mut b = [0u8; 1];
            file.read_exact_at(&mut b, s * 512 + 100).unwrap();
            b[0]
        };
        for (kind, s, flags) in [
            (T_WRITE_ZEROES, 10, 0),
            (T_WRITE_ZEROES, 20, WRITE_ZEROES_FLAG_UNMAP),
            (T_DISCARD, 30, 0),
        ] {
            let (r, w) = request(
                &m,
                ReqHeader {
                    req_type: kind,
                    reserved: 0,
                    sector: 0,
                },
                &seg(s, 2, flags),
                0,
            );
            dev.handle(&r, &w).unwrap();
            assert_eq!(status(&m, 32), S_OK, "kind {kind} flags {flags}");
            assert_eq!(sector_byte(s - 1), (s - 1) as u8, "neighbour untouched");
            assert_eq!(sector_byte(s + 2), (s + 2) as u8, "neighbour untouched");
        }
        assert_eq!(
            (
                sector_byte(10),
                sector_byte(11),
                sector_byte(20),
                sector_byte(21)
            ),
            (0, 0, 0, 0)
        );
        // UNMAP on a discard is unsupported; a range past the end is an error; two segments
        // are more than offered.
        let (r, w) = request(
            &m,
            ReqHeader {
                req_type: T_DISCARD,
                reserved: 0,
                sector: 0,
            },
            &seg(1, 1, 1),
            0,
        );
        dev.handle(&r, &w).unwrap();
        assert_eq!(status(&m, 32), S_UNSUPP);
        let (r, w) = request(
            &m,
            ReqHeader {
                req_type: T_WRITE_ZEROES,
                reserved: 0,
                sector: 0,
            },
            &seg(63, 2, 0),
            0,
        );
        dev.handle(&r, &w).unwrap();
        assert_eq!(status(&m, 32), S_IOERR);
        let two = [seg(1, 1, 0), seg(2, 1, 0)].concat();
        let (r, w) = request(
            &m,
            ReqHeader {
                req_type: T_DISCARD,
                reserved: 0,
                sector: 0,
            },
            &two,
            0,
        );
        dev.handle(&r, &w).unwrap();
        assert_eq!(status(&m, 48), S_IOERR);
    }

    #[test]
    fn config_and_features_describe_the_image() {
        let img = image(8);
        let dev = BlockDevice::open(&img.path, false).unwrap();
        let c = dev.config(4, 256);
        assert_eq!(
            (c.capacity, c.num_queues, c.seg_max, c.blk_size),
            (8, 4, 254, 512)
        );
        assert!(dev.features(4) & bit(fb::MQ) != 0);
        assert!(dev.features(1) & bit(fb::MQ) == 0);
        assert!(dev.features(1) & bit(fb::RO) == 0);
        let e = BlockDevice::open(Path::new("/nonexistent/x.img"), false).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
        assert!(matches!(
            BlockDevice::open(Path::new("/tmp"), true),
            Err(BlkOpenError::NotAnImage(_)) | Err(BlkOpenError::Open { .. })
        ));
    }

    #[test]
    fn empty_and_partial_sector_images_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for (bytes, says) in [
            (0u64, "empty image"),
            (1_000_000, "its last 64 bytes could never be read"),
            (511, "its last 511 bytes"),
        ] {
            let path = dir.path().join(format!("{bytes}.img"));
            std::fs::File::create(&path)
                .unwrap()
                .set_len(bytes)
                .unwrap();
            let e = BlockDevice::open(&path, false).unwrap_err();
            assert!(matches!(e, BlkOpenError::BadSize { .. }), "{bytes}: {e}");
            assert!(e.to_string().contains(says), "{bytes}: {e}");
        }
        assert!(
            image_size_problem(1_000_000)
                .unwrap()
                .contains("999936 or 1000448")
        );
        let ok = dir.path().join("ok.img");
        std::fs::File::create(&ok)
            .unwrap()
            .set_len(1_000_448)
            .unwrap();
        assert_eq!(BlockDevice::open(&ok, false).unwrap().capacity(), 1954);
    }
}
