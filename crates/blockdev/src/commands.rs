//! The generated `Commands` trait, implemented over the job registry and the node graph.

use job::JobRef;
use qmp_api::{
    ActionCompletionMode, BlockCommitArguments, BlockDeviceInfo, BlockDirtyBitmap,
    BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, BlockExportDelArguments, BlockExportOptions,
    BlockJobCancelArguments, BlockJobChangeOptions, BlockJobCompleteArguments,
    BlockJobDismissArguments, BlockJobFinalizeArguments, BlockJobInfo, BlockJobPauseArguments,
    BlockJobResumeArguments, BlockJobSetSpeedArguments, BlockJobVerb, BlockStreamArguments,
    BlockdevBackup, BlockdevCreateArguments, BlockdevDelArguments, BlockdevMirrorArguments,
    BlockdevOptions, BlockdevSnapshot, BlockdevSnapshotInternal, BlockdevSnapshotSync, Commands,
    DriveBackup, JobCancelArguments, JobCompleteArguments, JobDismissArguments,
    JobFinalizeArguments, JobInfo, JobPauseArguments, JobResumeArguments, NbdServerOptionsLegacy,
    QmpError, QueryNamedBlockNodesArguments, SchemaInfo, TransactionActionBranch,
    TransactionActionKind, TransactionArguments, VersionInfo, XBlockdevAmendArguments,
};
use qmp_api::{
    BlockDirtyBitmapSha256, BlockExportInfo, BlockResizeArguments, BlockSetWriteThresholdArguments,
    BlockStats, BlockdevReopenArguments, BlockdevSetActiveArguments,
    BlockdevSnapshotDeleteInternalSyncArguments, ChangeBackingFileArguments, ChardevAddArguments,
    ChardevBackendInfo, ChardevInfo, ChardevRemoveArguments, ChardevReturn,
    ChardevSendBreakArguments, NbdServerAddOptions, NbdServerRemoveArguments, ObjectDelArguments,
    ObjectOptions, ObjectPropertyInfo, ObjectTypeInfo, QomGetArguments, QomListArguments,
    QomListPropertiesArguments, QomListTypesArguments, QomSetArguments, QueryBlockstatsArguments,
    RingbufReadArguments, RingbufWriteArguments, SnapshotInfo, XDbgBlockGraph,
};

use crate::Blockdev;
use crate::actions::BackupAction;
use crate::bitmaps::{self, BitmapAction};
use crate::export;
use crate::qom;
use crate::snapshot::{ExternalSnapshot, InternalSnapshot};
use crate::transaction::{self, AbortAction, Action};

/// The action behind one `transaction` entry.
fn action_of(branch: TransactionActionBranch) -> Box<dyn Action> {
    match branch {
        TransactionActionBranch::Abort(_) => Box::new(AbortAction),
        TransactionActionBranch::BlockdevBackup(w) => Box::new(BackupAction::blockdev(w.data)),
        TransactionActionBranch::DriveBackup(w) => Box::new(BackupAction::drive(w.data)),
        TransactionActionBranch::BlockDirtyBitmapAdd(w) => Box::new(BitmapAction::add(w.data)),
        TransactionActionBranch::BlockDirtyBitmapRemove(w) => {
            Box::new(BitmapAction::remove(w.data))
        }
        TransactionActionBranch::BlockDirtyBitmapClear(w) => Box::new(BitmapAction::clear(w.data)),
        TransactionActionBranch::BlockDirtyBitmapEnable(w)
        | TransactionActionBranch::XBlockDirtyBitmapEnable(w) => {
            Box::new(BitmapAction::set_enabled(w.data, true))
        }
        TransactionActionBranch::BlockDirtyBitmapDisable(w)
        | TransactionActionBranch::XBlockDirtyBitmapDisable(w) => {
            Box::new(BitmapAction::set_enabled(w.data, false))
        }
        TransactionActionBranch::BlockDirtyBitmapMerge(w)
        | TransactionActionBranch::XBlockDirtyBitmapMerge(w) => {
            Box::new(BitmapAction::merge(w.data))
        }
        TransactionActionBranch::BlockdevSnapshotSync(w) => {
            Box::new(ExternalSnapshot::sync(w.data))
        }
        TransactionActionBranch::BlockdevSnapshot(w) => {
            Box::new(ExternalSnapshot::existing(w.data))
        }
        TransactionActionBranch::BlockdevSnapshotInternalSync(w) => {
            Box::new(InternalSnapshot::new(w.data))
        }
    }
}

