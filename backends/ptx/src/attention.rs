//! Local attention for one decode token, in two launches:
//!
//! 1. `rotate_store`: one thread per element of this token's q, k and v rows. Rotary embedding
//!    (rotate-half on the first `dims` features) for q and k; q goes to a scratch buffer, k and
//!    v into the KV ring at slot `position mod W`. Angles are reduced modulo 2π in f64 before
//!    `sin.approx`/`cos.approx` (accurate to about 2^-21 on [-π, π]), so positions far into a
//!    long text keep their precision; the inverse frequencies come as an f64 table.
//! 2. `attend`: one thread block per query head, eight warps. Each warp takes every eighth
//!    position of the window and reduces its dot product with shuffles; scores live in shared
//!    memory; the block reduces max and sum; each thread accumulates output features.

use crate::builder::{Class, Kernel, Reg};
use crate::math::{combine_partials, exp, store_warp_partial, warp_reduce, warp_sum};
use crate::rg_lru::addr4;

#[derive(Clone, Debug)]
pub struct AttentionSpec {
    pub name: String,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub window: u32,
    pub scale: f32,
    /// (theta, rotated dims)
    pub rotary: Option<(f64, u32)>,
}

pub const ATTEND_WARPS: u32 = 8;
pub const ROTATE_BLOCK: u32 = 256;

/// The inverse frequencies `rotate_store` reads: `theta^(-2i/dims)` for i < dims/2.
pub fn inverse_frequencies(theta: f64, dims: u32) -> Vec<f64> {
    (0..dims / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / dims as f64))
        .collect()
}

/// Threads `rotate_store` needs: one per element of the q, k and v rows.
pub fn rotate_threads(s: &AttentionSpec) -> u32 {
    (s.heads + 2 * s.kv_heads) * s.head_dim
}

/// `sin` and `cos` of `p · inv_freq[i]`, reduced modulo 2π in f64.
fn sin_cos(k: &mut Kernel, pos: Reg, inv_freq: Reg, i: Reg) -> (Reg, Reg) {
    let off = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {off}, {i}, 8;"));
    let at = k.reg(Class::B64);
    k.ins(format!("add.u64 {at}, {inv_freq}, {off};"));
    let f = k.reg(Class::F64);
    k.ins(format!("ld.global.nc.f64 {f}, [{at}];"));
    let p = k.reg(Class::F64);
    k.ins(format!("cvt.rn.f64.u32 {p}, {pos};"));
    let angle = k.reg(Class::F64);
    k.ins(format!("mul.f64 {angle}, {p}, {f};"));
    let turns = k.reg(Class::F64);
    k.ins(format!(
        "mul.f64 {turns}, {angle}, {};",
        Kernel::f64_imm(1.0 / std::f64::consts::TAU)
    ));
    k.ins(format!("cvt.rni.f64.f64 {turns}, {turns};"));
    k.ins(format!(
        "fma.rn.f64 {angle}, {turns}, {}, {angle};",
        Kernel::f64_imm(-std::f64::consts::TAU)
    ));
    let r = k.reg(Class::F32);
    k.ins(format!("cvt.rn.f32.f64 {r}, {angle};"));
    let (sin, cos) = (k.reg(Class::F32), k.reg(Class::F32));
    k.ins(format!("sin.approx.f32 {sin}, {r};"));
    k.ins(format!("cos.approx.f32 {cos}, {r};"));
    (sin, cos)
}

