//! Client logins when `users` is configured: the user table, the password
//! check off the shards, and the per-address limit on failed logins.
//!
//! A client's `HELLO` credentials are read on its shard; the argon2 check
//! (tens of milliseconds by design) runs on a small pool of helper threads
//! and its answer comes back through a oneshot channel that the
//! connection's reader awaits, so a shard never hashes. What a logged-in
//! user may do is its [`Grant`], held by its connection and matched on the
//! shard without hashing or allocating. Without users none of this runs:
//! no threads are started and connections carry no grant.
//!
//! Does not own the connection's handshake (that is `conn`) or the config
//! syntax (`config::users`).

use crate::config::{Permissions, User};
use crate::protocol::Credentials;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Failed logins an address may make in a burst before it is refused
/// without a check.
pub const FAILURE_BURST: f64 = 5.0;
/// Failed logins an address regains per second.
pub const FAILURE_REFILL_PER_SEC: f64 = 0.5;
/// Addresses the limiter remembers at most.
pub const LIMITER_ADDRS: usize = 10_000;
/// Password checks waiting for a helper thread at most; past it, logins
/// are refused at once (counted as rate-limited).
pub const VERIFY_QUEUE: usize = 64;
/// Helper threads checking passwords.
pub const VERIFY_THREADS: usize = 2;
/// Password checks one address may have waiting or running at once: a
/// quarter of [`VERIFY_QUEUE`], so that one address cannot fill the queue
/// and lock everyone else out (past it, its logins are refused at once,
/// counted as rate-limited).
pub const VERIFY_PER_ADDR: u32 = 16;

/// What a logged-in client may do, and as whom.
#[derive(Debug)]
pub struct Grant {
    /// The user name.
    pub user: String,
    /// Its permissions, as configured when it logged in.
    pub perms: Permissions,
}

/// One configured user: its hash and what a login grants.
struct Entry {
    hash: String,
    grant: Arc<Grant>,
}

/// The users of one configuration.
struct Table {
    users: HashMap<String, Entry>,
    /// A hash checked for unknown users, so that an unknown name costs
    /// what a wrong password does (the result is ignored).
    decoy: String,
}

/// The server's login state, shared by every shard.
pub struct Auth {
    /// `None` when no users are configured (everyone is served).
    table: Mutex<Option<Arc<Table>>>,
    /// `table` is `Some`: read without the lock on every HELLO.
    enabled: AtomicBool,
    limiter: Mutex<Limiter>,
    /// Password checks waiting or running, per address.
    in_flight: InFlight,
    pool: OnceLock<flume::Sender<Job>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

/// A password check for a helper thread.
struct Job {
    hash: String,
    password: Vec<u8>,
    known: bool,
    reply: tokio::sync::oneshot::Sender<bool>,
    /// The address's place among the checks in flight, given back when
    /// the check is done, before its answer is sent.
    slot: Slot,
}

/// The source a login is limited as: an IPv4 address, or an IPv6 address's
/// /64 network (one host is commonly given a whole /64, so its addresses
/// count as one; an IPv4 address mapped into IPv6 counts as itself).
pub fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// Password checks in flight per address (only addresses with one: at most
/// [`VERIFY_QUEUE`] + [`VERIFY_THREADS`] entries).
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<Mutex<HashMap<IpAddr, u32>>>);

/// One check in flight for an address; gives its place back on drop.
#[derive(Debug)]
pub struct Slot {
    ip: IpAddr,
    of: InFlight,
}

