//! One virtio-blk request of the guest kernel's own driver (virtio 1.2 section 5.2.6), served
//! from a [`BlockExport`]: the header and data read out of the chain's device-readable buffers,
//! the data and status byte written into its device-writable ones, each buffer reached in the
//! IOVA domain. The chain's framing is free (`VERSION_1`): the readable bytes are one stream
//! (16 bytes of header, then data), the writable bytes another (data, then one status byte).

use xenvirtio_virtio::blk::{
    DISCARD_SEGMENT_SIZE, DiscardWriteZeroes, ID_BYTES, REQ_HEADER_SIZE, ReqHeader, S_IOERR, S_OK,
    S_UNSUPP, SECTOR_SIZE, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
    WRITE_ZEROES_FLAG_UNMAP,
};
use xenvirtio_virtio::device_queue::{Chain, ChainDescriptor};

use super::VduseError;
use super::device::VduseDevice;
use super::iova::IovaMap;
use crate::nbd::BlockExport;

/// The largest request this device takes (the driver is told through `size_max` and
/// `seg_max`; a chain asking for more is failed, not served).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// A worker keeps its data buffer between requests up to this size (a larger one is freed
/// after its request).
pub(crate) const KEPT_BUFFER: usize = 256 << 10;

/// `len` bytes of `scratch`, grown (zeroed once) where it is shorter. Its old contents are left
/// in place: every caller overwrites all `len` bytes before they are used (the export's read
/// fills them, or the chain's readable bytes do), so nothing of one request reaches another.
fn data_buffer(scratch: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if scratch.len() < len {
        scratch.resize(len, 0);
    }
    &mut scratch[..len]
}

/// The buffers of one chain, in the IOVA domain of one device.
pub(crate) struct ChainIo<'a> {
    dev: &'a VduseDevice,
    iova: &'a IovaMap,
    readable: Vec<ChainDescriptor>,
    writable: Vec<ChainDescriptor>,
}

impl<'a> ChainIo<'a> {
    pub(crate) fn new(dev: &'a VduseDevice, iova: &'a IovaMap, chain: &Chain) -> ChainIo<'a> {
        ChainIo {
            dev,
            iova,
            readable: chain.readable().copied().collect(),
            writable: chain.writable().copied().collect(),
        }
    }

    fn readable_len(&self) -> usize {
        self.readable.iter().map(|d| d.len as usize).sum()
    }

    fn writable_len(&self) -> usize {
        self.writable.iter().map(|d| d.len as usize).sum()
    }

    /// Copies `out.len()` readable bytes from offset `skip` of the readable stream.
    fn read(&self, mut skip: usize, out: &mut [u8]) -> Result<(), VduseError> {
        let mut done = 0;
        for d in &self.readable {
            let len = d.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(out.len() - done);
            let addr = d.addr + skip as u64;
            let region = self.iova.region(self.dev, addr, n as u64)?;
            region
                .window(addr, n)
                .read(0, &mut out[done..done + n])
                .map_err(|e| bad_buffer(addr, n, &e))?;
            done += n;
            skip = 0;
            if done == out.len() {
                return Ok(());
            }
        }
        Err(VduseError::Spec {
            why: format!(
                "the chain's readable buffers end before byte {}",
                out.len() + skip
            ),
        })
    }

    /// Copies `data` into the writable stream at offset `skip`.
    fn write(&self, mut skip: usize, data: &[u8]) -> Result<(), VduseError> {
        let mut done = 0;
        for d in &self.writable {
            if done == data.len() {
                return Ok(());
            }
            let len = d.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(data.len() - done);
            let addr = d.addr + skip as u64;
            let region = self.iova.region(self.dev, addr, n as u64)?;
            region
                .window(addr, n)
                .write(0, &data[done..done + n])
                .map_err(|e| bad_buffer(addr, n, &e))?;
            done += n;
            skip = 0;
        }
        if done == data.len() {
            Ok(())
        } else {
            Err(VduseError::Spec {
                why: "the chain's writable buffers are too short".into(),
            })
        }
    }
}

fn bad_buffer(addr: u64, len: usize, e: &dyn std::fmt::Display) -> VduseError {
    VduseError::Spec {
        why: format!("buffer of {len} bytes at IOVA {addr:#x}: {e}"),
    }
}

/// Serves the request in `io` from `export`; returns the bytes written into the chain's
/// writable buffers (for the used ring). `id` is the device's serial (`GET_ID`). `scratch` is the
/// worker's data buffer, kept between its requests (no allocation, and no zeroing, per request:
/// a fresh 128 KiB buffer is an mmap, 32 page faults and an munmap in musl's allocator); it is
/// freed here when a request made it larger than [`KEPT_BUFFER`].
pub(crate) fn serve(
    io: &ChainIo<'_>,
    export: &dyn BlockExport,
    id: &str,
    scratch: &mut Vec<u8>,
) -> Result<u32, VduseError> {
    let served = serve_request(io, export, id, scratch);
    if scratch.len() > KEPT_BUFFER {
        *scratch = Vec::new();
    }
    served
}

