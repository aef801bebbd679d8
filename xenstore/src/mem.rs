//! [`MemStore`]: an in-memory xenstored with the C daemon's semantics, for unit tests.
//!
//! This module owns a node tree, the domains the "hypervisor" knows, and per-connection
//! watches and transactions. It copies the rules of Xen 4.17's `xenstored_core.c`,
//! `xenstored_watch.c`, `xenstored_transaction.c` and `xenstored_domain.c`:
//! - permissions: the first entry is the owner and the default; privileged domains (dom0) and
//!   owners may do everything; errors on absent nodes say EACCES unless the nearest existing
//!   ancestor grants the access asked for; new nodes inherit their parent's permissions, and a
//!   guest owns what it creates; entries naming domains that do not exist are ignored;
//! - quotas for guests: node record size (ENOSPC; a one-permission node holds at most 2015
//!   bytes), nodes per domain, watches, transactions, permissions per node;
//! - watches fire for the path and its descendants, only for connections that can read the
//!   node or its parent, with one event at registration; `rm` fires exact events for every
//!   removed descendant; `@introduceDomain` / `@releaseDomain` obey their own permissions;
//! - transactions record the generation of every node they touch at first access and commit
//!   with EAGAIN if any of those changed; watches fire at commit.
//!
//! It must never be used where a real daemon is meant: it has no persistence and no rings.
//! The integration tests in `tests/` run the same scenarios against the real daemon.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Errno, XsError};
use crate::perms::{DomId, Perm, PermKind};
use crate::store::{TxId, XenStore};
use crate::watch::{WatchEvent, WatchEvents, WatchHub};
use crate::wire::{self, DOMID_SELF, MsgType, REL_PATH_MAX};

/// Size of xenstored's on-disk record header (`struct xs_tdb_record_hdr`).
const RECORD_HEADER: usize = 24;
/// Size of one `struct xs_permissions`.
const RECORD_PERM: usize = 8;
/// `quota_max_entry_size`: a guest's node record must stay below this.
const QUOTA_ENTRY_SIZE: usize = 2048;
/// `quota_nb_entry_per_domain`.
const QUOTA_NODES: usize = 1000;
/// `quota_nb_watch_per_domain`.
const QUOTA_WATCHES: usize = 128;
/// `quota_max_transaction`.
const QUOTA_TRANSACTIONS: usize = 10;
/// `quota_nb_perms_per_node`.
const QUOTA_PERMS: usize = 5;
/// `quota_trans_nodes`.
const QUOTA_TRANS_NODES: usize = 1024;

const P_READ: u8 = 1;
const P_WRITE: u8 = 2;
const P_OWNER: u8 = 8;
const P_ALL: u8 = P_READ | P_WRITE | P_OWNER;

const RELEASE_DOMAIN: &str = "@releaseDomain";
const INTRODUCE_DOMAIN: &str = "@introduceDomain";

#[derive(Debug, Clone, PartialEq, Eq)]
struct NodePerm {
    perm: Perm,
    /// `XS_PERM_IGNORE`: the domain did not exist when the entry was set, or has died since.
    ignored: bool,
}

#[derive(Debug, Clone)]
struct Node {
    value: Vec<u8>,
    perms: Vec<NodePerm>,
    children: Vec<String>,
    generation: u64,
}

impl Node {
    fn record_size(&self) -> usize {
        RECORD_HEADER
            + RECORD_PERM * self.perms.len()
            + self.value.len()
            + self.children.iter().map(|c| c.len() + 1).sum::<usize>()
    }

    fn owner(&self) -> DomId {
        self.perms[0].perm.domid
    }
}

#[derive(Debug)]
struct Accessed {
    /// Whether the commit must find the node at `generation` (it was read before written).
    check_gen: bool,
    /// Generation at first access; `None` if the node did not exist.
    generation: Option<u64>,
    modified: bool,
    /// The transaction's view of the node.
    node: Option<Node>,
    /// Permissions at first access, for watch permission checks at commit.
    first_perms: Option<Vec<NodePerm>>,
    /// A watch event to fire at commit: `Some(exact)`.
    fire: Option<bool>,
}

#[derive(Debug)]
struct Tx {
    order: Vec<String>,
    accessed: HashMap<String, Accessed>,
    fail: bool,
}

#[derive(Debug)]
struct Watch {
    node: String,
    token: String,
    /// The domain home the watch path was relative to.
    relative_to: Option<String>,
}

