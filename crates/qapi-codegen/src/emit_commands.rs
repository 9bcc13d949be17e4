//! Command argument structs, the `Commands` trait, `dispatch` and `COMMANDS`.

use crate::context::{self, Context};
use crate::emit_types;
use crate::naming::{self, token};
use proc_macro2::{Ident, TokenStream};
use qapi_model::{ArgType, Command, Entity};
use quote::quote;

/// How a command receives its arguments.
enum Args {
    /// No `data` (or an empty one): any argument is unexpected.
    None,
    /// A generated type (`<Command>Arguments` or the named struct/union).
    Typed(Ident),
    /// `'gen': false`: the raw arguments object.
    Raw,
}

/// `<Command>Arguments`, the struct of a command with inline `data`.
fn arguments_ident(wire: &str) -> String {
    format!("{}Arguments", naming::upper_camel(wire))
}

/// The argument struct of `c` when its `data` is inline and not empty.
pub fn arguments(cx: &Context, c: &Command) -> TokenStream {
    match (&c.args, c.gen_) {
        (Some(ArgType::Inline(members)), true) if !members.is_empty() => {
            let wire = &c.common.name;
            let mut doc = context::DocText::default();
            doc.push(format!("Arguments of `{wire}`."));
            let refs: Vec<_> = members.iter().collect();
            emit_types::object(cx, &arguments_ident(wire), None, &refs, &doc, false)
        }
        _ => TokenStream::new(),
    }
}

/// What follows the argument structs: their `Deserialize`, the `Commands`
/// trait, `dispatch`, `COMMANDS` and `command_info`.
pub fn tail(cx: &Context) -> TokenStream {
    let commands: Vec<&Command> = cx
        .schema
        .entities
        .iter()
        .filter_map(|e| match e {
            Entity::Command(c) => Some(c),
            _ => None,
        })
        .collect();
    let methods: Vec<Ident> = naming::dedupe(
        commands
            .iter()
            .map(|c| naming::field_ident(&c.common.name))
            .collect(),
    )
    .iter()
    .map(|m| token(m))
    .collect();
    let args: Vec<Args> = commands
        .iter()
        .map(|c| match (&c.args, c.gen_) {
            (_, false) => Args::Raw,
            (None, true) => Args::None,
            (Some(ArgType::Inline(m)), true) if m.is_empty() => Args::None,
            (Some(ArgType::Inline(_)), true) => {
                Args::Typed(token(&arguments_ident(&c.common.name)))
            }
            (Some(ArgType::Named(n)), true) => Args::Typed(token(&naming::type_ident(n))),
        })
        .collect();
    let via_from_qmp = commands
        .iter()
        .zip(&args)
        .filter(|(c, a)| matches!(a, Args::Typed(_)) && matches!(c.args, Some(ArgType::Inline(_))))
        .map(|(c, _)| token(&arguments_ident(&c.common.name)))
        .collect();
    let deserialize = emit_types::deserialize_via_from_qmp(via_from_qmp);

    let raw_arguments = quote!(::serde_json::Map<::std::string::String, ::serde_json::Value>);
    let trait_methods = commands.iter().zip(&methods).zip(&args).map(|((c, method), args)| {
        let wire = &c.common.name;
        let ret = match (&c.returns, c.gen_) {
            (_, false) => quote!(::serde_json::Value),
            (Some(t), true) => cx.rust_type(None, t),
            (None, true) => quote!(()),
        };
        let doc = context::entity_doc(&c.common).attrs();
        let deprecated = context::deprecated_attr(c.common.is_deprecated());
        let (param, unused) = match args {
            Args::None => (TokenStream::new(), TokenStream::new()),
            Args::Typed(ty) => (quote!(, args: #ty), quote!(let _ = args;)),
            Args::Raw => (
                quote!(, arguments: #raw_arguments),
                quote!(let _ = arguments;),
            ),
        };
        quote! {
            #doc
            #deprecated
            fn #method(&mut self #param) -> ::std::result::Result<#ret, crate::error::QmpError> {
                #unused
                ::std::result::Result::Err(crate::error::QmpError::command_not_found(#wire))
            }
        }
    });

    let dispatch_start = if commands.is_empty() {
        quote!(let _ = (handler, arguments);)
    } else {
        quote! {
            let arguments = ::serde_json::Value::Object(arguments.unwrap_or_default());
            let path = &mut crate::input::QmpPath::root();
        }
    };
    let dispatch_arms = commands
        .iter()
        .zip(&methods)
        .zip(&args)
        .map(|((c, method), args)| {
            let wire = &c.common.name;
            let call = match args {
                Args::None => quote! {
                    crate::input::QmpObject::open(&arguments, path)?.finish(path)?;
                    let ret = handler.#method()?;
                },
                Args::Typed(ty) => quote! {
                    let args = <#ty as crate::input::FromQmp>::from_qmp(&arguments, path)?;
                    let ret = handler.#method(args)?;
                },
                Args::Raw => quote! {
                    let ret = handler.#method(arguments.as_object().cloned().unwrap_or_default())?;
                },
            };
            let reply = if c.returns.is_none() && c.gen_ {
                quote! {
                    let () = ret;
                    ::std::result::Result::Ok(::serde_json::Value::Object(::serde_json::Map::new()))
                }
            } else {
                quote!(crate::wire::reply_value(&ret))
            };
            quote! {
                #wire => {
                    #call
                    #reply
                }
            }
        });

    let infos = commands.iter().map(|c| {
        let name = &c.common.name;
        let (success_response, allow_oob, allow_preconfig, deprecated) = (
            c.success_response,
            c.allow_oob,
            c.allow_preconfig,
            c.common.is_deprecated(),
        );
        quote! {
            crate::wire::CommandInfo {
                name: #name,
                success_response: #success_response,
                allow_oob: #allow_oob,
                allow_preconfig: #allow_preconfig,
                deprecated: #deprecated,
            }
        }
    });

    quote! {
        #deserialize
        /// One method per command. Each default answers like QEMU for a
        /// command it does not have (`CommandNotFound`), so a server
        /// implements only what it supports.
        pub trait Commands {
            #(#trait_methods)*
        }
        /// Runs command `name` on `handler`: reads `arguments` with QEMU's
        /// input rules, calls the method, and returns the `return` value
        /// (`{}` for commands without `returns`).
        pub fn dispatch(
            handler: &mut impl Commands,
            name: &str,
            arguments: ::std::option::Option<#raw_arguments>,
        ) -> ::std::result::Result<::serde_json::Value, crate::error::QmpError> {
            #dispatch_start
            match name {
                #(#dispatch_arms)*
                _ => ::std::result::Result::Err(crate::error::QmpError::command_not_found(name)),
            }
        }
        /// Every command with the properties the monitor needs, in schema order.
        pub const COMMANDS: &[crate::wire::CommandInfo] = &[#(#infos),*];
        /// The properties of command `name`, if the schema has it.
        pub fn command_info(name: &str) -> ::std::option::Option<&'static crate::wire::CommandInfo> {
            COMMANDS.iter().find(|c| c.name == name)
        }
    }
}
