//! The decode projection: one warp per output column streams a bf16 weight row with 16-byte
//! loads, accumulates in f32, reduces across the warp with shuffles, and applies the epilogue
//! (bias, GeGLU, soft-cap, residual) in lane 0. Eight warps per block; each block stages its
//! inputs in shared memory while the first bytes of its warps' rows come into L2; outputs wider
//! than 8192 columns take a fixed grid whose warps walk several rows.

use crate::builder::{Class, Kernel, Reg};
use crate::math::{combine_partials, gelu, store_warp_partial, tanh, warp_sum};
use crate::rg_lru::Storage;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    None,
    /// Rows `[0, width)` are the gate, rows `[width, 2·width)` the up branch.
    GeGlu,
    SoftCap(f32),
}

#[derive(Clone, Debug)]
pub struct GemvSpec {
    pub name: String,
    /// Input width; a multiple of 8 (one 16-byte load of bf16).
    pub inputs: u32,
    /// Output width (the weight has twice as many rows with GeGLU).
    pub width: u32,
    pub bias: bool,
    pub epilogue: Epilogue,
    pub residual: bool,
    /// How the weight matrix is stored (bf16 halves the bytes decode streams; f32 keeps the
    /// f32 path exact).
    pub weights: Storage,
    /// RMS-normalise x first (epsilon); the kernel then takes the norm's gain (`1 + w`,
    /// folded at packing) after x. `Σ w·(x·g·r) = r · Σ w·(x·g)`: the gain multiplies each
    /// input and the common factor r the sum.
    pub norm: Option<f32>,
}

pub const WARPS_PER_BLOCK: u32 = 8;

/// Steps (256 inputs per warp each) the decode GEMV takes per unrolled iteration.
const UNROLL: u32 = 4;

/// Outputs up to this many blocks' warps (8192 rows) get a warp per row: every block of the
/// grid resident at once on an H200 (132 SMs, up to 8 blocks of 256 threads each at 32
/// registers per thread).
const MAX_ROW_BLOCKS: u32 = 1024;

/// Blocks for wider outputs (the 2B model's 256,000 logits): 4 per SM of an H200, each warp
/// taking every `stride`-th row (~61 for the logits), so inputs are staged and normalised 528
/// times instead of 32,000 and no block waits for a second wave.
const PERSISTENT_BLOCKS: u32 = 528;

/// Thread blocks to launch for `spec` (each of `32 · WARPS_PER_BLOCK` threads).
pub fn grid(spec: &GemvSpec) -> u32 {
    grid_for(spec.width)
}

/// Thread blocks for an output `width` wide.
fn grid_for(width: u32) -> u32 {
    let row_blocks = width.div_ceil(WARPS_PER_BLOCK);
    if row_blocks <= MAX_ROW_BLOCKS {
        row_blocks
    } else {
        PERSISTENT_BLOCKS
    }
}

/// Accumulates `w[row, i..i+8] · x[i..i+8]` into `acc`.
#[allow(clippy::too_many_arguments)]
fn dot8(
    k: &mut Kernel,
    storage: Storage,
    w: Reg,
    x: Input,
    gain: Option<Reg>,
    row: Reg,
    i: Reg,
    inputs: u32,
    acc: Reg,
) {
    let elem = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {elem}, {row}, {inputs}, {i};"));
    let ws = load_weights8(k, storage, w, elem);
    // The staged copy keeps each lane's first four inputs at twice their index in bytes and
    // its next four `second` bytes after them (`stage_inputs`).
    let (base, space, bytes_per_index, second) = match x {
        Input::Global(r) => (r, "global", 4, 16),
        Input::Shared { base, second } => (base, "shared", 2, second),
    };
    let xoff = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {xoff}, {i}, {bytes_per_index};"));
    let xp = k.reg(Class::B64);
    k.ins(format!("add.u64 {xp}, {base}, {xoff};"));
    let xs: Vec<Reg> = (0..8).map(|_| k.reg(Class::F32)).collect();
    k.ins(format!(
        "ld.{space}.v4.f32 {{{}, {}, {}, {}}}, [{xp}];",
        xs[0], xs[1], xs[2], xs[3]
    ));
    k.ins(format!(
        "ld.{space}.v4.f32 {{{}, {}, {}, {}}}, [{xp}+{second}];",
        xs[4], xs[5], xs[6], xs[7]
    ));
    if let Some(g) = gain {
        let gp = k.reg(Class::B64);
        k.ins(format!("add.u64 {gp}, {g}, {xoff};"));
        let gs: Vec<Reg> = (0..8).map(|_| k.reg(Class::F32)).collect();
        k.ins(format!(
            "ld.global.nc.v4.f32 {{{}, {}, {}, {}}}, [{gp}];",
            gs[0], gs[1], gs[2], gs[3]
        ));
        k.ins(format!(
            "ld.global.nc.v4.f32 {{{}, {}, {}, {}}}, [{gp}+16];",
            gs[4], gs[5], gs[6], gs[7]
        ));
        for (xv, gv) in xs.iter().zip(&gs) {
            k.ins(format!("mul.f32 {xv}, {xv}, {gv};"));
        }
    }
    for (wv, xv) in ws.iter().zip(&xs) {
        k.ins(format!("fma.rn.f32 {acc}, {wv}, {xv}, {acc};"));
    }
}

