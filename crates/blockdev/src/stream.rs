//! `block-stream` (QEMU's `qmp_block_stream` and `block/stream.c`): the job copies into a
//! node what its backing chain holds above the new base, through a copy-on-read filter it
//! inserts above the node, then takes the streamed layers out of the chain and rewrites the
//! node's backing file name.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use block::{BlockOp, OpSet};
use job::{BoxFuture, JobContext, JobDriver, JobFailure, JobKey, JobSpec};
use qmp_api::{BlockErrorAction, BlockStreamArguments, BlockdevOnError, IoOperationType, JobType};

use crate::BlockState;
use crate::busy::MAIN_NODE;
use crate::claims::NodeClaims;
use crate::node::{
    BackingName, BlockIo, ChainEditor, ChainLayer, CopyBuffers, FilterKind, IoFuture, IoPool,
};
use crate::writeback::Writeback;

/// Bytes a stream looks at per step (QEMU's `STREAM_CHUNK`).
pub const STREAM_CHUNK: u64 = 512 << 10;
/// Chunks copied at once without a speed limit. QEMU's stream copies one at a time; with
/// a few in flight, reading one chunk overlaps writing another.
const STREAM_DEPTH: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `Cannot find device='' nor node-name='<name>'`: a node named by a `*-node` argument
/// (QEMU's `bdrv_lookup_bs(NULL, name)`).
pub(crate) fn node_not_found(name: &str) -> qmp_api::QmpError {
    crate::node::not_found("", name)
}

/// The editor of a graph that can change chains, or QEMU-worded refusal for one that cannot.
pub(crate) fn editor(
    env: &BlockState,
    what: &str,
) -> Result<Arc<dyn ChainEditor>, qmp_api::QmpError> {
    env.graph
        .as_ref()
        .and_then(|g| g.chain_editor())
        .ok_or_else(|| {
            qmp_api::QmpError::generic(format!("This block layer does not support {what}"))
        })
}

fn generic(desc: impl Into<String>) -> qmp_api::QmpError {
    qmp_api::QmpError::generic(desc.into())
}

