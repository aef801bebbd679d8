//! What a device thread does while its poll fires: serving the queues after notifications (and
//! after the host side of a console or a net device has input), publishing its counters, and
//! the dispatch of the poll's tokens to the state machine (`super`) and the data path.

use std::ops::ControlFlow;
use std::time::Instant;

use mio::Registry;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xen::platform::{EventChannels, Platform};

use super::data_path::{Budget, blk_request_cap, deliver_console_input, serve_queue};
use super::model::{Model, Phase, error_chain};
use super::net_path::deliver_net_input;
use super::{DeviceToken, Machine};
use crate::event_loop::EventHandler;
use crate::stats::DeviceStats;

impl<P: Platform> Machine<'_, P> {
    /// Serves every queue that has work (after a notification, a connect, or a budget).
    pub(super) fn serve(&mut self, registry: &Registry, notified: &[usize]) {
        let Phase::Connected(conn) = &mut self.phase else {
            return;
        };
        let Some(model) = self.model.as_mut() else {
            return;
        };
        for &q in notified {
            if let Some(qr) = conn.queues.get_mut(q) {
                qr.busy = true;
            }
        }
        let blk_cap = match model {
            Model::Blk(b) => {
                let c = b.config(
                    1,
                    u16::try_from(self.ctx.config.max_queue_size).unwrap_or(u16::MAX),
                );
                blk_request_cap(c.size_max, c.seg_max)
            }
            _ => 0,
        };
        let mut budget = Budget::new(blk_cap);
        let mut result = Ok(());
        let n = conn.queues.len();
        let first = conn.next_first % n.max(1);
        conn.next_first = first + 1;
        for q in (0..n).map(|i| (first + i) % n) {
            if !conn.queues[q].busy {
                continue;
            }
            if budget.exhausted() {
                // Still busy: served after the inbox.
                break;
            }
            conn.queues[q].busy = false;
            result = serve_queue(conn, q, model, registry, self.totals, &mut budget);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            match model {
                Model::Console(c) => {
                    result = deliver_console_input(conn, c, registry, self.totals);
                }
                Model::Net(n) => result = deliver_net_input(conn, n, self.totals),
                _ => {}
            }
        }
        if let Err(e) = result {
            let reason = format!("protocol error: {}", error_chain(&e));
            self.begin_close(registry, Some(reason), None);
        }
    }

    pub(super) fn handle_events(&mut self, registry: &Registry) {
        let Phase::Connected(conn) = &mut self.phase else {
            return;
        };
        let ports = match conn.events.pending() {
            Ok(p) => p,
            Err(e) => {
                let reason = format!("event channel: {}", error_chain(&e));
                self.begin_close(registry, Some(reason), None);
                return;
            }
        };
        self.totals.notifications_received += ports.len() as u64;
        let queues: Vec<usize> = ports
            .iter()
            .filter_map(|p| conn.queues.iter().position(|q| q.port.port() == *p))
            .collect();
        self.serve(registry, &queues);
        if let Phase::Connected(conn) = &self.phase {
            if let Err(e) = conn.events.unmask(&ports) {
                let reason = format!("event channel: {}", error_chain(&e));
                self.begin_close(registry, Some(reason), None);
            }
        }
    }

    pub(super) fn publish_stats(&self) {
        let mut s = DeviceStats {
            domid: self.ctx.frontend,
            devid: self.ctx.devid,
            kind: self.kind().map_or("?", DeviceKind::name),
            state: self.phase.name(),
            strategy: "-",
            last_error: self.last_error.clone(),
            ..Default::default()
        };
        let t = *self.totals;
        let mut map = t.map;
        if let Phase::Connected(conn) = &self.phase {
            s.strategy = conn.strategy.name();
            s.resident_pages = conn.resident_pages();
            s.ports = conn.queues.len() as u64;
            map.map_calls += conn.counters.map_calls;
            map.pages_mapped += conn.counters.pages_mapped;
        }
        s.map_calls = map.map_calls;
        s.pages_mapped = map.pages_mapped;
        s.notifications_sent = t.notifications_sent;
        s.notifications_received = t.notifications_received;
        s.requests = t.requests;
        s.errors = t.errors;
        s.oversized = t.oversized;
        match &self.model {
            Some(Model::Blk(b)) => {
                let c = b.counters();
                s.bytes_read = c.bytes_read;
                s.bytes_written = c.bytes_written;
                s.errors += c.errors;
            }
            Some(Model::Console(c)) => {
                let c = c.counters();
                s.bytes_read = c.bytes_in;
                s.bytes_written = c.bytes_out;
            }
            Some(Model::Rng(r)) => s.bytes_read = r.bytes_served(),
            Some(Model::Net(n)) => {
                let c = n.counters();
                s.bytes_read = c.rx_bytes;
                s.bytes_written = c.tx_bytes;
                s.dropped = c.dropped();
            }
            None => {}
        }
        let mut slot = self.ctx.stats.lock().unwrap_or_else(|p| p.into_inner());
        // Byte counters of a model that was dropped (after an error) are kept.
        if self.model.is_none() && slot.kind == s.kind {
            s.bytes_read = s.bytes_read.max(slot.bytes_read);
            s.bytes_written = s.bytes_written.max(slot.bytes_written);
        }
        *slot = s;
    }
}

impl<P: Platform> EventHandler<DeviceToken> for Machine<'_, P> {
    fn deadline(&self) -> Option<Instant> {
        if self.dirty || self.start.is_some() {
            return Some(Instant::now());
        }
        match &self.phase {
            Phase::Connected(conn) if conn.queues.iter().any(|q| q.busy) => Some(Instant::now()),
            Phase::Closing { deadline, .. } => *deadline,
            _ => None,
        }
    }

    fn handle_event(&mut self, token: DeviceToken, registry: &Registry) -> ControlFlow<()> {
        match token {
            DeviceToken::Wake => self.drain_inbox(registry),
            DeviceToken::FrontendWatch => {
                if let Some(w) = self.fe_watch {
                    while let Ok(Some(_)) = w.try_next() {}
                }
                // The frontend wrote its state after the error: a write of `1` now is a
                // request to start over, even if it rewrote the value it already had.
                if let Phase::Closed {
                    frontend_left_init, ..
                } = &mut self.phase
                {
                    *frontend_left_init = true;
                }
                self.dirty = true;
            }
            DeviceToken::Events => self.handle_events(registry),
            DeviceToken::ConsoleIo => {
                if let Some(Model::Console(c)) = &mut self.model {
                    c.io_ready(registry);
                }
                self.serve(registry, &[]);
            }
            DeviceToken::NetIo => self.serve(registry, &[]),
            DeviceToken::ConsoleListener => {
                if let Some(Model::Console(c)) = &mut self.model {
                    c.accept(registry);
                }
                self.serve(registry, &[]);
            }
        }
        if self.forget {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn handle_timeout(&mut self, registry: &Registry) -> ControlFlow<()> {
        if let Some(start) = self.start.take() {
            self.begin(registry, start);
        }
        let deadline_passed = matches!(
            self.phase,
            Phase::Closing { deadline: Some(d), .. } if Instant::now() >= d
        );
        if self.dirty || deadline_passed {
            self.dirty = false;
            self.step(registry);
        }
        if matches!(&self.phase, Phase::Connected(c) if c.queues.iter().any(|q| q.busy)) {
            self.serve(registry, &[]);
        }
        self.publish_stats();
        if self.forget {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}
