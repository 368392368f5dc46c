//! Reading typed values out of syntax-tree values: integers in a range,
//! durations in seconds, IP addresses, enumerations, string lists.
//!
//! Every function here takes a spanned value and returns the typed value or
//! a located problem saying what was expected. Quoted and bare spellings are
//! always equivalent (`port = 4809` and `port = "4809"`).

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use super::source::Problem;
use super::syntax::{Spanned, Value};

/// The longest duration we accept: 30 days. Keeps `Instant + Duration` far
/// from overflow and catches unit mistakes (milliseconds typed as seconds).
pub(crate) const MAX_DURATION_SECS: u64 = 30 * 24 * 3600;

/// The text of a string or bare word, or "expected {what}, found a list".
pub(crate) fn scalar<'a>(v: &'a Spanned<Value>, what: &str) -> Result<&'a str, Problem> {
    v.node
        .scalar()
        .ok_or_else(|| (v.span, format!("expected {what}, found {}", v.node.kind())))
}

/// An unsigned integer in `range`, e.g. `5000` or `"5000"`.
pub(crate) fn integer(v: &Spanned<Value>, range: RangeInclusive<u64>) -> Result<u64, Problem> {
    let text = scalar(v, "an integer")?;
    let out_of_range = || {
        let (lo, hi) = (range.start(), range.end());
        (v.span, format!("must be from {lo} to {hi}, found {text}"))
    };
    if let Some(digits) = text.strip_prefix('-') {
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(out_of_range());
        }
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        let msg = format!("expected an integer, found `{text}`");
        return Err((v.span, msg));
    }
    match text.parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(out_of_range()),
    }
}

/// [`integer`] converted to `usize` (ranges used here fit any `usize`).
pub(crate) fn size(v: &Spanned<Value>, range: RangeInclusive<u64>) -> Result<usize, Problem> {
    let n = integer(v, range)?;
    usize::try_from(n).map_err(|_| (v.span, format!("{n} is too large for this platform")))
}

/// A positive number of seconds, integer or decimal (`5`, `0.5`, `"2.25"`),
/// at most [`MAX_DURATION_SECS`], with at most 9 decimals (nanoseconds).
pub(crate) fn duration(v: &Spanned<Value>) -> Result<Duration, Problem> {
    let text = scalar(v, "a duration in seconds")?;
    let fail = |msg: String| (v.span, msg);
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let Some(parsed) = parse_decimal(body) else {
        let msg = format!("expected a duration in seconds (such as 5 or 0.5), found `{text}`");
        return Err(fail(msg));
    };
    let parsed = parsed.map_err(fail)?;
    if negative || parsed.is_zero() {
        return Err(fail(format!(
            "must be greater than 0 seconds, found {text}"
        )));
    }
    if parsed > Duration::from_secs(MAX_DURATION_SECS) {
        let msg = format!("must be at most {MAX_DURATION_SECS} seconds (30 days), found {text}");
        return Err(fail(msg));
    }
    Ok(parsed)
}

/// `DIGITS[.DIGITS]` → `Some(Ok(duration))`; not a number at all → `None`;
/// a number we cannot represent → `Some(Err(why))`.
fn parse_decimal(text: &str) -> Option<Result<Duration, String>> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || text.ends_with('.') {
        return None;
    }
    if frac.len() > 9 {
        return Some(Err(format!("`{text}` has more than 9 decimal places")));
    }
    let Ok(secs) = int.parse::<u64>() else {
        return Some(Err(format!("`{text}` is too large")));
    };
    let scale = 10u32.pow(9 - u32::try_from(frac.len()).unwrap_or(9));
    let nanos = if frac.is_empty() {
        0
    } else {
        frac.parse::<u32>().unwrap_or(0).saturating_mul(scale)
    };
    Some(Ok(Duration::new(secs, nanos)))
}

/// A value parsed with `FromStr` whose error is already a message
/// (debug level, I/O backend, listen address).
pub(crate) fn parsed<T>(v: &Spanned<Value>, what: &str) -> Result<T, Problem>
where
    T: FromStr,
    T::Err: Display,
{
    let text = scalar(v, what)?;
    text.parse::<T>().map_err(|e| (v.span, e.to_string()))
}