#[derive(Debug)]
struct Conn {
    domid: DomId,
    watches: Vec<Watch>,
    txs: BTreeMap<u32, Tx>,
    next_tx: u32,
    hub: Arc<WatchHub>,
    lost: Option<String>,
}

#[derive(Debug)]
struct Domain {
    introduced: bool,
}

#[derive(Debug)]
struct State {
    nodes: HashMap<String, Node>,
    generation: u64,
    domains: BTreeMap<DomId, Domain>,
    special: BTreeMap<&'static str, Vec<NodePerm>>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
}

/// Who performs an operation.
#[derive(Debug, Clone, Copy)]
struct Ctx {
    conn: Option<u64>,
    domid: DomId,
    tx: Option<u32>,
}

impl Ctx {
    fn system() -> Ctx {
        Ctx {
            conn: None,
            domid: 0,
            tx: None,
        }
    }

    fn unprivileged(&self) -> bool {
        self.domid != 0
    }
}

type R<T> = Result<T, Errno>;

fn parent_of(name: &str) -> String {
    match name[1..].rfind('/') {
        Some(i) => name[..i + 1].to_owned(),
        None => "/".to_owned(),
    }
}

fn basename(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn child_path(parent: &str, child: &str) -> String {
    if parent == "/" {
        format!("/{child}")
    } else {
        format!("{parent}/{child}")
    }
}

fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return true;
    }
    child
        .strip_prefix(parent)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn home(domid: DomId) -> String {
    format!("/local/domain/{domid}")
}

/// `is_valid_nodename()`.
fn valid_nodename(name: &str) -> bool {
    if !name.starts_with('/') || (name.ends_with('/') && name != "/") || name.contains("//") {
        return false;
    }
    let local_off = name
        .strip_prefix("/local/domain/")
        .and_then(|rest| {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            (digits > 0 && digits <= 5 && rest.as_bytes().get(digits) == Some(&b'/'))
                .then_some("/local/domain/".len() + digits + 1)
        })
        .unwrap_or(0);
    if name.len() > local_off + REL_PATH_MAX {
        return false;
    }
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-/_@".contains(&b))
}

impl State {
    fn new() -> State {
        let n0 = vec![NodePerm {
            perm: Perm::owner(0),
            ignored: false,
        }];
        let mut st = State {
            nodes: HashMap::new(),
            generation: 0,
            domains: BTreeMap::new(),
            special: BTreeMap::from([(RELEASE_DOMAIN, n0.clone()), (INTRODUCE_DOMAIN, n0.clone())]),
            conns: BTreeMap::new(),
            next_conn: 1,
        };
        st.domains.insert(0, Domain { introduced: true });
        // What xenstored 4.17 creates at start-up (setup_structure).
        for (path, children) in [
            ("/", vec!["tool"]),
            ("/tool", vec!["xenstored"]),
            ("/tool/xenstored", vec![]),
        ] {
            st.generation += 1;
            let node = Node {
                value: Vec::new(),
                perms: n0.clone(),
                children: children.into_iter().map(String::from).collect(),
                generation: st.generation,
            };
            st.nodes.insert(path.to_owned(), node);
        }
        st
    }

    fn domain_exists(&self, domid: DomId) -> bool {
        domid == 0 || self.domains.contains_key(&domid)
    }

    /// `perm_for_conn()`.
    fn perm_for(&self, domid: DomId, perms: &[NodePerm]) -> u8 {
        if domid == 0 || perms[0].perm.domid == domid {
            return P_ALL;
        }
        let bits = |k: PermKind| {
            (if k.can_read() { P_READ } else { 0 }) | (if k.can_write() { P_WRITE } else { 0 })
        };
        for p in &perms[1..] {
            if !p.ignored && p.perm.domid == domid && self.domain_exists(p.perm.domid) {
                return bits(p.perm.kind);
            }
        }
        bits(perms[0].perm.kind)
    }

    fn canonical(&self, ctx: &Ctx, path: &str) -> String {
        if path.starts_with('/') || path.starts_with('@') {
            path.to_owned()
        } else {
            format!("{}/{path}", home(ctx.domid))
        }
    }

    fn conn(&mut self, ctx: &Ctx) -> Option<&mut Conn> {
        ctx.conn.and_then(|id| self.conns.get_mut(&id))
    }

    fn tx_mut(&mut self, ctx: &Ctx) -> Option<&mut Tx> {
        let tx = ctx.tx?;
        self.conn(ctx).and_then(|c| c.txs.get_mut(&tx))
    }

