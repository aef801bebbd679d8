//! Requests in flight: the per-connection budget and the workers that serve requests and reply
//! as each completes.
//!
//! The request reader hands every request that fits one chunk ([`IO_CHUNK`](super::session::IO_CHUNK))
//! to a [`Job`]; workers (started on demand, up to the connection's limit) serve jobs in
//! parallel against the device and write each reply as soon as it is ready, so a client with
//! many requests outstanding keeps the device's queue full ("the server MAY process commands
//! out of order, and MAY reply out of order"). The [`Budget`] bounds what one connection may
//! hold: requests in flight, and bytes of payload and READ data buffered for them. The reader
//! waits for the budget before it reads a WRITE's payload, so a client that sends faster than
//! the device serves is slowed by TCP, never by the server's memory.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, PoisonError};

use super::export::BlockExport;
use super::proto::{self, Request};
use super::reply::{Descriptor, HEADROOM, Replier};
use super::server::StatCounters;
use super::session::SessionError;

/// At most this many holes are looked up for one BLOCK_STATUS reply.
const MAX_HOLES: usize = 1024;

/// What one connection may have in flight.
#[derive(Debug)]
pub(crate) struct Budget {
    max_requests: usize,
    max_bytes: usize,
    state: Mutex<InFlight>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct InFlight {
    requests: usize,
    bytes: usize,
}

impl Budget {
    pub(crate) fn new(max_requests: usize, max_bytes: usize) -> Budget {
        Budget {
            max_requests: max_requests.max(1),
            max_bytes,
            state: Mutex::new(InFlight::default()),
            freed: Condvar::new(),
        }
    }

    /// Waits until one more request of `bytes` fits, then takes it. A request alone is always
    /// admitted, so a byte budget below the request cap cannot wedge the connection.
    pub(crate) fn acquire(&self, bytes: usize) -> Permit<'_> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while s.requests > 0
            && (s.requests >= self.max_requests || s.bytes + bytes > self.max_bytes)
        {
            s = self.freed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.requests += 1;
        s.bytes += bytes;
        Permit {
            budget: self,
            bytes,
        }
    }

    /// Requests in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .requests
    }
}

/// One request's share of the [`Budget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit<'b> {
    budget: &'b Budget,
    bytes: usize,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut s = self
            .budget
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        s.requests -= 1;
        s.bytes -= self.bytes;
        drop(s);
        self.budget.freed.notify_all();
    }
}

/// A validated request and what it carries: a WRITE's payload, read by the reader.
#[derive(Debug)]
#[allow(dead_code, reason = "the permit is held for its drop")]
pub(crate) struct Job<'b> {
    pub(crate) request: Request,
    pub(crate) payload: Vec<u8>,
    /// Held until the job is dropped, after its reply went out.
    pub(crate) permit: Permit<'b>,
}

/// What a worker needs to serve requests of one connection.
pub(crate) struct Server<'a> {
    pub(crate) export: &'a dyn BlockExport,
    pub(crate) stats: &'a StatCounters,
    pub(crate) replier: &'a Replier<'a>,
    /// The `base:allocation` context id, when the client selected it.
    pub(crate) allocation_context: Option<u32>,
    pub(crate) block_size: u32,
}

