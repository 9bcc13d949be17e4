//! Event data structs and the `Event` enum with its wire form.

use crate::context::{self, Context, Moved};
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
            .map(|e| naming::event_variant_ident(&e.common.name))
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

/// What follows the data structs: the `Event` enum and its `qapi_runtime::Event` impl.
pub fn tail(cx: &Context) -> TokenStream {
    let events = events(cx);
    let data_types: Vec<Option<Ident>> = events
        .iter()
        .map(|(ev, variant)| match &ev.data {
            Some(ArgType::Named(n)) => Some(token(&naming::type_ident(n))),
            _ => inline_data(ev).map(|_| token(&data_ident(variant))),
        })
        .collect();
    let mut variant_names: Vec<String> = events.iter().map(|(_, v)| v.clone()).collect();
    variant_names.push("UnknownEvent".to_string());
    let unknown = token(&naming::dedupe(variant_names).pop().unwrap_or_default());

    let mut decls = Vec::new();
    let mut name_arms = Vec::new();
    let mut data_arms = Vec::new();
    let mut read_arms = Vec::new();
    for ((ev, variant), ty) in events.iter().zip(&data_types) {
        let wire = &ev.common.name;
        let variant = token(variant);
        let doc = context::entity_doc(&ev.common);
        let deprecated = context::deprecated_attr(ev.common.is_deprecated());
        match ty {
            Some(ty) => {
                decls.push(quote!(#doc #deprecated #variant(#ty),));
                name_arms.push(quote!(Self::#variant(_) => #wire,));
                data_arms
                    .push(quote!(Self::#variant(data) => Some(::qapi_runtime::wire::data(data)),));
                read_arms.push(quote! {
                    #wire => Self::#variant(::qapi_runtime::event::read_data(data)?),
                });
            }
            None => {
                decls.push(quote!(#doc #deprecated #variant,));
                name_arms.push(quote!(Self::#variant => #wire,));
                data_arms.push(quote!(Self::#variant => None,));
                read_arms.push(quote!(#wire => Self::#variant,));
            }
        }
    }
    let names = events.iter().map(|(ev, _)| &ev.common.name);
    let (decls, name_arms, data_arms, read_arms) = (
        decls.into_iter().map(Moved::from),
        name_arms.into_iter().map(Moved::from),
        data_arms.into_iter().map(Moved::from),
        read_arms.into_iter().map(Moved::from),
    );
    let option = cx.std_item("Option");

    quote! {
        /// Every event of the schema with its typed data, and the events it does not know.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Event {
            #(#decls)*
            /// An event this schema does not know (a newer QEMU's): its name and data.
            #unknown(::qapi_runtime::UnknownEvent),
        }
        impl Event {
            /// Every event name, in schema order.
            pub const NAMES: &'static [&'static str] = &[#(#names),*];
            /// The wire name (`JOB_STATUS_CHANGE`).
            pub fn name(&self) -> &str {
                match self {
                    #(#name_arms)*
                    Self::#unknown(event) => &event.name,
                }
            }
            /// The `data` member, `None` for events without data.
            pub fn data(&self) -> #option<::serde_json::Value> {
                match self {
                    #(#data_arms)*
                    Self::#unknown(event) => event.data.clone(),
                }
            }
            /// The message QEMU sends: `{"timestamp": {...}, "event": NAME, "data": {...}}`
            /// (`data` omitted for events without data).
            pub fn to_wire(&self, timestamp: ::qapi_runtime::EventTimestamp) -> ::serde_json::Value {
                ::qapi_runtime::Event::to_wire(self, timestamp)
            }
            /// Reads an event message (`event` and `data`; `timestamp` is not needed),
            /// tolerantly: members and values the schema does not know are ignored or
            /// read as `UnknownValue`, and an unknown event is an `UnknownEvent`.
            pub fn from_wire(message: &::serde_json::Value) -> ::qapi_runtime::Result<Self> {
                let (name, data) = ::qapi_runtime::event::split_message(message)?;
                Ok(match name {
                    #(#read_arms)*
                    _ => Self::#unknown(::qapi_runtime::UnknownEvent {
                        name: name.to_string(),
                        data: data.cloned(),
                    }),
                })
            }
        }
        impl ::qapi_runtime::Event for Event {
            fn name(&self) -> &str {
                self.name()
            }
            fn data(&self) -> #option<::serde_json::Value> {
                self.data()
            }
            fn from_wire(message: &::serde_json::Value) -> ::qapi_runtime::Result<Self> {
                Self::from_wire(message)
            }
        }
    }
}