    fn bump(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// `read_node()`: the node as this context sees it, recording the access in a
    /// transaction.
    fn read_node(&mut self, ctx: &Ctx, name: &str) -> R<Option<Node>> {
        let unprivileged = ctx.unprivileged();
        let global = self.nodes.get(name).cloned();
        let Some(tx) = self.tx_mut(ctx) else {
            return Ok(global);
        };
        if let Some(a) = tx.accessed.get(name) {
            return Ok(a.node.clone());
        }
        if unprivileged && tx.order.len() >= QUOTA_TRANS_NODES {
            tx.fail = true;
            return Err(Errno::ENOSPC);
        }
        tx.order.push(name.to_owned());
        tx.accessed.insert(
            name.to_owned(),
            Accessed {
                check_gen: true,
                generation: global.as_ref().map(|n| n.generation),
                modified: false,
                first_perms: global.as_ref().map(|n| n.perms.clone()),
                node: global.clone(),
                fire: None,
            },
        );
        Ok(global)
    }

    fn tx_entry<'a>(tx: &'a mut Tx, name: &str) -> &'a mut Accessed {
        if !tx.accessed.contains_key(name) {
            tx.order.push(name.to_owned());
        }
        tx.accessed.entry(name.to_owned()).or_insert(Accessed {
            check_gen: false,
            generation: None,
            modified: false,
            node: None,
            first_perms: None,
            fire: None,
        })
    }

    /// `write_node()`.
    fn write_node(&mut self, ctx: &Ctx, name: &str, mut node: Node, quota: bool) -> R<()> {
        node.generation = self.bump();
        let too_big = quota && ctx.unprivileged() && node.record_size() >= QUOTA_ENTRY_SIZE;
        if let Some(tx) = self.tx_mut(ctx) {
            let entry = State::tx_entry(tx, name);
            entry.modified = true;
            if too_big {
                tx.fail = true;
                return Err(Errno::ENOSPC);
            }
            entry.node = Some(node);
            return Ok(());
        }
        if too_big {
            return Err(Errno::ENOSPC);
        }
        self.nodes.insert(name.to_owned(), node);
        Ok(())
    }

    fn delete_node(&mut self, ctx: &Ctx, name: &str) {
        self.bump();
        if let Some(tx) = self.tx_mut(ctx) {
            let entry = State::tx_entry(tx, name);
            entry.modified = true;
            entry.node = None;
            return;
        }
        self.nodes.remove(name);
    }

    /// `ask_parents()`: the access the nearest existing ancestor grants.
    fn ask_parents(&mut self, ctx: &Ctx, name: &str) -> R<u8> {
        let mut name = name.to_owned();
        loop {
            name = parent_of(&name);
            if let Some(node) = self.read_node(ctx, &name)? {
                return Ok(self.perm_for(ctx.domid, &node.perms));
            }
            if name == "/" {
                return Ok(0);
            }
        }
    }

    /// `get_node()`: the node if this context has `want` on it, else the errno the daemon
    /// would give (EACCES unless the nearest ancestor grants `want`).
    fn get_node(&mut self, ctx: &Ctx, name: &str, want: u8) -> R<Node> {
        if !valid_nodename(name) {
            return Err(Errno::EINVAL);
        }
        let err = match self.read_node(ctx, name)? {
            Some(node) if self.perm_for(ctx.domid, &node.perms) & want == want => return Ok(node),
            Some(_) => Errno::EACCES,
            None => Errno::ENOENT,
        };
        let parent_perm = self.ask_parents(ctx, name)?;
        Err(if parent_perm & want != 0 {
            err
        } else {
            Errno::EACCES
        })
    }

    fn owned_nodes(&self, domid: DomId) -> usize {
        self.nodes.values().filter(|n| n.owner() == domid).count()
    }

    /// `create_node()`: creates `name` and its missing ancestors.
    fn create_node(&mut self, ctx: &Ctx, name: &str, value: Vec<u8>) -> R<Node> {
        let mut missing = vec![name.to_owned()];
        let mut parent_name = name.to_owned();
        let mut parent = loop {
            parent_name = parent_of(&parent_name);
            match self.read_node(ctx, &parent_name)? {
                Some(p) => break p,
                None if parent_name == "/" => return Err(Errno::ENOENT),
                None => missing.push(parent_name.clone()),
            }
        };
        // Build top-down, then check quotas and write bottom-up like the daemon.
        let mut built: Vec<(String, Node)> = Vec::new();
        for path in missing.iter().rev() {
            parent.children.push(basename(path).to_owned());
            let mut perms = parent.perms.clone();
            if ctx.unprivileged() {
                perms[0] = NodePerm {
                    perm: Perm::new(perms[0].perm.kind, ctx.domid),
                    ignored: false,
                };
            }
            built.push((parent_name.clone(), parent));
            parent_name = path.clone();
            parent = Node {
                value: Vec::new(),
                perms,
                children: Vec::new(),
                generation: 0,
            };
        }
        parent.value = value;
        built.push((parent_name, parent));
        let new_count = missing.len();
        if ctx.unprivileged() && self.owned_nodes(ctx.domid) + new_count > QUOTA_NODES {
            return Err(Errno::ENOSPC);
        }
        if ctx.unprivileged()
            && built
                .iter()
                .any(|(_, n)| n.record_size() >= QUOTA_ENTRY_SIZE)
        {
            if let Some(tx) = self.tx_mut(ctx) {
                tx.fail = true;
            }
            return Err(Errno::ENOSPC);
        }
        let created = built
            .last()
            .map(|(_, n)| n.clone())
            .expect("the created node is always built");
        for (path, node) in built.into_iter().rev() {
            self.write_node(ctx, &path, node, true)?;
        }
        Ok(created)
    }

    /// `watch_permitted()`.
    fn watch_permitted(
        &self,
        domid: DomId,
        name: &str,
        perms: Option<&[NodePerm]>,
        old: Option<&[NodePerm]>,
    ) -> bool {
        if old.is_some_and(|o| self.perm_for(domid, o) & P_READ != 0) {
            return true;
        }
        let perms = match perms {
            Some(p) => p.to_vec(),
            None => match self.nodes.get(name) {
                Some(n) => n.perms.clone(),
                None => return false,
            },
        };
        if self.perm_for(domid, &perms) & P_READ != 0 {
            return true;
        }
        self.nodes
            .get(&parent_of(name))
            .is_some_and(|p| self.perm_for(domid, &p.perms) & P_READ != 0)
    }

    /// `fire_watches()`: `perms` are the node's (before removal, for `rm`), `old` its
    /// permissions before a change.
    fn fire_watches(
        &mut self,
        ctx: &Ctx,
        name: &str,
        exact: bool,
        perms: Option<&[NodePerm]>,
        old: Option<&[NodePerm]>,
    ) {
        if let Some(tx) = self.tx_mut(ctx) {
            match tx.accessed.get_mut(name) {
                Some(a) => a.fire = Some(exact && a.fire.unwrap_or(true)),
                None => tx.fail = true,
            }
            return;
        }
        let special = name.starts_with('@');
        for conn in self.conns.values() {
            if conn.lost.is_some() {
                continue;
            }
            let allowed = if special {
                self.special
                    .get(name)
                    .is_some_and(|p| self.perm_for(conn.domid, p) & P_READ != 0)
            } else {
                self.watch_permitted(conn.domid, name, perms, old)
            };
            if !allowed {
                continue;
            }
            for w in &conn.watches {
                let hit = if exact {
                    name == w.node
                } else {
                    is_child(name, &w.node)
                };
                if hit {
                    conn.hub.dispatch(WatchEvent {
                        path: watch_path(w, name),
                        token: w.token.clone(),
                    });
                }
            }
        }
    }

    fn do_write(&mut self, ctx: &Ctx, path: &str, value: &[u8]) -> R<()> {
        let name = self.canonical(ctx, path);
        let node = match self.get_node(ctx, &name, P_WRITE) {
            Ok(mut node) => {
                node.value = value.to_vec();
                self.write_node(ctx, &name, node.clone(), true)?;
                node
            }
            Err(Errno::ENOENT) => self.create_node(ctx, &name, value.to_vec())?,
            Err(e) => return Err(e),
        };
        self.fire_watches(ctx, &name, false, Some(&node.perms), None);
        Ok(())
    }

    fn do_mkdir(&mut self, ctx: &Ctx, path: &str) -> R<()> {
        let name = self.canonical(ctx, path);
        match self.get_node(ctx, &name, P_WRITE) {
            Ok(_) => Ok(()),
            Err(Errno::ENOENT) => {
                let node = self.create_node(ctx, &name, Vec::new())?;
                self.fire_watches(ctx, &name, false, Some(&node.perms), None);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn do_rm(&mut self, ctx: &Ctx, path: &str) -> R<()> {
        let name = self.canonical(ctx, path);
        match self.get_node(ctx, &name, P_WRITE) {
            Ok(_) if name == "/" => Err(Errno::EINVAL),
            Ok(_) => self.rm_node(ctx, &name),
            Err(Errno::ENOENT) => match self.read_node(ctx, &parent_of(&name))? {
                Some(_) => Ok(()),
                None => Err(Errno::ENOENT),
            },
            Err(e) => Err(e),
        }
    }

    /// `rm_node()`: removes a subtree, children first, firing an exact event for each
    /// descendant and a recursive one for the root.
    fn rm_node(&mut self, ctx: &Ctx, name: &str) -> R<()> {
        let parent_name = parent_of(name);
        let Some(mut parent) = self.read_node(ctx, &parent_name)? else {
            return Err(Errno::EINVAL);
        };
        self.delete_subtree(ctx, name, name)?;
        let base = basename(name);
        parent.children.retain(|c| c != base);
        self.write_node(ctx, &parent_name, parent, false)
    }

    fn delete_subtree(&mut self, ctx: &Ctx, root: &str, name: &str) -> R<()> {
        let Some(node) = self.read_node(ctx, name)? else {
            return Ok(());
        };
        for child in &node.children {
            self.delete_subtree(ctx, root, &child_path(name, child))?;
        }
        self.delete_node(ctx, name);
        self.fire_watches(ctx, name, name != root, Some(&node.perms), None);
        Ok(())
    }

    fn do_set_perms(&mut self, ctx: &Ctx, path: &str, perms: &[Perm]) -> R<()> {
        if ctx.unprivileged() && perms.len() > QUOTA_PERMS {
            return Err(Errno::ENOSPC);
        }
        let perms: Vec<NodePerm> = perms
            .iter()
            .map(|p| NodePerm {
                perm: *p,
                ignored: !self.domain_exists(p.domid),
            })
            .collect();
        if perms[0].ignored {
            return Err(Errno::ENOENT);
        }
        if path.starts_with('@') {
            let Some(key) = [RELEASE_DOMAIN, INTRODUCE_DOMAIN]
                .into_iter()
                .find(|s| *s == path)
            else {
                return Err(Errno::EINVAL);
            };
            let current = self.special.get(key).cloned().unwrap_or_default();
            if self.perm_for(ctx.domid, &current) & (P_WRITE | P_OWNER) != P_WRITE | P_OWNER {
                return Err(Errno::EACCES);
            }
            self.special.insert(key, perms);
            return Ok(());
        }
        let name = self.canonical(ctx, path);
        let mut node = self.get_node(ctx, &name, P_WRITE | P_OWNER)?;
        if ctx.unprivileged() && perms[0].perm.domid != node.owner() {
            return Err(Errno::EPERM);
        }
        let old = std::mem::replace(&mut node.perms, perms);
        self.write_node(ctx, &name, node.clone(), true)?;
        self.fire_watches(ctx, &name, false, Some(&node.perms), Some(&old));
        Ok(())
    }

    fn do_watch(&mut self, ctx: &Ctx, path: &str, token: &str) -> R<()> {
        let (node, relative_to) = if path.starts_with('@') {
            if path.len() > REL_PATH_MAX {
                return Err(Errno::EINVAL);
            }
            (path.to_owned(), None)
        } else {
            let relative = !path.starts_with('/');
            let node = self.canonical(ctx, path);
            if !valid_nodename(&node) {
                return Err(Errno::EINVAL);
            }
            (node, relative.then(|| home(ctx.domid)))
        };
        let domid = ctx.domid;
        let domain_watches: usize = self
            .conns
            .values()
            .filter(|c| c.domid == domid)
            .map(|c| c.watches.len())
            .sum();
        let conn = self.conn(ctx).ok_or(Errno::EINVAL)?;
        if conn
            .watches
            .iter()
            .any(|w| w.node == node && w.token == token)
        {
            return Err(Errno::EEXIST);
        }
        if domid != 0 && domain_watches > QUOTA_WATCHES {
            return Err(Errno::E2BIG);
        }
        let watch = Watch {
            node,
            token: token.to_owned(),
            relative_to,
        };
        // The daemon fires once at registration, whatever the permissions.
        conn.hub.dispatch(WatchEvent {
            path: watch_path(&watch, &watch.node),
            token: watch.token.clone(),
        });
        conn.watches.push(watch);
        Ok(())
    }

    fn do_unwatch(&mut self, ctx: &Ctx, path: &str, token: &str) -> R<()> {
        let node = self.canonical(ctx, path);
        let conn = self.conn(ctx).ok_or(Errno::EINVAL)?;
        let i = conn
            .watches
            .iter()
            .position(|w| w.node == node && w.token == token)
            .ok_or(Errno::ENOENT)?;
        conn.watches.remove(i);
        Ok(())
    }

    fn do_transaction_start(&mut self, ctx: &Ctx) -> R<TxId> {
        let unprivileged = ctx.unprivileged();
        let conn = self.conn(ctx).ok_or(Errno::EINVAL)?;
        if unprivileged && conn.txs.len() > QUOTA_TRANSACTIONS {
            return Err(Errno::ENOSPC);
        }
        let mut id = conn.next_tx;
        while id == 0 || conn.txs.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        conn.next_tx = id.wrapping_add(1);
        conn.txs.insert(
            id,
            Tx {
                order: Vec::new(),
                accessed: HashMap::new(),
                fail: false,
            },
        );
        self.bump();
        Ok(TxId(id))
    }

    fn do_transaction_end(&mut self, ctx: &Ctx, commit: bool) -> R<()> {
        let (Some(txid), Some(conn)) = (ctx.tx, ctx.conn) else {
            return Err(Errno::ENOENT);
        };
        let tx = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.txs.remove(&txid))
            .ok_or(Errno::ENOENT)?;
        if !commit {
            return Ok(());
        }
        if tx.fail {
            return Err(Errno::ENOMEM);
        }
        for name in &tx.order {
            let a = &tx.accessed[name];
            if a.check_gen && self.nodes.get(name).map(|n| n.generation) != a.generation {
                return Err(Errno::EAGAIN);
            }
        }
        let outside = Ctx {
            conn: ctx.conn,
            domid: ctx.domid,
            tx: None,
        };
        let mut tx = tx;
        for name in &tx.order {
            let Some(a) = tx.accessed.remove(name) else {
                continue;
            };
            if a.modified {
                match a.node {
                    Some(mut node) => {
                        node.generation = self.bump();
                        self.nodes.insert(name.clone(), node);
                    }
                    None => {
                        self.nodes.remove(name);
                    }
                }
            }
            if let Some(exact) = a.fire {
                self.fire_watches(&outside, name, exact, None, a.first_perms.as_deref());
            }
        }
        Ok(())
    }

    fn check_tx(&mut self, ctx: &Ctx) -> R<()> {
        match ctx.tx {
            None => Ok(()),
            Some(_) if self.tx_mut(ctx).is_some() => Ok(()),
            Some(_) => Err(Errno::ENOENT),
        }
    }

    fn lose_conn(conn: &mut Conn, reason: &str) {
        if conn.lost.is_none() {
            conn.lost = Some(reason.to_owned());
            conn.watches.clear();
            conn.txs.clear();
            conn.hub.close(reason);
        }
    }

    /// `destroy_domain()`.
    fn destroy_domain(&mut self, domid: DomId) {
        let Some(domain) = self.domains.remove(&domid) else {
            return;
        };
        let reason = format!("domain {domid} was destroyed");
        for conn in self.conns.values_mut().filter(|c| c.domid == domid) {
            State::lose_conn(conn, &reason);
        }
        // Reap the nodes the domain owned (domain_tree_remove), outermost first.
        let mut owned: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.owner() == domid)
            .map(|(p, _)| p.clone())
            .collect();
        owned.sort_by(|a, b| (a.matches('/').count(), a).cmp(&(b.matches('/').count(), b)));
        for path in owned {
            if path != "/" && self.nodes.contains_key(&path) {
                if let Err(e) = self.rm_node(&Ctx::system(), &path) {
                    tracing::debug!(path, errno = %e, "reaping a dead domain's node failed");
                }
            }
        }
        // Its permission entries no longer count (domain_adjust_node_perms).
        for node in self.nodes.values_mut() {
            for p in node
                .perms
                .iter_mut()
                .skip(1)
                .filter(|p| p.perm.domid == domid)
            {
                p.ignored = true;
            }
        }
        for perms in self.special.values_mut() {
            if perms[0].perm.domid == domid {
                perms[0].perm.domid = 0;
            }
            let rest: Vec<NodePerm> = perms.drain(1..).filter(|p| p.perm.domid != domid).collect();
            perms.extend(rest);
        }
        if domain.introduced {
            self.fire_watches(&Ctx::system(), RELEASE_DOMAIN, true, None, None);
        }
    }
}

