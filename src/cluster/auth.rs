//! Peer authentication, sans-IO: the mutual challenge–response by which
//! two nodes prove to each other that they hold the cluster key
//! (`cluster_key`), without sending it (PROTOCOL.md section 13.1).
//!
//! ```text
//! dialler                                             acceptor
//!   HELLO {role peer, credentials 01 ‖ nonce_d}  ──▶  name and address checked
//!   ◀──  CHALLENGE {nonce_s, mac_a}                   mac_a = MAC(1, …)
//!   checks mac_a
//!   PROOF {mac_d}                                ──▶  mac_d = MAC(2, …), checked;
//!   ◀──  WELCOME (admitted: only now can the link replace another)
//! ```
//!
//! `MAC(side, …)` is HMAC-SHA256 under the key over [`transcript`]: a
//! label, the side proving, the protocol version, both node names and
//! both nonces. Each side's nonce is fresh, so a proof recorded on one
//! connection proves nothing on another (a replayed `PROOF` answers a
//! challenge that is no longer asked), and each side's proof names its
//! own role, so one side's proof cannot be reflected as the other's.
//! MACs are compared in constant time.
//!
//! Owns the byte layouts (credentials, transcript) and the decisions; the
//! server's `peers` module sends the frames and keeps the state per
//! connection. No sockets, no clocks; the nonce comes from the caller.

use crate::config::ClusterKey;
use crate::protocol::AUTH_LEN;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The scheme byte of a peer `HELLO`'s credentials: HMAC-SHA256
/// challenge–response with 32-byte nonces.
pub const SCHEME_HMAC_SHA256: u8 = 1;

/// The label that opens every transcript.
pub const LABEL: &[u8; 14] = b"msgc-peer-auth";

/// A nonce or a MAC.
pub type Block = [u8; AUTH_LEN];

/// Who proves: the side's byte in the transcript.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The node that accepted the connection (its proof is in `CHALLENGE`).
    Acceptor = 1,
    /// The node that dialled (its proof is in `PROOF`).
    Dialler = 2,
}

/// Why a handshake is refused. Each is answered `NOT_ALLOWED` and counted
/// (`peer_auth_failures`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A key is set here and the peer's `HELLO` asked for no authentication.
    #[error("the peer did not authenticate (cluster_key is set on this node)")]
    NoCredentials,
    /// The peer's `HELLO` carries credentials of an unknown form.
    #[error("the peer's credentials are not an HMAC-SHA256 challenge (scheme 1, 32-byte nonce)")]
    BadCredentials,
    /// The peer asked for authentication but no key is set here.
    #[error("the peer asked for cluster authentication but no cluster_key is set on this node")]
    NoKeyHere,
    /// The peer's MAC does not prove the key (wrong key, or a replay).
    #[error("the peer's proof does not match the cluster key (a different key, or a replay)")]
    BadProof,
    /// The accepting peer admitted the link without proving the key.
    #[error("the peer answered WELCOME without proving the cluster key (no cluster_key there?)")]
    Unproven,
    /// A `CHALLENGE` that was not asked for, or came twice.
    #[error("unexpected CHALLENGE")]
    UnexpectedChallenge,
}

/// The bytes each side's MAC covers (PROTOCOL.md section 13.1): `LABEL`,
/// `side` u8, `version` u16, dialler and acceptor node names (str8 each),
/// `nonce_d`, `nonce_s`.
pub fn transcript(
    side: Side,
    version: u16,
    dialler: &[u8],
    acceptor: &[u8],
    nonce_d: &Block,
    nonce_s: &Block,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(LABEL.len() + 5 + dialler.len() + acceptor.len() + 64);
    t.extend_from_slice(LABEL);
    t.push(side as u8);
    t.extend_from_slice(&version.to_be_bytes());
    for name in [dialler, acceptor] {
        // Node names are 1..=255 bytes (validated names); clamp anyway.
        let name = &name[..name.len().min(255)];
        t.push(name.len() as u8);
        t.extend_from_slice(name);
    }
    t.extend_from_slice(nonce_d);
    t.extend_from_slice(nonce_s);
    t
}