impl Blockdev {
    /// Closes the nodes that only finished jobs held.
    pub(crate) fn close_retired_nodes(&mut self) {
        let retired = self.state.claims.take_retired();
        if let Some(graph) = self.state.graph.as_mut() {
            for node in retired {
                graph.release_if_unused(&node);
            }
        }
    }

    /// `qmp_transaction`: drain everything, then run the actions as one transaction (sharing
    /// one job transaction if `grouped`).
    fn run_transaction(
        &mut self,
        actions: Vec<Box<dyn Action>>,
        grouped: bool,
    ) -> Result<(), QmpError> {
        self.close_retired_nodes();
        // The actions see one point in time: no export request runs meanwhile.
        let _quiet = self.state.exports.drain();
        self.state.jobs.drain_all();
        let group = grouped.then(|| self.state.jobs.new_txn());
        transaction::run(&mut self.state, actions, group.as_ref())
    }
}

impl Commands for Blockdev {
    fn query_version(&mut self) -> Result<VersionInfo, QmpError> {
        Ok(crate::version_info())
    }

    /// Every command of the generated table: the schema is what blockjobd serves (the
    /// monitor answers `qmp_capabilities` and `quit` itself).
    fn query_commands(&mut self) -> Result<Vec<qmp_api::generated::CommandInfo>, QmpError> {
        Ok(qmp_api::COMMANDS
            .iter()
            .map(|c| qmp_api::generated::CommandInfo {
                name: c.name.to_string(),
            })
            .collect())
    }

    fn query_qmp_schema(&mut self) -> Result<Vec<SchemaInfo>, QmpError> {
        qmp_api::input::from_value(&qmp_api::qmp_schema())
    }

    // ----- job-* -----

    fn job_pause(&mut self, args: JobPauseArguments) -> Result<(), QmpError> {
        self.state.jobs.pause_job(JobRef::Job(&args.id))
    }

    fn job_resume(&mut self, args: JobResumeArguments) -> Result<(), QmpError> {
        self.state.jobs.resume_job(JobRef::Job(&args.id))
    }

    fn job_cancel(&mut self, args: JobCancelArguments) -> Result<(), QmpError> {
        self.state.jobs.cancel(JobRef::Job(&args.id), true)
    }

    fn job_complete(&mut self, args: JobCompleteArguments) -> Result<(), QmpError> {
        crate::mirror::complete(&mut self.state, JobRef::Job(&args.id))
    }

    fn job_dismiss(&mut self, args: JobDismissArguments) -> Result<(), QmpError> {
        self.state.jobs.dismiss(JobRef::Job(&args.id))
    }

    fn job_finalize(&mut self, args: JobFinalizeArguments) -> Result<(), QmpError> {
        self.state.jobs.finalize(JobRef::Job(&args.id))
    }

    fn query_jobs(&mut self) -> Result<Vec<JobInfo>, QmpError> {
        Ok(self.state.jobs.query_jobs())
    }

    // ----- nodes -----

    fn query_named_block_nodes(
        &mut self,
        args: QueryNamedBlockNodesArguments,
    ) -> Result<Vec<BlockDeviceInfo>, QmpError> {
        self.close_retired_nodes();
        if let Some(name) = self.state.graph.as_ref().and_then(|g| g.ejected_node()) {
            return Err(QmpError::generic(format!("Block device {name} is ejected")));
        }
        let mut infos = match &self.state.graph {
            Some(graph) => graph.query_named_block_nodes(args.flat.unwrap_or(false)),
            None => Vec::new(),
        };
        for info in &mut infos {
            if let Some(name) = &info.node_name {
                info.write_threshold =
                    crate::nodes::wire_threshold(self.state.thresholds.get(name));
            }
        }
        Ok(infos)
    }

    fn blockdev_add(&mut self, args: BlockdevOptions) -> Result<(), QmpError> {
        self.state.graph_mut()?.blockdev_add(args)
    }

    fn blockdev_del(&mut self, args: BlockdevDelArguments) -> Result<(), QmpError> {
        // A finished backup's filter still holds its source until this.
        self.close_retired_nodes();
        self.state.check_deletable(&args.node_name)?;
        let name = args.node_name.clone();
        self.state.graph_mut()?.blockdev_del(args)?;
        self.state.thresholds.forget(&name);
        Ok(())
    }

    fn blockdev_reopen(&mut self, args: BlockdevReopenArguments) -> Result<(), QmpError> {
        self.close_retired_nodes();
        self.state.graph_mut()?.reopen(&args.options)
    }