/// Element `d` of the row starting at element `base_i` of `src`, rotated for position `pos`
/// (rotate-half on the first `dims` features; others unchanged).
fn rotated_element(
    k: &mut Kernel,
    s: &AttentionSpec,
    src: Reg,
    base_i: Reg,
    d: Reg,
    pos: Reg,
    inv_freq: Option<Reg>,
) -> Reg {
    let own_i = k.reg(Class::B32);
    k.ins(format!("add.u32 {own_i}, {base_i}, {d};"));
    let own_at = addr4(k, src, own_i);
    let own = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {own}, [{own_at}];"));
    let value = k.reg(Class::F32);
    k.ins(format!("mov.f32 {value}, {own};"));
    if let (Some((_, dims)), Some(inv_freq)) = (s.rotary, inv_freq) {
        let half = dims / 2;
        let skip = k.label("unrotated");
        k.leave_unless_below(d, dims, &skip);
        // First half: a·cos - b·sin with b = x[d + half]; second half: b·cos + a·sin with
        // a = x[d - half] (b is this element).
        let first = k.reg(Class::Pred);
        k.ins(format!("setp.lt.u32 {first}, {d}, {half};"));
        let i = k.reg(Class::B32);
        k.ins(format!("sub.u32 {i}, {d}, {half};"));
        k.ins(format!("selp.b32 {i}, {d}, {i}, {first};"));
        let partner_i = k.reg(Class::B32);
        k.ins(format!("add.u32 {partner_i}, {own_i}, {half};"));
        let back = k.reg(Class::B32);
        k.ins(format!("sub.u32 {back}, {own_i}, {half};"));
        k.ins(format!(
            "selp.b32 {partner_i}, {partner_i}, {back}, {first};"
        ));
        let partner_at = addr4(k, src, partner_i);
        let partner = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {partner}, [{partner_at}];"));
        let (sin, cos) = sin_cos(k, pos, inv_freq, i);
        // first: own·cos - partner·sin; second: own·cos + partner·sin.
        let signed_sin = k.reg(Class::F32);
        k.ins(format!("neg.f32 {signed_sin}, {sin};"));
        k.ins(format!(
            "selp.f32 {signed_sin}, {signed_sin}, {sin}, {first};"
        ));
        let ps = k.reg(Class::F32);
        k.ins(format!("mul.f32 {ps}, {partner}, {signed_sin};"));
        k.ins(format!("fma.rn.f32 {value}, {own}, {cos}, {ps};"));
        k.place(&skip);
    }
    value
}

/// Threads `rotate_tokens` needs for a chunk of `tokens`: one per element of the q and k rows.
pub fn rotate_tokens_threads(s: &AttentionSpec, tokens: u32) -> u32 {
    tokens * (s.heads + s.kv_heads) * s.head_dim
}

/// Prefill: rotates a chunk's queries and keys into scratch buffers (`attend_tokens` reads
/// them; `write_ring_tokens` stores the keys). Parameters: count `i32[1]`, start `i32[1]`, q
/// `f32[T,H,hd]`, k `f32[T,G,hd]`, [inv_freq `f64[dims/2]`], q_out `f32[T,H,hd]`, k_out
/// `f32[T,G,hd]`. Launch: `ceil(rotate_tokens_threads(T_max) / 256)` blocks of 256.
pub fn rotate_tokens(s: &AttentionSpec, max_tokens: u32) -> String {
    let mut k = Kernel::new(&format!("{}_rotate_tokens", s.name));
    let count = k.param_ptr("count");
    let start = k.param_ptr("start");
    let q = k.param_ptr("q");
    let kk = k.param_ptr("k");
    let inv_freq = s.rotary.map(|_| k.param_ptr("inv_freq"));
    let q_out = k.param_ptr("q_out");
    let k_out = k.param_ptr("k_out");
    let (hd, rows) = (s.head_dim, s.heads + s.kv_heads);
    let e = k.global_index(ROTATE_BLOCK);
    let done = k.label("done");
    let outside = k.reg(Class::Pred);
    k.ins(format!(
        "setp.ge.u32 {outside}, {e}, {};",
        rotate_tokens_threads(s, max_tokens)
    ));
    k.ins(format!("@{outside} bra {done};"));
    // e = (t · rows + row) · hd + d
    let (d, rest) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("rem.u32 {d}, {e}, {hd};"));
    k.ins(format!("div.u32 {rest}, {e}, {hd};"));
    let (row, t) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("rem.u32 {row}, {rest}, {rows};"));
    k.ins(format!("div.u32 {t}, {rest}, {rows};"));
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let past = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {past}, {t}, {n};"));
    k.ins(format!("@{past} bra {done};"));
    let pos = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {pos}, [{start}];"));
    k.ins(format!("add.u32 {pos}, {pos}, {t};"));
    let is_q = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {is_q}, {row}, {};", s.heads));
    // Row index within q ([T,H]) or k ([T,G]), and the buffers.
    let qr = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {qr}, {t}, {}, {row};", s.heads));
    let kr = k.reg(Class::B32);
    k.ins(format!("sub.u32 {kr}, {row}, {};", s.heads));
    k.ins(format!("mad.lo.u32 {kr}, {t}, {}, {kr};", s.kv_heads));
    let r = k.reg(Class::B32);
    k.ins(format!("selp.b32 {r}, {qr}, {kr}, {is_q};"));
    let (src, dst) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("selp.b64 {src}, {q}, {kk}, {is_q};"));
    k.ins(format!("selp.b64 {dst}, {q_out}, {k_out}, {is_q};"));
    let base_i = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {base_i}, {r}, {hd};"));
    let value = rotated_element(&mut k, s, src, base_i, d, pos, inv_freq);
    let oi = k.reg(Class::B32);
    k.ins(format!("add.u32 {oi}, {base_i}, {d};"));
    let oa = addr4(&mut k, dst, oi);
    k.ins(format!("st.global.f32 [{oa}], {value};"));
    k.place(&done);
    k.finish()
}

