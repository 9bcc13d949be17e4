//! Job progress for people: a live bar per job on a terminal (indicatif: percentage,
//! rate, ETA), plain lines elsewhere.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use qmp_api::BlockJobStatus;
use qmp_client::JobProgress;
use std::collections::BTreeMap;

/// The bar's layout: job id, status, bar, percentage, bytes, rate, ETA.
pub const TEMPLATE: &str = "{prefix:>12} {msg:<9} [{bar:30}] {percent:>3}% \
     {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}";

/// Where progress goes.
pub enum Display {
    /// Bars, drawn on `target` (stderr's terminal, or an in-memory one in tests).
    Bars(MultiProgress),
    /// One line per change, on stdout.
    Plain,
}

impl Display {
    /// Bars when stdout is a terminal, plain lines otherwise.
    pub fn for_stdout() -> Display {
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            Display::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stdout()))
        } else {
            Display::Plain
        }
    }

    /// Bars drawn on `target`.
    pub fn bars(target: ProgressDrawTarget) -> Display {
        Display::Bars(MultiProgress::with_draw_target(target))
    }

    /// Prints a line above the bars (or as is).
    pub fn println(&self, line: &str) {
        match self {
            Display::Bars(multi) => {
                let _ = multi.println(line);
            }
            Display::Plain => println!("{line}"),
        }
    }
}

/// The jobs being shown, by id.
pub struct JobBars {
    display: Display,
    bars: BTreeMap<String, ProgressBar>,
    /// Plain mode: the last line printed per job, so only changes are printed.
    last: BTreeMap<String, String>,
}

impl JobBars {
    pub fn new(display: Display) -> JobBars {
        JobBars {
            display,
            bars: BTreeMap::new(),
            last: BTreeMap::new(),
        }
    }

    pub fn display(&self) -> &Display {
        &self.display
    }

    /// Shows where `job` stands.
    pub fn update(&mut self, job: &JobProgress<BlockJobStatus>) {
        let current = u64::try_from(job.current).unwrap_or(0);
        let total = u64::try_from(job.total).unwrap_or(0);
        match &self.display {
            Display::Bars(multi) => {
                let bar = self.bars.entry(job.id.clone()).or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(total));
                    bar.set_style(
                        ProgressStyle::with_template(TEMPLATE)
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    bar.set_prefix(job.id.clone());
                    bar
                });
                bar.set_length(total);
                bar.set_position(current);
                bar.set_message(job.status.to_string());
                if job.has_ended() {
                    bar.finish();
                }
            }
            Display::Plain => {
                let line = plain_line(job);
                if self.last.get(&job.id) != Some(&line) {
                    println!("{line}");
                    self.last.insert(job.id.clone(), line);
                }
            }
        }
    }

    /// Stops showing `id` (the job is gone).
    pub fn remove(&mut self, id: &str) {
        if let Some(bar) = self.bars.remove(id) {
            bar.finish();
        }
        self.last.remove(id);
    }

    /// Ids of the jobs shown.
    pub fn ids(&self) -> Vec<String> {
        match self.display {
            Display::Bars(_) => self.bars.keys().cloned().collect(),
            Display::Plain => self.last.keys().cloned().collect(),
        }
    }
}

/// `job0 running 1048576/4194304 25%`, with the error if the job failed.
pub fn plain_line(job: &JobProgress<BlockJobStatus>) -> String {
    let mut line = format!(
        "{} {} {}/{} {:.0}%",
        job.id,
        job.status,
        job.current,
        job.total,
        job.fraction() * 100.0
    );
    if let Some(error) = &job.error {
        line.push_str(&format!(" error: {error}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::{InMemoryTerm, TermLike};

    fn job(status: BlockJobStatus, current: i64) -> JobProgress<BlockJobStatus> {
        JobProgress {
            id: "backup-src".to_string(),
            status,
            current,
            total: 4 << 20,
            error: None,
        }
    }

    /// The frames a terminal shows: the bar fills, with percentage, bytes, rate and ETA.
    #[test]
    fn the_bar_renders_percentage_bytes_rate_and_eta() {
        let term = InMemoryTerm::new(4, 120);
        let mut bars = JobBars::new(Display::bars(ProgressDrawTarget::term_like(Box::new(
            term.clone(),
        ))));
        bars.update(&job(BlockJobStatus::Running, 1 << 20));
        let frame = term.contents();
        assert!(
            frame.starts_with("  backup-src running   [=======>"),
            "{frame}"
        );
        assert!(frame.contains("]  25%   1.00 MiB/4.00 MiB  "), "{frame}");
        assert!(frame.contains("/s ETA "), "{frame}");
        bars.display()
            .println("JOB_STATUS_CHANGE {\"id\":\"backup-src\"}");
        bars.update(&job(BlockJobStatus::Concluded, 4 << 20));
        let frame = term.contents();
        let lines: Vec<&str> = frame.lines().collect();
        assert_eq!(lines[0], "JOB_STATUS_CHANGE {\"id\":\"backup-src\"}");
        assert!(
            lines[1].starts_with(
                "  backup-src concluded [==============================] 100%   4.00 MiB/4.00 MiB"
            ),
            "{frame}"
        );
        assert_eq!(term.width(), 120);
    }

    #[test]
    fn plain_lines_say_the_same_without_a_terminal() {
        assert_eq!(
            plain_line(&job(BlockJobStatus::Running, 1 << 20)),
            "backup-src running 1048576/4194304 25%"
        );
        let mut failed = job(BlockJobStatus::Concluded, 0);
        failed.error = Some("Input/output error".to_string());
        assert_eq!(
            plain_line(&failed),
            "backup-src concluded 0/4194304 0% error: Input/output error"
        );
    }
}
