//! Client users and their permissions: `msgc_server { users = [ … ] }`.
//!
//! Owns the typed user entries, the group-pattern language and reading
//! both from the syntax tree. It does not verify passwords (the server
//! does, off its shards) and knows nothing of connections.
//!
//! ```text
//! msgc_server {
//!   users = [
//!     alice = [
//!       password = "$argon2id$v=19$m=19456,t=2,p=1$…"   # msgc hash-password
//!       join = ( "orders.*" "prices" )
//!       publish = ( "orders.*" )
//!       members = true
//!       send = false
//!       stats = false
//!     ]
//!   ]
//! }
//! ```
//!
//! # Patterns
//! A pattern is a group name (section 4 of PROTOCOL.md: 1–255 bytes in
//! `0x21..=0x7E`) in which `*` may stand only as the last byte:
//! - `*` alone matches every group;
//! - `P*` (P not empty) matches every group whose name starts with `P` and
//!   is longer than `P` (`orders.*` matches `orders.eu`, not `orders.` nor
//!   `orders`);
//! - anything else matches the group of exactly that name (byte for byte).
//!
//! A `*` anywhere else is an error (so a group whose name holds a `*`
//! cannot be named in a pattern except through a prefix).

use super::source::Problem;
use super::syntax::{Spanned, Value};
use super::values::{scalar, string_list};

/// Most patterns one list may hold.
pub const MAX_PATTERNS: usize = 1024;

/// One user allowed to connect as a client when `users` is configured.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// The user name, as sent in `HELLO` credentials (a valid name:
    /// 1–255 bytes in `0x21..=0x7E`).
    pub name: String,
    /// The password's hash, an argon2 PHC string (`$argon2id$…`), as
    /// `msgc hash-password` prints it. Checked to parse at load.
    pub password: String,
    /// What the user may do once logged in.
    pub permissions: Permissions,
}

impl std::fmt::Debug for User {
    /// The hash is not printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("permissions", &self.permissions)
            .finish_non_exhaustive()
    }
}

/// What a logged-in user may do. `Default` allows nothing (an entry
/// grants only what it says).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    /// Groups it may `JOIN` (default: none).
    pub join: Patterns,
    /// Groups it may `PUBLISH` to (default: none).
    pub publish: Patterns,
    /// Whether it may send `MEMBERS_REQUEST` (default false).
    pub members: bool,
    /// Whether it may `SEND` to a member (default false).
    pub send: bool,
    /// Whether it may send `STATS_REQUEST` (default false).
    pub stats: bool,
}

/// A list of group patterns, compiled for matching without allocating or
/// hashing: exact names sorted for a binary search, prefixes scanned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Patterns {
    /// The patterns as written, in order (for printing).
    written: Vec<String>,
    /// `*` was among them.
    any: bool,
    /// Exact names, sorted, no duplicates.
    exact: Vec<Box<[u8]>>,
    /// Prefixes of `P*` patterns (not empty).
    prefixes: Vec<Box<[u8]>>,
}

impl Patterns {
    /// Compiles `patterns`.
    ///
    /// # Errors
    /// The first pattern that breaks the rules, and why.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Patterns, String> {
        if patterns.len() > MAX_PATTERNS {
            return Err(format!("more than {MAX_PATTERNS} patterns"));
        }
        let mut out = Patterns::default();
        for p in patterns {
            let p = p.as_ref();
            check_pattern(p)?;
            out.written.push(p.to_string());
            match p.strip_suffix('*') {
                Some("") => out.any = true,
                Some(prefix) => out.prefixes.push(prefix.as_bytes().into()),
                None => out.exact.push(p.as_bytes().into()),
            }
        }
        out.exact.sort_unstable();
        out.exact.dedup();
        Ok(out)
    }

    /// Whether `group` matches one of the patterns.
    #[inline]
    pub fn matches(&self, group: &[u8]) -> bool {
        self.any
            || self.exact.binary_search_by(|e| (**e).cmp(group)).is_ok()
            || self
                .prefixes
                .iter()
                .any(|p| group.len() > p.len() && group.starts_with(p))
    }

    /// The patterns as written.
    pub fn written(&self) -> &[String] {
        &self.written
    }
}

