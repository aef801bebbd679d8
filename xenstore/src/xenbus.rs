//! The xenbus layer: device states, the virtio device directories, switching and waiting on
//! states, and typed reads of keys.
//!
//! This module owns the conventions every Xen PV driver pair shares (`XenbusState` values, a
//! `state` node per end) and the xenvirtio paths of docs/DESIGN.md:
//! - backend: `/local/domain/<B>/backend/virtio/<F>/<devid>`;
//! - frontend: `/local/domain/<F>/device/virtio/<devid>`.
//!
//! Values come from the other domain, which may be hostile: parsers are strict and every error
//! names the full path and the bad value. Waiting is driven by a watch on a private event
//! queue, never by sleeping, and never consumes the caller's own watch events.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::error::XsError;
use crate::perms::DomId;
use crate::store::{TxId, XenStore, transaction};
use crate::watch::unique_token;

/// The xenbus device type of xenvirtio devices.
pub const DEVICE_TYPE: &str = "virtio";

/// How many times [`switch_state`] retries its transaction on EAGAIN.
pub const SWITCH_STATE_ATTEMPTS: u32 = 16;

/// The state of one end of a xenbus device (`enum xenbus_state` in Xen's
/// `xen/include/public/io/xenbus.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum XenbusState {
    /// 0: not set (also what an empty node means).
    Unknown = 0,
    /// 1: the end is being created.
    Initialising = 1,
    /// 2: waiting for information from the peer (the backend published its features).
    InitWait = 2,
    /// 3: the frontend published its rings and event channels.
    Initialised = 3,
    /// 4: ready.
    Connected = 4,
    /// 5: tearing down.
    Closing = 5,
    /// 6: torn down.
    Closed = 6,
    /// 7: reconfiguring.
    Reconfiguring = 7,
    /// 8: reconfigured.
    Reconfigured = 8,
}

impl XenbusState {
    /// Every state, by value.
    pub const ALL: [XenbusState; 9] = [
        XenbusState::Unknown,
        XenbusState::Initialising,
        XenbusState::InitWait,
        XenbusState::Initialised,
        XenbusState::Connected,
        XenbusState::Closing,
        XenbusState::Closed,
        XenbusState::Reconfiguring,
        XenbusState::Reconfigured,
    ];

    /// The value stored in xenstore.
    pub fn value(self) -> u32 {
        self as u32
    }

    /// The state of a value.
    pub fn from_value(value: u32) -> Option<XenbusState> {
        XenbusState::ALL
            .iter()
            .copied()
            .find(|s| s.value() == value)
    }

    /// The name used in Xen's headers, without the `XenbusState` prefix.
    pub fn name(self) -> &'static str {
        match self {
            XenbusState::Unknown => "Unknown",
            XenbusState::Initialising => "Initialising",
            XenbusState::InitWait => "InitWait",
            XenbusState::Initialised => "Initialised",
            XenbusState::Connected => "Connected",
            XenbusState::Closing => "Closing",
            XenbusState::Closed => "Closed",
            XenbusState::Reconfiguring => "Reconfiguring",
            XenbusState::Reconfigured => "Reconfigured",
        }
    }

    /// Parses a `state` node's value: a decimal state number, surrounding ASCII whitespace
    /// allowed; an empty value is [`XenbusState::Unknown`], as Linux reads it.
    pub fn from_node_value(value: &[u8]) -> Option<XenbusState> {
        let text = std::str::from_utf8(value).ok()?.trim_ascii();
        if text.is_empty() {
            return Some(XenbusState::Unknown);
        }
        parse_decimal::<u32>(text).and_then(XenbusState::from_value)
    }
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.value())
    }
}

impl FromStr for XenbusState {
    type Err = XsError;

    /// Accepts the decimal value (`4`) or the name (`Connected`, any case).
    fn from_str(s: &str) -> Result<XenbusState, XsError> {
        XenbusState::from_node_value(s.as_bytes())
            .filter(|_| !s.trim_ascii().is_empty())
            .or_else(|| {
                XenbusState::ALL
                    .iter()
                    .copied()
                    .find(|st| st.name().eq_ignore_ascii_case(s.trim_ascii()))
            })
            .ok_or_else(|| XsError::BadValue {
                path: "(argument)".into(),
                value: s.to_owned(),
                expected: "a xenbus state (0-8 or its name)",
            })
    }
}

