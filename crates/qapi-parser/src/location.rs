//! Source locations shared by the parser and the checked model.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// One schema file as it was reached: its path as the user would read it and
/// the chain of `include` directives that led to it (outermost last).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceFile {
    /// Path as displayed in messages (relative paths stay relative).
    pub path: PathBuf,
    /// Where this file was included from, if it was included.
    pub included_from: Option<Location>,
}

/// A position in a schema file: 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub file: Arc<SourceFile>,
    pub line: u32,
    pub col: u32,
}

impl Location {
    /// The `In file included from ...` lines that precede a message about
    /// this location, innermost include first, as QEMU prints them.
    pub fn include_context(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = self.file.included_from.clone();
        while let Some(loc) = cur {
            out.push(format!(
                "In file included from {}:{}:",
                loc.file.path.display(),
                loc.line
            ));
            cur = loc.file.included_from.clone();
        }
        out
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.path.display(), self.line, self.col)
    }
}
