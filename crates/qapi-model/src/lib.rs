//! qapi-model: QAPI expressions → a checked, linked [`Schema`].
//!
//! [`load`] parses a schema (with `qapi-parser`) and makes every check
//! QEMU's QAPI generator makes, in QEMU's phases: syntax, then the shape of
//! each definition, then definitions against each other and their doc
//! comments. Errors are collected per phase (one per definition) and a
//! phase with errors ends the run, so that no error is a consequence of
//! another. Messages use QEMU's wording, located at the offending token.
//!
//! Deliberate differences from QEMU 10's generator:
//! - the doc style lints added after QEMU 10.0 (doc lines over 70 columns,
//!   one space between sentences) are not enforced: QEMU 10.0's own schema
//!   predates them;
//! - `'data': {}` on a command or event stays `Some(ArgType::Inline(vec![]))`
//!   (QEMU treats it like no `data`);
//! - duplicate features on an enum value are an error, as they are
//!   everywhere else;
//! - a nesting depth above 64 is an error (QEMU's schema nests 4 deep).

mod build;
mod check;
mod exprs;
mod names;
pub mod types;

pub use qapi_parser::{Definition, Diagnostics, Error, Location, Note, SourceFile};
pub use types::*;

use qapi_parser::ParsedSchema;
use std::collections::HashMap;
use std::path::Path;

/// Loads and checks the schema at `path` (and every file it includes).
/// Paths in messages are shown as given.
pub fn load(path: &Path) -> Result<Schema, Diagnostics> {
    check(qapi_parser::parse_file(path)?)
}

/// Loads and checks schema text as if read from `name` (`include`s are
/// resolved relative to `name`'s directory).
pub fn load_str(name: &str, text: &str) -> Result<Schema, Diagnostics> {
    check(qapi_parser::parse_str(Path::new(name), text)?)
}

/// `f` over `items` on up to one thread per core (in slices of
/// consecutive items), results in the order of `items`.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let slice_len = items.len().div_ceil(threads.clamp(1, 8)).max(64);
    if items.len() <= slice_len {
        return items.iter().map(f).collect();
    }
    let f = &f;
    std::thread::scope(|scope| {
        let mut slices = items.chunks(slice_len);
        let first = slices.next().unwrap_or_default();
        let helpers: Vec<_> = slices
            .map(|slice| scope.spawn(move || slice.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out: Vec<R> = first.iter().map(f).collect();
        for helper in helpers {
            match helper.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

fn check(parsed: ParsedSchema) -> Result<Schema, Diagnostics> {
    let mut errors = Vec::new();
    let mut defs = Vec::with_capacity(parsed.exprs.len());
    // Each definition's shape is checked on its own: in parallel, results
    // (and so errors) in schema order.
    for result in par_map(&parsed.exprs, |expr| {
        exprs::check_expr(expr, &parsed.pragmas)
    }) {
        match result {
            Ok(d) => defs.push(d),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics { errors });
    }
    let checker = check::Checker::new(&defs, &parsed.pragmas, &mut errors);
    for result in par_map(&defs, |d| {
        checker.check_def(d).and_then(|()| checker.check_doc(d))
    }) {
        if let Err(e) = result {
            errors.push(e);
        }
    }
    if let Err(e) = check::check_feature_count(&defs) {
        errors.push(e);
    }
    if !errors.is_empty() {
        return Err(Diagnostics { errors });
    }
    let by_name: HashMap<&str, &exprs::Def> = defs.iter().map(|d| (d.name.as_str(), d)).collect();
    let enum_of_discriminator = |d: &exprs::Def| -> String {
        let exprs::DefKind::Union {
            base,
            discriminator,
            ..
        } = &d.kind
        else {
            return String::new();
        };
        let members: Vec<&exprs::RawMember> = match base {
            exprs::RawArgs::Inline(ms) => ms.iter().collect(),
            exprs::RawArgs::Named(n) => struct_chain_members(&by_name, &n.name),
        };
        members
            .into_iter()
            .find(|m| m.name == discriminator.name)
            .map(|m| m.ty.name.clone())
            .unwrap_or_default()
    };
    let entities = par_map(&defs, |d| build::entity(d, enum_of_discriminator));
    Ok(Schema {
        entities,
        pragma: build::pragma(&parsed.pragmas),
        free_docs: parsed
            .free_docs
            .iter()
            .map(|(i, b)| (*i, build::doc(b)))
            .collect(),
    })
}

/// Members of a (checked, acyclic) struct and its bases.
fn struct_chain_members<'a>(
    defs: &HashMap<&str, &'a exprs::Def>,
    name: &str,
) -> Vec<&'a exprs::RawMember> {
    let mut out = Vec::new();
    let mut cur = Some(name);
    let mut guard = 0;
    while let Some(n) = cur {
        guard += 1;
        if guard > defs.len() {
            break;
        }
        cur = None;
        if let Some(d) = defs.get(n)
            && let exprs::DefKind::Struct { base, members } = &d.kind
        {
            out.extend(members.iter());
            cur = base.as_ref().map(|b| b.name.as_str());
        }
    }
    out
}
