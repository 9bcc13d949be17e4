//! syn checks what we emit: every generated file of QEMU's complete schema and of ours
//! parses with `syn::parse_file`, and its items, counted by kind and name, are exactly
//! those the schema's entities call for (every type, command and event yields its items,
//! nothing more).

use qapi_codegen::naming;
use qapi_model::{ArgType, Entity, Schema};
use std::collections::BTreeMap;
use syn::{Item, ItemEnum, ItemMacro, Type};

/// `(module, kind, name)` → how many such items.
type Items = BTreeMap<(String, String, String), usize>;

fn add(items: &mut Items, module: &str, kind: &str, name: impl Into<String>) {
    *items
        .entry((module.to_string(), kind.to_string(), name.into()))
        .or_default() += 1;
}

fn type_name(ty: &Type) -> String {
    match ty {
        Type::Path(p) => p
            .path
            .segments
            .last()
            .map(|s| s.ident.to_string())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn unraw(ident: &syn::Ident) -> String {
    ident.to_string().trim_start_matches("r#").to_string()
}

/// The first identifier of a macro call (`impl_object!(JobInfo { ... })` names `JobInfo`).
fn macro_subject(mac: &ItemMacro) -> String {
    mac.mac
        .tokens
        .clone()
        .into_iter()
        .find_map(|t| match t {
            proc_macro2::TokenTree::Ident(i) => Some(i.to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The items of the generated files, by module, kind and name; enum variants are
/// returned beside them (`Type` → variant names).
fn actual(schema: &Schema) -> (Items, BTreeMap<String, Vec<String>>) {
    let mut items = Items::new();
    let mut variants = BTreeMap::new();
    for file in qapi_codegen::generate(schema).expect("generates") {
        let module = file.path.trim_end_matches(".rs").to_string();
        let parsed = syn::parse_file(&file.contents)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.path));
        for item in parsed.items {
            match item {
                Item::Struct(s) => add(&mut items, &module, "struct", unraw(&s.ident)),
                Item::Enum(ItemEnum {
                    ident,
                    variants: vs,
                    ..
                }) => {
                    add(&mut items, &module, "enum", unraw(&ident));
                    variants.insert(
                        unraw(&ident),
                        vs.iter().map(|v| unraw(&v.ident)).collect::<Vec<_>>(),
                    );
                }
                Item::Impl(i) => {
                    let kind = match &i.trait_ {
                        Some((path, _)) => format!(
                            "impl {}",
                            path.segments
                                .last()
                                .map(|s| s.ident.to_string())
                                .unwrap_or_default()
                        ),
                        None => "impl".to_string(),
                    };
                    add(&mut items, &module, &kind, type_name(&i.self_ty));
                }
                Item::Macro(m) => {
                    let name = m
                        .mac
                        .path
                        .segments
                        .last()
                        .map(|s| s.ident.to_string())
                        .unwrap_or_default();
                    add(&mut items, &module, &format!("{name}!"), macro_subject(&m));
                }
                Item::Trait(t) => add(&mut items, &module, "trait", t.ident.to_string()),
                Item::Fn(f) => add(&mut items, &module, "fn", f.sig.ident.to_string()),
                Item::Const(c) => add(&mut items, &module, "const", c.ident.to_string()),
                Item::Mod(m) => add(&mut items, &module, "mod", m.ident.to_string()),
                Item::Use(_) => add(&mut items, &module, "use", ""),
                other => panic!(
                    "unexpected item in {}: {}",
                    file.path,
                    quote::ToTokens::to_token_stream(&other)
                ),
            }
        }
    }
    (items, variants)
}

fn args_name(wire: &str) -> String {
    format!("{}Arguments", naming::upper_camel(wire))
}

/// What the schema's entities call for.
fn expected(schema: &Schema) -> Items {
    let mut items = Items::new();
    for m in ["commands", "events", "introspection", "types"] {
        add(&mut items, "mod", "mod", m);
        add(&mut items, "mod", "use", "");
    }
    add(&mut items, "commands", "use", "");
    add(&mut items, "events", "use", "");
    for entity in &schema.entities {
        let name = unraw_text(&naming::type_ident(entity.name()));
        match entity {
            Entity::Enum(_) => {
                add(&mut items, "types", "enum", &name);
                add(&mut items, "types", "impl_enum!", &name);
            }
            Entity::Struct(_) => {
                add(&mut items, "types", "struct", &name);
                add(&mut items, "types", "impl", &name);
                add(&mut items, "types", "impl_object!", &name);
            }
            Entity::Union(_) => {
                let branch = format!("{name}Branch");
                add(&mut items, "types", "struct", &name);
                add(&mut items, "types", "enum", &branch);
                add(&mut items, "types", "impl", &branch);
                add(&mut items, "types", "impl", &name);
                add(&mut items, "types", "impl ReadMembers", &name);
                add(&mut items, "types", "impl WriteMembers", &name);
                add(&mut items, "types", "impl WriteMembers", &branch);
                add(&mut items, "types", "impl_object!", &name);
            }
            Entity::Alternate(_) => {
                add(&mut items, "types", "enum", &name);
                add(&mut items, "types", "impl FromQmp", &name);
                add(&mut items, "types", "impl Serialize", &name);
                add(&mut items, "types", "impl_deserialize!", &name);
            }
            Entity::Command(c) => {
                let args = args_name(&c.common.name);
                add(&mut items, "commands", "struct", &args);
                add(&mut items, "commands", "impl Command", &args);
                match (&c.args, c.gen_) {
                    (Some(ArgType::Named(_)), true) | (_, false) => {
                        add(&mut items, "commands", "impl_newtype!", &args);
                    }
                    _ => {
                        add(&mut items, "commands", "impl", &args);
                        add(&mut items, "commands", "impl_object!", &args);
                    }
                }
            }
            Entity::Event(e) => {
                if matches!(&e.data, Some(ArgType::Inline(m)) if !m.is_empty()) {
                    let data = format!(
                        "{}Data",
                        unraw_text(&naming::event_variant_ident(&e.common.name))
                    );
                    add(&mut items, "events", "struct", &data);
                    add(&mut items, "events", "impl", &data);
                    add(&mut items, "events", "impl_object!", &data);
                }
            }
        }
    }
    add(&mut items, "commands", "trait", "Commands");
    add(&mut items, "commands", "fn", "dispatch");
    add(&mut items, "commands", "const", "COMMANDS");
    add(&mut items, "commands", "fn", "command_properties");
    add(&mut items, "events", "enum", "Event");
    add(&mut items, "events", "impl", "Event");
    add(&mut items, "events", "impl Event", "Event");
    add(&mut items, "introspection", "const", "QMP_SCHEMA_JSON");
    add(&mut items, "introspection", "fn", "qmp_schema");
    items
}

fn unraw_text(ident: &str) -> String {
    ident.trim_start_matches("r#").to_string()
}

fn check(schema: &Schema) {
    let (actual, variants) = actual(schema);
    let expected = expected(schema);
    let missing: Vec<_> = expected
        .iter()
        .filter(|(k, n)| actual.get(*k) != Some(n))
        .collect();
    let extra: Vec<_> = actual
        .iter()
        .filter(|(k, _)| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing or miscounted: {missing:?}\nnot called for: {extra:?}"
    );
    // Enums: one variant per value, in order, plus `UnknownValue` for those replies or
    // events carry; the `Event` enum: one per event, plus `UnknownEvent`.
    for entity in &schema.entities {
        if let Entity::Enum(e) = entity {
            let name = unraw_text(&naming::type_ident(&e.common.name));
            let got = &variants[&name];
            let want = naming::dedupe(
                e.values
                    .iter()
                    .map(|v| naming::variant_ident(&v.name))
                    .collect(),
            );
            let want: Vec<String> = want.iter().map(|v| unraw_text(v)).collect();
            assert_eq!(&got[..want.len()], &want[..], "{name}");
            assert!(
                got.len() == want.len()
                    || (got.len() == want.len() + 1 && got[want.len()].starts_with("UnknownValue")),
                "{name}: {got:?}"
            );
        }
    }
    let events = schema
        .entities
        .iter()
        .filter(|e| matches!(e, Entity::Event(_)))
        .count();
    assert_eq!(variants["Event"].len(), events + 1);
}

#[test]
fn qemus_complete_schema_yields_exactly_its_items() {
    let path = qapi_testdata::qemu_schema().expect("QEMU's schema is available");
    let schema = qapi_model::load(&path).unwrap_or_else(|d| panic!("QEMU's schema loads:\n{d}"));
    check(&schema);
}

#[test]
fn our_schema_yields_exactly_its_items() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../qapi-schema/qapi-schema.json"
    );
    let schema = qapi_model::load(std::path::Path::new(path))
        .unwrap_or_else(|d| panic!("our schema loads:\n{d}"));
    check(&schema);
}
