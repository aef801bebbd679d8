//! The role policy: which DMA strategy a frontend uses, and why.
//!
//! This module owns one pure function, [`choose`], of everything the decision depends on
//! (the domain's role, arch and guest type, the backend's domid, `grant_usage`, the offered
//! features, and the overrides), with every refusal spelled out. It reads nothing and logs
//! nothing: the caller logs the [`DmaChoice`] and writes it to the `dma` and `dma-reason` keys.
//! The table it implements is docs/DESIGN.md's "Role policy" and `docs/PROTOCOL.md` section 4.

use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::features::{self, transport};
use xenvirtio_xen::DomId;
use xenvirtio_xen::role::{Arch, GuestType};

/// Everything the choice depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInput {
    /// Whether the frontend runs in Dom0.
    pub is_dom0: bool,
    /// The frontend's architecture.
    pub arch: Arch,
    /// The frontend's guest type (arm64 guests report HVM).
    pub guest_type: GuestType,
    /// The backend's domain.
    pub backend_domid: DomId,
    /// The backend's `grant_usage` key: `true` means it needs translated addresses.
    pub grant_usage: bool,
    /// The features the device offers.
    pub device_features: u64,
    /// A strategy the operator pinned for the device (`dma` key in the backend directory),
    /// `None` for `auto`.
    pub pinned: Option<DmaStrategy>,
    /// A strategy asked for on the frontend's command line (`--dma`), `None` for `auto`.
    pub requested: Option<DmaStrategy>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaChoice {
    /// The strategy.
    pub strategy: DmaStrategy,
    /// One line saying why, for the log and the `dma-reason` key.
    pub reason: String,
}

/// A strategy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The command line and the operator's pin disagree.
    #[error(
        "--dma {requested} conflicts with dma={pinned} that the operator set for this device \
         (xenvirtio-backend attach --dma); drop --dma or re-attach the device"
    )]
    Conflict {
        /// From `--dma`.
        requested: DmaStrategy,
        /// From the backend directory.
        pinned: DmaStrategy,
    },
    /// The strategy is not safe or not possible for this role.
    #[error("DMA strategy {strategy} is refused: {why}")]
    Refused {
        /// The strategy asked for.
        strategy: DmaStrategy,
        /// Why it cannot be used.
        why: String,
    },
}

/// Why `strategy` cannot be used in this situation, or `None` if it can.
pub fn refusal(input: &PolicyInput, strategy: DmaStrategy) -> Option<String> {
    match strategy {
        // Both only hand the backend pages this domain owns and granted: always safe.
        DmaStrategy::Grant | DmaStrategy::Bounce => None,
        DmaStrategy::Direct => direct_refusal(input),
    }
}

fn direct_refusal(input: &PolicyInput) -> Option<String> {
    if input.is_dom0 {
        return Some(
            "a Dom0 frontend may hold foreign pages that it cannot name by its own frame \
             numbers, so Dom0 must bounce (the role swiotlb-xen plays)"
                .into(),
        );
    }
    if input.arch == Arch::X86_64 && input.guest_type == GuestType::Pv {
        return Some(
            "an x86 PV guest's frame numbers are pseudo-physical, not machine frames, so the \
             backend cannot map them (Linux refuses virtio without grants on PV for the same \
             reason)"
                .into(),
        );
    }
    if input.backend_domid != 0 {
        return Some(format!(
            "the backend is domain {}, not Dom0: only Dom0 may map any page of a guest",
            input.backend_domid
        ));
    }
    if features::has(input.device_features, transport::ACCESS_PLATFORM) {
        return Some(
            "the device offers ACCESS_PLATFORM: it only accepts translated addresses".into(),
        );
    }
    if input.grant_usage {
        return Some("the backend set grant_usage=1: it requires grants".into());
    }
    None
}

