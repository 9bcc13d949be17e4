//! The command backend blockjobd uses until the block layer's generated dispatch is glued in:
//! a table of node names, so that startup `--blockdev` handling and the QMP server can be run
//! end to end. It knows `query-version`, `blockdev-add` and `blockdev-del`, nothing else.

use std::sync::Mutex;

use monitor::{ErrorClass, QmpBackend, QmpError};
use serde_json::{Map, Value, json};

/// Node names added with `blockdev-add`, in order.
#[derive(Debug, Default)]
pub struct InterimBackend {
    nodes: Mutex<Vec<String>>,
}

impl InterimBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The node names currently added.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn node_name(arguments: &Map<String, Value>) -> Result<String, QmpError> {
        match arguments.get("node-name") {
            Some(Value::String(name)) => Ok(name.clone()),
            Some(_) => Err(QmpError::generic(
                "Invalid parameter type for 'node-name', expected: string",
            )),
            None => Err(QmpError::generic("Parameter 'node-name' is missing")),
        }
    }
}

impl QmpBackend for InterimBackend {
    fn execute(
        &self,
        name: &str,
        arguments: Option<Map<String, Value>>,
    ) -> Result<Value, QmpError> {
        let arguments = arguments.unwrap_or_default();
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        match name {
            "query-version" => Ok(json!({
                "qemu": {"major": 10, "minor": 0, "micro": 2},
                "package": concat!("blockjobd ", env!("CARGO_PKG_VERSION")),
            })),
            "blockdev-add" => {
                if !arguments.contains_key("driver") {
                    return Err(QmpError::generic("Parameter 'driver' is missing"));
                }
                let node = Self::node_name(&arguments)?;
                if nodes.contains(&node) {
                    return Err(QmpError::generic(format!(
                        "Duplicate nodes with node-name='{node}'"
                    )));
                }
                nodes.push(node);
                Ok(json!({}))
            }
            "blockdev-del" => {
                let node = Self::node_name(&arguments)?;
                let Some(at) = nodes.iter().position(|n| *n == node) else {
                    return Err(QmpError::generic(format!(
                        "Failed to find node with node-name='{node}'"
                    )));
                };
                nodes.remove(at);
                Ok(json!({}))
            }
            _ => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                format!("The command {name} has not been found"),
            )),
        }
    }

    fn has_command(&self, name: &str) -> bool {
        matches!(name, "query-version" | "blockdev-add" | "blockdev-del")
    }
}
