//! The generated code for one small schema per construct, as reviewed snapshots.

mod fixture;

use fixture::*;
use qapi_model::*;

/// All generated files of `schema` except the module list, concatenated.
fn generated(schema: &Schema) -> String {
    let files = qapi_codegen::generate(schema).expect("generates");
    files
        .into_iter()
        .filter(|f| f.path != "mod.rs")
        .map(|f| format!("==> {} <==\n{}", f.path, f.contents))
        .collect::<Vec<_>>()
        .join("\n")
}

fn only_types(schema: &Schema) -> String {
    let files = qapi_codegen::generate(schema).expect("generates");
    files
        .into_iter()
        .find(|f| f.path == "types.rs")
        .map(|f| f.contents)
        .unwrap_or_default()
}

fn with_doc(mut e: Entity, body: &str, sections: &[(&str, &str)]) -> Entity {
    let doc = Doc {
        body: body.into(),
        sections: sections
            .iter()
            .map(|(t, text)| DocSection {
                tag: Some((*t).into()),
                text: (*text).into(),
            })
            .collect(),
        ..Doc::default()
    };
    match &mut e {
        Entity::Enum(x) => x.common.doc = Some(doc),
        Entity::Struct(x) => x.common.doc = Some(doc),
        Entity::Union(x) => x.common.doc = Some(doc),
        Entity::Alternate(x) => x.common.doc = Some(doc),
        Entity::Command(x) => x.common.doc = Some(doc),
        Entity::Event(x) => x.common.doc = Some(doc),
    }
    e
}

#[test]
fn enum_snapshot() {
    let mut e = enum_("BlockJobVerb", &["cancel", "set-speed"]);
    if let Entity::Enum(x) = &mut e {
        x.values[0].doc = Some("see @block-job-cancel".into());
    }
    let e = with_doc(e, "Represents command verbs.", &[("Since", "2.12")]);
    insta::assert_snapshot!(only_types(&schema(vec![e])));
}

#[test]
fn struct_with_base_and_optionals_snapshot() {
    let mut base = struct_("Base", None, vec![member("id", str_())]);
    if let Entity::Struct(s) = &mut base {
        s.members[0].doc = Some("The job identifier.".into());
    }
    let s = schema(vec![
        base,
        struct_(
            "Child",
            Some("Base"),
            vec![member("*speed", int()), member("names", array(str_()))],
        ),
    ]);
    insta::assert_snapshot!(only_types(&s));
}

#[test]
fn union_snapshot() {
    let s = schema(vec![
        enum_("Kind", &["a", "b"]),
        struct_("BranchA", None, vec![member("x", int())]),
        union(
            "Thing",
            vec![member("id", str_()), member("kind", named("Kind"))],
            "kind",
            "Kind",
            &[("a", "BranchA")],
        ),
    ]);
    insta::assert_snapshot!(only_types(&s));
}

/// What replies and events carry gets an `UnknownValue` (enum value, union branch), read
/// tolerantly; a union only sent to a server refuses a discriminator value it lacks.
#[test]
fn types_read_from_replies_and_events_snapshot() {
    let s = schema(vec![
        enum_("Kind", &["a", "b"]),
        struct_("BranchA", None, vec![member("x", int())]),
        union(
            "Thing",
            vec![member("id", str_()), member("kind", named("Kind"))],
            "kind",
            "Kind",
            &[("a", "BranchA")],
        ),
        union(
            "Order",
            vec![member("kind", named("Kind"))],
            "kind",
            "Kind",
            &[("a", "BranchA")],
        ),
        command("query-things", None, Some(array(named("Thing")))),
        command("place-order", Some(ArgType::Named("Order".into())), None),
    ]);
    insta::assert_snapshot!(only_types(&s));
}

#[test]
fn alternate_snapshot() {
    let s = schema(vec![
        struct_("Options", None, vec![member("*r", named("Ref"))]),
        alternate(
            "Ref",
            vec![
                ("definition", named("Options")),
                ("reference", str_()),
                ("null", TypeRef::Builtin(Builtin::Null)),
            ],
        ),
    ]);
    insta::assert_snapshot!(only_types(&s));
}

