//! Command argument structs, the `Commands` trait, `dispatch` and `COMMANDS`.

use crate::context::{self, Context};
use crate::emit_types::{self, item_start};
use crate::layout::{self, atom, call, try_call, try_method};
use crate::naming;
use qapi_model::{ArgType, Command, Entity};
use std::fmt::Write as _;

/// How a command receives its arguments.
enum Args {
    /// No `data` (or an empty one): any argument is unexpected.
    None,
    /// A generated type (`<Command>Arguments` or the named struct/union).
    Typed(String),
    /// `'gen': false`: the raw arguments object.
    Raw,
}

/// `<Command>Arguments`, the struct of a command with inline `data`.
fn arguments_ident(wire: &str) -> String {
    format!("{}Arguments", naming::upper_camel(wire))
}

/// The argument struct of `c` when its `data` is inline and not empty.
pub fn emit_arguments(out: &mut String, cx: &Context, c: &Command) {
    if let (Some(ArgType::Inline(members)), true) = (&c.args, c.gen_)
        && !members.is_empty()
    {
        let wire = &c.common.name;
        let mut doc = context::DocText::default();
        doc.push(format!("Arguments of `{wire}`."));
        let refs: Vec<_> = members.iter().collect();
        emit_types::emit_object(out, cx, &arguments_ident(wire), None, &refs, &doc, false);
    }
}

const RAW_ARGUMENTS: &str = "::serde_json::Map<::std::string::String, ::serde_json::Value>";

