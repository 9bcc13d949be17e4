//! QEMU's complete schema loads with zero errors, and comes out linked.

use qapi_model::*;

fn qemu() -> Schema {
    let path = qapi_testdata::qemu_schema().expect("locate QEMU's schema");
    load(&path).unwrap_or_else(|d| panic!("QEMU's schema has errors:\n{d}"))
}

#[test]
fn qemu_schema_loads_with_zero_errors() {
    let schema = qemu();
    assert_eq!(schema.entities.len(), 974);
    assert!(schema.pragma.doc_required);
}

#[test]
fn blockdev_options_is_a_union_on_driver() {
    let schema = qemu();
    let Some(Entity::Union(u)) = schema.entity("BlockdevOptions") else {
        panic!("BlockdevOptions is not a union");
    };
    assert_eq!(u.discriminator, "driver");
    assert_eq!(u.discriminator_enum, "BlockdevDriver");
    assert!(
        u.branches
            .iter()
            .any(|b| b.name == "qcow2" && b.ty == "BlockdevOptionsQcow2")
    );
}

#[test]
fn blockdev_backup_is_a_command_taking_a_named_struct() {
    let schema = qemu();
    let Some(Entity::Command(c)) = schema.entity("blockdev-backup") else {
        panic!("blockdev-backup is not a command");
    };
    assert_eq!(c.args, Some(ArgType::Named("BlockdevBackup".into())));
    assert!(
        c.common
            .doc
            .as_ref()
            .is_some_and(|d| d.section("Since").is_some())
    );
}

#[test]
fn job_status_has_eleven_values_with_docs() {
    let schema = qemu();
    let Some(Entity::Enum(e)) = schema.entity("JobStatus") else {
        panic!("JobStatus is not an enum");
    };
    assert_eq!(e.values.len(), 11);
    assert!(e.values.iter().all(|v| v.doc.is_some()));
}

#[test]
fn conditional_entities_keep_their_condition() {
    let schema = qemu();
    let conditional = schema.entity("query-sev").expect("query-sev");
    assert!(conditional.common().ifcond.is_some());
    let any_all_not = schema
        .entities
        .iter()
        .filter_map(|e| e.common().ifcond.as_ref())
        .any(|c| matches!(c, IfCond::All(_) | IfCond::Any(_) | IfCond::Not(_)));
    assert!(any_all_not, "no entity with a compound condition");
}

#[test]
fn member_docs_come_from_the_owner_doc_block() {
    let schema = qemu();
    let members = schema.all_members("BlockdevBackup");
    let job_id = members.iter().find(|m| m.name == "job-id").expect("job-id");
    assert!(job_id.optional);
    assert!(job_id.doc.as_deref().is_some_and(|d| !d.is_empty()));
}

#[test]
fn free_form_doc_blocks_are_kept_with_their_position() {
    let schema = qemu();
    assert!(
        schema
            .free_docs
            .iter()
            .any(|(_, d)| d.body.starts_with("= "))
    );
    assert!(
        schema
            .free_docs
            .iter()
            .all(|(i, _)| *i <= schema.entities.len())
    );
}
