//! Xenstore node permissions and their string form (`n0`, `r5`, `w3`, `b7`).
//!
//! A node's permission list is ordered: the first entry names the owner, who may do
//! everything, and its kind is the default for every domain not listed after it. Each later
//! entry grants one domain a kind of access. This module only parses and formats; the rules
//! are applied by the daemon (and by [`MemStore`](crate::MemStore), which copies them).

use std::fmt;
use std::str::FromStr;

use crate::error::XsError;

/// A Xen domain id.
pub type DomId = u16;

/// The kind of access a permission entry grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PermKind {
    /// `n`: no access.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

impl PermKind {
    /// Whether this kind allows reading.
    pub fn can_read(self) -> bool {
        matches!(self, PermKind::Read | PermKind::Both)
    }

    /// Whether this kind allows writing.
    pub fn can_write(self) -> bool {
        matches!(self, PermKind::Write | PermKind::Both)
    }

    /// The letter of the string form.
    pub fn letter(self) -> char {
        match self {
            PermKind::None => 'n',
            PermKind::Read => 'r',
            PermKind::Write => 'w',
            PermKind::Both => 'b',
        }
    }
}

/// One permission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    /// What is granted.
    pub kind: PermKind,
    /// To whom (for the first entry of a list: the owner).
    pub domid: DomId,
}

impl Perm {
    /// An entry of the given kind.
    pub fn new(kind: PermKind, domid: DomId) -> Perm {
        Perm { kind, domid }
    }

    /// `n<domid>`: as a first entry, `domid` owns the node and nobody else has access.
    pub fn owner(domid: DomId) -> Perm {
        Perm::new(PermKind::None, domid)
    }

    /// `r<domid>`.
    pub fn read(domid: DomId) -> Perm {
        Perm::new(PermKind::Read, domid)
    }

    /// `w<domid>`.
    pub fn write(domid: DomId) -> Perm {
        Perm::new(PermKind::Write, domid)
    }

    /// `b<domid>`.
    pub fn both(domid: DomId) -> Perm {
        Perm::new(PermKind::Both, domid)
    }

    /// Parses one entry such as `r5`.
    pub fn parse(text: &str) -> Result<Perm, XsError> {
        let bad = |reason| XsError::BadPerm {
            text: text.to_owned(),
            reason,
        };
        let mut chars = text.chars();
        let kind = match chars.next() {
            Some('n') => PermKind::None,
            Some('r') => PermKind::Read,
            Some('w') => PermKind::Write,
            Some('b') => PermKind::Both,
            Some(_) => return Err(bad("the first letter must be n, r, w or b")),
            None => return Err(bad("it is empty")),
        };
        let digits = chars.as_str();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the letter must be followed by a decimal domid"));
        }
        let domid = digits
            .parse::<DomId>()
            .map_err(|_| bad("the domid is out of range"))?;
        Ok(Perm { kind, domid })
    }

    /// Parses a `GET_PERMS` reply: NUL-terminated entries.
    pub fn parse_list(payload: &[u8]) -> Result<Vec<Perm>, XsError> {
        let strings = crate::wire::split_strings(payload).ok_or_else(|| XsError::BadPerm {
            text: String::from_utf8_lossy(payload).into_owned(),
            reason: "not UTF-8",
        })?;
        strings.iter().map(|s| Perm::parse(s)).collect()
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.kind.letter(), self.domid)
    }
}

impl FromStr for Perm {
    type Err = XsError;

    fn from_str(s: &str) -> Result<Perm, XsError> {
        Perm::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_round_trip() {
        for (s, p) in [
            ("n0", Perm::owner(0)),
            ("r5", Perm::read(5)),
            ("w3", Perm::write(3)),
            ("b7", Perm::both(7)),
            ("b32752", Perm::both(0x7ff0)),
        ] {
            assert_eq!(Perm::parse(s).unwrap(), p);
            assert_eq!(p.to_string(), s);
        }
    }

    #[test]
    fn rejects_malformed_entries() {
        for s in ["", "x1", "r", "r-1", "r 1", "r1a", "r99999", "R1"] {
            let e = Perm::parse(s).unwrap_err();
            assert!(e.to_string().contains(&format!("{s:?}")), "{e}");
        }
    }

    #[test]
    fn parses_get_perms_reply() {
        assert_eq!(
            Perm::parse_list(b"n5\0r7\0").unwrap(),
            vec![Perm::owner(5), Perm::read(7)]
        );
        assert!(Perm::parse_list(b"n5\0q7\0").is_err());
    }

    #[test]
    fn kinds() {
        assert!(PermKind::Both.can_read() && PermKind::Both.can_write());
        assert!(PermKind::Read.can_read() && !PermKind::Read.can_write());
        assert!(!PermKind::Write.can_read() && PermKind::Write.can_write());
        assert!(!PermKind::None.can_read() && !PermKind::None.can_write());
    }
}
