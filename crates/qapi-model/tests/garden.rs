//! A schema using every construct loads, and the model links it as the
//! generator expects.

use qapi_model::*;

fn garden() -> Schema {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/garden.json");
    load(std::path::Path::new(path)).unwrap_or_else(|d| panic!("{d}"))
}

#[test]
fn entities_keep_definition_order() {
    let schema = garden();
    let names: Vec<&str> = schema.entities.iter().map(|e| e.name()).collect();
    assert_eq!(
        names,
        [
            "Season",
            "Legacy",
            "Undocumented",
            "PlantKind",
            "PlantBase",
            "Tree",
            "Sapling",
            "Flower",
            "Plant",
            "Bed",
            "Amount",
            "plant",
            "count-plants",
            "water_all",
            "dig",
            "PLANTED",
            "DUG"
        ]
    );
}

#[test]
fn pragmas_are_merged() {
    let p = garden().pragma;
    assert!(p.doc_required);
    assert_eq!(p.command_name_exceptions, ["water_all"]);
    assert_eq!(p.documentation_exceptions, ["Undocumented"]);
}

#[test]
fn enum_values_carry_condition_features_and_doc() {
    let Some(Entity::Enum(e)) = garden().entity("Season").cloned() else {
        panic!("Season")
    };
    assert_eq!(e.prefix.as_deref(), Some("SEASON"));
    let winter = &e.values[2];
    assert_eq!(winter.ifcond, Some(IfCond::Name("CONFIG_SNOW".into())));
    assert_eq!(winter.features[0].name, "unstable");
    assert_eq!(
        e.values[1].doc.as_deref(),
        Some("the warm one,\nwith a second line")
    );
    let doc = e.common.doc.expect("doc");
    assert_eq!(doc.body, "When things happen.");
    assert_eq!(
        doc.features,
        [("unstable".to_string(), "may change".to_string())]
    );
    assert_eq!(doc.section("Since"), Some("1.0"));
}

#[test]
fn struct_members_resolve_types_and_optionality() {
    let schema = garden();
    let all: Vec<(&str, &TypeRef, bool)> = schema
        .all_members("Sapling")
        .iter()
        .map(|m| (m.name.as_str(), &m.ty, m.optional))
        .collect();
    assert_eq!(
        all,
        [
            ("name", &TypeRef::Builtin(Builtin::Str), false),
            ("kind", &TypeRef::Named("PlantKind".into()), false),
            ("planted", &TypeRef::Named("Season".into()), true),
            ("height", &TypeRef::Builtin(Builtin::Number), false),
            (
                "rings",
                &TypeRef::Array(Box::new(TypeRef::Builtin(Builtin::Uint32))),
                true
            ),
        ]
    );
}

#[test]
fn member_features_and_docs_are_kept() {
    let schema = garden();
    let Some(Entity::Struct(s)) = schema.entity("Flower") else {
        panic!("Flower")
    };
    assert_eq!(s.members[0].features[0].name, "deprecated");
    assert_eq!(s.members[0].doc.as_deref(), Some("its color"));
}

#[test]
fn union_with_named_base_links_discriminator_enum_and_branches() {
    let schema = garden();
    let Some(Entity::Union(u)) = schema.entity("Plant") else {
        panic!("Plant")
    };
    assert_eq!(u.base, UnionBase::Named("PlantBase".into()));
    assert_eq!(u.discriminator, "kind");
    assert_eq!(u.discriminator_enum, "PlantKind");
    assert_eq!(
        u.branches[1].ifcond,
        Some(IfCond::Not(Box::new(IfCond::Name("CONFIG_BARREN".into()))))
    );
    assert_eq!(schema.union_base_members(u).len(), 3);
}

#[test]
fn union_with_inline_base_documents_its_base_members() {
    let schema = garden();
    let Some(Entity::Union(u)) = schema.entity("Bed") else {
        panic!("Bed")
    };
    let UnionBase::Inline(base) = &u.base else {
        panic!("inline base")
    };
    assert_eq!(base[0].doc.as_deref(), Some("location"));
    assert_eq!(u.discriminator_enum, "PlantKind");
}

#[test]
fn alternate_alternatives_have_types_and_docs() {
    let schema = garden();
    let Some(Entity::Alternate(a)) = schema.entity("Amount") else {
        panic!("Amount")
    };
    let tys: Vec<&TypeRef> = a.alternatives.iter().map(|x| &x.ty).collect();
    assert_eq!(tys[2], &TypeRef::Builtin(Builtin::Null));
    assert_eq!(
        tys[3],
        &TypeRef::Array(Box::new(TypeRef::Builtin(Builtin::Int)))
    );
    assert_eq!(a.alternatives[1].doc.as_deref(), Some("the kind it is"));
}

#[test]
fn command_flags_args_returns_and_sections() {
    let schema = garden();
    let Some(Entity::Command(c)) = schema.entity("plant") else {
        panic!("plant")
    };
    let Some(ArgType::Inline(args)) = &c.args else {
        panic!("inline args")
    };
    assert_eq!(args[1].doc.as_deref(), Some("the season"));
    assert_eq!(c.returns, Some(TypeRef::Named("Plant".into())));
    assert!(c.allow_preconfig && c.success_response && c.gen_ && !c.boxed);
    assert!(matches!(&c.common.ifcond, Some(IfCond::All(v)) if v.len() == 2));
    let doc = c.common.doc.as_ref().expect("doc");
    assert_eq!(doc.section("Returns"), Some("the planted thing"));
    assert_eq!(
        doc.section("Errors"),
        Some("- If the ground is frozen, GenericError")
    );
    assert!(
        doc.sections
            .iter()
            .any(|s| s.tag.is_none() && s.text.starts_with(".. qmp-example::"))
    );

    let Some(Entity::Command(w)) = schema.entity("water_all") else {
        panic!("water_all")
    };
    assert!(!w.success_response && !w.gen_ && w.allow_oob && w.common.is_deprecated());
    let Some(Entity::Command(d)) = schema.entity("dig") else {
        panic!("dig")
    };
    assert!(d.boxed && d.args == Some(ArgType::Named("Plant".into())));
    let Some(Entity::Command(n)) = schema.entity("count-plants") else {
        panic!("count")
    };
    assert!(n.coroutine);
}

#[test]
fn events_take_inline_or_boxed_data() {
    let schema = garden();
    let Some(Entity::Event(e)) = schema.entity("DUG") else {
        panic!("DUG")
    };
    assert!(e.boxed);
    assert_eq!(e.data, Some(ArgType::Named("Bed".into())));
}

#[test]
fn free_form_blocks_are_placed_before_the_entity_they_precede() {
    let schema = garden();
    assert_eq!(schema.free_docs.len(), 1);
    let (at, doc) = &schema.free_docs[0];
    assert_eq!(*at, 0);
    assert_eq!(doc.body, "= The garden\n\nFree-form text about gardens.");
}

#[test]
fn locations_point_at_the_definition_and_its_members() {
    let schema = garden();
    let e = schema.entity("Season").expect("Season");
    assert_eq!((e.common().location.line, e.common().location.col), (34, 1));
    let Some(Entity::Struct(s)) = schema.entity("PlantBase") else {
        panic!("PlantBase")
    };
    let planted = &s.members[2];
    assert_eq!((planted.location.line, planted.location.col), (70, 49));
}
