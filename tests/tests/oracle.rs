//! blockjobd against the recorded behaviour of qemu-storage-daemon 10.0.2: the shared oracle's
//! scenarios and our own, compared with the harness's default rules (commands, replies, image
//! checks and events per command segment).

use blockjobs_tests::{blockjobd, own_oracle, run_oracle, shared_oracle};

/// Shared scenarios whose features are not built yet, with the reason. Everything else in
/// `../shared/oracle/scenarios/` must pass.
const NOT_YET: &[(&str, &str)] = &[];

fn scenario_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("scenario directory")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".json").map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn blockjobd_matches_qemu_storage_daemon_on_the_shared_scenarios() {
    let dir = shared_oracle().join("scenarios");
    let names = scenario_names(&dir);
    let run: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !NOT_YET.iter().any(|(skip, _)| skip == n))
        .collect();
    assert!(run.len() >= 19, "too few shared scenarios found: {run:?}");
    let result = run_oracle(&blockjobd(), &dir, &shared_oracle().join("expected"), &run);
    assert!(result.success, "{}", result.output);
    assert!(
        result
            .output
            .contains(&format!("{} passed, 0 failed", run.len())),
        "{}",
        result.output
    );
}

#[test]
fn blockjobd_matches_qemu_storage_daemon_on_our_scenarios() {
    let own = own_oracle();
    let names = scenario_names(&own.join("scenarios"));
    let result = run_oracle(
        &blockjobd(),
        &own.join("scenarios"),
        &own.join("expected"),
        &[],
    );
    assert!(result.success, "{}", result.output);
    assert!(
        result
            .output
            .contains(&format!("{} passed, 0 failed", names.len())),
        "{}",
        result.output
    );
}
