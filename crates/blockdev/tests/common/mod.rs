//! An in-memory node graph and a stepped harness around `Blockdev` + `qmp_api::dispatch`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use block::{BitmapStore, DirtyBitmap};
use blockdev::{BlockIo, Blockdev, Extent, ImageRef, NodeBitmaps, NodeGraph};
use job::manual::{ManualClock, ManualExecutor};
use qmp_api::{BlockDeviceInfo, BlockdevDelArguments, BlockdevOptions, QmpError, SnapshotInfo};
use serde_json::{Value, json};

pub const MIB: u64 = 1 << 20;

/// A node whose data lives in memory.
pub struct MemNode {
    pub image: ImageRef,
    pub backing: Option<ImageRef>,
    pub data: Mutex<Vec<u8>>,
    /// Ranges allocated in this layer (None: everything).
    pub allocated: Option<Vec<(u64, u64)>>,
    pub fail_writes: bool,
    pub writes: Mutex<Vec<(u64, u64)>>,
    /// The node's bitmaps, marked by writes (set by [`MemGraph::node_bitmaps`]).
    pub bitmaps: Mutex<Option<Arc<MemBitmaps>>>,
    /// The next flushes that fail, and their errno.
    pub failing_flushes: Mutex<(u32, i32)>,
    pub flushes: Mutex<u32>,
}

impl MemNode {
    pub fn new(name: &str, size: u64, fill: u8) -> Arc<MemNode> {
        Arc::new(MemNode {
            image: ImageRef {
                filename: format!("/mem/{name}.qcow2"),
                format: "qcow2".into(),
            },
            backing: None,
            data: Mutex::new(vec![fill; size as usize]),
            allocated: None,
            fail_writes: false,
            writes: Mutex::new(Vec::new()),
            bitmaps: Mutex::new(None),
            failing_flushes: Mutex::new((0, 0)),
            flushes: Mutex::new(0),
        })
    }

    /// A node whose next `times` flushes fail with `errno`.
    pub fn failing_flush(name: &str, size: u64, times: u32, errno: i32) -> Arc<MemNode> {
        let node = MemNode::new(name, size, 0);
        *node.failing_flushes.lock().unwrap() = (times, errno);
        node
    }

    pub fn failing(name: &str, size: u64) -> Arc<MemNode> {
        Arc::new(MemNode {
            fail_writes: true,
            ..Arc::into_inner(MemNode::new(name, size, 0)).unwrap()
        })
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl BlockIo for MemNode {
    fn format(&self) -> &str {
        &self.image.format
    }
    fn image(&self) -> ImageRef {
        self.image.clone()
    }
    fn backing_image(&self) -> Option<ImageRef> {
        self.backing.clone()
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fail_writes {
            return Err(io::Error::from_raw_os_error(5));
        }
        if let Some(bitmaps) = self.bitmaps.lock().unwrap().as_ref() {
            for b in bitmaps.bitmaps.lock().unwrap().iter_mut() {
                b.record_write(offset, buf.len() as u64);
            }
        }
        self.writes.lock().unwrap().push((offset, buf.len() as u64));
        let mut d = self.data.lock().unwrap();
        let o = offset as usize;
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0; len as usize], offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let Some(ranges) = &self.allocated else {
            return Ok(Extent {
                len,
                allocated: true,
                zero: false,
            });
        };
        for &(start, l) in ranges {
            if offset >= start && offset < start + l {
                return Ok(Extent {
                    len: (start + l - offset).min(len),
                    allocated: true,
                    zero: false,
                });
            }
        }
        let next = ranges
            .iter()
            .map(|r| r.0)
            .filter(|&s| s > offset)
            .min()
            .unwrap_or(offset + len);
        Ok(Extent {
            len: (next - offset).min(len),
            allocated: false,
            zero: false,
        })
    }
    fn flush(&self) -> io::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        let mut failing = self.failing_flushes.lock().unwrap();
        if failing.0 > 0 {
            failing.0 -= 1;
            return Err(io::Error::from_raw_os_error(failing.1));
        }
        Ok(())
    }
}

/// A node's bitmaps, in memory: the list as data, and optionally a format's store.
pub struct MemBitmaps {
    pub node: String,
    pub size: u64,
    pub bitmaps: Mutex<Vec<DirtyBitmap>>,
    pub store: Option<Arc<dyn BitmapStore>>,
}

