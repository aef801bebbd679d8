//! The frontend roles the loopback pair can play, so the role policy runs without Xen.
//!
//! This module owns the mapping from a role's name on the command line (`--role x86-pvh`) to
//! the [`DomainRole`] a real domain of that kind would detect, and which domid plays it. It
//! never decides a DMA strategy: the frontend's policy does, from this role, exactly as it
//! would on Xen.

use std::fmt;

use xenvirtio_xen::DomId;
use xenvirtio_xen::role::{Arch, DomainRole, GuestType, XenVersion};

/// The domid of the frontend domain when it is not Dom0.
pub const GUEST_DOMID: DomId = 1;

/// A kind of frontend domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum RoleName {
    /// The frontend runs in Dom0 itself, next to the backend (domid 0): bounce by default,
    /// `direct` refused.
    Dom0,
    /// An x86 PV guest (domid 1): grant by default, `direct` refused.
    #[value(name = "x86-pv")]
    X86Pv,
    /// An x86 PVH guest (domid 1): grant by default; every strategy allowed here, since the
    /// loopback backend is Dom0 and trusts this guest with `direct`.
    #[value(name = "x86-pvh")]
    X86Pvh,
    /// An arm64 guest (domid 1): `direct` by default with a trusted Dom0 backend.
    #[value(name = "arm-domu")]
    ArmDomU,
}

impl RoleName {
    /// Every role, in the order `--help` lists them.
    pub const ALL: [RoleName; 4] = [
        RoleName::Dom0,
        RoleName::X86Pv,
        RoleName::X86Pvh,
        RoleName::ArmDomU,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            RoleName::Dom0 => "dom0",
            RoleName::X86Pv => "x86-pv",
            RoleName::X86Pvh => "x86-pvh",
            RoleName::ArmDomU => "arm-domu",
        }
    }

    /// The domain that plays this role.
    pub fn domid(self) -> DomId {
        match self {
            RoleName::Dom0 => 0,
            _ => GUEST_DOMID,
        }
    }

    /// What a domain of this kind would detect on Xen 4.17. Dom0 takes the architecture of
    /// this host (x86_64 if it is neither); arm64 guests report HVM, as on real Xen.
    pub fn role(self) -> DomainRole {
        let (is_dom0, guest_type, arch) = match self {
            RoleName::Dom0 => (
                true,
                GuestType::Pvh,
                Arch::current().unwrap_or(Arch::X86_64),
            ),
            RoleName::X86Pv => (false, GuestType::Pv, Arch::X86_64),
            RoleName::X86Pvh => (false, GuestType::Pvh, Arch::X86_64),
            RoleName::ArmDomU => (false, GuestType::Hvm, Arch::Aarch64),
        };
        DomainRole {
            domid: self.domid(),
            is_dom0,
            guest_type,
            arch,
            xen_version: XenVersion {
                major: 4,
                minor: 17,
                extra: "-loopback".into(),
            },
        }
    }
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn every_role_parses_from_its_name_and_plays_the_right_domain() {
        for r in RoleName::ALL {
            assert_eq!(RoleName::from_str(r.name(), false), Ok(r));
            let role = r.role();
            assert_eq!(role.domid, r.domid());
            assert_eq!(role.is_dom0, r == RoleName::Dom0);
            assert_eq!(role.is_dom0, role.domid == 0);
        }
        assert_eq!(RoleName::X86Pv.role().guest_type, GuestType::Pv);
        assert_eq!(RoleName::ArmDomU.role().arch, Arch::Aarch64);
        assert_eq!(RoleName::ArmDomU.role().guest_type, GuestType::Hvm);
    }
}