/// `/local/domain/<backend>/backend/virtio`: where a backend finds its devices.
pub fn backend_root(backend: DomId) -> String {
    format!("/local/domain/{backend}/backend/{DEVICE_TYPE}")
}

/// `/local/domain/<backend>/backend/virtio/<frontend>/<devid>`.
pub fn backend_dir(backend: DomId, frontend: DomId, devid: u32) -> String {
    format!("{}/{frontend}/{devid}", backend_root(backend))
}

/// `/local/domain/<frontend>/device/virtio`: where a frontend finds its devices.
pub fn frontend_root(frontend: DomId) -> String {
    format!("/local/domain/{frontend}/device/{DEVICE_TYPE}")
}

/// `/local/domain/<frontend>/device/virtio/<devid>`.
pub fn frontend_dir(frontend: DomId, devid: u32) -> String {
    format!("{}/{devid}", frontend_root(frontend))
}

/// `<dir>/state`.
pub fn state_path(dir: &str) -> String {
    format!("{dir}/state")
}

/// `ENOENT` becomes `None`: for optional keys (`xenbus::optional(read_u32(..))?`).
pub fn optional<T>(result: Result<T, XsError>) -> Result<Option<T>, XsError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_enoent() => Ok(None),
        Err(e) => Err(e),
    }
}

fn bad_value(path: &str, value: &[u8], expected: &'static str) -> XsError {
    let text = String::from_utf8_lossy(value);
    let value = if text.chars().count() > 64 {
        format!("{}...", text.chars().take(64).collect::<String>())
    } else {
        text.into_owned()
    };
    XsError::BadValue {
        path: path.to_owned(),
        value,
        expected,
    }
}

/// Strict decimal: ASCII digits only (no sign, no spaces), within `T`'s range.
pub fn parse_decimal<T: FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn read_text<'a>(value: &'a [u8], path: &str, expected: &'static str) -> Result<&'a str, XsError> {
    std::str::from_utf8(value)
        .map(str::trim_ascii)
        .map_err(|_| bad_value(path, value, expected))
}

/// Reads a decimal `u64` (surrounding ASCII whitespace allowed).
pub fn read_u64(store: &dyn XenStore, tx: TxId, path: &str) -> Result<u64, XsError> {
    let v = store.read(tx, path)?;
    const WHAT: &str = "a decimal u64";
    parse_decimal(read_text(&v, path, WHAT)?).ok_or_else(|| bad_value(path, &v, WHAT))
}

/// Reads a decimal `u32` (surrounding ASCII whitespace allowed).
pub fn read_u32(store: &dyn XenStore, tx: TxId, path: &str) -> Result<u32, XsError> {
    let v = store.read(tx, path)?;
    const WHAT: &str = "a decimal u32";
    parse_decimal(read_text(&v, path, WHAT)?).ok_or_else(|| bad_value(path, &v, WHAT))
}

/// Reads a hexadecimal `u64`, with or without `0x`, 1 to 16 digits.
pub fn read_hex_u64(store: &dyn XenStore, tx: TxId, path: &str) -> Result<u64, XsError> {
    let v = store.read(tx, path)?;
    const WHAT: &str = "a hexadecimal u64";
    parse_hex_u64(read_text(&v, path, WHAT)?).ok_or_else(|| bad_value(path, &v, WHAT))
}

/// Strict hexadecimal `u64`: with or without `0x`, 1 to 16 hex digits, nothing else.
pub fn parse_hex_u64(text: &str) -> Option<u64> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// The form [`read_hex_u64`] reads and xenvirtio writes: `0x` and lowercase digits.
pub fn hex_u64(value: u64) -> String {
    format!("{value:#x}")
}

/// Reads a boolean stored as `0` or `1`.
pub fn read_bool(store: &dyn XenStore, tx: TxId, path: &str) -> Result<bool, XsError> {
    let v = store.read(tx, path)?;
    const WHAT: &str = "a boolean (0 or 1)";
    match read_text(&v, path, WHAT)? {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(bad_value(path, &v, WHAT)),
    }
}

