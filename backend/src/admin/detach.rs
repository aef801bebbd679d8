//! `detach`: the toolstack's half of PROTOCOL.md 8.3, then removing both directories.
//!
//! Like `xl block-detach` since Xen 4.15, detach is safe by default: it asks the backend to
//! close (`online = 0`, `state = 5`), waits for Closed, and only then removes the directories,
//! so nothing is removed under a backend that still has the guest's memory mapped. A backend
//! that does not answer in time leaves the device in place (Closing, offline) and detach
//! fails, saying so; `force` removes it anyway. A backend that never got past Initialising, or
//! is Closed already, holds nothing of the guest: that device is removed at once.
//!
//! The backend directory is found from the domains and the devid, never from a key the guest
//! wrote: the frontend directory belongs to the guest.

use std::time::{Duration, Instant};

use xenvirtio_virtio::protocol::{backend_keys as bk, frontend_keys as fk};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{DomId, TxId, XenStore, XsError, transaction};

use super::{AdminError, DomainRef, TRANSACTION_ATTEMPTS, domid_of, own_domid, resolve_domain};

/// How long detach waits for the backend to reach Closed unless told otherwise (libxl's
/// `LIBXL_DESTROY_TIMEOUT` is 10 s too).
pub const DEFAULT_DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// What to detach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachRequest {
    /// The frontend domain.
    pub frontend: DomainRef,
    /// The backend domain; `None` is the domain we run in.
    pub backend: Option<DomainRef>,
    /// The devid.
    pub devid: u32,
    /// How long to wait for the backend to reach Closed.
    pub timeout: Duration,
    /// Remove the device even if the backend does not reach Closed in time.
    pub force: bool,
}

impl DetachRequest {
    /// A safe detach of `devid` of `frontend` with the default timeout.
    pub fn new(frontend: impl Into<DomainRef>, devid: u32) -> DetachRequest {
        DetachRequest {
            frontend: frontend.into(),
            backend: None,
            devid,
            timeout: DEFAULT_DETACH_TIMEOUT,
            force: false,
        }
    }
}

/// How the device went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The backend held nothing of the guest (its state was absent, Initialising or Closed):
    /// removed without asking it.
    Immediate {
        /// The backend state found, `None` if there was none.
        backend_state: Option<XenbusState>,
    },
    /// The backend reached Closed, then both directories were removed.
    Closed {
        /// How long that took.
        waited: Duration,
    },
    /// `force`: the backend did not reach Closed (or its state was unreadable) and the
    /// directories were removed anyway.
    Forced {
        /// The last backend state seen, or what went wrong reading it.
        last: String,
        /// How long detach waited (the request's timeout).
        timeout: Duration,
    },
    /// Someone else removed the backend directory while detach waited; what was left of the
    /// frontend directory was removed.
    RemovedMeanwhile,
    /// Only the frontend directory was left (its `backend` key named this backend's
    /// directory); it was removed.
    OrphanFrontend,
}

/// What [`detach`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachOutcome {
    /// The frontend domain.
    pub frontend: DomId,
    /// The backend domain.
    pub backend: DomId,
    /// The devid.
    pub devid: u32,
    /// The backend directory (removed).
    pub backend_dir: String,
    /// The frontend directory (removed).
    pub frontend_dir: String,
    /// How.
    pub removal: Removal,
}

/// What the first transaction decided.
enum Start {
    /// Already removed.
    Done(Removal),
    /// `online = 0` and `state = 5` are written: wait for Closed.
    Wait,
}

/// The device being detached.
struct Device<'a> {
    frontend: DomId,
    backend: DomId,
    devid: u32,
    /// Backend directory.
    be: &'a str,
    /// Frontend directory.
    fe: &'a str,
}

