//! What `attach` is asked for: the request and its option types, and the checks that need no
//! I/O (options against the device type).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::net::{self, MacAddr};
use xenvirtio_virtio::protocol::MAX_QUEUES;

use super::super::{AdminError, DomainRef};

/// Queues of a console device (receiveq and transmitq of port 0, PROTOCOL 10.3).
const CONSOLE_QUEUES: u32 = 2;
/// Queues of an rng device (PROTOCOL 10.4).
const RNG_QUEUES: u32 = 1;
/// Queues of a net device (receiveq1 and transmitq1, PROTOCOL 10.6).
const NET_QUEUES: u32 = 2;
/// The bridge a net device's TAP joins when none is named: xl's default.
pub const DEFAULT_BRIDGE: &str = "xenbr0";

/// The options of a net device (refused for other types).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetOptions {
    /// The guest's MAC address; `None` draws one under the Xen OUI, as xl does.
    pub mac: Option<MacAddr>,
    /// The bridge the TAP joins ([`DEFAULT_BRIDGE`] when `None`).
    pub bridge: Option<String>,
    /// The MTU (1500 when `None`).
    pub mtu: Option<u16>,
    /// The TAP's name (`xvn<domid>.<devid>` when `None`).
    pub vifname: Option<String>,
    /// Frames go to this `SOCK_SEQPACKET` socket instead of a TAP.
    pub socket: Option<PathBuf>,
}

impl NetOptions {
    /// The options given, as on the command line.
    fn given(&self) -> Vec<&'static str> {
        [
            ("--mac", self.mac.is_some()),
            ("--bridge", self.bridge.is_some()),
            ("--mtu", self.mtu.is_some()),
            ("--vifname", self.vifname.is_some()),
            ("--socket", self.socket.is_some()),
        ]
        .into_iter()
        .filter_map(|(o, g)| g.then_some(o))
        .collect()
    }

    /// Checks the values (no I/O).
    fn check(&self) -> Result<(), AdminError> {
        let bad = |option, reason: String| Err(AdminError::BadNetOption { option, reason });
        if let Some(m) = self.mac {
            if m.is_multicast() || m.is_zero() {
                return bad(
                    "--mac",
                    format!(
                        "{m} is a group or empty address; a NIC needs a unicast one (first byte even)"
                    ),
                );
            }
        }
        if let Some(mtu) = self.mtu {
            if !(net::MIN_MTU..=net::MAX_MTU).contains(&mtu) {
                return bad(
                    "--mtu",
                    format!("{mtu} is outside {} to {}", net::MIN_MTU, net::MAX_MTU),
                );
            }
        }
        for (option, name) in [("--bridge", &self.bridge), ("--vifname", &self.vifname)] {
            if let Some(n) = name {
                if !xenvirtio_tap::valid_name(n) {
                    return bad(
                        option,
                        format!(
                            "'{n}' is not an interface name (1 to {} of a-z, A-Z, 0-9, '.', '-', '_')",
                            xenvirtio_tap::MAX_NAME
                        ),
                    );
                }
            }
        }
        if self.socket.is_some() {
            if let Some(o) = ["--bridge", "--vifname"]
                .into_iter()
                .find(|o| self.given().contains(o))
            {
                return bad(
                    o,
                    "is for a TAP; with --socket the frames go to the socket instead".to_owned(),
                );
            }
        }
        Ok(())
    }
}

/// A MAC address under the Xen OUI with three random bytes, as xl draws one for a `vif`.
pub fn random_mac() -> MacAddr {
    let mut tail = [0u8; 3];
    // Entropy is best effort here: a failed getrandom leaves the time's low bits.
    if crate::rng::fill_random(&mut tail).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        tail.copy_from_slice(&t.to_le_bytes()[..3]);
    }
    MacAddr::xen(tail)
}

/// The `dma` key: a strategy the operator pins for the device, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmaSetting {
    /// The frontend's role policy chooses.
    #[default]
    Auto,
    /// Only this strategy is accepted.
    Pinned(DmaStrategy),
}

impl FromStr for DmaSetting {
    type Err = AdminError;

    fn from_str(s: &str) -> Result<DmaSetting, AdminError> {
        if s == "auto" {
            return Ok(DmaSetting::Auto);
        }
        DmaStrategy::ALL
            .iter()
            .copied()
            .find(|d| d.name() == s)
            .map(DmaSetting::Pinned)
            .ok_or_else(|| AdminError::BadDmaSetting(s.to_owned()))
    }
}

impl fmt::Display for DmaSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaSetting::Auto => f.write_str("auto"),
            DmaSetting::Pinned(s) => f.write_str(s.name()),
        }
    }
}

