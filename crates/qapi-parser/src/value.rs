//! The JSON-like values of the QAPI language, each with its location.

use crate::Location;

/// A value as written: strings, booleans, lists and dictionaries (QAPI has
/// no numbers and no null).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Bool(bool),
    List(Vec<Node>),
    Dict(Dict),
}

/// A value and where it starts (its first character).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub location: Location,
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match &self.value {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_list(&self) -> Option<&[Node]> {
        match &self.value {
            Value::List(l) => Some(l),
            _ => None,
        }
    }
    pub fn as_dict(&self) -> Option<&Dict> {
        match &self.value {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }
}

/// A dictionary key: the string and where its opening quote is.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub location: Location,
}

/// A dictionary, keys unique, in source order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dict {
    pub entries: Vec<(Key, Node)>,
}

impl Dict {
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| v)
    }
    pub fn key(&self, key: &str) -> Option<&Key> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(k, _)| k)
    }
    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.entries.iter().map(|(k, _)| k)
    }
}
