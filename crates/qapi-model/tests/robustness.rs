//! Damaged schemas give errors, never panics: every prefix of a valid
//! schema, seeded random mutations of it, and hand-written nasties.

use std::path::Path;

const GARDEN: &str = include_str!("fixtures/garden.json");

/// Loads `text` and checks that the outcome is an `Ok` or a non-empty,
/// printable list of errors.
fn survives(text: &str) {
    match qapi_model::load_str("damaged.json", text) {
        Ok(_) => {}
        Err(d) => {
            assert!(!d.errors.is_empty(), "an Err without errors for {text:?}");
            assert!(!d.to_string().is_empty());
        }
    }
}

#[test]
fn every_prefix_of_a_valid_schema_is_handled() {
    let mut failures = 0;
    for (i, _) in GARDEN.char_indices() {
        let prefix = &GARDEN[..i];
        survives(prefix);
        if qapi_model::load_str("prefix.json", prefix).is_err() {
            failures += 1;
        }
    }
    assert!(
        failures > GARDEN.len() / 2,
        "most prefixes are broken schemas"
    );
}

/// A small xorshift generator: reproducible mutations without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn seeded_random_mutations_are_handled() {
    const INTERESTING: &[u8] = b"{}[]:,'#@\\\n\t x-_*Aa0\x7f\xc3";
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut rejected = 0;
    for _ in 0..3000 {
        let mut bytes = GARDEN.as_bytes().to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            match rng.below(4) {
                0 => bytes[at] = INTERESTING[rng.below(INTERESTING.len())],
                1 => {
                    bytes.remove(at);
                }
                2 => bytes.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
                _ => {
                    let end = (at + rng.below(40)).min(bytes.len());
                    let chunk: Vec<u8> = bytes[at..end].to_vec();
                    let to = rng.below(bytes.len());
                    bytes.splice(to..to, chunk);
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        survives(&text);
        if qapi_model::load_str("mutant.json", &text).is_err() {
            rejected += 1;
        }
    }
    assert!(rejected > 1000, "only {rejected} of 3000 mutants rejected");
}

#[test]
fn hand_written_nasties_are_handled() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let nasties = [
        "",
        "\n",
        "#",
        "##",
        "##\n",
        "##\n#",
        "##\n# @\n##\n",
        "##\n# @:\n##\n",
        "'",
        "'\\",
        "{",
        "{'",
        "{'a'",
        "{'a':",
        "{'a':'b',",
        "[",
        "]",
        "}",
        "true",
        "{ 'enum': 'E', 'data': [ '' ] }",
        "{ 'enum': 'E', 'data': [ { 'name': '' } ] }",
        "{ 'struct': 'S', 'data': { '': 'int' } }",
        "{ 'struct': 'S', 'data': { '*': 'int' } }",
        "{ 'struct': '', 'data': {} }",
        "{ 'command': '' }",
        "{ 'event': '' }",
        "{ 'union': 'U', 'base': {}, 'discriminator': '', 'data': {} }",
        "{ 'struct': 'S', 'base': 'S', 'data': {} }",
        "{ 'union': 'U', 'base': 'U', 'discriminator': 'k', 'data': {} }",
        "{ 'enum': 'E', 'data': ['a'] }\n{ 'union': 'U', 'base': {'k': 'E'}, 'discriminator': 'k', 'data': {'a': 'U'} }",
        "{ 'alternate': 'A', 'data': { 'a': 'A' } }",
        "{ 'include': '' }",
        "{ 'include': '/' }",
        "{ 'include': 'damaged.json' }",
        "{ 'pragma': {} }",
        "{ 'if': 'X' }",
        "{ 'struct': 'S', 'data': {}, 'if': { 'not': { 'not': { 'not': {} } } } }",
        "\u{feff}{ 'enum': 'E', 'data': [] }",
        "{ 'enum': 'E', 'data': [] } \u{0}",
        &deep,
    ];
    for text in nasties {
        survives(text);
    }
}

#[test]
fn a_missing_schema_file_is_an_error() {
    let err = qapi_model::load(Path::new("/nonexistent/schema.json")).expect_err("missing file");
    assert!(err.to_string().contains("can't read schema file"), "{err}");
}

/// Columns along one long line and duplicate-key checks in big objects are
/// found without rescanning: a quadratic front end would take minutes here.
#[test]
fn huge_single_line_definitions_load() {
    let values: Vec<String> = (0..50_000).map(|i| format!("'v{i}'")).collect();
    let members: Vec<String> = (0..20_000).map(|i| format!("'m{i}': 'int'")).collect();
    let text = format!(
        "{{ 'enum': 'Big', 'data': [ {} ] }} {{ 'struct': 'Wide', 'data': {{ {} }} }}",
        values.join(", "),
        members.join(", ")
    );
    let schema = qapi_model::load_str("huge.json", &text).unwrap_or_else(|d| panic!("{d}"));
    let Some(qapi_model::Entity::Struct(s)) = schema.entity("Wide") else {
        panic!("Wide")
    };
    assert_eq!(s.members[19_999].location.line, 1);
    assert!(s.members[19_999].location.col > 400_000);
}
