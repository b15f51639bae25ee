//! The `--stats` line after generation, shared by `griffinc generate` and built executables so
//! both report the same quantities the same way.

use std::time::{Duration, Instant};

/// Times one generation: prompt processing up to the first sampled token, then decoding.
pub struct GenerationTimer {
    start: Instant,
    prompt_tokens: usize,
    first_token: Option<Duration>,
    produced: usize,
}

impl GenerationTimer {
    /// Starts timing before the prompt is processed.
    pub fn start(prompt_tokens: usize) -> GenerationTimer {
        GenerationTimer {
            start: Instant::now(),
            prompt_tokens,
            first_token: None,
            produced: 0,
        }
    }

    /// Records one produced token (the first one ends the prefill phase).
    pub fn token(&mut self) {
        if self.first_token.is_none() {
            self.first_token = Some(self.start.elapsed());
        }
        self.produced += 1;
    }

    /// `time to first token …, prefill … tokens/s, decode … tokens/s …`; decode counts the
    /// steps after the first token (each is one forward pass).
    pub fn report(&self, threads: usize) -> String {
        let total = self.start.elapsed();
        let first = self.first_token.unwrap_or(total);
        let decode = total.saturating_sub(first).as_secs_f64().max(1e-9);
        let steps = self.produced.saturating_sub(1) as f64;
        format!(
            "time to first token {:.1} ms, prefill {:.1} tokens/s ({} tokens), decode {:.1} tokens/s ({} tokens), {} threads, peak RSS {} kB",
            first.as_secs_f64() * 1e3,
            self.prompt_tokens as f64 / first.as_secs_f64().max(1e-9),
            self.prompt_tokens,
            steps / decode,
            self.produced,
            threads,
            peak_rss_kb().map_or_else(|| "?".to_string(), |k| k.to_string())
        )
    }
}

/// Peak resident memory of this process (Linux `VmHWM`).
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_tokens_and_names_every_quantity() {
        let mut t = GenerationTimer::start(7);
        for _ in 0..5 {
            t.token();
        }
        let line = t.report(3);
        assert!(line.starts_with("time to first token "), "{line}");
        assert!(line.contains("(7 tokens), decode "), "{line}");
        assert!(line.contains("(5 tokens), 3 threads, peak RSS "), "{line}");
    }
}

/// One kernel launch's device time, measured by a pair of events around it (`--profile`).
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchTime {
    pub kernel: String,
    pub grid: u32,
    pub block: u32,
    pub ms: f32,
}

/// A markdown table of `times` by kernel (launches of one kernel body summed), the largest
/// total first, under a line naming what was timed: where the device time of a decode step or
/// a prefill chunk goes.
pub fn profile_table(title: &str, times: &[LaunchTime]) -> String {
    let total: f64 = times.iter().map(|t| t.ms as f64).sum();
    // (kernel, grid, block) -> (launches, ms), in first-launch order for equal totals.
    let mut rows: Vec<(String, u32, u32, usize, f64)> = Vec::new();
    for t in times {
        match rows
            .iter_mut()
            .find(|r| r.0 == t.kernel && r.1 == t.grid && r.2 == t.block)
        {
            Some(r) => {
                r.3 += 1;
                r.4 += t.ms as f64;
            }
            None => rows.push((t.kernel.clone(), t.grid, t.block, 1, t.ms as f64)),
        }
    }
    rows.sort_by(|a, b| b.4.total_cmp(&a.4));
    let mut out = format!(
        "profile: {title}: {} launches, {:.3} ms of kernels\n\n| kernel | grid × block | launches | µs in all | µs each | share |\n| --- | --- | --- | --- | --- | --- |\n",
        times.len(),
        total
    );
    for (kernel, grid, block, n, ms) in rows {
        out.push_str(&format!(
            "| {kernel} | {grid} × {block} | {n} | {:.1} | {:.1} | {:.1}% |\n",
            ms * 1e3,
            ms * 1e3 / n as f64,
            100.0 * ms / total.max(1e-12)
        ));
    }
    out
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    #[test]
    fn profile_table_sums_launches_of_a_kernel_and_puts_the_largest_first() {
        let t = |kernel: &str, grid, ms| LaunchTime {
            kernel: kernel.into(),
            grid,
            block: 256,
            ms,
        };
        let table = profile_table(
            "decode step",
            &[
                t("k1_linear", 320, 0.002),
                t("k3_rg_lru", 160, 0.001),
                t("k1_linear", 320, 0.004),
                t("k9_linear", 640, 0.001),
            ],
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "profile: decode step: 4 launches, 0.008 ms of kernels"
        );
        assert_eq!(
            lines[4],
            "| k1_linear | 320 × 256 | 2 | 6.0 | 3.0 | 75.0% |"
        );
        assert_eq!(lines.len(), 7, "{table}");
        assert!(lines[5].starts_with("| k3_rg_lru | 160 × 256 | 1 | 1.0 |"));
    }
}