impl NodeBitmaps for MemBitmaps {
    fn node_name(&self) -> &str {
        &self.node
    }
    fn list(&self) -> MutexGuard<'_, Vec<DirtyBitmap>> {
        self.bitmaps.lock().unwrap()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn default_granularity(&self) -> u64 {
        65536
    }
    fn store(&self) -> Option<&dyn BitmapStore> {
        self.store.as_deref()
    }
}

type Bitmaps = BTreeMap<String, Arc<MemBitmaps>>;
type Created = Vec<(ImageRef, u64, Option<ImageRef>)>;

/// Nodes by name; created images by file name.
#[derive(Clone, Default)]
pub struct MemGraph {
    pub nodes: Arc<Mutex<BTreeMap<String, Arc<MemNode>>>>,
    pub bitmaps: Arc<Mutex<Bitmaps>>,
    pub created: Arc<Mutex<Created>>,
    pub closed: Arc<Mutex<bool>>,
    /// child → parents (names).
    pub parents: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    /// overlay → backing node.
    pub backing: Arc<Mutex<BTreeMap<String, String>>>,
    pub read_only: Arc<Mutex<Vec<String>>>,
    /// node → internal snapshot names (qcow2 nodes only).
    pub snapshots: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    /// node → its op blockers (made on first use).
    pub blockers: Arc<Mutex<BTreeMap<String, Arc<block::OpBlockers>>>>,
}

impl MemGraph {
    pub fn add(&self, name: &str, node: Arc<MemNode>) {
        self.nodes.lock().unwrap().insert(name.into(), node);
    }
    pub fn node(&self, name: &str) -> Arc<MemNode> {
        self.nodes.lock().unwrap()[name].clone()
    }
    /// The bitmaps of `node` (created empty, with no store, on first use).
    pub fn node_bitmaps(&self, node: &str) -> Arc<MemBitmaps> {
        let mem = self.nodes.lock().unwrap().get(node).cloned();
        let size = mem.as_ref().map_or(0, |n| n.size());
        let list = self
            .bitmaps
            .lock()
            .unwrap()
            .entry(node.into())
            .or_insert_with(|| {
                Arc::new(MemBitmaps {
                    node: node.into(),
                    size,
                    bitmaps: Mutex::new(Vec::new()),
                    store: None,
                })
            })
            .clone();
        if let Some(mem) = mem {
            *mem.bitmaps.lock().unwrap() = Some(list.clone());
        }
        list
    }

    /// Gives `node` a bitmap store (persistent bitmaps) and its bitmaps.
    pub fn with_store(&self, node: &str, store: Arc<dyn BitmapStore>, bitmaps: Vec<DirtyBitmap>) {
        let mem = self.nodes.lock().unwrap()[node].clone();
        let list = Arc::new(MemBitmaps {
            node: node.into(),
            size: mem.size(),
            bitmaps: Mutex::new(bitmaps),
            store: Some(store),
        });
        *mem.bitmaps.lock().unwrap() = Some(list.clone());
        self.bitmaps.lock().unwrap().insert(node.into(), list);
    }

    /// Adds bitmap `name` (granularity 64 KiB) to `node` with `dirty` ranges set.
    pub fn add_bitmap(&self, node: &str, name: &str, dirty: Vec<(u64, u64)>) {
        let n = self.node_bitmaps(node);
        let mut b = DirtyBitmap::new(Some(name.into()), 65536, n.size).unwrap();
        for (offset, len) in dirty {
            b.set_dirty(offset, len);
        }
        n.bitmaps.lock().unwrap().insert(0, b);
    }
}

