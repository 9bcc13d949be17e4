//! Typed QMP round trips per second against blockjobd, with 1 and 8 requests in flight
//! on one connection, for three clients in one run: ours (`qmp-client`), qapi-rs 0.15's
//! async client (crates.io `qapi` with its tokio features), and QEMU's Python client
//! (`qemu.qmp` from PyPI, in a venv under the target directory).
//!
//! `cargo bench -p blockjobs-tests --bench client_roundtrip`; `QMP_BENCH_SECONDS` sets the
//! length of each measurement (default 2), `QMP_BENCH_ROUNDS` the number of rounds (default
//! 3; each round's rates go to stderr), `QMP_BENCH_ONLY` a part of a client's name to run
//! that client alone (for profiling). The command is `query-version`, read into each
//! client's own type (`qmp_api::VersionInfo`, `qapi_qmp::VersionInfo`, a Python dict).
//! Both Rust clients run on a current-thread tokio runtime; the daemon is the other core.

use blockjobs_tests::qmp::Daemon;
use blockjobs_tests::{python_with_qemu_qmp, repo_root};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const WINDOWS: [usize; 2] = [1, 8];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// CPU time this thread has used (the client's: the runtime is current-thread).
fn thread_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// One measurement: round trips per second, and the client's CPU time per round trip.
#[derive(Clone, Copy)]
struct Figure {
    rate: f64,
    cpu_us: f64,
}

/// Runs `window` workers, each calling `call` in a loop for `seconds`.
async fn measure<F, Fut>(window: usize, seconds: f64, call: F) -> Figure
where
    F: Fn() -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    for _ in 0..100 {
        call().await;
    }
    let start = Instant::now();
    let cpu = thread_cpu();
    let tasks: Vec<_> = (0..window)
        .map(|_| {
            let call = call.clone();
            tokio::task::spawn_local(async move {
                let mut done = 0u64;
                while start.elapsed().as_secs_f64() < seconds {
                    call().await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut done = 0;
    for task in tasks {
        done += task.await.expect("worker");
    }
    Figure {
        rate: done as f64 / start.elapsed().as_secs_f64(),
        cpu_us: (thread_cpu() - cpu).as_secs_f64() * 1e6 / done as f64,
    }
}

fn ours(socket: &Path, seconds: f64) -> Vec<Figure> {
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime(), async {
        let client = qmp_client::Client::connect_unix(socket)
            .await
            .expect("connect");
        let mut rates = Vec::new();
        for window in WINDOWS {
            let client = client.clone();
            rates.push(
                measure(window, seconds, move || {
                    let client = client.clone();
                    async move {
                        let version = client
                            .execute(qmp_api::QueryVersionArguments {})
                            .await
                            .expect("query-version");
                        assert!(version.qemu.major > 0);
                    }
                })
                .await,
            );
        }
        rates
    })
}

fn qapi_rs(socket: &Path, seconds: f64) -> Vec<Figure> {
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime(), async {
        let stream = qapi::futures::QmpStreamTokio::open_uds(socket)
            .await
            .expect("connect");
        let stream = stream.negotiate().await.expect("negotiate");
        let (service, _reader) = stream.spawn_tokio();
        let service = std::rc::Rc::new(service);
        let mut rates = Vec::new();
        for window in WINDOWS {
            let service = service.clone();
            rates.push(
                measure(window, seconds, move || {
                    let service = service.clone();
                    async move {
                        let version = service
                            .execute(qapi::qmp::query_version {})
                            .await
                            .expect("query-version");
                        assert!(version.qemu.major > 0);
                    }
                })
                .await,
            );
        }
        rates
    })
}

fn python(socket: &Path, seconds: f64) -> Vec<Figure> {
    let python = python_with_qemu_qmp(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let out = Command::new(python)
        .arg(repo_root().join("tests/python/bench_qemu_qmp.py"))
        .arg(socket)
        .arg(seconds.to_string())
        .output()
        .expect("run the Python benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|line| {
            let numbers: Vec<f64> = line
                .split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect();
            match numbers[..] {
                [_, rate, cpu_us] => Figure { rate, cpu_us },
                _ => panic!("bad output line: {line}"),
            }
        })
        .collect()
}

/// One client's measurement: figures for each window.
type Run = fn(&Path, f64) -> Vec<Figure>;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let seconds: f64 = std::env::var("QMP_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let rounds: usize = std::env::var("QMP_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let daemon_path = Path::new(env!("CARGO_BIN_EXE_blockjobd-e2e"));
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(daemon_path, dir.path());
    let all: [(&str, Run); 3] = [
        ("qmp-client (ours)", ours),
        ("qapi-rs 0.15 (tokio)", qapi_rs),
        ("Python qemu.qmp", python),
    ];
    // `QMP_BENCH_ONLY=qapi` runs only the clients whose name contains it (for profiling
    // one client); the comparison needs all three.
    let only = std::env::var("QMP_BENCH_ONLY").unwrap_or_default();
    let clients: Vec<(&str, Run)> = all
        .into_iter()
        .filter(|(name, _)| name.contains(only.as_str()))
        .collect();
    // Rounds interleave the clients, so that load from elsewhere on the machine falls
    // on all of them alike; each figure is the median of its rounds.
    let mut samples = vec![vec![Vec::new(); WINDOWS.len()]; clients.len()];
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        // Every other round in reverse order, so no client always goes first.
        let mut order: Vec<usize> = (0..clients.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for client in order {
            let (name, run) = clients[client];
            let figures = run(&daemon.socket, seconds);
            let rates: Vec<String> = figures.iter().map(|f| format!("{:.0}", f.rate)).collect();
            eprintln!("  {name}: {} round trips/s", rates.join(" / "));
            for (window, figure) in figures.into_iter().enumerate() {
                samples[client][window].push(figure);
            }
        }
    }
    println!(
        "typed QMP round trips/s against blockjobd (query-version, one connection; \
         median of {rounds} rounds of {seconds} s), and the client's CPU time per round trip"
    );
    println!(
        "{:<24} {:>12} {:>12} {:>14} {:>14}",
        "client", "1 in flight", "8 in flight", "CPU/call (1)", "CPU/call (8)"
    );
    let mut medians = Vec::new();
    for (client, (name, _)) in clients.iter().enumerate() {
        let rate: Vec<f64> = samples[client]
            .iter()
            .map(|s| median(&mut s.iter().map(|f| f.rate).collect::<Vec<_>>()))
            .collect();
        let cpu: Vec<f64> = samples[client]
            .iter()
            .map(|s| median(&mut s.iter().map(|f| f.cpu_us).collect::<Vec<_>>()))
            .collect();
        println!(
            "{name:<24} {:>12.0} {:>12.0} {:>11.1} us {:>11.1} us",
            rate[0], rate[1], cpu[0], cpu[1]
        );
        medians.push(rate);
    }
    let compared = clients.len() == 3;
    for (i, window) in WINDOWS.iter().enumerate().filter(|_| compared) {
        let (best, name) = (1..clients.len())
            .map(|c| (medians[c][i], clients[c].0))
            .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
        println!(
            "{window} in flight: ours is {:.2}x the next fastest ({name})",
            medians[0][i] / best
        );
    }
    drop(daemon);
}
