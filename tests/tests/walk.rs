//! The walk: every optional member of every command blockjobd serves, read from its own
//! `query-qmp-schema` (so commands added later are walked without touching this file), is
//! sent beside qemu-storage-daemon 10.0.2 in the same fresh set-up. Each member must either act
//! as in QSD (same success, same nodes, jobs and objects afterwards) or be refused with an
//! error naming it; accepting what QSD refuses, or refusing silently, fails.
//!
//! Base arguments come from `cases`/`fixture` where a command needs a particular set-up (a job
//! to act on, a node with a bitmap, images with a backing chain...); otherwise the required
//! members are filled from their types (names of the set-up's nodes for strings). A command
//! whose members sit inside another (`blockdev-create`'s `options`, per driver;
//! `blockdev-reopen`'s list, per driver) is walked there; a command with a set-up of its own is
//! also probed with its base arguments alone (`change-backing-file`,
//! `block-set-write-threshold` and `x-debug-query-block-graph` have no optional member). A
//! job that ends refusing a member by name (`blockdev-create`) counts as refusing it; the
//! images a command creates or changes are compared with `qemu-img info`. Set
//! `WALK_ONLY=command` to walk one command.
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

/// One set-up a command is walked in: commands run first (`!qcow2 FILE [BACKING]` creates an
/// image with qemu-img, `!file FILE` an empty file), the base arguments, and where the
/// optional members walked live: at the top, or at a JSON pointer into the arguments
/// (`/options/0`).
struct Case {
    pre: Vec<(&'static str, Value)>,
    base: Value,
    inner: Option<&'static str>,
}

/// Set-ups for commands whose optional members sit inside a member (`blockdev-create`'s
/// `options`, `blockdev-reopen`'s list), or that need images to act on: each case is also
/// probed with its base arguments alone.
fn cases(command: &str) -> Option<Vec<Case>> {
    let case = |pre: Vec<(&'static str, Value)>, base: Value, inner| Case { pre, base, inner };
    let qcow2_node = |name: &str, file: &str| {
        json!({"driver": "qcow2", "node-name": name,
               "file": {"driver": "file", "node-name": format!("{name}-file"),
                        "filename": format!("$DIR/{file}")}})
    };
    Some(match command {
        "blockdev-create" => vec![
            case(
                vec![],
                json!({"job-id": "c0", "options": {"driver": "file",
                       "filename": "$DIR/c.img", "size": 1048576}}),
                Some("/options"),
            ),
            case(
                vec![
                    ("!file $DIR/c.qcow2", json!(null)),
                    (
                        "blockdev-add",
                        json!({"driver": "file", "node-name": "cf",
                                            "filename": "$DIR/c.qcow2"}),
                    ),
                ],
                json!({"job-id": "c0", "options": {"driver": "qcow2", "file": "cf",
                       "size": 1048576}}),
                Some("/options"),
            ),
        ],
        "blockdev-reopen" => vec![
            case(
                vec![],
                json!({"options": [{"driver": "null-co", "node-name": "n0", "size": 4194304}]}),
                Some("/options/0"),
            ),
            case(
                vec![
                    ("!qcow2 $DIR/r.qcow2", json!(null)),
                    ("blockdev-add", qcow2_node("q", "r.qcow2")),
                ],
                json!({"options": [{"driver": "qcow2", "node-name": "q", "file": "q-file"}]}),
                Some("/options/0"),
            ),
        ],
        "change-backing-file" => vec![case(
            vec![
                ("!qcow2 $DIR/base.qcow2", json!(null)),
                ("!qcow2 $DIR/top.qcow2 $DIR/base.qcow2", json!(null)),
                ("blockdev-add", qcow2_node("t", "top.qcow2")),
            ],
            json!({"device": "t", "image-node-name": "t", "backing-file": "other.qcow2"}),
            None,
        )],
        "block-set-write-threshold" => vec![case(
            vec![],
            json!({"node-name": "n0", "write-threshold": 1048576}),
            None,
        )],
        "x-debug-query-block-graph" => vec![case(
            vec![
                ("!qcow2 $DIR/base.qcow2", json!(null)),
                ("!qcow2 $DIR/top.qcow2 $DIR/base.qcow2", json!(null)),
                ("blockdev-add", qcow2_node("t", "top.qcow2")),
            ],
            json!({}),
            None,
        )],
        _ => {
            let (pre, base) = fixture(command)?;
            vec![case(pre, base, None)]
        }
    })
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
const KNOWN: &[(&str, &str)] = &[];

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

    /// The type of what JSON pointer `pointer` reaches in a value of type `ty` (members by
    /// name, list elements by index).
    fn type_at(&self, ty: &str, pointer: &str) -> String {
        let mut ty = ty.to_string();
        for segment in pointer.split('/').skip(1) {
            let Some(e) = self.entity(&ty) else { break };
            ty = if e["meta-type"] == "array" {
                e["element-type"].as_str().unwrap_or_default().to_string()
            } else {
                e["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| m["name"] == segment)
                    .and_then(|m| m["type"].as_str())
                    .unwrap_or_default()
                    .to_string()
            };
        }
        ty
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
    // Jobs are left out (how far a job got when the snapshot is taken is timing), except
    // how those that ended did (`blockdev-create`'s error).
    let ended: Vec<Value> = qmp
        .execute("query-jobs", json!({}))
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|j| j["status"] == "concluded")
        .map(|j| json!({"id": j["id"], "type": j["type"], "error": j.get("error")}))
        .collect();
    json!({"nodes": nodes, "objects": objects, "ended": ended})
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
        if let Some(shell) = c.strip_prefix('!') {
            prepare(&shell.replace("$DIR", &dir.path().display().to_string()));
            continue;
        }
        let _ = qmp.execute(c, in_dir(a, dir.path()));
    }
    let reply = qmp.execute(command, args.clone()).map_err(|e| {
        let dir = dir.path().display().to_string();
        e["desc"].as_str().unwrap_or_default().replace(&dir, "$DIR")
    });
    let reply = reply.map(|_| Value::Null);
    let mut state = snapshot(&mut qmp);
    let _ = qmp.execute("quit", json!({}));
    drop(daemon);
    state["images"] = created_images(dir.path());
    Outcome { reply, state }
}

impl Outcome {
    /// Whether a job that ended failed naming `member`.
    fn job_error_names(&self, member: &str) -> bool {
        self.state["ended"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|j| j["error"].as_str().is_some_and(|e| e.contains(member)))
    }
}

/// `!qcow2 FILE [BACKING]` (qemu-img create, 1 MiB) or `!file FILE` (empty).
fn prepare(step: &str) {
    let words: Vec<&str> = step.split_whitespace().collect();
    match words.as_slice() {
        ["qcow2", file, rest @ ..] => {
            let mut cmd = std::process::Command::new("qemu-img");
            cmd.args(["create", "-q", "-f", "qcow2"]);
            if let [backing] = rest {
                cmd.args(["-b", backing, "-F", "qcow2"]);
            }
            let ok = cmd.args([file, "1M"]).status().is_ok_and(|s| s.success());
            assert!(
                ok,
                "qemu-img create {file} failed (apt-get install qemu-utils)"
            );
        }
        ["file", file] => {
            std::fs::File::create(file).expect("create file");
        }
        _ => panic!("unknown set-up step {step}"),
    }
}

/// What `qemu-img info` says of the images a command created (`c.*`) or changed
/// (`top.qcow2`'s backing file name): format, sizes and format-specific data.
fn created_images(dir: &Path) -> Value {
    let mut out = Map::new();
    for name in ["c.img", "c.qcow2", "top.qcow2"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&path)
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .unwrap_or(Value::Null);
        let keep = [
            "format",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "backing-filename-format",
            "format-specific",
        ];
        let kept: Map<String, Value> = keep
            .iter()
            .filter_map(|k| Some((k.to_string(), info.get(*k)?.clone())))
            .collect();
        out.insert(name.to_string(), Value::Object(kept));
    }
    let text = Value::Object(out)
        .to_string()
        .replace(&dir.display().to_string(), "$DIR");
    serde_json::from_str(&text).unwrap_or(Value::Null)
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
        let (own_cases, walk_cases) = match cases(command) {
            Some(c) => (true, c),
            None => (
                false,
                vec![Case {
                    pre: vec![],
                    base: schema.sample(&arg_type, 0),
                    inner: None,
                }],
            ),
        };
        for case in &walk_cases {
            let pointer = case.inner.unwrap_or("");
            // Introspection hides type names: the inner object's type is found by its path.
            let ty = schema.type_at(&arg_type, pointer);
            let ty = ty.as_str();
            let inner = case.base.pointer(pointer).cloned().unwrap_or(json!({}));
            // A case of its own is also probed with its base arguments alone.
            let mut probes: Vec<(String, Option<Value>)> = Vec::new();
            if own_cases {
                probes.push(("(base)".to_string(), None));
            }
            for (member, ty) in schema.optional_members(ty, &inner) {
                for value in schema.tries(&ty) {
                    probes.push((member.clone(), Some(value)));
                }
            }
            let pre = &case.pre;
            for (member, value) in probes {
                let mut args = case.base.clone();
                if let (Some(value), Some(Value::Object(map))) = (&value, args.pointer_mut(pointer))
                {
                    map.insert(member.clone(), value.clone());
                }
                let value = value.unwrap_or(Value::Null);
                walked += 1;
                let (a, b) = std::thread::scope(|s| {
                    let a = s.spawn(|| probe(&ours, pre, command, &args));
                    let b = s.spawn(|| probe(qsd, pre, command, &args));
                    (a.join().expect("ours"), b.join().expect("qsd"))
                });
                let verdict = match (&a.reply, &b.reply) {
                    (Ok(_), Ok(_)) if a.state == b.state => None,
                    // A job (blockdev-create's) that ended refusing the member by name.
                    (Ok(_), Ok(_)) if a.job_error_names(&member) => None,
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
                let driver = match (case.inner, inner.get("driver")) {
                    (Some(_), Some(d)) => format!("[{d}] "),
                    _ => String::new(),
                };
                let key = format!("{command} {driver}{member}={value}");
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
