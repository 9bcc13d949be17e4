//! Dirty-bitmap commands and transaction actions: checks, error texts (as qemu-storage-daemon
//! 10.0.2 words them), and abort restoring state.

use std::sync::{Arc, Mutex};

use block::bitmap_cmd::*;
use block::{
    BitmapStore, BlockDriver, BlockGraph, BlockNode, BlockResult, ChildKind, DirtyBitmap,
    DriverInfo, DriverSpec, OpenContext,
};
use serde_json::json;

/// A format with persistent-bitmap storage, standing in for qcow2: it loads `stored`
/// (`p` persistent, `ro` read-only, `bad` inconsistent) and records what is stored/removed.
struct FakeFormat {
    file: Arc<BlockNode>,
}

thread_local! {
    /// What the fake format was asked to store/remove (tests run each on their own thread).
    static LOG: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn log() -> Vec<String> {
    LOG.with(|l| l.borrow().clone())
}

impl BitmapStore for FakeFormat {
    fn load_bitmaps(&self) -> BlockResult<Vec<DirtyBitmap>> {
        let size = self.file.size()?;
        let mut out = Vec::new();
        for (name, ro, bad) in [
            ("p", false, false),
            ("ro", true, false),
            ("bad", false, true),
        ] {
            let mut b = DirtyBitmap::new(Some(name.into()), 65536, size)?;
            b.set_persistent(true);
            b.set_readonly(ro);
            b.set_inconsistent(bad);
            b.set_dirty(0, 65536);
            out.push(b);
        }
        Ok(out)
    }
    fn can_store_new_bitmap(&self, _name: &str, _granularity: u64) -> BlockResult<()> {
        Ok(())
    }
    fn remove_persistent_bitmap(&self, name: &str) -> BlockResult<()> {
        LOG.with(|l| l.borrow_mut().push(format!("remove {name}")));
        Ok(())
    }
    fn store_bitmaps(&self, bitmaps: &[DirtyBitmap]) -> BlockResult<()> {
        let names: Vec<&str> = bitmaps.iter().filter_map(|b| b.name()).collect();
        LOG.with(|l| l.borrow_mut().push(format!("store {}", names.join(","))));
        Ok(())
    }
}

impl BlockDriver for FakeFormat {
    fn size(&self) -> BlockResult<u64> {
        self.file.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.file.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.file.write_at(offset, buf)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn info(&self) -> DriverInfo {
        DriverInfo {
            cluster_size: Some(65536),
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }
    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        Some(self)
    }
}

fn open_fake(ctx: &mut OpenContext<'_>) -> BlockResult<Box<dyn BlockDriver>> {
    let file = ctx.open_child("file", ChildKind::Metadata, true)?.unwrap();
    Ok(Box::new(FakeFormat { file }))
}

fn graph() -> BlockGraph {
    let mut g = BlockGraph::new();
    g.register_driver(DriverSpec {
        name: "fakefmt",
        is_protocol: false,
        open: open_fake,
    });
    g.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": 4 << 20}))
        .unwrap();
    g.blockdev_add(&json!({"driver": "fakefmt", "node-name": "q",
        "file": {"driver": "null-co", "size": 4 << 20}}))
        .unwrap();
    g
}

fn err<T>(r: BlockResult<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.desc().to_string(),
    }
}

fn count(g: &BlockGraph, node: &str, name: &str) -> u64 {
    let n = g.find(node).unwrap();
    with_bitmap(&n, name, |b| Ok(b.count())).unwrap()
}

fn dirty(g: &BlockGraph, node: &str, name: &str, offset: u64, len: u64) {
    let n = g.find(node).unwrap();
    with_bitmap(&n, name, |b| {
        b.set_dirty(offset, len);
        Ok(())
    })
    .unwrap();
}

#[test]
fn add_twice_is_refused() {
    let g = graph();
    bitmap_add(&g, "n", "b0", None, false, false).unwrap();
    assert_eq!(
        err(bitmap_add(&g, "n", "b0", None, false, false)),
        "Bitmap already exists: b0"
    );
}

#[test]
fn add_with_empty_name_is_refused() {
    let g = graph();
    assert_eq!(
        err(bitmap_add(&g, "n", "", None, false, false)),
        "Bitmap name cannot be empty"
    );
}

#[test]
fn add_with_a_1024_byte_name_is_refused() {
    let g = graph();
    let long = "x".repeat(1024);
    assert_eq!(
        err(bitmap_add(&g, "n", &long, None, false, false)),
        format!("Bitmap name too long: {long}")
    );
    assert!(bitmap_add(&g, "n", &"x".repeat(1023), None, false, false).is_ok());
}

#[test]
fn add_checks_granularity() {
    let g = graph();
    for bad in [0, 256, 1000] {
        assert_eq!(
            err(bitmap_add(&g, "n", "g", Some(bad), false, false)),
            "Granularity must be power of 2 and at least 512"
        );
    }
    bitmap_add(&g, "n", "g512", Some(512), false, false).unwrap();
    bitmap_add(&g, "n", "g2g", Some(1 << 31), false, false).unwrap();
}

#[test]
fn add_on_unknown_node_is_refused() {
    let g = graph();
    assert_eq!(
        err(bitmap_add(&g, "nonode", "b", None, false, false)),
        "Cannot find device='nonode' nor node-name='nonode'"
    );
}

#[test]
fn persistent_bitmap_needs_a_format_that_stores_them() {
    let g = graph();
    assert_eq!(
        err(bitmap_add(&g, "n", "p1", None, true, false)),
        "Can't store persistent bitmaps to n: Operation not supported"
    );
    bitmap_add(&g, "q", "p1", None, true, false).unwrap();
}

#[test]
fn default_granularity_is_64k() {
    let g = graph();
    bitmap_add(&g, "n", "b", None, false, false).unwrap();
    let q = g.query_named_block_nodes(true);
    let n = q
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "n")
        .unwrap();
    assert_eq!(
        n["dirty-bitmaps"],
        json!([{"name": "b", "recording": true, "persistent": false, "busy": false,
                "granularity": 65536, "count": 0}])
    );
}

