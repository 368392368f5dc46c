//! Lexer: configuration text → tokens, each with its 1-based line and column.
//!
//! Owns the character-level rules: `#` comments, quoted strings and their
//! escapes, bare words (numbers, names, `:4809` …) and punctuation. It knows
//! nothing of scopes or options. It never panics and never stops early: a bad
//! string is reported and lexing goes on, so several mistakes show at once.

use std::iter::Peekable;
use std::str::Chars;

/// One token kind. Numbers are bare words; the settings stage reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok {
    LBrace,
    RBrace,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Eq,
    Semi,
    Comma,
    /// A quoted string, escapes already resolved.
    Str(String),
    /// A run of characters that are neither blank nor punctuation.
    Word(String),
    Eof,
}

impl Tok {
    /// How the token reads in an error message.
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::LBrace => "`{`".into(),
            Tok::RBrace => "`}`".into(),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::LBracket => "`[`".into(),
            Tok::RBracket => "`]`".into(),
            Tok::Eq => "`=`".into(),
            Tok::Semi => "`;`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Word(w) => format!("`{w}`"),
            Tok::Eof => "end of file".into(),
        }
    }
}

/// A token and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) tok: Tok,
    pub(crate) line: u32,
    pub(crate) col: u32,
}

/// A lexical mistake at `line:col`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LexError {
    pub(crate) line: u32,
    pub(crate) col: u32,
    pub(crate) message: String,
}

/// Splits `text` into tokens, always ending with [`Tok::Eof`].
///
/// Strings end at the end of their line: an unterminated string is reported
/// at its opening quote and lexing resumes on the next line.
pub(crate) fn lex(text: &str) -> (Vec<Token>, Vec<LexError>) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lexer = Lexer {
        chars: text.chars().peekable(),
        line: 1,
        col: 1,
        tokens: Vec::new(),
        errors: Vec::new(),
    };
    lexer.run();
    (lexer.tokens, lexer.errors)
}

struct Lexer<'a> {
    chars: Peekable<Chars<'a>>,
    line: u32,
    col: u32,
    tokens: Vec<Token>,
    errors: Vec<LexError>,
}

/// Characters that end a bare word.
fn is_punct(c: char) -> bool {
    matches!(
        c,
        '{' | '}' | '(' | ')' | '[' | ']' | '=' | ';' | ',' | '"' | '#'
    )
}

impl Lexer<'_> {
    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line = self.line.saturating_add(1);
            self.col = 1;
        } else {
            self.col = self.col.saturating_add(1);
        }
        Some(c)
    }

    fn error(&mut self, line: u32, col: u32, message: String) {
        self.errors.push(LexError { line, col, message });
    }

    fn run(&mut self) {
        while let Some(&c) = self.chars.peek() {
            let (line, col) = (self.line, self.col);
            let tok = match c {
                c if c.is_whitespace() => {
                    self.bump();
                    continue;
                }
                '#' => {
                    self.skip_comment();
                    continue;
                }
                '"' => {
                    self.bump();
                    Tok::Str(self.string(line, col))
                }
                c if is_punct(c) => {
                    self.bump();
                    punct(c)
                }
                _ => Tok::Word(self.word()),
            };
            self.tokens.push(Token { tok, line, col });
        }
        let (line, col) = (self.line, self.col);
        self.tokens.push(Token {
            tok: Tok::Eof,
            line,
            col,
        });
    }

    fn skip_comment(&mut self) {
        while let Some(&c) = self.chars.peek() {
            if c == '\n' {
                return;
            }
            self.bump();
        }
    }

    fn word(&mut self) -> String {
        let mut out = String::new();
        while let Some(&c) = self.chars.peek() {
            if c.is_whitespace() || is_punct(c) {
                break;
            }
            out.push(c);
            self.bump();
        }
        out
    }

    /// Reads a string body after its opening quote (at `line:col`).
    fn string(&mut self, line: u32, col: u32) -> String {
        let mut out = String::new();
        loop {
            match self.chars.peek().copied() {
                None | Some('\n') => {
                    let msg = "unterminated string: missing closing `\"` on this line \
                               (write a newline inside a string as \\n)";
                    self.error(line, col, msg.to_string());
                    return out;
                }
                Some('"') => {
                    self.bump();
                    return out;
                }
                Some('\\') => self.escape(&mut out),
                Some(c) => {
                    out.push(c);
                    self.bump();
                }
            }
        }
    }

    /// Reads `\x` at the cursor. A backslash at the end of the line is left
    /// for [`Lexer::string`] to report as unterminated.
    fn escape(&mut self, out: &mut String) {
        let (line, col) = (self.line, self.col);
        self.bump();
        let resolved = match self.chars.peek().copied() {
            None | Some('\n') => return,
            Some('"') => '"',
            Some('\\') => '\\',
            Some('n') => '\n',
            Some('t') => '\t',
            Some('r') => '\r',
            Some(other) => {
                let msg =
                    format!("unknown escape `\\{other}` in string (valid: \\\" \\\\ \\n \\t \\r)");
                self.error(line, col, msg);
                other
            }
        };
        self.bump();
        out.push(resolved);
    }
}

