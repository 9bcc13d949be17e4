//! `BlockNode`: one node of the graph — its driver, children, permission users, op blockers
//! and dirty bitmaps. I/O through a node marks its recording bitmaps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde_json::Value;

use crate::bitmap::DirtyBitmap;
use crate::blocker::{BlockOp, OpBlocker, OpBlockers, OpSet};
use crate::driver::{BlkdebugEvent, BlockDriver, ChildKind};
use crate::error::{BlockError, BlockResult};
use crate::perm::Perm;
use crate::requests::RequestTracker;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a range of a node reads, as far as its format knows (block status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes from the queried offset with the same state (at least 1 unless at the end).
    pub len: u64,
    /// Allocated in this node's own layer (false: comes from the backing chain, or nowhere).
    pub allocated: bool,
    /// Reads as zeroes (through the backing chain).
    pub zero: bool,
}

/// How a range of a node reads through its backing chain (QEMU's `bdrv_block_status_above`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainStatus {
    /// Some layer holds data for it.
    pub data: bool,
    /// It reads as zeroes.
    pub zero: bool,
    /// The depth of the layer that allocates it (1: the node itself; 0: no layer).
    pub depth: u32,
    /// Bytes from the queried offset with this status.
    pub len: u64,
}

impl ChainStatus {
    fn unallocated(len: u64) -> ChainStatus {
        ChainStatus {
            data: false,
            zero: true,
            depth: 0,
            len,
        }
    }
}

/// A driver's handle on a child that follows the edge when the graph moves it
/// ([`crate::BlockDriver::replace_child`]).
pub struct ChildSlot(std::sync::RwLock<Arc<BlockNode>>);

impl ChildSlot {
    /// Holds `node`.
    pub fn new(node: Arc<BlockNode>) -> Self {
        ChildSlot(std::sync::RwLock::new(node))
    }

    /// The child now.
    pub fn get(&self) -> Arc<BlockNode> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The child is now `node`.
    pub fn set(&self, node: Arc<BlockNode>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = node;
    }
}

/// A parent→child edge (`file`, `backing`, `image`).
#[derive(Clone)]
pub struct ChildEdge {
    /// The child's role name, e.g. `file`.
    pub name: String,
    /// How the parent uses it (fixes the permissions taken).
    pub kind: ChildKind,
    /// The child node.
    pub node: Arc<BlockNode>,
    pub(crate) use_id: u64,
    /// The op blocker a `backing` edge sets on its child (QEMU's `backing_blocker`).
    pub(crate) blocker: Option<u64>,
}

#[derive(Debug, Clone)]
struct PermUse {
    id: u64,
    holder: String,
    role: String,
    perm: Perm,
    shared: Perm,
    /// The parent behind the use, when it is one that [`crate::replace_node`] moves (a node's
    /// child edge, a [`crate::BlockBackend`]); `None` for a use that stays at its node (a
    /// job's own grant, QEMU's `stay_at_node`).
    parent: Option<ParentLink>,
}

/// Who a permission use belongs to, for moving it to another node.
#[derive(Debug, Clone)]
pub(crate) enum ParentLink {
    /// A node's child edge (found by its use id in the parent's children).
    Node(Weak<BlockNode>),
    /// A backend's root.
    Backend(Weak<crate::backend::BlockBackend>),
}

/// A parent of a node: what [`crate::replace_node`] moves.
#[derive(Clone)]
pub enum Parent {
    /// A node, through its child edge in role `role`.
    Node {
        /// The parent node.
        node: Arc<BlockNode>,
        /// The edge's role (`file`, `backing`, ...).
        role: String,
    },
    /// A [`crate::BlockBackend`] (an export, a job's target, ...).
    Backend(Arc<crate::backend::BlockBackend>),
}

/// One use of a node, as a reopen weighs it.
pub(crate) struct UseInfo {
    pub(crate) id: u64,
    pub(crate) role: String,
    pub(crate) perm: Perm,
    pub(crate) parent: Option<Arc<BlockNode>>,
}

/// One use of a node as [`BlockNode::parent_uses`] lists it.
pub(crate) struct ParentUse {
    pub(crate) id: u64,
    pub(crate) holder: String,
    pub(crate) role: String,
    pub(crate) perm: Perm,
    pub(crate) shared: Perm,
    pub(crate) link: ParentLink,
}

#[derive(Default)]
struct NodeState {
    /// Newest first, like QEMU's parent list.
    uses: Vec<PermUse>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A node of the block graph.
pub struct BlockNode {
    /// This node, for the parent links of the edges it attaches.
    me: Weak<BlockNode>,
    name: String,
    auto_named: bool,
    driver_name: String,
    /// Set at open; a reopen can only make it true (see [`BlockNode::reopen_read_only`]).
    read_only: AtomicBool,
    /// Inactive (QEMU's `BDRV_O_INACTIVE`): no writes, other processes may write the image.
    inactive: AtomicBool,
    /// A reopen gave the node its parent's `active: false`.
    inactive_option_inherited: AtomicBool,
    /// The generic options as they act (fixed at open: a reopen cannot change them).
    flags: crate::base_options::NodeFlags,
    /// The options of the last open or reopen.
    options: Mutex<Value>,
    /// The parent that opened this node from a definition or its image's backing file name
    /// (QEMU's `inherits_from`): its reopens reopen this node.
    inherits_from: Mutex<Weak<BlockNode>>,
    driver: Box<dyn BlockDriver>,
    children: Mutex<Vec<ChildEdge>>,
    monitor_owned: AtomicBool,
    closed: AtomicBool,
    /// Writes (and resizes) so far (QEMU's `write_gen`).
    write_gen: AtomicU64,
    /// `write_gen` as the last successful flush found it when it started (QEMU's
    /// `flushed_gen`): equal, nothing written since is waiting for the disk, so a flush of a
    /// driver that forces data to the disk is skipped and closing does not flush.
    flushed_gen: AtomicU64,
    /// Flushes of this node run one at a time (QEMU's flush queue): one that finds nothing
    /// written since the last returns only after that one is done.
    flushing: Mutex<()>,
    state: Mutex<NodeState>,
    blockers: Arc<OpBlockers>,
    bitmaps: Mutex<Vec<DirtyBitmap>>,
    /// The end of the highest write (QEMU's `wr_highest_offset`).
    wr_highest_offset: AtomicU64,
    /// Before-write hooks, oldest first, with their ids.
    write_notifiers: Mutex<Vec<(u64, Arc<dyn BeforeWrite>)>>,
    /// Before-read hooks, oldest first, with their ids.
    read_notifiers: Mutex<Vec<(u64, Arc<dyn BeforeRead>)>>,
    /// Writes in flight and copy-on-read requests, which must not overlap.
    requests: RequestTracker,
    /// The backing file name this process last wrote into the image header (QEMU's
    /// `auto_backing_file` after `bdrv_change_backing_file`; empty: none).
    written_backing_name: Mutex<Option<String>>,
}

/// A hook run before every write to a node (QEMU's copy-before-write filter): a backup copies
/// the old contents of the written range to its target here. It runs on the writer's thread
/// with the range not yet touched; an error fails the write (nothing is written).
pub trait BeforeWrite: Send + Sync {
    /// `len` bytes at `offset` are about to be written (data, zeroes or a discard).
    fn before_write(&self, offset: u64, len: u64) -> BlockResult<()>;
}

/// A hook run around every read of a node: fleecing reads of a copy's target are held
/// against the copy-before-writes that would change what they read through to the source.
pub trait BeforeRead: Send + Sync {
    /// `len` bytes at `offset` are about to be read; the returned guard is held until the
    /// read is done.
    fn before_read(&self, offset: u64, len: u64) -> Box<dyn Send>;
}

/// Keeps a [`BeforeWrite`] or [`BeforeRead`] hook on its node; dropping it removes the hook.
pub struct NotifierHandle {
    node: std::sync::Weak<BlockNode>,
    id: u64,
}

impl Drop for NotifierHandle {
    fn drop(&mut self) {
        if let Some(node) = self.node.upgrade() {
            lock(&node.write_notifiers).retain(|(id, _)| *id != self.id);
            lock(&node.read_notifiers).retain(|(id, _)| *id != self.id);
        }
    }
}

pub(crate) struct NodeParts {
    pub name: String,
    pub auto_named: bool,
    pub driver_name: String,
    pub read_only: bool,
    pub flags: crate::base_options::NodeFlags,
    pub options: Value,
    pub children: Vec<ChildEdge>,
}

impl BlockNode {
    /// A node of `parts` whose driver `make_driver` makes, told the node (a filter that acts
    /// on its own node, as a mirror's on its dirty bitmap, knows it from the start).
    pub(crate) fn new(
        parts: NodeParts,
        make_driver: impl FnOnce(&Weak<BlockNode>) -> Box<dyn BlockDriver>,
    ) -> Arc<Self> {
        let node = Arc::new_cyclic(|me| BlockNode {
            me: me.clone(),
            name: parts.name,
            auto_named: parts.auto_named,
            driver_name: parts.driver_name,
            read_only: AtomicBool::new(parts.read_only),
            inactive: AtomicBool::new(false),
            inactive_option_inherited: AtomicBool::new(false),
            flags: parts.flags,
            options: Mutex::new(parts.options),
            inherits_from: Mutex::new(Weak::new()),
            driver: make_driver(me),
            children: Mutex::new(parts.children),
            monitor_owned: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
            flushing: Mutex::new(()),
            state: Mutex::new(NodeState::default()),
            blockers: OpBlockers::new(),
            bitmaps: Mutex::new(Vec::new()),
            wr_highest_offset: AtomicU64::new(0),
            write_notifiers: Mutex::new(Vec::new()),
            read_notifiers: Mutex::new(Vec::new()),
            requests: RequestTracker::default(),
            written_backing_name: Mutex::new(None),
        });
        for edge in node.children() {
            edge.node
                .set_use_parent(edge.use_id, ParentLink::Node(Arc::downgrade(&node)));
        }
        node
    }

