//! A node's clean leave, sans-IO: the steps of the leaving node (move its
//! clients, close the rest, say goodbye to its peers) and what its peers
//! make of a link's end (a node that said goodbye left; one that did not
//! is down). Durations and counts in, decisions out: no clocks, no
//! sockets; `server::leave` drives it.
//!
//! The order is what keeps messages: a leaving node says goodbye
//! (`NODE_LEAVING`) on each link only after its last client has been
//! closed and every message its clients published has been queued on the
//! links, so the goodbye follows all of them on each link and the peers
//! deliver them before they let the node's members go.

use crate::protocol::Reason;
use std::time::Duration;

/// Where a node stands in its departure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Not leaving.
    Serving = 0,
    /// Told its clients to move; waiting (at most the bound) for them to go.
    Draining = 1,
    /// Its remaining clients are closed: their members leave with the node
    /// (no `PEER_LEAVE` for them: the goodbye covers them).
    Final = 2,
    /// Goodbye said on every link; the process stops.
    Gone = 3,
}

impl Phase {
    /// From its stored value (anything unknown is `Gone`).
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Serving,
            1 => Self::Draining,
            2 => Self::Final,
            _ => Self::Gone,
        }
    }
}

/// What the leaving node does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send `MOVE` to every client that understands it, saying the
    /// connection closes within `deadline_ms`.
    Move {
        /// Milliseconds until the clients are closed at the latest.
        deadline_ms: u32,
    },
    /// Clients are still moving: ask again later.
    Wait,
    /// Close every remaining client (`ERROR SHUTTING_DOWN`), and from now
    /// on announce no member's leave: the goodbye covers them.
    CloseClients,
    /// Say goodbye on every link (`NODE_LEAVING` where the peer speaks
    /// it; a plain close where it does not) and stop.
    Goodbye,
    /// Nothing more to do.
    Done,
}

/// The leaving node's steps.
#[derive(Debug, Clone)]
pub struct Departure {
    phase: Phase,
    /// Longest wait for clients to move (`lame_duck_duration`).
    bound: Duration,
    /// Whether the node has peers (without any, its clients have nowhere
    /// in the cluster to move to: it stops at once).
    has_peers: bool,
}

impl Departure {
    /// A node starting to leave; its clients get at most `bound` to move.
    pub fn new(bound: Duration, has_peers: bool) -> Self {
        Self {
            phase: Phase::Serving,
            bound,
            has_peers,
        }
    }

    /// Where it stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The next step, `elapsed` after the leave began, with `movable`
    /// clients (those told to move) still connected.
    pub fn next(&mut self, elapsed: Duration, movable: usize) -> Step {
        match self.phase {
            Phase::Serving if self.has_peers => {
                self.phase = Phase::Draining;
                let ms = self.bound.saturating_sub(elapsed).as_millis();
                Step::Move {
                    deadline_ms: u32::try_from(ms).unwrap_or(u32::MAX),
                }
            }
            Phase::Draining if movable > 0 && elapsed < self.bound => Step::Wait,
            Phase::Serving | Phase::Draining => {
                self.phase = Phase::Final;
                Step::CloseClients
            }
            Phase::Final => {
                self.phase = Phase::Gone;
                Step::Goodbye
            }
            Phase::Gone => Step::Done,
        }
    }
}

/// Where frames still queued on a link that ended go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// The node is lost with them: `drops.link_lost` of the peer.
    LinkLost,
    /// The node left and has no members any more: counted `left`, as a
    /// message that reaches a node after its members left.
    Left,
}

/// What a peer's link's end means to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkEnd {
    /// The reason told to local members of the groups the node had
    /// members in (`NodeLeft` or `NodeDown`).
    pub reason: Reason,
    /// Whether those groups remember the node (publishes to them count
    /// `drops.down` for it until its next view).
    pub remember: bool,
    /// Whether the groups it only published to are told too (its senders'
    /// messages may have been lost with the link).
    pub tell_publishers: bool,
    /// Where the frames still queued to it are counted.
    pub leftover: Leftover,
}

/// Decides what the end of peer link means: `goodbye` when the peer said
/// `NODE_LEAVING` on it, `removed` when a reload took the peer out of
/// `peers`.
pub fn link_end(goodbye: bool, removed: bool) -> LinkEnd {
    if goodbye {
        // Everything it sent came before its goodbye: nothing of its
        // senders was lost, and it has no members to count losses for.
        LinkEnd {
            reason: Reason::NodeLeft,
            remember: false,
            tell_publishers: false,
            leftover: Leftover::Left,
        }
    } else {
        LinkEnd {
            reason: Reason::NodeDown,
            remember: !removed,
            tell_publishers: true,
            leftover: Leftover::LinkLost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Each row: (has peers, [(elapsed s, movable clients, expected step)]).
    #[test]
    fn departure_table() {
        let mv = |ms| Step::Move { deadline_ms: ms };
        type Row = (bool, Vec<(u64, usize, Step)>);
        let rows: Vec<Row> = vec![
            // Clients move, then the rest is closed and goodbye said.
            (
                true,
                vec![
                    (0, 5, mv(10_000)),
                    (1, 5, Step::Wait),
                    (2, 1, Step::Wait),
                    (3, 0, Step::CloseClients),
                    (3, 0, Step::Goodbye),
                    (4, 0, Step::Done),
                ],
            ),
            // Clients that do not move are closed at the bound.
            (
                true,
                vec![
                    (0, 2, mv(10_000)),
                    (9, 2, Step::Wait),
                    (10, 2, Step::CloseClients),
                    (10, 2, Step::Goodbye),
                ],
            ),
            // Nobody to move: straight on.
            (
                true,
                vec![
                    (0, 0, mv(10_000)),
                    (0, 0, Step::CloseClients),
                    (0, 0, Step::Goodbye),
                ],
            ),
            // No peers: nowhere in the cluster to move to.
            (
                false,
                vec![
                    (0, 3, Step::CloseClients),
                    (0, 3, Step::Goodbye),
                    (0, 3, Step::Done),
                ],
            ),
        ];
        for (peers, steps) in rows {
            let mut d = Departure::new(10 * S, peers);
            for (k, (at, movable, want)) in steps.into_iter().enumerate() {
                let got = d.next(Duration::from_secs(at), movable);
                assert_eq!(got, want, "peers {peers}, step {k}");
            }
        }
    }

    #[test]
    fn phases_round_trip() {
        for p in [Phase::Serving, Phase::Draining, Phase::Final, Phase::Gone] {
            assert_eq!(Phase::from_u8(p as u8), p);
        }
        assert_eq!(Phase::from_u8(200), Phase::Gone);
    }

    /// (said goodbye, removed by a reload) → what the link's end means.
    #[test]
    fn link_end_table() {
        let rows = [
            (true, false, Reason::NodeLeft, false, false, Leftover::Left),
            (true, true, Reason::NodeLeft, false, false, Leftover::Left),
            (
                false,
                false,
                Reason::NodeDown,
                true,
                true,
                Leftover::LinkLost,
            ),
            (
                false,
                true,
                Reason::NodeDown,
                false,
                true,
                Leftover::LinkLost,
            ),
        ];
        for (goodbye, removed, reason, remember, tell, leftover) in rows {
            let want = LinkEnd {
                reason,
                remember,
                tell_publishers: tell,
                leftover,
            };
            assert_eq!(link_end(goodbye, removed), want, "{goodbye} {removed}");
        }
    }
}
