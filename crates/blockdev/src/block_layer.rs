//! [`NodeGraph`] over the block crate's [`BlockGraph`]: nodes, their I/O, bitmaps, images.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use block::copy::{BlockCopy, CopyBuffers};
use block::graph::{image_options, node_filename};
use block::{BitmapStore, BlockError, BlockGraph, BlockNode, DirtyBitmap, Perm};
use qmp_api::{
    BlockDeviceInfo, BlockdevCreateOptions, BlockdevCreateOptionsBranch, BlockdevDelArguments,
    BlockdevOptions, BlockdevOptionsBranch, BlockdevRef, BlockdevRefOrNull, QmpError, SnapshotInfo,
};

use crate::node::{
    BackingName, BlockIo, ChainEditor, ChainLayer, CreateWork, Extent, FilterKind, FilterWrites,
    GraphEdge, GraphNode, ImageRef, MirrorNodes, MirrorTargetImage, NodeBitmaps, NodeFacts,
    NodeGraph, WriteTracker,
};

/// A block error as QMP reports it.
pub(crate) fn qmp_error(e: BlockError) -> QmpError {
    QmpError::generic(e.desc())
}

pub(crate) fn io_error(e: BlockError) -> io::Error {
    match e.errno() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::other(e.desc().to_string()),
    }
}

/// The daemon's node graph. The graph is shared with the jobs that change it when they end
/// (see [`ChainEditor`]); every use locks it briefly, never across I/O.
pub struct BlockLayer {
    graph: SharedGraph,
}

impl BlockLayer {
    /// Over `graph` (with the drivers the daemon registered, e.g. qcow2).
    pub fn new(graph: BlockGraph) -> Self {
        BlockLayer {
            graph: SharedGraph(Arc::new(Mutex::new(graph))),
        }
    }

    fn graph(&self) -> MutexGuard<'_, BlockGraph> {
        self.graph.lock()
    }
}

/// A node's I/O.
pub struct NodeIo(pub Arc<BlockNode>);

impl BlockIo for NodeIo {
    fn format(&self) -> &str {
        self.0.driver_name()
    }

    fn block_node(&self) -> Option<&Arc<BlockNode>> {
        Some(&self.0)
    }

    fn image(&self) -> ImageRef {
        ImageRef {
            filename: node_filename(&self.0),
            format: self.0.driver_name().to_string(),
        }
    }

    fn backing_image(&self) -> Option<ImageRef> {
        self.0.child("backing").map(|b| ImageRef {
            filename: node_filename(&b),
            format: b.driver_name().to_string(),
        })
    }

    fn backing_node(&self) -> Option<String> {
        self.0.child("backing").map(|b| b.name().to_string())
    }

    fn size(&self) -> u64 {
        self.0.size().unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(offset, buf).map_err(io_error)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(offset, buf).map_err(io_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes_at(offset, len).map_err(io_error)
    }

    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes_unmap_at(offset, len).map_err(io_error)
    }

    fn discard_unmaps(&self) -> bool {
        self.0.discard_unmaps()
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes_fast_at(offset, len).map_err(io_error)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        self.0.extent(offset, len).map_err(io_error)
    }

    fn read_only(&self) -> bool {
        self.0.is_read_only()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.0.driver().info().cluster_size
    }

    fn supports_compressed_writes(&self) -> bool {
        self.0.supports_compressed_writes()
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_compressed_at(offset, buf).map_err(io_error)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard_at(offset, len).map_err(io_error)
    }

    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(io_error)
    }

    fn chain_status(&self, offset: u64, len: u64) -> Option<io::Result<block::ChainStatus>> {
        Some(self.0.chain_status(offset, len).map_err(io_error))
    }

    fn add_write_notifier(
        &self,
        hook: Arc<dyn block::BeforeWrite>,
    ) -> Option<block::NotifierHandle> {
        Some(self.0.add_write_notifier(hook))
    }

    fn allocated_above(
        &self,
        bottom: Option<&str>,
        offset: u64,
        len: u64,
    ) -> io::Result<(bool, u64)> {
        self.0
            .allocated_above(bottom, offset, len)
            .map_err(io_error)
    }

    fn copy_on_read(
        &self,
        offset: u64,
        len: u64,
        bottom: Option<&str>,
        buf: &mut [u8],
    ) -> io::Result<(u64, bool)> {
        self.0
            .copy_on_read(offset, len, bottom, buf)
            .map_err(io_error)
    }

    fn truncate(&self, size: u64) -> io::Result<()> {
        self.0.truncate(size).map_err(io_error)
    }
}

