//! Sampling on the device: the next token drawn from the logits with temperature, top-k,
//! min-p, top-p and a repetition penalty, exactly as the host's sampler
//! (`griffin_runtime::sampling`) draws it for the same seed, so a sampled decode step copies
//! one id back instead of the vocabulary's logits.
//!
//! The host's definitions, which these kernels follow bit for bit: each token's likelihood
//! `e = exp((l - max) / t)` in plain f32 arithmetic (the same polynomial); tokens ranked by
//! `e`'s bits, then the lower id; integer weights `floor(e · 2^S)` summed exactly; the kept
//! set an upper set of that ranking (the strictest of top-k, min-p, top-p); a SplitMix64 draw
//! `mul.hi(r, kept weight)` walked in id order.
//!
//! The thresholds are radix selections over the likelihoods' 30 low bits (e ≤ 1, so bits 30
//! and 31 are 0), three digits of 10 bits: a histogram pass (counts and weight sums per digit
//! of the tokens matching the digits chosen so far; shared-memory atomics per block, then
//! global ones) and a one-block pass that finds the digit where the cumulative count (top-k)
//! or weight (top-p) from the top reaches its target. After three digits the threshold is a
//! likelihood e* and how many of the tokens tied at e* (the lowest ids) are kept. Top-p's
//! target is p of the weight top-k keeps, so its selection runs after top-k's.
//!
//! Launches, in order: `max` (penalised argmax: the maximum, and the answer where nothing is
//! drawn), `weights` (likelihoods and the first histogram), top-k's choose / histogram /
//! choose / histogram / choose, top-p's the same, `blocks` (kept weight per 1024 tokens),
//! `draw` (one block: the draw, the id, the seen bit, the generator's state; clears the
//! histograms for the next step). Fourteen launches; a setting that is off returns at once.
use crate::builder::{Class, Kernel, Reg};
use crate::misc::{block_argmax, ARGMAX_THREADS};

/// Byte offsets in the sampler's state buffer. The host writes the configuration (the
/// first `CONFIG_BYTES`) and the seen bits; the kernels the rest.
pub mod layout {
    /// f32: 1 / temperature.
    pub const PER_T: u32 = 0;
    /// u32: bit 0, take the argmax (temperature 0, or one whose inverse overflows); bit 1,
    /// repetition penalty on.
    pub const FLAGS: u32 = 4;
    pub const PENALTY: u32 = 8;
    /// u32: 0 for none.
    pub const TOP_K: u32 = 12;
    /// f32: 1 for none.
    pub const TOP_P: u32 = 16;
    /// u32: min-p as a bound on likelihoods' bits.
    pub const FLOOR: u32 = 20;
    /// f32: 2^S, the weights' fixed-point scale.
    pub const SCALE: u32 = 24;
    /// u64: the generator's state.
    pub const RNG: u32 = 32;
    pub const CONFIG_BYTES: u32 = 40;
    /// f32 and u32: the penalised maximum and its index.
    pub const MAX: u32 = 40;
    pub const ARG: u32 = 44;
    /// A selection's state: status u32 (0 searching, 1 found, 2 keeps all), digits chosen so
    /// far u32, remaining target u64 (count or weight), weight strictly above u64.
    pub const K_SELECT: u32 = 48;
    pub const P_SELECT: u32 = 72;
    /// u64: every token's weight.
    pub const TOTAL: u32 = 96;
    /// Five histograms of 1024 digits: counts u32[1024], then weight sums u64[1024].
    pub const HISTS: u32 = 128;
    pub const HIST_BYTES: u32 = 1024 * 12;
    pub const HIST_COUNT: u32 = 5;
    /// Per block of 1024 tokens: weight of the tokens above the threshold u64, ties u32.
    pub const BLOCKS: u32 = HISTS + HIST_COUNT * HIST_BYTES;

    /// u32[V]: likelihoods' bits.
    pub fn likelihoods(vocab: u32) -> u32 {
        BLOCKS + 16 * super::blocks(vocab)
    }

    /// u32[ceil(V / 32)]: a bit per token already seen (repetition penalty).
    pub fn seen(vocab: u32) -> u32 {
        (likelihoods(vocab) + 4 * vocab).div_ceil(16) * 16
    }

    pub fn bytes(vocab: u32) -> u32 {
        seen(vocab) + 4 * vocab.div_ceil(32)
    }
}

/// Tokens per block of the passes over the vocabulary (as the host's `BLOCK`).
pub const TOKENS_PER_BLOCK: u32 = 1024;
/// Threads of those passes (four tokens each).
pub const PASS_THREADS: u32 = 256;
/// Threads of the one-block passes.
pub const ONE_BLOCK: u32 = 1024;
const DIGITS: u32 = 1024;

/// Blocks of the passes over the vocabulary.
pub fn blocks(vocab: u32) -> u32 {
    vocab.div_ceil(TOKENS_PER_BLOCK)
}

/// The most tokens: `draw` takes a block of the vocabulary per thread.
pub const MAX_VOCAB: u32 = ONE_BLOCK * TOKENS_PER_BLOCK;

/// Which selection a launch works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    TopK,
    TopP,
}

impl Select {
    fn at(self) -> u32 {
        match self {
            Select::TopK => layout::K_SELECT,
            Select::TopP => layout::P_SELECT,
        }
    }
}

