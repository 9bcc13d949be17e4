//! What blockjobd advertises is what it serves: `query-commands` lists exactly the commands of
//! `query-qmp-schema`, and none of them answers `CommandNotFound`.

use std::collections::BTreeSet;

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::Daemon;
use serde_json::{Value, json};

fn names(list: &Value, keep: impl Fn(&Value) -> bool) -> BTreeSet<String> {
    list.as_array()
        .expect("a list")
        .iter()
        .filter(|e| keep(e))
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn query_commands_lists_exactly_the_commands_of_the_schema_and_each_is_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(&blockjobd(), dir.path());
    let mut qmp = daemon.connect();
    let listed = names(
        &qmp.execute("query-commands", json!({}))
            .expect("query-commands"),
        |_| true,
    );
    let in_schema = names(
        &qmp.execute("query-qmp-schema", json!({}))
            .expect("query-qmp-schema"),
        |e| e["meta-type"] == "command",
    );
    assert_eq!(listed, in_schema);
    // The monitor's own two: `quit` would stop the daemon, and a second `qmp_capabilities` is
    // refused with class CommandNotFound by design (QEMU's "negotiation is already complete").
    for name in in_schema
        .iter()
        .filter(|n| !matches!(n.as_str(), "quit" | "qmp_capabilities"))
    {
        if let Err(error) = qmp.execute(name, json!({})) {
            assert_ne!(
                error["class"], "CommandNotFound",
                "{name} is in the schema but not served: {error}"
            );
        }
    }
}
