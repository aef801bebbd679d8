//! [`XsClient`]: the xenstore client over a unix socket or `/dev/xen/xenbus`.
//!
//! This module owns request/reply matching. Requests from any number of threads are written
//! whole under one lock; a reader thread reads the stream, hands each reply to the request
//! with the same `req_id` and routes watch events to the connection's queues. When the stream
//! ends or breaks, the reader fails every pending request, closes the event queues, and every
//! later request fails at once with [`XsError::ConnectionLost`]. Nothing here ever waits on
//! the daemon without also waking when the connection dies.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Errno, XsError};
use crate::perms::{DomId, Perm};
use crate::store::{TxId, XenStore};
use crate::transport::{Transport, Wake, XENBUS_DEVICE, wait_readable};
use crate::watch::{WatchEvent, WatchEvents, WatchHub};
use crate::wire::{self, Framer, Message, MsgType};

type ReplySlot = SyncSender<Result<Message, XsError>>;

#[derive(Debug)]
struct ConnState {
    pending: HashMap<u32, ReplySlot>,
    next_req_id: u32,
    lost: Option<String>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<ConnState>,
    hub: WatchHub,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // Updates are single map operations: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails every pending request and every later one, and closes the event queues.
    fn mark_lost(&self, reason: &str) {
        let pending = {
            let mut st = self.lock();
            if st.lost.is_none() {
                tracing::debug!(reason, "xenstore connection lost");
                st.lost = Some(reason.to_owned());
            }
            std::mem::take(&mut st.pending)
        };
        for (_, slot) in pending {
            // Each slot holds one reply at most and this is its only one: it cannot be full.
            let _ = slot.try_send(Err(XsError::ConnectionLost {
                reason: reason.to_owned(),
            }));
        }
        self.hub.close(reason);
    }

    fn dispatch(&self, msg: Message) {
        if msg.header.msg_type == MsgType::WatchEvent.value() {
            let mut parts = msg.payload.split(|b| *b == 0);
            let (Some(path), Some(token)) = (parts.next(), parts.next()) else {
                tracing::debug!(len = msg.payload.len(), "dropping a malformed watch event");
                return;
            };
            self.hub.dispatch(WatchEvent {
                path: String::from_utf8_lossy(path).into_owned(),
                token: String::from_utf8_lossy(token).into_owned(),
            });
            return;
        }
        let slot = self.lock().pending.remove(&msg.header.req_id);
        match slot {
            Some(slot) => {
                let _ = slot.try_send(Ok(msg));
            }
            None => tracing::debug!(
                req_id = msg.header.req_id,
                "dropping a reply nobody waits for"
            ),
        }
    }
}

/// A connection to xenstored.
///
/// Cheap to share: every method takes `&self` and may be called from several threads at
/// once. Dropping it closes the connection: the daemon then ends its open transactions and
/// drops its watches.
pub struct XsClient {
    shared: Arc<Shared>,
    writer: Mutex<Transport>,
    /// Dropping this wakes the reader thread, which then exits.
    stop: Option<UnixStream>,
    reader: Option<JoinHandle<()>>,
    description: String,
    timeout: Mutex<Option<Duration>>,
}

impl fmt::Debug for XsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XsClient")
            .field("transport", &self.description)
            .finish_non_exhaustive()
    }
}

impl XsClient {
    /// Connects the usual way: `$XENSTORED_PATH`, `/run/xenstored/socket`,
    /// `/var/run/xenstored/socket`, then `/dev/xen/xenbus`. The error lists every path tried.
    pub fn open() -> Result<XsClient, XsError> {
        let (transport, path) = Transport::open_default()?;
        XsClient::start(transport, path)
    }

    /// Connects to the daemon's unix socket at `path`.
    pub fn connect_socket(path: impl AsRef<Path>) -> Result<XsClient, XsError> {
        let path = path.as_ref();
        let t = Transport::connect_socket(path).map_err(|source| XsError::Io {
            what: format!(
                "connecting to the xenstored socket {} failed",
                path.display()
            ),
            source,
        })?;
        XsClient::start(t, path.display().to_string())
    }

