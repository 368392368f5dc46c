//! Payloads made safe for a terminal: `msgc sub` writes what publishers
//! sent, and a payload is anyone's bytes. Written raw to a terminal, an
//! escape sequence would move the cursor, rewrite the title, or worse; so
//! when stdout is a terminal (or `--escape` says so) each payload is shown
//! as text instead. Raw bytes still go to pipes and files (`--raw` forces
//! them anywhere).
//!
//! The rules: printable UTF-8 and tab pass as they are; a backslash is
//! doubled; newline and carriage return show as `\n` and `\r` (one message
//! stays one line); every other control byte, and every byte that is not
//! part of valid UTF-8, shows as `\xNN`; other control characters (C1,
//! DEL) and the bidirectional overrides that could reorder what is shown
//! show as `\u{NNNN}`. Nothing the terminal would act on passes.

use std::io::Write;

/// Writes `payload` to `out` escaped by the rules above.
///
/// # Errors
/// What writing to `out` returns.
pub fn write_escaped(out: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    for chunk in payload.utf8_chunks() {
        let text = chunk.valid();
        let mut start = 0;
        for (at, c) in text.char_indices() {
            if passes(c) {
                continue;
            }
            out.write_all(&text.as_bytes()[start..at])?;
            write_char(out, c)?;
            start = at + c.len_utf8();
        }
        out.write_all(&text.as_bytes()[start..])?;
        for b in chunk.invalid() {
            write!(out, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// True for a character shown as it is.
fn passes(c: char) -> bool {
    (c == '\t' || !c.is_control()) && c != '\\' && !is_bidi_control(c)
}

/// Bidirectional embeddings, overrides and isolates (and the marks):
/// harmless to the terminal, but they can make a line read as something
/// else than it is.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Writes the escaped form of a character that does not pass.
fn write_char(out: &mut impl Write, c: char) -> std::io::Result<()> {
    match c {
        '\\' => out.write_all(b"\\\\"),
        '\n' => out.write_all(b"\\n"),
        '\r' => out.write_all(b"\\r"),
        c if c.is_ascii() => write!(out, "\\x{:02x}", c as u32),
        c => write!(out, "\\u{{{:04x}}}", c as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(b: &[u8]) -> String {
        let mut out = Vec::new();
        write_escaped(&mut out, b).expect("writing to a Vec");
        String::from_utf8(out).expect("escaped text is UTF-8")
    }

    #[test]
    fn escaping_table() {
        let rows: &[(&[u8], &str)] = &[
            (b"hello, bus", "hello, bus"),
            (b"", ""),
            ("caf\u{e9} \u{1f600}".as_bytes(), "caf\u{e9} \u{1f600}"),
            (b"a\tb", "a\tb"),
            (b"a\nb\rc", "a\\nb\\rc"),
            (b"back\\slash", "back\\\\slash"),
            (b"\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
            (b"\x00\x7f", "\\x00\\x7f"),
            // C1 controls in UTF-8 (CSI = U+009B), and raw bytes that are
            // not UTF-8 (a lone 0x9b is CSI to some terminals).
            ("\u{9b}31m".as_bytes(), "\\u{009b}31m"),
            (b"\x9b31m\xff", "\\x9b31m\\xff"),
            (b"ok\xe2\x82", "ok\\xe2\\x82"),
            ("a\u{202e}b".as_bytes(), "a\\u{202e}b"),
        ];
        for (input, want) in rows {
            assert_eq!(esc(input), *want, "{input:?}");
        }
    }

    #[test]
    fn no_control_byte_survives() {
        let all: Vec<u8> = (0..=255u8).collect();
        let out = esc(&all);
        assert!(out.chars().all(|c| c == '\t' || !c.is_control()), "{out:?}");
    }
}
