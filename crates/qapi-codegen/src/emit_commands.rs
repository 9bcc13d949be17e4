//! Per command, its argument type implementing `qapi_runtime::Command`; then the
//! server's `Commands` trait, `dispatch` and `COMMANDS`.

use crate::context::{self, Context, Moved};
use crate::emit_types;
use crate::naming::{self, token};
use proc_macro2::{Ident, TokenStream};
use qapi_model::{ArgType, Command, Entity};
use quote::quote;

/// How a server's handler receives a command's arguments.
enum Args {
    /// No `data` (or an empty one): any argument is unexpected.
    None,
    /// A generated type (`<Command>Arguments` or the named struct/union).
    Typed(Ident),
    /// `'gen': false`: the raw arguments object.
    Raw,
}

/// `<Command>Arguments`: the argument type of every command.
fn arguments_ident(wire: &str) -> Ident {
    token(&format!("{}Arguments", naming::upper_camel(wire)))
}

fn args(c: &Command) -> Args {
    match (&c.args, c.gen_) {
        (_, false) => Args::Raw,
        (None, true) => Args::None,
        (Some(ArgType::Inline(m)), true) if m.is_empty() => Args::None,
        (Some(ArgType::Inline(_)), true) => Args::Typed(arguments_ident(&c.common.name)),
        (Some(ArgType::Named(n)), true) => Args::Typed(token(&naming::type_ident(n))),
    }
}

/// What the command's reply returns.
fn returns(cx: &Context, c: &Command) -> TokenStream {
    match (&c.returns, c.gen_) {
        (_, false) => quote!(::serde_json::Value),
        (Some(t), true) => cx.rust_type(None, t),
        (None, true) => quote!(()),
    }
}

/// The raw arguments object.
fn raw_arguments(cx: &Context) -> TokenStream {
    let string = cx.std_item("String");
    quote!(::serde_json::Map<#string, ::serde_json::Value>)
}

/// The argument type of `c` and its `Command` impl: a struct of the inline `data` (an
/// empty one without `data`), or a newtype of the named `data` type or, for
/// `'gen': false`, of the raw arguments object.
pub fn arguments(cx: &Context, c: &Command) -> TokenStream {
    let wire = &c.common.name;
    let name = arguments_ident(wire);
    let mut doc = context::entity_doc(&c.common);
    doc.push(format!(
        "The arguments of command `{wire}` (its `qapi_runtime::Command`)."
    ));
    let ty = match (&c.args, c.gen_) {
        (Some(ArgType::Inline(members)), true) => {
            let refs: Vec<_> = members.iter().collect();
            emit_types::object(cx, &name.to_string(), None, &refs, &doc, false)
        }
        (None, true) => emit_types::object(cx, &name.to_string(), None, &[], &doc, false),
        (data, gen_) => {
            let inner = match (data, gen_) {
                (Some(ArgType::Named(n)), true) => {
                    let n = token(&naming::type_ident(n));
                    quote!(#n)
                }
                _ => raw_arguments(cx),
            };
            quote! {
                #doc
                #[derive(Debug, Clone, PartialEq)]
                pub struct #name(pub #inner);
                ::qapi_runtime::impl_newtype!(#name(#inner));
            }
        }
    };
    let ty = Moved::new(ty);
    let ret = returns(cx, c);
    let mut properties = TokenStream::new();
    if !c.success_response {
        properties.extend(quote!(
            const SUCCESS_RESPONSE: bool = false;
        ));
    }
    if c.allow_oob {
        properties.extend(quote!(
            const ALLOW_OOB: bool = true;
        ));
    }
    if c.allow_preconfig {
        properties.extend(quote!(
            const ALLOW_PRECONFIG: bool = true;
        ));
    }
    if c.common.is_deprecated() {
        properties.extend(quote!(
            const DEPRECATED: bool = true;
        ));
    }
    quote! {
        #ty
        impl ::qapi_runtime::Command for #name {
            const NAME: &'static str = #wire;
            type Returns = #ret;
            #properties
        }
    }
}

/// What follows the argument types: the `Commands` trait, `dispatch`, `COMMANDS` and
/// `command_properties`.
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
    let args: Vec<Args> = commands.iter().map(|c| args(c)).collect();

    let raw_arguments = raw_arguments(cx);
    let option = cx.std_item("Option");
    let trait_methods = commands
        .iter()
        .zip(&methods)
        .zip(&args)
        .map(|((c, method), args)| {
            let wire = &c.common.name;
            let ret = returns(cx, c);
            let doc = format!(" `{wire}`: see [`{}`].", arguments_ident(&c.common.name));
            let deprecated = context::deprecated_attr(c.common.is_deprecated());
            let param = match args {
                Args::None => TokenStream::new(),
                Args::Typed(ty) => quote!(, args: #ty),
                Args::Raw => quote!(, arguments: #raw_arguments),
            };
            quote! {
                #[doc = #doc]
                #deprecated
                fn #method(&mut self #param) -> ::qapi_runtime::Result<#ret> {
                    Err(::qapi_runtime::QmpError::command_not_found(#wire))
                }
            }
        })
        .map(Moved::from);

    let dispatch_start = if commands.is_empty() {
        quote!(let _ = (handler, arguments);)
    } else {
        quote! {
            let arguments = ::serde_json::Value::Object(arguments.unwrap_or_default());
            let path = &mut ::qapi_runtime::QmpPath::root();
        }
    };
    let dispatch_arms = commands
        .iter()
        .zip(&methods)
        .zip(&args)
        .map(|((c, method), args)| {
            let wire = &c.common.name;
            let reply = if c.returns.is_none() && c.gen_ {
                quote!(::qapi_runtime::wire::reply_empty)
            } else {
                quote!(::qapi_runtime::wire::reply)
            };
            match args {
                Args::None => quote! {
                    #wire => {
                        <() as ::qapi_runtime::FromQmp>::from_qmp(&arguments, path)?;
                        #reply(handler.#method()?)
                    }
                },
                Args::Typed(_) => quote! {
                    #wire => #reply(handler.#method(::qapi_runtime::FromQmp::from_qmp(&arguments, path)?)?),
                },
                Args::Raw => quote! {
                    #wire => #reply(handler.#method(arguments.as_object().cloned().unwrap_or_default())?),
                },
            }
        })
        .map(Moved::from);
    let argument_types = commands.iter().map(|c| arguments_ident(&c.common.name));

    quote! {
        /// One method per command, for a server. Each default answers like QEMU for a
        /// command it does not have (`CommandNotFound`), so a server implements only
        /// what it supports.
        pub trait Commands {
            #(#trait_methods)*
        }
        /// Runs command `name` on `handler`: reads `arguments` strictly with QEMU's
        /// input rules, calls the method, and returns the `return` value
        /// (`{}` for commands without `returns`).
        pub fn dispatch(
            handler: &mut impl Commands,
            name: &str,
            arguments: #option<#raw_arguments>,
        ) -> ::qapi_runtime::Result<::serde_json::Value> {
            #dispatch_start
            match name {
                #(#dispatch_arms)*
                _ => Err(::qapi_runtime::QmpError::command_not_found(name)),
            }
        }
        /// Every command with its properties, in schema order.
        pub const COMMANDS: &[::qapi_runtime::CommandProperties] = &[
            #(<#argument_types as ::qapi_runtime::Command>::PROPERTIES),*
        ];
        /// The properties of command `name`, if the schema has it.
        pub fn command_properties(
            name: &str,
        ) -> #option<&'static ::qapi_runtime::CommandProperties> {
            COMMANDS.iter().find(|c| c.name == name)
        }
    }
}