/// Reads a space-separated list of words (empty value: empty list).
pub fn read_list(store: &dyn XenStore, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
    let v = store.read(tx, path)?;
    let text = read_text(&v, path, "a space-separated list of UTF-8 words")?;
    Ok(text.split_ascii_whitespace().map(str::to_owned).collect())
}

/// Reads a `state` node.
pub fn read_state(
    store: &dyn XenStore,
    tx: TxId,
    state_path: &str,
) -> Result<XenbusState, XsError> {
    let v = store.read(tx, state_path)?;
    XenbusState::from_node_value(&v)
        .ok_or_else(|| bad_value(state_path, &v, "a xenbus state (0-8)"))
}

/// Writes `<dir>/state`, in a transaction that first checks the node exists, so that a device
/// directory removed meanwhile is not recreated by a late state change (Linux's
/// `xenbus_switch_state` does the same). Fails with [`XsError::NodeVanished`] if `state` is
/// absent: create it with a plain write when building the directory.
pub fn switch_state(store: &dyn XenStore, dir: &str, state: XenbusState) -> Result<(), XsError> {
    let path = state_path(dir);
    let value = state.value().to_string();
    transaction(store, SWITCH_STATE_ATTEMPTS, |tx| {
        match store.read(tx, &path) {
            Ok(_) => {}
            Err(e) if e.is_enoent() => return Err(XsError::NodeVanished { path: path.clone() }),
            Err(e) => return Err(e),
        }
        store.write(tx, &path, value.as_bytes())
    })?;
    tracing::debug!(path, %state, "xenbus state switched");
    Ok(())
}

/// Removes a watch when dropped.
struct WatchGuard<'a> {
    store: &'a dyn XenStore,
    path: &'a str,
    token: String,
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.unwatch(self.path, &self.token) {
            tracing::debug!(path = self.path, error = %e, "removing a wait watch failed");
        }
    }
}

