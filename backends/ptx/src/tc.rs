//! Chunk products on tensor cores (`mma.sync.m16n8k16`, bf16 weights, f32 accumulation): the
//! projections (`gemm_tokens_tc`, or in k parts: `gemm_tokens_tc_partial` then
//! `gemm_reduce_tokens`, where `tc_k_split`'s cost model says the waves pack better) and the
//! RG-LRU's block-diagonal gates (`rg_lru_gates_tc`). All are one kernel body, `tc_body`, that
//! differs in where its operands are and how it finishes a result. `TcInputs` says how f32
//! inputs become MMA operands (split into bf16 halves, or rounded to bf16 or f16).

use crate::builder::{Class, Kernel, Reg};
use crate::gemv::{Epilogue, GemvSpec};
use crate::prefill::{finish_token, finish_tokens, Outputs, ProjectionParams, TARGET_SMS};
use crate::rg_lru::{addr4, block_size, gated_input, load_weight, RgLruSpec, Storage};

/// Warps of a block across its output columns.
const TC_COLUMN_WARPS: u32 = 4;

/// Output columns a warp owns, in tiles of 8: each input fragment (the costly part: loaded as
/// f32 and split into two bf16 halves) feeds that many MMAs. With two weight rows per column
/// (GeGLU's gate and up, the RG-LRU's two gates), half as many.
fn column_tiles_of(pairs: bool) -> u32 {
    if pairs {
        2
    } else {
        4
    }
}

/// Output columns a block computes.
fn block_columns_of(pairs: bool) -> u32 {
    8 * column_tiles_of(pairs) * TC_COLUMN_WARPS
}

fn column_blocks_of(width: u32, pairs: bool) -> u32 {
    width.div_ceil(block_columns_of(pairs))
}

/// Warps across the tokens, 64 tokens each: two where the grid still has two blocks per SM of
/// the target GPU, else one. With two, the block's weight tile serves 128 tokens, so each byte
/// it stages from L2 feeds twice the MMAs (~87 FLOP per byte of L2 traffic against ~64: at
/// ~700 TFLOP/s of `mma.sync` the L2 would otherwise bound it); narrow projections of short
/// chunks (the 2B model's 2560 outputs, 20 column blocks, at chunks of 512) keep 64-token
/// blocks so their grid fills the GPU.
fn token_warps_for(column_blocks: u32, max_tokens: u32) -> u32 {
    if column_blocks * max_tokens.div_ceil(128) >= 2 * TARGET_SMS {
        2
    } else {
        1
    }
}

/// One block per (column block, group of 64 · `token_warps` tokens). The kernel reads the
/// group count off the grid, so it must be launched with exactly this many.
fn grid_of(column_blocks: u32, max_tokens: u32, token_warps: u32) -> u32 {
    column_blocks * max_tokens.div_ceil(64 * token_warps)
}

fn is_geglu(spec: &GemvSpec) -> bool {
    spec.epilogue == Epilogue::GeGlu
}

/// `gemm_tokens_tc`'s warps across the tokens (1 or 2) for chunks of up to `max_tokens`.
pub fn tc_token_warps(spec: &GemvSpec, max_tokens: u32) -> u32 {
    token_warps_for(column_blocks_of(spec.width, is_geglu(spec)), max_tokens)
}

/// Threads per block of either kernel with `token_warps` warps across its tokens.
pub fn tc_block(token_warps: u32) -> u32 {
    32 * TC_COLUMN_WARPS * token_warps
}

/// Whether `gemm_tokens_tc` takes this projection: bf16 weights, inputs a multiple of 16,
/// output width and every split part multiples of 8.
pub fn tensor_cores_fit(spec: &GemvSpec, splits: &[u32]) -> bool {
    spec.weights == Storage::Bf16
        && spec.norm.is_none()
        && spec.inputs % 16 == 0
        && spec.width % 8 == 0
        && splits.iter().all(|p| p % 8 == 0)
}

/// Thread blocks for `gemm_tokens_tc` over chunks of up to `max_tokens`.
pub fn tc_grid(spec: &GemvSpec, max_tokens: u32, token_warps: u32) -> u32 {
    grid_of(
        column_blocks_of(spec.width, is_geglu(spec)),
        max_tokens,
        token_warps,
    )
}

/// Whether `rg_lru_gates_tc` takes this RG-LRU: bf16 gate matrices whose blocks are a multiple
/// of 64 channels wide (a block's 64 output columns then lie in one gate block, so they share
/// their inputs).
pub fn gates_fit_tensor_cores(s: &RgLruSpec) -> bool {
    s.gates == Storage::Bf16 && block_size(s) % 64 == 0
}

/// `rg_lru_gates_tc`'s warps across the tokens for chunks of up to `max_tokens`.
pub fn gates_tc_token_warps(s: &RgLruSpec, max_tokens: u32) -> u32 {
    token_warps_for(column_blocks_of(s.channels, true), max_tokens)
}

/// Thread blocks for `rg_lru_gates_tc`.
pub fn gates_tc_grid(s: &RgLruSpec, max_tokens: u32, token_warps: u32) -> u32 {
    grid_of(column_blocks_of(s.channels, true), max_tokens, token_warps)
}

/// `wgmma`'s weight tile in shared memory, K-major without swizzle: core matrices of 8 rows ×
/// 16 bytes, the two of a row group's k-step adjacent (`WG_LBO` apart: the leading dimension
/// byte offset, along k) and row groups `WG_SBO` apart (the stride dimension byte offset).
const WG_LBO: u32 = 128;
const WG_SBO: u32 = 256;

/// How many k-steps ahead of its loads the kernel asks L2 for weight rows.
const PREFETCH_STEPS: u32 = 8;

/// Bytes between rows of a shared-memory tile of inputs, or of weights stored a row per output:
/// 16 bf16 (one k-step) and 16 bytes of padding, so the 8 rows an `ldmatrix` reads fall in 8
/// different groups of 4 banks.
const TC_ROW: u32 = 48;

/// Bytes between rows of a shared-memory tile of weights stored a row per input (the gates):
/// 128 bf16 (the block's weight columns) and 16 bytes of padding, for the same reason.
const TC_KROW: u32 = 272;

/// `ldmatrix.x4` (`.trans`: each 8×8 matrix transposed) with this lane's row address at
/// `at + imm` in shared memory (`at` a 64-bit shared address): four 8×8 bf16 matrices, one
/// register each.
pub(crate) fn ldmatrix_x4(k: &mut Kernel, at: Reg, imm: u32, trans: bool) -> [Reg; 4] {
    let r = k.regs4(Class::B32);
    let t = if trans { ".trans" } else { "" };
    k.ins(format!(
        "ldmatrix.sync.aligned.m8n8.x4{t}.shared.b16 {{{}, {}, {}, {}}}, [{at}+{imm}];",
        r[0], r[1], r[2], r[3]
    ));
    r
}

/// A lane's parts for `ldmatrix.x4` row addresses: lane % 8 (the row within a matrix), (lane /
/// 8) % 2 and lane / 16 (which of the four matrices: its k half and its n or m half).
pub(crate) fn ldmatrix_lane(k: &mut Kernel, lane: Reg) -> (Reg, Reg, Reg) {
    let lane8 = k.reg(Class::B32);
    k.ins(format!("and.b32 {lane8}, {lane}, 7;"));
    let bit3 = k.reg(Class::B32);
    k.ins(format!("shr.u32 {bit3}, {lane}, 3;"));
    k.ins(format!("and.b32 {bit3}, {bit3}, 1;"));
    let bit4 = k.reg(Class::B32);
    k.ins(format!("shr.u32 {bit4}, {lane}, 4;"));
    (lane8, bit3, bit4)
}

