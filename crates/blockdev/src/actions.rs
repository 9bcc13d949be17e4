//! The backup transaction action (QEMU's `blockdev.c` `drive_backup_*`/`blockdev_backup_*`
//! prepare/commit/abort/clean).

use std::sync::Arc;

use block::{BlockOp, OpSet};
use job::{JobKey, JobSpec};
use qmp_api::{
    BackupCommon, BackupPerf, BitmapSyncMode, BlockdevBackup, DriveBackup, JobType, MirrorSyncMode,
    NewImageMode, QmpError,
};

use crate::BlockState;
use crate::backup::{BackupBitmap, BackupCopy, BackupEnv, BackupJob, BackupOptions, BackupSync};
use crate::bitmaps::JobBitmap;
use crate::busy::MAIN_NODE;
use crate::claims::Drain;
use crate::node::{BlockIo, ImageRef};
use crate::transaction::{Action, Transaction};

/// Where a backup writes.
pub(crate) enum BackupTarget {
    /// `blockdev-backup`: an existing node.
    Node(String),
    /// `drive-backup`: an image file, created unless `mode=existing`.
    Image {
        filename: String,
        format: Option<String>,
        mode: NewImageMode,
    },
}

/// `blockdev-backup` and `drive-backup`.
pub(crate) struct BackupAction {
    common: BackupCommon,
    target: BackupTarget,
    key: Option<JobKey>,
    drain: Option<Drain>,
    /// The target node this action opened (drive-backup).
    opened: Option<String>,
}

fn common_of_blockdev(b: BlockdevBackup) -> (BackupCommon, String) {
    let target = b.target;
    let common = BackupCommon {
        job_id: b.job_id,
        device: b.device,
        sync: b.sync,
        speed: b.speed,
        bitmap: b.bitmap,
        bitmap_mode: b.bitmap_mode,
        compress: b.compress,
        on_source_error: b.on_source_error,
        on_target_error: b.on_target_error,
        auto_finalize: b.auto_finalize,
        auto_dismiss: b.auto_dismiss,
        filter_node_name: b.filter_node_name,
        discard_source: b.discard_source,
        x_perf: b.x_perf,
    };
    (common, target)
}

impl BackupAction {
    pub(crate) fn blockdev(args: BlockdevBackup) -> Self {
        let (common, target) = common_of_blockdev(args);
        BackupAction {
            common,
            target: BackupTarget::Node(target),
            key: None,
            drain: None,
            opened: None,
        }
    }

    pub(crate) fn drive(d: DriveBackup) -> Self {
        let target = BackupTarget::Image {
            filename: d.target,
            format: d.format,
            mode: d.mode.unwrap_or(NewImageMode::AbsolutePaths),
        };
        let common = BackupCommon {
            job_id: d.job_id,
            device: d.device,
            sync: d.sync,
            speed: d.speed,
            bitmap: d.bitmap,
            bitmap_mode: d.bitmap_mode,
            compress: d.compress,
            on_source_error: d.on_source_error,
            on_target_error: d.on_target_error,
            auto_finalize: d.auto_finalize,
            auto_dismiss: d.auto_dismiss,
            filter_node_name: d.filter_node_name,
            discard_source: d.discard_source,
            x_perf: d.x_perf,
        };
        BackupAction {
            common,
            target,
            key: None,
            drain: None,
            opened: None,
        }
    }