/// Where a GEMV reads its inputs: global memory, or the block's staged copy in shared memory
/// (`second`: the offset of the second half, `stage_inputs`).
#[derive(Clone, Copy)]
enum Input {
    Global(Reg),
    Shared { base: Reg, second: u32 },
}

/// Bytes between the staged inputs' two halves: the first half's `2 · inputs`, and 64 more so
/// that a staging phase's stores to the two halves fall on different banks.
fn second_half(inputs: u32) -> u32 {
    2 * inputs + 64
}

/// Inputs up to this width are staged in shared memory (48 KiB of static shared memory, less
/// the per-warp partial sums and the 64 bytes between the halves).
pub const MAX_STAGED_INPUTS: u32 = (48 * 1024 - 4 * WARPS_PER_BLOCK - 64) / 4;

/// The block stages its inputs once in shared memory (normalised and scaled by the gain when
/// there is a norm prologue): every warp then reads them from there, and the norm's sum of
/// squares is computed once per block instead of once per warp. Each thread takes every 256th
/// group of four inputs with 16-byte loads, up to four groups' loads in flight before the
/// first store (the whole block waits for this at its barrier). A lane reads eight inputs a
/// step (8·lane + 256·s..): in input order its two 16-byte reads would leave lanes 32 bytes
/// apart, two to a bank in each phase (twice the wavefronts). So they are stored in two
/// halves, each lane's first four inputs (index i) at byte 2i of the first and its next four
/// at byte 2i of the second (`second_half` further on): each read is 512 contiguous bytes,
/// and both halves are at addresses linear in i (no register more than before: the GEMVs
/// keep to 32).
fn stage_inputs(
    k: &mut Kernel,
    spec: &GemvSpec,
    x: Reg,
    gain: Option<Reg>,
    tid: Reg,
    warp: Reg,
    lane: Reg,
) -> Input {
    let threads = 32 * WARPS_PER_BLOCK;
    let second = second_half(spec.inputs);
    k.shared("xs", second + 2 * spec.inputs, 16);
    k.shared("partial", 4 * WARPS_PER_BLOCK, 16);
    let xs = k.reg(Class::B64);
    k.ins(format!("mov.u64 {xs}, xs;"));
    let ss = k.reg(Class::F32);
    k.ins(format!("mov.f32 {ss}, 0f00000000;"));
    let quads = spec.inputs / 4;
    let per_thread = quads.div_ceil(threads);
    let mine = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {mine}, {tid}, 16;"));
    let (xp, sp) = (k.reg(Class::B64), k.reg(Class::B64));
    k.ins(format!("add.u64 {xp}, {x}, {mine};"));
    // Inputs 4t.. go to byte 8t of the first half (t even) or 8t - 8 of the second (t odd):
    // a phase of 8 threads stores 64 bytes to each half, 64 bytes apart in banks.
    let slot = k.reg(Class::B32);
    k.ins(format!("and.b32 {slot}, {tid}, 1;"));
    k.ins(format!("mul.lo.u32 {slot}, {slot}, {};", second - 8));
    k.ins(format!("mad.lo.u32 {slot}, {tid}, 8, {slot};"));
    k.ins(format!("cvt.u64.u32 {sp}, {slot};"));
    k.ins(format!("add.u64 {sp}, {xs}, {sp};"));
    let gp = gain.map(|g| {
        let gp = k.reg(Class::B64);
        k.ins(format!("add.u64 {gp}, {g}, {mine};"));
        gp
    });
    for round in (0..per_thread).step_by(4) {
        let mut loaded = Vec::new();
        for m in round..(round + 4).min(per_thread) {
            // Only the last group of a thread can fall past the end.
            let guard = if threads * (m + 1) <= quads {
                String::new()
            } else {
                let q = k.reg(Class::B32);
                k.ins(format!("add.u32 {q}, {tid}, {};", threads * m));
                let p = k.reg(Class::Pred);
                k.ins(format!("setp.lt.u32 {p}, {q}, {quads};"));
                format!("@{p} ")
            };
            let at = 16 * threads * m;
            let v = k.regs4(Class::F32);
            k.ins(format!(
                "{guard}ld.global.v4.f32 {{{}, {}, {}, {}}}, [{xp}+{at}];",
                v[0], v[1], v[2], v[3]
            ));
            let g = gp.map(|gp| {
                let g = k.regs4(Class::F32);
                k.ins(format!(
                    "{guard}ld.global.nc.v4.f32 {{{}, {}, {}, {}}}, [{gp}+{at}];",
                    g[0], g[1], g[2], g[3]
                ));
                g
            });
            loaded.push((guard, at, v, g));
        }
        for (guard, at, v, g) in loaded {
            if let Some(g) = g {
                for (xv, gv) in v.iter().zip(&g) {
                    k.ins(format!("{guard}fma.rn.f32 {ss}, {xv}, {xv}, {ss};"));
                    k.ins(format!("mul.f32 {xv}, {xv}, {gv};"));
                }
            }
            // A round is 1024 inputs: 4 KiB of x, 2 KiB of each half.
            k.ins(format!(
                "{guard}st.shared.v4.f32 [{sp}+{}], {{{}, {}, {}, {}}};",
                at / 2,
                v[0],
                v[1],
                v[2],
                v[3]
            ));
        }
    }
    if gain.is_some() {
        warp_sum(k, ss);
        store_warp_partial(k, ss, warp, lane);
    }
    k.ins("bar.sync 0;");
    Input::Shared { base: xs, second }
}

