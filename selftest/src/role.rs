//! The `role` check: what `DomainRole::detect` says about this domain, printed and asserted
//! against what the caller expects (the e2e scripts know which domain they run in).
//!
//! It also reports the raw evidence for "is this Dom0": `/proc/xen/capabilities` (only with
//! xenfs mounted) and the `XENFEAT_dom0` bit of `/sys/hypervisor/properties/features`, and
//! fails if both exist and disagree, because detection falls back on the second when the first
//! is missing.

use std::path::Path;

use anyhow::{Context, Result};
use xenvirtio_xen::DomId;
use xenvirtio_xen::role::{Arch, DomainRole, GuestType};
use xenvirtio_xenstore::{TxId, XenStore};

use crate::report::Report;

/// What the caller expects.
#[derive(Debug, Clone)]
pub struct RoleExpect {
    /// Whether this is Dom0.
    pub dom0: bool,
    /// The guest type.
    pub guest_type: GuestType,
    /// The architecture.
    pub arch: Arch,
    /// `major.minor` of the hypervisor, if given (e.g. "4.17").
    pub xen: Option<String>,
    /// The domain's name in xenstore (`name` in its home), if given.
    pub name: Option<String>,
}

/// What xenstore says about this domain.
#[derive(Debug)]
pub struct Identity {
    /// `domid` of its home.
    pub domid: DomId,
    /// `name` of its home, or why it could not be read.
    pub name: Result<String>,
}

/// Reads this domain's id and name from its xenstore home.
pub fn identity(store: &dyn XenStore) -> Result<Identity> {
    Ok(Identity {
        domid: own_domid(store)?,
        name: store
            .read_string(TxId::NONE, "name")
            .context("reading this domain's name (xenstore node `name`)"),
    })
}

/// This domain's id, as xenstore says (the `domid` node of its home).
pub fn own_domid(store: &dyn XenStore) -> Result<DomId> {
    let v = store
        .read_string(TxId::NONE, "domid")
        .context("reading this domain's id (xenstore node `domid`)")?;
    v.trim()
        .parse()
        .with_context(|| format!("the `domid` node holds {v:?}"))
}

/// Detects the role under `root` (`/` on a real domain) and checks it against `expect`.
pub fn run(root: &Path, who: &Identity, expect: &RoleExpect, report: &mut Report) {
    let domid = who.domid;
    let role = match DomainRole::detect_in(root, domid) {
        Ok(r) => r,
        Err(e) => {
            report.fail("role-detect", format!("{:#}", anyhow::Error::from(e)));
            return;
        }
    };
    let evidence = Evidence::read(root);
    report.pass("role-detect", format!("{role}; {evidence}"));

    let want = if expect.dom0 { "dom0" } else { "domU" };
    let got = if role.is_dom0 { "dom0" } else { "domU" };
    report.check(
        "role-dom0",
        role.is_dom0 == expect.dom0 && (domid == 0) == expect.dom0,
        format!("{got} with domid {domid}, expected {want}"),
    );
    if let (Some(caps), Some(feat)) = (evidence.control_d, evidence.xenfeat_dom0) {
        report.check(
            "role-dom0-evidence",
            caps == feat,
            format!("capabilities control_d={caps}, XENFEAT_dom0={feat}: they must agree"),
        );
    }
    report.check(
        "role-guest-type",
        role.guest_type == expect.guest_type,
        format!("{}, expected {}", role.guest_type, expect.guest_type),
    );
    report.check(
        "role-arch",
        role.arch == expect.arch,
        format!("{}, expected {}", role.arch, expect.arch),
    );
    if let Some(xen) = &expect.xen {
        let got = format!("{}.{}", role.xen_version.major, role.xen_version.minor);
        report.check(
            "role-xen-version",
            &got == xen,
            format!("Xen {}, expected {xen}", role.xen_version),
        );
    }
    if let Some(want) = &expect.name {
        match &who.name {
            Ok(name) => report.check(
                "role-name",
                name == want,
                format!("xenstore names domain {domid} {name:?}, expected {want:?}"),
            ),
            Err(e) => report.fail("role-name", format!("{e:#}")),
        }
    }
}

