//! What the daemon reports through its control socket (`xenvirtio-backend stats`): one record
//! per device and one for the process, rendered as a table or as JSON.
//!
//! This module owns the record types and their two renderings, and the count of Xen mappings
//! in `/proc/self/maps`. It holds no counters itself: device threads fill [`DeviceStats`] and
//! the daemon collects them.

use std::fmt::Write as _;

use xenvirtio_xen::DomId;

/// One device, as its thread last reported it. It is published after every batch of events,
/// so its names are static strings: publishing allocates nothing but the last error.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceStats {
    /// Frontend domain.
    pub domid: DomId,
    /// Device number.
    pub devid: u32,
    /// `blk`, `console`, `rng`, or `?` before the type is known.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The backend's xenbus state (`InitWait`, `Connected`, ...).
    pub state: &'static str,
    /// The DMA strategy of the current connection (`-` when not connected).
    pub strategy: &'static str,
    /// Requests (chains) completed.
    pub requests: u64,
    /// Bytes read: from the image (blk), from the host side to the guest (console), entropy
    /// served (rng).
    pub bytes_read: u64,
    /// Bytes written: to the image (blk), from the guest to the host side (console).
    pub bytes_written: u64,
    /// Map operations (batched ioctls on real Xen).
    pub map_calls: u64,
    /// Pages mapped by them.
    pub pages_mapped: u64,
    /// Pages mapped right now: rings, bounce pool, persistent grants, direct chunks.
    pub resident_pages: u64,
    /// Used-buffer notifications sent to the frontend.
    pub notifications_sent: u64,
    /// Available-buffer notifications received.
    pub notifications_received: u64,
    /// Event-channel ports bound right now.
    pub ports: u64,
    /// Requests answered with an error status, plus protocol and I/O errors of the device.
    pub errors: u64,
    /// Requests over the per-request cap (`docs/PROTOCOL.md` 10.2, 10.3): blk ones answered
    /// IOERR, console ones truncated. Neither mapped nor copied beyond the cap.
    pub oversized: u64,
    /// Frames dropped (net): too long, offloads not offered, no data, a receive buffer too
    /// small, or refused by the host side (`docs/PROTOCOL.md` 10.6). Never mapped beyond the
    /// frame's bound.
    pub dropped: u64,
    /// The last fatal error, as written to the `error` node.
    pub last_error: Option<String>,
}

/// The process as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcessStats {
    /// Devices known.
    pub devices: usize,
    /// Lines of `/proc/self/maps` that map a Xen device (`/dev/xen/gntdev`, `/dev/xen/privcmd`,
    /// `/proc/xen/privcmd`): grant and foreign mappings still in place.
    pub xen_mappings: usize,
    /// Event-channel ports bound by all devices.
    pub event_ports: u64,
}

/// One frontend domain's mapped pages against its budget (`--max-pages-per-domain`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DomainPages {
    /// Frontend domain.
    pub domid: DomId,
    /// Pages of it mapped now, by all its devices.
    pub mapped_pages: u64,
    /// Its budget.
    pub budget: u64,
}

/// A full report.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsReport {
    /// One record per device, ordered by domid then devid.
    pub devices: Vec<DeviceStats>,
    /// One record per frontend domain with pages mapped, by domid.
    pub domains: Vec<DomainPages>,
    /// The process record.
    pub process: ProcessStats,
}

/// Counts the lines of a `/proc/<pid>/maps` text that map a Xen device. Grant mappings show the
/// gntdev device, foreign mappings the privcmd device (`/proc/xen/privcmd` on xenfs setups).
pub fn count_xen_mappings(maps: &str) -> usize {
    maps.lines()
        .filter(|l| {
            l.ends_with("/dev/xen/gntdev")
                || l.ends_with("/dev/xen/privcmd")
                || l.ends_with("/proc/xen/privcmd")
        })
        .count()
}

/// [`count_xen_mappings`] of this process (0 if `/proc/self/maps` cannot be read).
pub fn own_xen_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| count_xen_mappings(&m))
        .unwrap_or(0)
}

