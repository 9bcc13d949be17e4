//! The interactive shell: history, and tab completion of command and argument names
//! from the server's schema (rustyline), as qmp-shell offers Python users.

use crate::schema::Schema;
use rustyline::completion::{Completer, Pair};
use rustyline::{Context, Helper, Highlighter, Hinter, Validator};

/// Completes command names, then `argument=` names of the command on the line.
#[derive(Helper, Hinter, Highlighter, Validator)]
pub struct Completion {
    commands: Vec<String>,
    arguments: std::collections::HashMap<String, Vec<String>>,
}

impl Completion {
    pub fn new(schema: &Schema) -> Completion {
        let commands = schema.commands().to_vec();
        let arguments = commands
            .iter()
            .map(|c| {
                let names = schema.arguments(c).into_iter().map(|m| m.name).collect();
                (c.clone(), names)
            })
            .collect();
        Completion {
            commands,
            arguments,
        }
    }

    /// Where the word being completed starts, and its candidates.
    pub fn candidates(&self, line: &str, pos: usize) -> (usize, Vec<String>) {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let word = &before[start..];
        let first = before.split_whitespace().next().unwrap_or("");
        let candidates = if start == 0 {
            self.commands
                .iter()
                .filter(|c| c.starts_with(word))
                .cloned()
                .collect()
        } else if word.contains('=') {
            Vec::new()
        } else {
            let given: Vec<&str> = before[..start]
                .split_whitespace()
                .skip(1)
                .filter_map(|w| w.split_once('=').map(|(k, _)| k))
                .collect();
            self.arguments
                .get(first)
                .into_iter()
                .flatten()
                .filter(|a| a.starts_with(word) && !given.contains(&a.as_str()))
                .map(|a| format!("{a}="))
                .collect()
        };
        (start, candidates)
    }
}

impl Completer for Completion {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, candidates) = self.candidates(line, pos);
        Ok((
            start,
            candidates
                .into_iter()
                .map(|c| Pair {
                    display: c.clone(),
                    replacement: c,
                })
                .collect(),
        ))
    }
}

/// Where the shell keeps its history: `$HOME/.blockjobctl_history`.
pub fn history_file() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".blockjobctl_history"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn completion() -> Completion {
        let value: Value = serde_json::from_str(qmp_api::QMP_SCHEMA_JSON).expect("JSON");
        Completion::new(&Schema::from_introspection(&value).expect("schema"))
    }

    #[test]
    fn command_names_complete_from_the_schema() {
        let (start, got) = completion().candidates("block-job-s", 11);
        assert_eq!(start, 0);
        assert_eq!(got, ["block-job-set-speed"]);
    }

    #[test]
    fn argument_names_complete_for_the_command_on_the_line() {
        let line = "block-job-set-speed device=j0 ";
        let (start, got) = completion().candidates(line, line.len());
        assert_eq!(start, line.len());
        assert_eq!(got, ["speed="]);
        let line = "blockdev-backup s";
        assert_eq!(
            completion().candidates(line, line.len()).1,
            ["sync=", "speed="]
        );
    }
}