    /// Opens the guest kernel's `/dev/xen/xenbus`.
    pub fn open_xenbus() -> Result<XsClient, XsError> {
        XsClient::open_xenbus_at(XENBUS_DEVICE)
    }

    /// Opens a xenbus device at a non-default path.
    pub fn open_xenbus_at(path: impl AsRef<Path>) -> Result<XsClient, XsError> {
        let path = path.as_ref();
        let t = Transport::open_device(path).map_err(|source| XsError::Io {
            what: format!("opening {} failed", path.display()),
            source,
        })?;
        XsClient::start(t, path.display().to_string())
    }

    /// Uses an already connected stream (a socketpair in tests, a bridge to a guest ring).
    pub fn from_unix_stream(stream: UnixStream) -> Result<XsClient, XsError> {
        XsClient::start(
            Transport::Socket(stream),
            "a connected unix stream".to_owned(),
        )
    }

    fn start(transport: Transport, path: String) -> Result<XsClient, XsError> {
        let description = format!("{} {path}", transport.kind());
        let io = |what: &str| {
            let what = format!("{what} for the xenstore connection to {description}");
            move |source| XsError::Io { what, source }
        };
        let mut reader_side = transport.try_clone().map_err(io("duplicating the fd"))?;
        let (stop, stop_rx) = UnixStream::pair().map_err(io("creating the stop socketpair"))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(ConnState {
                pending: HashMap::new(),
                next_req_id: 1,
                lost: None,
            }),
            hub: WatchHub::new()?,
        });
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name("xenstore-reader".into())
            .spawn(move || {
                let reason = read_replies(&reader_shared, &mut reader_side, &stop_rx);
                reader_shared.mark_lost(&reason);
            })
            .map_err(io("spawning the reader thread"))?;
        tracing::debug!(transport = %description, "xenstore connection open");
        Ok(XsClient {
            shared,
            writer: Mutex::new(transport),
            stop: Some(stop),
            reader: Some(reader),
            description,
            timeout: Mutex::new(None),
        })
    }

    /// The transport and path this client uses.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Makes every later request fail with [`XsError::Timeout`] if no reply comes within
    /// `timeout` (`None`, the default: wait as long as the connection lives). A timed-out
    /// request may still take effect in the daemon.
    pub fn set_request_timeout(&self, timeout: Option<Duration>) {
        *self.timeout.lock().unwrap_or_else(|p| p.into_inner()) = timeout;
    }

    /// Number of requests sent and waiting for their reply (for diagnostics and tests).
    pub fn pending_requests(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Whether the connection has been lost.
    pub fn is_lost(&self) -> bool {
        self.shared.lock().lost.is_some()
    }

    /// Sends one raw request and returns the reply's payload; an `XS_ERROR` reply becomes
    /// [`XsError::Daemon`]. For message types the typed methods do not cover.
    pub fn request(&self, op: MsgType, tx: TxId, payload: Vec<u8>) -> Result<Vec<u8>, XsError> {
        self.call(op, tx, "", payload)
    }

    /// Introduces a domain to xenstored (`XS_INTRODUCE`; privileged): its ring is at `gfn`
    /// and it is notified on event channel `port`.
    pub fn introduce_domain(&self, domid: DomId, gfn: u64, port: u32) -> Result<(), XsError> {
        let args = [domid.to_string(), gfn.to_string(), port.to_string()];
        self.call(
            MsgType::Introduce,
            TxId::NONE,
            &args[0],
            wire::join_strings(&args),
        )
        .map(drop)
    }

    /// Releases a domain (`XS_RELEASE`; privileged): xenstored forgets it and fires
    /// `@releaseDomain`.
    pub fn release_domain(&self, domid: DomId) -> Result<(), XsError> {
        let d = domid.to_string();
        self.call(MsgType::Release, TxId::NONE, &d, wire::join_strings(&[&d]))
            .map(drop)
    }

    fn call(
        &self,
        op: MsgType,
        tx: TxId,
        subject: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, XsError> {
        let (slot, reply) = sync_channel(1);
        let req_id = {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.lost {
                return Err(XsError::ConnectionLost {
                    reason: reason.clone(),
                });
            }
            let mut id = st.next_req_id;
            while id == 0 || st.pending.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            st.next_req_id = id.wrapping_add(1);
            st.pending.insert(id, slot);
            id
        };
        let msg = match Message::new(op, req_id, tx.0, payload) {
            Ok(m) => m,
            Err(e) => {
                self.shared.lock().pending.remove(&req_id);
                return Err(e);
            }
        };
        let written = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_message(&msg.to_bytes());
        if let Err(e) = written {
            let reason = format!("writing a {op} request failed: {e}");
            self.shared.mark_lost(&reason);
            return Err(XsError::ConnectionLost { reason });
        }
        let reply = self.wait_reply(op, subject, req_id, &reply)?;
        let ty = reply.header.msg_type;
        if ty == MsgType::Error.value() {
            let name = String::from_utf8_lossy(wire::first_string(&reply.payload)).into_owned();
            return Err(XsError::daemon(op, subject, Errno::from_name(&name)));
        }
        if ty != op.value() {
            return Err(XsError::BadReply {
                op,
                reason: format!("the reply has message type {ty}"),
            });
        }
        Ok(reply.payload)
    }

    fn wait_reply(
        &self,
        op: MsgType,
        subject: &str,
        req_id: u32,
        reply: &Receiver<Result<Message, XsError>>,
    ) -> Result<Message, XsError> {
        let timeout = *self.timeout.lock().unwrap_or_else(|p| p.into_inner());
        let lost = || XsError::ConnectionLost {
            reason: "the reader thread stopped".into(),
        };
        match timeout {
            None => reply.recv().map_err(|_| lost())?,
            Some(after) => match reply.recv_timeout(after) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    self.shared.lock().pending.remove(&req_id);
                    Err(XsError::Timeout {
                        op,
                        path: wire::shorten(subject),
                        after,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => Err(lost()),
            },
        }
    }

    fn ack(&self, op: MsgType, tx: TxId, path: &str, payload: Vec<u8>) -> Result<(), XsError> {
        self.call(op, tx, path, payload).map(drop)
    }

    fn directory_part(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
        assemble_directory_parts(|offset| {
            let off = offset.to_string();
            self.call(
                MsgType::DirectoryPart,
                tx,
                path,
                wire::join_strings(&[path, off.as_str()]),
            )
        })
    }
}

impl Drop for XsClient {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(reader) = self.reader.take() {
            if reader.join().is_err() {
                tracing::debug!("the xenstore reader thread panicked");
            }
        }
        self.shared.mark_lost("the xenstore client was closed");
    }
}

/// The reader thread's loop; returns why the connection ended.
fn read_replies(shared: &Shared, conn: &mut Transport, stop: &UnixStream) -> String {
    use std::os::fd::AsRawFd;
    let mut framer = Framer::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match wait_readable(conn.raw_fd(), stop.as_raw_fd()) {
            Ok(Wake::Readable) => {}
            Ok(Wake::Stop) => return "the xenstore client was closed".into(),
            Err(e) => return format!("polling the connection failed: {e}"),
        }
        let n = match conn.read(&mut buf) {
            Ok(0) => return "xenstored closed the connection".into(),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) =>
            {
                continue;
            }
            Err(e) => return format!("reading from xenstored failed: {e}"),
        };
        framer.push(&buf[..n]);
        loop {
            match framer.next_message() {
                Ok(Some(msg)) => shared.dispatch(msg),
                Ok(None) => break,
                Err(e) => return format!("protocol violation: {e}"),
            }
        }
    }
}

