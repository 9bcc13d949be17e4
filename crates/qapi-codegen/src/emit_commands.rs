//! Command argument structs, the `Commands` trait, `dispatch` and `COMMANDS`.

use crate::context::{self, Context};
use crate::emit_types;
use crate::naming;
use proc_macro2::{Ident, TokenStream};
use qapi_model::{ArgType, Command, Entity};
use quote::{format_ident, quote};

/// How a command receives its arguments.
enum Args {
    /// No `data` (or an empty one): any argument is unexpected.
    None,
    /// A generated type (`<Command>Arguments` or the named struct/union).
    Typed(TokenStream),
    /// `'gen': false`: the raw arguments object.
    Raw,
}

/// `<Command>Arguments`, the struct of a command with inline `data`.
fn arguments_ident(wire: &str) -> Ident {
    format_ident!("{}Arguments", naming::upper_camel(wire))
}

/// The argument struct of `c` when its `data` is inline and not empty.
pub fn emit_arguments(cx: &Context, c: &Command) -> Option<Vec<emit_types::Segment>> {
    match (&c.args, c.gen_) {
        (Some(ArgType::Inline(members)), true) if !members.is_empty() => {
            let wire = &c.common.name;
            let name = arguments_ident(wire);
            let mut doc = context::DocText::default();
            doc.push(format!("Arguments of `{wire}`."));
            let refs: Vec<_> = members.iter().collect();
            Some(emit_types::emit_object(
                cx,
                &name,
                None,
                &refs,
                doc.to_tokens(),
                false,
            ))
        }
        _ => None,
    }
}

/// What follows the argument structs: their `Deserialize`, the `Commands`
/// trait, `dispatch`, `COMMANDS` and `command_info`.
pub fn emit_tail(cx: &Context) -> TokenStream {
    let commands: Vec<&Command> = cx
        .schema
        .entities
        .iter()
        .filter_map(|e| match e {
            Entity::Command(c) => Some(c),
            _ => None,
        })
        .collect();
    let mut via_from_qmp = Vec::new();
    let mut methods = Vec::new();
    let mut arms = Vec::new();
    let mut infos = Vec::new();
    let method_idents = naming::dedupe(
        commands
            .iter()
            .map(|c| naming::field_ident(&c.common.name))
            .collect(),
    );
    for (c, method) in commands.iter().zip(&method_idents) {
        let wire = &c.common.name;
        let args = match (&c.args, c.gen_) {
            (_, false) => Args::Raw,
            (None, true) => Args::None,
            (Some(ArgType::Inline(m)), true) if m.is_empty() => Args::None,
            (Some(ArgType::Inline(_)), true) => {
                let name = arguments_ident(wire);
                via_from_qmp.push(name.clone());
                Args::Typed(quote!(#name))
            }
            (Some(ArgType::Named(n)), true) => {
                let id = naming::type_ident(n);
                Args::Typed(quote!(#id))
            }
        };
        let ret = match (&c.returns, c.gen_) {
            (_, false) => quote!(::serde_json::Value),
            (Some(t), true) => cx.rust_type(None, t),
            (None, true) => quote!(()),
        };
        let doc = context::entity_doc(&c.common).to_tokens();
        let deprecated = context::deprecated_attr(c.common.is_deprecated());
        let result = quote!(::std::result::Result<#ret, crate::error::QmpError>);
        let not_found =
            quote!(::std::result::Result::Err(crate::error::QmpError::command_not_found(#wire)));
        let (signature, call) = match &args {
            Args::None => (
                quote!(fn #method(&mut self) -> #result { #not_found }),
                quote! {
                    crate::input::QmpObject::open(&arguments, path)?.finish(path)?;
                    let ret = handler.#method()?;
                },
            ),
            Args::Typed(ty) => (
                quote!(fn #method(&mut self, args: #ty) -> #result { let _ = args; #not_found }),
                quote! {
                    let args = <#ty as crate::input::FromQmp>::from_qmp(&arguments, path)?;
                    let ret = handler.#method(args)?;
                },
            ),
            Args::Raw => (
                quote! {
                    fn #method(&mut self, arguments: ::serde_json::Map<::std::string::String, ::serde_json::Value>) -> #result {
                        let _ = arguments;
                        #not_found
                    }
                },
                quote! {
                    let ret = handler.#method(arguments.as_object().cloned().unwrap_or_default())?;
                },
            ),
        };
        methods.push(quote!(#doc #deprecated #signature));
        let reply = if c.returns.is_none() && c.gen_ {
            quote! {
                let () = ret;
                ::std::result::Result::Ok(::serde_json::Value::Object(::serde_json::Map::new()))
            }
        } else {
            quote!(crate::wire::reply_value(&ret))
        };
        arms.push(quote! {
            #wire => {
                #call
                #reply
            }
        });
        let success_response = c.success_response;
        let allow_oob = c.allow_oob;
        let allow_preconfig = c.allow_preconfig;
        let dep = c.common.is_deprecated();
        infos.push(quote! {
            crate::wire::CommandInfo {
                name: #wire,
                success_response: #success_response,
                allow_oob: #allow_oob,
                allow_preconfig: #allow_preconfig,
                deprecated: #dep,
            },
        });
    }
    let deserialize = emit_types::deserialize_via_from_qmp(&via_from_qmp);
    let arguments_binding = if arms.is_empty() {
        quote!(let _ = (handler, arguments);)
    } else {
        quote! {
            let arguments = ::serde_json::Value::Object(arguments.unwrap_or_default());
            let path = &mut crate::input::QmpPath::root();
        }
    };
    quote! {
        #deserialize

        /// One method per command. Each default answers like QEMU for a
        /// command it does not have (`CommandNotFound`), so a server
        /// implements only what it supports.
        pub trait Commands {
            #(#methods)*
        }

        /// Runs command `name` on `handler`: reads `arguments` with QEMU's
        /// input rules, calls the method, and returns the `return` value
        /// (`{}` for commands without `returns`).
        pub fn dispatch(
            handler: &mut impl Commands,
            name: &str,
            arguments: ::std::option::Option<::serde_json::Map<::std::string::String, ::serde_json::Value>>,
        ) -> ::std::result::Result<::serde_json::Value, crate::error::QmpError> {
            #arguments_binding
            match name {
                #(#arms)*
                _ => ::std::result::Result::Err(crate::error::QmpError::command_not_found(name)),
            }
        }

        /// Every command with the properties the monitor needs, in schema order.
        pub const COMMANDS: &[crate::wire::CommandInfo] = &[#(#infos)*];

        /// The properties of command `name`, if the schema has it.
        pub fn command_info(name: &str) -> ::std::option::Option<&'static crate::wire::CommandInfo> {
            COMMANDS.iter().find(|c| c.name == name)
        }
    }
}
