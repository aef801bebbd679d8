//! The transmission phase of one connection: the request reader, validation, and dispatch to the
//! workers of [`pipeline`](super::pipeline).
//!
//! The connection's thread reads requests; each is validated against the export's size,
//! alignment and capabilities before the device is touched. A request of at most one chunk
//! ([`IO_CHUNK`]) becomes a job for the workers, who reply as each completes; a larger READ or
//! WRITE is served by the reader itself through its own chunk buffer, so no request makes the
//! server allocate more than a chunk. `NBD_CMD_DISC` and the end of the connection wait for the
//! requests in flight ("the server MUST handle all outstanding requests" before closing).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};

use super::conn::{ConnError, ServerConn};
use super::export::BlockExport;
use super::pipeline::{Budget, Job, Server, device_error, nbd_error};
use super::proto::{self, Request};
use super::reply::{HEADROOM, Replier};
use super::server::{ExportSettings, StatCounters};
use super::session::{IO_CHUNK, SessionEnd, SessionError};

/// Bytes of payload and READ data one connection may hold for its requests in flight.
pub(crate) const IN_FLIGHT_BYTES: usize = 8 << 20;
/// A worker keeps its READ buffer between requests only up to this size.
const KEPT_BUFFER: usize = 256 << 10;

/// What transmission uses from the handshake.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transmission {
    pub(crate) size: u64,
    pub(crate) flags: u16,
    /// `NBD_OPT_STRUCTURED_REPLY` was agreed.
    pub(crate) structured: bool,
    /// The id of `base:allocation` when the client selected it with `NBD_OPT_SET_META_CONTEXT`.
    pub(crate) allocation_context: Option<u32>,
}

/// The per-connection pieces transmission borrows from the session.
pub(crate) struct Connection<'c, 's> {
    pub(crate) conn: &'c mut ServerConn<'s>,
    pub(crate) export: &'c dyn BlockExport,
    pub(crate) settings: &'c ExportSettings,
    pub(crate) stats: &'c StatCounters,
    /// The reader's chunk buffer, for large requests and drained payloads.
    pub(crate) buf: &'c mut Vec<u8>,
}

/// Serves requests until the client disconnects, the server shuts down or the connection fails.
pub(crate) fn run<'s>(c: Connection<'_, 's>, t: Transmission) -> Result<SessionEnd, SessionError> {
    let writer = c
        .conn
        .writer()
        .map_err(|e| SessionError::Conn(ConnError::Io(e)))?;
    let replier = Replier::new(writer, t.structured, c.stats);
    let max_in_flight = c.settings.max_in_flight.max(1);
    let budget = Budget::new(max_in_flight, IN_FLIGHT_BYTES);
    let server = Server {
        export: c.export,
        stats: c.stats,
        replier: &replier,
        allocation_context: t.allocation_context,
        block_size: c.settings.block_sizes.minimum,
    };
    let fatal: Mutex<Option<SessionError>> = Mutex::new(None);
    // Workers waiting for a job, and jobs sent that no worker has taken yet: a new worker
    // starts when the jobs waiting outnumber the workers waiting.
    let idle = AtomicUsize::new(0);
    let waiting = AtomicUsize::new(0);
    let (jobs, queue) = mpsc::channel::<Job<'_>>();
    let queue = Mutex::new(queue);

    let ended = std::thread::scope(|scope| {
        let mut workers = 0;
        let mut dispatch = |job| {
            let jobs_waiting = waiting.fetch_add(1, Ordering::SeqCst) + 1;
            if jobs_waiting > idle.load(Ordering::SeqCst) && workers < max_in_flight {
                workers += 1;
                scope.spawn(|| work(&queue, &server, &idle, &waiting, &fatal));
            }
            // The workers hold the receiving end until this scope ends: sending cannot fail.
            let _ = jobs.send(job);
        };
        let mut reader = Reader {
            conn: c.conn,
            server: &server,
            settings: c.settings,
            stats: c.stats,
            budget: &budget,
            buf: c.buf,
            t,
        };
        let ended = reader.run(&mut dispatch);
        drop(jobs);
        ended
    });
    // A worker's failure is the cause; the reader's error is only its consequence.
    match fatal.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(e) => Err(e),
        None => ended,
    }
}

