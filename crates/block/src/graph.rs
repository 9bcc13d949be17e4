//! `BlockGraph`: the named nodes, `blockdev-add`/`blockdev-del` semantics, node look-ups and
//! `query-named-block-nodes`.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use qmp_api::{
    BlockDeviceInfo, BlockDirtyInfo, BlockdevCacheInfo, BlockdevDetectZeroesOptions,
    BlockdevDriver, BlockdevOptions, BlockdevOptionsBranch, BlockdevOptionsCbw,
    BlockdevOptionsFile, BlockdevOptionsQcow2, BlockdevOptionsRaw, BlockdevRef, BlockdevRefOrNull,
    ImageInfo,
};

use crate::copy::{BlockCopy, CopyBuffers};
use serde_json::{Map, Value};

use crate::base_options::{self, Inherited};
use crate::driver::{BlockEventSink, ChildKind, OpenContext};
use crate::drivers;
use crate::error::{BlockError, BlockResult};
use crate::filter::{FilterDriver, FilterKind};
use crate::node::{BlockNode, NodeParts};
use crate::perm::Perm;

/// Longest node name plus one (QEMU's `sizeof(node_name)`).
const NODE_NAME_SIZE: usize = 32;

/// The graph of block nodes, in the order their names were registered.
pub struct BlockGraph {
    nodes: Vec<Arc<BlockNode>>,
    /// The buffers every copy in this graph (backups, copy-before-write filters) reads into.
    copy_buffers: Arc<CopyBuffers>,
    /// The same nodes by name: look-ups stay O(1) with 20,000 nodes.
    by_name: HashMap<String, Arc<BlockNode>>,
    auto_counter: u64,
    rng: u64,
    events: Option<BlockEventSink>,
    /// A `blockdev-add` is opening its root node.
    monitor_open: bool,
    /// The throttle groups `throttle` nodes name.
    throttle_groups: crate::throttle::ThrottleGroups,
}

