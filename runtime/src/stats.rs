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
    /// Bytes and floating-point operations counted for the launch (`GpuLaunch::work`; 0 if
    /// not counted).
    pub bytes: u64,
    pub flops: u64,
}

/// A markdown table of `times` by kernel (launches of one kernel body summed), the largest
/// total first, under a line naming what was timed: where the device time of a decode step or
/// a prefill chunk goes.
pub fn profile_table(title: &str, times: &[LaunchTime]) -> String {
    let total: f64 = times.iter().map(|t| t.ms as f64).sum();
    struct Row {
        kernel: String,
        grid: u32,
        block: u32,
        launches: usize,
        ms: f64,
        bytes: u64,
        flops: u64,
    }
    // By (kernel, grid, block), in first-launch order for equal totals.
    let mut rows: Vec<Row> = Vec::new();
    for t in times {
        match rows
            .iter_mut()
            .find(|r| r.kernel == t.kernel && r.grid == t.grid && r.block == t.block)
        {
            Some(r) => {
                r.launches += 1;
                r.ms += t.ms as f64;
                r.bytes += t.bytes;
                r.flops += t.flops;
            }
            None => rows.push(Row {
                kernel: t.kernel.clone(),
                grid: t.grid,
                block: t.block,
                launches: 1,
                ms: t.ms as f64,
                bytes: t.bytes,
                flops: t.flops,
            }),
        }
    }
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let mut out = format!(
        "profile: {title}: {} launches, {:.3} ms of kernels\n\n| kernel | grid × block | launches | µs in all | µs each | share | GB/s | TFLOP/s |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
        times.len(),
        total
    );
    // A rate over the row's time, blank where nothing was counted.
    let rate = |amount: u64, ms: f64, unit: f64| {
        if amount == 0 || ms <= 0.0 {
            String::new()
        } else {
            format!("{:.1}", amount as f64 / (ms * 1e-3) / unit)
        }
    };
    for r in rows {
        out.push_str(&format!(
            "| {} | {} × {} | {} | {:.1} | {:.1} | {:.1}% | {} | {} |\n",
            r.kernel,
            r.grid,
            r.block,
            r.launches,
            r.ms * 1e3,
            r.ms * 1e3 / r.launches as f64,
            100.0 * r.ms / total.max(1e-12),
            rate(r.bytes, r.ms, 1e9),
            rate(r.flops, r.ms, 1e12),
        ));
    }
    out
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    #[test]
    fn profile_table_sums_launches_of_a_kernel_and_puts_the_largest_first() {
        // k1 moves 6 MB and computes 12 MFLOP in 6 µs in all: 1000 GB/s, 2 TFLOP/s.
        let t = |kernel: &str, grid, ms, bytes, flops| LaunchTime {
            kernel: kernel.into(),
            grid,
            block: 256,
            ms,
            bytes,
            flops,
        };
        let table = profile_table(
            "decode step",
            &[
                t("k1_linear", 320, 0.002, 2_000_000, 4_000_000),
                t("k3_rg_lru", 160, 0.001, 0, 0),
                t("k1_linear", 320, 0.004, 4_000_000, 8_000_000),
                t("k9_linear", 640, 0.001, 0, 0),
            ],
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "profile: decode step: 4 launches, 0.008 ms of kernels"
        );
        assert_eq!(
            lines[4],
            "| k1_linear | 320 × 256 | 2 | 6.0 | 3.0 | 75.0% | 1000.0 | 2.0 |"
        );
        assert_eq!(lines.len(), 7, "{table}");
        // Nothing counted: no rates.
        assert!(lines[5].starts_with("| k3_rg_lru | 160 × 256 | 1 | 1.0 |"));
        assert!(lines[5].ends_with("| 12.5% |  |  |"), "{}", lines[5]);
    }
}
