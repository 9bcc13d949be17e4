//! blockjobctl: a command-line QMP client for blockjobd (and any QEMU or
//! qemu-storage-daemon), built on `qmp-client`.
//!
//! ```text
//! blockjobctl [--socket PATH] [--json] COMMAND [key=value ...]   run one command
//! blockjobctl [--socket PATH] [--json] COMMAND '{"key": ...}'     ... with JSON arguments
//! blockjobctl [--socket PATH] watch [--interval MS] [--until-idle]
//! blockjobctl [--socket PATH] backup SRC TARGET [--sync MODE] [--bitmap NAME]
//! blockjobctl [--socket PATH] shell
//! ```
//!
//! Arguments are checked against the server's `query-qmp-schema` before anything is
//! sent. Output is pretty JSON (one compact line with `--json`); progress is drawn as
//! bars on a terminal and as plain lines otherwise. Exit codes: [`EXIT_CODES`].

pub mod args;
pub mod progress;
pub mod schema;
pub mod shell;

use clap::{Parser, Subcommand};
use progress::{Display, JobBars};
use qmp_api::BlockJobStatus;
use qmp_client::{Client, Error, RawEvent};
use schema::Schema;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// What the exit status means (also in `--help`).
pub const EXIT_CODES: &str = "Exit codes:
  0  success
  1  the server refused the command (its QMP error is printed), or the job failed
  2  bad usage: unknown command, arguments the server's schema refuses
  3  no connection, the connection failed or closed, or a reply did not fit";

#[derive(Parser, Debug)]
#[command(
    name = "blockjobctl",
    version,
    about = "Drive blockjobd (or any QEMU) over QMP",
    after_help = EXIT_CODES,
    subcommand_required = true
)]
struct Cli {
    /// The QMP socket.
    #[arg(
        long,
        short,
        env = "BLOCKJOBCTL_SOCKET",
        default_value = "blockjobd.sock",
        global = true
    )]
    socket: PathBuf,
    /// Print replies as one line of JSON, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show every job with a live progress bar, and events as they come.
    Watch {
        /// How often to ask `query-jobs`, in milliseconds.
        #[arg(long, default_value_t = 200)]
        interval: u64,
        /// Exit once jobs have been seen and none is left.
        #[arg(long)]
        until_idle: bool,
    },
    /// Back up node SRC to node TARGET (`blockdev-backup`) with a progress bar.
    Backup {
        source: String,
        target: String,
        /// full, top, none or incremental.
        #[arg(long, default_value = "full")]
        sync: String,
        /// A dirty bitmap of SRC (`sync` then defaults to incremental).
        #[arg(long)]
        bitmap: Option<String>,
        /// The job's id (default: backup-SRC).
        #[arg(long)]
        job_id: Option<String>,
        /// A rate limit in bytes per second.
        #[arg(long)]
        speed: Option<u64>,
    },
    /// An interactive shell: history, tab completion from the server's schema.
    Shell,
    /// Any QMP command, with key=value arguments or one JSON object.
    #[command(external_subcommand)]
    Qmp(Vec<String>),
}

/// How a run ends.
#[derive(Debug)]
enum Failure {
    /// Exit 1: the server said no, or the job failed.
    Refused(String),
    /// Exit 2.
    Usage(String),
    /// Exit 3.
    Connection(String),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        match error {
            Error::Qmp(e) => Failure::Refused(format!("{}: {}", e.class, e.desc)),
            Error::Refused(e) => Failure::Usage(e),
            Error::Job(e) => Failure::Refused(e),
            other => Failure::Connection(other.to_string()),
        }
    }
}

