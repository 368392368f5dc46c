//! Membership bookkeeping of peer links, sans-IO: frames and link events
//! in, actions out. The server's `peers` module owns the sockets and the
//! group table and applies the actions; everything here is decided from
//! what came in, and tested without a server.
//!
//! - [`LinkView`]: one link's membership stream. The peer's snapshot
//!   comes first (chunks `FIRST` … `LAST`), then its joins and leaves.
//!   Anything out of that order, or a member id that does not carry the
//!   peer's node name (a member's, or a message sender's), is a protocol
//!   error on the link.
//! - [`Barriers`]: `PING`s queued behind news on a link, each holding
//!   waiters until its `PONG` (the peer has applied everything before it)
//!   or until the link goes.

use crate::protocol::{snapshot_flags, ErrorCode, Frame, GroupName, MemberId, Reason};
use std::collections::{HashMap, VecDeque};

/// What to do with a peer's membership frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewAction {
    /// `member` (of the peer's node) joined `group`.
    Join {
        /// The group.
        group: GroupName,
        /// The member.
        member: MemberId,
    },
    /// `member` (of the peer's node) left `group`.
    Leave {
        /// The group.
        group: GroupName,
        /// The member.
        member: MemberId,
        /// `Leave` or `Disconnect`.
        reason: Reason,
    },
    /// The peer's snapshot is whole: its view is complete again (what it
    /// lost while down is no longer counted against it).
    ViewComplete,
    /// The peer leaves the cluster (`NODE_LEAVING`): everything it sent
    /// came before; close the link, and its members leave with reason
    /// node-left (see [`super::leave::link_end`]). Accepted in any phase.
    Leaving,
}

/// Where a link's membership stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Up, no snapshot chunk yet.
    AwaitingSnapshot,
    /// Between the snapshot's `FIRST` and `LAST` chunks.
    InSnapshot,
    /// The snapshot is applied; joins and leaves follow.
    Live,
}

/// A protocol error on a link: the code and the message of its `ERROR`.
pub type LinkError = (ErrorCode, String);

/// One link's membership stream, from the peer named `node`.
#[derive(Debug, Clone)]
pub struct LinkView {
    node: String,
    phase: Phase,
}