    /// Records which parent is behind use `id` (edges opened before their parent existed).
    fn set_use_parent(&self, id: u64, link: ParentLink) {
        if let Some(u) = lock(&self.state).uses.iter_mut().find(|u| u.id == id) {
            u.parent = Some(link);
        }
    }

    /// The parents of this node that [`crate::replace_node`] would move, newest first.
    pub fn parents(&self) -> Vec<Parent> {
        self.parent_uses()
            .into_iter()
            .filter_map(|u| match u.link {
                ParentLink::Node(w) => w.upgrade().map(|node| Parent::Node { node, role: u.role }),
                ParentLink::Backend(w) => w.upgrade().map(Parent::Backend),
            })
            .collect()
    }

    pub(crate) fn parent_uses(&self) -> Vec<ParentUse> {
        lock(&self.state)
            .uses
            .iter()
            .filter_map(|u| {
                Some(ParentUse {
                    id: u.id,
                    holder: u.holder.clone(),
                    role: u.role.clone(),
                    perm: u.perm,
                    shared: u.shared,
                    link: u.parent.clone()?,
                })
            })
            .collect()
    }

    /// Every use of the node, with the parent node behind it (`None`: an export, a job).
    pub(crate) fn parent_uses_all(&self) -> Vec<UseInfo> {
        lock(&self.state)
            .uses
            .iter()
            .map(|u| UseInfo {
                id: u.id,
                role: u.role.clone(),
                perm: u.perm,
                parent: match &u.parent {
                    Some(ParentLink::Node(w)) => w.upgrade(),
                    _ => None,
                },
            })
            .collect()
    }

    /// Moves this node's child edge `role` onto `to` (a reopen's new `file`), taking on `to`
    /// what the edge holds; returns the old child. Fails, changing nothing, if `to` cannot
    /// grant it.
    pub(crate) fn replace_child_edge(
        &self,
        role: &str,
        to: &Arc<BlockNode>,
    ) -> BlockResult<Option<Arc<BlockNode>>> {
        let Some(edge) = self.children().into_iter().find(|e| e.name == role) else {
            return Ok(None);
        };
        let (perm, shared) = self.edge_perms(&edge);
        let new_id = to.add_use_linked(
            &format!("node '{}'", self.name),
            role,
            (perm, shared),
            Some(ParentLink::Node(self.me.clone())),
        )?;
        if self.retarget_edge(edge.use_id, to, new_id).is_none() {
            to.remove_use(new_id);
            return Ok(None);
        }
        edge.node.remove_use(edge.use_id);
        Ok(Some(edge.node))
    }

    /// Points the child edge whose use is `old_id` at `to` (use `new_id`); tells the driver.
    pub(crate) fn retarget_edge(
        &self,
        old_id: u64,
        to: &Arc<BlockNode>,
        new_id: u64,
    ) -> Option<ChildEdge> {
        let (edge, old) = {
            let mut children = lock(&self.children);
            let edge = children.iter_mut().find(|c| c.use_id == old_id)?;
            let old = std::mem::replace(&mut edge.node, to.clone());
            edge.use_id = new_id;
            // A backing edge's blocker moves with it (QEMU's backing detach and attach).
            if let Some(id) = edge.blocker.take() {
                old.blockers.remove(id);
                edge.blocker = Some(to.block_as_backing_of(&self.name));
            }
            (edge.clone(), old)
        };
        drop(old);
        if edge.kind == ChildKind::Backing {
            self.driver.set_backing(Some(to.clone()));
        } else {
            self.driver.replace_child(&edge.name, to.clone());
        }
        Some(edge)
    }

    /// Loads the format's persistent bitmaps (at open).
    pub(crate) fn load_bitmaps(&self) -> BlockResult<()> {
        if let Some(store) = self.driver.bitmap_store() {
            let loaded = store.load_bitmaps()?;
            self.bitmaps().extend(loaded);
        }
        Ok(())
    }

    /// The node name (`#blockNNN` for anonymous children).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the name was generated.
    pub fn is_auto_named(&self) -> bool {
        self.auto_named
    }

    /// The driver name (`drv`).
    pub fn driver_name(&self) -> &str {
        &self.driver_name
    }

    /// The driver, e.g. for a format-specific command.
    pub fn driver(&self) -> &dyn BlockDriver {
        self.driver.as_ref()
    }

    /// The node's generic options as they act (`cache.direct`, `detect-zeroes`, ...; its
    /// read-only flag is [`BlockNode::is_read_only`]).
    pub fn flags(&self) -> crate::base_options::NodeFlags {
        self.flags
    }

    /// Whether the node was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Marks a node opened without write access read-only (a job filter that QEMU opens
    /// read-only above a writable child: `commit_top`); its children are left as they are.
    pub(crate) fn mark_read_only(&self) {
        self.read_only.store(true, Ordering::Release);
    }

