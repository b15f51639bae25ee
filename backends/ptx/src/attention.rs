//! Local attention for one decode token, in two launches:
//!
//! 1. `attend`: a block per (KV head, split of 32 window positions) for all the query heads
//!    sharing that KV head: the rotary embedding of its queries (and, in the split holding the
//!    current position, of the new key, stored with the value into the KV ring at slot
//!    `position mod W`), scores, the split's softmax max and sum, unnormalised outputs.
//! 2. `attend_combine`: eight threads per output element (fewer with fewer splits) merge the
//!    splits.
//!
//! Rotary embedding is rotate-half on the first `dims` features. Angles are reduced modulo 2π
//! in f64 before `sin.approx`/`cos.approx` (accurate to about 2^-21 on [-π, π]), so positions
//! far into a long text keep their precision; the inverse frequencies come as an f64 table.
//! The prefill chunk's kernels (`rotate_tokens`, `write_ring_tokens`, `attend_tokens`) are
//! below the decode ones.
use crate::builder::{Class, Kernel, Reg};
use crate::math::{exp, lanes_reduce, warp_reduce, warp_sum};
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

impl AttentionSpec {
    /// Query heads per KV head.
    pub fn group(&self) -> u32 {
        self.heads / self.kv_heads
    }
}

/// First position of the window ending at `pos`: `max(pos - (W-1), 0)`.
pub(crate) fn window_start(k: &mut Kernel, pos: Reg, w: u32) -> Reg {
    let lo = k.reg(Class::B32);
    k.ins(format!("max.u32 {lo}, {pos}, {};", w - 1));
    k.ins(format!("sub.u32 {lo}, {lo}, {};", w - 1));
    lo
}

/// The parameters of both chunk attention kernels, in order: q `f32[T,H,hd]` (rotated), count
/// `i32[1]`, start `i32[1]`, chunk keys `f32[T,G,hd]` (rotated), chunk values, keys and values
/// (the ring, `f32[W,G,hd]`), out `f32[T,H,hd]`.
pub(crate) struct ChunkAttention {
    pub q: Reg,
    pub count: Reg,
    pub start_at: Reg,
    pub chunk_keys: Reg,
    pub chunk_values: Reg,
    pub keys: Reg,
    pub values: Reg,
    pub out: Reg,
}

impl ChunkAttention {
    pub fn declare(k: &mut Kernel) -> ChunkAttention {
        ChunkAttention {
            q: k.param_ptr("q"),
            count: k.param_ptr("count"),
            start_at: k.param_ptr("start"),
            chunk_keys: k.param_ptr("chunk_keys"),
            chunk_values: k.param_ptr("chunk_values"),
            keys: k.param_ptr("keys"),
            values: k.param_ptr("values"),
            out: k.param_ptr("out"),
        }
    }
}

/// The positions a block of a chunk attention kernel covers: the chunk's count `n`, its first
/// position `start`, its last token `last`, and the span of keys its tokens t0..t0+tokens see
/// (`first`: the first token's window start; `final_pos`: the last token's position).
pub(crate) struct BlockSpan {
    pub n: Reg,
    pub start: Reg,
    pub last: Reg,
    pub first_pos: Reg,
    pub first: Reg,
    pub final_pos: Reg,
}

/// Loads the count and start; blocks whose first token `t0` is past the count go to `done`
/// (whole blocks leave together, so the barriers after see every thread or none).
pub(crate) fn block_span(
    k: &mut Kernel,
    p: &ChunkAttention,
    t0: Reg,
    tokens: u32,
    w: u32,
    done: &str,
) -> BlockSpan {
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{}];", p.count));
    k.leave_unless_below(t0, n, done);
    let start = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {start}, [{}];", p.start_at));
    let last = k.reg(Class::B32);
    k.ins(format!("sub.u32 {last}, {n}, 1;"));
    let first_pos = k.reg(Class::B32);
    k.ins(format!("add.u32 {first_pos}, {start}, {t0};"));
    let first = window_start(k, first_pos, w);
    let final_pos = k.reg(Class::B32);
    k.ins(format!("add.u32 {final_pos}, {t0}, {};", tokens - 1));
    k.ins(format!("min.u32 {final_pos}, {final_pos}, {last};"));
    k.ins(format!("add.u32 {final_pos}, {final_pos}, {start};"));
    BlockSpan {
        n,
        start,
        last,
        first_pos,
        first,
        final_pos,
    }
}

/// The base and first element of KV head `g`'s key (or value) row of position `pp`, at or
/// after `tile0` (whose ring slot is `slot0`) by `r`: the chunk's own rows from `start` on,
/// else ring slot (tile0 + r) mod W (r < W, so one wrap at most).
#[allow(clippy::too_many_arguments)]
pub(crate) fn kv_row(
    k: &mut Kernel,
    s: &AttentionSpec,
    pp: Reg,
    slot0: Reg,
    r: Reg,
    start: Reg,
    g: Reg,
    chunk_base: Reg,
    ring_base: Reg,
) -> (Reg, Reg) {
    let slot = k.reg(Class::B32);
    k.ins(format!("add.u32 {slot}, {slot0}, {r};"));
    let wrap = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {wrap}, {slot}, {};", s.window));
    k.ins(format!("@{wrap} sub.u32 {slot}, {slot}, {};", s.window));
    let in_chunk = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {in_chunk}, {pp}, {start};"));
    let row = k.reg(Class::B32);
    k.ins(format!("sub.u32 {row}, {pp}, {start};"));
    k.ins(format!("selp.b32 {row}, {row}, {slot}, {in_chunk};"));
    k.ins(format!("mad.lo.u32 {row}, {row}, {}, {g};", s.kv_heads));
    k.ins(format!("mul.lo.u32 {row}, {row}, {};", s.head_dim));
    let base = k.reg(Class::B64);
    k.ins(format!(
        "selp.b64 {base}, {chunk_base}, {ring_base}, {in_chunk};"
    ));
    (base, row)
}

/// The loop over a block's key tiles: positions p0 .. p0 + tile - 1 from `first` (the first
/// token's window start) while p0 ≤ `final_pos` (the last token's position), `nk` of them in
/// the span, `slot0` = p0 mod W. `key_tiles` opens it, `KeyTiles::close` closes it.
pub(crate) struct KeyTiles {
    pub p0: Reg,
    pub nk: Reg,
    pub slot0: Reg,
    top: String,
    end: String,
    tile: u32,
}