#[test]
fn command_snapshot() {
    let s = schema(vec![
        struct_("Info", None, vec![member("id", str_())]),
        with_doc(
            command(
                "block-job-finalize",
                Some(ArgType::Inline(vec![member("id", str_())])),
                None,
            ),
            "Finalize a pending job.",
            &[("Since", "2.12")],
        ),
        command("query-info", None, Some(array(named("Info")))),
    ]);
    insta::assert_snapshot!(generated(&s));
}

#[test]
fn event_snapshot() {
    let s = schema(vec![
        enum_("JobStatus", &["created", "null"]),
        event(
            "JOB_STATUS_CHANGE",
            Some(ArgType::Inline(vec![
                member("id", str_()),
                member("status", named("JobStatus")),
            ])),
        ),
        event("SHUTDOWN", None),
    ]);
    insta::assert_snapshot!(generated(&s));
}

#[test]
fn features_and_deprecated_snapshot() {
    let mut st = struct_(
        "Old",
        None,
        vec![member("*base", str_()), member("top", str_())],
    );
    if let Entity::Struct(s) = &mut st {
        s.common.features.push(feature("unstable"));
        s.members[0].features.push(feature("deprecated"));
    }
    let mut cmd = command("x-old", None, None);
    if let Entity::Command(c) = &mut cmd {
        c.common.features.push(feature("deprecated"));
    }
    let mut en = enum_("Driver", &["gluster", "file"]);
    if let Entity::Enum(e) = &mut en {
        e.values[0].features.push(feature("deprecated"));
    }
    insta::assert_snapshot!(generated(&schema(vec![st, en, cmd])));
}

#[test]
fn if_conditions_snapshot() {
    let mut st = struct_("LinuxOnly", None, vec![member("aio", str_())]);
    if let Entity::Struct(s) = &mut st {
        s.common.ifcond = Some(IfCond::All(vec![
            IfCond::Name("CONFIG_LINUX".into()),
            IfCond::Not(Box::new(IfCond::Name("CONFIG_WIN32".into()))),
        ]));
        s.members[0].ifcond = Some(IfCond::Any(vec![
            IfCond::Name("CONFIG_LINUX_AIO".into()),
            IfCond::Name("CONFIG_LINUX_IO_URING".into()),
        ]));
    }
    insta::assert_snapshot!(only_types(&schema(vec![st])));
}

#[test]
fn keywords_and_digits_snapshot() {
    let s = schema(vec![
        enum_("Qcow2CompatLevel", &["0.10", "1.1", "type", "Self"]),
        struct_(
            "Keywords",
            None,
            vec![
                member("type", str_()),
                member("gen", int()),
                member("self", bool_()),
                member("802.1x", str_()),
                member("in", str_()),
            ],
        ),
    ]);
    insta::assert_snapshot!(only_types(&s));
}

#[test]
fn seed_snapshot() {
    insta::assert_snapshot!(generated(&seed()));
}

#[test]
fn generation_is_deterministic() {
    assert_eq!(generated(&seed()), generated(&seed()));
}

#[test]
fn every_file_starts_with_the_generated_header() {
    for f in qapi_codegen::generate(&seed()).unwrap() {
        assert!(f.contents.starts_with(qapi_codegen::HEADER), "{}", f.path);
    }
}

/// The seed definitions (block-job-finalize and its enums; QEMU's
/// transaction.json) as written in our `qapi-schema/`.
#[test]
fn seed_definitions_from_qapi_schema_snapshot() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../qapi-schema/qapi-schema.json"
    );
    let full = qapi_model::load(std::path::Path::new(path)).unwrap_or_else(|d| panic!("{d}"));
    let wanted = [
        "BlockJobVerb",
        "BlockJobStatus",
        "block-job-finalize",
        "ActionCompletionMode",
        "TransactionActionKind",
        "AbortWrapper",
        "BlockdevBackupWrapper",
        "TransactionAction",
        "TransactionProperties",
        "transaction",
    ];
    let subset = Schema {
        entities: full
            .entities
            .iter()
            .filter(|e| wanted.contains(&e.name()))
            .cloned()
            .collect(),
        pragma: Pragma::default(),
        free_docs: Vec::new(),
    };
    assert_eq!(
        subset.entities.len(),
        wanted.len(),
        "every seed definition is in qapi-schema/"
    );
    insta::assert_snapshot!(generated(&subset));
}
