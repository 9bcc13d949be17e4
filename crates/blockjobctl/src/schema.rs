//! The server's own schema (`query-qmp-schema`): checking arguments before they are
//! sent, and the names the shell completes.
//!
//! Introspection masks type names as numbers, so messages name what the user wrote:
//! commands, argument and member paths (`actions[0].data.sync`), JSON types and enum
//! values, all as the schema spells them.

use serde_json::{Map, Value};
use std::collections::HashMap;

/// One server's introspected schema.
#[derive(Debug, Default)]
pub struct Schema {
    entities: HashMap<String, Value>,
    commands: Vec<String>,
}

/// A member of an object type: its name, whether it may be left out, its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub optional: bool,
    type_name: String,
}

impl Schema {
    /// Reads the reply of `query-qmp-schema`.
    pub fn from_introspection(value: &Value) -> Result<Schema, String> {
        let entries = value
            .as_array()
            .ok_or("query-qmp-schema did not return a list")?;
        let mut schema = Schema::default();
        for entry in entries {
            let name = entry
                .get("name")
                .and_then(Value::as_str)
                .ok_or("a schema entry without a name")?;
            if entry.get("meta-type").and_then(Value::as_str) == Some("command") {
                schema.commands.push(name.to_string());
            }
            schema.entities.insert(name.to_string(), entry.clone());
        }
        schema.commands.sort();
        Ok(schema)
    }

    /// Every command, sorted.
    pub fn commands(&self) -> &[String] {
        &self.commands
    }

    fn entity(&self, name: &str) -> Option<&Value> {
        self.entities.get(name)
    }