impl NodeGraph for MemGraph {
    fn node(&self, name: &str) -> Option<Arc<dyn BlockIo>> {
        self.nodes
            .lock()
            .unwrap()
            .get(name)
            .map(|n| n.clone() as Arc<dyn BlockIo>)
    }
    fn bitmaps(&self, node: &str) -> Option<Arc<dyn NodeBitmaps>> {
        if !self.nodes.lock().unwrap().contains_key(node) {
            return None;
        }
        Some(self.node_bitmaps(node) as Arc<dyn NodeBitmaps>)
    }
    fn create_image(
        &mut self,
        image: &ImageRef,
        size: u64,
        backing: Option<&ImageRef>,
    ) -> Result<(), QmpError> {
        self.created
            .lock()
            .unwrap()
            .push((image.clone(), size, backing.cloned()));
        let node = Arc::new(MemNode {
            image: image.clone(),
            backing: backing.cloned(),
            ..Arc::into_inner(MemNode::new("x", size, 0)).unwrap()
        });
        self.add(&image.filename, node);
        Ok(())
    }
    fn open_image(
        &mut self,
        image: &ImageRef,
        _backing: Option<&str>,
    ) -> Result<(String, Arc<dyn BlockIo>), QmpError> {
        NodeGraph::node(self, &image.filename)
            .map(|io| (image.filename.clone(), io))
            .ok_or_else(|| QmpError::generic(format!("Could not open '{}'", image.filename)))
    }
    fn node_facts(&self, name: &str) -> Option<blockdev::NodeFacts> {
        let node = self.nodes.lock().unwrap().get(name).cloned()?;
        Some(blockdev::NodeFacts {
            monitor_owned: true,
            in_use: self
                .parents
                .lock()
                .unwrap()
                .get(name)
                .is_some_and(|p| !p.is_empty()),
            has_backing: self.backing.lock().unwrap().contains_key(name),
            supports_backing: node.image.format == "qcow2",
            read_only: self.read_only.lock().unwrap().iter().any(|n| n == name),
        })
    }
    fn op_blockers(&self, name: &str) -> Option<Arc<block::OpBlockers>> {
        if !self.nodes.lock().unwrap().contains_key(name) {
            return None;
        }
        let mut blockers = self.blockers.lock().unwrap();
        Some(blockers.entry(name.into()).or_default().clone())
    }
    fn has_parent_node(&self, name: &str) -> bool {
        self.parents
            .lock()
            .unwrap()
            .get(name)
            .is_some_and(|p| !p.is_empty())
    }
    fn open_overlay(&mut self, image: &ImageRef, node_name: &str) -> Result<(), QmpError> {
        let file = NodeGraph::node(self, &image.filename)
            .ok_or_else(|| QmpError::generic(format!("Could not open '{}'", image.filename)))?;
        let node = Arc::new(MemNode {
            image: image.clone(),
            backing: None,
            ..Arc::into_inner(MemNode::new(node_name, file.size(), 0)).unwrap()
        });
        self.add(node_name, node);
        Ok(())
    }
    fn insert_overlay(&mut self, node: &str, overlay: &str) -> Result<(), QmpError> {
        let mut parents = self.parents.lock().unwrap();
        let moved = parents.remove(node).unwrap_or_default();
        parents.insert(overlay.into(), moved);
        parents.insert(node.into(), vec![overlay.into()]);
        self.backing
            .lock()
            .unwrap()
            .insert(overlay.into(), node.into());
        Ok(())
    }
    fn remove_overlay(&mut self, node: &str, overlay: &str) {
        let mut parents = self.parents.lock().unwrap();
        let moved = parents.remove(overlay).unwrap_or_default();
        parents.insert(node.into(), moved);
        self.backing.lock().unwrap().remove(overlay);
    }
    fn make_read_only(&mut self, node: &str) {
        self.read_only.lock().unwrap().push(node.into());
    }
    fn release_if_unused(&mut self, node: &str) {
        let used = self
            .parents
            .lock()
            .unwrap()
            .get(node)
            .is_some_and(|p| !p.is_empty());
        if !used {
            self.nodes.lock().unwrap().remove(node);
            self.backing.lock().unwrap().remove(node);
            for p in self.parents.lock().unwrap().values_mut() {
                p.retain(|n| n != node);
            }
        }
    }
    fn internal_snapshots(&self, node: &str) -> Option<Vec<SnapshotInfo>> {
        let n = self.nodes.lock().unwrap().get(node).cloned()?;
        (n.image.format == "qcow2").then(|| {
            let names = self.snapshots.lock().unwrap().get(node).cloned();
            names
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, name)| SnapshotInfo {
                    id: (i + 1).to_string(),
                    name,
                    vm_state_size: 0,
                    date_sec: 0,
                    date_nsec: 0,
                    vm_clock_sec: 0,
                    vm_clock_nsec: 0,
                    icount: None,
                })
                .collect()
        })
    }
    fn create_internal_snapshot(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        self.snapshots
            .lock()
            .unwrap()
            .entry(node.into())
            .or_default()
            .push(name.into());
        Ok(())
    }
    fn delete_internal_snapshot(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        if let Some(list) = self.snapshots.lock().unwrap().get_mut(node) {
            list.retain(|n| n != name);
        }
        Ok(())
    }
    fn blockdev_add(&mut self, _options: BlockdevOptions) -> Result<(), QmpError> {
        Err(QmpError::generic("not in memory"))
    }
    fn blockdev_del(&mut self, args: BlockdevDelArguments) -> Result<(), QmpError> {
        self.nodes.lock().unwrap().remove(&args.node_name);
        Ok(())
    }
    fn query_named_block_nodes(&self, _flat: bool) -> Vec<BlockDeviceInfo> {
        Vec::new()
    }
    fn close_all(&mut self) -> io::Result<()> {
        *self.closed.lock().unwrap() = true;
        Ok(())
    }
}

