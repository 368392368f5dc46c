//! The mesh's shared state: the configured peers, each one's link state
//! (down, dialling, up on shard S as connection N), and per-peer counters.
//!
//! Link admission is decided here, under one mutex that only link set-up
//! and tear-down take (never the publish path, which reads the atomics in
//! `link_shard`). The rule that keeps exactly one link per pair, decided
//! before any data flows on a link: see [`Mesh::admit`].
//!
//! A peer's members are tied to its up link. When that link ends (or is
//! replaced) they are dropped under the same lock that changes the link
//! state, and membership frames from a link are applied under that lock
//! only while it is still the up link (see [`Mesh::while_link`]): a new
//! link's snapshot can then never be undone by the old link's tear-down,
//! and frames still buffered on a replaced link can never re-add members
//! after the replacement dropped them.

use super::addrs::PeerAddrs;
use crate::config::ServerSettings;
use crate::protocol::NodeName;
use crate::router::mask::MAX_PEERS;
use crate::router::{Group, MAX_SHARDS};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

/// A group entry's identity (its address: held alive by the map that
/// uses it as a key).
fn entry_key(g: &Group) -> usize {
    &**g as *const crate::router::GroupEntry as usize
}

/// What a link's peer said of itself at link-up, in force from the moment
/// the link is routed to.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkParams {
    /// Its `max_message_size` (0: not said).
    pub max_message_size: u64,
    /// The features the link speaks (`protocol::features`).
    pub features: u64,
}

/// Most groups remembered per link as "published to from there" (for
/// node-down events to their members).
pub const MAX_HEARD: usize = 65_536;

/// No link: the value of a peer's link word when it is not up.
pub const NO_LINK: u64 = u64::MAX;

/// Bits of a link word holding the shard (below them: the connection's
/// sequence number on that shard).
const SHARD_BITS: u32 = MAX_SHARDS.trailing_zeros();

const _: () = assert!(MAX_SHARDS.is_power_of_two());

/// The link word of connection `seq` on `shard`.
fn link_word(shard: usize, seq: u64) -> u64 {
    (seq << SHARD_BITS) | shard as u64
}

/// Where a peer's link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No link; the dialler will try again after reconnect_interval.
    Down,
    /// We dialled: connection `seq` on shard `shard` awaits WELCOME.
    Dialling {
        /// The dialling shard.
        shard: usize,
        /// The connection's sequence number there.
        seq: u64,
    },
    /// The link is up: connection `seq` on shard `shard`.
    Up {
        /// The shard holding the link.
        shard: usize,
        /// The connection's sequence number there.
        seq: u64,
        /// True when this node dialled it.
        dialled: bool,
    },
}

/// One configured peer.
#[derive(Debug, Clone)]
pub struct PeerSlot {
    /// Its name in `peers`.
    pub name: String,
    /// `host:port` to dial.
    pub addr: String,
    /// Link state.
    pub state: LinkState,
    /// When the state last changed.
    pub since: SystemTime,
    /// Times the link came up after the first time.
    pub reconnects: u64,
    /// Times the link came up at all.
    ups: u64,
    /// Set when a reload removed the peer.
    pub removed: bool,
    /// Distinguishes this peer from an earlier one at the same index.
    pub generation: u64,
    /// Why our last dial connected but did not link up (its TLS handshake
    /// failed, e.g. a certificate refused); cleared when a link comes up
    /// or a dial fails to connect.
    pub link_error: Option<String>,
    /// What kind of failure `link_error` is (without the figures that
    /// change from dial to dial, such as a time): news when it changes.
    link_error_kind: String,
}

/// Counters of one peer link (written by the shards that use it).
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Frames received from the peer.
    pub msgs_in: AtomicU64,
    /// Frames queued to the peer.
    pub msgs_out: AtomicU64,
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Bytes queued.
    pub bytes_out: AtomicU64,
    /// Messages for the peer dropped, whatever the reason (the sum of the
    /// three below and of frames dropped on a replaced link).
    pub dropped: AtomicU64,
    /// Publishes for its members dropped while its link was down (the
    /// node had members in the group when the link went).
    pub dropped_down: AtomicU64,
    /// Frames queued on its link when the link died.
    pub dropped_link_lost: AtomicU64,
    /// Messages larger than its `max_message_size`.
    pub dropped_too_large: AtomicU64,
    /// Its `max_message_size`, as it said at link-up (0: not said).
    pub max_message_size: AtomicU64,
    /// The features its link speaks (`protocol::features`).
    pub features: AtomicU64,
    /// Gauge: frames pending on the link (as of its shard's last sweep).
    pub queued_frames: AtomicU64,
    /// Gauge: bytes pending on the link (frames and their queue slots).
    pub queued_bytes: AtomicU64,
}

