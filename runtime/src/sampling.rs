//! Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p,
//! min-p and a repetition penalty, from a seeded generator (same seed, same text).

/// Sampling settings; the defaults are greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already seen by this (1: off),
    /// as the reference implementation's `repetition_penalty` does.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "--temperature {} must be 0 or more",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("--min-p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "--repetition-penalty {} must be positive",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// SplitMix64: small, fast, and the same sequence everywhere for a seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// (token, probability) of the candidates, reused between calls.
    candidates: Vec<(u32, f64)>,
    adjusted: Vec<f32>,
    seen: Vec<u32>,
}

/// Index of the largest value; the first one on ties, as the reference's argmax.
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng(params.seed);
        Sampler {
            params,
            rng,
            candidates: Vec::new(),
            adjusted: Vec::new(),
            seen: Vec::new(),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 && self.params.repetition_penalty == 1.0
    }

    /// The next token after `history` (prompt and generated ids so far), given its logits.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        self.adjusted.clear();
        self.adjusted.extend_from_slice(logits);
        if p.repetition_penalty != 1.0 {
            // Each distinct token already seen is penalised once, however often it occurred.
            self.seen.clear();
            self.seen.extend_from_slice(history);
            self.seen.sort_unstable();
            self.seen.dedup();
            for &id in &self.seen {
                if let Some(l) = self.adjusted.get_mut(id as usize) {
                    if *l > 0.0 {
                        *l /= p.repetition_penalty;
                    } else {
                        *l *= p.repetition_penalty;
                    }
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(&self.adjusted);
        }
        let max = self
            .adjusted
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let t = p.temperature as f64;
        self.candidates.clear();
        self.candidates.extend(
            self.adjusted
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp())),
        );
        // Most likely first; ties by id, so the order (and the draw) is deterministic.
        self.candidates.sort_by(|a, b| {
            b.1.partial_cmp(&a.1)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.0.cmp(&b.0))
        });
        if p.top_k > 0 {
            self.candidates.truncate(p.top_k);
        }
        let total: f64 = self.candidates.iter().map(|c| c.1).sum();
        if p.min_p > 0.0 {
            let floor = self.candidates[0].1 * p.min_p as f64;
            self.candidates.retain(|c| c.1 >= floor);
        }
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = 0;
            for c in &self.candidates {
                keep += 1;
                cumulative += c.1 / total;
                if cumulative >= p.top_p as f64 {
                    break;
                }
            }
            self.candidates.truncate(keep.max(1));
        }
        let kept: f64 = self.candidates.iter().map(|c| c.1).sum();
        let mut draw = self.rng.next_f64() * kept;
        for c in &self.candidates {
            if draw < c.1 {
                return c.0;
            }
            draw -= c.1;
        }
        self.candidates.last().expect("at least one candidate").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; 6] = [2.0, 1.0, 0.5, 0.0, -1.0, 3.0];

    fn counts(params: SamplingParams, draws: usize, history: &[u32]) -> [usize; 6] {
        let mut s = Sampler::new(params);
        let mut c = [0; 6];
        for _ in 0..draws {
            c[s.sample(&LOGITS, history) as usize] += 1;
        }
        c
    }

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let c = counts(SamplingParams::default(), 50, &[]);
        assert_eq!(c, [0, 0, 0, 0, 0, 50]);
    }

    #[test]
    fn temperature_one_follows_the_softmax() {
        let c = counts(params(|_| {}), 20000, &[]);
        let z: f64 = LOGITS.iter().map(|&l| (l as f64).exp()).sum();
        for (i, &n) in c.iter().enumerate() {
            let want = (LOGITS[i] as f64).exp() / z;
            let got = n as f64 / 20000.0;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn low_temperature_sharpens_high_temperature_flattens() {
        let cold = counts(params(|p| p.temperature = 0.2), 2000, &[]);
        let hot = counts(params(|p| p.temperature = 5.0), 2000, &[]);
        assert!(cold[5] > 1900, "{cold:?}");
        assert!(hot[4] > 150, "{hot:?}");
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        let c = counts(params(|p| p.top_k = 2), 2000, &[]);
        assert_eq!(c[1] + c[2] + c[3] + c[4], 0, "{c:?}");
        assert!(c[0] > 0 && c[5] > 0);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // p(5) = 0.61, p(0) = 0.22: 0.7 needs both.
        let c = counts(params(|p| p.top_p = 0.7), 2000, &[]);
        assert_eq!(c[1] + c[2] + c[3] + c[4], 0, "{c:?}");
        assert!(c[0] > 0 && c[5] > 0);
        let only = counts(params(|p| p.top_p = 0.5), 500, &[]);
        assert_eq!(only[5], 500);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Relative to p(5): token 0 is e^-1 = 0.37, token 1 e^-2 = 0.14.
        let c = counts(params(|p| p.min_p = 0.2), 2000, &[]);
        assert_eq!(c[1] + c[2] + c[3] + c[4], 0, "{c:?}");
        assert!(c[0] > 0);
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens_once_each() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        });
        // 3.0 / 2 = 1.5 < 2.0: token 0 wins once 5 has been seen, however often.
        assert_eq!(s.sample(&LOGITS, &[5]), 0);
        assert_eq!(s.sample(&LOGITS, &[5, 5, 5]), 0);
        // A negative logit is multiplied: -1 * 2 = -2.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            temperature: 0.0,
            ..SamplingParams::default()
        });
        assert_eq!(s.sample(&[-1.0, -1.5], &[0]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let a = counts(params(|p| p.seed = 42), 300, &[]);
        let b = counts(params(|p| p.seed = 42), 300, &[]);
        let c = counts(params(|p| p.seed = 43), 300, &[]);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn invalid_settings_name_the_flag() {
        assert!(params(|p| p.top_p = 0.0)
            .validate()
            .unwrap_err()
            .contains("--top-p"));
        assert!(params(|p| p.temperature = -1.0)
            .validate()
            .unwrap_err()
            .contains("--temperature"));
        assert!(params(|p| p.min_p = 2.0)
            .validate()
            .unwrap_err()
            .contains("--min-p"));
        assert!(params(|p| p.repetition_penalty = 0.0)
            .validate()
            .unwrap_err()
            .contains("--repetition-penalty"));
    }
}
