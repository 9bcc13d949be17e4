//! The walk: every optional member of every command blockjobd serves, read from its own
//! `query-qmp-schema` (so commands added later are walked without touching this file), is
//! sent beside qemu-storage-daemon 10.0.2 in the same fresh set-up. Each member must either act
//! as in QSD (same success, same nodes, jobs and objects afterwards) or be refused with an
//! error naming it; accepting what QSD refuses, or refusing silently, fails.
//!
//! Base arguments come from `fixture` where a command needs a particular set-up (a job to act
//! on, a node with a bitmap...); otherwise the required members are filled from their types
//! (names of the set-up's nodes for strings). Set `WALK_ONLY=command` to walk one command.
//!
//! What "acts as in QSD" can see: the reply (success, or the error's text) and the nodes and
//! objects afterwards. A member both daemons accept without a visible trace (a job's `speed`)
//! passes on the reply alone; the members' own tests judge their effect.

use std::collections::BTreeMap;
use std::path::Path;

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp};
use serde_json::{Map, Value, json};

/// The set-up both daemons start with (after their monitor).
fn setup_options(dir: &Path) -> Vec<String> {
    let nbd = dir.join("nbd.sock");
    [
        "--blockdev".to_string(),
        "driver=null-co,node-name=n0,size=4194304".to_string(),
        "--blockdev".to_string(),
        "driver=null-co,node-name=n1,size=4194304".to_string(),
        "--object".to_string(),
        "iothread,id=io0".to_string(),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", nbd.display()),
    ]
    .to_vec()
}