fn punct(c: char) -> Tok {
    match c {
        '{' => Tok::LBrace,
        '}' => Tok::RBrace,
        '(' => Tok::LParen,
        ')' => Tok::RParen,
        '[' => Tok::LBracket,
        ']' => Tok::RBracket,
        '=' => Tok::Eq,
        ';' => Tok::Semi,
        _ => Tok::Comma,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<Tok> {
        let (toks, errors) = lex(text);
        assert!(errors.is_empty(), "{errors:?}");
        toks.into_iter().map(|t| t.tok).collect()
    }

    fn word(s: &str) -> Tok {
        Tok::Word(s.to_string())
    }

    #[test]
    fn punctuation_words_and_strings() {
        assert_eq!(
            kinds(r#"a { b = "c"; l = ( 1, 2 ) d = [ k = v ] }"#),
            vec![
                word("a"),
                Tok::LBrace,
                word("b"),
                Tok::Eq,
                Tok::Str("c".into()),
                Tok::Semi,
                word("l"),
                Tok::Eq,
                Tok::LParen,
                word("1"),
                Tok::Comma,
                word("2"),
                Tok::RParen,
                word("d"),
                Tok::Eq,
                Tok::LBracket,
                word("k"),
                Tok::Eq,
                word("v"),
                Tok::RBracket,
                Tok::RBrace,
                Tok::Eof,
            ]
        );
    }

    #[test]
    fn bare_words_keep_colons_dots_and_signs() {
        assert_eq!(
            kinds(":4809 0.5 -5 127.0.0.1:1"),
            vec![
                word(":4809"),
                word("0.5"),
                word("-5"),
                word("127.0.0.1:1"),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn words_stop_at_punctuation() {
        assert_eq!(kinds("a=b"), vec![word("a"), Tok::Eq, word("b"), Tok::Eof]);
    }

    #[test]
    fn comments_run_to_end_of_line() {
        assert_eq!(
            kinds("a # b { \" \n c#d\n"),
            vec![word("a"), word("c"), Tok::Eof]
        );
    }

    #[test]
    fn escapes_are_resolved() {
        assert_eq!(
            kinds(r#""a\"b\\c\nd\te""#),
            vec![Tok::Str("a\"b\\c\nd\te".into()), Tok::Eof]
        );
    }

    #[test]
    fn positions_are_one_based_characters() {
        let (toks, _) = lex("é x\n  \"y\"");
        let pos: Vec<(u32, u32)> = toks.iter().map(|t| (t.line, t.col)).collect();
        assert_eq!(pos, vec![(1, 1), (1, 3), (2, 3), (2, 6)]);
    }

    #[test]
    fn byte_order_mark_is_skipped() {
        let (toks, _) = lex("\u{feff}a");
        assert_eq!((toks[0].line, toks[0].col), (1, 1));
    }

    #[test]
    fn unterminated_string_is_reported_at_its_quote_and_lexing_goes_on() {
        let (toks, errors) = lex("a = \"oops\nb = \"x");
        assert_eq!(errors.len(), 2);
        assert_eq!((errors[0].line, errors[0].col), (1, 5));
        assert_eq!((errors[1].line, errors[1].col), (2, 5));
        assert!(errors[0].message.contains("unterminated string"));
        assert!(toks.iter().any(|t| t.tok == word("b")));
    }

    #[test]
    fn unknown_escape_is_reported_at_the_backslash() {
        let (_, errors) = lex(r#"  "a\qb""#);
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].line, errors[0].col), (1, 5));
        assert!(errors[0].message.contains("unknown escape"));
    }

    #[test]
    fn backslash_at_end_of_input_does_not_panic() {
        for text in ["\"\\", "\"\\\n", "\"", "#", "\\", "\"\u{0}\""] {
            let (toks, _) = lex(text);
            assert_eq!(toks.last().map(|t| &t.tok), Some(&Tok::Eof));
        }
    }
}
