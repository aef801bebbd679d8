//! `list`: every virtio device a backend domain serves, read from its backend directories and
//! the frontend directories they name, as a table or as JSON.
//!
//! Half of what is shown was written by guests (frontend state, `dma`, `error`), so every
//! string is escaped before it reaches a terminal ([`printable`]): a guest must not be able to
//! move the cursor or rewrite the operator's screen. A device that vanishes while it is being
//! read is left out; one with odd values is shown with them.

use serde::{Serialize, Serializer};
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::protocol::{backend_keys as bk, frontend_keys as fk};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{DomId, TxId, XenStore};

use super::{AdminError, domain_name, numeric_children};

/// Longest value shown in the table (longer ones end in `...`).
const MAX_SHOWN: usize = 160;

/// A `state` node as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateView {
    /// No `state` node.
    Absent,
    /// A valid state.
    State(XenbusState),
    /// Something that is not a state (escaped).
    Invalid(String),
}

impl StateView {
    fn of(value: Option<Vec<u8>>) -> StateView {
        match value {
            None => StateView::Absent,
            Some(v) => match XenbusState::from_node_value(&v) {
                Some(s) => StateView::State(s),
                None => StateView::Invalid(printable(&String::from_utf8_lossy(&v), 32)),
            },
        }
    }

    fn label(&self) -> String {
        match self {
            StateView::Absent => "-".to_owned(),
            StateView::State(s) => s.name().to_owned(),
            StateView::Invalid(raw) => format!("invalid({raw})"),
        }
    }
}

impl Serialize for StateView {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StateView::Absent => s.serialize_none(),
            _ => s.serialize_str(&self.label()),
        }
    }
}

/// One device, as `list` shows it. In JSON, absent keys are `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceEntry {
    /// The frontend domain.
    pub frontend: DomId,
    /// Its name, if it has one.
    pub frontend_name: Option<String>,
    /// The devid.
    pub devid: u32,
    /// `blk`, `console`, `rng` or `net`; otherwise the raw `type` value (`-` if none).
    #[serde(rename = "type")]
    pub device_type: String,
    /// The backend state.
    pub backend_state: StateView,
    /// The frontend state.
    pub frontend_state: StateView,
    /// `online` (`false` while a detach is in progress).
    pub online: Option<bool>,
    /// The strategy the frontend uses (frontend `dma` key, written at Initialised).
    pub dma: Option<String>,
    /// The strategy the operator pinned (backend `dma` key): `auto` or a strategy.
    pub dma_setting: Option<String>,
    /// blk: the image.
    pub image: Option<String>,
    /// blk: `r` or `w`.
    pub mode: Option<String>,
    /// console: `pty` or `socket:<path>`.
    pub console: Option<String>,
    /// console: the pty the backend opened.
    pub tty: Option<String>,
    /// net: the guest's MAC address.
    pub mac: Option<String>,
    /// net: the TAP the backend made.
    pub tap: Option<String>,
    /// net: the bridge it joins.
    pub bridge: Option<String>,
    /// The backend's `error` node.
    pub backend_error: Option<String>,
    /// The frontend's `error` node.
    pub frontend_error: Option<String>,
    /// The backend directory.
    pub backend_dir: String,
    /// The frontend directory.
    pub frontend_dir: String,
}

/// Every virtio device that domain `backend` serves (to `frontend` only, if given), ordered by
/// frontend domid then devid.
pub fn list(
    store: &dyn XenStore,
    backend: DomId,
    frontend: Option<DomId>,
) -> Result<Vec<DeviceEntry>, AdminError> {
    let root = xenbus::backend_root(backend);
    let frontends: Vec<DomId> = match frontend {
        Some(f) => vec![f],
        None => numeric_children(store, TxId::NONE, &root)
            .map_err(AdminError::store(format!("listing {root}")))?,
    };
    let mut out = Vec::new();
    for f in frontends {
        let per_frontend = format!("{root}/{f}");
        let devids: Vec<u32> = numeric_children(store, TxId::NONE, &per_frontend)
            .map_err(AdminError::store(format!("listing {per_frontend}")))?;
        if devids.is_empty() {
            continue;
        }
        let name = domain_name(store, f)?;
        for devid in devids {
            if let Some(entry) = read_entry(store, backend, f, name.clone(), devid)? {
                out.push(entry);
            }
        }
    }
    Ok(out)
}

