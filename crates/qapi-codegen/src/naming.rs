//! Rust identifiers from QAPI wire names: case conversion, keywords, leading digits.
//!
//! Every rule lives here so the generator never spells an identifier by hand.

/// Every Rust keyword, strict and reserved, in all editions up to 2024.
const KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut",
    "pub", "ref", "return", "self", "Self", "static", "struct", "super", "trait", "true", "type",
    "unsafe", "use", "where", "while", "abstract", "become", "box", "do", "final", "macro",
    "override", "priv", "try", "typeof", "unsized", "virtual", "yield",
];

/// Keywords that cannot be raw identifiers (`r#self` is not allowed).
const NOT_RAW: &[&str] = &["crate", "self", "Self", "super", "_"];

/// The parts of a wire name: split at `-`, `_`, `.`, `+` and other non-alphanumerics.
fn parts(name: &str) -> Vec<&str> {
    name.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|p| !p.is_empty())
        .collect()
}

fn capitalize(part: &str, lower_rest: bool) -> String {
    let mut chars = part.chars();
    match chars.next() {
        Some(first) => {
            let rest: String = chars.collect();
            let rest = if lower_rest {
                rest.to_ascii_lowercase()
            } else {
                rest
            };
            format!("{}{}", first.to_ascii_uppercase(), rest)
        }
        None => String::new(),
    }
}