impl InFlight {
    /// A place for a check from `ip`, unless it has `max` in flight.
    pub fn enter(&self, ip: IpAddr, max: u32) -> Option<Slot> {
        let ip = source(ip);
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            ip,
            of: self.clone(),
        })
    }

    /// Addresses with checks in flight.
    #[cfg(test)]
    pub fn addresses(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.of.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// How a login began.
pub enum Login {
    /// No users are configured (a reload removed them): serve the client.
    Open,
    /// Refused at once: why, and whether it was the limiter's doing.
    Refused {
        /// For the `ERROR` message and the log.
        why: String,
        /// Refused without checking the password.
        rate_limited: bool,
    },
    /// The password is being checked: `true` comes back when it matches.
    Pending {
        /// The helper thread's answer.
        answer: tokio::sync::oneshot::Receiver<bool>,
        /// Granted when the answer is `true`.
        grant: Arc<Grant>,
    },
}

impl Auth {
    /// The login state for `users` (none: no authentication).
    pub fn new(users: &[User]) -> Auth {
        Auth {
            table: Mutex::new(table(users)),
            enabled: AtomicBool::new(!users.is_empty()),
            limiter: Mutex::new(Limiter::default()),
            in_flight: InFlight::default(),
            pool: OnceLock::new(),
        }
    }

    /// Replaces the users (a reload): logins from now on use them;
    /// connections already logged in keep their grant.
    pub fn set_users(&self, users: &[User]) {
        let mut slot = self.table.lock().unwrap_or_else(|p| p.into_inner());
        *slot = table(users);
        self.enabled.store(slot.is_some(), Ordering::Release);
    }

    /// True when users are configured (clients must log in).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Starts a login from `ip` with a `HELLO`'s credentials field
    /// ([`Login::Open`] when no users are configured).
    pub fn begin(&self, ip: IpAddr, credentials: &[u8], now: Instant) -> Login {
        let refused = |why: String| Login::Refused {
            why,
            rate_limited: false,
        };
        let Some(table) = self.table.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Login::Open;
        };
        if !self.limiter().allowed(ip, now) {
            return Login::Refused {
                why: "too many failed logins from this address; try again later".into(),
                rate_limited: true,
            };
        }
        let creds = match Credentials::decode(credentials) {
            Ok(Some(c)) => c,
            Ok(None) => return refused("this server requires a user and password".into()),
            Err(e) => return refused(format!("bad credentials: {e}")),
        };
        let (hash, known, grant) = match table.users.get(&creds.user) {
            Some(e) => (e.hash.clone(), true, e.grant.clone()),
            None => {
                let nobody = Arc::new(Grant {
                    user: creds.user.clone(),
                    perms: Permissions::default(),
                });
                (table.decoy.clone(), false, nobody)
            }
        };
        let Some(slot) = self.in_flight.enter(ip, VERIFY_PER_ADDR) else {
            return Login::Refused {
                why: "too many logins waiting from this address; try again later".into(),
                rate_limited: true,
            };
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            hash,
            password: creds.password,
            known,
            reply,
            slot,
        };
        if self.pool().try_send(job).is_err() {
            return Login::Refused {
                why: "too many logins waiting; try again later".into(),
                rate_limited: true,
            };
        }
        Login::Pending { answer, grant }
    }

    /// Records a failed login from `ip` (a wrong password, an unknown user,
    /// bad or missing credentials).
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        self.limiter().failed(ip, now);
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The helper threads' queue, started at the first login.
    fn pool(&self) -> &flume::Sender<Job> {
        self.pool.get_or_init(|| {
            let (tx, rx) = flume::bounded::<Job>(VERIFY_QUEUE);
            for i in 0..VERIFY_THREADS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("msgc-auth-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            let ok = verify(&job.hash, &job.password) && job.known;
                            // A login answered no longer holds a place: the
                            // next one from the address may have it at once.
                            drop(job.slot);
                            let _ = job.reply.send(ok);
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a password-checking thread");
                }
            }
            tx
        })
    }
}

fn table(users: &[User]) -> Option<Arc<Table>> {
    let first = users.first()?;
    let users = users
        .iter()
        .map(|u| {
            let grant = Arc::new(Grant {
                user: u.name.clone(),
                perms: u.permissions.clone(),
            });
            let entry = Entry {
                hash: u.password.clone(),
                grant,
            };
            (u.name.clone(), entry)
        })
        .collect();
    Some(Arc::new(Table {
        users,
        decoy: first.password.clone(),
    }))
}

/// Whether `password` matches the argon2 PHC string `hash` (false for a
/// hash that does not parse).
pub fn verify(hash: &str, password: &[u8]) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password, &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Argon2id cost: memory in KiB, passes, lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Memory, KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub passes: u32,
    /// Lanes.
    pub lanes: u32,
}

