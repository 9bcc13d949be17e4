//! One client's protocol state: capabilities negotiation, request validation, and what to do
//! with each message. Pure logic, no I/O.

use serde_json::{Map, Value, json};

use qmp_api::input::{FromQmp, QmpPath};
use qmp_api::{QMPCapability, QmpCapabilitiesArguments};

use crate::backend::{ErrorClass, QmpBackend, QmpError};
use crate::json_stream::Message;
use crate::qdict_order;

/// What the server must do for one input message, in order with the others.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this reply.
    Reply(Value),
    /// Send this reply (to `qmp_capabilities`); the client then receives events.
    Negotiated(Value),
    /// Run a backend command and reply with its result.
    Execute {
        name: String,
        arguments: Option<Map<String, Value>>,
        id: Option<Value>,
    },
    /// Reply `{"return": {}}`, then shut the daemon down.
    Quit { id: Option<Value> },
}

/// A client's negotiation state.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
    oob: bool,
}

/// The monitor's own commands.
const QMP_CAPABILITIES: &str = "qmp_capabilities";
const QUIT: &str = "quit";

/// `{"return": value, "id": id}`.
pub fn success(value: Value, id: Option<Value>) -> Value {
    let mut reply = Map::new();
    reply.insert("return".into(), value);
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// `{"id": id, "error": {"class": ..., "desc": ...}}`.
pub fn failure(error: &QmpError, id: Option<Value>) -> Value {
    let mut reply = Map::new();
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    reply.insert("error".into(), error.to_json());
    Value::Object(reply)
}

/// An argument validation error, QEMU's `Parameter '%s' is unexpected`.
fn unexpected_parameter(arguments: &Map<String, Value>) -> Option<QmpError> {
    let first = qdict_order::order(arguments.keys().map(String::as_str))
        .into_iter()
        .next()?;
    let name = arguments.keys().nth(first)?;
    Some(QmpError::generic(format!(
        "Parameter '{name}' is unexpected"
    )))
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `qmp_capabilities` has succeeded.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Decide what to do with one message from the input stream.
    pub fn handle(&mut self, message: Message, backend: &dyn QmpBackend) -> Action {
        let request = match message {
            Message::Error(desc) => return Action::Reply(failure(&QmpError::generic(desc), None)),
            Message::Value(Value::Object(request)) => request,
            Message::Value(_) => {
                return Action::Reply(failure(
                    &QmpError::generic("QMP input must be a JSON object"),
                    None,
                ));
            }
        };
        let id = request.get("id").cloned();
        let (name, oob) = match self.check_request(&request) {
            Ok(found) => found,
            Err(e) => return Action::Reply(failure(&e, id)),
        };
        let arguments = match request.get("arguments") {
            Some(Value::Object(a)) => Some(a.clone()),
            _ => None,
        };

        let known = name == QMP_CAPABILITIES
            || (self.negotiated && (name == QUIT || backend.has_command(&name)));
        if !known {
            let desc = if self.negotiated {
                format!("The command {name} has not been found")
            } else {
                "Expecting capabilities negotiation with 'qmp_capabilities'".to_string()
            };
            return Action::Reply(failure(
                &QmpError::new(ErrorClass::CommandNotFound, desc),
                id,
            ));
        }
        if oob {
            // No command of qemu-storage-daemon allows out-of-band execution.
            return Action::Reply(failure(
                &QmpError::generic(format!("The command {name} does not support OOB")),
                id,
            ));
        }
        match name.as_str() {
            QMP_CAPABILITIES => match self.capabilities(arguments.unwrap_or_default()) {
                Ok(()) => Action::Negotiated(success(json!({}), id)),
                Err(e) => Action::Reply(failure(&e, id)),
            },
            QUIT => match arguments.as_ref().and_then(unexpected_parameter) {
                Some(e) => Action::Reply(failure(&e, id)),
                None => Action::Quit { id },
            },
            _ => Action::Execute {
                name,
                arguments,
                id,
            },
        }
    }

    /// QEMU's check of a request's members, walked in QEMU's member order so that the first
    /// problem reported is the one QEMU reports. Returns the command and whether it is
    /// `exec-oob`.
    fn check_request(&self, request: &Map<String, Value>) -> Result<(String, bool), QmpError> {
        let members: Vec<(&String, &Value)> = request.iter().collect();
        let mut exec: Option<(&str, &str)> = None;
        for i in qdict_order::order(members.iter().map(|(k, _)| k.as_str())) {
            let (key, value) = members[i];
            match key.as_str() {
                "execute" | "exec-oob" if key == "execute" || self.oob => {
                    let Value::String(command) = value else {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{key}' must be a string"
                        )));
                    };
                    if let Some((other, _)) = exec {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{key}' clashes with '{other}'"
                        )));
                    }
                    exec = Some((key.as_str(), command.as_str()));
                }
                "arguments" => {
                    if !value.is_object() {
                        return Err(QmpError::generic(
                            "QMP input member 'arguments' must be an object",
                        ));
                    }
                }
                "id" => {}
                _ => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' is unexpected"
                    )));
                }
            }
        }
        match exec {
            Some((key, command)) => Ok((command.to_string(), key == "exec-oob")),
            None => Err(QmpError::generic("QMP input lacks member 'execute'")),
        }
    }

    /// `qmp_capabilities`: arguments are checked first (the generated
    /// `QmpCapabilitiesArguments`, read by QEMU's input visitor), then whether negotiation
    /// is over.
    fn capabilities(&mut self, arguments: Map<String, Value>) -> Result<(), QmpError> {
        let arguments = Value::Object(arguments);
        let args = QmpCapabilitiesArguments::from_qmp(&arguments, &mut QmpPath::root())?;
        let oob = args
            .enable
            .unwrap_or_default()
            .contains(&QMPCapability::Oob);
        if self.negotiated {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        self.negotiated = true;
        self.oob = oob;
        Ok(())
    }
}