/// The graph, shared by the command layer and the jobs that change it.
#[derive(Clone)]
struct SharedGraph(Arc<Mutex<BlockGraph>>);

impl SharedGraph {
    fn lock(&self) -> MutexGuard<'_, BlockGraph> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ChainEditor for SharedGraph {
    fn insert_filter(
        &self,
        node: &str,
        kind: FilterKind,
        name: Option<&str>,
    ) -> Result<String, QmpError> {
        let mut g = self.lock();
        let below = g.lookup(node).map_err(qmp_error)?;
        g.insert_job_filter(&below, kind, name)
            .map(|f| f.name().to_string())
            .map_err(qmp_error)
    }

    fn remove_filter(&self, filter: &str) -> Result<(), QmpError> {
        let mut g = self.lock();
        match g.find(filter) {
            Some(f) => g.remove_filter(&f).map_err(qmp_error),
            None => Ok(()),
        }
    }

    fn set_read_only(&self, node: &str, read_only: bool) -> Result<(), QmpError> {
        let n = self.lock().lookup(node).map_err(qmp_error)?;
        if read_only {
            n.reopen_read_only().map_err(qmp_error)
        } else {
            n.reopen_read_write().map_err(qmp_error)
        }
    }

    fn layer_below(&self, node: &str) -> Option<String> {
        let n = self.lock().find(node)?;
        let below = match n.driver().filtered_child() {
            Some(role) => n.child(role),
            None => n.child("backing"),
        };
        below.map(|b| b.name().to_string())
    }

    fn change_backing(
        &self,
        overlay: &str,
        base: Option<&str>,
        name: &BackingName,
    ) -> Result<(), QmpError> {
        let mut g = self.lock();
        let o = g.lookup(overlay).map_err(qmp_error)?;
        let b = base.map(|b| g.lookup(b)).transpose().map_err(qmp_error)?;
        g.change_backing(&o, b.as_ref(), name).map_err(qmp_error)
    }

    fn drop_intermediate(&self, top: &str, base: &str, name: &BackingName) -> Result<(), QmpError> {
        let mut g = self.lock();
        let t = g.lookup(top).map_err(qmp_error)?;
        let b = g.lookup(base).map_err(qmp_error)?;
        g.drop_intermediate(&t, &b, name).map_err(qmp_error)
    }
}

/// A node's bitmaps.
pub(crate) struct NodeBitmapList(pub(crate) Arc<BlockNode>);

impl NodeBitmaps for NodeBitmapList {
    fn node_name(&self) -> &str {
        self.0.name()
    }

    fn list(&self) -> MutexGuard<'_, Vec<DirtyBitmap>> {
        self.0.bitmaps()
    }

    fn size(&self) -> u64 {
        self.0.size().unwrap_or(0)
    }

    fn read_only(&self) -> bool {
        self.0.is_read_only()
    }

    fn default_granularity(&self) -> u64 {
        self.0.default_bitmap_granularity()
    }

    fn store(&self) -> Option<&dyn BitmapStore> {
        self.0.driver().bitmap_store()
    }
}

/// The options of node `name` opening `image` read-write, with `backing` (for formats that
/// have one).
fn writable_image(
    image: &ImageRef,
    name: &str,
    backing: BlockdevRefOrNull,
) -> Result<BlockdevOptions, QmpError> {
    let mut options = image_options(&image.format, &image.filename).map_err(qmp_error)?;
    options.node_name = Some(name.to_string());
    options.read_only = None;
    if let BlockdevOptionsBranch::Qcow2(qcow2) = &mut options.branch {
        qcow2.backing = Some(Box::new(backing));
    }
    Ok(options)
}

fn create_file_error(image: &ImageRef, e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(format!("Could not create '{}': {e}", image.filename))
}

impl NodeGraph for BlockLayer {
    fn node(&self, name: &str) -> Option<Arc<dyn BlockIo>> {
        self.graph()
            .find(name)
            .map(|n| Arc::new(NodeIo(n)) as Arc<dyn BlockIo>)
    }

    fn bitmaps(&self, name: &str) -> Option<Arc<dyn NodeBitmaps>> {
        let n = self.graph().find(name)?;
        Some(Arc::new(NodeBitmapList(n)))
    }

