//! Parser: tokens → a spanned syntax tree, with `include` resolved.
//!
//! Owns the grammar (scopes, `key = value`, lists, dictionaries, `include`)
//! and include handling (paths relative to the including file, cycles and a
//! depth limit). It does not know any option name: that is the settings
//! stage's job. Lexical errors are all collected; the parser stops a file at
//! its first syntax error, since what follows a missing brace would only
//! produce confusing follow-on errors. Other files (includes) still parse.
//!
//! ```text
//! items := item*
//! item  := WORD '=' value ';'?  |  WORD (STR|WORD)? '{' items '}'  |  'include' (STR|WORD) ';'?  |  ';'
//! value := STR | WORD | '(' (value ','?)* ')' | '[' ((STR|WORD) '=' value (','|';')?)* ']'
//! ```

use std::path::{Path, PathBuf};

use super::lexer::{lex, Tok, Token};
use super::source::{Loader, Problem, Sources, Span};

/// How deep `include` may nest before we call it runaway.
pub(crate) const MAX_INCLUDE_DEPTH: usize = 16;
/// How deep scopes, lists and dictionaries may nest (stack safety).
const MAX_NESTING: usize = 64;

/// A node and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Spanned<T> {
    pub(crate) node: T,
    pub(crate) span: Span,
}

/// An option's value, as written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `"…"`
    Str(String),
    /// A bare word or number.
    Word(String),
    /// `( a b … )`
    List(Vec<Spanned<Value>>),
    /// `[ k = v … ]`, in file order, duplicates kept.
    Dict(Vec<(Spanned<String>, Spanned<Value>)>),
}

impl Value {
    /// The text of a string or bare word; `None` for lists and dictionaries.
    pub(crate) fn scalar(&self) -> Option<&str> {
        match self {
            Value::Str(s) | Value::Word(s) => Some(s),
            Value::List(_) | Value::Dict(_) => None,
        }
    }

    /// What kind of value this is, for "expected X, found Y" messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Word(_) => "a bare word",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dictionary",
        }
    }
}

/// One entry of a scope.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Item {
    /// `key = value`
    Assign {
        key: Spanned<String>,
        value: Spanned<Value>,
    },
    /// `name { … }` or `name "arg" { … }`
    Scope(Scope),
}

/// A scope with its items, includes already spliced in.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scope {
    pub(crate) name: Spanned<String>,
    pub(crate) arg: Option<Spanned<String>>,
    pub(crate) items: Vec<Item>,
}

/// A parsed configuration: top-level items plus every problem found.
#[derive(Debug, Default)]
pub(crate) struct Document {
    pub(crate) items: Vec<Item>,
    pub(crate) sources: Sources,
    pub(crate) errors: Vec<Problem>,
}

/// Parses `text` (named `name`; includes resolve against `dir`).
///
/// `key` identifies the text for cycle detection when it is a real file.
pub(crate) fn parse_document(
    name: &str,
    text: &str,
    dir: &Path,
    key: Option<PathBuf>,
    loader: &mut dyn Loader,
) -> Document {
    let mut doc = Document::default();
    let mut ctx = Ctx {
        loader,
        stack: key.into_iter().collect(),
        doc: &mut doc,
    };
    let items = ctx.parse_text(name.to_string(), text, dir, 0);
    doc.items = items;
    doc
}

/// State shared by every file of one document.
struct Ctx<'a> {
    loader: &'a mut dyn Loader,
    /// Keys of the files being parsed, outermost first (cycle detection).
    stack: Vec<PathBuf>,
    doc: &'a mut Document,
}