/// Prefill: stores the chunk's last `min(T, W)` rotated keys and values into the ring at slot
/// `position mod W`. Parameters: count `i32[1]`, start `i32[1]`, k `f32[T,G,hd]` (rotated), v
/// `f32[T,G,hd]`, keys, values. Launch: `ceil(T_max·G·hd / 256)` blocks of 256.
pub fn write_ring_tokens(s: &AttentionSpec, max_tokens: u32) -> String {
    let mut k = Kernel::new(&format!("{}_write_ring_tokens", s.name));
    let count = k.param_ptr("count");
    let start = k.param_ptr("start");
    let kk = k.param_ptr("k");
    let v = k.param_ptr("v");
    let keys = k.param_ptr("keys");
    let values = k.param_ptr("values");
    let row = s.kv_heads * s.head_dim;
    let e = k.global_index(ROTATE_BLOCK);
    let done = k.label("done");
    let outside = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {outside}, {e}, {};", max_tokens * row));
    k.ins(format!("@{outside} bra {done};"));
    let (t, within) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("div.u32 {t}, {e}, {row};"));
    k.ins(format!("rem.u32 {within}, {e}, {row};"));
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let past = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {past}, {t}, {n};"));
    k.ins(format!("@{past} bra {done};"));
    // Only the last W tokens survive in the ring: earlier ones would be overwritten in the
    // same launch, in no defined order.
    let keep = k.reg(Class::B32);
    k.ins(format!("add.u32 {keep}, {t}, {};", s.window));
    let early = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {early}, {keep}, {n};"));
    k.ins(format!("@{early} bra {done};"));
    let slot = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {slot}, [{start}];"));
    k.ins(format!("add.u32 {slot}, {slot}, {t};"));
    k.ins(format!("rem.u32 {slot}, {slot}, {};", s.window));
    let di = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {di}, {slot}, {row}, {within};"));
    for (src, dst) in [(kk, keys), (v, values)] {
        let sa = addr4(&mut k, src, e);
        let val = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {val}, [{sa}];"));
        let da = addr4(&mut k, dst, di);
        k.ins(format!("st.global.f32 [{da}], {val};"));
    }
    k.place(&done);
    k.finish()
}

