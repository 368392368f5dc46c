//! The peers' addresses as looked up, sans-IO: what each `peers` entry
//! (`host:port`) resolves to, written by whoever does the lookups (the
//! server's resolver thread, never a shard) and read where a link is
//! dialled or admitted. Reading it never looks anything up, so a peer's
//! `HELLO` costs no DNS query and no shard waits on a resolver.
//!
//! An entry whose host is an IP address is known at once; a host name is
//! pending until its first lookup. A name that resolved keeps its
//! addresses when a later lookup fails (a DNS outage does not take a
//! known peer's address away); one that never resolved has none, so its
//! link is neither dialled nor admitted until it does.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};

/// One peer's address entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `host:port` as configured.
    spec: String,
    /// True when `spec` is an IP address and port: nothing to look up.
    literal: bool,
    /// What it resolved to last (empty: never resolved).
    addrs: Vec<SocketAddr>,
    /// Why the last lookup failed, if it did.
    error: Option<String>,
}

/// What a lookup's result changed, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The name resolves, to other addresses than before (or for the
    /// first time, `recovered` when an earlier lookup had failed).
    Resolved {
        /// The addresses now in force.
        addrs: Vec<SocketAddr>,
        /// True when the lookup before this one failed.
        recovered: bool,
    },
    /// The lookup failed with a new error (the same error again is not
    /// news); `kept` is true when earlier addresses stay in force.
    Failed {
        /// Why.
        error: String,
        /// True when the name had resolved before (its addresses stay).
        kept: bool,
    },
}

/// The address entries of the peers, by peer index.
#[derive(Debug, Default)]
pub struct PeerAddrs {
    entries: Mutex<Vec<Option<Entry>>>,
}

impl PeerAddrs {
    fn lock(&self) -> MutexGuard<'_, Vec<Option<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Peer `i` is at `spec` (`host:port`): an IP address is known at
    /// once, a host name waits for its lookup. The same `spec` again
    /// changes nothing.
    pub fn set(&self, i: usize, spec: &str) {
        let mut entries = self.lock();
        if entries.len() <= i {
            entries.resize(i + 1, None);
        }
        if entries[i].as_ref().is_some_and(|e| e.spec == spec) {
            return;
        }
        let literal = spec.parse::<SocketAddr>().ok();
        entries[i] = Some(Entry {
            spec: spec.to_owned(),
            literal: literal.is_some(),
            addrs: literal.into_iter().collect(),
            error: None,
        });
    }

    /// The addresses peer `i` is known at (empty: not resolved yet, or
    /// never).
    pub fn addrs(&self, i: usize) -> Vec<SocketAddr> {
        self.lock()
            .get(i)
            .and_then(Option::as_ref)
            .map(|e| e.addrs.clone())
            .unwrap_or_default()
    }

    /// Why peer `i`'s last lookup failed, if it did.
    pub fn error(&self, i: usize) -> Option<String> {
        self.lock()
            .get(i)
            .and_then(Option::as_ref)
            .and_then(|e| e.error.clone())
    }

