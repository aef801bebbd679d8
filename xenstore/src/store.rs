//! The [`XenStore`] trait: the operations a toolstack, a backend and a PV frontend need, and
//! the transaction guard and retry helper built on them.
//!
//! The trait is object-safe so that daemons hold `Arc<dyn XenStore>` and unit tests swap the
//! real client for [`MemStore`](crate::MemStore). It says nothing about transports; both
//! implementations follow the real daemon's semantics, errors included.

use std::fmt;

use crate::error::XsError;
use crate::perms::{DomId, Perm};
use crate::watch::WatchEvents;

/// A transaction id. [`TxId::NONE`] (0) means "outside any transaction".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TxId(pub u32);

impl TxId {
    /// Outside any transaction.
    pub const NONE: TxId = TxId(0);

    /// Whether this is a real transaction.
    pub fn is_some(self) -> bool {
        self != TxId::NONE
    }
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A connection to xenstore, as one domain sees it.
///
/// Paths are absolute (`/local/domain/5/...`), special (`@releaseDomain`) or relative to the
/// connection's domain home (`/local/domain/<self>`). Values are bytes, never assumed UTF-8.
/// Every method is callable from several threads at once.
pub trait XenStore: Send + Sync {
    /// Reads a node's value.
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError>;

    /// Writes a node, creating it and any missing parents.
    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError>;

    /// Creates a node with an empty value (nothing happens if it exists).
    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XsError>;

    /// Removes a node and everything under it. Removing an absent node whose parent exists
    /// succeeds.
    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError>;

    /// Lists a node's children, in creation order. Listings over one message are fetched in
    /// parts transparently.
    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError>;

    /// A node's permissions: owner and default first.
    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Perm>, XsError>;

    /// Replaces a node's permissions (only its owner or a privileged domain may).
    fn set_perms(&self, tx: TxId, path: &str, perms: &[Perm]) -> Result<(), XsError>;

    /// Watches a path and everything under it. The daemon fires one event right away.
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError>;

    /// Removes a watch.
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError>;

    /// Starts a transaction.
    fn transaction_start(&self) -> Result<TxId, XsError>;

    /// Ends a transaction: commits it if `commit`, else aborts it. A commit that conflicts
    /// fails with EAGAIN; retry the whole transaction (see [`transaction`]).
    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XsError>;

    /// The home path of a domain (`/local/domain/<domid>`).
    fn get_domain_path(&self, domid: DomId) -> Result<String, XsError>;

    /// Whether a domain is introduced to xenstored, i.e. alive (privileged).
    fn is_domain_introduced(&self, domid: DomId) -> Result<bool, XsError>;

    /// Drops every watch and transaction of this connection.
    fn reset_watches(&self) -> Result<(), XsError>;

    /// The connection's queue of watch events (every token without a private queue).
    fn watch_events(&self) -> WatchEvents;

    /// A private queue for the events of one token: while a handle on it is alive, events
    /// with that token go there instead of to [`watch_events`](Self::watch_events).
    fn watch_events_for(&self, token: &str) -> Result<WatchEvents, XsError>;

    /// Reads a node, `None` if it does not exist.
    fn read_optional(&self, tx: TxId, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        match self.read(tx, path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_enoent() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether a node exists (and is readable).
    fn exists(&self, tx: TxId, path: &str) -> Result<bool, XsError> {
        Ok(self.read_optional(tx, path)?.is_some())
    }

    /// Reads a node whose value must be UTF-8.
    fn read_string(&self, tx: TxId, path: &str) -> Result<String, XsError> {
        let v = self.read(tx, path)?;
        String::from_utf8(v).map_err(|e| XsError::BadValue {
            path: path.to_owned(),
            value: crate::wire::shorten(&String::from_utf8_lossy(e.as_bytes())),
            expected: "UTF-8 text",
        })
    }

    /// Writes a string value.
    fn write_str(&self, tx: TxId, path: &str, value: &str) -> Result<(), XsError> {
        self.write(tx, path, value.as_bytes())
    }
}

/// A transaction that is aborted when dropped unless it was committed.
#[must_use = "a transaction is aborted when dropped; call commit()"]
pub struct Transaction<'a> {
    store: &'a dyn XenStore,
    id: TxId,
    finished: bool,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("id", &self.id)
            .field("finished", &self.finished)
            .finish()
    }
}

impl<'a> Transaction<'a> {
    /// Starts a transaction on `store`.
    pub fn start(store: &'a dyn XenStore) -> Result<Transaction<'a>, XsError> {
        let id = store.transaction_start()?;
        Ok(Transaction {
            store,
            id,
            finished: false,
        })
    }

    /// The id to pass to the store's operations.
    pub fn id(&self) -> TxId {
        self.id
    }

    /// Commits. EAGAIN means another writer got in first: run the transaction again.
    pub fn commit(mut self) -> Result<(), XsError> {
        self.finished = true;
        self.store.transaction_end(self.id, true)
    }

    /// Aborts explicitly (dropping does the same, ignoring errors).
    pub fn abort(mut self) -> Result<(), XsError> {
        self.finished = true;
        self.store.transaction_end(self.id, false)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.store.transaction_end(self.id, false) {
                tracing::debug!(tx = self.id.0, error = %e, "aborting a dropped transaction failed");
            }
        }
    }
}

/// Runs `f` in a transaction and commits it, running it again (in a new transaction) when
/// the commit or an operation hits EAGAIN, at most `max_attempts` times in all (at least
/// once). Any other error aborts and is returned as is; running out of attempts is
/// [`XsError::TransactionRetriesExhausted`].
pub fn transaction<T>(
    store: &dyn XenStore,
    max_attempts: u32,
    mut f: impl FnMut(TxId) -> Result<T, XsError>,
) -> Result<T, XsError> {
    let attempts = max_attempts.max(1);
    for attempt in 1..=attempts {
        let tx = Transaction::start(store)?;
        let id = tx.id();
        match f(id) {
            Ok(value) => match tx.commit() {
                Ok(()) => return Ok(value),
                Err(e) if e.is_eagain() => {
                    tracing::debug!(tx = id.0, attempt, "transaction conflicted, retrying");
                }
                Err(e) => return Err(e),
            },
            Err(e) if e.is_eagain() => {
                tracing::debug!(
                    tx = id.0,
                    attempt,
                    "operation in transaction hit EAGAIN, retrying"
                );
                drop(tx);
            }
            Err(e) => return Err(e),
        }
    }
    Err(XsError::TransactionRetriesExhausted { attempts })
}
