//! The small kernels around the layers: the embedding gather at the start of a decode step,
//! and on-device argmax at its end (so greedy decoding copies one id back per token).
use crate::builder::{Class, Kernel, Reg};
use crate::rg_lru::{addr4, load_weight, Storage};

pub const GATHER_BLOCK: u32 = 256;
pub const ARGMAX_THREADS: u32 = 1024;
/// Groups of four logits (or best pairs) whose loads an argmax keeps in flight together: 32
/// registers of the 64 a thread of a 1024-thread block may have.
const ARGMAX_UNROLL: u32 = 8;

/// Parameters: table `[V, D]`, ids `i32[1]`, out `f32[D]`. `scale` multiplies each value
/// (sqrt(D) as the reference rounds it). Launch: ceil(D / 256) blocks of 256.
pub fn gather(name: &str, width: u32, table: Storage, scale: Option<f32>) -> String {
    let mut k = Kernel::new(name);
    let tab = k.param_ptr("table");
    let ids = k.param_ptr("ids");
    let out = k.param_ptr("out");
    let (tid, block) = k.thread_and_block();
    let c = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {c}, {block}, {GATHER_BLOCK}, {tid};"));
    let done = k.label("done");
    k.leave_unless_below(c, width, &done);
    let id = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {id}, [{ids}];"));
    let at = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {at}, {id}, {width}, {c};"));
    let v = load_weight(&mut k, table, tab, at);
    if let Some(s) = scale {
        k.ins(format!("mul.f32 {v}, {v}, {};", Kernel::f32_imm(s)));
    }
    let o = addr4(&mut k, out, c);
    k.ins(format!("st.global.f32 [{o}], {v};"));
    k.place(&done);
    k.finish()
}

/// Parameters: logits `f32[V]` (16-byte aligned), out `i32[1]`. One block of 1024 threads;
/// the lowest index wins ties, as the host's argmax. NaN never wins.
pub fn argmax(name: &str, vocab: u32) -> String {
    let mut k = Kernel::new(name);
    k.launch_bounds(ARGMAX_THREADS, 1);
    let logits = k.param_ptr("logits");
    let out = k.param_ptr("out");
    let (_, bi, done) = block_argmax(&mut k, logits, vocab, ARGMAX_UNROLL);
    none_is_zero(&mut k, bi, vocab);
    k.ins(format!("st.global.u32 [{out}], {bi};"));
    k.place(&done);
    k.finish()
}

/// Visits one logit (its value and index) against a running best (value, index).
type Visit<'a> = dyn FnMut(&mut Kernel, Reg, Reg, (Reg, Reg)) + 'a;