fn read_entry(
    store: &dyn XenStore,
    backend: DomId,
    frontend: DomId,
    frontend_name: Option<String>,
    devid: u32,
) -> Result<Option<DeviceEntry>, AdminError> {
    let be = xenbus::backend_dir(backend, frontend, devid);
    let fe = xenbus::frontend_dir(frontend, devid);
    let raw = |path: String| {
        store
            .read_optional(TxId::NONE, &path)
            .map_err(AdminError::store(format!("reading {path}")))
    };
    let text = |path: String| -> Result<Option<String>, AdminError> {
        Ok(raw(path)?.map(|v| printable(&String::from_utf8_lossy(&v), usize::MAX)))
    };
    if raw(be.clone())?.is_none() {
        return Ok(None); // detached meanwhile
    }
    let device_type = match text(format!("{be}/{}", bk::TYPE))? {
        None => "-".to_owned(),
        Some(t) => DeviceKind::parse_type_string(&t)
            .and_then(DeviceKind::from_device_id)
            .map_or(t, |k| k.name().to_owned()),
    };
    Ok(Some(DeviceEntry {
        frontend,
        frontend_name: frontend_name.map(|n| printable(&n, usize::MAX)),
        devid,
        device_type,
        backend_state: StateView::of(raw(xenbus::state_path(&be))?),
        frontend_state: StateView::of(raw(xenbus::state_path(&fe))?),
        online: raw(format!("{be}/{}", bk::ONLINE))?.map(|v| v.trim_ascii() == b"1"),
        dma: text(format!("{fe}/{}", fk::DMA))?,
        dma_setting: text(format!("{be}/{}", bk::DMA))?,
        image: text(format!("{be}/{}", bk::PARAMS))?,
        mode: text(format!("{be}/{}", bk::MODE))?,
        console: text(format!("{be}/{}", bk::CONSOLE))?,
        tty: text(format!("{be}/{}", bk::TTY))?,
        mac: text(format!("{be}/{}", bk::MAC))?,
        tap: text(format!("{be}/{}", bk::TAP))?,
        bridge: text(format!("{be}/{}", bk::BRIDGE))?,
        backend_error: text(format!("{be}/{}", bk::ERROR))?,
        frontend_error: text(format!("{fe}/{}", fk::ERROR))?,
        backend_dir: be,
        frontend_dir: fe,
    }))
}

/// `text` made safe for a terminal: control characters (including newlines and escape
/// sequences' ESC) become Rust escapes, and past `max` characters it is cut with `...`.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max.saturating_add(3)));
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        if c.is_control() || c == '\u{7f}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn shorten(text: &str) -> String {
    printable(text, MAX_SHOWN)
}