/// The two sources of "is this Dom0", as found.
#[derive(Debug, Default)]
struct Evidence {
    /// `control_d` in `/proc/xen/capabilities`; `None` without xenfs.
    control_d: Option<bool>,
    /// Bit 11 of the features file; `None` if unreadable.
    xenfeat_dom0: Option<bool>,
    /// The features file as read.
    features: Option<String>,
}

impl Evidence {
    fn read(root: &Path) -> Self {
        let control_d = std::fs::read_to_string(root.join("proc/xen/capabilities"))
            .ok()
            .map(|c| c.split([',', ' ', '\n']).any(|w| w == "control_d"));
        let features = std::fs::read_to_string(root.join("sys/hypervisor/properties/features"))
            .ok()
            .map(|f| f.trim().to_owned());
        let xenfeat_dom0 = features.as_deref().and_then(|f| {
            let low = &f[f.len().saturating_sub(8)..];
            u32::from_str_radix(low, 16)
                .ok()
                .map(|b| b & (1 << 11) != 0)
        });
        Self {
            control_d,
            xenfeat_dom0,
            features,
        }
    }
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.control_d {
            Some(c) => write!(f, "capabilities: control_d={c}")?,
            None => write!(f, "no /proc/xen/capabilities (xenfs not mounted)")?,
        }
        match &self.features {
            Some(feat) => write!(f, ", features {feat}"),
            None => write!(f, ", no features file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::report::Sink;

    fn root(guest_type: &str, caps: Option<&str>, features: Option<&str>) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xv-role-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let w = |rel: &str, s: &str| {
            let p = dir.join(rel);
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
        }
        if let Some(f) = features {
            w("sys/hypervisor/properties/features", f);
        }
        dir
    }
    use std::path::PathBuf;

    fn check(root: &Path, domid: DomId, expect: &RoleExpect) -> (String, usize) {
        let sink = Sink::default();
        let mut r = Report::to(Box::new(sink.clone()));
        let who = Identity {
            domid,
            name: if domid == 0 {
                Ok("Domain-0".into())
            } else {
                Err(anyhow::anyhow!("no name"))
            },
        };
        run(root, &who, expect, &mut r);
        let failed = r.failed();
        (sink.text(), failed)
    }

    #[test]
    fn expectations_are_asserted() {
        let arch = Arch::current().unwrap();
        let dom0 = root("PV\n", Some("control_d\n"), Some("00000805\n"));
        let expect = RoleExpect {
            dom0: true,
            guest_type: GuestType::Pv,
            arch,
            xen: Some("4.17".into()),
            name: Some("Domain-0".into()),
        };
        let (text, failed) = check(&dom0, 0, &expect);
        assert_eq!(failed, 0, "{text}");
        assert!(text.contains("PASS role-dom0-evidence "), "{text}");

        let domu = root("PVH\n", None, Some("00000005\n"));
        let (text, failed) = check(&domu, 0, &expect);
        assert_eq!(failed, 2, "dom0 and the guest type are wrong:\n{text}");
        let expect_domu = RoleExpect {
            dom0: false,
            guest_type: GuestType::Pvh,
            name: None,
            ..expect.clone()
        };
        let (text, failed) = check(&domu, 3, &expect_domu);
        assert_eq!(failed, 0, "{text}");
        let named = RoleExpect {
            name: Some("domU-pvh".into()),
            ..expect_domu.clone()
        };
        let (text, failed) = check(&domu, 3, &named);
        assert!(text.contains("FAIL role-name no name"), "{text}");
        assert_eq!(failed, 1, "{text}");
        assert!(
            !text.contains("role-dom0-evidence"),
            "only one source: {text}"
        );

        let lying = root("PV\n", Some("control_d\n"), Some("00000000\n"));
        let (text, _) = check(&lying, 0, &expect);
        assert!(text.contains("FAIL role-dom0-evidence "), "{text}");
        for d in [dom0, domu, lying] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