/// UpperCamelCase: each part capitalised, the rest of each part kept
/// (`BlockJobStatus` stays, `set-speed` → `SetSpeed`). Parts written in
/// capitals only (`JOB_STATUS_CHANGE`) are lowered first. Two digit-ending and
/// digit-starting parts keep a `_` between them so `1.1` and `11` differ.
pub fn upper_camel(name: &str) -> String {
    // Already UpperCamelCase (most type names): nothing to change.
    if name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return name.to_string();
    }
    let parts = parts(name);
    let all_caps = parts.len() > 1
        && parts
            .iter()
            .all(|p| p.chars().all(|c| !c.is_ascii_lowercase()));
    let mut out = String::new();
    for part in parts {
        let joined_digits = out.ends_with(|c: char| c.is_ascii_digit())
            && part.starts_with(|c: char| c.is_ascii_digit());
        if joined_digits {
            out.push('_');
        }
        out.push_str(&capitalize(part, all_caps));
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// snake_case: lower case, every non-alphanumeric run becomes `_`.
pub fn snake(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// An identifier for `text`, raw (`r#type`) when it is a keyword, or with a
/// trailing `_` for the keywords that cannot be raw.
pub fn ident(text: &str) -> String {
    if NOT_RAW.contains(&text) {
        format!("{text}_")
    } else if KEYWORDS.contains(&text) {
        format!("r#{text}")
    } else {
        text.to_string()
    }
}

/// The token for an identifier made by this module (`r#type` becomes a raw identifier).
pub fn token(ident: &str) -> proc_macro2::Ident {
    let span = proc_macro2::Span::call_site();
    match ident.strip_prefix("r#") {
        Some(raw) => proc_macro2::Ident::new_raw(raw, span),
        None => proc_macro2::Ident::new(ident, span),
    }
}

/// The name serde derives for `ident` (raw identifiers lose their `r#`).
pub fn serde_name(ident: &str) -> &str {
    ident.strip_prefix("r#").unwrap_or(ident)
}

/// The name serde gives field `ident` under `#[serde(rename_all = "kebab-case")]`.
pub fn serde_kebab_field(ident: &str) -> String {
    serde_name(ident).replace('_', "-")
}

/// The name serde gives variant `ident` under `#[serde(rename_all = "kebab-case")]`
/// (a `-` before every capital but the first, all lower case).
pub fn serde_kebab_variant(ident: &str) -> String {
    let mut out = String::new();
    for (i, c) in serde_name(ident).chars().enumerate() {
        if i > 0 && c.is_uppercase() {
            out.push('-');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// Type identifier for a schema type name.
pub fn type_ident(name: &str) -> String {
    ident(&upper_camel(name))
}

/// Field or method identifier for a wire name.
pub fn field_ident(name: &str) -> String {
    ident(&snake(name))
}

/// `Event` variant identifier for an event name: events are shouted
/// (`JOB_STATUS_CHANGE`, `SHUTDOWN`), so every part is lowered first
/// (`JobStatusChange`, `Shutdown`).
pub fn event_variant_ident(name: &str) -> String {
    ident(&upper_camel(&name.to_ascii_lowercase()))
}

/// Enum variant identifier for a wire name.
pub fn variant_ident(name: &str) -> String {
    ident(&upper_camel(name))
}

/// Makes identifiers in one scope unique by suffixing later duplicates with
/// `_2`, `_3`, ... (normalisation can merge names like `a-b` and `a_b`).
pub fn dedupe(idents: Vec<String>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    idents
        .into_iter()
        .map(|id| {
            let base = id.clone();
            let mut text = base.clone();
            let mut n = 2;
            while seen.contains(&text) {
                text = format!("{}_{n}", base.trim_start_matches("r#"));
                n += 1;
            }
            seen.push(text.clone());
            if text == base { id } else { ident(&text) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_camel_keeps_camel_type_names() {
        assert_eq!(upper_camel("BlockJobStatus"), "BlockJobStatus");
        assert_eq!(
            upper_camel("QCryptoBlockOpenOptions"),
            "QCryptoBlockOpenOptions"
        );
    }

    #[test]
    fn upper_camel_converts_wire_names() {
        assert_eq!(upper_camel("set-speed"), "SetSpeed");
        assert_eq!(upper_camel("block-job-finalize"), "BlockJobFinalize");
        assert_eq!(upper_camel("read_aio"), "ReadAio");
    }

    #[test]
    fn upper_camel_lowers_shouted_event_names() {
        assert_eq!(upper_camel("JOB_STATUS_CHANGE"), "JobStatusChange");
    }

    #[test]
    fn event_variants_lower_every_shouted_part() {
        assert_eq!(event_variant_ident("JOB_STATUS_CHANGE"), "JobStatusChange");
        assert_eq!(event_variant_ident("SHUTDOWN"), "Shutdown");
    }

    #[test]
    fn upper_camel_prefixes_leading_digits_and_separates_digit_runs() {
        assert_eq!(upper_camel("0.10"), "_0_10");
        assert_eq!(upper_camel("1.1"), "_1_1");
        assert_eq!(upper_camel("11"), "_11");
        assert_eq!(upper_camel("3des"), "_3des");
    }

    #[test]
    fn snake_converts_and_prefixes_digits() {
        assert_eq!(snake("auto-finalize"), "auto_finalize");
        assert_eq!(snake("x-perf"), "x_perf");
        assert_eq!(snake("802.1x"), "_802_1x");
    }

    #[test]
    fn keywords_become_raw_or_suffixed() {
        assert_eq!(ident("type"), "r#type");
        assert_eq!(ident("gen"), "r#gen");
        assert_eq!(ident("self"), "self_");
        assert_eq!(ident("Self"), "Self_");
        assert_eq!(serde_name(&ident("type")), "type");
    }

    #[test]
    fn kebab_case_names_are_serdes() {
        assert_eq!(serde_kebab_field("current_progress"), "current-progress");
        assert_eq!(serde_kebab_field("r#type"), "type");
        assert_eq!(serde_kebab_variant("SnapshotLoad"), "snapshot-load");
        assert_eq!(
            serde_kebab_variant("XBlockDirtyBitmapEnable"),
            "x-block-dirty-bitmap-enable"
        );
        assert_eq!(serde_kebab_variant("Qcow2"), "qcow2");
    }

    #[test]
    fn dedupe_suffixes_later_duplicates() {
        let ids = dedupe(vec![ident("a_b"), ident("a_b"), ident("c")]);
        assert_eq!(ids, ["a_b", "a_b_2", "c"]);
    }
}