fn hmac(key: &ClusterKey, transcript: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: `new_from_slice` cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.expose())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    m.update(transcript);
    m
}

/// The MAC of `transcript` under `key`.
pub fn mac(key: &ClusterKey, transcript: &[u8]) -> Block {
    hmac(key, transcript).finalize().into_bytes().into()
}

/// True when `tag` is the MAC of `transcript` under `key` (constant time).
pub fn verify(key: &ClusterKey, transcript: &[u8], tag: &Block) -> bool {
    hmac(key, transcript).verify_slice(tag).is_ok()
}

/// A peer `HELLO`'s credentials asking for authentication with `nonce_d`.
pub fn credentials(nonce_d: &Block) -> Vec<u8> {
    let mut c = Vec::with_capacity(1 + AUTH_LEN);
    c.push(SCHEME_HMAC_SHA256);
    c.extend_from_slice(nonce_d);
    c
}

/// A fresh random nonce.
///
/// # Errors
/// When the system's random source fails.
pub fn nonce() -> Result<Block, getrandom::Error> {
    let mut n = [0; AUTH_LEN];
    getrandom::getrandom(&mut n)?;
    Ok(n)
}

/// What the accepting side does with a peer `HELLO` (whose name and
/// address passed).
#[derive(Debug, PartialEq, Eq)]
pub enum OnHello {
    /// No key here, none asked for: admit as before.
    Admit,
    /// Send `CHALLENGE {nonce_s, mac}` and wait for `PROOF` in `pending`.
    Challenge {
        /// The acceptor's MAC (the `CHALLENGE`'s `mac`).
        mac: Block,
        /// What the `PROOF` is checked against.
        pending: Acceptor,
    },
}

/// The accepting side between its `CHALLENGE` and the dialler's `PROOF`.
#[derive(Debug, PartialEq, Eq)]
pub struct Acceptor {
    /// The `PROOF`'s expected transcript.
    expect: Vec<u8>,
    /// Its nonce (sent in `CHALLENGE`).
    pub nonce_s: Block,
}

impl Acceptor {
    /// Decides on a `HELLO` from `dialler` to this node, `acceptor`, with
    /// `credentials`, given this node's key and a fresh `nonce_s`.
    ///
    /// # Errors
    /// [`AuthError`] when the peer must be refused.
    pub fn on_hello(
        key: Option<&ClusterKey>,
        version: u16,
        dialler: &[u8],
        acceptor: &[u8],
        credentials: &[u8],
        nonce_s: Block,
    ) -> Result<OnHello, AuthError> {
        let nonce_d = match (credentials, key) {
            ([], None) => return Ok(OnHello::Admit),
            ([], Some(_)) => return Err(AuthError::NoCredentials),
            ([SCHEME_HMAC_SHA256, rest @ ..], _) if rest.len() == AUTH_LEN => {
                let mut n = [0; AUTH_LEN];
                n.copy_from_slice(rest);
                n
            }
            _ => return Err(AuthError::BadCredentials),
        };
        let Some(key) = key else {
            return Err(AuthError::NoKeyHere);
        };
        let t = |side| transcript(side, version, dialler, acceptor, &nonce_d, &nonce_s);
        Ok(OnHello::Challenge {
            mac: mac(key, &t(Side::Acceptor)),
            pending: Acceptor {
                expect: t(Side::Dialler),
                nonce_s,
            },
        })
    }

    /// Checks the dialler's `PROOF`.
    ///
    /// # Errors
    /// [`AuthError::BadProof`].
    pub fn on_proof(&self, key: &ClusterKey, tag: &Block) -> Result<(), AuthError> {
        if verify(key, &self.expect, tag) {
            Ok(())
        } else {
            Err(AuthError::BadProof)
        }
    }
}

