//! Event data structs and the `Event` enum with its wire form.

use crate::context::{self, Context};
use crate::emit_types;
use crate::naming::{self, token};
use proc_macro2::{Ident, TokenStream};
use qapi_model::{ArgType, Entity, Event, Member};
use quote::quote;

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

/// The `<Event>Data` struct of `ev` if its data is inline.
pub fn data_struct(cx: &Context, ev: &Event, variant: &str) -> TokenStream {
    match inline_data(ev) {
        Some(members) => {
            let mut doc = context::DocText::default();
            doc.push(format!("Data of event `{}`.", ev.common.name));
            let refs: Vec<_> = members.iter().collect();
            emit_types::object(cx, &data_ident(variant), None, &refs, &doc, false)
        }
        None => TokenStream::new(),
    }
}

/// What follows the data structs: their `Deserialize` and the `Event` enum.
pub fn tail(cx: &Context) -> TokenStream {
    let events = events(cx);
    let data_types: Vec<Option<Ident>> = events
        .iter()
        .map(|(ev, variant)| match &ev.data {
            Some(ArgType::Named(n)) => Some(token(&naming::type_ident(n))),
            _ => inline_data(ev).map(|_| token(&data_ident(variant))),
        })
        .collect();
    let via_from_qmp = events
        .iter()
        .filter(|(ev, _)| !matches!(ev.data, Some(ArgType::Named(_))) && inline_data(ev).is_some())
        .map(|(_, variant)| token(&data_ident(variant)))
        .collect();
    let deserialize = emit_types::deserialize_via_from_qmp(via_from_qmp);

    let mut decls = Vec::new();
    let mut name_arms = Vec::new();
    let mut data_arms = Vec::new();
    let mut read_arms = Vec::new();
    for ((ev, variant), ty) in events.iter().zip(&data_types) {
        let wire = &ev.common.name;
        let variant = token(variant);
        let doc = context::entity_doc(&ev.common).attrs();
        let deprecated = context::deprecated_attr(ev.common.is_deprecated());
        match ty {
            Some(ty) => {
                decls.push(quote!(#doc #deprecated #variant(#ty),));
                name_arms.push(quote!(Self::#variant(_) => #wire,));
                data_arms.push(quote! {
                    Self::#variant(data) => ::std::option::Option::Some(
                        ::serde_json::to_value(data).unwrap_or(::serde_json::Value::Null),
                    ),
                });
                read_arms.push(quote! {
                    #wire => {
                        path.push_member("data");
                        let data = message.get("data").ok_or_else(|| path.missing())?;
                        Self::#variant(<#ty as crate::input::FromQmp>::from_qmp(data, path)?)
                    }
                });
            }
            None => {
                decls.push(quote!(#doc #deprecated #variant,));
                name_arms.push(quote!(Self::#variant => #wire,));
                data_arms.push(quote!(Self::#variant => ::std::option::Option::None,));
                read_arms.push(quote!(#wire => Self::#variant,));
            }
        }
    }
    let names = events.iter().map(|(ev, _)| &ev.common.name);
    let (name_body, data_body) = if events.is_empty() {
        (quote!(match *self {}), quote!(match *self {}))
    } else {
        (
            quote!(match self { #(#name_arms)* }),
            quote!(match self { #(#data_arms)* }),
        )
    };

    quote! {
        #deserialize
        /// Every event of the schema with its typed data.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Event {
            #(#decls)*
        }
        impl Event {
            /// Every event name, in schema order.
            pub const NAMES: &'static [&'static str] = &[#(#names),*];
            /// The wire name (`JOB_STATUS_CHANGE`).
            pub fn name(&self) -> &'static str {
                #name_body
            }
            /// The `data` member, `None` for events without data.
            pub fn data(&self) -> ::std::option::Option<::serde_json::Value> {
                #data_body
            }
            /// The message QEMU sends: `{"timestamp": {...}, "event": NAME, "data": {...}}`
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
                    #(#read_arms)*
                    _ => {
                        return ::std::result::Result::Err(crate::error::QmpError::generic(format!(
                            "unknown event '{name}'"
                        )));
                    }
                })
            }
        }
    }
}
