//! A command's arguments from the command line: one JSON object, or `key=value` words
//! (a value is read as JSON when it is JSON and the schema does not want a string there,
//! so `speed=100` is a number and `id=100` a string; `a.b=1` builds nested objects).

use crate::schema::Schema;
use serde_json::{Map, Value};

/// Builds the arguments object of `command` from `words`.
pub fn parse(
    schema: &Schema,
    command: &str,
    words: &[String],
) -> Result<Map<String, Value>, String> {
    if let [only] = words
        && only.trim_start().starts_with('{')
    {
        return match serde_json::from_str(only) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err("the JSON argument must be an object".to_string()),
            Err(e) => Err(format!("the JSON argument is not valid JSON: {e}")),
        };
    }
    let strings = schema.string_arguments(command);
    let mut arguments = Map::new();
    for word in words {
        let (key, raw) = word
            .split_once('=')
            .ok_or_else(|| format!("'{word}' is not key=value (or give one JSON object)"))?;
        if key.is_empty() {
            return Err(format!("'{word}' has no key"));
        }
        let value = if strings.iter().any(|s| s == key) {
            Value::String(raw.to_string())
        } else {
            serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
        };
        insert(&mut arguments, key, value)?;
    }
    Ok(arguments)
}

fn insert(map: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), String> {
    match key.split_once('.') {
        None => {
            if map.insert(key.to_string(), value).is_some() {
                return Err(format!("'{key}' is given twice"));
            }
            Ok(())
        }
        Some((head, rest)) => {
            let inner = map
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            match inner {
                Value::Object(inner) => insert(inner, rest, value),
                _ => Err(format!(
                    "'{head}' is given both as a value and as an object"
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        let value: Value = serde_json::from_str(qmp_api::QMP_SCHEMA_JSON).expect("JSON");
        Schema::from_introspection(&value).expect("schema")
    }

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn key_value_words_become_typed_json_where_the_schema_wants_it() {
        let got = parse(
            &schema(),
            "block-job-set-speed",
            &words(&["device=100", "speed=1048576"]),
        )
        .expect("parsed");
        assert_eq!(
            Value::Object(got),
            json!({"device": "100", "speed": 1048576})
        );
    }

    #[test]
    fn dotted_keys_nest_and_a_json_object_is_taken_whole() {
        let got = parse(&schema(), "x", &words(&["a.b=1", "a.c=true", "d=x y"])).expect("parsed");
        assert_eq!(
            Value::Object(got),
            json!({"a": {"b": 1, "c": true}, "d": "x y"})
        );
        let got = parse(&schema(), "x", &words(&[r#"{"id": "j"}"#])).expect("parsed");
        assert_eq!(Value::Object(got), json!({"id": "j"}));
        assert_eq!(
            parse(&schema(), "x", &words(&["id"])),
            Err("'id' is not key=value (or give one JSON object)".to_string())
        );
    }
}