/// This lane's `ldmatrix.x4` row offset in a tile of `row_bytes`-byte rows (`lane8` from
/// `ldmatrix_lane`): row (lane % 8) + 8·`row_bit`, 16 bytes · `col_bit` into it. Which of the
/// lane's two bits picks the row half depends on whether the tile's rows are the n (or m)
/// dimension or, read `.trans`, the k dimension.
pub(crate) fn ldmatrix_offset(
    k: &mut Kernel,
    lane8: Reg,
    row_bit: Reg,
    col_bit: Reg,
    row_bytes: u32,
) -> Reg {
    let off = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {off}, {row_bit}, 8, {lane8};"));
    k.ins(format!("mul.lo.u32 {off}, {off}, {row_bytes};"));
    k.ins(format!("mad.lo.u32 {off}, {col_bit}, 16, {off};"));
    off
}

/// `mma.sync.m16n8k16` of `ty` (`bf16` or `f16`) operands + f32 into `acc`: A a 16×16
/// fragment, B a 16×8 one.
pub(crate) fn mma(k: &mut Kernel, ty: &str, acc: &[Reg; 4], a: &[Reg; 4], b: [Reg; 2]) {
    k.ins(format!(
        "mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{}, {}, {}, {}}}, {{{}, {}, {}, {}}}, {{{}, {}}}, {{{}, {}, {}, {}}};",
        acc[0], acc[1], acc[2], acc[3], a[0], a[1], a[2], a[3], b[0], b[1], acc[0], acc[1], acc[2], acc[3]
    ));
}

/// The f32 pair (x0, x1) rounded to `ty` (`bf16` or `f16`), packed with x0 in the low half.
pub(crate) fn round_pair(k: &mut Kernel, ty: &str, x0: Reg, x1: Reg) -> Reg {
    let r = k.reg(Class::B32);
    k.ins(format!("cvt.rn.{ty}x2.f32 {r}, {x1}, {x0};"));
    r
}

/// Two bf16 (a 32-bit word, the first in the low half) widened to f32, exactly.
fn widen_bf16x2(k: &mut Kernel, w: Reg) -> (Reg, Reg) {
    let (l, h) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("shl.b32 {l}, {w}, 16;"));
    k.ins(format!("and.b32 {h}, {w}, -65536;"));
    let (lo, hi) = (k.reg(Class::F32), k.reg(Class::F32));
    k.ins(format!("mov.b32 {lo}, {l};"));
    k.ins(format!("mov.b32 {hi}, {h};"));
    (lo, hi)
}

/// Two bf16 (a 32-bit word) as two f16: exact for magnitudes from 2^-14 to 65504 (a weight's,
/// in practice), smaller ones to the nearest multiple of 2^-24.
fn bf16x2_to_f16x2(k: &mut Kernel, w: Reg) -> Reg {
    let (lo, hi) = widen_bf16x2(k, w);
    round_pair(k, "f16", lo, hi)
}

/// The f32 pair (x0, x1) as bf16x2 `hi` (x0 in the low half) and `lo`, the rounding errors
/// rounded again: `x = hi + lo` to about 16 bits.
pub(crate) fn split_pair(k: &mut Kernel, x0: Reg, x1: Reg) -> (Reg, Reg) {
    let hi = round_pair(k, "bf16", x0, x1);
    let (f0, f1) = widen_bf16x2(k, hi);
    k.ins(format!("sub.f32 {f0}, {x0}, {f0};"));
    k.ins(format!("sub.f32 {f1}, {x1}, {f1};"));
    (hi, round_pair(k, "bf16", f0, f1))
}

/// How the tensor-core kernels give their f32 operands to the MMAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TcInputs {
    /// `x = hi + lo`, both bf16, two MMAs per tile: about 16 bits of each input (the golden
    /// cases hold the f32 tolerance).
    #[default]
    Split,
    /// x rounded to bf16, one MMA per tile: half the MMAs and input staging, inputs to 8 bits
    /// as in the reference's own bf16 run (the 4-layer golden case then differs from the
    /// float64 reference by 2.4e-2, past the 0.02 bound; measured in the interpreter).
    Bf16,
    /// x rounded to f16 (11 bits), the bf16 weights widened to f16 as they are staged (exact
    /// from 2^-14 to 65504), one MMA per tile: half the MMAs of `Split`, eight times finer
    /// inputs than `Bf16`; but an input past ±65504 becomes infinite, which f32 and bf16
    /// never overflow to, unless its row comes with a power-of-two scale
    /// (`TcConfig::row_scales`, which the GPU lowering always gives f16 projections).
    F16,
}

/// Which tensor-core instruction a projection's product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TcMma {
    /// `mma.sync.m16n8k16`, a warp at a time (Ampere's, which Hopper keeps).
    #[default]
    Sync,
    /// Hopper's `wgmma.mma_async.m64n128k16`, a warpgroup (4 warps) at a time, its weight
    /// operand read from shared memory through a descriptor. Needs `.target sm_90a`
    /// (`crate::module` writes it when a kernel uses `wgmma`). Not yet run on a GPU: the
    /// interpreter emulates it from the PTX ISA's layouts.
    Warpgroup,
}

/// How a projection runs on tensor cores: its operands and its instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcConfig {
    pub inputs: TcInputs,
    pub mma: TcMma,
    /// Inputs come with per-token powers of two (`rms_norm_tokens`' `scale`, a parameter after
    /// `x`) that bring each row below 2^15: the rows are divided by them as they are staged
    /// and the results multiplied back (exactly), so f16 operands cannot overflow however
    /// large the row.
    pub row_scales: bool,
}

impl From<TcInputs> for TcConfig {
    fn from(inputs: TcInputs) -> TcConfig {
        TcConfig {
            inputs,
            mma: TcMma::Sync,
            row_scales: false,
        }
    }
}

impl TcInputs {
    /// MMAs a projection runs per tile: two on split inputs (hi and lo), else one.
    pub fn mmas_per_tile(self) -> u32 {
        match self {
            TcInputs::Split => 2,
            TcInputs::Bf16 | TcInputs::F16 => 1,
        }
    }

    /// The MMA operand type.
    pub(crate) fn mma_type(self) -> &'static str {
        match self {
            TcInputs::F16 => "f16",
            TcInputs::Split | TcInputs::Bf16 => "bf16",
        }
    }
}

/// Where `tc_body`'s weights are, bf16.
enum TcWeights {
    /// `[rows, inputs]`, a row per output column (with pairs, the second rows from `width` on):
    /// a projection's weight.
    Rows(Reg),
    /// Block-diagonal, one matrix per member of the pair: `[blocks, size, size]` used as x·W
    /// (a row per input), the RG-LRU's gates. Output column j reads inputs
    /// `size · (j / size)..` of x.
    Blocks { w: [Reg; 2], size: u32 },
}

/// What `tc_body` multiplies: x `f32[T, x_stride]` by the weights, `inputs` per output column,
/// `width` output columns, for the first `count` tokens.
struct TcShape {
    count: Reg,
    x: Reg,
    x_stride: u32,
    inputs: u32,
    width: u32,
    /// Two weight rows per output column, two accumulators per result.
    pairs: bool,
    weights: TcWeights,
    inputs_as: TcInputs,
    /// `wgmma` instead of `mma.sync` (`Rows` weights only).
    wgmma: bool,
    /// Per-token powers of two 2^k (`f32[T]`, see `TcConfig::row_scales`).
    row_scale: Option<Reg>,
    token_warps: u32,
    /// Parts of the k dimension, a block each (`Rows` weights only): part p sums inputs
    /// p·K/k_split.. and its finish gets partial sums (the grid is k_split times larger).
    k_split: u32,
}

/// Finishes the results of one token at two adjacent output columns: `(kernel, each column's
/// accumulators, token, the first column, which is even)`.
type Finish<'a> = dyn FnMut(&mut Kernel, [Vec<Reg>; 2], Reg, Reg) + 'a;