#[test]
fn disabled_bitmap_does_not_record() {
    let g = graph();
    bitmap_add(&g, "n", "b", None, false, true).unwrap();
    g.find("n").unwrap().write_at(0, &[1; 512]).unwrap();
    assert_eq!(count(&g, "n", "b"), 0);
}

#[test]
fn commands_on_missing_bitmap_or_node_say_so() {
    let g = graph();
    assert_eq!(
        err(bitmap_remove(&g, "n", "nob")),
        "Dirty bitmap 'nob' not found"
    );
    assert_eq!(
        err(bitmap_remove(&g, "nonode", "nob")),
        "Node 'nonode' not found"
    );
    assert_eq!(
        err(bitmap_clear(&g, "n", "nob")),
        "Dirty bitmap 'nob' not found"
    );
    assert_eq!(
        err(bitmap_set_enabled(&g, "n", "nob", true)),
        "Dirty bitmap 'nob' not found"
    );
    assert_eq!(
        err(bitmap_merge(
            &g,
            "n",
            "nob",
            &[MergeSource::Local("x".into())]
        )),
        "Dirty bitmap 'nob' not found"
    );
}

#[test]
fn enable_and_disable_are_idempotent() {
    let g = graph();
    bitmap_add(&g, "n", "b", None, false, false).unwrap();
    assert!(bitmap_set_enabled(&g, "n", "b", false).unwrap());
    assert!(!bitmap_set_enabled(&g, "n", "b", false).unwrap());
    assert!(!bitmap_set_enabled(&g, "n", "b", true).unwrap());
    assert!(bitmap_set_enabled(&g, "n", "b", true).unwrap());
}

