//! Target `nbd_server`: the frontend's [`NbdServer`] against a client that sends anything.
//!
//! Each input starts a server of a [`FileExport`] (a 64 KiB image in a temp dir) on a unix
//! socket, connects, sends the client's bytes (client flags, options with declared lengths that
//! may lie, transmission requests with payloads that may be short or long, trailing junk),
//! closes its sending side and reads every reply until the server closes. Checked:
//! - nothing panics, on any server thread;
//! - the server answers and closes within a few seconds (no hang on a short or lying client);
//! - the image keeps its size (no write past the end), and changes only where a WRITE,
//!   TRIM or WRITE_ZEROES inside the export named;
//! - the server greets with the fixed-newstyle hello, and every transmission reply it sends
//!   carries the magic and the handle of a request the client sent, one reply per request, in
//!   any order (the export answers each request as it completes).
//!
//! Allocation is bounded by libFuzzer's `-rss_limit_mb` and `-malloc_limit_mb` (the server
//! caps options at 64 KiB and moves data through a 1 MiB buffer).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use xenvirtio_frontend::nbd::proto;
use xenvirtio_frontend::nbd::{FileExport, NbdServer, NbdServerConfig};

use crate::input::{Reader, Structured, Writer};

/// Bytes of the exported image.
const IMAGE_LEN: usize = 64 * 1024;
/// Largest payload the harness generates (two of the server's 1 MiB chunks and a bit).
pub const MAX_EXACT_PAYLOAD: u32 = (2 << 20) + 4096;

/// One option of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOption {
    /// Option number (`% 12` when `known`, else raw).
    pub option: u32,
    /// Use `option % 12` (the defined options and a few more).
    pub known: bool,
    /// The data.
    pub data: Vec<u8>,
    /// Declare this length instead of the data's, when `Some`.
    pub declared: Option<u32>,
    /// Break the option magic.
    pub bad_magic: bool,
}

/// One transmission request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdRequest {
    /// Command flags.
    pub flags: u16,
    /// Command (`% 8` when `known`).
    pub command: u16,
    /// Use `command % 8`.
    pub known: bool,
    /// Handle.
    pub handle: u64,
    /// Offset (`% 2 * IMAGE_LEN` when `near`).
    pub offset: u64,
    /// Length (`% 2 * IMAGE_LEN` when `near`).
    pub length: u32,
    /// Keep offset and length near the export.
    pub near: bool,
    /// Payload sent after the header (a WRITE's data; may differ from `length`).
    pub payload: Vec<u8>,
    /// Send `length` bytes of payload exactly (pattern) instead of `payload`, for a WRITE of
    /// at most [`MAX_EXACT_PAYLOAD`] bytes.
    pub exact_payload: bool,
}

/// One fuzz input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdInput {
    /// Client flags (`% 4` when `known_flags`).
    pub client_flags: u32,
    /// Use `client_flags % 4`.
    pub known_flags: bool,
    /// Serve the export read-only.
    pub read_only: bool,
    /// Options.
    pub options: Vec<NbdOption>,
    /// Requests after the handshake.
    pub requests: Vec<NbdRequest>,
    /// Raw bytes at the end.
    pub trailing: Vec<u8>,
}

impl Structured for NbdInput {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            client_flags: r.u32(),
            known_flags: !r.u8().is_multiple_of(8),
            read_only: r.bool(),
            options: r.list(6, |r| NbdOption {
                option: r.u32(),
                known: !r.u8().is_multiple_of(8),
                data: r.bytes(512),
                declared: r.bool().then(|| r.u32()),
                bad_magic: r.u8() == 0xff,
            }),
            requests: r.list(12, |r| NbdRequest {
                flags: r.u16(),
                command: r.u16(),
                known: !r.u8().is_multiple_of(8),
                handle: r.u64(),
                offset: r.u64(),
                length: r.u32(),
                near: !r.u8().is_multiple_of(8),
                payload: r.bytes(1024),
                exact_payload: r.bool(),
            }),
            trailing: r.bytes(64),
        }
    }

    fn write(&self, w: &mut Writer) {
        w.u32(self.client_flags);
        w.u8(u8::from(self.known_flags));
        w.bool(self.read_only);
        w.list(&self.options, 6, |w, o| {
            w.u32(o.option);
            w.u8(u8::from(o.known));
            w.bytes(&o.data, 512);
            w.bool(o.declared.is_some());
            if let Some(d) = o.declared {
                w.u32(d);
            }
            w.u8(if o.bad_magic { 0xff } else { 0 });
        });
        w.list(&self.requests, 12, |w, q| {
            w.u16(q.flags);
            w.u16(q.command);
            w.u8(u8::from(q.known));
            w.u64(q.handle);
            w.u64(q.offset);
            w.u32(q.length);
            w.u8(u8::from(q.near));
            w.bytes(&q.payload, 1024);
            w.bool(q.exact_payload);
        });
        w.bytes(&self.trailing, 64);
    }
}