/// The body both kernels share. A block of 4 · `token_warps` warps computes 128 output
/// columns (64 with pairs, whose two rows make 128 weight rows) for one group of up to 64 ·
/// `token_warps` tokens of the chunk: 4 warps across the columns, `token_warps` across the
/// tokens (64 each). Per k-step of 16 the block stages its inputs, split once into bf16 hi and
/// lo halves (`x = hi + lo`, so the product keeps about 16 bits of each f32 input; or rounded:
/// `TcInputs::Bf16`, `TcInputs::F16`), and its weights in shared memory (two buffers: the next
/// step's global loads are in flight while this one computes); each warp takes its fragments with
/// `ldmatrix` (`.trans` for weights stored a row per input) and runs 4 token tiles × 4 column
/// tiles × 2 halves = 32 MMAs. With `wgmma` the block's warps are one or two warpgroups, each
/// taking its 64 tokens × the block's 128 weight rows as one `m64n128k16` per input half,
/// the weights read from shared memory through a descriptor (staged as core matrices) and the
/// inputs from registers as with `mma.sync`. `finish(k, accumulators, t, col)` finishes each
/// result inside the chunk and the width (multiplied back by its row's scale, if any).
fn tc_body(k: &mut Kernel, s: &TcShape, finish: &mut Finish) {
    let TcShape {
        count,
        x,
        x_stride,
        inputs,
        width,
        pairs,
        ref weights,
        inputs_as,
        wgmma,
        row_scale,
        token_warps,
        k_split,
    } = *s;
    assert!(token_warps == 1 || token_warps == 2, "1 or 2 token warps");
    assert!(
        inputs % (16 * k_split) == 0,
        "inputs a multiple of 16 per k part"
    );
    assert!(
        k_split == 1 || matches!(weights, TcWeights::Rows(_)),
        "k parts of row-major weights only"
    );
    assert!(
        !wgmma || matches!(weights, TcWeights::Rows(_)),
        "wgmma for row-major weights only"
    );
    // Inputs each block sums over.
    let k_len = inputs / k_split;
    let threads = tc_block(token_warps);
    let by_input = matches!(weights, TcWeights::Blocks { .. });
    // Tokens per block; shared bytes of one stage: inputs as bf16 hi and lo halves (`group`
    // token rows each) and the weight tile (128 rows of a k-step, or 16 rows of 128 columns).
    let group = 64 * token_warps;
    // (`wgmma` reads its weights as core matrices: no padding.)
    let b_bytes = if by_input {
        16 * TC_KROW
    } else if wgmma {
        128 * 32
    } else {
        128 * TC_ROW
    };
    let stage_bytes = 2 * group * TC_ROW + b_bytes;
    // 128 registers a thread at most: 512 threads per SM.
    k.launch_bounds(threads, 512 / threads);
    k.shared("tc_tiles", 2 * stage_bytes, 16);
    let column_tiles = column_tiles_of(pairs);
    let block_columns = block_columns_of(pairs);
    let (a_hi, a_lo, b_at) = (0, group * TC_ROW, 2 * group * TC_ROW);

    let (tid, block) = k.thread_and_block();
    let (warp_id, lane) = k.warp_and_lane(tid);
    // Warp w takes columns of `warp = w mod 4` and tokens 64·(w / 4)...
    let (warp, token_warp) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("rem.u32 {warp}, {warp_id}, {TC_COLUMN_WARPS};"));
    k.ins(format!(
        "div.u32 {token_warp}, {warp_id}, {TC_COLUMN_WARPS};"
    ));
    let (g, q) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("shr.u32 {g}, {lane}, 2;"));
    k.ins(format!("and.b32 {q}, {lane}, 3;"));
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let last = k.reg(Class::B32);
    k.ins(format!("sub.u32 {last}, {n}, 1;"));
    // Block b takes column block b / groups and token group b % groups: the groups of one
    // column block are neighbours in the grid, so they run together and read its weight rows
    // from DRAM once between them (through L2).
    let groups = k.reg(Class::B32);
    k.ins(format!("mov.u32 {groups}, %nctaid.x;"));
    // With k parts, part p is blocks p·(grid / k_split)..: the first inputs it sums.
    let k_off = k.reg(Class::B32);
    if k_split > 1 {
        k.ins(format!("div.u32 {groups}, {groups}, {k_split};"));
        k.ins(format!("div.u32 {k_off}, {block}, {groups};"));
        k.ins(format!("mul.lo.u32 {k_off}, {k_off}, {k_len};"));
        k.ins(format!("rem.u32 {block}, {block}, {groups};"));
    } else {
        k.ins(format!("mov.u32 {k_off}, 0;"));
    }
    k.ins(format!(
        "div.u32 {groups}, {groups}, {};",
        column_blocks_of(width, pairs)
    ));
    let col0 = k.reg(Class::B32);
    k.ins(format!("div.u32 {col0}, {block}, {groups};"));
    k.ins(format!("mul.lo.u32 {col0}, {col0}, {block_columns};"));
    let t0 = k.reg(Class::B32);
    k.ins(format!("rem.u32 {t0}, {block}, {groups};"));
    k.ins(format!("mul.lo.u32 {t0}, {t0}, {group};"));
    let tiles = k.reg(Class::B64);
    k.ins(format!("mov.u64 {tiles}, tc_tiles;"));
    // The first input of the block's columns: 0, or its gate block's first channel.
    let x_col0 = k.reg(Class::B32);
    match weights {
        TcWeights::Rows(_) => k.ins(format!("mov.u32 {x_col0}, {k_off};")),
        TcWeights::Blocks { size, .. } => {
            k.ins(format!("div.u32 {x_col0}, {col0}, {size};"));
            k.ins(format!("mul.lo.u32 {x_col0}, {x_col0}, {size};"));
        }
    }

    // What this thread stages per k-step: float4s of inputs and 16-byte units of weights,
    // f = tid + threads·r: two and one with 256 threads, two and two with 128. Which of them
    // keeps each phase of a warp's shared stores (128 bytes' worth of threads) on distinct
    // banks, while each warp's global loads still cover whole rows' 32-byte sectors: inputs
    // token row 8·(f / 32) + f % 8, inputs 4·((f / 8) % 4).. (an 8-byte store phase, 16
    // threads, is 8 rows 48 bytes apart × 2 quads).
    let a_slots: Vec<(Reg, Reg)> = (0..group * 4 / threads)
        .map(|r| {
            let f = k.reg(Class::B32);
            k.ins(format!("add.u32 {f}, {tid}, {};", threads * r));
            let row = k.reg(Class::B32);
            let low = k.reg(Class::B32);
            k.ins(format!("shr.u32 {row}, {f}, 5;"));
            k.ins(format!("shl.b32 {row}, {row}, 3;"));
            k.ins(format!("and.b32 {low}, {f}, 7;"));
            k.ins(format!("add.u32 {row}, {row}, {low};"));
            let kq = k.reg(Class::B32);
            k.ins(format!("shr.u32 {kq}, {f}, 3;"));
            k.ins(format!("and.b32 {kq}, {kq}, 3;"));
            k.ins(format!("shl.b32 {kq}, {kq}, 2;"));
            (row, kq)
        })
        .collect();
    // Per weight unit: its global address (advancing a k-step at each fetch) and its fixed
    // shared offset within a stage's weight tile.
    let b_slots: Vec<(Reg, Reg)> = (0..256 / threads)
        .map(|r| {
            let f = k.reg(Class::B32);
            k.ins(format!("add.u32 {f}, {tid}, {};", threads * r));
            match weights {
                // A row of the tile (output columns col0..; with pairs, the first rows of
                // columns col0..col0+64, then their second rows) and a half of the k-step's 16
                // inputs; rows clamped to the last column (never stored). Padded 48-byte rows:
                // half f % 2 of row 8·(p / 8) + 2·(p % 4) + (p / 4) % 2, p = f / 2 (a 16-byte
                // store phase, 8 threads, is 4 rows whose 48-byte offsets leave their halves on
                // distinct banks: even rows, then odd). `wgmma`'s core matrices: half (f / 8) %
                // 2 of row 8·(f / 16) + f % 8 (a phase is one core matrix, 128 contiguous
                // bytes).
                TcWeights::Rows(w) => {
                    let (row, half, low) =
                        (k.reg(Class::B32), k.reg(Class::B32), k.reg(Class::B32));
                    if wgmma {
                        k.ins(format!("shr.u32 {half}, {f}, 3;"));
                        k.ins(format!("and.b32 {half}, {half}, 1;"));
                        k.ins(format!("shr.u32 {row}, {f}, 4;"));
                        k.ins(format!("shl.b32 {row}, {row}, 3;"));
                        k.ins(format!("and.b32 {low}, {f}, 7;"));
                        k.ins(format!("add.u32 {row}, {row}, {low};"));
                    } else {
                        k.ins(format!("and.b32 {half}, {f}, 1;"));
                        k.ins(format!("shr.u32 {row}, {f}, 4;"));
                        k.ins(format!("shl.b32 {row}, {row}, 3;"));
                        k.ins(format!("shr.u32 {low}, {f}, 1;"));
                        k.ins(format!("and.b32 {low}, {low}, 3;"));
                        k.ins(format!("shl.b32 {low}, {low}, 1;"));
                        k.ins(format!("add.u32 {row}, {row}, {low};"));
                        k.ins(format!("shr.u32 {low}, {f}, 3;"));
                        k.ins(format!("and.b32 {low}, {low}, 1;"));
                        k.ins(format!("add.u32 {row}, {row}, {low};"));
                    }
                    let grow = k.reg(Class::B32);
                    if pairs {
                        let second = k.reg(Class::B32);
                        k.ins(format!("shr.u32 {second}, {row}, 6;"));
                        k.ins(format!("and.b32 {grow}, {row}, 63;"));
                        k.ins(format!("add.u32 {grow}, {grow}, {col0};"));
                        k.ins(format!("min.u32 {grow}, {grow}, {};", width - 1));
                        k.ins(format!("mad.lo.u32 {grow}, {second}, {width}, {grow};"));
                    } else {
                        k.ins(format!("add.u32 {grow}, {row}, {col0};"));
                        k.ins(format!("min.u32 {grow}, {grow}, {};", width - 1));
                    }
                    let e = k.reg(Class::B32);
                    k.ins(format!("mad.lo.u32 {e}, {grow}, {inputs}, {k_off};"));
                    k.ins(format!("mad.lo.u32 {e}, {half}, 8, {e};"));
                    let at = k.reg(Class::B64);
                    k.ins(format!("mul.wide.u32 {at}, {e}, 2;"));
                    k.ins(format!("add.u64 {at}, {at}, {w};"));
                    let off = k.reg(Class::B32);
                    if wgmma {
                        // Core matrix (row / 8, half): `WG_SBO` apart along the rows,
                        // `WG_LBO` along k; row % 8 within it.
                        k.ins(format!("shr.u32 {off}, {row}, 3;"));
                        k.ins(format!("mul.lo.u32 {off}, {off}, {WG_SBO};"));
                        k.ins(format!("mad.lo.u32 {off}, {half}, {WG_LBO}, {off};"));
                        let r8 = k.reg(Class::B32);
                        k.ins(format!("and.b32 {r8}, {row}, 7;"));
                        k.ins(format!("mad.lo.u32 {off}, {r8}, 16, {off};"));
                    } else {
                        k.ins(format!("mul.lo.u32 {off}, {row}, {TC_ROW};"));
                        k.ins(format!("mad.lo.u32 {off}, {half}, 16, {off};"));
                    }
                    (at, off)
                }
                // Input row f / 16 of the k-step, columns 8·(f % 16)..: matrix (f % 16) / 8,
                // its columns col0 + 8·(f % 8).. (the block's columns lie in one gate block).
                TcWeights::Blocks { w, size } => {
                    let row = k.reg(Class::B32);
                    k.ins(format!("shr.u32 {row}, {f}, 4;"));
                    let unit = k.reg(Class::B32);
                    k.ins(format!("and.b32 {unit}, {f}, 15;"));
                    let second = k.reg(Class::Pred);
                    k.ins(format!("setp.ge.u32 {second}, {unit}, 8;"));
                    let base = k.reg(Class::B64);
                    k.ins(format!("selp.b64 {base}, {}, {}, {second};", w[1], w[0]));
                    // Element (x_col0 + row, col0 + 8·(unit % 8)) of block x_col0 / size:
                    // (x_col0 + row) · size + col0 - x_col0 + 8·(unit % 8).
                    let e = k.reg(Class::B32);
                    k.ins(format!("add.u32 {e}, {x_col0}, {row};"));
                    k.ins(format!("mul.lo.u32 {e}, {e}, {size};"));
                    k.ins(format!("add.u32 {e}, {e}, {col0};"));
                    k.ins(format!("sub.u32 {e}, {e}, {x_col0};"));
                    let c = k.reg(Class::B32);
                    k.ins(format!("and.b32 {c}, {unit}, 7;"));
                    k.ins(format!("mad.lo.u32 {e}, {c}, 8, {e};"));
                    let at = k.reg(Class::B64);
                    k.ins(format!("mul.wide.u32 {at}, {e}, 2;"));
                    k.ins(format!("add.u64 {at}, {at}, {base};"));
                    let off = k.reg(Class::B32);
                    k.ins(format!("mul.lo.u32 {off}, {row}, {TC_KROW};"));
                    k.ins(format!("mad.lo.u32 {off}, {unit}, 16, {off};"));
                    (at, off)
                }
            }
        })
        .collect();
    // Bytes a weight unit's address advances per k-step.
    let b_step = match weights {
        TcWeights::Rows(_) => 32,
        TcWeights::Blocks { size, .. } => 32 * size,
    };
    // This lane's ldmatrix row addresses within a stage. Inputs: token row (lane % 8) + 8·((lane
    // / 8) % 2), inputs 8·(lane / 16)... Weights a row per output: row (lane % 8) + 8·(lane /
    // 16), inputs 8·((lane / 8) % 2)..; a row per input (transposed): input row (lane % 8) +
    // 8·((lane / 8) % 2), columns 8·(lane / 16)... Either way matrices 0 and 1 are the first
    // column tile's two k-halves and 2, 3 the second's.
    let (lane8, bit3, bit4) = ldmatrix_lane(k, lane);
    let a_lane = ldmatrix_offset(k, lane8, bit3, bit4, TC_ROW);
    let b_lane = if by_input {
        ldmatrix_offset(k, lane8, bit3, bit4, TC_KROW)
    } else {
        ldmatrix_offset(k, lane8, bit4, bit3, TC_ROW)
    };
    // This warp's weight columns in the block: 32 from 32·warp (two ldmatrix.x4 of 16, 2
    // column tiles each), or with pairs 16 first-row columns from 16·warp and their second rows
    // from 64 + 16·warp (one each).
    let b_loads: Vec<(u32, [usize; 2])> = if pairs {
        vec![(0, [0, 1]), (64, [0, 1])]
    } else {
        vec![(0, [0, 1]), (16, [2, 3])]
    };
    let warp_row = k.reg(Class::B32);
    k.ins(format!(
        "mul.lo.u32 {warp_row}, {warp}, {};",
        8 * column_tiles
    ));
    // The lane's ldmatrix offsets within a stage, as 64-bit values to add to its address (the
    // inputs' from its warp's first token row).
    if wgmma {
        // A warpgroup's warp w takes its 16 token rows from 16·w: 16·warp_id in the block.
        k.ins(format!(
            "mad.lo.u32 {a_lane}, {warp_id}, {}, {a_lane};",
            16 * TC_ROW
        ));
    } else {
        k.ins(format!(
            "mad.lo.u32 {a_lane}, {token_warp}, {}, {a_lane};",
            64 * TC_ROW
        ));
    }
    let a_lane64 = k.reg(Class::B64);
    k.ins(format!("cvt.u64.u32 {a_lane64}, {a_lane};"));
    let b_lanes: Vec<Reg> = b_loads
        .iter()
        .map(|&(rows, _)| {
            let off = k.reg(Class::B32);
            k.ins(format!("add.u32 {off}, {warp_row}, {rows};"));
            // A column's step is a row (output-major) or two bytes (input-major).
            let column_bytes = if by_input { 2 } else { TC_ROW };
            k.ins(format!(
                "mad.lo.u32 {off}, {off}, {column_bytes}, {b_lane};"
            ));
            let wide = k.reg(Class::B64);
            k.ins(format!("cvt.u64.u32 {wide}, {off};"));
            wide
        })
        .collect();

    // Accumulators: [token tile][column tile][first/second row][4] (`mma.sync`), or the
    // warpgroup's m64n128 D: [n tile of 8 columns][4], the second rows' columns from 64 on.
    let halves = if pairs { 2 } else { 1 };
    let accs: Vec<Vec<Vec<[Reg; 4]>>> = if wgmma {
        Vec::new()
    } else {
        (0..4)
            .map(|_| {
                (0..column_tiles)
                    .map(|_| (0..halves).map(|_| k.regs4(Class::F32)).collect())
                    .collect()
            })
            .collect()
    };
    let wg_accs: Vec<[Reg; 4]> = if wgmma {
        (0..16).map(|_| k.regs4(Class::F32)).collect()
    } else {
        Vec::new()
    };
    // Per input slot with row scales: its row's 2^-k (loaded after the wait below).
    let a_scales: Vec<Reg> = match row_scale {
        Some(_) => a_slots.iter().map(|_| k.reg(Class::F32)).collect(),
        None => Vec::new(),
    };
    // Staged registers: 4 input floats and 4 weight words per slot.
    let a_regs: Vec<[Reg; 4]> = a_slots.iter().map(|_| k.regs4(Class::F32)).collect();
    let b_regs: Vec<[Reg; 4]> = b_slots.iter().map(|_| k.regs4(Class::B32)).collect();

    let k0 = k.reg(Class::B32);
    // Per-thread addresses, computed once: the global ones advance by a k-step at each fetch,
    // the shared ones are fixed (plus the stage buffer's offset). Token rows past the count
    // read row n-1 (a valid address; never stored).
    let a_ptrs: Vec<Reg> = a_slots
        .iter()
        .map(|(row, kq)| {
            let t = k.reg(Class::B32);
            k.ins(format!("add.u32 {t}, {t0}, {row};"));
            k.ins(format!("min.u32 {t}, {t}, {last};"));
            let e = k.reg(Class::B32);
            k.ins(format!("mad.lo.u32 {e}, {t}, {x_stride}, {kq};"));
            k.ins(format!("add.u32 {e}, {e}, {x_col0};"));
            addr4(k, x, e)
        })
        .collect();
    let shared_at = |k: &mut Kernel, off: Reg| {
        let at = k.reg(Class::B64);
        k.ins(format!("cvt.u64.u32 {at}, {off};"));
        k.ins(format!("add.u64 {at}, {at}, {tiles};"));
        at
    };
    let a_shared: Vec<Reg> = a_slots
        .iter()
        .map(|&(row, kq)| {
            let off = k.reg(Class::B32);
            k.ins(format!("mul.lo.u32 {off}, {row}, {TC_ROW};"));
            k.ins(format!("mad.lo.u32 {off}, {kq}, 2, {off};"));
            shared_at(k, off)
        })
        .collect();
    let b_shared: Vec<Reg> = b_slots.iter().map(|&(_, off)| shared_at(k, off)).collect();
    let b_ptrs: Vec<Reg> = b_slots.iter().map(|&(at, _)| at).collect();
    // The next k-step's global loads into the staged registers.
    let fetch = |k: &mut Kernel| {
        for (at, regs) in a_ptrs.iter().zip(&a_regs) {
            k.ins(format!(
                "ld.global.v4.f32 {{{}, {}, {}, {}}}, [{at}];",
                regs[0], regs[1], regs[2], regs[3]
            ));
            k.ins(format!("add.u64 {at}, {at}, 64;"));
        }
        for (at, regs) in b_ptrs.iter().zip(&b_regs) {
            k.ins(format!(
                "ld.global.nc.v4.u32 {{{}, {}, {}, {}}}, [{at}];",
                regs[0], regs[1], regs[2], regs[3]
            ));
            k.ins(format!("add.u64 {at}, {at}, {b_step};"));
        }
    };
    // The staged registers into the stage buffer at byte offset `buf` (a register): inputs
    // (divided by their row's scale, if any) split into bf16 hi and lo pairs or rounded,
    // weights as they are (widened to f16 for f16 inputs), then with `wgmma` the proxy fence.
    let commit = |k: &mut Kernel, buf: Reg| {
        for (i, (fixed, v)) in a_shared.iter().zip(&a_regs).enumerate() {
            if let Some(down) = a_scales.get(i) {
                for x in v {
                    k.ins(format!("mul.f32 {x}, {x}, {down};"));
                }
            }
            let mut hi = Vec::new();
            let mut lo = Vec::new();
            for pair in [[v[0], v[1]], [v[2], v[3]]] {
                if inputs_as == TcInputs::Split {
                    let (h, l) = split_pair(k, pair[0], pair[1]);
                    hi.push(h);
                    lo.push(l);
                } else {
                    hi.push(round_pair(k, inputs_as.mma_type(), pair[0], pair[1]));
                }
            }
            let at = k.reg(Class::B64);
            k.ins(format!("add.u64 {at}, {fixed}, {buf};"));
            k.ins(format!(
                "st.shared.v2.b32 [{at}+{a_hi}], {{{}, {}}};",
                hi[0], hi[1]
            ));
            if let [l0, l1] = lo[..] {
                k.ins(format!("st.shared.v2.b32 [{at}+{a_lo}], {{{l0}, {l1}}};"));
            }
        }
        for (fixed, v) in b_shared.iter().zip(&b_regs) {
            let at = k.reg(Class::B64);
            k.ins(format!("add.u64 {at}, {fixed}, {buf};"));
            let v = if inputs_as == TcInputs::F16 {
                v.map(|w| bf16x2_to_f16x2(k, w))
            } else {
                *v
            };
            k.ins(format!(
                "st.shared.v4.b32 [{at}+{b_at}], {{{}, {}, {}, {}}};",
                v[0], v[1], v[2], v[3]
            ));
        }
        if wgmma {
            // `wgmma` reads the weights through the async proxy: this thread's stores first.
            k.ins("fence.proxy.async.shared::cta;");
        }
    };

    // Groups past the chunk's count leave at once (whole blocks: no barrier waits for them).
    let group_end = k.label("group_end");
    k.leave_unless_below(t0, n, &group_end);
    // While the kernel before this one finishes, the first k-steps of this block's weight
    // rows come into L2 (four k-steps per 128-byte line; the loop's own prefetches start
    // PREFETCH_STEPS + 1 steps in). The inputs are that kernel's output: after the wait. The
    // gates' matrices (2.6 MB a layer for the 2B model) are read by every token group of a
    // column block at once and need no prefetch.
    let prefetch = !by_input;
    let first_steps = (PREFETCH_STEPS + 1).min(k_len / 16);
    if prefetch {
        for at in &b_ptrs {
            for step in (0..first_steps).step_by(4) {
                k.ins(format!("prefetch.global.L2 [{at}+{}];", 32 * step));
            }
        }
    }
    k.wait_for_earlier_kernels();
    // With row scales: each staged row's 2^-k (the scale is 2^k, an exponent field and no
    // mantissa: 2^-k's field is 254 minus its), from the kernel before.
    if let Some(scale) = row_scale {
        for ((row, _), down) in a_slots.iter().zip(&a_scales) {
            let t = k.reg(Class::B32);
            k.ins(format!("add.u32 {t}, {t0}, {row};"));
            k.ins(format!("min.u32 {t}, {t}, {last};"));
            let at = addr4(k, scale, t);
            let bits = k.reg(Class::B32);
            k.ins(format!("ld.global.b32 {bits}, [{at}];"));
            k.ins(format!("sub.u32 {bits}, 2130706432, {bits};"));
            k.ins(format!("mov.b32 {down}, {bits};"));
        }
    }
    for a in accs
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .chain(wg_accs.iter().flatten())
    {
        k.ins(format!("mov.f32 {a}, 0f00000000;"));
    }
    // `wgmma`'s scale-d: accumulate (the accumulators start at zero).
    let accumulate = k.reg(Class::Pred);
    if wgmma {
        k.ins(format!("setp.eq.u32 {accumulate}, {k_off}, {k_off};"));
    }
    // Prologue: the first k-step into buffer 0.
    k.ins(format!("mov.u32 {k0}, 0;"));
    fetch(k);
    let buf = k.reg(Class::B64);
    k.ins(format!("mov.u64 {buf}, 0;"));
    commit(k, buf);
    k.ins("bar.sync 0;");

    let (head, end) = (k.label("k"), k.label("k_end"));
    k.place(&head);
    k.leave_unless_below(k0, k_len, &end);
    // The next k-step's loads go out before this one's MMAs.
    let next = k.reg(Class::B32);
    k.ins(format!("add.u32 {next}, {k0}, 16;"));
    let more = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {more}, {next}, {k_len};"));
    let skip_fetch = k.label("skip_fetch");
    k.ins(format!("@!{more} bra {skip_fetch};"));
    fetch(k);
    if prefetch {
        // Weight rows come from DRAM (once for a column block's token groups) while the loads
        // above run only one k-step ahead: ask L2 for the step PREFETCH_STEPS past the one
        // just fetched (no registers; inside the row, so never past the weights).
        let ahead = k.reg(Class::Pred);
        k.ins(format!(
            "setp.lt.u32 {ahead}, {next}, {};",
            k_len.saturating_sub(16 * PREFETCH_STEPS)
        ));
        for at in &b_ptrs {
            k.ins(format!(
                "@{ahead} prefetch.global.L2 [{at}+{}];",
                32 * (PREFETCH_STEPS - 1)
            ));
        }
    }
    k.place(&skip_fetch);
    // Fragments from this buffer.
    let stage = k.reg(Class::B64);
    k.ins(format!("add.u64 {stage}, {buf}, {tiles};"));
    let b_frags: Vec<Vec<[Reg; 2]>> = if wgmma {
        Vec::new()
    } else {
        // [column tile][first/second row] -> (b0, b1).
        let mut frags: Vec<Vec<[Reg; 2]>> = (0..column_tiles).map(|_| Vec::new()).collect();
        for (&(_, [first, second]), fixed) in b_loads.iter().zip(&b_lanes) {
            let at = k.reg(Class::B64);
            k.ins(format!("add.u64 {at}, {stage}, {fixed};"));
            let r = ldmatrix_x4(k, at, b_at, by_input);
            frags[first].push([r[0], r[1]]);
            frags[second].push([r[2], r[3]]);
        }
        frags
    };
    let a_at = k.reg(Class::B64);
    k.ins(format!("add.u64 {a_at}, {stage}, {a_lane64};"));
    let parts: &[u32] = match inputs_as {
        TcInputs::Split => &[a_hi, a_lo],
        TcInputs::Bf16 | TcInputs::F16 => &[a_hi],
    };
    if wgmma {
        // The last k-step's `wgmma` ran while this one was staged; its A registers are
        // rewritten below, so it retires first.
        k.ins("wgmma.wait_group.sync.aligned 0;");
        // The warp's 16 token rows (hi, lo) as A fragments; the weights through a descriptor
        // of this stage's tile: start >> 4 in bits 0-13, the offsets >> 4 at 16 and 32.
        let a_frags: Vec<[Reg; 4]> = parts
            .iter()
            .map(|&part| ldmatrix_x4(k, a_at, part, false))
            .collect();
        let desc = k.reg(Class::B64);
        k.ins(format!("add.u64 {desc}, {stage}, {b_at};"));
        k.ins(format!("shr.u64 {desc}, {desc}, 4;"));
        k.ins(format!("and.b64 {desc}, {desc}, 16383;"));
        k.ins(format!(
            "or.b64 {desc}, {desc}, {};",
            ((WG_LBO as u64 >> 4) << 16) | ((WG_SBO as u64 >> 4) << 32)
        ));
        k.ins("wgmma.fence.sync.aligned;");
        let d: Vec<String> = wg_accs.iter().flatten().map(|r| r.to_string()).collect();
        for a in &a_frags {
            k.ins(format!(
                "wgmma.mma_async.sync.aligned.m64n128k16.f32.{ty}.{ty} {{{}}}, {{{}, {}, {}, {}}}, {desc}, {accumulate}, 1, 1, 0;",
                d.join(", "),
                a[0],
                a[1],
                a[2],
                a[3],
                ty = inputs_as.mma_type()
            ));
        }
        // In flight while the next k-step is staged into the other buffer, once every
        // warpgroup is past its wait for the last k-step's `wgmma`, which read that buffer.
        k.ins("wgmma.commit_group.sync.aligned;");
        k.ins("bar.sync 0;");
    }
    for (tile, tile_accs) in accs.iter().enumerate() {
        let mut a_frags = Vec::new();
        for &part in parts {
            let r = ldmatrix_x4(k, a_at, part + 16 * tile as u32 * TC_ROW, false);
            a_frags.push(r);
        }
        for (column_accs, frags) in tile_accs.iter().zip(&b_frags) {
            for (acc, b) in column_accs.iter().zip(frags) {
                for a in &a_frags {
                    mma(k, inputs_as.mma_type(), acc, a, *b);
                }
            }
        }
    }
    // The next k-step's registers into the other buffer; every warp is past its reads of that
    // buffer (the barrier at the end of the previous k-step; with `wgmma`, the one above).
    let skip_commit = k.label("skip_commit");
    k.ins(format!("@!{more} bra {skip_commit};"));
    k.ins(format!("xor.b64 {buf}, {buf}, {stage_bytes};"));
    commit(k, buf);
    k.place(&skip_commit);
    k.ins("bar.sync 0;");
    k.ins(format!("mov.u32 {k0}, {next};"));
    k.ins(format!("bra {head};"));
    k.place(&end);
    if wgmma {
        k.ins("wgmma.wait_group.sync.aligned 0;");
    }

    // Epilogue. `mma.sync`: accumulator i of (token tile, column tile j) is (token t0 +
    // 64·token_warp + 16·tile + g + 8·(i >> 1), column col0 + warp's first + 8j + 2q + (i &
    // 1)). `wgmma`: register i of n tile j is (token t0 + 64·token_warp + 16·warp + g + 8·(i
    // >> 1), column col0 + 8j + 2q + (i & 1)), the second rows' 8 tiles further on. So
    // accumulators 2h and 2h + 1 are adjacent columns (2q, 2q + 1) of one row: with the width a
    // multiple of 8 both are in range or neither, and they are finished together. As (token
    // offset, first column's offset, both columns' accumulators) from the thread's bases:
    type Pair = (u32, u32, [Vec<Reg>; 2]);
    let results: Vec<Pair> = if wgmma {
        let tiles = if pairs { 8 } else { 16 };
        let column = |j: usize, i: usize| {
            let mut vals = vec![wg_accs[j][i]];
            if pairs {
                vals.push(wg_accs[j + 8][i]);
            }
            vals
        };
        (0..tiles)
            .flat_map(|j| (0..2usize).map(move |h| (j, h)))
            .map(|(j, h)| {
                let cols = [column(j, 2 * h), column(j, 2 * h + 1)];
                (8 * h as u32, 8 * j as u32, cols)
            })
            .collect()
    } else {
        let mut out = Vec::new();
        for (tile, tile_accs) in accs.iter().enumerate() {
            for (j, column_accs) in tile_accs.iter().enumerate() {
                let column = |i: usize| column_accs.iter().map(|a| a[i]).collect();
                for h in 0..2u32 {
                    let cols = [column(2 * h as usize), column(2 * h as usize + 1)];
                    out.push((16 * tile as u32 + 8 * h, 8 * j as u32, cols));
                }
            }
        }
        out
    };
    assert!(width % 8 == 0, "tensor-core widths are multiples of 8");
    k.ins(format!("mad.lo.u32 {t0}, {token_warp}, 64, {t0};"));
    k.ins(format!("add.u32 {t0}, {t0}, {g};"));
    let col_base = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {col_base}, {q}, 2, {col0};"));
    if wgmma {
        k.ins(format!("mad.lo.u32 {t0}, {warp}, 16, {t0};"));
    } else {
        k.ins(format!("add.u32 {col_base}, {col_base}, {warp_row};"));
    }
    // With row scales: each of the thread's token rows' 2^k, loaded once (rows past the
    // count read the last row's; never used).
    let mut row_ups: Vec<(u32, Reg)> = Vec::new();
    if let Some(scale) = row_scale {
        for &(dt, _, _) in &results {
            if row_ups.iter().any(|&(seen, _)| seen == dt) {
                continue;
            }
            let t = k.reg(Class::B32);
            k.ins(format!("add.u32 {t}, {t0}, {dt};"));
            k.ins(format!("min.u32 {t}, {t}, {last};"));
            let at = addr4(k, scale, t);
            let up = k.reg(Class::F32);
            k.ins(format!("ld.global.f32 {up}, [{at}];"));
            row_ups.push((dt, up));
        }
    }
    for (dt, dc, mut cols) in results {
        let skip = k.label("skip");
        let t = k.reg(Class::B32);
        k.ins(format!("add.u32 {t}, {t0}, {dt};"));
        k.leave_unless_below(t, n, &skip);
        let col = k.reg(Class::B32);
        k.ins(format!("add.u32 {col}, {col_base}, {dc};"));
        k.leave_unless_below(col, width, &skip);
        if let Some(&(_, up)) = row_ups.iter().find(|&&(seen, _)| seen == dt) {
            // The row's sums times its 2^k (exact).
            for v in cols.iter_mut().flatten() {
                let scaled = k.reg(Class::F32);
                k.ins(format!("mul.f32 {scaled}, {v}, {up};"));
                *v = scaled;
            }
        }
        finish(k, cols, t, col);
        k.place(&skip);
    }
    k.place(&group_end);
}