pub(crate) fn key_tiles(k: &mut Kernel, first: Reg, final_pos: Reg, tile: u32, w: u32) -> KeyTiles {
    let p0 = k.reg(Class::B32);
    k.ins(format!("mov.u32 {p0}, {first};"));
    let (top, end) = (k.label("tile"), k.label("tile_end"));
    k.place(&top);
    let past = k.reg(Class::Pred);
    k.ins(format!("setp.gt.u32 {past}, {p0}, {final_pos};"));
    k.ins(format!("@{past} bra {end};"));
    let nk = k.reg(Class::B32);
    k.ins(format!("sub.u32 {nk}, {final_pos}, {p0};"));
    k.ins(format!("add.u32 {nk}, {nk}, 1;"));
    k.ins(format!("min.u32 {nk}, {nk}, {tile};"));
    let slot0 = k.reg(Class::B32);
    k.ins(format!("rem.u32 {slot0}, {p0}, {w};"));
    KeyTiles {
        p0,
        nk,
        slot0,
        top,
        end,
        tile,
    }
}

impl KeyTiles {
    pub fn close(self, k: &mut Kernel) {
        k.ins(format!("add.u32 {}, {}, {};", self.p0, self.p0, self.tile));
        k.ins(format!("bra {};", self.top));
        k.place(&self.end);
    }
}

pub const ATTEND_WARPS: u32 = 8;
pub const ROTATE_BLOCK: u32 = 256;

/// The inverse frequencies the rotary embedding reads: `theta^(-2i/dims)` for i < dims/2.
pub fn inverse_frequencies(theta: f64, dims: u32) -> Vec<f64> {
    (0..dims / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / dims as f64))
        .collect()
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
/// (rotate-half on the first `dims` features; others unchanged). Without branches, so a loop
/// over elements is one basic block and the scheduler issues every element's loads together:
/// features past `dims` compute a rotation with clamped indices and keep their own value.
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
    let (Some((_, dims)), Some(inv_freq)) = (s.rotary, inv_freq) else {
        return own;
    };
    let half = dims / 2;
    // First half: a·cos - b·sin with b = x[d + half]; second half: b·cos + a·sin with
    // a = x[d - half] (b is this element). Past `dims` the partner is x[d - half] (in the
    // row) and the frequency index clamps to the table's last.
    let first = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {first}, {d}, {half};"));
    let i = k.reg(Class::B32);
    k.ins(format!("sub.u32 {i}, {d}, {half};"));
    k.ins(format!("selp.b32 {i}, {d}, {i}, {first};"));
    k.ins(format!("min.u32 {i}, {i}, {};", half - 1));
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
    let rotated = k.reg(Class::F32);
    k.ins(format!("fma.rn.f32 {rotated}, {own}, {cos}, {ps};"));
    let in_dims = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {in_dims}, {d}, {dims};"));
    let value = k.reg(Class::F32);
    k.ins(format!("selp.f32 {value}, {rotated}, {own}, {in_dims};"));
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
    assert!(
        max_tokens.checked_mul(rows * hd).is_some(),
        "chunk too large"
    );
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let elements = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {elements}, {n}, {};", rows * hd));
    let p0 = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {p0}, [{start}];"));
    k.grid_stride(ROTATE_BLOCK, elements, &mut |k, e, _| {
        // e = (t · rows + row) · hd + d
        let (d, rest) = (k.reg(Class::B32), k.reg(Class::B32));
        k.ins(format!("rem.u32 {d}, {e}, {hd};"));
        k.ins(format!("div.u32 {rest}, {e}, {hd};"));
        let (row, t) = (k.reg(Class::B32), k.reg(Class::B32));
        k.ins(format!("rem.u32 {row}, {rest}, {rows};"));
        k.ins(format!("div.u32 {t}, {rest}, {rows};"));
        let pos = k.reg(Class::B32);
        k.ins(format!("add.u32 {pos}, {p0}, {t};"));
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
        let value = rotated_element(k, s, src, base_i, d, pos, inv_freq);
        let oi = k.reg(Class::B32);
        k.ins(format!("add.u32 {oi}, {base_i}, {d};"));
        let oa = addr4(k, dst, oi);
        k.ins(format!("st.global.f32 [{oa}], {value};"));
    });
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
    assert!(max_tokens.checked_mul(row).is_some(), "chunk too large");
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let elements = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {elements}, {n}, {row};"));
    let p0 = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {p0}, [{start}];"));
    k.grid_stride(ROTATE_BLOCK, elements, &mut |k, e, next| {
        let (t, within) = (k.reg(Class::B32), k.reg(Class::B32));
        k.ins(format!("div.u32 {t}, {e}, {row};"));
        k.ins(format!("rem.u32 {within}, {e}, {row};"));
        // Only the last W tokens survive in the ring: earlier ones would be overwritten in
        // the same launch, in no defined order.
        let keep = k.reg(Class::B32);
        k.ins(format!("add.u32 {keep}, {t}, {};", s.window));
        let early = k.reg(Class::Pred);
        k.ins(format!("setp.lt.u32 {early}, {keep}, {n};"));
        k.ins(format!("@{early} bra {next};"));
        let slot = k.reg(Class::B32);
        k.ins(format!("add.u32 {slot}, {p0}, {t};"));
        k.ins(format!("rem.u32 {slot}, {slot}, {};", s.window));
        let di = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {di}, {slot}, {row}, {within};"));
        for (src, dst) in [(kk, keys), (v, values)] {
            let sa = addr4(k, src, e);
            let val = k.reg(Class::F32);
            k.ins(format!("ld.global.f32 {val}, [{sa}];"));
            let da = addr4(k, dst, di);
            k.ins(format!("st.global.f32 [{da}], {val};"));
        }
    });
    k.finish()
}

/// Keys one block of `attend` takes: one per lane in its softmax.
pub const SPLIT_KEYS: u32 = 32;

/// Key splits of the window: `attend` runs a block per (KV head, split).
pub fn attend_splits(s: &AttentionSpec) -> u32 {
    s.window.div_ceil(SPLIT_KEYS)
}

/// Blocks of `attend`.
pub fn attend_grid(s: &AttentionSpec) -> u32 {
    s.kv_heads * attend_splits(s)
}

/// Largest group of query heads per KV head the attention kernels take (`attend`: one
/// accumulator per head and output feature in each thread; `attend_tokens`: a warp per two).
pub const MAX_GROUP: u32 = 32;

/// Scratch `attend` writes and `attend_combine` reads, in f32 elements: each split's
/// unnormalised output `[S, H, hd]`, and its max and sum of exponentials `[S, H, 2]`.
pub fn attend_scratch(s: &AttentionSpec) -> (u32, u32) {
    let splits = attend_splits(s);
    (splits * s.heads * s.head_dim, splits * s.heads * 2)
}