impl Ctx<'_> {
    /// Parses one file; `depth` is the scope nesting at its `include` line.
    fn parse_text(&mut self, name: String, text: &str, dir: &Path, depth: usize) -> Vec<Item> {
        let file = self.doc.sources.add(name);
        let (tokens, lex_errors) = lex(text);
        for e in lex_errors {
            let span = Span {
                file,
                line: e.line,
                col: e.col,
            };
            self.doc.errors.push((span, e.message));
        }
        let mut parser = Parser {
            tokens,
            pos: 0,
            file,
            dir: dir.to_path_buf(),
        };
        match parser.items(self, None, depth) {
            Ok(items) => items,
            Err(problem) => {
                self.doc.errors.push(problem);
                Vec::new()
            }
        }
    }

    /// Reads and parses `include "path"`; problems are recorded, not returned.
    fn include(&mut self, path: &Spanned<String>, dir: &Path, depth: usize) -> Vec<Item> {
        let full = dir.join(&path.node);
        let key = self.loader.key(&full);
        if let Some(pos) = self.stack.iter().position(|k| *k == key) {
            let chain: Vec<String> = self.stack[pos..]
                .iter()
                .chain(std::iter::once(&key))
                .map(|k| k.display().to_string())
                .collect();
            let msg = format!("include cycle: {}", chain.join(" -> "));
            return self.fail(path.span, msg);
        }
        if self.stack.len() >= MAX_INCLUDE_DEPTH {
            let msg = format!("includes nested deeper than {MAX_INCLUDE_DEPTH} levels");
            return self.fail(path.span, msg);
        }
        let text = match self.loader.read(&full) {
            Ok(text) => text,
            Err(e) => {
                let msg = format!("cannot read included file `{}`: {e}", full.display());
                return self.fail(path.span, msg);
            }
        };
        self.doc.sources.note_read(&full);
        let sub_dir = full.parent().map(Path::to_path_buf).unwrap_or_default();
        self.stack.push(key);
        let items = self.parse_text(full.display().to_string(), &text, &sub_dir, depth);
        self.stack.pop();
        items
    }

    fn fail(&mut self, span: Span, msg: String) -> Vec<Item> {
        self.doc.errors.push((span, msg));
        Vec::new()
    }
}

type PResult<T> = Result<T, Problem>;

