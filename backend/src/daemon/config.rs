//! What the daemon is told: its configuration, and the domains trusted with `direct`.

use std::path::PathBuf;
use std::time::Duration;

use xenvirtio_xen::DomId;
use xenvirtio_xenstore::{TxId, XenStore};

/// Where the daemon listens by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/xenvirtio/backend.sock";
/// How long a restarted backend waits for a frontend to answer a reset (8.5).
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connected frontends to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A frontend domain named on the command line, by id or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainSelector {
    /// A domid.
    Id(DomId),
    /// A domain name (`/local/domain/<id>/name`).
    Name(String),
}

impl std::str::FromStr for DomainSelector {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<DomId>() {
            Ok(id) => DomainSelector::Id(id),
            Err(_) => DomainSelector::Name(s.to_owned()),
        })
    }
}

impl DomainSelector {
    /// Whether `domid` is this domain (a name is looked up in xenstore).
    pub fn matches(&self, store: &dyn XenStore, domid: DomId) -> bool {
        match self {
            DomainSelector::Id(id) => *id == domid,
            DomainSelector::Name(name) => store
                .read_string(TxId::NONE, &format!("/local/domain/{domid}/name"))
                .is_ok_and(|n| n.trim() == name),
        }
    }
}

/// How the daemon behaves.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Frontend domains trusted with `direct` (section 10.5; also needs Dom0 and
    /// `grant_usage = 0`).
    pub allow_direct: Vec<DomainSelector>,
    /// `max-queue-size` offered (a power of two, at most 1024).
    pub max_queue_size: u32,
    /// `max-persistent-grants` per device (0: no persistent grants).
    pub max_persistent_grants: u32,
    /// Pages all devices of one frontend domain may have mapped together
    /// (`max-pages-per-domain`, issue 13 finding 3).
    pub max_pages_per_domain: u64,
    /// The control socket (`None`: no socket, e.g. in tests).
    pub control_socket: Option<PathBuf>,
    /// 8.5: how long to wait for a frontend to answer a reset after a restart.
    pub restart_timeout: Duration,
    /// How long shutdown waits for connected frontends to close.
    pub shutdown_grace: Duration,
    /// The state directory whose device book (`admin::book`) gives a domain that appears
    /// its remembered devices (`None`: nothing is restored, e.g. in the loopback pair).
    pub state_dir: Option<PathBuf>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            allow_direct: Vec::new(),
            max_queue_size: 1024,
            max_persistent_grants: 1024,
            max_pages_per_domain: crate::budget::DEFAULT_MAX_PAGES_PER_DOMAIN,
            control_socket: None,
            restart_timeout: RESTART_TIMEOUT,
            shutdown_grace: SHUTDOWN_GRACE,
            state_dir: None,
        }
    }
}