/// The dialling side, from its `HELLO` until `WELCOME`.
#[derive(Debug, PartialEq, Eq)]
pub struct Dialler {
    version: u16,
    me: Vec<u8>,
    peer: Vec<u8>,
    nonce_d: Block,
    /// Set once the acceptor proved the key.
    proved: bool,
}

impl Dialler {
    /// This node, `me`, dials `peer` with `nonce_d` (sent in its `HELLO`'s
    /// [`credentials`]).
    pub fn new(version: u16, me: &[u8], peer: &[u8], nonce_d: Block) -> Self {
        Self {
            version,
            me: me.to_vec(),
            peer: peer.to_vec(),
            nonce_d,
            proved: false,
        }
    }

    /// The acceptor's `CHALLENGE`: checks its MAC, and returns the `PROOF`'s.
    ///
    /// # Errors
    /// [`AuthError::BadProof`], or [`AuthError::UnexpectedChallenge`] the
    /// second time.
    pub fn on_challenge(
        &mut self,
        key: &ClusterKey,
        nonce_s: &Block,
        tag: &Block,
    ) -> Result<Block, AuthError> {
        if self.proved {
            return Err(AuthError::UnexpectedChallenge);
        }
        let t = |side| {
            transcript(
                side,
                self.version,
                &self.me,
                &self.peer,
                &self.nonce_d,
                nonce_s,
            )
        };
        if !verify(key, &t(Side::Acceptor), tag) {
            return Err(AuthError::BadProof);
        }
        self.proved = true;
        Ok(mac(key, &t(Side::Dialler)))
    }