impl Default for Cost {
    /// The argon2 crate's defaults (OWASP's minimum: 19 MiB, 2 passes, 1
    /// lane).
    fn default() -> Self {
        let p = argon2::Params::default();
        Cost {
            memory_kib: p.m_cost(),
            passes: p.t_cost(),
            lanes: p.p_cost(),
        }
    }
}

/// An argon2id PHC string for `password`, with a random salt.
///
/// # Errors
/// The cost is out of argon2's ranges, or no randomness could be read.
pub fn hash_password(password: &[u8], cost: Cost) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(cost.memory_kib, cost.passes, cost.lanes, None)
        .map_err(|e| format!("bad argon2 cost: {e}"))?;
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| format!("no random salt: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    argon
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Failed logins per source address: a token bucket each, bounded in
/// addresses. Sans-IO: the caller passes the time.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> Bucket {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        Bucket {
            tokens: (self.tokens + secs * FAILURE_REFILL_PER_SEC).min(FAILURE_BURST),
            at: now,
        }
    }
}

impl Limiter {
    /// Whether `ip` may try a login now (it has failures left).
    pub fn allowed(&mut self, ip: IpAddr, now: Instant) -> bool {
        match self.buckets.get_mut(&source(ip)) {
            None => true,
            Some(b) => {
                *b = b.refilled(now);
                b.tokens >= 1.0
            }
        }
    }

