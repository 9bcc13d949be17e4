//! Helpers for block jobs: wait for a status, follow progress, collect the jobs a
//! transaction started.
//!
//! They speak QEMU's job protocol by its wire names (`query-jobs`, `JOB_STATUS_CHANGE`,
//! `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED`), which every QEMU since 3.0 and
//! blockjobd share, so they need no particular API; the status type is the caller's
//! API's (`qmp_api::BlockJobStatus`, or QEMU's `JobStatus`).
//!
//! **Order, without timing.** Every message read has a sequence number. A helper opens
//! its event stream before it asks `query-jobs`, so it knows which events the reply
//! already reflects (those read before the reply) and which come after it; polls and
//! events are applied in the order the server sent them.

use crate::client::Client;
use crate::connection::Incoming;
use crate::error::{Error, Result};
use crate::events::{EventStream, RawEvent};
use qapi_runtime::input::{FromQmp, QmpObject, QmpPath, ReadMembers, from_value_tolerant};
use qapi_runtime::{Command, Enum, QmpError};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// Where a job stands: its status and progress (`current` of `total`, in units only
/// their ratio gives meaning to), and its error once it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobProgress<S> {
    pub id: String,
    pub status: S,
    pub current: i64,
    pub total: i64,
    /// Set when the job failed or was cancelled (from `query-jobs`, or the error of
    /// `BLOCK_JOB_COMPLETED`).
    pub error: Option<String>,
}

impl<S: Enum> JobProgress<S> {
    /// `current / total` as a fraction in `0..=1` (0 while `total` is 0).
    pub fn fraction(&self) -> f64 {
        if self.total <= 0 {
            0.0
        } else {
            (self.current as f64 / self.total as f64).clamp(0.0, 1.0)
        }
    }

    /// Whether the job has ended (`concluded`, or `null`: dismissed).
    pub fn has_ended(&self) -> bool {
        is_end(self.status)
    }
}

fn is_end<S: Enum>(status: S) -> bool {
    matches!(status.as_str(), "concluded" | "null")
}

/// One entry of `query-jobs`, read tolerantly.
impl<S: Enum + FromQmp> ReadMembers for JobProgress<S> {
    fn read_members(object: &mut QmpObject<'_, '_>) -> std::result::Result<Self, QmpError> {
        Ok(JobProgress {
            id: object.required("id")?,
            status: object.required("status")?,
            current: object.required("current-progress")?,
            total: object.required("total-progress")?,
            error: object.optional("error")?,
        })
    }
}

impl<S: Enum + FromQmp> FromQmp for JobProgress<S> {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> std::result::Result<Self, QmpError> {
        qapi_runtime::input::read_object(value, path)
    }
}

/// What an event says about job `id`.
enum JobNews<S> {
    Status(S),
    /// `BLOCK_JOB_COMPLETED` or `BLOCK_JOB_CANCELLED`: final numbers, maybe an error.
    Finished {
        current: i64,
        total: i64,
        error: Option<String>,
    },
}

fn news<S: Enum + FromQmp>(id: &str, message: &Value) -> Result<Option<JobNews<S>>> {
    let name = message.get("event").and_then(Value::as_str).unwrap_or("");
    let data = message.get("data").unwrap_or(&Value::Null);
    let mismatch = |e: QmpError| Error::Mismatch {
        what: format!("event '{name}'"),
        reason: e.desc,
        value: message.clone(),
    };
    let member = |m: &str| data.get(m).and_then(Value::as_str);
    Ok(match name {
        "JOB_STATUS_CHANGE" if member("id") == Some(id) => {
            let status = data.get("status").unwrap_or(&Value::Null);
            Some(JobNews::Status(
                from_value_tolerant(status).map_err(mismatch)?,
            ))
        }
        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" if member("device") == Some(id) => {
            let number = |m: &str| data.get(m).and_then(Value::as_i64).unwrap_or(0);
            Some(JobNews::Finished {
                current: number("offset"),
                total: number("len"),
                error: member("error").map(str::to_string),
            })
        }
        _ => None,
    })
}

