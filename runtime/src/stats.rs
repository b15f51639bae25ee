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
