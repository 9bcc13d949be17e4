//! QAPI's naming rules (as QEMU's generator enforces them).

/// Normalises a name the way C identifiers are derived from it: every
/// character other than a letter, digit or `_` becomes `_`. Two names that
/// normalise alike clash.
pub(crate) fn c_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether `c_name(name)` starts with `prefix` (letters, digits and `_`),
/// without building it.
pub(crate) fn c_name_starts_with(name: &str, prefix: &str) -> bool {
    let mut chars = name.chars();
    prefix.chars().all(|p| {
        chars.next().is_some_and(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c == p
            } else {
                p == '_'
            }
        })
    })
}

fn valid_stem(stem: &str) -> bool {
    let mut chars = stem.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The stem of a valid name (without the `__RFQDN_` downstream prefix and
/// the `x-` experimental prefix), or `None` if the name is invalid: it must
/// start with a letter, use only letters, digits, `-` and `_`, and not
/// start with the reserved `q_` (after normalisation).
pub(crate) fn stem(name: &str) -> Option<&str> {
    let mut rest = name;
    if let Some(after) = name.strip_prefix("__") {
        let run = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            .unwrap_or(after.len());
        if run > 0 && after[run..].starts_with('_') {
            rest = &after[run + 1..];
        } else {
            return None;
        }
    }
    // `c_name(name)` starts with `q_` (without building it).
    let mut chars = name.chars();
    if chars.next() == Some('q') && chars.next().is_some_and(|c| !c.is_ascii_alphanumeric()) {
        return None;
    }
    if rest.len() >= 2 && rest[..2].eq_ignore_ascii_case("x-") && valid_stem(&rest[2..]) {
        return Some(&rest[2..]);
    }
    valid_stem(rest).then_some(rest)
}

/// Event names: upper case, `_` separated.
pub(crate) fn check_upper(name: &str, source: &str) -> Result<(), String> {
    let stem = stem(name).ok_or_else(|| format!("{source} has an invalid name"))?;
    if stem.chars().any(|c| c.is_ascii_lowercase() || c == '-') {
        return Err(format!("name of {source} must not use lowercase or '-'"));
    }
    Ok(())
}

/// Command, member, value and feature names: lower case, `-` separated
/// (unless a pragma exception permits upper case and `_`).
pub(crate) fn check_lower(
    name: &str,
    source: &dyn std::fmt::Display,
    permit_upper: bool,
    permit_underscore: bool,
) -> Result<(), String> {
    let stem = stem(name).ok_or_else(|| format!("{source} has an invalid name"))?;
    if (!permit_upper && stem.chars().any(|c| c.is_ascii_uppercase()))
        || (!permit_underscore && stem.contains('_'))
    {
        return Err(format!("name of {source} must not use uppercase or '_'"));
    }
    Ok(())
}

/// Type names: CamelCase.
pub(crate) fn check_camel(name: &str, source: &str) -> Result<(), String> {
    let stem = stem(name).ok_or_else(|| format!("{source} has an invalid name"))?;
    let mut chars = stem.chars();
    let first_upper = matches!(chars.next(), Some(c) if c.is_ascii_uppercase());
    let rest: Vec<char> = chars.collect();
    if !first_upper
        || !rest.iter().all(|c| c.is_ascii_alphanumeric())
        || !rest.iter().any(|c| c.is_ascii_lowercase())
    {
        return Err(format!("name of {source} must use CamelCase"));
    }
    Ok(())
}

/// `if` leaves: configuration symbols.
pub(crate) fn is_config_symbol(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {

    #[test]
    fn c_name_prefix_test_agrees_with_c_name() {
        for name in [
            "has-x", "has_x", "has.x", "hasx", "has", "ha", "u", "q_x", "q-x", "qx", "hé-x",
        ] {
            for prefix in ["has_", "q_", "u"] {
                assert_eq!(
                    c_name_starts_with(name, prefix),
                    c_name(name).starts_with(prefix),
                    "{name} / {prefix}"
                );
            }
        }
    }
    use super::*;

    #[test]
    fn downstream_and_experimental_prefixes_are_stripped() {
        assert_eq!(stem("__com.redhat_x-foo"), Some("foo"));
        assert_eq!(stem("x-foo"), Some("foo"));
        assert_eq!(stem("__org.qemu_bar"), Some("bar"));
    }

    #[test]
    fn bare_experimental_prefix_is_a_name_of_its_own() {
        assert_eq!(stem("x-"), Some("x-"));
    }

    #[test]
    fn q_prefix_and_leading_digit_are_invalid() {
        assert_eq!(stem("q_foo"), None);
        assert_eq!(stem("q-foo"), None);
        assert_eq!(stem("1abc"), None);
        assert_eq!(stem("__bad"), None);
    }

    #[test]
    fn camel_case_needs_a_lowercase_letter() {
        assert!(check_camel("BlockJobStatus", "enum").is_ok());
        assert!(check_camel("QCryptoTLSCredsEndpoint", "enum").is_ok());
        assert!(check_camel("ABC", "enum").is_err());
        assert!(check_camel("Foo_Bar", "enum").is_err());
    }

    #[test]
    fn clash_normalisation_maps_punctuation_to_underscore() {
        assert_eq!(c_name("one-two.three"), "one_two_three");
    }
}
