//! `block-commit` (QEMU's `qmp_block_commit`, `block/commit.c`): the job copies the data of
//! the layers from `top` down to just above `base` into `base`. An intermediate commit then
//! takes those layers out of the chain (the overlay of `top` gets `base`, its header
//! rewritten); an active commit (`top` is the active layer) is a mirror into `base` that
//! pivots every user of `top` onto `base` when completed.

use std::io;
use std::sync::{Arc, OnceLock};

use block::{BlockOp, OpSet};
use job::{BoxFuture, JobContext, JobDriver, JobFailure, JobKey, JobSpec};
use qmp_api::{
    BlockCommitArguments, BlockdevOnError, ErrorClass, IoOperationType, JobType, QmpError,
};

use crate::BlockState;
use crate::busy::MAIN_NODE;
use crate::claims::NodeClaims;
use crate::mirror::ActiveCommit;
use crate::node::{
    BackingName, BlockIo, ChainEditor, ChainLayer, CopyBuffers, FilterKind, IoPool, run_blocking,
};
use crate::stream::{editor, node_not_found};

/// Bytes a commit copies per request (QEMU's `COMMIT_BUFFER_SIZE`).
pub const COMMIT_CHUNK: u64 = 512 << 10;

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

/// What the checks of `block-commit` found.
struct Plan {
    /// The chain from the device down.
    chain: Vec<ChainLayer>,
    top: String,
    base: String,
    active: bool,
}

/// QEMU's `qmp_block_commit` checks, in its order.
fn plan(env: &BlockState, args: &BlockCommitArguments) -> Result<Plan, QmpError> {
    let device = args.device.as_str();
    let graph = env
        .graph
        .as_deref()
        .ok_or_else(|| generic("No block layer is available"))?;
    // libvirt probes for commit with DeviceNotFound: the device is looked up first.
    if graph.node(device).is_none() {
        return Err(QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: format!("Device '{device}' not found"),
        });
    }
    let chain = graph.backing_chain(device);
    // A job's nodes have the job as a parent in QEMU (a backup source its filter).
    if chain.first().is_some_and(|l| l.has_parent) || !env.claims.jobs_using(device).is_empty() {
        return Err(generic("Need a root block node"));
    }
    env.check_op(device, BlockOp::CommitSource)?;
    #[allow(deprecated)] // `top` and `base` are deprecated in the schema, still served
    let (top_file, base_file) = (args.top.as_deref(), args.base.as_deref());
    let in_chain_from = |from: &str, name: &str| {
        chain
            .iter()
            .skip_while(|l| l.name != from)
            .any(|l| l.name == name)
    };
    let mut top = Some(device.to_string());
    match (&args.top_node, top_file) {
        (Some(_), Some(_)) => {
            return Err(generic("'top-node' and 'top' are mutually exclusive"));
        }
        (Some(node), None) => {
            if graph.node(node).is_none() {
                return Err(node_not_found(node));
            }
            if !in_chain_from(device, node) {
                return Err(generic(format!(
                    "'{node}' is not in this backing file chain"
                )));
            }
            top = Some(node.clone());
        }
        (None, Some(file)) => {
            if chain.first().is_none_or(|l| l.filename != file) {
                top = graph.find_backing_image(device, file);
            }
        }
        (None, None) => {}
    }
    let Some(top) = top else {
        return Err(generic(format!(
            "Top image file {} not found",
            top_file.unwrap_or("NULL")
        )));
    };
    let base = match (&args.base_node, base_file) {
        (Some(_), Some(_)) => {
            return Err(generic("'base-node' and 'base' are mutually exclusive"));
        }
        (Some(node), None) => {
            if graph.node(node).is_none() {
                return Err(node_not_found(node));
            }
            if !in_chain_from(&top, node) {
                return Err(generic(format!(
                    "'{node}' is not in this backing file chain"
                )));
            }
            node.clone()
        }
        (None, Some(file)) => graph
            .find_backing_image(&top, file)
            .ok_or_else(|| generic(format!("Can't find '{file}' in the backing chain")))?,
        (None, None) => chain
            .last()
            .map(|l| l.name.clone())
            .ok_or_else(|| generic("There is no backimg image"))?,
    };
    // Op blockers from top down to base, both included.
    for layer in chain.iter().skip_while(|l| l.name != top) {
        env.check_op(&layer.name, BlockOp::CommitTarget)?;
        if layer.name == base {
            break;
        }
    }
    if top == base {
        return Err(generic("cannot commit an image into itself"));
    }
    let top_layer = chain.iter().find(|l| l.name == top);
    let active = top == device || top_layer.is_some_and(|l| l.written);
    if active && args.backing_file.is_some() {
        return Err(generic(if top == device {
            "'backing-file' specified, but 'top' is the active layer"
        } else {
            "'backing-file' specified, but 'top' has a writer on it"
        }));
    }
    Ok(Plan {
        chain,
        top,
        base,
        active,
    })
}