    fn blockdev_set_active(&mut self, args: BlockdevSetActiveArguments) -> Result<(), QmpError> {
        self.close_retired_nodes();
        self.state
            .graph_mut()?
            .set_active(args.node_name.as_deref(), args.active)
    }

    // ----- bitmaps -----

    fn block_dirty_bitmap_add(&mut self, args: BlockDirtyBitmapAdd) -> Result<(), QmpError> {
        bitmaps::add(&self.state, &args)
    }

    fn block_dirty_bitmap_remove(&mut self, args: BlockDirtyBitmap) -> Result<(), QmpError> {
        bitmaps::remove(&self.state, &args)
    }

    fn block_dirty_bitmap_clear(&mut self, args: BlockDirtyBitmap) -> Result<(), QmpError> {
        bitmaps::clear(&self.state, &args).map(drop)
    }

    fn block_dirty_bitmap_enable(&mut self, args: BlockDirtyBitmap) -> Result<(), QmpError> {
        bitmaps::set_enabled(&self.state, &args, true).map(drop)
    }

    fn block_dirty_bitmap_disable(&mut self, args: BlockDirtyBitmap) -> Result<(), QmpError> {
        bitmaps::set_enabled(&self.state, &args, false).map(drop)
    }

    fn block_dirty_bitmap_merge(&mut self, args: BlockDirtyBitmapMerge) -> Result<(), QmpError> {
        bitmaps::merge(&self.state, &args).map(drop)
    }

    // ----- block-job-* -----

    fn query_block_jobs(&mut self) -> Result<Vec<BlockJobInfo>, QmpError> {
        Ok(self.state.jobs.query_block_jobs())
    }

    fn block_job_set_speed(&mut self, args: BlockJobSetSpeedArguments) -> Result<(), QmpError> {
        self.state
            .jobs
            .set_speed(JobRef::BlockJob(&args.device), args.speed)
    }

    fn block_job_cancel(&mut self, args: BlockJobCancelArguments) -> Result<(), QmpError> {
        self.state
            .jobs
            .cancel(JobRef::BlockJob(&args.device), args.force.unwrap_or(false))
    }

    fn block_job_pause(&mut self, args: BlockJobPauseArguments) -> Result<(), QmpError> {
        self.state.jobs.pause_job(JobRef::BlockJob(&args.device))
    }

    fn block_job_resume(&mut self, args: BlockJobResumeArguments) -> Result<(), QmpError> {
        self.state.jobs.resume_job(JobRef::BlockJob(&args.device))
    }

    fn block_job_complete(&mut self, args: BlockJobCompleteArguments) -> Result<(), QmpError> {
        crate::mirror::complete(&mut self.state, JobRef::BlockJob(&args.device))
    }

    fn block_job_dismiss(&mut self, args: BlockJobDismissArguments) -> Result<(), QmpError> {
        self.state.jobs.dismiss(JobRef::BlockJob(&args.id))
    }

    fn block_job_finalize(&mut self, args: BlockJobFinalizeArguments) -> Result<(), QmpError> {
        self.state.jobs.finalize(JobRef::BlockJob(&args.id))
    }

    fn block_job_change(&mut self, args: BlockJobChangeOptions) -> Result<(), QmpError> {
        let target = JobRef::BlockJob(&args.id);
        let key = self.state.jobs.check_verb(target, BlockJobVerb::Change)?;
        let job_type = self.state.jobs.block_job_info(key).map(|j| j.branch.kind());
        // Only mirror's driver has `change` (an active commit is a mirror of type commit).
        if job_type != Some(qmp_api::JobType::Mirror) {
            return Err(QmpError::generic("Job type does not support change"));
        }
        if job_type != Some(args.branch.kind()) {
            return Err(QmpError::generic("Job type does not match specified type"));
        }
        let shared = crate::mirror::shared(&mut self.state, key);
        match (&args.branch, shared) {
            (qmp_api::BlockJobChangeOptionsBranch::Mirror(m), Some(shared)) => {
                shared.change(m.copy_mode)
            }
            // QEMU: a driver without `change` accepts.
            _ => Ok(()),
        }
    }

    // ----- jobs from commands -----

    fn blockdev_backup(&mut self, args: BlockdevBackup) -> Result<(), QmpError> {
        self.run_transaction(vec![Box::new(BackupAction::blockdev(args))], false)
    }

