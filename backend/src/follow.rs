//! Devices follow their domain (issue 16 item 2): what the daemon does when a guest dies or
//! appears, on its own, as libxl does for the PV devices it knows.
//!
//! - A guest that xenstored no longer knows (`xl destroy`, a shutdown, the old domid of a
//!   reboot) has its backend directories removed once its devices let go
//!   ([`sweep_dead`]), so no entry of a dead domid stays behind.
//! - A guest that appears (`xl create`, the new domid of a reboot) gets the devices its
//!   name has in the device book ([`restore`], `admin::book`), with the devids it had.
//!
//! Both run when the daemon starts, so what happened while it was down is caught up too.

use std::collections::BTreeSet;

use xenvirtio_xenstore::{DomId, TxId, XenStore, XsError};

use crate::admin::{self, DeviceBook};

/// What [`restore`] did for one remembered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The domain.
    pub domid: DomId,
    /// Its name.
    pub name: String,
    /// The devid.
    pub devid: u32,
    /// Why it could not be attached again, if it could not.
    pub error: Option<String>,
}

/// Removes the backend directories under `/local/domain/<backend>/backend/virtio/` of every
/// frontend domain that is no longer alive, except those in `busy` (whose devices are still
/// letting go), and what is left of their frontend directories. Returns the domids swept.
pub fn sweep_dead(
    store: &dyn XenStore,
    backend: DomId,
    busy: &BTreeSet<DomId>,
) -> Result<Vec<DomId>, XsError> {
    let root = xenvirtio_xenstore::xenbus::backend_root(backend);
    let mut swept = Vec::new();
    for domid in admin::numeric_children::<DomId>(store, TxId::NONE, &root)? {
        if domid == backend || busy.contains(&domid) || store.is_domain_introduced(domid)? {
            continue;
        }
        // A reboot can give the name to a new domid before the old one is swept: only the
        // dead domid's own directories go.
        for dir in [
            format!("{root}/{domid}"),
            format!("/local/domain/{domid}/device/virtio"),
        ] {
            match store.rm(TxId::NONE, &dir) {
                Ok(()) => {}
                Err(e) if e.is_enoent() => {}
                Err(e) => return Err(e),
            }
        }
        tracing::info!(
            domid,
            "frontend domain is gone: removed its backend entries"
        );
        swept.push(domid);
    }
    Ok(swept)
}

/// Attaches, for every live domain with a name and a book, each remembered device that its
/// domid does not have yet. A device that cannot be attached (its image went missing, say) is
/// reported and the others still are.
pub fn restore(
    store: &dyn XenStore,
    book: &DeviceBook,
    backend: DomId,
) -> Result<Vec<Restored>, XsError> {
    let mut out = Vec::new();
    for domid in admin::numeric_children::<DomId>(store, TxId::NONE, "/local/domain")? {
        if domid == backend || !store.is_domain_introduced(domid)? {
            continue;
        }
        let Ok(Some(name)) = admin::domain_name(store, domid) else {
            continue;
        };
        let entries = match book.entries(&name) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(domid, name, error = %e, "cannot read the device book");
                continue;
            }
        };
        for entry in entries {
            let dir = xenvirtio_xenstore::xenbus::backend_dir(backend, domid, entry.devid);
            if store.exists(TxId::NONE, &dir)? {
                continue;
            }
            let result = entry
                .request(domid)
                .map_err(|e| e.to_string())
                .and_then(|req| admin::attach(store, &req).map_err(|e| e.to_string()));
            let error = result.err();
            match &error {
                None => tracing::info!(
                    domid,
                    name,
                    devid = entry.devid,
                    kind = entry.kind,
                    "attached a remembered device again"
                ),
                Some(e) => tracing::warn!(
                    domid,
                    name,
                    devid = entry.devid,
                    error = e,
                    "cannot attach a remembered device"
                ),
            }
            out.push(Restored {
                domid,
                name: name.clone(),
                devid: entry.devid,
                error,
            });
        }
    }
    Ok(out)
}
