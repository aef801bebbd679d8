//! What both ends and the hypervisor counted for one device: the figures the loopback binary
//! prints when it stops and the benchmark prints per request.
//!
//! This module owns three snapshots and their differences: the frontend's (requests,
//! notifications, bytes copied, grants), the backend daemon's (requests, map calls, pages
//! mapped, notifications) and the loopback hypervisor's map records (grant maps and unmaps,
//! foreign maps, grant copies that Dom0 made of the frontend's memory). It only reads
//! counters; it never resets or interprets them beyond arithmetic.

use std::fmt::Write as _;

use xenvirtio_backend::stats::DeviceStats;
use xenvirtio_frontend::blk::BlkStats;
use xenvirtio_xen::DomId;
use xenvirtio_xen::loopback::{LoopbackXen, MapKind};

use crate::pair::BACKEND_DOMID;

/// What the frontend counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontendCounts {
    /// Requests completed.
    pub requests: u64,
    /// Bytes read and written by them.
    pub bytes: u64,
    /// Available-buffer notifications sent to the backend.
    pub notifications_sent: u64,
    /// Used-buffer notifications received from the backend.
    pub notifications_received: u64,
    /// Kicks the backend asked the frontend to skip (EVENT_IDX).
    pub kicks_suppressed: u64,
    /// Bytes copied between callers' memory and DMA memory (the bounce of the per-buffer
    /// rule), plus what the caller said it copied itself.
    pub bytes_copied: u64,
    /// Grant references held now (not a difference: the value at the later snapshot).
    pub grants_held: u64,
}

impl FrontendCounts {
    /// From a blk device's counters.
    pub fn from_blk(s: &BlkStats) -> FrontendCounts {
        FrontendCounts {
            requests: s.requests,
            bytes: s.bytes,
            notifications_sent: s.events.sent,
            notifications_received: s.events.received,
            kicks_suppressed: s.events.suppressed,
            bytes_copied: s.dma.bytes_bounced,
            grants_held: s.dma.grants_held,
        }
    }
}

/// What the backend daemon counted for the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCounts {
    /// Requests (chains) completed.
    pub requests: u64,
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Map operations (one batched ioctl each on real Xen).
    pub map_calls: u64,
    /// Pages those mapped.
    pub pages_mapped: u64,
    /// Used-buffer notifications sent.
    pub notifications_sent: u64,
    /// Available-buffer notifications received.
    pub notifications_received: u64,
    /// Requests answered with an error, and device errors.
    pub errors: u64,
    /// Pages mapped now (not a difference: the value at the later snapshot).
    pub resident_pages: u64,
}

impl BackendCounts {
    /// From the daemon's record of the device.
    pub fn from_device(s: &DeviceStats) -> BackendCounts {
        BackendCounts {
            requests: s.requests,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
            map_calls: s.map_calls,
            pages_mapped: s.pages_mapped,
            notifications_sent: s.notifications_sent,
            notifications_received: s.notifications_received,
            errors: s.errors,
            resident_pages: s.resident_pages,
        }
    }
}

/// What the loopback hypervisor recorded of Dom0 reaching the frontend domain's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HypervisorCounts {
    /// Grant mappings (batches of refs mapped in one call).
    pub grant_maps: u64,
    /// Pages in them.
    pub grant_pages: u64,
    /// Grant mappings that were unmapped again.
    pub grant_unmaps: u64,
    /// Foreign mappings (`direct`).
    pub foreign_maps: u64,
    /// Grant-copy segments.
    pub grant_copies: u64,
    /// Mappings still in place (not a difference).
    pub live: u64,
    /// The record buffer was full, so older records were forgotten and these counts are low.
    pub truncated: bool,
}

impl HypervisorCounts {
    /// Counts the records of Dom0 mapping `frontend`'s memory.
    pub fn read(hv: &LoopbackXen, frontend: DomId) -> HypervisorCounts {
        let records = hv.records();
        let mut c = HypervisorCounts {
            truncated: records.len() >= hv.config().record_limit,
            ..HypervisorCounts::default()
        };
        for r in records
            .iter()
            .filter(|r| r.mapper == BACKEND_DOMID && r.owner == frontend)
        {
            match &r.kind {
                MapKind::Grant { refs } => {
                    c.grant_maps += 1;
                    c.grant_pages += refs.len() as u64;
                    if !r.live {
                        c.grant_unmaps += 1;
                    }
                }
                MapKind::Foreign => c.foreign_maps += 1,
                MapKind::Copy { .. } => c.grant_copies += 1,
            }
            if r.live {
                c.live += 1;
            }
        }
        c
    }
}

/// All three, for one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// The frontend's counts.
    pub frontend: FrontendCounts,
    /// The daemon's counts.
    pub backend: BackendCounts,
    /// The hypervisor's records.
    pub hypervisor: HypervisorCounts,
}