impl LinkView {
    /// A link to peer node `node` that just came up.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            phase: Phase::AwaitingSnapshot,
        }
    }

    /// Where the stream stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Decides on a membership frame (`SNAPSHOT`, `PEER_JOIN`,
    /// `PEER_LEAVE`, `NODE_LEAVING`) from the peer; other frames give no
    /// action (the sender of a `FORWARD` or `FORWARD_DIRECT` is checked,
    /// see [`LinkView::check_sender`]).
    ///
    /// # Errors
    /// A frame out of order (a snapshot chunk that does not continue the
    /// snapshot, a second snapshot, a join or leave before the snapshot is
    /// whole) is `UNEXPECTED`; a member or sender id of another node is
    /// `NOT_ALLOWED`. Either closes the link.
    pub fn on_frame(&mut self, frame: &Frame) -> Result<Vec<ViewAction>, LinkError> {
        match frame {
            Frame::Snapshot { flags, entries } => {
                let first = flags & snapshot_flags::FIRST != 0;
                match (self.phase, first) {
                    (Phase::AwaitingSnapshot, true) | (Phase::InSnapshot, false) => {}
                    (Phase::AwaitingSnapshot, false) => {
                        return Err(unexpected("a snapshot chunk without FIRST came first"))
                    }
                    (Phase::InSnapshot, true) => {
                        return Err(unexpected("a snapshot started before the last one ended"))
                    }
                    (Phase::Live, _) => return Err(unexpected("a second snapshot on one link")),
                }
                let mut out = Vec::with_capacity(entries.len() + 1);
                for (group, member) in entries {
                    self.check_member(member)?;
                    out.push(ViewAction::Join {
                        group: group.clone(),
                        member: member.clone(),
                    });
                }
                if flags & snapshot_flags::LAST != 0 {
                    self.phase = Phase::Live;
                    out.push(ViewAction::ViewComplete);
                } else {
                    self.phase = Phase::InSnapshot;
                }
                Ok(out)
            }
            Frame::PeerJoin { group, member } => {
                self.live("PEER_JOIN")?;
                self.check_member(member)?;
                Ok(vec![ViewAction::Join {
                    group: group.clone(),
                    member: member.clone(),
                }])
            }
            Frame::PeerLeave {
                group,
                member,
                reason,
            } => {
                self.live("PEER_LEAVE")?;
                self.check_member(member)?;
                Ok(vec![ViewAction::Leave {
                    group: group.clone(),
                    member: member.clone(),
                    reason: *reason,
                }])
            }
            Frame::NodeLeaving => Ok(vec![ViewAction::Leaving]),
            Frame::Forward { sender, .. } | Frame::ForwardDirect { sender, .. } => {
                self.check_sender(sender)?;
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Checks the sender of a message from the peer (`FORWARD`,
    /// `FORWARD_SEQ`, `FORWARD_DIRECT`): a member id its node assigned,
    /// like every id a peer sends (a node cannot speak for another's
    /// members).
    ///
    /// # Errors
    /// `NOT_ALLOWED` for an id of another node (or none), which closes
    /// the link.
    pub fn check_sender(&self, sender: &MemberId) -> Result<(), LinkError> {
        self.check_member(sender)
    }

    /// True when `sender` (a valid name, read where it lies in a frame)
    /// passes [`LinkView::check_sender`]; the caller takes the general
    /// path, which says why, when it does not.
    pub fn sender_ok(&self, sender: &str) -> bool {
        crate::protocol::member_parts(sender).is_some_and(|(node, ..)| node == self.node)
    }

    fn live(&self, what: &str) -> Result<(), LinkError> {
        if self.phase == Phase::Live {
            Ok(())
        } else {
            Err(unexpected(&format!("{what} before the snapshot was whole")))
        }
    }

    /// A member id from the peer must be one its node assigned.
    fn check_member(&self, member: &MemberId) -> Result<(), LinkError> {
        if self.sender_ok(member.as_str()) {
            return Ok(());
        }
        Err((
            ErrorCode::NOT_ALLOWED,
            format!(
                "member id {:?} is not one of node {:?}",
                member.as_str(),
                self.node
            ),
        ))
    }
}

fn unexpected(msg: &str) -> LinkError {
    (ErrorCode::UNEXPECTED, msg.to_owned())
}

/// What a lost node leaves behind (see [`node_down`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDown<G> {
    /// Groups whose local members are told node-down, each once.
    pub tell: Vec<G>,
    /// Groups that remember the node had members there (publishes to them
    /// count as lost for it until its next view).
    pub ghosts: Vec<G>,
}

/// Decides what the loss of a peer node means: `lost` are the groups in
/// which it had members, with how many left the view; `heard` the groups
/// its link forwarded publishes for; `local(g)` says whether group `g`
/// has members on this node (only they can be told); `removed` that the
/// node was taken out of `peers` (nothing is remembered for it then).
pub fn node_down<G: Clone + Eq + std::hash::Hash>(
    lost: &[(G, usize)],
    heard: impl IntoIterator<Item = G>,
    local: impl Fn(&G) -> bool,
    removed: bool,
) -> NodeDown<G> {
    let mut told = std::collections::HashSet::new();
    let mut plan = NodeDown {
        tell: Vec::new(),
        ghosts: Vec::new(),
    };
    for (g, gone) in lost.iter().filter(|(_, gone)| *gone > 0) {
        let _ = gone;
        if !removed {
            plan.ghosts.push(g.clone());
        }
        if told.insert(g.clone()) && local(g) {
            plan.tell.push(g.clone());
        }
    }
    for g in heard {
        if local(&g) && told.insert(g.clone()) {
            plan.tell.push(g);
        }
    }
    plan
}

/// A link: (peer index, the link's connection sequence number).
pub type LinkId = (usize, u64);

/// Barrier `PING`s in flight per link, each with the waiters it holds.
#[derive(Debug)]
pub struct Barriers<W> {
    links: HashMap<LinkId, (u64, VecDeque<(u64, W)>)>,
}

impl<W> Default for Barriers<W> {
    fn default() -> Self {
        Self {
            links: HashMap::new(),
        }
    }
}

impl<W> Barriers<W> {
    /// Queues a barrier for `waiter` on `link`: returns the token of the
    /// `PING` to send on it (behind what is queued there already).
    pub fn ping(&mut self, link: LinkId, waiter: W) -> u64 {
        let (next, q) = self.links.entry(link).or_insert((0, VecDeque::new()));
        *next += 1;
        q.push_back((*next, waiter));
        *next
    }

    /// `PONG token` came back on `link`: the waiters of that `PING` and of
    /// every earlier one passed (a `PONG` follows everything sent before
    /// its `PING`). A token that answers nothing passes nothing.
    pub fn pong(&mut self, link: LinkId, token: u64) -> Vec<W> {
        let Some((_, q)) = self.links.get_mut(&link) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while q.front().is_some_and(|(t, _)| *t <= token) {
            if let Some((_, w)) = q.pop_front() {
                out.push(w);
            }
        }
        out
    }

    /// `link` went: every waiter on it passes (a link that comes up again
    /// starts with a snapshot that holds whatever they waited for).
    pub fn link_gone(&mut self, link: LinkId) -> Vec<W> {
        self.links
            .remove(&link)
            .map(|(_, q)| q.into_iter().map(|(_, w)| w).collect())
            .unwrap_or_default()
    }

    /// Waiters held now, on every link.
    pub fn waiting(&self) -> usize {
        self.links.values().map(|(_, q)| q.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::snapshot_flags::{FIRST, LAST};

    fn g(s: &str) -> GroupName {
        GroupName::from_str_checked(s).unwrap()
    }
    fn m(s: &str) -> MemberId {
        MemberId::from_str_checked(s).unwrap()
    }
    /// A sender is accepted only when its id is one the link's node
    /// assigned, read in place or wrapped (one rule, `sender_ok`).
    #[test]
    fn sender_ok_agrees_with_check_sender() {
        let v = LinkView::new("node2");
        for (id, ok) in [
            ("node2/0.1.k", true),
            ("node2/1.7", true),
            ("node1/0.1.k", false),
            ("node2", false),
            ("node2/x.1", false),
            ("a/node2/0.1", false),
            ("node2x/0.1", false),
        ] {
            assert_eq!(v.sender_ok(id), ok, "{id}");
            assert_eq!(v.sender_ok(id), v.check_sender(&m(id)).is_ok(), "{id}");
        }
    }

    fn snap(flags: u8, entries: &[(&str, &str)]) -> Frame {
        Frame::Snapshot {
            flags,
            entries: entries.iter().map(|(a, b)| (g(a), m(b))).collect(),
        }
    }
    fn join(group: &str, member: &str) -> Frame {
        Frame::PeerJoin {
            group: g(group),
            member: m(member),
        }
    }
    fn leave(group: &str, member: &str) -> Frame {
        Frame::PeerLeave {
            group: g(group),
            member: m(member),
            reason: Reason::Disconnect,
        }
    }

    fn forward(sender: &str, seq: Option<u64>) -> Frame {
        Frame::Forward {
            group: g("a"),
            sender: m(sender),
            seq,
            payload: bytes::Bytes::from_static(b"hi"),
        }
    }
    fn direct(sender: &str) -> Frame {
        Frame::ForwardDirect {
            to: m("n1/0.1"),
            sender: m(sender),
            payload: bytes::Bytes::from_static(b"hi"),
        }
    }

    /// Each row: frames fed in order to a fresh link from node `n2`, and
    /// what the last one gives (actions as short strings, or the error
    /// code).
    #[test]
    fn link_view_table() {
        let ok = |v: &[&str]| Ok(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        type Row = (&'static str, Vec<Frame>, Result<Vec<String>, ErrorCode>);
        let rows: Vec<Row> = vec![
            (
                "one chunk",
                vec![snap(FIRST | LAST, &[("a", "n2/0.1.x")])],
                ok(&["join a n2/0.1.x", "complete"]),
            ),
            (
                "empty snapshot",
                vec![snap(FIRST | LAST, &[])],
                ok(&["complete"]),
            ),
            (
                "three chunks",
                vec![
                    snap(FIRST, &[("a", "n2/0.1")]),
                    snap(0, &[("b", "n2/0.1")]),
                    snap(LAST, &[("c", "n2/0.2")]),
                ],
                ok(&["join c n2/0.2", "complete"]),
            ),
            (
                "join after the snapshot",
                vec![snap(FIRST | LAST, &[]), join("a", "n2/1.4")],
                ok(&["join a n2/1.4"]),
            ),
            (
                "leave after the snapshot",
                vec![snap(FIRST | LAST, &[]), leave("a", "n2/1.4")],
                ok(&["leave a n2/1.4 disconnect"]),
            ),
            (
                "other frames are not membership",
                vec![Frame::Noop],
                ok(&[]),
            ),
            (
                "goodbye after the snapshot",
                vec![snap(FIRST | LAST, &[("a", "n2/0.1")]), Frame::NodeLeaving],
                ok(&["leaving"]),
            ),
            (
                "goodbye before any snapshot",
                vec![Frame::NodeLeaving],
                ok(&["leaving"]),
            ),
            (
                "join before the snapshot",
                vec![join("a", "n2/1.4")],
                Err(ErrorCode::UNEXPECTED),
            ),
            (
                "join in the middle of the snapshot",
                vec![snap(FIRST, &[]), join("a", "n2/1.4")],
                Err(ErrorCode::UNEXPECTED),
            ),
            (
                "chunk without FIRST first",
                vec![snap(LAST, &[])],
                Err(ErrorCode::UNEXPECTED),
            ),
            (
                "FIRST twice",
                vec![snap(FIRST, &[]), snap(FIRST, &[])],
                Err(ErrorCode::UNEXPECTED),
            ),
            (
                "a second snapshot",
                vec![snap(FIRST | LAST, &[]), snap(FIRST | LAST, &[])],
                Err(ErrorCode::UNEXPECTED),
            ),
            (
                "snapshot member of another node",
                vec![snap(FIRST | LAST, &[("a", "n3/0.1")])],
                Err(ErrorCode::NOT_ALLOWED),
            ),
            (
                "join of another node's member",
                vec![snap(FIRST | LAST, &[]), join("a", "n1/0.1")],
                Err(ErrorCode::NOT_ALLOWED),
            ),
            (
                "leave of an id no node assigned",
                vec![snap(FIRST | LAST, &[]), leave("a", "stranger")],
                Err(ErrorCode::NOT_ALLOWED),
            ),
            (
                "a forward from the peer's own member",
                vec![snap(FIRST | LAST, &[]), forward("n2/0.1.x", Some(1))],
                ok(&[]),
            ),
            (
                "a forward before the snapshot (messages are not ordered by it)",
                vec![forward("n2/1.4", None)],
                ok(&[]),
            ),
            (
                "a forward direct from the peer's own member",
                vec![direct("n2/0.1")],
                ok(&[]),
            ),
            (
                "a forward with another node's sender",
                vec![snap(FIRST | LAST, &[]), forward("n3/0.1.x", None)],
                Err(ErrorCode::NOT_ALLOWED),
            ),
            (
                "a numbered forward with another node's sender",
                vec![forward("n1/0.1", Some(7))],
                Err(ErrorCode::NOT_ALLOWED),
            ),
            (
                "a forward with a sender no node assigned",
                vec![forward("n2", None)],
                Err(ErrorCode::NOT_ALLOWED),
            ),
            (
                "a forward with a sender of a node whose name extends the peer's",
                vec![forward("n2/x/0.1", None)],
                Err(ErrorCode::NOT_ALLOWED),
            ),
            (
                "a forward direct from another node's member",
                vec![direct("n3/0.1")],
                Err(ErrorCode::NOT_ALLOWED),
            ),
        ];
        for (what, frames, want) in rows {
            let mut view = LinkView::new("n2");
            let mut last = Ok(Vec::new());
            for f in &frames {
                last = view.on_frame(f).map(|acts| {
                    acts.iter()
                        .map(|a| match a {
                            ViewAction::Join { group, member } => {
                                format!("join {group} {member}")
                            }
                            ViewAction::Leave {
                                group,
                                member,
                                reason,
                            } => format!("leave {group} {member} {}", reason.name()),
                            ViewAction::ViewComplete => "complete".into(),
                            ViewAction::Leaving => "leaving".into(),
                        })
                        .collect()
                });
                if last.is_err() {
                    break;
                }
            }
            assert_eq!(last.map_err(|(c, _)| c), want, "{what}");
        }
    }

    #[test]
    fn node_down_table() {
        // (lost (group, members gone), heard, groups with local members,
        // removed) → (told, ghosts)
        type Row = (
            &'static [(&'static str, usize)],
            &'static [&'static str],
            &'static [&'static str],
            bool,
            &'static [&'static str],
            &'static [&'static str],
        );
        let rows: &[Row] = &[
            (&[("a", 2)], &[], &["a"], false, &["a"], &["a"]),
            (&[("a", 2)], &[], &["a"], true, &["a"], &[]),
            // Members only elsewhere: remembered, nobody here to tell.
            (&[("a", 1)], &[], &[], false, &[], &["a"]),
            // It only published to "b": told, not remembered.
            (&[], &["b"], &["b"], false, &["b"], &[]),
            // Published to a group it also had members in: told once.
            (
                &[("a", 1)],
                &["a", "b"],
                &["a", "b"],
                false,
                &["a", "b"],
                &["a"],
            ),
            // Published to a group nobody here belongs to any more.
            (&[], &["c"], &[], false, &[], &[]),
            // A group it had no member left in (0 gone) is not its loss.
            (&[("a", 0)], &[], &["a"], false, &[], &[]),
        ];
        for (lost, heard, local, removed, tell, ghosts) in rows {
            let lost: Vec<(&str, usize)> = lost.to_vec();
            let plan = node_down(
                &lost,
                heard.iter().copied(),
                |g| local.contains(g),
                *removed,
            );
            assert_eq!(plan.tell, tell.to_vec(), "told: {lost:?} {heard:?}");
            assert_eq!(plan.ghosts, ghosts.to_vec(), "ghosts: {lost:?} {heard:?}");
        }
    }

    #[test]
    fn a_node_name_with_slashes_owns_its_ids() {
        let mut view = LinkView::new("eu/n2");
        let f = snap(FIRST | LAST, &[("a", "eu/n2/0.1.x")]);
        assert!(view.on_frame(&f).is_ok());
        assert_eq!(view.phase(), Phase::Live);
    }

    /// Each row: operations on two links, and the waiters each gives back.
    #[test]
    fn barriers_table() {
        let (l1, l2) = ((1, 10), (2, 20));
        let mut b = Barriers::default();
        let t1 = b.ping(l1, "j1");
        let t2 = b.ping(l1, "j2");
        let t3 = b.ping(l2, "j1");
        assert_eq!((t1, t2, t3), (1, 2, 1), "tokens count per link");
        assert_eq!(b.pong(l1, 0), Vec::<&str>::new(), "token 0 answers nothing");
        assert_eq!(b.pong(l2, 1), vec!["j1"]);
        assert_eq!(
            b.pong(l1, 2),
            vec!["j1", "j2"],
            "a later PONG passes the earlier PINGs"
        );
        assert_eq!(b.pong(l1, 2), Vec::<&str>::new(), "each waiter passes once");
        assert_eq!(b.waiting(), 0);
        b.ping(l1, "j3");
        b.ping(l1, "j4");
        assert_eq!(
            b.pong((1, 11), 5),
            Vec::<&str>::new(),
            "another link of the same peer"
        );
        assert_eq!(
            b.link_gone(l1),
            vec!["j3", "j4"],
            "a link that goes passes them all"
        );
        assert_eq!(b.link_gone(l1), Vec::<&str>::new());
        assert_eq!(b.ping(l1, "j5"), 1, "a link seen again starts over");
    }
}
