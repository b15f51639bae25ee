//! Chunk attention on tensor cores (`attend_tokens_tc`): flash attention with `mma.sync`, every
//! f32 operand split into bf16 hi and lo halves so the products keep about 16 bits (three MMAs
//! per product: hi·hi, hi·lo, lo·hi), as the projections keep the f32 tolerance; or, with
//! `TcInputs::Bf16` or `TcInputs::F16`, rounded to bf16 or f16 (one MMA; the GPU lowering
//! gives attention split operands where f16 was chosen, having no row scales here; bf16 as the
//! reference's own bf16 run). `kv_split_tokens` splits the window's keys and values once per
//! chunk; `attend_tokens_tc` copies its tiles from those planes.

use crate::attention::{
    block_span, key_tiles, window_start, AttentionSpec, BlockSpan, ChunkAttention,
};
use crate::builder::{Class, Kernel, Reg};
use crate::math::LOG2_E;
use crate::rg_lru::addr4;
use crate::tc::{
    ldmatrix_lane, ldmatrix_offset, ldmatrix_x4, mma, round_pair, split_pair, TcInputs,
};

/// Query tokens per block (an `mma` tile's 16 rows) and keys per tile (one k-step of the
/// probabilities' product with the values).
const ROWS: u32 = 16;
const TILE: u32 = 16;

/// Warps (query heads of one KV group) per block at most.
const MAX_WARPS: u32 = 8;

/// Blocks a KV group's query heads are spread over, and heads per block: the 2B model's 10
/// heads per KV head take two blocks of 5.
fn head_parts(s: &AttentionSpec) -> (u32, u32) {
    let parts = s.group().div_ceil(MAX_WARPS);
    (parts, s.group().div_ceil(parts))
}

/// Whether `attend_tokens_tc` takes this attention: head widths a multiple of 16 (a k-step of
/// the scores) whose four staged tiles fit 48 KiB of shared memory (up to 752).
pub fn attention_fits_tensor_cores(s: &AttentionSpec) -> bool {
    s.head_dim % 16 == 0 && attend_tokens_tc_shared(s) <= 48 * 1024
}

/// Bytes between rows of a staged tile: hd bf16 and 16 bytes of padding, so the 8 rows an
/// `ldmatrix` reads fall in 8 different groups of 4 banks.
fn row_bytes(s: &AttentionSpec) -> u32 {
    2 * s.head_dim + 16
}

/// Shared bytes of `attend_tokens_tc`: keys and values of a tile, each as bf16 hi and lo.
pub fn attend_tokens_tc_shared(s: &AttentionSpec) -> u32 {
    4 * TILE * row_bytes(s)
}

/// Blocks of `attend_tokens_tc` for chunks of up to `max_tokens`: one per (16 tokens, KV head,
/// part of its query heads).
pub fn attend_tokens_tc_grid(s: &AttentionSpec, max_tokens: u32) -> u32 {
    max_tokens.div_ceil(ROWS) * s.kv_heads * head_parts(s).0
}

/// Threads per block of `attend_tokens_tc`: a warp per query head of the block's part.
pub fn attend_tokens_tc_block(s: &AttentionSpec) -> u32 {
    32 * head_parts(s).1
}

/// Bytes of `attend_tokens_tc`'s query scratch for chunks of up to `max_tokens`: each warp's
/// query fragments (16 rows × hd, as bf16 hi and lo in `mma` fragment order), one slot per warp
/// of the grid.
pub fn attend_tokens_tc_scratch(s: &AttentionSpec, max_tokens: u32) -> u64 {
    let warps = attend_tokens_tc_grid(s, max_tokens) as u64 * head_parts(s).1 as u64;
    warps * slot_bytes(s) as u64
}

/// Bytes of one warp's query fragments: hd/16 k-steps of 32 lanes × 8 words (hi a0..a3, lo
/// a0..a3).
fn slot_bytes(s: &AttentionSpec) -> u32 {
    s.head_dim / 16 * 32 * 32
}

/// Rows of `kv_split_tokens`' planes for chunks of up to `max_tokens`: the W-1 positions a
/// chunk's first token sees before it, and the chunk's own.
fn plane_rows(s: &AttentionSpec, max_tokens: u32) -> u32 {
    s.window - 1 + max_tokens
}