/// Blockdev on the manual executor and clock, events recorded compactly:
/// `j1 created` for `JOB_STATUS_CHANGE`, `EVENT_NAME {data}` for the others.
pub struct Harness {
    pub bd: Blockdev,
    pub exec: ManualExecutor,
    pub clock: ManualClock,
    pub graph: MemGraph,
    events: Arc<Mutex<Vec<String>>>,
}

impl Harness {
    pub fn new() -> Harness {
        let graph = MemGraph::default();
        Harness::over(Box::new(graph.clone()), graph)
    }

    /// Over the block crate's graph (file, raw, null-co, blkdebug drivers).
    pub fn block_layer() -> Harness {
        let layer = blockdev::BlockLayer::new(block::BlockGraph::new());
        Harness::over(Box::new(layer), MemGraph::default())
    }

    pub fn over(node_graph: Box<dyn NodeGraph>, graph: MemGraph) -> Harness {
        let exec = ManualExecutor::new();
        let clock = ManualClock::new();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let bd = Blockdev::new(
            Arc::new(move |e: qmp_api::Event| {
                let line = match &e {
                    qmp_api::Event::JobStatusChange(d) => format!("{} {}", d.id, d.status),
                    other => format!("{} {}", other.name(), other.data().unwrap_or(Value::Null)),
                };
                sink.lock().unwrap().push(line);
            }),
            Arc::new(exec.clone()),
            Arc::new(clock.clone()),
        )
        .with_graph(node_graph);
        Harness {
            bd,
            exec,
            clock,
            graph,
            events,
        }
    }

    /// Two 4 MiB nodes `src` (0xab) and `tgt` (zero).
    pub fn with_src_tgt() -> Harness {
        let h = Harness::new();
        h.graph.add("src", MemNode::new("src", 4 * MIB, 0xab));
        h.graph.add("tgt", MemNode::new("tgt", 4 * MIB, 0));
        h
    }

    pub fn cmd(&mut self, name: &str, args: Value) -> Result<Value, QmpError> {
        let map = match args {
            Value::Object(m) => Some(m),
            _ => None,
        };
        qmp_api::dispatch(&mut self.bd, name, map)
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        match self.cmd(name, args) {
            Ok(v) => v,
            Err(e) => panic!("{name} failed: {e:?}"),
        }
    }

    /// Runs a command that must fail; returns `Class: desc`.
    pub fn err(&mut self, name: &str, args: Value) -> String {
        match self.cmd(name, args) {
            Ok(v) => panic!("{name} succeeded: {v}"),
            Err(e) => format!("{}: {}", e.class, e.desc),
        }
    }

    pub fn take_events(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// Runs tasks, advancing the clock, until nothing is left to do.
    pub fn settle(&self) {
        loop {
            self.exec.run_until_stalled();
            if !self.clock.advance_to_next_deadline() {
                break;
            }
        }
        self.exec.run_until_stalled();
    }

    /// Runs tasks without moving the clock.
    pub fn step(&self) {
        self.exec.run_until_stalled();
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.exec.run_until_stalled();
    }
}

pub fn backup(job: &str, device: &str, target: &str) -> Value {
    json!({"job-id": job, "device": device, "target": target, "sync": "full"})
}

pub fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    base
}

pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `BlockdevOptions` from `blockdev-add` arguments (QEMU's input visitor).
pub fn options(arguments: Value) -> BlockdevOptions {
    qmp_api::input::from_value(&arguments).expect("valid blockdev-add arguments")
}
