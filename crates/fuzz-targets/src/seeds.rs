//! Where each target's corpus starts: real inputs. Committed seeds live in
//! `fuzz/corpus/TARGET/`; these are added at run time from files this repository does not
//! copy (QEMU's schema, shipped by the `qapi-qmp` crate) or derives (the QMP requests of the
//! oracle transcripts, ours in `tests/oracle/expected/` and the shared ones beside the
//! repository).

use std::path::Path;

/// A seed: a file name and its bytes.
pub type Seed = (String, Vec<u8>);

/// Run-time seeds of `target`; `root` is the repository's root, `qemu_schema_dir` the
/// directory of QEMU's schema modules when known.
pub fn generated(target: &str, root: &Path, qemu_schema_dir: Option<&Path>) -> Vec<Seed> {
    match target {
        "qapi_schema" => {
            let mut out = files_in(&root.join("qapi-schema"), "json", "ours-");
            out.extend(files_in(
                &root.join("crates/qapi-model/tests/errors"),
                "json",
                "case-",
            ));
            if let Some(dir) = qemu_schema_dir {
                out.extend(files_in(dir, "json", "qemu-"));
            }
            out
        }
        "qmp_input" => {
            let mut out = Vec::new();
            for dir in [
                root.join("tests/oracle/expected"),
                root.join("../shared/oracle/expected"),
                root.join("../../shared/oracle/expected"),
            ] {
                for (name, bytes) in files_in(&dir, "json", "oracle-") {
                    out.extend(qmp_requests(&name, &bytes));
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

/// The files of `dir` ending in `.ext`, named `prefix` + file name; none if `dir` is missing.
fn files_in(dir: &Path, ext: &str, prefix: &str) -> Vec<Seed> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Seed> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == ext))
        .filter_map(|e| {
            let bytes = std::fs::read(e.path()).ok()?;
            Some((
                format!("{prefix}{}", e.file_name().to_string_lossy()),
                bytes,
            ))
        })
        .collect();
    out.sort();
    out
}

/// A transcript's client side as one QMP input of the `qmp_input` target: the chunk-size
/// byte, the greeting's answer, then every request as the oracle sent it. Also the transcript
/// itself (a large, deeply nested JSON document).
fn qmp_requests(name: &str, transcript: &[u8]) -> Vec<Seed> {
    let mut out = vec![(name.to_string(), [&[63u8][..], transcript].concat())];
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(transcript) else {
        return out;
    };
    let mut stream = vec![7u8];
    stream.extend_from_slice(b"{\"execute\": \"qmp_capabilities\"}\r\n");
    let entries = doc.get("entries").and_then(|e| e.as_array());
    for entry in entries.into_iter().flatten() {
        let Some(command) = entry.get("execute") else {
            continue;
        };
        let mut request = serde_json::Map::new();
        request.insert("execute".into(), command.clone());
        if let Some(arguments) = entry.get("arguments") {
            request.insert("arguments".into(), arguments.clone());
        }
        stream.extend_from_slice(serde_json::Value::Object(request).to_string().as_bytes());
        stream.extend_from_slice(b"\r\n");
    }
    out.push((format!("requests-{name}"), stream));
    out
}