crate::structured_input!(NbdInput);

impl NbdRequest {
    fn command(&self) -> u16 {
        if self.known {
            self.command % 8
        } else {
            self.command
        }
    }

    /// The payload bytes the client sends after the header.
    fn payload(&self) -> Vec<u8> {
        let length = self.range().1;
        if self.exact_payload && self.command() == proto::CMD_WRITE && length <= MAX_EXACT_PAYLOAD {
            (0..length).map(|i| (i % 251) as u8).collect()
        } else {
            self.payload.clone()
        }
    }

    fn range(&self) -> (u64, u32) {
        if self.near {
            (
                self.offset % (2 * IMAGE_LEN as u64),
                self.length % (2 * IMAGE_LEN as u32),
            )
        } else {
            (self.offset, self.length)
        }
    }
}

/// Panics on threads the harness does not join (the server's) are recorded here, so the
/// stable replay sees them too (under libFuzzer a panic aborts the process anyway).
static SERVER_PANICKED: AtomicBool = AtomicBool::new(false);

fn watch_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            SERVER_PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// The bytes the client sends.
fn client_bytes(input: &NbdInput) -> Vec<u8> {
    let mut out = Vec::new();
    let flags = if input.known_flags {
        input.client_flags % 4
    } else {
        input.client_flags
    };
    out.extend_from_slice(&flags.to_be_bytes());
    for o in &input.options {
        let magic = if o.bad_magic {
            proto::IHAVEOPT ^ 1
        } else {
            proto::IHAVEOPT
        };
        out.extend_from_slice(&magic.to_be_bytes());
        let option = if o.known { o.option % 12 } else { o.option };
        out.extend_from_slice(&option.to_be_bytes());
        let len = o.declared.unwrap_or(o.data.len() as u32);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&o.data);
    }
    for q in &input.requests {
        let (offset, length) = q.range();
        out.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&q.flags.to_be_bytes());
        out.extend_from_slice(&q.command().to_be_bytes());
        out.extend_from_slice(&q.handle.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&q.payload());
    }
    out.extend_from_slice(&input.trailing);
    out
}

/// Runs one input.
pub fn run(input: &NbdInput) {
    watch_panics();
    let dir = crate::temp_dir("xenvirtio-fuzz-nbd");
    let image_path = dir.path().join("disk.img");
    let image: Vec<u8> = (0..IMAGE_LEN).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&image_path, &image).expect("the image");
    let export = FileExport::open(&image_path, input.read_only).expect("the export");
    let socket = dir.path().join("nbd.sock");
    let mut config = NbdServerConfig::new("xvda").unix(&socket);
    config.handshake_timeout = Duration::from_secs(5);
    config.shutdown_grace = Duration::from_millis(100);
    let server = NbdServer::start(Arc::new(export), config).expect("the server starts");

    let mut conn = UnixStream::connect(&socket).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a timeout");
    conn.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("a timeout");
    // Send from another thread: the server may reply while the client still sends.
    let bytes = client_bytes(input);
    let mut sender = conn.try_clone().expect("a second handle");
    let sending = std::thread::spawn(move || {
        // The server may close first (a violation ends the session): that is its right.
        let _ = sender.write_all(&bytes);
        let _ = sender.shutdown(std::net::Shutdown::Write);
    });
    let mut replies = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut ended_by = None;
    loop {
        match conn.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => replies.extend_from_slice(&chunk[..n]),
            // libFuzzer's timers interrupt system calls.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("the server neither answered nor closed within 10 s")
            }
            // A reset after the server dropped a violating client.
            Err(e) => {
                ended_by = Some(e);
                break;
            }
        }
        assert!(replies.len() < 64 << 20, "more than 64 MiB of replies");
    }
    sending.join().expect("the sender");
    drop(conn);
    server.shutdown();
    assert!(
        !SERVER_PANICKED.load(Ordering::SeqCst),
        "a server thread panicked"
    );

    assert!(
        replies.len() >= 18,
        "no hello ({} bytes, then {ended_by:?})",
        replies.len()
    );
    check_replies(input, &replies);
    let after = std::fs::read(&image_path).expect("the image");
    assert_eq!(after.len(), IMAGE_LEN, "the export changed size");
    let writes: Vec<(u64, u64)> = input
        .requests
        .iter()
        .filter(|q| {
            matches!(
                q.command(),
                proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
            )
        })
        .map(|q| {
            let (o, l) = q.range();
            (o, u64::from(l))
        })
        .collect();
    for (i, (b, a)) in image.iter().zip(&after).enumerate() {
        if b != a {
            assert!(!input.read_only, "a read-only export changed at {i}");
            let i = i as u64;
            assert!(
                writes.iter().any(|&(o, l)| o <= i && i - o < l),
                "byte {i} changed outside every write"
            );
        }
    }
}