/// The chunk projection on tensor cores (`tc_body` over a weight stored a row per output
/// column; GeGLU's gate and up rows are its pairs), finished as `gemm_tokens_split` finishes:
/// bias, epilogue, residual, the split output. Parameters as `gemm_tokens_split`. Launch:
/// `tc_grid` blocks of `tc_block` threads, for the same `token_warps` (`tc_token_warps`).
pub fn gemm_tokens_tc(
    spec: &GemvSpec,
    splits: &[u32],
    config: impl Into<TcConfig>,
    token_warps: u32,
) -> String {
    let config = config.into();
    assert!(
        tensor_cores_fit(spec, splits),
        "projection does not fit tensor cores"
    );
    let mut k = Kernel::new(&spec.name);
    let ProjectionParams {
        count,
        x,
        scale,
        w,
        outputs,
    } = ProjectionParams::declare(&mut k, spec, splits, config.row_scales);
    let shape = TcShape {
        count,
        x,
        x_stride: spec.inputs,
        inputs: spec.inputs,
        width: spec.width,
        pairs: is_geglu(spec),
        weights: TcWeights::Rows(w),
        inputs_as: config.inputs,
        wgmma: config.mma == TcMma::Warpgroup,
        row_scale: scale,
        token_warps,
        k_split: 1,
    };
    tc_body(&mut k, &shape, &mut |k, cols, t, col| {
        finish_tokens(k, &outputs, cols, t, col)
    });
    k.finish()
}