    /// `WELCOME` arrived: fine once the acceptor proved the key.
    ///
    /// # Errors
    /// [`AuthError::Unproven`].
    pub fn on_welcome(&self) -> Result<(), AuthError> {
        if self.proved {
            Ok(())
        } else {
            Err(AuthError::Unproven)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ClusterKey {
        ClusterKey::new(s.as_bytes()).expect("a long enough key")
    }

    const ND: Block = [0x11; AUTH_LEN];
    const NS: Block = [0x22; AUTH_LEN];

    /// (dialler's key, acceptor's key, outcome).
    type Row<'a> = (
        Option<&'a ClusterKey>,
        Option<&'a ClusterKey>,
        Result<(), AuthError>,
    );

    /// A whole handshake between a dialler holding `kd` and an acceptor
    /// holding `ka`: where it stops.
    fn run(kd: Option<&ClusterKey>, ka: Option<&ClusterKey>) -> Result<(), AuthError> {
        let creds = kd.map(|_| credentials(&ND)).unwrap_or_default();
        let mut d = Dialler::new(1, b"node1", b"node2", ND);
        match Acceptor::on_hello(ka, 1, b"node1", b"node2", &creds, NS)? {
            OnHello::Admit => match kd {
                Some(_) => d.on_welcome(),
                None => Ok(()),
            },
            OnHello::Challenge { mac: m, pending } => {
                let kd = kd.ok_or(AuthError::NoKeyHere)?;
                let proof = d.on_challenge(kd, &pending.nonce_s, &m)?;
                pending.on_proof(ka.ok_or(AuthError::NoKeyHere)?, &proof)?;
                d.on_welcome()
            }
        }
    }

    #[test]
    fn handshake_table() {
        let a = key("0123456789abcdef-a");
        let b = key("0123456789abcdef-b");
        // (dialler's key, acceptor's key, outcome)
        let rows: [Row; 5] = [
            (None, None, Ok(())),
            (Some(&a), Some(&a), Ok(())),
            (Some(&a), Some(&b), Err(AuthError::BadProof)),
            (None, Some(&a), Err(AuthError::NoCredentials)),
            (Some(&a), None, Err(AuthError::NoKeyHere)),
        ];
        for (kd, ka, want) in rows {
            assert_eq!(run(kd, ka), want, "{kd:?} → {ka:?}");
        }
    }

    #[test]
    fn an_old_acceptor_that_ignores_credentials_is_not_trusted() {
        let d = Dialler::new(1, b"node1", b"node2", ND);
        assert_eq!(d.on_welcome(), Err(AuthError::Unproven));
    }

    #[test]
    fn credentials_are_checked_strictly() {
        let k = key("0123456789abcdef");
        let mut long = credentials(&ND);
        long.push(0);
        let mut scheme2 = credentials(&ND);
        scheme2[0] = 2;
        for bad in [vec![1], credentials(&ND)[..32].to_vec(), long, scheme2] {
            let got = Acceptor::on_hello(Some(&k), 1, b"a", b"b", &bad, NS);
            assert_eq!(got, Err(AuthError::BadCredentials), "{bad:02x?}");
        }
    }

    #[test]
    fn a_proof_is_bound_to_both_nonces_names_side_and_version() {
        let k = key("0123456789abcdef");
        let OnHello::Challenge { mac: m, pending } =
            Acceptor::on_hello(Some(&k), 1, b"node1", b"node2", &credentials(&ND), NS)
                .expect("challenge")
        else {
            panic!("expected a challenge")
        };
        let good = mac(
            &k,
            &transcript(Side::Dialler, 1, b"node1", b"node2", &ND, &NS),
        );
        assert_eq!(pending.on_proof(&k, &good), Ok(()));
        // The acceptor's own MAC reflected back is not a dialler's proof.
        assert_eq!(pending.on_proof(&k, &m), Err(AuthError::BadProof));
        let other_nonce = [0x33; AUTH_LEN];
        let variants = [
            transcript(Side::Dialler, 1, b"node1", b"node2", &ND, &other_nonce),
            transcript(Side::Dialler, 1, b"node1", b"node2", &other_nonce, &NS),
            transcript(Side::Dialler, 1, b"node2", b"node1", &ND, &NS),
            transcript(Side::Dialler, 1, b"node3", b"node2", &ND, &NS),
            transcript(Side::Dialler, 2, b"node1", b"node2", &ND, &NS),
            transcript(Side::Acceptor, 1, b"node1", b"node2", &ND, &NS),
        ];
        for t in variants {
            assert_eq!(pending.on_proof(&k, &mac(&k, &t)), Err(AuthError::BadProof));
        }
    }

    #[test]
    fn a_replayed_proof_fails_against_a_new_challenge() {
        let k = key("0123456789abcdef");
        let creds = credentials(&ND);
        let first = mac(&k, &transcript(Side::Dialler, 1, b"n1", b"n2", &ND, &NS));
        let fresh = [0x44; AUTH_LEN];
        let Ok(OnHello::Challenge { pending, .. }) =
            Acceptor::on_hello(Some(&k), 1, b"n1", b"n2", &creds, fresh)
        else {
            panic!("expected a challenge")
        };
        assert_eq!(pending.on_proof(&k, &first), Err(AuthError::BadProof));
    }

    #[test]
    fn a_dialler_checks_the_acceptor_and_answers_once() {
        let k = key("0123456789abcdef");
        let mut d = Dialler::new(1, b"n1", b"n2", ND);
        let wrong = [0; AUTH_LEN];
        assert_eq!(d.on_challenge(&k, &NS, &wrong), Err(AuthError::BadProof));
        let m = mac(&k, &transcript(Side::Acceptor, 1, b"n1", b"n2", &ND, &NS));
        let proof = d.on_challenge(&k, &NS, &m).expect("a proof");
        assert_eq!(
            proof,
            mac(&k, &transcript(Side::Dialler, 1, b"n1", b"n2", &ND, &NS))
        );
        assert_eq!(
            d.on_challenge(&k, &NS, &m),
            Err(AuthError::UnexpectedChallenge)
        );
        assert_eq!(d.on_welcome(), Ok(()));
    }

    #[test]
    fn nonces_differ() {
        let (a, b) = (nonce().expect("random"), nonce().expect("random"));
        assert_ne!(a, b);
    }
}