/// Parameters: q `f32[H,hd]`, k `f32[G,hd]`, v `f32[G,hd]`, position `i32[1]`, [inv_freq
/// `f64[dims/2]`], q_out `f32[H,hd]`, keys `f32[W,G,hd]`, values `f32[W,G,hd]`.
pub fn rotate_store(s: &AttentionSpec) -> String {
    let mut k = Kernel::new(&format!("{}_rotate_store", s.name));
    let q = k.param_ptr("q");
    let kk = k.param_ptr("k");
    let v = k.param_ptr("v");
    let position = k.param_ptr("position");
    let inv_freq = s.rotary.map(|_| k.param_ptr("inv_freq"));
    let q_out = k.param_ptr("q_out");
    let keys = k.param_ptr("keys");
    let values = k.param_ptr("values");
    let hd = s.head_dim;

    let e = k.global_index(ROTATE_BLOCK);
    let done = k.label("done");
    let outside = k.reg(Class::Pred);
    k.ins(format!(
        "setp.ge.u32 {outside}, {e}, {};",
        rotate_threads(s)
    ));
    k.ins(format!("@{outside} bra {done};"));
    let pos = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {pos}, [{position}];"));
    let (row, d) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("div.u32 {row}, {e}, {hd};"));
    k.ins(format!("rem.u32 {d}, {e}, {hd};"));
    // Row ranges: [0, H) queries, [H, H+G) keys, [H+G, H+2G) values.
    let (q_end, k_end) = (s.heads, s.heads + s.kv_heads);
    let slot = k.reg(Class::B32);
    k.ins(format!("rem.u32 {slot}, {pos}, {};", s.window));
    // Source pointer and destination address of this element.
    let src = k.reg(Class::B64);
    let dst = k.reg(Class::B64);
    let is_q = k.reg(Class::Pred);
    let is_k = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {is_q}, {row}, {q_end};"));
    k.ins(format!("setp.lt.u32 {is_k}, {row}, {k_end};"));
    let (l_q, l_k, l_v, l_go) = (
        k.label("q"),
        k.label("k"),
        k.label("v"),
        k.label("addressed"),
    );
    k.ins(format!("@{is_q} bra {l_q};"));
    k.ins(format!("@{is_k} bra {l_k};"));
    k.ins(format!("bra {l_v};"));
    // Ring element of (slot, g, d): (slot · G + g) · hd + d.
    let ring_index = |k: &mut Kernel, g_row: Reg| -> Reg {
        let idx = k.reg(Class::B32);
        k.ins(format!(
            "mad.lo.u32 {idx}, {slot}, {}, {g_row};",
            s.kv_heads
        ));
        k.ins(format!("mad.lo.u32 {idx}, {idx}, {hd}, {d};"));
        idx
    };
    k.place(&l_q);
    k.ins(format!("mov.u64 {src}, {q};"));
    let qa = addr4(&mut k, q_out, e);
    k.ins(format!("mov.u64 {dst}, {qa};"));
    let src_row = k.reg(Class::B32);
    k.ins(format!("mov.u32 {src_row}, {row};"));
    k.ins(format!("bra {l_go};"));
    k.place(&l_k);
    let g = k.reg(Class::B32);
    k.ins(format!("sub.u32 {g}, {row}, {q_end};"));
    k.ins(format!("mov.u64 {src}, {kk};"));
    k.ins(format!("mov.u32 {src_row}, {g};"));
    let ki = ring_index(&mut k, g);
    let ka = addr4(&mut k, keys, ki);
    k.ins(format!("mov.u64 {dst}, {ka};"));
    k.ins(format!("bra {l_go};"));
    k.place(&l_v);
    let gv = k.reg(Class::B32);
    k.ins(format!("sub.u32 {gv}, {row}, {k_end};"));
    let vi = ring_index(&mut k, gv);
    let va = addr4(&mut k, values, vi);
    let vsrc_i = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {vsrc_i}, {gv}, {hd}, {d};"));
    let vs = addr4(&mut k, v, vsrc_i);
    let vv = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {vv}, [{vs}];"));
    k.ins(format!("st.global.f32 [{va}], {vv};"));
    k.ins(format!("bra {done};"));

    k.place(&l_go);
    let base_i = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {base_i}, {src_row}, {hd};"));
    let value = rotated_element(&mut k, s, src, base_i, d, pos, inv_freq);
    k.ins(format!("st.global.f32 [{dst}], {value};"));
    k.place(&done);
    k.finish()
}

/// Shared memory `attend` uses: the scores of the window and one slot per warp.
fn scores_bytes(s: &AttentionSpec) -> u32 {
    4 * s.window
}

