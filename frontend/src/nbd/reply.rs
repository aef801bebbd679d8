//! Transmission replies: simple and structured, written by whichever thread finished a request.
//!
//! Requests are served out of order, so replies of one connection come from several threads.
//! [`Replier`] owns the connection's write side behind a mutex: one reply (or, for a READ sent
//! in chunks, one reply's whole sequence of messages) is written under one lock, so messages
//! never interleave on the wire. A READ's data is sent from the caller's buffer with its header
//! written into the [`HEADROOM`] bytes in front of it, so data is never copied again.
//!
//! With structured replies negotiated ("Structured reply chunk message"), every READ is answered
//! with structured chunks (`NBD_REPLY_TYPE_OFFSET_DATA`, errors as `NBD_REPLY_TYPE_ERROR` or
//! `NBD_REPLY_TYPE_ERROR_OFFSET`) and BLOCK_STATUS with `NBD_REPLY_TYPE_BLOCK_STATUS`; the other
//! commands keep simple replies, which the protocol allows.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::conn::{ConnError, ServerConn};
use super::proto::{self, SimpleReply};
use super::server::StatCounters;

/// Bytes kept free in front of READ data for the largest header that precedes it: a structured
/// chunk header and the offset of `NBD_REPLY_TYPE_OFFSET_DATA`.
pub(crate) const HEADROOM: usize = STRUCTURED_HEADER_LEN + 8;

/// Length of a structured reply chunk's header: magic, flags, type, handle, length.
const STRUCTURED_HEADER_LEN: usize = 20;

/// One block status descriptor: a run of `length` bytes with the same `base:allocation` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub(crate) length: u32,
    pub(crate) flags: u32,
}

/// The write side of one connection, shared by the request reader and the workers.
pub(crate) struct Replier<'s> {
    conn: Mutex<ServerConn<'s>>,
    structured: bool,
    stats: &'s StatCounters,
}

impl std::fmt::Debug for Replier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replier")
            .field("structured", &self.structured)
            .finish_non_exhaustive()
    }
}

impl<'s> Replier<'s> {
    pub(crate) fn new(conn: ServerConn<'s>, structured: bool, stats: &'s StatCounters) -> Self {
        Replier {
            conn: Mutex::new(conn),
            structured,
            stats,
        }
    }

    /// Locks the write side for one reply.
    pub(crate) fn lock(&self) -> ReplyGuard<'_, 's> {
        ReplyGuard {
            conn: self.conn.lock().unwrap_or_else(PoisonError::into_inner),
            structured: self.structured,
            stats: self.stats,
        }
    }

    /// Closes the socket (both directions, for the reader too): used when a reply cannot be
    /// completed and the connection must end.
    pub(crate) fn close(&self) {
        self.lock().conn.close();
    }
}

/// The locked write side: every message of one reply goes out under one guard.
pub(crate) struct ReplyGuard<'r, 's> {
    conn: MutexGuard<'r, ServerConn<'s>>,
    structured: bool,
    stats: &'r StatCounters,
}

impl ReplyGuard<'_, '_> {
    /// The final reply of a request that carries no data: success, or `error`. For a READ or
    /// BLOCK_STATUS under structured replies the error is an `NBD_REPLY_TYPE_ERROR` chunk (the
    /// protocol forbids a simple reply to a READ then); otherwise a simple reply.
    pub(crate) fn done(&mut self, handle: u64, command: u16, error: u32) -> Result<(), ConnError> {
        if error != 0 {
            self.stats.request_errors.fetch_add(1, Ordering::Relaxed);
        }
        let needs_chunk = matches!(command, proto::CMD_READ | proto::CMD_BLOCK_STATUS);
        if !(self.structured && needs_chunk) {
            return self.conn.write_all(&SimpleReply { error, handle }.encode());
        }
        if error == 0 {
            // A zero-length READ: no data, one NONE chunk ends the reply.
            return self.conn.write_all(&chunk_header(
                handle,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                0,
            ));
        }
        let mut m = Vec::with_capacity(STRUCTURED_HEADER_LEN + 6);
        m.extend_from_slice(&chunk_header(
            handle,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR,
            6,
        ));
        m.extend_from_slice(&error.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes()); // no message
        self.conn.write_all(&m)
    }

