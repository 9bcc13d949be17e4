//! The README's example is `examples/ga_readme.rs`, which CI builds and runs: they must not
//! drift. (Not `readme.rs`: `qemu-qmp-api` has an example of that name, and two examples of
//! one name collide in `target/`.)

#[test]
fn the_readmes_example_is_examples_ga_readme_rs() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/ga_readme.rs");
    let block = readme
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README has a rust block");
    assert_eq!(block, example);
}