impl Default for BlockGraph {
    fn default() -> Self {
        Self::new()
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn node_name_is_wellformed(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl BlockGraph {
    /// An empty graph. Its drivers are the branches of the generated `BlockdevOptions`
    /// (`file`, `raw`, `null-co`, `blkdebug`, `qcow2`).
    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9);
        BlockGraph {
            nodes: Vec::new(),
            copy_buffers: Arc::default(),
            by_name: HashMap::new(),
            auto_counter: 0,
            rng: seed | 1,
            events: None,
            monitor_open: false,
            throttle_groups: crate::throttle::ThrottleGroups::default(),
        }
    }

    /// Where the nodes opened from now on report events (`BLOCK_IMAGE_CORRUPTED`).
    pub fn set_event_sink(&mut self, sink: BlockEventSink) {
        self.events = Some(sink);
    }

    /// Where nodes report events, if anywhere.
    pub fn event_sink(&self) -> Option<BlockEventSink> {
        self.events.clone()
    }

    /// The buffers copies in this graph share (memory follows the copies running).
    pub fn copy_buffers(&self) -> &Arc<CopyBuffers> {
        &self.copy_buffers
    }

    /// Uses `groups` for the `throttle` driver's `throttle-group` option (the daemon shares
    /// them with its `throttle-group` objects).
    pub fn with_throttle_groups(mut self, groups: crate::throttle::ThrottleGroups) -> Self {
        self.throttle_groups = groups;
        self
    }

    /// The throttle groups `throttle` nodes can join.
    pub fn throttle_groups(&self) -> &crate::throttle::ThrottleGroups {
        &self.throttle_groups
    }

    /// The node named `name`.
    pub fn find(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.by_name.get(name).cloned()
    }

    /// The node named `name`, or `Cannot find device='<n>' nor node-name='<n>'`.
    pub fn lookup(&self, name: &str) -> BlockResult<Arc<BlockNode>> {
        self.find(name).ok_or_else(|| {
            BlockError::new(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    }

    /// Every node, newest first (the order of `query-named-block-nodes`).
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<BlockNode>> {
        self.nodes.iter().rev()
    }

    fn auto_name(&mut self) -> String {
        // xorshift64: QEMU appends two random digits to a counter.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let name = format!("#block{}{:02}", self.auto_counter, self.rng % 100);
        self.auto_counter += 1;
        name
    }

    fn check_new_name(&self, name: &str) -> BlockResult<()> {
        if !node_name_is_wellformed(name) {
            return Err(BlockError::new(format!("Invalid node-name: '{name}'")));
        }
        if self.find(name).is_some() {
            return Err(BlockError::new(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        if name.len() >= NODE_NAME_SIZE {
            return Err(BlockError::new("Node name too long"));
        }
        Ok(())
    }

    /// `blockdev-add`: opens the node described by `options` and its nested children; the
    /// root must be named and becomes monitor-owned. On failure nothing stays open.
    pub fn blockdev_add(&mut self, options: &BlockdevOptions) -> BlockResult<Arc<BlockNode>> {
        if options.node_name.is_none() {
            return Err(BlockError::new(
                "'node-name' must be specified for the root node",
            ));
        }
        let before = self.nodes.len();
        self.monitor_open = true;
        let opened = self.open_node(options, Inherited::none(), true);
        self.monitor_open = false;
        // `active: false`: opened, then inactivated with its children (QEMU opens them so).
        let opened = opened.and_then(|node| {
            if options.active == Some(false) {
                self.set_node_active(&node, false)?;
            }
            Ok(node)
        });
        match opened {
            Ok(node) => {
                node.set_monitor_owned(true);
                Ok(node)
            }
            Err(e) => {
                // Close what this call opened, newest first (parents release children).
                while self.nodes.len() > before {
                    if let Some(n) = self.nodes.pop() {
                        self.by_name.remove(n.name());
                        let _ = n.close();
                    }
                }
                Err(e)
            }
        }
    }

    /// Opens the node `options` describe, with a generated name unless it has one, not owned
    /// by the monitor (an image `blockdev-create` writes to, opened for the job); close it
    /// with [`BlockGraph::close_unused`]. On failure nothing stays open.
    pub fn open_anonymous(&mut self, options: &BlockdevOptions) -> BlockResult<Arc<BlockNode>> {
        let before = self.nodes.len();
        let opened = self.open_node(options, Inherited::none(), false);
        if opened.is_err() {
            while self.nodes.len() > before {
                if let Some(n) = self.nodes.pop() {
                    self.by_name.remove(n.name());
                    let _ = n.close();
                }
            }
        }
        opened
    }

    /// Opens one node (and, through its driver, its children), then its backing chain.
    pub(crate) fn open_node(
        &mut self,
        options: &BlockdevOptions,
        inherited: Inherited,
        root: bool,
    ) -> BlockResult<Arc<BlockNode>> {
        let node = self.open_single(options, inherited, root)?;
        // Like QEMU, the backing chain opens after (and is registered after) its overlay.
        self.open_backing_chain(&node, drivers::backing_option(&options.branch))?;
        Ok(node)
    }

    /// Opens one node (and, through its driver, its children), without its backing chain.
    /// Like QEMU, a protocol-style driver (`file`, `null-co`, `blkdebug`) gets its name before
    /// its children open, while a format (`raw`, `qcow2`) opens its `file` first: this fixes
    /// the `#blockNNN` counters and the order of `query-named-block-nodes`.
    fn open_single(
        &mut self,
        options: &BlockdevOptions,
        inherited: Inherited,
        root: bool,
    ) -> BlockResult<Arc<BlockNode>> {
        if root && options.node_name.is_none() {
            return Err(BlockError::new(
                "'node-name' must be specified for the root node",
            ));
        }
        if options.active == Some(false) && !(root && self.monitor_open) {
            return Err(BlockError::new(
                "Parameter 'active' is not supported with value false by this block layer \
                 except on the node blockdev-add names",
            ));
        }
        let kind = options.branch.kind();
        let protocol = drivers::is_protocol(kind);
        let flags = base_options::resolve(options, &inherited)?;
        let read_only = flags.read_only;
        let slot = self.nodes.len();
        let mut ctx = OpenContext {
            graph: self,
            explicit_name: options.node_name.clone(),
            name: None,
            read_only,
            flags,
            is_format: matches!(kind, BlockdevDriver::Raw | BlockdevDriver::Qcow2),
            children: Vec::new(),
            opened: Vec::new(),
        };
        let opened = if protocol {
            ctx.ensure_name().map(|_| ())
        } else {
            Ok(())
        }
        .and_then(|()| drivers::open(&mut ctx, &options.branch))
        .and_then(|driver| {
            match ctx
                .ensure_name()
                .and_then(|_| base_options::check_unused(options, protocol))
            {
                Ok(()) => Ok(driver),
                Err(e) => {
                    let _ = driver.close();
                    Err(e)
                }
            }
        });
        let children = std::mem::take(&mut ctx.children);
        let inheriting = std::mem::take(&mut ctx.opened);
        let name = ctx.name.take();
        // The driver may have made the node read-only (auto-read-only).
        let read_only = ctx.read_only;
        let (driver, (name, auto_named)) = match (opened, name) {
            (Ok(driver), Some(name)) => (driver, name),
            (result, _) => {
                for edge in &children {
                    edge.node.remove_use(edge.use_id);
                }
                let e = result
                    .err()
                    .unwrap_or_else(|| BlockError::new("Could not assign a node name"));
                return Err(e);
            }
        };
        let node = BlockNode::new(
            NodeParts {
                name,
                auto_named,
                driver_name: kind.as_str().to_string(),
                read_only,
                flags,
                // Kept as QEMU keeps a node's options: for its `json:` file name.
                options: serde_json::to_value(options).unwrap_or(Value::Null),
                children,
            },
            |_| driver,
        );
        for child in &inheriting {
            child.set_inherits_from(&node);
        }
        if let Err(e) = node.load_bitmaps() {
            let _ = node.close_storing(false);
            return Err(e);
        }
        if protocol {
            self.nodes.insert(slot.min(self.nodes.len()), node.clone());
        } else {
            self.nodes.push(node.clone());
        }
        self.by_name.insert(node.name().to_string(), node.clone());
        Ok(node)
    }

    /// A generated name (`#blockNNN`), as a node opened now without a name would get.
    pub fn generate_node_name(&mut self) -> String {
        self.auto_name()
    }

    /// Validates an explicit name, or generates one.
    pub(crate) fn assign_name(&mut self, explicit: Option<&str>) -> BlockResult<(String, bool)> {
        match explicit {
            Some(n) => {
                self.check_new_name(n)?;
                Ok((n.to_string(), false))
            }
            None => Ok((self.auto_name(), true)),
        }
    }

    /// Opens the backing chain below `top`, whose `backing` option is `backing`, one image
    /// after the other (never by recursion, so no chain can exhaust the stack): from each
    /// node's `backing` option, or else from the backing file its image header names. A chain
    /// that comes back to a file already in it is refused naming that file, and so is one
    /// deeper than [`MAX_BACKING_CHAIN`] images. Errors read as QEMU's, one `Could not open
    /// backing file: ` per image opened from a header.
    fn open_backing_chain(
        &mut self,
        top: &Arc<BlockNode>,
        backing: Option<&BlockdevRefOrNull>,
    ) -> BlockResult<()> {
        let mut chain: Vec<(u64, u64)> = file_identity(top).into_iter().collect();
        let mut node = top.clone();
        // The `backing` option of `node`: an image opened from a header has none.
        let mut option = backing;
        let mut prefix = String::new();
        for depth in 0.. {
            if !node.driver().supports_backing() {
                return Ok(());
            }
            let (backing, next) = match option {
                Some(BlockdevRefOrNull::Null(_)) => return Ok(()),
                Some(BlockdevRefOrNull::Reference(name)) => {
                    // An existing node, with the chain it already has.
                    let b = self.lookup(name).map_err(|e| prefixed(&prefix, e))?;
                    attach_backing(&node, b)?;
                    return Ok(());
                }
                Some(BlockdevRefOrNull::Definition(options)) => {
                    let b = self
                        .open_single(options, Inherited::backing_of(&node.flags()), false)
                        // QEMU's `bdrv_open_backing_file` prefixes a definition's error too.
                        .map_err(|e| {
                            prefixed(&format!("{prefix}Could not open backing file: "), e)
                        })?;
                    (b, drivers::backing_option(&options.branch))
                }
                None => match node.driver().backing_file() {
                    None => return Ok(()),
                    Some((name, format)) => {
                        let outer = prefix.clone();
                        prefix.push_str("Could not open backing file: ");
                        let path = resolve_backing_path(&node, &name);
                        if let Some(id) = path_identity(&path)
                            && chain.contains(&id)
                        {
                            return Err(prefixed(
                                &prefix,
                                BlockError::new(format!(
                                    "Backing file '{path}' creates an infinite loop"
                                )),
                            ));
                        }
                        let format = match format {
                            Some(f) => f,
                            None => probe_format(&path).map_err(|e| prefixed(&outer, e))?,
                        };
                        let b = image_options(&format, &path)
                            .and_then(|options| {
                                self.open_single(
                                    &options,
                                    Inherited::backing_of(&node.flags()),
                                    false,
                                )
                            })
                            .map_err(|e| prefixed(&prefix, e))?;
                        (b, None)
                    }
                },
            };
            if depth >= MAX_BACKING_CHAIN {
                return Err(prefixed(
                    &prefix,
                    BlockError::new(format!(
                        "Backing chain is too deep: '{}' would be backing image {} \
                         (at most {MAX_BACKING_CHAIN} are opened)",
                        node_filename(&backing),
                        depth + 1
                    )),
                ));
            }
            if let Some(id) = file_identity(&backing) {
                if chain.contains(&id) {
                    return Err(prefixed(
                        &prefix,
                        BlockError::new(format!(
                            "Backing file '{}' creates an infinite loop",
                            node_filename(&backing)
                        )),
                    ));
                }
                chain.push(id);
            }
            // Opened here (a definition or the header's name), it inherits from `node`.
            let inherits = !matches!(option, Some(BlockdevRefOrNull::Reference(_)));
            attach_backing(&node, backing.clone())?;
            if inherits {
                backing.set_inherits_from(&node);
            }
            node = backing;
            option = next;
        }
        Ok(())
    }

    /// Replaces `node`'s backing (e.g. snapshot overlays): detaches the old one (closing it if
    /// nothing else holds it), attaches `backing`, and tells the driver.
    pub fn set_backing(
        &mut self,
        node: &Arc<BlockNode>,
        backing: Option<Arc<BlockNode>>,
    ) -> BlockResult<()> {
        if let Some(b) = &backing
            && Arc::ptr_eq(b, node)
        {
            return Err(BlockError::new("Cannot make a node its own backing file"));
        }
        let old = node.detach_child("backing");
        if let Some(b) = &backing
            && let Err(e) = node.attach_child("backing", ChildKind::Backing, b.clone())
        {
            if let Some(o) = &old {
                let _ = node.attach_child("backing", ChildKind::Backing, o.clone());
            }
            return Err(e);
        }
        node.driver().set_backing(backing);
        if let Some(o) = old
            && !o.is_monitor_owned()
            && !o.is_in_use()
        {
            self.close_node(&o)?;
        }
        Ok(())
    }

    /// QEMU's `bdrv_append` of a filter: opens node `name` (generated when `None`) with the
    /// driver `make_driver` makes (told the new node) over `child` (a filtered child in role
    /// `role`), then moves every parent of `child` onto it ([`crate::replace_node`]). On
    /// failure nothing stays.
    pub fn insert_filter(
        &mut self,
        name: Option<&str>,
        driver_name: &str,
        make_driver: impl FnOnce(&Weak<BlockNode>) -> Box<dyn crate::BlockDriver>,
        (child, role): (&Arc<BlockNode>, &str),
    ) -> BlockResult<Arc<BlockNode>> {
        let (name, auto_named) = self.assign_name(name)?;
        let (perm, mut shared) = ChildKind::Filtered.child_perms(Perm::NONE, Perm::ALL, true);
        if child.flags().force_share {
            shared = Perm::ALL;
        }
        let use_id = child.add_use(&format!("node '{name}'"), role, perm, shared)?;
        let mut options = Map::new();
        options.insert("driver".into(), Value::String(driver_name.to_string()));
        options.insert("node-name".into(), Value::String(name.clone()));
        let node = BlockNode::new(
            NodeParts {
                name,
                auto_named,
                driver_name: driver_name.to_string(),
                read_only: child.is_read_only(),
                flags: base_options::NodeFlags {
                    read_only: child.is_read_only(),
                    ..base_options::NodeFlags::default()
                },
                options: Value::Object(options),
                children: vec![crate::node::ChildEdge {
                    name: role.to_string(),
                    kind: ChildKind::Filtered,
                    node: child.clone(),
                    use_id,
                    blocker: None,
                }],
            },
            make_driver,
        );
        if let Err(e) = crate::replace_node(child, &node) {
            let _ = node.close();
            return Err(e);
        }
        self.nodes.push(node.clone());
        self.by_name.insert(node.name().to_string(), node.clone());
        Ok(node)
    }

    /// Closes `node` (and the anonymous children it alone held) if nothing uses it and the
    /// monitor does not own it: a filter a job dropped, a node only a job held.
    pub fn close_unused(&mut self, node: &Arc<BlockNode>) -> BlockResult<()> {
        if node.is_monitor_owned() || node.is_in_use() || node.is_closed() {
            return Ok(());
        }
        self.close_node(node)
    }

    /// A copy-before-write filter over `source` copying to `target`, as a backup makes one
    /// (QEMU's `bdrv_cbw_append`): named `node_name`, else automatically, and not the
    /// monitor's (the backup removes it, [`BlockGraph::close_unused`]). Returns the filter
    /// with its block-copy state. Errors read `Could not create node: ...`.
    pub fn add_copy_before_write(
        &mut self,
        source: &str,
        target: &str,
        node_name: Option<&str>,
    ) -> BlockResult<(Arc<BlockNode>, Arc<BlockCopy>)> {
        let reference = |name: &str| Box::new(BlockdevRef::Reference(name.to_string()));
        let mut options = BlockdevOptions::new(BlockdevOptionsBranch::CopyBeforeWrite(Box::new(
            BlockdevOptionsCbw::new(reference(source), reference(target)),
        )));
        options.node_name = node_name.map(str::to_string);
        let prefixed =
            |e: BlockError| BlockError::new(format!("Could not create node: {}", e.desc()));
        let node = self
            .open_node(&options, Inherited::none(), false)
            .map_err(prefixed)?;
        match node.driver().block_copy() {
            Some(copy) => {
                let copy = copy.clone();
                Ok((node, copy))
            }
            None => Err(BlockError::new(
                "Could not create node: not a copy-before-write filter",
            )),
        }
    }

    /// QEMU's `bdrv_set_backing_hd` then `bdrv_change_backing_file`, as a stream ends:
    /// `overlay` gets `base` as its backing node (`None`: no backing file), and its image
    /// header names it (see [`BackingName`]). The layers that were below `overlay` and that
    /// nothing uses any more (not monitor-owned, no other parent) are closed. `overlay` must be
    /// writable for the header rewrite.
    ///
    /// Crash safety: `overlay` is flushed first, so the data it took over from the layers it
    /// drops (a stream's copy) is durable before its header stops naming them. (QEMU does not
    /// flush here: killed right after, its image can read zeroes where the data was.)
    pub fn change_backing(
        &mut self,
        overlay: &Arc<BlockNode>,
        base: Option<&Arc<BlockNode>>,
        name: &BackingName,
    ) -> BlockResult<()> {
        overlay.flush()?;
        self.set_backing(overlay, base.cloned())?;
        let header = base.map(|b| name.for_base(b));
        overlay.change_backing_file(header.as_ref().map(|(n, f)| (n.as_str(), f.as_str())))
    }

    /// QEMU's `bdrv_drop_intermediate`, as an intermediate commit ends: every node that has
    /// `top` as its backing node gets `base` instead, and its image header names `base` (see
    /// [`BackingName`]; a read-only parent is reopened read-write for the rewrite and
    /// read-only again after, as QEMU's `bdrv_backing_update_filename` does). `top` and the
    /// layers below it down to `base` leave the chain, and are closed if nothing else uses
    /// them. `top` may be a job's filter above the real top layer.
    ///
    /// Crash safety: `base` is flushed first, so the data a commit copied into it is durable
    /// before any header stops naming the layers it came from.
    pub fn drop_intermediate(
        &mut self,
        top: &Arc<BlockNode>,
        base: &Arc<BlockNode>,
        name: &BackingName,
    ) -> BlockResult<()> {
        let mut chain = top.layer_below();
        let mut contains = false;
        while let Some(layer) = chain {
            if Arc::ptr_eq(&layer, base) {
                contains = true;
                break;
            }
            chain = layer.layer_below();
        }
        if !contains {
            return Err(BlockError::from_errno(libc::EIO));
        }
        base.flush()?;
        let parents: Vec<Arc<BlockNode>> = self
            .nodes
            .iter()
            .filter(|p| p.child("backing").is_some_and(|b| Arc::ptr_eq(&b, top)))
            .cloned()
            .collect();
        // First every parent moves (QEMU replaces the node for all of them at once) ...
        for parent in &parents {
            move_edge(parent, "backing", base)?;
        }
        // ... then each header is rewritten.
        let (file, format) = name.for_base(base);
        for parent in &parents {
            update_backing_name(parent, &file, &format).map_err(|e| {
                BlockError::with_errno(
                    format!("Could not update backing file link: {}", e.desc()),
                    e.errno().unwrap_or(libc::EIO),
                )
            })?;
        }
        if !top.is_monitor_owned() && !top.is_in_use() && !top.is_closed() {
            self.close_node(top)?;
        }
        Ok(())
    }

    /// QEMU's `bdrv_find_backing_image`: the node in `top`'s backing chain that
    /// `filename` names. For each layer with a backing node: if the backing node is not the
    /// one the header names, `filename` must equal the backing node's file name; if either
    /// name has a protocol prefix, it must equal the header's name or its resolved form;
    /// otherwise both, made absolute against the layer's directory, must be the same file.
    pub fn find_backing_image(
        &self,
        top: &Arc<BlockNode>,
        filename: &str,
    ) -> Option<Arc<BlockNode>> {
        let has_protocol = |name: &str| {
            name.split_once(':')
                .is_some_and(|(p, _)| !p.is_empty() && !p.contains('/'))
        };
        let mut layer = top.clone();
        while let Some(role) = layer.driver().filtered_child() {
            layer = layer.child(role)?;
        }
        loop {
            let below = layer.child("backing")?;
            let header = layer.driver().backing_file();
            let found = match &header {
                _ if backing_overridden(&layer) => filename == node_filename(&below),
                Some((name, _)) if has_protocol(filename) || has_protocol(name) => {
                    filename == name || filename == resolve_backing_path(&layer, name)
                }
                Some((name, _)) => {
                    let wanted = resolve_backing_path(&layer, filename);
                    let recorded = resolve_backing_path(&layer, name);
                    match (
                        std::fs::canonicalize(wanted),
                        std::fs::canonicalize(recorded),
                    ) {
                        (Ok(a), Ok(b)) => a == b,
                        _ => false,
                    }
                }
                None => false,
            };
            if found {
                return Some(below);
            }
            layer = below;
            while let Some(role) = layer.driver().filtered_child() {
                layer = layer.child(role)?;
            }
        }
    }

    /// Inserts a job's filter node of `kind` above `below` (QEMU's `bdrv_insert_node` of a
    /// `copy-on-read` filter, `bdrv_append` of `commit_top`), named `name` (checked as a new
    /// node name) or generated; every parent of `below` moves onto it. Returns the filter.
    pub fn insert_job_filter(
        &mut self,
        below: &Arc<BlockNode>,
        kind: FilterKind,
        name: Option<&str>,
    ) -> BlockResult<Arc<BlockNode>> {
        let named = name.is_some();
        let options = kind.options(name.unwrap_or_default(), below);
        let driver_name = kind.driver_name();
        let role = kind.child_role();
        let read_only = kind.read_only();
        let driver = FilterDriver::new(kind, below.clone(), named, options);
        let filter = self.insert_filter(name, driver_name, |_| Box::new(driver), (below, role))?;
        if read_only {
            filter.mark_read_only();
        }
        Ok(filter)
    }

    /// Removes a job's filter node: its parents move back onto its child and it is closed
    /// (QEMU's `bdrv_cor_filter_drop`, or `bdrv_replace_node` of `commit_top`/`mirror_top` by
    /// its child). A filter already gone (dropped with the layers of a commit) is nothing to
    /// do.
    pub fn remove_filter(&mut self, filter: &Arc<BlockNode>) -> BlockResult<()> {
        if filter.is_closed() {
            return Ok(());
        }
        let Some(role) = filter.driver().filtered_child() else {
            return Err(BlockError::new(format!(
                "Node '{}' is not a filter",
                filter.name()
            )));
        };
        if let Some(child) = filter.child(role) {
            crate::replace_node(filter, &child)?;
        }
        self.close_unused(filter)
    }

    /// `blockdev-del`: closes a monitor-added node nobody uses (flushing it and storing its
    /// persistent bitmaps), then every anonymous child left unused. Checked in QEMU's order:
    /// found, not blocked, monitor-owned, unused.
    pub fn blockdev_del(&mut self, name: &str) -> BlockResult<()> {
        let node = self.find(name).ok_or_else(|| {
            BlockError::new(format!("Failed to find node with node-name='{name}'"))
        })?;
        node.check_op(crate::BlockOp::DriveDel)?;
        if !node.is_monitor_owned() {
            return Err(BlockError::new(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if node.is_in_use() {
            return Err(BlockError::new(format!("Block device {name} is in use")));
        }
        self.close_node(&node)
    }

    fn close_node(&mut self, node: &Arc<BlockNode>) -> BlockResult<()> {
        if let Some(i) = self.nodes.iter().rposition(|n| Arc::ptr_eq(n, node)) {
            self.nodes.remove(i);
        }
        self.by_name.remove(node.name());
        let result = node.close();
        for edge in node.children() {
            let child = &edge.node;
            if !child.is_monitor_owned() && !child.is_in_use() && !child.is_closed() {
                self.close_node(child)?;
            }
        }
        result
    }

    /// Closes every node (daemon exit): parents before children; stores bitmaps and flushes.
    /// Returns the first error, after closing everything.
    pub fn close_all(&mut self) -> BlockResult<()> {
        let mut result = Ok(());
        let mut open = std::mem::take(&mut self.nodes);
        self.by_name.clear();
        // Each pass closes, newest first, every node nothing uses (closing a parent releases
        // its children for the same pass); what is still used after a pass that closed
        // nothing (a job's hold) is closed anyway.
        while !open.is_empty() {
            let before = open.len();
            let mut used = Vec::new();
            for node in open.into_iter().rev() {
                if node.is_in_use() {
                    used.push(node);
                    continue;
                }
                let r = node.close();
                if result.is_ok() {
                    result = r;
                }
            }
            used.reverse();
            open = used;
            if open.len() == before {
                for node in open.drain(..).rev() {
                    let r = node.close();
                    if result.is_ok() {
                        result = r;
                    }
                }
            }
        }
        result
    }

    /// `query-named-block-nodes`: `BlockDeviceInfo` for every node, newest first. With `flat`,
    /// backing images are not nested into `image`.
    pub fn query_named_block_nodes(&self, flat: bool) -> Vec<BlockDeviceInfo> {
        self.nodes().map(|n| block_device_info(n, flat)).collect()
    }

    /// The first node, in `query-named-block-nodes` order, that lost its driver at run time
    /// ([`crate::BlockDriver::is_ejected`]): QEMU's `bdrv_block_device_info` fails the whole
    /// query on it (`Block device <name> is ejected`).
    pub fn ejected_node(&self) -> Option<String> {
        self.nodes()
            .find(|n| n.driver().is_ejected())
            .map(|n| n.name().to_string())
    }
}

/// The options of an image file opened as a format node over a `file` node (a backing file
/// named in a header, a file the command layer creates), read-only unless given otherwise:
/// `{"driver": <format>, "file": {"driver": "file", "filename": <path>}}`.
pub fn image_options(format: &str, path: &str) -> BlockResult<BlockdevOptions> {
    let file = Box::new(BlockdevRef::Definition(Box::new(BlockdevOptions::new(
        BlockdevOptionsBranch::File(BlockdevOptionsFile::new(path)),
    ))));
    let branch = match format {
        "qcow2" => BlockdevOptionsBranch::Qcow2(Box::new(BlockdevOptionsQcow2::new(file))),
        "raw" => BlockdevOptionsBranch::Raw(Box::new(BlockdevOptionsRaw::new(file))),
        other if drivers::is_qemu_driver(other) => {
            return Err(BlockError::new(format!(
                "Parameter 'driver' does not accept value '{other}'"
            )));
        }
        other => return Err(BlockError::new(format!("Unknown driver '{other}'"))),
    };
    let mut options = BlockdevOptions::new(branch);
    options.read_only = Some(true);
    Ok(options)
}

/// How many backing images below a node are opened at most. QEMU 10.0 has no limit: a
/// 1500-deep chain crashes qemu-io (stack overflow), and a read-only chain that loops makes
/// qemu-storage-daemon open the same file again and again (7000+ descriptors) without ever
/// answering. Reads through a chain still go down it level by level: this bound keeps them
/// well within a 2 MiB thread stack (measured in a release build: a read through 2048
/// levels fits; the `backing_chains` tests read through this many).
pub const MAX_BACKING_CHAIN: usize = 256;

/// `e` behind the `Could not open backing file: ` prefixes of the levels above it.
fn prefixed(prefix: &str, e: BlockError) -> BlockError {
    if prefix.is_empty() {
        return e;
    }
    let desc = format!("{prefix}{}", e.desc());
    match e.errno() {
        Some(errno) => BlockError::with_errno(desc, errno),
        None => BlockError::new(desc),
    }
}

fn attach_backing(node: &Arc<BlockNode>, backing: Arc<BlockNode>) -> BlockResult<()> {
    node.attach_child("backing", ChildKind::Backing, backing.clone())?;
    node.driver().set_backing(Some(backing));
    Ok(())
}

/// The file a path names (device and inode), if it exists.
fn path_identity(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// The file under a node: its `file` children followed down to a `file` driver node.
fn file_identity(node: &Arc<BlockNode>) -> Option<(u64, u64)> {
    let mut n = node.clone();
    for _ in 0..16 {
        if n.driver_name() == "file" {
            return path_identity(n.options().get("filename")?.as_str()?);
        }
        n = n.child("file")?;
    }
    None
}

/// What an image header records for a new backing node (QEMU's `backing-file` and
/// `backing-mask-protocol` arguments of `block-stream` and `block-commit`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackingName {
    /// The name to record instead of the base's file name.
    pub file: Option<String>,
    /// Record a protocol node's format (`file`, ...) as `raw`.
    pub mask_protocol: bool,
}

impl BackingName {
    /// The `(file name, format)` the header records for `base`.
    pub fn for_base(&self, base: &BlockNode) -> (String, String) {
        let file = self.file.clone().unwrap_or_else(|| node_filename(base));
        let format = match base.driver_name() {
            d if self.mask_protocol && is_protocol_driver(d) => "raw",
            d => d,
        };
        (file, format.to_string())
    }
}

/// Whether a driver is a protocol (QEMU's `protocol_name` is set): `file`, `null-co`,
/// `blkdebug`.
fn is_protocol_driver(driver: &str) -> bool {
    driver
        .parse::<qmp_api::BlockdevDriver>()
        .is_ok_and(drivers::is_protocol)
}

/// Points `parent`'s child edge in role `role` at `to`, with the same kind (the driver is told
/// of a new backing node). Fails, changing nothing, if `to` cannot grant the edge's
/// permissions.
fn move_edge(parent: &Arc<BlockNode>, role: &str, to: &Arc<BlockNode>) -> BlockResult<()> {
    let Some(edge) = parent.children().into_iter().find(|e| e.name == role) else {
        return Ok(());
    };
    parent.detach_child(role);
    if let Err(e) = parent.attach_child(role, edge.kind, to.clone()) {
        let _ = parent.attach_child(role, edge.kind, edge.node.clone());
        return Err(e);
    }
    if role == "backing" {
        parent.driver().set_backing(Some(to.clone()));
    }
    Ok(())
}

/// QEMU's `bdrv_backing_update_filename`: rewrites `node`'s header to name `(file, format)`,
/// reopening a read-only node read-write for it and read-only again after.
fn update_backing_name(node: &BlockNode, file: &str, format: &str) -> BlockResult<()> {
    let read_only = node.is_read_only();
    if read_only {
        node.reopen_read_write()?;
    }
    let result = node.change_backing_file(Some((file, format)));
    if read_only {
        // As QEMU, a failure to make it read-only again is not the job's failure.
        let _ = node.reopen_read_only();
    }
    result
}

/// A backing file name from an image header, resolved against the image's directory.
fn resolve_backing_path(node: &BlockNode, name: &str) -> String {
    if name.starts_with('/') || name.contains("://") {
        return name.to_string();
    }
    let own = match node.child("file") {
        Some(file) => node_filename(&file),
        None => node_filename(node),
    };
    match std::path::Path::new(&own).parent() {
        Some(dir) if !own.starts_with("json:") && !dir.as_os_str().is_empty() => {
            dir.join(name).to_string_lossy().into_owned()
        }
        _ => name.to_string(),
    }
}

/// `qcow2` if the file starts with qcow2's magic, else `raw` (QEMU's format probing, for
/// images opened without a format).
pub fn probe_image_format(path: &str) -> BlockResult<String> {
    probe_format(path)
}

/// `qcow2` if the file starts with qcow2's magic, else `raw`.
fn probe_format(path: &str) -> BlockResult<String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        BlockError::with_errno(
            format!(
                "Could not open backing file: Could not open '{path}': {}",
                crate::error::strerror(errno)
            ),
            errno,
        )
    })?;
    let n = f.read(&mut magic).unwrap_or(0);
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    }
    .to_string())
}

/// The node's file name as QEMU shows it (`file`, `image.filename`).
pub fn node_filename(node: &BlockNode) -> String {
    if let Some(f) = node.driver().info().filename {
        return f;
    }
    let opts = node.options().as_object().cloned().unwrap_or_default();
    // Options that do not change what the image is (QEMU's non-"strong" options).
    let rewritten = node.written_backing_name().is_some();
    let only_file = !(rewritten && backing_overridden(node))
        && opts.keys().all(|k| {
            matches!(
                k.as_str(),
                "driver"
                    | "node-name"
                    | "read-only"
                    | "auto-read-only"
                    | "force-share"
                    | "discard"
                    | "cache"
                    | "detect-zeroes"
                    | "active"
                    | "file"
            ) || (k == "backing" && !backing_overridden(node))
        });
    match node.child("file") {
        Some(file) if only_file => {
            let inner = node_filename(&file);
            if inner.starts_with("json:") {
                json_filename(&full_options(node))
            } else {
                inner
            }
        }
        _ => json_filename(&full_options(node)),
    }
}

/// QEMU's `full_open_options` of a node, from which its `json:` name is made: its own
/// options, a child given by node name spelled out as that child's full options, and the
/// backing file only when it is not the one the image header names (then first, as QEMU's
/// dictionary order has it).
pub(crate) fn full_options(node: &BlockNode) -> Value {
    let Value::Object(m) = node.options() else {
        return node.options();
    };
    let overridden = backing_overridden(node);
    let mut out = Map::new();
    if overridden {
        let backing = match (m.get("backing"), node.child("backing")) {
            (Some(Value::String(_)) | None, Some(b)) => full_options(&b),
            (Some(v), _) => v.clone(),
            (None, None) => Value::Null,
        };
        out.insert("backing".into(), backing);
    }
    for (k, v) in m.iter().filter(|(k, _)| *k != "backing") {
        let v = match (v, node.child(k)) {
            (Value::String(_), Some(child)) => full_options(&child),
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    Value::Object(out)
}

/// QEMU's `bdrv_backing_overridden`: the backing node is not the one the image header names
/// (e.g. `backing: null` on an image with a backing file). Then `backing` is one of the options
/// that make the image what it is, and the file name becomes a `json:` one.
fn backing_overridden(node: &BlockNode) -> bool {
    if let Some(written) = node.written_backing_name() {
        // Rewritten by this process: QEMU compares the name it wrote with the backing node's.
        return match node.child("backing") {
            Some(b) => written != node_filename(&b),
            None => !written.is_empty(),
        };
    }
    let header = node.driver().backing_file();
    match (node.child("backing"), header) {
        // Opened from the header: QEMU then records the backing node's name as the header's.
        (Some(b), Some((name, _))) if node.options().get("backing").is_none() => {
            resolve_backing_path(node, &name) != node_filename(&b)
        }
        // Given by the user: compared with the header's name as stored.
        (Some(b), Some((name, _))) => name != node_filename(&b),
        (Some(_), None) | (None, Some(_)) => true,
        (None, None) => false,
    }
}

/// A `json:` file name of a node's options, as QEMU prints it (naming and read-only keys
/// dropped, lists flattened).
pub(crate) fn json_filename(options: &Value) -> String {
    /// Drops naming/read-only keys and flattens lists QEMU-style (`inject-error.0.errno`).
    fn strip(v: &Value) -> Value {
        fn flatten(prefix: &str, v: &Value, out: &mut Map<String, Value>) {
            match v {
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        flatten(&format!("{prefix}.{i}"), item, out);
                    }
                }
                Value::Object(m) => {
                    for (k, item) in m {
                        flatten(&format!("{prefix}.{k}"), item, out);
                    }
                }
                other => {
                    out.insert(prefix.to_string(), other.clone());
                }
            }
        }
        match v {
            Value::Object(m) => {
                let mut out = Map::new();
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("node-name" | "read-only", _) => {}
                        (_, Value::Array(_)) => flatten(k, v, &mut out),
                        _ => {
                            out.insert(k.clone(), strip(v));
                        }
                    }
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }
    let mut out = String::from("json:");
    qemu_json(&strip(options), &mut out);
    out
}

/// QEMU's `QDict` hash (`tdb_hash`) of a key, reduced to its 512 buckets.
fn qdict_bucket(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// JSON as QEMU prints it in `json:` file names: `{"a": 1, "b": [2, 3]}`, members in the
/// order a `QDict` iterates them: by hash bucket, and newest first within a bucket (the map's
/// order standing for QEMU's insertion order).
fn qemu_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            out.push('{');
            let mut members: Vec<(usize, (&String, &Value))> = m.iter().enumerate().collect();
            members.sort_by_key(|(i, (k, _))| (qdict_bucket(k), std::cmp::Reverse(*i)));
            for (i, (_, (k, v))) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                qemu_json(v, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                qemu_json(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The bytes a node's storage takes on the host (its own, or its `file` child's).
pub(crate) fn actual_size(node: &BlockNode) -> Option<u64> {
    node.driver()
        .info()
        .actual_size
        .or_else(|| node.child("file").and_then(|f| actual_size(&f)))
}

fn wire(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn image_info(node: &BlockNode, flat: bool) -> ImageInfo {
    let info = node.driver().info();
    let mut image = ImageInfo::new(
        node_filename(node),
        node.driver_name().to_string(),
        wire(node.size().unwrap_or(0)),
    );
    image.dirty_flag = info.dirty_flag;
    image.actual_size = actual_size(node).map(wire);
    image.cluster_size = info.cluster_size.map(wire);
    if let Some(role) = node.driver().filtered_child() {
        // A filter: its child is the next layer, with no backing file name (QEMU's
        // `bdrv_filter_or_cow_bs` walk).
        if let (Some(c), false) = (node.child(role), flat) {
            image.backing_image = Some(Box::new(image_info(&c, flat)));
        }
        image.format_specific = info.format_specific;
        return image;
    }
    let header = node.driver().backing_file();
    let child = node.child("backing");
    if header.is_some() || child.is_some() {
        let full = match (&child, &header) {
            // A name this process wrote: QEMU resolves it, whatever node is attached.
            (_, Some((name, _))) if node.written_backing_name().is_some() => {
                resolve_backing_path(node, name)
            }
            (Some(b), _) => node_filename(b),
            (None, Some((name, _))) => resolve_backing_path(node, name),
            (None, None) => String::new(),
        };
        let stored = header.as_ref().map_or(full.clone(), |(n, _)| n.clone());
        image.backing_filename = Some(stored);
        image.full_backing_filename = Some(full);
        if let Some((_, Some(fmt))) = &header {
            image.backing_filename_format = Some(fmt.clone());
        }
        if let (Some(b), false) = (&child, flat) {
            image.backing_image = Some(Box::new(image_info(b, flat)));
        }
    }
    image.format_specific = info.format_specific;
    image
}

/// The layers below `node`: its backing file, or a filter's child (QEMU counts both).
fn backing_depth(node: &BlockNode) -> u64 {
    let below = match node.driver().filtered_child() {
        Some(role) => node.child(role),
        None => node.child("backing"),
    };
    below.map_or(0, |b| 1 + backing_depth(&b))
}

/// `BlockDirtyInfo` for each bitmap of `node` (a frozen bitmap's successor listed first).
pub fn dirty_bitmap_info(node: &BlockNode) -> Vec<BlockDirtyInfo> {
    let entry = |b: &crate::bitmap::DirtyBitmap| BlockDirtyInfo {
        name: b.name().map(str::to_string),
        count: wire(b.count()),
        granularity: u32::try_from(b.granularity()).unwrap_or(u32::MAX),
        recording: b.is_recording(),
        busy: b.is_busy(),
        persistent: b.is_persistent(),
        inconsistent: b.is_inconsistent().then_some(true),
    };
    let mut out = Vec::new();
    for b in node.bitmaps().iter() {
        if let Some(s) = b.successor() {
            out.push(entry(s));
        }
        out.push(entry(b));
    }
    for (granularity, count) in node.driver().internal_bitmaps() {
        out.push(BlockDirtyInfo {
            name: None,
            count: wire(count),
            granularity: u32::try_from(granularity).unwrap_or(u32::MAX),
            recording: false,
            busy: false,
            persistent: false,
            inconsistent: None,
        });
    }
    out
}

fn block_device_info(node: &BlockNode, flat: bool) -> BlockDeviceInfo {
    // QSD 10.0 reports depth 0 in flat mode (it does not walk the chain then).
    let depth = if flat { 0 } else { backing_depth(node) };
    let detect_zeroes = node
        .options()
        .get("detect-zeroes")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(BlockdevDetectZeroesOptions::Off);
    let bitmaps = dirty_bitmap_info(node);
    let mut info = BlockDeviceInfo::new(
        node_filename(node),
        node.is_read_only(),
        node.driver_name().to_string(),
        wire(depth),
        node.is_active(),
        false,
        detect_zeroes,
        0,
        0,
        0,
        0,
        0,
        0,
        image_info(node, flat),
        BlockdevCacheInfo {
            writeback: true,
            direct: node.flags().direct,
            no_flush: node.flags().no_flush,
        },
        0,
    );
    info.node_name = Some(node.name().to_string());
    // A filter records no backing file name, whatever its child's role.
    info.backing_file = node
        .child("backing")
        .filter(|_| node.driver().filtered_child().is_none())
        .map(|b| node_filename(&b));
    info.dirty_bitmaps = (!bitmaps.is_empty()).then_some(bitmaps);
    info
}