    /// Reopens the node read-only, as QEMU does to the old active layer of an external
    /// snapshot: stores its persistent bitmaps (which become read-only), lets the driver
    /// reopen its image read-only, drops write and resize on its children, and reopens the
    /// children that inherited its read-only flag (`file`, filtered children) the same way.
    /// Fails, changing nothing, while a user holds write permission on the node. Already
    /// read-only: nothing to do.
    pub fn reopen_read_only(&self) -> BlockResult<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.check_open()?;
        let (perm, _) = self.cumulative_perms();
        if !(perm & (Perm::WRITE | Perm::WRITE_UNCHANGED)).is_empty() {
            return Err(BlockError::new(format!(
                "Cannot make node '{}' read-only: it is in use for writing",
                self.name
            )));
        }
        self.make_read_only_self()?;
        for edge in self.children() {
            let inherits = edge.node.options().get("read-only").is_none();
            let data = edge.kind.is_filtered() || edge.kind == ChildKind::Metadata;
            if data && inherits && !edge.node.is_monitor_owned() {
                edge.node.reopen_read_only()?;
            }
        }
        Ok(())
    }

    /// Reopens the node read-write (QEMU's `bdrv_reopen_set_read_only(bs, false)`), as a
    /// stream into a read-only node, a commit into a read-only base, the rewrite of a
    /// read-only overlay's backing file name, or a `blockdev-reopen` do: the children that
    /// inherited the read-only flag (`file`, filtered children) are reopened first, then the
    /// node itself (`make_read_write_self`). On failure everything is as before.
    /// Already read-write: nothing to do.
    pub fn reopen_read_write(&self) -> BlockResult<()> {
        if !self.is_read_only() {
            return Ok(());
        }
        self.check_open()?;
        let mut reopened: Vec<Arc<BlockNode>> = Vec::new();
        let undo_children = |reopened: &[Arc<BlockNode>]| {
            for child in reopened.iter().rev() {
                let _ = child.reopen_read_only();
            }
        };
        for edge in self.children() {
            let inherits = edge.node.options().get("read-only").is_none();
            let data = edge.kind.is_filtered() || edge.kind == ChildKind::Metadata;
            if data && inherits && !edge.node.is_monitor_owned() && edge.node.is_read_only() {
                if let Err(e) = edge.node.reopen_read_write() {
                    undo_children(&reopened);
                    return Err(e);
                }
                reopened.push(edge.node.clone());
            }
        }
        if let Err(e) = self.make_read_write_self() {
            undo_children(&reopened);
            return Err(e);
        }
        Ok(())
    }

