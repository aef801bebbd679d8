//! Naming domains on the command line: a domid or a name, resolved through xenstore the way
//! `xl` does (`/local/domain/*/name`), and finding out which domain we run in.
//!
//! A string of digits is always a domid, as in libxl; anything else is a name. Resolution
//! only reads xenstore, and a domain counts as existing when its home `/local/domain/<domid>`
//! does.

use std::fmt;
use std::str::FromStr;

use xenvirtio_xenstore::{DomId, TxId, XenStore, xenbus};

use super::{AdminError, numeric_children};

/// The parent of every domain's home.
const DOMAIN_ROOT: &str = "/local/domain";
/// `DOMID_FIRST_RESERVED` in Xen's public headers: domids above are special (DOMID_SELF...).
const DOMID_FIRST_RESERVED: u32 = 0x7ff0;

/// A domain as an operator names it: a domid, or a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainRef {
    /// A domid (`5`).
    Id(DomId),
    /// A name (`guest1`, `Domain-0`).
    Name(String),
}

impl FromStr for DomainRef {
    type Err = AdminError;

    fn from_str(text: &str) -> Result<DomainRef, AdminError> {
        let bad = |reason| AdminError::BadDomainRef {
            text: text.to_owned(),
            reason,
        };
        if text.is_empty() {
            return Err(bad("it is empty"));
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            return match text.parse::<u32>() {
                Ok(id) if id < DOMID_FIRST_RESERVED => Ok(DomainRef::Id(
                    DomId::try_from(id).expect("below DOMID_FIRST_RESERVED, so it fits in u16"),
                )),
                _ => Err(bad("domids go from 0 to 32751")),
            };
        }
        if text.contains('/') || text.chars().any(char::is_control) {
            return Err(bad("a domain name has no '/' and no control characters"));
        }
        Ok(DomainRef::Name(text.to_owned()))
    }
}

impl fmt::Display for DomainRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainRef::Id(id) => write!(f, "{id}"),
            DomainRef::Name(name) => f.write_str(name),
        }
    }
}

impl From<DomId> for DomainRef {
    fn from(id: DomId) -> DomainRef {
        DomainRef::Id(id)
    }
}

fn home(domid: DomId) -> String {
    format!("{DOMAIN_ROOT}/{domid}")
}

/// Resolves `domain` to a domid, checking that the domain exists.
pub fn resolve_domain(store: &dyn XenStore, domain: &DomainRef) -> Result<DomId, AdminError> {
    match domain {
        DomainRef::Id(domid) => {
            let path = home(*domid);
            let exists = store
                .exists(TxId::NONE, &path)
                .map_err(AdminError::store(format!("reading {path}")))?;
            if exists {
                Ok(*domid)
            } else {
                Err(AdminError::UnknownDomain { domid: *domid })
            }
        }
        DomainRef::Name(name) => {
            let domids: Vec<DomId> = numeric_children(store, TxId::NONE, DOMAIN_ROOT)
                .map_err(AdminError::store(format!("listing {DOMAIN_ROOT}")))?;
            let mut matches = Vec::new();
            for domid in domids {
                if domain_name(store, domid)?.as_deref() == Some(name.as_str()) {
                    matches.push(domid);
                }
            }
            match matches.as_slice() {
                [] => Err(AdminError::UnknownDomainName { name: name.clone() }),
                [domid] => Ok(*domid),
                _ => Err(AdminError::AmbiguousDomainName {
                    name: name.clone(),
                    domids: matches,
                }),
            }
        }
    }
}

/// The domid `domain` names: a domid as given, even of a domain that is gone (to clean up
/// after it), or the domid of the one domain with this name.
pub fn domid_of(store: &dyn XenStore, domain: &DomainRef) -> Result<DomId, AdminError> {
    match domain {
        DomainRef::Id(domid) => Ok(*domid),
        DomainRef::Name(_) => resolve_domain(store, domain),
    }
}

/// A domain's name (`/local/domain/<domid>/name`), `None` if it has none or it is not text.
pub fn domain_name(store: &dyn XenStore, domid: DomId) -> Result<Option<String>, AdminError> {
    let path = format!("{}/name", home(domid));
    let value = store
        .read_optional(TxId::NONE, &path)
        .map_err(AdminError::store(format!("reading {path}")))?;
    Ok(value.and_then(|v| String::from_utf8(v).ok()))
}