/// Checks one pattern against the rules in the module docs.
fn check_pattern(p: &str) -> Result<(), String> {
    use crate::protocol::NameError;
    match crate::protocol::validate_name(p.as_bytes()) {
        Ok(()) => {}
        Err(NameError::BadByte(b)) => {
            return Err(format!(
                "pattern `{}` holds byte 0x{b:02x}: group names are printable ASCII without spaces",
                p.escape_default()
            ))
        }
        Err(_) => return Err(format!("pattern `{p}` must be 1 to 255 bytes long")),
    }
    if p[..p.len() - 1].contains('*') {
        return Err(format!(
            "pattern `{p}`: `*` may only end a pattern (`orders.*`, or `*` for every group)"
        ));
    }
    Ok(())
}

/// Whether `name` is a valid user name (the rules of a group name).
fn check_user_name(name: &str) -> Result<(), String> {
    crate::protocol::validate_name(name.as_bytes()).map_err(|_| {
        format!(
            "user name `{}` must be 1 to 255 printable ASCII bytes without spaces",
            name.escape_default()
        )
    })
}

/// Whether `hash` is an argon2 PHC string.
fn check_hash(hash: &str) -> Result<(), String> {
    use argon2::password_hash::PasswordHash;
    match PasswordHash::new(hash) {
        Ok(h) if h.algorithm.as_str().starts_with("argon2") && h.hash.is_some() => Ok(()),
        Ok(h) => Err(format!(
            "password hash uses `{}`; expected an argon2 PHC string ($argon2id$…) from `msgc hash-password`",
            h.algorithm
        )),
        Err(e) => Err(format!(
            "password is not a PHC hash string ({e}); make one with `msgc hash-password`"
        )),
    }
}