/// One launch of the sampler: kernel name, PTX, grid, block size, and whether it takes the
/// logits (`max`, `weights`: parameters logits, state), the next-id buffer (`draw`: state,
/// next) or the state alone.
pub struct SampleKernel {
    pub name: String,
    pub ptx: String,
    pub grid: u32,
    pub block: u32,
    pub params: SampleParams,
    /// Global memory it reads or writes at the least with every setting on (`--profile`'s
    /// rates).
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleParams {
    LogitsState,
    State,
    StateNext,
}

impl SampleParams {
    /// The launch's arguments, in order, from the three buffers' addresses (or ids).
    pub fn args<T: Copy>(self, logits: T, state: T, next: T) -> Vec<T> {
        match self {
            SampleParams::LogitsState => vec![logits, state],
            SampleParams::State => vec![state],
            SampleParams::StateNext => vec![state, next],
        }
    }
}

/// The fourteen launches for a vocabulary of `vocab` tokens (`prefix` starts each kernel's
/// name). The constants of the likelihood are the host's (`exp`): `poly` innermost first.
pub fn kernels(prefix: &str, vocab: u32, exp: &ExpConstants) -> Vec<SampleKernel> {
    assert!(vocab > 0 && vocab <= MAX_VOCAB, "vocabulary of {vocab}");
    let g = blocks(vocab);
    let v = vocab as u64;
    // Bytes: logits and likelihoods 4 per token, seen bits 1/8, a histogram 12 KiB, a
    // block's sums 16.
    let (hist, seen, sums) = (layout::HIST_BYTES as u64, v.div_ceil(8), 16 * g as u64);
    let mut out = Vec::new();
    let mut push = |name: String, ptx: String, grid, block, params, bytes| {
        out.push(SampleKernel {
            name,
            ptx,
            grid,
            block,
            params,
            bytes,
        })
    };
    let n = |s: &str| format!("{prefix}_{s}");
    let (max, weights) = (n("max"), n("weights"));
    let ptx = max_kernel(&max, vocab);
    push(
        max,
        ptx,
        1,
        ARGMAX_THREADS,
        SampleParams::LogitsState,
        4 * v + seen,
    );
    let ptx = weights_kernel(&weights, vocab, exp);
    let bytes = 8 * v + seen + hist;
    push(
        weights,
        ptx,
        g,
        PASS_THREADS,
        SampleParams::LogitsState,
        bytes,
    );
    for (s, tag, hists) in [(Select::TopK, "k", [1, 2]), (Select::TopP, "p", [3, 4])] {
        for pass in 1..=3u32 {
            if pass > 1 {
                let name = n(&format!("hist_{tag}{pass}"));
                let ptx = hist_kernel(&name, vocab, s, pass, hists[pass as usize - 2]);
                push(
                    name,
                    ptx,
                    g,
                    PASS_THREADS,
                    SampleParams::State,
                    4 * v + hist,
                );
            }
            let hist_at = if pass == 1 {
                0
            } else {
                hists[pass as usize - 2]
            };
            let name = n(&format!("choose_{tag}{pass}"));
            let ptx = choose_kernel(&name, s, pass, hist_at);
            push(name, ptx, 1, ONE_BLOCK, SampleParams::State, hist);
        }
    }
    let (blocks_name, draw) = (n("blocks"), n("draw"));
    let ptx = blocks_kernel(&blocks_name, vocab);
    push(
        blocks_name,
        ptx,
        g,
        PASS_THREADS,
        SampleParams::State,
        4 * v + sums,
    );
    let ptx = draw_kernel(&draw, vocab);
    let bytes = sums + 4 * TOKENS_PER_BLOCK as u64 + layout::HIST_COUNT as u64 * hist;
    push(draw, ptx, 1, ONE_BLOCK, SampleParams::StateNext, bytes);
    out
}

/// The host's likelihood constants (`griffin_runtime::sampling::exp`).
pub struct ExpConstants {
    pub cutoff: f32,
    pub log2_e: f32,
    pub ln2_hi: f32,
    pub ln2_lo: f32,
    pub round: f32,
    pub poly: [f32; 7],
}

fn f(v: f32) -> String {
    Kernel::f32_imm(v)
}

/// A u32 or u64 at `state + at` into a fresh register.
fn load(k: &mut Kernel, state: Reg, at: u32, class: Class) -> Reg {
    let r = k.reg(class);
    let ty = match class {
        Class::B64 => "u64",
        Class::F32 => "f32",
        _ => "u32",
    };
    k.ins(format!("ld.global.{ty} {r}, [{state}+{at}];"));
    r
}

/// A predicate: nothing is drawn this step (the argmax flag, or a maximum that is not
/// finite: every logit -inf or NaN, or an infinite one).
fn argmax_only(k: &mut Kernel, state: Reg) -> Reg {
    let flags = load(k, state, layout::FLAGS, Class::B32);
    let bit = k.reg(Class::B32);
    k.ins(format!("and.b32 {bit}, {flags}, 1;"));
    let p = k.reg(Class::Pred);
    k.ins(format!("setp.ne.u32 {p}, {bit}, 0;"));
    let max = load(k, state, layout::MAX, Class::F32);
    let a = k.reg(Class::F32);
    k.ins(format!("abs.f32 {a}, {max};"));
    // Infinite, or NaN (unordered).
    let not_finite = k.reg(Class::Pred);
    k.ins(format!("setp.geu.f32 {not_finite}, {a}, 0f7F800000;"));
    k.ins(format!("or.pred {p}, {p}, {not_finite};"));
    p
}

/// The repetition penalty's settings, loaded once per thread: 1 where it is on (else 0),
/// and the penalty.
fn penalty(k: &mut Kernel, state: Reg) -> (Reg, Reg) {
    let flags = load(k, state, layout::FLAGS, Class::B32);
    let on = k.reg(Class::B32);
    k.ins(format!("shr.u32 {on}, {flags}, 1;"));
    k.ins(format!("and.b32 {on}, {on}, 1;"));
    let pen = load(k, state, layout::PENALTY, Class::F32);
    (on, pen)
}

/// `l` penalised in place where token `index` was seen (the host's rule: positive logits
/// divided, others multiplied); `(on, pen)` from `penalty`.
fn penalise(k: &mut Kernel, state: Reg, seen: u32, (on, pen): (Reg, Reg), l: Reg, index: Reg) {
    let word = k.reg(Class::B32);
    k.ins(format!("shr.u32 {word}, {index}, 5;"));
    let at = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {at}, {word}, 4;"));
    k.ins(format!("add.u64 {at}, {at}, {state};"));
    let bits = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {bits}, [{at}+{seen}];"));
    let bit = k.reg(Class::B32);
    k.ins(format!("and.b32 {bit}, {index}, 31;"));
    k.ins(format!("shr.u32 {bits}, {bits}, {bit};"));
    k.ins(format!("and.b32 {bits}, {bits}, {on};"));
    let hit = k.reg(Class::Pred);
    k.ins(format!("setp.ne.u32 {hit}, {bits}, 0;"));
    let pos = k.reg(Class::Pred);
    k.ins(format!("setp.gt.f32 {pos}, {l}, 0f00000000;"));
    let (div, mul) = (k.reg(Class::F32), k.reg(Class::F32));
    k.ins(format!("div.rn.f32 {div}, {l}, {pen};"));
    k.ins(format!("mul.rn.f32 {mul}, {l}, {pen};"));
    k.ins(format!("selp.f32 {div}, {div}, {mul}, {pos};"));
    k.ins(format!("@{hit} mov.f32 {l}, {div};"));
}

/// `max`: the penalised logits' maximum and its index into the state (one block).
fn max_kernel(name: &str, vocab: u32) -> String {
    let mut k = Kernel::new(name);
    k.launch_bounds(ARGMAX_THREADS, 1);
    let logits = k.param_ptr("logits");
    let state = k.param_ptr("state");
    let seen = layout::seen(vocab);
    let pen = penalty(&mut k, state);
    // Six groups in flight: at eight the penalty's registers spill.
    let (bv, bi, done) = block_argmax(&mut k, logits, vocab, 6, &mut |k, v, i| {
        penalise(k, state, seen, pen, v, i)
    });
    k.ins(format!("st.global.f32 [{state}+{}], {bv};", layout::MAX));
    k.ins(format!("st.global.u32 [{state}+{}], {bi};", layout::ARG));
    k.place(&done);
    k.finish()
}

/// A token's weight: its likelihood (bits) times the scale, truncated.
fn weight(k: &mut Kernel, bits: Reg, scale: Reg) -> Reg {
    let e = k.reg(Class::F32);
    k.ins(format!("mov.b32 {e}, {bits};"));
    k.ins(format!("mul.rn.f32 {e}, {e}, {scale};"));
    let w = k.reg(Class::B64);
    k.ins(format!("cvt.rzi.u64.f32 {w}, {e};"));
    w
}

/// The likelihood of `x` (≤ 0) as the host computes it, its bits into a fresh register.
fn likelihood(k: &mut Kernel, x: Reg, c: &ExpConstants) -> Reg {
    let valid = k.reg(Class::Pred);
    k.ins(format!("setp.ge.f32 {valid}, {x}, {};", f(c.cutoff)));
    k.ins(format!("selp.f32 {x}, {x}, 0f00000000, {valid};"));
    let kf = k.reg(Class::F32);
    k.ins(format!("mul.rn.f32 {kf}, {x}, {};", f(c.log2_e)));
    k.ins(format!("add.rn.f32 {kf}, {kf}, {};", f(c.round)));
    k.ins(format!("sub.rn.f32 {kf}, {kf}, {};", f(c.round)));
    let (r, t) = (k.reg(Class::F32), k.reg(Class::F32));
    k.ins(format!("mul.rn.f32 {t}, {kf}, {};", f(c.ln2_hi)));
    k.ins(format!("sub.rn.f32 {r}, {x}, {t};"));
    k.ins(format!("mul.rn.f32 {t}, {kf}, {};", f(c.ln2_lo)));
    k.ins(format!("sub.rn.f32 {r}, {r}, {t};"));
    let poly = k.reg(Class::F32);
    k.ins(format!("mov.f32 {poly}, {};", f(c.poly[0])));
    for &coef in &c.poly[1..] {
        k.ins(format!("mul.rn.f32 {poly}, {r}, {poly};"));
        k.ins(format!("add.rn.f32 {poly}, {poly}, {};", f(coef)));
    }
    // 2^k as an f32 built from its exponent: k in [-126, 0] where valid.
    let ki = k.reg(Class::B32);
    k.ins(format!("cvt.rzi.s32.f32 {ki}, {kf};"));
    k.ins(format!("add.s32 {ki}, {ki}, 127;"));
    k.ins(format!("shl.b32 {ki}, {ki}, 23;"));
    let scale = k.reg(Class::F32);
    k.ins(format!("mov.b32 {scale}, {ki};"));
    k.ins(format!("mul.rn.f32 {poly}, {poly}, {scale};"));
    k.ins(format!("selp.f32 {poly}, {poly}, 0f00000000, {valid};"));
    let bits = k.reg(Class::B32);
    k.ins(format!("mov.b32 {bits}, {poly};"));
    bits
}

/// Shared-memory histogram of `DIGITS` counts and weight sums, cleared by the block; returns
/// (counts, sums) base addresses. A barrier follows the clearing.
fn shared_hist(k: &mut Kernel, tid: Reg, threads: u32) -> (Reg, Reg) {
    k.shared("h_count", 4 * DIGITS, 16);
    k.shared("h_sum", 8 * DIGITS, 16);
    let (c, s) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("mov.u64 {c}, h_count;"));
    k.ins(format!("mov.u64 {s}, h_sum;"));
    let (z32, z64) = (k.reg(Class::B32), k.reg(Class::B64));
    k.ins(format!("mov.u32 {z32}, 0;"));
    k.ins(format!("mov.u64 {z64}, 0;"));
    for j in 0..DIGITS / threads {
        let d = k.reg(Class::B32);
        k.ins(format!("add.u32 {d}, {tid}, {};", j * threads));
        let (ac, asum) = digit_addrs(k, c, s, d);
        k.ins(format!("st.shared.u32 [{ac}], {z32};"));
        k.ins(format!("st.shared.u64 [{asum}], {z64};"));
    }
    k.ins("bar.sync 0;");
    (c, s)
}