/// Assumed rates for `tc_k_split`'s cost model (H100/H200, not measured here): `mma.sync`
/// FLOP/s, bytes/s for the reduction's traffic, and seconds one more launch costs.
const ASSUMED_MMA_FLOPS: f64 = 500e12;
const ASSUMED_BYTES_PER_S: f64 = 3e12;
const ASSUMED_LAUNCH_S: f64 = 3e-6;

/// k parts for a projection over chunks of up to `max_tokens` (`tc_grid`'s blocks, `token_warps`
/// across the tokens, `mmas` per tile: 2 with split inputs): 2 where the grid would end in a
/// wave that leaves most of the GPU idle (or fills only part of one) and two parts, with the
/// reduction launch counted, take less time. The product alone, perfectly packed, would take
/// `ideal` = 2·T·W·K·mmas FLOP at `ASSUMED_MMA_FLOPS`; N blocks on S slots take
/// ⌈N/S⌉·S/N times that, two parts ⌈2N/S⌉·S/2N times, plus a launch and the reduction
/// (reading two partial sums, writing the result: 12 bytes per output). For the 2B model at
/// chunks of 2048 with split inputs: the MLP's down projection 1.65 → 1.30 ideals,
/// `linear_out`/`o_proj` 1.65 → 1.43, qkv 1.38 → 1.23; x/y (1.24 → 1.23) and the MLP's up
/// projection stay whole. Only plain projections (no GeGLU, no soft-cap: the logits keep one
/// launch, which the last-row program replaces), with inputs a multiple of 32.
pub fn tc_k_split(spec: &GemvSpec, max_tokens: u32, token_warps: u32, mmas: u32) -> u32 {
    if !k_parts_fit(spec, 2) {
        return 1;
    }
    let slots = TARGET_SMS * (512 / tc_block(token_warps));
    let packing = |blocks: u32| (blocks.div_ceil(slots) * slots) as f64 / blocks as f64;
    let blocks = tc_grid(spec, max_tokens, token_warps);
    let outputs = max_tokens as f64 * spec.width as f64;
    let ideal = 2.0 * outputs * spec.inputs as f64 * mmas as f64 / ASSUMED_MMA_FLOPS;
    let whole = ideal * packing(blocks);
    let halves =
        ideal * packing(2 * blocks) + ASSUMED_LAUNCH_S + 12.0 * outputs / ASSUMED_BYTES_PER_S;
    if halves < 0.95 * whole {
        2
    } else {
        1
    }
}

