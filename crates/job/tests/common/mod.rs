//! A scripted job driver and a deterministic harness (manual executor, manual clock, recording
//! sink) shared by the integration tests.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use job::manual::{ManualClock, ManualExecutor};
use job::{
    BlockJobStatus, BoxFuture, JobContext, JobDriver, JobFailure, JobKey, JobRegistry, JobSpec,
    JobTxn,
};
use qmp_api::{Event, IoOperationType, JobType};

/// What a scripted job does next.
#[derive(Debug, Clone)]
pub enum Step {
    /// Return from `run`.
    Finish(Result<(), JobFailure>),
    /// Account progress and pass the rate limiter.
    Work(u64),
    /// Go READY.
    Ready,
    /// A write error (EIO), under the job's `on-target-error`.
    IoError,
    /// Wait for the gate, ignoring cancellation (a job slow to stop).
    Block,
}

#[derive(Default)]
pub struct Control {
    steps: VecDeque<Step>,
    gate_open: bool,
    gate_waker: Option<Waker>,
    prepare: Option<JobFailure>,
}

pub struct Scripted {
    name: String,
    job_type: JobType,
    mirror: bool,
    control: Arc<Mutex<Control>>,
    log: Arc<Mutex<Vec<String>>>,
}

struct Gate(Arc<Mutex<Control>>);