/// Addresses of digit `d`'s count and sum given the two arrays' bases.
fn digit_addrs(k: &mut Kernel, counts: Reg, sums: Reg, d: Reg) -> (Reg, Reg) {
    let (ac, asum) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("mul.wide.u32 {ac}, {d}, 4;"));
    k.ins(format!("add.u64 {ac}, {ac}, {counts};"));
    k.ins(format!("mul.wide.u32 {asum}, {d}, 8;"));
    k.ins(format!("add.u64 {asum}, {asum}, {sums};"));
    (ac, asum)
}

/// After a barrier, adds the block's histogram into global histogram `hist` (digits with a
/// count only).
fn flush_hist(k: &mut Kernel, state: Reg, tid: Reg, threads: u32, local: (Reg, Reg), hist: u32) {
    k.ins("bar.sync 0;");
    let base = layout::HISTS + hist * layout::HIST_BYTES;
    let gc = k.reg(Class::B64);
    k.ins(format!("add.u64 {gc}, {state}, {base};"));
    let gs = k.reg(Class::B64);
    k.ins(format!("add.u64 {gs}, {gc}, {};", 4 * DIGITS));
    for j in 0..DIGITS / threads {
        let d = k.reg(Class::B32);
        k.ins(format!("add.u32 {d}, {tid}, {};", j * threads));
        let (lc, ls) = digit_addrs(k, local.0, local.1, d);
        let (c, s) = (k.reg(Class::B32), k.reg(Class::B64));
        k.ins(format!("ld.shared.u32 {c}, [{lc}];"));
        k.ins(format!("ld.shared.u64 {s}, [{ls}];"));
        let skip = k.label("empty");
        let none = k.reg(Class::Pred);
        k.ins(format!("setp.eq.u32 {none}, {c}, 0;"));
        k.ins(format!("@{none} bra {skip};"));
        let (ac, asum) = digit_addrs(k, gc, gs, d);
        k.ins(format!("red.global.add.u32 [{ac}], {c};"));
        k.ins(format!("red.global.add.u64 [{asum}], {s};"));
        k.place(&skip);
    }
}

