//! `NbdServer` with many requests in flight, structured replies and `base:allocation`: raw
//! sockets for the wire format, an export that records concurrency, and `nbdinfo --map`.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod nbd_support;

use std::io::{self, Read};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nbd_support::raw::Raw;
use nbd_support::*;
use xenvirtio_frontend::nbd::proto;
use xenvirtio_frontend::nbd::{BlockExport, FileExport, NbdServer, NbdServerConfig};

const SIZE: u64 = 8 << 20;

/// One structured reply chunk.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    handle: u64,
    payload: Vec<u8>,
}

fn chunk(raw: &mut Raw) -> Chunk {
    let mut h = [0u8; 20];
    raw.s.read_exact(&mut h).expect("structured reply header");
    let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
    assert_eq!(
        magic,
        proto::STRUCTURED_REPLY_MAGIC,
        "structured reply magic"
    );
    let length = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut payload = vec![0u8; length as usize];
    raw.s.read_exact(&mut payload).unwrap();
    Chunk {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
        payload,
    }
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Negotiates structured replies and (optionally) `base:allocation`, then GO.
fn structured(img: &Image, allocation: bool) -> Raw {
    let mut raw = Raw::hello(&img.socket(), 3);
    raw.option(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(raw.option_reply().1, proto::REP_ACK);
    if allocation {
        raw.option(
            proto::OPT_SET_META_CONTEXT,
            &meta_data(EXPORT, &["base:allocation"]),
        );
        let (_, reply, data) = raw.option_reply();
        assert_eq!(reply, proto::REP_META_CONTEXT);
        assert_eq!(&data[4..], b"base:allocation");
        assert_eq!(raw.option_reply().1, proto::REP_ACK);
    }
    raw.go(EXPORT);
    raw
}

/// Reads a structured READ reply to the end; returns the data by offset and the error, if any.
fn read_reply(raw: &mut Raw, handle: u64) -> (Vec<(u64, Vec<u8>)>, Option<u32>) {
    let mut data = Vec::new();
    let mut error = None;
    loop {
        let c = chunk(raw);
        assert_eq!(c.handle, handle);
        match c.kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                let offset = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                data.push((offset, c.payload[8..].to_vec()));
            }
            proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => {
                error = Some(u32::from_be_bytes(c.payload[..4].try_into().unwrap()));
            }
            proto::REPLY_TYPE_NONE => {}
            other => panic!("unexpected chunk type {other}"),
        }
        if c.flags & proto::REPLY_FLAG_DONE != 0 {
            return (data, error);
        }
    }
}