/// `block-commit`.
pub(crate) fn start(env: &mut BlockState, args: BlockCommitArguments) -> Result<(), QmpError> {
    let plan = plan(env, &args)?;
    if plan.active {
        return start_active(env, &args, plan);
    }
    start_intermediate(env, args, plan)
}

/// QEMU's `commit_active_start`: the base is reopened read-write, then a mirror of type
/// `commit` from `top` into it (see [`crate::mirror::ActiveCommit`]); READY once the base
/// holds everything, `complete` pivots every parent of `top` onto the base.
fn start_active(
    env: &mut BlockState,
    args: &BlockCommitArguments,
    plan: Plan,
) -> Result<(), QmpError> {
    let Plan {
        chain, top, base, ..
    } = plan;
    let index = |name: &str| chain.iter().position(|l| l.name == name);
    let (Some(top_at), Some(base_at)) = (index(&top), index(&base)) else {
        return Err(generic("cannot commit an image into itself"));
    };
    if base_at <= top_at {
        return Err(generic("cannot commit an image into itself"));
    }
    let editor = editor(env, "block-commit")?;
    let base_read_only = chain[base_at].read_only;
    if base_read_only {
        editor.set_read_only(&base, false)?;
    }
    let commit = ActiveCommit {
        base: base.clone(),
        base_overlay: chain[base_at - 1].name.clone(),
        base_read_only,
        intermediate: chain[top_at + 1..base_at]
            .iter()
            .map(|l| l.name.clone())
            .collect(),
        editor: editor.clone(),
    };
    let started = crate::mirror::active_commit(env, args, &top, commit);
    if started.is_err()
        && base_read_only
        && let Err(e) = editor.set_read_only(&base, true)
    {
        tracing::warn!("commit: reopening {base} read-only: {}", e.desc);
    }
    started
}

/// QEMU's `commit_start`: an intermediate commit.
fn start_intermediate(
    env: &mut BlockState,
    args: BlockCommitArguments,
    plan: Plan,
) -> Result<(), QmpError> {
    let device = args.device.as_str();
    let Plan {
        chain, top, base, ..
    } = plan;
    let index = |name: &str| chain.iter().position(|l| l.name == name);
    let (Some(top_at), Some(base_at)) = (index(&top), index(&base)) else {
        return Err(generic("cannot commit an image into itself"));
    };
    // The overlay of top (above it in the chain) must not be busy either.
    if let Some(overlay) = top_at.checked_sub(1).map(|i| &chain[i].name) {
        env.check_op(overlay, BlockOp::CommitTarget)?;
    }
    let graph = env
        .graph
        .as_deref()
        .ok_or_else(|| generic("No block layer is available"))?;
    let (Some(top_io), Some(base_io)) = (graph.node(&top), graph.node(&base)) else {
        return Err(generic("cannot commit an image into itself"));
    };
    let editor = editor(env, "block-commit")?;
    let on_error = args.on_error.unwrap_or(BlockdevOnError::Report);
    let spec = JobSpec::new(args.job_id.clone().unwrap_or_default())
        .auto_finalize(args.auto_finalize.unwrap_or(true))
        .auto_dismiss(args.auto_dismiss.unwrap_or(true))
        .speed(args.speed.unwrap_or(0))
        .on_error(Some(on_error), Some(on_error));
    let base_overlay = chain[base_at - 1].name.clone();
    let base_read_only = chain[base_at].read_only;
    let set_up = Arc::new(OnceLock::new());
    let commit = Commit {
        top: top_io,
        base_io,
        base: base.clone(),
        base_overlay,
        set_up: set_up.clone(),
        filter_gone: false,
        backing_name: BackingName {
            file: args.backing_file.clone(),
            mask_protocol: args.backing_mask_protocol.unwrap_or(false),
        },
        editor: editor.clone(),
        claims: env.claims.clone(),
        pool: env.pool.clone(),
        buffers: env.buffers.clone(),
    };
    let key = env.jobs.create(
        spec,
        move |key| Box::new(CommitJob { key, c: commit }) as Box<dyn JobDriver>,
        None,
    )?;
    // From here on a failure drops the job (created, null) and undoes what was done.
    let fail = |env: &BlockState, reopened: bool, e: QmpError| {
        let _ = env.jobs.discard(key);
        if reopened {
            let _ = editor.set_read_only(&base, true);
        }
        Err(e)
    };
    if base_read_only && let Err(e) = editor.set_read_only(&base, false) {
        return fail(env, false, e);
    }
    let filter = match editor.insert_filter(
        &top,
        FilterKind::CommitTop,
        args.filter_node_name.as_deref(),
    ) {
        Ok(f) => f,
        Err(e) => return fail(env, base_read_only, e),
    };
    let _ = set_up.set(SetUp {
        filter: filter.clone(),
        base_read_only,
    });
    // QEMU's commit job: created on the device, its filter and the layers from top down to
    // the base added.
    env.add_job_node(key, JobType::Commit, device, MAIN_NODE, OpSet::JOB_MAIN);
    env.add_job_node(key, JobType::Commit, &filter, "filter", OpSet::ALL);
    for layer in &chain[top_at..=base_at] {
        let role = if layer.name == base {
            "base"
        } else {
            "intermediate node"
        };
        env.add_job_node(key, JobType::Commit, &layer.name, role, OpSet::ALL);
    }
    if let Err(e) = env.jobs.start(key) {
        tracing::warn!("commit job could not start: {e}");
    }
    Ok(())
}