/// The block's sum of squares from the per-warp partials, as `1 / sqrt(mean + eps)`.
fn staged_rms_factor(k: &mut Kernel, inputs: u32, eps: f32) -> Reg {
    let ss = combine_partials(k, "add", WARPS_PER_BLOCK);
    finish_rms(k, ss, inputs, eps)
}

/// `1 / sqrt(ss / inputs + eps)` from a sum of squares.
pub(crate) fn finish_rms(k: &mut Kernel, ss: Reg, inputs: u32, eps: f32) -> Reg {
    k.ins(format!(
        "fma.rn.f32 {ss}, {ss}, {}, {};",
        Kernel::f32_imm(1.0 / inputs as f32),
        Kernel::f32_imm(eps)
    ));
    let r = k.reg(Class::F32);
    // sqrt.rn then an IEEE reciprocal: as exact as the reference's 1/sqrt in f32.
    k.ins(format!("sqrt.rn.f32 {r}, {ss};"));
    k.ins(format!("rcp.rn.f32 {r}, {r};"));
    r
}

/// The epilogue on a column's sum `acc` (and `up`, the up row's, with GeGLU): `gelu(acc)·up`,
/// `cap·tanh(acc/cap)`, or `acc` itself.
pub(crate) fn apply_epilogue(k: &mut Kernel, epilogue: Epilogue, acc: Reg, up: Reg) -> Reg {
    match epilogue {
        Epilogue::None => acc,
        Epilogue::GeGlu => {
            let g = gelu(k, acc);
            let v = k.reg(Class::F32);
            k.ins(format!("mul.f32 {v}, {g}, {up};"));
            v
        }
        Epilogue::SoftCap(cap) => {
            let v = k.reg(Class::F32);
            k.ins(format!(
                "mul.f32 {v}, {acc}, {};",
                Kernel::f32_imm(1.0 / cap)
            ));
            let t = tanh(k, v);
            k.ins(format!("mul.f32 {t}, {t}, {};", Kernel::f32_imm(cap)));
            t
        }
    }
}