/// Whether a projection can run in `parts` k parts: a plain one (no GeGLU, no soft-cap) whose
/// inputs split into parts of whole k-steps.
pub fn k_parts_fit(spec: &GemvSpec, parts: u32) -> bool {
    spec.epilogue == Epilogue::None && spec.inputs % (16 * parts) == 0
}

/// `gemm_tokens_tc` over one of `k_split` parts of the inputs per block, writing raw partial
/// sums `partial[p][t][col]` (`max_tokens` rows a part); `gemm_reduce_tokens` adds them and
/// finishes. Parameters: count `i32[1]`, x `f32[T, I]`, w `[width, I]`, partial `f32[k_split,
/// T_max, width]`. Launch: `k_split · tc_grid` blocks of `tc_block` threads.
pub fn gemm_tokens_tc_partial(
    spec: &GemvSpec,
    config: impl Into<TcConfig>,
    token_warps: u32,
    k_split: u32,
    max_tokens: u32,
) -> String {
    let config = config.into();
    assert!(tensor_cores_fit(spec, &[]) && k_parts_fit(spec, k_split));
    let mut k = Kernel::new(&spec.name);
    let count = k.param_ptr("count");
    let x = k.param_ptr("x");
    let scale = config.row_scales.then(|| k.param_ptr("scale"));
    let w = k.param_ptr("w");
    let partial = k.param_ptr("partial");
    let shape = TcShape {
        count,
        x,
        x_stride: spec.inputs,
        inputs: spec.inputs,
        width: spec.width,
        pairs: false,
        weights: TcWeights::Rows(w),
        inputs_as: config.inputs,
        wgmma: config.mma == TcMma::Warpgroup,
        row_scale: scale,
        token_warps,
        k_split,
    };
    let width = spec.width;
    // This block's part: `tc_body` groups the blocks by part.
    let part = k.reg(Class::B32);
    k.ins(format!("mov.u32 {part}, %nctaid.x;"));
    k.ins(format!("div.u32 {part}, {part}, {k_split};"));
    let b = k.reg(Class::B32);
    k.ins(format!("mov.u32 {b}, %ctaid.x;"));
    k.ins(format!("div.u32 {part}, {b}, {part};"));
    tc_body(&mut k, &shape, &mut |k, cols, t, col| {
        let e = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {e}, {part}, {max_tokens}, {t};"));
        k.ins(format!("mad.lo.u32 {e}, {e}, {width}, {col};"));
        let at = addr4(k, partial, e);
        // Two adjacent columns, the first even: one 8-byte store.
        let [a, b] = &cols;
        k.ins(format!("st.global.v2.f32 [{at}], {{{}, {}}};", a[0], b[0]));
    });
    k.finish()
}