#[test]
fn busy_bitmap_refuses_every_command() {
    let g = graph();
    bitmap_add(&g, "n", "b", None, false, false).unwrap();
    bitmap_add(&g, "n", "other", None, false, false).unwrap();
    freeze_for_job(&g.find("n").unwrap(), "b").unwrap();
    let busy = "Bitmap 'b' is currently in use by another operation and cannot be used";
    assert_eq!(err(bitmap_remove(&g, "n", "b")), busy);
    assert_eq!(err(bitmap_clear(&g, "n", "b")), busy);
    assert_eq!(err(bitmap_set_enabled(&g, "n", "b", true)), busy);
    assert_eq!(err(bitmap_set_enabled(&g, "n", "b", false)), busy);
    let local = |s: &str| vec![MergeSource::Local(s.into())];
    assert_eq!(err(bitmap_merge(&g, "n", "b", &local("other"))), busy);
    assert_eq!(err(bitmap_merge(&g, "n", "other", &local("b"))), busy);
    assert_eq!(err(freeze_for_job(&g.find("n").unwrap(), "b")), busy);
}

#[test]
fn readonly_bitmap_can_be_toggled_and_merged_from_but_not_modified() {
    let g = graph();
    let ro = "Bitmap 'ro' is readonly and cannot be modified";
    assert_eq!(err(bitmap_clear(&g, "q", "ro")), ro);
    assert_eq!(err(bitmap_remove(&g, "q", "ro")), ro);
    assert_eq!(
        err(bitmap_merge(
            &g,
            "q",
            "ro",
            &[MergeSource::Local("p".into())]
        )),
        ro
    );
    bitmap_set_enabled(&g, "q", "ro", false).unwrap();
    bitmap_set_enabled(&g, "q", "ro", true).unwrap();
    bitmap_merge(&g, "q", "p", &[MergeSource::Local("ro".into())]).unwrap();
}

#[test]
fn inconsistent_bitmap_can_only_be_removed() {
    let g = graph();
    let bad = "Bitmap 'bad' is inconsistent and cannot be used";
    assert_eq!(err(bitmap_clear(&g, "q", "bad")), bad);
    assert_eq!(err(bitmap_set_enabled(&g, "q", "bad", true)), bad);
    assert_eq!(
        err(bitmap_merge(
            &g,
            "q",
            "p",
            &[MergeSource::Local("bad".into())]
        )),
        bad
    );
    bitmap_remove(&g, "q", "bad").unwrap();
}

#[test]
fn removing_a_persistent_bitmap_deletes_the_stored_copy() {
    let mut g = graph();
    bitmap_remove(&g, "q", "p").unwrap();
    g.blockdev_del("q").unwrap();
    assert_eq!(log(), ["remove p", "store ro,bad"]);
}

#[test]
fn persistent_bitmaps_are_stored_at_close_newest_first() {
    let mut g = graph();
    bitmap_add(&g, "q", "p1", None, true, false).unwrap();
    bitmap_add(&g, "q", "temp", None, false, false).unwrap();
    g.close_all().unwrap();
    assert_eq!(log(), ["store p1,p,ro,bad"]);
}

#[test]
fn aborted_removal_keeps_the_bitmap_stored() {
    let mut g = graph();
    let e = actions_then_abort(&mut g, vec![Box::new(BitmapRemoveAction::new("q", "p"))]);
    assert_eq!(e, "Transaction aborted using Abort action");
    g.close_all().unwrap();
    assert_eq!(log(), ["remove p", "store p,ro,bad"]);
}

#[test]
fn clear_empties_the_bitmap() {
    let g = graph();
    bitmap_add(&g, "n", "b", None, false, false).unwrap();
    dirty(&g, "n", "b", 0, 1 << 20);
    bitmap_clear(&g, "n", "b").unwrap();
    assert_eq!(count(&g, "n", "b"), 0);
}

#[test]
fn merge_accepts_local_and_external_sources_of_other_granularity() {
    let g = graph();
    bitmap_add(&g, "n", "t", Some(512), false, false).unwrap();
    bitmap_add(&g, "n", "s", None, false, false).unwrap();
    dirty(&g, "n", "s", 65536, 1);
    bitmap_merge(
        &g,
        "n",
        "t",
        &[
            MergeSource::Local("s".into()),
            MergeSource::External {
                node: "q".into(),
                name: "p".into(),
            },
        ],
    )
    .unwrap();
    assert_eq!(count(&g, "n", "t"), 2 * 65536);
}

