//! Virtual device names for devids, as xl and Linux name Xen disks: devid 0 is `xvda`, 25 is
//! `xvdz`, 26 is `xvdaa` (letters in bijective base 26). The operator may write `xvdb`, `vdb`
//! or `1` for the same device; NBD exports of a blk device are named `xvd…` after its devid, in
//! a guest and in the loopback alike.

/// The `xvd…` name of `devid`.
pub fn name(devid: u32) -> String {
    let mut letters = Vec::new();
    let mut n = u64::from(devid) + 1;
    while n > 0 {
        n -= 1;
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    letters.reverse();
    format!("xvd{}", String::from_utf8_lossy(&letters))
}

/// The devid `text` names: a decimal number, or `xvd` / `vd` followed by lowercase letters.
pub fn parse(text: &str) -> Option<u32> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok();
    }
    let letters = text
        .strip_prefix("xvd")
        .or_else(|| text.strip_prefix("vd"))?;
    if letters.is_empty() || letters.len() > 7 || !letters.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let mut n: u64 = 0;
    for b in letters.bytes() {
        n = n * 26 + u64::from(b - b'a') + 1;
    }
    u32::try_from(n - 1).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_linux_and_parse_back() {
        for (devid, want) in [
            (0, "xvda"),
            (1, "xvdb"),
            (25, "xvdz"),
            (26, "xvdaa"),
            (27, "xvdab"),
            (701, "xvdzz"),
            (702, "xvdaaa"),
        ] {
            assert_eq!(name(devid), want);
            assert_eq!(parse(want), Some(devid));
            assert_eq!(parse(&want[1..]), Some(devid), "vd form");
            assert_eq!(parse(&devid.to_string()), Some(devid));
        }
        for devid in (0..20_000).chain([u32::MAX - 1, u32::MAX]) {
            assert_eq!(parse(&name(devid)), Some(devid));
        }
        for bad in [
            "",
            "xvd",
            "vd",
            "xvdA",
            "sda",
            "hda",
            "xvd1",
            "-1",
            "1x",
            "xvdaaaaaaaa",
            "xvdzzzzzzz",
            "x",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