/// Adds a projection's `k_split` partial sums and finishes each result as `gemm_tokens_split`
/// does (bias, residual, split outputs). Parameters: count `i32[1]`, partial `f32[k_split,
/// T_max, width]`, [bias], [residual], outputs as `gemm_tokens_split`. Launch:
/// `elementwise_grid(T_max · width, NORM_BLOCK)` blocks of `NORM_BLOCK`.
pub fn gemm_reduce_tokens(
    spec: &GemvSpec,
    splits: &[u32],
    k_split: u32,
    max_tokens: u32,
) -> String {
    use crate::prefill::NORM_BLOCK;
    let mut k = Kernel::new(&spec.name);
    let count = k.param_ptr("count");
    let partial = k.param_ptr("partial");
    let outputs = Outputs::declare_after_weights(&mut k, spec, splits);
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let elements = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {elements}, {n}, {};", spec.width));
    let part_stride = 4 * max_tokens as u64 * spec.width as u64;
    k.grid_stride(NORM_BLOCK, elements, &mut |k, e, _| {
        let (t, col) = (k.reg(Class::B32), k.reg(Class::B32));
        k.ins(format!("div.u32 {t}, {e}, {};", spec.width));
        k.ins(format!("rem.u32 {col}, {e}, {};", spec.width));
        let at = addr4(k, partial, e);
        let sum = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {sum}, [{at}];"));
        for p in 1..k_split as u64 {
            let v = k.reg(Class::F32);
            k.ins(format!("ld.global.f32 {v}, [{at}+{}];", p * part_stride));
            k.ins(format!("add.f32 {sum}, {sum}, {v};"));
        }
        finish_token(k, &outputs, vec![sum], t, col);
    });
    k.finish()
}