/// Commands needing more than the set-up: commands run first, then the base arguments.
fn fixture(command: &str) -> Option<(Vec<(&'static str, Value)>, Value)> {
    let slow_backup = json!({"job-id": "j0", "device": "n0", "target": "n1", "sync": "full",
                             "speed": 1, "auto-finalize": false, "auto-dismiss": false});
    // Paused, so that the snapshot's wait for jobs to settle does not wait for it.
    let job = || {
        vec![
            ("blockdev-backup", slow_backup.clone()),
            ("job-pause", json!({"id": "j0"})),
        ]
    };
    Some(match command {
        "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable" => (
            vec![(
                "block-dirty-bitmap-add",
                json!({"node": "n0", "name": "b0"}),
            )],
            json!({"node": "n0", "name": "b0"}),
        ),
        "block-dirty-bitmap-merge" => (
            vec![
                (
                    "block-dirty-bitmap-add",
                    json!({"node": "n0", "name": "b0"}),
                ),
                (
                    "block-dirty-bitmap-add",
                    json!({"node": "n0", "name": "b1"}),
                ),
            ],
            json!({"node": "n0", "target": "b0", "bitmaps": ["b1"]}),
        ),
        "block-job-set-speed" => (job(), json!({"device": "j0", "speed": 2})),
        "block-job-cancel" | "block-job-pause" => (job(), json!({"device": "j0"})),
        "job-cancel" | "job-pause" => (job(), json!({"id": "j0"})),
        "blockdev-backup" => (
            vec![],
            json!({"device": "n0", "target": "n1", "sync": "full"}),
        ),
        "drive-backup" => (
            vec![],
            json!({"device": "n0", "target": "$DIR/t.qcow2", "format": "qcow2", "sync": "full"}),
        ),
        "drive-mirror" => (
            vec![],
            json!({"device": "n0", "target": "$DIR/m.qcow2", "format": "qcow2", "sync": "full"}),
        ),
        "blockdev-mirror" => (
            vec![],
            json!({"device": "n0", "target": "n1", "sync": "full"}),
        ),
        "block-export-add" => (
            vec![],
            json!({"type": "nbd", "id": "e0", "node-name": "n0"}),
        ),
        "nbd-server-add" => (vec![], json!({"device": "n0"})),
        "blockdev-add" => (vec![], json!({"driver": "null-co", "node-name": "x"})),
        "object-add" => (vec![], json!({"qom-type": "iothread", "id": "o1"})),
        "qom-list-types" => (vec![], json!({})),
        _ => return None,
    })
}

/// Differences the walk found that other work owns, each with its reason: the walk fails on
/// any other one, and on one of these that no longer happens (so the list only shrinks).
const KNOWN: &[(&str, &str)] = &[
    (
        "blockdev-add cache={}",
        "generic node options lack QEMU's per-driver checks (issue 10's act-or-refuse)",
    ),
    (
        "blockdev-add force-share=true",
        "force-share without read-only is not refused (issue 10)",
    ),
    (
        "blockdev-add detect-zeroes=\"unmap\"",
        "detect-zeroes=unmap without discard=unmap is not refused (issue 10)",
    ),
    (
        "drive-mirror job-id=\"n1\"",
        "drive-mirror's target node gets a visible name where QSD's is anonymous",
    ),
    (
        "drive-backup format=\"n1\"",
        "an unknown format: QEMU says 'Unknown file format'",
    ),
    (
        "drive-mirror format=\"n1\"",
        "an unknown format: QEMU says 'Unknown file format'",
    ),
    (
        "blockdev-snapshot-sync device=\"n1\"",
        "device= is looked up as a node; QEMU looks for a device (a named backend) only",
    ),
];

/// Commands not walked: they end the session or need a client of their own.
const NOT_WALKED: &[&str] = &["quit", "qmp_capabilities"];

struct Schema(BTreeMap<String, Value>);

impl Schema {
    fn entity(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// A value of type `ty` (required members filled, recursively).
    fn sample(&self, ty: &str, depth: usize) -> Value {
        let Some(e) = self.entity(ty) else {
            return json!("n1");
        };
        match e["meta-type"].as_str().unwrap_or_default() {
            "builtin" => match e["json-type"].as_str().unwrap_or_default() {
                "string" => json!("n1"),
                "int" | "number" => json!(512),
                "boolean" => json!(true),
                "null" => Value::Null,
                _ => json!({}),
            },
            "enum" => e["values"][0].clone(),
            "array" => {
                json!([self.sample(e["element-type"].as_str().unwrap_or_default(), depth + 1)])
            }
            "alternate" => self.sample(e["members"][0]["type"].as_str().unwrap_or_default(), depth),
            "object" if depth < 4 => {
                let mut map = Map::new();
                for m in e["members"].as_array().into_iter().flatten() {
                    if m.get("default").is_none() {
                        let name = m["name"].as_str().unwrap_or_default().to_string();
                        map.insert(
                            name,
                            self.sample(m["type"].as_str().unwrap_or_default(), depth + 1),
                        );
                    }
                }
                Value::Object(map)
            }
            _ => json!({}),
        }
    }

    /// Values to try for an optional member of type `ty`: every enum value, both booleans,
    /// a sample otherwise.
    fn tries(&self, ty: &str) -> Vec<Value> {
        match self.entity(ty) {
            Some(e) if e["meta-type"] == "enum" => {
                e["values"].as_array().cloned().unwrap_or_default()
            }
            Some(e) if e["json-type"] == "boolean" => vec![json!(true), json!(false)],
            _ => vec![self.sample(ty, 1)],
        }
    }

    /// The optional members of an argument type, top level and of the union branch `base`
    /// selects: (name, type).
    fn optional_members(&self, ty: &str, base: &Value) -> Vec<(String, String)> {
        let Some(e) = self.entity(ty) else {
            return Vec::new();
        };
        let mut out: Vec<(String, String)> = e["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m.get("default").is_some())
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["type"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        if let Some(tag) = e["tag"].as_str()
            && let Some(branch) = e["variants"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| base.get(tag).is_some_and(|t| *t == v["case"]))
        {
            out.extend(
                self.optional_members(branch["type"].as_str().unwrap_or_default(), &json!({})),
            );
        }
        out
    }
}

/// What one daemon did with one probe: the reply and what it left behind.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    reply: Result<Value, String>,
    state: Value,
}

/// Waits (at most 5 s) until no job is on its way to a resting state (ready, paused,
/// concluded), so that the nodes a job adds or drops when it ends are compared at the same
/// point in both daemons.
fn settle(qmp: &mut Qmp) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let busy = qmp
            .execute("query-jobs", json!({}))
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .any(|j| {
                ["created", "running", "waiting", "pending", "aborting"]
                    .contains(&j["status"].as_str().unwrap_or_default())
            });
        if !busy {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn snapshot(qmp: &mut Qmp) -> Value {
    settle(qmp);
    let mut nodes: Vec<Value> = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !n["node-name"].as_str().unwrap_or("#").starts_with('#'))
        .map(|n| json!({"node-name": n["node-name"], "drv": n["drv"], "ro": n["ro"]}))
        .collect();
    nodes.sort_by_key(|n| n["node-name"].to_string());
    let mut objects: Vec<Value> = qmp
        .execute("qom-list", json!({"path": "/objects"}))
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    objects.sort_by_key(|o| o["name"].to_string());
    // Jobs are left out: how far a job got when the snapshot is taken is timing.
    json!({"nodes": nodes, "objects": objects})
}

/// `value` with `$DIR` in its strings replaced by `dir`.
fn in_dir(value: &Value, dir: &Path) -> Value {
    match value {
        Value::String(s) => Value::String(s.replace("$DIR", &dir.display().to_string())),
        Value::Array(a) => Value::Array(a.iter().map(|v| in_dir(v, dir)).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), in_dir(v, dir))).collect())
        }
        other => other.clone(),
    }
}