impl Server<'_> {
    /// Serves one job and sends its reply. `buf` is the worker's own READ buffer, reused.
    /// An error is the connection's end: the reply could not be sent.
    pub(crate) fn serve(&self, job: Job<'_>, buf: &mut Vec<u8>) -> Result<(), SessionError> {
        let r = job.request;
        let result = match r.command {
            proto::CMD_READ => return self.read(&r, buf),
            proto::CMD_BLOCK_STATUS => return self.block_status(&r),
            proto::CMD_WRITE => {
                let done = self.export.write_at(&job.payload, r.offset);
                if done.is_ok() {
                    self.stats
                        .bytes_written
                        .fetch_add(job.payload.len() as u64, Ordering::Relaxed);
                }
                done
            }
            _ => self.no_data(&r),
        };
        self.finish(&r, result)
    }

    /// FLUSH, TRIM and WRITE_ZEROES: commands with neither payload nor data.
    pub(crate) fn no_data(&self, r: &Request) -> io::Result<()> {
        let length = u64::from(r.length);
        match r.command {
            proto::CMD_FLUSH => self.export.flush(),
            proto::CMD_TRIM | proto::CMD_WRITE_ZEROES if length == 0 => Ok(()),
            proto::CMD_TRIM => self.export.trim(r.offset, length),
            proto::CMD_WRITE_ZEROES => {
                let may_trim = r.flags & proto::CMD_FLAG_NO_HOLE == 0;
                self.export.write_zeroes(r.offset, length, may_trim)
            }
            _ => unreachable!("the reader admits only known commands"),
        }
    }

    /// The reply of a command without data, after FUA's flush: "the server MUST NOT send a
    /// non-error reply until all data written by this command is on stable storage".
    pub(crate) fn finish(&self, r: &Request, result: io::Result<()>) -> Result<(), SessionError> {
        let fua = r.flags & proto::CMD_FLAG_FUA != 0;
        let result = match result {
            Ok(()) if fua && r.command != proto::CMD_FLUSH => self.export.flush(),
            other => other,
        };
        let error = match result {
            Ok(()) => 0,
            Err(e) => {
                device_error(r, &e);
                nbd_error(&e)
            }
        };
        self.replier.lock().done(r.handle, r.command, error)?;
        Ok(())
    }

    /// A READ of at most one chunk: read, then one reply with the data.
    fn read(&self, r: &Request, buf: &mut Vec<u8>) -> Result<(), SessionError> {
        let len = r.length as usize;
        if len == 0 {
            self.replier.lock().done(r.handle, r.command, 0)?;
            return Ok(());
        }
        buf.resize(HEADROOM + len, 0);
        if let Err(e) = self.export.read_at(&mut buf[HEADROOM..], r.offset) {
            device_error(r, &e);
            self.replier
                .lock()
                .done(r.handle, r.command, nbd_error(&e))?;
            return Ok(());
        }
        self.replier
            .lock()
            .read_data(r.handle, r.offset, buf, true, true)?;
        self.stats
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// BLOCK_STATUS for `base:allocation`: holes from the export, descriptors aligned to the
    /// block size (a hole shrinks to its aligned interior, so nothing is ever reported as a
    /// hole that is not one).
    fn block_status(&self, r: &Request) -> Result<(), SessionError> {
        let context = self
            .allocation_context
            .expect("the reader admits BLOCK_STATUS only with a context");
        let req_one = r.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let max_holes = if req_one { 1 } else { MAX_HOLES };
        let answer = self.export.holes(r.offset, u64::from(r.length), max_holes);
        let (holes, covered) = match answer {
            Ok(a) => a,
            Err(e) => {
                device_error(r, &e);
                self.replier
                    .lock()
                    .done(r.handle, r.command, nbd_error(&e))?;
                return Ok(());
            }
        };
        let mut descriptors = descriptors(r.offset, covered, &holes, u64::from(self.block_size));
        if descriptors.is_empty() {
            // Nothing described (cannot happen for a valid request): all data, as a fallback.
            descriptors.push(Descriptor {
                length: r.length,
                flags: 0,
            });
        }
        if req_one {
            descriptors.truncate(1);
        }
        self.replier
            .lock()
            .block_status(r.handle, context, &descriptors)?;
        Ok(())
    }
}

/// Descriptors covering `offset..end` from the holes in it: each hole shrinks to its
/// block-aligned interior, everything else is data, and neighbours of one kind merge.
pub(crate) fn descriptors(
    offset: u64,
    end: u64,
    holes: &[std::ops::Range<u64>],
    block: u64,
) -> Vec<Descriptor> {
    const HOLE: u32 = proto::STATE_HOLE | proto::STATE_ZERO;
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    let mut push = |start: u64, stop: u64, flags: u32| {
        if start >= stop {
            return;
        }
        match out.last_mut() {
            Some(last) if last.2 == flags && last.1 == start => last.1 = stop,
            _ => out.push((start, stop, flags)),
        }
    };
    let mut at = offset;
    for h in holes {
        let start = h.start.max(at).next_multiple_of(block);
        let stop = h.end.min(end) / block * block;
        if start >= stop {
            continue;
        }
        push(at, start, 0);
        push(start, stop, HOLE);
        at = stop;
    }
    push(at, end, 0);
    out.into_iter()
        .map(|(start, stop, flags)| Descriptor {
            length: u32::try_from(stop - start).expect("a request's range fits 32 bits"),
            flags,
        })
        .collect()
}

