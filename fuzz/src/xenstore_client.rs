//! Target `xenstore_client`: [`XsClient`] against a daemon that answers with anything.
//!
//! The client, over one end of a socketpair, makes a list of calls (reads, directory listings
//! with the `DIRECTORY_PART` fallback, permissions, transactions, typed xenbus reads, watches);
//! a scripted daemon on the other end answers the oldest unanswered request with any type and
//! payload, injects messages with any header (watch events, replies to nobody, guessed
//! request ids), or writes raw bytes that break the framing; when the script ends it closes the
//! connection. Checked:
//! - nothing panics and nothing hangs (every call returns once the daemon is gone);
//! - a successful typed result is what the reply payload says (a transaction id is non-zero,
//!   `T`/`F` is a bool, a listing holds names without NUL, a `state` is 0 to 8, a number
//!   parses back), and after the daemon closes, every call fails with `ConnectionLost`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use xenvirtio_xenstore::wire::{Framer, MsgHeader, MsgType};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{Perm, TxId, XenStore, XsClient, XsError};

use crate::input::{Reader, Structured, Writer};

/// What the client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XsCall {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `directory` (falls back to `DIRECTORY_PART` on E2BIG).
    Directory,
    /// `get_perms`.
    GetPerms,
    /// `set_perms`.
    SetPerms,
    /// `transaction_start`.
    TransactionStart,
    /// `transaction_end`.
    TransactionEnd,
    /// `get_domain_path`.
    GetDomainPath,
    /// `is_domain_introduced`.
    IsDomainIntroduced,
    /// `watch`, then draining the event queue.
    Watch,
    /// `xenbus::read_u32`.
    ReadU32,
    /// `xenbus::read_u64`.
    ReadU64,
    /// `xenbus::read_hex_u64`.
    ReadHexU64,
    /// `xenbus::read_bool`.
    ReadBool,
    /// `xenbus::read_list`.
    ReadList,
    /// `xenbus::read_state`.
    ReadState,
}

const CALLS: [XsCall; 16] = [
    XsCall::Read,
    XsCall::Write,
    XsCall::Directory,
    XsCall::GetPerms,
    XsCall::SetPerms,
    XsCall::TransactionStart,
    XsCall::TransactionEnd,
    XsCall::GetDomainPath,
    XsCall::IsDomainIntroduced,
    XsCall::Watch,
    XsCall::ReadU32,
    XsCall::ReadU64,
    XsCall::ReadHexU64,
    XsCall::ReadBool,
    XsCall::ReadList,
    XsCall::ReadState,
];

/// What the daemon does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonAct {
    /// Answers the oldest unanswered request (waiting for one if needed) with its own type
    /// (`kind` 0), `XS_ERROR` (1) or `raw_type` (2), and `payload`.
    Reply {
        /// Which type.
        kind: u8,
        /// Type for kind 2.
        raw_type: u32,
        /// The payload.
        payload: Vec<u8>,
    },
    /// Sends a whole message with any header fields (`len` is the payload's).
    Message {
        /// Message type.
        msg_type: u32,
        /// Request id.
        req_id: u32,
        /// Transaction id.
        tx_id: u32,
        /// Payload.
        payload: Vec<u8>,
    },
    /// Writes raw bytes.
    Raw(Vec<u8>),
}

/// One fuzz input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XsInput {
    /// The client's calls, in order.
    pub calls: Vec<XsCall>,
    /// The daemon's script.
    pub script: Vec<DaemonAct>,
}

impl Structured for XsInput {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            calls: r.list(16, |r| CALLS[r.choice(CALLS.len())]),
            script: r.list(24, |r| match r.choice(8) {
                0..=5 => DaemonAct::Reply {
                    kind: r.u8() % 3,
                    raw_type: r.u32(),
                    payload: r.bytes(300),
                },
                6 => DaemonAct::Message {
                    msg_type: r.u32(),
                    req_id: r.u32(),
                    tx_id: r.u32(),
                    payload: r.bytes(300),
                },
                _ => DaemonAct::Raw(r.bytes(64)),
            }),
        }
    }

    fn write(&self, w: &mut Writer) {
        w.list(&self.calls, 16, |w, c| {
            let i = CALLS.iter().position(|x| x == c).expect("a known call");
            w.choice(i, CALLS.len());
        });
        w.list(&self.script, 24, |w, act| match act {
            DaemonAct::Reply {
                kind,
                raw_type,
                payload,
            } => {
                w.choice(0, 8);
                w.u8(*kind);
                w.u32(*raw_type);
                w.bytes(payload, 300);
            }
            DaemonAct::Message {
                msg_type,
                req_id,
                tx_id,
                payload,
            } => {
                w.choice(6, 8);
                w.u32(*msg_type);
                w.u32(*req_id);
                w.u32(*tx_id);
                w.bytes(payload, 300);
            }
            DaemonAct::Raw(b) => {
                w.choice(7, 8);
                w.bytes(b, 64);
            }
        });
    }
}