fn serve_request(
    io: &ChainIo<'_>,
    export: &dyn BlockExport,
    id: &str,
    scratch: &mut Vec<u8>,
) -> Result<u32, VduseError> {
    let wlen = io.writable_len();
    if wlen == 0 {
        return Err(VduseError::Spec {
            why: "a request with no status byte".into(),
        });
    }
    let status_at = wlen - 1;
    let mut raw = [0u8; REQ_HEADER_SIZE];
    io.read(0, &mut raw)?;
    let header = ReqHeader::from_bytes(&raw);
    let data_in = io.readable_len() - REQ_HEADER_SIZE;
    let (status, written) = match header.req_type {
        T_IN => {
            let len = status_at;
            match byte_range(export, header.sector, len) {
                Some(offset) => {
                    let buf = data_buffer(scratch, len);
                    match export.read_at(buf, offset) {
                        Ok(()) => {
                            io.write(0, buf)?;
                            (S_OK, len)
                        }
                        Err(e) => {
                            tracing::warn!(sector = header.sector, len, "read failed: {e}");
                            (S_IOERR, 0)
                        }
                    }
                }
                None => (S_IOERR, 0),
            }
        }
        T_OUT => match byte_range(export, header.sector, data_in) {
            Some(_) if export.read_only() => (S_IOERR, 0),
            Some(offset) => {
                let buf = data_buffer(scratch, data_in);
                io.read(REQ_HEADER_SIZE, buf)?;
                match export.write_at(buf, offset) {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        tracing::warn!(sector = header.sector, len = data_in, "write failed: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            None => (S_IOERR, 0),
        },
        T_FLUSH => match export.flush() {
            Ok(()) => (S_OK, 0),
            Err(e) => {
                tracing::warn!("flush failed: {e}");
                (S_IOERR, 0)
            }
        },
        T_GET_ID => {
            let mut serial = [0u8; ID_BYTES];
            let n = id.len().min(ID_BYTES);
            serial[..n].copy_from_slice(&id.as_bytes()[..n]);
            let n = status_at.min(ID_BYTES);
            io.write(0, &serial[..n])?;
            (S_OK, n)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let status = ranges(io, data_in, export, header.req_type)?;
            (status, 0)
        }
        _ => (S_UNSUPP, 0),
    };
    io.write(status_at, &[status])?;
    Ok(u32::try_from(written + 1).expect("below MAX_REQUEST_BYTES"))
}

/// The byte offset of `len` bytes at `sector`, if the request is whole sectors inside the
/// device and within the size cap.
fn byte_range(export: &dyn BlockExport, sector: u64, len: usize) -> Option<u64> {
    if len > MAX_REQUEST_BYTES || len as u64 % SECTOR_SIZE != 0 {
        return None;
    }
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    (offset.checked_add(len as u64)? <= export.size()).then_some(offset)
}

/// `DISCARD` and `WRITE_ZEROES`: one or more 16-byte segments after the header.
fn ranges(
    io: &ChainIo<'_>,
    data_in: usize,
    export: &dyn BlockExport,
    kind: u32,
) -> Result<u8, VduseError> {
    if data_in == 0 || data_in % DISCARD_SEGMENT_SIZE != 0 || data_in > 64 * DISCARD_SEGMENT_SIZE {
        return Ok(S_UNSUPP);
    }
    for i in 0..data_in / DISCARD_SEGMENT_SIZE {
        let mut raw = [0u8; DISCARD_SEGMENT_SIZE];
        io.read(REQ_HEADER_SIZE + i * DISCARD_SEGMENT_SIZE, &mut raw)?;
        let seg = DiscardWriteZeroes::from_bytes(&raw);
        let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
        let Some(offset) = seg.sector.checked_mul(SECTOR_SIZE) else {
            return Ok(S_IOERR);
        };
        if offset
            .checked_add(len)
            .is_none_or(|end| end > export.size())
            || export.read_only()
        {
            return Ok(S_IOERR);
        }
        let r = if kind == T_DISCARD {
            if !export.can_trim() {
                return Ok(S_UNSUPP);
            }
            export.trim(offset, len)
        } else {
            export.write_zeroes(offset, len, seg.flags & WRITE_ZEROES_FLAG_UNMAP != 0)
        };
        if let Err(e) = r {
            tracing::warn!(offset, len, "discard or write-zeroes failed: {e}");
            return Ok(S_IOERR);
        }
    }
    Ok(S_OK)
}