    /// The host names to look up now, as (peer index, `host:port`):
    /// every entry that is not an IP address and for which `want(i)`
    /// (the caller's say: a current peer whose link is not up).
    pub fn due(&self, want: impl Fn(usize) -> bool) -> Vec<(usize, String)> {
        self.lock()
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i, e.as_ref()?)))
            .filter(|(i, e)| !e.literal && want(*i))
            .map(|(i, e)| (i, e.spec.clone()))
            .collect()
    }

    /// Records a lookup of `spec` for peer `i`: its addresses, or why it
    /// failed (no address at all is a failure). Ignored when the entry
    /// changed meanwhile (a reload). Returns what is news for the log.
    pub fn record(
        &self,
        i: usize,
        spec: &str,
        result: Result<Vec<SocketAddr>, String>,
    ) -> Option<Lookup> {
        let mut entries = self.lock();
        let e = entries
            .get_mut(i)
            .and_then(Option::as_mut)
            .filter(|e| e.spec == spec && !e.literal)?;
        let result = result.and_then(|a| {
            if a.is_empty() {
                Err("the name has no address".to_owned())
            } else {
                Ok(a)
            }
        });
        match result {
            Ok(addrs) => {
                let recovered = e.error.take().is_some();
                if addrs == e.addrs && !recovered {
                    return None;
                }
                e.addrs = addrs.clone();
                Some(Lookup::Resolved { addrs, recovered })
            }
            Err(error) => {
                if e.error.as_deref() == Some(error.as_str()) {
                    return None;
                }
                e.error = Some(error.clone());
                Some(Lookup::Failed {
                    error,
                    kept: !e.addrs.is_empty(),
                })
            }
        }
    }

    /// True when `ip` is one of peer `i`'s known addresses.
    pub fn admits(&self, i: usize, ip: IpAddr) -> bool {
        self.lock()
            .get(i)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.addrs.iter().any(|a| a.ip() == ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn literals_are_known_at_once_and_names_wait() {
        let t = PeerAddrs::default();
        t.set(0, "127.0.0.2:4809");
        t.set(2, "[::1]:4810");
        t.set(1, "db.example:4809");
        assert_eq!(t.addrs(0), vec![sa("127.0.0.2:4809")]);
        assert_eq!(t.addrs(2), vec![sa("[::1]:4810")]);
        assert!(t.addrs(1).is_empty());
        assert!(t.admits(0, "127.0.0.2".parse().unwrap()));
        assert!(!t.admits(1, "127.0.0.2".parse().unwrap()));
        assert!(!t.admits(7, "127.0.0.2".parse().unwrap()), "no such peer");
        assert_eq!(t.due(|_| true), vec![(1, "db.example:4809".to_owned())]);
        assert_eq!(t.due(|i| i != 1), Vec::new());
    }

    /// Each row: a lookup result for "db.example:1" and what it reports,
    /// in order on one entry; then the addresses in force.
    #[test]
    fn lookups_table() {
        let t = PeerAddrs::default();
        t.set(0, "db.example:1");
        let a = vec![sa("10.0.0.1:1")];
        let b = vec![sa("10.0.0.2:1"), sa("10.0.0.3:1")];
        let fail = |s: &str| Err(s.to_owned());
        let failed = |s: &str, kept| {
            Some(Lookup::Failed {
                error: s.into(),
                kept,
            })
        };
        type Row = (
            Result<Vec<SocketAddr>, String>,
            Option<Lookup>,
            Vec<SocketAddr>,
        );
        let rows: Vec<Row> = vec![
            (fail("nxdomain"), failed("nxdomain", false), vec![]),
            (fail("nxdomain"), None, vec![]),
            (Ok(vec![]), failed("the name has no address", false), vec![]),
            (
                Ok(a.clone()),
                Some(Lookup::Resolved {
                    addrs: a.clone(),
                    recovered: true,
                }),
                a.clone(),
            ),
            (Ok(a.clone()), None, a.clone()),
            (fail("timeout"), failed("timeout", true), a.clone()),
            (
                Ok(b.clone()),
                Some(Lookup::Resolved {
                    addrs: b.clone(),
                    recovered: true,
                }),
                b.clone(),
            ),
        ];
        for (k, (result, news, addrs)) in rows.into_iter().enumerate() {
            assert_eq!(t.record(0, "db.example:1", result), news, "row {k}");
            assert_eq!(t.addrs(0), addrs, "row {k}");
        }
        assert!(t.error(0).is_none());
    }

    #[test]
    fn a_lookup_for_an_entry_changed_meanwhile_is_ignored() {
        let t = PeerAddrs::default();
        t.set(0, "old.example:1");
        t.set(0, "new.example:1");
        assert_eq!(
            t.record(0, "old.example:1", Ok(vec![sa("10.0.0.1:1")])),
            None
        );
        assert!(t.addrs(0).is_empty());
        t.set(0, "10.0.0.9:1");
        assert_eq!(t.record(0, "10.0.0.9:1", Ok(vec![sa("10.0.0.1:1")])), None);
        assert_eq!(t.addrs(0), vec![sa("10.0.0.9:1")]);
        // The same spec again keeps what was looked up.
        t.set(1, "db.example:1");
        t.record(1, "db.example:1", Ok(vec![sa("10.0.0.1:1")]));
        t.set(1, "db.example:1");
        assert_eq!(t.addrs(1), vec![sa("10.0.0.1:1")]);
    }
}