/// The first transaction: removes a device that holds nothing of the guest, or asks its
/// backend to close. The inner error is a refusal (nothing was changed).
fn begin(store: &dyn XenStore, tx: TxId, d: &Device) -> Result<Result<Start, AdminError>, XsError> {
    let (be, fe) = (d.be, d.fe);
    if !store.exists(tx, be)? {
        if !store.exists(tx, &format!("/local/domain/{}", d.frontend))? {
            return Ok(Err(AdminError::UnknownDomain { domid: d.frontend }));
        }
        let named = store
            .read_optional(tx, &format!("{fe}/{}", fk::BACKEND))?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        return Ok(match named {
            None if !store.exists(tx, fe)? => Err(AdminError::DeviceNotFound {
                frontend: d.frontend,
                devid: d.devid,
                backend: d.backend,
                backend_dir: be.to_owned(),
                frontend_dir: fe.to_owned(),
            }),
            Some(named) if named != be => Err(AdminError::OtherBackend {
                frontend: d.frontend,
                devid: d.devid,
                backend: d.backend,
                named: super::printable(&named, 200),
            }),
            // Ours, or a frontend directory without a `backend` key: an orphan.
            _ => {
                remove_device(store, tx, d)?;
                Ok(Start::Done(Removal::OrphanFrontend))
            }
        });
    }
    let state_path = xenbus::state_path(be);
    let state = store.read_optional(tx, &state_path)?;
    let parsed = state.as_deref().map(XenbusState::from_node_value);
    match parsed {
        None
        | Some(Some(XenbusState::Unknown | XenbusState::Initialising | XenbusState::Closed)) => {
            remove_device(store, tx, d)?;
            Ok(Ok(Start::Done(Removal::Immediate {
                backend_state: parsed.flatten(),
            })))
        }
        Some(_) => {
            store.write_str(tx, &format!("{be}/{}", bk::ONLINE), "0")?;
            store.write_str(tx, &state_path, &XenbusState::Closing.value().to_string())?;
            Ok(Ok(Start::Wait))
        }
    }
}

/// Detaches a device: see the module documentation for the steps and [`Removal`] for the
/// outcomes. Fails with [`AdminError::DeviceNotFound`] or [`AdminError::OtherBackend`] when
/// there is nothing of this backend's to remove, and with
/// [`AdminError::BackendDidNotClose`] when the backend does not answer and `force` is off.
pub fn detach(store: &dyn XenStore, req: &DetachRequest) -> Result<DetachOutcome, AdminError> {
    // A domid may name a guest that is gone: its backend directory is what is left to remove.
    let frontend = domid_of(store, &req.frontend)?;
    let backend = match &req.backend {
        Some(b) => resolve_domain(store, b)?,
        None => own_domid(store)?,
    };
    let devid = req.devid;
    let be = xenbus::backend_dir(backend, frontend, devid);
    let fe = xenbus::frontend_dir(frontend, devid);
    let state_path = xenbus::state_path(&be);
    let outcome = |removal| DetachOutcome {
        frontend,
        backend,
        devid,
        backend_dir: be.clone(),
        frontend_dir: fe.clone(),
        removal,
    };
    let what = format!("detaching virtio device {devid} of domain {frontend}");

    let device = Device {
        frontend,
        backend,
        devid,
        be: &be,
        fe: &fe,
    };
    let start = transaction(store, TRANSACTION_ATTEMPTS, |tx| begin(store, tx, &device))
        .map_err(AdminError::store(what.clone()))??;

    if let Start::Done(removal) = start {
        tracing::debug!(domid = frontend, devid, ?removal, "virtio device removed");
        return Ok(outcome(removal));
    }
    tracing::debug!(domid = frontend, devid, "asked the backend to close");

    let began = Instant::now();
    let end = wait_for_closed(store, &state_path, req.timeout).map_err(|e| AdminError::Store {
        what: format!("waiting for {state_path} to reach Closed"),
        source: e,
    })?;
    let removal = match end {
        WaitEnd::Closed => Removal::Closed {
            waited: began.elapsed(),
        },
        WaitEnd::Vanished => Removal::RemovedMeanwhile,
        WaitEnd::TimedOut { last } if !req.force => {
            return Err(AdminError::BackendDidNotClose {
                frontend,
                devid,
                last,
                timeout: req.timeout,
            });
        }
        WaitEnd::TimedOut { last } => Removal::Forced {
            last,
            timeout: req.timeout,
        },
    };
    transaction(store, TRANSACTION_ATTEMPTS, |tx| {
        remove_device(store, tx, &device)
    })
    .map_err(AdminError::store(what))?;
    tracing::debug!(domid = frontend, devid, ?removal, "virtio device removed");
    Ok(outcome(removal))
}