/// How many times a listing restarts because the directory kept changing under it.
const DIRECTORY_PART_RESTARTS: u32 = 64;

/// Reassembles a `DIRECTORY_PART` listing. `fetch(offset)` returns the reply for a byte
/// offset into the children list: the node's generation, NUL, then NUL-terminated names, with
/// one extra NUL after the last part. If the generation changes between parts the directory
/// changed: start again from offset 0 (as libxenstore does), a bounded number of times.
pub(crate) fn assemble_directory_parts(
    mut fetch: impl FnMut(usize) -> Result<Vec<u8>, XsError>,
) -> Result<Vec<String>, XsError> {
    let bad = |reason: &str| XsError::BadReply {
        op: MsgType::DirectoryPart,
        reason: reason.to_owned(),
    };
    'restart: for _ in 0..=DIRECTORY_PART_RESTARTS {
        let mut names: Vec<u8> = Vec::new();
        let mut generation: Option<Vec<u8>> = None;
        loop {
            let reply = fetch(names.len())?;
            let nul = reply
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| bad("no generation count"))?;
            let (gen_bytes, rest) = (&reply[..nul], &reply[nul + 1..]);
            match &generation {
                None => generation = Some(gen_bytes.to_vec()),
                Some(g) if g.as_slice() != gen_bytes => continue 'restart,
                Some(_) => {}
            }
            let done = rest == [0] || rest.ends_with(&[0, 0]);
            let chunk = if done { &rest[..rest.len() - 1] } else { rest };
            if !done && chunk.last() != Some(&0) {
                return Err(bad("a part neither ends a name nor ends the list"));
            }
            names.extend_from_slice(chunk);
            if done {
                return wire::split_strings(&names).ok_or_else(|| bad("a child name is not UTF-8"));
            }
        }
    }
    Err(bad(&format!(
        "the directory changed during each of {} listings",
        DIRECTORY_PART_RESTARTS + 1
    )))
}