/// Bytes of one plane: `plane_rows` rows of G × hd bf16.
fn plane_bytes(s: &AttentionSpec, max_tokens: u32) -> u32 {
    plane_rows(s, max_tokens) * s.kv_heads * s.head_dim * 2
}

/// Bytes of `kv_split_tokens`' output: four planes (keys hi, keys lo, values hi, values lo).
pub fn kv_split_bytes(s: &AttentionSpec, max_tokens: u32) -> u64 {
    4 * plane_bytes(s, max_tokens) as u64
}

/// Threads `kv_split_tokens` covers for chunks of up to `max_tokens`: one per pair of features
/// of a KV head's row (launch `elementwise_grid` of this many, blocks of `NORM_BLOCK`).
pub fn kv_split_threads(s: &AttentionSpec, max_tokens: u32) -> u32 {
    plane_rows(s, max_tokens) * s.kv_heads * s.head_dim / 2
}

/// The keys and values a chunk's queries see, once, as `attend_tokens_tc` stages them: each
/// f32 pair of the positions from the first token's window start to the chunk's last, from the
/// ring before the chunk and from the chunk's own rotated keys and values, split into bf16 hi
/// and lo (or rounded, `TcInputs`), into planes `[position - window start][G][hd]`. Every
/// attention block then copies its tiles from these instead of loading and splitting the same
/// rows again (each row served 2 blocks × 5 heads per 16 tokens for the 2B shape; by count the
/// staging was ~40% of the kernel's instructions). Parameters: count `i32[1]`, start `i32[1]`,
/// chunk keys, chunk values, keys, values (the ring), planes (`kv_split_bytes`). Launch:
/// `elementwise_grid(kv_split_threads, NORM_BLOCK)` blocks of `NORM_BLOCK`.
pub fn kv_split_tokens(s: &AttentionSpec, inputs_as: TcInputs, max_tokens: u32) -> String {
    use crate::prefill::NORM_BLOCK;
    let split = inputs_as == TcInputs::Split;
    let ty = inputs_as.mma_type();
    let (hd, w, gkv) = (s.head_dim, s.window, s.kv_heads);
    let plane = plane_bytes(s, max_tokens);
    let mut k = Kernel::new(&format!("{}_kv_split_tokens", s.name));
    let count = k.param_ptr("count");
    let start_at = k.param_ptr("start");
    let chunk_keys = k.param_ptr("chunk_keys");
    let chunk_values = k.param_ptr("chunk_values");
    let keys = k.param_ptr("keys");
    let values = k.param_ptr("values");
    let planes = k.param_ptr("planes");
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let start = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {start}, [{start_at}];"));
    let lo = window_start(&mut k, start, w);
    // Rows: the positions lo .. start + n - 1.
    let rows = k.reg(Class::B32);
    k.ins(format!("sub.u32 {rows}, {start}, {lo};"));
    k.ins(format!("add.u32 {rows}, {rows}, {n};"));
    let total = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {total}, {rows}, {};", gkv * hd / 2));
    k.grid_stride(NORM_BLOCK, total, &mut |k, e, _| {
        // e: (row r, KV head g, feature pair) of the planes.
        let (rg, pair) = (k.reg(Class::B32), k.reg(Class::B32));
        k.ins(format!("div.u32 {rg}, {e}, {};", hd / 2));
        k.ins(format!("rem.u32 {pair}, {e}, {};", hd / 2));
        let (r, g) = (k.reg(Class::B32), k.reg(Class::B32));
        k.ins(format!("div.u32 {r}, {rg}, {gkv};"));
        k.ins(format!("rem.u32 {g}, {rg}, {gkv};"));
        // Position lo + r: the chunk's row from `start` on, else its ring slot.
        let pp = k.reg(Class::B32);
        k.ins(format!("add.u32 {pp}, {lo}, {r};"));
        let in_chunk = k.reg(Class::Pred);
        k.ins(format!("setp.ge.u32 {in_chunk}, {pp}, {start};"));
        let row = k.reg(Class::B32);
        k.ins(format!("rem.u32 {row}, {pp}, {w};"));
        let own = k.reg(Class::B32);
        k.ins(format!("sub.u32 {own}, {pp}, {start};"));
        k.ins(format!("selp.b32 {row}, {own}, {row}, {in_chunk};"));
        let at = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {at}, {row}, {gkv}, {g};"));
        k.ins(format!("mul.lo.u32 {at}, {at}, {hd};"));
        k.ins(format!("mad.lo.u32 {at}, {pair}, 2, {at};"));
        // The destination word: row r's element 2·pair of head g, as bf16 (2 bytes).
        let out = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {out}, {rg}, {hd}, 0;"));
        k.ins(format!("mad.lo.u32 {out}, {pair}, 2, {out};"));
        let dst = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {dst}, {out}, 2;"));
        k.ins(format!("add.u64 {dst}, {dst}, {planes};"));
        for (i, (chunk_base, ring_base)) in [(chunk_keys, keys), (chunk_values, values)]
            .into_iter()
            .enumerate()
        {
            let base = k.reg(Class::B64);
            k.ins(format!(
                "selp.b64 {base}, {chunk_base}, {ring_base}, {in_chunk};"
            ));
            let src = addr4(k, base, at);
            let (x0, x1) = (k.reg(Class::F32), k.reg(Class::F32));
            k.ins(format!("ld.global.v2.f32 {{{x0}, {x1}}}, [{src}];"));
            // Planes: keys hi, keys lo, values hi, values lo.
            let (hi_plane, lo_plane) = (2 * i as u32, 2 * i as u32 + 1);
            if split {
                let (h, l) = split_pair(k, x0, x1);
                k.ins(format!("st.global.b32 [{dst}+{}], {h};", hi_plane * plane));
                k.ins(format!("st.global.b32 [{dst}+{}], {l};", lo_plane * plane));
            } else {
                let h = round_pair(k, ty, x0, x1);
                k.ins(format!("st.global.b32 [{dst}+{}], {h};", hi_plane * plane));
            }
        }
    });
    k.finish()
}