/// Where a console device's port 0 goes (the `console` key).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleOutput {
    /// A pty the backend opens and publishes in `tty`.
    #[default]
    Pty,
    /// A unix socket at this path.
    Socket(PathBuf),
}

impl FromStr for ConsoleOutput {
    type Err = AdminError;

    fn from_str(s: &str) -> Result<ConsoleOutput, AdminError> {
        let bad = |reason| AdminError::BadConsoleSpec {
            text: s.to_owned(),
            reason,
        };
        if s == "pty" {
            return Ok(ConsoleOutput::Pty);
        }
        match s.strip_prefix("socket:") {
            Some("") => Err(bad("socket: needs a path (socket:/run/guest1.sock)")),
            Some(path) => Ok(ConsoleOutput::Socket(PathBuf::from(path))),
            None => Err(bad("write pty or socket:<path>")),
        }
    }
}

impl fmt::Display for ConsoleOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleOutput::Pty => f.write_str("pty"),
            ConsoleOutput::Socket(p) => write!(f, "socket:{}", p.display()),
        }
    }
}

/// What to attach: the options of `xenvirtio-backend attach`, validated by [`attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    /// The frontend domain (the guest).
    pub frontend: DomainRef,
    /// The backend domain; `None` is the domain we run in.
    pub backend: Option<DomainRef>,
    /// The device type.
    pub kind: DeviceKind,
    /// blk: the image file or block device (required for blk, refused otherwise).
    pub image: Option<PathBuf>,
    /// blk: attach read-only (`mode = r`).
    pub readonly: bool,
    /// A devid to use; `None` picks the smallest free one.
    pub devid: Option<u32>,
    /// Number of queues: blk 1 to `MAX_QUEUES`; console and net only 2; rng only 1.
    pub queues: Option<u32>,
    /// The `dma` key.
    pub dma: DmaSetting,
    /// console: where port 0 goes (`pty` when `None`); refused for other types.
    pub console: Option<ConsoleOutput>,
    /// blk: take no image lock and check no other attachment of the image (`force-share`).
    pub force_share: bool,
    /// net: the address, bridge, MTU and host side.
    pub net: NetOptions,
}

impl AttachRequest {
    /// A request for a device of `kind` for `frontend`, everything else default.
    pub fn new(frontend: impl Into<DomainRef>, kind: DeviceKind) -> AttachRequest {
        AttachRequest {
            frontend: frontend.into(),
            backend: None,
            kind,
            image: None,
            readonly: false,
            devid: None,
            queues: None,
            dma: DmaSetting::Auto,
            console: None,
            force_share: false,
            net: NetOptions::default(),
        }
    }

    /// A blk device over `image`.
    pub fn blk(frontend: impl Into<DomainRef>, image: impl Into<PathBuf>) -> AttachRequest {
        AttachRequest {
            image: Some(image.into()),
            ..AttachRequest::new(frontend, DeviceKind::Block)
        }
    }

    /// Checks the options against the device type (no I/O).
    pub(super) fn check_options(&self) -> Result<(), AdminError> {
        let kind = self.kind;
        let not_for = |option, for_kind| AdminError::OptionNotForKind {
            option,
            for_kind,
            kind,
        };
        if kind == DeviceKind::Block && self.image.is_none() {
            return Err(AdminError::ImageRequired);
        }
        let mut only: Vec<(&'static str, DeviceKind)> = Vec::new();
        for (option, given) in [
            ("--image", self.image.is_some()),
            ("--readonly", self.readonly),
            ("--force-share", self.force_share),
        ] {
            if given {
                only.push((option, DeviceKind::Block));
            }
        }
        if self.console.is_some() {
            only.push(("--console", DeviceKind::Console));
        }
        only.extend(self.net.given().into_iter().map(|o| (o, DeviceKind::Net)));
        if let Some((option, for_kind)) = only.into_iter().find(|(_, k)| *k != kind) {
            return Err(not_for(option, for_kind));
        }
        if kind == DeviceKind::Net {
            self.net.check()?;
        }
        if let Some(requested) = self.queues {
            let (ok, allowed) = match kind {
                DeviceKind::Block => ((1..=MAX_QUEUES).contains(&requested), {
                    format!("1 to {MAX_QUEUES}")
                }),
                DeviceKind::Console => (requested == CONSOLE_QUEUES, "exactly 2".to_owned()),
                DeviceKind::Rng => (requested == RNG_QUEUES, "exactly 1".to_owned()),
                DeviceKind::Net => (requested == NET_QUEUES, "exactly 2".to_owned()),
            };
            if !ok {
                return Err(AdminError::QueuesOutOfRange {
                    kind,
                    allowed,
                    requested,
                });
            }
        }
        Ok(())
    }
}