/// A worker: serves jobs until the reader is done, replying to each as it completes.
fn work(
    queue: &Mutex<mpsc::Receiver<Job<'_>>>,
    server: &Server<'_>,
    idle: &AtomicUsize,
    waiting: &AtomicUsize,
    fatal: &Mutex<Option<SessionError>>,
) {
    let mut buf = Vec::new();
    loop {
        idle.fetch_add(1, Ordering::SeqCst);
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        idle.fetch_sub(1, Ordering::SeqCst);
        let Ok(job) = job else { return };
        waiting.fetch_sub(1, Ordering::SeqCst);
        if fatal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            continue; // the connection is ending: nobody can take the reply
        }
        if let Err(e) = server.serve(job, &mut buf) {
            fatal
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(e);
            // Wakes the reader, whose next read fails.
            server.replier.close();
        }
        if buf.capacity() > KEPT_BUFFER {
            buf = Vec::new();
        }
    }
}

/// The request reader of one connection.
struct Reader<'r, 'c, 's> {
    conn: &'c mut ServerConn<'s>,
    server: &'r Server<'r>,
    settings: &'r ExportSettings,
    stats: &'r StatCounters,
    budget: &'r Budget,
    buf: &'c mut Vec<u8>,
    t: Transmission,
}

impl<'r, 'c, 's> Reader<'r, 'c, 's> {
    fn run(&mut self, dispatch: &mut dyn FnMut(Job<'r>)) -> Result<SessionEnd, SessionError> {
        loop {
            let mut header = [0u8; proto::REQUEST_LEN];
            self.conn.read_message(&mut header)?;
            let request = Request::decode(&header).map_err(|magic| {
                self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                SessionError::Protocol(format!("request magic {magic:#010x}"))
            })?;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if request.command == proto::CMD_DISC {
                // The requests in flight finish before the session ends (the caller's scope).
                return Ok(SessionEnd::Disconnected);
            }
            // "On a server shutdown ... The error value issued in respect of ... any
            // subsequently received requests SHOULD be NBD_ESHUTDOWN."
            if self.conn.shutting_down() {
                self.refuse(&request, proto::ESHUTDOWN)?;
                continue;
            }
            if let Err(error) = check(&request, self.t, self.settings) {
                self.refuse(&request, error)?;
                continue;
            }
            let data_len = match request.command {
                proto::CMD_READ | proto::CMD_WRITE => request.length as usize,
                _ => 0,
            };
            if data_len > IO_CHUNK {
                self.serve_large(&request)?;
                continue;
            }
            let permit = self.budget.acquire(data_len);
            let mut payload = Vec::new();
            if request.command == proto::CMD_WRITE {
                payload.resize(data_len, 0);
                self.conn.read_exact(&mut payload)?;
            }
            dispatch(Job {
                request,
                payload,
                permit,
            });
        }
    }

    /// Replies `error` to a request, first draining a WRITE's payload so that the stream stays
    /// in step (through the bounded buffer: a refused request allocates nothing new).
    fn refuse(&mut self, r: &Request, error: u32) -> Result<(), SessionError> {
        tracing::debug!(
            command = proto::command_name(r.command),
            flags = r.flags,
            offset = r.offset,
            length = r.length,
            error = proto::errno_name(error),
            "request refused"
        );
        if r.command == proto::CMD_WRITE {
            let mut left = r.length as usize;
            while left > 0 {
                let n = left.min(IO_CHUNK);
                self.ensure_buf(n);
                self.conn.read_exact(&mut self.buf[..n])?;
                left -= n;
            }
        }
        self.server
            .replier
            .lock()
            .done(r.handle, r.command, error)?;
        Ok(())
    }

    /// A READ or WRITE larger than one chunk, through the reader's own chunk buffer.
    fn serve_large(&mut self, r: &Request) -> Result<(), SessionError> {
        if r.command == proto::CMD_READ {
            return self.large_read(r);
        }
        let outcome = self.large_write(r)?;
        self.server.finish(r, outcome)
    }

    /// The first chunk is read before anything is sent, so a device error there is an
    /// ordinary error reply. A failure in a later chunk is an error chunk under structured
    /// replies and, under simple replies, can only be reported by a hard disconnect. The reply's
    /// messages go out under one lock, so no other reply interleaves with them.
    fn large_read(&mut self, r: &Request) -> Result<(), SessionError> {
        let total = r.length as usize;
        let first = total.min(IO_CHUNK);
        self.ensure_buf(HEADROOM + first);
        let replier = self.server.replier;
        let export = self.server.export;
        if let Err(e) = export.read_at(&mut self.buf[HEADROOM..HEADROOM + first], r.offset) {
            device_error(r, &e);
            replier.lock().done(r.handle, r.command, nbd_error(&e))?;
            return Ok(());
        }
        let mut w = replier.lock();
        w.read_data(
            r.handle,
            r.offset,
            &mut self.buf[..HEADROOM + first],
            true,
            first == total,
        )?;
        let mut done = first;
        while done < total {
            let n = (total - done).min(IO_CHUNK);
            let offset = r.offset + done as u64;
            let chunk = &mut self.buf[..HEADROOM + n];
            if let Err(e) = export.read_at(&mut chunk[HEADROOM..], offset) {
                if !w.can_fail_late() {
                    return Err(SessionError::ReadAfterHeader(e));
                }
                device_error(r, &e);
                w.read_failed_at(r.handle, offset, nbd_error(&e))?;
                return Ok(());
            }
            w.read_data(r.handle, offset, chunk, false, done + n == total)?;
            done += n;
        }
        drop(w);
        self.stats
            .bytes_read
            .fetch_add(total as u64, Ordering::Relaxed);
        Ok(())
    }

    /// A WRITE's payload chunk by chunk. After a device error the rest of the payload is still
    /// read (and dropped) to keep the stream in step; the outer result is the socket, the inner
    /// one the device.
    fn large_write(&mut self, r: &Request) -> Result<std::io::Result<()>, SessionError> {
        let total = r.length as usize;
        let mut done = 0;
        let mut outcome = Ok(());
        while done < total {
            let n = (total - done).min(IO_CHUNK);
            let offset = r.offset + done as u64;
            self.ensure_buf(n);
            self.conn.read_exact(&mut self.buf[..n])?;
            if outcome.is_ok() {
                outcome = self.server.export.write_at(&self.buf[..n], offset);
            }
            done += n;
        }
        if outcome.is_ok() {
            self.stats
                .bytes_written
                .fetch_add(total as u64, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    fn ensure_buf(&mut self, n: usize) {
        debug_assert!(n <= IO_CHUNK + HEADROOM);
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
    }
}

/// Validates a request before it touches the device; `Err` is the NBD error to reply
/// ("Error values", "Block size constraints").
fn check(r: &Request, t: Transmission, settings: &ExportSettings) -> Result<(), u32> {
    let writes = matches!(
        r.command,
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
    );
    let reads = matches!(
        r.command,
        proto::CMD_READ | proto::CMD_FLUSH | proto::CMD_BLOCK_STATUS
    );
    if !writes && !reads {
        return Err(proto::EINVAL); // unknown or unsupported command
    }
    if writes && t.flags & proto::FLAG_READ_ONLY != 0 {
        return Err(proto::EPERM);
    }
    let mut allowed = 0;
    if t.flags & proto::FLAG_SEND_FUA != 0 {
        allowed |= proto::CMD_FLAG_FUA; // valid on every command once negotiated
    }
    match r.command {
        proto::CMD_WRITE_ZEROES => allowed |= proto::CMD_FLAG_NO_HOLE,
        proto::CMD_BLOCK_STATUS => allowed |= proto::CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if r.flags & !allowed != 0 {
        return Err(proto::EINVAL);
    }
    let advertised = match r.command {
        proto::CMD_FLUSH => t.flags & proto::FLAG_SEND_FLUSH != 0,
        proto::CMD_TRIM => t.flags & proto::FLAG_SEND_TRIM != 0,
        proto::CMD_WRITE_ZEROES => t.flags & proto::FLAG_SEND_WRITE_ZEROES != 0,
        // "NBD_CMD_BLOCK_STATUS ... MUST NOT be sent unless ... at least one metadata context"
        // was selected, and only with structured replies.
        proto::CMD_BLOCK_STATUS => t.structured && t.allocation_context.is_some(),
        _ => true,
    };
    if !advertised {
        return Err(proto::EINVAL);
    }
    if r.command == proto::CMD_FLUSH {
        // "For a flush request, length and offset are reserved, and MUST be set to all-zero."
        return if r.offset == 0 && r.length == 0 {
            Ok(())
        } else {
            Err(proto::EINVAL)
        };
    }
    if r.command == proto::CMD_BLOCK_STATUS && r.length == 0 {
        return Err(proto::EINVAL); // "The length MUST be nonzero"
    }
    // TRIM and BLOCK_STATUS are the commands whose length the maximum block size does not
    // bound.
    let unbounded = matches!(r.command, proto::CMD_TRIM | proto::CMD_BLOCK_STATUS);
    if !unbounded && r.length > settings.block_sizes.maximum {
        return Err(proto::EINVAL);
    }
    let minimum = u64::from(settings.block_sizes.minimum);
    if r.offset % minimum != 0 || u64::from(r.length) % minimum != 0 {
        return Err(proto::EINVAL);
    }
    let in_range = r
        .offset
        .checked_add(u64::from(r.length))
        .is_some_and(|end| end <= t.size);
    if !in_range {
        // ENOSPC for writes past the end, EINVAL for reads, trims and status.
        return Err(match r.command {
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => proto::ENOSPC,
            _ => proto::EINVAL,
        });
    }
    Ok(())
}
