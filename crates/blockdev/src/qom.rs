//! QEMU's object tree as `qom-list`/`qom-get`/`qom-set` and `qom-list-types`/
//! `qom-list-properties` see it in qemu-storage-daemon: the root container with `backend`
//! (empty), `objects` (the user-creatable objects, [`crate::objects`]) and `chardevs`
//! ([`crate::chardev`]). Paths are absolute (`/objects/io0`) or partial (`io0`, `objects`),
//! resolved as QEMU does: a partial path must name one object only.

use qmp_api::{ObjectPropertyInfo, ObjectTypeInfo, QmpError};

use serde_json::{Value, json};

use crate::chardev::Chardevs;
use crate::objects::Objects;

/// An object of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Root,
    Container(&'static str),
    Object(String),
    Chardev(String),
}

impl Node {
    fn path(&self) -> String {
        match self {
            Node::Root => "/".into(),
            Node::Container(name) => format!("/{name}"),
            Node::Object(id) => format!("/objects/{id}"),
            Node::Chardev(id) => format!("/chardevs/{id}"),
        }
    }
}

/// Every object of the tree.
fn all(objects: &Objects, chardevs: &Chardevs) -> Vec<Node> {
    let mut nodes = vec![
        Node::Root,
        Node::Container("backend"),
        Node::Container("objects"),
        Node::Container("chardevs"),
    ];
    nodes.extend(objects.iter().map(|(id, _)| Node::Object(id.to_string())));
    nodes.extend(chardevs.ids().map(|(id, _)| Node::Chardev(id.to_string())));
    nodes
}

fn resolve(objects: &Objects, chardevs: &Chardevs, path: &str) -> Result<Node, QmpError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let nodes = all(objects, chardevs);
    let components = |n: &Node| -> Vec<String> {
        n.path()
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    };
    let found: Vec<Node> = if path.starts_with('/') {
        nodes
            .into_iter()
            .filter(|n| components(n) == parts)
            .collect()
    } else if parts.is_empty() {
        Vec::new()
    } else {
        nodes
            .into_iter()
            .filter(|n| {
                let c = components(n);
                c.len() >= parts.len() && c[c.len() - parts.len()..] == parts[..]
            })
            .collect()
    };
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(QmpError::new(
            qmp_api::ErrorClass::DeviceNotFound,
            format!("Device '{path}' not found"),
        )),
        _ => Err(QmpError::generic(format!("Path '{path}' is ambiguous"))),
    }
}

fn info(name: &str, ty: &str) -> ObjectPropertyInfo {
    ObjectPropertyInfo {
        name: name.to_string(),
        r#type: ty.to_string(),
        description: None,
        default_value: None,
    }
}

fn type_of(node: &Node, objects: &mut Objects, chardevs: &Chardevs) -> &'static str {
    match node {
        Node::Root | Node::Container(_) => "container",
        Node::Object(id) => objects.get_mut(id).map_or("object", |o| o.type_name()),
        Node::Chardev(id) => chardevs.type_name(id).unwrap_or("chardev"),
    }
}

/// `qom-list`.
pub(crate) fn list(
    objects: &mut Objects,
    chardevs: &Chardevs,
    path: &str,
) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
    let node = resolve(objects, chardevs, path)?;
    let mut out = vec![info("type", "string")];
    match &node {
        Node::Root => {
            for c in ["backend", "objects", "chardevs"] {
                out.push(info(c, "child<container>"));
            }
        }
        Node::Container("objects") => {
            for (id, o) in objects.iter() {
                out.push(info(id, &format!("child<{}>", o.type_name())));
            }
        }
        Node::Container("chardevs") => {
            for (id, ty) in chardevs.ids() {
                out.push(info(id, &format!("child<{ty}>")));
            }
        }
        Node::Container(_) => {}
        Node::Object(id) => {
            if let Some(o) = objects.get_mut(id) {
                out = props(o.properties());
            }
        }
        Node::Chardev(id) => out = props(chardevs.properties(id)),
    }
    Ok(out)
}

fn props(list: &[(&str, &str)]) -> Vec<ObjectPropertyInfo> {
    list.iter().map(|(n, t)| info(n, t)).collect()
}

fn not_found(ty: &str, property: &str) -> QmpError {
    QmpError::generic(format!("Property '{ty}.{property}' not found"))
}