/// `block-stream`: QEMU's checks in QEMU's order, then the job.
pub(crate) fn start(
    env: &mut BlockState,
    args: BlockStreamArguments,
) -> Result<(), qmp_api::QmpError> {
    let device = args.device.as_str();
    if args.base.is_some() && args.base_node.is_some() {
        return Err(generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if args.base.is_some() && args.bottom.is_some() {
        return Err(generic(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if args.bottom.is_some() && args.base_node.is_some() {
        return Err(generic(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }
    let top = env.lookup(device)?;
    let graph = env
        .graph
        .as_deref()
        .ok_or_else(|| generic("No block layer is available"))?;
    let chain = graph.backing_chain(device);
    let contains = |name: &str| chain.iter().any(|l| l.name == name);
    let mut base: Option<String> = None;
    if let Some(filename) = &args.base {
        base = Some(
            graph
                .find_backing_image(device, filename)
                .ok_or_else(|| generic(format!("Can't find '{filename}' in the backing chain")))?,
        );
    }
    if let Some(node) = &args.base_node {
        if graph.node(node).is_none() {
            return Err(node_not_found(node));
        }
        if node == device || !contains(node) {
            return Err(generic(format!(
                "Node '{node}' is not a backing image of '{device}'"
            )));
        }
        base = Some(node.clone());
    }
    if let Some(bottom) = &args.bottom {
        let Some(layer) = chain.iter().find(|l| &l.name == bottom) else {
            if graph.node(bottom).is_none() {
                return Err(node_not_found(bottom));
            }
            return Err(generic(format!(
                "Node '{bottom}' is not in a chain starting from '{device}'"
            )));
        };
        if layer.filter {
            return Err(generic(format!(
                "Node '{bottom}' is a filter, use a non-filter node as 'bottom'"
            )));
        }
    }
    // Op blockers from the device down to the base (or below `bottom`), as QEMU checks them.
    let end = match (&args.bottom, &base) {
        (Some(bottom), _) => below(&chain, bottom),
        (None, base) => base.clone(),
    };
    for layer in &chain {
        if Some(&layer.name) == end.as_ref() {
            break;
        }
        env.check_op(&layer.name, BlockOp::Stream)?;
    }
    if base.is_none() && args.backing_file.is_some() {
        return Err(generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    // stream_start: the layer just above the base is the lowest one streamed.
    let base_overlay = match (&args.bottom, &base) {
        (Some(bottom), _) => bottom.clone(),
        (None, Some(base)) => above(&chain, base).ok_or_else(|| {
            generic(format!(
                "'{base}' is not in the backing chain of '{device}'"
            ))
        })?,
        (None, None) => chain
            .last()
            .map(|l| l.name.clone())
            .unwrap_or_else(|| device.to_string()),
    };
    let editor = editor(env, "block-stream")?;
    let read_only = chain.first().is_some_and(|l| l.read_only);
    if read_only {
        editor.set_read_only(device, false)?;
    }
    let undo_reopen = |editor: &Arc<dyn ChainEditor>| {
        if read_only {
            let _ = editor.set_read_only(device, true);
        }
    };
    let filter = match editor.insert_filter(
        device,
        FilterKind::CopyOnRead {
            bottom: Some(base_overlay.clone()),
        },
        args.filter_node_name.as_deref(),
    ) {
        Ok(filter) => filter,
        Err(e) => {
            undo_reopen(&editor);
            return Err(generic(format!("Could not create node: {}", e.desc)));
        }
    };
    let on_error = args.on_error.unwrap_or(BlockdevOnError::Report);
    let spec = JobSpec::new(args.job_id.clone().unwrap_or_default())
        .auto_finalize(args.auto_finalize.unwrap_or(true))
        .auto_dismiss(args.auto_dismiss.unwrap_or(true))
        .speed(args.speed.unwrap_or(0))
        .on_error(Some(on_error), Some(on_error));
    // The layers that leave the chain: from the device's backing file down to the base.
    let intermediate: Vec<String> = chain
        .iter()
        .skip(1)
        .take_while(|l| Some(&l.name) != end.as_ref())
        .map(|l| l.name.clone())
        .collect();
    let stream = Stream {
        top,
        device: device.to_string(),
        base_overlay: base_overlay.clone(),
        filter: Some(filter.clone()),
        backing_name: BackingName {
            file: args.backing_file.clone(),
            mask_protocol: args.backing_mask_protocol.unwrap_or(false),
        },
        read_only,
        editor: editor.clone(),
        claims: env.claims.clone(),
        pool: env.pool.clone(),
        buffers: env.buffers.clone(),
    };
    let make = move |key| Box::new(StreamJob { key, s: stream }) as Box<dyn JobDriver>;
    let key = match env.jobs.create(spec, make, None) {
        Ok(key) => key,
        Err(e) => {
            let _ = editor.remove_filter(&filter);
            undo_reopen(&editor);
            return Err(e);
        }
    };
    // QEMU's stream job: created on its filter, the layers it copies from added.
    env.add_job_node(key, JobType::Stream, &filter, MAIN_NODE, OpSet::JOB_MAIN);
    env.add_job_node(key, JobType::Stream, device, "device", OpSet::ALL);
    for node in &intermediate {
        env.add_job_node(key, JobType::Stream, node, "intermediate node", OpSet::ALL);
    }
    if let Err(e) = env.jobs.start(key) {
        tracing::warn!("stream job could not start: {e}");
    }
    Ok(())
}

/// The layer below `name` in `chain`.
fn below(chain: &[ChainLayer], name: &str) -> Option<String> {
    let i = chain.iter().position(|l| l.name == name)?;
    chain.get(i + 1).map(|l| l.name.clone())
}

/// The layer above `name` in `chain` (QEMU's `bdrv_find_overlay`).
fn above(chain: &[ChainLayer], name: &str) -> Option<String> {
    let i = chain.iter().position(|l| l.name == name)?;
    i.checked_sub(1).map(|i| chain[i].name.clone())
}

/// A stream job's driver.
pub struct StreamJob {
    key: JobKey,
    s: Stream,
}

/// What a stream works on.
struct Stream {
    /// The node streamed into.
    top: Arc<dyn BlockIo>,
    device: String,
    /// The lowest layer whose data is copied (QEMU's `base_overlay`; the device itself
    /// when there is nothing to stream).
    base_overlay: String,
    /// The copy-on-read filter, until it is removed.
    filter: Option<String>,
    backing_name: BackingName,
    /// The device was read-only and was reopened read-write for the job.
    read_only: bool,
    editor: Arc<dyn ChainEditor>,
    claims: NodeClaims,
    pool: Arc<dyn IoPool>,
    buffers: Arc<CopyBuffers>,
}

/// A chunk being copied: whether any of it was copied into the layer.
struct StreamStep {
    offset: u64,
    len: u64,
    result: Arc<Mutex<Option<io::Result<bool>>>>,
    done: IoFuture,
}

impl StreamStep {
    /// The result of a step whose request completed.
    fn outcome(&self) -> io::Result<bool> {
        lock(&self.result)
            .take()
            .unwrap_or_else(|| Err(io::Error::other("I/O worker lost")))
    }

    async fn wait(mut self) -> io::Result<bool> {
        (&mut self.done).await;
        self.outcome()
    }
}

impl Stream {
    /// Copies the chunk at `offset` on the I/O threads: what the chain down to the base
    /// holds there and the layer does not, in as many copy-on-read steps as its extents take.
    fn submit(&self, offset: u64, len: u64) -> StreamStep {
        let (top, buffers) = (self.top.clone(), self.buffers.clone());
        let bottom = self.base_overlay.clone();
        let result = Arc::new(Mutex::new(None));
        let slot = result.clone();
        let done = self.pool.run(Box::new(move || {
            let mut buf = buffers.take(STREAM_CHUNK as usize);
            let (end, mut pos, mut copied) = (offset + len, offset, false);
            let r = loop {
                if pos >= end {
                    break Ok(copied);
                }
                match top.copy_on_read(pos, end - pos, Some(&bottom), &mut buf) {
                    // Past the end of every layer: the rest reads as zeroes.
                    Ok((0, _)) => break Ok(copied),
                    Ok((n, c)) => {
                        pos += n;
                        copied |= c;
                    }
                    Err(e) => break Err(e),
                }
            };
            buffers.give(buf);
            *lock(&slot) = Some(r);
        }));
        StreamStep {
            offset,
            len,
            result,
            done,
        }
    }

    async fn run(&mut self, ctx: &JobContext) -> Result<(), JobFailure> {
        if self.base_overlay == self.device {
            // Nothing to stream.
            return Ok(());
        }
        let len = self.top.size();
        ctx.set_progress_remaining(len);
        // With on-error=ignore the job goes on, but fails at the end with the first error.
        let mut ignored: Option<io::Error> = None;
        // The layer written back during the copy: the flush before its backing file changes
        // then has little left to write.
        let mut writeback = Writeback::new(self.top.clone(), self.pool.clone());
        let mut next = 0;
        // Chunks that failed and are to be copied again (`stop`), before any new one.
        let mut retry: Vec<u64> = Vec::new();
        let mut in_flight: Vec<StreamStep> = Vec::new();
        // Bytes copied and not yet accounted against the speed limit.
        let mut unaccounted = 0;
        loop {
            if in_flight.is_empty() {
                ctx.rate_limit(std::mem::take(&mut unaccounted)).await;
            }
            if ctx.is_cancelled() {
                break;
            }
            // A speed limit, or a pause coming, makes it one chunk at a time.
            let depth = if ctx.speed() == 0 && !ctx.pause_requested() {
                STREAM_DEPTH
            } else {
                1
            };
            if in_flight.len() < depth {
                let chunk = retry.pop().or_else(|| {
                    (next < len).then(|| {
                        next += STREAM_CHUNK;
                        next - STREAM_CHUNK
                    })
                });
                if let Some(offset) = chunk {
                    in_flight.push(self.submit(offset, STREAM_CHUNK.min(len - offset)));
                    continue;
                }
            }
            // Nothing in flight and nothing left to copy: done.
            if in_flight.is_empty() {
                break;
            }
            let i = crate::io_threads::first_done(&mut in_flight, |s| &mut s.done).await;
            let step = in_flight.swap_remove(i);
            let (offset, n) = (step.offset, step.len);
            match step.outcome() {
                Ok(copied) => {
                    ctx.progress_update(n);
                    if copied {
                        writeback.written(n);
                        unaccounted += n;
                    }
                }
                Err(e) => {
                    // Let the others land before acting on the error.
                    for other in std::mem::take(&mut in_flight) {
                        let (o, l) = (other.offset, other.len);
                        match other.wait().await {
                            Ok(copied) => {
                                ctx.progress_update(l);
                                if copied {
                                    writeback.written(l);
                                    unaccounted += l;
                                }
                            }
                            Err(_) => retry.push(o),
                        }
                    }
                    match ctx.io_error(IoOperationType::Read, &e) {
                        BlockErrorAction::Report | BlockErrorAction::UnknownValue => {
                            let _ = writeback.finish().await;
                            return Err(JobFailure::from_io(&e));
                        }
                        BlockErrorAction::Stop => {
                            // Paused by the error: the same chunk again once resumed.
                            retry.push(offset);
                            ctx.pause_point().await;
                        }
                        BlockErrorAction::Ignore => {
                            ignored.get_or_insert(e);
                            ctx.progress_update(n);
                        }
                    }
                }
            }
        }
        for step in in_flight {
            let _ = step.wait().await;
        }
        // A writeback error is this job's: the flush before the backing file changes would
        // not see it again.
        let flushed = writeback.finish().await;
        if let Err(e) = flushed
            && !ctx.is_cancelled()
        {
            return Err(JobFailure::from_io(&e));
        }
        // The backing chain stays as it is after an error that was ignored.
        match ignored {
            Some(e) => Err(JobFailure::from_io(&e)),
            None => Ok(()),
        }
    }

    fn drop_filter(&mut self) {
        if let Some(filter) = self.filter.take()
            && let Err(e) = self.editor.remove_filter(&filter)
        {
            tracing::warn!("stream: removing filter {filter}: {}", e.desc);
        }
    }
}

impl JobDriver for StreamJob {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    fn run<'a>(&'a mut self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(self.s.run(ctx))
    }

    /// QEMU's `stream_prepare`: the filter goes, then the device gets the base (the node
    /// below the lowest streamed layer now) as its backing file, named in its header.
    fn prepare(&mut self) -> Result<(), JobFailure> {
        let s = &mut self.s;
        s.drop_filter();
        if s.editor.layer_below(&s.device).is_none() {
            return Ok(());
        }
        let base = s.editor.layer_below(&s.base_overlay);
        s.editor
            .change_backing(&s.device, base.as_deref(), &s.backing_name)
            .map_err(|e| JobFailure::new(e.desc))
    }

    fn clean(&mut self) {
        let s = &mut self.s;
        s.drop_filter();
        s.claims.release(self.key);
        if s.read_only
            && let Err(e) = s.editor.set_read_only(&s.device, true)
        {
            tracing::warn!("stream: reopening {} read-only: {}", s.device, e.desc);
        }
    }
}