/// The table `list` prints: a header, then one line per device. Nothing but the header for
/// no device.
pub fn render_table(entries: &[DeviceEntry]) -> String {
    const HEADER: [&str; 8] = [
        "DOMAIN",
        "DEVID",
        "TYPE",
        "BACKEND",
        "FRONTEND",
        "DMA",
        "IMAGE/CONSOLE",
        "ERROR",
    ];
    let rows: Vec<[String; 8]> = entries
        .iter()
        .map(|e| {
            let domain = match &e.frontend_name {
                Some(n) => format!("{} ({})", e.frontend, shorten(n)),
                None => e.frontend.to_string(),
            };
            let mut backend_state = e.backend_state.label();
            if e.online == Some(false) {
                backend_state.push_str(",offline");
            }
            let dma = match (&e.dma, &e.dma_setting) {
                (Some(d), _) => shorten(d),
                (None, Some(s)) if s != "auto" => format!("({})", shorten(s)),
                _ => "-".to_owned(),
            };
            let target = match (&e.image, &e.console) {
                (Some(image), _) => {
                    let ro = if e.mode.as_deref() == Some("r") {
                        " (ro)"
                    } else {
                        ""
                    };
                    format!("{}{ro}", shorten(image))
                }
                (None, Some(console)) => match &e.tty {
                    Some(tty) => format!("{} {}", shorten(console), shorten(tty)),
                    None => shorten(console),
                },
                (None, None) => match (&e.mac, &e.tap, &e.bridge) {
                    (Some(mac), tap, bridge) => {
                        let on = match (tap, bridge) {
                            (Some(t), Some(b)) => format!(" {} on {}", shorten(t), shorten(b)),
                            (Some(t), None) => format!(" {}", shorten(t)),
                            (None, Some(b)) => format!(" on {}", shorten(b)),
                            (None, None) => String::new(),
                        };
                        format!("{}{on}", shorten(mac))
                    }
                    _ => "-".to_owned(),
                },
            };
            let error = [
                ("backend", &e.backend_error),
                ("frontend", &e.frontend_error),
            ]
            .iter()
            .filter_map(|(who, err)| err.as_ref().map(|m| format!("{who}: {}", shorten(m))))
            .collect::<Vec<_>>()
            .join("; ");
            [
                domain,
                e.devid.to_string(),
                e.device_type.clone(),
                backend_state,
                e.frontend_state.label(),
                dma,
                target,
                error,
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(cell);
                l.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&HEADER);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{AttachRequest, ConsoleOutput, attach};
    use xenvirtio_xenstore::MemStore;

    const N: TxId = TxId::NONE;

    #[test]
    fn printable_escapes_control_characters_and_cuts() {
        assert_eq!(printable("plain text", 100), "plain text");
        assert_eq!(printable("a\u{1b}[2Jb\nc", 100), "a\\u{1b}[2Jb\\nc");
        assert_eq!(printable("\u{9b}31m\u{7f}", 100), "\\u{9b}31m\\u{7f}");
        assert_eq!(printable("abcdef", 3), "abc...");
        assert_eq!(printable("ünïcödé", 100), "ünïcödé");
    }

    #[test]
    fn an_empty_backend_lists_only_the_header() {
        let daemon = MemStore::new();
        let dom0 = daemon.connect(0).unwrap();
        let entries = list(&dom0, 0, None).unwrap();
        assert!(entries.is_empty());
        let table = render_table(&entries);
        assert_eq!(table.lines().count(), 1);
        assert!(table.starts_with("DOMAIN"), "{table}");
    }

    #[test]
    fn devices_show_states_names_and_what_guests_wrote_escaped() {
        let daemon = MemStore::new();
        let dom0 = daemon.connect(0).unwrap();
        dom0.write(N, "/local/domain/0/domid", b"0").unwrap();
        for (domid, name) in [(5, "guest1"), (12, "guest2")] {
            daemon.start_guest(domid).unwrap();
            dom0.write(N, &format!("/local/domain/{domid}/name"), name.as_bytes())
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.img");
        std::fs::write(&image, [0u8; 512]).unwrap();
        let mut blk = AttachRequest::blk(12, &image);
        blk.readonly = true;
        let blk = attach(&dom0, &blk).unwrap();
        assert_eq!(blk.backend_dir, "/local/domain/0/backend/virtio/12/0");
        let mut console = AttachRequest::new(5, DeviceKind::Console);
        console.console = Some(ConsoleOutput::Pty);
        let console = attach(&dom0, &console).unwrap();
        let rng = attach(&dom0, &AttachRequest::new(5, DeviceKind::Rng)).unwrap();
        // The backend and the guest move on; the guest writes nasty things.
        dom0.write(N, &format!("{}/state", console.backend_dir), b"4")
            .unwrap();
        dom0.write(N, &format!("{}/tty", console.backend_dir), b"/dev/pts/7")
            .unwrap();
        let guest = daemon.connect(5).unwrap();
        guest
            .write(N, &format!("{}/state", console.frontend_dir), b"4")
            .unwrap();
        guest
            .write(N, &format!("{}/dma", console.frontend_dir), b"grant")
            .unwrap();
        guest
            .write(N, &format!("{}/state", rng.frontend_dir), b"banana")
            .unwrap();
        guest
            .write(N, &format!("{}/error", rng.frontend_dir), b"no\x1b[2J way")
            .unwrap();
        dom0.write(N, &format!("{}/error", rng.backend_dir), b"bad ring")
            .unwrap();
        dom0.write(N, &format!("{}/state", rng.backend_dir), b"6")
            .unwrap();

        let entries = list(&dom0, 0, None).unwrap();
        let keys: Vec<(DomId, u32, &str)> = entries
            .iter()
            .map(|e| (e.frontend, e.devid, e.device_type.as_str()))
            .collect();
        assert_eq!(keys, [(5, 0, "console"), (5, 1, "rng"), (12, 0, "blk")]);
        let c = &entries[0];
        assert_eq!(c.frontend_name.as_deref(), Some("guest1"));
        assert_eq!(c.backend_state, StateView::State(XenbusState::Connected));
        assert_eq!(c.frontend_state, StateView::State(XenbusState::Connected));
        assert_eq!(c.dma.as_deref(), Some("grant"));
        assert_eq!(c.tty.as_deref(), Some("/dev/pts/7"));
        let r = &entries[1];
        assert_eq!(r.frontend_state, StateView::Invalid("banana".into()));
        assert_eq!(r.frontend_error.as_deref(), Some("no\\u{1b}[2J way"));
        let b = &entries[2];
        assert_eq!(b.image.as_deref(), image.to_str());
        assert_eq!(b.mode.as_deref(), Some("r"));
        assert_eq!(b.backend_state, StateView::State(XenbusState::Initialising));

        let table = render_table(&entries);
        assert!(!table.contains('\u{1b}'), "{table}");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        let cols = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            cols(lines[1]),
            [
                "5",
                "(guest1)",
                "0",
                "console",
                "Connected",
                "Connected",
                "grant",
                "pty",
                "/dev/pts/7"
            ]
        );
        assert!(
            lines[2].contains("Closed") && lines[2].contains("invalid(banana)"),
            "{table}"
        );
        assert!(
            lines[2].ends_with("backend: bad ring; frontend: no\\u{1b}[2J way"),
            "{table}"
        );
        assert!(
            lines[3].contains(&format!("{} (ro)", image.display())),
            "{table}"
        );

        // JSON: every entry, states by name, absent keys null.
        let json: serde_json::Value = serde_json::to_value(&entries).unwrap();
        assert_eq!(json[0]["type"], "console");
        assert_eq!(json[0]["backend_state"], "Connected");
        assert_eq!(json[2]["frontend_state"], "Initialising");
        assert_eq!(json[2]["dma"], serde_json::Value::Null);
        assert_eq!(json[2]["dma_setting"], "auto");

        // Filter by frontend.
        let only: Vec<u32> = list(&dom0, 0, Some(12))
            .unwrap()
            .iter()
            .map(|e| e.devid)
            .collect();
        assert_eq!(only, [0]);
        assert!(list(&dom0, 0, Some(99)).unwrap().is_empty());
    }

    #[test]
    fn a_net_device_shows_its_mac_tap_and_bridge() {
        let daemon = MemStore::new();
        let dom0 = daemon.connect(0).unwrap();
        dom0.write(N, "/local/domain/0/domid", b"0").unwrap();
        daemon.start_guest(5).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sw.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut net = AttachRequest::new(5, DeviceKind::Net);
        net.net.mac = Some("00:16:3e:00:05:01".parse().unwrap());
        net.net.socket = Some(sock);
        let out = attach(&dom0, &net).unwrap();
        // What a TAP-backed device shows once the daemon made its TAP.
        dom0.write(N, &format!("{}/bridge", out.backend_dir), b"xenbr0")
            .unwrap();
        dom0.write(N, &format!("{}/tap", out.backend_dir), b"xvn5.0")
            .unwrap();
        let entries = list(&dom0, 0, None).unwrap();
        assert_eq!(entries[0].device_type, "net");
        assert_eq!(entries[0].mac.as_deref(), Some("00:16:3e:00:05:01"));
        let table = render_table(&entries);
        assert!(
            table.contains("00:16:3e:00:05:01 xvn5.0 on xenbr0"),
            "{table}"
        );
    }

    #[test]
    fn unknown_types_show_raw_and_offline_devices_are_marked() {
        let daemon = MemStore::new();
        let dom0 = daemon.connect(0).unwrap();
        let be = xenbus::backend_dir(0, 3, 9);
        dom0.write(N, &format!("{be}/type"), b"virtio,device1a")
            .unwrap();
        dom0.write(N, &format!("{be}/state"), b"5").unwrap();
        dom0.write(N, &format!("{be}/online"), b"0").unwrap();
        dom0.write(N, "/local/domain/0/backend/virtio/3/notanumber/state", b"1")
            .unwrap();
        let entries = list(&dom0, 0, None).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].device_type, "virtio,device1a");
        assert_eq!(entries[0].frontend_state, StateView::Absent);
        let table = render_table(&entries);
        assert!(table.contains("Closing,offline"), "{table}");
    }
}