/// `qom-get`.
pub(crate) fn get(
    objects: &mut Objects,
    chardevs: &Chardevs,
    path: &str,
    property: &str,
) -> Result<Value, QmpError> {
    let node = resolve(objects, chardevs, path)?;
    let ty = type_of(&node, objects, chardevs);
    if property == "type" {
        return Ok(json!(ty));
    }
    let value = match &node {
        Node::Root => ["backend", "objects", "chardevs"]
            .contains(&property)
            .then(|| json!(format!("/{property}"))),
        Node::Container("objects") => objects
            .contains(property)
            .then(|| json!(format!("/objects/{property}"))),
        Node::Container("chardevs") => chardevs
            .type_name(property)
            .map(|_| json!(format!("/chardevs/{property}"))),
        Node::Container(_) => None,
        Node::Object(id) => objects.get_mut(id).and_then(|o| o.get(property)),
        Node::Chardev(id) => chardevs.get(id, property),
    };
    value.ok_or_else(|| not_found(ty, property))
}

/// `qom-set`.
pub(crate) fn set(
    objects: &mut Objects,
    chardevs: &Chardevs,
    path: &str,
    property: &str,
    value: &Value,
) -> Result<(), QmpError> {
    let node = resolve(objects, chardevs, path)?;
    let ty = type_of(&node, objects, chardevs);
    let known = list(objects, chardevs, &node.path())?
        .iter()
        .any(|p| p.name == property);
    if !known {
        return Err(not_found(ty, property));
    }
    match &node {
        Node::Object(id) if property != "type" => match objects.get_mut(id) {
            Some(o) => o.set(property, value),
            None => Err(not_found(ty, property)),
        },
        _ => Err(QmpError::generic(format!(
            "Property '{ty}.{property}' is not writable"
        ))),
    }
}

/// The types blockjobd has: (name, parent, abstract).
const TYPES: &[(&str, Option<&str>, bool)] = &[
    ("object", None, true),
    ("interface", None, true),
    ("user-creatable", Some("interface"), true),
    ("container", Some("object"), false),
    ("event-loop-base", Some("object"), true),
    ("iothread", Some("event-loop-base"), false),
    ("secret_common", Some("object"), true),
    ("secret", Some("secret_common"), false),
    ("throttle-group", Some("object"), false),
    ("chardev", Some("object"), true),
    ("chardev-null", Some("chardev"), false),
    ("chardev-ringbuf", Some("chardev"), false),
    ("chardev-socket", Some("chardev"), false),
];

/// Types that implement the `user-creatable` interface.
const USER_CREATABLE: &[&str] = &["event-loop-base", "secret_common", "throttle-group"];

fn implements(name: &str, ancestor: &str) -> bool {
    let mut current = Some(name);
    while let Some(n) = current {
        if n == ancestor || (ancestor == "user-creatable" && USER_CREATABLE.contains(&n)) {
            return true;
        }
        current = TYPES
            .iter()
            .find(|(t, _, _)| *t == n)
            .and_then(|(_, p, _)| *p);
    }
    false
}

/// `qom-list-types`.
pub(crate) fn list_types(
    implements_type: Option<&str>,
    include_abstract: bool,
) -> Vec<ObjectTypeInfo> {
    TYPES
        .iter()
        .filter(|(_, _, a)| include_abstract || !a)
        .filter(|(n, _, _)| *n != "interface" || implements_type == Some("interface"))
        .filter(|(n, _, _)| implements_type.is_none_or(|i| implements(n, i)))
        .map(|(n, p, a)| ObjectTypeInfo {
            name: n.to_string(),
            r#abstract: a.then_some(true),
            parent: p.map(str::to_string),
        })
        .collect()
}

/// `qom-list-properties`.
pub(crate) fn list_properties(typename: &str) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
    if let Some(list) = crate::objects::type_properties(typename) {
        return Ok(props(list));
    }
    match typename {
        "chardev-socket" => Ok(props(&[
            ("type", "string"),
            ("connected", "bool"),
            ("addr", "SocketAddress"),
        ])),
        _ if TYPES.iter().any(|(n, _, _)| *n == typename) => Ok(props(&[("type", "string")])),
        _ => Err(QmpError::new(
            qmp_api::ErrorClass::DeviceNotFound,
            format!("Class '{typename}' not found"),
        )),
    }
}
