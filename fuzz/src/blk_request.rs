//! Target `blk_request`: [`BlockDevice::handle`] with any request bytes and any layout of
//! device-readable and device-writable windows, on a small image in a temp dir.
//!
//! A request is a header and a payload laid out in a 3-page buffer; the windows are arbitrary
//! (overlapping, empty, out of order, device-writable ones mapped read-only). Checked:
//! - nothing panics;
//! - the image changes only inside the range that a valid WRITE, DISCARD or WRITE_ZEROES
//!   names, and there it holds exactly the written data or zeros;
//! - the buffer changes only inside writable windows;
//! - the status byte (the last device-writable byte) is OK, IOERR or UNSUPP, exactly the one
//!   virtio 1.2 section 5.2.6 and PROTOCOL.md section 10.2 call for, and a READ returns the
//!   image's bytes;
//! - a chain without a writable byte, or whose status byte is read-only, is refused;
//! - the used length counts the status byte and never exceeds the writable windows.

use xenvirtio_backend::blk::{BlkChainError, BlkOpenError, BlockDevice, MAX_DISCARD_SECTORS};
use xenvirtio_virtio::blk::{
    ID_BYTES, S_IOERR, S_OK, S_UNSUPP, SECTOR_SIZE, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES,
};
use xenvirtio_xen::mem::{PageBuf, SharedMem};

use crate::input::{Reader, Structured, Writer};

/// Bytes of the request buffer.
const BUF_LEN: usize = 3 * 4096;
/// The image's file name, which GET_ID returns.
const IMAGE_NAME: &str = "fuzz-disk.img";

/// One window of the chain as the address resolver would hand it to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Device-writable (else device-readable).
    pub writable: bool,
    /// Offset in the buffer (modulo its length).
    pub offset: u16,
    /// Length (cut at the end of the buffer).
    pub len: u16,
    /// A device-writable window that is mapped read-only anyway.
    pub read_only_mapping: bool,
}

/// One fuzz input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkInput {
    /// Image capacity: `sectors % 17` sectors (an empty image must be refused at open).
    pub sectors: u8,
    /// Open the image read-only.
    pub read_only: bool,
    /// Header: request type.
    pub req_type: u32,
    /// Header: reserved word.
    pub reserved: u32,
    /// Header: sector.
    pub sector: u64,
    /// Bytes right after the header in the buffer (data, discard segments).
    pub payload: Vec<u8>,
    /// The chain, readable windows first as the device sees them (their order among
    /// themselves is kept).
    pub windows: Vec<Window>,
}

impl Structured for BlkInput {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            sectors: r.u8(),
            read_only: r.bool(),
            req_type: r.u32(),
            reserved: r.u32(),
            sector: r.u64(),
            payload: r.bytes(4096),
            windows: r.list(8, |r| Window {
                writable: r.bool(),
                offset: r.u16(),
                len: r.u16(),
                read_only_mapping: r.bool(),
            }),
        }
    }

    fn write(&self, w: &mut Writer) {
        w.u8(self.sectors);
        w.bool(self.read_only);
        w.u32(self.req_type);
        w.u32(self.reserved);
        w.u64(self.sector);
        w.bytes(&self.payload, 4096);
        w.list(&self.windows, 8, |w, win| {
            w.bool(win.writable);
            w.u16(win.offset);
            w.u16(win.len);
            w.bool(win.read_only_mapping);
        });
    }
}

crate::structured_input!(BlkInput);

/// A byte of the initial pattern (image and buffer), different for every position.
fn pattern(salt: u64, i: usize) -> u8 {
    let x = (i as u64 ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 | 1
}

/// The span of the writable stream a window covers, after `at` bytes of the stream.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
    offset: usize,
    mapped_writable: bool,
}

/// What the device must answer, from the request alone.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A status byte, and the image range that may change.
    Status(u8, Option<(u64, u64)>),
    /// `BlkChainError::NoStatus`.
    NoStatus,
    /// `BlkChainError::StatusNotWritable`.
    StatusNotWritable,
}

