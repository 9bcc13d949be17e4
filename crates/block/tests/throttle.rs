//! The `throttle` driver over throttle groups: I/O through a throttle node is limited by its
//! group's limits (bytes and operations; total, read or write; bursts), and two nodes of one
//! group share the budget. The times asserted are lower bounds the limits impose (a loaded
//! machine only makes them longer) and comparisons within one run.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::throttle::{ThrottleConfig, ThrottleGroup, ThrottleGroups};
use block::{BlockGraph, BlockNode};
use common::AddJson;
use serde_json::json;

const MIB: u64 = 1 << 20;
const CHUNK: usize = 64 << 10;

fn graph_with_group(limits: serde_json::Value) -> (BlockGraph, ThrottleGroups) {
    let groups = ThrottleGroups::default();
    let limits: qmp_api::ThrottleLimits = qmp_api::input::from_value(&limits).expect("limits");
    let mut config = ThrottleConfig::default();
    config.apply_limits(&limits).expect("valid limits");
    groups.insert(Arc::new(ThrottleGroup::new("tg", config)));
    (
        BlockGraph::new().with_throttle_groups(groups.clone()),
        groups,
    )
}

fn throttle_node(graph: &mut BlockGraph, name: &str) -> Arc<BlockNode> {
    graph
        .blockdev_add_json(&json!({
            "driver": "throttle", "node-name": name, "throttle-group": "tg",
            "file": {"driver": "null-co", "size": 64 * MIB}
        }))
        .expect("throttle node")
}

/// Writes `bytes` in 64 KiB requests; returns how long it took.
fn write(node: &BlockNode, bytes: u64) -> Duration {
    let buf = vec![0x5a; CHUNK];
    let start = Instant::now();
    let mut offset = 0;
    while offset < bytes {
        node.write_at(offset, &buf).expect("write");
        offset += CHUNK as u64;
    }
    start.elapsed()
}

fn read(node: &BlockNode, bytes: u64) -> Duration {
    let mut buf = vec![0; CHUNK];
    let start = Instant::now();
    let mut offset = 0;
    while offset < bytes {
        node.read_at(offset, &mut buf).expect("read");
        offset += CHUNK as u64;
    }
    start.elapsed()
}

#[test]
fn bps_total_limits_a_node_and_two_nodes_share_it() {
    let (mut graph, _groups) = graph_with_group(json!({"bps-total": 2 * MIB}));
    let a = throttle_node(&mut graph, "a");
    let b = throttle_node(&mut graph, "b");
    // 2 MiB at 2 MiB/s: the bucket (a tenth of a second's worth) lets the first 0.2 MiB by.
    let alone = write(&a, 2 * MIB);
    assert!(alone >= Duration::from_millis(850), "alone: {alone:?}");
    // The same amount through each of two nodes at once: the group's budget is shared, so
    // together they take about twice as long.
    let (a2, b2) = (Arc::clone(&a), Arc::clone(&b));
    let start = Instant::now();
    let ta = std::thread::spawn(move || write(&a2, 2 * MIB));
    let tb = std::thread::spawn(move || write(&b2, 2 * MIB));
    ta.join().expect("writer a");
    tb.join().expect("writer b");
    let together = start.elapsed();
    assert!(
        together >= Duration::from_millis(1850),
        "together: {together:?}"
    );
}

#[test]
fn read_and_write_limits_apply_to_their_direction_only() {
    let (mut graph, _groups) = graph_with_group(json!({"bps-write": MIB}));
    let node = throttle_node(&mut graph, "n");
    // Reads are not limited: 8 MiB of reads are fast...
    let reads = read(&node, 8 * MIB);
    // ...writes are: 1 MiB at 1 MiB/s after the first 0.1 MiB.
    let writes = write(&node, MIB);
    assert!(writes >= Duration::from_millis(800), "writes: {writes:?}");
    assert!(reads < writes, "reads {reads:?}, writes {writes:?}");
}

#[test]
fn iops_limit_counts_requests_and_iops_size_splits_large_ones() {
    let (mut graph, _groups) = graph_with_group(json!({"iops-total": 20}));
    let node = throttle_node(&mut graph, "n");
    // 20 requests at 20/s: the first two pass at once (bucket of 2), the rest take ~0.9 s.
    let t = write(&node, 20 * CHUNK as u64);
    assert!(t >= Duration::from_millis(850), "iops: {t:?}");

    let (mut graph, _groups) = graph_with_group(json!({"iops-total": 20, "iops-size": 4096}));
    let node = throttle_node(&mut graph, "n");
    // Each 64 KiB request counts as 16 operations: 4 requests are 64 operations, ~3 s.
    let t = write(&node, 4 * CHUNK as u64);
    assert!(t >= Duration::from_millis(2300), "iops-size: {t:?}");
}

#[test]
fn a_burst_rate_lets_a_burst_through_faster_than_the_average() {
    let (mut graph, _groups) = graph_with_group(json!({"bps-total": MIB}));
    let plain = throttle_node(&mut graph, "n");
    let steady = write(&plain, 3 * MIB);
    assert!(steady >= Duration::from_millis(2700), "steady: {steady:?}");

    let (mut graph, _groups) = graph_with_group(json!({
        "bps-total": MIB, "bps-total-max": 8 * MIB, "bps-total-max-length": 1
    }));
    let bursting = throttle_node(&mut graph, "n");
    // Up to 8 MiB may go at 8 MiB/s: 3 MiB take about 0.3 s.
    let burst = write(&bursting, 3 * MIB);
    assert!(burst >= Duration::from_millis(250), "burst: {burst:?}");
    assert!(burst < steady, "burst {burst:?}, steady {steady:?}");
}

#[test]
fn new_limits_take_effect_for_requests_already_waiting() {
    let (mut graph, groups) = graph_with_group(json!({"bps-total": 64 << 10}));
    let node = throttle_node(&mut graph, "n");
    let group = groups.get("tg").expect("group");
    // 1 MiB at 64 KiB/s would take 15 s; lifting the limit after 0.3 s ends it early.
    let writer = {
        let node = Arc::clone(&node);
        std::thread::spawn(move || write(&node, MIB))
    };
    std::thread::sleep(Duration::from_millis(300));
    group.set_config(ThrottleConfig::default());
    let t = writer.join().expect("writer");
    assert!(t < Duration::from_secs(10), "{t:?}");
}

#[test]
fn the_group_counts_its_nodes() {
    let (mut graph, groups) = graph_with_group(json!({"iops-total": 1000}));
    let group = groups.get("tg").expect("group");
    assert!(!group.in_use());
    throttle_node(&mut graph, "a");
    assert!(group.in_use());
    graph.blockdev_del("a").expect("blockdev-del");
    assert!(!group.in_use());
    let added = graph.blockdev_add_json(&json!({
        "driver": "throttle", "node-name": "x", "throttle-group": "nope",
        "file": {"driver": "null-co"}
    }));
    match added {
        Err(e) => assert_eq!(e.to_string(), "Throttle group 'nope' does not exist"),
        Ok(_) => panic!("a throttle node in an unknown group"),
    }
}