    /// Records a failure from `ip`.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) {
        let full = Bucket {
            tokens: FAILURE_BURST,
            at: now,
        };
        let b = self.buckets.entry(source(ip)).or_insert(full);
        *b = b.refilled(now);
        b.tokens = (b.tokens - 1.0).max(0.0);
        if self.buckets.len() > LIMITER_ADDRS {
            self.make_room(now);
        }
    }

    /// Forgets the addresses that have all their failures back, then, if
    /// that is not enough, the half closest to it: many addresses failing
    /// once each cannot make the limiter forget the one that fails most
    /// (and the bound still wins). Runs once per [`LIMITER_ADDRS`] / 2 new
    /// addresses at most.
    fn make_room(&mut self, now: Instant) {
        for b in self.buckets.values_mut() {
            *b = b.refilled(now);
        }
        self.buckets.retain(|_, b| b.tokens < FAILURE_BURST);
        if self.buckets.len() <= LIMITER_ADDRS / 2 {
            return;
        }
        let mut tokens: Vec<f64> = self.buckets.values().map(|b| b.tokens).collect();
        let keep = LIMITER_ADDRS / 2;
        let (_, cut, _) = tokens.select_nth_unstable_by(keep, f64::total_cmp);
        // Strictly below: addresses that tie at the cut (failing alike)
        // go together, so at most half stay.
        let cut = *cut;
        self.buckets.retain(|_, b| b.tokens < cut);
    }

    /// Addresses remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no address is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    #[test]
    fn limiter_allows_a_burst_then_refills() {
        let mut l = Limiter::default();
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.allowed(ip, t0));
            l.failed(ip, t0);
        }
        assert!(!l.allowed(ip, t0));
        assert!(l.allowed(other, t0));
        assert!(!l.allowed(ip, t0 + Duration::from_secs(1)));
        assert!(l.allowed(ip, t0 + Duration::from_secs(2)));
    }

    /// One address has at most `max` checks in flight; others are not
    /// affected, a finished check gives its place back, and the map
    /// forgets an address with none.
    #[test]
    fn checks_in_flight_are_capped_per_address() {
        let f = InFlight::default();
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let mut slots: Vec<Slot> = (0..VERIFY_PER_ADDR)
            .map(|_| f.enter(ip, VERIFY_PER_ADDR).expect("a place"))
            .collect();
        assert!(
            f.enter(ip, VERIFY_PER_ADDR).is_none(),
            "the address is full"
        );
        let o = f.enter(other, VERIFY_PER_ADDR).expect("another address");
        slots.pop();
        assert!(f.enter(ip, VERIFY_PER_ADDR).is_some(), "a place came back");
        drop(slots);
        drop(o);
        assert_eq!(f.addresses(), 0);
    }

    /// A login is refused at once (rate-limited) while its address — an
    /// IPv6 address's /64 — has `VERIFY_PER_ADDR` checks in flight;
    /// another address is not affected.
    #[test]
    fn a_login_is_refused_while_its_address_has_too_many_checks_in_flight() {
        let cheap = Cost {
            memory_kib: 64,
            passes: 1,
            lanes: 1,
        };
        let alice = User {
            name: "alice".into(),
            password: hash_password(b"pw", cheap).expect("hash"),
            permissions: Permissions::default(),
        };
        let auth = Auth::new(&[alice]);
        let creds = [&[1u8, 5][..], b"alice", b"pw"].concat();
        let ip: IpAddr = "2001:db8::1".parse().expect("v6");
        let same_net: IpAddr = "2001:db8::2".parse().expect("v6");
        let other: IpAddr = "2001:db8:0:1::1".parse().expect("v6");
        let now = Instant::now();
        let slots: Vec<Slot> = (0..VERIFY_PER_ADDR)
            .map(|_| auth.in_flight.enter(ip, VERIFY_PER_ADDR).expect("a place"))
            .collect();
        for from in [ip, same_net] {
            match auth.begin(from, &creds, now) {
                Login::Refused { rate_limited, .. } => assert!(rate_limited, "{from}"),
                _ => panic!("{from}: refused while its address is full"),
            }
        }
        assert!(
            matches!(auth.begin(other, &creds, now), Login::Pending { .. }),
            "another /64 is checked"
        );
        drop(slots);
        assert!(
            matches!(auth.begin(ip, &creds, now), Login::Pending { .. }),
            "checked again once its checks are done"
        );
    }

    /// README: "remembers at most 10,000 addresses".
    #[test]
    fn limiter_stays_bounded() {
        assert_eq!(LIMITER_ADDRS, 10_000, "the bound README states");
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for i in 0..(LIMITER_ADDRS as u32 + 10) {
            l.failed(IpAddr::V4(Ipv4Addr::from(i)), t0);
            assert!(l.len() <= LIMITER_ADDRS);
        }
    }

    /// Many addresses failing once each fill the limiter; it forgets them,
    /// not the address that failed most.
    #[test]
    fn a_flood_of_addresses_does_not_free_the_worst_one() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let bad = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        for _ in 0..5 {
            l.failed(bad, t0);
        }
        assert!(!l.allowed(bad, t0));
        for i in 0..(3 * LIMITER_ADDRS as u32) {
            l.failed(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), t0);
            assert!(l.len() <= LIMITER_ADDRS);
        }
        assert!(!l.allowed(bad, t0), "still refused after the flood");
    }

    /// An IPv6 host's addresses in one /64 are one source; another /64 is
    /// another, and an IPv4-mapped address is its IPv4 address.
    #[test]
    fn ipv6_addresses_are_limited_per_64() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("v6");
        let same_net: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().expect("v6");
        let other_net: IpAddr = "2001:db8:1:3::1".parse().expect("v6");
        for i in 0..5u16 {
            l.failed(
                IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, i)),
                t0,
            );
        }
        assert!(!l.allowed(a, t0));
        assert!(!l.allowed(same_net, t0));
        assert!(l.allowed(other_net, t0));
        assert_eq!(l.len(), 1);
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7));
        let mapped: IpAddr = "::ffff:10.9.8.7".parse().expect("mapped");
        assert_eq!(source(mapped), v4);
        let f = InFlight::default();
        let _s = f.enter(a, 1).expect("a place");
        assert!(f.enter(same_net, 1).is_none(), "same /64, same source");
        assert!(f.enter(other_net, 1).is_some());
    }

    #[test]
    fn hash_and_verify() {
        let cheap = Cost {
            memory_kib: 64,
            passes: 1,
            lanes: 1,
        };
        let h = hash_password(b"s3cret", cheap).expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(&h, b"s3cret"));
        assert!(!verify(&h, b"wrong"));
        assert!(!verify("not a hash", b"s3cret"));
        assert_ne!(h, hash_password(b"s3cret", cheap).expect("hash"), "salted");
    }
}