/// Eight consecutive weights from element `elem` on, as f32: one 16-byte load of bf16
/// (widened in registers) or two of f32.
pub(crate) fn load_weights8(k: &mut Kernel, storage: Storage, w: Reg, elem: Reg) -> Vec<Reg> {
    let off = k.reg(Class::B64);
    let wp = k.reg(Class::B64);
    match storage {
        Storage::Bf16 => {
            k.ins(format!("mul.wide.u32 {off}, {elem}, 2;"));
            k.ins(format!("add.u64 {wp}, {w}, {off};"));
            let words: Vec<Reg> = (0..4).map(|_| k.reg(Class::B32)).collect();
            k.ins(format!(
                "ld.global.nc.v4.u32 {{{}, {}, {}, {}}}, [{wp}];",
                words[0], words[1], words[2], words[3]
            ));
            let mut out = Vec::new();
            for word in words {
                // A 32-bit word holds two bf16: the low half is the earlier element.
                let (lo, hi) = (k.reg(Class::B32), k.reg(Class::B32));
                k.ins(format!("shl.b32 {lo}, {word}, 16;"));
                k.ins(format!("and.b32 {hi}, {word}, -65536;"));
                for bits in [lo, hi] {
                    let v = k.reg(Class::F32);
                    k.ins(format!("mov.b32 {v}, {bits};"));
                    out.push(v);
                }
            }
            out
        }
        Storage::F32 => {
            k.ins(format!("mul.wide.u32 {off}, {elem}, 4;"));
            k.ins(format!("add.u64 {wp}, {w}, {off};"));
            let out: Vec<Reg> = (0..8).map(|_| k.reg(Class::F32)).collect();
            k.ins(format!(
                "ld.global.nc.v4.f32 {{{}, {}, {}, {}}}, [{wp}];",
                out[0], out[1], out[2], out[3]
            ));
            k.ins(format!(
                "ld.global.nc.v4.f32 {{{}, {}, {}, {}}}, [{wp}+16];",
                out[4], out[5], out[6], out[7]
            ));
            out
        }
    }
}

fn load_f32_at(k: &mut Kernel, base: Reg, index: Reg) -> Reg {
    let off = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {off}, {index}, 4;"));
    let p = k.reg(Class::B64);
    k.ins(format!("add.u64 {p}, {base}, {off};"));
    let v = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {v}, [{p}];"));
    v
}

/// `1 / sqrt(mean(x²) + eps)`, computed by each warp over the whole input (every lane ends
/// with it).
fn rms_factor(k: &mut Kernel, x: Reg, lane: Reg, inputs: u32, eps: f32) -> Reg {
    let ss = k.reg(Class::F32);
    k.ins(format!("mov.f32 {ss}, 0f00000000;"));
    let i = k.reg(Class::B32);
    k.ins(format!("mov.u32 {i}, {lane};"));
    k.strided(i, inputs, 32, &mut |k| {
        let v = load_f32_at(k, x, i);
        k.ins(format!("fma.rn.f32 {ss}, {v}, {v}, {ss};"));
    });
    warp_sum(k, ss);
    finish_rms(k, ss, inputs, eps)
}

/// Parameters, in order: x `f32[I]`, [gain `f32[I]`], w `bf16[rows, I]`, [bias `f32[rows]`],
/// [residual `f32[width]`], out `f32[width]`. Launch: `grid(spec)` blocks of
/// `32 · WARPS_PER_BLOCK` threads.
pub fn gemv(spec: &GemvSpec) -> String {
    gemv_kernel(spec, false)
}

/// Slots of the best-output pairs `gemv_with_best` writes for an output `width` wide: one per
/// warp of its grid.
pub fn best_slots(width: u32) -> u32 {
    grid_for(width) * WARPS_PER_BLOCK
}

/// `gemv`, and each warp's largest output with its column (the first on ties, NaN never
/// wins; `(-inf, width)` for a warp without one) as an (f32, u32) pair into slot `block · 8 +
/// warp` of one more parameter, best `[best_slots, 2]`: the greedy argmax then reduces 4,224
/// pairs for the 2B logits (`misc::argmax_best`) instead of reading 256,000 values in one
/// block, 1 MB through one SM.
pub fn gemv_with_best(spec: &GemvSpec) -> String {
    gemv_kernel(spec, true)
}

