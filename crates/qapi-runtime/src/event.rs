//! The [`Event`] trait every generated `Event` enum implements, so that a client can be
//! generic over any generated API.

use crate::error::QmpError;
use crate::wire::EventTimestamp;
use serde_json::{Map, Value};

/// The events of one schema (the generated `Event` enum).
pub trait Event: Sized + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The wire name (`JOB_STATUS_CHANGE`).
    fn name(&self) -> &str;

    /// The `data` member, `None` for events without data.
    fn data(&self) -> Option<Value>;

    /// Reads an event message (`event` and `data`; `timestamp` is not needed), tolerantly:
    /// an event the schema does not know is the enum's `UnknownEvent`, not an error.
    fn from_wire(message: &Value) -> Result<Self, QmpError>;

    /// The message QEMU sends: `{"timestamp": {...}, "event": NAME, "data": {...}}`
    /// (`data` omitted for events without data).
    fn to_wire(&self, timestamp: EventTimestamp) -> Value {
        let mut message = Map::new();
        message.insert(
            "timestamp".to_string(),
            serde_json::to_value(timestamp).unwrap_or(Value::Null),
        );
        message.insert("event".to_string(), Value::from(self.name()));
        if let Some(data) = self.data() {
            message.insert("data".to_string(), data);
        }
        Value::Object(message)
    }
}

/// An event the schema does not know (QEMU adds events; clients must ignore those they
/// do not know): its name and its `data` as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct UnknownEvent {
    pub name: String,
    pub data: Option<Value>,
}

/// The `event` name and `data` of an event message.
pub fn split_message(message: &Value) -> Result<(&str, Option<&Value>), QmpError> {
    match message.get("event") {
        Some(Value::String(name)) => Ok((name.as_str(), message.get("data"))),
        _ => Err(QmpError::generic(
            "event message has no 'event' string member",
        )),
    }
}

/// Reads the `data` of event `name` (missing data is reported as QEMU would name it).
pub fn read_data<T: crate::input::FromQmp>(data: Option<&Value>) -> Result<T, QmpError> {
    let path = &mut crate::input::QmpPath::tolerant_root();
    path.push_member("data");
    match data {
        Some(data) => T::from_qmp(data, path),
        None => Err(path.missing()),
    }
}
