//! The loopback pair: the real backend daemon as Dom0 and real frontends as other domains, in
//! one process, over the loopback hypervisor (`LoopbackXen`) and the in-memory xenstore
//! (`MemStore`).
//!
//! This module owns the world both ends live in: domains created in the hypervisor and the
//! store together (and destroyed together), the daemon's lifecycle (start, stop, restart), the
//! toolstack's calls (the real [`admin::attach`] and [`admin::detach`]), a [`Frontend`] acting
//! as a given domain, and the question "what does the backend still hold of this domain".
//! It never plays either end's part of the protocol itself and never touches shared memory:
//! every key, grant, mapping and event goes through the daemon, `admin` and `Frontend`.

use std::sync::Arc;

use crate::counters::HypervisorCounts;
use xenvirtio_backend::admin::{
    self, AdminError, AttachOutcome, AttachRequest, DetachOutcome, DetachRequest,
};
use xenvirtio_backend::daemon::{Daemon, DaemonConfig, DaemonError, DaemonHandle, RunningDaemon};
use xenvirtio_backend::stats::DeviceStats;
use xenvirtio_frontend::Frontend;
use xenvirtio_xen::DomId;
use xenvirtio_xen::loopback::{DomainStats, LoopbackConfig, LoopbackDomain, LoopbackXen};
use xenvirtio_xen::role::DomainRole;
use xenvirtio_xenstore::{MemStore, TxId, XenStore, XsError};

/// The backend's domain: the loopback daemon plays Dom0.
pub const BACKEND_DOMID: DomId = 0;

/// Why the pair could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The in-memory xenstore refused an operation (only a bug can cause this).
    #[error("the in-memory xenstore refused {what}")]
    Store {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: XsError,
    },
    /// The backend daemon could not start.
    #[error("the backend daemon could not start")]
    DaemonStart(#[source] DaemonError),
    /// The backend daemon ended with an error when it was stopped.
    #[error("the backend daemon failed")]
    DaemonFailed(#[source] DaemonError),
}

fn store_err(what: impl Into<String>) -> impl FnOnce(XsError) -> PairError {
    let what = what.into();
    move |source| PairError::Store { what, source }
}

/// What the backend (Dom0) still holds of one frontend domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Pages of the domain that other domains map right now (grant and foreign mappings),
    /// as the hypervisor counts them.
    pub pages_mapped_by_peers: usize,
    /// Live mappings Dom0 made of the domain's memory, from the hypervisor's records.
    pub live_mappings: usize,
    /// Devices of the domain the daemon still knows.
    pub devices: usize,
    /// Event-channel ports the daemon has bound for them.
    pub ports: u64,
    /// Pages the daemon has mapped for them (rings, pool, persistent grants, direct chunks).
    pub resident_pages: u64,
}

impl Holdings {
    /// Whether nothing of the domain is mapped or bound by the backend.
    pub fn is_nothing(&self) -> bool {
        self.pages_mapped_by_peers == 0
            && self.live_mappings == 0
            && self.ports == 0
            && self.resident_pages == 0
    }
}

/// The pair's world: hypervisor, store, daemon (see the module documentation).
pub struct Pair {
    hv: LoopbackXen,
    xs: MemStore,
    toolstack: Arc<dyn XenStore>,
    config: DaemonConfig,
    daemon: Option<RunningDaemon>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("daemon_running", &self.daemon.is_some())
            .finish_non_exhaustive()
    }
}

impl Pair {
    /// A hypervisor with `loopback`, a store holding Dom0's home (with the `domid` key the
    /// toolstack reads), and the backend daemon running as Dom0 with `daemon`.
    pub fn start(loopback: LoopbackConfig, daemon: DaemonConfig) -> Result<Pair, PairError> {
        let hv = LoopbackXen::with_config(loopback);
        let xs = MemStore::new();
        let toolstack: Arc<dyn XenStore> = Arc::new(
            xs.connect(BACKEND_DOMID)
                .map_err(store_err("a connection for Dom0"))?,
        );
        let home = format!("/local/domain/{BACKEND_DOMID}");
        toolstack
            .write_str(TxId::NONE, &format!("{home}/domid"), "0")
            .map_err(store_err(format!("writing {home}/domid")))?;
        toolstack
            .write_str(TxId::NONE, &format!("{home}/name"), "Domain-0")
            .map_err(store_err(format!("writing {home}/name")))?;
        let mut pair = Pair {
            hv,
            xs,
            toolstack,
            config: daemon,
            daemon: None,
        };
        pair.start_daemon()?;
        Ok(pair)
    }

    /// The loopback hypervisor (its records and per-domain counters).
    pub fn hypervisor(&self) -> &LoopbackXen {
        &self.hv
    }

    /// The in-memory xenstore.
    pub fn store(&self) -> &MemStore {
        &self.xs
    }

    /// Dom0's xenstore connection, as the toolstack uses it.
    pub fn toolstack(&self) -> &dyn XenStore {
        &*self.toolstack
    }

