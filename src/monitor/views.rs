//! The endpoints: `/healthz`, and the JSON views `/stats`, `/connz`,
//! `/groupz`, `/peerz`. Each takes the shared state and the query string
//! and returns a [`Reply`]; nothing here knows HTTP beyond status codes.

use super::gather::{self, Answer, ConnInfo, ConnKey, LinkState, Role};
use crate::server::shard::Shard;
use crate::server::shared::Shared;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Default page size of `/connz` and `/groupz`.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest page size.
pub const MAX_LIMIT: usize = 10_000;

/// An answer: status, content type, body.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// `value` as pretty JSON.
    pub fn json(status: u16, value: &Value) -> Self {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// Plain text.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: text.into().into_bytes(),
        }
    }

    /// A JSON error document.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &json!({ "error": message.into() }))
    }
}

/// A parsed query string (the last value of a key wins).
#[derive(Debug, Default)]
pub struct Query(HashMap<String, String>);

impl Query {
    /// Parses `a=1&b=x%20y` (form-urlencoded).
    pub fn parse(q: Option<&str>) -> Self {
        Query(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// `key` as a number up to `max`, `default` when absent.
    pub fn number(&self, key: &str, default: usize, max: usize) -> Result<usize, Reply> {
        match self.get(key) {
            None | Some("") => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n <= max => Ok(n),
                _ => Err(Reply::error(
                    400,
                    format!("{key}: expected a number from 0 to {max}, found {v:?}"),
                )),
            },
        }
    }

    /// `key` as a flag: absent, `0` or `false` is off.
    pub fn flag(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| !matches!(v, "0" | "false" | "no"))
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn ago(t: SystemTime) -> f64 {
    t.elapsed().map_or(0.0, |d| d.as_secs_f64())
}

/// `/healthz`: 200 `ok` when every shard answers (and, with `?peers=1`,
/// every configured peer link is up); 503 with one reason a line otherwise.
pub async fn healthz(shared: &Shared, q: &Query) -> Reply {
    let mut problems = Vec::new();
    if shared.stopping() {
        problems.push("shutting down".to_owned());
    } else if shared.cluster.departure() != crate::cluster::leave::Phase::Serving {
        problems.push("leaving the cluster (lame duck)".to_owned());
    }
    let answers = gather::ask(shared, |_: &Rc<Shard>| ()).await;
    for (i, a) in answers.iter().enumerate() {
        match a {
            Answer::Ok(()) => {}
            Answer::Exited => problems.push(format!("shard {i} is not running")),
            Answer::Late => problems.push(format!(
                "shard {i} did not answer within {:?}",
                gather::ANSWER_TIMEOUT
            )),
        }
    }
    let peers = gather::peers(shared);
    let up = peers
        .iter()
        .filter(|p| matches!(p.state, LinkState::Up { .. }))
        .count();
    if q.flag("peers") {
        for p in peers
            .iter()
            .filter(|p| !matches!(p.state, LinkState::Up { .. }))
        {
            problems.push(format!(
                "peer {} ({}) is {} since {:.1}s",
                p.name,
                p.address,
                p.state.as_str(),
                ago(p.since)
            ));
        }
    }
    let links = format!("links up: {up}/{}", peers.len());
    if problems.is_empty() {
        Reply::text(200, format!("ok\n{links}\n"))
    } else {
        Reply::text(503, format!("{}\n{links}\n", problems.join("\n")))
    }
}

/// `/stats`: the STATS document.
pub fn stats(shared: &Shared) -> Reply {
    Reply::json(200, &shared.stats_json())
}

/// `/peerz`: every configured peer link.
pub fn peerz(shared: &Shared) -> Reply {
    let peers = gather::peers(shared);
    let up = peers
        .iter()
        .filter(|p| matches!(p.state, LinkState::Up { .. }))
        .count();
    let list: Vec<Value> = peers
        .iter()
        .map(|p| {
            let direction = match p.state {
                LinkState::Up { dialled: true } => Some("out"),
                LinkState::Up { dialled: false } => Some("in"),
                _ => None,
            };
            let other = p
                .dropped
                .saturating_sub(p.dropped_down + p.dropped_link_lost + p.dropped_too_large);
            json!({
                "name": p.name,
                "address": p.address,
                "state": p.state.as_str(),
                "direction": direction,
                "since_unix": unix(p.since),
                "since_secs": ago(p.since),
                "reconnects": p.reconnects,
                "link_error": p.link_error,
                "msgs_in": p.msgs_in,
                "msgs_out": p.msgs_out,
                "bytes_in": p.bytes_in,
                "bytes_out": p.bytes_out,
                "dropped": p.dropped,
                "drops": {
                    "down": p.dropped_down,
                    "link_lost": p.dropped_link_lost,
                    "too_large": p.dropped_too_large,
                    "other": other,
                },
                "queued_frames": p.queued_frames,
                "queued_bytes": p.queued_bytes,
            })
        })
        .collect();
    Reply::json(
        200,
        &json!({
            "node": shared.node.as_str(),
            "up": up,
            "configured": peers.len(),
            "peers": list,
        }),
    )
}

/// `offset` and `limit` of a paged view.
fn paging(q: &Query) -> Result<(usize, usize), Reply> {
    Ok((
        q.number("offset", 0, usize::MAX)?,
        q.number("limit", DEFAULT_LIMIT, MAX_LIMIT)?,
    ))
}

/// `/connz`: connections, paged (`offset`, `limit`) and sorted (`sort` =
/// `id`, `queue_bytes`, `queue_frames`, `groups`, `since`, `bytes_in`,
/// `bytes_out`; biggest or oldest first, `id` in shard then connection order).
pub async fn connz(shared: &Shared, q: &Query) -> Reply {
    let (offset, limit) = match paging(q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let sort = q.get("sort").unwrap_or("id");
    type Key = fn(&ConnKey, &ConnKey) -> std::cmp::Ordering;
    let by: Key = match sort {
        "id" => |a, b| (a.shard, a.seq).cmp(&(b.shard, b.seq)),
        "queue_bytes" => |a, b| b.queue_bytes.cmp(&a.queue_bytes),
        "queue_frames" => |a, b| b.queue_frames.cmp(&a.queue_frames),
        "groups" => |a, b| b.group_count.cmp(&a.group_count),
        "since" => |a, b| a.since.cmp(&b.since),
        "bytes_in" => |a, b| b.bytes_in.cmp(&a.bytes_in),
        "bytes_out" => |a, b| b.bytes_out.cmp(&a.bytes_out),
        other => {
            return Reply::error(
                400,
                format!("sort: expected id, queue_bytes, queue_frames, groups, since, bytes_in or bytes_out, found {other:?}"),
            )
        }
    };
    // Two looks: every connection's figures (numbers only) to sort and
    // page by, then the whole view (ids, addresses, group names) of the
    // page's connections alone. One that closed in between is left out
    // of its page.
    let answers = gather::ask(shared, |s: &Rc<Shard>| gather::connection_keys(s)).await;
    let mut unanswered = Vec::new();
    let mut all = Vec::new();
    for (i, a) in answers.into_iter().enumerate() {
        match a {
            Answer::Ok(list) => all.extend(list),
            _ => unanswered.push(i),
        }
    }
    all.sort_by(|a, b| by(a, b).then((a.shard, a.seq).cmp(&(b.shard, b.seq))));
    let total = all.len();
    let keys: Vec<ConnKey> = all.into_iter().skip(offset).take(limit).collect();
    let mut wanted = vec![Vec::new(); shared.shards()];
    for k in &keys {
        if let Some(w) = wanted.get_mut(k.shard) {
            w.push(k.seq);
        }
    }
    // The second look asks only the shards with connections on the page
    // (a shard that missed the first look has none), so a stuck shard
    // costs one wait, not two.
    let which: Vec<bool> = wanted.iter().map(|w| !w.is_empty()).collect();
    let wanted = std::sync::Arc::new(wanted);
    let details = gather::ask_only(shared, &which, move |s: &Rc<Shard>| {
        gather::connections_of(s, wanted.get(s.index).map_or(&[][..], Vec::as_slice))
    })
    .await;
    let mut found: HashMap<(usize, u64), ConnInfo> = HashMap::new();
    for (i, a) in details.into_iter().enumerate() {
        match a {
            None => {}
            Some(Answer::Ok(list)) => found.extend(list.into_iter().map(|c| ((i, c.seq), c))),
            Some(_) if !unanswered.contains(&i) => unanswered.push(i),
            Some(_) => {}
        }
    }
    unanswered.sort_unstable();
    let names: HashMap<usize, String> = shared
        .cluster
        .indices()
        .into_iter()
        .filter_map(|i| Some((i, shared.cluster.slot(i)?.name)))
        .collect();
    let page: Vec<Value> = keys
        .iter()
        .filter_map(|k| Some((k, found.remove(&(k.shard, k.seq))?)))
        .map(|(k, c)| {
            let (role, peer) = match c.role {
                Role::Pending => ("pending", None),
                Role::Client => ("client", None),
                Role::Peer(i) => ("peer", names.get(&i).cloned()),
            };
            // The figures the page was sorted by, not read again.
            json!({
                "id": c.id,
                "shard": k.shard,
                "address": c.addr.to_string(),
                "role": role,
                "peer": peer,
                "groups": c.groups,
                "group_count": k.group_count,
                "queue_frames": k.queue_frames,
                "queue_bytes": k.queue_bytes,
                "bytes_in": k.bytes_in,
                "bytes_out": k.bytes_out,
                "since_unix": unix(k.since),
                "since_secs": ago(k.since),
            })
        })
        .collect();
    Reply::json(
        200,
        &json!({
            "node": shared.node.as_str(),
            "total": total,
            "offset": offset,
            "limit": limit,
            "sort": sort,
            "unanswered_shards": unanswered,
            "connections": page,
        }),
    )
}

/// `/groupz`: groups by member count, or with `?group=NAME` that group's
/// members in id order; both paged (`offset`, `limit`). Member counts are read under each group's own lock
/// (taken by joins and leaves, never by a publish).
pub fn groupz(shared: &Shared, q: &Query) -> Reply {
    let (offset, limit) = match paging(q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if let Some(name) = q.get("group") {
        return group(shared, name, offset, limit);
    }
    let mut groups: Vec<(String, u32, usize)> = shared
        .table
        .groups()
        .iter()
        .map(|g| {
            let st = g.lock();
            let name = String::from_utf8_lossy(g.name()).into_owned();
            (name, st.size(), st.local_members().count())
        })
        .collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let page: Vec<Value> = groups
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(name, size, local)| json!({ "name": name, "members": size, "local": local }))
        .collect();
    Reply::json(
        200,
        &json!({
            "node": shared.node.as_str(),
            "total": groups.len(),
            "offset": offset,
            "limit": limit,
            "groups": page,
        }),
    )
}

/// One page of a group's members, in id order.
fn group(shared: &Shared, name: &str, offset: usize, limit: usize) -> Reply {
    // One lookup: a group removed after it would otherwise show as empty.
    let Some(entry) = shared.table.get(name.as_bytes()) else {
        return Reply::error(404, format!("no group {name:?} here"));
    };
    let mut members = entry.lock().member_ids();
    members.sort();
    let me = shared.node.as_str();
    let list: Vec<Value> = members
        .iter()
        .skip(offset)
        .take(limit)
        .map(|m| {
            let (node, shard) = match m.parts() {
                Some((node, shard, _, _)) => (Some(node), Some(shard)),
                None => (None, None),
            };
            json!({
                "id": m.as_str(),
                "node": node,
                "local": node == Some(me),
                "shard": shard,
            })
        })
        .collect();
    Reply::json(
        200,
        &json!({
            "node": me,
            "group": name,
            "size": members.len(),
            "offset": offset,
            "limit": limit,
            "members": list,
        }),
    )
}