/// Decode attention, first half (split keys, as in flash-decoding): a block per (KV head g,
/// split of `SPLIT_KEYS` window positions) computes, for every query head of g's group, the
/// scores of its keys, their max m and `exp(score - m)` with sum l, and the unnormalised
/// output `Σ exp(score - m) · v`. Each key and value row is read once for the whole group (the
/// 2B model's 10 heads share one KV head) and the window is spread over W/32 blocks (64 for
/// W = 2048) instead of walked by one block per head. Splits past the positions seen so far
/// leave at once.
///
/// The step's own query, key and value come unrotated: each block rotates the group's query
/// rows as it stages them, and the block whose split holds the current position rotates the
/// new key and stores it and the value into the ring (row `position mod W`, which held
/// position p-W: no other block reads it at p), before its barrier. So no launch of its own
/// does rotate-and-store.
///
/// Warps take keys n = warp, warp + 8, ... of the split (all their loads issued first), lanes
/// split the features, one shuffle reduction per head; then a warp per head: lane n holds key
/// n's score for the softmax; then a thread per feature accumulates the group's heads over
/// the split's values. Parameters: q `f32[H,hd]`, k `f32[G,hd]`, v `f32[G,hd]`, position
/// `i32[1]`, [inv_freq `f64[dims/2]`], keys `f32[W,G,hd]`, values `f32[W,G,hd]`, partial out
/// `f32[S,H,hd]`, partial max and sum `f32[S,H,2]`. Launch: `attend_grid` blocks of
/// `32 · ATTEND_WARPS`.
pub fn attend(s: &AttentionSpec) -> String {
    let (hd, w, hg) = (s.head_dim, s.window, s.group());
    assert!(
        hg <= MAX_GROUP,
        "more than {MAX_GROUP} query heads per KV head"
    );
    let threads = 32 * ATTEND_WARPS;
    let splits = attend_splits(s);
    let mut k = Kernel::new(&format!("{}_attend", s.name));
    k.shared("qs", 4 * hg * hd, 16);
    k.shared("scores", 4 * hg * SPLIT_KEYS, 16);
    let q = k.param_ptr("q");
    let kk = k.param_ptr("k");
    let v = k.param_ptr("v");
    let position = k.param_ptr("position");
    let inv_freq = s.rotary.map(|_| k.param_ptr("inv_freq"));
    let keys = k.param_ptr("keys");
    let values = k.param_ptr("values");
    let o_part = k.param_ptr("o_part");
    let ml_part = k.param_ptr("ml_part");

    let (tid, blk) = k.thread_and_block();
    let (warp, lane) = k.warp_and_lane(tid);
    let (g, split) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("div.u32 {g}, {blk}, {splits};"));
    k.ins(format!("rem.u32 {split}, {blk}, {splits};"));
    let pos = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {pos}, [{position}];"));
    // Positions lo..=pos are in the window, `count` of them; this split takes n0..n0+32.
    let lo = window_start(&mut k, pos, w);
    let count = k.reg(Class::B32);
    k.ins(format!("sub.u32 {count}, {pos}, {lo};"));
    k.ins(format!("add.u32 {count}, {count}, 1;"));
    let n0 = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {n0}, {split}, {SPLIT_KEYS};"));
    let done = k.label("done");
    // Whole blocks leave together: the barriers below see every thread or none.
    k.leave_unless_below(n0, count, &done);
    // Keys of this split: min(32, count - n0).
    let nkeys = k.reg(Class::B32);
    k.ins(format!("sub.u32 {nkeys}, {count}, {n0};"));
    k.ins(format!("min.u32 {nkeys}, {nkeys}, {SPLIT_KEYS};"));
    // Element of the ring row of the split's key n (window index n0 + n, position lo + n0 +
    // n, slot mod W) for KV head g: from the split's first slot, wrapping once (a key of the
    // split is within W of its first; past the split's keys the row is never read), so one
    // integer remainder per thread (a long sequence on the GPU) instead of one per key.
    let slot0 = k.reg(Class::B32);
    k.ins(format!("add.u32 {slot0}, {lo}, {n0};"));
    k.ins(format!("rem.u32 {slot0}, {slot0}, {w};"));
    let row_of = |k: &mut Kernel, n: &dyn std::fmt::Display| -> Reg {
        let slot = k.reg(Class::B32);
        k.ins(format!("add.u32 {slot}, {slot0}, {n};"));
        let wraps = k.reg(Class::Pred);
        k.ins(format!("setp.ge.u32 {wraps}, {slot}, {w};"));
        k.ins(format!("@{wraps} sub.u32 {slot}, {slot}, {w};"));
        k.ins(format!("mad.lo.u32 {slot}, {slot}, {}, {g};", s.kv_heads));
        k.ins(format!("mul.lo.u32 {slot}, {slot}, {hd};"));
        slot
    };

    // The group's query rows, rotated, into shared memory: heads g·hg .. g·hg + hg.
    let qs = k.reg(Class::B64);
    k.ins(format!("mov.u64 {qs}, qs;"));
    let q0 = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {q0}, {g}, {};", hg * hd));
    let i = k.reg(Class::B32);
    k.ins(format!("mov.u32 {i}, {tid};"));
    // Every element of this thread's share in one basic block (their loads in flight
    // together; a rest in `unrolled`'s smaller batches).
    let per_thread = (hg * hd).div_ceil(threads).min(16);
    k.unrolled(i, hg * hd, threads, per_thread, &mut |k, n| {
        for u in 0..n {
            let iu = k.reg(Class::B32);
            k.ins(format!("add.u32 {iu}, {i}, {};", u * threads));
            // Feature d of the row starting at element q0 + iu - d.
            let d = k.reg(Class::B32);
            k.ins(format!("rem.u32 {d}, {iu}, {hd};"));
            let row = k.reg(Class::B32);
            k.ins(format!("add.u32 {row}, {q0}, {iu};"));
            k.ins(format!("sub.u32 {row}, {row}, {d};"));
            let qv = rotated_element(k, s, q, row, d, pos, inv_freq);
            let sa = k.reg(Class::B64);
            k.ins(format!("mul.wide.u32 {sa}, {iu}, 4;"));
            k.ins(format!("add.u64 {sa}, {sa}, {qs};"));
            k.ins(format!("st.shared.f32 [{sa}], {qv};"));
        }
        k.ins(format!("add.u32 {i}, {i}, {};", n * threads));
    });
    // The split holding the current position (window index count - 1) stores its key,
    // rotated, and its value into the ring for KV head g; the barrier below orders these
    // stores before this block's own key and value loads.
    let owner = k.reg(Class::B32);
    k.ins(format!("sub.u32 {owner}, {count}, 1;"));
    k.ins(format!("div.u32 {owner}, {owner}, {SPLIT_KEYS};"));
    let stored = k.label("stored");
    let not_owner = k.reg(Class::Pred);
    k.ins(format!("setp.ne.u32 {not_owner}, {owner}, {split};"));
    k.ins(format!("@{not_owner} bra {stored};"));
    let slot = k.reg(Class::B32);
    k.ins(format!("rem.u32 {slot}, {pos}, {w};"));
    k.ins(format!("mad.lo.u32 {slot}, {slot}, {}, {g};", s.kv_heads));
    k.ins(format!("mul.lo.u32 {slot}, {slot}, {hd};"));
    let src_row = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {src_row}, {g}, {hd};"));
    let d = k.reg(Class::B32);
    k.ins(format!("mov.u32 {d}, {tid};"));
    k.strided(d, hd, threads, &mut |k| {
        let key = rotated_element(k, s, kk, src_row, d, pos, inv_freq);
        let at = k.reg(Class::B32);
        k.ins(format!("add.u32 {at}, {slot}, {d};"));
        let ka = addr4(k, keys, at);
        k.ins(format!("st.global.f32 [{ka}], {key};"));
        let vi = k.reg(Class::B32);
        k.ins(format!("add.u32 {vi}, {src_row}, {d};"));
        let vs = addr4(k, v, vi);
        let value = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {value}, [{vs}];"));
        let va = addr4(k, values, at);
        k.ins(format!("st.global.f32 [{va}], {value};"));
    });
    k.place(&stored);
    k.ins("bar.sync 0;");

    // Scores. Warp w takes keys w, w + 8, w + 16, w + 24 of the split; lane l holds features
    // l, l + 32, ... of each (loaded first, all keys at once), then one reduction per head.
    let scores = k.reg(Class::B64);
    k.ins(format!("mov.u64 {scores}, scores;"));
    let per_lane = hd.div_ceil(32);
    let keys_per_warp = SPLIT_KEYS / ATTEND_WARPS;
    let mut rows = Vec::new();
    for u in 0..keys_per_warp {
        let n = k.reg(Class::B32);
        k.ins(format!("add.u32 {n}, {warp}, {};", u * ATTEND_WARPS));
        // A key past the split's end loads nothing (its score is -inf below).
        let valid = k.reg(Class::Pred);
        k.ins(format!("setp.lt.u32 {valid}, {n}, {nkeys};"));
        let row = row_of(&mut k, &n);
        let mut feats = Vec::new();
        for j in 0..per_lane {
            let f = k.reg(Class::F32);
            k.ins(format!("mov.f32 {f}, 0f00000000;"));
            let d = k.reg(Class::B32);
            k.ins(format!("add.u32 {d}, {lane}, {};", 32 * j));
            let ok = k.reg(Class::Pred);
            k.ins(format!("setp.lt.u32 {ok}, {d}, {hd};"));
            k.ins(format!("and.pred {ok}, {ok}, {valid};"));
            let ki = k.reg(Class::B32);
            k.ins(format!("add.u32 {ki}, {row}, {d};"));
            let ka = addr4(&mut k, keys, ki);
            k.ins(format!("@{ok} ld.global.f32 {f}, [{ka}];"));
            feats.push(f);
        }
        rows.push((n, valid, feats));
    }
    let lane0 = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {lane0}, {lane}, 0;"));
    // This lane's staged query feature `lane` of head 0; others at immediate offsets.
    let qo = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {qo}, {lane}, 4;"));
    k.ins(format!("add.u64 {qo}, {qo}, {qs};"));
    // Every dot product first, then their reductions, then their stores: a store to shared
    // memory between them would keep the next head's query loads behind it.
    let mut sums = Vec::new();
    for (n, valid, feats) in &rows {
        // Key n's scores, a row of SPLIT_KEYS per head.
        let so = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {so}, {n}, 4;"));
        k.ins(format!("add.u64 {so}, {so}, {scores};"));
        for h in 0..hg {
            let acc = k.reg(Class::F32);
            k.ins(format!("mov.f32 {acc}, 0f00000000;"));
            for (j, f) in feats.iter().enumerate() {
                let d = 32 * j as u32;
                if d >= hd {
                    break;
                }
                // q[h][lane + d]: lanes past hd read zeros multiplied by zero features, but
                // must stay inside the staged rows.
                let qv = k.reg(Class::F32);
                let at = 4 * (h * hd + d);
                if d + 32 > hd {
                    let ok = k.reg(Class::Pred);
                    k.ins(format!("setp.lt.u32 {ok}, {lane}, {};", hd - d));
                    k.ins(format!("mov.f32 {qv}, 0f00000000;"));
                    k.ins(format!("@{ok} ld.shared.f32 {qv}, [{qo}+{at}];"));
                } else {
                    k.ins(format!("ld.shared.f32 {qv}, [{qo}+{at}];"));
                }
                k.ins(format!("fma.rn.f32 {acc}, {qv}, {f}, {acc};"));
            }
            sums.push((so, *valid, h, acc));
        }
    }
    for &(_, _, _, acc) in &sums {
        warp_sum(&mut k, acc);
    }
    for (so, valid, h, acc) in sums {
        k.ins(format!(
            "mul.f32 {acc}, {acc}, {};",
            Kernel::f32_imm(s.scale)
        ));
        k.ins(format!("selp.f32 {acc}, {acc}, 0fFF800000, {valid};"));
        k.ins(format!(
            "@{lane0} st.shared.f32 [{so}+{}], {acc};",
            4 * h * SPLIT_KEYS
        ));
    }
    k.ins("bar.sync 0;");

    // Softmax pieces: warp w takes heads w, w + 8, ...; lane n holds key n's score.
    let hh = k.reg(Class::B32);
    k.ins(format!("mov.u32 {hh}, {warp};"));
    k.strided(hh, hg, ATTEND_WARPS, &mut |k| {
        let at = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {at}, {hh}, {SPLIT_KEYS}, {lane};"));
        let sa = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {sa}, {at}, 4;"));
        k.ins(format!("add.u64 {sa}, {sa}, {scores};"));
        let x = k.reg(Class::F32);
        k.ins(format!("ld.shared.f32 {x}, [{sa}];"));
        let m = k.reg(Class::F32);
        k.ins(format!("mov.f32 {m}, {x};"));
        warp_reduce(k, "max", m);
        // Keys past the split's end: exp(-inf) = 0.
        k.ins(format!("sub.f32 {x}, {x}, {m};"));
        let e = exp(k, x);
        k.ins(format!("st.shared.f32 [{sa}], {e};"));
        let l = k.reg(Class::F32);
        k.ins(format!("mov.f32 {l}, {e};"));
        warp_sum(k, l);
        // ml_part[split][g·hg + hh] = (m, l).
        let mi = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {mi}, {g}, {hg}, {hh};"));
        k.ins(format!("mad.lo.u32 {mi}, {split}, {}, {mi};", s.heads));
        k.ins(format!("shl.b32 {mi}, {mi}, 1;"));
        let ma = addr4(k, ml_part, mi);
        k.ins(format!("@{lane0} st.global.v2.f32 [{ma}], {{{m}, {l}}};"));
    });
    k.ins("bar.sync 0;");

    // Unnormalised outputs: thread d accumulates Σ_n e[h][n] · v[n][d] for the group's heads,
    // every key's value load issued first (keys past the split's end load nothing: a zero
    // times their zero weight).
    let od = k.reg(Class::B32);
    k.ins(format!("mov.u32 {od}, {tid};"));
    k.strided(od, hd, threads, &mut |k| {
        let accs: Vec<Reg> = (0..hg).map(|_| k.reg(Class::F32)).collect();
        for a in &accs {
            k.ins(format!("mov.f32 {a}, 0f00000000;"));
        }
        let mut loaded = Vec::new();
        for u in 0..SPLIT_KEYS {
            let valid = k.reg(Class::Pred);
            k.ins(format!("setp.gt.u32 {valid}, {nkeys}, {u};"));
            let row = row_of(k, &u);
            k.ins(format!("add.u32 {row}, {row}, {od};"));
            let va = addr4(k, values, row);
            let vv = k.reg(Class::F32);
            k.ins(format!("mov.f32 {vv}, 0f00000000;"));
            k.ins(format!("@{valid} ld.global.f32 {vv}, [{va}];"));
            loaded.push(vv);
        }
        for (u, vv) in loaded.into_iter().enumerate() {
            for (h, a) in accs.iter().enumerate() {
                let ev = k.reg(Class::F32);
                k.ins(format!(
                    "ld.shared.f32 {ev}, [{scores}+{}];",
                    4 * (h as u32 * SPLIT_KEYS + u as u32)
                ));
                k.ins(format!("fma.rn.f32 {a}, {ev}, {vv}, {a};"));
            }
        }
        // o_part[split][g·hg + h][d].
        for (h, a) in accs.iter().enumerate() {
            let oi = k.reg(Class::B32);
            k.ins(format!("mad.lo.u32 {oi}, {g}, {hg}, {h};"));
            k.ins(format!("mad.lo.u32 {oi}, {split}, {}, {oi};", s.heads));
            k.ins(format!("mad.lo.u32 {oi}, {oi}, {hd}, {od};"));
            let oa = addr4(k, o_part, oi);
            k.ins(format!("st.global.f32 [{oa}], {a};"));
        }
    });
    k.place(&done);
    k.finish()
}