/// Adds a token (likelihood `bits`, weight `w`) to digit `d` of the block's histogram.
fn count(k: &mut Kernel, local: (Reg, Reg), d: Reg, w: Reg) {
    let (ac, asum) = digit_addrs(k, local.0, local.1, d);
    let one = k.imm_u32(1);
    k.ins(format!("red.shared.add.u32 [{ac}], {one};"));
    k.ins(format!("red.shared.add.u64 [{asum}], {w};"));
}

/// A pass over the vocabulary (a block of `PASS_THREADS` per 1024 tokens): its kernel with
/// the logits parameter if `logits`, then the state; this thread and block; and the label
/// ending it, to which it has already branched where nothing is drawn this step.
struct Pass {
    k: Kernel,
    logits: Option<Reg>,
    state: Reg,
    tid: Reg,
    block: Reg,
    done: String,
}

impl Pass {
    fn new(name: &str, logits: bool) -> Pass {
        let mut k = Kernel::new(name);
        k.launch_bounds(PASS_THREADS, 1);
        let logits = logits.then(|| k.param_ptr("logits"));
        let state = k.param_ptr("state");
        let (tid, block) = k.thread_and_block();
        let done = k.label("done");
        let skip = argmax_only(&mut k, state);
        k.ins(format!("@{skip} bra {done};"));
        Pass {
            k,
            logits,
            state,
            tid,
            block,
            done,
        }
    }

    /// `body(k, i, next)` for each of this thread's four tokens `i` in its block that lie in
    /// the vocabulary (`next` skips to the following one).
    fn each_token(&mut self, vocab: u32, body: &mut dyn FnMut(&mut Kernel, Reg, &str)) {
        let (block, tid) = (self.block, self.tid);
        let k = &mut self.k;
        for u in 0..TOKENS_PER_BLOCK / PASS_THREADS {
            let i = k.reg(Class::B32);
            k.ins(format!(
                "mad.lo.u32 {i}, {block}, {TOKENS_PER_BLOCK}, {tid};"
            ));
            k.ins(format!("add.u32 {i}, {i}, {};", u * PASS_THREADS));
            let next = k.label("next");
            k.leave_unless_below(i, vocab, &next);
            body(k, i, &next);
            k.place(&next);
        }
    }

    fn finish(mut self) -> String {
        self.k.place(&self.done);
        self.k.finish()
    }
}

/// Token `i`'s likelihood bits, as `weights` stored them.
fn likelihood_bits(k: &mut Kernel, state: Reg, vocab: u32, i: Reg) -> Reg {
    let at = elem4(k, state, layout::likelihoods(vocab), i);
    let bits = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {bits}, [{at}];"));
    bits
}

/// Address of u32 element `i` of the array at `state + at`.
fn elem4(k: &mut Kernel, state: Reg, at: u32, i: Reg) -> Reg {
    let a = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {a}, {i}, 4;"));
    k.ins(format!("add.u64 {a}, {a}, {state};"));
    k.ins(format!("add.u64 {a}, {a}, {at};"));
    a
}

/// `weights`: every token's likelihood (bits, into the state) and the first histogram (the
/// top 10 of the 30 bits).
fn weights_kernel(name: &str, vocab: u32, c: &ExpConstants) -> String {
    let mut p = Pass::new(name, true);
    let (state, tid, logits) = (p.state, p.tid, p.logits.expect("asked for"));
    let k = &mut p.k;
    let local = shared_hist(k, tid, PASS_THREADS);
    let max = load(k, state, layout::MAX, Class::F32);
    let per_t = load(k, state, layout::PER_T, Class::F32);
    let scale = load(k, state, layout::SCALE, Class::F32);
    let pen = penalty(k, state);
    p.each_token(vocab, &mut |k, i, _| {
        let a = elem4(k, logits, 0, i);
        let l = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {l}, [{a}];"));
        penalise(k, state, layout::seen(vocab), pen, l, i);
        let x = k.reg(Class::F32);
        k.ins(format!("sub.rn.f32 {x}, {l}, {max};"));
        k.ins(format!("mul.rn.f32 {x}, {x}, {per_t};"));
        let bits = likelihood(k, x, c);
        let at = elem4(k, state, layout::likelihoods(vocab), i);
        k.ins(format!("st.global.u32 [{at}], {bits};"));
        let w = weight(k, bits, scale);
        let d = k.reg(Class::B32);
        k.ins(format!("shr.u32 {d}, {bits}, 20;"));
        count(k, local, d, w);
    });
    flush_hist(&mut p.k, state, tid, PASS_THREADS, local, 0);
    p.finish()
}

/// Bits below digit `pass` (1-based, from the top): 20, 10, 0.
fn shift(pass: u32) -> u32 {
    30 - 10 * pass
}

/// `hist_*`: for selection `s` still searching, the histogram of digit `pass` (2 or 3) over
/// the tokens whose higher digits are those chosen so far, into histogram `hist`.
fn hist_kernel(name: &str, vocab: u32, s: Select, pass: u32, hist: u32) -> String {
    let mut p = Pass::new(name, false);
    let (state, tid) = (p.state, p.tid);
    let k = &mut p.k;
    let status = load(k, state, s.at(), Class::B32);
    let settled = k.reg(Class::Pred);
    k.ins(format!("setp.ne.u32 {settled}, {status}, 0;"));
    k.ins(format!("@{settled} bra {};", p.done));
    let prefix = load(k, state, s.at() + 4, Class::B32);
    let local = shared_hist(k, tid, PASS_THREADS);
    let scale = load(k, state, layout::SCALE, Class::F32);
    p.each_token(vocab, &mut |k, i, next| {
        let bits = likelihood_bits(k, state, vocab, i);
        let high = k.reg(Class::B32);
        k.ins(format!("shr.u32 {high}, {bits}, {};", shift(pass - 1)));
        let other = k.reg(Class::Pred);
        k.ins(format!("setp.ne.u32 {other}, {high}, {prefix};"));
        k.ins(format!("@{other} bra {next};"));
        let d = k.reg(Class::B32);
        k.ins(format!("shr.u32 {d}, {bits}, {};", shift(pass)));
        k.ins(format!("and.b32 {d}, {d}, {};", DIGITS - 1));
        let w = weight(k, bits, scale);
        count(k, local, d, w);
    });
    flush_hist(&mut p.k, state, tid, PASS_THREADS, local, hist);
    p.finish()
}

