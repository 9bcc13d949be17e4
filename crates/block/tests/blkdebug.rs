//! blkdebug error injection: events, I/O types, once, sector, and a format above it.

mod common;
use common::AddJson;

use block::{BlockGraph, BlockNode};
use serde_json::{Value, json};
use std::sync::Arc;

fn blkdebug(rules: Value) -> (BlockGraph, Arc<BlockNode>) {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(
            &json!({"driver": "blkdebug", "node-name": "dbg", "inject-error": rules,
            "image": {"driver": "null-co", "size": 1 << 20}}),
        )
        .unwrap();
    (g, n)
}

#[test]
fn pwritev_rule_fails_every_write_with_its_errno() {
    let (_g, n) = blkdebug(json!([{"event": "pwritev", "errno": 5}]));
    for _ in 0..2 {
        let e = n.write_at(0, &[0; 512]).unwrap_err();
        assert_eq!(e.errno(), Some(5));
        assert_eq!(e.desc(), "Input/output error");
    }
}

#[test]
fn pwritev_rule_does_not_fail_reads_before_a_write() {
    let (_g, n) = blkdebug(json!([{"event": "pwritev"}]));
    let mut buf = [0; 512];
    assert!(n.read_at(0, &mut buf).is_ok());
}

#[test]
fn active_rule_also_fails_following_reads_and_flushes() {
    let (_g, n) = blkdebug(json!([{"event": "pwritev", "errno": 28}]));
    assert!(n.write_at(0, &[0; 512]).is_err());
    let mut buf = [0; 512];
    assert_eq!(n.read_at(0, &mut buf).unwrap_err().errno(), Some(28));
    assert_eq!(n.flush().unwrap_err().errno(), Some(28));
}

#[test]
fn iotype_restricts_the_rule() {
    let (_g, n) = blkdebug(json!([{"event": "pwritev", "iotype": "flush"}]));
    assert!(n.write_at(0, &[0; 512]).is_ok());
    assert!(n.flush().is_err());
}

#[test]
fn once_rule_fails_a_single_request() {
    let (_g, n) = blkdebug(json!([{"event": "pwritev", "once": true}]));
    assert!(n.write_at(0, &[0; 512]).is_err());
    assert!(n.write_at(0, &[0; 512]).is_ok());
}

#[test]
fn sector_rule_fails_only_requests_covering_it() {
    let (_g, n) = blkdebug(json!([{"event": "pwritev", "sector": 8}]));
    assert!(n.write_at(0, &[0; 4096]).is_ok());
    assert!(n.write_at(4096, &[0; 512]).is_err());
}

#[test]
fn write_aio_fires_when_raw_writes_to_its_file() {
    let mut g = BlockGraph::new();
    let r = g
        .blockdev_add_json(&json!({"driver": "raw", "node-name": "r", "file": {
            "driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 5}],
            "image": {"driver": "null-co", "size": 1 << 20}}}))
        .unwrap();
    let mut buf = [0; 512];
    assert!(r.read_at(0, &mut buf).is_ok());
    assert_eq!(r.write_at(0, &[0; 512]).unwrap_err().errno(), Some(5));
}

#[test]
fn read_aio_fires_when_raw_reads_from_its_file() {
    let mut g = BlockGraph::new();
    let r = g
        .blockdev_add_json(&json!({"driver": "raw", "node-name": "r", "file": {
            "driver": "blkdebug", "inject-error": [{"event": "read_aio", "iotype": "read"}],
            "image": {"driver": "null-co", "size": 1 << 20}}}))
        .unwrap();
    assert!(r.write_at(0, &[0; 512]).is_ok());
    let mut buf = [0; 512];
    assert!(r.read_at(0, &mut buf).is_err());
}

#[test]
fn unknown_event_is_refused() {
    let mut g = BlockGraph::new();
    let e = g
        .blockdev_add_json(&json!({"driver": "blkdebug", "node-name": "d",
            "inject-error": [{"event": "preadv"}], "image": {"driver": "null-co"}}))
        .unwrap_err();
    assert_eq!(e.desc(), "Parameter 'event' does not accept value 'preadv'");
}

#[test]
fn image_child_is_required() {
    let mut g = BlockGraph::new();
    let e = g
        .blockdev_add_json(&json!({"driver": "blkdebug", "node-name": "d"}))
        .unwrap_err();
    assert_eq!(e.desc(), "Parameter 'image' is missing");
}
