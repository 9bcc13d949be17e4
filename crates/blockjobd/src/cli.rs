//! qemu-storage-daemon's command line, for the options blockjobd supports.
//!
//! Options are `--name VALUE` or `--name=VALUE`; values use QEMU's keyval syntax (see
//! [`crate::keyval`]), `--blockdev` also takes JSON (`{...}`). Errors read like QSD's:
//! `--chardev socket,id=m: <what is wrong>`.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use monitor::Endpoint;
use monitor::json_stream::{JsonStream, Message};
use serde_json::{Map, Value};

use crate::keyval;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Run(Options),
    Help,
    Version,
}

/// A parsed, checked command line.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Options {
    /// The commands `--blockdev`, `--object`, `--export` and `--nbd-server` stand for, in
    /// command-line order (QSD runs them in that order: a throttle group before the node
    /// that uses it, the NBD server before its exports).
    pub startup: Vec<StartupCommand>,
    /// One QMP monitor per `--monitor`, on its chardev's endpoint, with the option text.
    pub monitors: Vec<(String, Endpoint)>,
    /// The chardev id of each of `monitors`, in the same order.
    pub monitor_chardevs: Vec<String>,
    pub pidfile: Option<PathBuf>,
    pub daemonize: bool,
}

/// A command an option stands for: `blockdev-add`, `object-add`, `block-export-add` or
/// `nbd-server-start`, its arguments, and the option text for messages.
#[derive(Debug, Clone, PartialEq)]
pub struct StartupCommand {
    pub option: String,
    pub command: &'static str,
    pub arguments: Map<String, Value>,
}