/// Verdict on a HELLO from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Accept; if `replace` names a link, close it first (it is stale).
    Accept {
        /// The link this one replaces, if any.
        replace: Option<(usize, u64)>,
    },
    /// A link (or our own dial) is kept instead: refuse with DUPLICATE_LINK.
    Duplicate,
}

/// The admission rule for a peer's `HELLO`, given its link's state and
/// whether the peer's name sorts below ours (`lower`): no link and no dial
/// of ours → accept; our dial in progress (both dialled at once) → the
/// dial of the lower-named node wins; a link already up → the peer
/// evidently considers it dead, so replace it, unless we dialled it and
/// our name is the lower, in which case it may be the peer's abandoned
/// simultaneous dial: refuse it.
pub fn admission(state: LinkState, lower: bool) -> Admit {
    match state {
        LinkState::Down => Admit::Accept { replace: None },
        LinkState::Dialling { .. } if lower => Admit::Accept { replace: None },
        LinkState::Dialling { .. } => Admit::Duplicate,
        LinkState::Up { dialled: true, .. } if !lower => Admit::Duplicate,
        LinkState::Up { shard, seq, .. } => Admit::Accept {
            replace: Some((shard, seq)),
        },
    }
}

/// The mesh: who the peers are and how their links stand.
#[derive(Debug)]
pub struct Mesh {
    /// This node's name.
    pub me: NodeName,
    /// The cluster key in force (`cluster_key`; changed by reload).
    key: Mutex<Option<crate::config::ClusterKey>>,
    inner: Mutex<Vec<Option<PeerSlot>>>,
    /// Per peer index: its up link (shard and connection, see
    /// [`link_word`]), or [`NO_LINK`]. Written under `inner`'s lock.
    link: Vec<AtomicU64>,
    /// Per peer index: counters.
    pub counters: Vec<PeerCounters>,
    /// Per peer index: the groups in which it had members when its link
    /// went down (their ghost bit is set), until its next view arrives.
    ghosts: Vec<Mutex<HashMap<usize, Group>>>,
    /// Per peer index: the groups its current link has forwarded
    /// publishes for (told node-down when the link goes).
    heard: Vec<Mutex<HashMap<usize, Group>>>,
    /// One past the highest peer index in use (bounds loops over peers).
    high_water: AtomicUsize,
    /// Source of [`PeerSlot::generation`].
    generations: AtomicU64,
    /// Address to dial from when `bind_address` is unset.
    own_ip: Mutex<Option<IpAddr>>,
    /// This node's departure ([`crate::cluster::leave::Phase`]): only rises.
    departure: std::sync::atomic::AtomicU8,
    /// What each peer's `host:port` resolves to (looked up off the shards).
    pub addrs: PeerAddrs,
}