/// The largest of `vocab` logits at `logits` and its index (the first on ties; NaN never
/// wins; index `vocab` if all are NaN), by a block of `ARGMAX_THREADS`, `unroll` groups of
/// four logits' loads in flight at a time. The code after it runs in thread 0 alone, up to
/// the returned label, which the caller places.
fn block_argmax(k: &mut Kernel, logits: Reg, vocab: u32, unroll: u32) -> (Reg, Reg, String) {
    let tid = k.reg(Class::B32);
    k.ins(format!("mov.u32 {tid}, %tid.x;"));
    // Four running bests per thread, one per element of a group of four (indices 4q + j),
    // so four compare chains run side by side; each visits its indices in increasing order
    // and keeps strictly greater values, so its first max stays; NaN never wins.
    let chains: Vec<(Reg, Reg)> = (0..4)
        .map(|_| {
            let (bv, bi) = (k.reg(Class::F32), k.reg(Class::B32));
            k.ins(format!("mov.f32 {bv}, 0fFF800000;"));
            k.ins(format!("mov.u32 {bi}, {vocab};"));
            (bv, bi)
        })
        .collect();
    // Element `index` with value `v` against running best `(bv, bi)`.
    let mut visit = |k: &mut Kernel, v: Reg, index: Reg, (bv, bi): (Reg, Reg)| {
        let better = k.reg(Class::Pred);
        k.ins(format!("setp.gt.f32 {better}, {v}, {bv};"));
        k.ins(format!("@{better} mov.f32 {bv}, {v};"));
        k.ins(format!("@{better} mov.u32 {bi}, {index};"));
    };
    // Groups of four logits with 16-byte loads, thread t taking groups t, t + 1024, ...:
    // `unroll` groups' loads in flight at a time (a rest in `unrolled`'s smaller batches).
    let quads = vocab / 4;
    let step = |k: &mut Kernel, qi: Reg, n: u32, visit: &mut Visit| {
        let mut loaded = Vec::new();
        for u in 0..n {
            let qu = k.reg(Class::B32);
            k.ins(format!("add.u32 {qu}, {qi}, {};", u * ARGMAX_THREADS));
            let at = k.reg(Class::B64);
            k.ins(format!("mul.wide.u32 {at}, {qu}, 16;"));
            k.ins(format!("add.u64 {at}, {at}, {logits};"));
            let v = k.regs4(Class::F32);
            k.ins(format!(
                "ld.global.v4.f32 {{{}, {}, {}, {}}}, [{at}];",
                v[0], v[1], v[2], v[3]
            ));
            loaded.push((qu, v));
        }
        for (qu, v) in loaded {
            for (j, vj) in v.iter().enumerate() {
                let index = k.reg(Class::B32);
                k.ins(format!("mad.lo.u32 {index}, {qu}, 4, {j};"));
                visit(k, *vj, index, chains[j]);
            }
        }
        k.ins(format!("add.u32 {qi}, {qi}, {};", n * ARGMAX_THREADS));
    };
    let qi = k.reg(Class::B32);
    k.ins(format!("mov.u32 {qi}, {tid};"));
    k.unrolled(qi, quads, ARGMAX_THREADS, unroll, &mut |k, m| {
        step(k, qi, m, &mut visit)
    });
    // The last vocab mod 4 logits, one per thread (after every group of four: higher indices
    // than any of chain 0's).
    if vocab % 4 != 0 {
        let skip = k.label("rest_end");
        k.leave_unless_below(tid, vocab % 4, &skip);
        let index = k.reg(Class::B32);
        k.ins(format!("add.u32 {index}, {tid}, {};", 4 * quads));
        let a = addr4(k, logits, index);
        let v = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {v}, [{a}];"));
        visit(k, v, index, chains[0]);
        k.place(&skip);
    }
    let (bv, bi) = chains[0];
    for &(ov, oi) in &chains[1..] {
        keep_better(k, bv, bi, ov, oi);
    }
    let done = reduce_best(k, tid, bv, bi, ARGMAX_THREADS);
    (bv, bi, done)
}

/// `(bv, bi)` becomes `(ov, oi)` where that is better: a larger value, or an equal one at a
/// lower index (NaN is never larger nor equal, so it never wins).
fn keep_better(k: &mut Kernel, bv: Reg, bi: Reg, ov: Reg, oi: Reg) {
    let gt = k.reg(Class::Pred);
    k.ins(format!("setp.gt.f32 {gt}, {ov}, {bv};"));
    let eq = k.reg(Class::Pred);
    k.ins(format!("setp.eq.f32 {eq}, {ov}, {bv};"));
    let lower = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {lower}, {oi}, {bi};"));
    k.ins(format!("and.pred {eq}, {eq}, {lower};"));
    k.ins(format!("or.pred {gt}, {gt}, {eq};"));
    k.ins(format!("@{gt} mov.f32 {bv}, {ov};"));
    k.ins(format!("@{gt} mov.u32 {bi}, {oi};"));
}