/// Checks the reply stream. The hello always; when the client's stream is well-formed (so the
/// server's view of it is the input's), every option reply and every transmission reply too:
/// right magic, the option it answers in order, the handle of a request each (in any order), with
/// READ data of the right length, and nothing after the last.
fn check_replies(input: &NbdInput, replies: &[u8]) {
    assert!(replies.len() >= 18, "no hello");
    assert_eq!(replies[0..8], proto::NBDMAGIC.to_be_bytes());
    assert_eq!(replies[8..16], proto::IHAVEOPT.to_be_bytes());
    let flags = if input.known_flags {
        input.client_flags % 4
    } else {
        input.client_flags
    };
    let well_formed = flags == 3
        && input.trailing.is_empty()
        && input
            .options
            .iter()
            .all(|o| o.declared.is_none() && !o.bad_magic && o.known)
        && input.requests.iter().all(|q| {
            let want = if q.command() == proto::CMD_WRITE {
                q.range().1 as usize
            } else {
                0
            };
            q.known && q.payload().len() == want
        });
    if !well_formed {
        return;
    }
    let be32 = |at: usize| u32::from_be_bytes(replies[at..at + 4].try_into().expect("4 bytes"));
    let mut pos = 18;
    let mut transmission = false;
    for (k, o) in input.options.iter().enumerate() {
        let option = o.option % 12;
        // Options after the handshake ended reach the server as requests: not well-formed.
        let last = k + 1 == input.options.len();
        if option == proto::OPT_EXPORT_NAME {
            if (o.data.is_empty() || o.data == b"xvda") && last {
                pos += 10; // size and flags; NO_ZEROES was agreed
                transmission = true;
            }
            break;
        }
        let final_reply = loop {
            if replies.len() < pos + 20 {
                panic!("option {option} got no final reply");
            }
            assert_eq!(
                replies[pos..pos + 8],
                proto::OPTION_REPLY_MAGIC.to_be_bytes(),
                "option reply magic at {pos}"
            );
            assert_eq!(be32(pos + 8), option, "the option a reply answers");
            let reply = be32(pos + 12);
            let len = be32(pos + 16) as usize;
            pos += 20 + len;
            assert!(pos <= replies.len(), "an option reply cut short");
            if reply == proto::REP_ACK || reply & proto::REP_FLAG_ERROR != 0 {
                break reply;
            }
        };
        if option == proto::OPT_ABORT {
            return;
        }
        if option == proto::OPT_GO && final_reply == proto::REP_ACK {
            transmission = last;
            break;
        }
    }
    if !transmission {
        return;
    }
    // The export answers each request as it completes (NBD allows any order), so a reply is
    // matched to the earliest unanswered request with its handle. Every request before DISC
    // gets exactly one reply.
    let requests: Vec<&NbdRequest> = input
        .requests
        .iter()
        .take_while(|q| q.command() != proto::CMD_DISC)
        .collect();
    let mut answered = vec![false; requests.len()];
    for _ in 0..requests.len() {
        assert!(
            replies.len() >= pos + 16,
            "{} request(s) got no reply",
            answered.iter().filter(|a| !**a).count()
        );
        assert_eq!(be32(pos), proto::SIMPLE_REPLY_MAGIC, "reply magic at {pos}");
        let error = be32(pos + 4);
        let handle = u64::from_be_bytes(replies[pos + 8..pos + 16].try_into().expect("8 bytes"));
        let data = |i: usize| {
            if error == 0 && requests[i].command() == proto::CMD_READ {
                requests[i].range().1 as usize
            } else {
                0
            }
        };
        let candidates: Vec<usize> = (0..requests.len())
            .filter(|&i| !answered[i] && requests[i].handle == handle)
            .collect();
        let Some(&i) = candidates.first() else {
            panic!("a reply at {pos} names handle {handle:#x}, which no unanswered request has");
        };
        if candidates.iter().any(|&c| data(c) != data(i)) {
            // A client that reuses a handle for reads of different lengths cannot tell which
            // one a reply answers, nor can this check: the rest of the stream is not parsed.
            return;
        }
        answered[i] = true;
        pos += 16 + data(i);
    }
    assert_eq!(pos, replies.len(), "bytes after the last reply");
}