fn watch_path(w: &Watch, name: &str) -> String {
    match &w.relative_to {
        Some(prefix) => {
            let rest = name.strip_prefix(prefix.as_str()).unwrap_or(name);
            rest.strip_prefix('/').unwrap_or(rest).to_owned()
        }
        None => name.to_owned(),
    }
}

/// An in-memory xenstored. Clones share the same store.
///
/// Connect as a domain with [`connect`](Self::connect); domain 0 is privileged. Domains other
/// than 0 exist once [`create_domain`](Self::create_domain),
/// [`introduce_domain`](Self::introduce_domain) or [`start_guest`](Self::start_guest) made
/// them: permissions may only name existing domains, as with the real daemon.
#[derive(Debug, Clone)]
pub struct MemStore {
    state: Arc<Mutex<State>>,
}

impl Default for MemStore {
    fn default() -> MemStore {
        MemStore::new()
    }
}

impl MemStore {
    /// A store holding what xenstored 4.17 creates at start-up (`/`, `/tool/xenstored`).
    pub fn new() -> MemStore {
        MemStore {
            state: Arc::new(Mutex::new(State::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every operation validates before it changes anything, so a panic in one (a bug)
        // leaves the tree as it was: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a connection as `domid`, like a guest's xenbus connection (or dom0's socket).
    pub fn connect(&self, domid: DomId) -> Result<MemConnection, XsError> {
        let hub = Arc::new(WatchHub::new()?);
        let mut st = self.lock();
        let id = st.next_conn;
        st.next_conn += 1;
        st.conns.insert(
            id,
            Conn {
                domid,
                watches: Vec::new(),
                txs: BTreeMap::new(),
                next_tx: 1,
                hub: hub.clone(),
                lost: None,
            },
        );
        Ok(MemConnection {
            store: self.clone(),
            id,
            domid,
            hub,
        })
    }

    /// Makes a domain exist, as the hypervisor would report it (not yet introduced).
    pub fn create_domain(&self, domid: DomId) {
        self.lock()
            .domains
            .entry(domid)
            .or_insert(Domain { introduced: false });
    }

    /// `XS_INTRODUCE`: the domain exists and is introduced; `@introduceDomain` fires.
    pub fn introduce_domain(&self, domid: DomId) {
        let mut st = self.lock();
        let d = st
            .domains
            .entry(domid)
            .or_insert(Domain { introduced: false });
        if !d.introduced {
            d.introduced = true;
            if domid != 0 {
                st.fire_watches(&Ctx::system(), INTRODUCE_DOMAIN, true, None, None);
            }
        }
    }

    /// The domain dies (or `XS_RELEASE`): its connections are lost, the nodes it owns are
    /// removed (firing watches), permission entries naming it stop counting, and
    /// `@releaseDomain` fires. Domain 0 cannot die.
    pub fn destroy_domain(&self, domid: DomId) {
        if domid != 0 {
            self.lock().destroy_domain(domid);
        }
    }

    /// What a toolstack does for a new guest: the domain exists, `/local/domain/<domid>` is
    /// created and owned by it, and it is introduced.
    pub fn start_guest(&self, domid: DomId) -> Result<(), XsError> {
        self.create_domain(domid);
        let dom0 = self.connect(0)?;
        let home = home(domid);
        dom0.mkdir(TxId::NONE, &home)?;
        dom0.set_perms(TxId::NONE, &home, &[Perm::owner(domid)])?;
        self.introduce_domain(domid);
        Ok(())
    }

    /// Simulates the daemon going away: every connection is lost.
    pub fn disconnect_all(&self, reason: &str) {
        for conn in self.lock().conns.values_mut() {
            State::lose_conn(conn, reason);
        }
    }
}

/// One connection to a [`MemStore`], as one domain. Dropping it ends its transactions and
/// watches, as closing a real connection does.
#[derive(Debug)]
pub struct MemConnection {
    store: MemStore,
    id: u64,
    domid: DomId,
    hub: Arc<WatchHub>,
}

impl MemConnection {
    /// The domain this connection acts as.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    fn run<T>(
        &self,
        op: MsgType,
        path: &str,
        tx: TxId,
        f: impl FnOnce(&mut State, &Ctx) -> R<T>,
    ) -> Result<T, XsError> {
        let mut st = self.store.lock();
        match st.conns.get(&self.id) {
            Some(c) if c.lost.is_none() => {}
            Some(c) => {
                return Err(XsError::ConnectionLost {
                    reason: c.lost.clone().unwrap_or_default(),
                });
            }
            None => {
                return Err(XsError::ConnectionLost {
                    reason: "the connection was closed".into(),
                });
            }
        }
        let ctx = Ctx {
            conn: Some(self.id),
            domid: self.domid,
            tx: tx.is_some().then_some(tx.0),
        };
        st.check_tx(&ctx)
            .and_then(|()| f(&mut st, &ctx))
            .map_err(|e| XsError::daemon(op, path, e))
    }
}

impl Drop for MemConnection {
    fn drop(&mut self) {
        let conn = self.store.lock().conns.remove(&self.id);
        if let Some(mut c) = conn {
            State::lose_conn(&mut c, "the connection was closed");
        }
    }
}

impl XenStore for MemConnection {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError> {
        wire::check_path(path)?;
        self.run(MsgType::Read, path, tx, |st, ctx| {
            let name = st.canonical(ctx, path);
            Ok(st.get_node(ctx, &name, P_READ)?.value)
        })
    }

    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError> {
        wire::check_write(path, value.len())?;
        self.run(MsgType::Write, path, tx, |st, ctx| {
            st.do_write(ctx, path, value)
        })
    }

    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        wire::check_path(path)?;
        self.run(MsgType::Mkdir, path, tx, |st, ctx| st.do_mkdir(ctx, path))
    }

    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        wire::check_path(path)?;
        self.run(MsgType::Rm, path, tx, |st, ctx| st.do_rm(ctx, path))
    }

    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
        wire::check_path(path)?;
        self.run(MsgType::Directory, path, tx, |st, ctx| {
            let name = st.canonical(ctx, path);
            Ok(st.get_node(ctx, &name, P_READ)?.children)
        })
    }

    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Perm>, XsError> {
        wire::check_path(path)?;
        self.run(MsgType::GetPerms, path, tx, |st, ctx| {
            let name = st.canonical(ctx, path);
            Ok(st
                .get_node(ctx, &name, P_READ)?
                .perms
                .iter()
                .map(|p| p.perm)
                .collect())
        })
    }

