//! The README's fifteen lines are `examples/backup.rs`, which cargo builds: the README
//! cannot show code that does not compile.

#[test]
fn the_readme_shows_the_backup_example_verbatim() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let example = include_str!("../examples/backup.rs");
    assert!(
        readme.contains(&format!("```rust\n{example}```")),
        "README.md must show crates/qmp-client/examples/backup.rs as it is"
    );
    let body = example
        .lines()
        .skip_while(|l| !l.starts_with("async fn main"));
    assert!(body.count() <= 16, "fifteen lines or so");
}