/// Threads per block of `attend_combine`.
pub const COMBINE_BLOCK: u32 = 256;

/// Threads that share one output element of `attend_combine`, each taking every P-th split:
/// up to 8 (a power of two, so a butterfly over them stays inside their group of lanes).
fn combine_threads(s: &AttentionSpec) -> u32 {
    attend_splits(s).next_power_of_two().min(8)
}

/// Blocks of `attend_combine`: `combine_threads` per output element.
pub fn attend_combine_grid(s: &AttentionSpec) -> u32 {
    (s.heads * s.head_dim * combine_threads(s)).div_ceil(COMBINE_BLOCK)
}

/// Decode attention, second half: P threads (`combine_threads`, 8 for the 2B model's 64
/// splits) per (head h, feature d) combine the splits that held keys: with M the largest split
/// max, `out = Σ_s e^(m_s - M) o_s / Σ_s e^(m_s - M) l_s`. Each thread loads its splits' (m, l)
/// and o at once (one basic block: one wait on L2 where a loop over 64 splits would wait 64
/// times), the P threads find M and add their parts by shuffles, and the first stores.
/// Threads past the last element compute a copy of it and store nothing, so every warp stays
/// whole for its shuffles. Parameters: position `i32[1]`, partial out `f32[S,H,hd]`, partial
/// max and sum `f32[S,H,2]`, out `f32[H,hd]`. Launch: `attend_combine_grid` blocks of
/// `COMBINE_BLOCK`.
pub fn attend_combine(s: &AttentionSpec) -> String {
    let (hd, w) = (s.head_dim, s.window);
    let (splits, p) = (attend_splits(s), combine_threads(s));
    let elements = s.heads * hd;
    let mut k = Kernel::new(&format!("{}_combine", s.name));
    let position = k.param_ptr("position");
    let o_part = k.param_ptr("o_part");
    let ml_part = k.param_ptr("ml_part");
    let out = k.param_ptr("out");
    let t = k.global_index(COMBINE_BLOCK);
    // Element e (clamped to the last), and this thread's first split `part`.
    let (e, part) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("shr.u32 {e}, {t}, {};", p.trailing_zeros()));
    k.ins(format!("and.b32 {part}, {t}, {};", p - 1));
    let stores = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {stores}, {e}, {elements};"));
    k.ins(format!("min.u32 {e}, {e}, {};", elements - 1));
    let h = k.reg(Class::B32);
    k.ins(format!("div.u32 {h}, {e}, {hd};"));
    let pos = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {pos}, [{position}];"));
    // Splits with keys: ceil(min(pos + 1, W) / 32).
    let used = k.reg(Class::B32);
    k.ins(format!("min.u32 {used}, {pos}, {};", w - 1));
    k.ins(format!("add.u32 {used}, {used}, {SPLIT_KEYS};"));
    k.ins(format!("div.u32 {used}, {used}, {SPLIT_KEYS};"));
    // Splits part, part + P, ...: every load first (splits past the window's are read, as
    // any stale finite or not value, and left out below).
    let mut loaded = Vec::new();
    for u in 0..splits.div_ceil(p) {
        let sp = k.reg(Class::B32);
        k.ins(format!("add.u32 {sp}, {part}, {};", u * p));
        let valid = k.reg(Class::Pred);
        k.ins(format!("setp.lt.u32 {valid}, {sp}, {used};"));
        // A split past the last (when P does not divide S) reads split 0's row instead.
        if splits % p != 0 {
            let inside = k.reg(Class::Pred);
            k.ins(format!("setp.lt.u32 {inside}, {sp}, {splits};"));
            k.ins(format!("selp.u32 {sp}, {sp}, 0, {inside};"));
        }
        let mi = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {mi}, {sp}, {}, {h};", s.heads));
        k.ins(format!("shl.b32 {mi}, {mi}, 1;"));
        let ma = addr4(&mut k, ml_part, mi);
        let (mv, lv) = (k.reg(Class::F32), k.reg(Class::F32));
        k.ins(format!("ld.global.v2.f32 {{{mv}, {lv}}}, [{ma}];"));
        let oi = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {oi}, {sp}, {elements}, {e};"));
        let oa = addr4(&mut k, o_part, oi);
        let ov = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {ov}, [{oa}];"));
        loaded.push((valid, mv, lv, ov));
    }
    let big_m = k.reg(Class::F32);
    k.ins(format!("mov.f32 {big_m}, 0fFF800000;"));
    for (valid, mv, _, _) in &loaded {
        k.ins(format!("@{valid} max.f32 {big_m}, {big_m}, {mv};"));
    }
    lanes_reduce(&mut k, "max", big_m, p);
    let (num, den) = (k.reg(Class::F32), k.reg(Class::F32));
    k.ins(format!("mov.f32 {num}, 0f00000000;"));
    k.ins(format!("mov.f32 {den}, 0f00000000;"));
    for (valid, mv, lv, ov) in loaded {
        k.ins(format!("sub.f32 {mv}, {mv}, {big_m};"));
        let f = exp(&mut k, mv);
        k.ins(format!("@{valid} fma.rn.f32 {num}, {f}, {ov}, {num};"));
        k.ins(format!("@{valid} fma.rn.f32 {den}, {f}, {lv}, {den};"));
    }
    lanes_reduce(&mut k, "add", num, p);
    lanes_reduce(&mut k, "add", den, p);
    let first = k.reg(Class::Pred);
    k.ins(format!("setp.eq.and.u32 {first}, {part}, 0, {stores};"));
    k.ins(format!("div.rn.f32 {num}, {num}, {den};"));
    let oa = addr4(&mut k, out, e);
    k.ins(format!("@{first} st.global.f32 [{oa}], {num};"));
    k.finish()
}