/// Inclusive prefix sum of u64 `v` over a block of `threads` (thread order), and the
/// block's total, in every thread. Contains barriers: every thread must reach it.
fn block_scan(k: &mut Kernel, v: Reg, tid: Reg, threads: u32) -> (Reg, Reg) {
    let warps = threads / 32;
    let name = k.label("scan").replace('$', "");
    k.shared(&name, 8 * warps, 8);
    let (warp, lane) = k.warp_and_lane(tid);
    let x = k.reg(Class::B64);
    k.ins(format!("mov.u64 {x}, {v};"));
    for off in [1, 2, 4, 8, 16] {
        let (lo, hi) = (k.reg(Class::B32), k.reg(Class::B32));
        k.ins(format!("cvt.u32.u64 {lo}, {x};"));
        let h = k.reg(Class::B64);
        k.ins(format!("shr.u64 {h}, {x}, 32;"));
        k.ins(format!("cvt.u32.u64 {hi}, {h};"));
        k.ins(format!("shfl.sync.up.b32 {lo}, {lo}, {off}, 0, -1;"));
        k.ins(format!("shfl.sync.up.b32 {hi}, {hi}, {off}, 0, -1;"));
        let y = k.reg(Class::B64);
        k.ins(format!("cvt.u64.u32 {y}, {hi};"));
        k.ins(format!("shl.b64 {y}, {y}, 32;"));
        let ylo = k.reg(Class::B64);
        k.ins(format!("cvt.u64.u32 {ylo}, {lo};"));
        k.ins(format!("or.b64 {y}, {y}, {ylo};"));
        let take = k.reg(Class::Pred);
        k.ins(format!("setp.ge.u32 {take}, {lane}, {off};"));
        k.ins(format!("@{take} add.u64 {x}, {x}, {y};"));
    }
    let base = k.reg(Class::B64);
    k.ins(format!("mov.u64 {base}, {name};"));
    let last = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {last}, {lane}, 31;"));
    let slot = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {slot}, {warp}, 8;"));
    k.ins(format!("add.u64 {slot}, {slot}, {base};"));
    k.ins(format!("@{last} st.shared.u64 [{slot}], {x};"));
    k.ins("bar.sync 0;");
    let total = k.reg(Class::B64);
    k.ins(format!("mov.u64 {total}, 0;"));
    for w in 0..warps {
        let t = k.reg(Class::B64);
        k.ins(format!("ld.shared.u64 {t}, [{base}+{}];", 8 * w));
        let before = k.reg(Class::Pred);
        k.ins(format!("setp.gt.u32 {before}, {warp}, {w};"));
        k.ins(format!("@{before} add.u64 {x}, {x}, {t};"));
        k.ins(format!("add.u64 {total}, {total}, {t};"));
    }
    (x, total)
}

