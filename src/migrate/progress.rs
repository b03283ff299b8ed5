//! What the long commands (`backfill`, `verify`, `repair`) show while they work: on a
//! terminal a bar per phase (rows done, rate, ETA); elsewhere (a log, CI, `docker logs`) one
//! line when a phase starts and one when it ends, with its count and rate, so that a long
//! run is never silent; with `--json`, nothing (the output is the document).

use std::{sync::OnceLock, time::Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Every bar of the process, drawn together: phases that run side by side (the backfill's
/// rows and closure) each keep a line of their own.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// How to show progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Show {
    /// A bar on the terminal.
    Bar,
    /// A line per phase on standard error.
    Lines,
    /// Nothing (machine-read output, tests, the demo).
    #[default]
    Nothing,
}

impl Show {
    /// A bar on a terminal, lines elsewhere, nothing when the output is JSON.
    pub fn for_stderr(json: bool) -> Self {
        if json {
            Show::Nothing
        } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            Show::Bar
        } else {
            Show::Lines
        }
    }
}

/// One phase of a command.
pub struct Phase {
    bar: ProgressBar,
    label: String,
    show: Show,
    started: Instant,
    start_position: u64,
}

impl Phase {
    /// A phase of `command` named `name`, with `total` units of `unit` to do.
    pub fn start(show: Show, command: &str, name: &str, total: u64, unit: &str) -> Self {
        let label = format!("{command}: {name}");
        let bar = match show {
            Show::Bar => {
                let bar = bars().add(ProgressBar::new(total));
                bar.set_style(
                    ProgressStyle::with_template(&format!(
                        "{label:>20} [{{bar:40}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}"
                    ))
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar
            }
            Show::Lines => {
                eprintln!("{label}: {total} {unit} to do");
                ProgressBar::hidden()
            }
            Show::Nothing => ProgressBar::hidden(),
        };
        bar.set_length(total);
        Self {
            bar,
            label,
            show,
            started: Instant::now(),
            start_position: 0,
        }
    }

    /// Where a resumed phase starts (done by an earlier run).
    pub fn resume_at(&mut self, done: u64) {
        self.bar.set_position(done);
        self.start_position = done;
        if self.show == Show::Lines && done > 0 {
            eprintln!("{}: resumed, {done} done already", self.label);
        }
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    pub fn set(&self, position: u64) {
        self.bar.set_position(position);
    }

    /// The phase's end: the bar cleared, or its line with the count and the rate.
    pub fn finish(self) {
        let done = self.bar.position().saturating_sub(self.start_position);
        let secs = self.started.elapsed().as_secs_f64();
        self.bar.finish_and_clear();
        bars().remove(&self.bar);
        if self.show == Show::Lines {
            let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
            eprintln!("{}: done, {done} in {secs:.1} s ({rate:.0}/s)", self.label);
        }
    }
}