    fn set_perms(&self, tx: TxId, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        wire::check_path(path)?;
        if perms.is_empty() {
            return Err(XsError::InvalidArgument {
                what: "permission list",
                reason: "it needs at least the owner",
            });
        }
        self.run(MsgType::SetPerms, path, tx, |st, ctx| {
            st.do_set_perms(ctx, path, perms)
        })
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        wire::check_path(path)?;
        wire::check_token(token)?;
        self.run(MsgType::Watch, path, TxId::NONE, |st, ctx| {
            st.do_watch(ctx, path, token)
        })
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        wire::check_path(path)?;
        wire::check_token(token)?;
        self.run(MsgType::Unwatch, path, TxId::NONE, |st, ctx| {
            st.do_unwatch(ctx, path, token)
        })
    }

    fn transaction_start(&self) -> Result<TxId, XsError> {
        self.run(MsgType::TransactionStart, "", TxId::NONE, |st, ctx| {
            st.do_transaction_start(ctx)
        })
    }

    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XsError> {
        let subject = format!("transaction {tx}");
        self.run(MsgType::TransactionEnd, &subject, tx, |st, ctx| {
            st.do_transaction_end(ctx, commit)
        })
    }

    fn get_domain_path(&self, domid: DomId) -> Result<String, XsError> {
        self.run(MsgType::GetDomainPath, "", TxId::NONE, |_, _| {
            Ok(home(domid))
        })
    }

    fn is_domain_introduced(&self, domid: DomId) -> Result<bool, XsError> {
        self.run(
            MsgType::IsDomainIntroduced,
            &domid.to_string(),
            TxId::NONE,
            |st, ctx| {
                if ctx.unprivileged() {
                    return Err(Errno::EACCES);
                }
                Ok(domid == DOMID_SELF || st.domains.get(&domid).is_some_and(|d| d.introduced))
            },
        )
    }

    fn reset_watches(&self) -> Result<(), XsError> {
        self.run(MsgType::ResetWatches, "", TxId::NONE, |st, ctx| {
            if let Some(c) = st.conn(ctx) {
                c.watches.clear();
                c.txs.clear();
            }
            Ok(())
        })
    }

    fn watch_events(&self) -> WatchEvents {
        self.hub.events()
    }

    fn watch_events_for(&self, token: &str) -> Result<WatchEvents, XsError> {
        self.hub.events_for(token)
    }
}

#[cfg(test)]
mod tests;
