//! ARCHITECTURE.md's map is true: its crate table lists every workspace crate, and each
//! crate's "uses" column is exactly its `[dependencies]` on our own crates.

use std::collections::{BTreeMap, BTreeSet};

use blockjobs_tests::repo_root;

/// Our crates: `[package] name` of every workspace member, by its directory.
fn crates() -> BTreeMap<String, std::path::PathBuf> {
    let root = repo_root();
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("crates"))
        .expect("crates/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.push(root.join("xtask"));
    dirs.push(root.join("tests"));
    dirs.into_iter()
        .map(|dir| {
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .expect("a directory name")
                .to_string();
            (name, dir)
        })
        .collect()
}

/// The names under `[dependencies]` of a Cargo.toml (the key before `=` or `.workspace`).
fn dependencies(manifest: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut inside = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[dependencies]";
            continue;
        }
        if !inside || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = line
            .split(['=', '.'])
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        out.insert(key);
    }
    out
}

#[test]
fn the_crate_table_lists_every_crate_with_exactly_its_dependencies_on_our_crates() {
    let text = std::fs::read_to_string(repo_root().join("ARCHITECTURE.md")).expect("read it");
    let ours = crates();
    let names: BTreeSet<String> = ours.keys().cloned().collect();
    let mut table = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `name` | one job | uses |
        if cells.len() == 5 && cells[1].starts_with('`') {
            let name = cells[1].trim_matches('`').to_string();
            let uses: BTreeSet<String> = cells[3]
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty() && *u != "–")
                .map(str::to_string)
                .collect();
            table.insert(name, uses);
        }
    }
    assert_eq!(
        table.keys().cloned().collect::<BTreeSet<_>>(),
        names,
        "the crate table and the workspace"
    );
    for (name, dir) in &ours {
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
        let deps: BTreeSet<String> = dependencies(&manifest)
            .into_iter()
            .filter(|d| names.contains(d))
            .collect();
        assert_eq!(table[name], deps, "{name}: ARCHITECTURE.md vs Cargo.toml");
    }
}
