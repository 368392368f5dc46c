//! Diagnostics and the error type of configuration loading.
//!
//! Owns how a problem is located (`file:line:col`) and printed. It does not
//! decide what is a problem: the lexer, parser and settings stages do.

use std::fmt;
use std::path::PathBuf;

/// One located message about a configuration file: an error or a warning.
///
/// `line` and `col` are 1-based and point at the offending token; `col`
/// counts characters, not bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as the user named it (the `name` given to
    /// [`Config::parse_str`](super::Config::parse_str), or a path).
    pub file: String,
    /// 1-based line of the offending token.
    pub line: u32,
    /// 1-based column (in characters) of the offending token.
    pub col: u32,
    /// What is wrong, in words meant for the person editing the file.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Why a configuration could not be loaded.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The top-level file could not be read. (A missing *included* file is
    /// reported as an [`Error::Invalid`] diagnostic at its `include` line.)
    #[error("{}: {source}", path.display())]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The text was read but is wrong. Every problem found is listed, in file
    /// order; never empty. Display prints one diagnostic per line.
    #[error("{}", DiagnosticList(.0))]
    Invalid(Vec<Diagnostic>),
}

impl Error {
    /// The located problems of an [`Error::Invalid`]; empty for I/O errors.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            Error::Invalid(diags) => diags,
            Error::Io { .. } => &[],
        }
    }
}

/// Prints diagnostics one per line, without a trailing newline.
struct DiagnosticList<'a>(&'a [Diagnostic]);

impl fmt::Display for DiagnosticList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diag) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{diag}")?;
        }
        Ok(())
    }
}
