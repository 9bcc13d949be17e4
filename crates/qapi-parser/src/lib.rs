//! qapi-parser: QAPI schema text → expressions with `FILE:LINE:COL`
//! locations, doc blocks attached, includes expanded.
//!
//! [`parse_file`] reads a schema and the files it includes and returns the
//! top-level definitions as [`Node`] trees (not yet checked: that is
//! `qapi-model`'s job), the free-form doc blocks, and the merged pragmas.
//! Syntax errors end the file they are in; errors that leave the token
//! stream intact (bad `include` or `pragma`, misplaced doc blocks) are
//! collected and parsing goes on.
//!
//! The grammar is nom combinators end to end, one function per production:
//! `grammar` (whitespace and comments, strings, booleans, lists, objects,
//! top-level items, the `##` blocks) and `doc` (a doc block's lines:
//! descriptions, features, tagged sections, indentation). Its error type
//! carries QEMU's message and the offending position, turned into a
//! `FILE:LINE:COL` [`Location`].

mod diag;
mod doc;
mod file;
mod grammar;
pub mod location;
mod value;

pub use diag::{Definition, Diagnostics, Error, Note};
pub use doc::{DocBlock, DocItem, DocSectionBlock};
pub use file::{ParsedSchema, Pragmas, TopExpr, parse_file, parse_str};
pub use location::{Location, SourceFile};
pub use value::{Dict, Key, Node, Value};
