//! Errors with locations, and the collection of them one run reports.

use crate::Location;
use std::fmt;

/// One error about the schema: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub location: Location,
    pub message: String,
    /// Further places the reader needs to see (e.g. a previous definition).
    pub notes: Vec<(Location, String)>,
}

impl Error {
    pub fn new(location: Location, message: impl Into<String>) -> Self {
        Error {
            location,
            message: message.into(),
            notes: Vec::new(),
        }
    }

    /// Adds a note pointing at another place.
    pub fn with_note(mut self, location: Location, message: impl Into<String>) -> Self {
        self.notes.push((location, message.into()));
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.location.include_context() {
            writeln!(f, "{line}")?;
        }
        write!(f, "{}: {}", self.location, self.message)?;
        for (loc, note) in &self.notes {
            write!(f, "\n{loc}: {note}")?;
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