impl Mesh {
    /// The mesh for `settings.peers`, minus this node itself; `own_ip`:
    /// the address to dial from when `bind_address` is unset.
    pub fn new(me: &NodeName, s: &ServerSettings, own_ip: Option<IpAddr>) -> Self {
        let mesh = Self {
            me: me.clone(),
            key: Mutex::new(None),
            inner: Mutex::new(Vec::new()),
            link: (0..MAX_PEERS).map(|_| AtomicU64::new(NO_LINK)).collect(),
            counters: (0..MAX_PEERS).map(|_| PeerCounters::default()).collect(),
            ghosts: (0..MAX_PEERS).map(|_| Mutex::new(HashMap::new())).collect(),
            heard: (0..MAX_PEERS).map(|_| Mutex::new(HashMap::new())).collect(),
            high_water: AtomicUsize::new(0),
            generations: AtomicU64::new(1),
            own_ip: Mutex::new(None),
            departure: std::sync::atomic::AtomicU8::new(0),
            addrs: PeerAddrs::default(),
        };
        mesh.apply_peers(s, own_ip);
        mesh
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Option<PeerSlot>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the peer list in line with `s.peers`: new peers get a free
    /// index, removed ones are marked, changed addresses are updated.
    /// Returns (added, removed, re-addressed) peer indices.
    pub fn apply_peers(
        &self,
        s: &ServerSettings,
        own_ip: Option<IpAddr>,
    ) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
        let mut slots = self.lock();
        let (mut added, mut removed, mut moved) = (Vec::new(), Vec::new(), Vec::new());
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(p) = slot.as_mut().filter(|p| !p.removed) else {
                continue;
            };
            match s.peer(&p.name) {
                None => {
                    p.removed = true;
                    removed.push(i);
                }
                Some(cfg) if cfg.addr_string(s.port) != p.addr => {
                    p.addr = cfg.addr_string(s.port);
                    self.addrs.set(i, &p.addr);
                    moved.push(i);
                }
                Some(_) => {}
            }
        }
        for cfg in s.peers.iter().filter(|p| p.name != self.me.as_str()) {
            if slots
                .iter()
                .flatten()
                .any(|p| p.name == cfg.name && !p.removed)
            {
                continue;
            }
            let free = slots.iter().position(|p| {
                p.as_ref()
                    .is_none_or(|p| p.removed && p.state == LinkState::Down)
            });
            let idx = free.unwrap_or(slots.len());
            if idx >= MAX_PEERS {
                tracing::error!(peer = %cfg.name, "more than {MAX_PEERS} peers; ignored");
                continue;
            }
            let slot = PeerSlot {
                name: cfg.name.clone(),
                addr: cfg.addr_string(s.port),
                state: LinkState::Down,
                since: SystemTime::now(),
                reconnects: 0,
                ups: 0,
                removed: false,
                generation: self.generations.fetch_add(1, Relaxed),
                link_error: None,
                link_error_kind: String::new(),
            };
            if idx == slots.len() {
                slots.push(Some(slot));
            } else {
                slots[idx] = Some(slot);
            }
            self.counters[idx].reset();
            self.addrs.set(idx, &cfg.addr_string(s.port));
            added.push(idx);
        }
        self.high_water.store(slots.len(), Release);
        *self.key.lock().unwrap_or_else(|p| p.into_inner()) = s.cluster_key.clone();
        *self.own_ip.lock().unwrap_or_else(|p| p.into_inner()) = own_ip;
        (added, removed, moved)
    }

    /// The cluster key in force, if one is set (peer handshakes read it).
    pub fn key(&self) -> Option<crate::config::ClusterKey> {
        self.key.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where this node stands in its departure (`Serving` unless leaving).
    #[inline]
    pub fn departure(&self) -> crate::cluster::leave::Phase {
        crate::cluster::leave::Phase::from_u8(self.departure.load(Acquire))
    }

    /// Moves this node's departure on to `phase` (never back).
    pub fn set_departure(&self, phase: crate::cluster::leave::Phase) {
        self.departure.fetch_max(phase as u8, AcqRel);
    }

    /// The host names to look up now, as (peer index, name, `host:port`):
    /// those of current peers whose link is not up (see
    /// [`PeerAddrs::due`]).
    pub fn address_lookups(&self) -> Vec<(usize, String, String)> {
        let slots = self.lock();
        let want = |i: usize| {
            slots
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(|p| !p.removed && !matches!(p.state, LinkState::Up { .. }))
        };
        self.addrs
            .due(want)
            .into_iter()
            .filter_map(|(i, spec)| {
                let name = slots.get(i)?.as_ref()?.name.clone();
                Some((i, name, spec))
            })
            .collect()
    }

    /// The address outbound links are dialled from when `bind_address` is unset.
    pub fn own_ip(&self) -> Option<IpAddr> {
        *self.own_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One past the highest peer index in use. Lock-free.
    #[inline]
    pub fn high_water(&self) -> usize {
        self.high_water.load(Acquire)
    }

    /// Our dial of peer `i` from `shard` connected as connection `seq`:
    /// false when the dial was overtaken meanwhile, or the peer removed by
    /// a reload while it connected (close the connection; in the latter
    /// case its closing then marks the removed slot down, free for reuse).
    pub fn dial_connected(&self, i: usize, shard: usize, seq: u64) -> bool {
        let mut slots = self.lock();
        match slots.get_mut(i).and_then(Option::as_mut) {
            Some(p) if p.state == (LinkState::Dialling { shard, seq: 0 }) => {
                p.state = LinkState::Dialling { shard, seq };
                !p.removed
            }
            _ => false,
        }
    }

    /// Index of the (current) peer called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.lock()
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.name == name && !p.removed))
    }

    /// A copy of peer `i`'s slot.
    pub fn slot(&self, i: usize) -> Option<PeerSlot> {
        self.lock().get(i).cloned().flatten()
    }

    /// Every current peer's index.
    pub fn indices(&self) -> Vec<usize> {
        let slots = self.lock();
        (0..slots.len())
            .filter(|&i| slots[i].as_ref().is_some_and(|p| !p.removed))
            .collect()
    }

    /// The shard holding peer `i`'s up link, if it is up. Lock-free.
    #[inline]
    pub fn link_shard(&self, i: usize) -> Option<usize> {
        self.link_of(i).map(|(shard, _)| shard)
    }

    /// Peer `i`'s up link as (shard, connection sequence number), if it is
    /// up. Lock-free.
    #[inline]
    pub fn link_of(&self, i: usize) -> Option<(usize, u64)> {
        let w = self.link.get(i)?.load(Acquire);
        (w != NO_LINK).then_some(((w & ((1 << SHARD_BITS) - 1)) as usize, w >> SHARD_BITS))
    }

    /// True when connection `seq` on `shard` is peer `i`'s up link. Lock-free
    /// (a link being replaced may still pass it for a moment: see
    /// [`Mesh::while_link`] for what must not race with a replacement).
    #[inline]
    pub fn is_current(&self, i: usize, shard: usize, seq: u64) -> bool {
        self.link
            .get(i)
            .is_some_and(|w| w.load(Acquire) == link_word(shard, seq))
    }

    /// True when connection `seq` on `shard` is our dial of peer `i`,
    /// awaiting WELCOME.
    pub fn is_dialling(&self, i: usize, shard: usize, seq: u64) -> bool {
        self.lock()
            .get(i)
            .and_then(Option::as_ref)
            .is_some_and(|p| p.state == LinkState::Dialling { shard, seq })
    }

    /// Runs `f` if connection `seq` on `shard` is peer `i`'s up link, with
    /// the link state locked: no admission or tear-down of peer `i` can
    /// come between the check and `f`. `f` must not call into the mesh.
    pub fn while_link<R>(
        &self,
        i: usize,
        shard: usize,
        seq: u64,
        f: impl FnOnce() -> R,
    ) -> Option<R> {
        let slots = self.lock();
        let up = slots.get(i).and_then(Option::as_ref).is_some_and(
            |p| matches!(p.state, LinkState::Up { shard: s, seq: q, .. } if (s, q) == (shard, seq)),
        );
        up.then(f)
    }

    /// Decides on a HELLO from peer `i` arriving as connection `seq` on `shard`.
    ///
    /// The rule, with `lower` meaning "the peer's name sorts below ours":
    /// no link and no dial of ours → accept; our dial in progress (both
    /// dialled at once) → the dial of the lower-named node wins; a link
    /// already up → the peer evidently considers it dead, so replace it —
    /// unless we dialled it and our name is the lower, in which case it may
    /// be the peer's abandoned simultaneous dial: refuse it.
    ///
    /// When a link is replaced, `drop_members` runs under the lock, before
    /// the new link is up (the peer's members go with the old link). The
    /// new link's `params` are in force before any shard can route to it.
    pub fn admit(
        &self,
        i: usize,
        shard: usize,
        seq: u64,
        params: LinkParams,
        drop_members: impl FnOnce(),
    ) -> Admit {
        let mut slots = self.lock();
        let Some(p) = slots
            .get_mut(i)
            .and_then(Option::as_mut)
            .filter(|p| !p.removed)
        else {
            return Admit::Duplicate;
        };
        let verdict = admission(p.state, p.name.as_str() < self.me.as_str());
        if let Admit::Accept { replace } = verdict {
            if replace.is_some() {
                drop_members();
            }
            self.counters[i].set_params(params);
            Self::set_up(p, &self.link[i], shard, seq, false);
        }
        verdict
    }

    /// Our dial of peer `i` is starting; false when it should not (a link
    /// is up or being dialled, or the peer was removed).
    pub fn begin_dial(&self, i: usize, shard: usize, seq: u64) -> bool {
        let mut slots = self.lock();
        match slots.get_mut(i).and_then(Option::as_mut) {
            Some(p) if !p.removed && p.state == LinkState::Down => {
                p.state = LinkState::Dialling { shard, seq };
                true
            }
            _ => false,
        }
    }

    /// Our dial of peer `i` (connection `seq` on `shard`) got WELCOME:
    /// true if it becomes the link, false if it was overtaken or the peer
    /// removed meanwhile (close it).
    pub fn dial_welcomed(&self, i: usize, shard: usize, seq: u64, params: LinkParams) -> bool {
        let mut slots = self.lock();
        match slots.get_mut(i).and_then(Option::as_mut) {
            Some(p) if !p.removed && p.state == (LinkState::Dialling { shard, seq }) => {
                self.counters[i].set_params(params);
                Self::set_up(p, &self.link[i], shard, seq, true);
                true
            }
            _ => false,
        }
    }

    /// Connection `seq` on `shard` for peer `i` is gone (or a dial failed
    /// before it had a connection, with `seq` 0). True when it was the up
    /// link; its members are then dropped by `drop_members`, under the lock
    /// (so a new link admitted right after cannot lose its snapshot to it),
    /// told whether a reload removed the peer meanwhile.
    pub fn down(&self, i: usize, shard: usize, seq: u64, drop_members: impl FnOnce(bool)) -> bool {
        let mut slots = self.lock();
        let Some(p) = slots.get_mut(i).and_then(Option::as_mut) else {
            return false;
        };
        let was_up = match p.state {
            LinkState::Up {
                shard: s, seq: q, ..
            } if (s, q) == (shard, seq) => true,
            LinkState::Dialling { shard: s, seq: q } if (s, q) == (shard, seq) => false,
            _ => return false,
        };
        p.state = LinkState::Down;
        p.since = SystemTime::now();
        if was_up {
            self.link[i].store(NO_LINK, Release);
            drop_members(p.removed);
        }
        was_up
    }

    /// Our dial of peer `i` from `shard` failed before it had a connection.
    pub fn dial_failed(&self, i: usize, shard: usize) {
        if let Some(p) = self.lock().get_mut(i).and_then(Option::as_mut) {
            p.link_error = None;
            p.link_error_kind.clear();
        }
        self.down(i, shard, 0, |_| {});
    }

    /// Our dial of peer `i`, connection `seq` on `shard`, ended before it
    /// linked up, for `error` of `kind` (its TLS handshake failed).
    /// Recorded as the peer's `link_error`; true when that is news (a kind
    /// other than the dial before's), for the caller to log once rather
    /// than every `reconnect_interval`. False for a connection that is not
    /// this peer's dial in progress.
    pub fn dial_refused(
        &self,
        i: usize,
        shard: usize,
        seq: u64,
        kind: String,
        error: String,
    ) -> bool {
        let mut slots = self.lock();
        match slots.get_mut(i).and_then(Option::as_mut) {
            Some(p) if p.state == (LinkState::Dialling { shard, seq }) => {
                let news = p.link_error_kind != kind;
                p.link_error = Some(error);
                p.link_error_kind = kind;
                news
            }
            _ => false,
        }
    }

    fn set_up(p: &mut PeerSlot, link: &AtomicU64, shard: usize, seq: u64, dialled: bool) {
        p.state = LinkState::Up {
            shard,
            seq,
            dialled,
        };
        p.since = SystemTime::now();
        p.link_error = None;
        p.link_error_kind.clear();
        p.ups += 1;
        p.reconnects = p.ups - 1;
        link.store(link_word(shard, seq), Release);
    }

    /// Remembers `groups` as peer `i`'s ghosts (see
    /// [`crate::router::GroupEntry::ghost_mask`]), each entry once.
    pub fn add_ghosts(&self, i: usize, groups: impl IntoIterator<Item = Group>) {
        if let Some(g) = self.ghosts.get(i) {
            g.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(groups.into_iter().map(|g| (entry_key(&g), g)));
        }
    }

    /// Takes peer `i`'s ghost groups (their bits are the caller's to clear).
    pub fn take_ghosts(&self, i: usize) -> Vec<Group> {
        self.ghosts.get(i).map_or_else(Vec::new, |g| {
            std::mem::take(&mut *g.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect()
        })
    }

    /// Notes that peer `i`'s link forwarded a publish to `group` (this
    /// entry of it: a group of the same name created later is another).
    pub fn heard(&self, i: usize, group: &Group) {
        if let Some(h) = self.heard.get(i) {
            let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
            if h.len() >= MAX_HEARD {
                // Groups with no member here any more have nobody to tell
                // (and the entries they pin are dead): let them go.
                h.retain(|_, g| g.shard_mask() != 0);
            }
            // Bounded: past this a node-down reaches only the groups with
            // the lost node's members.
            if h.len() < MAX_HEARD {
                h.entry(entry_key(group)).or_insert_with(|| group.clone());
            }
        }
    }

    /// Takes the groups peer `i`'s link forwarded publishes for.
    pub fn take_heard(&self, i: usize) -> Vec<Group> {
        self.heard.get(i).map_or_else(Vec::new, |h| {
            std::mem::take(&mut *h.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect()
        })
    }

    /// The peers' part of the stats document.
    pub fn stats_json(&self) -> serde_json::Value {
        let slots = self.lock();
        let peers: Vec<serde_json::Value> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.as_ref().filter(|p| !p.removed)?)))
            .map(|(i, p)| self.peer_json(i, p))
            .collect();
        serde_json::Value::Array(peers)
    }

    fn peer_json(&self, i: usize, p: &PeerSlot) -> serde_json::Value {
        let (state, direction) = match p.state {
            LinkState::Down => ("down", None),
            LinkState::Dialling { .. } => ("dialling", None),
            LinkState::Up { dialled, .. } => ("up", Some(if dialled { "out" } else { "in" })),
        };
        let since = p
            .since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let c = &self.counters[i];
        serde_json::json!({
            "name": p.name, "address": p.addr, "state": state, "direction": direction,
            "address_error": self.addrs.error(i),
            "link_error": p.link_error,
            "since_unix": since,
            "since_secs": p.since.elapsed().map_or(0.0, |d| d.as_secs_f64()),
            "msgs_in": c.msgs_in.load(Relaxed), "msgs_out": c.msgs_out.load(Relaxed),
            "bytes_in": c.bytes_in.load(Relaxed), "bytes_out": c.bytes_out.load(Relaxed),
            "dropped": c.dropped.load(Relaxed),
            "drops": {
                "down": c.dropped_down.load(Relaxed),
                "link_lost": c.dropped_link_lost.load(Relaxed),
                "too_large": c.dropped_too_large.load(Relaxed),
            },
            "max_message_size": c.max_message_size.load(Relaxed),
            "reconnects": p.reconnects,
            "queued_frames": c.queued_frames.load(Relaxed),
            "queued_bytes": c.queued_bytes.load(Relaxed),
        })
    }
}