/// An IP address, or `None` for `""` (not set).
pub(crate) fn optional_ip(v: &Spanned<Value>) -> Result<Option<IpAddr>, Problem> {
    let text = scalar(v, "an IP address")?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<IpAddr>().map(Some).map_err(|_| {
        let msg = format!("expected an IP address (such as 10.0.0.5 or ::1), found `{text}`");
        (v.span, msg)
    })
}

/// `IP:PORT` (`[v6]:PORT` for IPv6), or `""` for "not set".
pub(crate) fn optional_socket_addr(v: &Spanned<Value>) -> Result<Option<SocketAddr>, Problem> {
    let text = scalar(v, "an address IP:PORT")?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<SocketAddr>().map(Some).map_err(|_| {
        let msg = format!("expected IP:PORT (such as \"127.0.0.1:8249\"), found `{text}`");
        (v.span, msg)
    })
}

/// A list of strings, or a single string taken as a one-element list.
pub(crate) fn string_list(v: &Spanned<Value>) -> Result<Vec<Spanned<String>>, Problem> {
    let one = |e: &Spanned<Value>| -> Result<Spanned<String>, Problem> {
        let node = scalar(e, "a string")?.to_string();
        Ok(Spanned { node, span: e.span })
    };
    match &v.node {
        Value::List(elems) => elems.iter().map(one).collect(),
        Value::Str(_) | Value::Word(_) => Ok(vec![one(v)?]),
        Value::Dict(_) => Err((
            v.span,
            "expected a list ( \"…\" … ), found a dictionary".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::source::Span;

    fn word(s: &str) -> Spanned<Value> {
        Spanned {
            node: Value::Word(s.into()),
            span: Span {
                file: 0,
                line: 1,
                col: 1,
            },
        }
    }

    #[test]
    fn integers() {
        assert_eq!(integer(&word("5000"), 1..=10_000), Ok(5000));
        let err = |s| integer(&word(s), 1..=10).map_err(|e| e.1);
        assert_eq!(err("0"), Err("must be from 1 to 10, found 0".into()));
        assert_eq!(err("-3"), Err("must be from 1 to 10, found -3".into()));
        assert_eq!(
            err("99999999999999999999999"),
            Err("must be from 1 to 10, found 99999999999999999999999".into())
        );
        assert_eq!(err("1.5"), Err("expected an integer, found `1.5`".into()));
        assert_eq!(err(""), Err("expected an integer, found ``".into()));
        assert_eq!(err("-"), Err("expected an integer, found `-`".into()));
    }

    #[test]
    fn durations() {
        let d = |s| duration(&word(s)).map_err(|e| e.1);
        assert_eq!(d("60"), Ok(Duration::from_secs(60)));
        assert_eq!(d("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(d("2.000000001"), Ok(Duration::new(2, 1)));
        assert!(d("0").is_err_and(|m| m.contains("greater than 0")));
        assert!(d("0.0").is_err_and(|m| m.contains("greater than 0")));
        assert!(d("-1").is_err_and(|m| m.contains("greater than 0")));
        assert!(d("1.0000000001").is_err_and(|m| m.contains("9 decimal")));
        assert!(d("99999999").is_err_and(|m| m.contains("at most")));
        assert!(d("99999999999999999999999").is_err_and(|m| m.contains("too large")));
        for bad in ["abc", "5s", ".5", "5.", "1.2.3", "", "-", "+1"] {
            assert!(
                d(bad).is_err_and(|m| m.contains("expected a duration")),
                "{bad}"
            );
        }
    }

    #[test]
    fn ips_and_lists() {
        assert_eq!(optional_ip(&word("")), Ok(None));
        assert!(optional_ip(&word("::1")).is_ok_and(|ip| ip.is_some()));
        assert!(optional_ip(&word("host")).is_err());
        let list = string_list(&word("a")).map(|v| v.len());
        assert_eq!(list, Ok(1));
    }
}