/// The RG-LRU's gates over a chunk on tensor cores: both gate products of every token as one
/// block-diagonal product of the conv outputs (`tc_body`, the two gates' matrices as pairs),
/// finished into the scan's coefficients `h_t = a_t · h_{t-1} + b_t` (reset at position 0) as
/// `rg_lru_gates_tokens` writes them.
///
/// Parameters: count `i32[1]`, conv `f32[T, C]` (`rg_lru_conv_tokens`' output), start `i32[1]`,
/// input-gate w `[H, B, B]` bf16, input-gate bias, recurrent-gate w, recurrent-gate bias, decay
/// `f32[C]`, a `f32[T, C]`, b `f32[T, C]`. Launch: `gates_tc_grid` blocks of `tc_block`
/// threads, for the same `token_warps` (`gates_tc_token_warps`).
pub fn rg_lru_gates_tc(s: &RgLruSpec, inputs_as: TcInputs, token_warps: u32) -> String {
    assert!(gates_fit_tensor_cores(s), "gates do not fit tensor cores");
    let mut k = Kernel::new(&s.name);
    let count = k.param_ptr("count");
    let conv = k.param_ptr("conv");
    let start = k.param_ptr("start");
    let igw = k.param_ptr("input_gate_w");
    let igb = k.param_ptr("input_gate_b");
    let rgw = k.param_ptr("recurrent_gate_w");
    let rgb = k.param_ptr("recurrent_gate_b");
    let decay = k.param_ptr("decay");
    let a_out = k.param_ptr("a");
    let b_out = k.param_ptr("b");
    let c = s.channels;
    let shape = TcShape {
        count,
        x: conv,
        x_stride: c,
        inputs: block_size(s),
        width: c,
        pairs: true,
        weights: TcWeights::Blocks {
            w: [igw, rgw],
            size: block_size(s),
        },
        inputs_as,
        wgmma: false,
        row_scale: None,
        token_warps,
        k_split: 1,
    };
    // The chunk's first position, once: the host writes it (as it does the count, which
    // `tc_body` also reads before waiting for the kernel before).
    let p0 = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {p0}, [{start}];"));
    // Token t's (position p) gates at columns `first` (even) and `first + 1`: the biases, the
    // gated input, a_t and b_t; the two columns' conv outputs read and a_t, b_t stored 8 bytes
    // at a time, filling whole sectors.
    tc_body(&mut k, &shape, &mut |k, cols, t, first| {
        let p = k.reg(Class::B32);
        k.ins(format!("add.u32 {p}, {p0}, {t};"));
        let at = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {at}, {t}, {c}, {first};"));
        let ca = addr4(k, conv, at);
        let conv_in = [k.reg(Class::F32), k.reg(Class::F32)];
        k.ins(format!(
            "ld.global.v2.f32 {{{}, {}}}, [{ca}];",
            conv_in[0], conv_in[1]
        ));
        let mut a_t = Vec::new();
        let mut b_t = Vec::new();
        for ((i, vals), cv) in cols.into_iter().enumerate().zip(conv_in) {
            let col = k.reg(Class::B32);
            k.ins(format!("add.u32 {col}, {first}, {i};"));
            let zx = k.reg(Class::F32);
            let bx = load_weight(k, Storage::F32, igb, col);
            k.ins(format!("add.f32 {zx}, {}, {bx};", vals[0]));
            let zr = k.reg(Class::F32);
            let br = load_weight(k, Storage::F32, rgb, col);
            k.ins(format!("add.f32 {zr}, {}, {br};", vals[1]));
            let rate = load_weight(k, Storage::F32, decay, col);
            let (a, bv) = gated_input(k, zx, zr, rate, cv, p);
            a_t.push(a);
            b_t.push(bv);
        }
        for (out, vals) in [(a_out, a_t), (b_out, b_t)] {
            let oa = addr4(k, out, at);
            k.ins(format!(
                "st.global.v2.f32 [{oa}], {{{}, {}}};",
                vals[0], vals[1]
            ));
        }
    });
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn projection(inputs: u32, width: u32, epilogue: Epilogue) -> GemvSpec {
        GemvSpec {
            name: "p".into(),
            inputs,
            width,
            bias: true,
            epilogue,
            residual: true,
            weights: Storage::Bf16,
            norm: None,
        }
    }

    /// The 2B model's projections at chunks of 2048 and 512, split inputs and rounded ones.
    #[test]
    fn k_parts_where_the_last_wave_would_leave_the_gpu_idle() {
        let parts = |inputs, width, epilogue, tokens, mmas| {
            let spec = projection(inputs, width, epilogue);
            tc_k_split(&spec, tokens, tc_token_warps(&spec, tokens), mmas)
        };
        // Down (7680 → 2560), linear_out / o_proj (2560 → 2560), qkv (2560 → 3072), x/y.
        assert_eq!(parts(7680, 2560, Epilogue::None, 2048, 2), 2);
        assert_eq!(parts(2560, 2560, Epilogue::None, 2048, 2), 2);
        assert_eq!(parts(2560, 3072, Epilogue::None, 2048, 2), 2);
        assert_eq!(parts(2560, 5120, Epilogue::None, 2048, 2), 1);
        // GeGLU and the soft-capped logits never.
        assert_eq!(parts(2560, 7680, Epilogue::GeGlu, 2048, 2), 1);
        assert_eq!(parts(2560, 256000, Epilogue::SoftCap(30.0), 2048, 2), 1);
        // One MMA per tile: the reduction weighs twice as much; only down still gains.
        assert_eq!(parts(7680, 2560, Epilogue::None, 2048, 1), 2);
        assert_eq!(parts(2560, 2560, Epilogue::None, 2048, 1), 1);
        // A tiny model: a launch costs more than the product.
        assert_eq!(parts(64, 96, Epilogue::None, 5, 2), 1);
        // A short chunk of the 2B model: 20 blocks of down's 7680-input rows on 528 slots.
        assert_eq!(parts(7680, 2560, Epilogue::None, 5, 2), 2);
    }
}