/// A command line error: the option it is about (as typed) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub option: Option<String>,
    pub message: String,
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.option {
            Some(option) => write!(f, "{option}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for CliError {}

fn plain(message: impl Into<String>) -> CliError {
    CliError {
        option: None,
        message: message.into(),
    }
}

pub const HELP: &str = "\
Usage: blockjobd [options]
Block-job daemon speaking QMP; accepts qemu-storage-daemon's command line.

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,<driver options>...]
  --blockdev '{\"driver\": ..., ...}'
                         add a block node at startup (blockdev-add)

  --chardev socket,id=<id>,path=<path>[,server=on][,wait=off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on][,wait=off]
  --chardev stdio,id=<id>
                         a character device for a monitor (sockets listen at once)

  --monitor [chardev=]<id>[,mode=control][,pretty=off]
                         a QMP monitor on a chardev (one client at a time)

  --object iothread,id=<id>[,poll-max-ns=<ns>]...
  --object secret,id=<id>,data=<text>|file=<path>[,format=raw|base64]
  --object throttle-group,id=<id>[,limits.bps-total=<n>]...
  --object '{\"qom-type\": ..., \"id\": ..., ...}'
                         create an object at startup (object-add)

  --export [type=]nbd,id=<id>,node-name=<node>[,name=<name>][,writable=on]...
  --export '{\"type\": \"nbd\", ...}'
                         export a node at startup (block-export-add; after --nbd-server)

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
  --nbd-server addr.type=unix,addr.path=<path>
                         start the NBD server (exports: block-export-add)

  --daemonize            run in the background once startup is complete
  --pidfile <path>       write the process ID to a file after startup

With no options, serves QMP on ./blockjobd.sock in the current directory.
";

/// The options that take a value.
const VALUED: &[&str] = &[
    "blockdev",
    "chardev",
    "export",
    "monitor",
    "nbd-server",
    "object",
    "pidfile",
];

/// A chardev defined on the command line.
#[derive(Debug, Clone)]
enum Chardev {
    Socket(Endpoint),
    Stdio,
}

/// Parse the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, CliError> {
    let mut options = Options::default();
    let mut chardevs: Vec<(String, Chardev)> = Vec::new();
    let mut used_chardevs: HashSet<String> = HashSet::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let (name, inline) = match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--daemonize" => {
                options.daemonize = true;
                continue;
            }
            a if a.starts_with("--") => match a[2..].split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (a[2..].to_string(), None),
            },
            _ => {
                return Err(CliError {
                    option: Some(arg.clone()),
                    message: "Unexpected argument".into(),
                });
            }
        };
        if !VALUED.contains(&name.as_str()) {
            return Err(plain(format!("unrecognized option '{arg}'")));
        }
        let value = match inline {
            Some(v) => v,
            None => match args.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => return Err(plain(format!("option '--{name}' requires an argument"))),
            },
        };
        let option = format!("--{name} {value}");
        let at = |message: String| CliError {
            option: Some(option.clone()),
            message,
        };
        match name.as_str() {
            "blockdev" | "object" | "export" => {
                let (command, implied) = match name.as_str() {
                    "blockdev" => ("blockdev-add", "driver"),
                    "object" => ("object-add", "qom-type"),
                    _ => ("block-export-add", "type"),
                };
                let arguments = json_or_keyval(&value, command, implied).map_err(at)?;
                options.startup.push(StartupCommand {
                    option: option.clone(),
                    command,
                    arguments,
                });
            }
            "chardev" => {
                let (id, chardev) = chardev(&value).map_err(at)?;
                if chardevs.iter().any(|(existing, _)| *existing == id) {
                    return Err(at(format!("chardev with id '{id}' already exists")));
                }
                chardevs.push((id, chardev));
            }
            "monitor" => {
                let id = monitor(&value).map_err(at)?;
                let Some((_, chardev)) = chardevs.iter().find(|(c, _)| *c == id) else {
                    return Err(at(format!("chardev \"{id}\" not found")));
                };
                if !used_chardevs.insert(id.clone()) {
                    return Err(at(format!("chardev \"{id}\" is already in use")));
                }
                let endpoint = match chardev {
                    Chardev::Socket(endpoint) => endpoint.clone(),
                    Chardev::Stdio => Endpoint::Stdio,
                };
                options.monitors.push((option.clone(), endpoint));
                options.monitor_chardevs.push(id.clone());
            }
            "nbd-server" => {
                let args = keyval::parse(&value, None).map_err(at)?;
                options.startup.push(StartupCommand {
                    option: option.clone(),
                    command: "nbd-server-start",
                    arguments: crate::nbd_server_start_arguments(&args),
                });
            }
            "pidfile" => options.pidfile = Some(PathBuf::from(value)),
            _ => return Err(plain(format!("unrecognized option '{arg}'"))),
        }
    }
    if options.daemonize && options.monitors.iter().any(|(_, e)| *e == Endpoint::Stdio) {
        return Err(plain("--daemonize cannot be used with a stdio monitor"));
    }
    Ok(Command::Run(options))
}

/// `--blockdev`, `--object`, `--export`: JSON when it starts with `{`, else keyval with
/// `implied` as the key of a first value without one, typed for `command`'s arguments.
fn json_or_keyval(value: &str, command: &str, implied: &str) -> Result<Map<String, Value>, String> {
    if value.trim_start().starts_with('{') {
        let mut stream = JsonStream::new();
        let mut out = Vec::new();
        stream.feed(value.as_bytes(), &mut out);
        // A trailing space ends a top-level number or keyword; objects end at '}'.
        stream.feed(b" ", &mut out);
        return match out.into_iter().next() {
            Some(Message::Value(Value::Object(map))) => Ok(map),
            Some(Message::Value(_)) => Err("JSON value must be an object".into()),
            Some(Message::Error(e)) => Err(e),
            None => Err("JSON parse error, premature end of input".into()),
        };
    }
    keyval::parse(value, Some(implied))
        .and_then(|map| crate::keyval_types::typed_arguments(command, map))
}

/// QEMU's spellings of a boolean option value.
fn boolean(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

fn string<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("Invalid parameter '{key}'")),
    }
}