/// Query heads each warp of `attend_tokens` takes: two where the KV group has two or more
/// (key tile reads and value rows serve both).
fn heads_per_warp(s: &AttentionSpec) -> u32 {
    s.group().min(2)
}

/// Warps of `attend_tokens` per token: one per two query heads of the KV group.
fn warps_per_token(s: &AttentionSpec) -> u32 {
    s.group().div_ceil(heads_per_warp(s))
}

/// Tokens one block of `attend_tokens` takes: each key and value tile it stages in shared
/// memory serves all of their queries. Four, fewer where the block would pass 32 warps.
pub fn attend_tokens_per_block(s: &AttentionSpec) -> u32 {
    (32 / warps_per_token(s)).clamp(1, 4)
}

/// Blocks of `attend_tokens` for a chunk of up to `max_tokens`: one per (group of
/// `attend_tokens_per_block` tokens, KV head).
pub fn attend_tokens_grid(s: &AttentionSpec, max_tokens: u32) -> u32 {
    max_tokens.div_ceil(attend_tokens_per_block(s)) * s.kv_heads
}

/// Threads per block of `attend_tokens`: a warp per two query heads of the KV group, for each
/// of the block's tokens.
pub fn attend_tokens_block(s: &AttentionSpec) -> u32 {
    32 * warps_per_token(s) * attend_tokens_per_block(s)
}

