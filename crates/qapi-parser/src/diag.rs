//! Errors with locations, and the collection of them one run reports.

use crate::Location;
use std::fmt;

/// The definition an error is about, named above it as QEMU does:
/// `FILE: In command 'block-job-finalize':`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    /// `enum`, `struct`, `union`, `alternate`, `command` or `event`.
    pub meta: &'static str,
    pub name: String,
}

impl Definition {
    pub fn new(meta: &'static str, name: impl Into<String>) -> Self {
        Definition {
            meta,
            name: name.into(),
        }
    }
}

/// A further place the reader of an error needs to see (e.g. a previous
/// definition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub location: Location,
    pub message: String,
    pub definition: Option<Definition>,
}

/// One error about the schema: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub location: Location,
    pub message: String,
    /// The definition the error is about, if it is about one.
    pub definition: Option<Definition>,
    pub notes: Vec<Note>,
}

impl Error {
    pub fn new(location: Location, message: impl Into<String>) -> Self {
        Error {
            location,
            message: message.into(),
            definition: None,
            notes: Vec::new(),
        }
    }

    /// Says which definition the error is about (unless it already says).
    pub fn in_definition(mut self, meta: &'static str, name: &str) -> Self {
        if self.definition.is_none() {
            self.definition = Some(Definition::new(meta, name));
        }
        self
    }

    /// Adds a note pointing at another place.
    pub fn with_note(self, location: Location, message: impl Into<String>) -> Self {
        self.with_note_in(None, location, message)
    }

    /// Adds a note pointing at another place in `definition`.
    pub fn with_note_in(
        mut self,
        definition: Option<Definition>,
        location: Location,
        message: impl Into<String>,
    ) -> Self {
        self.notes.push(Note {
            location,
            message: message.into(),
            definition,
        });
        self
    }
}

/// `location: message` with what QEMU prints above it: the include chain
/// (`In file included from FILE:LINE:`), then the definition
/// (`FILE: In KIND 'NAME':`).
fn write_located(
    f: &mut fmt::Formatter<'_>,
    location: &Location,
    definition: Option<&Definition>,
    message: &str,
) -> fmt::Result {
    for line in location.include_context() {
        writeln!(f, "{line}")?;
    }
    if let Some(d) = definition {
        writeln!(
            f,
            "{}: In {} '{}':",
            location.file.path.display(),
            d.meta,
            d.name
        )?;
    }
    write!(f, "{location}: {message}")
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_located(f, &self.location, self.definition.as_ref(), &self.message)?;
        for note in &self.notes {
            writeln!(f)?;
            write_located(f, &note.location, note.definition.as_ref(), &note.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// One or more errors found in one run, in the order they were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics {
    pub errors: Vec<Error>,
}

impl Diagnostics {
    /// A run that found exactly this error.
    pub fn single(error: Error) -> Self {
        Diagnostics {
            errors: vec![error],
        }
    }
}

impl From<Error> for Diagnostics {
    fn from(error: Error) -> Self {
        Diagnostics::single(error)
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}
