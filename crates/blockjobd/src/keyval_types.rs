//! Typing `key=value` command-line options the way QEMU's keyval visitor does: every value
//! arrives as a string, and the schema says what it must be. We walk the generated introspection
//! (`qmp_api::qmp_schema()`): object members, flat-union branches chosen by their tag, alternates
//! and arrays; strings where the schema wants an integer, number or boolean are converted, with
//! QEMU's messages when they do not parse. Everything else is left for the typed argument check.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// `arguments` of `command` (e.g. `blockdev-add`) with keyval strings converted to JSON types.
pub fn typed_arguments(
    command: &str,
    arguments: Map<String, Value>,
) -> Result<Map<String, Value>, String> {
    let schema = qmp_api::qmp_schema();
    let entities: HashMap<&str, &Value> = schema
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|e| Some((e["name"].as_str()?, e)))
                .collect()
        })
        .unwrap_or_default();
    let Some(arg_type) = entities.get(command).and_then(|c| c["arg-type"].as_str()) else {
        return Ok(arguments);
    };
    let types = Types { entities };
    match types.convert(Value::Object(arguments), arg_type, "")? {
        Value::Object(map) => Ok(map),
        _ => Err(format!("{command}: arguments must be an object")),
    }
}

struct Types<'a> {
    entities: HashMap<&'a str, &'a Value>,
}

impl Types<'_> {
    fn convert(&self, value: Value, ty: &str, path: &str) -> Result<Value, String> {
        let Some(entity) = self.entities.get(ty) else {
            return Ok(value);
        };
        match (entity["meta-type"].as_str(), value) {
            (Some("builtin"), Value::String(s)) => scalar(&s, entity["json-type"].as_str(), path),
            (Some("array"), Value::Array(items)) => {
                let element = entity["element-type"].as_str().unwrap_or_default();
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| self.convert(item, element, &join(path, &i.to_string())))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array)
            }
            (Some("object"), Value::Object(map)) => {
                self.object(entity, map, path).map(Value::Object)
            }
            (Some("alternate"), value) => self.alternate(entity, value, path),
            (_, value) => Ok(value),
        }
    }

    fn object(
        &self,
        entity: &Value,
        map: Map<String, Value>,
        path: &str,
    ) -> Result<Map<String, Value>, String> {
        let mut members: Vec<&Value> = entity["members"]
            .as_array()
            .map(|m| m.iter().collect())
            .unwrap_or_default();
        // A flat union: the branch's members are chosen by the tag's (string) value.
        if let Some(tag) = entity["tag"].as_str()
            && let Some(case) = map.get(tag).and_then(Value::as_str)
            && let Some(variant) = entity["variants"]
                .as_array()
                .and_then(|vs| vs.iter().find(|v| v["case"] == case))
            && let Some(branch) = variant["type"].as_str().and_then(|t| self.entities.get(t))
            && let Some(extra) = branch["members"].as_array()
        {
            members.extend(extra.iter());
        }
        map.into_iter()
            .map(|(key, value)| {
                let member_type = members
                    .iter()
                    .find(|m| m["name"] == key.as_str())
                    .and_then(|m| m["type"].as_str());
                let value = match member_type {
                    Some(t) => self.convert(value, t, &join(path, &key))?,
                    None => value,
                };
                Ok((key, value))
            })
            .collect()
    }

    /// An alternate is chosen by JSON type; a keyval string may be any of its scalar branches,
    /// an object goes to its object branch.
    fn alternate(&self, entity: &Value, value: Value, path: &str) -> Result<Value, String> {
        let branches: Vec<&str> = entity["members"]
            .as_array()
            .map(|m| m.iter().filter_map(|b| b["type"].as_str()).collect())
            .unwrap_or_default();
        let meta = |t: &str| {
            self.entities
                .get(t)
                .map(|e| (e["meta-type"].as_str(), e["json-type"].as_str()))
        };
        match &value {
            Value::Object(_) => match branches
                .iter()
                .find(|t| matches!(meta(t), Some((Some("object"), _))))
            {
                Some(t) => self.convert(value, t, path),
                None => Ok(value),
            },
            Value::String(s) => {
                let takes_string = branches.iter().any(|t| {
                    matches!(
                        meta(t),
                        Some((Some("enum"), _)) | Some((Some("builtin"), Some("string")))
                    )
                });
                if takes_string {
                    return Ok(value);
                }
                for t in &branches {
                    if let Some((Some("builtin"), json_type)) = meta(t)
                        && let Ok(v) = scalar(s, json_type, path)
                    {
                        return Ok(v);
                    }
                }
                Ok(value)
            }
            _ => Ok(value),
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// One keyval string as the JSON type the schema wants, with QEMU's keyval visitor messages.
fn scalar(text: &str, json_type: Option<&str>, path: &str) -> Result<Value, String> {
    match json_type {
        Some("int") => integer(text)
            .map(Value::from)
            .ok_or_else(|| format!("Parameter '{path}' expects integer")),
        Some("number") => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("Parameter '{path}' expects a number")),
        Some("boolean") => match text {
            "on" | "yes" | "true" | "y" => Ok(Value::Bool(true)),
            "off" | "no" | "false" | "n" => Ok(Value::Bool(false)),
            _ => Err(format!("Parameter '{path}' expects 'on' or 'off'")),
        },
        _ => Ok(Value::String(text.to_string())),
    }
}

/// Decimal, or hexadecimal with `0x`, optionally negative, as QEMU's number parsing accepts.
fn integer(text: &str) -> Option<serde_json::Number> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let magnitude = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<u64>().ok()?,
    };
    if negative {
        let value = i64::try_from(magnitude).ok()?.checked_neg()?;
        Some(value.into())
    } else {
        Some(magnitude.into())
    }
}