crate::structured_input!(XsInput);

fn message(msg_type: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    let header = MsgHeader {
        msg_type,
        req_id,
        tx_id,
        len: payload.len() as u32,
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(payload);
    out
}

/// The daemon's side: plays the script, then closes. Junk can make the client misframe a
/// reply and wait for one that never comes (as any silent daemon can: the client waits as long
/// as the connection lives); a daemon that waits for a request and gets none within 200 ms
/// ends its script, so that the connection closes and the client's calls return.
fn daemon(mut sock: UnixStream, script: Vec<DaemonAct>) {
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .expect("a read timeout");
    let mut framer = Framer::new();
    let mut unanswered: std::collections::VecDeque<MsgHeader> = Default::default();
    let mut buf = [0u8; 8192];
    for act in script {
        let bytes = match act {
            DaemonAct::Reply {
                kind,
                raw_type,
                payload,
            } => {
                while unanswered.is_empty() {
                    let n = match sock.read(&mut buf) {
                        // libFuzzer's timers interrupt system calls.
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Ok(0) | Err(_) => {
                            let _ = sock.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        Ok(n) => n,
                    };
                    framer.push(&buf[..n]);
                    while let Ok(Some(m)) = framer.next_message() {
                        unanswered.push_back(m.header);
                    }
                }
                let req = unanswered.pop_front().expect("waited for one");
                let msg_type = match kind {
                    0 => req.msg_type,
                    1 => MsgType::Error.value(),
                    _ => raw_type,
                };
                message(msg_type, req.req_id, req.tx_id, &payload)
            }
            DaemonAct::Message {
                msg_type,
                req_id,
                tx_id,
                payload,
            } => message(msg_type, req_id, tx_id, &payload),
            DaemonAct::Raw(b) => b,
        };
        if sock.write_all(&bytes).is_err() {
            return;
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Both);
}

const PATH: &str = "/local/domain/5/device/virtio/0/state";

fn is_lost(e: &XsError) -> bool {
    matches!(e, XsError::ConnectionLost { .. })
}

/// Makes one call and checks what a success claims.
fn call(client: &XsClient, c: XsCall) -> Result<(), XsError> {
    let tx = TxId::NONE;
    match c {
        XsCall::Read => {
            client.read(tx, PATH)?;
        }
        XsCall::Write => client.write(tx, PATH, b"4")?,
        XsCall::Directory => {
            for name in client.directory(tx, "/local/domain/5")? {
                assert!(!name.contains('\0'), "a child name with a NUL: {name:?}");
            }
        }
        XsCall::GetPerms => {
            for p in client.get_perms(tx, PATH)? {
                assert_eq!(Perm::parse(&p.to_string()).expect("round trip"), p);
            }
        }
        XsCall::SetPerms => client.set_perms(tx, PATH, &[Perm::owner(0), Perm::read(5)])?,
        XsCall::TransactionStart => {
            let id = client.transaction_start()?;
            assert_ne!(id, TxId::NONE, "transaction id 0 accepted");
        }
        XsCall::TransactionEnd => client.transaction_end(TxId(7), true)?,
        XsCall::GetDomainPath => {
            let p = client.get_domain_path(5)?;
            assert!(!p.contains('\0'));
        }
        XsCall::IsDomainIntroduced => {
            client.is_domain_introduced(5)?;
        }
        XsCall::Watch => {
            let events = client.watch_events();
            client.watch(PATH, "tok")?;
            // Events are whatever the daemon sent; draining them must not fail or block.
            for _ in 0..64 {
                match events.try_next() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        XsCall::ReadU32 => {
            let v = xenbus::read_u32(client, tx, PATH)?;
            let _ = v;
        }
        XsCall::ReadU64 => {
            xenbus::read_u64(client, tx, PATH)?;
        }
        XsCall::ReadHexU64 => {
            xenbus::read_hex_u64(client, tx, PATH)?;
        }
        XsCall::ReadBool => {
            xenbus::read_bool(client, tx, PATH)?;
        }
        XsCall::ReadList => {
            for w in xenbus::read_list(client, tx, PATH)? {
                assert!(!w.is_empty() && !w.bytes().any(|c| c.is_ascii_whitespace()));
            }
        }
        XsCall::ReadState => {
            let s = xenbus::read_state(client, tx, PATH)?;
            assert!(XenbusState::ALL.contains(&s));
        }
    }
    Ok(())
}

/// Runs one input.
pub fn run(input: &XsInput) {
    let (a, b) = UnixStream::pair().expect("a socketpair");
    let script = input.script.clone();
    let daemon = std::thread::spawn(move || daemon(b, script));
    let client = XsClient::from_unix_stream(a).expect("a client");
    let mut lost = false;
    for c in &input.calls {
        match call(&client, *c) {
            Err(e) if is_lost(&e) => lost = true,
            Err(e) => assert!(
                !lost,
                "after the connection was lost a call failed with {e}"
            ),
            Ok(()) => assert!(!lost, "{c:?} succeeded after the connection was lost"),
        }
    }
    drop(client);
    daemon.join().expect("the daemon thread");
}

/// Seeds: the exchanges of the client's unit tests (`xenstore/src/client.rs`).
pub fn seeds() -> Vec<(&'static str, XsInput)> {
    let reply = |payload: &[u8]| DaemonAct::Reply {
        kind: 0,
        raw_type: 0,
        payload: payload.to_vec(),
    };
    let error = |name: &[u8]| DaemonAct::Reply {
        kind: 1,
        raw_type: 0,
        payload: name.to_vec(),
    };
    let event = |payload: &[u8]| DaemonAct::Message {
        msg_type: MsgType::WatchEvent.value(),
        req_id: 0,
        tx_id: 0,
        payload: payload.to_vec(),
    };
    let mut dir_part = b"17\0".to_vec();
    dir_part.extend_from_slice(b"a\0b\0\0");
    vec![
        (
            "typed_reads",
            XsInput {
                calls: vec![
                    XsCall::ReadU32,
                    XsCall::ReadHexU64,
                    XsCall::ReadBool,
                    XsCall::ReadList,
                    XsCall::ReadState,
                    XsCall::Read,
                ],
                script: vec![
                    reply(b"42"),
                    reply(b"0x1f"),
                    reply(b" 1 "),
                    reply(b"a  b c"),
                    reply(b"4\n"),
                    error(b"ENOENT\0"),
                ],
            },
        ),
        (
            "directory_part_fallback",
            XsInput {
                calls: vec![XsCall::Directory, XsCall::Directory],
                script: vec![error(b"E2BIG\0"), reply(&dir_part), reply(b"x\0y\0")],
            },
        ),
        (
            "transactions_and_perms",
            XsInput {
                calls: vec![
                    XsCall::TransactionStart,
                    XsCall::TransactionEnd,
                    XsCall::GetPerms,
                    XsCall::SetPerms,
                    XsCall::GetDomainPath,
                    XsCall::IsDomainIntroduced,
                ],
                script: vec![
                    reply(b"12\0"),
                    reply(b"OK\0"),
                    reply(b"n0\0r5\0"),
                    reply(b"OK\0"),
                    reply(b"/local/domain/5\0"),
                    reply(b"T\0"),
                ],
            },
        ),
        (
            "events_and_junk",
            XsInput {
                calls: vec![XsCall::Watch, XsCall::Read, XsCall::Read],
                script: vec![
                    event(b"/a\0tok\0"),
                    reply(b"OK\0"),
                    event(b"malformed"),
                    DaemonAct::Message {
                        msg_type: MsgType::Read.value(),
                        req_id: 999,
                        tx_id: 0,
                        payload: b"nobody".to_vec(),
                    },
                    reply(b"v"),
                    DaemonAct::Raw(message(2, 3, 0, &[0; 8])[..20].to_vec()),
                    DaemonAct::Raw(vec![0xff; 16]),
                ],
            },
        ),
        (
            "wrong_reply_type",
            XsInput {
                calls: vec![XsCall::Read, XsCall::Write],
                script: vec![
                    DaemonAct::Reply {
                        kind: 2,
                        raw_type: MsgType::Write.value(),
                        payload: b"OK\0".to_vec(),
                    },
                    reply(b"OK\0"),
                ],
            },
        ),
    ]
}