/// Reads `users = [ name = [ … ] … ]`.
pub(crate) fn parse_users(v: &Spanned<Value>) -> Result<Vec<User>, Vec<Problem>> {
    let Value::Dict(entries) = &v.node else {
        let msg = format!(
            "expected a dictionary [ name = [ password = \"…\" … ] ], found {}",
            v.node.kind()
        );
        return Err(vec![(v.span, msg)]);
    };
    let mut users: Vec<User> = Vec::new();
    let mut problems = Vec::new();
    for (key, value) in entries {
        if let Err(m) = check_user_name(&key.node) {
            problems.push((key.span, m));
            continue;
        }
        if users.iter().any(|u| u.name == key.node) {
            problems.push((key.span, format!("duplicate user `{}`", key.node)));
            continue;
        }
        match parse_user(&key.node, key.span, value) {
            Ok(user) => users.push(user),
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() {
        Ok(users)
    } else {
        Err(problems)
    }
}

/// One user's dictionary.
fn parse_user(
    name: &str,
    span: super::source::Span,
    v: &Spanned<Value>,
) -> Result<User, Vec<Problem>> {
    let Value::Dict(fields) = &v.node else {
        let msg = format!(
            "user `{name}`: expected a dictionary [ password = \"…\" join = ( … ) … ], found {}",
            v.node.kind()
        );
        return Err(vec![(v.span, msg)]);
    };
    let mut password = None;
    let mut perms = Permissions::default();
    let mut problems = Vec::new();
    for (key, value) in fields {
        let field = key.node.to_ascii_lowercase();
        let result = match field.as_str() {
            "password" => scalar(value, "a password hash").and_then(|h| {
                check_hash(h).map_err(|m| (value.span, m))?;
                password = Some(h.to_string());
                Ok(())
            }),
            "join" => patterns(value).map(|p| perms.join = p),
            "publish" => patterns(value).map(|p| perms.publish = p),
            "members" => boolean(value).map(|b| perms.members = b),
            "send" => boolean(value).map(|b| perms.send = b),
            "stats" => boolean(value).map(|b| perms.stats = b),
            _ => Err((
                key.span,
                format!(
                    "unknown field `{}` of user `{name}`; valid fields: join, members, password, publish, send, stats",
                    key.node
                ),
            )),
        };
        if let Err((span, msg)) = result {
            problems.push((span, format!("user `{name}`: {msg}")));
        }
    }
    let Some(password) = password else {
        if problems.is_empty() {
            problems.push((
                span,
                format!("user `{name}` has no password (a hash from `msgc hash-password`)"),
            ));
        }
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(User {
        name: name.to_string(),
        password,
        permissions: perms,
    })
}

fn patterns(v: &Spanned<Value>) -> Result<Patterns, Problem> {
    let list = string_list(v)?;
    for p in &list {
        check_pattern(&p.node).map_err(|m| (p.span, m))?;
    }
    let names: Vec<&str> = list.iter().map(|p| p.node.as_str()).collect();
    Patterns::new(&names).map_err(|m| (v.span, m))
}

pub(crate) fn boolean(v: &Spanned<Value>) -> Result<bool, Problem> {
    let text = scalar(v, "true or false")?;
    match text.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err((v.span, format!("expected true or false, found `{text}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(patterns: &[&str], group: &str) -> bool {
        Patterns::new(patterns)
            .expect("valid")
            .matches(group.as_bytes())
    }

    #[test]
    fn pattern_language() {
        assert!(m(&["orders.*"], "orders.eu"));
        assert!(m(&["orders.*"], "orders.eu.west"));
        assert!(!m(&["orders.*"], "orders."));
        assert!(!m(&["orders.*"], "orders"));
        assert!(!m(&["orders.*"], "billing"));
        assert!(!m(&["orders.*"], "xorders.eu"));
        assert!(m(&["prices"], "prices"));
        assert!(!m(&["prices"], "prices2"));
        assert!(!m(&["prices"], "price"));
        assert!(m(&["*"], "anything"));
        assert!(m(&["a*"], "ab"));
        assert!(!m(&[], "a"));
        assert!(m(&["b", "a", "c", "a"], "a"));
        assert!(m(&["x*", "orders.*", "z"], "orders.1"));
    }

    #[test]
    fn bad_patterns() {
        for bad in ["", "a*b", "**", "*a", "has space", "é", "\u{7f}"] {
            assert!(Patterns::new(&[bad]).is_err(), "{bad:?}");
        }
        let long = "a".repeat(256);
        assert!(Patterns::new(&[long.as_str()]).is_err());
        let many = vec!["a"; MAX_PATTERNS + 1];
        assert!(Patterns::new(&many).is_err());
    }

    const HASH: &str =
        "$argon2id$v=19$m=64,t=1,p=1$G1vvEDzHRqtM9z1KVFKNSA$iW7w0V0rRLqMeu3KRxCvSCRnfscNv6kRjkmSorig0XM";

    #[test]
    fn users_parse_and_render_back() {
        let text = format!(
            "msgc_server {{\n users = [\n  alice = [ password = \"{HASH}\" join = ( \"orders.*\" prices ) \
             publish = \"orders.*\" members = true ]\n  bob = [ password = \"{HASH}\" stats = yes ]\n ]\n}}\n"
        );
        let cfg = crate::config::Config::parse_str("t", &text).expect("valid");
        let users = &cfg.server.users;
        assert_eq!(users.len(), 2);
        let a = &users[0].permissions;
        assert_eq!(
            (users[0].name.as_str(), users[0].password.as_str()),
            ("alice", HASH)
        );
        assert!(a.join.matches(b"orders.eu") && a.join.matches(b"prices"));
        assert!(!a.join.matches(b"billing"));
        assert!(a.publish.matches(b"orders.x") && !a.publish.matches(b"prices"));
        assert!(a.members && !a.send && !a.stats);
        let b = &users[1].permissions;
        assert!(b.stats && !b.members && !b.join.matches(b"orders.eu"));
        assert!(
            !format!("{:?}", users[0]).contains("argon2"),
            "hash not in Debug"
        );
        let again =
            crate::config::Config::parse_str("r", &cfg.render_effective()).expect("renders");
        assert_eq!(again.server.users, cfg.server.users);
        assert!(crate::config::Config::default().server.users.is_empty());
    }

    #[test]
    fn bad_users_are_located() {
        let bad = |body: &str| {
            let text = format!("msgc_server {{\n users = {body}\n}}\n");
            match crate::config::Config::parse_str("t", &text) {
                Ok(_) => panic!("accepted: {body}"),
                Err(e) => e.to_string(),
            }
        };
        assert!(bad("( a )").contains("expected a dictionary"));
        assert!(bad("[ a = [ join = ( x ) ] ]").contains("has no password"));
        assert!(bad("[ a = [ password = \"plain\" ] ]").contains("hash-password"));
        let h = format!("password = \"{HASH}\"");
        assert!(bad(&format!("[ a = [ {h} join = ( \"a*b\" ) ] ]")).contains("may only end"));
        assert!(bad(&format!("[ a = [ {h} sned = true ] ]")).contains("unknown field `sned`"));
        assert!(bad(&format!("[ a = [ {h} send = maybe ] ]")).contains("true or false"));
        assert!(bad(&format!("[ a = [ {h} ] a = [ {h} ] ]")).contains("duplicate user"));
        assert!(bad(&format!("[ a = \"{HASH}\" ]")).contains("expected a dictionary"));
        assert!(
            bad(&format!("[ a = [ {h} stats = 2 ] ]")).starts_with("t:2:"),
            "located"
        );
    }
}