fn probe(program: &Path, pre: &[(&str, Value)], command: &str, args: &Value) -> Outcome {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = &in_dir(args, dir.path());
    let daemon = Daemon::spawn_with(program, dir.path(), &setup_options(dir.path()));
    let mut qmp = daemon.connect();
    for (c, a) in pre {
        let _ = qmp.execute(c, in_dir(a, dir.path()));
    }
    let reply = qmp.execute(command, args.clone()).map_err(|e| {
        let dir = dir.path().display().to_string();
        e["desc"].as_str().unwrap_or_default().replace(&dir, "$DIR")
    });
    let reply = reply.map(|_| Value::Null);
    let state = snapshot(&mut qmp);
    let _ = qmp.execute("quit", json!({}));
    Outcome { reply, state }
}

#[test]
fn every_optional_member_acts_as_in_qemu_storage_daemon_or_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(&blockjobd(), dir.path());
    let mut qmp = daemon.connect();
    let schema_list = qmp.execute("query-qmp-schema", json!({})).expect("schema");
    let commands: Vec<String> = qmp
        .execute("query-commands", json!({}))
        .expect("commands")
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    let _ = qmp.execute("quit", json!({}));
    let schema = Schema(
        schema_list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?.to_string(), e.clone())))
            .collect(),
    );
    let only = std::env::var("WALK_ONLY").ok();
    let qsd = Path::new("qemu-storage-daemon");
    let ours = blockjobd();
    let mut failures = Vec::new();
    let mut walked = 0;
    for command in &commands {
        if NOT_WALKED.contains(&command.as_str()) || only.as_ref().is_some_and(|o| o != command) {
            continue;
        }
        let Some(entity) = schema.entity(command) else {
            continue;
        };
        let arg_type = entity["arg-type"].as_str().unwrap_or_default().to_string();
        let (pre, base) = fixture(command).unwrap_or_else(|| (vec![], schema.sample(&arg_type, 0)));
        for (member, ty) in schema.optional_members(&arg_type, &base) {
            for value in schema.tries(&ty) {
                let mut args = base.clone();
                if let Value::Object(map) = &mut args {
                    map.insert(member.clone(), value.clone());
                }
                walked += 1;
                let (a, b) = std::thread::scope(|s| {
                    let a = s.spawn(|| probe(&ours, &pre, command, &args));
                    let b = s.spawn(|| probe(qsd, &pre, command, &args));
                    (a.join().expect("ours"), b.join().expect("qsd"))
                });
                let verdict = match (&a.reply, &b.reply) {
                    (Ok(_), Ok(_)) if a.state == b.state => None,
                    (Ok(_), Ok(_)) => Some(format!(
                        "acts differently: ours {} QSD {}",
                        a.state, b.state
                    )),
                    (Err(e), Ok(_)) if e.contains(&member) => None,
                    (Err(e), Ok(_)) => Some(format!("refused without naming it: {e}")),
                    (Ok(_), Err(e)) => Some(format!("accepted, QSD refuses: {e}")),
                    (Err(x), Err(y)) if x == y || x.contains(&member) => None,
                    (Err(x), Err(y)) => Some(format!("errors differ: ours '{x}', QSD '{y}'")),
                };
                let key = format!("{command} {member}={value}");
                match (verdict, KNOWN.iter().any(|(k, _)| *k == key)) {
                    (Some(v), false) => failures.push(format!("{key}: {v}")),
                    (None, true) => failures.push(format!("{key}: fixed, drop it from KNOWN")),
                    _ => {}
                }
            }
        }
    }
    println!(
        "walked {walked} optional members ({} known differences)",
        KNOWN.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {walked}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