/// `query-jobs`, read tolerantly, with the reply's place in the stream.
async fn query_jobs<S: Enum + FromQmp>(client: &Client) -> Result<(Vec<JobProgress<S>>, u64)> {
    let (value, seq) = client.execute_value_seq("query-jobs", Value::Null).await?;
    let jobs = from_value_tolerant(&value).map_err(|e| Error::Mismatch {
        what: "reply to 'query-jobs'".to_string(),
        reason: e.desc,
        value,
    })?;
    Ok((jobs, seq))
}

fn no_such_job(id: &str) -> Error {
    Error::Job(format!("Job '{id}' not found"))
}

impl Client {
    /// Waits until job `id` reaches `status` and returns where it stands then. Fails if
    /// the job does not exist, or ends (`concluded`, `null`) before reaching it; waiting
    /// for `null` (dismissed) succeeds once the job is gone.
    pub async fn wait_job<S: Enum + FromQmp>(&self, id: &str, status: S) -> Result<JobProgress<S>> {
        let (mut events, _) = self.events_since::<RawEvent>();
        let (jobs, reply_seq) = query_jobs::<S>(self).await?;
        let mut job = match jobs.into_iter().find(|j| j.id == id) {
            Some(job) => job,
            None if status.as_str() == "null" => {
                return Ok(JobProgress {
                    id: id.to_string(),
                    status,
                    current: 0,
                    total: 0,
                    error: None,
                });
            }
            None => return Err(no_such_job(id)),
        };
        loop {
            if job.status == status {
                return Ok(job);
            }
            if is_end(job.status) {
                return Err(Error::Job(format!(
                    "Job '{id}' ended ({}) without reaching '{}'{}",
                    job.status.as_str(),
                    status.as_str(),
                    job.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )));
            }
            let Some(event) = events.next_incoming().await else {
                return Err(self.closed().unwrap_or(crate::TransportError::Eof).into());
            };
            if event.seq <= reply_seq {
                continue;
            }
            match news::<S>(id, &event.message)? {
                Some(JobNews::Status(s)) => job.status = s,
                Some(JobNews::Finished {
                    current,
                    total,
                    error,
                }) => {
                    job.current = current;
                    job.total = total;
                    job.error = error;
                }
                None => {}
            }
        }
    }

    /// Follows job `id`: a [`JobFollow`] yielding its [`JobProgress`] whenever its
    /// status changes (at once, from events) or its progress does (seen by `query-jobs`
    /// every `interval`), ending after the job has ended. The first item is the job as
    /// the first `query-jobs` finds it (asked at the first `next()`).
    ///
    /// Call it *before* the command that starts the job: it listens from the moment it
    /// is made, so a job that ends (and is dismissed) before the first `query-jobs` is
    /// still reported, from its events: its end status, final numbers and error.
    pub fn follow_job<S: Enum + FromQmp>(&self, id: &str, interval: Duration) -> JobFollow<S> {
        let (events, _) = self.events_since::<RawEvent>();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        JobFollow {
            client: self.clone(),
            id: id.to_string(),
            events,
            read_ahead: VecDeque::new(),
            ticker,
            job: None,
            before_first_poll: EarlyNews::default(),
            last_sent: None,
            ready: VecDeque::new(),
            done: false,
        }
    }

    /// Runs `command` (a `transaction`, or any command that starts jobs such as
    /// `blockdev-backup`) and returns its typed return with the ids of the jobs it
    /// started: those whose `JOB_STATUS_CHANGE` to `created` the server sent before the
    /// reply, in the order it sent them.
    pub async fn transaction<C: Command>(&self, command: C) -> Result<(C::Returns, Vec<String>)> {
        let (mut events, _) = self.events_since::<RawEvent>();
        let (returns, reply_seq) = self.execute_seq(command).await?;
        let mut jobs = Vec::new();
        while let Some(event) = events.try_next_incoming() {
            if event.seq > reply_seq {
                break;
            }
            let message = &event.message;
            if message.get("event").and_then(Value::as_str) == Some("JOB_STATUS_CHANGE") {
                let data = message.get("data");
                let member = |m: &str| data.and_then(|d| d.get(m)).and_then(Value::as_str);
                if member("status") == Some("created")
                    && let Some(id) = member("id")
                {
                    jobs.push(id.to_string());
                }
            }
        }
        Ok((returns, jobs))
    }
}

/// Events about a job seen before any poll found it.
struct EarlyNews<S> {
    status: Option<S>,
    finished: Option<(i64, i64, Option<String>)>,
}