    /// The target node: looked up, or (drive-backup) created and opened (recorded in
    /// `opened`). Returns its name for the busy check and its I/O.
    fn target(
        &mut self,
        env: &mut BlockState,
        source: &Arc<dyn BlockIo>,
    ) -> Result<(String, Arc<dyn BlockIo>), QmpError> {
        match &self.target {
            BackupTarget::Node(name) => Ok((name.clone(), env.lookup(name)?)),
            BackupTarget::Image {
                filename,
                format,
                mode,
            } => {
                let graph = env.graph_mut()?;
                let image = ImageRef {
                    filename: filename.clone(),
                    format: format.clone().unwrap_or_else(|| source.image().format),
                };
                let (backing, backing_node) = match self.common.sync {
                    MirrorSyncMode::None => {
                        (Some(source.image()), Some(self.common.device.clone()))
                    }
                    MirrorSyncMode::Top => (source.backing_image(), source.backing_node()),
                    _ => (None, None),
                };
                if *mode != NewImageMode::Existing {
                    graph.create_image(&image, source.size(), backing.as_ref())?;
                }
                let (name, io) = graph.open_image(&image, backing_node.as_deref())?;
                self.opened = Some(name.clone());
                Ok((name, io))
            }
        }
    }

    /// QEMU's `do_backup_common` checks, in its order; returns what to copy.
    fn sync(&self, env: &BlockState) -> Result<(BackupSync, Option<BackupBitmap>), QmpError> {
        let c = &self.common;
        let mut sync = c.sync;
        let mut bitmap_mode = c.bitmap_mode;
        if matches!(sync, MirrorSyncMode::Bitmap | MirrorSyncMode::Incremental)
            && c.bitmap.is_none()
        {
            return Err(QmpError::generic(format!(
                "must provide a valid bitmap name for '{sync}' sync mode"
            )));
        }
        if sync == MirrorSyncMode::Incremental {
            if bitmap_mode.is_some_and(|m| m != BitmapSyncMode::OnSuccess) {
                return Err(QmpError::generic(
                    "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
                ));
            }
            sync = MirrorSyncMode::Bitmap;
            bitmap_mode = Some(BitmapSyncMode::OnSuccess);
        }
        let mut bitmap = None;
        if let Some(name) = &c.bitmap {
            let Some(found) = env
                .graph
                .as_deref()
                .and_then(|g| JobBitmap::find(g, &c.device, name))
            else {
                return Err(QmpError::generic(format!(
                    "Bitmap '{name}' could not be found"
                )));
            };
            let Some(mode) = bitmap_mode else {
                return Err(QmpError::generic(
                    "Bitmap sync mode must be given when providing a bitmap",
                ));
            };
            found.check_usable(true)?;
            if sync == MirrorSyncMode::None {
                return Err(QmpError::generic(
                    "sync mode 'none' does not produce meaningful bitmap outputs",
                ));
            }
            if mode == BitmapSyncMode::Never && sync != MirrorSyncMode::Bitmap {
                return Err(QmpError::generic(format!(
                    "Bitmap sync mode '{mode}' has no meaningful effect when combined with sync mode '{sync}'"
                )));
            }
            bitmap = Some((found, mode));
        } else if bitmap_mode.is_some() {
            return Err(QmpError::generic(
                "Cannot specify bitmap sync mode without a bitmap",
            ));
        }
        let sync = match sync {
            MirrorSyncMode::Bitmap | MirrorSyncMode::Incremental => BackupSync::Bitmap,
            MirrorSyncMode::Top => BackupSync::Top,
            MirrorSyncMode::None => BackupSync::None,
            MirrorSyncMode::Full => BackupSync::Full,
        };
        Ok((sync, bitmap))
    }
}

/// `x-perf` as QEMU's `backup_job_create` checks it, in its order.
fn backup_options(perf: Option<&BackupPerf>) -> Result<BackupOptions, QmpError> {
    let mut options = BackupOptions::default();
    let Some(perf) = perf else {
        return Ok(options);
    };
    if let Some(workers) = perf.max_workers {
        if !(1..=i64::from(i32::MAX)).contains(&workers) {
            return Err(QmpError::generic(format!(
                "max-workers must be between 1 and {}",
                i32::MAX
            )));
        }
        options.max_workers = usize::try_from(workers).unwrap_or(usize::MAX);
    }
    if let Some(chunk) = perf.max_chunk {
        if chunk < 0 {
            return Err(QmpError::generic(
                "max-chunk must be zero (which means no limit) or positive",
            ));
        }
        options.max_chunk = chunk.unsigned_abs();
    }
    // As QEMU: the kernel copies (copy_file_range) where source and target are files, the
    // job reads and writes otherwise.
    options.use_copy_range = perf.use_copy_range == Some(true);
    Ok(options)
}

