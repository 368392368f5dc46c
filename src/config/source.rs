//! Where text comes from: spans, the table of files read, and the loader
//! that reads included files.
//!
//! Parsing never touches the filesystem directly; it asks a [`Loader`]. The
//! real one reads files, the fuzz one refuses every include, and unit tests
//! use an in-memory map. This keeps the parser sans-IO.

use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};

use super::error::Diagnostic;

/// A position in one source file: index into [`Sources`] plus 1-based
/// line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) file: u32,
    pub(crate) line: u32,
    pub(crate) col: u32,
}

/// A located problem before it is turned into a [`Diagnostic`].
pub(crate) type Problem = (Span, String);

/// The names of the texts parsed (index = `Span::file`) and the paths of
/// the files actually read.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    names: Vec<String>,
    pub(crate) read: Vec<PathBuf>,
}

impl Sources {
    /// Registers a text under a display name; returns its file index.
    pub(crate) fn add(&mut self, name: String) -> u32 {
        self.names.push(name);
        u32::try_from(self.names.len() - 1).unwrap_or(u32::MAX)
    }

    /// Records that a file was read (once per distinct path).
    pub(crate) fn note_read(&mut self, path: &Path) {
        if !self.read.iter().any(|p| p == path) {
            self.read.push(path.to_path_buf());
        }
    }

    /// Turns a span and a message into a printable diagnostic.
    pub(crate) fn diag(&self, span: Span, message: String) -> Diagnostic {
        let file = usize::try_from(span.file)
            .ok()
            .and_then(|i| self.names.get(i))
            .cloned()
            .unwrap_or_else(|| "<unknown>".to_string());
        Diagnostic {
            file,
            line: span.line,
            col: span.col,
            message,
        }
    }
}

/// Reads the files named by `include`.
pub(crate) trait Loader {
    /// Returns the whole text of `path`.
    fn read(&mut self, path: &Path) -> io::Result<String>;

    /// A key identifying the file, used to detect include cycles. Two
    /// spellings of one file should give the same key.
    fn key(&self, path: &Path) -> PathBuf {
        normalize(path)
    }
}

/// The real filesystem.
pub(crate) struct FsLoader;

impl Loader for FsLoader {
    fn read(&mut self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn key(&self, path: &Path) -> PathBuf {
        std::fs::canonicalize(path).unwrap_or_else(|_| normalize(path))
    }
}

/// Refuses every include: for fuzzing and for callers that must not read
/// files.
pub(crate) struct NoIncludes;

impl Loader for NoIncludes {
    fn read(&mut self, _path: &Path) -> io::Result<String> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "includes are disabled here",
        ))
    }
}

/// Files held in memory (unit tests).
#[derive(Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct MemLoader {
    pub(crate) files: HashMap<PathBuf, String>,
}

impl Loader for MemLoader {
    fn read(&mut self, path: &Path) -> io::Result<String> {
        self.files
            .get(&normalize(path))
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
    }
}

/// Resolves `.` and `..` lexically (no filesystem access).
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    out
}