/// What follows the argument structs: their `Deserialize`, the `Commands`
/// trait, `dispatch`, `COMMANDS` and `command_info`.
pub fn emit_tail(out: &mut String, cx: &Context) {
    let commands: Vec<&Command> = cx
        .schema
        .entities
        .iter()
        .filter_map(|e| match e {
            Entity::Command(c) => Some(c),
            _ => None,
        })
        .collect();
    let method_idents = naming::dedupe(
        commands
            .iter()
            .map(|c| naming::field_ident(&c.common.name))
            .collect(),
    );
    let args: Vec<Args> = commands
        .iter()
        .map(|c| match (&c.args, c.gen_) {
            (_, false) => Args::Raw,
            (None, true) => Args::None,
            (Some(ArgType::Inline(m)), true) if m.is_empty() => Args::None,
            (Some(ArgType::Inline(_)), true) => Args::Typed(arguments_ident(&c.common.name)),
            (Some(ArgType::Named(n)), true) => Args::Typed(naming::type_ident(n)),
        })
        .collect();
    let via_from_qmp = commands
        .iter()
        .zip(&args)
        .filter(|(c, a)| matches!(a, Args::Typed(_)) && matches!(c.args, Some(ArgType::Inline(_))))
        .map(|(c, _)| arguments_ident(&c.common.name))
        .collect();
    emit_types::deserialize_via_from_qmp(out, via_from_qmp);

    item_start(out);
    out.push_str(
        "/// One method per command. Each default answers like QEMU for a
/// command it does not have (`CommandNotFound`), so a server
/// implements only what it supports.
pub trait Commands {
",
    );
    for ((c, method), args) in commands.iter().zip(&method_idents).zip(&args) {
        let wire = &c.common.name;
        let ret = match (&c.returns, c.gen_) {
            (_, false) => "::serde_json::Value".to_string(),
            (Some(t), true) => cx.rust_type(None, t),
            (None, true) => "()".to_string(),
        };
        context::entity_doc(&c.common).write(out, 4);
        context::deprecated_attr(out, 4, c.common.is_deprecated());
        let mut params = vec!["&mut self".to_string()];
        let unused = match args {
            Args::None => None,
            Args::Typed(ty) => {
                params.push(format!("args: {ty}"));
                Some("args")
            }
            Args::Raw => {
                params.push(format!("arguments: {RAW_ARGUMENTS}"));
                Some("arguments")
            }
        };
        let suffix = format!(" -> ::std::result::Result<{ret}, crate::error::QmpError> {{");
        layout::signature(out, 4, &format!("fn {method}"), &params, &suffix);
        if let Some(name) = unused {
            let _ = writeln!(out, "        let _ = {name};");
        }
        let not_found = call(
            "::std::result::Result::Err",
            vec![call(
                "crate::error::QmpError::command_not_found",
                vec![atom(format!("\"{wire}\""))],
            )],
        );
        layout::stmt(out, 8, &not_found, "");
        out.push_str("    }\n");
    }
    layout::close_block(out);

    item_start(out);
    out.push_str(
        "/// Runs command `name` on `handler`: reads `arguments` with QEMU's
/// input rules, calls the method, and returns the `return` value
/// (`{}` for commands without `returns`).
pub fn dispatch(
    handler: &mut impl Commands,
    name: &str,
    arguments: ::std::option::Option<::serde_json::Map<::std::string::String, ::serde_json::Value>>,
) -> ::std::result::Result<::serde_json::Value, crate::error::QmpError> {
",
    );
    if commands.is_empty() {
        out.push_str("    let _ = (handler, arguments);\n");
    } else {
        out.push_str(
            "    let arguments = ::serde_json::Value::Object(arguments.unwrap_or_default());
    let path = &mut crate::input::QmpPath::root();
",
        );
    }
    out.push_str("    match name {\n");
    for ((c, method), args) in commands.iter().zip(&method_idents).zip(&args) {
        let _ = writeln!(out, "        \"{}\" => {{", c.common.name);

        let ret = match args {
            Args::None => {
                out.push_str(
                    "            crate::input::QmpObject::open(&arguments, path)?.finish(path)?;\n",
                );
                try_method("handler", format!(".{method}"), Vec::new())
            }
            Args::Typed(ty) => {
                let read = try_call(
                    format!("<{ty} as crate::input::FromQmp>::from_qmp"),
                    vec![atom("&arguments"), atom("path")],
                );
                layout::rhs_line(out, 12, "let args =", &read, ";");
                try_method("handler", format!(".{method}"), vec![atom("args")])
            }
            Args::Raw => try_method(
                "handler",
                format!(".{method}"),
                vec![atom("arguments.as_object().cloned().unwrap_or_default()")],
            ),
        };
        layout::rhs_line(out, 12, "let ret =", &ret, ";");
        if c.returns.is_none() && c.gen_ {
            out.push_str(
                "            let () = ret;
            ::std::result::Result::Ok(::serde_json::Value::Object(::serde_json::Map::new()))
",
            );
        } else {
            out.push_str("            crate::wire::reply_value(&ret)\n");
        }
        out.push_str("        }\n");
    }
    out.push_str(
        "        _ => ::std::result::Result::Err(crate::error::QmpError::command_not_found(name)),
    }
}
",
    );

    item_start(out);
    out.push_str("/// Every command with the properties the monitor needs, in schema order.\n");
    if commands.is_empty() {
        out.push_str("pub const COMMANDS: &[crate::wire::CommandInfo] = &[];\n");
    } else {
        out.push_str("pub const COMMANDS: &[crate::wire::CommandInfo] = &[\n");
        for c in &commands {
            let _ = write!(
                out,
                "    crate::wire::CommandInfo {{
        name: \"{}\",
        success_response: {},
        allow_oob: {},
        allow_preconfig: {},
        deprecated: {},
    }},
",
                c.common.name,
                c.success_response,
                c.allow_oob,
                c.allow_preconfig,
                c.common.is_deprecated()
            );
        }
        out.push_str("];\n");
    }
    out.push_str(
        "/// The properties of command `name`, if the schema has it.
pub fn command_info(name: &str) -> ::std::option::Option<&'static crate::wire::CommandInfo> {
    COMMANDS.iter().find(|c| c.name == name)
}
",
    );
}
