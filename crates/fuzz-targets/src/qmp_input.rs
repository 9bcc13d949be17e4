//! The QMP request path up to a command handler: the monitor's JSON stream
//! ([`monitor::json_stream::JsonStream`]) cuts and parses the bytes a client sends, fed in
//! chunks of fuzzed sizes, and every object goes through the input visitor
//! ([`qmp_api::input`]) as `dispatch` would read it, and as a few of the richest types.
//!
//! Invariants besides "no panic": cutting the input into other chunks gives the same messages,
//! and whatever the visitor accepts, serialised again, is read back to the same value.

use monitor::json_stream::{JsonStream, Message};
use qmp_api::input::{FromQmp, from_value};
use serde_json::Value;

/// A command handler that implements nothing: `dispatch` reads the arguments with the
/// visitor, then answers `CommandNotFound`.
struct NoCommands;
impl qmp_api::Commands for NoCommands {}

/// Feeds `data` to the JSON stream and every message to the visitor. The first byte picks the
/// chunk size (1..=256) the rest is fed in.
pub fn run(data: &[u8]) {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    let mut whole = Vec::new();
    JsonStream::new().feed(input, &mut whole);
    let mut cut = Vec::new();
    let mut stream = JsonStream::new();
    for piece in input.chunks(chunk) {
        stream.feed(piece, &mut cut);
    }
    assert_eq!(whole, cut, "chunking changed the messages");
    for message in &whole {
        if let Message::Value(value) = message {
            visit(value);
        }
    }
}

fn visit(value: &Value) {
    if let Value::Object(request) = value {
        let name = request
            .get("execute")
            .and_then(Value::as_str)
            .unwrap_or("query-version");
        let arguments = match request.get("arguments") {
            Some(Value::Object(a)) => Some(a.clone()),
            _ => None,
        };
        let _ = qmp_api::dispatch(&mut NoCommands, name, arguments.clone());
        // Every command's argument type over the same arguments.
        if let Some(arguments) = arguments {
            let arguments = Value::Object(arguments);
            for info in qmp_api::COMMANDS {
                let _ =
                    qmp_api::dispatch(&mut NoCommands, info.name, arguments.as_object().cloned());
            }
            round_trip::<qmp_api::BlockdevOptions>(&arguments);
            round_trip::<qmp_api::TransactionAction>(&arguments);
            round_trip::<qmp_api::DriveBackup>(&arguments);
            round_trip::<qmp_api::BlockdevBackup>(&arguments);
        }
    }
    round_trip::<qmp_api::BlockdevOptions>(value);
    round_trip::<qmp_api::TransactionAction>(value);
}

/// Whatever the visitor accepts, serialised and read again, is the same value.
fn round_trip<T>(value: &Value)
where
    T: FromQmp + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(parsed) = from_value::<T>(value) else {
        return;
    };
    let again = serde_json::to_value(&parsed).expect("an accepted value serialises");
    let reparsed =
        from_value::<T>(&again).unwrap_or_else(|e| panic!("re-reading {again} failed: {}", e.desc));
    assert_eq!(parsed, reparsed, "a round trip changed the value");
}
