//! Which kind of Xen domain this process runs in.
//!
//! [`DomainRole::detect`] reads what Linux exposes and returns one plain struct; the DMA
//! strategy policy (elsewhere) is a pure function of it. It reads:
//! - `/sys/hypervisor/type`: must be `xen`, otherwise [`RoleError::NotXen`];
//! - whether this is Dom0: `/proc/xen/capabilities` contains `control_d`. That file only exists
//!   once xenfs is mounted on `/proc/xen`, which a guest often does not do (xenfs needs the
//!   xen-privcmd module, which minimal guests do not load). Without it, bit `XENFEAT_dom0` (11)
//!   of `/sys/hypervisor/properties/features` says the same thing: Xen sets it for the hardware
//!   domain, and Linux derives `control_d` from it on Arm and PVH (systemd's `detect_vm_xen_dom0`
//!   reads the same two files). Only when neither is readable is the role an error;
//! - `/sys/hypervisor/guest_type`: `PV`, `PVH` or `HVM` (arm64 guests report `HVM`, even for
//!   xl `type="pvh"`);
//! - `/sys/hypervisor/version/{major,minor,extra}`.
//!
//! The architecture is the one this program was built for. The domain id is a parameter: it
//! lives in xenstore, which this crate does not speak. [`DomainRole::detect_in`] takes the
//! filesystem root, so tests run against a fake tree. Nothing here panics or needs privileges.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::platform::DomId;

/// Why the role could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// This is not a Xen guest (or the kernel does not say so).
    #[error("not running on Xen: {detail}")]
    NotXen {
        /// What was found instead.
        detail: String,
    },
    /// Neither `/proc/xen/capabilities` (xenfs is not mounted) nor the feature bits of
    /// `/sys/hypervisor/properties/features` say whether this is Dom0.
    #[error(
        "cannot tell whether this is Dom0: {path} is missing and {features} is unreadable; \
         mount xenfs first (mount -t xenfs xenfs /proc/xen)"
    )]
    XenfsNotMounted {
        /// The capabilities file looked for.
        path: PathBuf,
        /// The feature-bits file looked for.
        features: PathBuf,
    },
    /// A file that Xen guests have could not be read.
    #[error("cannot read {path}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file held something unexpected.
    #[error("unexpected contents {value:?} in {path}")]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// What it held.
        value: String,
    },
    /// This program was built for an architecture xenvirtio does not support.
    #[error("unsupported architecture {arch}; xenvirtio runs on x86_64 and aarch64")]
    UnsupportedArch {
        /// The architecture, as Rust names it.
        arch: &'static str,
    },
}

/// The virtualization mode of the domain, as `/sys/hypervisor/guest_type` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestType {
    /// Paravirtualized (x86 only): the guest's frame numbers are not machine frames.
    Pv,
    /// PVH: hardware-virtualized memory, PV devices, no emulated devices.
    Pvh,
    /// HVM; also what every arm64 guest reports.
    Hvm,
}

impl GuestType {
    /// Parses the kernel's spelling (`PV`, `PVH`, `HVM`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "PV" => Some(GuestType::Pv),
            "PVH" => Some(GuestType::Pvh),
            "HVM" => Some(GuestType::Hvm),
            _ => None,
        }
    }
}

impl fmt::Display for GuestType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestType::Pv => "PV",
            GuestType::Pvh => "PVH",
            GuestType::Hvm => "HVM",
        })
    }
}

/// The CPU architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// x86_64.
    X86_64,
    /// arm64.
    Aarch64,
}

impl Arch {
    /// The architecture this program was built for.
    pub fn current() -> Result<Self, RoleError> {
        match std::env::consts::ARCH {
            "x86_64" => Ok(Arch::X86_64),
            "aarch64" => Ok(Arch::Aarch64),
            arch => Err(RoleError::UnsupportedArch { arch }),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        })
    }
}

/// The hypervisor's version, e.g. 4.17 with extra `.5`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct XenVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// The rest, as Xen spells it (usually starting with a dot: `.5`, `.3-pre`).
    pub extra: String,
}

impl fmt::Display for XenVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}{}", self.major, self.minor, self.extra)
    }
}

/// What kind of domain this is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainRole {
    /// This domain's id (from xenstore).
    pub domid: DomId,
    /// Whether this is the control domain.
    pub is_dom0: bool,
    /// PV, PVH or HVM.
    pub guest_type: GuestType,
    /// The CPU architecture.
    pub arch: Arch,
    /// The hypervisor's version.
    pub xen_version: XenVersion,
}