struct Parser {
    /// Always ends with `Tok::Eof` (the lexer guarantees it).
    tokens: Vec<Token>,
    pos: usize,
    file: u32,
    dir: PathBuf,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.peek_at(0)
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        self.tokens
            .get(self.pos + ahead)
            .or_else(|| self.tokens.last())
            .map_or(&Tok::Eof, |t| &t.tok)
    }

    fn span(&self) -> Span {
        let (line, col) = self
            .tokens
            .get(self.pos)
            .or_else(|| self.tokens.last())
            .map_or((1, 1), |t| (t.line, t.col));
        Span {
            file: self.file,
            line,
            col,
        }
    }

    /// Consumes the current token (never moves past `Eof`).
    fn bump(&mut self) -> (Tok, Span) {
        let span = self.span();
        let tok = self.peek().clone();
        if self.pos + 1 < self.tokens.len() {
            self.pos += 1;
        }
        (tok, span)
    }

    fn err<T>(&self, msg: String) -> PResult<T> {
        Err((self.span(), msg))
    }

    /// Items until `}` (when `open` is the scope's name and brace) or EOF.
    fn items(
        &mut self,
        ctx: &mut Ctx<'_>,
        open: Option<(&str, Span)>,
        depth: usize,
    ) -> PResult<Vec<Item>> {
        let mut items = Vec::new();
        loop {
            match self.peek() {
                Tok::Eof => match open {
                    Some((name, brace)) => {
                        let msg = format!(
                            "unclosed `{{` of scope `{name}`: missing `}}` before end of file"
                        );
                        return Err((brace, msg));
                    }
                    None => return Ok(items),
                },
                Tok::RBrace if open.is_some() => {
                    self.bump();
                    return Ok(items);
                }
                Tok::RBrace => return self.err("unexpected `}`: no scope is open here".into()),
                Tok::Semi => {
                    self.bump();
                }
                Tok::Word(_) => self.item(ctx, &mut items, depth)?,
                other => {
                    let found = other.describe();
                    return self.err(format!("expected an option name or a scope, found {found}"));
                }
            }
        }
    }

    /// One item starting with a word; appends to `items` (an include may
    /// append many).
    fn item(&mut self, ctx: &mut Ctx<'_>, items: &mut Vec<Item>, depth: usize) -> PResult<()> {
        let (tok, span) = self.bump();
        let name = Spanned {
            node: word_text(tok),
            span,
        };
        match self.peek().clone() {
            Tok::Eq => {
                self.bump();
                let value = self.value(0)?;
                items.push(Item::Assign { key: name, value });
                Ok(())
            }
            Tok::LBrace => {
                items.push(Item::Scope(self.scope(ctx, name, None, depth)?));
                Ok(())
            }
            Tok::Str(_) | Tok::Word(_) => self.include_or_scope(ctx, items, name, depth),
            other => {
                let found = other.describe();
                let what = &name.node;
                self.err(format!(
                    "expected `=` or `{{` after `{what}`, found {found}"
                ))
            }
        }
    }

    /// `include "file"` or `name "arg" { … }`; the cursor is on the word or
    /// string after `name`.
    fn include_or_scope(
        &mut self,
        ctx: &mut Ctx<'_>,
        items: &mut Vec<Item>,
        name: Spanned<String>,
        depth: usize,
    ) -> PResult<()> {
        let is_include =
            name.node.eq_ignore_ascii_case("include") && *self.peek_at(1) != Tok::LBrace;
        let (tok, span) = self.bump();
        let arg = Spanned {
            node: word_text(tok),
            span,
        };
        if is_include {
            items.extend(ctx.include(&arg, &self.dir, depth));
            return Ok(());
        }
        if *self.peek() != Tok::LBrace {
            let (what, value) = (&name.node, &arg.node);
            let msg = format!(
                "expected `=` between `{what}` and `{value}` \
                 (or `{{` after them to open a scope)"
            );
            return Err((arg.span, msg));
        }
        items.push(Item::Scope(self.scope(ctx, name, Some(arg), depth)?));
        Ok(())
    }

    /// A scope body; the cursor is on its `{`.
    fn scope(
        &mut self,
        ctx: &mut Ctx<'_>,
        name: Spanned<String>,
        arg: Option<Spanned<String>>,
        depth: usize,
    ) -> PResult<Scope> {
        if depth >= MAX_NESTING {
            return self.err(format!("scopes nested deeper than {MAX_NESTING} levels"));
        }
        let (_, brace) = self.bump();
        let items = self.items(ctx, Some((&name.node, brace)), depth + 1)?;
        Ok(Scope { name, arg, items })
    }

    fn value(&mut self, depth: usize) -> PResult<Spanned<Value>> {
        if depth >= MAX_NESTING {
            return self.err(format!("values nested deeper than {MAX_NESTING} levels"));
        }
        let span = self.span();
        let node = match self.peek().clone() {
            Tok::Str(s) => {
                self.bump();
                Value::Str(s)
            }
            Tok::Word(w) => {
                self.bump();
                Value::Word(w)
            }
            Tok::LParen => self.list(depth)?,
            Tok::LBracket => self.dict(depth)?,
            other => {
                let found = other.describe();
                return self.err(format!("expected a value, found {found}"));
            }
        };
        Ok(Spanned { node, span })
    }

    /// `( … )`; the cursor is on `(`.
    fn list(&mut self, depth: usize) -> PResult<Value> {
        let (_, open) = self.bump();
        let mut elems = Vec::new();
        loop {
            match self.peek() {
                Tok::RParen => {
                    self.bump();
                    return Ok(Value::List(elems));
                }
                Tok::Comma => {
                    self.bump();
                }
                Tok::Eof => return Err((open, unclosed("(", ")"))),
                Tok::Str(_) | Tok::Word(_) | Tok::LParen | Tok::LBracket => {
                    elems.push(self.value(depth + 1)?);
                }
                other => {
                    let found = other.describe();
                    let at = at(open);
                    return self.err(format!(
                        "expected a value or `)` to close the list opened at {at}, found {found}"
                    ));
                }
            }
        }
    }

    /// `[ k = v … ]`; the cursor is on `[`.
    fn dict(&mut self, depth: usize) -> PResult<Value> {
        let (_, open) = self.bump();
        let mut entries = Vec::new();
        loop {
            match self.peek() {
                Tok::RBracket => {
                    self.bump();
                    return Ok(Value::Dict(entries));
                }
                Tok::Comma | Tok::Semi => {
                    self.bump();
                }
                Tok::Eof => return Err((open, unclosed("[", "]"))),
                Tok::Str(_) | Tok::Word(_) => entries.push(self.dict_entry(depth)?),
                other => {
                    let found = other.describe();
                    let at = at(open);
                    return self.err(format!(
                        "expected `key = value` or `]` to close the dictionary opened at {at}, \
                         found {found}"
                    ));
                }
            }
        }
    }

    fn dict_entry(&mut self, depth: usize) -> PResult<(Spanned<String>, Spanned<Value>)> {
        let (tok, span) = self.bump();
        let key = Spanned {
            node: word_text(tok),
            span,
        };
        if *self.peek() != Tok::Eq {
            let found = self.peek().describe();
            let k = &key.node;
            return self.err(format!(
                "expected `=` after dictionary key `{k}`, found {found}"
            ));
        }
        self.bump();
        Ok((key, self.value(depth + 1)?))
    }
}

fn word_text(tok: Tok) -> String {
    match tok {
        Tok::Str(s) | Tok::Word(s) => s,
        _ => String::new(),
    }
}

fn unclosed(open: &str, close: &str) -> String {
    format!("unclosed `{open}`: missing `{close}` before end of file")
}

fn at(span: Span) -> String {
    format!("{}:{}", span.line, span.col)
}

#[cfg(test)]
#[path = "syntax_tests.rs"]
mod tests;