/// A commit job's driver.
pub struct CommitJob {
    key: JobKey,
    c: Commit,
}

/// What an intermediate commit works on.
struct Commit {
    /// The highest layer committed (read through the chain).
    top: Arc<dyn BlockIo>,
    /// The layer committed into.
    base_io: Arc<dyn BlockIo>,
    base: String,
    /// The lowest layer committed (just above the base).
    base_overlay: String,
    /// What the command set up after creating the job (it only starts once this is set).
    set_up: Arc<OnceLock<SetUp>>,
    /// The filter was dropped with the layers, or removed.
    filter_gone: bool,
    backing_name: BackingName,
    editor: Arc<dyn ChainEditor>,
    claims: NodeClaims,
    pool: Arc<dyn IoPool>,
    buffers: Arc<CopyBuffers>,
}

/// What `block-commit` set up for the job once created: the `commit_top` filter above
/// `top`, and whether the base was read-only (reopened read-write for the job).
#[derive(Debug)]
struct SetUp {
    filter: String,
    base_read_only: bool,
}

/// How one commit request ended: the bytes it covered and whether it copied them, or the
/// failing operation.
type StepResult = Result<(u64, bool), (IoOperationType, io::Error)>;

impl Commit {
    async fn run(&mut self, ctx: &JobContext) -> Result<(), JobFailure> {
        let len = self.top.size();
        ctx.set_progress_remaining(len);
        if self.base_io.size() < len {
            let base = self.base_io.clone();
            run_blocking(self.pool.as_ref(), move || base.truncate(len))
                .await
                .unwrap_or_else(|| Err(io::Error::other("I/O worker lost")))
                .map_err(|e| JobFailure::from_io(&e))?;
        }
        let mut offset = 0;
        while offset < len {
            if ctx.is_cancelled() {
                break;
            }
            let (top, base, buffers) =
                (self.top.clone(), self.base_io.clone(), self.buffers.clone());
            let bottom = self.base_overlay.clone();
            let want = COMMIT_CHUNK.min(len - offset);
            let step: StepResult = run_blocking(self.pool.as_ref(), move || {
                let read = |e| (IoOperationType::Read, e);
                let (allocated, n) = top
                    .allocated_above(Some(&bottom), offset, want)
                    .map_err(read)?;
                let n = if n == 0 { want } else { n };
                if !allocated {
                    return Ok((n, false));
                }
                let mut buf = buffers.take(n as usize);
                let copied = top
                    .read_at(&mut buf[..n as usize], offset)
                    .map_err(read)
                    .and_then(|()| {
                        base.write_at(&buf[..n as usize], offset)
                            .map_err(|e| (IoOperationType::Write, e))
                    });
                buffers.give(buf);
                copied.map(|()| (n, true))
            })
            .await
            .unwrap_or_else(|| Err((IoOperationType::Read, io::Error::other("I/O worker lost"))));
            let (n, copied) = match step {
                Ok(step) => step,
                Err((operation, error)) => {
                    // QEMU's commit retries the request after `stop` and `ignore`.
                    ctx.retry_after_io_error(operation, &error).await?;
                    continue;
                }
            };
            ctx.progress_update(n);
            offset += n;
            ctx.rate_limit(if copied { n } else { 0 }).await;
        }
        Ok(())
    }

    fn remove_filter(&mut self) {
        if std::mem::replace(&mut self.filter_gone, true) {
            return;
        }
        if let Some(set_up) = self.set_up.get()
            && let Err(e) = self.editor.remove_filter(&set_up.filter)
        {
            tracing::warn!("commit: removing filter {}: {}", set_up.filter, e.desc);
        }
    }
}

impl JobDriver for CommitJob {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    fn run<'a>(&'a mut self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(self.c.run(ctx))
    }

    /// QEMU's `commit_prepare`: the layers from the filter down to above the base leave the
    /// chain (`bdrv_drop_intermediate`).
    fn prepare(&mut self) -> Result<(), JobFailure> {
        let c = &mut self.c;
        let Some(set_up) = c.set_up.get() else {
            return Ok(());
        };
        c.editor
            .drop_intermediate(&set_up.filter, &c.base, &c.backing_name)
            .map_err(|e| JobFailure::new(e.desc))?;
        c.filter_gone = true;
        Ok(())
    }

    /// QEMU's `commit_abort`: the filter goes, the chain stays as it was.
    fn abort(&mut self) {
        self.c.remove_filter();
    }

    fn clean(&mut self) {
        let c = &mut self.c;
        c.remove_filter();
        c.claims.release(self.key);
        if c.set_up.get().is_some_and(|s| s.base_read_only)
            && let Err(e) = c.editor.set_read_only(&c.base, true)
        {
            tracing::warn!("commit: reopening {} read-only: {}", c.base, e.desc);
        }
    }
}
