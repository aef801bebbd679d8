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

    /// A table for people, one line per device, then the process line.
    pub fn to_table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{:>5} {:>5} {:<7} {:<12} {:<8} {:>10} {:>12} {:>12} {:>9} {:>10} {:>8} {:>9} {:>9} {:>5} {:>6}",
            "DOMID",
            "DEVID",
            "TYPE",
            "STATE",
            "DMA",
            "REQUESTS",
            "BYTES_READ",
            "BYTES_WRIT",
            "MAP_CALLS",
            "PAGES_MAP",
            "RESIDENT",
            "NOTIF_TX",
            "NOTIF_RX",
            "PORTS",
            "ERRORS"
        );
        for d in &self.devices {
            let _ = writeln!(
                o,
                "{:>5} {:>5} {:<7} {:<12} {:<8} {:>10} {:>12} {:>12} {:>9} {:>10} {:>8} {:>9} {:>9} {:>5} {:>6}",
                d.domid,
                d.devid,
                d.kind,
                d.state,
                d.strategy,
                d.requests,
                d.bytes_read,
                d.bytes_written,
                d.map_calls,
                d.pages_mapped,
                d.resident_pages,
                d.notifications_sent,
                d.notifications_received,
                d.ports,
                d.errors
            );
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
        assert!(t.contains("2 Xen mappings"));
        assert!(j.contains("\"domains\":[{\"domid\":3,\"mapped_pages\":70,\"budget\":768}]"));
        assert!(t.contains("domain 3: 70 of 768 budgeted pages mapped"));
    }
}