/// Attention for a chunk of T queries (prefill) on tensor cores. A block per (16 consecutive
/// tokens, KV head, part of its query heads), a warp per query head: the warp's 16 rows are the
/// block's tokens for its head, so every key and value tile the block stages serves all its
/// heads (5 for the 2B shape). The union of the tokens' windows goes through in tiles of 16
/// positions: the block copies the tile's key and value rows, already split into bf16 hi and
/// lo halves by `kv_split_tokens`, into shared memory (rows past the union as zeros: a masked
/// key's weight is 0, and 0 · NaN would not be); each warp computes its 16×16 scores with `mma`
/// (its query fragments split once into a scratch slot, the keys' through `ldmatrix`), masks
/// them to each row's window, updates its rows' running max and sums (online softmax in base
/// 2), rescales its output accumulators, and adds the probabilities (the score accumulators are
/// already an A fragment) times the values (`ldmatrix.trans`: the value rows are the k
/// dimension). Per (query row, key) that is ~0.75 MMA of 16×8×16 for the 2B shape. Parameters
/// as `attend_tokens` (its key and value sources unused here), then the query scratch
/// (`attend_tokens_tc_scratch` bytes) and the planes (`kv_split_tokens`' output, for the same
/// `max_tokens` and `inputs_as`). Launch: `attend_tokens_tc_grid` blocks of
/// `attend_tokens_tc_block`, after `kv_split_tokens`.
pub fn attend_tokens_tc(s: &AttentionSpec, inputs_as: TcInputs, max_tokens: u32) -> String {
    let split = inputs_as == TcInputs::Split;
    let ty = inputs_as.mma_type();
    // An f32 pair as the MMA's operands: bf16 hi and lo, or rounded to the operand type.
    let operands = |k: &mut Kernel, x0: Reg, x1: Reg| {
        if split {
            split_pair(k, x0, x1)
        } else {
            let r = round_pair(k, ty, x0, x1);
            (r, r)
        }
    };
    assert!(
        attention_fits_tensor_cores(s),
        "attention does not fit tensor cores"
    );
    let (hd, w, gkv, group) = (s.head_dim, s.window, s.kv_heads, s.group());
    let (parts, per_block) = head_parts(s);
    let threads = attend_tokens_tc_block(s);
    let rb = row_bytes(s);
    let tile_bytes = TILE * rb;
    // Tiles in shared memory: keys hi, keys lo, values hi, values lo.
    let (k_hi, k_lo, v_hi, v_lo) = (0, tile_bytes, 2 * tile_bytes, 3 * tile_bytes);
    let mut k = Kernel::new(&format!("{}_attend_tokens_tc", s.name));
    // Output accumulators take hd/2 registers a thread: one block per SM's share at most.
    k.launch_bounds(threads, 1);
    k.shared("kv_tiles", attend_tokens_tc_shared(s), 16);
    let params = ChunkAttention::declare(&mut k);
    // The keys and values come from the planes; their sources stay in the parameter list (the
    // same as `attend_tokens`', so the lowering swaps kernels with the same arguments).
    let ChunkAttention { q, out, .. } = params;
    let scratch = k.param_ptr("q_fragments");
    let planes = k.param_ptr("kv_planes");
    let plane = plane_bytes(s, max_tokens);

    let (tid, blk) = k.thread_and_block();
    let (warp, lane) = k.warp_and_lane(tid);
    // Block b: part b % parts, KV head (b / parts) % G, tokens 16 · (b / parts / G)...
    let (part, g, t0) = (k.reg(Class::B32), k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("rem.u32 {part}, {blk}, {parts};"));
    k.ins(format!("div.u32 {t0}, {blk}, {parts};"));
    k.ins(format!("rem.u32 {g}, {t0}, {gkv};"));
    k.ins(format!("div.u32 {t0}, {t0}, {gkv};"));
    k.ins(format!("mul.lo.u32 {t0}, {t0}, {ROWS};"));
    let done = k.label("done");
    // The block's tiles run from its first token's window start to its last token's position.
    let BlockSpan {
        n,
        start,
        last,
        first_pos,
        first,
        final_pos,
    } = block_span(&mut k, &params, t0, ROWS, w, &done);
    // This warp's head of the group (past the group, the last one again, not stored).
    let head = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {head}, {part}, {per_block}, {warp};"));
    let head_valid = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {head_valid}, {head}, {group};"));
    k.ins(format!("min.u32 {head}, {head}, {};", group - 1));
    k.ins(format!("mad.lo.u32 {head}, {g}, {group}, {head};"));
    let (gq, qq) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("shr.u32 {gq}, {lane}, 2;"));
    k.ins(format!("and.b32 {qq}, {lane}, 3;"));
    // This lane's two rows (g and g + 8 of the tile): whether stored, the first element of its
    // query row at column 2q, and of its output at the same column. Few registers stay live
    // through the tiles (the output accumulators take hd/2): each row's position and window
    // start are recomputed per tile from the first row's position.
    struct Row {
        store: Reg,
        qp: Reg,
        oe: Reg,
    }
    let rows: Vec<Row> = [0u32, 8]
        .iter()
        .map(|&off| {
            let t = k.reg(Class::B32);
            k.ins(format!("add.u32 {t}, {t0}, {gq};"));
            k.ins(format!("add.u32 {t}, {t}, {off};"));
            let store = k.reg(Class::Pred);
            k.ins(format!("setp.lt.and.u32 {store}, {t}, {n}, {head_valid};"));
            k.ins(format!("min.u32 {t}, {t}, {last};"));
            let e = k.reg(Class::B32);
            k.ins(format!("mad.lo.u32 {e}, {t}, {}, {head};", s.heads));
            k.ins(format!("mul.lo.u32 {e}, {e}, {hd};"));
            k.ins(format!("mad.lo.u32 {e}, {qq}, 2, {e};"));
            let qp = addr4(&mut k, q, e);
            Row { store, qp, oe: e }
        })
        .collect();
    // Row g's position (row g + 8's is 8 more, up to the last token's).
    let pos0 = k.reg(Class::B32);
    k.ins(format!("add.u32 {pos0}, {first_pos}, {gq};"));
    k.ins(format!("min.u32 {pos0}, {pos0}, {final_pos};"));
    let tiles = k.reg(Class::B64);
    k.ins(format!("mov.u64 {tiles}, kv_tiles;"));
    // ldmatrix row addresses: keys (rows are the n dimension) at row (lane % 8) + 8·(lane / 16),
    // column 8·((lane / 8) % 2); values (rows are the k dimension, transposed) at row
    // (lane % 8) + 8·((lane / 8) % 2), column 8·(lane / 16). Matrices 0, 1 then give an n-tile's
    // two k-halves, 2, 3 the next n-tile's.
    let (lane8, bit3, bit4) = ldmatrix_lane(&mut k, lane);
    let lane_at = |k: &mut Kernel, row_bit: Reg, col_bit: Reg| {
        let off = ldmatrix_offset(k, lane8, row_bit, col_bit, rb);
        let at = k.reg(Class::B64);
        k.ins(format!("cvt.u64.u32 {at}, {off};"));
        k.ins(format!("add.u64 {at}, {at}, {tiles};"));
        at
    };
    let key_at = lane_at(&mut k, bit4, bit3);
    let value_at = lane_at(&mut k, bit3, bit4);

    // The warp's query fragments, split once into its scratch slot (warp of the grid: block ·
    // warps + warp), this lane's 32 bytes per k-step: every tile reads them back with two
    // 16-byte loads instead of loading and splitting eight floats.
    let frag = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {frag}, {blk}, {per_block}, {warp};"));
    k.ins(format!(
        "mul.lo.u32 {frag}, {frag}, {};",
        slot_bytes(s) / 32
    ));
    k.ins(format!("add.u32 {frag}, {frag}, {lane};"));
    let frag_at = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {frag_at}, {frag}, 32;"));
    k.ins(format!("add.u64 {frag_at}, {frag_at}, {scratch};"));
    {
        let (qa, qb, fa) = (k.reg(Class::B64), k.reg(Class::B64), k.reg(Class::B64));
        k.ins(format!("mov.u64 {qa}, {};", rows[0].qp));
        k.ins(format!("mov.u64 {qb}, {};", rows[1].qp));
        k.ins(format!("mov.u64 {fa}, {frag_at};"));
        let step = k.reg(Class::B32);
        k.ins(format!("mov.u32 {step}, 0;"));
        k.strided(step, hd / 16, 1, &mut |k| {
            let mut hi = Vec::new();
            let mut lo = Vec::new();
            // a0: row g, columns 2q..; a1: row g + 8; a2: row g, columns 2q + 8..; a3: row
            // g + 8. Coherent loads: q is the previous kernel's output.
            for (at, col) in [(qa, 0u32), (qb, 0), (qa, 8), (qb, 8)] {
                let (x0, x1) = (k.reg(Class::F32), k.reg(Class::F32));
                k.ins(format!(
                    "ld.global.v2.f32 {{{x0}, {x1}}}, [{at}+{}];",
                    4 * col
                ));
                let (h, l) = operands(k, x0, x1);
                hi.push(h);
                lo.push(l);
            }
            k.ins(format!(
                "st.global.v4.b32 [{fa}], {{{}, {}, {}, {}}};",
                hi[0], hi[1], hi[2], hi[3]
            ));
            if split {
                k.ins(format!(
                    "st.global.v4.b32 [{fa}+16], {{{}, {}, {}, {}}};",
                    lo[0], lo[1], lo[2], lo[3]
                ));
            }
            k.ins(format!("add.u64 {qa}, {qa}, 64;"));
            k.ins(format!("add.u64 {qb}, {qb}, 64;"));
            k.ins(format!("add.u64 {fa}, {fa}, 1024;"));
        });
    }

    // Output accumulators ([n-tile of 8 features][4]), running max (base 2) per row and this
    // lane's share of each row's sum (the quad's four are added at the end).
    let acc: Vec<[Reg; 4]> = (0..hd / 8).map(|_| k.regs4(Class::F32)).collect();
    for a in acc.iter().flatten() {
        k.ins(format!("mov.f32 {a}, 0f00000000;"));
    }
    let (m, l) = (
        [k.reg(Class::F32), k.reg(Class::F32)],
        [k.reg(Class::F32), k.reg(Class::F32)],
    );
    for r in 0..2 {
        k.ins(format!("mov.f32 {}, 0fFF800000;", m[r]));
        k.ins(format!("mov.f32 {}, 0f00000000;", l[r]));
    }

    // Tiles of positions p0 .. p0 + 15 from the first token's window start to the last token's
    // position. The first tile holds a key of every row's window (the tokens are consecutive,
    // so their windows start at most 15 positions after the first's), so the running maxima
    // are finite from there on and a later tile wholly masked for a row weighs it 2^-inf = 0.
    // The planes' first row: the window start of the chunk's first position.
    let chunk_lo = window_start(&mut k, start, w);
    let key_tile = key_tiles(&mut k, first, final_pos, TILE, w);
    let (p0, nk) = (key_tile.p0, key_tile.nk);

    // Stage the tile from the planes (`kv_split_tokens`): 16 rows of hd/8 16-byte pieces of
    // each plane, rows past nk as zeros. Position p0 + r is plane row p0 + r - (the window
    // start of the chunk's first position).
    let units = hd / 8;
    let i = k.reg(Class::B32);
    k.ins(format!("mov.u32 {i}, {tid};"));
    k.strided(i, TILE * units, threads, &mut |k| {
        let r = k.reg(Class::B32);
        k.ins(format!("div.u32 {r}, {i}, {units};"));
        let c = k.reg(Class::B32);
        k.ins(format!("rem.u32 {c}, {i}, {units};"));
        let dst = k.reg(Class::B32);
        k.ins(format!("mul.lo.u32 {dst}, {r}, {rb};"));
        k.ins(format!("mad.lo.u32 {dst}, {c}, 16, {dst};"));
        let dp = k.reg(Class::B64);
        k.ins(format!("cvt.u64.u32 {dp}, {dst};"));
        k.ins(format!("add.u64 {dp}, {dp}, {tiles};"));
        // (plane, shared tile) pairs staged: keys and values, hi (and lo).
        let staged: Vec<(u32, u32)> = if split {
            vec![(0, k_hi), (1, k_lo), (2, v_hi), (3, v_lo)]
        } else {
            vec![(0, k_hi), (2, v_hi)]
        };
        let words: Vec<[Reg; 4]> = staged.iter().map(|_| k.regs4(Class::B32)).collect();
        for x in words.iter().flatten() {
            k.ins(format!("mov.b32 {x}, 0;"));
        }
        let outside = k.reg(Class::Pred);
        k.ins(format!("setp.ge.u32 {outside}, {r}, {nk};"));
        let zero = k.label("zero_row");
        k.ins(format!("@{outside} bra {zero};"));
        let prow = k.reg(Class::B32);
        k.ins(format!("add.u32 {prow}, {p0}, {r};"));
        k.ins(format!("sub.u32 {prow}, {prow}, {chunk_lo};"));
        k.ins(format!("mad.lo.u32 {prow}, {prow}, {gkv}, {g};"));
        k.ins(format!("mul.lo.u32 {prow}, {prow}, {};", 2 * hd));
        k.ins(format!("mad.lo.u32 {prow}, {c}, 16, {prow};"));
        let src = k.reg(Class::B64);
        k.ins(format!("cvt.u64.u32 {src}, {prow};"));
        k.ins(format!("add.u64 {src}, {src}, {planes};"));
        for (&(p, _), w4) in staged.iter().zip(&words) {
            k.ins(format!(
                "ld.global.v4.b32 {{{}, {}, {}, {}}}, [{src}+{}];",
                w4[0],
                w4[1],
                w4[2],
                w4[3],
                p * plane
            ));
        }
        k.place(&zero);
        for (&(_, tile_off), w4) in staged.iter().zip(&words) {
            k.ins(format!(
                "st.shared.v4.b32 [{dp}+{tile_off}], {{{}, {}, {}, {}}};",
                w4[0], w4[1], w4[2], w4[3]
            ));
        }
    });
    k.ins("bar.sync 0;");

    // Scores: two n-tiles of 8 keys, over hd/16 k-steps, the query fragments from the scratch.
    let scores = [k.regs4(Class::F32), k.regs4(Class::F32)];
    // The small products (hi·lo, lo·hi) in their own accumulators, added at the end: four
    // chains of dependent MMAs instead of two.
    let small = [k.regs4(Class::F32), k.regs4(Class::F32)];
    for sc in scores.iter().chain(&small).flatten() {
        k.ins(format!("mov.f32 {sc}, 0f00000000;"));
    }
    // A loop, not unrolled here: ptxas would otherwise hoist every k-step's fragment loads
    // (8 registers each) ahead of the MMAs and spill.
    let (fa, ka) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("mov.u64 {fa}, {frag_at};"));
    k.ins(format!("mov.u64 {ka}, {key_at};"));
    let step = k.reg(Class::B32);
    k.ins(format!("mov.u32 {step}, 0;"));
    k.strided(step, hd / 16, 1, &mut |k| {
        let qh = k.regs4(Class::B32);
        k.ins(format!(
            "ld.global.v4.b32 {{{}, {}, {}, {}}}, [{fa}];",
            qh[0], qh[1], qh[2], qh[3]
        ));
        let ql = k.regs4(Class::B32);
        if split {
            k.ins(format!(
                "ld.global.v4.b32 {{{}, {}, {}, {}}}, [{fa}+16];",
                ql[0], ql[1], ql[2], ql[3]
            ));
        }
        let kh = ldmatrix_x4(k, ka, k_hi, false);
        let kl = split.then(|| ldmatrix_x4(k, ka, k_lo, false));
        for (j, sc) in scores.iter().enumerate() {
            let bh = [kh[2 * j], kh[2 * j + 1]];
            mma(k, ty, sc, &qh, bh);
            if let Some(kl) = kl {
                mma(k, ty, &small[j], &qh, [kl[2 * j], kl[2 * j + 1]]);
                mma(k, ty, &small[j], &ql, bh);
            }
        }
        k.ins(format!("add.u64 {fa}, {fa}, 1024;"));
        k.ins(format!("add.u64 {ka}, {ka}, 32;"));
    });
    for (sc, sm) in scores.iter().zip(&small) {
        for (a, b) in sc.iter().zip(sm) {
            k.ins(format!("add.f32 {a}, {a}, {b};"));
        }
    }

    // Mask to each row's window, scale to base 2, and update the rows' maxima and sums: score i
    // of n-tile j is (row g + 8·(i / 2), key p0 + 8j + 2q + i % 2).
    let kbase = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {kbase}, {qq}, 2, {p0};"));
    let key_end = k.reg(Class::B32);
    k.ins(format!("add.u32 {key_end}, {p0}, {nk};"));
    let scale = Kernel::f32_imm(s.scale * LOG2_E);
    let mut alpha = Vec::new();
    for r in 0..2 {
        let pos = k.reg(Class::B32);
        k.ins(format!("add.u32 {pos}, {pos0}, {};", 8 * r));
        k.ins(format!("min.u32 {pos}, {pos}, {final_pos};"));
        let lo = window_start(&mut k, pos, w);
        let tile_max = k.reg(Class::F32);
        k.ins(format!("mov.f32 {tile_max}, 0fFF800000;"));
        for (j, sc) in scores.iter().enumerate() {
            for i in [2 * r, 2 * r + 1] {
                let kp = k.reg(Class::B32);
                k.ins(format!("add.u32 {kp}, {kbase}, {};", 8 * j + i % 2));
                let valid = k.reg(Class::Pred);
                k.ins(format!("setp.lt.u32 {valid}, {kp}, {key_end};"));
                k.ins(format!("setp.ge.and.u32 {valid}, {kp}, {lo}, {valid};"));
                k.ins(format!("setp.le.and.u32 {valid}, {kp}, {pos}, {valid};"));
                k.ins(format!("mul.f32 {}, {}, {scale};", sc[i], sc[i]));
                k.ins(format!(
                    "selp.f32 {}, {}, 0fFF800000, {valid};",
                    sc[i], sc[i]
                ));
                k.ins(format!("max.f32 {tile_max}, {tile_max}, {};", sc[i]));
            }
        }
        // The row's four values per lane; its 16 keys are spread over the quad's lanes.
        for xor in [1, 2] {
            let other = k.reg(Class::F32);
            k.ins(format!(
                "shfl.sync.bfly.b32 {other}, {tile_max}, {xor}, 31, -1;"
            ));
            k.ins(format!("max.f32 {tile_max}, {tile_max}, {other};"));
        }
        let m_new = k.reg(Class::F32);
        k.ins(format!("max.f32 {m_new}, {}, {tile_max};", m[r]));
        let a = k.reg(Class::F32);
        k.ins(format!("sub.f32 {a}, {}, {m_new};", m[r]));
        k.ins(format!("ex2.approx.ftz.f32 {a}, {a};"));
        k.ins(format!("mov.f32 {}, {m_new};", m[r]));
        k.ins(format!("mul.f32 {}, {}, {a};", l[r], l[r]));
        for sc in &scores {
            for i in [2 * r, 2 * r + 1] {
                k.ins(format!("sub.f32 {}, {}, {m_new};", sc[i], sc[i]));
                k.ins(format!("ex2.approx.ftz.f32 {}, {};", sc[i], sc[i]));
                k.ins(format!("add.f32 {}, {}, {};", l[r], l[r], sc[i]));
            }
        }
        alpha.push(a);
    }
    // Rescale the outputs: registers 0, 1 of each n-tile are row g's, 2, 3 row g + 8's.
    for a in &acc {
        for (i, x) in a.iter().enumerate() {
            k.ins(format!("mul.f32 {x}, {x}, {};", alpha[i / 2]));
        }
    }
    // The probabilities as an A fragment (16 rows × 16 keys): n-tile 0's rows g, g + 8, then
    // n-tile 1's, split into hi and lo.
    let mut ph = Vec::new();
    let mut pl = Vec::new();
    for (j, r) in [(0usize, 0usize), (0, 1), (1, 0), (1, 1)] {
        let (h, l) = operands(&mut k, scores[j][2 * r], scores[j][2 * r + 1]);
        ph.push(h);
        pl.push(l);
    }
    let ph = [ph[0], ph[1], ph[2], ph[3]];
    let pl = [pl[0], pl[1], pl[2], pl[3]];
    for pair in 0..hd / 16 {
        let vh = ldmatrix_x4(&mut k, value_at, v_hi + 32 * pair, true);
        let vl = split.then(|| ldmatrix_x4(&mut k, value_at, v_lo + 32 * pair, true));
        for j in 0..2usize {
            let a = &acc[(2 * pair) as usize + j];
            let bh = [vh[2 * j], vh[2 * j + 1]];
            mma(&mut k, ty, a, &ph, bh);
            if let Some(vl) = vl {
                mma(&mut k, ty, a, &ph, [vl[2 * j], vl[2 * j + 1]]);
                mma(&mut k, ty, a, &pl, bh);
            }
        }
    }
    // Every warp is done with the tile before the next one is staged over it.
    k.ins("bar.sync 0;");
    key_tile.close(&mut k);

    // Each row's sum over its quad, then out[t, head, 8j + 2q ..] = acc / sum.
    for r in 0..2 {
        for xor in [1, 2] {
            let other = k.reg(Class::F32);
            k.ins(format!(
                "shfl.sync.bfly.b32 {other}, {}, {xor}, 31, -1;",
                l[r]
            ));
            k.ins(format!("add.f32 {}, {}, {other};", l[r], l[r]));
        }
        k.ins(format!("rcp.rn.f32 {}, {};", l[r], l[r]));
        let row = &rows[r];
        let op = addr4(&mut k, out, row.oe);
        let skip = k.label("skip_row");
        k.ins(format!("@!{} bra {skip};", row.store));
        for (j, a) in acc.iter().enumerate() {
            let (o0, o1) = (k.reg(Class::F32), k.reg(Class::F32));
            k.ins(format!("mul.f32 {o0}, {}, {};", a[2 * r], l[r]));
            k.ins(format!("mul.f32 {o1}, {}, {};", a[2 * r + 1], l[r]));
            k.ins(format!(
                "st.global.v2.f32 [{op}+{}], {{{o0}, {o1}}};",
                32 * j
            ));
        }
        k.place(&skip);
    }
    k.place(&done);
    k.finish()
}