    fn chain_bitmaps(&self, name: &str) -> Vec<Arc<dyn NodeBitmaps>> {
        let mut layers: Vec<Arc<dyn NodeBitmaps>> = Vec::new();
        let mut layer = self.graph().find(name);
        while let Some(node) = layer {
            layer = node.layer_below();
            layers.push(Arc::new(NodeBitmapList(node)));
        }
        layers
    }

    fn create_image(
        &mut self,
        image: &ImageRef,
        size: u64,
        backing: Option<&ImageRef>,
    ) -> Result<(), QmpError> {
        // The format is known before the file is touched (QEMU's `bdrv_img_create`).
        if !block::drivers::is_qemu_driver(&image.format) {
            return Err(QmpError::generic(format!(
                "Unknown file format '{}'",
                image.format
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&image.filename)
            .map_err(|e| create_file_error(image, e))?;
        match image.format.as_str() {
            "qcow2" => {
                let backing = backing.map(|b| (b.filename.as_str(), b.format.as_str()));
                qcow2::create(&file, size, 65536, backing).map_err(|e| create_file_error(image, e))
            }
            "raw" => file.set_len(size).map_err(|e| create_file_error(image, e)),
            other => Err(QmpError::generic(format!(
                "Driver '{other}' does not support image creation"
            ))),
        }
    }

    fn open_image(
        &mut self,
        image: &ImageRef,
        backing: Option<&str>,
    ) -> Result<(String, Arc<dyn BlockIo>), QmpError> {
        // As QEMU, the node gets a generated name (`#blockNNN`) and belongs to its users.
        let backing = match backing {
            Some(node) => BlockdevRefOrNull::Reference(node.to_string()),
            None => BlockdevRefOrNull::Null(qmp_api::wire::Null),
        };
        let mut options = writable_image(image, "", backing)?;
        options.node_name = None;
        let node = self.graph().open_anonymous(&options).map_err(qmp_error)?;
        Ok((node.name().to_string(), Arc::new(NodeIo(node))))
    }

    fn blockdev_add(&mut self, options: BlockdevOptions) -> Result<(), QmpError> {
        self.graph()
            .blockdev_add(&options)
            .map(|_| ())
            .map_err(qmp_error)
    }

    fn blockdev_del(&mut self, args: BlockdevDelArguments) -> Result<(), QmpError> {
        self.graph()
            .blockdev_del(&args.node_name)
            .map_err(qmp_error)
    }

    fn reopen(&mut self, options: &[BlockdevOptions]) -> Result<(), QmpError> {
        self.graph().reopen(options).map_err(qmp_error)
    }

    fn set_active(&mut self, node: Option<&str>, active: bool) -> Result<(), QmpError> {
        match node {
            None => self.graph().set_all_active(active),
            Some(name) => {
                let n = self.graph().find(name).ok_or_else(|| {
                    QmpError::generic(format!("Failed to find node with node-name='{name}'"))
                })?;
                self.graph().set_node_active(&n, active)
            }
        }
        .map_err(qmp_error)
    }

    fn generate_node_name(&mut self) -> String {
        self.graph().generate_node_name()
    }

    fn is_active(&self, node: &str) -> bool {
        self.graph().find(node).is_none_or(|n| n.is_active())
    }

    fn query_named_block_nodes(&self, flat: bool) -> Vec<BlockDeviceInfo> {
        self.graph().query_named_block_nodes(flat)
    }

    fn ejected_node(&self) -> Option<String> {
        self.graph().ejected_node()
    }

    fn close_all(&mut self) -> io::Result<()> {
        self.graph().close_all().map_err(io_error)
    }

    fn node_facts(&self, name: &str) -> Option<NodeFacts> {
        let n = self.graph().find(name)?;
        Some(NodeFacts {
            in_use: n.is_in_use(),
            monitor_owned: n.is_monitor_owned(),
            has_backing: n.child("backing").is_some(),
            supports_backing: n.driver().supports_backing(),
            read_only: n.is_read_only(),
        })
    }

    fn op_blockers(&self, name: &str) -> Option<Arc<block::OpBlockers>> {
        self.graph().find(name).map(|n| n.op_blockers().clone())
    }

    fn open_overlay(&mut self, image: &ImageRef, node_name: &str) -> Result<(), QmpError> {
        // Formats with backing files must not open the old image a second time.
        let options = writable_image(
            image,
            node_name,
            BlockdevRefOrNull::Null(qmp_api::wire::Null),
        )?;
        self.graph()
            .blockdev_add(&options)
            .map(|_| ())
            .map_err(qmp_error)
    }

    fn insert_overlay(&mut self, node: &str, overlay: &str) -> Result<(), QmpError> {
        let mut g = self.graph();
        let n = g.lookup(node).map_err(qmp_error)?;
        let o = g.lookup(overlay).map_err(qmp_error)?;
        g.set_backing(&o, Some(n.clone())).map_err(qmp_error)?;
        if let Err(e) = block::replace_node(&n, &o) {
            let _ = g.set_backing(&o, None);
            return Err(qmp_error(e));
        }
        Ok(())
    }

    fn remove_overlay(&mut self, node: &str, overlay: &str) {
        let mut g = self.graph();
        let (Some(n), Some(o)) = (g.find(node), g.find(overlay)) else {
            return;
        };
        if let Err(e) = block::replace_node(&o, &n) {
            tracing::warn!("snapshot rollback: {}", e.desc());
        }
        if let Err(e) = g.set_backing(&o, None) {
            tracing::warn!("snapshot rollback: {}", e.desc());
        }
    }

    fn make_read_only(&mut self, node: &str) {
        // QEMU reopens the old top read-only at commit; a failure there is only logged, the
        // snapshot itself stands (as in QEMU, where the reopen is best effort).
        let found = self.graph().find(node);
        if let Some(n) = found
            && let Err(e) = n.reopen_read_only()
        {
            tracing::warn!("snapshot: reopening {node} read-only: {}", e.desc());
        }
    }

    fn release_if_unused(&mut self, node: &str) {
        let mut g = self.graph();
        let Some(n) = g.find(node) else {
            return;
        };
        let result = if n.is_monitor_owned() {
            if n.is_in_use() {
                return;
            }
            g.blockdev_del(node)
        } else {
            g.close_unused(&n)
        };
        if let Err(e) = result {
            tracing::warn!("releasing {node}: {}", e.desc());
        }
    }

    fn insert_mirror_filter(
        &mut self,
        source: &str,
        target: &str,
        name: Option<&str>,
        writes: Arc<dyn FilterWrites>,
    ) -> Result<Option<Arc<dyn MirrorNodes>>, QmpError> {
        let nodes = crate::mirror_top::insert(&mut self.graph(), (source, target), name, writes)
            .map_err(qmp_error)?;
        Ok(Some(Arc::new(nodes)))
    }

    fn has_parent_node(&self, node: &str) -> bool {
        self.graph().find(node).is_some_and(|n| {
            n.parents()
                .iter()
                .any(|p| matches!(p, block::Parent::Node { .. }))
        })
    }

    fn ancestors(&self, node: &str) -> Vec<String> {
        let mut found: Vec<String> = Vec::new();
        let mut todo: Vec<Arc<BlockNode>> = self.graph().find(node).into_iter().collect();
        while let Some(n) = todo.pop() {
            for parent in n.parents() {
                if let block::Parent::Node { node: p, .. } = parent
                    && !found.iter().any(|f| f == p.name())
                {
                    found.push(p.name().to_string());
                    todo.push(p);
                }
            }
        }
        found
    }

    fn can_replace(&self, node: &str, to_replace: &str) -> bool {
        // `node` (the mirror's source) reaches `to_replace` through filter children only
        // (QEMU's `bdrv_recurse_can_replace` walks down from the source).
        let mut layer = self.graph().find(node);
        while let Some(n) = layer {
            if n.name() == to_replace {
                return true;
            }
            layer = n
                .children()
                .into_iter()
                .find(|e| {
                    matches!(
                        e.kind,
                        block::ChildKind::Filtered | block::ChildKind::FilteredAdjusted { .. }
                    )
                })
                .map(|e| e.node);
        }
        false
    }

    fn in_chain(&self, below: &str, node: &str) -> bool {
        let mut layer = self.graph().find(below);
        while let Some(n) = layer {
            if n.name() == node {
                return true;
            }
            layer = n.layer_below();
        }
        false
    }

    fn open_mirror_target(
        &mut self,
        image: &MirrorTargetImage,
    ) -> Result<(String, Arc<dyn BlockIo>), QmpError> {
        // Without a node name, as QEMU, a generated one (`#blockNNN`), owned by its users.
        let name = image.node_name.clone().unwrap_or_default();
        let format = match &image.format {
            Some(f) => f.clone(),
            None => block::graph::probe_image_format(&image.filename).map_err(qmp_error)?,
        };
        let image_ref = ImageRef {
            filename: image.filename.clone(),
            format,
        };
        let mut options = writable_image(
            &image_ref,
            &name,
            BlockdevRefOrNull::Null(qmp_api::wire::Null),
        )?;
        if image.discard_unmap {
            options.discard = Some(qmp_api::BlockdevDiscardOptions::Unmap);
        }
        if image.open_backing
            && let BlockdevOptionsBranch::Qcow2(qcow2) = &mut options.branch
        {
            qcow2.backing = None;
        }
        let node = if image.node_name.is_some() {
            self.graph().blockdev_add(&options)
        } else {
            options.node_name = None;
            self.graph().open_anonymous(&options)
        }
        .map_err(qmp_error)?;
        Ok((node.name().to_string(), Arc::new(NodeIo(node))))
    }

    fn backend(
        &self,
        node: &str,
        holder: &str,
        writable: bool,
    ) -> Result<Arc<dyn BlockIo>, QmpError> {
        let n = self.graph().lookup(node).map_err(qmp_error)?;
        crate::mirror_top::backend(&n, holder, writable).map_err(qmp_error)
    }

    fn add_backup_filter(
        &mut self,
        source: &str,
        target: &str,
        filter_node_name: Option<&str>,
    ) -> Result<Option<(String, Arc<BlockCopy>)>, QmpError> {
        let (node, copy) = self
            .graph()
            .add_copy_before_write(source, target, filter_node_name)
            .map_err(qmp_error)?;
        Ok(Some((node.name().to_string(), copy)))
    }

    fn copy_buffers(&self) -> Option<Arc<CopyBuffers>> {
        Some(self.graph().copy_buffers().clone())
    }

    fn resize(&mut self, node: &str, size: u64) -> Result<(), QmpError> {
        let n = self.graph().lookup(node).map_err(qmp_error)?;
        let _grant = n
            .take_perm("an unnamed block device", "root", Perm::RESIZE, Perm::ALL)
            .map_err(qmp_error)?;
        n.truncate(size).map_err(qmp_error)
    }

    fn delete_internal_snapshot_id(&mut self, node: &str, id: &str) -> Result<(), QmpError> {
        let n = self.graph().lookup(node).map_err(qmp_error)?;
        let snapshots = n
            .driver()
            .internal_snapshots()
            .ok_or_else(|| QmpError::generic("internal snapshots not supported"))?;
        snapshots.delete(id).map(|_| ()).map_err(qmp_error)
    }

    fn change_backing_file(&mut self, node: &str, backing_file: &str) -> Result<(), QmpError> {
        let n = self.graph().lookup(node).map_err(qmp_error)?;
        let read_only = n.is_read_only();
        if read_only {
            n.reopen_read_write().map_err(qmp_error)?;
        }
        let changed = n
            .change_backing_file(Some((backing_file, n.driver_name())))
            .map_err(|e| {
                QmpError::generic(format!(
                    "Could not change backing file to '{backing_file}': {}",
                    block::error::strerror(e.errno().unwrap_or(libc::EIO))
                ))
            });
        if read_only && let Err(e) = n.reopen_read_only() {
            return changed.and(Err(qmp_error(e)));
        }
        changed
    }

    fn graph_nodes(&self) -> Vec<GraphNode> {
        let mut nodes: Vec<GraphNode> = self
            .graph()
            .nodes()
            .map(|n| GraphNode {
                name: n.name().to_string(),
                driver: n.driver_name().to_string(),
                wr_highest_offset: n.wr_highest_offset(),
                children: {
                    let children = n.children();
                    let primary = children
                        .iter()
                        .position(|e| e.kind != block::ChildKind::Backing);
                    children
                        .iter()
                        .enumerate()
                        .rev()
                        .map(|(i, e)| {
                            let (perm, shared) = n.edge_perms(e);
                            GraphEdge {
                                role: e.name.clone(),
                                child: e.node.name().to_string(),
                                primary: Some(i) == primary,
                                perm,
                                shared,
                            }
                        })
                        .collect()
                },
            })
            .collect();
        nodes.reverse();
        nodes
    }

    fn prepare_create(&mut self, options: &BlockdevCreateOptions) -> CreateWork {
        match &options.branch {
            BlockdevCreateOptionsBranch::File(o) => {
                let o = o.clone();
                CreateWork::new(move || block::create::create_file(&o).map_err(|e| e.desc().into()))
            }
            BlockdevCreateOptionsBranch::Qcow2(o) => {
                // QEMU opens (or finds) the file node first, in the job: its errors are the
                // job's.
                let (file, opened) = match &o.file {
                    BlockdevRef::Reference(name) => (self.graph().lookup(name), None),
                    BlockdevRef::Definition(def) => match self.graph().open_anonymous(def) {
                        Ok(n) => (Ok(n.clone()), Some(n.name().to_string())),
                        Err(e) => (Err(e), None),
                    },
                };
                let o = o.clone();
                let mut work = CreateWork::new(move || {
                    let file = file.map_err(|e| e.desc().to_string())?;
                    let options =
                        block::create::qcow2_options(&o).map_err(|e| e.desc().to_string())?;
                    block::create::create_qcow2(&file, &options).map_err(|e| e.desc().to_string())
                });
                work.opened.extend(opened);
                work
            }
            other => {
                let driver = other.kind();
                CreateWork::new(move || {
                    Err(format!("Driver '{driver}' does not support image creation"))
                })
            }
        }
    }

    fn internal_snapshots(&self, node: &str) -> Option<Vec<SnapshotInfo>> {
        let n = self.graph().find(node)?;
        Some(n.driver().internal_snapshots()?.list())
    }

    fn create_internal_snapshot(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        let n = self.graph().lookup(node).map_err(qmp_error)?;
        let snapshots = n
            .driver()
            .internal_snapshots()
            .ok_or_else(|| QmpError::generic("internal snapshots not supported"))?;
        snapshots.create(name).map(|_| ()).map_err(qmp_error)
    }

    fn delete_internal_snapshot(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        let n = self.graph().lookup(node).map_err(qmp_error)?;
        let snapshots = n
            .driver()
            .internal_snapshots()
            .ok_or_else(|| QmpError::generic("internal snapshots not supported"))?;
        // The newest snapshot of that name is the one the action made.
        let id = snapshots
            .list()
            .into_iter()
            .rev()
            .find(|s| s.name == name)
            .map(|s| s.id)
            .ok_or_else(|| QmpError::generic(format!("Can't find snapshot '{name}'")))?;
        snapshots.delete(&id).map(|_| ()).map_err(qmp_error)
    }

    fn backing_chain(&self, name: &str) -> Vec<ChainLayer> {
        let g = self.graph();
        let mut layers = Vec::new();
        let mut layer = g.find(name);
        while let Some(n) = layer {
            let filtered = n.driver().filtered_child();
            layers.push(ChainLayer {
                name: n.name().to_string(),
                filename: node_filename(&n),
                driver: n.driver_name().to_string(),
                filter: filtered.is_some(),
                read_only: n.is_read_only(),
                has_parent: n
                    .parents()
                    .iter()
                    .any(|p| matches!(p, block::Parent::Node { .. })),
                written: n.cumulative_perms().0.contains(block::Perm::WRITE),
            });
            layer = n.child(filtered.unwrap_or("backing"));
        }
        layers
    }

    fn find_backing_image(&self, top: &str, filename: &str) -> Option<String> {
        let g = self.graph();
        let t = g.find(top)?;
        g.find_backing_image(&t, filename)
            .map(|n| n.name().to_string())
    }

    fn chain_editor(&self) -> Option<Arc<dyn ChainEditor>> {
        Some(Arc::new(self.graph.clone()))
    }

    fn track_writes(&self, node: &str) -> Option<Arc<dyn WriteTracker>> {
        let n = self.graph().find(node)?;
        let size = n.size().ok()?;
        let bitmap = block::DirtyBitmap::new(None, MIRROR_GRANULARITY, size).ok()?;
        n.bitmaps().push(bitmap);
        Some(Arc::new(MirrorBitmap { node: n }))
    }
}

/// The granularity of a mirror's write tracking (QEMU's default for 64 KiB clusters).
const MIRROR_GRANULARITY: u64 = 65536;

/// A mirror's anonymous bitmap on its source: the only top-level bitmap without a name
/// (successors of frozen bitmaps live inside their parent; a source has one mirror at most).
struct MirrorBitmap {
    node: Arc<BlockNode>,
}

impl WriteTracker for MirrorBitmap {
    fn take_dirty(&self) -> Vec<(u64, u64)> {
        let mut list = self.node.bitmaps();
        match list.iter_mut().find(|b| b.name().is_none()) {
            Some(b) => {
                let ranges: Vec<(u64, u64)> = b.dirty_ranges(0, b.size()).collect();
                b.clear();
                ranges
            }
            None => Vec::new(),
        }
    }

    fn stop(&self) {
        let mut list = self.node.bitmaps();
        if let Some(i) = list.iter().position(|b| b.name().is_none()) {
            list.remove(i);
        }
    }
}
