//! `blockdev-reopen` (QEMU's `bdrv_reopen_multiple`): a list of nodes reopened with new
//! option sets, all or none. The nodes named, and the children they opened themselves
//! (QEMU's `inherits_from`), form a queue; every entry is checked in QEMU's order and words
//! (options that cannot be reset or changed, `backing` missing, a new `backing` or `file`
//! that does not exist or would make a cycle), then the permissions the new read-only flags
//! and children need; only then does anything change: children swapped, nodes made
//! read-only parents first, read-write children first, the new options recorded.

use std::collections::BTreeMap;
use std::sync::Arc;

use qmp_api::BlockdevOptions;
use serde_json::Value;

use crate::driver::ChildKind;
use crate::error::{BlockError, BlockResult};
use crate::graph::BlockGraph;
use crate::node::BlockNode;
use crate::perm::Perm;

/// Options every driver handles in a reopen (QEMU's `bdrv_reset_options_allowed`): they may
/// be left out, going back to their defaults.
const COMMON: &[&str] = &[
    "node-name",
    "discard",
    "cache.direct",
    "cache.no-flush",
    "read-only",
    "auto-read-only",
    "detect-zeroes",
];

/// Options a reopen takes from the generic layer (QEMU's `update_flags_from_options`, discard
/// and detect-zeroes): with their defaults.
const RUNTIME: &[(&str, Option<&str>)] = &[
    ("discard", Some("\"ignore\"")),
    ("detect-zeroes", Some("\"off\"")),
    ("cache.direct", Some("false")),
    ("cache.no-flush", Some("false")),
    ("auto-read-only", Some("false")),
];

/// A driver's options that a reopen may change (QEMU's `mutable_opts`).
fn mutable_options(driver: &str) -> &'static [&'static str] {
    match driver {
        "qcow2" => &[
            "lazy-refcounts",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "discard-no-unref",
            "overlap-check",
            "overlap-check.template",
            "overlap-check.main-header",
            "overlap-check.active-l1",
            "overlap-check.active-l2",
            "overlap-check.refcount-table",
            "overlap-check.refcount-block",
            "overlap-check.snapshot-table",
            "overlap-check.inactive-l1",
            "overlap-check.inactive-l2",
            "overlap-check.bitmap-directory",
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
            "cache-clean-interval",
        ],
        "raw" => &["offset", "size"],
        "file" => &["x-check-cache-dropped"],
        _ => &[],
    }
}

/// Of the mutable options, those the driver itself checks and takes in a reopen
/// ([`crate::BlockDriver::prepare_reopen`]): qcow2's caches and overlap checks act as at open,
/// its discard passing is refused by name where it would ask for what this block layer does
/// not do, as at open.
fn is_tuning_knob(driver: &str, key: &str) -> bool {
    driver == "qcow2"
        && (key.starts_with("overlap-check")
            || matches!(
                key,
                "pass-discard-request"
                    | "pass-discard-snapshot"
                    | "pass-discard-other"
                    | "discard-no-unref"
                    | "cache-size"
                    | "l2-cache-size"
                    | "l2-cache-entry-size"
                    | "refcount-cache-size"
                    | "cache-clean-interval"
            ))
}