impl DomainRole {
    /// Detects the role of this domain, whose id the caller read from xenstore.
    pub fn detect(domid: DomId) -> Result<Self, RoleError> {
        Self::detect_in(Path::new("/"), domid)
    }

    /// Detects the role from the `sys/` and `proc/` trees under `root`.
    pub fn detect_in(root: &Path, domid: DomId) -> Result<Self, RoleError> {
        let hv = root.join("sys/hypervisor");
        let kind = match std::fs::read_to_string(hv.join("type")) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RoleError::NotXen {
                    detail: format!("{} does not exist", hv.join("type").display()),
                });
            }
            Err(source) => {
                return Err(RoleError::Unreadable {
                    path: hv.join("type"),
                    source,
                });
            }
        };
        if kind.trim() != "xen" {
            return Err(RoleError::NotXen {
                detail: format!("the hypervisor is {:?}", kind.trim()),
            });
        }

        let is_dom0 = detect_dom0(root, &hv)?;

        let gt_path = hv.join("guest_type");
        let gt = read(&gt_path)?;
        let guest_type = GuestType::parse(&gt).ok_or_else(|| RoleError::Unexpected {
            path: gt_path,
            value: gt.trim().into(),
        })?;

        let version = hv.join("version");
        let xen_version = XenVersion {
            major: read_number(&version.join("major"))?,
            minor: read_number(&version.join("minor"))?,
            extra: read(&version.join("extra"))?.trim().to_owned(),
        };
        Ok(Self {
            domid,
            is_dom0,
            guest_type,
            arch: Arch::current()?,
            xen_version,
        })
    }
}

/// `XENFEAT_dom0` in `xen/include/public/features.h`: set by Xen for the hardware domain.
const XENFEAT_DOM0: u32 = 11;

/// Whether this is Dom0: from `/proc/xen/capabilities` when xenfs is mounted, else from the
/// `XENFEAT_dom0` bit of `/sys/hypervisor/properties/features` (see the module documentation).
fn detect_dom0(root: &Path, hv: &Path) -> Result<bool, RoleError> {
    let caps_path = root.join("proc/xen/capabilities");
    match std::fs::read_to_string(&caps_path) {
        Ok(caps) => {
            return Ok(caps
                .split(|c: char| c == ',' || c.is_whitespace())
                .any(|w| w == "control_d"));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(RoleError::Unreadable {
                path: caps_path,
                source,
            });
        }
    }
    let features_path = hv.join("properties/features");
    let Ok(features) = std::fs::read_to_string(&features_path) else {
        return Err(RoleError::XenfsNotMounted {
            path: caps_path,
            features: features_path,
        });
    };
    let bits = parse_feature_submap(&features).ok_or_else(|| RoleError::Unexpected {
        path: features_path,
        value: features.trim().into(),
    })?;
    Ok(bits & (1 << XENFEAT_DOM0) != 0)
}

/// Submap 0 of the feature bits, which Linux prints as hex without `0x`, one 8-digit group per
/// submap with the highest submap first (`%08x` each): the last 8 digits are submap 0.
fn parse_feature_submap(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let low = &s[s.len().saturating_sub(8)..];
    u32::from_str_radix(low, 16).ok()
}

fn read(path: &Path) -> Result<String, RoleError> {
    std::fs::read_to_string(path).map_err(|source| RoleError::Unreadable {
        path: path.to_owned(),
        source,
    })
}

fn read_number(path: &Path) -> Result<u32, RoleError> {
    let s = read(path)?;
    s.trim().parse().map_err(|_| RoleError::Unexpected {
        path: path.to_owned(),
        value: s.trim().into(),
    })
}