/// How waiting for Closed ended.
enum WaitEnd {
    /// The backend wrote Closed.
    Closed,
    /// The state node is gone: someone removed the backend directory.
    Vanished,
    /// Time ran out; `last` is the last state seen (or the invalid value, escaped).
    TimedOut { last: String },
}

/// Removes a watch when dropped.
struct Unwatch<'a> {
    store: &'a dyn XenStore,
    path: &'a str,
    token: &'a str,
}

impl Drop for Unwatch<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.unwatch(self.path, self.token) {
            tracing::debug!(path = self.path, error = %e, "removing the detach watch failed");
        }
    }
}

/// Waits, driven by a watch, until `state_path` holds Closed or disappears, for at most
/// `timeout`. Unlike [`xenbus::wait_for_state`], an absent node ends the wait: detach wrote
/// the node itself, so its absence means the directory was removed.
fn wait_for_closed(
    store: &dyn XenStore,
    state_path: &str,
    timeout: Duration,
) -> Result<WaitEnd, XsError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let token = format!(
        "xenvirtio-detach-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    // No deadline for a timeout too large to add: the wait is then as good as endless.
    let deadline = Instant::now().checked_add(timeout);
    let events = store.watch_events_for(&token)?;
    store.watch(state_path, &token)?;
    let _unwatch = Unwatch {
        store,
        path: state_path,
        token: &token,
    };
    loop {
        // Read after the watch is set, and after every event: no change can slip between.
        let last = match store.read_optional(TxId::NONE, state_path)? {
            None => return Ok(WaitEnd::Vanished),
            Some(v) => match XenbusState::from_node_value(&v) {
                Some(XenbusState::Closed) => return Ok(WaitEnd::Closed),
                Some(s) => s.to_string(),
                None => format!(
                    "invalid value {:?}",
                    super::printable(&String::from_utf8_lossy(&v), 32)
                ),
            },
        };
        let remaining = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
        if remaining.is_zero() || events.next_timeout(remaining)?.is_none() {
            return Ok(WaitEnd::TimedOut { last });
        }
        while events.try_next()?.is_some() {}
    }
}