#[test]
fn meta_contexts_are_listed_and_set_only_as_the_protocol_allows() {
    let img = Image::new(SIZE as usize, Some(1));
    let _server = img.serve(false);
    let mut raw = Raw::hello(&img.socket(), 3);
    // SET before structured replies is refused; STRUCTURED_REPLY with data too.
    raw.option(
        proto::OPT_SET_META_CONTEXT,
        &meta_data(EXPORT, &["base:allocation"]),
    );
    assert_eq!(raw.option_reply().1, proto::REP_ERR_INVALID);
    raw.option(proto::OPT_STRUCTURED_REPLY, &[1]);
    assert_eq!(raw.option_reply().1, proto::REP_ERR_INVALID);
    // LIST with no query lists everything, with id 0.
    raw.option(proto::OPT_LIST_META_CONTEXT, &meta_data(EXPORT, &[]));
    let (_, reply, data) = raw.option_reply();
    assert_eq!(reply, proto::REP_META_CONTEXT);
    assert_eq!(data, [&[0, 0, 0, 0][..], b"base:allocation"].concat());
    assert_eq!(raw.option_reply().1, proto::REP_ACK);
    // An unknown context is left out; an unknown export is refused; malformed data too.
    raw.option(
        proto::OPT_LIST_META_CONTEXT,
        &meta_data(EXPORT, &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(raw.option_reply().1, proto::REP_ACK);
    raw.option(proto::OPT_LIST_META_CONTEXT, &meta_data("nope", &["base:"]));
    assert_eq!(raw.option_reply().1, proto::REP_ERR_UNKNOWN);
    raw.option(proto::OPT_LIST_META_CONTEXT, &[0, 0, 0, 9]);
    assert_eq!(raw.option_reply().1, proto::REP_ERR_INVALID);
    // After STRUCTURED_REPLY, SET selects base:allocation with a non-zero id.
    raw.option(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(raw.option_reply().1, proto::REP_ACK);
    raw.option(
        proto::OPT_SET_META_CONTEXT,
        &meta_data("", &["nope:x", "base:allocation"]),
    );
    let (_, reply, data) = raw.option_reply();
    assert_eq!(reply, proto::REP_META_CONTEXT);
    assert_ne!(u32::from_be_bytes(data[..4].try_into().unwrap()), 0);
    assert_eq!(raw.option_reply().1, proto::REP_ACK);
}

#[test]
fn structured_reads_carry_offsets_and_errors_end_the_reply() {
    let img = Image::new(SIZE as usize, Some(2));
    let _server = img.serve(false);
    let contents = img.contents();
    let mut raw = structured(&img, false);

    // One chunk for a small read.
    raw.request(0, proto::CMD_READ, 1, 4096, 8192);
    let (data, error) = read_reply(&mut raw, 1);
    assert_eq!(error, None);
    assert_eq!(data, vec![(4096, contents[4096..12288].to_vec())]);

    // A read larger than the server's chunk comes in several chunks that tile it.
    let (offset, len) = (1 << 20, 3 << 20);
    raw.request(0, proto::CMD_READ, 2, offset, len);
    let (data, error) = read_reply(&mut raw, 2);
    assert_eq!(error, None);
    assert!(data.len() > 1, "{} chunks", data.len());
    let mut at = offset;
    for (o, d) in &data {
        assert_eq!(*o, at);
        assert_eq!(d[..], contents[*o as usize..*o as usize + d.len()]);
        at += d.len() as u64;
    }
    assert_eq!(at, offset + u64::from(len));

    // A refused read is an error chunk, never a simple reply.
    raw.request(0, proto::CMD_READ, 3, SIZE, 512);
    assert_eq!(read_reply(&mut raw, 3), (vec![], Some(proto::EINVAL)));
    // A zero-length read is one NONE chunk.
    raw.request(0, proto::CMD_READ, 4, 0, 0);
    assert_eq!(read_reply(&mut raw, 4), (vec![], None));
    // BLOCK_STATUS without a selected context is refused.
    raw.request(0, proto::CMD_BLOCK_STATUS, 5, 0, 4096);
    assert_eq!(read_reply(&mut raw, 5), (vec![], Some(proto::EINVAL)));
    // Other commands keep simple replies.
    raw.request(0, proto::CMD_FLUSH, 6, 0, 0);
    let reply = raw.reply();
    assert_eq!((reply.handle, reply.error), (6, 0));
}

/// Parses a BLOCK_STATUS chunk into (context, [(length, flags)]).
fn block_status(raw: &mut Raw, handle: u64) -> (u32, Vec<(u32, u32)>) {
    let c = chunk(raw);
    assert_eq!((c.handle, c.kind), (handle, proto::REPLY_TYPE_BLOCK_STATUS));
    assert_ne!(c.flags & proto::REPLY_FLAG_DONE, 0);
    let context = u32::from_be_bytes(c.payload[..4].try_into().unwrap());
    let descriptors = c.payload[4..]
        .chunks_exact(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    (context, descriptors)
}

/// A sparse image: data in the first and third MiB, a hole elsewhere.
fn sparse() -> Image {
    let img = Image::new(0, None);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .unwrap();
    f.set_len(SIZE).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xab; 1 << 20], 0).unwrap();
    f.write_all_at(&[0xcd; 1 << 20], 2 << 20).unwrap();
    f.sync_all().unwrap();
    img
}

/// Whether the temporary directory's file system reports holes at all (tmpfs and ext4 do).
fn reports_holes(img: &Image) -> bool {
    let e = FileExport::open(&img.path, true).unwrap();
    let (holes, _) = e.holes(0, SIZE, 16).unwrap();
    !holes.is_empty()
}

#[test]
fn block_status_reports_holes_and_data_of_a_sparse_file() {
    let img = sparse();
    assert!(
        reports_holes(&img),
        "the test directory's file system does not report holes (SEEK_HOLE)"
    );
    let _server = img.serve(false);
    let mut raw = structured(&img, true);
    const HOLE: u32 = proto::STATE_HOLE | proto::STATE_ZERO;
    const MIB: u32 = 1 << 20;

    raw.request(0, proto::CMD_BLOCK_STATUS, 1, 0, SIZE as u32);
    let (context, d) = block_status(&mut raw, 1);
    assert_ne!(context, 0);
    assert_eq!(
        d,
        vec![(MIB, 0), (MIB, HOLE), (MIB, 0), (5 * MIB, HOLE)],
        "data, hole, data, hole"
    );
    // REQ_ONE: one descriptor, from the offset asked for.
    raw.request(
        proto::CMD_FLAG_REQ_ONE,
        proto::CMD_BLOCK_STATUS,
        2,
        1 << 20,
        4 * MIB,
    );
    assert_eq!(block_status(&mut raw, 2).1, vec![(MIB, HOLE)]);
    // Zero length and past the end are refused.
    raw.request(0, proto::CMD_BLOCK_STATUS, 3, 0, 0);
    assert_eq!(read_reply(&mut raw, 3).1, Some(proto::EINVAL));
    raw.request(0, proto::CMD_BLOCK_STATUS, 4, SIZE - 512, 1024);
    assert_eq!(read_reply(&mut raw, 4).1, Some(proto::EINVAL));
}

#[test]
fn nbdinfo_maps_the_holes_of_the_export() {
    let img = sparse();
    assert!(reports_holes(&img), "no SEEK_HOLE in the test directory");
    let _server = img.serve(false);
    let out = run("nbdinfo", &["--map", &unix_uri(&img.socket(), EXPORT)]);
    let map = stdout(&out);
    let rows: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    // nbdinfo prints: offset, length, type number, description.
    let summary: Vec<(u64, u64, u32)> = rows
        .iter()
        .map(|r| {
            (
                r[0].parse().unwrap(),
                r[1].parse().unwrap(),
                r[2].parse().unwrap(),
            )
        })
        .collect();
    const MIB: u64 = 1 << 20;
    assert_eq!(
        summary,
        vec![
            (0, MIB, 0),
            (MIB, MIB, 3),
            (2 * MIB, MIB, 0),
            (3 * MIB, 5 * MIB, 3)
        ],
        "nbdinfo --map printed:\n{map}"
    );
}

/// An export that records how many reads run at once, and can hold reads at chosen offsets
/// until released.
struct Recording {
    inner: FileExport,
    running: AtomicUsize,
    most: AtomicUsize,
    gate: Mutex<Vec<u64>>,
    opened: Condvar,
}

impl Recording {
    fn new(img: &Image) -> Arc<Recording> {
        Arc::new(Recording {
            inner: FileExport::open(&img.path, false).unwrap(),
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            gate: Mutex::new(Vec::new()),
            opened: Condvar::new(),
        })
    }

    fn hold(&self, offset: u64) {
        self.gate.lock().unwrap().push(offset);
    }

    fn release(&self, offset: u64) {
        self.gate.lock().unwrap().retain(|&o| o != offset);
        self.opened.notify_all();
    }
}

impl BlockExport for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        {
            let mut gate = self.gate.lock().unwrap();
            while gate.contains(&offset) {
                let (g, timeout) = self
                    .opened
                    .wait_timeout(gate, Duration::from_secs(10))
                    .unwrap();
                gate = g;
                assert!(!timeout.timed_out(), "read at {offset} never released");
            }
        }
        // Long enough that requests sent together overlap in the device.
        std::thread::sleep(Duration::from_millis(20));
        let r = self.inner.read_at(buf, offset);
        self.running.fetch_sub(1, Ordering::SeqCst);
        r
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn can_flush(&self) -> bool {
        true
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn holes(&self, offset: u64, len: u64, max: usize) -> io::Result<(Vec<Range<u64>>, u64)> {
        self.inner.holes(offset, len, max)
    }
}

fn serve(img: &Image, export: Arc<Recording>, max_in_flight: usize) -> NbdServer {
    let config = NbdServerConfig {
        max_in_flight,
        ..NbdServerConfig::new(EXPORT).unix(img.socket())
    };
    NbdServer::start(export, config).unwrap()
}

#[test]
fn requests_are_served_at_once_and_replied_as_they_complete() {
    let img = Image::new(SIZE as usize, Some(4));
    let contents = img.contents();
    let export = Recording::new(&img);
    let _server = serve(&img, export.clone(), 32);
    let (mut raw, _, _) = Raw::transmission(&img.socket());

    // The read of handle 1 is held until handle 2's reply has arrived: only a server that
    // replies out of order can pass this.
    export.hold(0);
    raw.request(0, proto::CMD_READ, 1, 0, 4096);
    raw.request(0, proto::CMD_READ, 2, 8192, 4096);
    let reply = raw.reply();
    assert_eq!((reply.handle, reply.error), (2, 0));
    let mut data = vec![0u8; 4096];
    raw.s.read_exact(&mut data).unwrap();
    assert_eq!(data, contents[8192..12288]);
    export.release(0);
    let reply = raw.reply();
    assert_eq!((reply.handle, reply.error), (1, 0));
    raw.s.read_exact(&mut data).unwrap();
    assert_eq!(data, contents[..4096]);

    // Sixteen reads sent together run together, and each reply carries its own data.
    for h in 0..16u64 {
        raw.request(0, proto::CMD_READ, 100 + h, h * 65536, 65536);
    }
    let mut seen = Vec::new();
    for _ in 0..16 {
        let reply = raw.reply();
        assert_eq!(reply.error, 0);
        let h = reply.handle - 100;
        let mut data = vec![0u8; 65536];
        raw.s.read_exact(&mut data).unwrap();
        let at = (h * 65536) as usize;
        assert_eq!(data, contents[at..at + 65536], "reply {h} carries its data");
        seen.push(h);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..16).collect::<Vec<_>>());
    let most = export.most.load(Ordering::SeqCst);
    assert!(most >= 8, "at most {most} reads ran at once");
}

#[test]
fn the_in_flight_limit_bounds_the_reads_running_at_once() {
    let img = Image::new(SIZE as usize, Some(5));
    let export = Recording::new(&img);
    let _server = serve(&img, export.clone(), 4);
    let (mut raw, _, _) = Raw::transmission(&img.socket());
    for h in 0..24u64 {
        raw.request(0, proto::CMD_READ, h, h * 4096, 4096);
    }
    for _ in 0..24 {
        let reply = raw.reply();
        assert_eq!(reply.error, 0);
        let mut data = vec![0u8; 4096];
        raw.s.read_exact(&mut data).unwrap();
    }
    let most = export.most.load(Ordering::SeqCst);
    assert!(
        (2..=4).contains(&most),
        "{most} reads ran at once with a limit of 4"
    );
}

#[test]
fn disconnect_waits_for_the_writes_in_flight() {
    let img = Image::new(SIZE as usize, Some(6));
    let export = Recording::new(&img);
    let server = serve(&img, export, 32);
    let (mut raw, _, _) = Raw::transmission(&img.socket());
    for h in 0..32u64 {
        raw.request(0, proto::CMD_WRITE, h, h * 4096, 4096);
        raw.send(&[h as u8 + 1; 4096]);
    }
    raw.request(0, proto::CMD_DISC, 99, 0, 0);
    let mut handles: Vec<u64> = (0..32)
        .map(|_| {
            let r = raw.reply();
            assert_eq!(r.error, 0);
            r.handle
        })
        .collect();
    raw.expect_closed();
    handles.sort_unstable();
    assert_eq!(handles, (0..32).collect::<Vec<_>>());
    server.shutdown();
    let contents = img.contents();
    for h in 0..32usize {
        assert!(
            contents[h * 4096..(h + 1) * 4096]
                .iter()
                .all(|&b| b == h as u8 + 1),
            "write {h} landed"
        );
    }
}