impl Future for Gate {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut c = self.0.lock().unwrap();
        if c.gate_open {
            Poll::Ready(())
        } else {
            c.gate_waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Scripted {
    fn hook(&self, what: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {what}", self.name));
    }
}

impl JobDriver for Scripted {
    fn job_type(&self) -> JobType {
        self.job_type
    }

    fn supports_complete(&self) -> bool {
        self.mirror
    }

    fn soft_cancel_when_ready(&self) -> bool {
        self.mirror
    }

    fn run<'a>(&'a mut self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(async move {
            self.hook("run");
            loop {
                if ctx.is_cancelled() {
                    return Ok(());
                }
                let step = self.control.lock().unwrap().steps.pop_front();
                match step {
                    Some(Step::Finish(r)) => return r,
                    Some(Step::Work(n)) => {
                        ctx.progress_update(n);
                        ctx.rate_limit(n).await;
                    }
                    Some(Step::Ready) => ctx.set_ready(),
                    Some(Step::IoError) => {
                        ctx.io_error(
                            IoOperationType::Write,
                            &std::io::Error::from_raw_os_error(5),
                        );
                    }
                    Some(Step::Block) => Gate(self.control.clone()).await,
                    None => {
                        if ctx.should_complete() || ctx.cancel_requested() {
                            return Ok(());
                        }
                        ctx.idle().await;
                    }
                }
            }
        })
    }

    fn prepare(&mut self) -> Result<(), JobFailure> {
        self.hook("prepare");
        match self.control.lock().unwrap().prepare.clone() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    fn commit(&mut self) {
        self.hook("commit");
    }

    fn abort(&mut self) {
        self.hook("abort");
    }

    fn clean(&mut self) {
        self.hook("clean");
    }
}

pub struct Harness {
    pub reg: JobRegistry,
    pub exec: ManualExecutor,
    pub clock: ManualClock,
    events: Arc<Mutex<Vec<Event>>>,
    log: Arc<Mutex<Vec<String>>>,
    controls: HashMap<String, Arc<Mutex<Control>>>,
    keys: HashMap<String, JobKey>,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub fn new() -> Self {
        let exec = ManualExecutor::new();
        let clock = ManualClock::new();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let events = events.clone();
            move |e: Event| events.lock().unwrap().push(e)
        };
        let reg = JobRegistry::new(
            Arc::new(sink),
            Arc::new(exec.clone()),
            Arc::new(clock.clone()),
        );
        Harness {
            reg,
            exec,
            clock,
            events,
            log: Arc::new(Mutex::new(Vec::new())),
            controls: HashMap::new(),
            keys: HashMap::new(),
        }
    }

    fn driver(&mut self, name: &str, job_type: JobType, mirror: bool) -> Box<Scripted> {
        let control = Arc::new(Mutex::new(Control::default()));
        self.controls.insert(name.to_string(), control.clone());
        Box::new(Scripted {
            name: name.to_string(),
            job_type,
            mirror,
            control,
            log: self.log.clone(),
        })
    }

    /// A backup-like job (every cancel is forced, no complete).
    pub fn create(&mut self, spec: JobSpec, txn: Option<&JobTxn>) -> JobKey {
        self.create_with(spec, txn, false)
    }

    /// A mirror-like job (complete, soft cancel in READY).
    pub fn create_mirror(&mut self, spec: JobSpec) -> JobKey {
        self.create_with(spec, None, true)
    }

    pub fn create_with(&mut self, spec: JobSpec, txn: Option<&JobTxn>, mirror: bool) -> JobKey {
        let name = spec.id.clone().unwrap_or_else(|| "internal".to_string());
        let job_type = if mirror {
            JobType::Mirror
        } else {
            JobType::Backup
        };
        let driver = self.driver(&name, job_type, mirror);
        let key = self.reg.create(spec, |_| driver, txn).expect("create");
        self.keys.insert(name, key);
        key
    }

    /// Creates and starts a backup-like job in its own transaction, and lets it run idle.
    pub fn running(&mut self, spec: JobSpec) -> JobKey {
        let key = self.create(spec, None);
        self.reg.start(key).unwrap();
        self.run();
        key
    }

    pub fn key(&self, name: &str) -> JobKey {
        self.keys[name]
    }

    /// Queues a step for a job and wakes it (does not run the executor).
    pub fn push(&self, name: &str, step: Step) {
        self.controls[name].lock().unwrap().steps.push_back(step);
        self.reg.kick(self.key(name));
    }

    /// The job's work returns `result`; the executor runs until nothing is ready.
    pub fn finish(&self, name: &str, result: Result<(), JobFailure>) {
        self.push(name, Step::Finish(result));
        self.run();
    }

    pub fn fail_prepare(&self, name: &str, message: &str) {
        self.controls[name].lock().unwrap().prepare = Some(JobFailure::new(message));
    }

    pub fn open_gate(&self, name: &str) {
        let mut c = self.controls[name].lock().unwrap();
        c.gate_open = true;
        if let Some(w) = c.gate_waker.take() {
            w.wake();
        }
    }

    pub fn run(&self) {
        self.exec.run_until_stalled();
    }

    pub fn status(&self, name: &str) -> Option<BlockJobStatus> {
        self.reg.status(self.key(name))
    }

    /// Events since the last call, compactly: `ja running`, `COMPLETED jb error=...`.
    pub fn events(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .drain(..)
            .map(|e| render(&e))
            .collect()
    }

    pub fn raw_events(&self) -> Vec<Event> {
        self.events.lock().unwrap().drain(..).collect()
    }

    /// Hook calls since the last call: `ja prepare`, `jb commit`, ...
    pub fn hooks(&self) -> Vec<String> {
        self.log.lock().unwrap().drain(..).collect()
    }
}

pub fn render(e: &Event) -> String {
    match e {
        Event::JobStatusChange(d) => format!("{} {}", d.id, d.status),
        Event::BlockJobCompleted(d) => match &d.error {
            None => format!("COMPLETED {}", d.device),
            Some(error) => format!("COMPLETED {} error={error}", d.device),
        },
        Event::BlockJobCancelled(d) => format!("CANCELLED {}", d.device),
        Event::BlockJobReady(d) => format!("READY {}", d.device),
        Event::BlockJobPending(d) => format!("PENDING {}", d.id),
        Event::BlockJobError(d) => format!("ERROR {} {} {}", d.device, d.operation, d.action),
        other => format!("{} {:?}", other.name(), other.data()),
    }
}

/// `["ja created", ...]` from `"ja created, ..."`.
pub fn seq(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}