/// `--chardev`: (id, chardev).
fn chardev(value: &str) -> Result<(String, Chardev), String> {
    let map = keyval::parse(value, Some("backend"))?;
    let backend = string(&map, "backend")?.unwrap_or_default().to_string();
    let allowed: &[&str] = match backend.as_str() {
        "socket" => &["backend", "id", "path", "host", "port", "server", "wait"],
        "stdio" => &["backend", "id"],
        "" => return Err("chardev: \"backend\" missing".into()),
        other => return Err(format!("'{other}' is not a valid char driver name")),
    };
    if let Some(bad) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("Invalid parameter '{bad}'"));
    }
    let Some(id) = string(&map, "id")? else {
        return Err("chardev: no id specified".into());
    };
    if backend == "stdio" {
        return Ok((id.to_string(), Chardev::Stdio));
    }
    if let Some(server) = string(&map, "server")?
        && !boolean("server", server)?
    {
        return Err("only server=on sockets are supported (blockjobd does not connect out)".into());
    }
    // wait=on would make QEMU block at startup until a client connects; the socket listens
    // either way, so it is accepted and ignored.
    if let Some(wait) = string(&map, "wait")? {
        boolean("wait", wait)?;
    }
    let endpoint = match (
        string(&map, "path")?,
        string(&map, "host")?,
        string(&map, "port")?,
    ) {
        (Some(path), None, None) => Endpoint::Unix(PathBuf::from(path)),
        (None, host, Some(port)) => {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("Parameter 'port' expects a port number, got '{port}'"))?;
            Endpoint::Tcp {
                host: host.unwrap_or("0.0.0.0").to_string(),
                port,
            }
        }
        (None, Some(_), None) => return Err("chardev: socket: 'port' is missing".into()),
        (Some(_), _, _) => {
            return Err("chardev: socket: 'path' cannot be combined with 'host'/'port'".into());
        }
        (None, None, None) => {
            return Err("chardev: socket: 'path', or 'host' and 'port', required".into());
        }
    };
    Ok((id.to_string(), Chardev::Socket(endpoint)))
}