    fn drive_backup(&mut self, args: DriveBackup) -> Result<(), QmpError> {
        self.run_transaction(vec![Box::new(BackupAction::drive(args))], false)
    }

    fn block_resize(&mut self, args: BlockResizeArguments) -> Result<(), QmpError> {
        crate::nodes::block_resize(&mut self.state, args)
    }

    fn blockdev_snapshot_delete_internal_sync(
        &mut self,
        args: BlockdevSnapshotDeleteInternalSyncArguments,
    ) -> Result<SnapshotInfo, QmpError> {
        crate::nodes::delete_internal_snapshot(&mut self.state, args)
    }

    fn change_backing_file(&mut self, args: ChangeBackingFileArguments) -> Result<(), QmpError> {
        crate::nodes::change_backing_file(&mut self.state, args)
    }

    fn block_set_write_threshold(
        &mut self,
        args: BlockSetWriteThresholdArguments,
    ) -> Result<(), QmpError> {
        crate::nodes::set_write_threshold(&mut self.state, args)
    }

    fn query_block_exports(&mut self) -> Result<Vec<BlockExportInfo>, QmpError> {
        Ok(self.state.exports.query())
    }

    fn x_debug_block_dirty_bitmap_sha256(
        &mut self,
        args: BlockDirtyBitmap,
    ) -> Result<BlockDirtyBitmapSha256, QmpError> {
        crate::inspect::bitmap_sha256(&self.state, &args)
    }

    fn x_debug_query_block_graph(&mut self) -> Result<XDbgBlockGraph, QmpError> {
        self.close_retired_nodes();
        Ok(crate::inspect::block_graph(&self.state))
    }

    fn query_blockstats(
        &mut self,
        args: QueryBlockstatsArguments,
    ) -> Result<Vec<BlockStats>, QmpError> {
        self.close_retired_nodes();
        Ok(crate::inspect::blockstats(
            &self.state,
            args.query_nodes.unwrap_or(false),
        ))
    }

    fn blockdev_create(&mut self, args: BlockdevCreateArguments) -> Result<(), QmpError> {
        self.close_retired_nodes();
        crate::create::blockdev_create(&mut self.state, args)
    }

    fn x_blockdev_amend(&mut self, args: XBlockdevAmendArguments) -> Result<(), QmpError> {
        crate::create::x_blockdev_amend(&mut self.state, args)
    }

    fn blockdev_mirror(&mut self, args: BlockdevMirrorArguments) -> Result<(), QmpError> {
        crate::mirror::blockdev_mirror(&mut self.state, args)
    }

    fn drive_mirror(&mut self, args: qmp_api::DriveMirror) -> Result<(), QmpError> {
        crate::mirror::drive_mirror(&mut self.state, args)
    }

    fn block_commit(&mut self, args: BlockCommitArguments) -> Result<(), QmpError> {
        self.close_retired_nodes();
        crate::commit::start(&mut self.state, args)
    }

    fn block_stream(&mut self, args: BlockStreamArguments) -> Result<(), QmpError> {
        self.close_retired_nodes();
        crate::stream::start(&mut self.state, args)
    }

    fn blockdev_snapshot_sync(&mut self, args: BlockdevSnapshotSync) -> Result<(), QmpError> {
        self.run_transaction(vec![Box::new(ExternalSnapshot::sync(args))], false)
    }

    fn blockdev_snapshot(&mut self, args: BlockdevSnapshot) -> Result<(), QmpError> {
        self.run_transaction(vec![Box::new(ExternalSnapshot::existing(args))], false)
    }

    fn blockdev_snapshot_internal_sync(
        &mut self,
        args: BlockdevSnapshotInternal,
    ) -> Result<(), QmpError> {
        self.run_transaction(vec![Box::new(InternalSnapshot::new(args))], false)
    }

    fn nbd_server_start(&mut self, args: NbdServerOptionsLegacy) -> Result<(), QmpError> {
        self.state.exports.start(args)
    }

    fn nbd_server_stop(&mut self) -> Result<(), QmpError> {
        self.state.exports.stop()
    }

    fn block_export_add(&mut self, args: BlockExportOptions) -> Result<(), QmpError> {
        export::add(&mut self.state, args)
    }

    fn block_export_del(&mut self, args: BlockExportDelArguments) -> Result<(), QmpError> {
        export::del(&mut self.state, args)
    }