pub(crate) fn device_error(r: &Request, e: &io::Error) {
    tracing::debug!(
        command = proto::command_name(r.command),
        offset = r.offset,
        length = r.length,
        error = %e,
        "device request failed"
    );
}

/// The NBD error value for a device error (see [`BlockExport`]).
pub(crate) fn nbd_error(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EROFS | libc::EACCES) => proto::EPERM,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => proto::ENOSPC,
        Some(libc::EINVAL | libc::EOPNOTSUPP) => proto::EINVAL,
        Some(libc::ESHUTDOWN) => proto::ESHUTDOWN,
        Some(_) => proto::EIO,
        None if e.kind() == io::ErrorKind::Unsupported => proto::EINVAL,
        None if e.kind() == io::ErrorKind::InvalidInput => proto::EINVAL,
        None => proto::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_errors_map_to_nbd_errors() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(nbd_error(&os(libc::EROFS)), proto::EPERM);
        assert_eq!(nbd_error(&os(libc::EDQUOT)), proto::ENOSPC);
        assert_eq!(nbd_error(&os(libc::EFBIG)), proto::ENOSPC);
        assert_eq!(nbd_error(&os(libc::EINVAL)), proto::EINVAL);
        assert_eq!(nbd_error(&os(libc::EOPNOTSUPP)), proto::EINVAL);
        assert_eq!(nbd_error(&io::ErrorKind::Unsupported.into()), proto::EINVAL);
        assert_eq!(nbd_error(&os(libc::ESHUTDOWN)), proto::ESHUTDOWN);
        assert_eq!(nbd_error(&os(libc::ENOMEM)), proto::EIO);
        assert_eq!(nbd_error(&os(libc::EBADMSG)), proto::EIO);
        assert_eq!(nbd_error(&io::ErrorKind::UnexpectedEof.into()), proto::EIO);
    }

    fn d(length: u32, flags: u32) -> Descriptor {
        Descriptor { length, flags }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init, reason = "a list of one hole")]
    fn descriptors_shrink_holes_to_aligned_interiors() {
        const H: u32 = proto::STATE_HOLE | proto::STATE_ZERO;
        // No holes: one data run.
        assert_eq!(descriptors(0, 8192, &[], 512), vec![d(8192, 0)]);
        // An aligned hole in the middle.
        assert_eq!(
            descriptors(0, 8192, &[4096..6144], 512),
            vec![d(4096, 0), d(2048, H), d(2048, 0)]
        );
        // An unaligned hole keeps only its aligned interior; a hole smaller than a block is
        // data.
        assert_eq!(
            descriptors(0, 4096, &[100..2000], 512),
            vec![d(512, 0), d(1024, H), d(2560, 0)]
        );
        assert_eq!(descriptors(0, 4096, &[100..600], 512), vec![d(4096, 0)]);
        // Holes past the range are clipped; a range that starts inside a hole.
        assert_eq!(
            descriptors(1024, 3072, &[0..2048, 2560..9000], 512),
            vec![d(1024, H), d(512, 0), d(512, H)]
        );
        // A cut-short answer covers only up to `end`.
        assert_eq!(descriptors(0, 1024, &[0..1024], 512), vec![d(1024, H)]);
    }

    #[test]
    fn a_lone_request_is_admitted_whatever_its_size() {
        let b = Budget::new(2, 1000);
        let big = b.acquire(5000);
        assert_eq!(b.in_flight(), 1);
        drop(big);
        let one = b.acquire(600);
        let two = std::thread::scope(|s| {
            let waiter = s.spawn(|| b.acquire(600).bytes);
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(b.in_flight(), 1, "the second request waits for bytes");
            drop(one);
            waiter.join().unwrap()
        });
        assert_eq!(two, 600);
        assert_eq!(b.in_flight(), 0);
    }
}