#[test]
fn merge_from_unknown_external_node_names_it() {
    let g = graph();
    bitmap_add(&g, "n", "t", None, false, false).unwrap();
    let src = [MergeSource::External {
        node: "nonode".into(),
        name: "x".into(),
    }];
    assert_eq!(
        err(bitmap_merge(&g, "n", "t", &src)),
        "Node 'nonode' not found"
    );
}

#[test]
fn failed_merge_leaves_target_unchanged() {
    let g = graph();
    bitmap_add(&g, "n", "t", None, false, false).unwrap();
    bitmap_add(&g, "n", "s", None, false, false).unwrap();
    dirty(&g, "n", "s", 0, 1);
    let src = [
        MergeSource::Local("s".into()),
        MergeSource::Local("nob".into()),
    ];
    assert_eq!(
        err(bitmap_merge(&g, "n", "t", &src)),
        "Dirty bitmap 'nob' not found"
    );
    assert_eq!(count(&g, "n", "t"), 0);
}

#[test]
fn merge_into_itself_is_allowed() {
    let g = graph();
    bitmap_add(&g, "n", "b", None, false, false).unwrap();
    dirty(&g, "n", "b", 0, 1);
    bitmap_merge(&g, "n", "b", &[MergeSource::Local("b".into())]).unwrap();
    assert_eq!(count(&g, "n", "b"), 65536);
}

#[test]
fn frozen_bitmap_shows_anonymous_successor_first_in_query() {
    let g = graph();
    bitmap_add(&g, "n", "b", None, false, false).unwrap();
    dirty(&g, "n", "b", 0, 1);
    freeze_for_job(&g.find("n").unwrap(), "b").unwrap();
    let q = g.query_named_block_nodes(true);
    let n = q
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "n")
        .unwrap();
    assert_eq!(
        n["dirty-bitmaps"],
        json!([{"recording": true, "persistent": false, "busy": false, "granularity": 65536, "count": 0},
               {"name": "b", "recording": true, "persistent": false, "busy": true, "granularity": 65536, "count": 65536}])
    );
}

#[test]
fn job_success_keeps_writes_made_during_the_job() {
    let g = graph();
    let n = g.find("n").unwrap();
    bitmap_add(&g, "n", "b", None, false, false).unwrap();
    n.write_at(0, &[1; 512]).unwrap();
    freeze_for_job(&n, "b").unwrap();
    n.write_at(1 << 20, &[1; 512]).unwrap();
    thaw_after_job(&n, "b", true).unwrap();
    let ranges = with_bitmap(&n, "b", |b| {
        Ok(b.dirty_ranges(0, u64::MAX).collect::<Vec<_>>())
    });
    assert_eq!(ranges.unwrap(), vec![(1 << 20, 65536)]);
}

#[test]
fn job_failure_merges_writes_back() {
    let g = graph();
    let n = g.find("n").unwrap();
    bitmap_add(&g, "n", "b", None, false, false).unwrap();
    n.write_at(0, &[1; 512]).unwrap();
    freeze_for_job(&n, "b").unwrap();
    n.write_at(1 << 20, &[1; 512]).unwrap();
    thaw_after_job(&n, "b", false).unwrap();
    assert_eq!(count(&g, "n", "b"), 2 * 65536);
}

fn actions_then_abort(
    g: &mut BlockGraph,
    mut actions: Vec<Box<dyn TransactionAction<BlockGraph>>>,
) -> String {
    actions.push(Box::new(AbortAction));
    err(run_transaction(g, actions))
}

#[test]
fn aborted_transaction_leaves_every_bitmap_as_it_was() {
    let mut g = graph();
    bitmap_add(&g, "n", "c", None, false, false).unwrap();
    bitmap_add(&g, "n", "e", None, false, true).unwrap();
    bitmap_add(&g, "n", "d", None, false, false).unwrap();
    bitmap_add(&g, "n", "m", None, false, false).unwrap();
    bitmap_add(&g, "n", "r", None, false, false).unwrap();
    dirty(&g, "n", "c", 0, 1);
    dirty(&g, "n", "d", 65536, 1);
    let before = g.query_named_block_nodes(true);
    let e = actions_then_abort(
        &mut g,
        vec![
            Box::new(BitmapAddAction::new("n", "new", None, false, false)),
            Box::new(BitmapClearAction::new("n", "c")),
            Box::new(BitmapEnableAction::new("n", "e", true)),
            Box::new(BitmapEnableAction::new("n", "d", false)),
            Box::new(BitmapMergeAction::new(
                "n",
                "m",
                vec![MergeSource::Local("d".into())],
            )),
            Box::new(BitmapRemoveAction::new("n", "r")),
        ],
    );
    assert_eq!(e, "Transaction aborted using Abort action");
    assert_eq!(g.query_named_block_nodes(true), before);
}