/// Keys per tile of `attend_tokens`: one per lane when scoring.
pub const TILE_KEYS: u32 = 32;

/// Shared bytes of `attend_tokens`' tile (the keys', then the values'): `TILE_KEYS` rows of hd
/// floats, padded by 4 so a warp's 16-byte loads of 32 different rows spread over all banks.
pub fn attend_tokens_shared(s: &AttentionSpec) -> u32 {
    4 * TILE_KEYS * (s.head_dim + 4)
}

/// Attention for a chunk of T queries (prefill). A block per (group of
/// `attend_tokens_per_block` consecutive tokens (4 for the 2B shape), KV head), a warp per
/// (token, two query heads sharing that KV head): 20 warps for the 2B shape. The union of the
/// tokens' windows goes through in tiles of 32 positions: the block stages the tile's key rows
/// in shared memory (16-byte loads, coalesced), lane j of each warp computes key j's whole dot
/// product with each of its heads' queries (queries read as 16-byte broadcasts, each key quad
/// from shared memory once for both heads: no per-key shuffle reduction), masked to the warp's
/// token's window, then one online-softmax update per tile and head (running max and sum);
/// then the block stages the tile's value rows into the same shared memory and each lane adds
/// them to its features, each key's weight broadcast from its lane (`shfl.idx`). Staging serves
/// the block's 4 tokens: the window's keys and values cross from L2 once per block, where a
/// warp loading its own value rows would read them once per warp (5 for the 2B shape) and
/// token. Keys and values of positions before the chunk come from the ring, the chunk's own
/// from its rotated keys and its values (the ring is written after, by `write_ring_tokens`, so
/// no query loses a key a later token would overwrite). Parameters: q `f32[T,H,hd]` (rotated), count `i32[1]`,
/// start `i32[1]`, chunk keys `f32[T,G,hd]` (rotated), chunk values `f32[T,G,hd]`, keys, values
/// (the ring), out `f32[T,H,hd]`. hd a multiple of 4. Launch: `attend_tokens_grid` blocks of
/// `attend_tokens_block`; blocks past the count leave.
pub fn attend_tokens(s: &AttentionSpec) -> String {
    let group = s.group();
    assert!(
        group <= MAX_GROUP,
        "more than {MAX_GROUP} query heads per KV head"
    );
    let (hd, w, gkv) = (s.head_dim, s.window, s.kv_heads);
    assert!(hd % 4 == 0, "head width must be a multiple of 4");
    let (threads, hp) = (attend_tokens_block(s), heads_per_warp(s));
    let (per_block, wpt) = (attend_tokens_per_block(s), warps_per_token(s));
    assert!(
        per_block <= TILE_KEYS,
        "a block's windows must start within one tile"
    );
    let row_bytes = 4 * (hd + 4);
    let mut k = Kernel::new(&format!("{}_attend_tokens", s.name));
    // Up to 1024 threads: registers must stay within 65536 per block.
    k.launch_bounds(threads, 1);
    k.shared("tile", attend_tokens_shared(s), 16);
    let params = ChunkAttention::declare(&mut k);
    let ChunkAttention {
        q,
        chunk_keys,
        chunk_values,
        keys,
        values,
        out,
        ..
    } = params;

    let (tid, blk) = k.thread_and_block();
    let (warp, lane) = k.warp_and_lane(tid);
    let (t0, g) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("div.u32 {t0}, {blk}, {gkv};"));
    k.ins(format!("mul.lo.u32 {t0}, {t0}, {per_block};"));
    k.ins(format!("rem.u32 {g}, {blk}, {gkv};"));
    let done = k.label("done");
    // This warp's token t0 + warp / wpt; past the chunk's last token it computes that one's
    // rows again and stores nothing. The block's tiles run from its first token's window start
    // to its last token's position.
    let BlockSpan {
        n,
        start,
        last,
        first,
        final_pos,
        ..
    } = block_span(&mut k, &params, t0, per_block, w, &done);
    let (i_tok, head_warp) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("div.u32 {i_tok}, {warp}, {wpt};"));
    k.ins(format!("rem.u32 {head_warp}, {warp}, {wpt};"));
    let t = k.reg(Class::B32);
    k.ins(format!("add.u32 {t}, {t0}, {i_tok};"));
    let active = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {active}, {t}, {n};"));
    k.ins(format!("min.u32 {t}, {t}, {last};"));
    let pos = k.reg(Class::B32);
    k.ins(format!("add.u32 {pos}, {start}, {t};"));
    let lo = window_start(&mut k, pos, w);
    // The warp's rows: query heads hp·head_warp + u of the group, row (t, g·group + head).
    // With an odd group the last warp's second head repeats its first, and is not stored.
    struct Row {
        /// First element of the row in q and out.
        qrow: Reg,
        qp: Reg,
        store: Reg,
    }
    let rows: Vec<Row> = (0..hp)
        .map(|u| {
            let hh = k.reg(Class::B32);
            k.ins(format!("mad.lo.u32 {hh}, {head_warp}, {hp}, {u};"));
            let store = k.reg(Class::Pred);
            k.ins(format!("setp.lt.and.u32 {store}, {hh}, {group}, {active};"));
            k.ins(format!("min.u32 {hh}, {hh}, {};", group - 1));
            let qrow = k.reg(Class::B32);
            k.ins(format!("mad.lo.u32 {qrow}, {g}, {group}, {hh};"));
            k.ins(format!("mad.lo.u32 {qrow}, {t}, {}, {qrow};", s.heads));
            k.ins(format!("mul.lo.u32 {qrow}, {qrow}, {hd};"));
            let qp = k.reg(Class::B64);
            k.ins(format!("mul.wide.u32 {qp}, {qrow}, 4;"));
            k.ins(format!("add.u64 {qp}, {qp}, {q};"));
            Row { qrow, qp, store }
        })
        .collect();
    let tile = k.reg(Class::B64);
    k.ins(format!("mov.u64 {tile}, tile;"));
    // Value features by 16-byte quads per lane when they tile the head exactly.
    let wide = hd % 128 == 0;
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
    // Per row: the lane's output accumulators, running max and sum.
    let state: Vec<(Vec<Reg>, Reg, Reg)> = rows
        .iter()
        .map(|_| {
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
            (acc, m, l)
        })
        .collect();

    // Tiles of positions p0 .. p0 + 31 from the first token's window start to the last
    // token's position (rows are masked to their own token's window).
    let key_tile = key_tiles(&mut k, first, final_pos, TILE_KEYS, w);
    let (p0, nk, slot0) = (key_tile.p0, key_tile.nk, key_tile.slot0);

    // Stages the tile's rows of keys or values: element (r, c) of hd/4 16-byte pieces per row.
    let quads = hd / 4;
    let stage = |k: &mut Kernel, chunk_base: Reg, ring_base: Reg| {
        let i = k.reg(Class::B32);
        k.ins(format!("mov.u32 {i}, {tid};"));
        let elements = k.reg(Class::B32);
        k.ins(format!("mul.lo.u32 {elements}, {nk}, {quads};"));
        k.strided(i, elements, threads, &mut |k| {
            let r = k.reg(Class::B32);
            k.ins(format!("div.u32 {r}, {i}, {quads};"));
            let c = k.reg(Class::B32);
            k.ins(format!("rem.u32 {c}, {i}, {quads};"));
            let pp = k.reg(Class::B32);
            k.ins(format!("add.u32 {pp}, {p0}, {r};"));
            let (base, row) = kv_row(k, s, pp, slot0, r, start, g, chunk_base, ring_base);
            k.ins(format!("mad.lo.u32 {row}, {c}, 4, {row};"));
            let src = addr4(k, base, row);
            let v = k.regs4(Class::F32);
            k.ins(format!(
                "ld.global.v4.f32 {{{}, {}, {}, {}}}, [{src}];",
                v[0], v[1], v[2], v[3]
            ));
            let dst = k.reg(Class::B32);
            k.ins(format!("mul.lo.u32 {dst}, {r}, {row_bytes};"));
            k.ins(format!("mad.lo.u32 {dst}, {c}, 16, {dst};"));
            let dp = k.reg(Class::B64);
            k.ins(format!("cvt.u64.u32 {dp}, {dst};"));
            k.ins(format!("add.u64 {dp}, {dp}, {tile};"));
            k.ins(format!(
                "st.shared.v4.f32 [{dp}], {{{}, {}, {}, {}}};",
                v[0], v[1], v[2], v[3]
            ));
        });
        k.ins("bar.sync 0;");
    };
    stage(&mut k, chunk_keys, keys);

    // Lane j scores key j of the tile for each of the warp's rows (tile rows past nk hold
    // stale values and are masked); each key quad read from shared memory serves every row.
    let kp = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {kp}, {lane}, {row_bytes};"));
    k.ins(format!("add.u64 {kp}, {kp}, {tile};"));
    let scores: Vec<Reg> = rows
        .iter()
        .map(|_| {
            let sc = k.reg(Class::F32);
            k.ins(format!("mov.f32 {sc}, 0f00000000;"));
            sc
        })
        .collect();
    for cq in 0..quads {
        let kv = k.regs4(Class::F32);
        k.ins(format!(
            "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [{kp}+{}];",
            kv[0],
            kv[1],
            kv[2],
            kv[3],
            16 * cq
        ));
        for (row, score) in rows.iter().zip(&scores) {
            let qv = k.regs4(Class::F32);
            // Coherent loads: q is the previous kernel's output, which may still be being
            // written when this kernel starts (programmatic dependent launch), so not through
            // the non-coherent cache even after the wait.
            k.ins(format!(
                "ld.global.v4.f32 {{{}, {}, {}, {}}}, [{}+{}];",
                qv[0],
                qv[1],
                qv[2],
                qv[3],
                row.qp,
                16 * cq
            ));
            for (a, b) in qv.iter().zip(&kv) {
                k.ins(format!("fma.rn.f32 {score}, {a}, {b}, {score};"));
            }
        }
    }
    // Key j (position p0 + j) counts when it is in the tile and in the warp's token's window.
    let key_pos = k.reg(Class::B32);
    k.ins(format!("add.u32 {key_pos}, {p0}, {lane};"));
    let valid = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {valid}, {lane}, {nk};"));
    k.ins(format!(
        "setp.ge.and.u32 {valid}, {key_pos}, {lo}, {valid};"
    ));
    k.ins(format!(
        "setp.le.and.u32 {valid}, {key_pos}, {pos}, {valid};"
    ));
    // Online softmax over the tile, per row: m' = max(m, max_j s_j), every sum and accumulator
    // scaled by e^(m - m'), key j weighted e^(s_j - m') (0 where masked). The first tile holds
    // a key of every row's window (the block's tokens are consecutive, so their windows start
    // at most per_block - 1 < 32 positions after the first's), so m' is finite from there on,
    // and a later tile wholly past a token (masked) weighs its keys e^(-inf) = 0.
    let mut weights = Vec::new();
    for (score, (acc, m, l)) in scores.iter().zip(&state) {
        k.ins(format!(
            "mul.f32 {score}, {score}, {};",
            Kernel::f32_imm(s.scale)
        ));
        k.ins(format!("selp.f32 {score}, {score}, 0fFF800000, {valid};"));
        let m_new = k.reg(Class::F32);
        k.ins(format!("mov.f32 {m_new}, {score};"));
        warp_reduce(&mut k, "max", m_new);
        k.ins(format!("max.f32 {m_new}, {m_new}, {m};"));
        let keep = k.reg(Class::F32);
        k.ins(format!("sub.f32 {keep}, {m}, {m_new};"));
        let keep = exp(&mut k, keep);
        let weight = k.reg(Class::F32);
        k.ins(format!("sub.f32 {weight}, {score}, {m_new};"));
        let weight = exp(&mut k, weight);
        let tile_sum = k.reg(Class::F32);
        k.ins(format!("mov.f32 {tile_sum}, {weight};"));
        warp_sum(&mut k, tile_sum);
        k.ins(format!("fma.rn.f32 {l}, {l}, {keep}, {tile_sum};"));
        for a in acc {
            k.ins(format!("mul.f32 {a}, {a}, {keep};"));
        }
        k.ins(format!("mov.f32 {m}, {m_new};"));
        weights.push(weight);
    }
    // Every warp is done with the key tile before the values replace it.
    k.ins("bar.sync 0;");
    stage(&mut k, chunk_values, values);

    // Values: key j's weight from lane j, its value row (from shared memory) added to this
    // lane's features of every row: 16-byte loads of features 4·lane +
    // 128·e.. when hd is a multiple of 128 (the lane's accumulators in that order), else single
    // features lane + 32·e.
    let vp = k.reg(Class::B64);
    if wide {
        k.ins(format!("mul.wide.u32 {vp}, {lane}, 16;"));
    } else {
        k.ins(format!("mul.wide.u32 {vp}, {lane}, 4;"));
    }
    k.ins(format!("add.u64 {vp}, {vp}, {tile};"));
    let keys_step = |k: &mut Kernel, j: Reg, keys: u32| {
        let mut loaded = Vec::new();
        for u in 0..keys {
            let ju = k.reg(Class::B32);
            k.ins(format!("add.u32 {ju}, {j}, {u};"));
            let wj: Vec<Reg> = weights
                .iter()
                .map(|weight| {
                    let wj = k.reg(Class::F32);
                    k.ins(format!("shfl.sync.idx.b32 {wj}, {weight}, {ju}, 31, -1;"));
                    wj
                })
                .collect();
            let va = k.reg(Class::B64);
            k.ins(format!("mul.wide.u32 {va}, {ju}, {row_bytes};"));
            k.ins(format!("add.u64 {va}, {va}, {vp};"));
            let vals: Vec<Reg> = (0..lanes_e).map(|_| k.reg(Class::F32)).collect();
            if wide {
                for (e, q) in vals.chunks(4).enumerate() {
                    k.ins(format!(
                        "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [{va}+{}];",
                        q[0],
                        q[1],
                        q[2],
                        q[3],
                        512 * e
                    ));
                }
            } else {
                for (e, vv) in vals.iter().enumerate() {
                    if has[e].is_some() {
                        k.ins(format!("mov.f32 {vv}, 0f00000000;"));
                    }
                    k.ins(guarded(
                        has[e],
                        format!("ld.shared.f32 {vv}, [{va}+{}];", 128 * e),
                    ));
                }
            }
            loaded.push((wj, vals));
        }
        for (wj, vals) in loaded {
            for (w, (acc, _, _)) in wj.iter().zip(&state) {
                for (a, vv) in acc.iter().zip(&vals) {
                    k.ins(format!("fma.rn.f32 {a}, {w}, {vv}, {a};"));
                }
            }
        }
        k.ins(format!("add.u32 {j}, {j}, {keys};"));
    };
    let j = k.reg(Class::B32);
    k.ins(format!("mov.u32 {j}, 0;"));
    // One key at a time (from shared memory, so little latency to cover): 640 threads of the
    // 2B shape's blocks leave 96 registers each, which two keys' values in flight exceed.
    let (next, end_keys) = (k.label("key"), k.label("keys_end"));
    k.place(&next);
    k.leave_unless_below(j, nk, &end_keys);
    keys_step(&mut k, j, 1);
    k.ins(format!("bra {next};"));
    k.place(&end_keys);
    // Every warp is done with the value tile before the next keys replace it.
    k.ins("bar.sync 0;");
    key_tile.close(&mut k);

    for ((acc, _, l), row) in state.iter().zip(&rows) {
        let inv = k.reg(Class::F32);
        k.ins(format!("rcp.rn.f32 {inv}, {l};"));
        for a in acc {
            k.ins(format!("mul.f32 {a}, {a}, {inv};"));
        }
        let skip = k.label("not_stored");
        k.ins(format!("@!{} bra {skip};", row.store));
        let qrow = row.qrow;
        if wide {
            let oi = k.reg(Class::B32);
            k.ins(format!("mad.lo.u32 {oi}, {lane}, 4, {qrow};"));
            let oa = addr4(&mut k, out, oi);
            for (e, q) in acc.chunks(4).enumerate() {
                k.ins(format!(
                    "st.global.v4.f32 [{oa}+{}], {{{}, {}, {}, {}}};",
                    512 * e,
                    q[0],
                    q[1],
                    q[2],
                    q[3]
                ));
            }
        } else {
            for (e, a) in acc.iter().enumerate() {
                let oi = k.reg(Class::B32);
                k.ins(format!("add.u32 {oi}, {qrow}, {lane};"));
                k.ins(format!("add.u32 {oi}, {oi}, {};", 32 * e));
                let oa = addr4(&mut k, out, oi);
                k.ins(guarded(has[e], format!("st.global.f32 [{oa}], {a};")));
            }
        }
        k.place(&skip);
    }
    k.place(&done);
    k.finish()
}
