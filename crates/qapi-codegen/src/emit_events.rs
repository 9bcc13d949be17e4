//! Event data structs and the `Event` enum with its wire form.

use crate::context::{self, Context};
use crate::emit_types::{self, item_start};
use crate::layout::{self, atom, call, try_call};
use crate::naming;
use qapi_model::{ArgType, Entity, Event, Member};
use std::fmt::Write as _;

/// The events of the schema with their `Event` variant names.
fn events<'a>(cx: &Context<'a>) -> Vec<(&'a Event, String)> {
    let events: Vec<&Event> = cx
        .schema
        .entities
        .iter()
        .filter_map(|e| match e {
            Entity::Event(ev) => Some(ev),
            _ => None,
        })
        .collect();
    let variants = naming::dedupe(
        events
            .iter()
            .map(|e| naming::variant_ident(&e.common.name))
            .collect(),
    );
    events.into_iter().zip(variants).collect()
}

/// `<Event>Data`, the struct of an event with inline `data`.
fn data_ident(variant: &str) -> String {
    format!("{}Data", variant.trim_start_matches("r#"))
}

/// Whether `ev` has inline, non-empty `data` (and so a generated `<Event>Data`).
fn inline_data(ev: &Event) -> Option<&[Member]> {
    match &ev.data {
        Some(ArgType::Inline(members)) if !members.is_empty() => Some(members),
        _ => None,
    }
}

/// The `<Event>Data` structs of events with inline data.
pub fn emit_data_structs(out: &mut String, cx: &Context) {
    for (ev, variant) in events(cx) {
        if let Some(members) = inline_data(ev) {
            let mut doc = context::DocText::default();
            doc.push(format!("Data of event `{}`.", ev.common.name));
            let refs: Vec<_> = members.iter().collect();
            emit_types::emit_object(out, cx, &data_ident(&variant), None, &refs, &doc, false);
        }
    }
}

/// What follows the data structs: their `Deserialize` and the `Event` enum.
pub fn emit_tail(out: &mut String, cx: &Context) {
    let events = events(cx);
    let data_types: Vec<Option<String>> = events
        .iter()
        .map(|(ev, variant)| match &ev.data {
            Some(ArgType::Named(n)) => Some(naming::type_ident(n)),
            _ => inline_data(ev).map(|_| data_ident(variant)),
        })
        .collect();
    let via_from_qmp = events
        .iter()
        .filter(|(ev, _)| !matches!(ev.data, Some(ArgType::Named(_))) && inline_data(ev).is_some())
        .map(|(_, variant)| data_ident(variant))
        .collect();
    emit_types::deserialize_via_from_qmp(out, via_from_qmp);

    item_start(out);
    out.push_str(
        "/// Every event of the schema with its typed data.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
",
    );
    for ((ev, variant), ty) in events.iter().zip(&data_types) {
        context::entity_doc(&ev.common).write(out, 4);
        context::deprecated_attr(out, 4, ev.common.is_deprecated());
        match ty {
            Some(ty) => {
                layout::tuple_variant(out, 4, variant, ty);
            }
            None => {
                let _ = writeln!(out, "    {variant},");
            }
        }
    }
    layout::close_block(out);

    item_start(out);
    out.push_str("impl Event {\n    /// Every event name, in schema order.\n");
    let names: Vec<String> = events
        .iter()
        .map(|(ev, _)| format!("\"{}\"", ev.common.name))
        .collect();
    layout::array(
        out,
        4,
        "pub const NAMES: &'static [&'static str] = &",
        &names,
        ";",
    );

    out.push_str(
        "    /// The wire name (`JOB_STATUS_CHANGE`).\n    pub fn name(&self) -> &'static str {\n",
    );
    if events.is_empty() {
        out.push_str("        match *self {}\n");
    } else {
        out.push_str("        match self {\n");
        for ((ev, variant), ty) in events.iter().zip(&data_types) {
            let pattern = match ty {
                Some(_) => format!("Self::{variant}(_)"),
                None => format!("Self::{variant}"),
            };
            layout::arm(out, 12, &pattern, &atom(format!("\"{}\"", ev.common.name)));
        }
        out.push_str("        }\n");
    }
    out.push_str("    }\n");

    out.push_str(
        "    /// The `data` member, `None` for events without data.
    pub fn data(&self) -> ::std::option::Option<::serde_json::Value> {
",
    );
    if events.is_empty() {
        out.push_str("        match *self {}\n");
    } else {
        out.push_str("        match self {\n");
        for ((_, variant), ty) in events.iter().zip(&data_types) {
            match ty {
                Some(_) => {
                    let some = call(
                        "::std::option::Option::Some",
                        vec![atom(
                            "::serde_json::to_value(data).unwrap_or(::serde_json::Value::Null)",
                        )],
                    );
                    layout::arm(out, 12, &format!("Self::{variant}(data)"), &some);
                }
                None => layout::arm(
                    out,
                    12,
                    &format!("Self::{variant}"),
                    &atom("::std::option::Option::None"),
                ),
            }
        }
        out.push_str("        }\n");
    }
    out.push_str("    }\n");

    out.push_str(
        r#"    /// The message QEMU sends: `{"timestamp": {...}, "event": NAME, "data": {...}}`
    /// (`data` omitted for events without data).
    pub fn to_wire(&self, timestamp: crate::wire::EventTimestamp) -> ::serde_json::Value {
        let mut message = ::serde_json::Map::new();
        message.insert(
            "timestamp".to_string(),
            ::serde_json::to_value(timestamp).unwrap_or(::serde_json::Value::Null),
        );
        message.insert("event".to_string(), ::serde_json::Value::from(self.name()));
        if let ::std::option::Option::Some(data) = self.data() {
            message.insert("data".to_string(), data);
        }
        ::serde_json::Value::Object(message)
    }
    /// Reads an event message (`event` and `data`; `timestamp` is not needed).
    pub fn from_wire(
        message: &::serde_json::Value,
    ) -> ::std::result::Result<Self, crate::error::QmpError> {
        let path = &mut crate::input::QmpPath::root();
        let name = match message.get("event") {
            ::std::option::Option::Some(::serde_json::Value::String(name)) => name.as_str(),
            _ => {
                return ::std::result::Result::Err(crate::error::QmpError::generic(
                    "event message has no 'event' string member",
                ));
            }
        };
        let _ = &path;
        ::std::result::Result::Ok(match name {
"#,
    );
    for ((ev, variant), ty) in events.iter().zip(&data_types) {
        let wire = format!("\"{}\"", ev.common.name);
        match ty {
            Some(ty) => {
                let _ = writeln!(out, "            {wire} => {{");
                out.push_str(
                    "                path.push_member(\"data\");
                let data = message.get(\"data\").ok_or_else(|| path.missing())?;
",
                );
                let read = call(
                    format!("Self::{variant}"),
                    vec![try_call(
                        format!("<{ty} as crate::input::FromQmp>::from_qmp"),
                        vec![atom("data"), atom("path")],
                    )],
                );
                layout::stmt(out, 16, &read, "");
                out.push_str("            }\n");
            }
            None => layout::arm(out, 12, &wire, &atom(format!("Self::{variant}"))),
        }
    }
    out.push_str(
        r#"            _ => {
                return ::std::result::Result::Err(crate::error::QmpError::generic(format!(
                    "unknown event '{name}'"
                )));
            }
        })
    }
}
"#,
    );
}