#[test]
fn committed_transaction_applies_every_action() {
    let mut g = graph();
    bitmap_add(&g, "n", "c", None, false, false).unwrap();
    bitmap_add(&g, "n", "r", None, false, false).unwrap();
    dirty(&g, "n", "c", 0, 1);
    let actions: Vec<Box<dyn TransactionAction<BlockGraph>>> = vec![
        Box::new(BitmapAddAction::new("n", "new", None, false, false)),
        Box::new(BitmapClearAction::new("n", "c")),
        Box::new(BitmapRemoveAction::new("n", "r")),
    ];
    run_transaction(&mut g, actions).unwrap();
    assert_eq!(count(&g, "n", "new"), 0);
    assert_eq!(count(&g, "n", "c"), 0);
    assert_eq!(
        err(bitmap_clear(&g, "n", "r")),
        "Dirty bitmap 'r' not found"
    );
}

#[test]
fn bitmap_removed_in_pending_transaction_is_busy() {
    let mut g = graph();
    bitmap_add(&g, "n", "r", None, false, false).unwrap();
    let actions: Vec<Box<dyn TransactionAction<BlockGraph>>> = vec![
        Box::new(BitmapRemoveAction::new("n", "r")),
        Box::new(BitmapClearAction::new("n", "r")),
    ];
    assert_eq!(
        err(run_transaction(&mut g, actions)),
        "Bitmap 'r' is currently in use by another operation and cannot be used"
    );
    bitmap_clear(&g, "n", "r").unwrap();
}

#[test]
fn failing_add_in_transaction_does_not_delete_the_existing_bitmap() {
    let mut g = graph();
    bitmap_add(&g, "n", "b", None, false, false).unwrap();
    let e = actions_then_abort(
        &mut g,
        vec![Box::new(BitmapAddAction::new("n", "b", None, false, false))],
    );
    assert_eq!(e, "Bitmap already exists: b");
    assert_eq!(count(&g, "n", "b"), 0);
}

#[test]
fn empty_transaction_succeeds() {
    let mut g = graph();
    let actions: Vec<Box<dyn TransactionAction<BlockGraph>>> = vec![];
    run_transaction(&mut g, actions).unwrap();
}

#[test]
fn transaction_runs_commits_and_cleans_in_reverse_order() {
    struct Probe(&'static str, Arc<Mutex<Vec<String>>>, bool);
    impl TransactionAction<BlockGraph> for Probe {
        fn prepare(&mut self, _: &mut BlockGraph) -> BlockResult<()> {
            self.1.lock().unwrap().push(format!("prepare {}", self.0));
            if self.2 {
                Err(block::BlockError::new("no"))
            } else {
                Ok(())
            }
        }
        fn commit(&mut self, _: &mut BlockGraph) {
            self.1.lock().unwrap().push(format!("commit {}", self.0));
        }
        fn abort(&mut self, _: &mut BlockGraph) {
            self.1.lock().unwrap().push(format!("abort {}", self.0));
        }
        fn clean(&mut self, _: &mut BlockGraph) {
            self.1.lock().unwrap().push(format!("clean {}", self.0));
        }
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut g = BlockGraph::new();
    let actions: Vec<Box<dyn TransactionAction<BlockGraph>>> = vec![
        Box::new(Probe("a", log.clone(), false)),
        Box::new(Probe("b", log.clone(), true)),
        Box::new(Probe("c", log.clone(), false)),
    ];
    assert!(run_transaction(&mut g, actions).is_err());
    assert_eq!(
        *log.lock().unwrap(),
        [
            "prepare a",
            "prepare b",
            "abort b",
            "abort a",
            "clean b",
            "clean a"
        ]
    );
}