/// Parameters: q `f32[H,hd]` (rotated), position `i32[1]`, keys `f32[W,G,hd]`, values
/// `f32[W,G,hd]`, out `f32[H,hd]`. Launch: H blocks of `32 · ATTEND_WARPS` threads.
pub fn attend(s: &AttentionSpec) -> String {
    let mut k = Kernel::new(&format!("{}_attend", s.name));
    k.shared("scores", scores_bytes(s), 16);
    k.shared("partial", 4 * ATTEND_WARPS, 16);
    let q = k.param_ptr("q");
    let position = k.param_ptr("position");
    let keys = k.param_ptr("keys");
    let values = k.param_ptr("values");
    let out = k.param_ptr("out");
    let (hd, w) = (s.head_dim, s.window);
    let group = s.heads / s.kv_heads;
    let threads = 32 * ATTEND_WARPS;

    // A block per query head h, at the step's position.
    let (tid, qhead) = k.thread_and_block();
    let h = qhead;
    let pos = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {pos}, [{position}];"));
    let (warp, lane) = k.warp_and_lane(tid);
    let g = k.reg(Class::B32);
    k.ins(format!("div.u32 {g}, {h}, {group};"));
    // The first element of position pp's key (or value) row for KV head g in the ring (slot
    // pp mod W).
    let row_of = |k: &mut Kernel, pp: Reg, ring: Reg| -> (Reg, Reg) {
        let slot = k.reg(Class::B32);
        k.ins(format!("rem.u32 {slot}, {pp}, {w};"));
        let row = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {row}, {slot}, {}, {g};", s.kv_heads));
        k.ins(format!("mul.lo.u32 {row}, {row}, {hd};"));
        (ring, row)
    };
    // Positions lo..=pos, count of them.
    let lo = k.reg(Class::B32);
    k.ins(format!("max.u32 {lo}, {pos}, {};", w - 1));
    k.ins(format!("sub.u32 {lo}, {lo}, {};", w - 1));
    let count = k.reg(Class::B32);
    k.ins(format!("sub.u32 {count}, {pos}, {lo};"));
    k.ins(format!("add.u32 {count}, {count}, 1;"));
    let scores = k.reg(Class::B64);
    k.ins(format!("mov.u64 {scores}, scores;"));

    // Scores: warp takes n = warp, warp + 8, …; lanes split the head's features.
    let n = k.reg(Class::B32);
    k.ins(format!("mov.u32 {n}, {warp};"));
    let (head, end) = (k.label("score"), k.label("score_end"));
    k.place(&head);
    k.leave_unless_below(n, count, &end);
    let pp = k.reg(Class::B32);
    k.ins(format!("add.u32 {pp}, {lo}, {n};"));
    let (kbase, krow) = row_of(&mut k, pp, keys);
    let qrow = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {qrow}, {qhead}, {hd};"));
    let acc = k.reg(Class::F32);
    k.ins(format!("mov.f32 {acc}, 0f00000000;"));
    let d = k.reg(Class::B32);
    k.ins(format!("mov.u32 {d}, {lane};"));
    let (dh, de) = (k.label("dot"), k.label("dot_end"));
    k.place(&dh);
    k.leave_unless_below(d, hd, &de);
    let qi = k.reg(Class::B32);
    k.ins(format!("add.u32 {qi}, {qrow}, {d};"));
    let qa = addr4(&mut k, q, qi);
    let qv = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {qv}, [{qa}];"));
    let ki = k.reg(Class::B32);
    k.ins(format!("add.u32 {ki}, {krow}, {d};"));
    let ka = addr4(&mut k, kbase, ki);
    let kv = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {kv}, [{ka}];"));
    k.ins(format!("fma.rn.f32 {acc}, {qv}, {kv}, {acc};"));
    k.ins(format!("add.u32 {d}, {d}, 32;"));
    k.ins(format!("bra {dh};"));
    k.place(&de);
    warp_sum(&mut k, acc);
    k.ins(format!(
        "mul.f32 {acc}, {acc}, {};",
        Kernel::f32_imm(s.scale)
    ));
    let lane0 = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {lane0}, {lane}, 0;"));
    let so = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {so}, {n}, 4;"));
    k.ins(format!("add.u64 {so}, {so}, {scores};"));
    k.ins(format!("@{lane0} st.shared.f32 [{so}], {acc};"));
    k.ins(format!("add.u32 {n}, {n}, {ATTEND_WARPS};"));
    k.ins(format!("bra {head};"));
    k.place(&end);
    k.ins("bar.sync 0;");

    // Block reductions over the scores: max, then the sum of exp(score - max).
    let reduce = |k: &mut Kernel, op: &str, init: &str, map_exp: Option<Reg>| -> Reg {
        let v = k.reg(Class::F32);
        k.ins(format!("mov.f32 {v}, {init};"));
        let i = k.reg(Class::B32);
        k.ins(format!("mov.u32 {i}, {tid};"));
        let (lh, le) = (k.label("reduce"), k.label("reduce_end"));
        k.place(&lh);
        let st = k.reg(Class::Pred);
        k.ins(format!("setp.ge.u32 {st}, {i}, {count};"));
        k.ins(format!("@{st} bra {le};"));
        let at = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {at}, {i}, 4;"));
        k.ins(format!("add.u64 {at}, {at}, {scores};"));
        let x = k.reg(Class::F32);
        k.ins(format!("ld.shared.f32 {x}, [{at}];"));
        let term = match map_exp {
            Some(m) => {
                k.ins(format!("sub.f32 {x}, {x}, {m};"));
                let e = exp(k, x);
                // Keep exp(score - max) for the weighted sum of values.
                k.ins(format!("st.shared.f32 [{at}], {e};"));
                e
            }
            None => x,
        };
        k.ins(format!("{op}.f32 {v}, {v}, {term};"));
        k.ins(format!("add.u32 {i}, {i}, {threads};"));
        k.ins(format!("bra {lh};"));
        k.place(&le);
        warp_reduce(k, op, v);
        store_warp_partial(k, v, warp, lane);
        k.ins("bar.sync 0;");
        let total = combine_partials(k, op, ATTEND_WARPS);
        // Everyone has read `partial` before it is reused.
        k.ins("bar.sync 0;");
        total
    };
    let m = reduce(&mut k, "max", "0fFF800000", None);
    let sum = reduce(&mut k, "add", "0f00000000", Some(m));
    let inv = k.reg(Class::F32);
    k.ins(format!("rcp.rn.f32 {inv}, {sum};"));

    // Output features: thread d accumulates Σ_n e_n · v[n, d].
    let od = k.reg(Class::B32);
    k.ins(format!("mov.u32 {od}, {tid};"));
    let (oh, oe) = (k.label("out"), k.label("out_end"));
    k.place(&oh);
    k.leave_unless_below(od, hd, &oe);
    let oacc = k.reg(Class::F32);
    k.ins(format!("mov.f32 {oacc}, 0f00000000;"));
    let nn = k.reg(Class::B32);
    k.ins(format!("mov.u32 {nn}, 0;"));
    let (nh, ne) = (k.label("sum"), k.label("sum_end"));
    k.place(&nh);
    k.leave_unless_below(nn, count, &ne);
    let ea = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {ea}, {nn}, 4;"));
    k.ins(format!("add.u64 {ea}, {ea}, {scores};"));
    let ev = k.reg(Class::F32);
    k.ins(format!("ld.shared.f32 {ev}, [{ea}];"));
    let vpp = k.reg(Class::B32);
    k.ins(format!("add.u32 {vpp}, {lo}, {nn};"));
    let (vbase, vrow) = row_of(&mut k, vpp, values);
    let vi = k.reg(Class::B32);
    k.ins(format!("add.u32 {vi}, {vrow}, {od};"));
    let va = addr4(&mut k, vbase, vi);
    let vv = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {vv}, [{va}];"));
    k.ins(format!("fma.rn.f32 {oacc}, {ev}, {vv}, {oacc};"));
    k.ins(format!("add.u32 {nn}, {nn}, 1;"));
    k.ins(format!("bra {nh};"));
    k.place(&ne);
    k.ins(format!("mul.f32 {oacc}, {oacc}, {inv};"));
    let oi = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {oi}, {qhead}, {hd}, {od};"));
    let oa = addr4(&mut k, out, oi);
    k.ins(format!("st.global.f32 [{oa}], {oacc};"));
    k.ins(format!("add.u32 {od}, {od}, {threads};"));
    k.ins(format!("bra {oh};"));
    k.place(&oe);
    k.finish()
}