/// QEMU makes a backup's copy-before-write filter before the job: a `filter-node-name` that
/// cannot name a new node fails before the job id is looked at, in the graph's words.
fn check_filter_name(env: &BlockState, name: &str) -> Result<(), QmpError> {
    let why = if !block::graph::node_name_is_wellformed(name) {
        format!("Invalid node-name: '{name}'")
    } else if env.graph.as_ref().is_some_and(|g| g.node(name).is_some()) {
        format!("Duplicate nodes with node-name='{name}'")
    } else if name.len() >= 32 {
        "Node name too long".to_string()
    } else {
        return Ok(());
    };
    Err(QmpError::generic(format!("Could not create node: {why}")))
}

impl Action for BackupAction {
    fn prepare(&mut self, txn: &mut Transaction<'_>) -> Result<(), QmpError> {
        let group = txn.group().cloned();
        let env = &mut *txn.state;
        let device = self.common.device.clone();
        let source = env.lookup(&device)?;
        if let BackupTarget::Node(name) = &self.target {
            env.lookup(name)?;
        }
        self.drain = Some(Drain::begin(
            &env.jobs,
            &env.claims,
            env.graph.as_deref(),
            &device,
        ));
        if matches!(self.target, BackupTarget::Image { .. }) {
            // drive-backup's early check, before it creates the target.
            env.check_op(&device, BlockOp::BackupSource)?;
        }
        let (target_name, target) = self.target(env, &source)?;
        let (sync, bitmap) = self.sync(env)?;
        if device == target_name {
            return Err(QmpError::generic("Source and target cannot be the same"));
        }
        let c = &self.common;
        let compress = c.compress.unwrap_or(false);
        if compress && !target.supports_compressed_writes() {
            // QEMU names the target's BlockBackend, which a node of this daemon never has.
            return Err(QmpError::generic(
                "Compression is not supported for this drive ",
            ));
        }
        env.check_op(&device, BlockOp::BackupSource)?;
        env.check_op(&target_name, BlockOp::BackupTarget)?;
        let mut options = backup_options(c.x_perf.as_ref())?;
        options.compress = compress;
        options.discard_source = c.discard_source.unwrap_or(false);
        if source.size() != target.size() {
            return Err(QmpError::generic(
                "Source and target image have different sizes",
            ));
        }
        env.check_backup_nodes_active(&device, &target_name)?;
        if let Some((bitmap, mode)) = &bitmap {
            if *mode != BitmapSyncMode::Never {
                bitmap.check_usable(false)?;
            }
            bitmap.freeze()?;
        }
        // QEMU's block-copy cluster: the target's cluster size, at least 64 KiB.
        let cluster = target.cluster_size().unwrap_or(0).max(64 << 10);
        options.target_cluster = target.cluster_size().unwrap_or(cluster);
        if options.max_chunk != 0 && options.max_chunk < cluster {
            if let Some((bitmap, _)) = &bitmap {
                bitmap.reclaim();
            }
            return Err(QmpError::generic(format!(
                "Required max-chunk ({}) is less than backup cluster size ({cluster})",
                options.max_chunk
            )));
        }
        if let Some(name) = &c.filter_node_name
            && let Err(e) = check_filter_name(env, name)
        {
            if let Some((bitmap, _)) = &bitmap {
                bitmap.reclaim();
            }
            return Err(e);
        }
        // A negative speed is refused by the registry after creating the job (QEMU's order).
        let mut spec = JobSpec::new(c.job_id.clone().unwrap_or_default())
            .auto_finalize(c.auto_finalize.unwrap_or(true))
            .auto_dismiss(c.auto_dismiss.unwrap_or(true))
            .speed(c.speed.unwrap_or(0))
            .on_error(c.on_source_error, c.on_target_error);
        if options.discard_source && source.read_only() {
            // Discarding needs the source writable: QEMU's job cannot take that permission.
            spec = spec.fail_when_created("Block node is read-only");
        }
        let frozen = bitmap.as_ref().map(|(b, _)| b.clone());
        let total = BackupJob::total(source.as_ref(), sync, frozen.as_ref());
        let ranges = BackupJob::ranges(source.as_ref(), sync, frozen.as_ref());
        let buffers = env.buffers.clone();
        let cbw = env.graph_mut().and_then(|graph| {
            BackupCopy::set_up(
                graph.as_mut(),
                (&device, &source),
                (&target_name, &target),
                c.filter_node_name.as_deref(),
                sync,
                &ranges,
                &buffers,
                &options,
            )
        });
        let cbw = match cbw {
            Ok(cbw) => cbw,
            Err(e) => {
                if let Some(bitmap) = frozen {
                    bitmap.reclaim();
                }
                return Err(e);
            }
        };
        let filter = cbw.filter().map(str::to_string);
        let copy = cbw.copy().clone();
        let backup_env = BackupEnv {
            pool: env.pool.clone(),
            claims: env.claims.clone(),
            jobs: env.jobs.clone(),
        };
        let owned_target = self.opened.clone();
        // The job takes the copy-before-write when it is made; until then it is ours.
        let pending = Arc::new(std::sync::Mutex::new(Some(cbw)));
        let handed = pending.clone();
        let make = move |key| {
            let cbw = handed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            Box::new(
                BackupJob::new(
                    key,
                    (source, target),
                    (sync, bitmap),
                    backup_env,
                    (copy, cbw, options),
                )
                .owning_target(owned_target),
            ) as Box<dyn job::JobDriver>
        };
        let key = match env.jobs.create(spec, make, group.as_ref()) {
            Ok(key) => key,
            Err(e) => {
                if let Some(bitmap) = frozen {
                    bitmap.reclaim();
                }
                let unused = pending
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let (Some(cbw), Ok(graph)) = (unused, env.graph_mut()) {
                    cbw.discard(graph.as_mut());
                }
                return Err(e);
            }
        };
        env.jobs.set_progress_total(key, total);
        // QEMU's job sits on the copy-before-write filter above the source (its main node,
        // every operation blocked); the target is blocked. Without a filter (a graph that
        // makes none) the source is the main node, used, not blocked.
        match &filter {
            Some(filter) => {
                env.add_job_node(key, JobType::Backup, filter, MAIN_NODE, OpSet::ALL);
            }
            None => env.add_job_node(key, JobType::Backup, &device, MAIN_NODE, OpSet::default()),
        }
        env.add_job_node(key, JobType::Backup, &target_name, "target", OpSet::ALL);
        if let Some(drain) = self.drain.as_mut() {
            drain.hold(key);
        }
        self.key = Some(key);
        Ok(())
    }

    fn commit(&mut self, txn: &mut Transaction<'_>) {
        if let Some(key) = self.key
            && let Err(e) = txn.state.jobs.start(key)
        {
            tracing::warn!("backup job could not start: {e}");
        }
    }

    fn abort(&mut self, txn: &mut Transaction<'_>) {
        if let Some(key) = self.key.take() {
            let _ = txn.state.jobs.cancel_job(key, true);
            txn.state.claims.release(key);
        }
    }

    fn clean(&mut self, txn: &mut Transaction<'_>) {
        if let Some(drain) = self.drain.take() {
            txn.end_drain(drain);
        }
        // A target this action opened now belongs to the job (closed when it ends), or, if no
        // job was made, to nobody.
        if let Some(opened) = self.opened.take()
            && self.key.is_none()
            && let Ok(graph) = txn.state.graph_mut()
        {
            graph.release_if_unused(&opened);
        }
    }
}