/// `choose_*`: one block, thread t on digit 1023 - t (from the top). Finds the digit where
/// selection `s`'s cumulative count (top-k) or weight (top-p) reaches its remaining target,
/// and records it (after the third digit the selection is found); a target the tokens never
/// reach keeps them all. The first pass sets the selection up: top-k's target is k, top-p's
/// p of the weight top-k keeps (every token's without top-k).
fn choose_kernel(name: &str, s: Select, pass: u32, hist: u32) -> String {
    let mut k = Kernel::new(name);
    k.launch_bounds(ONE_BLOCK, 1);
    let state = k.param_ptr("state");
    let tid = k.reg(Class::B32);
    k.ins(format!("mov.u32 {tid}, %tid.x;"));
    let done = k.label("done");
    let skip = argmax_only(&mut k, state);
    k.ins(format!("@{skip} bra {done};"));
    let at = s.at();
    let (status, prefix, target, above) = (
        k.reg(Class::B32),
        k.reg(Class::B32),
        k.reg(Class::B64),
        k.reg(Class::B64),
    );
    if pass == 1 {
        k.ins(format!("mov.u32 {status}, 0;"));
        k.ins(format!("mov.u32 {prefix}, 0;"));
        k.ins(format!("mov.u64 {above}, 0;"));
        match s {
            Select::TopK => {
                let kk = load(&mut k, state, layout::TOP_K, Class::B32);
                k.ins(format!("cvt.u64.u32 {target}, {kk};"));
                let off = k.reg(Class::Pred);
                k.ins(format!("setp.eq.u32 {off}, {kk}, 0;"));
                k.ins(format!("@{off} mov.u32 {status}, 2;"));
            }
            Select::TopP => {
                // The weight top-k keeps: above its threshold, plus its ties.
                let ks = load(&mut k, state, layout::K_SELECT, Class::B32);
                let kp = load(&mut k, state, layout::K_SELECT + 4, Class::B32);
                let kr = load(&mut k, state, layout::K_SELECT + 8, Class::B64);
                let ka = load(&mut k, state, layout::K_SELECT + 16, Class::B64);
                let scale = load(&mut k, state, layout::SCALE, Class::F32);
                let wk = weight(&mut k, kp, scale);
                let total = k.reg(Class::B64);
                k.ins(format!("mad.lo.u64 {total}, {kr}, {wk}, {ka};"));
                let found = k.reg(Class::Pred);
                k.ins(format!("setp.eq.u32 {found}, {ks}, 1;"));
                let all = load(&mut k, state, layout::TOTAL, Class::B64);
                k.ins(format!("selp.b64 {total}, {total}, {all}, {found};"));
                let p = load(&mut k, state, layout::TOP_P, Class::F32);
                let (tf, pf) = (k.reg(Class::F64), k.reg(Class::F64));
                k.ins(format!("cvt.rn.f64.u64 {tf}, {total};"));
                k.ins(format!("cvt.f64.f32 {pf}, {p};"));
                k.ins(format!("mul.rn.f64 {tf}, {tf}, {pf};"));
                k.ins(format!("cvt.rpi.u64.f64 {target}, {tf};"));
                k.ins(format!("max.u64 {target}, {target}, 1;"));
                let off = k.reg(Class::Pred);
                k.ins(format!("setp.ge.f32 {off}, {p}, 0f3F800000;"));
                k.ins(format!("@{off} mov.u32 {status}, 2;"));
            }
        }
    } else {
        k.ins(format!("ld.global.u32 {status}, [{state}+{at}];"));
        k.ins(format!("ld.global.u32 {prefix}, [{state}+{}];", at + 4));
        k.ins(format!("ld.global.u64 {target}, [{state}+{}];", at + 8));
        k.ins(format!("ld.global.u64 {above}, [{state}+{}];", at + 16));
    }
    // Off or settled: nothing to choose (top-k's first pass still totals every weight).
    let settled = k.reg(Class::Pred);
    k.ins(format!("setp.ne.u32 {settled}, {status}, 0;"));
    let first_k = s == Select::TopK && pass == 1;
    if !first_k {
        let leave = k.label("settled");
        k.ins(format!("@!{settled} bra {leave};"));
        if pass == 1 {
            let t0 = k.reg(Class::Pred);
            k.ins(format!("setp.eq.u32 {t0}, {tid}, 0;"));
            k.ins(format!("@{t0} st.global.u32 [{state}+{at}], {status};"));
        }
        k.ins(format!("bra {done};"));
        k.place(&leave);
    }
    let d = k.reg(Class::B32);
    k.ins(format!("sub.u32 {d}, {}, {tid};", DIGITS - 1));
    let base = layout::HISTS + hist * layout::HIST_BYTES;
    let gc = k.reg(Class::B64);
    k.ins(format!("add.u64 {gc}, {state}, {base};"));
    let gs = k.reg(Class::B64);
    k.ins(format!("add.u64 {gs}, {gc}, {};", 4 * DIGITS));
    let (ac, asum) = digit_addrs(&mut k, gc, gs, d);
    let (c32, c, sum) = (k.reg(Class::B32), k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("ld.global.u32 {c32}, [{ac}];"));
    k.ins(format!("cvt.u64.u32 {c}, {c32};"));
    k.ins(format!("ld.global.u64 {sum}, [{asum}];"));
    let (ci, _) = block_scan(&mut k, c, tid, ONE_BLOCK);
    let (si, stotal) = block_scan(&mut k, sum, tid, ONE_BLOCK);
    let t0 = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {t0}, {tid}, 0;"));
    if first_k {
        k.ins(format!(
            "@{t0} st.global.u64 [{state}+{}], {stotal};",
            layout::TOTAL
        ));
        let settled_t0 = k.reg(Class::Pred);
        k.ins(format!("and.pred {settled_t0}, {settled}, {t0};"));
        k.ins(format!(
            "@{settled_t0} st.global.u32 [{state}+{at}], {status};"
        ));
        k.ins(format!("@{settled} bra {done};"));
    }
    let (v, own) = match s {
        Select::TopK => (ci, c),
        Select::TopP => (si, sum),
    };
    let before = k.reg(Class::B64);
    k.ins(format!("sub.u64 {before}, {v}, {own};"));
    // The crossing digit: the cumulative value reaches the target here, not before.
    let (reach, short) = (k.reg(Class::Pred), k.reg(Class::Pred));
    k.ins(format!("setp.ge.u64 {reach}, {v}, {target};"));
    k.ins(format!("setp.lt.u64 {short}, {before}, {target};"));
    k.ins(format!("and.pred {reach}, {reach}, {short};"));
    let np = k.reg(Class::B32);
    k.ins(format!("shl.b32 {np}, {prefix}, 10;"));
    k.ins(format!("or.b32 {np}, {np}, {d};"));
    let nt = k.reg(Class::B64);
    k.ins(format!("sub.u64 {nt}, {target}, {before};"));
    let na = k.reg(Class::B64);
    k.ins(format!("sub.u64 {na}, {si}, {sum};"));
    k.ins(format!("add.u64 {na}, {na}, {above};"));
    let ns = k.imm_u32(if pass == 3 { 1 } else { 0 });
    k.ins(format!("@{reach} st.global.u32 [{state}+{at}], {ns};"));
    k.ins(format!(
        "@{reach} st.global.u32 [{state}+{}], {np};",
        at + 4
    ));
    k.ins(format!(
        "@{reach} st.global.u64 [{state}+{}], {nt};",
        at + 8
    ));
    k.ins(format!(
        "@{reach} st.global.u64 [{state}+{}], {na};",
        at + 16
    ));
    // Never reached (the last digit's cumulative value short of the target): keep all.
    let last = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {last}, {tid}, {};", ONE_BLOCK - 1));
    let never = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u64 {never}, {v}, {target};"));
    k.ins(format!("and.pred {never}, {never}, {last};"));
    let two = k.imm_u32(2);
    k.ins(format!("@{never} st.global.u32 [{state}+{at}], {two};"));
    k.place(&done);
    k.finish()
}

/// The kept set's threshold from the state, in every thread: the likelihood's bits e*, how
/// many tokens tied at e* are kept (the lowest ids; u32::MAX for all), and e*'s weight. The
/// strictest of min-p's floor (all ties), top-k's and top-p's (their counts).
fn threshold(k: &mut Kernel, state: Reg) -> (Reg, Reg, Reg) {
    let scale = load(k, state, layout::SCALE, Class::F32);
    let e = load(k, state, layout::FLOOR, Class::B32);
    let m = k.reg(Class::B32);
    k.ins(format!("mov.u32 {m}, {};", u32::MAX));
    for s in [Select::TopK, Select::TopP] {
        let status = load(k, state, s.at(), Class::B32);
        let se = load(k, state, s.at() + 4, Class::B32);
        let r = load(k, state, s.at() + 8, Class::B64);
        let sm = k.reg(Class::B32);
        match s {
            Select::TopK => k.ins(format!("cvt.u32.u64 {sm}, {r};")),
            Select::TopP => {
                // The fewest ties whose weight reaches the rest of the target.
                let w = weight(k, se, scale);
                let one = k.reg(Class::B64);
                k.ins(format!("max.u64 {one}, {w}, 1;"));
                let q = k.reg(Class::B64);
                k.ins(format!("add.u64 {q}, {r}, {one};"));
                k.ins(format!("sub.u64 {q}, {q}, 1;"));
                k.ins(format!("div.u64 {q}, {q}, {one};"));
                k.ins(format!("cvt.u32.u64 {sm}, {q};"));
            }
        }
        // Stricter: a higher likelihood, or the same with fewer ties.
        let (found, higher, same, fewer) = (
            k.reg(Class::Pred),
            k.reg(Class::Pred),
            k.reg(Class::Pred),
            k.reg(Class::Pred),
        );
        k.ins(format!("setp.eq.u32 {found}, {status}, 1;"));
        k.ins(format!("setp.gt.u32 {higher}, {se}, {e};"));
        k.ins(format!("setp.eq.u32 {same}, {se}, {e};"));
        k.ins(format!("setp.lt.u32 {fewer}, {sm}, {m};"));
        k.ins(format!("and.pred {same}, {same}, {fewer};"));
        k.ins(format!("or.pred {higher}, {higher}, {same};"));
        k.ins(format!("and.pred {higher}, {higher}, {found};"));
        k.ins(format!("@{higher} mov.u32 {e}, {se};"));
        k.ins(format!("@{higher} mov.u32 {m}, {sm};"));
    }
    let w = weight(k, e, scale);
    (e, m, w)
}