/// QEMU's `qdict_flatten`: nested objects and lists become dotted keys.
fn flatten(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        // An empty object stays as it is (QEMU's `qdict_flatten`): an option of its own.
        Value::Object(m) if m.is_empty() && !prefix.is_empty() => {
            out.insert(prefix.to_string(), v.clone());
        }
        Value::Object(m) => {
            for (k, v) in m {
                flatten(v, &key(k), out);
            }
        }
        Value::Array(a) if !prefix.is_empty() => {
            for (i, v) in a.iter().enumerate() {
                flatten(v, &key(&i.to_string()), out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// A node's options without its children's keys, flattened.
fn own_options(options: &Value, roles: &[String]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Value::Object(m) = options {
        for (k, v) in m {
            if !roles.contains(k) {
                flatten(v, k, &mut out);
            }
        }
    }
    out
}

/// What happens to a child role of a queued node.
#[derive(Clone)]
enum ChildChange {
    /// The child stays.
    Keep,
    /// `backing: null`: detached.
    Detach,
    /// Another node takes its place (or, for a node without one, becomes its backing).
    Replace(Arc<BlockNode>),
}

/// One node of the queue.
struct Entry {
    node: Arc<BlockNode>,
    /// The options it is reopened with (a definition's, or its own for a reference to the
    /// current child).
    options: Value,
    /// Read-only after the reopen.
    read_only: bool,
    /// Active after the reopen (QEMU's `active: false` sets `BDRV_O_INACTIVE`).
    active: bool,
    /// `active: false` came from the parent.
    active_inherited: bool,
    backing: ChildChange,
    file: ChildChange,
    /// The options as the driver reads them (checked by its `prepare_reopen`).
    parsed: Option<BlockdevOptions>,
}

fn bool_option(options: &Value, key: &str) -> Option<bool> {
    options.get(key).and_then(Value::as_bool)
}

/// Whether `node` can be reached from `root` (QEMU's `bdrv_recurse_has_child`).
fn reaches(root: &Arc<BlockNode>, node: &Arc<BlockNode>) -> bool {
    Arc::ptr_eq(root, node) || root.children().iter().any(|e| reaches(&e.node, node))
}

/// What a child queued through its parent takes from it (QEMU's `inherit_options`).
#[derive(Clone, Copy)]
struct Inherited {
    /// The parent's explicit `read-only`.
    read_only: Option<bool>,
    /// The child is a backing file (read-only unless its own options say otherwise).
    backing: bool,
    /// The parent is active after the reopen.
    active: bool,
    /// The child is reopened with its own options (named by reference).
    keep_old: bool,
}

struct Queue {
    entries: Vec<Entry>,
}

impl Queue {
    fn position(&self, node: &Arc<BlockNode>) -> Option<usize> {
        self.entries.iter().position(|e| Arc::ptr_eq(&e.node, node))
    }

    /// Writable after the reopen: read-write and active (QEMU's
    /// `bdrv_is_writable_after_reopen`).
    fn writable_after(&self, node: &Arc<BlockNode>) -> bool {
        match self.position(node) {
            Some(i) => !self.entries[i].read_only && self.entries[i].active,
            None => node.is_writable(),
        }
    }

    /// QEMU's `bdrv_reopen_queue_child`: queues `node` with `options` (merged with the
    /// options of an earlier entry for it, which win where the new ones are silent), then
    /// the children it opened itself: with a definition's options, or their own options for
    /// a reference to them; a child being replaced or detached is not reopened.
    fn add(&mut self, node: &Arc<BlockNode>, options: Value, parent: Option<Inherited>) {
        let options = match self.position(node) {
            Some(i) => {
                let old = self.entries.remove(i).options;
                let mut merged = options.as_object().cloned().unwrap_or_default();
                if let Value::Object(old) = old {
                    for (k, v) in old {
                        merged.entry(k).or_insert(v);
                    }
                }
                Value::Object(merged)
            }
            None => options,
        };
        // QEMU's precedence: the node's own option; a backing file's read-only default; the
        // parent's explicit option; for a child reopened with its own options, its state.
        let read_only = bool_option(&options, "read-only")
            .or(parent.and_then(|p| if p.backing { Some(true) } else { p.read_only }))
            .or(parent.filter(|p| p.keep_old).map(|_| node.is_read_only()))
            .unwrap_or(false);
        // QEMU starts from the node's flags (a child: its parent's new ones), and `active:
        // false` sets BDRV_O_INACTIVE; nothing in a reopen clears it.
        let base_active = parent.map_or(node.is_active(), |p| p.active);
        // An inactive parent's child takes its `active: false` into its (not explicit)
        // options: a later reopen that leaves it out tries to reset it.
        let active_inherited = parent.is_some_and(|p| !p.active) && options.get("active").is_none();
        let active = base_active && bool_option(&options, "active") != Some(false);
        self.entries.push(Entry {
            node: node.clone(),
            options: options.clone(),
            read_only,
            active,
            active_inherited,
            backing: ChildChange::Keep,
            file: ChildChange::Keep,
            parsed: None,
        });
        for edge in node.children() {
            if !edge.node.inherits_from(node) {
                continue;
            }
            let (child_options, keep_old) = match options.get(&edge.name) {
                Some(Value::Object(_)) => (options[&edge.name].clone(), false),
                Some(Value::String(s)) if *s == edge.node.name() => (edge.node.options(), true),
                _ => continue,
            };
            let inherited = Inherited {
                read_only: bool_option(&options, "read-only"),
                backing: edge.kind == ChildKind::Backing,
                active,
                keep_old,
            };
            self.add(&edge.node, child_options, Some(inherited));
        }
    }
}

/// The new child named by `value` for role `role` of `node` (QEMU's
/// `bdrv_reopen_parse_file_or_backing`).
fn parse_child(
    graph: &BlockGraph,
    node: &Arc<BlockNode>,
    role: &str,
    value: Option<&Value>,
) -> BlockResult<ChildChange> {
    let new = match value {
        None => return Ok(ChildChange::Keep),
        Some(Value::Null) => None,
        Some(Value::String(name)) if role == "backing" && name.is_empty() => None,
        Some(Value::String(name)) => {
            let child = graph.find(name).ok_or_else(|| {
                BlockError::new(format!("Cannot find device='' nor node-name='{name}'"))
            })?;
            if reaches(&child, node) {
                return Err(BlockError::new(format!(
                    "Making '{name}' a {role} child of '{}' would create a cycle",
                    node.name()
                )));
            }
            Some(child)
        }
        // A definition reopens the current child.
        Some(_) => return Ok(ChildChange::Keep),
    };
    let old = node.child(role);
    match (old, new) {
        (Some(o), Some(n)) if Arc::ptr_eq(&o, &n) => Ok(ChildChange::Keep),
        (None, None) => Ok(ChildChange::Keep),
        (_, None) => Ok(ChildChange::Detach),
        (_, Some(n)) => {
            if role != "backing" && !node.driver().follows_child(role) {
                return Err(BlockError::new(format!(
                    "Changing the '{role}' child of a '{}' node is not supported by this \
                     block layer",
                    node.driver_name()
                )));
            }
            Ok(ChildChange::Replace(n))
        }
    }
}

/// Checks one entry's options against the node's (QEMU's `bdrv_reopen_prepare`), and
/// records what happens to its `backing` and `file`.
fn prepare(graph: &BlockGraph, entry: &mut Entry) -> BlockResult<()> {
    let node = &entry.node;
    let driver = node.driver_name().to_string();
    let mut roles: Vec<String> = node.children().into_iter().map(|e| e.name).collect();
    for role in ["file", "backing"] {
        if !roles.iter().any(|r| r == role) {
            roles.push(role.to_string());
        }
    }
    let new = own_options(&entry.options, &roles);
    let mut old = own_options(&node.options(), &roles);
    if node.has_inherited_inactive_option() {
        old.entry("active".into()).or_insert(Value::Bool(false));
    }
    let mutable = mutable_options(&driver);
    // The generic layer parses discard and detect-zeroes first.
    let discard_unmap = matches!(
        new.get("discard").and_then(Value::as_str),
        Some("unmap" | "on")
    );
    if new.get("detect-zeroes").and_then(Value::as_str) == Some("unmap") && !discard_unmap {
        return Err(BlockError::new(
            "setting detect-zeroes to unmap is not allowed without setting discard operation \
             to unmap",
        ));
    }
    // Options set before that cannot go back to their defaults.
    for key in old.keys() {
        if !new.contains_key(key)
            && !COMMON.contains(&key.as_str())
            && !mutable.contains(&key.as_str())
        {
            return Err(BlockError::new(format!(
                "Option '{key}' cannot be reset to its default value"
            )));
        }
    }
    if node.driver().supports_backing()
        && entry.options.get("backing").is_none()
        && (node.child("backing").is_some() || node.driver().backing_file().is_some())
    {
        return Err(BlockError::new(format!(
            "backing is missing for '{}'",
            node.name()
        )));
    }
    entry.backing = parse_child(graph, node, "backing", entry.options.get("backing"))?;
    entry.file = parse_child(graph, node, "file", entry.options.get("file"))?;
    // Other children: a definition or the current child's name.
    for role in roles.iter().filter(|r| *r != "file" && *r != "backing") {
        let same = match (entry.options.get(role), node.child(role)) {
            (Some(Value::String(s)), Some(c)) => s == c.name(),
            (Some(Value::Object(_)) | None, _) => true,
            _ => false,
        };
        if !same {
            return Err(BlockError::new(format!(
                "Cannot change the option '{role}'"
            )));
        }
    }
    // What the generic layer and the driver take: this block layer changes only read-only.
    let effective = |opts: &BTreeMap<String, Value>, key: &str, default: Option<&str>| {
        opts.get(key)
            .cloned()
            .or_else(|| default.and_then(|d| serde_json::from_str(d).ok()))
    };
    for &(key, default) in RUNTIME {
        if effective(&new, key, default) != effective(&old, key, default) {
            return Err(BlockError::new(format!(
                "Changing option '{key}' in a reopen is not supported by this block layer"
            )));
        }
    }
    for &key in mutable {
        if !is_tuning_knob(&driver, key) && new.get(key) != old.get(key) {
            return Err(BlockError::new(format!(
                "Changing option '{key}' in a reopen is not supported by this block layer"
            )));
        }
    }
    // The driver's own options, checked by the driver (QEMU: its `bdrv_reopen_prepare`).
    if let Ok(parsed) = serde_json::from_value::<BlockdevOptions>(entry.options.clone()) {
        node.driver().prepare_reopen(&parsed)?;
        entry.parsed = Some(parsed);
    }
    // Everything else must stay as it is.
    for (key, value) in &new {
        let taken = key == "read-only"
            || key == "active"
            || RUNTIME.iter().any(|(k, _)| k == key)
            || mutable.contains(&key.as_str());
        if !taken && old.get(key) != Some(value) {
            return Err(BlockError::new(format!("Cannot change the option '{key}'")));
        }
    }
    Ok(())
}

/// Whether a user of `node` through `edge`-like use still writes it after the reopen.
fn needs_write_after(queue: &Queue, parent: &Arc<BlockNode>, kind: ChildKind, perm: Perm) -> bool {
    let writes = perm & (Perm::WRITE | Perm::WRITE_UNCHANGED) != Perm::NONE;
    match kind {
        ChildKind::Backing | ChildKind::SnapshotOf => false,
        // A copy-before-write filter writes its target whoever writes through it.
        ChildKind::CopyTarget => true,
        ChildKind::Metadata | ChildKind::Filtered | ChildKind::FilteredAdjusted { .. } => {
            writes && queue.writable_after(parent)
        }
    }
}

/// The permissions after the reopen (QEMU's `bdrv_list_refresh_perms` on the queue): a node
/// made read-only must have no writer left, a node made or staying writable must have
/// writable children, a new child must grant what the node needs.
fn check_perms(queue: &Queue) -> BlockResult<()> {
    for entry in &queue.entries {
        let node = &entry.node;
        if entry.read_only != node.is_read_only() && !(entry.active && node.is_active()) {
            return Err(BlockError::new(format!(
                "Switching read-only of the inactive node '{}' is not supported by this block \
                 layer",
                node.name()
            )));
        }
    }
    for entry in &queue.entries {
        let node = &entry.node;
        if !queue.writable_after(node) && node.is_writable() {
            for u in node.parent_uses_all() {
                let still = match &u.parent {
                    Some(parent) => {
                        let edge_kind = parent
                            .children()
                            .into_iter()
                            .find(|e| e.use_id == u.id)
                            .map(|e| e.kind);
                        let replaced = queue.position(parent).is_some_and(|i| {
                            let e = &queue.entries[i];
                            let change = if u.role == "backing" {
                                &e.backing
                            } else {
                                &e.file
                            };
                            !matches!(change, ChildChange::Keep)
                                && (u.role == "backing" || u.role == "file")
                        });
                        !replaced
                            && edge_kind
                                .is_some_and(|k| needs_write_after(queue, parent, k, u.perm))
                    }
                    None => u.perm & (Perm::WRITE | Perm::WRITE_UNCHANGED) != Perm::NONE,
                };
                if still {
                    return Err(BlockError::new(format!(
                        "Read-only block node '{}' cannot support read-write users",
                        node.name()
                    )));
                }
            }
        }
    }
    for entry in &queue.entries {
        let node = &entry.node;
        let (perm, _) = node.cumulative_perms();
        let writable_after = queue.writable_after(node);
        for edge in node.children() {
            let change = match edge.name.as_str() {
                "backing" => &entry.backing,
                "file" => &entry.file,
                _ => &ChildChange::Keep,
            };
            let child = match change {
                ChildChange::Keep => edge.node.clone(),
                ChildChange::Detach => continue,
                ChildChange::Replace(n) => n.clone(),
            };
            let needs_write = match edge.kind {
                ChildKind::Backing | ChildKind::SnapshotOf => false,
                ChildKind::CopyTarget => true,
                ChildKind::Metadata => writable_after,
                ChildKind::Filtered | ChildKind::FilteredAdjusted { .. } => {
                    writable_after && perm & (Perm::WRITE | Perm::WRITE_UNCHANGED) != Perm::NONE
                }
            };
            if needs_write && !queue.writable_after(&child) {
                return Err(BlockError::new("Block node is read-only"));
            }
        }
        if let ChildChange::Replace(n) = &entry.backing
            && node.child("backing").is_none()
            && !n.is_active()
            && node.is_active()
        {
            return Err(BlockError::new(format!(
                "Inactive '{}' can't be a backing child of active '{}'",
                n.name(),
                node.name()
            )));
        }
    }
    Ok(())
}

impl BlockGraph {
    /// `blockdev-reopen`: every entry's top-level `node-name` names a node; each is reopened
    /// with its options, with the children it opened itself, all or none. An empty list does
    /// nothing (qemu-storage-daemon 10.0.2 aborts on it).
    pub fn reopen(&mut self, list: &[BlockdevOptions]) -> BlockResult<()> {
        let mut queue = Queue {
            entries: Vec::new(),
        };
        for options in list {
            let Some(name) = options.node_name.as_deref() else {
                return Err(BlockError::new("node-name not specified"));
            };
            let node = self.find(name).ok_or_else(|| {
                BlockError::new(format!("Failed to find node with node-name='{name}'"))
            })?;
            let value = serde_json::to_value(options).unwrap_or(Value::Null);
            queue.add(&node, value, None);
        }
        for entry in &mut queue.entries {
            entry
                .node
                .flush()
                .map_err(|e| BlockError::new(format!("Error flushing drive: {}", e.desc())))?;
        }
        for i in 0..queue.entries.len() {
            prepare(self, &mut queue.entries[i])?;
        }
        check_perms(&queue)?;
        self.commit_reopen(queue)
    }

    fn commit_reopen(&mut self, queue: Queue) -> BlockResult<()> {
        // Children first swapped, so the read-only changes see the new graph.
        for entry in &queue.entries {
            match &entry.backing {
                ChildChange::Keep => {}
                ChildChange::Detach => self.set_backing(&entry.node, None)?,
                ChildChange::Replace(n) => self.set_backing(&entry.node, Some(n.clone()))?,
            }
            if let ChildChange::Replace(n) = &entry.file
                && let Some(old) = entry.node.replace_child_edge("file", n)?
                && !old.is_monitor_owned()
                && !old.is_in_use()
            {
                self.close_unused(&old)?;
            }
        }
        for entry in queue.entries.iter().filter(|e| e.read_only) {
            entry.node.make_read_only_self()?;
        }
        for entry in queue.entries.iter().rev().filter(|e| !e.read_only) {
            entry.node.make_read_write_self()?;
        }
        // `active` in the options: inactivated parents first, activated children first.
        for entry in queue.entries.iter().filter(|e| !e.active) {
            entry.node.inactivate_self()?;
        }
        for entry in queue.entries.iter().rev().filter(|e| e.active) {
            entry.node.activate_self()?;
        }
        for entry in &queue.entries {
            if let Some(parsed) = &entry.parsed {
                entry.node.driver().commit_reopen(parsed);
            }
            entry
                .node
                .set_options(entry.options.clone(), entry.active_inherited);
        }
        Ok(())
    }
}