    /// The daemon's configuration.
    pub fn daemon_config(&self) -> &DaemonConfig {
        &self.config
    }

    /// Creates guest `domid` as a toolstack would: in the hypervisor, with a home in xenstore
    /// that it owns, named `name`, and introduced. Dom0 always exists; asking for it (or for a
    /// guest that exists) does nothing.
    pub fn add_guest(&self, domid: DomId, name: &str) -> Result<(), PairError> {
        if domid == BACKEND_DOMID {
            return Ok(());
        }
        let alive = self
            .toolstack
            .is_domain_introduced(domid)
            .map_err(store_err(format!("asking about domain {domid}")))?;
        if !alive {
            self.xs
                .start_guest(domid)
                .map_err(store_err(format!("creating domain {domid}")))?;
            self.toolstack
                .write_str(TxId::NONE, &format!("/local/domain/{domid}/name"), name)
                .map_err(store_err(format!("naming domain {domid}")))?;
        }
        self.hv.domain(domid);
        Ok(())
    }

    /// A frontend acting as `role.domid` (the domain must exist, see [`Pair::add_guest`]),
    /// with its own xenstore connection.
    pub fn frontend(&self, role: DomainRole) -> Result<Frontend<LoopbackDomain>, PairError> {
        let domid = role.domid;
        let store: Arc<dyn XenStore> = Arc::new(
            self.xs
                .connect(domid)
                .map_err(store_err(format!("a connection for domain {domid}")))?,
        );
        Ok(Frontend::new(self.hv.domain(domid), store, role))
    }

    /// `xenvirtio-backend attach`, as Dom0's toolstack.
    pub fn attach(&self, req: &AttachRequest) -> Result<AttachOutcome, AdminError> {
        admin::attach(&*self.toolstack, req)
    }

    /// `xenvirtio-backend detach`, as Dom0's toolstack (it waits for the backend's Closed).
    pub fn detach(&self, req: &DetachRequest) -> Result<DetachOutcome, AdminError> {
        admin::detach(&*self.toolstack, req)
    }

    /// The running daemon's handle (`None` while it is stopped).
    pub fn daemon(&self) -> Option<&DaemonHandle> {
        self.daemon.as_ref().map(RunningDaemon::handle)
    }

    /// One device's statistics from the daemon.
    pub fn device_stats(&self, frontend: DomId, devid: u32) -> Option<DeviceStats> {
        self.daemon().and_then(|d| d.device(frontend, devid))
    }

    /// Starts the daemon (again) as Dom0, on a new xenstore connection. Starting a running
    /// daemon does nothing.
    pub fn start_daemon(&mut self) -> Result<(), PairError> {
        if self.daemon.is_some() {
            return Ok(());
        }
        let store: Arc<dyn XenStore> = Arc::new(
            self.xs
                .connect(BACKEND_DOMID)
                .map_err(store_err("a connection for the daemon"))?,
        );
        let daemon = Daemon::new(self.hv.domain(BACKEND_DOMID), store, self.config.clone())
            .map_err(PairError::DaemonStart)?
            .spawn()
            .map_err(PairError::DaemonStart)?;
        self.daemon = Some(daemon);
        Ok(())
    }

    /// Stops the daemon: every device goes through Closing (waiting at most the configured
    /// shutdown grace for its frontend), then the daemon's thread ends.
    pub fn stop_daemon(&mut self) -> Result<(), PairError> {
        match self.daemon.take() {
            Some(d) => d.stop().map_err(PairError::DaemonFailed),
            None => Ok(()),
        }
    }

    /// The domain dies: the hypervisor destroys it (its grants become unmappable, its ports
    /// close) and xenstored releases it (its nodes go, `@releaseDomain` fires).
    pub fn destroy_domain(&self, domid: DomId) {
        self.hv.destroy(domid);
        self.xs.destroy_domain(domid);
    }

    /// What the hypervisor says `domid` holds (grants, mappings, ports, pages).
    pub fn domain_stats(&self, domid: DomId) -> DomainStats {
        self.hv.stats(domid)
    }

    /// What the backend still holds of `frontend`: the hypervisor's count of its pages mapped
    /// by peers and Dom0's live mapping records, and the daemon's devices of that domain.
    pub fn backend_holdings(&self, frontend: DomId) -> Holdings {
        let live_mappings = HypervisorCounts::read(&self.hv, frontend).live as usize;
        let mut h = Holdings {
            pages_mapped_by_peers: self.hv.stats(frontend).pages_mapped_by_peers,
            live_mappings,
            ..Holdings::default()
        };
        if let Some(d) = self.daemon() {
            for dev in d.stats().devices.iter().filter(|d| d.domid == frontend) {
                h.devices += 1;
                h.ports += dev.ports;
                h.resident_pages += dev.resident_pages;
            }
        }
        h
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Err(e) = self.stop_daemon() {
            tracing::warn!(error = %e, "stopping the loopback daemon failed");
        }
    }
}