/// Every thread's `(bv, bi)` of a block of `threads` reduced to the best in thread 0; the
/// code after it runs in thread 0 alone, up to the returned label, which the caller places.
pub(crate) fn reduce_best(k: &mut Kernel, tid: Reg, bv: Reg, bi: Reg, threads: u32) -> String {
    let warps = threads / 32;
    let name_v = k.label("best_v").replace('$', "");
    let name_i = k.label("best_i").replace('$', "");
    k.shared(&name_v, 4 * warps, 16);
    k.shared(&name_i, 4 * warps, 16);
    for offset in [16, 8, 4, 2, 1] {
        let (ov, oi) = (k.reg(Class::F32), k.reg(Class::B32));
        k.ins(format!("shfl.sync.bfly.b32 {ov}, {bv}, {offset}, 31, -1;"));
        k.ins(format!("shfl.sync.bfly.b32 {oi}, {bi}, {offset}, 31, -1;"));
        keep_better(k, bv, bi, ov, oi);
    }
    let (warp, lane) = k.warp_and_lane(tid);
    let lane0 = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {lane0}, {lane}, 0;"));
    let (sv, si) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("mov.u64 {sv}, {name_v};"));
    k.ins(format!("mov.u64 {si}, {name_i};"));
    let off = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {off}, {warp}, 4;"));
    let (pv, pi) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("add.u64 {pv}, {sv}, {off};"));
    k.ins(format!("add.u64 {pi}, {si}, {off};"));
    k.ins(format!("@{lane0} st.shared.f32 [{pv}], {bv};"));
    k.ins(format!("@{lane0} st.shared.u32 [{pi}], {bi};"));
    k.ins("bar.sync 0;");
    let done = k.label("done");
    let not_first = k.reg(Class::Pred);
    k.ins(format!("setp.ne.u32 {not_first}, {tid}, 0;"));
    k.ins(format!("@{not_first} bra {done};"));
    k.ins(format!("ld.shared.f32 {bv}, [{sv}];"));
    k.ins(format!("ld.shared.u32 {bi}, [{si}];"));
    for w in 1..warps {
        let (ov, oi) = (k.reg(Class::F32), k.reg(Class::B32));
        k.ins(format!("ld.shared.f32 {ov}, [{sv}+{}];", 4 * w));
        k.ins(format!("ld.shared.u32 {oi}, [{si}+{}];", 4 * w));
        keep_better(k, bv, bi, ov, oi);
    }
    done
}

/// An index past `vocab`, where nothing won (all logits NaN), becomes 0 rather than an
/// out-of-range id.
pub(crate) fn none_is_zero(k: &mut Kernel, bi: Reg, vocab: u32) {
    let none = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {none}, {bi}, {vocab};"));
    k.ins(format!("@{none} mov.u32 {bi}, 0;"));
}

/// The greedy argmax from the pairs `gemv::gemv_with_best` wrote: the best of `slots`
/// (value, index) pairs by (larger value, else lower index), as `argmax` would find over the
/// whole output of `vocab` values. Parameters: best `[slots, 2]` (f32 value, u32 index), out
/// `i32[1]`. One block of 1024 threads.
pub fn argmax_best(name: &str, slots: u32, vocab: u32) -> String {
    let mut k = Kernel::new(name);
    k.launch_bounds(ARGMAX_THREADS, 1);
    let best = k.param_ptr("best");
    let out = k.param_ptr("out");
    let tid = k.reg(Class::B32);
    k.ins(format!("mov.u32 {tid}, %tid.x;"));
    let (_, bi, done) = best_of_pairs(&mut k, best, slots, tid, ARGMAX_THREADS, vocab);
    none_is_zero(&mut k, bi, vocab);
    k.ins(format!("st.global.u32 [{out}], {bi};"));
    k.place(&done);
    k.finish()
}

/// The best of `slots` (f32 value, u32 index) pairs at `pairs` by (larger value, else lower
/// index; index `vocab` where none wins), by a block of `threads`; the code after it runs in
/// thread 0 alone, up to the returned label, which the caller places.
pub(crate) fn best_of_pairs(
    k: &mut Kernel,
    pairs: Reg,
    slots: u32,
    tid: Reg,
    threads: u32,
    vocab: u32,
) -> (Reg, Reg, String) {
    let (bv, bi) = (k.reg(Class::F32), k.reg(Class::B32));
    k.ins(format!("mov.f32 {bv}, 0fFF800000;"));
    k.ins(format!("mov.u32 {bi}, {vocab};"));
    // Slots tid, tid + threads, ...: a slot's pairs come in no order of index, so the full
    // rule.
    let si = k.reg(Class::B32);
    k.ins(format!("mov.u32 {si}, {tid};"));
    k.unrolled(si, slots, threads, ARGMAX_UNROLL, &mut |k, n| {
        let at = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {at}, {si}, 8;"));
        k.ins(format!("add.u64 {at}, {at}, {pairs};"));
        let mut loaded = Vec::new();
        for u in 0..n {
            let (ov, oi) = (k.reg(Class::F32), k.reg(Class::B32));
            k.ins(format!(
                "ld.global.v2.b32 {{{ov}, {oi}}}, [{at}+{}];",
                8 * u * threads
            ));
            loaded.push((ov, oi));
        }
        for (ov, oi) in loaded {
            keep_better(k, bv, bi, ov, oi);
        }
        k.ins(format!("add.u32 {si}, {si}, {};", n * threads));
    });
    let done = reduce_best(k, tid, bv, bi, threads);
    (bv, bi, done)
}