impl PeerCounters {
    fn set_params(&self, p: LinkParams) {
        self.max_message_size.store(p.max_message_size, Relaxed);
        self.features.store(p.features, Relaxed);
    }

    fn reset(&self) {
        for c in [
            &self.msgs_in,
            &self.msgs_out,
            &self.bytes_in,
            &self.bytes_out,
            &self.dropped,
            &self.dropped_down,
            &self.dropped_link_lost,
            &self.dropped_too_large,
            &self.max_message_size,
            &self.features,
            &self.queued_frames,
            &self.queued_bytes,
        ] {
            c.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_table() {
        let dialling = LinkState::Dialling { shard: 0, seq: 3 };
        let up = |dialled| LinkState::Up {
            shard: 1,
            seq: 7,
            dialled,
        };
        let replace = Admit::Accept {
            replace: Some((1, 7)),
        };
        let fresh = Admit::Accept { replace: None };
        // (state, the peer's name sorts lower, verdict)
        let rows = [
            (LinkState::Down, true, fresh),
            (LinkState::Down, false, fresh),
            (dialling, true, fresh),
            (dialling, false, Admit::Duplicate),
            (up(true), false, Admit::Duplicate),
            (up(true), true, replace),
            (up(false), false, replace),
            (up(false), true, replace),
        ];
        for (state, lower, want) in rows {
            assert_eq!(admission(state, lower), want, "{state:?}, lower = {lower}");
        }
    }
}