/// `blocks`: per block of 1024 tokens, the weight of its tokens above the threshold and how
/// many are tied at it.
fn blocks_kernel(name: &str, vocab: u32) -> String {
    let mut p = Pass::new(name, false);
    let (state, tid, block) = (p.state, p.tid, p.block);
    let k = &mut p.k;
    let (e, _, _) = threshold(k, state);
    let scale = load(k, state, layout::SCALE, Class::F32);
    k.shared("b_sum", 8, 8);
    k.shared("b_ties", 4, 4);
    let (bs, bt) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("mov.u64 {bs}, b_sum;"));
    k.ins(format!("mov.u64 {bt}, b_ties;"));
    let t0 = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {t0}, {tid}, 0;"));
    let (z32, z64) = (k.imm_u32(0), k.reg(Class::B64));
    k.ins(format!("mov.u64 {z64}, 0;"));
    k.ins(format!("@{t0} st.shared.u64 [{bs}], {z64};"));
    k.ins(format!("@{t0} st.shared.u32 [{bt}], {z32};"));
    k.ins("bar.sync 0;");
    let (sum, ties) = (k.reg(Class::B64), k.reg(Class::B32));
    k.ins(format!("mov.u64 {sum}, 0;"));
    k.ins(format!("mov.u32 {ties}, 0;"));
    p.each_token(vocab, &mut |k, i, _| {
        let bits = likelihood_bits(k, state, vocab, i);
        let w = weight(k, bits, scale);
        let (gt, eq) = (k.reg(Class::Pred), k.reg(Class::Pred));
        k.ins(format!("setp.gt.u32 {gt}, {bits}, {e};"));
        k.ins(format!("setp.eq.u32 {eq}, {bits}, {e};"));
        k.ins(format!("@{gt} add.u64 {sum}, {sum}, {w};"));
        k.ins(format!("@{eq} add.u32 {ties}, {ties}, 1;"));
    });
    let k = &mut p.k;
    k.ins(format!("red.shared.add.u64 [{bs}], {sum};"));
    k.ins(format!("red.shared.add.u32 [{bt}], {ties};"));
    k.ins("bar.sync 0;");
    let at = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {at}, {block}, 16;"));
    k.ins(format!("add.u64 {at}, {at}, {state};"));
    let (s, t) = (k.reg(Class::B64), k.reg(Class::B32));
    k.ins(format!("@{t0} ld.shared.u64 {s}, [{bs}];"));
    k.ins(format!("@{t0} ld.shared.u32 {t}, [{bt}];"));
    k.ins(format!(
        "@{t0} st.global.u64 [{at}+{}], {s};",
        layout::BLOCKS
    ));
    k.ins(format!(
        "@{t0} st.global.u32 [{at}+{}], {t};",
        layout::BLOCKS + 8
    ));
    p.finish()
}

/// Whether `x` falls in this thread's share `[incl - own, incl)` of an inclusive prefix sum
/// (`block_scan`), and `x`'s offset into it.
fn falls_in(k: &mut Kernel, x: Reg, incl: Reg, own: Reg) -> (Reg, Reg) {
    let start = k.reg(Class::B64);
    k.ins(format!("sub.u64 {start}, {incl}, {own};"));
    let (inside, below) = (k.reg(Class::Pred), k.reg(Class::Pred));
    k.ins(format!("setp.ge.u64 {inside}, {x}, {start};"));
    k.ins(format!("setp.lt.u64 {below}, {x}, {incl};"));
    k.ins(format!("and.pred {inside}, {inside}, {below};"));
    let offset = k.reg(Class::B64);
    k.ins(format!("sub.u64 {offset}, {x}, {start};"));
    (inside, offset)
}

/// Sets token `i`'s seen bit where the penalty is on (one thread).
fn mark_seen(k: &mut Kernel, state: Reg, vocab: u32, i: Reg) {
    let flags = load(k, state, layout::FLAGS, Class::B32);
    let on = k.reg(Class::B32);
    k.ins(format!("and.b32 {on}, {flags}, 2;"));
    let skip = k.label("unseen");
    let off = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {off}, {on}, 0;"));
    k.ins(format!("@{off} bra {skip};"));
    let word = k.reg(Class::B32);
    k.ins(format!("shr.u32 {word}, {i}, 5;"));
    let at = elem4(k, state, layout::seen(vocab), word);
    let (bits, bit) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("ld.global.u32 {bits}, [{at}];"));
    k.ins(format!("and.b32 {bit}, {i}, 31;"));
    let one = k.imm_u32(1);
    k.ins(format!("shl.b32 {bit}, {one}, {bit};"));
    k.ins(format!("or.b32 {bits}, {bits}, {bit};"));
    k.ins(format!("st.global.u32 [{at}], {bits};"));
    k.place(&skip);
}