impl StatsReport {
    /// One JSON object: `{"devices":[{...}],"process":{...}}`, fields in declaration order
    /// (`kind` as `type`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A table for people, one line per device (its error under it), then the process line.
    /// Columns are as wide as their header or their widest value, so nothing is cut.
    pub fn to_table(&self) -> String {
        const HEADERS: [&str; 15] = [
            "DOMID",
            "DEVID",
            "TYPE",
            "STATE",
            "DMA",
            "REQUESTS",
            "BYTES_READ",
            "BYTES_WRITTEN",
            "MAP_CALLS",
            "PAGES_MAPPED",
            "RESIDENT_PAGES",
            "NOTIFY_SENT",
            "NOTIFY_RECEIVED",
            "PORTS",
            "ERRORS",
        ];
        // TYPE, STATE and DMA are words: left-aligned; the rest are numbers.
        let left = |i: usize| (2..=4).contains(&i);
        let rows: Vec<[String; 15]> = self
            .devices
            .iter()
            .map(|d| {
                [
                    d.domid.to_string(),
                    d.devid.to_string(),
                    d.kind.to_string(),
                    d.state.to_string(),
                    d.strategy.to_string(),
                    d.requests.to_string(),
                    d.bytes_read.to_string(),
                    d.bytes_written.to_string(),
                    d.map_calls.to_string(),
                    d.pages_mapped.to_string(),
                    d.resident_pages.to_string(),
                    d.notifications_sent.to_string(),
                    d.notifications_received.to_string(),
                    d.ports.to_string(),
                    d.errors.to_string(),
                ]
            })
            .collect();
        let mut widths = HEADERS.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
            let mut out = String::new();
            for (i, cell) in cells.enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                let w = widths[i];
                if left(i) {
                    let _ = write!(out, "{cell:<w$}");
                } else {
                    let _ = write!(out, "{cell:>w$}");
                }
            }
            out.trim_end().to_owned()
        };
        let mut o = String::new();
        let _ = writeln!(o, "{}", line(&mut HEADERS.iter().copied()));
        for (d, row) in self.devices.iter().zip(&rows) {
            let _ = writeln!(o, "{}", line(&mut row.iter().map(String::as_str)));
            if let Some(e) = &d.last_error {
                let _ = writeln!(o, "{:>11} error: {e}", "");
            }
        }
        for d in &self.domains {
            let _ = writeln!(
                o,
                "domain {}: {} of {} budgeted pages mapped",
                d.domid, d.mapped_pages, d.budget
            );
        }
        let p = &self.process;
        let _ = writeln!(
            o,
            "process: {} devices, {} Xen mappings in /proc/self/maps, {} event-channel ports bound",
            p.devices, p.xen_mappings, p.event_ports
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xen_mappings_are_counted_by_device_path() {
        let maps = "\
7f0000000000-7f0000001000 rw-s 00000000 00:06 12 /dev/xen/gntdev
7f0000001000-7f0000002000 r--s 00001000 00:06 12 /dev/xen/gntdev
7f0000002000-7f0000202000 rw-s 00000000 00:06 13 /dev/xen/privcmd
7f0000400000-7f0000401000 rw-s 00000000 00:06 14 /dev/xen/gntalloc
7f0000500000-7f0000501000 r-xp 00000000 08:01 99 /usr/lib/libc.so.6
";
        assert_eq!(count_xen_mappings(maps), 3);
    }

    #[test]
    fn json_escapes_and_names_every_field() {
        let r = StatsReport {
            devices: vec![DeviceStats {
                domid: 3,
                devid: 1,
                kind: "blk",
                state: "Connected",
                strategy: "grant",
                requests: 7,
                last_error: Some("bad \"ring\"\n".into()),
                ..Default::default()
            }],
            process: ProcessStats {
                devices: 1,
                xen_mappings: 2,
                event_ports: 1,
            },
            domains: vec![DomainPages {
                domid: 3,
                mapped_pages: 70,
                budget: 768,
            }],
        };
        let j = r.to_json();
        assert!(j.starts_with("{\"devices\":[{\"domid\":3,\"devid\":1,\"type\":\"blk\""));
        assert!(j.contains("\"requests\":7"));
        assert!(j.contains("\"last_error\":\"bad \\\"ring\\\"\\n\""));
        assert!(j.ends_with("\"process\":{\"devices\":1,\"xen_mappings\":2,\"event_ports\":1}}"));
        let t = r.to_table();
        assert!(t.contains("Connected"));
        // Every header whole, and each value under the end of its (right-aligned) header.
        let mut lines = t.lines();
        let (head, row) = (lines.next().unwrap(), lines.next().unwrap());
        for h in [
            "BYTES_WRITTEN",
            "PAGES_MAPPED",
            "NOTIFY_SENT",
            "NOTIFY_RECEIVED",
            "ERRORS",
        ] {
            assert!(head.split_whitespace().any(|w| w == h), "{h}: {head}");
        }
        let end_of = |l: &str, word: &str| l.find(word).map(|i| i + word.len());
        assert_eq!(end_of(head, "REQUESTS"), end_of(row, " 7"), "{t}");
        assert!(row.starts_with("    3     1 blk  Connected grant"), "{t}");
        assert!(t.contains("2 Xen mappings"));
        assert!(j.contains("\"domains\":[{\"domid\":3,\"mapped_pages\":70,\"budget\":768}]"));
        assert!(t.contains("domain 3: 70 of 768 budgeted pages mapped"));
    }
}