    /// This node alone becomes read-only (its users no longer write it): persistent bitmaps
    /// stored and read-only, the driver's image reopened read-only, write and resize on its
    /// children dropped.
    pub(crate) fn make_read_only_self(&self) -> BlockResult<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.store_bitmaps()?;
        self.flush()?;
        self.driver.reopen_read_only()?;
        for b in lock(&self.bitmaps).iter_mut() {
            if b.is_persistent() {
                b.set_readonly(true);
            }
        }
        self.read_only.store(true, Ordering::Release);
        // Loosening: the children lose write and resize; this cannot conflict.
        let _ = self.refresh_perms();
        Ok(())
    }

    /// This node alone becomes read-write (its children already are writable): its
    /// permissions on its children follow first (a format takes write on its file), then the
    /// driver reopens its image for writing; persistent bitmaps become writable. On failure
    /// the node is as before.
    pub(crate) fn make_read_write_self(&self) -> BlockResult<()> {
        if !self.is_read_only() {
            return Ok(());
        }
        self.read_only.store(false, Ordering::Release);
        let reopen = self
            .refresh_perms()
            .and_then(|()| self.driver.reopen_read_write());
        if let Err(e) = reopen {
            self.read_only.store(true, Ordering::Release);
            let _ = self.refresh_perms();
            return Err(e);
        }
        for b in lock(&self.bitmaps).iter_mut() {
            if b.is_persistent() {
                b.set_readonly(false);
            }
        }
        Ok(())
    }

    /// The backing file name this process last wrote into the node's image header (an empty
    /// string: none), if it did.
    pub fn written_backing_name(&self) -> Option<String> {
        lock(&self.written_backing_name).clone()
    }

    /// Rewrites the backing file named in the image header (QEMU's
    /// `bdrv_change_backing_file`): `(name, format)`, or none. The node must be writable.
    pub fn change_backing_file(&self, backing: Option<(&str, &str)>) -> BlockResult<()> {
        self.check_writable()?;
        self.driver.change_backing_file(backing)?;
        *lock(&self.written_backing_name) =
            Some(backing.map_or(String::new(), |b| b.0.to_string()));
        Ok(())
    }

    /// The options of the node's last open or reopen.
    pub fn options(&self) -> Value {
        lock(&self.options).clone()
    }

    /// Whether `parent` opened this node (from a definition, or its image's backing file).
    pub fn inherits_from(&self, parent: &BlockNode) -> bool {
        lock(&self.inherits_from)
            .upgrade()
            .is_some_and(|p| std::ptr::eq(Arc::as_ptr(&p), parent))
    }

    pub(crate) fn set_inherits_from(&self, parent: &Arc<BlockNode>) {
        *lock(&self.inherits_from) = Arc::downgrade(parent);
    }

    /// A reopen's options become the node's; `inactive_inherited`: its `active: false` came
    /// from its parent's options (QEMU keeps it among the node's options, not the explicit).
    pub(crate) fn set_options(&self, options: Value, inactive_inherited: bool) {
        *lock(&self.options) = options;
        self.inactive_option_inherited
            .store(inactive_inherited, Ordering::Release);
    }

    /// Whether the node's options hold an `active: false` taken from its parent.
    pub(crate) fn has_inherited_inactive_option(&self) -> bool {
        self.inactive_option_inherited.load(Ordering::Acquire)
    }

    /// Whether the node is active (not inactivated for a handover, QEMU's `BDRV_O_INACTIVE`).
    pub fn is_active(&self) -> bool {
        !self.inactive.load(Ordering::Acquire)
    }

    /// Whether writes can reach the node: writable and active (QEMU's `bdrv_is_writable`).
    pub fn is_writable(&self) -> bool {
        !self.is_read_only() && self.is_active()
    }

    /// Inactivates this node alone (QEMU's `bdrv_inactivate_recurse` for one node, after its
    /// checks): the driver writes out what it caches and marks its image clean, then the node
    /// takes no more writes and its children's users may write (the image's locks allow
    /// another process to write it).
    pub(crate) fn inactivate_self(&self) -> BlockResult<()> {
        self.check_open()?;
        if !self.is_active() {
            return Ok(());
        }
        self.store_bitmaps()?;
        self.flush()?;
        self.driver.inactivate()?;
        self.inactive.store(true, Ordering::Release);
        // Only loosening: errors leave stricter locks, as in QEMU.
        let _ = self.refresh_perms();
        Ok(())
    }

    /// Activates this node alone (its children already are): its users' permissions are
    /// taken again, then the driver drops what it knew of the image and reads it anew
    /// (QEMU's `bdrv_activate` for one node). On failure the node stays inactive.
    pub(crate) fn activate_self(&self) -> BlockResult<()> {
        self.check_open()?;
        if self.is_active() {
            return Ok(());
        }
        self.inactive.store(false, Ordering::Release);
        if let Err(e) = self.refresh_perms() {
            self.inactive.store(true, Ordering::Release);
            let _ = self.refresh_perms();
            return Err(e);
        }
        if let Err(e) = self.driver.activate() {
            self.inactive.store(true, Ordering::Release);
            let _ = self.refresh_perms();
            return Err(e);
        }
        Ok(())
    }

    /// The children, in the order they were attached.
    pub fn children(&self) -> Vec<ChildEdge> {
        lock(&self.children).clone()
    }

    /// The child in role `name` (`file`, `backing`, `image`).
    pub fn child(&self, name: &str) -> Option<Arc<BlockNode>> {
        lock(&self.children)
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.node.clone())
    }

    /// Attaches `child` in role `name` (e.g. a `backing` added after open, or an overlay's
    /// backing at snapshot time), taking the permissions `kind` implies. Fails on a
    /// permission conflict, or if the role is taken.
    pub fn attach_child(
        &self,
        name: &str,
        kind: ChildKind,
        child: Arc<BlockNode>,
    ) -> BlockResult<()> {
        if self.child(name).is_some() {
            return Err(BlockError::new(format!(
                "Node '{}' already has a '{name}' child",
                self.name
            )));
        }
        if !child.is_active() && self.is_active() {
            return Err(BlockError::new(format!(
                "Inactive '{}' can't be a {name} child of active '{}'",
                child.name(),
                self.name
            )));
        }
        let (perm, shared) = self.cumulative_perms();
        let (cp, mut cs) = kind.child_perms(perm, shared, !self.is_read_only());
        // `force-share` on the child: its parents share everything (QEMU's `bdrv_child_perm`).
        if child.flags().force_share {
            cs = Perm::ALL;
        }
        let use_id = child.add_use_linked(
            &format!("node '{}'", self.name),
            name,
            (cp, cs),
            Some(ParentLink::Node(self.me.clone())),
        )?;
        let blocker = (kind == ChildKind::Backing).then(|| child.block_as_backing_of(&self.name));
        lock(&self.children).push(ChildEdge {
            name: name.to_string(),
            kind,
            node: child,
            use_id,
            blocker,
        });
        Ok(())
    }

    /// Sets the blocker of a backing edge from `parent` on this node (QEMU's
    /// `bdrv_backing_attach`): everything but commit, stream and backup is refused.
    pub(crate) fn block_as_backing_of(&self, parent: &str) -> u64 {
        self.blockers.add(
            format!("node is used as backing hd of '{parent}'"),
            OpSet::BACKING,
        )
    }

    /// The permissions `edge` (one of this node's children) takes on its child and the ones
    /// it shares.
    pub fn edge_perms(&self, edge: &ChildEdge) -> (Perm, Perm) {
        lock(&edge.node.state)
            .uses
            .iter()
            .find(|u| u.id == edge.use_id)
            .map_or((Perm::NONE, Perm::ALL), |u| (u.perm, u.shared))
    }

    /// Detaches the child in role `name`, releasing the permissions taken on it.
    pub fn detach_child(&self, name: &str) -> Option<Arc<BlockNode>> {
        let edge = {
            let mut children = lock(&self.children);
            let i = children.iter().position(|c| c.name == name)?;
            children.remove(i)
        };
        edge.node.remove_use(edge.use_id);
        if let Some(id) = edge.blocker {
            edge.node.blockers.remove(id);
        }
        Some(edge.node)
    }

    /// Whether the monitor added this node (only such nodes can be `blockdev-del`ed).
    pub fn is_monitor_owned(&self) -> bool {
        self.monitor_owned.load(Ordering::Relaxed)
    }

    pub(crate) fn set_monitor_owned(&self, owned: bool) {
        self.monitor_owned.store(owned, Ordering::Relaxed);
    }

    /// Whether anything (a parent node, a job, an export) uses the node.
    pub fn is_in_use(&self) -> bool {
        !lock(&self.state).uses.is_empty()
    }

    /// Whether the node was closed (removed from the graph).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    // ---- permissions ----

    /// The union of permissions taken and the intersection of permissions shared.
    pub fn cumulative_perms(&self) -> (Perm, Perm) {
        cumulative(&lock(&self.state).uses)
    }

    /// The union of the permissions taken by users that are not parent nodes (exports,
    /// jobs: QEMU's BlockBackends).
    pub(crate) fn non_node_users_perm(&self) -> Perm {
        lock(&self.state)
            .uses
            .iter()
            .filter(|u| !matches!(u.parent, Some(ParentLink::Node(_))))
            .fold(Perm::NONE, |acc, u| acc | u.perm)
    }

    /// Takes `perm` on this node for `holder` (e.g. `backup job 'j1'`) in `role` (e.g.
    /// `target`), sharing `shared` with others. Fails with QEMU's conflict text, `Block node
    /// is read-only`, or an image-lock error. Released when the grant drops.
    pub fn take_perm(
        self: &Arc<Self>,
        holder: &str,
        role: &str,
        perm: Perm,
        shared: Perm,
    ) -> BlockResult<PermGrant> {
        let id = self.add_use(holder, role, perm, shared)?;
        Ok(PermGrant {
            node: self.clone(),
            id,
        })
    }

    pub(crate) fn add_use(
        &self,
        holder: &str,
        role: &str,
        perm: Perm,
        shared: Perm,
    ) -> BlockResult<u64> {
        self.add_use_linked(holder, role, (perm, shared), None)
    }

    /// [`BlockNode::add_use`] on behalf of a parent that [`crate::replace_node`] can move.
    pub(crate) fn add_use_linked(
        &self,
        holder: &str,
        role: &str,
        (perm, shared): (Perm, Perm),
        parent: Option<ParentLink>,
    ) -> BlockResult<u64> {
        if !self.is_active() && !(perm & !Perm::CONSISTENT_READ).is_empty() {
            return Err(BlockError::new(format!(
                "Permission '{perm}' unavailable on inactive node"
            )));
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        lock(&self.state).uses.insert(
            0,
            PermUse {
                id,
                holder: holder.to_string(),
                role: role.to_string(),
                perm,
                shared,
                parent,
            },
        );
        if let Err(e) = self.refresh_perms() {
            lock(&self.state).uses.retain(|u| u.id != id);
            let _ = self.refresh_perms();
            return Err(e);
        }
        Ok(id)
    }

    pub(crate) fn update_use(&self, id: u64, perm: Perm, shared: Perm) -> BlockResult<()> {
        let old = {
            let mut st = lock(&self.state);
            let Some(u) = st.uses.iter_mut().find(|u| u.id == id) else {
                return Ok(());
            };
            let old = (u.perm, u.shared);
            (u.perm, u.shared) = (perm, shared);
            old
        };
        if old == (perm, shared) {
            return Ok(());
        }
        if let Err(e) = self.refresh_perms() {
            if let Some(u) = lock(&self.state).uses.iter_mut().find(|u| u.id == id) {
                (u.perm, u.shared) = old;
            }
            let _ = self.refresh_perms();
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn remove_use(&self, id: u64) {
        lock(&self.state).uses.retain(|u| u.id != id);
        // Loosening cannot conflict; a lock-release failure leaves extra locks only.
        let _ = self.refresh_perms();
    }

    fn refresh_perms(&self) -> BlockResult<()> {
        let (perm, shared) = {
            let st = lock(&self.state);
            check_conflicts(&self.name, &st.uses)?;
            cumulative(&st.uses)
        };
        if !self.is_writable() && !(perm & (Perm::WRITE | Perm::WRITE_UNCHANGED)).is_empty() {
            return Err(BlockError::new("Block node is read-only"));
        }
        self.driver.check_perm(perm, shared)?;
        for edge in &self.children() {
            let (cp, mut cs) = edge.kind.child_perms(perm, shared, self.is_writable());
            // `force-share` on the child: its parents share everything (QEMU's
            // `bdrv_child_perm`).
            if edge.node.flags.force_share {
                cs = Perm::ALL;
            }
            // An inactive node lets others write and resize what it is made of (QEMU's
            // default permissions for an inactive node's children).
            if !self.is_active() && edge.kind != ChildKind::Filtered {
                cs = cs | Perm::WRITE | Perm::RESIZE;
            }
            if let Err(e) = edge.node.update_use(edge.use_id, cp, cs) {
                self.driver.abort_perm();
                return Err(e);
            }
        }
        self.driver.set_perm(perm, shared);
        Ok(())
    }

    // ---- op blockers ----

    /// The node's op blockers (QEMU's `bs->op_blockers`).
    pub fn op_blockers(&self) -> &Arc<OpBlockers> {
        &self.blockers
    }

    /// Blocks `ops` on the node with `reason`, e.g. `block device is in use by block job:
    /// backup`, until the blocker drops.
    pub fn block_ops(&self, reason: &str, ops: OpSet) -> OpBlocker {
        self.blockers.block(reason, ops)
    }

    /// `Node '<name>' is busy: <reason>` if `op` is blocked (QEMU's `bdrv_op_is_blocked`).
    pub fn check_op(&self, op: BlockOp) -> BlockResult<()> {
        self.blockers.check(&self.name, op).map_err(BlockError::new)
    }

    // ---- I/O ----

    /// Size in bytes, rounded up to 512 as QEMU reports it.
    pub fn size(&self) -> BlockResult<u64> {
        Ok(self.driver.size()?.div_ceil(512) * 512)
    }

    /// Reads `buf.len()` bytes at `offset` (holding what the before-read hooks return).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.check_open()?;
        check_request(offset, buf.len() as u64)?;
        let _held = self.notify_before_read(offset, buf.len() as u64);
        self.driver.read_at(offset, buf)
    }

    /// Registers `hook`, run around every read of this node until the returned handle drops.
    pub fn add_read_notifier(self: &Arc<Self>, hook: Arc<dyn BeforeRead>) -> NotifierHandle {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        lock(&self.read_notifiers).push((id, hook));
        NotifierHandle {
            node: Arc::downgrade(self),
            id,
        }
    }

    fn notify_before_read(&self, offset: u64, len: u64) -> Vec<Box<dyn Send>> {
        let hooks = lock(&self.read_notifiers);
        if hooks.is_empty() {
            return Vec::new();
        }
        let hooks: Vec<Arc<dyn BeforeRead>> = hooks.iter().map(|(_, h)| h.clone()).collect();
        hooks.iter().map(|h| h.before_read(offset, len)).collect()
    }

    fn check_open(&self) -> BlockResult<()> {
        if self.is_closed() {
            return Err(BlockError::from_errno(libc::ENOMEDIUM));
        }
        Ok(())
    }

    fn check_writable(&self) -> BlockResult<()> {
        self.check_open()?;
        if !self.is_writable() {
            return Err(BlockError::from_errno(libc::EPERM));
        }
        Ok(())
    }

    /// Registers `hook`, run before every write (data or zeroes) to this node until the
    /// returned handle drops.
    pub fn add_write_notifier(self: &Arc<Self>, hook: Arc<dyn BeforeWrite>) -> NotifierHandle {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        lock(&self.write_notifiers).push((id, hook));
        NotifierHandle {
            node: Arc::downgrade(self),
            id,
        }
    }

    /// Runs the before-write hooks for `[offset, offset + len)`; the first error fails the
    /// write.
    fn notify_before_write(&self, offset: u64, len: u64) -> BlockResult<()> {
        let hooks: Vec<Arc<dyn BeforeWrite>> = lock(&self.write_notifiers)
            .iter()
            .map(|(_, h)| h.clone())
            .collect();
        for hook in hooks {
            hook.before_write(offset, len)?;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` as one request, after the before-write hooks; marks recording
    /// bitmaps (even on failure: the data may be partly written). With `detect-zeroes`, a
    /// buffer of zeroes is written as zeroes (allowed to unmap with `unmap`), as QEMU's
    /// `bdrv_aligned_pwritev` does.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        use qmp_api::BlockdevDetectZeroesOptions as Detect;
        self.check_writable()?;
        check_request(offset, buf.len() as u64)?;
        if self.flags.detect_zeroes != Detect::Off
            && !buf.is_empty()
            && crate::base_options::is_zero(buf)
        {
            let unmap = self.flags.detect_zeroes == Detect::Unmap;
            return self.write_zeroes_flags(offset, buf.len() as u64, unmap);
        }
        self.write_request(offset, buf.len() as u64, || {
            self.driver.write_at(offset, buf)
        })
    }

    /// A write of `[offset, offset + len)` done by `io`, with what every write does around it:
    /// the before-write hooks, request tracking, blkdebug events, dirty bitmaps and the
    /// highest offset written (marked even on failure: the data may be partly written).
    fn write_request<R>(
        &self,
        offset: u64,
        len: u64,
        io: impl FnOnce() -> BlockResult<R>,
    ) -> BlockResult<R> {
        self.notify_before_write(offset, len)?;
        let _request = self.requests.begin(offset, len, false);
        self.debug_event(BlkdebugEvent::Pwritev);
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        let r = io();
        self.debug_event(BlkdebugEvent::PwritevDone);
        self.mark_dirty(offset, len);
        self.wr_highest_offset
            .fetch_max(offset + len, Ordering::Relaxed);
        r
    }

    /// The `file` node this node's data lies in unchanged (itself, or below `raw` nodes
    /// without `offset`/`size`), with the nodes on the way: where a copy can be offloaded.
    fn data_file_path(self: &Arc<Self>) -> Option<Vec<Arc<BlockNode>>> {
        let mut path = vec![self.clone()];
        loop {
            let node = path.last()?.clone();
            match node.driver_name() {
                "file" => return Some(path),
                "raw" => {
                    let opts = node.options();
                    if opts.get("offset").is_some() || opts.get("size").is_some() {
                        return None;
                    }
                    path.push(node.child("file")?);
                }
                _ => return None,
            }
        }
    }

    /// Copies `[offset, offset + len)` of this node to the same place in `target` inside
    /// the kernel (`copy_file_range`, QEMU's `bdrv_co_copy_range`) when both are files or
    /// plain `raw` nodes over files; the target's nodes see it as a write (hooks, bitmaps).
    /// `Ok(false)`: no offload here (other formats, `cache.direct`, a file system without
    /// it), nothing was written, the caller copies through memory.
    pub fn copy_range_to(
        self: &Arc<Self>,
        target: &Arc<BlockNode>,
        offset: u64,
        len: u64,
    ) -> BlockResult<bool> {
        let (Some(from), Some(to)) = (self.data_file_path(), target.data_file_path()) else {
            return Ok(false);
        };
        self.check_open()?;
        check_request(offset, len)?;
        for node in &to {
            node.check_writable()?;
        }
        let (Some(src), Some(dst)) = (from.last(), to.last()) else {
            return Ok(false);
        };
        // The writes on the way down, outermost first.
        fn through(
            nodes: &[Arc<BlockNode>],
            offset: u64,
            len: u64,
            io: &mut dyn FnMut() -> BlockResult<bool>,
        ) -> BlockResult<bool> {
            match nodes.split_first() {
                None => io(),
                Some((node, rest)) => {
                    node.write_request(offset, len, || through(rest, offset, len, io))
                }
            }
        }
        let mut offload = || -> BlockResult<bool> {
            let copied = src.driver.with_fd(&mut |sfd| {
                dst.driver
                    .with_fd(&mut |dfd| copy_file_range_all(sfd, dfd, offset, len))
                    .unwrap_or(Ok(0))
            });
            match copied {
                None | Some(Ok(0)) if len > 0 => Ok(false),
                Some(Ok(n)) if n < len => {
                    // The source file ends here: the rest reads as zeroes.
                    dst.driver.write_zeroes_at(offset + n, len - n)?;
                    Ok(true)
                }
                Some(Ok(_)) | None => Ok(true),
                Some(Err(e)) => Err(e.into()),
            }
        };
        // Whether the kernel can copy is known only by trying, inside the target's write
        // requests: after a refusal (nothing written) the caller's copy through memory runs
        // the hooks and marks the bitmaps again, which finds their work done.
        through(&to, offset, len, &mut offload)
    }

    /// This node as a shared handle (`None` only while it is being dropped).
    pub(crate) fn arc(&self) -> Option<Arc<BlockNode>> {
        self.me.upgrade()
    }

    /// The end of the highest write to this node so far (QEMU's `wr_highest_offset`).
    pub fn wr_highest_offset(&self) -> u64 {
        self.wr_highest_offset.load(Ordering::Relaxed)
    }

    /// Writes `len` zeros at `offset`, after the before-write hooks; marks recording bitmaps.
    pub fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes_flags(offset, len, false)
    }

    /// Writes `len` zeros at `offset` with QEMU's `BDRV_REQ_MAY_UNMAP`: the driver may free
    /// the storage behind them if the node was opened with `discard=unmap` (else the flag is
    /// dropped, as QEMU drops it).
    pub fn write_zeroes_unmap_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes_flags(offset, len, true)
    }

    fn write_zeroes_flags(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()> {
        self.check_writable()?;
        check_request(offset, len)?;
        self.notify_before_write(offset, len)?;
        let _request = self.requests.begin(offset, len, false);
        self.debug_event(BlkdebugEvent::PwritevZero);
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        let r = if may_unmap && self.discard_unmaps() {
            self.driver.write_zeroes_unmap_at(offset, len)
        } else {
            self.driver.write_zeroes_at(offset, len)
        };
        self.debug_event(BlkdebugEvent::PwritevDone);
        self.mark_dirty(offset, len);
        self.wr_highest_offset
            .fetch_max(offset + len, Ordering::Relaxed);
        r
    }

    /// Whether writes of compressed clusters reach a format that stores them.
    pub fn supports_compressed_writes(&self) -> bool {
        self.driver.supports_compressed_writes()
    }

    /// Writes one cluster compressed, after the before-write hooks; marks recording bitmaps.
    pub fn write_compressed_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.check_writable()?;
        check_request(offset, buf.len() as u64)?;
        self.notify_before_write(offset, buf.len() as u64)?;
        self.debug_event(BlkdebugEvent::Pwritev);
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        let r = self.driver.write_compressed_at(offset, buf);
        self.debug_event(BlkdebugEvent::PwritevDone);
        self.mark_dirty(offset, buf.len() as u64);
        r
    }

    /// Writes `len` zeroes at `offset` only if the driver can do it fast, else fails with
    /// `ENOTSUP` (QEMU's `BDRV_REQ_NO_FALLBACK`); after the before-write hooks, like any write.
    /// Marks recording bitmaps when it succeeds.
    pub fn write_zeroes_fast_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        check_request(offset, len)?;
        self.notify_before_write(offset, len)?;
        self.debug_event(BlkdebugEvent::PwritevZero);
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        let r = self.driver.write_zeroes_fast_at(offset, len);
        self.debug_event(BlkdebugEvent::PwritevDone);
        if r.is_ok() {
            self.mark_dirty(offset, len);
        }
        r
    }

    /// Whether the node was opened with `discard=unmap` (QEMU's `BDRV_O_UNMAP`).
    pub fn discard_unmaps(&self) -> bool {
        self.flags.discard_unmap
    }

    /// Discards `[offset, offset + len)` as QEMU's `bdrv_co_pdiscard`: nothing unless the
    /// node was opened with `discard=unmap`; else after the before-write hooks, marking
    /// recording bitmaps.
    pub fn discard_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        check_request(offset, len)?;
        if !self.discard_unmaps() {
            return Ok(());
        }
        self.discard_child_at(offset, len)
    }

    /// A parent's discard passed down to this node (a filter's or a raw node's `file`): the
    /// parent decided to pass it (QEMU's children inherit `BDRV_O_UNMAP`), so this node's own
    /// `discard` option does not stop it. After the before-write hooks, marking recording
    /// bitmaps.
    pub fn discard_child_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        check_request(offset, len)?;
        self.notify_before_write(offset, len)?;
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        let r = self.driver.discard_at(offset, len);
        self.mark_dirty(offset, len);
        r
    }

    /// Flushes this node, then its children.
    pub fn flush(&self) -> BlockResult<()> {
        self.check_open()?;
        let _one_at_a_time = lock(&self.flushing);
        let generation = self.write_gen.load(Ordering::Acquire);
        let written = generation != self.flushed_gen.load(Ordering::Acquire);
        self.flush_driver_and_children(written)?;
        self.flushed_gen.store(generation, Ordering::Release);
        Ok(())
    }

    fn flush_driver_and_children(&self, written: bool) -> BlockResult<()> {
        self.debug_event(BlkdebugEvent::FlushToOs);
        // `cache.no-flush`: what reaches the disk is not forced there (a format's own
        // write-back still happens, and the children flush as their options say). Nothing
        // written since the last flush: nothing to force either (QEMU's `flushed_gen` check).
        if !(self.driver.flushes_to_disk() && (self.flags.no_flush || !written)) {
            self.driver.flush()?;
        }
        for edge in &self.children() {
            edge.node.flush()?;
        }
        Ok(())
    }

    /// Resizes the node (and its bitmaps). A read-only node refuses (`Image is read-only`);
    /// a format with persistent bitmaps refuses while one is busy, read-only or inconsistent
    /// (QEMU's `qcow2_truncate_bitmaps_check`).
    pub fn truncate(&self, size: u64) -> BlockResult<()> {
        self.check_open()?;
        if self.is_read_only() {
            return Err(BlockError::with_errno("Image is read-only", libc::EACCES));
        }
        if self.driver.bitmap_store().is_some() {
            for b in lock(&self.bitmaps).iter().filter(|b| b.is_persistent()) {
                let name = b.name().unwrap_or("");
                let why = if b.is_busy() {
                    "is currently in use by another operation and cannot be used"
                } else if b.is_readonly() {
                    "is readonly and cannot be modified"
                } else if b.is_inconsistent() {
                    "is inconsistent and cannot be used"
                } else {
                    continue;
                };
                return Err(BlockError::with_errno(
                    format!("Bitmap '{name}' {why}"),
                    libc::ENOTSUP,
                ));
            }
        }
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        self.driver.truncate(size)?;
        let new = self.size()?;
        for b in lock(&self.bitmaps).iter_mut() {
            b.resize(new);
        }
        Ok(())
    }

    /// Allocation status at `offset` for up to `len` bytes: `(allocated, bytes)`.
    pub fn block_status(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        self.check_open()?;
        self.driver.block_status(offset, len)
    }

    /// Like [`BlockNode::block_status`], also telling whether the range is allocated as
    /// zeroes in this layer: `(allocated, zero, bytes)`.
    pub fn zero_status(&self, offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        self.check_open()?;
        self.driver.zero_status(offset, len)
    }

    /// The state of the range starting at `offset` (at most `len` bytes): allocated here, and
    /// whether it reads as zeroes (allocated as zeroes, or unallocated with nothing below).
    pub fn extent(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let (allocated, zero, n) = self.zero_status(offset, len)?;
        // A filter allocates nothing itself: what it shows is its filtered child's (QEMU's
        // `bdrv_co_block_status` passes a filter's status down).
        if !allocated
            && let Some(below) = self
                .children()
                .into_iter()
                .find(|edge| edge.kind.is_filtered())
        {
            let n = if n == 0 { len } else { n.min(len) };
            return below.node.extent(offset, n);
        }
        // An unallocated range with no backing file below reads as zeroes, unless the driver
        // says its holes need not (an NBD export's hole not flagged zero).
        let reads_zero = self.child("backing").is_none() && self.driver.unallocated_reads_zero();
        Ok(Extent {
            len: n,
            allocated,
            zero: zero || (!allocated && reads_zero),
        })
    }

    /// Whether `other` is this node or a layer below it (through filters and backing files).
    pub fn chain_contains(self: &Arc<Self>, other: &Arc<BlockNode>) -> bool {
        let mut layer = Some(self.clone());
        while let Some(node) = layer {
            if Arc::ptr_eq(&node, other) {
                return true;
            }
            layer = node.layer_below();
        }
        false
    }

    /// The layer below this node whose data shows through it: a filter's child, or the
    /// backing file.
    pub fn layer_below(&self) -> Option<Arc<BlockNode>> {
        let children = self.children();
        children
            .iter()
            .find(|edge| edge.kind.is_filtered())
            .or_else(|| children.iter().find(|edge| edge.kind == ChildKind::Backing))
            .map(|edge| edge.node.clone())
    }

    /// How `len` bytes at `offset` read through the chain (QEMU's
    /// `bdrv_block_status_above`): the first layer that allocates the range decides (data, or
    /// allocated as zeroes); a range no layer allocates reads as zeroes.
    pub fn chain_status(self: &Arc<Self>, offset: u64, len: u64) -> BlockResult<ChainStatus> {
        let mut layer = self.clone();
        let mut len = len;
        let mut depth = 1;
        loop {
            let size = layer.size()?;
            if offset >= size {
                // Past the end of a shorter backing file: zeroes.
                return Ok(ChainStatus::unallocated(len));
            }
            let (allocated, zero, n) = layer.zero_status(offset, len.min(size - offset))?;
            // A layer that cannot have a backing file holds all its data itself.
            let below = layer.layer_below();
            let allocated = allocated || !layer.driver().supports_backing() && below.is_none();
            if n > 0 {
                len = len.min(n);
            }
            if allocated {
                return Ok(ChainStatus {
                    data: !zero,
                    zero,
                    depth,
                    len,
                });
            }
            match below {
                Some(next) => {
                    layer = next;
                    depth += 1;
                }
                None => return Ok(ChainStatus::unallocated(len)),
            }
        }
    }

    /// QEMU's `bdrv_is_allocated_above(self, bottom, include_base=true)`: whether the range
    /// starting at `offset` (at most `len` bytes) is allocated in some layer from this node
    /// down to the layer named `bottom` (inclusive; `None`: the whole chain), and for how many
    /// bytes that answer holds. Past the end of a shorter layer counts as unallocated there.
    pub fn allocated_above(
        self: &Arc<Self>,
        bottom: Option<&str>,
        offset: u64,
        len: u64,
    ) -> BlockResult<(bool, u64)> {
        let mut layer = self.clone();
        let mut len = len;
        loop {
            let size = layer.size()?;
            if offset < size {
                let (allocated, n) = layer.block_status(offset, len.min(size - offset))?;
                if n > 0 {
                    len = len.min(n);
                }
                if allocated {
                    return Ok((true, len));
                }
            }
            if bottom == Some(layer.name()) {
                return Ok((false, len));
            }
            match layer.layer_below() {
                Some(next) => layer = next,
                None => return Ok((false, len)),
            }
        }
    }

    /// One step of copy-on-read (QEMU's `copy-on-read` filter reading with
    /// `BDRV_REQ_PREFETCH`, what a stream job does), on the range starting at `offset` (at
    /// most `len` bytes): where this node allocates it, or where no layer from its backing
    /// file down to the layer named `bottom` (inclusive; `None`: the whole chain) does, there
    /// is nothing to copy; otherwise the data is read through the chain and written into this
    /// node's own layer. Returns how many bytes from `offset` the step covered and whether it
    /// copied them (0 bytes: past the end of every layer).
    ///
    /// The copy holds its range against writes (see [`crate::requests`]): a write to it waits,
    /// and one that landed before is seen allocated and kept. The data written is the data
    /// the node already reads, so it goes straight to the driver, as QEMU's
    /// `BDRV_REQ_WRITE_UNCHANGED` does: no bitmap is marked and no before-write hook runs.
    /// `buf` is the bounce buffer (any size above zero).
    pub fn copy_on_read(
        &self,
        offset: u64,
        len: u64,
        bottom: Option<&str>,
        buf: &mut [u8],
    ) -> BlockResult<(u64, bool)> {
        self.check_writable()?;
        check_request(offset, len)?;
        if bottom == Some(self.name()) {
            // The node itself is the lowest layer to copy from: nothing is.
            return Ok((len, false));
        }
        let (allocated, n) = self.block_status(offset, len)?;
        if allocated || n == 0 {
            return Ok((n, false));
        }
        let Some(backing) = self.child("backing") else {
            return Ok((n, false));
        };
        let (above, n) = backing.allocated_above(bottom, offset, n)?;
        if !above || n == 0 {
            return Ok((n, false));
        }
        let _request = self.requests.begin(offset, n, true);
        let end = offset + n;
        let mut pos = offset;
        while pos < end {
            // A write may have allocated part of the range before the copy held it.
            let (allocated, run) = self.block_status(pos, end - pos)?;
            let run = run.clamp(1, end - pos);
            if !allocated {
                let mut done = 0;
                while done < run {
                    let step = (run - done).min(buf.len() as u64) as usize;
                    self.read_at(pos + done, &mut buf[..step])?;
                    self.driver.write_at(pos + done, &buf[..step])?;
                    done += step as u64;
                }
            }
            pos += run;
        }
        Ok((n, true))
    }

    /// Delivers a blkdebug event to this node's driver (format drivers call this on their
    /// `file` child, e.g. `write_aio` before a data write).
    pub fn debug_event(&self, event: BlkdebugEvent) {
        self.driver.debug_event(event);
    }

    // ---- bitmaps ----

    fn mark_dirty(&self, offset: u64, len: u64) {
        for b in lock(&self.bitmaps).iter_mut() {
            b.record_write(offset, len);
        }
    }

    /// The node's dirty bitmaps, newest first (locked while the guard lives).
    pub fn bitmaps(&self) -> MutexGuard<'_, Vec<DirtyBitmap>> {
        lock(&self.bitmaps)
    }

    /// The default granularity for new bitmaps: the cluster size clamped to 4 KiB..64 KiB, or
    /// 64 KiB.
    pub fn default_bitmap_granularity(&self) -> u64 {
        match self.driver.info().cluster_size {
            Some(c) if c > 0 => c.clamp(4096, 65536),
            _ => 65536,
        }
    }

    // ---- lifetime ----

    /// Stores persistent bitmaps and flushes (the node stays open).
    pub fn store_bitmaps(&self) -> BlockResult<()> {
        if self.is_read_only() {
            return Ok(());
        }
        if let Some(store) = self.driver.bitmap_store() {
            let persistent: Vec<DirtyBitmap> = self
                .bitmaps()
                .iter()
                .filter(|b| b.is_persistent() && !b.skips_store())
                .cloned()
                .collect();
            store.store_bitmaps(&persistent)?;
        }
        Ok(())
    }

    /// Stores bitmaps, closes the driver, and releases the permissions taken on children.
    pub(crate) fn close(&self) -> BlockResult<()> {
        self.close_storing(true)
    }

    /// Closes; with `store_bitmaps` false the image's stored bitmaps are left untouched (a node
    /// whose bitmaps failed to load).
    pub(crate) fn close_storing(&self, store_bitmaps: bool) -> BlockResult<()> {
        // As QEMU's `bdrv_close`: a node written since its last flush is flushed (with its
        // children) first; an error there is the close's error.
        let unflushed =
            self.write_gen.load(Ordering::Acquire) != self.flushed_gen.load(Ordering::Acquire);
        let flushed = if !self.is_closed() && unflushed && !self.driver.flushes_at_close() {
            self.flush()
        } else {
            Ok(())
        };
        if self.closed.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let stored = if store_bitmaps {
            self.store_bitmaps()
        } else {
            Ok(())
        };
        let closed = self.driver.close();
        for edge in &self.children() {
            edge.node.remove_use(edge.use_id);
            if let Some(id) = edge.blocker {
                edge.node.blockers.remove(id);
            }
        }
        flushed.and(stored).and(closed)
    }
}

/// Requests must end below 2^63 (QEMU's `BDRV_MAX_LENGTH` bound): EIO otherwise.
/// `copy_file_range` of `[offset, offset + len)` from `from` to `to` until done or the
/// source ends: the bytes copied. A refusal before the first byte (another file system, no
/// support) is `Ok(0)`.
fn copy_file_range_all(from: i32, to: i32, offset: u64, len: u64) -> std::io::Result<u64> {
    let mut done = 0u64;
    while done < len {
        let (Ok(mut off_in), Ok(rest)) = (
            libc::loff_t::try_from(offset + done),
            usize::try_from(len - done),
        ) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        let mut off_out = off_in;
        // SAFETY: both descriptors are open for the call (held by their drivers), and the
        // offsets are plain integers we own.
        let n = unsafe {
            libc::copy_file_range(from, &mut off_in, to, &mut off_out, rest.min(1 << 30), 0)
        };
        match n {
            0 => break,
            n if n > 0 => done += n as u64,
            _ => {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
                        if done == 0 =>
                    {
                        return Ok(0);
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(done)
}

fn check_request(offset: u64, len: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(BlockError::from_errno(libc::EIO)),
    }
}

fn cumulative(uses: &[PermUse]) -> (Perm, Perm) {
    uses.iter().fold((Perm::NONE, Perm::ALL), |(p, s), u| {
        (p | u.perm, s & u.shared)
    })
}

fn check_conflicts(node: &str, uses: &[PermUse]) -> BlockResult<()> {
    for a in uses {
        for b in uses {
            if a.id == b.id {
                continue;
            }
            let denied = b.perm & !a.shared;
            if !denied.is_empty() {
                return Err(BlockError::new(format!(
                    "Permission conflict on node '{node}': permissions '{denied}' are both \
                     required by {} (uses node '{node}' as '{}' child) and unshared by {} (uses \
                     node '{node}' as '{}' child).",
                    b.holder, b.role, a.holder, a.role
                )));
            }
        }
    }
    Ok(())
}

/// Permissions held on a node; released on drop.
pub struct PermGrant {
    node: Arc<BlockNode>,
    id: u64,
}

impl PermGrant {
    /// The node the permissions are on.
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }

    /// Changes the permissions held (rolled back on failure).
    pub fn update(&self, perm: Perm, shared: Perm) -> BlockResult<()> {
        self.node.update_use(self.id, perm, shared)
    }
}

impl Drop for PermGrant {
    fn drop(&mut self) {
        self.node.remove_use(self.id);
    }
}

impl std::fmt::Debug for BlockNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockNode")
            .field("name", &self.name)
            .field("driver", &self.driver_name)
            .field("read_only", &self.is_read_only())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod write_notifier_tests {
    use super::*;
    use crate::graph::BlockGraph;
    use crate::test_support::AddJson;
    use serde_json::json;

    struct Recorder {
        node: Arc<BlockNode>,
        seen: Mutex<Vec<(u64, u64, Vec<u8>)>>,
        fail: bool,
    }

    impl BeforeWrite for Recorder {
        fn before_write(&self, offset: u64, len: u64) -> BlockResult<()> {
            let mut old = vec![0; len as usize];
            self.node.read_at(offset, &mut old)?;
            lock(&self.seen).push((offset, len, old));
            if self.fail {
                return Err(BlockError::from_errno(libc::EIO));
            }
            Ok(())
        }
    }

    fn node(dir: &tempfile::TempDir) -> Arc<BlockNode> {
        let path = dir.path().join("n.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        BlockGraph::new()
            .blockdev_add_json(&json!({"driver": "file", "node-name": "n", "filename": path}))
            .unwrap()
    }

    #[test]
    fn a_write_notifier_sees_the_old_data_before_each_write_until_its_handle_drops() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(&dir);
        n.write_at(0, &[1; 512]).unwrap();
        let rec = Arc::new(Recorder {
            node: n.clone(),
            seen: Mutex::new(Vec::new()),
            fail: false,
        });
        let handle = n.add_write_notifier(rec.clone());
        n.write_at(0, &[2; 512]).unwrap();
        n.write_zeroes_at(4096, 512).unwrap();
        drop(handle);
        n.write_at(0, &[3; 512]).unwrap();
        let seen = lock(&rec.seen).clone();
        assert_eq!(
            seen,
            vec![(0, 512, vec![1; 512]), (4096, 512, vec![0; 512])]
        );
    }

    #[test]
    fn a_failing_write_notifier_fails_the_write_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(&dir);
        n.write_at(0, &[1; 512]).unwrap();
        let _handle = n.add_write_notifier(Arc::new(Recorder {
            node: n.clone(),
            seen: Mutex::new(Vec::new()),
            fail: true,
        }));
        let e = n.write_at(0, &[2; 512]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EIO));
        let mut buf = [0; 512];
        n.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [1; 512]);
    }
}