fn gemv_kernel(spec: &GemvSpec, with_best: bool) -> String {
    assert!(spec.inputs % 8 == 0, "inputs must be a multiple of 8");
    let mut k = Kernel::new(&spec.name);
    // Eight blocks per SM (32 registers per thread): up to `MAX_ROW_BLOCKS` blocks all
    // resident at once on an H200, so no block waits for a second wave. Tracking the best
    // output takes two registers more: four blocks per SM then, as many as the wide outputs'
    // fixed grid has (`PERSISTENT_BLOCKS`).
    k.launch_bounds(32 * WARPS_PER_BLOCK, if with_best { 4 } else { 8 });
    let x = k.param_ptr("x");
    let gain = spec.norm.map(|_| k.param_ptr("gain"));
    let w = k.param_ptr("w");
    let bias = spec.bias.then(|| k.param_ptr("bias"));
    let residual = spec.residual.then(|| k.param_ptr("residual"));
    let out = k.param_ptr("out");
    let best_out = with_best.then(|| k.param_ptr("best"));

    let (tid, block) = k.thread_and_block();
    let (warp, lane) = k.warp_and_lane(tid);
    let col = k.reg(Class::B32);
    k.ins(format!(
        "mad.lo.u32 {col}, {block}, {WARPS_PER_BLOCK}, {warp};"
    ));
    let geglu = spec.epilogue == Epilogue::GeGlu;
    // The first bytes of this warp's first row(s) start coming into L2 while the kernel
    // before this one finishes (weights are never written, so this may run before the wait)
    // and while the block stages its inputs.
    prefetch_rows(&mut k, spec, w, col, lane);
    k.wait_for_earlier_kernels();
    // Staging needs every thread of the block at its barrier: before any warp leaves.
    let staged = spec.inputs <= MAX_STAGED_INPUTS;
    let input = if staged {
        stage_inputs(&mut k, spec, x, gain, tid, warp, lane)
    } else {
        Input::Global(x)
    };
    // Staged inputs already carry the gain.
    let gain_in_loop = if staged { None } else { gain };
    // Unstaged inputs: the norm's factor once for all of the warp's rows (a pass over x).
    // Staged: from the block's partials after each row (a few shared loads; kept across the
    // row it would cost a register past the 32 that eight blocks per SM allow).
    let unstaged_factor = match spec.norm {
        Some(eps) if !staged => Some(rms_factor(&mut k, x, lane, spec.inputs, eps)),
        _ => None,
    };

    // The warp's best output so far (lane 0's): rows come in increasing order, so strictly
    // greater keeps the first.
    let best = best_out.map(|pairs| {
        let (bv, bi) = (k.reg(Class::F32), k.reg(Class::B32));
        k.ins(format!("mov.f32 {bv}, 0fFF800000;"));
        k.ins(format!("mov.u32 {bi}, {};", spec.width));
        (pairs, bv, bi)
    });
    // Rows col, col + stride, ... (one unless the output is wider than the grid's warps).
    let stride = grid(spec) * WARPS_PER_BLOCK;
    let persistent = stride < spec.width;
    let (row_head, row_next, done) = (k.label("row"), k.label("row_next"), k.label("done"));
    k.place(&row_head);
    // Whole warps leave together, so the shuffles below always see full warps.
    k.leave_unless_below(col, spec.width, &done);
    let up_row = k.reg(Class::B32);
    k.ins(format!("add.u32 {up_row}, {col}, {};", spec.width));
    if persistent {
        // The next row's first bytes start coming while this one is read.
        let next = k.reg(Class::B32);
        k.ins(format!("add.u32 {next}, {col}, {stride};"));
        let last = k.label("last_row");
        k.leave_unless_below(next, spec.width, &last);
        prefetch_rows(&mut k, spec, w, next, lane);
        k.place(&last);
    }
    let acc = k.reg(Class::F32);
    k.ins(format!("mov.f32 {acc}, 0f00000000;"));
    let acc_up = k.reg(Class::F32);
    k.ins(format!("mov.f32 {acc_up}, 0f00000000;"));

    let i = k.reg(Class::B32);
    k.ins(format!("shl.b32 {i}, {lane}, 3;"));
    // UNROLL steps at a time while all of them are in the row, in one basic block, so their
    // loads are all in flight before the first multiply (memory-level parallelism is what
    // decode's bandwidth needs); then the rest one step at a time.
    // One step at input `at`: the gate row, and the up row with GeGLU.
    let step = |k: &mut Kernel, at: Reg| {
        dot8(
            k,
            spec.weights,
            w,
            input,
            gain_in_loop,
            col,
            at,
            spec.inputs,
            acc,
        );
        if geglu {
            dot8(
                k,
                spec.weights,
                w,
                input,
                gain_in_loop,
                up_row,
                at,
                spec.inputs,
                acc_up,
            );
        }
    };
    k.unrolled(i, spec.inputs, 256, UNROLL, &mut |k, m| {
        for u in 0..m {
            let at = k.reg(Class::B32);
            k.ins(format!("add.u32 {at}, {i}, {};", 256 * u));
            step(k, at);
        }
        k.ins(format!("add.u32 {i}, {i}, {};", 256 * m));
    });

    warp_sum(&mut k, acc);
    if geglu {
        warp_sum(&mut k, acc_up);
    }
    let norm_factor = match spec.norm {
        Some(eps) if staged => Some(staged_rms_factor(&mut k, spec.inputs, eps)),
        _ => unstaged_factor,
    };
    if let Some(r) = norm_factor {
        k.ins(format!("mul.f32 {acc}, {acc}, {r};"));
        if geglu {
            k.ins(format!("mul.f32 {acc_up}, {acc_up}, {r};"));
        }
    }
    let not_first = k.reg(Class::Pred);
    k.ins(format!("setp.ne.u32 {not_first}, {lane}, 0;"));
    k.ins(format!("@{not_first} bra {row_next};"));
    if let Some(b) = bias {
        let bv = load_f32_at(&mut k, b, col);
        k.ins(format!("add.f32 {acc}, {acc}, {bv};"));
        if geglu {
            let bu = load_f32_at(&mut k, b, up_row);
            k.ins(format!("add.f32 {acc_up}, {acc_up}, {bu};"));
        }
    }
    let value = apply_epilogue(&mut k, spec.epilogue, acc, acc_up);
    if let Some(r) = residual {
        let rv = load_f32_at(&mut k, r, col);
        k.ins(format!("add.f32 {value}, {value}, {rv};"));
    }
    let off = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {off}, {col}, 4;"));
    let p = k.reg(Class::B64);
    k.ins(format!("add.u64 {p}, {out}, {off};"));
    k.ins(format!("st.global.f32 [{p}], {value};"));
    if let Some((_, bv, bi)) = best {
        let better = k.reg(Class::Pred);
        k.ins(format!("setp.gt.f32 {better}, {value}, {bv};"));
        k.ins(format!("@{better} mov.f32 {bv}, {value};"));
        k.ins(format!("@{better} mov.u32 {bi}, {col};"));
    }
    k.place(&row_next);
    if persistent {
        k.ins(format!("add.u32 {col}, {col}, {stride};"));
        k.ins(format!("bra {row_head};"));
    }
    k.place(&done);
    if let Some((pairs, bv, bi)) = best {
        // Lane 0 of every warp, with rows or without, fills its slot.
        let slot = k.reg(Class::B32);
        k.ins(format!(
            "mad.lo.u32 {slot}, {block}, {WARPS_PER_BLOCK}, {warp};"
        ));
        let at = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {at}, {slot}, 8;"));
        k.ins(format!("add.u64 {at}, {at}, {pairs};"));
        let bits = k.reg(Class::B32);
        k.ins(format!("mov.b32 {bits}, {bv};"));
        let first = k.reg(Class::Pred);
        k.ins(format!("setp.eq.u32 {first}, {lane}, 0;"));
        k.ins(format!(
            "@{first} st.global.v2.u32 [{at}], {{{bits}, {bi}}};"
        ));
    }
    k.finish()
}