/// `--monitor`: the chardev id.
fn monitor(value: &str) -> Result<String, String> {
    let map = keyval::parse(value, Some("chardev"))?;
    if let Some(bad) = map
        .keys()
        .find(|k| !["chardev", "mode", "pretty"].contains(&k.as_str()))
    {
        return Err(format!("Invalid parameter '{bad}'"));
    }
    if let Some(mode) = string(&map, "mode")?
        && mode != "control"
    {
        return Err(format!(
            "Parameter 'mode' does not accept value '{mode}' (only 'control' is supported)"
        ));
    }
    if let Some(pretty) = string(&map, "pretty")?
        && boolean("pretty", pretty)?
    {
        return Err("pretty=on is not supported".into());
    }
    match string(&map, "chardev")? {
        Some(id) => Ok(id.to_string()),
        None => Err("Parameter 'chardev' is missing".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(line: &[&str]) -> Vec<String> {
        line.iter().map(|s| s.to_string()).collect()
    }

    fn run(line: &[&str]) -> Options {
        match parse(&args(line)) {
            Ok(Command::Run(o)) => o,
            other => panic!("{other:?}"),
        }
    }

    fn error(line: &[&str]) -> String {
        parse(&args(line)).unwrap_err().to_string()
    }

    #[test]
    fn the_oracle_command_line_gives_one_unix_monitor() {
        let o = run(&[
            "--chardev",
            "socket,id=m,path=/tmp/q.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ]);
        assert_eq!(o.monitors.len(), 1);
        assert_eq!(o.monitors[0].1, Endpoint::Unix("/tmp/q.sock".into()));
    }

    #[test]
    fn monitor_takes_its_chardev_as_the_implied_key() {
        let o = run(&["--chardev=stdio,id=s", "--monitor=s"]);
        assert_eq!(o.monitors[0].1, Endpoint::Stdio);
    }

    #[test]
    fn tcp_chardevs_take_host_and_port() {
        let o = run(&[
            "--chardev",
            "socket,id=t,host=127.0.0.1,port=4444,server=on,wait=off",
            "--monitor",
            "t",
        ]);
        assert_eq!(
            o.monitors[0].1,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
    }

    #[test]
    fn blockdev_accepts_keyval_and_json() {
        let o = run(&[
            "--blockdev",
            "qcow2,node-name=a,file.driver=file,file.filename=x.qcow2",
            "--blockdev",
            r#"{"driver": "raw", "node-name": "b", "file": {"driver": "file", "filename": "y"}}"#,
        ]);
        assert_eq!(
            Value::Object(o.startup[0].arguments.clone()),
            json!({"driver": "qcow2", "node-name": "a",
                   "file": {"driver": "file", "filename": "x.qcow2"}})
        );
        assert_eq!(o.startup[1].arguments["file"]["filename"], "y");
    }

    #[test]
    fn object_and_export_take_keyval_and_json_in_command_line_order() {
        let o = run(&[
            "--object",
            "throttle-group,id=tg0,limits.bps-total=1048576",
            "--blockdev",
            "throttle,node-name=t,throttle-group=tg0,file.driver=null-co",
            "--object",
            r#"{"qom-type": "iothread", "id": "io0", "poll-max-ns": 0}"#,
            "--export",
            "nbd,id=e,node-name=t,writable=on",
            "--export",
            r#"{"type": "nbd", "id": "f", "node-name": "t"}"#,
        ]);
        let commands: Vec<&str> = o.startup.iter().map(|c| c.command).collect();
        assert_eq!(
            commands,
            [
                "object-add",
                "blockdev-add",
                "object-add",
                "block-export-add",
                "block-export-add"
            ]
        );
        assert_eq!(
            Value::Object(o.startup[0].arguments.clone()),
            json!({"qom-type": "throttle-group", "id": "tg0",
                   "limits": {"bps-total": 1048576}})
        );
        assert_eq!(o.startup[2].arguments["poll-max-ns"], 0);
        assert_eq!(
            Value::Object(o.startup[3].arguments.clone()),
            json!({"type": "nbd", "id": "e", "node-name": "t", "writable": true})
        );
        assert_eq!(
            error(&["--object", "iothread,id=io0,poll-max-ns=x"]),
            "--object iothread,id=io0,poll-max-ns=x: Parameter 'poll-max-ns' expects integer"
        );
    }

    #[test]
    fn nbd_server_pidfile_and_daemonize_are_kept() {
        let o = run(&[
            "--nbd-server",
            "addr.type=unix,addr.path=/tmp/nbd.sock",
            "--pidfile",
            "/tmp/pid",
            "--daemonize",
        ]);
        assert_eq!(o.startup[0].command, "nbd-server-start");
        assert_eq!(
            Value::Object(o.startup[0].arguments.clone()),
            json!({"addr": {"type": "unix", "data": {"path": "/tmp/nbd.sock"}}})
        );
        assert_eq!(o.pidfile, Some(PathBuf::from("/tmp/pid")));
        assert!(o.daemonize);
    }

    #[test]
    fn errors_read_like_qemu_storage_daemons() {
        assert_eq!(error(&["--foo"]), "unrecognized option '--foo'");
        assert_eq!(
            error(&["--blockdev"]),
            "option '--blockdev' requires an argument"
        );
        assert_eq!(error(&["extra"]), "extra: Unexpected argument");
        assert_eq!(
            error(&["--monitor", "chardev=nope"]),
            "--monitor chardev=nope: chardev \"nope\" not found"
        );
        assert_eq!(
            error(&["--chardev", "stdio"]),
            "--chardev stdio: chardev: no id specified"
        );
        assert_eq!(
            error(&["--chardev", "nope,id=m"]),
            "--chardev nope,id=m: 'nope' is not a valid char driver name"
        );
        assert_eq!(
            error(&["--chardev", "socket,id=m,path=/tmp/z,bogus=1"]),
            "--chardev socket,id=m,path=/tmp/z,bogus=1: Invalid parameter 'bogus'"
        );
        assert_eq!(
            error(&["--blockdev", "{bad"]),
            "--blockdev {bad: JSON parse error, invalid keyword 'bad'"
        );
    }

    #[test]
    fn help_and_version_win() {
        assert_eq!(parse(&args(&["--help"])), Ok(Command::Help));
        assert_eq!(parse(&args(&["-V"])), Ok(Command::Version));
    }
}