    /// Sends READ data: `buf[HEADROOM..]` holds the bytes read at `offset`, and the header is
    /// written into the headroom. `last` ends the reply (the only message of a simple reply;
    /// the chunk with `NBD_REPLY_FLAG_DONE` of a structured one). Under simple replies only
    /// the first message of a reply carries a header: pass `first` accordingly.
    pub(crate) fn read_data(
        &mut self,
        handle: u64,
        offset: u64,
        buf: &mut [u8],
        first: bool,
        last: bool,
    ) -> Result<(), ConnError> {
        let data_len = buf.len() - HEADROOM;
        if !self.structured {
            if !first {
                return self.conn.write_all(&buf[HEADROOM..]);
            }
            let start = HEADROOM - proto::SIMPLE_REPLY_LEN;
            buf[start..HEADROOM].copy_from_slice(&SimpleReply { error: 0, handle }.encode());
            return self.conn.write_all(&buf[start..]);
        }
        let flags = if last { proto::REPLY_FLAG_DONE } else { 0 };
        let length = u32::try_from(8 + data_len).expect("READ chunks are at most the request cap");
        buf[..STRUCTURED_HEADER_LEN].copy_from_slice(&chunk_header(
            handle,
            flags,
            proto::REPLY_TYPE_OFFSET_DATA,
            length,
        ));
        buf[STRUCTURED_HEADER_LEN..HEADROOM].copy_from_slice(&offset.to_be_bytes());
        self.conn.write_all(buf)
    }

    /// Whether a READ that fails after its first message can still be answered (structured
    /// replies: an error chunk) rather than only by dropping the connection (simple replies).
    pub(crate) fn can_fail_late(&self) -> bool {
        self.structured
    }

    /// Ends a structured READ whose data at `offset` could not be read, after earlier chunks
    /// went out: `NBD_REPLY_TYPE_ERROR_OFFSET` with `NBD_REPLY_FLAG_DONE`.
    pub(crate) fn read_failed_at(
        &mut self,
        handle: u64,
        offset: u64,
        error: u32,
    ) -> Result<(), ConnError> {
        debug_assert!(self.structured);
        self.stats.request_errors.fetch_add(1, Ordering::Relaxed);
        let mut m = Vec::with_capacity(STRUCTURED_HEADER_LEN + 14);
        m.extend_from_slice(&chunk_header(
            handle,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR_OFFSET,
            14,
        ));
        m.extend_from_slice(&error.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        self.conn.write_all(&m)
    }

    /// The reply to BLOCK_STATUS: one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for `context`.
    pub(crate) fn block_status(
        &mut self,
        handle: u64,
        context: u32,
        descriptors: &[Descriptor],
    ) -> Result<(), ConnError> {
        debug_assert!(self.structured);
        let length = 4 + 8 * descriptors.len();
        let mut m = Vec::with_capacity(STRUCTURED_HEADER_LEN + length);
        m.extend_from_slice(&chunk_header(
            handle,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_BLOCK_STATUS,
            u32::try_from(length).expect("descriptors are capped"),
        ));
        m.extend_from_slice(&context.to_be_bytes());
        for d in descriptors {
            m.extend_from_slice(&d.length.to_be_bytes());
            m.extend_from_slice(&d.flags.to_be_bytes());
        }
        self.conn.write_all(&m)
    }
}

fn chunk_header(handle: u64, flags: u16, kind: u16, length: u32) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut h = [0u8; STRUCTURED_HEADER_LEN];
    h[0..4].copy_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..20].copy_from_slice(&length.to_be_bytes());
    h
}