/// Bytes of each of its rows a warp asks L2 for ahead of reading them (`prefetch_rows`).
const PREFETCH_BYTES: u32 = 2048;

/// `prefetch.global.L2` of the first `PREFETCH_BYTES` of weight row `row` (and of `row +
/// width`, the up row, with GeGLU): one 128-byte line per lane. Costs no registers past its
/// own, and the loads that follow find the lines in L2 instead of waiting on DRAM.
fn prefetch_rows(k: &mut Kernel, spec: &GemvSpec, w: Reg, row: Reg, lane: Reg) {
    let row_bytes = spec.inputs * spec.weights.bytes();
    let lines = row_bytes.min(PREFETCH_BYTES).div_ceil(128);
    let skip = k.label("no_prefetch");
    k.leave_unless_below(row, spec.width, &skip);
    k.leave_unless_below(lane, lines, &skip);
    let line = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {line}, {lane}, 128;"));
    k.ins(format!("add.u64 {line}, {line}, {w};"));
    let mut rows = vec![row];
    if spec.epilogue == Epilogue::GeGlu {
        let up_row = k.reg(Class::B32);
        k.ins(format!("add.u32 {up_row}, {row}, {};", spec.width));
        rows.push(up_row);
    }
    for r in rows {
        let at = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {at}, {r}, {row_bytes};"));
        k.ins(format!("add.u64 {at}, {at}, {line};"));
        k.ins(format!("prefetch.global.L2 [{at}];"));
    }
    k.place(&skip);
}