/// Runs one request and checks it.
pub fn run(input: &BlkInput) {
    let capacity = u64::from(input.sectors % 17);
    let image_len = (capacity * SECTOR_SIZE) as usize;
    let dir = crate::temp_dir("xenvirtio-fuzz-blk");
    let path = dir.path().join(IMAGE_NAME);
    let image: Vec<u8> = (0..image_len).map(|i| pattern(1, i)).collect();
    std::fs::write(&path, &image).expect("writing the image");
    if capacity == 0 {
        let refused = BlockDevice::open(&path, input.read_only);
        assert!(
            matches!(refused, Err(BlkOpenError::BadSize { bytes: 0, .. })),
            "an empty image must be refused: {refused:?}"
        );
        return;
    }
    let mut dev = BlockDevice::open(&path, input.read_only).expect("opening the image");
    assert_eq!(dev.capacity(), capacity);

    let buf = PageBuf::new(BUF_LEN / 4096);
    let mem = buf.mem();
    let initial: Vec<u8> = (0..BUF_LEN).map(|i| pattern(2, i)).collect();
    mem.write(0, &initial).expect("in the buffer");
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&input.req_type.to_le_bytes());
    header[4..8].copy_from_slice(&input.reserved.to_le_bytes());
    header[8..16].copy_from_slice(&input.sector.to_le_bytes());
    mem.write(0, &header).expect("in the buffer");
    mem.write(16, &input.payload).expect("in the buffer");
    let before = crate::snapshot(&mem);

    let mut readable: Vec<SharedMem<'_>> = Vec::new();
    let mut writable: Vec<SharedMem<'_>> = Vec::new();
    let mut spans: Vec<Span> = Vec::new();
    let mut readable_stream: Vec<u8> = Vec::new();
    let mut writable_len = 0usize;
    for w in &input.windows {
        let offset = usize::from(w.offset) % BUF_LEN;
        let len = usize::from(w.len).min(BUF_LEN - offset);
        let win = mem.slice(offset, len).expect("cut to the buffer");
        if w.writable {
            let mapped_writable = !w.read_only_mapping;
            writable.push(if mapped_writable {
                win
            } else {
                win.read_only()
            });
            spans.push(Span {
                start: writable_len,
                len,
                offset,
                mapped_writable,
            });
            writable_len += len;
        } else {
            readable.push(win.read_only());
            readable_stream.extend_from_slice(&before[offset..offset + len]);
        }
    }

    let answer = expected(input, capacity, &readable_stream, &spans, writable_len);
    let result = dev.handle(&readable, &writable);
    let after = crate::snapshot(&mem);
    let image_after = std::fs::read(&path).expect("reading the image back");
    assert_eq!(image_after.len(), image_len, "the image changed size");

    // The buffer changes only inside writable windows.
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if b != a {
            assert!(
                spans
                    .iter()
                    .any(|s| s.mapped_writable && (s.offset..s.offset + s.len).contains(&i)),
                "buffer byte {i} changed outside the writable windows"
            );
        }
    }

    // The image changes only inside the range a valid request names.
    let allowed = match answer {
        Answer::Status(S_OK, range) => range,
        _ => None,
    };
    for (i, (b, a)) in image.iter().zip(&image_after).enumerate() {
        if b != a {
            let inside =
                allowed.is_some_and(|(start, len)| (start..start + len).contains(&(i as u64)));
            assert!(
                inside,
                "image byte {i} changed, allowed {allowed:?}: {input:?}"
            );
        }
    }

    // Where the status byte lives: the last byte of the writable stream.
    let status_at = spans
        .iter()
        .rev()
        .find(|s| s.len > 0)
        .map(|s| (s.offset + s.len - 1, s.mapped_writable));
    match (&result, &answer) {
        (Err(BlkChainError::NoStatus), Answer::NoStatus) => assert_eq!(writable_len, 0),
        (Err(BlkChainError::StatusNotWritable), Answer::StatusNotWritable) => {
            assert_eq!(status_at.map(|s| s.1), Some(false));
        }
        (Ok(used), Answer::Status(status, range)) => {
            let (at, _) = status_at.expect("a writable byte exists");
            assert!(
                [S_OK, S_IOERR, S_UNSUPP].contains(&after[at]),
                "status byte {:#x}",
                after[at]
            );
            assert_eq!(after[at], *status, "status for {input:?}");
            let used = *used as usize;
            assert!(
                (1..=writable_len).contains(&used),
                "used length {used} of {writable_len}"
            );
            check_ok_effects(
                input,
                *status,
                *range,
                used,
                &image,
                &image_after,
                &readable_stream,
                &spans,
                &after,
            );
        }
        _ => panic!("handle gave {result:?}, expected {answer:?}, for {input:?}"),
    }
    drop(dev);
    drop(dir);
}