#[cfg(test)]
mod tests {
    use super::typed_arguments;
    use serde_json::json;

    fn typed(args: serde_json::Value) -> Result<serde_json::Value, String> {
        let serde_json::Value::Object(map) = args else {
            panic!("object expected")
        };
        typed_arguments("blockdev-add", map).map(serde_json::Value::Object)
    }

    #[test]
    fn integers_and_booleans_of_a_union_branch_are_typed() {
        let out = typed(
            json!({"driver": "null-co", "node-name": "n", "size": "1048576", "read-zeroes": "on"}),
        );
        assert_eq!(
            out,
            Ok(
                json!({"driver": "null-co", "node-name": "n", "size": 1048576, "read-zeroes": true})
            )
        );
    }

    #[test]
    fn hexadecimal_integers_are_accepted_like_qemu() {
        let out = typed(json!({"driver": "null-co", "node-name": "n", "size": "0x100000"}));
        assert_eq!(out.map(|v| v["size"].clone()), Ok(json!(1048576)));
    }

    #[test]
    fn nested_children_are_typed_through_the_alternate() {
        let out = typed(json!({"driver": "raw", "node-name": "r", "offset": "512",
                               "file": {"driver": "null-co", "size": "4096"}}));
        assert_eq!(out.clone().map(|v| v["offset"].clone()), Ok(json!(512)));
        assert_eq!(out.map(|v| v["file"]["size"].clone()), Ok(json!(4096)));
    }

    #[test]
    fn a_child_given_by_node_name_stays_a_string() {
        let out = typed(json!({"driver": "raw", "node-name": "r", "file": "n0"}));
        assert_eq!(out.map(|v| v["file"].clone()), Ok(json!("n0")));
    }

    #[test]
    fn values_that_do_not_parse_get_qemus_messages() {
        assert_eq!(
            typed(json!({"driver": "null-co", "node-name": "n", "size": "1M"})),
            Err("Parameter 'size' expects integer".to_string())
        );
        assert_eq!(
            typed(json!({"driver": "null-co", "node-name": "n", "read-zeroes": "maybe"})),
            Err("Parameter 'read-zeroes' expects 'on' or 'off'".to_string())
        );
    }
}
