//! `blockdev-create` and `x-blockdev-amend` (QEMU's `block/create.c` and `block/amend.c`):
//! checks the command makes itself, then a job (not a block job: `JOB_STATUS_CHANGE` only,
//! not dismissed automatically) whose progress goes from 0 to 1 while the work runs on the
//! I/O pool. What the work finds wrong is the job's error (`query-jobs`), as in QEMU.

use std::sync::Arc;

use job::{BoxFuture, JobContext, JobDriver, JobFailure, JobSpec};
use qmp_api::{
    BlockdevAmendOptionsBranch, BlockdevCreateArguments, BlockdevCreateOptionsBranch, JobType,
    QmpError, XBlockdevAmendArguments,
};

use crate::BlockState;
use crate::claims::NodeClaims;
use crate::node::{CreateRun, IoPool, not_found, run_blocking};

/// A create or amend job: one piece of blocking work.
struct ImageJob {
    job_type: JobType,
    work: Option<CreateRun>,
    pool: Arc<dyn IoPool>,
    /// Nodes opened for the job, closed once it has ended.
    opened: Vec<String>,
    claims: NodeClaims,
}

impl ImageJob {
    async fn run_work(&mut self, ctx: &JobContext) -> Result<(), JobFailure> {
        ctx.set_progress_remaining(1);
        let result = match self.work.take() {
            Some(work) => run_blocking(&*self.pool, work)
                .await
                .unwrap_or_else(|| Err("the job's work did not finish".into())),
            None => Ok(()),
        };
        ctx.progress_update(1);
        result.map_err(JobFailure::new)
    }
}

impl JobDriver for ImageJob {
    fn job_type(&self) -> JobType {
        self.job_type
    }

    fn run<'a>(&'a mut self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(self.run_work(ctx))
    }

    fn clean(&mut self) {
        for node in self.opened.drain(..) {
            self.claims.retire(&node);
        }
    }
}

/// Creates and starts the job; a refused job id leaves the opened nodes to be closed.
fn start(
    env: &BlockState,
    job_id: String,
    job_type: JobType,
    work: CreateRun,
    opened: Vec<String>,
) -> Result<(), QmpError> {
    let spec = JobSpec {
        block_job: false,
        ..JobSpec::new(job_id).auto_dismiss(false)
    };
    let job = ImageJob {
        job_type,
        work: Some(work),
        pool: env.pool.clone(),
        opened: opened.clone(),
        claims: env.claims.clone(),
    };
    let key = match env.jobs.create(spec, move |_| Box::new(job), None) {
        Ok(key) => key,
        Err(e) => {
            for node in &opened {
                env.claims.retire(node);
            }
            return Err(e);
        }
    };
    if let Err(e) = env.jobs.start(key) {
        tracing::warn!("{job_type} job could not start: {e}");
    }
    Ok(())
}

/// `blockdev-create`: only `file` and `qcow2` create images (QEMU: `raw` creates through
/// `file`, and `null-co` and `blkdebug` cannot).
pub(crate) fn blockdev_create(
    env: &mut BlockState,
    args: BlockdevCreateArguments,
) -> Result<(), QmpError> {
    if !matches!(
        args.options.branch,
        BlockdevCreateOptionsBranch::File(_) | BlockdevCreateOptionsBranch::Qcow2(_)
    ) {
        return Err(QmpError::generic("Driver does not support blockdev-create"));
    }
    // Nodes opened here for a job whose id is then refused are closed again.
    let work = env.graph_mut()?.prepare_create(&args.options);
    start(env, args.job_id, JobType::Create, work.run, work.opened)
}

/// `x-blockdev-amend`: the node's own driver must be named, and it must be one that can
/// amend (qcow2). qcow2 can amend only its encryption keys; blockjobd opens no encrypted
/// image, so asking for that fails the job with QEMU's words.
pub(crate) fn x_blockdev_amend(
    env: &mut BlockState,
    args: XBlockdevAmendArguments,
) -> Result<(), QmpError> {
    let node = env
        .graph
        .as_ref()
        .and_then(|g| g.node(&args.node_name))
        .ok_or_else(|| not_found("", &args.node_name))?;
    let driver = args.options.branch.kind();
    if node.format() != driver.as_str() {
        return Err(QmpError::generic(
            "x-blockdev-amend doesn't support changing the block driver",
        ));
    }
    let BlockdevAmendOptionsBranch::Qcow2(options) = args.options.branch else {
        return Err(QmpError::generic(
            "Driver does not support x-blockdev-amend",
        ));
    };
    // `force` only matters to key-slot changes, which the work refuses before reaching.
    let _ = args.force;
    let work: CreateRun = Box::new(move || match options.encrypt {
        Some(_) => Err("image is not encrypted, can't amend".into()),
        None => Ok(()),
    });
    start(env, args.job_id, JobType::Amend, work, Vec::new())
}