/// The writable stream's bytes `[start, start + len)`, from the buffer `after`.
fn writable_bytes(spans: &[Span], after: &[u8], start: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for s in spans {
        for k in 0..s.len {
            let pos = s.start + k;
            if (start..start + len).contains(&pos) {
                out.push(after[s.offset + k]);
            }
        }
    }
    out
}

/// Whether the first `len` bytes of the writable stream are all mapped writable.
fn body_writable(spans: &[Span], len: usize) -> bool {
    spans
        .iter()
        .filter(|s| s.start < len && s.len > 0)
        .all(|s| s.mapped_writable)
}

fn in_range(capacity: u64, sector: u64, len: u64) -> Option<(u64, u64)> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let end = sector.checked_add(len / SECTOR_SIZE)?;
    (end <= capacity).then(|| (sector * SECTOR_SIZE, len))
}

fn expected(
    input: &BlkInput,
    capacity: u64,
    readable: &[u8],
    spans: &[Span],
    writable_len: usize,
) -> Answer {
    if writable_len == 0 {
        return Answer::NoStatus;
    }
    let status_writable = spans
        .iter()
        .rev()
        .find(|s| s.len > 0)
        .is_some_and(|s| s.mapped_writable);
    if !status_writable {
        return Answer::StatusNotWritable;
    }
    let body = writable_len - 1;
    let status = |s| Answer::Status(s, None);
    if readable.len() < 16 {
        return status(S_IOERR);
    }
    let req_type = u32::from_le_bytes(readable[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(readable[8..16].try_into().expect("8 bytes"));
    let data = &readable[16..];
    match req_type {
        T_IN => match in_range(capacity, sector, body as u64) {
            Some(_) if body_writable(spans, body) => status(S_OK),
            _ => status(S_IOERR),
        },
        T_OUT if input.read_only => status(S_IOERR),
        T_OUT => match in_range(capacity, sector, data.len() as u64) {
            Some(range) => Answer::Status(S_OK, Some(range)),
            None => status(S_IOERR),
        },
        T_FLUSH => status(S_OK),
        T_GET_ID => {
            if body_writable(spans, body.min(ID_BYTES)) {
                status(S_OK)
            } else {
                status(S_IOERR)
            }
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if input.read_only || data.len() != 16 {
                return status(S_IOERR);
            }
            let seg_sector = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
            let num = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes"));
            let unmap = flags & 1 != 0;
            if flags & !1 != 0 || (req_type == T_DISCARD && unmap) {
                return status(S_UNSUPP);
            }
            if num > MAX_DISCARD_SECTORS {
                return status(S_IOERR);
            }
            match in_range(capacity, seg_sector, u64::from(num) * SECTOR_SIZE) {
                Some(range) => Answer::Status(S_OK, Some(range)),
                None => status(S_IOERR),
            }
        }
        _ => status(S_UNSUPP),
    }
}

#[allow(clippy::too_many_arguments)]
fn check_ok_effects(
    input: &BlkInput,
    status: u8,
    range: Option<(u64, u64)>,
    used: usize,
    image: &[u8],
    image_after: &[u8],
    readable: &[u8],
    spans: &[Span],
    after: &[u8],
) {
    let body = spans.iter().map(|s| s.len).sum::<usize>() - 1;
    // Overlapping writable windows (a lying frontend may send them) make the data that ends
    // up in memory depend on the write order; the data checks need them apart.
    let overlap = spans.iter().enumerate().any(|(i, a)| {
        spans[i + 1..].iter().any(|b| {
            a.len > 0 && b.len > 0 && a.offset < b.offset + b.len && b.offset < a.offset + a.len
        })
    });
    let req_type = u32::from_le_bytes(
        readable
            .get(0..4)
            .map_or([0; 4], |b| b.try_into().expect("4")),
    );
    if status != S_OK {
        return;
    }
    match req_type {
        T_IN => {
            assert_eq!(used, body + 1, "a READ fills its buffers");
            if overlap {
                return;
            }
            let sector = u64::from_le_bytes(readable[8..16].try_into().expect("8 bytes"));
            let start = (sector * SECTOR_SIZE) as usize;
            assert_eq!(
                writable_bytes(spans, after, 0, body),
                image[start..start + body],
                "READ data"
            );
        }
        T_OUT => {
            assert_eq!(used, 1, "a WRITE writes only its status");
            let (start, len) = range.expect("a valid WRITE names a range");
            let (start, len) = (start as usize, len as usize);
            assert_eq!(
                image_after[start..start + len],
                readable[16..],
                "WRITE data"
            );
        }
        T_GET_ID => {
            let n = body.min(ID_BYTES);
            assert_eq!(used, n + 1);
            if overlap {
                return;
            }
            let mut id = [0u8; ID_BYTES];
            id[..IMAGE_NAME.len()].copy_from_slice(IMAGE_NAME.as_bytes());
            assert_eq!(writable_bytes(spans, after, 0, n), id[..n], "GET_ID");
        }
        T_WRITE_ZEROES | T_DISCARD => {
            let (start, len) = range.expect("a valid range");
            let (start, len) = (start as usize, len as usize);
            for i in start..start + len {
                // A discard may leave data (it is a hint); write-zeroes may not.
                let ok =
                    image_after[i] == 0 || (req_type == T_DISCARD && image_after[i] == image[i]);
                assert!(ok, "byte {i} after {}: {input:?}", req_type);
            }
        }
        _ => assert_eq!(used, 1),
    }
}

/// Seeds: the requests of the unit tests in `backend/src/blk.rs`.
pub fn seeds() -> Vec<(&'static str, BlkInput)> {
    // Header window, data window, then the body and the status in writable windows.
    let layout = |out_len: u16, in_len: u16| {
        let base = 16 + out_len;
        let win = |writable, offset, len| Window {
            writable,
            offset,
            len,
            read_only_mapping: false,
        };
        vec![
            win(false, 0, 16),
            win(false, 16, out_len),
            win(true, base, in_len),
            win(true, base + in_len, 1),
        ]
    };
    let req = |sectors, read_only, req_type, sector, payload: Vec<u8>, in_len| BlkInput {
        sectors,
        read_only,
        req_type,
        reserved: 0,
        sector,
        windows: layout(payload.len() as u16, in_len),
        payload,
    };
    let seg = |sector: u64, num: u32, flags: u32| {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend_from_slice(&num.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    };
    let mut no_status = req(8, false, T_IN, 0, vec![], 0);
    no_status.windows.truncate(1);
    let mut short_header = req(8, false, T_IN, 0, vec![], 0);
    short_header.windows = vec![
        Window {
            writable: false,
            offset: 0,
            len: 8,
            read_only_mapping: false,
        },
        Window {
            writable: true,
            offset: 100,
            len: 1,
            read_only_mapping: false,
        },
    ];
    let mut read_only_status = req(8, false, T_FLUSH, 0, vec![], 0);
    read_only_status.windows[3].read_only_mapping = true;
    vec![
        ("read", req(16, false, T_IN, 3, vec![], 1024)),
        ("write", req(16, false, T_OUT, 15, vec![0xab; 512], 0)),
        ("read_past_end", req(8, false, T_IN, 8, vec![], 512)),
        ("read_straddling_end", req(8, false, T_IN, 7, vec![], 1024)),
        ("read_partial_sector", req(8, false, T_IN, 0, vec![], 100)),
        (
            "write_sector_overflow",
            req(8, false, T_OUT, u64::MAX, vec![0; 512], 0),
        ),
        ("unknown_type", req(8, false, 99, 0, vec![], 0)),
        ("no_status", no_status),
        ("short_header", short_header),
        ("read_only_write", req(8, true, T_OUT, 0, vec![1; 512], 0)),
        ("flush", req(8, false, T_FLUSH, 0, vec![], 0)),
        ("get_id", req(8, false, T_GET_ID, 0, vec![], 20)),
        (
            "write_zeroes",
            req(16, false, T_WRITE_ZEROES, 0, seg(10, 2, 0), 0),
        ),
        (
            "write_zeroes_unmap",
            req(16, false, T_WRITE_ZEROES, 0, seg(12, 2, 1), 0),
        ),
        ("discard", req(16, false, T_DISCARD, 0, seg(14, 2, 0), 0)),
        (
            "discard_unmap",
            req(16, false, T_DISCARD, 0, seg(1, 1, 1), 0),
        ),
        (
            "write_zeroes_past_end",
            req(16, false, T_WRITE_ZEROES, 0, seg(15, 2, 0), 0),
        ),
        (
            "discard_two_segments",
            req(
                16,
                false,
                T_DISCARD,
                0,
                [seg(1, 1, 0), seg(2, 1, 0)].concat(),
                0,
            ),
        ),
        ("status_read_only", read_only_status),
    ]
}
