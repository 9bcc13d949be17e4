//! Small checked schemas built in code, for tests (and for bootstrapping
//! `qmp-api` before the schema loader existed).

use qapi_model::*;
use qapi_parser::{Location, SourceFile};
use std::sync::Arc;

pub fn loc() -> Location {
    Location {
        file: Arc::new(SourceFile {
            path: "fixture.json".into(),
            included_from: None,
        }),
        line: 1,
        col: 1,
    }
}

pub fn common(name: &str, doc: Option<&str>) -> Common {
    Common {
        name: name.into(),
        location: loc(),
        doc: doc.map(|d| Doc {
            body: d.into(),
            ..Doc::default()
        }),
        ifcond: None,
        features: Vec::new(),
    }
}

pub fn feature(name: &str) -> Feature {
    Feature {
        name: name.into(),
        ifcond: None,
        location: loc(),
    }
}

pub fn str_() -> TypeRef {
    TypeRef::Builtin(Builtin::Str)
}
pub fn int() -> TypeRef {
    TypeRef::Builtin(Builtin::Int)
}
pub fn bool_() -> TypeRef {
    TypeRef::Builtin(Builtin::Bool)
}
pub fn named(n: &str) -> TypeRef {
    TypeRef::Named(n.into())
}
pub fn array(t: TypeRef) -> TypeRef {
    TypeRef::Array(Box::new(t))
}

/// `name` (or `*name` for optional) of type `ty`.
pub fn member(name: &str, ty: TypeRef) -> Member {
    let (name, optional) = match name.strip_prefix('*') {
        Some(n) => (n, true),
        None => (name, false),
    };
    Member {
        name: name.into(),
        ty,
        optional,
        ifcond: None,
        features: Vec::new(),
        doc: None,
        location: loc(),
    }
}

pub fn enum_(name: &str, values: &[&str]) -> Entity {
    Entity::Enum(EnumType {
        common: common(name, None),
        values: values
            .iter()
            .map(|v| EnumValue {
                name: (*v).into(),
                ifcond: None,
                features: Vec::new(),
                doc: None,
            })
            .collect(),
        prefix: None,
    })
}

pub fn struct_(name: &str, base: Option<&str>, members: Vec<Member>) -> Entity {
    Entity::Struct(StructType {
        common: common(name, None),
        base: base.map(Into::into),
        members,
    })
}

pub fn union(
    name: &str,
    base: Vec<Member>,
    disc: &str,
    disc_enum: &str,
    branches: &[(&str, &str)],
) -> Entity {
    Entity::Union(UnionType {
        common: common(name, None),
        base: UnionBase::Inline(base),
        discriminator: disc.into(),
        discriminator_enum: disc_enum.into(),
        branches: branches
            .iter()
            .map(|(n, t)| Branch {
                name: (*n).into(),
                ty: (*t).into(),
                ifcond: None,
                location: loc(),
            })
            .collect(),
    })
}

pub fn alternate(name: &str, alts: Vec<(&str, TypeRef)>) -> Entity {
    Entity::Alternate(AlternateType {
        common: common(name, None),
        alternatives: alts
            .into_iter()
            .map(|(n, ty)| Alternative {
                name: n.into(),
                ty,
                ifcond: None,
                doc: None,
            })
            .collect(),
    })
}

pub fn command(name: &str, args: Option<ArgType>, returns: Option<TypeRef>) -> Entity {
    Entity::Command(Command {
        common: common(name, None),
        args,
        boxed: false,
        returns,
        success_response: true,
        gen_: true,
        allow_oob: false,
        allow_preconfig: false,
        coroutine: false,
    })
}

pub fn event(name: &str, data: Option<ArgType>) -> Entity {
    Entity::Event(Event {
        common: common(name, None),
        data,
        boxed: false,
    })
}

pub fn schema(entities: Vec<Entity>) -> Schema {
    Schema {
        entities,
        pragma: Pragma::default(),
        free_docs: Vec::new(),
    }
}

