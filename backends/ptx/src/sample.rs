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
//! global ones) and a choice, by one block, of the digit where the cumulative count (top-k)
//! or weight (top-p) from the top reaches its target. After three digits the threshold is a
//! likelihood e* and how many of the tokens tied at e* (the lowest ids) are kept. Top-p's
//! target is p of the weight top-k keeps, so its selection runs after top-k's.
//!
//! Launches, in order, each a pass over the vocabulary (a block per 1024 tokens) whose last
//! block to finish does the one-block work after it (`Kernel::last_block_done`): `max`
//! (per block the penalised maximum; the last block reduces them: the maximum, and the answer
//! where nothing is drawn), `weights` (likelihoods and the first histogram; then top-k's
//! first choice), top-k's histograms of digits 2 and 3 (each then its choice; the third also
//! top-p's first), top-p's two (each then its choice), `blocks` (kept weight per 1024
//! tokens; then the draw: the id, the seen bit, the generator's state, the histograms
//! cleared for the next step). Seven launches; a setting that is off skips its part.
use crate::builder::{Class, Kernel, Reg};
use crate::misc::{best_of_pairs, none_is_zero, reduce_best};

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
    /// u32: blocks of the running launch done (0 between launches: each launch's last block
    /// wraps it back). One counter serves every launch: a launch's blocks count only after
    /// their `griddepcontrol.wait`, when the launch before has finished.
    pub const COUNTER: u32 = 104;
    /// Five histograms of 1024 digits: counts u32[1024], then weight sums u64[1024].
    pub const HISTS: u32 = 128;
    pub const HIST_BYTES: u32 = 1024 * 12;
    pub const HIST_COUNT: u32 = 5;
    /// Per block of 1024 tokens: weight of the tokens above the threshold u64, ties u32.
    pub const BLOCKS: u32 = HISTS + HIST_COUNT * HIST_BYTES;

    /// Per block of 1024 tokens: its penalised maximum f32 and that token's id u32.
    pub fn pairs(vocab: u32) -> u32 {
        BLOCKS + 16 * super::blocks(vocab)
    }

    /// u32[V]: likelihoods' bits.
    pub fn likelihoods(vocab: u32) -> u32 {
        pairs(vocab) + 8 * super::blocks(vocab)
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
const DIGITS: u32 = 1024;
/// Items (tokens, digits, blocks of tokens) per thread of a pass.
const PER_THREAD: u32 = TOKENS_PER_BLOCK / PASS_THREADS;

/// Blocks of the passes over the vocabulary.
pub fn blocks(vocab: u32) -> u32 {
    vocab.div_ceil(TOKENS_PER_BLOCK)
}

/// The most tokens: the draw takes four blocks of the vocabulary per thread.
pub const MAX_VOCAB: u32 = PASS_THREADS * PER_THREAD * TOKENS_PER_BLOCK;

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
/// logits (`max`, `weights`: parameters logits, state), the next-id buffer (`blocks`, whose
/// last block draws: state, next) or the state alone.
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

/// The seven launches for a vocabulary of `vocab` tokens (`prefix` starts each kernel's
/// name). The constants of the likelihood are the host's (`exp`): `poly` innermost first.
pub fn kernels(prefix: &str, vocab: u32, exp: &ExpConstants) -> Vec<SampleKernel> {
    assert!(vocab > 0 && vocab <= MAX_VOCAB, "vocabulary of {vocab}");
    let g = blocks(vocab);
    let v = vocab as u64;
    // Bytes: logits and likelihoods 4 per token, seen bits 1/8, a histogram 12 KiB, a
    // block's sums 16, its maximum 8.
    let (hist, seen, sums) = (layout::HIST_BYTES as u64, v.div_ceil(8), 16 * g as u64);
    let n = |s: &str| format!("{prefix}_{s}");
    let pass = |name: String, ptx: String, params, bytes| SampleKernel {
        name,
        ptx,
        grid: g,
        block: PASS_THREADS,
        params,
        bytes,
    };
    let (max, weights) = (n("max"), n("weights"));
    let mut out = vec![
        pass(
            max.clone(),
            max_kernel(&max, vocab),
            SampleParams::LogitsState,
            4 * v + seen + 16 * g as u64,
        ),
        pass(
            weights.clone(),
            weights_kernel(&weights, vocab, exp),
            SampleParams::LogitsState,
            8 * v + seen + 2 * hist,
        ),
    ];
    // Top-k's digits 2 and 3, then top-p's, each histogram followed by its choice (the
    // third of top-k's by top-p's first too).
    for (s, tag, hists) in [(Select::TopK, "k", [1, 2]), (Select::TopP, "p", [3, 4])] {
        for digit in 2..=3u32 {
            let name = n(&format!("hist_{tag}{digit}"));
            let ptx = hist_kernel(&name, vocab, s, digit, hists[digit as usize - 2]);
            out.push(pass(name, ptx, SampleParams::State, 4 * v + 2 * hist));
        }
    }
    let blocks_name = n("blocks");
    let draw = sums + 4 * TOKENS_PER_BLOCK as u64 + layout::HIST_COUNT as u64 * hist;
    out.push(pass(
        blocks_name.clone(),
        blocks_kernel(&blocks_name, vocab),
        SampleParams::StateNext,
        4 * v + sums + draw,
    ));
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

/// The address of the word of the seen bits holding token `index`'s.
fn seen_addr(k: &mut Kernel, state: Reg, vocab: u32, index: Reg) -> Reg {
    let word = k.reg(Class::B32);
    k.ins(format!("shr.u32 {word}, {index}, 5;"));
    elem4(k, state, layout::seen(vocab), word)
}

/// The word of the seen bits holding token `index`'s.
fn seen_word(k: &mut Kernel, state: Reg, vocab: u32, index: Reg) -> Reg {
    let at = seen_addr(k, state, vocab, index);
    let bits = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {bits}, [{at}];"));
    bits
}

/// `l` penalised in place where token `index` was seen (its bit in `bits`, from
/// `seen_word`; the host's rule: positive logits divided, others multiplied); `(on, pen)`
/// from `penalty`.
fn penalise(k: &mut Kernel, (on, pen): (Reg, Reg), l: Reg, index: Reg, bits: Reg) {
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

/// `max`: per block of 1024 tokens, the penalised logits' maximum and its id (the first on
/// ties; NaN never wins) into the state's pairs; the last block reduces them into `MAX` and
/// `ARG` (id 0 where nothing won: every logit NaN or -inf).
fn max_kernel(name: &str, vocab: u32) -> String {
    let mut p = Pass::new(name, SampleParams::LogitsState, false);
    let (state, tid, block) = (p.state, p.tid, p.block);
    let logits = p.logits.expect("asked for");
    let pen = penalty(&mut p.k, state);
    let (bv, bi) = (p.k.reg(Class::F32), p.k.reg(Class::B32));
    p.k.ins(format!("mov.f32 {bv}, 0fFF800000;"));
    p.k.ins(format!("mov.u32 {bi}, {vocab};"));
    // Tokens in increasing id order: strictly greater keeps the first.
    let mut load = logit_and_seen(logits, state, vocab);
    p.each_token(vocab, &mut load, &mut |k, i, loaded, _| {
        let l = loaded[0];
        penalise(k, pen, l, i, loaded[1]);
        let better = k.reg(Class::Pred);
        k.ins(format!("setp.gt.f32 {better}, {l}, {bv};"));
        k.ins(format!("@{better} mov.f32 {bv}, {l};"));
        k.ins(format!("@{better} mov.u32 {bi}, {i};"));
    });
    let k = &mut p.k;
    let block_done = reduce_best(k, tid, bv, bi, PASS_THREADS);
    let at = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {at}, {block}, 8;"));
    k.ins(format!("add.u64 {at}, {at}, {state};"));
    k.ins(format!(
        "st.global.v2.b32 [{at}+{}], {{{bv}, {bi}}};",
        layout::pairs(vocab)
    ));
    k.place(&block_done);
    p.finish(move |k| {
        let pairs = k.reg(Class::B64);
        k.ins(format!(
            "add.u64 {pairs}, {state}, {};",
            layout::pairs(vocab)
        ));
        let g = blocks(vocab);
        let (bv, bi, done) = best_of_pairs(k, pairs, g, tid, PASS_THREADS, vocab);
        none_is_zero(k, bi, vocab);
        k.ins(format!("st.global.f32 [{state}+{}], {bv};", layout::MAX));
        k.ins(format!("st.global.u32 [{state}+{}], {bi};", layout::ARG));
        k.place(&done);
    })
}

/// `Pass::each_token`'s loads of a token's logit and the word of its seen bit.
fn logit_and_seen(logits: Reg, state: Reg, vocab: u32) -> impl FnMut(&mut Kernel, Reg) -> Vec<Reg> {
    move |k, at| {
        let a = elem4(k, logits, 0, at);
        let l = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {l}, [{a}];"));
        vec![l, seen_word(k, state, vocab, at)]
    }
}

/// `Pass::each_token`'s load of a token's likelihood bits.
fn bits_of(state: Reg, vocab: u32) -> impl FnMut(&mut Kernel, Reg) -> Vec<Reg> {
    move |k, at| vec![likelihood_bits(k, state, vocab, at)]
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

/// A pass's work on one token: kernel, token id, what its loads gave, label skipping to the
/// next token.
type TokenBody<'a> = dyn FnMut(&mut Kernel, Reg, &[Reg], &str) + 'a;

/// A pass over the vocabulary (a block of `PASS_THREADS` per 1024 tokens): its kernel with
/// the parameters `params` names, this thread and block, and the label ending the pass's
/// own work, to which it has already branched where nothing is drawn this step (if asked).
struct Pass {
    k: Kernel,
    logits: Option<Reg>,
    state: Reg,
    next: Option<Reg>,
    tid: Reg,
    block: Reg,
    body_end: String,
}

impl Pass {
    fn new(name: &str, params: SampleParams, skip_unless_drawn: bool) -> Pass {
        let mut k = Kernel::new(name);
        k.launch_bounds(PASS_THREADS, 1);
        let logits = (params == SampleParams::LogitsState).then(|| k.param_ptr("logits"));
        let state = k.param_ptr("state");
        let next = (params == SampleParams::StateNext).then(|| k.param_ptr("next"));
        let (tid, block) = k.thread_and_block();
        let body_end = k.label("body_end");
        if skip_unless_drawn {
            let skip = argmax_only(&mut k, state);
            k.ins(format!("@{skip} bra {body_end};"));
        }
        Pass {
            k,
            logits,
            state,
            next,
            tid,
            block,
            body_end,
        }
    }

    /// For this thread's four tokens `i` in its block: `load(k, i)` for all four first
    /// (their loads in flight together; a token past the vocabulary loads the last token's),
    /// then `body(k, i, loaded, next)` for each that lies in the vocabulary (`next` skips to
    /// the following one).
    fn each_token(
        &mut self,
        vocab: u32,
        load: &mut dyn FnMut(&mut Kernel, Reg) -> Vec<Reg>,
        body: &mut TokenBody,
    ) {
        let (block, tid) = (self.block, self.tid);
        let k = &mut self.k;
        let tokens: Vec<(Reg, Vec<Reg>)> = (0..PER_THREAD)
            .map(|u| {
                let i = k.reg(Class::B32);
                k.ins(format!(
                    "mad.lo.u32 {i}, {block}, {TOKENS_PER_BLOCK}, {tid};"
                ));
                k.ins(format!("add.u32 {i}, {i}, {};", u * PASS_THREADS));
                let at = k.reg(Class::B32);
                k.ins(format!("min.u32 {at}, {i}, {};", vocab - 1));
                (i, load(k, at))
            })
            .collect();
        for (i, loaded) in tokens {
            let next = k.label("next");
            k.leave_unless_below(i, vocab, &next);
            body(k, i, &loaded, &next);
            k.place(&next);
        }
    }

    /// Ends the pass's own work; every block then counts itself done, and the last one runs
    /// `last` (the one-block work that needs every block's results).
    fn finish(mut self, last: impl FnOnce(&mut Kernel)) -> String {
        let k = &mut self.k;
        k.place(&self.body_end);
        let counter = k.reg(Class::B64);
        k.ins(format!(
            "add.u64 {counter}, {}, {};",
            self.state,
            layout::COUNTER
        ));
        let is_last = k.last_block_done(counter, self.tid);
        let end = k.label("end");
        k.ins(format!("@!{is_last} bra {end};"));
        last(k);
        k.place(&end);
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
/// top 10 of the 30 bits); then top-k's first choice.
fn weights_kernel(name: &str, vocab: u32, c: &ExpConstants) -> String {
    let mut p = Pass::new(name, SampleParams::LogitsState, true);
    let (state, tid, logits) = (p.state, p.tid, p.logits.expect("asked for"));
    let k = &mut p.k;
    let local = shared_hist(k, tid, PASS_THREADS);
    let max = load(k, state, layout::MAX, Class::F32);
    let per_t = load(k, state, layout::PER_T, Class::F32);
    let scale = load(k, state, layout::SCALE, Class::F32);
    let pen = penalty(k, state);
    let mut load = logit_and_seen(logits, state, vocab);
    p.each_token(vocab, &mut load, &mut |k, i, loaded, _| {
        let l = loaded[0];
        penalise(k, pen, l, i, loaded[1]);
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
    p.finish(|k| choose(k, state, tid, Select::TopK, 1, 0))
}

/// Bits below digit `pass` (1-based, from the top): 20, 10, 0.
fn shift(pass: u32) -> u32 {
    30 - 10 * pass
}

/// `hist_*`: for selection `s` still searching, the histogram of digit `pass` (2 or 3) over
/// the tokens whose higher digits are those chosen so far, into histogram `hist`; then that
/// digit's choice (after top-k's third, top-p's first too).
fn hist_kernel(name: &str, vocab: u32, s: Select, pass: u32, hist: u32) -> String {
    let mut p = Pass::new(name, SampleParams::State, true);
    let (state, tid) = (p.state, p.tid);
    let k = &mut p.k;
    let status = load(k, state, s.at(), Class::B32);
    let settled = k.reg(Class::Pred);
    k.ins(format!("setp.ne.u32 {settled}, {status}, 0;"));
    k.ins(format!("@{settled} bra {};", p.body_end));
    let prefix = load(k, state, s.at() + 4, Class::B32);
    let local = shared_hist(k, tid, PASS_THREADS);
    let scale = load(k, state, layout::SCALE, Class::F32);
    let mut load = bits_of(state, vocab);
    p.each_token(vocab, &mut load, &mut |k, _, loaded, next| {
        let bits = loaded[0];
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
    p.finish(|k| {
        choose(k, state, tid, s, pass, hist);
        if s == Select::TopK && pass == 3 {
            // Top-p's first choice reads what top-k's last wrote (any thread of the block).
            k.ins("bar.sync 0;");
            choose(k, state, tid, Select::TopP, 1, 0);
        }
    })
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

/// A choice, in the last block of a pass (`PASS_THREADS` threads; thread t on digits
/// 1023 - 4t - j, j < 4, from the top). Finds the digit where selection `s`'s cumulative
/// count (top-k) or weight (top-p) reaches its remaining target, and records it (after the
/// third digit the selection is found); a target the tokens never reach keeps them all. The
/// first pass sets the selection up: top-k's target is k, top-p's p of the weight top-k
/// keeps (every token's without top-k). Every thread of the block must reach it.
fn choose(k: &mut Kernel, state: Reg, tid: Reg, s: Select, pass: u32, hist: u32) {
    let done = k.label("chosen");
    let skip = argmax_only(k, state);
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
                let kk = load(k, state, layout::TOP_K, Class::B32);
                k.ins(format!("cvt.u64.u32 {target}, {kk};"));
                let off = k.reg(Class::Pred);
                k.ins(format!("setp.eq.u32 {off}, {kk}, 0;"));
                k.ins(format!("@{off} mov.u32 {status}, 2;"));
            }
            Select::TopP => {
                // The weight top-k keeps: above its threshold, plus its ties.
                let ks = load(k, state, layout::K_SELECT, Class::B32);
                let kp = load(k, state, layout::K_SELECT + 4, Class::B32);
                let kr = load(k, state, layout::K_SELECT + 8, Class::B64);
                let ka = load(k, state, layout::K_SELECT + 16, Class::B64);
                let scale = load(k, state, layout::SCALE, Class::F32);
                let wk = weight(k, kp, scale);
                let total = k.reg(Class::B64);
                k.ins(format!("mad.lo.u64 {total}, {kr}, {wk}, {ka};"));
                let found = k.reg(Class::Pred);
                k.ins(format!("setp.eq.u32 {found}, {ks}, 1;"));
                let all = load(k, state, layout::TOTAL, Class::B64);
                k.ins(format!("selp.b64 {total}, {total}, {all}, {found};"));
                let p = load(k, state, layout::TOP_P, Class::F32);
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
    let base = layout::HISTS + hist * layout::HIST_BYTES;
    let gc = k.reg(Class::B64);
    k.ins(format!("add.u64 {gc}, {state}, {base};"));
    let gs = k.reg(Class::B64);
    k.ins(format!("add.u64 {gs}, {gc}, {};", 4 * DIGITS));
    let top = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {top}, {tid}, {PER_THREAD};"));
    k.ins(format!("sub.u32 {top}, {}, {top};", DIGITS - 1));
    let (mut ds, mut cs, mut sums) = (Vec::new(), Vec::new(), Vec::new());
    for j in 0..PER_THREAD {
        let d = k.reg(Class::B32);
        k.ins(format!("sub.u32 {d}, {top}, {j};"));
        let (ac, asum) = digit_addrs(k, gc, gs, d);
        let (c32, c, sum) = (k.reg(Class::B32), k.reg(Class::B64), k.reg(Class::B64));
        k.ins(format!("ld.global.u32 {c32}, [{ac}];"));
        k.ins(format!("cvt.u64.u32 {c}, {c32};"));
        k.ins(format!("ld.global.u64 {sum}, [{asum}];"));
        ds.push(d);
        cs.push(c);
        sums.push(sum);
    }
    let (cis, _) = scan_items(k, &cs, tid, PASS_THREADS);
    let (sis, stotal) = scan_items(k, &sums, tid, PASS_THREADS);
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
    let ns = k.imm_u32(if pass == 3 { 1 } else { 0 });
    // Top-k counts tokens, top-p weighs them.
    let (cumulative, own) = match s {
        Select::TopK => (&cis, &cs),
        Select::TopP => (&sis, &sums),
    };
    let shifted = k.reg(Class::B32);
    k.ins(format!("shl.b32 {shifted}, {prefix}, 10;"));
    for j in 0..PER_THREAD as usize {
        let (vj, own) = (cumulative[j], own[j]);
        let before = k.reg(Class::B64);
        k.ins(format!("sub.u64 {before}, {vj}, {own};"));
        // The crossing digit: the cumulative value reaches the target here, not before.
        let (reach, short) = (k.reg(Class::Pred), k.reg(Class::Pred));
        k.ins(format!("setp.ge.u64 {reach}, {vj}, {target};"));
        k.ins(format!("setp.lt.u64 {short}, {before}, {target};"));
        k.ins(format!("and.pred {reach}, {reach}, {short};"));
        let np = k.reg(Class::B32);
        k.ins(format!("or.b32 {np}, {shifted}, {};", ds[j]));
        let nt = k.reg(Class::B64);
        k.ins(format!("sub.u64 {nt}, {target}, {before};"));
        let na = k.reg(Class::B64);
        k.ins(format!("sub.u64 {na}, {}, {};", sis[j], sums[j]));
        k.ins(format!("add.u64 {na}, {na}, {above};"));
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
    }
    // Never reached (the last digit's cumulative value short of the target): keep all.
    let v = cumulative[PER_THREAD as usize - 1];
    let last = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {last}, {tid}, {};", PASS_THREADS - 1));
    let never = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u64 {never}, {v}, {target};"));
    k.ins(format!("and.pred {never}, {never}, {last};"));
    let two = k.imm_u32(2);
    k.ins(format!("@{never} st.global.u32 [{state}+{at}], {two};"));
    k.place(&done);
}

/// Inclusive prefix sums over the block of u64 items, `items` being this thread's
/// consecutive ones (threads in order), and the block's total, in every thread. Contains
/// barriers: every thread must reach it.
fn scan_items(k: &mut Kernel, items: &[Reg], tid: Reg, threads: u32) -> (Vec<Reg>, Reg) {
    let mut local: Vec<Reg> = Vec::new();
    for &x in items {
        let sum = k.reg(Class::B64);
        match local.last() {
            Some(prev) => k.ins(format!("add.u64 {sum}, {prev}, {x};")),
            None => k.ins(format!("mov.u64 {sum}, {x};")),
        }
        local.push(sum);
    }
    let own = *local.last().expect("items");
    let (incl, total) = block_scan(k, own, tid, threads);
    let before = k.reg(Class::B64);
    k.ins(format!("sub.u64 {before}, {incl}, {own};"));
    let out = local
        .iter()
        .map(|&l| {
            let r = k.reg(Class::B64);
            k.ins(format!("add.u64 {r}, {before}, {l};"));
            r
        })
        .collect();
    (out, total)
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
/// many are tied at it; then the draw.
fn blocks_kernel(name: &str, vocab: u32) -> String {
    let mut p = Pass::new(name, SampleParams::StateNext, true);
    let (state, tid, block) = (p.state, p.tid, p.block);
    let next = p.next.expect("asked for");
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
    let mut load = bits_of(state, vocab);
    p.each_token(vocab, &mut load, &mut |k, _, loaded, _| {
        let bits = loaded[0];
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
    p.finish(|k| draw(k, state, next, tid, vocab))
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
    let at = seen_addr(k, state, vocab, i);
    let (bits, bit) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("ld.global.u32 {bits}, [{at}];"));
    k.ins(format!("and.b32 {bit}, {i}, 31;"));
    let one = k.imm_u32(1);
    k.ins(format!("shl.b32 {bit}, {one}, {bit};"));
    k.ins(format!("or.b32 {bits}, {bits}, {bit};"));
    k.ins(format!("st.global.u32 [{at}], {bits};"));
    k.place(&skip);
}

/// The draw, in the last block of `blocks` (`PASS_THREADS` threads; thread t on blocks of
/// tokens 4t..4t + 3, then on tokens 4t..4t + 3 of the block drawn). The kept weight per
/// block of tokens (ties kept in id order across blocks), the generator's next number scaled
/// below their total, the block it falls in, then that block's tokens walked in id order:
/// the id into `next`. Also the seen bit, the generator's state, and the histograms cleared
/// for the next step. Every thread of the block must reach it.
fn draw(k: &mut Kernel, state: Reg, next: Reg, tid: Reg, vocab: u32) {
    let t0 = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {t0}, {tid}, 0;"));
    let done = k.label("drawn");
    let sampled = k.label("sampled");
    let skip = argmax_only(k, state);
    k.ins(format!("@!{skip} bra {sampled};"));
    // Nothing drawn: the penalised argmax, and no number taken from the generator.
    k.ins(format!("@!{t0} bra {done};"));
    let arg = load(k, state, layout::ARG, Class::B32);
    k.ins(format!("st.global.u32 [{next}], {arg};"));
    mark_seen(k, state, vocab, arg);
    k.ins(format!("bra {done};"));
    k.place(&sampled);
    let (e, m, we) = threshold(k, state);
    let scale = load(k, state, layout::SCALE, Class::F32);
    let first = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {first}, {tid}, {PER_THREAD};"));
    // This thread's blocks: their weight above the threshold and their ties.
    let g = blocks(vocab);
    let (mut aboves, mut ties) = (Vec::new(), Vec::new());
    for j in 0..PER_THREAD {
        let b = k.reg(Class::B32);
        k.ins(format!("add.u32 {b}, {first}, {j};"));
        let (above, tie) = (k.reg(Class::B64), k.reg(Class::B64));
        k.ins(format!("mov.u64 {above}, 0;"));
        k.ins(format!("mov.u64 {tie}, 0;"));
        let inside = k.reg(Class::Pred);
        k.ins(format!("setp.lt.u32 {inside}, {b}, {g};"));
        let at = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {at}, {b}, 16;"));
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
        k.ins(format!("@{inside} cvt.u64.u32 {tie}, {t32};"));
        aboves.push(above);
        ties.push(tie);
    }
    let (tis, _) = scan_items(k, &ties, tid, PASS_THREADS);
    // Ties kept in a block: those of the first m (in id order) that fall in it.
    let m64 = k.reg(Class::B64);
    k.ins(format!("cvt.u64.u32 {m64}, {m};"));
    let (mut keeps, mut kepts) = (Vec::new(), Vec::new());
    for j in 0..PER_THREAD as usize {
        let earlier = k.reg(Class::B64);
        k.ins(format!("sub.u64 {earlier}, {}, {};", tis[j], ties[j]));
        let keep = k.reg(Class::B64);
        k.ins(format!("max.u64 {keep}, {m64}, {earlier};"));
        k.ins(format!("sub.u64 {keep}, {keep}, {earlier};"));
        k.ins(format!("min.u64 {keep}, {keep}, {};", ties[j]));
        let kept = k.reg(Class::B64);
        k.ins(format!("mad.lo.u64 {kept}, {keep}, {we}, {};", aboves[j]));
        keeps.push(keep);
        kepts.push(kept);
    }
    let (kis, total) = scan_items(k, &kepts, tid, PASS_THREADS);
    // SplitMix64's next number, scaled below the total (`mul.hi`).
    let rng = load(k, state, layout::RNG, Class::B64);
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
    let drawn = k.reg(Class::B64);
    k.ins(format!("mul.hi.u64 {drawn}, {z}, {total};"));
    // The block the draw falls in tells the walk where to look.
    k.shared("d_pick", 24, 8);
    let pick = k.reg(Class::B64);
    k.ins(format!("mov.u64 {pick}, d_pick;"));
    for j in 0..PER_THREAD as usize {
        let (ge, rest) = falls_in(k, drawn, kis[j], kepts[j]);
        let b = k.reg(Class::B64);
        k.ins(format!("cvt.u64.u32 {b}, {first};"));
        k.ins(format!("add.u64 {b}, {b}, {j};"));
        k.ins(format!("@{ge} st.shared.u64 [{pick}], {b};"));
        k.ins(format!("@{ge} st.shared.u64 [{pick}+8], {rest};"));
        k.ins(format!("@{ge} st.shared.u64 [{pick}+16], {};", keeps[j]));
    }
    k.ins("bar.sync 0;");
    let (b, rest, keep) = (k.reg(Class::B64), k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("ld.shared.u64 {b}, [{pick}];"));
    k.ins(format!("ld.shared.u64 {rest}, [{pick}+8];"));
    k.ins(format!("ld.shared.u64 {keep}, [{pick}+16];"));
    // This thread's tokens of that block: b·1024 + 4t + j.
    let b32 = k.reg(Class::B32);
    k.ins(format!("cvt.u32.u64 {b32}, {b};"));
    let (mut ids, mut tie_preds, mut is_ties, mut all_bits) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for j in 0..PER_THREAD {
        let i = k.reg(Class::B32);
        k.ins(format!(
            "mad.lo.u32 {i}, {b32}, {TOKENS_PER_BLOCK}, {first};"
        ));
        k.ins(format!("add.u32 {i}, {i}, {j};"));
        let valid = k.reg(Class::Pred);
        k.ins(format!("setp.lt.u32 {valid}, {i}, {vocab};"));
        let bits = k.reg(Class::B32);
        k.ins(format!("mov.u32 {bits}, 0;"));
        let a = elem4(k, state, layout::likelihoods(vocab), i);
        k.ins(format!("@{valid} ld.global.u32 {bits}, [{a}];"));
        let tie = k.reg(Class::Pred);
        k.ins(format!("setp.eq.u32 {tie}, {bits}, {e};"));
        k.ins(format!("and.pred {tie}, {tie}, {valid};"));
        let is_tie = k.reg(Class::B64);
        k.ins(format!("selp.b64 {is_tie}, 1, 0, {tie};"));
        // Above the threshold (an invalid token's bits are 0, never above).
        let gt = k.reg(Class::Pred);
        k.ins(format!("setp.gt.u32 {gt}, {bits}, {e};"));
        ids.push((i, gt));
        tie_preds.push(tie);
        is_ties.push(is_tie);
        all_bits.push(bits);
    }
    let (ranks, _) = scan_items(k, &is_ties, tid, PASS_THREADS);
    let mut kws = Vec::new();
    for j in 0..PER_THREAD as usize {
        // Inclusive rank: kept while it is at most `keep`.
        let kept_tie = k.reg(Class::Pred);
        k.ins(format!("setp.le.u64 {kept_tie}, {}, {keep};", ranks[j]));
        k.ins(format!(
            "and.pred {kept_tie}, {kept_tie}, {};",
            tie_preds[j]
        ));
        let w = weight(k, all_bits[j], scale);
        let kw = k.reg(Class::B64);
        k.ins(format!("mov.u64 {kw}, 0;"));
        k.ins(format!("@{} mov.u64 {kw}, {w};", ids[j].1));
        k.ins(format!("@{kept_tie} mov.u64 {kw}, {we};"));
        kws.push(kw);
    }
    let (wis, _) = scan_items(k, &kws, tid, PASS_THREADS);
    // The histograms, cleared for the next step (nothing reads them in this launch's rest):
    // word tid + 256·j, every thread the same count.
    const HIST_WORDS: u32 = layout::HIST_COUNT * layout::HIST_BYTES / 4;
    const _: () = assert!(HIST_WORDS % PASS_THREADS == 0);
    let zero = k.imm_u32(0);
    let a = elem4(k, state, layout::HISTS, tid);
    for j in 0..HIST_WORDS / PASS_THREADS {
        k.ins(format!(
            "st.global.u32 [{a}+{}], {zero};",
            4 * j * PASS_THREADS
        ));
    }
    k.ins(format!(
        "@{t0} st.global.u64 [{state}+{}], {rng};",
        layout::RNG
    ));
    for j in 0..PER_THREAD as usize {
        let (ge, _) = falls_in(k, rest, wis[j], kws[j]);
        let not_here = k.label("not_drawn");
        k.ins(format!("@!{ge} bra {not_here};"));
        k.ins(format!("st.global.u32 [{next}], {};", ids[j].0));
        mark_seen(k, state, vocab, ids[j].0);
        k.place(&not_here);
    }
    k.place(&done);
}