/// Seeds: the exchanges of the NBD unit and edge-case tests (`frontend/src/nbd/`).
pub fn seeds() -> Vec<(&'static str, NbdInput)> {
    let opt = |option: u32, data: Vec<u8>| NbdOption {
        option,
        known: true,
        data,
        declared: None,
        bad_magic: false,
    };
    let go_data = |name: &[u8], infos: &[u16]| {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    };
    let req = |command: u16, flags: u16, offset: u64, length: u32, exact: bool| NbdRequest {
        flags,
        command,
        known: true,
        handle: 0x1000 + u64::from(command),
        offset,
        length,
        near: true,
        payload: vec![],
        exact_payload: exact,
    };
    let base = |options: Vec<NbdOption>, requests: Vec<NbdRequest>| NbdInput {
        client_flags: 3,
        known_flags: true,
        read_only: false,
        options,
        requests,
        trailing: vec![],
    };
    let go = || {
        opt(
            proto::OPT_GO,
            go_data(b"xvda", &[proto::INFO_BLOCK_SIZE, proto::INFO_NAME]),
        )
    };
    let mut huge_option = base(vec![opt(proto::OPT_GO, vec![])], vec![]);
    huge_option.options[0].declared = Some(1 << 20);
    let mut plain_newstyle = base(
        vec![opt(proto::OPT_EXPORT_NAME, b"xvda".to_vec())],
        vec![req(proto::CMD_READ, 0, 0, 512, false)],
    );
    plain_newstyle.client_flags = 0;
    let mut read_only = base(vec![go()], vec![req(proto::CMD_WRITE, 0, 0, 512, true)]);
    read_only.read_only = true;
    vec![
        (
            "go_then_io",
            base(
                vec![go()],
                vec![
                    req(proto::CMD_WRITE, 0, 4096, 1024, true),
                    req(proto::CMD_READ, 0, 4096, 1024, false),
                    req(proto::CMD_FLUSH, 0, 0, 0, false),
                    req(proto::CMD_TRIM, 0, 8192, 4096, false),
                    req(
                        proto::CMD_WRITE_ZEROES,
                        proto::CMD_FLAG_NO_HOLE,
                        16384,
                        512,
                        false,
                    ),
                    req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 0, 512, true),
                    req(proto::CMD_DISC, 0, 0, 0, false),
                ],
            ),
        ),
        (
            "list_info_abort",
            base(
                vec![
                    opt(proto::OPT_LIST, vec![]),
                    opt(proto::OPT_INFO, go_data(b"", &[proto::INFO_DESCRIPTION])),
                    opt(proto::OPT_INFO, go_data(b"nope", &[])),
                    opt(proto::OPT_STRUCTURED_REPLY, vec![]),
                    opt(proto::OPT_ABORT, vec![]),
                ],
                vec![],
            ),
        ),
        (
            "refusals",
            base(
                vec![go()],
                vec![
                    req(proto::CMD_READ, 0, 100, 512, false),
                    req(proto::CMD_READ, 0, 65536 - 512, 1024, false),
                    req(proto::CMD_WRITE, 0, 65536, 512, true),
                    req(proto::CMD_FLUSH, 0, 1, 0, false),
                    req(7, 0, 0, 0, false),
                    req(proto::CMD_READ, 0x80, 0, 512, false),
                ],
            ),
        ),
        ("huge_option", huge_option),
        ("plain_newstyle", plain_newstyle),
        ("read_only_write", read_only),
        (
            "malformed_go",
            base(
                vec![opt(proto::OPT_GO, vec![0xff, 0xff, 0xff, 0xff, 0, 0])],
                vec![],
            ),
        ),
    ]
}