/// Blocks of `attend_tokens` for a chunk of up to `max_tokens`: one per (token, KV head).
pub fn attend_tokens_grid(s: &AttentionSpec, max_tokens: u32) -> u32 {
    max_tokens * s.kv_heads
}

/// Threads per block of `attend_tokens`: a warp per query head of the KV group.
pub fn attend_tokens_block(s: &AttentionSpec) -> u32 {
    32 * (s.heads / s.kv_heads)
}

/// Attention for a chunk of T queries (prefill). A block per (token, KV head), a warp per query
/// head sharing that KV head: each key and value row is read by the block's warps together (the
/// 2B shape's 10 heads share one KV head, so one read from L2 serves ten heads; a block per
/// (token, head) read every row ten times), with the softmax online (running max and sum, no
/// scores kept): per key, the lanes' partial dot products are summed across the warp, the
/// accumulator rescaled, the value row added. Keys and values of positions before the chunk
/// come from the ring, the chunk's own from its rotated keys and its values (the ring is written
/// after, by `write_ring_tokens`, so no query loses a key a later token would overwrite).
/// Parameters: q `f32[T,H,hd]` (rotated), count `i32[1]`, start `i32[1]`, chunk keys
/// `f32[T,G,hd]` (rotated), chunk values `f32[T,G,hd]`, keys, values (the ring), out
/// `f32[T,H,hd]`. Launch: `attend_tokens_grid` blocks of `attend_tokens_block`; blocks past the
/// count leave.
pub fn attend_tokens(s: &AttentionSpec) -> String {
    let group = s.heads / s.kv_heads;
    assert!(group <= 32, "a block holds at most 32 query heads");
    let (hd, w) = (s.head_dim, s.window);
    let mut k = Kernel::new(&format!("{}_attend_tokens", s.name));
    let q = k.param_ptr("q");
    let count = k.param_ptr("count");
    let start_at = k.param_ptr("start");
    let chunk_keys = k.param_ptr("chunk_keys");
    let chunk_values = k.param_ptr("chunk_values");
    let keys = k.param_ptr("keys");
    let values = k.param_ptr("values");
    let out = k.param_ptr("out");

    let (tid, blk) = k.thread_and_block();
    let (warp, lane) = k.warp_and_lane(tid);
    let (t, g) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("div.u32 {t}, {blk}, {};", s.kv_heads));
    k.ins(format!("rem.u32 {g}, {blk}, {};", s.kv_heads));
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let done = k.label("done");
    // No barriers and no cross-warp traffic: a warp may leave on its own.
    k.leave_unless_below(t, n, &done);
    let start = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {start}, [{start_at}];"));
    let pos = k.reg(Class::B32);
    k.ins(format!("add.u32 {pos}, {start}, {t};"));
    // Query head h = g·group + warp, row (t, h).
    let qrow = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {qrow}, {g}, {group}, {warp};"));
    k.ins(format!("mad.lo.u32 {qrow}, {t}, {}, {qrow};", s.heads));
    k.ins(format!("mul.lo.u32 {qrow}, {qrow}, {hd};"));
    // This lane's features d = lane + 32e (those below hd).
    let lanes_e = hd.div_ceil(32);
    let has: Vec<Option<Reg>> = (0..lanes_e)
        .map(|e| {
            (32 * e + 32 > hd).then(|| {
                let d = k.reg(Class::B32);
                k.ins(format!("add.u32 {d}, {lane}, {};", 32 * e));
                let p = k.reg(Class::Pred);
                k.ins(format!("setp.lt.u32 {p}, {d}, {hd};"));
                p
            })
        })
        .collect();
    let guarded = |p: Option<Reg>, ins: String| match p {
        Some(p) => format!("@{p} {ins}"),
        None => ins,
    };
    let qv: Vec<Reg> = (0..lanes_e)
        .map(|e| {
            let v = k.reg(Class::F32);
            k.ins(format!("mov.f32 {v}, 0f00000000;"));
            let qi = k.reg(Class::B32);
            k.ins(format!("add.u32 {qi}, {qrow}, {lane};"));
            k.ins(format!("add.u32 {qi}, {qi}, {};", 32 * e));
            let qa = addr4(&mut k, q, qi);
            k.ins(guarded(
                has[e as usize],
                format!("ld.global.f32 {v}, [{qa}];"),
            ));
            v
        })
        .collect();
    let acc: Vec<Reg> = (0..lanes_e)
        .map(|_| {
            let a = k.reg(Class::F32);
            k.ins(format!("mov.f32 {a}, 0f00000000;"));
            a
        })
        .collect();
    let (m, l) = (k.reg(Class::F32), k.reg(Class::F32));
    k.ins(format!("mov.f32 {m}, 0fFF800000;"));
    k.ins(format!("mov.f32 {l}, 0f00000000;"));

    // Positions lo..=pos.
    let pp = k.reg(Class::B32);
    k.ins(format!("max.u32 {pp}, {pos}, {};", w - 1));
    k.ins(format!("sub.u32 {pp}, {pp}, {};", w - 1));
    let (head, end) = (k.label("key"), k.label("key_end"));
    k.place(&head);
    let past = k.reg(Class::Pred);
    k.ins(format!("setp.gt.u32 {past}, {pp}, {pos};"));
    k.ins(format!("@{past} bra {end};"));
    // Row of position pp for KV head g: the chunk's own rows from `start` on, else the ring at
    // slot pp mod W.
    let in_chunk = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {in_chunk}, {pp}, {start};"));
    let row = k.reg(Class::B32);
    k.ins(format!("rem.u32 {row}, {pp}, {w};"));
    let crow = k.reg(Class::B32);
    k.ins(format!("sub.u32 {crow}, {pp}, {start};"));
    k.ins(format!("selp.b32 {row}, {crow}, {row}, {in_chunk};"));
    k.ins(format!("mad.lo.u32 {row}, {row}, {}, {g};", s.kv_heads));
    k.ins(format!("mul.lo.u32 {row}, {row}, {hd};"));
    k.ins(format!("add.u32 {row}, {row}, {lane};"));
    let (kb, vb) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("selp.b64 {kb}, {chunk_keys}, {keys}, {in_chunk};"));
    k.ins(format!(
        "selp.b64 {vb}, {chunk_values}, {values}, {in_chunk};"
    ));
    let score = k.reg(Class::F32);
    k.ins(format!("mov.f32 {score}, 0f00000000;"));
    for (e, qe) in qv.iter().enumerate() {
        let ki = k.reg(Class::B32);
        k.ins(format!("add.u32 {ki}, {row}, {};", 32 * e));
        let ka = addr4(&mut k, kb, ki);
        let kv = k.reg(Class::F32);
        k.ins(format!("mov.f32 {kv}, 0f00000000;"));
        k.ins(guarded(has[e], format!("ld.global.f32 {kv}, [{ka}];")));
        k.ins(format!("fma.rn.f32 {score}, {qe}, {kv}, {score};"));
    }
    warp_sum(&mut k, score);
    k.ins(format!(
        "mul.f32 {score}, {score}, {};",
        Kernel::f32_imm(s.scale)
    ));
    // Online softmax: m' = max(m, s), acc = acc·e^(m-m') + e^(s-m')·v, l likewise.
    let m_new = k.reg(Class::F32);
    k.ins(format!("max.f32 {m_new}, {m}, {score};"));
    let keep = k.reg(Class::F32);
    k.ins(format!("sub.f32 {keep}, {m}, {m_new};"));
    let keep = exp(&mut k, keep);
    let weight = k.reg(Class::F32);
    k.ins(format!("sub.f32 {weight}, {score}, {m_new};"));
    let weight = exp(&mut k, weight);
    k.ins(format!("fma.rn.f32 {l}, {l}, {keep}, {weight};"));
    for (e, a) in acc.iter().enumerate() {
        let vi = k.reg(Class::B32);
        k.ins(format!("add.u32 {vi}, {row}, {};", 32 * e));
        let va = addr4(&mut k, vb, vi);
        let vv = k.reg(Class::F32);
        k.ins(format!("mov.f32 {vv}, 0f00000000;"));
        k.ins(guarded(has[e], format!("ld.global.f32 {vv}, [{va}];")));
        k.ins(format!("mul.f32 {a}, {a}, {keep};"));
        k.ins(format!("fma.rn.f32 {a}, {weight}, {vv}, {a};"));
    }
    k.ins(format!("mov.f32 {m}, {m_new};"));
    k.ins(format!("add.u32 {pp}, {pp}, 1;"));
    k.ins(format!("bra {head};"));
    k.place(&end);
    let inv = k.reg(Class::F32);
    k.ins(format!("rcp.rn.f32 {inv}, {l};"));
    for (e, a) in acc.iter().enumerate() {
        k.ins(format!("mul.f32 {a}, {a}, {inv};"));
        let oi = k.reg(Class::B32);
        k.ins(format!("add.u32 {oi}, {qrow}, {lane};"));
        k.ins(format!("add.u32 {oi}, {oi}, {};", 32 * e));
        let oa = addr4(&mut k, out, oi);
        k.ins(guarded(has[e], format!("st.global.f32 [{oa}], {a};")));
    }
    k.place(&done);
    k.finish()
}