impl Counters {
    /// What happened between `earlier` and `self` (levels such as grants held, resident
    /// pages and live mappings keep `self`'s value).
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters::combine(earlier, self, |e, s| s.saturating_sub(e))
    }

    /// The sum of two sets of counts (for counts over several runs); levels are `other`'s.
    pub fn plus(&self, other: &Counters) -> Counters {
        Counters::combine(self, other, |a, b| a + b)
    }

    /// `op(a, b)` for every count; levels are `b`'s, and `truncated` is either's.
    fn combine(a: &Counters, b: &Counters, op: impl Fn(u64, u64) -> u64) -> Counters {
        let (f, g) = (&a.frontend, &b.frontend);
        let (c, d) = (&a.backend, &b.backend);
        let (h, i) = (&a.hypervisor, &b.hypervisor);
        Counters {
            frontend: FrontendCounts {
                requests: op(f.requests, g.requests),
                bytes: op(f.bytes, g.bytes),
                notifications_sent: op(f.notifications_sent, g.notifications_sent),
                notifications_received: op(f.notifications_received, g.notifications_received),
                kicks_suppressed: op(f.kicks_suppressed, g.kicks_suppressed),
                bytes_copied: op(f.bytes_copied, g.bytes_copied),
                grants_held: g.grants_held,
            },
            backend: BackendCounts {
                requests: op(c.requests, d.requests),
                bytes_read: op(c.bytes_read, d.bytes_read),
                bytes_written: op(c.bytes_written, d.bytes_written),
                map_calls: op(c.map_calls, d.map_calls),
                pages_mapped: op(c.pages_mapped, d.pages_mapped),
                notifications_sent: op(c.notifications_sent, d.notifications_sent),
                notifications_received: op(c.notifications_received, d.notifications_received),
                errors: op(c.errors, d.errors),
                resident_pages: d.resident_pages,
            },
            hypervisor: HypervisorCounts {
                grant_maps: op(h.grant_maps, i.grant_maps),
                grant_pages: op(h.grant_pages, i.grant_pages),
                grant_unmaps: op(h.grant_unmaps, i.grant_unmaps),
                foreign_maps: op(h.foreign_maps, i.foreign_maps),
                grant_copies: op(h.grant_copies, i.grant_copies),
                live: i.live,
                truncated: h.truncated || i.truncated,
            },
        }
    }

    /// A few lines for an operator: totals, then the same per request.
    pub fn render(&self) -> String {
        let f = &self.frontend;
        let b = &self.backend;
        let h = &self.hypervisor;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "frontend: {} requests, {} bytes, {} notifications sent, {} received, {} kicks \
             suppressed, {} bytes copied, {} grants held",
            f.requests,
            f.bytes,
            f.notifications_sent,
            f.notifications_received,
            f.kicks_suppressed,
            f.bytes_copied,
            f.grants_held
        );
        let _ = writeln!(
            o,
            "backend:  {} requests, {} bytes read, {} bytes written, {} map calls ({} pages), \
             {} notifications sent, {} received, {} errors, {} pages mapped now",
            b.requests,
            b.bytes_read,
            b.bytes_written,
            b.map_calls,
            b.pages_mapped,
            b.notifications_sent,
            b.notifications_received,
            b.errors,
            b.resident_pages
        );
        let _ = writeln!(
            o,
            "hypervisor: {} grant maps ({} pages), {} grant unmaps, {} foreign maps, {} grant \
             copies, {} mappings live{}",
            h.grant_maps,
            h.grant_pages,
            h.grant_unmaps,
            h.foreign_maps,
            h.grant_copies,
            h.live,
            if h.truncated {
                " (older records were dropped: counts are low)"
            } else {
                ""
            }
        );
        let per = PerRequest::of(self);
        let _ = write!(
            o,
            "per request: {:.2} map calls, {:.2} grant maps, {:.2} unmaps, {:.2} foreign maps, \
             {:.2} notifications to the backend, {:.2} to the frontend, {:.0} bytes copied",
            per.map_calls,
            per.grant_maps,
            per.grant_unmaps,
            per.foreign_maps,
            per.notifications_to_backend,
            per.notifications_to_frontend,
            per.bytes_copied
        );
        o
    }
}

/// [`Counters`] divided by the frontend's completed requests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerRequest {
    /// The backend's map calls.
    pub map_calls: f64,
    /// The hypervisor's grant maps.
    pub grant_maps: f64,
    /// The hypervisor's grant unmaps.
    pub grant_unmaps: f64,
    /// The hypervisor's foreign maps.
    pub foreign_maps: f64,
    /// Notifications the frontend sent.
    pub notifications_to_backend: f64,
    /// Notifications the backend sent.
    pub notifications_to_frontend: f64,
    /// Bytes copied by the frontend.
    pub bytes_copied: f64,
}

impl PerRequest {
    /// Per request of `c.frontend.requests` (all zero when there were none).
    pub fn of(c: &Counters) -> PerRequest {
        let n = c.frontend.requests;
        let per = |x: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
        PerRequest {
            map_calls: per(c.backend.map_calls),
            grant_maps: per(c.hypervisor.grant_maps),
            grant_unmaps: per(c.hypervisor.grant_unmaps),
            foreign_maps: per(c.hypervisor.foreign_maps),
            notifications_to_backend: per(c.frontend.notifications_sent),
            notifications_to_frontend: per(c.backend.notifications_sent),
            bytes_copied: per(c.frontend.bytes_copied),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_counts_and_keeps_levels() {
        let mut early = Counters::default();
        early.frontend.requests = 10;
        early.frontend.grants_held = 99;
        early.backend.map_calls = 4;
        early.backend.resident_pages = 7;
        early.hypervisor.grant_maps = 3;
        let mut late = early;
        late.frontend.requests = 30;
        late.frontend.grants_held = 5;
        late.backend.map_calls = 44;
        late.backend.resident_pages = 1;
        late.hypervisor.grant_maps = 23;
        let d = late.since(&early);
        assert_eq!(d.frontend.requests, 20);
        assert_eq!(d.frontend.grants_held, 5);
        assert_eq!(d.backend.map_calls, 40);
        assert_eq!(d.backend.resident_pages, 1);
        assert_eq!(d.hypervisor.grant_maps, 20);
        let per = PerRequest::of(&d);
        assert_eq!(per.map_calls, 2.0);
        assert_eq!(per.grant_maps, 1.0);
        assert_eq!(PerRequest::of(&Counters::default()).map_calls, 0.0);
    }
}