fn parse_names(op: MsgType, payload: &[u8]) -> Result<Vec<String>, XsError> {
    wire::split_strings(payload).ok_or_else(|| XsError::BadReply {
        op,
        reason: "a child name is not UTF-8".into(),
    })
}

impl XenStore for XsClient {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError> {
        wire::check_path(path)?;
        self.call(MsgType::Read, tx, path, wire::join_strings(&[path]))
    }

    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError> {
        wire::check_write(path, value.len())?;
        let mut payload = Vec::with_capacity(path.len() + 1 + value.len());
        payload.extend_from_slice(path.as_bytes());
        payload.push(0);
        payload.extend_from_slice(value);
        self.ack(MsgType::Write, tx, path, payload)
    }

    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        wire::check_path(path)?;
        self.ack(MsgType::Mkdir, tx, path, wire::join_strings(&[path]))
    }

    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        wire::check_path(path)?;
        self.ack(MsgType::Rm, tx, path, wire::join_strings(&[path]))
    }

    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
        wire::check_path(path)?;
        match self.call(MsgType::Directory, tx, path, wire::join_strings(&[path])) {
            Ok(payload) => parse_names(MsgType::Directory, &payload),
            Err(e) if e.errno() == Some(&Errno::E2BIG) => {
                tracing::debug!(
                    path,
                    "listing too big for one message, using DIRECTORY_PART"
                );
                match self.directory_part(tx, path) {
                    Err(e2) if e2.errno() == Some(&Errno::ENOSYS) => Err(e),
                    r => r,
                }
            }
            Err(e) => Err(e),
        }
    }

    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Perm>, XsError> {
        wire::check_path(path)?;
        let payload = self.call(MsgType::GetPerms, tx, path, wire::join_strings(&[path]))?;
        Perm::parse_list(&payload).map_err(|e| XsError::BadReply {
            op: MsgType::GetPerms,
            reason: e.to_string(),
        })
    }

    fn set_perms(&self, tx: TxId, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        wire::check_path(path)?;
        if perms.is_empty() {
            return Err(XsError::InvalidArgument {
                what: "permission list",
                reason: "it needs at least the owner",
            });
        }
        let mut parts = vec![path.to_owned()];
        parts.extend(perms.iter().map(Perm::to_string));
        self.ack(MsgType::SetPerms, tx, path, wire::join_strings(&parts))
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        wire::check_path(path)?;
        wire::check_token(token)?;
        self.ack(
            MsgType::Watch,
            TxId::NONE,
            path,
            wire::join_strings(&[path, token]),
        )
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        wire::check_path(path)?;
        wire::check_token(token)?;
        self.ack(
            MsgType::Unwatch,
            TxId::NONE,
            path,
            wire::join_strings(&[path, token]),
        )
    }

    fn transaction_start(&self) -> Result<TxId, XsError> {
        let payload = self.call(MsgType::TransactionStart, TxId::NONE, "", vec![0])?;
        let text = wire::first_string(&payload);
        std::str::from_utf8(text)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|id| *id != 0)
            .map(TxId)
            .ok_or_else(|| XsError::BadReply {
                op: MsgType::TransactionStart,
                reason: format!(
                    "{:?} is not a transaction id",
                    String::from_utf8_lossy(text)
                ),
            })
    }

    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XsError> {
        let arg = if commit { "T" } else { "F" };
        self.ack(
            MsgType::TransactionEnd,
            tx,
            &format!("transaction {tx}"),
            wire::join_strings(&[arg]),
        )
    }

    fn get_domain_path(&self, domid: DomId) -> Result<String, XsError> {
        let d = domid.to_string();
        let payload = self.call(
            MsgType::GetDomainPath,
            TxId::NONE,
            &d,
            wire::join_strings(&[&d]),
        )?;
        String::from_utf8(wire::first_string(&payload).to_vec()).map_err(|_| XsError::BadReply {
            op: MsgType::GetDomainPath,
            reason: "the path is not UTF-8".into(),
        })
    }

    fn is_domain_introduced(&self, domid: DomId) -> Result<bool, XsError> {
        let d = domid.to_string();
        let payload = self.call(
            MsgType::IsDomainIntroduced,
            TxId::NONE,
            &d,
            wire::join_strings(&[&d]),
        )?;
        match wire::first_string(&payload) {
            b"T" => Ok(true),
            b"F" => Ok(false),
            other => Err(XsError::BadReply {
                op: MsgType::IsDomainIntroduced,
                reason: format!("{:?} is neither T nor F", String::from_utf8_lossy(other)),
            }),
        }
    }

    fn reset_watches(&self) -> Result<(), XsError> {
        self.ack(MsgType::ResetWatches, TxId::NONE, "", Vec::new())
    }

    fn watch_events(&self) -> WatchEvents {
        self.shared.hub.events()
    }

    fn watch_events_for(&self, token: &str) -> Result<WatchEvents, XsError> {
        self.shared.hub.events_for(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{HEADER_LEN, MsgHeader};
    use std::io::{Read, Write};
    use std::time::Instant;

    /// A scripted daemon on the other end of a socketpair.
    struct FakeDaemon {
        sock: UnixStream,
    }

    impl FakeDaemon {
        fn pair() -> (XsClient, FakeDaemon) {
            let (a, b) = UnixStream::pair().unwrap();
            (
                XsClient::from_unix_stream(a).unwrap(),
                FakeDaemon { sock: b },
            )
        }

        fn recv(&mut self) -> Message {
            let mut head = [0u8; HEADER_LEN];
            self.sock.read_exact(&mut head).unwrap();
            let header = MsgHeader::decode(&head);
            let mut payload = vec![0u8; header.len as usize];
            self.sock.read_exact(&mut payload).unwrap();
            Message { header, payload }
        }

        fn send(&mut self, ty: MsgType, req_id: u32, payload: &[u8]) {
            let m = Message::new(ty, req_id, 0, payload.to_vec()).unwrap();
            self.sock.write_all(&m.to_bytes()).unwrap();
        }
    }

    #[test]
    fn replies_are_matched_by_req_id_while_events_interleave() {
        let (client, mut daemon) = FakeDaemon::pair();
        let client = Arc::new(client);
        let events = client.watch_events();
        let a = {
            let c = client.clone();
            std::thread::spawn(move || c.read(TxId::NONE, "/a"))
        };
        let first = daemon.recv();
        let b = {
            let c = client.clone();
            std::thread::spawn(move || c.read(TxId::NONE, "/b"))
        };
        let second = daemon.recv();
        assert_ne!(first.header.req_id, second.header.req_id);
        let value_of = |m: &Message| {
            if m.payload == b"/a\0" {
                b"A".as_slice()
            } else {
                b"B".as_slice()
            }
        };
        // Answer out of order, with a watch event in between.
        daemon.send(MsgType::Read, second.header.req_id, value_of(&second));
        daemon.send(MsgType::WatchEvent, 0, b"/w\0tok\0");
        daemon.send(MsgType::Read, first.header.req_id, value_of(&first));
        assert_eq!(a.join().unwrap().unwrap(), b"A");
        assert_eq!(b.join().unwrap().unwrap(), b"B");
        let ev = events
            .next_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(
            ev,
            WatchEvent {
                path: "/w".into(),
                token: "tok".into()
            }
        );
    }

    #[test]
    fn error_replies_keep_the_errno_name() {
        let (client, mut daemon) = FakeDaemon::pair();
        let t = std::thread::spawn(move || {
            let m = daemon.recv();
            daemon.send(MsgType::Error, m.header.req_id, b"ENOENT\0");
            let m = daemon.recv();
            daemon.send(MsgType::Error, m.header.req_id, b"EFUNNY\0");
            daemon
        });
        let e = client.read(TxId::NONE, "/nope").unwrap_err();
        assert!(e.is_enoent(), "{e}");
        assert!(e.to_string().contains("/nope"));
        let e = client.write(TxId::NONE, "/x", b"1").unwrap_err();
        assert_eq!(e.errno(), Some(&Errno::Other("EFUNNY".into())));
        t.join().unwrap();
    }

    #[test]
    fn lost_connection_fails_pending_and_later_requests_and_wakes_watchers() {
        let (client, mut daemon) = FakeDaemon::pair();
        let client = Arc::new(client);
        let events = client.watch_events();
        let pending: Vec<_> = (0..4)
            .map(|i| {
                let c = client.clone();
                std::thread::spawn(move || c.read(TxId::NONE, &format!("/p{i}")))
            })
            .collect();
        let watcher = {
            let e = events.clone();
            std::thread::spawn(move || e.next_timeout(Duration::from_secs(30)))
        };
        for _ in 0..4 {
            daemon.recv();
        }
        let start = Instant::now();
        drop(daemon);
        for p in pending {
            assert!(p.join().unwrap().unwrap_err().is_connection_lost());
        }
        assert!(watcher.join().unwrap().unwrap_err().is_connection_lost());
        assert!(start.elapsed() < Duration::from_secs(1));
        let e = client.read(TxId::NONE, "/later").unwrap_err();
        assert!(e.is_connection_lost(), "{e}");
        assert!(client.is_lost());
    }

    #[test]
    fn oversized_requests_are_refused_before_sending() {
        let (client, mut daemon) = FakeDaemon::pair();
        assert!(matches!(
            client.write(TxId::NONE, "/a", &[0u8; 4096]),
            Err(XsError::ValueTooLong { .. })
        ));
        let long = format!("/{}", "x".repeat(3100));
        assert!(matches!(
            client.read(TxId::NONE, &long),
            Err(XsError::PathTooLong { .. })
        ));
        assert!(matches!(
            client.set_perms(TxId::NONE, "/a", &[]),
            Err(XsError::InvalidArgument { .. })
        ));
        // Nothing reached the daemon: the next thing it sees is this read.
        let t = std::thread::spawn(move || {
            let m = daemon.recv();
            assert_eq!(m.payload, b"/ok\0");
            daemon.send(MsgType::Read, m.header.req_id, b"v");
        });
        assert_eq!(client.read(TxId::NONE, "/ok").unwrap(), b"v");
        t.join().unwrap();
    }

    #[test]
    fn malformed_stream_is_a_lost_connection() {
        let (client, mut daemon) = FakeDaemon::pair();
        let t = std::thread::spawn(move || {
            let m = daemon.recv();
            let h = MsgHeader {
                msg_type: 2,
                req_id: m.header.req_id,
                tx_id: 0,
                len: 70000,
            };
            daemon.sock.write_all(&h.encode()).unwrap();
            daemon
        });
        let e = client.read(TxId::NONE, "/a").unwrap_err();
        assert!(e.to_string().contains("protocol violation"), "{e}");
        drop(t.join().unwrap());
    }

    #[test]
    fn request_timeout_is_reported() {
        let (client, _daemon) = FakeDaemon::pair();
        client.set_request_timeout(Some(Duration::from_millis(50)));
        assert!(matches!(
            client.read(TxId::NONE, "/slow"),
            Err(XsError::Timeout { .. })
        ));
    }

    #[test]
    fn dropping_the_client_closes_its_event_queues() {
        let (client, _daemon) = FakeDaemon::pair();
        let events = client.watch_events();
        drop(client);
        assert!(events.try_next().unwrap_err().is_connection_lost());
    }

    /// Issue 13, finding 1, through the socket client the daemon uses: xenstored relays
    /// every write a guest makes under a watch, and the reader thread queues them while the
    /// consumer is busy. The queue holds at most one event per token, however many arrive.
    #[test]
    fn hostile_watch_flood_through_the_socket_client() {
        const EVENTS: usize = 300_000;
        let (client, mut daemon) = FakeDaemon::pair();
        let events = client.watch_events();
        let flood = std::thread::spawn(move || {
            let long = "y".repeat(200);
            for i in 0..EVENTS {
                let path = if i % 2 == 0 {
                    "/w/state".to_owned()
                } else {
                    format!("/w/state/{long}{}", i % 64)
                };
                daemon.send(MsgType::WatchEvent, 0, format!("{path}\0tok\0").as_bytes());
            }
            // The client's read was sent before the flood ended: answering it after the flood
            // means every event has been dispatched once the read returns.
            let m = daemon.recv();
            daemon.send(MsgType::Read, m.header.req_id, b"done");
            daemon
        });
        assert_eq!(client.read(TxId::NONE, "/sync").unwrap(), b"done");
        let mut daemon = flood.join().unwrap();
        assert_eq!(
            events.len(),
            1,
            "{EVENTS} events while nobody drained: at most one pending event for the token"
        );
        assert_eq!(
            events.try_next().unwrap(),
            Some(WatchEvent {
                path: "/w/state".into(),
                token: "tok".into()
            })
        );
        assert_eq!(events.try_next().unwrap(), None);
        daemon.send(MsgType::WatchEvent, 0, b"/w/state\0tok\0");
        assert_eq!(
            events.next_timeout(Duration::from_secs(5)).unwrap(),
            Some(WatchEvent {
                path: "/w/state".into(),
                token: "tok".into()
            }),
            "an event after the flood is delivered"
        );
    }

    fn part(gen_: &str, names: &[&str], last: bool) -> Vec<u8> {
        let mut v = format!("{gen_}\0").into_bytes();
        v.extend(wire::join_strings(names));
        if last {
            v.push(0);
        }
        v
    }

    #[test]
    fn directory_parts_are_reassembled() {
        let mut calls = Vec::new();
        let names = assemble_directory_parts(|off| {
            calls.push(off);
            Ok(match off {
                0 => part("9", &["alpha", "beta"], false),
                11 => part("9", &["gamma"], true),
                _ => panic!("offset {off}"),
            })
        })
        .unwrap();
        assert_eq!(names, vec!["alpha", "beta", "gamma"]);
        assert_eq!(calls, vec![0, 11]);
        assert_eq!(
            assemble_directory_parts(|_| Ok(b"3\0\0".to_vec())).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn directory_parts_restart_when_the_generation_changes() {
        let mut n = 0;
        let names = assemble_directory_parts(|off| {
            n += 1;
            Ok(match (n, off) {
                (1, 0) => part("1", &["a"], false),
                (2, 2) => part("2", &["b"], true),
                (3, 0) => part("2", &["a", "b", "c"], true),
                other => panic!("{other:?}"),
            })
        })
        .unwrap();
        assert_eq!(names, vec!["a", "b", "c"]);
        let e =
            assemble_directory_parts(|off| Ok(part(&off.to_string(), &["a"], false))).unwrap_err();
        assert!(e.to_string().contains("changed"), "{e}");
        let e = assemble_directory_parts(|_| Ok(b"1\0abc".to_vec())).unwrap_err();
        assert!(matches!(e, XsError::BadReply { .. }));
    }
}