impl fmt::Display for DomainRole {
    /// One line, e.g. `domid=0 dom0 x86_64 PV xen-4.17.5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "domid={} {} {} {} xen-{}",
            self.domid,
            if self.is_dom0 { "dom0" } else { "domU" },
            self.arch,
            self.guest_type,
            self.xen_version
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake root with the files a Xen guest has.
    fn fake(guest_type: &str, caps: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let w = |rel: &str, s: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, s).unwrap();
        };
        w("sys/hypervisor/type", "xen\n");
        w("sys/hypervisor/guest_type", guest_type);
        w("sys/hypervisor/version/major", "4\n");
        w("sys/hypervisor/version/minor", "17\n");
        w("sys/hypervisor/version/extra", ".5\n");
        if let Some(c) = caps {
            w("proc/xen/capabilities", c);
        } else {
            std::fs::create_dir_all(dir.path().join("proc/xen")).unwrap();
        }
        dir
    }

    #[test]
    fn dom0_pv_is_detected_and_printed_on_one_line() {
        let root = fake("PV\n", Some("control_d\n"));
        let role = DomainRole::detect_in(root.path(), 0).unwrap();
        assert!(role.is_dom0);
        assert_eq!(role.guest_type, GuestType::Pv);
        assert_eq!(
            role.xen_version,
            XenVersion {
                major: 4,
                minor: 17,
                extra: ".5".into()
            }
        );
        let arch = Arch::current().unwrap();
        assert_eq!(
            role.to_string(),
            format!("domid=0 dom0 {arch} PV xen-4.17.5")
        );
    }

    #[test]
    fn domu_types_are_detected() {
        for (gt, want) in [
            ("PVH", GuestType::Pvh),
            ("HVM\n", GuestType::Hvm),
            ("PV", GuestType::Pv),
        ] {
            let root = fake(gt, Some(""));
            let role = DomainRole::detect_in(root.path(), 7).unwrap();
            assert!(!role.is_dom0);
            assert_eq!(role.guest_type, want);
            assert!(role.to_string().starts_with("domid=7 domU "), "{role}");
        }
    }

    #[test]
    fn not_xen_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = DomainRole::detect_in(dir.path(), 0).unwrap_err();
        assert!(matches!(e, RoleError::NotXen { .. }), "{e:?}");
        assert!(e.to_string().starts_with("not running on Xen"), "{e}");
        std::fs::create_dir_all(dir.path().join("sys/hypervisor")).unwrap();
        std::fs::write(dir.path().join("sys/hypervisor/type"), "kvm\n").unwrap();
        let e = DomainRole::detect_in(dir.path(), 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "not running on Xen: the hypervisor is \"kvm\""
        );
    }

    #[test]
    fn without_xenfs_or_features_the_error_says_how_to_mount_it() {
        let root = fake("PVH", None);
        let e = DomainRole::detect_in(root.path(), 1).unwrap_err();
        assert!(matches!(e, RoleError::XenfsNotMounted { .. }));
        assert!(
            e.to_string().contains("mount -t xenfs xenfs /proc/xen"),
            "{e}"
        );
    }

    /// A guest without xenfs (the e2e DomUs): the XENFEAT_dom0 bit decides. The values are
    /// what Xen 4.17.7 reports, measured by the real-Xen smoke run: Dom0 x86 PV 000228f0,
    /// Dom0 arm64 00026805; DomUs x86 PV 000220f0, x86 PVH 00012305, arm64 00016005.
    #[test]
    fn without_xenfs_the_feature_bits_decide() {
        let set = |features: &str| {
            let root = fake("HVM", None);
            let p = root.path().join("sys/hypervisor/properties");
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("features"), features).unwrap();
            DomainRole::detect_in(root.path(), 3)
        };
        for dom0 in ["000228f0\n", "00026805\n"] {
            assert!(set(dom0).unwrap().is_dom0, "{dom0}");
        }
        for domu in ["000220f0\n", "00012305\n", "00016005\n"] {
            assert!(!set(domu).unwrap().is_dom0, "{domu}");
        }
        assert!(
            !set("ffffffff00000000").unwrap().is_dom0,
            "only submap 0 counts"
        );
        assert!(matches!(set("xyz"), Err(RoleError::Unexpected { .. })));
        assert!(matches!(set(""), Err(RoleError::Unexpected { .. })));
    }

    /// When both exist, capabilities wins (it is what the kernel itself decided).
    #[test]
    fn capabilities_win_over_feature_bits() {
        let root = fake("PV", Some("control_d\n"));
        let p = root.path().join("sys/hypervisor/properties");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("features"), "00000000\n").unwrap();
        assert!(DomainRole::detect_in(root.path(), 0).unwrap().is_dom0);
    }

    #[test]
    fn odd_contents_are_reported() {
        let root = fake("XYZ", Some(""));
        let e = DomainRole::detect_in(root.path(), 1).unwrap_err();
        assert!(e.to_string().contains("\"XYZ\""), "{e}");
        let root = fake("PV", Some(""));
        std::fs::write(root.path().join("sys/hypervisor/version/minor"), "x").unwrap();
        assert!(matches!(
            DomainRole::detect_in(root.path(), 1),
            Err(RoleError::Unexpected { .. })
        ));
    }

    /// On this host (no Xen) detection fails cleanly.
    #[test]
    fn the_real_host_gives_a_result_or_a_clean_error() {
        match DomainRole::detect(0) {
            Ok(role) => assert!(role.to_string().starts_with("domid=0 ")),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