/// The domain this connection belongs to, from the relative key `domid` (which resolves to
/// `/local/domain/<self>/domid`; `xen-init-dom0` writes it in Dom0, libxl in every guest).
pub fn own_domid(store: &dyn XenStore) -> Result<DomId, AdminError> {
    let domid = xenbus::read_u32(store, TxId::NONE, "domid")
        .map_err(|source| AdminError::OwnDomidUnknown { source })?;
    DomId::try_from(domid)
        .ok()
        .filter(|d| u32::from(*d) < DOMID_FIRST_RESERVED)
        .ok_or_else(|| AdminError::OwnDomidUnknown {
            source: xenvirtio_xenstore::XsError::BadValue {
                path: "domid".to_owned(),
                value: domid.to_string(),
                expected: "a domid from 0 to 32751",
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvirtio_xenstore::MemStore;

    fn store() -> (MemStore, xenvirtio_xenstore::MemConnection) {
        let daemon = MemStore::new();
        let dom0 = daemon.connect(0).unwrap();
        dom0.write(TxId::NONE, "/local/domain/0/domid", b"0")
            .unwrap();
        dom0.write(TxId::NONE, "/local/domain/0/name", b"Domain-0")
            .unwrap();
        for (domid, name) in [(3, "web"), (5, "guest1"), (9, "twin"), (11, "twin")] {
            daemon.start_guest(domid).unwrap();
            dom0.write(
                TxId::NONE,
                &format!("/local/domain/{domid}/name"),
                name.as_bytes(),
            )
            .unwrap();
        }
        daemon.start_guest(12).unwrap();
        (daemon, dom0)
    }

    #[test]
    fn digits_are_domids_and_everything_else_is_a_name() {
        assert_eq!("5".parse::<DomainRef>().unwrap(), DomainRef::Id(5));
        assert_eq!("007".parse::<DomainRef>().unwrap(), DomainRef::Id(7));
        assert_eq!("32751".parse::<DomainRef>().unwrap(), DomainRef::Id(32751));
        assert_eq!(
            "guest1".parse::<DomainRef>().unwrap(),
            DomainRef::Name("guest1".into())
        );
        assert_eq!(
            "Domain-0".parse::<DomainRef>().unwrap(),
            DomainRef::Name("Domain-0".into())
        );
        for bad in ["", "32752", "99999999999", "a/b", "x\ny"] {
            let e = bad.parse::<DomainRef>().unwrap_err();
            assert!(matches!(e, AdminError::BadDomainRef { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn names_and_ids_resolve_against_xenstore() {
        let (_daemon, dom0) = store();
        let r = |s: &str| resolve_domain(&dom0, &s.parse().unwrap());
        assert_eq!(r("5").unwrap(), 5);
        assert_eq!(r("guest1").unwrap(), 5);
        assert_eq!(r("Domain-0").unwrap(), 0);
        assert_eq!(
            r("12").unwrap(),
            12,
            "a domain without a name exists by its home"
        );
        let e = r("7").unwrap_err();
        assert!(matches!(e, AdminError::UnknownDomain { domid: 7 }), "{e}");
        assert!(e.to_string().contains("/local/domain/7"), "{e}");
        let e = r("nosuch").unwrap_err();
        assert!(e.to_string().contains("\"nosuch\""), "{e}");
        let e = r("twin").unwrap_err();
        assert!(
            matches!(&e, AdminError::AmbiguousDomainName { domids, .. } if domids == &[9, 11]),
            "{e}"
        );
        assert_eq!(domain_name(&dom0, 3).unwrap().as_deref(), Some("web"));
        assert_eq!(
            domid_of(&dom0, &DomainRef::Id(7)).unwrap(),
            7,
            "gone, but named by domid"
        );
        assert_eq!(domid_of(&dom0, &"web".parse().unwrap()).unwrap(), 3);
        assert!(domid_of(&dom0, &"gone".parse().unwrap()).is_err());
        assert_eq!(domain_name(&dom0, 12).unwrap(), None);
    }

    #[test]
    fn own_domid_reads_the_relative_domid_key() {
        let (daemon, dom0) = store();
        assert_eq!(own_domid(&dom0).unwrap(), 0);
        // A driver domain reads its own home.
        let dom3 = daemon.connect(3).unwrap();
        dom0.write(TxId::NONE, "/local/domain/3/domid", b"3")
            .unwrap();
        assert_eq!(own_domid(&dom3).unwrap(), 3);
        // Without the key, refuse (as libxl does) and say what to do.
        let dom5 = daemon.connect(5).unwrap();
        let e = own_domid(&dom5).unwrap_err();
        assert!(e.to_string().contains("/local/domain/<self>/domid"), "{e}");
        dom0.write(TxId::NONE, "/local/domain/5/domid", b"40000")
            .unwrap();
        assert!(own_domid(&dom5).is_err());
    }
}