/// The seed: the job enums, `JOB_STATUS_CHANGE`, the block-job verbs and a
/// `transaction` with `blockdev-backup` actions.
pub fn seed() -> Schema {
    use ArgType::Inline;
    schema(vec![
        enum_(
            "JobType",
            &[
                "commit",
                "stream",
                "mirror",
                "backup",
                "create",
                "amend",
                "snapshot-load",
                "snapshot-save",
                "snapshot-delete",
            ],
        ),
        enum_(
            "JobStatus",
            &[
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null",
            ],
        ),
        enum_(
            "BlockJobStatus",
            &[
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null",
            ],
        ),
        enum_(
            "BlockJobVerb",
            &[
                "cancel",
                "pause",
                "resume",
                "set-speed",
                "complete",
                "dismiss",
                "finalize",
                "change",
            ],
        ),
        enum_(
            "MirrorSyncMode",
            &["top", "full", "none", "incremental", "bitmap"],
        ),
        enum_("BitmapSyncMode", &["on-success", "never", "always"]),
        enum_(
            "BlockdevOnError",
            &["report", "ignore", "enospc", "stop", "auto"],
        ),
        enum_("ActionCompletionMode", &["individual", "grouped"]),
        event(
            "JOB_STATUS_CHANGE",
            Some(Inline(vec![
                member("id", str_()),
                member("status", named("JobStatus")),
            ])),
        ),
        event(
            "BLOCK_JOB_COMPLETED",
            Some(Inline(vec![
                member("type", named("JobType")),
                member("device", str_()),
                member("len", int()),
                member("offset", int()),
                member("speed", int()),
                member("*error", str_()),
            ])),
        ),
        event(
            "BLOCK_JOB_PENDING",
            Some(Inline(vec![
                member("type", named("JobType")),
                member("id", str_()),
            ])),
        ),
        command(
            "block-job-set-speed",
            Some(Inline(vec![
                member("device", str_()),
                member("speed", int()),
            ])),
            None,
        ),
        command(
            "block-job-finalize",
            Some(Inline(vec![member("id", str_())])),
            None,
        ),
        command(
            "block-job-dismiss",
            Some(Inline(vec![member("id", str_())])),
            None,
        ),
        struct_(
            "BackupCommon",
            None,
            vec![
                member("*job-id", str_()),
                member("device", str_()),
                member("sync", named("MirrorSyncMode")),
                member("*speed", int()),
                member("*bitmap", str_()),
                member("*bitmap-mode", named("BitmapSyncMode")),
                member("*compress", bool_()),
                member("*on-source-error", named("BlockdevOnError")),
                member("*on-target-error", named("BlockdevOnError")),
                member("*auto-finalize", bool_()),
                member("*auto-dismiss", bool_()),
                member("*filter-node-name", str_()),
            ],
        ),
        struct_(
            "BlockdevBackup",
            Some("BackupCommon"),
            vec![member("target", str_())],
        ),
        command(
            "blockdev-backup",
            Some(ArgType::Named("BlockdevBackup".into())),
            None,
        ),
        struct_("Abort", None, vec![]),
        enum_("TransactionActionKind", &["abort", "blockdev-backup"]),
        struct_("AbortWrapper", None, vec![member("data", named("Abort"))]),
        struct_(
            "BlockdevBackupWrapper",
            None,
            vec![member("data", named("BlockdevBackup"))],
        ),
        union(
            "TransactionAction",
            vec![member("type", named("TransactionActionKind"))],
            "type",
            "TransactionActionKind",
            &[
                ("abort", "AbortWrapper"),
                ("blockdev-backup", "BlockdevBackupWrapper"),
            ],
        ),
        struct_(
            "TransactionProperties",
            None,
            vec![member("*completion-mode", named("ActionCompletionMode"))],
        ),
        command(
            "transaction",
            Some(Inline(vec![
                member("actions", array(named("TransactionAction"))),
                member("*properties", named("TransactionProperties")),
            ])),
            None,
        ),
        struct_(
            "BlockJobInfo",
            None,
            vec![
                member("type", str_()),
                member("device", str_()),
                member("len", int()),
                member("offset", int()),
                member("busy", bool_()),
                member("paused", bool_()),
                member("speed", int()),
                member("ready", bool_()),
                member("status", named("JobStatus")),
                member("auto-finalize", bool_()),
                member("auto-dismiss", bool_()),
                member("*error", str_()),
            ],
        ),
        command("query-block-jobs", None, Some(array(named("BlockJobInfo")))),
    ])
}