/// Removes both directories (whichever exist), and the backend's per-frontend directory when
/// it is left empty.
fn remove_device(store: &dyn XenStore, tx: TxId, d: &Device) -> Result<(), XsError> {
    for dir in [d.be, d.fe] {
        if store.exists(tx, dir)? {
            store.rm(tx, dir)?;
        }
    }
    let per_frontend = format!("{}/{}", xenbus::backend_root(d.backend), d.frontend);
    match store.directory(tx, &per_frontend) {
        Ok(children) if children.is_empty() => store.rm(tx, &per_frontend),
        Ok(_) => Ok(()),
        Err(e) if e.is_enoent() => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{AttachRequest, attach};
    use std::sync::Arc;
    use xenvirtio_virtio::ids::DeviceKind;
    use xenvirtio_xenstore::{MemConnection, MemStore};

    const N: TxId = TxId::NONE;

    fn world() -> (MemStore, Arc<MemConnection>) {
        let daemon = MemStore::new();
        let dom0 = Arc::new(daemon.connect(0).unwrap());
        dom0.write(N, "/local/domain/0/domid", b"0").unwrap();
        daemon.start_guest(5).unwrap();
        daemon.start_guest(7).unwrap();
        (daemon, dom0)
    }

    fn rng(dom0: &MemConnection) -> (String, String) {
        let out = attach(dom0, &AttachRequest::new(5, DeviceKind::Rng)).unwrap();
        (out.backend_dir, out.frontend_dir)
    }

    fn gone(dom0: &MemConnection, dirs: &[&str]) -> bool {
        dirs.iter().all(|d| !dom0.exists(N, d).unwrap())
    }

    /// A backend that closes when asked, as PROTOCOL 8.3 says, on its own connection.
    fn backend_thread(daemon: &MemStore, be: String) -> std::thread::JoinHandle<()> {
        let conn = daemon.connect(0).unwrap();
        let events = conn.watch_events_for("be").unwrap();
        conn.watch(&format!("{be}/state"), "be").unwrap();
        std::thread::spawn(move || {
            loop {
                events
                    .next_timeout(Duration::from_secs(10))
                    .unwrap()
                    .unwrap();
                let state = conn.read(N, &format!("{be}/state")).unwrap();
                if state == b"5" {
                    assert_eq!(conn.read(N, &format!("{be}/online")).unwrap(), b"0");
                    std::thread::sleep(Duration::from_millis(100));
                    conn.write(N, &format!("{be}/state"), b"6").unwrap();
                    return;
                }
            }
        })
    }

    #[test]
    fn a_connected_device_is_removed_after_the_backend_closes() {
        let (daemon, dom0) = world();
        let (be, fe) = rng(&dom0);
        dom0.write(N, &format!("{be}/state"), b"4").unwrap();
        let backend = backend_thread(&daemon, be.clone());
        let out = detach(&*dom0, &DetachRequest::new(5, 0)).unwrap();
        backend.join().unwrap();
        assert!(
            matches!(out.removal, Removal::Closed { waited } if waited >= Duration::from_millis(50)),
            "{out:?}"
        );
        assert!(gone(&dom0, &[&be, &fe, "/local/domain/0/backend/virtio/5"]));
        assert!(dom0.exists(N, "/local/domain/0/backend/virtio").unwrap());
    }

    #[test]
    fn a_device_the_backend_never_took_is_removed_at_once() {
        let (_daemon, dom0) = world();
        let (be, fe) = rng(&dom0);
        let (be1, _) = rng(&dom0);
        let out = detach(&*dom0, &DetachRequest::new(5, 0)).unwrap();
        assert_eq!(
            out.removal,
            Removal::Immediate {
                backend_state: Some(XenbusState::Initialising)
            }
        );
        assert!(gone(&dom0, &[&be, &fe]));
        assert!(dom0.exists(N, &be1).unwrap(), "the other device stays");
        // Closed (an error left it there) and a missing state node: nothing to wait for.
        dom0.write(N, &format!("{be1}/state"), b"6").unwrap();
        let out = detach(&*dom0, &DetachRequest::new(5, 1)).unwrap();
        assert_eq!(
            out.removal,
            Removal::Immediate {
                backend_state: Some(XenbusState::Closed)
            }
        );
        let (be, _) = rng(&dom0);
        dom0.rm(N, &format!("{be}/state")).unwrap();
        let out = detach(&*dom0, &DetachRequest::new(5, 0)).unwrap();
        assert_eq!(
            out.removal,
            Removal::Immediate {
                backend_state: None
            }
        );
    }

    #[test]
    fn without_force_a_silent_backend_leaves_the_device_closing() {
        let (_daemon, dom0) = world();
        let (be, fe) = rng(&dom0);
        dom0.write(N, &format!("{be}/state"), b"4").unwrap();
        let mut req = DetachRequest::new(5, 0);
        req.timeout = Duration::from_millis(200);
        let start = Instant::now();
        let e = detach(&*dom0, &req).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(200));
        let msg = e.to_string();
        assert!(
            msg.contains("did not reach Closed")
                && msg.contains("Closing")
                && msg.contains("--force"),
            "{msg}"
        );
        assert_eq!(dom0.read(N, &format!("{be}/online")).unwrap(), b"0");
        assert_eq!(dom0.read(N, &format!("{be}/state")).unwrap(), b"5");
        assert!(dom0.exists(N, &fe).unwrap());

        // Forced: removed anyway, saying what the backend was doing.
        req.force = true;
        let out = detach(&*dom0, &req).unwrap();
        assert!(
            matches!(&out.removal, Removal::Forced { last, .. } if last.contains("Closing")),
            "{out:?}"
        );
        assert!(gone(&dom0, &[&be, &fe]));
    }

    #[test]
    fn force_with_zero_timeout_does_not_wait() {
        let (_daemon, dom0) = world();
        let (be, fe) = rng(&dom0);
        dom0.write(N, &format!("{be}/state"), b"4").unwrap();
        let mut req = DetachRequest::new(5, 0);
        req.timeout = Duration::ZERO;
        req.force = true;
        let out = detach(&*dom0, &req).unwrap();
        assert!(matches!(out.removal, Removal::Forced { .. }), "{out:?}");
        assert!(gone(&dom0, &[&be, &fe]));
    }

    #[test]
    fn unknown_devices_and_other_backends_are_refused() {
        let (_daemon, dom0) = world();
        let e = detach(&*dom0, &DetachRequest::new(5, 3)).unwrap_err();
        assert!(
            e.to_string()
                .contains("domain 5 has no virtio device 3 served by domain 0"),
            "{e}"
        );
        let e = detach(&*dom0, &DetachRequest::new(8, 0)).unwrap_err();
        assert!(matches!(e, AdminError::UnknownDomain { domid: 8 }), "{e}");

        // A device of backend 7: refused for backend 0, detached for 7.
        let mut req = AttachRequest::new(5, DeviceKind::Rng);
        req.backend = Some(DomainRef::Id(7));
        let out = attach(&*dom0, &req).unwrap();
        let e = detach(&*dom0, &DetachRequest::new(5, 0)).unwrap_err();
        assert!(
            matches!(&e, AdminError::OtherBackend { named, .. } if named == &out.backend_dir),
            "{e}"
        );
        assert!(dom0.exists(N, &out.frontend_dir).unwrap(), "left alone");
        let mut det = DetachRequest::new(5, 0);
        det.backend = Some(DomainRef::Id(7));
        detach(&*dom0, &det).unwrap();
        assert!(gone(&dom0, &[&out.backend_dir, &out.frontend_dir]));
    }

    #[test]
    fn the_leftovers_of_a_destroyed_guest_are_detached_by_domid() {
        let (daemon, dom0) = world();
        let (be, fe) = rng(&dom0);
        dom0.write(N, &format!("{be}/state"), b"6").unwrap();
        daemon.destroy_domain(5);
        assert!(!dom0.exists(N, "/local/domain/5").unwrap());
        assert!(
            dom0.exists(N, &be).unwrap(),
            "the backend directory is Dom0's"
        );
        let out = detach(&*dom0, &DetachRequest::new(5, 0)).unwrap();
        assert!(matches!(out.removal, Removal::Immediate { .. }), "{out:?}");
        assert!(gone(&dom0, &[&be, &fe]));
        let e = detach(&*dom0, &DetachRequest::new(5, 0)).unwrap_err();
        assert!(matches!(e, AdminError::UnknownDomain { domid: 5 }), "{e}");
    }

    #[test]
    fn an_orphan_frontend_directory_is_cleaned_up() {
        let (_daemon, dom0) = world();
        let (be, fe) = rng(&dom0);
        dom0.rm(N, &be).unwrap();
        let out = detach(&*dom0, &DetachRequest::new(5, 0)).unwrap();
        assert_eq!(out.removal, Removal::OrphanFrontend);
        assert!(gone(&dom0, &[&fe]));
    }

    #[test]
    fn the_guest_cannot_redirect_detach_to_another_directory() {
        let (daemon, dom0) = world();
        let (be, fe) = rng(&dom0);
        let victim = dom0
            .write(N, "/local/domain/0/backend/virtio/7/0/state", b"4")
            .map(|()| "/local/domain/0/backend/virtio/7/0");
        let victim = victim.unwrap();
        // The guest owns its frontend directory and points it at another guest's device.
        let guest = daemon.connect(5).unwrap();
        guest
            .write(N, &format!("{fe}/backend"), victim.as_bytes())
            .unwrap();
        detach(&*dom0, &DetachRequest::new(5, 0)).unwrap();
        assert!(gone(&dom0, &[&be, &fe]));
        assert!(
            dom0.exists(N, victim).unwrap(),
            "the other device is untouched"
        );
    }

    #[test]
    fn a_directory_removed_while_waiting_ends_the_wait() {
        let (daemon, dom0) = world();
        let (be, fe) = rng(&dom0);
        dom0.write(N, &format!("{be}/state"), b"4").unwrap();
        let other = daemon.connect(0).unwrap();
        let remover = {
            let be = be.clone();
            let events = other.watch_events_for("w").unwrap();
            other.watch(&format!("{be}/state"), "w").unwrap();
            std::thread::spawn(move || {
                loop {
                    events
                        .next_timeout(Duration::from_secs(10))
                        .unwrap()
                        .unwrap();
                    if other.read(N, &format!("{be}/state")).unwrap() == b"5" {
                        other.rm(N, &be).unwrap();
                        return;
                    }
                }
            })
        };
        let out = detach(&*dom0, &DetachRequest::new(5, 0)).unwrap();
        remover.join().unwrap();
        assert_eq!(out.removal, Removal::RemovedMeanwhile);
        assert!(gone(&dom0, &[&be, &fe]));
    }
}