/// The whole program (the `blockjobctl` binary is this call).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("blockjobctl: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let (code, text) = match failure {
                Failure::Refused(t) => (1, t),
                Failure::Usage(t) => (2, t),
                Failure::Connection(t) => (3, t),
            };
            eprintln!("blockjobctl: {text}");
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let client = Client::connect_unix(&cli.socket)
        .await
        .map_err(|e| Failure::Connection(format!("{e} (is the daemon running? --socket PATH)")))?;
    match cli.command {
        Cmd::Qmp(words) => {
            let schema = fetch_schema(&client).await?;
            let (command, rest) = words
                .split_first()
                .ok_or_else(|| Failure::Usage("no command given".to_string()))?;
            let reply = execute(&client, &schema, command, rest).await?;
            print_reply(&reply, cli.json);
            Ok(())
        }
        Cmd::Watch {
            interval,
            until_idle,
        } => watch(&client, Duration::from_millis(interval.max(1)), until_idle).await,
        Cmd::Backup {
            source,
            target,
            sync,
            bitmap,
            job_id,
            speed,
        } => {
            let sync = if bitmap.is_some() && sync == "full" {
                "incremental".to_string()
            } else {
                sync
            };
            let job_id = job_id.unwrap_or_else(|| format!("backup-{source}"));
            let mut arguments = json!({
                "job-id": job_id, "device": source, "target": target, "sync": sync,
                "auto-dismiss": false,
            });
            if let Some(bitmap) = bitmap {
                arguments["bitmap"] = Value::String(bitmap);
            }
            if let Some(speed) = speed {
                arguments["speed"] = json!(speed);
            }
            backup(&client, &job_id, arguments, cli.json).await
        }
        Cmd::Shell => shell(&client, cli.json).await,
    }
}

async fn fetch_schema(client: &Client) -> Result<Schema, Failure> {
    let value = client
        .execute_value("query-qmp-schema", Value::Null)
        .await?;
    Schema::from_introspection(&value).map_err(Failure::Connection)
}

/// Checks `words` as arguments of `command` against the schema, then runs it.
async fn execute(
    client: &Client,
    schema: &Schema,
    command: &str,
    words: &[String],
) -> Result<Value, Failure> {
    let arguments = args::parse(schema, command, words).map_err(Failure::Usage)?;
    schema.check(command, &arguments).map_err(Failure::Usage)?;
    Ok(client
        .execute_value(command, Value::Object(arguments))
        .await?)
}

fn print_reply(reply: &Value, json: bool) {
    if json {
        println!("{reply}");
    } else if reply != &Value::Object(Map::new()) {
        println!(
            "{}",
            serde_json::to_string_pretty(reply).unwrap_or_else(|_| reply.to_string())
        );
    }
}

/// `EVENT_NAME {data}` with the server's time.
fn event_line(message: &qmp_client::EventMessage<RawEvent>) -> String {
    let t = message.timestamp;
    let mut line = format!("{}.{:06} {}", t.seconds, t.microseconds, message.event.name);
    if let Some(data) = &message.event.data {
        line.push(' ');
        line.push_str(&data.to_string());
    }
    line
}