    fn meta_type(&self, name: &str) -> &str {
        self.entity(name)
            .and_then(|e| e.get("meta-type"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The arguments of `command` (for a union argument type, the common ones).
    pub fn arguments(&self, command: &str) -> Vec<Member> {
        self.entity(command)
            .and_then(|c| c.get("arg-type"))
            .and_then(Value::as_str)
            .map(|t| self.members(t))
            .unwrap_or_default()
    }

    /// The top-level arguments of `command` whose values are strings (or enum values).
    pub fn string_arguments(&self, command: &str) -> Vec<String> {
        self.arguments(command)
            .into_iter()
            .filter(|m| {
                let json = self
                    .entity(&m.type_name)
                    .and_then(|e| e.get("json-type"))
                    .and_then(Value::as_str);
                json == Some("string") || self.meta_type(&m.type_name) == "enum"
            })
            .map(|m| m.name)
            .collect()
    }

    fn members(&self, object: &str) -> Vec<Member> {
        self.entity(object)
            .and_then(|o| o.get("members"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| {
                Some(Member {
                    name: m.get("name")?.as_str()?.to_string(),
                    optional: m.get("default").is_some(),
                    type_name: m.get("type")?.as_str()?.to_string(),
                })
            })
            .collect()
    }

    /// Checks `arguments` of `command`; the error names the command and the member.
    pub fn check(&self, command: &str, arguments: &Map<String, Value>) -> Result<(), String> {
        let Some(entity) = self.entity(command) else {
            return Err(format!("'{command}' is not a command of this server"));
        };
        if entity.get("meta-type").and_then(Value::as_str) != Some("command") {
            return Err(format!("'{command}' is not a command of this server"));
        }
        let arg_type = entity.get("arg-type").and_then(Value::as_str).unwrap_or("");
        self.check_object(arg_type, arguments, "")
            .map_err(|e| format!("{command}: {e}"))
    }

    fn check_value(&self, type_name: &str, value: &Value, path: &str) -> Result<(), String> {
        // `['X']` is written `[X]` in introspection; arrays also have entities.
        let entity = match self.entity(type_name) {
            Some(entity) => entity,
            None => return Ok(()),
        };
        match self.meta_type(type_name) {
            "builtin" => {
                let json = entity
                    .get("json-type")
                    .and_then(Value::as_str)
                    .unwrap_or("value");
                let fits = match json {
                    "string" => value.is_string(),
                    "int" => value.is_i64() || value.is_u64(),
                    "number" => value.is_number(),
                    "boolean" => value.is_boolean(),
                    "null" => value.is_null(),
                    "object" => value.is_object(),
                    "array" => value.is_array(),
                    _ => true,
                };
                if fits {
                    Ok(())
                } else {
                    Err(format!("'{path}' must be {}, not {value}", article(json)))
                }
            }
            "enum" => {
                let values: Vec<&str> = entity
                    .get("values")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                match value.as_str() {
                    Some(v) if values.contains(&v) => Ok(()),
                    _ => Err(format!(
                        "'{path}' must be one of {}, not {value}",
                        values.join(", ")
                    )),
                }
            }
            "array" => {
                let element = entity
                    .get("element-type")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let items = value
                    .as_array()
                    .ok_or_else(|| format!("'{path}' must be a list, not {value}"))?;
                for (i, item) in items.iter().enumerate() {
                    self.check_value(element, item, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            "object" => {
                let map = value
                    .as_object()
                    .ok_or_else(|| format!("'{path}' must be an object, not {value}"))?;
                self.check_object(type_name, map, path)
            }
            "alternate" => {
                let branches: Vec<&str> = entity
                    .get("members")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.get("type").and_then(Value::as_str))
                    .collect();
                let mut errors = Vec::new();
                for branch in &branches {
                    match self.check_value(branch, value, path) {
                        Ok(()) => return Ok(()),
                        Err(e) => errors.push(e),
                    }
                }
                Err(errors.join("; or "))
            }
            _ => Ok(()),
        }
    }

    fn check_object(
        &self,
        type_name: &str,
        map: &Map<String, Value>,
        path: &str,
    ) -> Result<(), String> {
        let join = |name: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            }
        };
        let mut members = self.members(type_name);
        // A union: the branch chosen by the tag adds its members.
        let entity = self.entity(type_name);
        if let Some(tag) = entity.and_then(|e| e.get("tag")).and_then(Value::as_str) {
            let tag_member = members.iter().find(|m| m.name == tag).cloned();
            if let (Some(tag_member), Some(tag_value)) = (tag_member, map.get(tag)) {
                self.check_value(&tag_member.type_name, tag_value, &join(tag))?;
                let case = tag_value.as_str().unwrap_or("");
                let variant = entity
                    .and_then(|e| e.get("variants"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|v| v.get("case").and_then(Value::as_str) == Some(case))
                    .and_then(|v| v.get("type"))
                    .and_then(Value::as_str);
                if let Some(variant) = variant {
                    members.extend(self.members(variant));
                }
            }
        }
        for (name, value) in map {
            match members.iter().find(|m| &m.name == name) {
                Some(member) => self.check_value(&member.type_name, value, &join(name))?,
                None => {
                    let known: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
                    return Err(if known.is_empty() {
                        format!("'{}' is not expected: there are no arguments", join(name))
                    } else {
                        format!(
                            "'{}' is not expected; the schema has: {}",
                            join(name),
                            known.join(", ")
                        )
                    });
                }
            }
        }
        if let Some(missing) = members
            .iter()
            .find(|m| !m.optional && !map.contains_key(&m.name))
        {
            return Err(format!("'{}' is missing", join(&missing.name)));
        }
        Ok(())
    }
}

fn article(json_type: &str) -> String {
    match json_type {
        "int" => "an integer".to_string(),
        "object" | "array" => format!("an {json_type}"),
        "null" => "null".to_string(),
        other => format!("a {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// blockjobd's own introspection: the same shape every QEMU gives.
    fn schema() -> Schema {
        let value: Value =
            serde_json::from_str(qmp_api::QMP_SCHEMA_JSON).expect("introspection JSON");
        Schema::from_introspection(&value).expect("schema")
    }

    fn check(command: &str, arguments: Value) -> Result<(), String> {
        let Value::Object(map) = arguments else {
            panic!("arguments are an object")
        };
        schema().check(command, &map)
    }

    #[test]
    fn good_arguments_pass() {
        assert_eq!(check("job-pause", json!({"id": "j"})), Ok(()));
        assert_eq!(
            check(
                "transaction",
                json!({"actions": [{"type": "blockdev-backup", "data": {
                    "device": "a", "target": "b", "sync": "full", "job-id": "j"}}]})
            ),
            Ok(())
        );
    }

    #[test]
    fn errors_name_the_command_and_the_member_as_the_schema_does() {
        assert_eq!(
            check("job-pause", json!({"idd": "j"})),
            Err("job-pause: 'idd' is not expected; the schema has: id".to_string())
        );
        assert_eq!(
            check("job-pause", json!({})),
            Err("job-pause: 'id' is missing".to_string())
        );
        assert_eq!(
            check("no-such", json!({})),
            Err("'no-such' is not a command of this server".to_string())
        );
        assert_eq!(
            check(
                "transaction",
                json!({"actions": [{"type": "blockdev-backup", "data": {
                    "device": "a", "target": "b", "sync": "bogus"}}]})
            ),
            Err("transaction: 'actions[0].data.sync' must be one of top, full, none, incremental, bitmap, not \"bogus\"".to_string())
        );
        assert_eq!(
            check(
                "block-job-set-speed",
                json!({"device": "j", "speed": "fast"})
            ),
            Err("block-job-set-speed: 'speed' must be an integer, not \"fast\"".to_string())
        );
    }

    #[test]
    fn argument_names_come_from_the_schema() {
        let names: Vec<_> = schema()
            .arguments("block-job-set-speed")
            .into_iter()
            .map(|m| (m.name, m.optional))
            .collect();
        assert_eq!(
            names,
            [("device".to_string(), false), ("speed".to_string(), false)]
        );
        assert!(schema().commands().iter().any(|c| c == "query-jobs"));
    }
}