/// The strategy this role uses when nobody asks for one, and why.
fn default_choice(input: &PolicyInput) -> DmaChoice {
    let (strategy, reason) = if input.is_dom0 {
        (
            DmaStrategy::Bounce,
            format!(
                "Dom0 on {} bounces: it may hold foreign pages and cannot grant another \
                 domain's frames (the swiotlb-xen role)",
                input.arch
            ),
        )
    } else {
        match (input.arch, input.guest_type) {
            (Arch::X86_64, GuestType::Pv) => (
                DmaStrategy::Grant,
                "x86 PV DomU: frame numbers are pseudo-physical, so addresses must be \
                 translated; grants do it without copies"
                    .to_string(),
            ),
            (Arch::X86_64, _) => (
                DmaStrategy::Grant,
                format!(
                    "x86 {} DomU: grants, so the backend sees only the pages granted to it",
                    input.guest_type
                ),
            ),
            (Arch::Aarch64, _) => match direct_refusal(input) {
                None => (
                    DmaStrategy::Direct,
                    "Arm DomU with a trusted Dom0 backend (grant_usage=0): raw guest-physical \
                     addresses, no translation cost"
                        .to_string(),
                ),
                Some(why) => (
                    DmaStrategy::Grant,
                    format!("Arm DomU: grants, because {why}"),
                ),
            },
        }
    };
    DmaChoice { strategy, reason }
}

