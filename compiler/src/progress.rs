//! Progress of the slow stages (loading a checkpoint, packing weights, compiling kernels,
//! linking): a bar or spinner on stderr, drawn only when stderr is a terminal so pipes, logs
//! and tests see nothing, and the same stages as `tracing` events for `--verbose`.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One stage in progress; logged with its duration when finished or dropped.
pub struct Stage {
    name: &'static str,
    detail: String,
    start: Instant,
    bar: ProgressBar,
}

fn target() -> ProgressDrawTarget {
    // indicatif draws nothing when stderr is not a terminal; GRIFFIN_NO_PROGRESS turns the
    // bars off in a terminal too (screen recordings, slow remote terminals).
    if std::env::var_os("GRIFFIN_NO_PROGRESS").is_some() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}

/// A stage of unknown length: a spinner with the elapsed time.
pub fn spinner(name: &'static str, detail: impl Into<String>) -> Stage {
    let detail = detail.into();
    let bar = ProgressBar::with_draw_target(None, target());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .expect("static template")
            .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
    );
    bar.set_message(format!("{name} {detail}"));
    bar.enable_steady_tick(Duration::from_millis(100));
    tracing::debug!(stage = name, %detail, "started");
    Stage {
        name,
        detail,
        start: Instant::now(),
        bar,
    }
}

/// A stage of `total` steps counted in `unit`s: a bar with the count and an estimate.
pub fn counted(name: &'static str, detail: impl Into<String>, total: u64, unit: &str) -> Stage {
    let detail = detail.into();
    let bar = ProgressBar::with_draw_target(Some(total), target());
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}} (eta {{eta}})"
        ))
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{name} {detail}"));
    tracing::debug!(stage = name, %detail, total, "started");
    Stage {
        name,
        detail,
        start: Instant::now(),
        bar,
    }
}

impl Stage {
    /// Sets the position of a counted stage.
    pub fn set(&self, done: u64) {
        self.bar.set_position(done);
    }

    /// Sets the length of a counted stage (when it is known only once the stage runs).
    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        tracing::info!(
            stage = self.name,
            detail = %self.detail,
            ms = self.start.elapsed().as_millis() as u64,
            "done"
        );
    }
}

/// Installs the `--verbose` logger on stderr: 1 = each stage and its duration, 2 = also when
/// each starts and per-pass details, 3 = everything the libraries log.
pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => return,
        1 => tracing::Level::INFO,
        2 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_count_and_finish_without_a_terminal() {
        // Whether or not stderr is a terminal, stages track their counts and finish cleanly.
        let s = counted("packing", "weights", 0, "tensors");
        s.set_total(10);
        for i in 1..=10 {
            s.set(i);
        }
        assert_eq!(s.bar.position(), 10);
        assert_eq!(s.bar.length(), Some(10));
        drop(s);
        std::env::set_var("GRIFFIN_NO_PROGRESS", "1");
        let spin = spinner("compiling", "kernels");
        assert!(
            spin.bar.is_hidden(),
            "GRIFFIN_NO_PROGRESS hides the spinner"
        );
        drop(spin);
    }
}
