//! QEMU's `key=value,...` option syntax (keyval) to a JSON object.
//!
//! * `a=1,b=x` → `{"a": "1", "b": "x"}`; a comma inside a value is written `,,`.
//! * Dotted keys nest: `file.driver=file` → `{"file": {"driver": "file"}}`.
//! * Objects whose keys are exactly `0, 1, ..., n-1` become lists:
//!   `inject-error.0.event=pwritev` → `{"inject-error": [{"event": "pwritev"}]}`.
//! * The first element may omit its key when the option has an implied one
//!   (`--blockdev qcow2,...` is `driver=qcow2,...`).
//! * A repeated key keeps its last value, as QEMU does.
//!
//! Every value stays a **string**, as in QEMU, where the types come from the schema when the
//! object is visited (`size=1048576` becomes an integer only because `size` is declared `int`).
//! Converting to the schema's types is the job of the type-aware step that consumes this
//! object (`blockdev-add` argument parsing), not of this syntax layer.

use serde_json::{Map, Value};

/// Parse `text` with `implied` as the key of a leading key-less element.
pub fn parse(text: &str, implied: Option<&str>) -> Result<Map<String, Value>, String> {
    let mut root = Map::new();
    let mut rest = text;
    let mut first = true;
    while !rest.is_empty() {
        let (key, value, after) = element(rest, first.then_some(implied).flatten())?;
        insert(&mut root, &key, value)?;
        rest = after;
        first = false;
    }
    listify(&mut root, "")?;
    Ok(root)
}

/// One `key=value` element: (key, value, text after the element's comma).
fn element<'a>(text: &'a str, implied: Option<&str>) -> Result<(String, String, &'a str), String> {
    let key_end = text.find(['=', ',']).unwrap_or(text.len());
    let has_equals = text[key_end..].starts_with('=');
    let (key, value_start) = if has_equals {
        (text[..key_end].to_string(), key_end + 1)
    } else if let Some(implied) = implied {
        (implied.to_string(), 0)
    } else {
        let key = &text[..key_end];
        return Err(format!("Expected '=' after parameter '{key}'"));
    };
    if key.is_empty() || !key.split('.').all(valid_key_fragment) {
        return Err(format!("Invalid parameter '{key}'"));
    }
    // The value runs to the first single comma; ",," is a literal comma.
    let mut value = String::new();
    let mut chars = text[value_start..].char_indices().peekable();
    let mut consumed = text.len() - value_start;
    while let Some((i, c)) = chars.next() {
        if c == ',' {
            if chars.peek().map(|&(_, c)| c) == Some(',') {
                chars.next();
                value.push(',');
                continue;
            }
            consumed = i + 1;
            break;
        }
        value.push(c);
    }
    Ok((key, value, &text[value_start + consumed..]))
}

fn valid_key_fragment(fragment: &str) -> bool {
    !fragment.is_empty()
        && fragment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn insert(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = root;
    for (depth, part) in parts.iter().enumerate() {
        let prefix = parts[..=depth].join(".");
        if depth + 1 == parts.len() {
            match node.get(*part) {
                Some(Value::Object(_)) => {
                    return Err(format!("Parameters '{prefix}.*' used inconsistently"));
                }
                _ => {
                    node.insert(part.to_string(), Value::String(value));
                    return Ok(());
                }
            }
        }
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        match entry {
            Value::Object(child) => node = child,
            _ => return Err(format!("Parameters '{prefix}.*' used inconsistently")),
        }
    }
    Ok(())
}

/// Turn objects keyed `0..n` into lists, depth first.
fn listify(map: &mut Map<String, Value>, path: &str) -> Result<(), String> {
    for (key, value) in map.iter_mut() {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        if let Value::Object(child) = value {
            listify(child, &here)?;
            let indices: Option<Vec<usize>> = child.keys().map(|k| k.parse().ok()).collect();
            if let Some(mut indices) = indices {
                indices.sort_unstable();
                for (expected, &got) in indices.iter().enumerate() {
                    if got != expected {
                        return Err(format!("Parameter '{here}.{expected}' missing"));
                    }
                }
                let mut items: Vec<(usize, Value)> = std::mem::take(child)
                    .into_iter()
                    .filter_map(|(k, v)| k.parse().ok().map(|i| (i, v)))
                    .collect();
                items.sort_by_key(|(i, _)| *i);
                *value = Value::Array(items.into_iter().map(|(_, v)| v).collect());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(text: &str, implied: Option<&str>) -> Value {
        Value::Object(parse(text, implied).unwrap())
    }

    #[test]
    fn dotted_keys_nest_and_values_stay_strings() {
        assert_eq!(
            object(
                "driver=qcow2,node-name=a,file.driver=file,file.filename=x.qcow2,size=1024",
                None
            ),
            json!({"driver": "qcow2", "node-name": "a", "size": "1024",
                   "file": {"driver": "file", "filename": "x.qcow2"}})
        );
    }

    #[test]
    fn a_doubled_comma_is_a_comma_in_the_value() {
        assert_eq!(
            object("filename=a,,b,driver=file", None),
            json!({"filename": "a,b", "driver": "file"})
        );
    }

    #[test]
    fn numbered_keys_make_lists() {
        assert_eq!(
            object(
                "driver=blkdebug,inject-error.0.event=pwritev,inject-error.0.errno=5",
                None
            ),
            json!({"driver": "blkdebug", "inject-error": [{"event": "pwritev", "errno": "5"}]})
        );
    }

    #[test]
    fn a_gap_in_list_indices_is_reported_like_qemu() {
        assert_eq!(
            parse("a.0=x,a.2=y", None),
            Err("Parameter 'a.1' missing".into())
        );
    }

    #[test]
    fn the_implied_key_names_a_leading_bare_value() {
        assert_eq!(
            object("socket,id=m,path=/tmp/q.sock", Some("backend")),
            json!({"backend": "socket", "id": "m", "path": "/tmp/q.sock"})
        );
    }

    #[test]
    fn a_scalar_and_an_object_under_one_key_is_inconsistent() {
        assert_eq!(
            parse("a=1,a.b=2", None),
            Err("Parameters 'a.*' used inconsistently".into())
        );
        assert_eq!(
            parse("a.b=1,a=2", None),
            Err("Parameters 'a.*' used inconsistently".into())
        );
    }

    #[test]
    fn bad_keys_are_reported_like_qemu() {
        assert_eq!(parse("a@b=1", None), Err("Invalid parameter 'a@b'".into()));
        assert_eq!(parse("=x", None), Err("Invalid parameter ''".into()));
        assert_eq!(
            parse("driver", None),
            Err("Expected '=' after parameter 'driver'".into())
        );
    }

    #[test]
    fn a_repeated_key_keeps_the_last_value() {
        assert_eq!(object("size=1,size=2", None), json!({"size": "2"}));
    }
}