/// `draw`: one block. The kept weight per block of tokens (ties kept in id order across
/// blocks), the generator's next number scaled below their total, the block it falls in,
/// then that block's tokens walked in id order: the id into `next`. Also the seen bit, the
/// generator's state, and the histograms cleared for the next step.
fn draw_kernel(name: &str, vocab: u32) -> String {
    let mut k = Kernel::new(name);
    k.launch_bounds(ONE_BLOCK, 1);
    let state = k.param_ptr("state");
    let next = k.param_ptr("next");
    let tid = k.reg(Class::B32);
    k.ins(format!("mov.u32 {tid}, %tid.x;"));
    let t0 = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {t0}, {tid}, 0;"));
    let done = k.label("done");
    let sampled = k.label("sampled");
    let skip = argmax_only(&mut k, state);
    k.ins(format!("@!{skip} bra {sampled};"));
    // Nothing drawn: the penalised argmax, and no number taken from the generator.
    k.ins(format!("@!{t0} bra {done};"));
    let arg = load(&mut k, state, layout::ARG, Class::B32);
    k.ins(format!("st.global.u32 [{next}], {arg};"));
    mark_seen(&mut k, state, vocab, arg);
    k.ins(format!("bra {done};"));
    k.place(&sampled);
    let (e, m, we) = threshold(&mut k, state);
    let scale = load(&mut k, state, layout::SCALE, Class::F32);
    // Thread t: block t's weight above the threshold and its ties.
    let g = blocks(vocab);
    let (above, ties) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("mov.u64 {above}, 0;"));
    k.ins(format!("mov.u64 {ties}, 0;"));
    let inside = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {inside}, {tid}, {g};"));
    let at = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {at}, {tid}, 16;"));
    k.ins(format!("add.u64 {at}, {at}, {state};"));
    let t32 = k.reg(Class::B32);
    k.ins(format!(
        "@{inside} ld.global.u64 {above}, [{at}+{}];",
        layout::BLOCKS
    ));
    k.ins(format!(
        "@{inside} ld.global.u32 {t32}, [{at}+{}];",
        layout::BLOCKS + 8
    ));
    k.ins(format!("@{inside} cvt.u64.u32 {ties}, {t32};"));
    let (ti, _) = block_scan(&mut k, ties, tid, ONE_BLOCK);
    // Ties kept here: those of the first m (in id order) that fall in this block.
    let earlier = k.reg(Class::B64);
    k.ins(format!("sub.u64 {earlier}, {ti}, {ties};"));
    let m64 = k.reg(Class::B64);
    k.ins(format!("cvt.u64.u32 {m64}, {m};"));
    let keep = k.reg(Class::B64);
    k.ins(format!("max.u64 {keep}, {m64}, {earlier};"));
    k.ins(format!("sub.u64 {keep}, {keep}, {earlier};"));
    k.ins(format!("min.u64 {keep}, {keep}, {ties};"));
    let kept = k.reg(Class::B64);
    k.ins(format!("mad.lo.u64 {kept}, {keep}, {we}, {above};"));
    let (ki, total) = block_scan(&mut k, kept, tid, ONE_BLOCK);
    // SplitMix64's next number, scaled below the total (`mul.hi`).
    let rng = load(&mut k, state, layout::RNG, Class::B64);
    k.ins(format!("add.u64 {rng}, {rng}, 0x9E3779B97F4A7C15;"));
    let z = k.reg(Class::B64);
    let t = k.reg(Class::B64);
    k.ins(format!("shr.u64 {t}, {rng}, 30;"));
    k.ins(format!("xor.b64 {z}, {rng}, {t};"));
    k.ins(format!("mul.lo.u64 {z}, {z}, 0xBF58476D1CE4E5B9;"));
    k.ins(format!("shr.u64 {t}, {z}, 27;"));
    k.ins(format!("xor.b64 {z}, {z}, {t};"));
    k.ins(format!("mul.lo.u64 {z}, {z}, 0x94D049BB133111EB;"));
    k.ins(format!("shr.u64 {t}, {z}, 31;"));
    k.ins(format!("xor.b64 {z}, {z}, {t};"));
    let draw = k.reg(Class::B64);
    k.ins(format!("mul.hi.u64 {draw}, {z}, {total};"));
    // The block the draw falls in tells the walk where to look.
    k.shared("d_pick", 24, 8);
    let pick = k.reg(Class::B64);
    k.ins(format!("mov.u64 {pick}, d_pick;"));
    let (ge, rest) = falls_in(&mut k, draw, ki, kept);
    let tid64 = k.reg(Class::B64);
    k.ins(format!("cvt.u64.u32 {tid64}, {tid};"));
    k.ins(format!("@{ge} st.shared.u64 [{pick}], {tid64};"));
    k.ins(format!("@{ge} st.shared.u64 [{pick}+8], {rest};"));
    k.ins(format!("@{ge} st.shared.u64 [{pick}+16], {keep};"));
    k.ins("bar.sync 0;");
    let (b, rest, keep) = (k.reg(Class::B64), k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("ld.shared.u64 {b}, [{pick}];"));
    k.ins(format!("ld.shared.u64 {rest}, [{pick}+8];"));
    k.ins(format!("ld.shared.u64 {keep}, [{pick}+16];"));
    // Thread t: token b·1024 + t.
    let b32 = k.reg(Class::B32);
    k.ins(format!("cvt.u32.u64 {b32}, {b};"));
    let i = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {i}, {b32}, {TOKENS_PER_BLOCK}, {tid};"));
    let valid = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {valid}, {i}, {vocab};"));
    let bits = k.reg(Class::B32);
    k.ins(format!("mov.u32 {bits}, 0;"));
    let a = elem4(&mut k, state, layout::likelihoods(vocab), i);
    k.ins(format!("@{valid} ld.global.u32 {bits}, [{a}];"));
    let tie = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {tie}, {bits}, {e};"));
    k.ins(format!("and.pred {tie}, {tie}, {valid};"));
    let is_tie = k.reg(Class::B64);
    k.ins(format!("selp.b64 {is_tie}, 1, 0, {tie};"));
    let (rank, _) = block_scan(&mut k, is_tie, tid, ONE_BLOCK);
    // Inclusive rank: kept while it is at most `keep`.
    let kept_tie = k.reg(Class::Pred);
    k.ins(format!("setp.le.u64 {kept_tie}, {rank}, {keep};"));
    k.ins(format!("and.pred {kept_tie}, {kept_tie}, {tie};"));
    let w = weight(&mut k, bits, scale);
    let kw = k.reg(Class::B64);
    k.ins(format!("mov.u64 {kw}, 0;"));
    let gt = k.reg(Class::Pred);
    k.ins(format!("setp.gt.u32 {gt}, {bits}, {e};"));
    k.ins(format!("and.pred {gt}, {gt}, {valid};"));
    k.ins(format!("@{gt} mov.u64 {kw}, {w};"));
    k.ins(format!("@{kept_tie} mov.u64 {kw}, {we};"));
    let (wi, _) = block_scan(&mut k, kw, tid, ONE_BLOCK);
    let (ge, _) = falls_in(&mut k, rest, wi, kw);
    // The histograms, cleared for the next step (nothing reads them in this launch).
    let zero = k.imm_u32(0);
    let words = layout::HIST_COUNT * layout::HIST_BYTES / 4;
    for j in 0..words.div_ceil(ONE_BLOCK) {
        let wj = k.reg(Class::B32);
        k.ins(format!("add.u32 {wj}, {tid}, {};", j * ONE_BLOCK));
        let skip_clear = k.label("cleared");
        k.leave_unless_below(wj, words, &skip_clear);
        let a = elem4(&mut k, state, layout::HISTS, wj);
        k.ins(format!("st.global.u32 [{a}], {zero};"));
        k.place(&skip_clear);
    }
    k.ins(format!(
        "@{t0} st.global.u64 [{state}+{}], {rng};",
        layout::RNG
    ));
    k.ins(format!("@!{ge} bra {done};"));
    k.ins(format!("st.global.u32 [{next}], {i};"));
    mark_seen(&mut k, state, vocab, i);
    k.place(&done);
    k.finish()
}