async fn watch(client: &Client, interval: Duration, until_idle: bool) -> Result<(), Failure> {
    let mut events = client.events::<RawEvent>();
    let mut bars = JobBars::new(Display::for_stdout());
    let mut ticker = tokio::time::interval(interval);
    let mut seen_any = false;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(message)) => bars.display().println(&event_line(&message)),
                Some(Err(e)) => bars.display().println(&format!("(an event that does not fit: {e})")),
                None => return Err(client.closed().map(Error::from).unwrap_or(Error::Transport(qmp_client::TransportError::Eof)).into()),
            },
            _ = ticker.tick() => {
                let value = client.execute_value("query-jobs", Value::Null).await?;
                // Events the server sent before this reply are shown before it.
                while let Some(event) = events.try_next() {
                    match event {
                        Ok(message) => bars.display().println(&event_line(&message)),
                        Err(e) => bars.display().println(&format!("(an event that does not fit: {e})")),
                    }
                }
                let jobs: Vec<qmp_client::JobProgress<BlockJobStatus>> =
                    qapi_runtime_read(&value)?;
                let listed: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
                for gone in bars.ids().into_iter().filter(|id| !listed.contains(&id.as_str())) {
                    bars.remove(&gone);
                }
                for job in &jobs {
                    bars.update(job);
                }
                seen_any |= !jobs.is_empty();
                if until_idle && seen_any && jobs.is_empty() {
                    return Ok(());
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `query-jobs` entries, read tolerantly.
fn qapi_runtime_read(
    value: &Value,
) -> Result<Vec<qmp_client::JobProgress<BlockJobStatus>>, Failure> {
    qmp_api::input::from_value_tolerant(value).map_err(|e| {
        Failure::Connection(format!(
            "reply to 'query-jobs' does not fit the schema: {}",
            e.desc
        ))
    })
}

async fn backup(
    client: &Client,
    job_id: &str,
    arguments: Value,
    json: bool,
) -> Result<(), Failure> {
    let schema = fetch_schema(client).await?;
    let Value::Object(arguments) = arguments else {
        unreachable!("built as an object above")
    };
    schema
        .check("blockdev-backup", &arguments)
        .map_err(Failure::Usage)?;
    client
        .execute_value("blockdev-backup", Value::Object(arguments))
        .await?;
    // The job stays after it concludes (auto-dismiss off), so its end and error are
    // read from it whatever happened before we looked; dismissed below.
    let mut follow = client.follow_job::<BlockJobStatus>(job_id, Duration::from_millis(100));
    let mut bars = JobBars::new(if json {
        Display::Plain
    } else {
        Display::for_stdout()
    });
    let mut last = None;
    while let Some(progress) = follow.next().await {
        let progress = progress?;
        if !json {
            bars.update(&progress);
        }
        last = Some(progress);
    }
    let last = last.ok_or_else(|| Failure::Connection("the job vanished".to_string()))?;
    client
        .execute_value("job-dismiss", json!({"id": job_id}))
        .await?;
    if json {
        println!(
            "{}",
            json!({"id": last.id, "status": last.status.to_string(), "current": last.current,
                   "total": last.total, "error": last.error})
        );
    }
    match last.error {
        Some(error) => Err(Failure::Refused(format!(
            "backup '{job_id}' failed: {error}"
        ))),
        None => {
            if !json {
                bars.display().println(&format!(
                    "backup '{job_id}' completed: {} bytes",
                    last.total
                ));
            }
            Ok(())
        }
    }
}

async fn shell(client: &Client, json: bool) -> Result<(), Failure> {
    let schema = fetch_schema(client).await?;
    let completion = shell::Completion::new(&schema);
    let config = rustyline::Config::builder()
        .auto_add_history(true)
        .completion_type(rustyline::CompletionType::List)
        .build();
    let mut editor: rustyline::Editor<shell::Completion, rustyline::history::DefaultHistory> =
        rustyline::Editor::with_config(config).map_err(|e| Failure::Usage(e.to_string()))?;
    editor.set_helper(Some(completion));
    let history = shell::history_file();
    if let Some(history) = &history {
        let _ = editor.load_history(history);
    }
    let mut events = client.events::<RawEvent>();
    let result = loop {
        // Events that came since the last prompt.
        while let Some(event) = events.try_next() {
            match event {
                Ok(message) => println!("{}", event_line(&message)),
                Err(e) => println!("(an event that does not fit: {e})"),
            }
        }
        // While the prompt waits (blocking this single-threaded runtime), the socket
        // holds what the server sends; it is read when the next command runs.
        let line = match editor.readline("(QMP) ") {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => break Ok(()),
            Err(e) => break Err(Failure::Usage(e.to_string())),
        };
        let words = match split_words(&line) {
            Ok(words) => words,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        let Some((command, rest)) = words.split_first() else {
            continue;
        };
        match execute(client, &schema, command, rest).await {
            Ok(reply) => print_reply(&reply, json),
            Err(Failure::Connection(e)) => break Err(Failure::Connection(e)),
            Err(Failure::Refused(e) | Failure::Usage(e)) => eprintln!("{e}"),
        }
    };
    if let Some(history) = &history {
        let _ = editor.save_history(history);
    }
    result
}

/// Splits a shell line into words; a JSON object (which may hold spaces) is one word.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let line = line.trim();
    let mut words = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        if rest.starts_with('{') {
            let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            match stream.next() {
                Some(Ok(_)) => {
                    let end = stream.byte_offset();
                    words.push(rest[..end].to_string());
                    rest = rest[end..].trim_start();
                }
                _ => return Err(format!("not valid JSON: {rest}")),
            }
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            words.push(rest[..end].to_string());
            rest = rest[end..].trim_start();
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shell_line_splits_into_words_with_json_kept_whole() {
        assert_eq!(
            split_words(r#"  transaction {"actions": [ ]}  "#).expect("split"),
            ["transaction", r#"{"actions": [ ]}"#]
        );
        assert_eq!(
            split_words("job-pause id=j0").expect("split"),
            ["job-pause", "id=j0"]
        );
    }

    #[test]
    fn the_help_lists_the_exit_codes() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("2  bad usage"), "{help}");
    }
}