    fn transaction(&mut self, args: TransactionArguments) -> Result<(), QmpError> {
        let grouped =
            args.properties.and_then(|p| p.completion_mode) == Some(ActionCompletionMode::Grouped);
        if grouped {
            for action in &args.actions {
                let kind = action.branch.kind();
                #[allow(deprecated)] // drive-backup is deprecated in the schema, still served
                let backup = matches!(
                    kind,
                    TransactionActionKind::BlockdevBackup | TransactionActionKind::DriveBackup
                );
                if !backup {
                    return Err(QmpError::generic(format!(
                        "Action '{kind}' does not support transaction property completion-mode = grouped"
                    )));
                }
            }
        }
        let actions = args
            .actions
            .into_iter()
            .map(|a| action_of(a.branch))
            .collect();
        self.run_transaction(actions, grouped)
    }

    // ----- objects, the object tree, chardevs (objects.rs, qom.rs, chardev.rs) -----

    fn object_add(&mut self, args: ObjectOptions) -> Result<(), QmpError> {
        self.state.objects.add(args)
    }

    fn object_del(&mut self, args: ObjectDelArguments) -> Result<(), QmpError> {
        self.state.objects.del(&args.id)
    }

    fn qom_list(&mut self, args: QomListArguments) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
        qom::list(&mut self.state.objects, &self.state.chardevs, &args.path)
    }

    fn qom_get(&mut self, args: QomGetArguments) -> Result<serde_json::Value, QmpError> {
        qom::get(
            &mut self.state.objects,
            &self.state.chardevs,
            &args.path,
            &args.property,
        )
    }

    fn qom_set(&mut self, args: QomSetArguments) -> Result<(), QmpError> {
        qom::set(
            &mut self.state.objects,
            &self.state.chardevs,
            &args.path,
            &args.property,
            &args.value,
        )
    }

    fn qom_list_types(
        &mut self,
        args: QomListTypesArguments,
    ) -> Result<Vec<ObjectTypeInfo>, QmpError> {
        Ok(qom::list_types(
            args.implements.as_deref(),
            args.r#abstract.unwrap_or(false),
        ))
    }

    fn qom_list_properties(
        &mut self,
        args: QomListPropertiesArguments,
    ) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
        qom::list_properties(&args.typename)
    }

    fn query_chardev(&mut self) -> Result<Vec<ChardevInfo>, QmpError> {
        Ok(self.state.chardevs.query())
    }

    fn query_chardev_backends(&mut self) -> Result<Vec<ChardevBackendInfo>, QmpError> {
        Ok(qmp_api::ChardevBackendKind::ALL
            .iter()
            .map(|k| ChardevBackendInfo {
                name: k.as_str().to_string(),
            })
            .collect())
    }

    fn chardev_add(&mut self, args: ChardevAddArguments) -> Result<ChardevReturn, QmpError> {
        self.state.chardevs.add(args.id, args.backend)?;
        Ok(ChardevReturn { pty: None })
    }

    fn chardev_change(
        &mut self,
        args: qmp_api::ChardevChangeArguments,
    ) -> Result<ChardevReturn, QmpError> {
        self.state.chardevs.change(args.id, args.backend)?;
        Ok(ChardevReturn { pty: None })
    }

    fn chardev_remove(&mut self, args: ChardevRemoveArguments) -> Result<(), QmpError> {
        self.state.chardevs.remove(&args.id)
    }

    fn chardev_send_break(&mut self, args: ChardevSendBreakArguments) -> Result<(), QmpError> {
        self.state.chardevs.send_break(&args.id)
    }

    fn ringbuf_write(&mut self, args: RingbufWriteArguments) -> Result<(), QmpError> {
        self.state
            .chardevs
            .ringbuf_write(&args.device, &args.data, args.format)
    }

    fn ringbuf_read(&mut self, args: RingbufReadArguments) -> Result<String, QmpError> {
        self.state
            .chardevs
            .ringbuf_read(&args.device, args.size, args.format)
    }

    /// A storage daemon has no named block backend and no guest device: QSD's answer is
    /// always empty (exports' backends are anonymous).
    fn query_block(&mut self) -> Result<Vec<qmp_api::BlockInfo>, QmpError> {
        Ok(Vec::new())
    }

    // ----- the legacy NBD export commands (export.rs) -----

    fn nbd_server_add(&mut self, args: NbdServerAddOptions) -> Result<(), QmpError> {
        export::nbd_server_add(&mut self.state, args)
    }

    fn nbd_server_remove(&mut self, args: NbdServerRemoveArguments) -> Result<(), QmpError> {
        export::nbd_server_remove(&mut self.state, args)
    }
}
