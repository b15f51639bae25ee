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
    /// 1 / temperature where tokens are drawn; `None` where the argmax is taken instead
    /// (temperature 0, or one so small its inverse overflows).
    fn inverse_temperature(&self) -> Option<f32> {
        let per_t = 1.0 / self.temperature;
        (self.temperature != 0.0 && per_t.is_finite()).then_some(per_t)
    }

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
}

/// Where the device sampler keeps the generator's state (u64) in its state buffer, as
/// `device_config` lays it out.
pub const DEVICE_RNG_OFFSET: u64 = 32;

/// The bytes of `device_config`: the start of the device sampler's state buffer.
pub const DEVICE_CONFIG_BYTES: usize = 40;

/// Into `bits`, a bit per token of a `vocab`-token vocabulary seen in `history` (bit
/// `id % 32` of word `id / 32`; ids past the vocabulary left out): the tokens the repetition
/// penalty applies to, once each, on the host and (uploaded) on the device.
pub fn seen_bits(bits: &mut Vec<u32>, history: &[u32], vocab: usize) {
    bits.clear();
    bits.resize(vocab.div_ceil(32), 0);
    for &id in history.iter().filter(|&&id| (id as usize) < vocab) {
        bits[id as usize / 32] |= 1 << (id % 32);
    }
}

/// `r / 2^64 · n` rounded down, exactly: below `n` for any `r` (the device's `mul.hi.u64`).
fn below(r: u64, n: u64) -> u64 {
    ((r as u128 * n as u128) >> 64) as u64
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Each token's likelihood relative to the most likely, as f32 bits, reused.
    bits: Vec<u32>,
    /// Each token's weight (`weight`), reused.
    weights: Vec<u64>,
    /// Candidates' ranking keys (`key`), reused.
    keys: Vec<u64>,
    /// Kept weight per `BLOCK` tokens, reused.
    blocks: Vec<u64>,
    adjusted: Vec<f32>,
    /// A bit per vocabulary entry: seen in the history (`seen_bits`), reused.
    seen: Vec<u32>,
}

/// Index of the largest value; the first one on ties, as the reference's argmax. NaN never
/// wins (index 0 if every value is NaN).
pub fn argmax(values: &[f32]) -> u32 {
    // The maximum first, then the first block holding it, then its place there: streaming
    // passes LLVM vectorises instead of one branchy one.
    let max = largest(values);
    let block = values
        .chunks(LANES)
        .position(|c| c.iter().fold(false, |hit, &v| hit | (v == max)))
        .unwrap_or(0);
    let at = values[block * LANES..].iter().position(|&v| v == max);
    (block * LANES + at.unwrap_or(0)) as u32
}

/// The largest value, NaN skipped (-inf if there is nothing else): 16 running maxima, which
/// LLVM keeps in vector registers (`f32::max`'s NaN rule keeps a plain fold scalar).
fn largest(values: &[f32]) -> f32 {
    let pick = |m: f32, v: f32| if v > m { v } else { m };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = values.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = pick(*m, v);
        }
    }
    rest.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| pick(m, v))
}

/// Tokens per pass of `likelihoods`' loop (its scratch stays in registers and L1).
const LANES: usize = 64;

/// The constants of `likelihood`, shared with the device sampler (`griffin-backend-ptx`'s
/// `sample`), which must compute the same bits: x = k·ln 2 + r with |r| ≤ ln 2 / 2
/// (`LN2_HI` + `LN2_LO` = ln 2, split so k·LN2_HI is exact); k rounded by adding and removing
/// `ROUND` (1.5 · 2^23; `round` is a libm call on baseline x86-64); e^r by Horner's rule on
/// `POLY` (Taylor, degree 6, innermost first; relative error below 3e-7).
pub mod exp {
    pub const CUTOFF: f32 = -87.0;
    pub const LOG2_E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_145_75;
    pub const LN2_LO: f32 = 1.428_606_8e-6;
    pub const ROUND: f32 = 12_582_912.0;
    pub const POLY: [f32; 7] = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        1.0 / 2.0,
        1.0,
        1.0,
    ];
}

