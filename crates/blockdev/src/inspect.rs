//! The commands that look at nodes: `x-debug-block-dirty-bitmap-sha256` (QEMU's
//! `hbitmap_sha256`), `x-debug-query-block-graph` (`bdrv_get_xdbg_block_graph`) and
//! `query-blockstats` (`bdrv_query_bds_stats`), laid out as QEMU lays them out.

use std::collections::HashMap;

use block::Perm;
use job::JobKey;
use qmp_api::{
    BlockDeviceStats, BlockDirtyBitmap, BlockDirtyBitmapSha256, BlockPermission, BlockStats,
    BlockStatsSpecific, BlockStatsSpecificBranch, BlockStatsSpecificFile, QmpError, XDbgBlockGraph,
    XDbgBlockGraphEdge, XDbgBlockGraphNode, XDbgBlockGraphNodeType,
};
use sha2::{Digest, Sha256};

use crate::BlockState;
use crate::bitmaps::{lookup, with_bitmap};
use crate::node::GraphNode;

/// The SHA-256 of a bitmap's bits as QEMU's `HBitmap` keeps its bottom level: one bit per
/// granule in little-endian 64-bit words, at least one word.
pub(crate) fn bitmap_sha256(
    env: &BlockState,
    args: &BlockDirtyBitmap,
) -> Result<BlockDirtyBitmapSha256, QmpError> {
    let graph = env
        .graph
        .as_deref()
        .ok_or_else(|| QmpError::generic("No block layer is available"))?;
    let node = lookup(graph, &args.node, &args.name)?;
    with_bitmap(&*node, &args.name, |b| {
        let mut hash = Sha256::new();
        for w in b.words() {
            hash.update(w.to_le_bytes());
        }
        if b.words().is_empty() {
            hash.update([0u8; 8]);
        }
        let sha256 = hash
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Ok(BlockDirtyBitmapSha256 { sha256 })
    })
}

/// QEMU's permission list of an edge: highest bit first.
fn perm_list(perm: Perm) -> Vec<BlockPermission> {
    let all = [
        (Perm::CONSISTENT_READ, BlockPermission::ConsistentRead),
        (Perm::WRITE, BlockPermission::Write),
        (Perm::WRITE_UNCHANGED, BlockPermission::WriteUnchanged),
        (Perm::RESIZE, BlockPermission::Resize),
    ];
    all.iter()
        .rev()
        .filter(|(p, _)| perm.contains(*p))
        .map(|(_, q)| *q)
        .collect()
}

/// Numbers vertices in the order they are first met, from 1 (QEMU's `xdbg_graph_node_num`).
#[derive(Default)]
struct Ids {
    map: HashMap<(u8, String), u64>,
}

impl Ids {
    fn of(&mut self, kind: u8, name: &str) -> u64 {
        let next = self.map.len() as u64 + 1;
        *self.map.entry((kind, name.to_string())).or_insert(next)
    }
}

const BACKEND: u8 = 0;
const JOB: u8 = 1;
const NODE: u8 = 2;

/// `x-debug-query-block-graph`: the exports' block backends (QEMU's root edges, taking
/// consistent read, and write when writable, sharing all but resize), the block jobs and
/// their nodes, then every node with its children; vertices numbered as first met, lists
/// newest first (QEMU prepends).
pub(crate) fn block_graph(env: &BlockState) -> XDbgBlockGraph {
    let mut ids = Ids::default();
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    let mut edge = |ids: &mut Ids, parent: u64, child: &str, name: &str, perm, shared| {
        edges.push(XDbgBlockGraphEdge {
            parent,
            child: ids.of(NODE, child),
            name: name.to_string(),
            perm: perm_list(perm),
            shared_perm: perm_list(shared),
        });
    };
    for (i, (node, writable)) in env.exports.backends().into_iter().rev().enumerate() {
        // Unnamed backends are told apart by their position.
        let id = ids.of(BACKEND, &i.to_string());
        nodes.push(XDbgBlockGraphNode {
            id,
            r#type: XDbgBlockGraphNodeType::BlockBackend,
            name: String::new(),
        });
        let perm = if writable {
            Perm::CONSISTENT_READ | Perm::WRITE
        } else {
            Perm::CONSISTENT_READ
        };
        edge(&mut ids, id, &node, "root", perm, Perm::ALL & !Perm::RESIZE);
    }
    for (key, id) in env.jobs.block_jobs() {
        let job = ids.of(JOB, &job_label(key));
        nodes.push(XDbgBlockGraphNode {
            id: job,
            r#type: XDbgBlockGraphNodeType::BlockJob,
            name: id,
        });
        for (node, use_) in env.claims.nodes_of(key) {
            edge(&mut ids, job, &node, use_.role, use_.perm, use_.shared);
        }
    }
    let graph_nodes: Vec<GraphNode> = env
        .graph
        .as_ref()
        .map(|g| g.graph_nodes())
        .unwrap_or_default();
    for n in &graph_nodes {
        let id = ids.of(NODE, &n.name);
        nodes.push(XDbgBlockGraphNode {
            id,
            r#type: XDbgBlockGraphNodeType::BlockDriver,
            name: n.name.clone(),
        });
        for c in &n.children {
            edge(&mut ids, id, &c.child, &c.role, c.perm, c.shared);
        }
    }
    nodes.reverse();
    edges.reverse();
    XDbgBlockGraph { nodes, edges }
}

fn job_label(key: JobKey) -> String {
    format!("{key:?}")
}

/// A node's statistics: counters kept by block devices, of which there are none here, so
/// zero but for the node's own highest write; the file driver's discard counters (no discard
/// reaches a file here); the primary child's statistics nested as `parent`.
fn node_stats(nodes: &[GraphNode], name: &str, depth: usize) -> BlockStats {
    let node = nodes.iter().find(|n| n.name == name);
    let mut stats = BlockDeviceStats::new(
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        false,
        false,
        Vec::new(),
    );
    stats.wr_highest_offset = node.map_or(0, |n| {
        i64::try_from(n.wr_highest_offset).unwrap_or(i64::MAX)
    });
    let mut out = BlockStats::new(stats);
    out.node_name = Some(name.to_string());
    if node.is_some_and(|n| n.driver == "file") {
        out.driver_specific = Some(BlockStatsSpecific {
            branch: BlockStatsSpecificBranch::File(BlockStatsSpecificFile {
                discard_nb_ok: 0,
                discard_nb_failed: 0,
                discard_bytes_ok: 0,
            }),
        });
    }
    let file = node.and_then(|n| n.children.iter().find(|c| c.primary));
    if let Some(file) = file
        && depth < nodes.len()
    {
        out.parent = Some(Box::new(node_stats(nodes, &file.child, depth + 1)));
    }
    out
}

/// `query-blockstats`: no block device exists here, so without `query-nodes` the list is
/// empty (as QSD's); with it, every node, oldest first.
pub(crate) fn blockstats(env: &BlockState, query_nodes: bool) -> Vec<BlockStats> {
    if !query_nodes {
        return Vec::new();
    }
    let nodes = env
        .graph
        .as_ref()
        .map(|g| g.graph_nodes())
        .unwrap_or_default();
    nodes
        .iter()
        .map(|n| node_stats(&nodes, &n.name, 0))
        .collect()
}
