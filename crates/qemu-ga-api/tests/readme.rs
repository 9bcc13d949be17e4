//! The README's example is `examples/readme.rs`, which CI builds and runs: they must not drift.

#[test]
fn the_readmes_example_is_examples_readme_rs() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/readme.rs");
    let block = readme
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README has a rust block");
    assert_eq!(block, example);
}