/// Waits until the state node at `state_path` holds a state for which `until` is true, and
/// returns that state. Driven by a watch on a private queue (the caller's own watch events
/// are untouched).
///
/// Errors: [`XsError::WaitTimeout`] naming the path and the last state seen;
/// [`XsError::NodeVanished`] as soon as a node that existed disappears (a node that does not
/// exist yet is waited for); [`XsError::BadValue`] if the node holds something that is not a
/// state; [`XsError::ConnectionLost`] if the connection dies.
pub fn wait_for_state(
    store: &dyn XenStore,
    state_path: &str,
    mut until: impl FnMut(XenbusState) -> bool,
    timeout: Duration,
) -> Result<XenbusState, XsError> {
    let start = Instant::now();
    let token = unique_token("wait");
    let events = store.watch_events_for(&token)?;
    store.watch(state_path, &token)?;
    let _guard = WatchGuard {
        store,
        path: state_path,
        token,
    };
    let mut seen_existing = false;
    let mut last = "absent".to_owned();
    loop {
        match store.read(TxId::NONE, state_path) {
            Ok(v) => {
                seen_existing = true;
                let state = XenbusState::from_node_value(&v)
                    .ok_or_else(|| bad_value(state_path, &v, "a xenbus state (0-8)"))?;
                if until(state) {
                    return Ok(state);
                }
                last = state.to_string();
            }
            Err(e) if e.is_enoent() => {
                if seen_existing {
                    return Err(XsError::NodeVanished {
                        path: state_path.to_owned(),
                    });
                }
            }
            Err(e) => return Err(e),
        }
        let remaining = timeout.saturating_sub(start.elapsed());
        if remaining.is_zero() || events.next_timeout(remaining)?.is_none() {
            return Err(XsError::WaitTimeout {
                path: state_path.to_owned(),
                last,
                waited: start.elapsed(),
            });
        }
        // Several events may have piled up: one read covers them all.
        while events.try_next()?.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStore, Perm};
    use std::sync::Arc;

    #[test]
    fn state_values_match_xenbus_h() {
        let expected = [
            (XenbusState::Unknown, 0),
            (XenbusState::Initialising, 1),
            (XenbusState::InitWait, 2),
            (XenbusState::Initialised, 3),
            (XenbusState::Connected, 4),
            (XenbusState::Closing, 5),
            (XenbusState::Closed, 6),
            (XenbusState::Reconfiguring, 7),
            (XenbusState::Reconfigured, 8),
        ];
        for (s, v) in expected {
            assert_eq!(s.value(), v);
            assert_eq!(XenbusState::from_value(v), Some(s));
            assert_eq!(
                XenbusState::from_node_value(v.to_string().as_bytes()),
                Some(s)
            );
            assert_eq!(v.to_string().parse::<XenbusState>().unwrap(), s);
            assert_eq!(s.name().parse::<XenbusState>().unwrap(), s);
        }
        assert_eq!(XenbusState::from_value(9), None);
        assert_eq!(
            XenbusState::from_node_value(b""),
            Some(XenbusState::Unknown)
        );
        assert_eq!(
            XenbusState::from_node_value(b"4\n"),
            Some(XenbusState::Connected)
        );
        for bad in [&b"+4"[..], b"-1", b"9", b"four", b"0x4", b"\xff"] {
            assert_eq!(XenbusState::from_node_value(bad), None, "{bad:?}");
        }
        assert_eq!(XenbusState::Connected.to_string(), "Connected (4)");
        assert!("".parse::<XenbusState>().is_err());
    }

    #[test]
    fn paths_follow_the_design() {
        assert_eq!(backend_dir(0, 5, 1), "/local/domain/0/backend/virtio/5/1");
        assert_eq!(frontend_dir(5, 1), "/local/domain/5/device/virtio/1");
        assert_eq!(backend_root(7), "/local/domain/7/backend/virtio");
        assert_eq!(frontend_root(5), "/local/domain/5/device/virtio");
        assert_eq!(state_path("/a/b"), "/a/b/state");
    }

    fn store_with(values: &[(&str, &[u8])]) -> crate::MemConnection {
        let store = MemStore::new();
        let c = store.connect(0).unwrap();
        for (p, v) in values {
            c.write(TxId::NONE, p, v).unwrap();
        }
        c
    }

    #[test]
    fn typed_reads_parse_strictly_and_name_path_and_value() {
        let c = store_with(&[
            ("/d/n", b"42"),
            ("/d/big", b"18446744073709551615"),
            ("/d/hex", b"0x1f"),
            ("/d/hexbare", b"DEADbeef"),
            ("/d/t", b"1"),
            ("/d/f", b" 0 "),
            ("/d/list", b"a  b c"),
            ("/d/bad", b"4x2"),
            ("/d/neg", b"-1"),
            ("/d/bin", b"\xff\xfe"),
        ]);
        let n = TxId::NONE;
        assert_eq!(read_u32(&c, n, "/d/n").unwrap(), 42);
        assert_eq!(read_u64(&c, n, "/d/big").unwrap(), u64::MAX);
        assert_eq!(read_hex_u64(&c, n, "/d/hex").unwrap(), 0x1f);
        assert_eq!(read_hex_u64(&c, n, "/d/hexbare").unwrap(), 0xdead_beef);
        assert_eq!(read_hex_u64(&c, n, "/d/n").unwrap(), 0x42);
        assert!(read_bool(&c, n, "/d/t").unwrap());
        assert!(!read_bool(&c, n, "/d/f").unwrap());
        assert_eq!(read_list(&c, n, "/d/list").unwrap(), vec!["a", "b", "c"]);
        let e = read_u32(&c, n, "/d/big").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/d/big holds \"18446744073709551615\", which is not a decimal u32"
        );
        let e = read_u32(&c, n, "/d/bad").unwrap_err();
        assert!(
            e.to_string().contains("/d/bad") && e.to_string().contains("4x2"),
            "{e}"
        );
        assert!(read_u64(&c, n, "/d/neg").is_err());
        assert!(read_bool(&c, n, "/d/n").is_err());
        assert!(read_hex_u64(&c, n, "/d/list").is_err());
        let e = read_u32(&c, n, "/d/bin").unwrap_err();
        assert!(matches!(e, XsError::BadValue { .. }), "{e}");
        assert!(read_u32(&c, n, "/d/none").unwrap_err().is_enoent());
        assert_eq!(optional(read_u32(&c, n, "/d/none")).unwrap(), None);
        assert_eq!(optional(read_u32(&c, n, "/d/n")).unwrap(), Some(42));
        assert_eq!(hex_u64(0x1f), "0x1f");
        c.write_str(n, "/d/rt", &hex_u64(u64::MAX)).unwrap();
        assert_eq!(read_hex_u64(&c, n, "/d/rt").unwrap(), u64::MAX);
    }

    #[test]
    fn switch_state_writes_only_an_existing_state_node() {
        let c = store_with(&[("/dev/1/state", b"1")]);
        switch_state(&c, "/dev/1", XenbusState::InitWait).unwrap();
        assert_eq!(
            read_state(&c, TxId::NONE, "/dev/1/state").unwrap(),
            XenbusState::InitWait
        );
        c.rm(TxId::NONE, "/dev/1").unwrap();
        let e = switch_state(&c, "/dev/1", XenbusState::Closed).unwrap_err();
        assert!(matches!(e, XsError::NodeVanished { .. }), "{e}");
        assert!(
            !c.exists(TxId::NONE, "/dev/1").unwrap(),
            "the removed directory was not recreated"
        );
    }

    #[test]
    fn wait_for_state_follows_a_peer_and_leaves_other_events_alone() {
        let store = MemStore::new();
        let me = Arc::new(store.connect(0).unwrap());
        let peer = store.connect(0).unwrap();
        peer.write(TxId::NONE, "/fe/state", b"1").unwrap();
        me.watch("/other", "main-loop").unwrap();
        let mine = me.watch_events();
        assert_eq!(mine.try_next().unwrap().unwrap().token, "main-loop");

        let waiter = {
            let me = me.clone();
            std::thread::spawn(move || {
                wait_for_state(
                    &*me,
                    "/fe/state",
                    |s| s >= XenbusState::Connected,
                    Duration::from_secs(10),
                )
            })
        };
        for s in [b"2", b"3", b"4"] {
            std::thread::sleep(Duration::from_millis(5));
            peer.write(TxId::NONE, "/fe/state", s).unwrap();
        }
        peer.write(TxId::NONE, "/other", b"x").unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), XenbusState::Connected);
        // The caller's queue got its own event and nothing of the wait.
        let ev = mine.next_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(
            (ev.path.as_str(), ev.token.as_str()),
            ("/other", "main-loop")
        );
        assert_eq!(mine.try_next().unwrap(), None);
    }

    #[test]
    fn wait_for_state_times_out_naming_path_and_last_state() {
        let c = store_with(&[("/fe/state", b"2")]);
        let start = Instant::now();
        let e = wait_for_state(
            &c,
            "/fe/state",
            |s| s == XenbusState::Connected,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(100));
        let s = e.to_string();
        assert!(s.contains("/fe/state") && s.contains("InitWait"), "{s}");
    }

    #[test]
    fn wait_for_state_fails_fast_when_the_node_disappears_and_waits_for_a_new_one() {
        let store = MemStore::new();
        let me = Arc::new(store.connect(0).unwrap());
        let peer = store.connect(0).unwrap();
        // Absent at first: waited for.
        let waiter = {
            let me = me.clone();
            std::thread::spawn(move || {
                wait_for_state(
                    &*me,
                    "/fe/state",
                    |s| s == XenbusState::Connected,
                    Duration::from_secs(10),
                )
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        peer.write(TxId::NONE, "/fe/state", b"2").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let start = Instant::now();
        peer.rm(TxId::NONE, "/fe").unwrap();
        let e = waiter.join().unwrap().unwrap_err();
        assert!(matches!(e, XsError::NodeVanished { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn wait_for_state_rejects_garbage_and_notices_a_lost_connection() {
        let c = store_with(&[("/fe/state", b"nonsense")]);
        let e = wait_for_state(&c, "/fe/state", |_| true, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("nonsense"), "{e}");

        let store = MemStore::new();
        store.create_domain(5);
        let me = Arc::new(store.connect(0).unwrap());
        me.write(TxId::NONE, "/fe/state", b"1").unwrap();
        let waiter = {
            let me = me.clone();
            std::thread::spawn(move || {
                wait_for_state(&*me, "/fe/state", |_| false, Duration::from_secs(30))
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        let start = Instant::now();
        store.disconnect_all("test");
        assert!(waiter.join().unwrap().unwrap_err().is_connection_lost());
        assert!(start.elapsed() < Duration::from_secs(1));
        let _ = Perm::owner(0);
    }
}