impl<S> Default for EarlyNews<S> {
    fn default() -> Self {
        EarlyNews {
            status: None,
            finished: None,
        }
    }
}

/// The progress of one job as it runs: [`Client::follow_job`].
pub struct JobFollow<S> {
    client: Client,
    id: String,
    events: EventStream<RawEvent>,
    /// Events taken from the stream while applying a poll, not yet applied.
    read_ahead: VecDeque<Arc<Incoming>>,
    ticker: tokio::time::Interval,
    job: Option<JobProgress<S>>,
    /// What events said about the job before the first poll found it.
    before_first_poll: EarlyNews<S>,
    last_sent: Option<JobProgress<S>>,
    ready: VecDeque<Result<JobProgress<S>>>,
    done: bool,
}

impl<S: Enum + FromQmp> JobFollow<S> {
    /// The next change; `None` after the job has ended (or an error was returned).
    pub async fn next(&mut self) -> Option<Result<JobProgress<S>>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            if let Some(event) = self.read_ahead.pop_front() {
                self.apply_event(&event);
                continue;
            }
            tokio::select! {
                event = self.events.next_incoming() => match event {
                    Some(event) => self.apply_event(&event),
                    None => self.fail(self.client.closed().unwrap_or(crate::TransportError::Eof).into()),
                },
                _ = self.ticker.tick() => self.poll().await,
            }
        }
    }

    fn fail(&mut self, error: Error) {
        self.ready.push_back(Err(error));
        self.done = true;
    }

    async fn poll(&mut self) {
        let (jobs, reply_seq) = match query_jobs::<S>(&self.client).await {
            Ok(reply) => reply,
            Err(e) => return self.fail(e),
        };
        // Events read before the reply happened before it: apply them first.
        while let Some(event) = self.events.try_next_incoming() {
            self.read_ahead.push_back(event);
        }
        while self.read_ahead.front().is_some_and(|e| e.seq < reply_seq) {
            if let Some(event) = self.read_ahead.pop_front() {
                self.apply_event(&event);
            }
            if self.done {
                return;
            }
        }
        match jobs.into_iter().find(|j| j.id == self.id) {
            Some(found) => self.update(found),
            None if self.job.is_none() => match self.before_first_poll.status.take() {
                // Ended (and dismissed) before the first poll: what its events said.
                Some(status) if is_end(status) => {
                    let (current, total, error) = self
                        .before_first_poll
                        .finished
                        .take()
                        .unwrap_or((0, 0, None));
                    self.update(JobProgress {
                        id: self.id.clone(),
                        status,
                        current,
                        total,
                        error,
                    });
                }
                _ => self.fail(no_such_job(&self.id)),
            },
            // Gone without an end seen.
            None => self.fail(no_such_job(&self.id)),
        }
    }

    fn apply_event(&mut self, event: &Incoming) {
        let Some(job) = self.job.as_mut() else {
            // Before the first poll (which reflects this event if the job is still
            // there), remember what it says in case the job is gone by then.
            match news::<S>(&self.id, &event.message) {
                Ok(Some(JobNews::Status(status))) => {
                    // `null` (dismissed) keeps the end status seen before it.
                    if !(status.as_str() == "null"
                        && self.before_first_poll.status.is_some_and(is_end))
                    {
                        self.before_first_poll.status = Some(status);
                    }
                }
                Ok(Some(JobNews::Finished {
                    current,
                    total,
                    error,
                })) => self.before_first_poll.finished = Some((current, total, error)),
                Ok(None) => {}
                Err(e) => self.fail(e),
            }
            return;
        };
        match news::<S>(&self.id, &event.message) {
            Ok(Some(JobNews::Status(status))) => {
                let mut next = job.clone();
                next.status = status;
                self.update(next);
            }
            Ok(Some(JobNews::Finished {
                current,
                total,
                error,
            })) => {
                job.current = current;
                job.total = total;
                job.error = error;
            }
            Ok(None) => {}
            Err(e) => self.fail(e),
        }
    }

    fn update(&mut self, job: JobProgress<S>) {
        if self.last_sent.as_ref() != Some(&job) {
            self.ready.push_back(Ok(job.clone()));
            self.last_sent = Some(job.clone());
        }
        if job.has_ended() {
            self.done = true;
        }
        self.job = Some(job);
    }
}