/// Chooses the DMA strategy (docs/DESIGN.md "Role policy").
///
/// An explicit choice (`--dma`, or the operator's pin) wins over the role's default, but is
/// refused with the reason where it is unsafe or impossible. Both given and different is an
/// error, not a silent preference.
pub fn choose(input: &PolicyInput) -> Result<DmaChoice, PolicyError> {
    let explicit = match (input.requested, input.pinned) {
        (Some(requested), Some(pinned)) if requested != pinned => {
            return Err(PolicyError::Conflict { requested, pinned });
        }
        (Some(s), _) => Some((s, "asked for with --dma")),
        (None, Some(s)) => Some((s, "pinned by the operator (dma key of the device)")),
        (None, None) => None,
    };
    match explicit {
        Some((strategy, source)) => match refusal(input, strategy) {
            Some(why) => Err(PolicyError::Refused { strategy, why }),
            None => Ok(DmaChoice {
                strategy,
                reason: format!("{strategy} {source}"),
            }),
        },
        None => Ok(default_choice(input)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DmaStrategy::{Bounce, Direct, Grant};
    use xenvirtio_virtio::features::bit;

    const AP: u64 = bit(transport::ACCESS_PLATFORM);

    fn input(is_dom0: bool, arch: Arch, guest_type: GuestType) -> PolicyInput {
        PolicyInput {
            is_dom0,
            arch,
            guest_type,
            backend_domid: 0,
            grant_usage: false,
            device_features: 0,
            pinned: None,
            requested: None,
        }
    }

    /// Every row of docs/DESIGN.md's role policy: (role, backend, grant_usage, features) -> default.
    #[test]
    fn defaults_follow_the_policy_table() {
        use Arch::{Aarch64, X86_64};
        use GuestType::{Hvm, Pv, Pvh};
        #[rustfmt::skip]
        let table: &[(bool, Arch, GuestType, DomId, bool, u64, DmaStrategy)] = &[
            // Dom0, any arch -> bounce, whatever the backend says.
            (true,  X86_64,  Pv,  0, false, 0,  Bounce),
            (true,  X86_64,  Pvh, 0, true,  AP, Bounce),
            (true,  Aarch64, Hvm, 0, false, 0,  Bounce),
            (true,  Aarch64, Hvm, 0, true,  AP, Bounce),
            // x86 PV DomU -> grant.
            (false, X86_64,  Pv,  0, false, 0,  Grant),
            (false, X86_64,  Pv,  0, true,  AP, Grant),
            (false, X86_64,  Pv,  5, true,  AP, Grant),
            // x86 PVH/HVM DomU -> grant, even when direct would be allowed.
            (false, X86_64,  Pvh, 0, false, 0,  Grant),
            (false, X86_64,  Pvh, 0, true,  AP, Grant),
            (false, X86_64,  Hvm, 0, false, 0,  Grant),
            (false, X86_64,  Hvm, 7, true,  AP, Grant),
            // Arm DomU -> direct with a trusted Dom0 backend, grant otherwise.
            (false, Aarch64, Hvm, 0, false, 0,  Direct),
            (false, Aarch64, Hvm, 0, true,  AP, Grant),
            (false, Aarch64, Hvm, 0, true,  0,  Grant),
            (false, Aarch64, Hvm, 0, false, AP, Grant),
            (false, Aarch64, Hvm, 3, false, 0,  Grant),
            (false, Aarch64, Hvm, 3, true,  AP, Grant),
        ];
        for &(dom0, arch, gt, backend, gu, feats, want) in table {
            let mut i = input(dom0, arch, gt);
            i.backend_domid = backend;
            i.grant_usage = gu;
            i.device_features = feats;
            let c = choose(&i).unwrap();
            assert_eq!(c.strategy, want, "{i:?} -> {}", c.reason);
            assert!(!c.reason.is_empty());
        }
    }

    #[test]
    fn direct_is_refused_with_the_reason() {
        let cases: &[(PolicyInput, &str)] = &[
            (input(true, Arch::X86_64, GuestType::Pv), "Dom0 must bounce"),
            (
                input(true, Arch::Aarch64, GuestType::Hvm),
                "Dom0 must bounce",
            ),
            (input(false, Arch::X86_64, GuestType::Pv), "pseudo-physical"),
            (
                PolicyInput {
                    backend_domid: 4,
                    ..input(false, Arch::X86_64, GuestType::Pvh)
                },
                "domain 4, not Dom0",
            ),
            (
                PolicyInput {
                    device_features: AP,
                    ..input(false, Arch::Aarch64, GuestType::Hvm)
                },
                "ACCESS_PLATFORM",
            ),
            (
                PolicyInput {
                    grant_usage: true,
                    ..input(false, Arch::X86_64, GuestType::Hvm)
                },
                "grant_usage=1",
            ),
        ];
        for (base, why) in cases {
            for how in [0, 1] {
                let mut i = base.clone();
                if how == 0 {
                    i.requested = Some(Direct);
                } else {
                    i.pinned = Some(Direct);
                }
                match choose(&i) {
                    Err(PolicyError::Refused {
                        strategy: Direct,
                        why: w,
                    }) => {
                        assert!(w.contains(why), "{w:?} should mention {why:?}")
                    }
                    other => panic!("{i:?}: expected a refusal, got {other:?}"),
                }
            }
        }
    }

    #[test]
    fn explicit_choices_win_where_allowed() {
        // Every role may grant or bounce.
        for (dom0, arch, gt) in [
            (true, Arch::X86_64, GuestType::Pv),
            (true, Arch::Aarch64, GuestType::Hvm),
            (false, Arch::X86_64, GuestType::Pv),
            (false, Arch::X86_64, GuestType::Pvh),
            (false, Arch::Aarch64, GuestType::Hvm),
        ] {
            for s in [Grant, Bounce] {
                let mut i = input(dom0, arch, gt);
                i.grant_usage = true;
                i.device_features = AP;
                i.requested = Some(s);
                assert_eq!(choose(&i).unwrap().strategy, s);
                i.requested = None;
                i.pinned = Some(s);
                let c = choose(&i).unwrap();
                assert_eq!(c.strategy, s);
                assert!(c.reason.contains("pinned"), "{}", c.reason);
            }
        }
        // PVH and Arm DomUs may go direct with a trusted Dom0 backend.
        for (arch, gt) in [
            (Arch::X86_64, GuestType::Pvh),
            (Arch::X86_64, GuestType::Hvm),
            (Arch::Aarch64, GuestType::Hvm),
        ] {
            let mut i = input(false, arch, gt);
            i.requested = Some(Direct);
            assert_eq!(choose(&i).unwrap().strategy, Direct);
        }
    }

    #[test]
    fn a_conflicting_pin_is_an_error() {
        let mut i = input(false, Arch::X86_64, GuestType::Pvh);
        i.requested = Some(Grant);
        i.pinned = Some(Bounce);
        let e = choose(&i).unwrap_err();
        assert_eq!(
            e,
            PolicyError::Conflict {
                requested: Grant,
                pinned: Bounce
            }
        );
        assert!(
            e.to_string()
                .contains("--dma grant conflicts with dma=bounce")
        );
        i.pinned = Some(Grant);
        assert_eq!(choose(&i).unwrap().strategy, Grant);
    }
}