/// `e^x` for `x` ≤ 0 in plain f32 arithmetic (no fused multiply-add, no libm), so every
/// machine, and the device sampler, gets the same bits for a seed; 0 below `exp::CUTOFF` and
/// for NaN; exactly 1 at 0.
#[inline(always)]
fn likelihood(x: f32) -> f32 {
    use exp::*;
    let valid = x >= CUTOFF;
    let x = if valid { x } else { 0.0 };
    let k = (x * LOG2_E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut poly = POLY[0];
    for &c in &POLY[1..] {
        poly = c + r * poly;
    }
    // SAFETY: x lies in [-87, 0], so k is an integer in [-126, 0] (`as` would check for NaN
    // and overflow lane by lane, which keeps LLVM from vectorising the conversion).
    let k = unsafe { k.to_int_unchecked::<i32>() };
    // 2^k, a normal f32: exact scaling.
    let scale = f32::from_bits(((127 + k) as u32) << 23);
    if valid {
        poly * scale
    } else {
        0.0
    }
}

/// Each token's likelihood relative to the most likely, `e^((l - max) / t)` (`likelihood`),
/// as f32 bits into `out` (non-negative f32s order as their bits do, so the bits rank
/// tokens), and its weight at `weight_scale` into `weights`.
fn likelihoods(out: &mut Vec<u32>, weights: &mut Vec<u64>, logits: &[f32], max: f32, per_t: f32) {
    out.clear();
    weights.clear();
    let scale = weight_scale(logits.len());
    let mut bits = [0u32; LANES];
    for chunk in logits.chunks(LANES) {
        for (&l, b) in chunk.iter().zip(&mut bits) {
            *b = likelihood((l - max) * per_t).to_bits();
        }
        let bits = &bits[..chunk.len()];
        out.extend_from_slice(bits);
        weights.extend(bits.iter().map(|&b| weight(b, scale)));
    }
}

/// The fixed-point scale of weights for a vocabulary of `vocab` tokens: 2^S with S as large
/// as lets every weight (at most 1 · 2^S) sum within 2^62 (S = 44 for 256,000 tokens).
/// Weights are integers, so every sum is exact and the same in any order or partition, on the
/// host and on the device. Tokens below 2^-S of the most likely (30 nats below it at S = 44)
/// weigh 0 and are never drawn (at most vocab · 2^-S of the most likely's weight).
pub fn weight_scale(vocab: usize) -> f32 {
    let bits = usize::BITS - vocab.max(2).saturating_sub(1).leading_zeros();
    f32::from_bits((127 + 62 - bits) << 23)
}

/// A token's weight: its likelihood (`likelihood` bits) times `scale`, truncated.
#[inline(always)]
fn weight(bits: u32, scale: f32) -> u64 {
    let w = f32::from_bits(bits) * scale;
    // SAFETY: likelihoods lie in [0, 1] and scale is at most 2^61: w is finite, in [0, 2^61].
    // (`as` would saturate lane by lane; a signed conversion is one instruction on x86-64,
    // an unsigned one a compare and a select more.)
    unsafe { w.to_int_unchecked::<i64>() as u64 }
}

/// Tokens per block of the draw's index: the draw finds its block by the blocks' sums, then
/// walks that block alone.
const BLOCK: usize = 1024;

/// A token's rank as one integer: more likely first (its likelihood's bits), then the lower
/// id (`!id`).
fn key(id: u32, bits: u32) -> u64 {
    (bits as u64) << 32 | !id as u64
}

fn key_bits(k: u64) -> u32 {
    (k >> 32) as u32
}

fn descending(a: &u64, b: &u64) -> std::cmp::Ordering {
    b.cmp(a)
}

/// How many of the highest-ranked `keys` it takes for their weights to reach `target` (all of
/// them if they never do); leaves those first. Quickselect on the cumulative weight: each
/// round splits the undecided range at its middle rank and keeps the half the answer lies in,
/// O(n) on average where sorting the candidates (256,000 for the 2B vocabulary) is
/// O(n log n).
fn nucleus(keys: &mut [u64], target: u64, scale: f32) -> usize {
    let w = |k: u64| weight(key_bits(k), scale);
    // keys[..lo] outrank keys[lo..] and sum to `below` < target; the answer lies in lo+1..=hi.
    let (mut lo, mut hi, mut below) = (0, keys.len(), 0u64);
    while hi - lo > 32 {
        let mid = lo + (hi - lo) / 2;
        keys[lo..hi].select_nth_unstable_by(mid - lo, descending);
        let upper: u64 = keys[lo..mid].iter().map(|&k| w(k)).sum();
        if below + upper >= target {
            hi = mid;
        } else {
            below += upper;
            lo = mid;
        }
    }
    keys[lo..hi].sort_unstable_by(descending);
    for (i, &k) in keys[lo..hi].iter().enumerate() {
        below += w(k);
        if below >= target {
            return lo + i + 1;
        }
    }
    hi
}

/// The lowest-ranked key of the tokens top-k, min-p and top-p keep (`SamplingParams`), each
/// cut as the full ranking would make it. Only tokens that can be kept are ranked: those at
/// least as likely as a bound found by a pass or two over the likelihoods (the first that
/// counts k tokens, or whose tokens already reach the top-p target), so a 256,000-token
/// vocabulary becomes the few hundred plausible ones before any selection.
fn lowest_kept(bits: &[u32], w: &[u64], keys: &mut Vec<u64>, p: &SamplingParams) -> u64 {
    let scale = weight_scale(bits.len());
    // min-p: the most likely token's likelihood is exactly 1.
    let floor = min_p_bits(p.min_p);
    let rank_from = |keys: &mut Vec<u64>, at_least: u32| {
        keys.clear();
        let likely = bits.iter().enumerate().filter(|&(_, &b)| b >= at_least);
        keys.extend(likely.map(|(i, &b)| key(i as u32, b)));
    };
    // Bounds 2^-8, 2^-16, ... down to 0 (every token), in f32 bits.
    let lower = |b: u32| b.saturating_sub(8 << 23);
    let first_bound = (127 - 8) << 23;
    let total: u64 = if p.top_k > 0 {
        // The k most likely lie at or above any bound that k tokens reach.
        let mut at_least = first_bound;
        while at_least > 0 && bits.iter().filter(|&&b| b >= at_least).count() < p.top_k {
            at_least = lower(at_least);
        }
        rank_from(keys, at_least);
        if p.top_k < keys.len() {
            keys.select_nth_unstable_by(p.top_k - 1, descending);
            keys.truncate(p.top_k);
        }
        let total = keys.iter().map(|&k| weight(key_bits(k), scale)).sum();
        keys.retain(|&k| key_bits(k) >= floor);
        total
    } else {
        let total: u64 = w.iter().sum();
        // The nucleus lies among any most likely tokens (min-p's survivors) that reach its
        // target.
        let target = top_p_target(total, p.top_p);
        let mut at_least = if p.top_p < 1.0 { first_bound } else { floor };
        loop {
            let bound = at_least.max(floor);
            let heavy = bits.iter().zip(w).filter(|&(&b, _)| b >= bound);
            if bound == floor || heavy.map(|(_, &x)| x).sum::<u64>() >= target {
                rank_from(keys, bound);
                break;
            }
            at_least = lower(at_least);
        }
        total
    };
    if p.top_p < 1.0 {
        let n = nucleus(keys, top_p_target(total, p.top_p), scale);
        keys.truncate(n);
    }
    keys.iter()
        .copied()
        .min()
        .expect("the most likely token is kept")
}

/// min-p as a bound on likelihoods' bits (0: every token; -0.0 too).
fn min_p_bits(min_p: f32) -> u32 {
    if min_p > 0.0 {
        min_p.to_bits()
    } else {
        0
    }
}

/// The weight the nucleus must reach: p of the candidates' `total` (the device sampler
/// computes the same f64 product).
fn top_p_target(total: u64, top_p: f32) -> u64 {
    (total as f64 * top_p as f64).ceil().max(1.0) as u64
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng(params.seed);
        Sampler {
            params,
            rng,
            bits: Vec::new(),
            weights: Vec::new(),
            keys: Vec::new(),
            blocks: Vec::new(),
            adjusted: Vec::new(),
            seen: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The generator's state (what `device_config` hands the device).
    pub fn generator_state(&self) -> u64 {
        self.rng.0
    }

    /// Takes the generator's state back from the device sampler (the bytes at
    /// `DEVICE_RNG_OFFSET` of its state after its draws).
    pub fn set_generator_state(&mut self, state: u64) {
        self.rng.0 = state;
    }

    /// The device sampler's configuration for a vocabulary of `vocab` tokens, with this
    /// sampler's generator state: the first bytes of its state buffer, as
    /// `griffin_backend_ptx::sample::layout` lays them out (1 / temperature, flags, penalty,
    /// top-k, top-p, min-p's bound, the weights' scale, the generator). From then on the
    /// device draws what this sampler would have (`tests/gpu_sample.rs` checks it), and this
    /// sampler's generator falls behind.
    pub fn device_config(&self, vocab: usize) -> [u8; DEVICE_CONFIG_BYTES] {
        let p = &self.params;
        let per_t = p.inverse_temperature();
        let flags = u32::from(per_t.is_none()) | u32::from(p.repetition_penalty != 1.0) << 1;
        let mut out = [0u8; DEVICE_CONFIG_BYTES];
        let words: [u32; 7] = [
            per_t.unwrap_or(0.0).to_bits(),
            flags,
            p.repetition_penalty.to_bits(),
            p.top_k.min(u32::MAX as usize) as u32,
            p.top_p.to_bits(),
            min_p_bits(p.min_p),
            weight_scale(vocab).to_bits(),
        ];
        for (i, w) in words.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        out[DEVICE_RNG_OFFSET as usize..].copy_from_slice(&self.rng.0.to_le_bytes());
        out
    }

    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 && self.params.repetition_penalty == 1.0
    }

    /// The next token after `history` (prompt and generated ids so far), given its logits.
    ///
    /// Sampled: each token's likelihood is `exp((l - max) / temperature)` (f32, `likelihood`)
    /// and its weight that in fixed point (`weight_scale`); the tokens, ranked most likely
    /// first (lower id on ties), are cut by top-k (the k first), min-p (those at least `min_p`
    /// as likely as the first) and top-p (the fewest first whose weight reaches p times the
    /// top-k tokens' weight); a uniform draw below the kept weight then walks the kept tokens
    /// in id order. Each cut is a selection, not a sort, and the draw one pass: for the 2B
    /// vocabulary 0.4–2.1 ms on this project's machine where sorting it took ~24
    /// (`benches/sampling.rs`). The device sampler (`griffin_backend_ptx::sample`) draws the
    /// same ids from `device_config`.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let logits = if p.repetition_penalty != 1.0 {
            self.adjusted.clear();
            self.adjusted.extend_from_slice(logits);
            // Each distinct token already seen is penalised once, however often it occurred.
            seen_bits(&mut self.seen, history, logits.len());
            for (w, &word) in self.seen.iter().enumerate() {
                let mut rest = word;
                while rest != 0 {
                    let l = &mut self.adjusted[32 * w + rest.trailing_zeros() as usize];
                    rest &= rest - 1;
                    if *l > 0.0 {
                        *l /= p.repetition_penalty;
                    } else {
                        *l *= p.repetition_penalty;
                    }
                }
            }
            &self.adjusted[..]
        } else {
            logits
        };
        let max = largest(logits);
        // Greedy, nothing to weigh against (every logit -inf or NaN) or an infinite logit (it
        // takes all the mass): the argmax.
        let per_t = match p.inverse_temperature() {
            Some(per_t) if max.is_finite() => per_t,
            _ => return argmax(logits),
        };
        let w = &mut self.weights;
        likelihoods(&mut self.bits, w, logits, max, per_t);
        // The lowest-ranked key kept (0: every token).
        let threshold = if p.top_k > 0 || p.min_p > 0.0 || p.top_p < 1.0 {
            lowest_kept(&self.bits, w, &mut self.keys, p)
        } else {
            0
        };
        // Kept: more likely than the threshold, or as likely with an id no higher.
        let bits = &self.bits;
        let (above, up_to) = (key_bits(threshold), !(threshold as u32));
        let kept_weight = |i: usize, w: u64| {
            let b = bits[i];
            if b > above || (b == above && i as u32 <= up_to) {
                w
            } else {
                0
            }
        };
        self.blocks.clear();
        if threshold == 0 {
            // Every token kept: plain sums.
            self.blocks
                .extend(w.chunks(BLOCK).map(|ws| ws.iter().sum::<u64>()));
        } else {
            self.blocks
                .extend(w.chunks(BLOCK).enumerate().map(|(b, ws)| {
                    let kept = ws.iter().enumerate();
                    kept.map(|(j, &x)| kept_weight(b * BLOCK + j, x))
                        .sum::<u64>()
                }));
        }
        let kept: u64 = self.blocks.iter().sum();
        let mut draw = below(self.rng.next_u64(), kept);
        for (b, &sum) in self.blocks.iter().enumerate() {
            if draw >= sum {
                draw -= sum;
                continue;
            }
            for (j, &x) in w[b * BLOCK..].iter().take(BLOCK).enumerate() {
                let x = kept_weight(b * BLOCK + j, x);
                if draw < x {
                    return (b * BLOCK + j) as u32;
                }
                draw -= x;
            }
        }
        unreachable!("the draw lies below the kept weight")
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
    fn likelihoods_are_within_3e_7_of_exp() {
        let logits: Vec<f32> = (0..=870_000).map(|i| -(i as f32) * 1e-4).collect();
        let mut bits = Vec::new();
        likelihoods(&mut bits, &mut Vec::new(), &logits, 0.0, 1.0);
        let mut worst = 0f64;
        for (&l, &b) in logits.iter().zip(&bits) {
            let want = (l as f64).exp();
            worst = worst.max((f32::from_bits(b) as f64 - want).abs() / want);
        }
        assert!(worst < 3e-7, "{worst}");
        let edge = [0.0, -88.0, f32::NEG_INFINITY, f32::NAN, -30.0, -31.0];
        likelihoods(&mut bits, &mut Vec::new(), &edge, 0.0, 1.0);
        assert_eq!(bits[..4], [1f32.to_bits(), 0, 0, 0]);
        // For the 2B vocabulary e^-30 · 2^44 ≈ 1.65: still drawn; e^-31 · 2^44 ≈ 0.61: never.
        let scale = weight_scale(256_000);
        assert_eq!([weight(bits[4], scale), weight(bits[5], scale)], [1, 0]);
        assert_eq!(weight_scale(256_000), (1u64 << 44) as f32);
        assert_eq!(weight_scale(6), (1u64 << 59) as f32);
        // Temperature divides the distance to the maximum.
        likelihoods(&mut bits, &mut Vec::new(), &[4.0, 2.0], 4.0, 0.5);
        let want = (-1f64).exp();
        assert!((f32::from_bits(bits[1]) as f64 - want).abs() / want < 3e-7);
    }

    #[test]
    fn degenerate_logits_and_temperatures_take_the_argmax() {
        let mut s = Sampler::new(params(|_| {}));
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0, f32::INFINITY], &[]), 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NAN, 2.0], &[]), 2);
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 3], &[]), 0);
        let mut tiny = Sampler::new(params(|p| p.temperature = 1e-45));
        assert_eq!(tiny.sample(&LOGITS, &[]), 5);
        let mut huge = Sampler::new(params(|p| p.temperature = f32::MAX));
        let drawn: std::collections::HashSet<u32> =
            (0..200).map(|_| huge.sample(&LOGITS, &[])).collect();
        assert_eq!(drawn.len(), 6, "every token equally likely: {drawn:?}");
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_never_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 0.5]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    /// The sampler's steps written plainly: every token sorted up front, the nucleus found by
    /// walking it (same likelihoods, same generator).
    fn sample_by_full_sort(p: &SamplingParams, rng: &mut Rng, logits: &[f32]) -> u32 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut bits = Vec::new();
        likelihoods(&mut bits, &mut Vec::new(), logits, max, 1.0 / p.temperature);
        let scale = weight_scale(logits.len());
        let mut c: Vec<(u32, u32)> = (0..bits.len() as u32)
            .map(|i| (i, bits[i as usize]))
            .collect();
        c.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let w = |b: u32| (f32::from_bits(b) as f64 * scale as f64) as u64;
        if p.top_k > 0 {
            c.truncate(p.top_k);
        }
        let total: u64 = c.iter().map(|&(_, b)| w(b)).sum();
        if p.min_p > 0.0 {
            c.retain(|&(_, b)| f32::from_bits(b) >= p.min_p);
        }
        if p.top_p < 1.0 {
            let target = (total as f64 * p.top_p as f64).ceil() as u64;
            let (mut cumulative, mut keep) = (0u64, 0);
            for &(_, b) in &c {
                keep += 1;
                cumulative += w(b);
                if cumulative >= target {
                    break;
                }
            }
            c.truncate(keep);
        }
        c.sort_by_key(|&(id, _)| id);
        let kept: u64 = c.iter().map(|&(_, b)| w(b)).sum();
        let mut draw = below(rng.next_u64(), kept);
        for &(id, b) in &c {
            if draw < w(b) {
                return id;
            }
            draw -= w(b);
        }
        unreachable!()
    }

    #[test]
    fn selection_draws_what_a_full_sort_draws() {
        // Vocabularies past the first sorted block (256), logits on a coarse grid (many ties),
        // some masked or NaN; every setting, 40 draws each from the same seed.
        let mut gen = Rng(99);
        for case in 0..60 {
            let vocab = [300, 1000, 5000][case % 3];
            let logits: Vec<f32> = (0..vocab)
                .map(|_| match gen.next_u64() % 50 {
                    0 => f32::NEG_INFINITY,
                    1 => f32::NAN,
                    r => (r % 24) as f32 * 0.5 - 6.0,
                })
                .collect();
            let params = SamplingParams {
                temperature: [0.3, 1.0, 4.0][case % 3],
                top_k: [0, 5, 700][(case / 3) % 3],
                top_p: [1.0, 0.9, 0.999][(case / 9) % 3],
                min_p: [0.0, 0.01][(case / 27) % 2],
                seed: case as u64,
                ..SamplingParams::default()
            };
            let mut sampler = Sampler::new(params.clone());
            let mut rng = Rng(params.seed);
            for draw in 0..40 {
                let want = sample_by_full_sort(&params, &mut rng, &logits);
                assert_eq!(
                    sampler.sample(&logits, &[]),
                    want,
                    "case {case} draw {draw}: {params:?}"
                );
            }
        }
    }

    #[test]
    fn nucleus_is_the_fewest_heaviest_reaching_the_target() {
        // 100 candidates of weight 1 (ids 0..100) and one of weight 50: every target, exact
        // sums at each split included.
        let scale = 1.0;
        let one = 1f32.to_bits();
        let fifty = 50f32.to_bits();
        for target in 1..=160u64 {
            let mut keys: Vec<u64> = (0..100).map(|id| key(id, one)).collect();
            keys.push(key(100, fifty));
            let n = nucleus(&mut keys, target, scale);
            let want = if target <= 50 {
                1
            } else {
                (target - 50 + 1).min(101) as usize
            };
            assert_eq!(n, want, "target {target}");
            let mut first: Vec<u64> = keys[..n].to_vec();
            first.sort_unstable_by(descending);
            // The heaviest, then the lowest ids.
            let ids: Vec<u32> = first.iter().map(|&k| !(k as u32)).collect();
            let mut expected = vec![100];
            expected.extend(0..n as u32 - 1);
            assert_eq!(ids, expected, "target {target}");
        }
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
