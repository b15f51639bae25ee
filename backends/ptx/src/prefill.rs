//! The prefill kernels: a chunk of T tokens at once, T read from a device counter (so a plan
//! sized for the largest chunk runs any shorter one).
//!
//! - `rms_norm_tokens`: one block per token, `x[t]·g/rms(x[t])` into a scratch buffer (the
//!   projection after it then reads normalised inputs).
//! - `gemm_tokens_tc`: bf16 projections on tensor cores (`mma.sync`), a block per (column
//!   block, token group); `gemm_tokens`/`gemm_tokens_split`: the CUDA-core projection for the
//!   rest (f32 weights), one warp per output column, as in decode, each 16-byte load of
//!   weights reused for `TOKEN_GROUP` tokens. Epilogues (bias, GeGLU, soft-cap, residual) per
//!   token.
//! - `rg_lru_gates_tokens` then `rg_lru_scan_tokens`: the recurrence over the chunk (gates of
//!   every token in parallel, then the sequential scan per channel).
//! - `gather_tokens`, `last_row`: the chunk's embeddings; the last token's row for generation.
//!
//! Attention over the chunk's queries is in `attention.rs`.
use crate::builder::{Class, Kernel, Reg};
use crate::gemv::{apply_epilogue, finish_rms, load_weights8, Epilogue, GemvSpec, WARPS_PER_BLOCK};
use crate::math::{combine_partials, gelu, store_warp_partial, warp_reduce, warp_sum};
use crate::rg_lru::{addr4, Storage};

/// Tokens sharing each weight load of the CUDA-core projection: a chunk streams its weights
/// T/8 times (from L2 mostly) instead of T times.
pub const TOKEN_GROUP: u32 = 8;
pub const NORM_BLOCK: u32 = 256;

/// SMs of the GPU grids are shaped for (H100 and H200 SXM).
pub(crate) const TARGET_SMS: u32 = 132;

/// The parameters of a chunk projection, in order: count `i32[1]`, x `f32[T, I]`, w, [bias],
/// [residual], one output per split part (`splits`, or the whole width).
pub(crate) struct ProjectionParams<'a> {
    pub count: Reg,
    pub x: Reg,
    /// The inputs' per-token scales (`rms_norm_tokens` with row scales), after x.
    pub scale: Option<Reg>,
    pub w: Reg,
    pub outputs: Outputs<'a>,
}

impl<'a> ProjectionParams<'a> {
    pub fn declare(
        k: &mut Kernel,
        spec: &'a GemvSpec,
        splits: &[u32],
        row_scales: bool,
    ) -> ProjectionParams<'a> {
        let count = k.param_ptr("count");
        let x = k.param_ptr("x");
        let scale = row_scales.then(|| k.param_ptr("scale"));
        let w = k.param_ptr("w");
        ProjectionParams {
            count,
            x,
            scale,
            w,
            outputs: Outputs::declare_after_weights(k, spec, splits),
        }
    }
}

impl<'a> Outputs<'a> {
    /// The parameters after a projection's weight: [bias], [residual], one output per split
    /// part.
    pub fn declare_after_weights(
        k: &mut Kernel,
        spec: &'a GemvSpec,
        splits: &[u32],
    ) -> Outputs<'a> {
        let parts = output_parts(spec, splits);
        let bias = spec.bias.then(|| k.param_ptr("bias"));
        let residual = spec.residual.then(|| k.param_ptr("residual"));
        let outs = (0..parts.len())
            .map(|i| k.param_ptr(&format!("out{i}")))
            .collect();
        Outputs {
            spec,
            parts,
            outs,
            bias,
            residual,
        }
    }
}

/// Blocks of an elementwise prefill kernel (`Kernel::grid_stride`) over up to `elements`
/// elements in blocks of `block`: one per `block` elements up to 8 per SM of the target GPU
/// (a full SM's threads), so a short chunk's launch is not thousands of blocks that leave at
/// once.
pub fn elementwise_grid(elements: u32, block: u32) -> u32 {
    elements.div_ceil(block).clamp(1, 8 * TARGET_SMS)
}

/// Blocks of `rms_norm_tokens` for chunks of up to `max_tokens`: one per token up to two per SM
/// of the target GPU, each taking every grid-th token after its own (a grid of one block per
/// token of the largest chunk would mostly leave at once for short prompts).
pub fn norm_tokens_grid(max_tokens: u32) -> u32 {
    max_tokens.min(2 * TARGET_SMS)
}

/// Parameters: count `i32[1]`, x `f32[T, I]`, gain `f32[I]`, out `f32[T, I]`, and with
/// `row_scales` scale `f32[T]`: per token the power of two 2^k (k ≥ 0) the row must be divided
/// by so that every value is below 2^15 in magnitude (f16's largest is 65504), which
/// `TcConfig::row_scales` projections undo in their epilogue. Launch: `norm_tokens_grid`
/// blocks of 256: block b normalises tokens b, b + grid, ... below the count.
pub fn rms_norm_tokens(name: &str, inputs: u32, eps: f32, row_scales: bool) -> String {
    let mut k = Kernel::new(name);
    k.shared("partial", 4 * NORM_BLOCK / 32, 16);
    let count = k.param_ptr("count");
    let x = k.param_ptr("x");
    let gain = k.param_ptr("gain");
    let out = k.param_ptr("out");
    let scale = row_scales.then(|| k.param_ptr("scale"));
    per_token(
        &mut k,
        count,
        inputs,
        &mut |k, t, row, (tid, warp, lane)| {
            let ss = k.reg(Class::F32);
            k.ins(format!("mov.f32 {ss}, 0f00000000;"));
            let i = k.reg(Class::B32);
            row_values(k, (x, row, inputs), (i, tid), &mut |k, _, _, v| {
                k.ins(format!("fma.rn.f32 {ss}, {v}, {v}, {ss};"));
            });
            warp_sum(k, ss);
            store_warp_partial(k, ss, warp, lane);
            k.ins("bar.sync 0;");
            let total = combine_partials(k, "add", NORM_BLOCK / 32);
            let r = finish_rms(k, total, inputs, eps);
            // Every warp has read the partials before the next token's overwrite them.
            k.ins("bar.sync 0;");
            let biggest = k.reg(Class::F32);
            k.ins(format!("mov.f32 {biggest}, 0f00000000;"));
            row_values(k, (x, row, inputs), (i, tid), &mut |k, i, at2, v2| {
                let ga = addr4(k, gain, i);
                let g = k.reg(Class::F32);
                k.ins(format!("ld.global.nc.f32 {g}, [{ga}];"));
                k.ins(format!("mul.f32 {v2}, {v2}, {r};"));
                k.ins(format!("mul.f32 {v2}, {v2}, {g};"));
                let oa = addr4(k, out, at2);
                k.ins(format!("st.global.f32 [{oa}], {v2};"));
                if scale.is_some() {
                    let m = k.reg(Class::F32);
                    k.ins(format!("abs.f32 {m}, {v2};"));
                    k.ins(format!("max.f32 {biggest}, {biggest}, {m};"));
                }
            });
            if let Some(scale) = scale {
                // (The sums' partials are read: the barrier above.)
                store_row_scale(k, biggest, (tid, warp, lane), scale, t);
            }
        },
    );
    k.finish()
}

/// `per_token`'s body: (kernel, token, its row's first element, (tid, warp, lane)).
type TokenBody<'a> = dyn FnMut(&mut Kernel, Reg, Reg, (Reg, Reg, Reg)) + 'a;

/// Block b takes tokens b, b + grid, ... below the count (the whole block walks the same
/// tokens, so barriers in `body` see every thread or none): `body(k, t, first element of the
/// row of `inputs`, (tid, warp, lane))`.
fn per_token(k: &mut Kernel, count: Reg, inputs: u32, body: &mut TokenBody) {
    let (tid, t) = k.thread_and_block();
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let grid = k.reg(Class::B32);
    k.ins(format!("mov.u32 {grid}, %nctaid.x;"));
    let (warp, lane) = k.warp_and_lane(tid);
    k.strided(t, n, grid, &mut |k| {
        let row = k.reg(Class::B32);
        k.ins(format!("mul.lo.u32 {row}, {t}, {inputs};"));
        body(k, t, row, (tid, warp, lane));
    });
}

/// The block's pass over a token's row (x from element `row`, `inputs` long): thread `tid`
/// takes inputs i = tid, tid + NORM_BLOCK, ... (counter `i`), loads x[row + i] and calls
/// `body(k, i, row + i, value)`.
fn row_values(
    k: &mut Kernel,
    (x, row, inputs): (Reg, Reg, u32),
    (i, tid): (Reg, Reg),
    body: &mut dyn FnMut(&mut Kernel, Reg, Reg, Reg),
) {
    k.ins(format!("mov.u32 {i}, {tid};"));
    k.strided(i, inputs, NORM_BLOCK, &mut |k| {
        let at = k.reg(Class::B32);
        k.ins(format!("add.u32 {at}, {row}, {i};"));
        let xa = addr4(k, x, at);
        let v = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {v}, [{xa}];"));
        body(k, i, at, v);
    });
}

/// Token `t`'s scale 2^k from its thread's share `biggest` of the row's largest magnitude:
/// reduced over the block (through `partial`, free when called), then k from the exponent
/// field E (values are below 2^(E - 126), so k = max(E, 141) - 141 brings them below 2^15);
/// thread 0 stores it. Ends at a barrier: the block may reuse `partial` afterwards.
fn store_row_scale(
    k: &mut Kernel,
    biggest: Reg,
    (tid, warp, lane): (Reg, Reg, Reg),
    scale: Reg,
    t: Reg,
) {
    warp_reduce(k, "max", biggest);
    store_warp_partial(k, biggest, warp, lane);
    k.ins("bar.sync 0;");
    let m = combine_partials(k, "max", NORM_BLOCK / 32);
    let bits = k.reg(Class::B32);
    k.ins(format!("mov.b32 {bits}, {m};"));
    k.ins(format!("shr.u32 {bits}, {bits}, 23;"));
    k.ins(format!("max.u32 {bits}, {bits}, 141;"));
    k.ins(format!("sub.u32 {bits}, {bits}, 14;"));
    k.ins(format!("shl.b32 {bits}, {bits}, 23;"));
    let first = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {first}, {tid}, 0;"));
    let sa = addr4(k, scale, t);
    k.ins(format!("@{first} st.global.b32 [{sa}], {bits};"));
    // Every warp has read the partials before they are written again.
    k.ins("bar.sync 0;");
}

/// Each token's scale as `rms_norm_tokens` writes it, for a row that is not a norm's output:
/// the inputs of a tensor-core projection on f16 operands whose rows nothing else scales (the
/// MLP's down projection, the output projections). Parameters: count `i32[1]`, x `f32[T, I]`,
/// scale `f32[T]`. Launch: `norm_tokens_grid` blocks of `NORM_BLOCK`.
pub fn row_scales_tokens(name: &str, inputs: u32) -> String {
    let mut k = Kernel::new(name);
    k.shared("partial", 4 * NORM_BLOCK / 32, 16);
    let count = k.param_ptr("count");
    let x = k.param_ptr("x");
    let scale = k.param_ptr("scale");
    per_token(
        &mut k,
        count,
        inputs,
        &mut |k, t, row, (tid, warp, lane)| {
            let biggest = k.reg(Class::F32);
            k.ins(format!("mov.f32 {biggest}, 0f00000000;"));
            let i = k.reg(Class::B32);
            row_values(k, (x, row, inputs), (i, tid), &mut |k, _, _, v| {
                k.ins(format!("abs.f32 {v}, {v};"));
                k.ins(format!("max.f32 {biggest}, {biggest}, {v};"));
            });
            store_row_scale(k, biggest, (tid, warp, lane), scale, t);
        },
    );
    k.finish()
}

/// Where a chunk projection's results go and what finishes them.
pub(crate) struct Outputs<'a> {
    spec: &'a GemvSpec,
    /// Output widths of the split parts, in order.
    parts: Vec<u32>,
    outs: Vec<Reg>,
    bias: Option<Reg>,
    residual: Option<Reg>,
}

/// Finishes the result of (token `t`, output column `col`) from its accumulator(s) `vals`
/// (gate and up for GeGLU) and stores it: bias, the epilogue, the residual (in the unsplit
/// layout), then the split output the column falls in.
pub(crate) fn finish_token(k: &mut Kernel, o: &Outputs, vals: Vec<Reg>, t: Reg, col: Reg) {
    finish_columns(k, o, vec![vals], t, col);
}

/// Finishes the results of token `t` at output columns `col` (even) and `col + 1` (`cols`:
/// each column's accumulators) as `finish_token` does, with one 8-byte residual load and one
/// 8-byte store for both: a warp's lanes then fill whole 32-byte sectors, where a column at a
/// time leaves half of each untouched. Split parts must have even widths (tensor-core
/// projections' are multiples of 8), so both columns fall in one.
pub(crate) fn finish_tokens(k: &mut Kernel, o: &Outputs, cols: [Vec<Reg>; 2], t: Reg, col: Reg) {
    assert!(
        o.parts.iter().all(|p| p % 2 == 0),
        "split parts of even width"
    );
    finish_columns(k, o, cols.into(), t, col);
}

/// Token `t`'s results at the adjacent columns `col`.. (one, or two in one split part), their
/// residual loaded and their results stored with one (vector) instruction each.
fn finish_columns(k: &mut Kernel, o: &Outputs, cols: Vec<Vec<Reg>>, t: Reg, col: Reg) {
    let at: Vec<Reg> = (0..cols.len())
        .map(|i| {
            if i == 0 {
                return col;
            }
            let c = k.reg(Class::B32);
            k.ins(format!("add.u32 {c}, {col}, {i};"));
            c
        })
        .collect();
    let mut values: Vec<Reg> = cols
        .into_iter()
        .zip(at)
        .map(|(vals, c)| biased_epilogue(k, o, vals, c))
        .collect();
    // `.v2` for two values, nothing for one (with `operands`).
    let shape = match values.len() {
        1 => String::new(),
        n => format!(".v{n}"),
    };
    if let Some(res) = o.residual {
        let re = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {re}, {t}, {}, {col};", o.spec.width));
        let ra = addr4(k, res, re);
        let rs: Vec<Reg> = values.iter().map(|_| k.reg(Class::F32)).collect();
        k.ins(format!("ld.global{shape}.f32 {}, [{ra}];", operands(&rs)));
        for (v, r) in values.iter_mut().zip(rs) {
            let s = k.reg(Class::F32);
            k.ins(format!("add.f32 {s}, {v}, {r};"));
            *v = s;
        }
    }
    let oa = output_address(k, o, t, col);
    k.ins(format!(
        "st.global{shape}.f32 [{oa}], {};",
        operands(&values)
    ));
}

/// Registers as a vector instruction's operand: `a` alone, or `{a, b, ...}`.
fn operands(regs: &[Reg]) -> String {
    match regs {
        [one] => one.to_string(),
        _ => format!(
            "{{{}}}",
            regs.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Output column `col`'s accumulators with its bias and the epilogue applied.
fn biased_epilogue(k: &mut Kernel, o: &Outputs, mut vals: Vec<Reg>, col: Reg) -> Reg {
    let spec = o.spec;
    if let Some(b) = o.bias {
        let mut row = col;
        for v in vals.iter_mut() {
            let ba = addr4(k, b, row);
            let bv = k.reg(Class::F32);
            k.ins(format!("ld.global.nc.f32 {bv}, [{ba}];"));
            let s = k.reg(Class::F32);
            k.ins(format!("add.f32 {s}, {v}, {bv};"));
            *v = s;
            // The up row of GeGLU.
            let up = k.reg(Class::B32);
            k.ins(format!("add.u32 {up}, {col}, {};", spec.width));
            row = up;
        }
    }
    let up = *vals.get(1).unwrap_or(&vals[0]);
    apply_epilogue(k, spec.epilogue, vals[0], up)
}

/// The address of (token `t`, output column `col`) in the split output the column falls in.
fn output_address(k: &mut Kernel, o: &Outputs, t: Reg, col: Reg) -> Reg {
    let out = k.reg(Class::B64);
    k.ins(format!("mov.u64 {out}, {};", o.outs[0]));
    let stride = k.reg(Class::B32);
    k.ins(format!("mov.u32 {stride}, {};", o.parts[0]));
    let ocol = k.reg(Class::B32);
    k.ins(format!("mov.u32 {ocol}, {col};"));
    let mut boundary = 0;
    for (i, part) in o.parts.iter().enumerate().skip(1) {
        boundary += o.parts[i - 1];
        let past = k.reg(Class::Pred);
        k.ins(format!("setp.ge.u32 {past}, {col}, {boundary};"));
        k.ins(format!("@{past} mov.u64 {out}, {};", o.outs[i]));
        k.ins(format!("@{past} mov.u32 {stride}, {part};"));
        k.ins(format!("@{past} sub.u32 {ocol}, {col}, {boundary};"));
    }
    let oe = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {oe}, {t}, {stride}, {ocol};"));
    addr4(k, out, oe)
}

/// Parameters: count `i32[1]`, x `f32[T, I]`, w `[rows, I]`, [bias `f32[rows]`], [residual
/// `f32[T, width]`], out `f32[T, width]`. Launch: `ceil(width / 8)` blocks of 256 (as decode).
/// `spec.norm` must be None: run `rms_norm_tokens` first.
pub fn gemm_tokens(spec: &GemvSpec) -> String {
    gemm_tokens_split(spec, &[])
}

/// The widths of a projection's outputs: `splits` (which must cover the width), or the whole
/// width as one output.
fn output_parts(spec: &GemvSpec, splits: &[u32]) -> Vec<u32> {
    if splits.is_empty() {
        return vec![spec.width];
    }
    assert_eq!(
        splits.iter().sum::<u32>(),
        spec.width,
        "splits cover the width"
    );
    splits.to_vec()
}

/// `gemm_tokens` writing column blocks to separate outputs `[T, part]` (q/k/v, x/y): one `out`
/// parameter per part, in order. `splits` empty means one output.
pub fn gemm_tokens_split(spec: &GemvSpec, splits: &[u32]) -> String {
    assert!(spec.inputs % 8 == 0, "inputs must be a multiple of 8");
    assert!(spec.norm.is_none(), "normalise with rms_norm_tokens first");
    let mut k = Kernel::new(&spec.name);
    let ProjectionParams {
        count,
        x,
        w,
        outputs,
        ..
    } = ProjectionParams::declare(&mut k, spec, splits, false);
    let inputs = spec.inputs;
    let geglu = spec.epilogue == Epilogue::GeGlu;

    let (tid, block) = k.thread_and_block();
    let (warp, lane) = k.warp_and_lane(tid);
    let col = k.reg(Class::B32);
    k.ins(format!(
        "mad.lo.u32 {col}, {block}, {WARPS_PER_BLOCK}, {warp};"
    ));
    let done = k.label("done");
    let outside = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {outside}, {col}, {};", spec.width));
    k.ins(format!("@{outside} bra {done};"));
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let rows: Vec<Reg> = if geglu {
        let up = k.reg(Class::B32);
        k.ins(format!("add.u32 {up}, {col}, {};", spec.width));
        vec![col, up]
    } else {
        vec![col]
    };

    // Token groups: t0 = 0, 8, 16, … < n; tokens past n compute on row n-1's inputs (a valid
    // address) and are not stored.
    let t0 = k.reg(Class::B32);
    k.ins(format!("mov.u32 {t0}, 0;"));
    k.strided(t0, n, TOKEN_GROUP, &mut |k| {
        let last = k.reg(Class::B32);
        k.ins(format!("sub.u32 {last}, {n}, 1;"));
        let toks: Vec<Reg> = (0..TOKEN_GROUP)
            .map(|j| {
                let t = k.reg(Class::B32);
                k.ins(format!("add.u32 {t}, {t0}, {j};"));
                k.ins(format!("min.u32 {t}, {t}, {last};"));
                t
            })
            .collect();
        let accs: Vec<Vec<Reg>> = rows
            .iter()
            .map(|_| {
                (0..TOKEN_GROUP)
                    .map(|_| {
                        let a = k.reg(Class::F32);
                        k.ins(format!("mov.f32 {a}, 0f00000000;"));
                        a
                    })
                    .collect()
            })
            .collect();
        let i = k.reg(Class::B32);
        k.ins(format!("shl.b32 {i}, {lane}, 3;"));
        k.strided(i, inputs, 256, &mut |k| {
            let ws: Vec<Vec<Reg>> = rows
                .iter()
                .map(|&r| {
                    let elem = k.reg(Class::B32);
                    k.ins(format!("mad.lo.u32 {elem}, {r}, {inputs}, {i};"));
                    load_weights8(k, spec.weights, w, elem)
                })
                .collect();
            for (j, &t) in toks.iter().enumerate() {
                let xe = k.reg(Class::B32);
                k.ins(format!("mad.lo.u32 {xe}, {t}, {inputs}, {i};"));
                let xp = addr4(k, x, xe);
                let xs: Vec<Reg> = (0..8).map(|_| k.reg(Class::F32)).collect();
                for (half, regs) in xs.chunks(4).enumerate() {
                    k.ins(format!(
                        "ld.global.v4.f32 {{{}, {}, {}, {}}}, [{xp}+{}];",
                        regs[0],
                        regs[1],
                        regs[2],
                        regs[3],
                        16 * half
                    ));
                }
                for (r, wr) in ws.iter().enumerate() {
                    for (wv, xv) in wr.iter().zip(&xs) {
                        let a = accs[r][j];
                        k.ins(format!("fma.rn.f32 {a}, {wv}, {xv}, {a};"));
                    }
                }
            }
        });
        for row_accs in &accs {
            for &a in row_accs {
                warp_sum(k, a);
            }
        }
        // Lane 0 finishes each token of the group that exists.
        let lane_other = k.reg(Class::Pred);
        k.ins(format!("setp.ne.u32 {lane_other}, {lane}, 0;"));
        let next = k.label("next_group");
        k.ins(format!("@{lane_other} bra {next};"));
        for j in 0..TOKEN_GROUP as usize {
            let skip = k.label("skip");
            let t = k.reg(Class::B32);
            k.ins(format!("add.u32 {t}, {t0}, {j};"));
            let beyond = k.reg(Class::Pred);
            k.ins(format!("setp.ge.u32 {beyond}, {t}, {n};"));
            k.ins(format!("@{beyond} bra {skip};"));
            let vals: Vec<Reg> = accs.iter().map(|ra| ra[j]).collect();
            finish_token(k, &outputs, vals, t, col);
            k.place(&skip);
        }
        k.place(&next);
    });
    k.place(&done);
    k.finish()
}

/// Tokens whose gates one block of `rg_lru_gates_tokens` computes (each gate weight it loads
/// serves that many): 32, fewer (a multiple of 4) where the block's conv outputs for 32 tokens
/// would not fit in 48 KiB of static shared memory (gate blocks of more than 384 channels; 12
/// for 1024). The 2B shape reads its 2.6 MB of gate matrices 16 times per 512-token chunk.
pub fn gate_tokens(s: &crate::rg_lru::RgLruSpec) -> u32 {
    let b = crate::rg_lru::block_size(s);
    (48 * 1024 / (4 * b)).clamp(4, 32) / 4 * 4
}

/// Segments of the chunk `rg_lru_scan_tokens` scans in parallel, a warp each.
pub const SCAN_SEGMENTS: u32 = 16;

/// Threads per block of `rg_lru_scan_tokens`: 32 channels (lanes) by `SCAN_SEGMENTS` segments
/// (warps).
pub const SCAN_BLOCK: u32 = 32 * SCAN_SEGMENTS;

/// Tokens per unrolled step of `rg_lru_scan_tokens`' passes over a segment: their loads do not
/// depend on h, so each step waits for memory once.
pub const SCAN_UNROLL: u32 = 16;

/// Blocks of `rg_lru_gates_tokens` for a chunk of up to `max_tokens`: one per (token group,
/// gate block).
pub fn rg_lru_gates_grid(s: &crate::rg_lru::RgLruSpec, max_tokens: u32) -> u32 {
    max_tokens.div_ceil(gate_tokens(s)) * s.blocks
}

/// Blocks of `rg_lru_scan_tokens`: one per 32 channels.
pub fn rg_lru_scan_grid(s: &crate::rg_lru::RgLruSpec) -> u32 {
    s.channels.div_ceil(32)
}

/// Channel j's input `back` positions before the chunk's token t (at position p): x[t - back]
/// when that is in the chunk, else the window's ring row of position p - back
/// (`rg_lru::ring_row`; any row when that position is before the text, whose taps count zero).
#[allow(clippy::too_many_arguments)]
fn rg_input(
    k: &mut Kernel,
    x: Reg,
    window: Reg,
    j: Reg,
    t: Reg,
    p: Reg,
    back: u32,
    c: u32,
    kk: u32,
) -> Reg {
    let s = k.reg(Class::B32);
    k.ins(format!("sub.u32 {s}, {t}, {back};"));
    let from_x = k.reg(Class::Pred);
    k.ins(format!("setp.ge.s32 {from_x}, {s}, 0;"));
    let xi = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {xi}, {s}, {c}, {j};"));
    let wi = crate::rg_lru::ring_row(k, p, back, kk);
    k.ins(format!("mad.lo.u32 {wi}, {wi}, {c}, {j};"));
    let idx = k.reg(Class::B32);
    k.ins(format!("selp.b32 {idx}, {xi}, {wi}, {from_x};"));
    let base = k.reg(Class::B64);
    k.ins(format!("selp.b64 {base}, {x}, {window}, {from_x};"));
    let at = addr4(k, base, idx);
    let v = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {v}, [{at}];"));
    v
}

/// Adds channel j's conv taps (`taps[k]` weighs the input K-1-k positions back) of the chunk's
/// token t, at position p, into `acc`; taps before the document's first position read nothing
/// (zero padding).
#[allow(clippy::too_many_arguments)]
fn add_conv_taps(
    k: &mut Kernel,
    acc: Reg,
    taps: &[Reg],
    x: Reg,
    window: Reg,
    j: Reg,
    t: Reg,
    p: Reg,
    c: u32,
) {
    let kk = taps.len() as u32;
    for (tap, w) in taps.iter().enumerate() {
        let back = kk - 1 - tap as u32;
        let v = rg_input(k, x, window, j, t, p, back, c, kk);
        let valid = k.reg(Class::Pred);
        k.ins(format!("setp.ge.s32 {valid}, {p}, {back};"));
        k.ins(format!("@{valid} fma.rn.f32 {acc}, {w}, {v}, {acc};"));
    }
}

/// The RG-LRU's temporal convolution over a chunk, alone (where `rg_lru_gates_tc` then takes
/// the gates on tensor cores): `conv[t, j] = bias[j] + Σ_k w[j, k] · x[t - (K-1-k), j]`, inputs
/// before the chunk from the window's ring, taps before the document's first position zero.
/// The window is only read.
///
/// Parameters: count `i32[1]`, x `f32[T, C]`, start `i32[1]`, window `f32[K, C]` (a ring), conv
/// w `[C, K]`, conv bias, conv `f32[T, C]`. Launch: `elementwise_grid(T_max · C, NORM_BLOCK)`
/// blocks of `NORM_BLOCK`.
pub fn rg_lru_conv_tokens(s: &crate::rg_lru::RgLruSpec) -> String {
    use crate::rg_lru::load_weight;
    let (c, kk) = (s.channels, s.width);
    let mut k = Kernel::new(&s.name);
    let count = k.param_ptr("count");
    let x = k.param_ptr("x");
    let start = k.param_ptr("start");
    let window = k.param_ptr("window");
    let conv_w = k.param_ptr("conv_w");
    let conv_b = k.param_ptr("conv_b");
    let out = k.param_ptr("conv");
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let p0 = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {p0}, [{start}];"));
    let elements = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {elements}, {n}, {c};"));
    k.grid_stride(NORM_BLOCK, elements, &mut |k, e, _| {
        let (t, j) = (k.reg(Class::B32), k.reg(Class::B32));
        k.ins(format!("div.u32 {t}, {e}, {c};"));
        k.ins(format!("rem.u32 {j}, {e}, {c};"));
        let p = k.reg(Class::B32);
        k.ins(format!("add.u32 {p}, {p0}, {t};"));
        let acc = load_weight(k, s.conv, conv_b, j);
        let taps: Vec<Reg> = (0..kk)
            .map(|tap| {
                let wi = k.reg(Class::B32);
                k.ins(format!("mad.lo.u32 {wi}, {j}, {kk}, {tap};"));
                load_weight(k, s.conv, conv_w, wi)
            })
            .collect();
        add_conv_taps(k, acc, &taps, x, window, j, t, p, c);
        let oa = addr4(k, out, e);
        k.ins(format!("st.global.f32 [{oa}], {acc};"));
    });
    k.finish()
}

/// The RG-LRU over a chunk, first half: everything that does not depend on the recurrence,
/// for all tokens at once. The gates depend only on each token's conv output, so they need not
/// wait for the scan: one block per (group of `gate_tokens` tokens, gate block), one thread
/// per channel of the block. The block's conv outputs go to shared memory ([channel][token], so
/// one 16-byte load gives four tokens), then each thread runs both gates of its channel for the
/// group's tokens (each gate weight loaded once for the group), and writes the scan's
/// coefficients: `h_t = a_t · h_{t-1} + b_t` (reset at position 0). The window is only read.
///
/// Parameters: count `i32[1]`, x `f32[T, C]`, start `i32[1]`, window `f32[K, C]` (a ring), conv w
/// `[C, K]`, conv bias, input-gate w `[H, B, B]`, input-gate bias, recurrent-gate w,
/// recurrent-gate bias, decay `f32[C]`, a `f32[T, C]`, b `f32[T, C]`. Launch:
/// `rg_lru_gates_grid` blocks of C/H threads.
pub fn rg_lru_gates_tokens(s: &crate::rg_lru::RgLruSpec) -> String {
    use crate::rg_lru::{block_size, gated_input, load_weight, RgLruWeights};
    let b = block_size(s);
    let (c, kk, tt) = (s.channels, s.width, gate_tokens(s));
    let mut k = Kernel::new(&s.name);
    // C/H threads: past 256 (gate blocks wider than 256 channels) only launch bounds keep
    // ptxas within the block's registers.
    k.launch_bounds(b, 1);
    k.shared("conv_out", 4 * b * tt, 16);
    let count = k.param_ptr("count");
    let x = k.param_ptr("x");
    let start = k.param_ptr("start");
    let RgLruWeights {
        window,
        conv_w,
        conv_b,
        igw,
        igb,
        rgw,
        rgb,
        decay,
    } = RgLruWeights::declare(&mut k);
    let a_out = k.param_ptr("a");
    let b_out = k.param_ptr("b");

    let (jj, blk) = k.thread_and_block();
    let (group, h) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("div.u32 {group}, {blk}, {};", s.blocks));
    k.ins(format!("rem.u32 {h}, {blk}, {};", s.blocks));
    let j = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {j}, {h}, {b}, {jj};"));
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let t0 = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {t0}, {group}, {tt};"));
    let done = k.label("done");
    // Whole blocks leave together: the barrier below sees every thread or none.
    k.leave_unless_below(t0, n, &done);
    let p0 = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {p0}, [{start}];"));
    let rate = load_weight(&mut k, Storage::F32, decay, j);
    let bias = load_weight(&mut k, s.conv, conv_b, j);
    let taps: Vec<Reg> = (0..kk)
        .map(|tap| {
            let wi = k.reg(Class::B32);
            k.ins(format!("mad.lo.u32 {wi}, {j}, {kk}, {tap};"));
            load_weight(&mut k, s.conv, conv_w, wi)
        })
        .collect();
    let sh = k.reg(Class::B64);
    k.ins(format!("mov.u64 {sh}, conv_out;"));
    // This channel's column of conv outputs: conv_out[jj][0..tt].
    let mine = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {mine}, {jj}, {};", 4 * tt));
    k.ins(format!("add.u64 {mine}, {mine}, {sh};"));

    // Conv of each token of the group (zero past the chunk's end).
    for u in 0..tt {
        let t = k.reg(Class::B32);
        k.ins(format!("add.u32 {t}, {t0}, {u};"));
        let acc = k.reg(Class::F32);
        k.ins(format!("mov.f32 {acc}, 0f00000000;"));
        let skip = k.label("past_end");
        k.leave_unless_below(t, n, &skip);
        k.ins(format!("mov.f32 {acc}, {bias};"));
        let p = k.reg(Class::B32);
        k.ins(format!("add.u32 {p}, {p0}, {t};"));
        add_conv_taps(&mut k, acc, &taps, x, window, j, t, p, c);
        k.place(&skip);
        k.ins(format!("st.shared.f32 [{mine}+{}], {acc};", 4 * u));
    }
    k.ins("bar.sync 0;");

    // Both gates for every token of the group: z[u] = bias + Σ_i conv[i][u] · W[h][i][jj].
    let zx: Vec<Reg> = (0..tt).map(|_| k.reg(Class::F32)).collect();
    let zr: Vec<Reg> = (0..tt).map(|_| k.reg(Class::F32)).collect();
    let bx = load_weight(&mut k, Storage::F32, igb, j);
    let br = load_weight(&mut k, Storage::F32, rgb, j);
    for (x_acc, r_acc) in zx.iter().zip(&zr) {
        k.ins(format!("mov.f32 {x_acc}, {bx};"));
        k.ins(format!("mov.f32 {r_acc}, {br};"));
    }
    let wi = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {wi}, {h}, {}, {jj};", b * b));
    let shi = k.reg(Class::B64);
    k.ins(format!("mov.u64 {shi}, {sh};"));
    let i = k.reg(Class::B32);
    k.ins(format!("mov.u32 {i}, 0;"));
    let gates = k.label("gates");
    k.place(&gates);
    let wx = load_weight(&mut k, s.gates, igw, wi);
    let wr = load_weight(&mut k, s.gates, rgw, wi);
    for quad in 0..tt / 4 {
        let cs: Vec<Reg> = (0..4).map(|_| k.reg(Class::F32)).collect();
        k.ins(format!(
            "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [{shi}+{}];",
            cs[0],
            cs[1],
            cs[2],
            cs[3],
            16 * quad
        ));
        for (q, cv) in cs.iter().enumerate() {
            let u = (4 * quad) as usize + q;
            k.ins(format!("fma.rn.f32 {}, {cv}, {wx}, {};", zx[u], zx[u]));
            k.ins(format!("fma.rn.f32 {}, {cv}, {wr}, {};", zr[u], zr[u]));
        }
    }
    k.ins(format!("add.u32 {wi}, {wi}, {b};"));
    k.ins(format!("add.u64 {shi}, {shi}, {};", 4 * tt));
    k.ins(format!("add.u32 {i}, {i}, 1;"));
    let more = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {more}, {i}, {b};"));
    k.ins(format!("@{more} bra {gates};"));

    // The scan's coefficients of each token in the chunk.
    for u in 0..tt {
        let t = k.reg(Class::B32);
        k.ins(format!("add.u32 {t}, {t0}, {u};"));
        k.leave_unless_below(t, n, &done);
        let cv = k.reg(Class::F32);
        k.ins(format!("ld.shared.f32 {cv}, [{mine}+{}];", 4 * u));
        let p = k.reg(Class::B32);
        k.ins(format!("add.u32 {p}, {p0}, {t};"));
        let (a, bv) = gated_input(&mut k, zx[u as usize], zr[u as usize], rate, cv, p);
        let oi = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {oi}, {t}, {c}, {j};"));
        let aa = addr4(&mut k, a_out, oi);
        k.ins(format!("st.global.f32 [{aa}], {a};"));
        let ba = addr4(&mut k, b_out, oi);
        k.ins(format!("st.global.f32 [{ba}], {bv};"));
    }
    k.place(&done);
    k.finish()
}

/// The RG-LRU over a chunk, second half: the scan `h_t = a_t · h_{t-1} + b_t`, the output
/// gate `h_t · gelu(y_t)`, the state, and the window's ring takes the chunk's last K-1 inputs
/// (after the gates kernel has read it).
///
/// The recurrence is a chain per channel, so a thread walking all T tokens waits on memory
/// T / `SCAN_UNROLL` times in a row (32 for 512 tokens), and a thread per channel gives the 2B
/// shape's 2560 channels only 80 warps to hide it. So a block takes 32
/// channels (lanes) and cuts the chunk into `SCAN_SEGMENTS` segments (warps): each thread first
/// composes its segment's steps into one affine map `h ↦ A·h + B` (A = Π a_t, B the segment's
/// scan from 0), the block shares the maps through shared memory, each thread then starts
/// from the state composed through the segments before its own, and walks its segment again,
/// writing every h_t. Two passes of T/16 tokens each instead of one of T, and 16 times the
/// warps (1280 for the 2B shape, on 80 SMs).
///
/// Parameters: count `i32[1]`, x `f32[T, C]`, start `i32[1]`, window `f32[K, C]` (a ring),
/// state `f32[C]`, a, b `f32[T, C]`, [y `f32[T, C]`], out `f32[T, C]`. Launch:
/// `rg_lru_scan_grid` blocks of `SCAN_BLOCK`.
pub fn rg_lru_scan_tokens(s: &crate::rg_lru::RgLruSpec) -> String {
    let (c, kk) = (s.channels, s.width);
    let mut k = Kernel::new(&s.name);
    k.launch_bounds(SCAN_BLOCK, 1);
    // Each segment's map (A, B) for the block's 32 channels: [segment][lane].
    k.shared("maps", 8 * SCAN_BLOCK, 16);
    let count = k.param_ptr("count");
    let x = k.param_ptr("x");
    let start = k.param_ptr("start");
    let window = k.param_ptr("window");
    let state = k.param_ptr("state");
    let a_in = k.param_ptr("a");
    let b_in = k.param_ptr("b");
    let y = s.gate_output.then(|| k.param_ptr("y"));
    let out = k.param_ptr("out");
    let (tid, blk) = k.thread_and_block();
    let (segment, lane) = k.warp_and_lane(tid);
    // Channel j; lanes past the last channel compute the last one again and store nothing
    // (every thread must reach the barrier).
    let j = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {j}, {blk}, 32, {lane};"));
    let mine = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {mine}, {j}, {c};"));
    k.ins(format!("min.u32 {j}, {j}, {};", c - 1));
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    // Segments of ceil(n / SCAN_SEGMENTS) tokens: this one's [t0, t1).
    let len = k.reg(Class::B32);
    k.ins(format!("add.u32 {len}, {n}, {};", SCAN_SEGMENTS - 1));
    k.ins(format!("div.u32 {len}, {len}, {SCAN_SEGMENTS};"));
    let (t0, t1) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("mul.lo.u32 {t0}, {segment}, {len};"));
    k.ins(format!("min.u32 {t0}, {t0}, {n};"));
    k.ins(format!("add.u32 {t1}, {t0}, {len};"));
    k.ins(format!("min.u32 {t1}, {t1}, {n};"));
    // The carried state, read before the barrier (warp 0 rewrites it after).
    let st_at = addr4(&mut k, state, j);
    let h0 = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {h0}, [{st_at}];"));

    // Element (token t, channel j) of a [T, C] tensor.
    let at = |k: &mut Kernel, t: Reg, u: u32| {
        let oi = k.reg(Class::B32);
        k.ins(format!("add.u32 {oi}, {t}, {u};"));
        k.ins(format!("mad.lo.u32 {oi}, {oi}, {c}, {j};"));
        oi
    };
    let load = |k: &mut Kernel, base: Reg, oi: Reg| {
        let v = k.reg(Class::F32);
        let va = addr4(k, base, oi);
        k.ins(format!("ld.global.f32 {v}, [{va}];"));
        v
    };
    // First pass: the segment's map, A = Π a_t and B = its scan from h = 0.
    let (big_a, big_b) = (k.reg(Class::F32), k.reg(Class::F32));
    k.ins(format!("mov.f32 {big_a}, 0f3F800000;"));
    k.ins(format!("mov.f32 {big_b}, 0f00000000;"));
    let t = k.reg(Class::B32);
    k.ins(format!("mov.u32 {t}, {t0};"));
    k.unrolled(t, t1, 1, SCAN_UNROLL, &mut |k, m| {
        let loaded: Vec<(Reg, Reg)> = (0..m)
            .map(|u| {
                let oi = at(k, t, u);
                (load(k, a_in, oi), load(k, b_in, oi))
            })
            .collect();
        for (av, bv) in loaded {
            k.ins(format!("mul.f32 {big_a}, {big_a}, {av};"));
            k.ins(format!("fma.rn.f32 {big_b}, {av}, {big_b}, {bv};"));
        }
        k.ins(format!("add.u32 {t}, {t}, {m};"));
    });
    let maps = k.reg(Class::B64);
    k.ins(format!("mov.u64 {maps}, maps;"));
    let mine_at = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {mine_at}, {tid}, 8;"));
    k.ins(format!("add.u64 {mine_at}, {mine_at}, {maps};"));
    k.ins(format!(
        "st.shared.v2.f32 [{mine_at}], {{{big_a}, {big_b}}};"
    ));
    k.ins("bar.sync 0;");

    // h = the carried state through the maps of segments 0 .. `segments` (this lane's
    // channel).
    let h = k.reg(Class::F32);
    let sg = k.reg(Class::B32);
    let lane_at = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {lane_at}, {lane}, 8;"));
    k.ins(format!("add.u64 {lane_at}, {lane_at}, {maps};"));
    let compose = |k: &mut Kernel, segments: String| {
        k.ins(format!("mov.f32 {h}, {h0};"));
        k.ins(format!("mov.u32 {sg}, 0;"));
        k.strided(sg, segments, 1, &mut |k| {
            let ma = k.reg(Class::B64);
            k.ins(format!("mul.wide.u32 {ma}, {sg}, 256;"));
            k.ins(format!("add.u64 {ma}, {ma}, {lane_at};"));
            let (sa, sb) = (k.reg(Class::F32), k.reg(Class::F32));
            k.ins(format!("ld.shared.v2.f32 {{{sa}, {sb}}}, [{ma}];"));
            k.ins(format!("fma.rn.f32 {h}, {sa}, {h}, {sb};"));
        });
    };
    // The state entering this segment: through every earlier segment's map.
    compose(&mut k, segment.to_string());

    // Second pass: every h_t of the segment, gated, stored.
    k.ins(format!("mov.u32 {t}, {t0};"));
    k.unrolled(t, t1, 1, SCAN_UNROLL, &mut |k, m| {
        let loaded: Vec<(Reg, Reg, Reg, Option<Reg>)> = (0..m)
            .map(|u| {
                let oi = at(k, t, u);
                let (av, bv) = (load(k, a_in, oi), load(k, b_in, oi));
                let yv = y.map(|y| load(k, y, oi));
                (oi, av, bv, yv)
            })
            .collect();
        for (oi, av, bv, yv) in loaded {
            k.ins(format!("fma.rn.f32 {h}, {av}, {h}, {bv};"));
            let o = match yv {
                Some(yv) => {
                    let g = gelu(k, yv);
                    let v = k.reg(Class::F32);
                    k.ins(format!("mul.f32 {v}, {h}, {g};"));
                    v
                }
                None => h,
            };
            let oa = addr4(k, out, oi);
            k.ins(format!("@{mine} st.global.f32 [{oa}], {o};"));
        }
        k.ins(format!("add.u32 {t}, {t}, {m};"));
    });

    // Warp 0: the new state (through every segment's map) and the window's ring.
    let done = k.label("done");
    k.leave_unless_below(segment, 1, &done);
    k.ins(format!("@!{mine} bra {done};"));
    compose(&mut k, SCAN_SEGMENTS.to_string());
    k.ins(format!("st.global.f32 [{st_at}], {h};"));
    // The chunk's last K-1 inputs into their ring rows (inputs from before the chunk are
    // there already). The gates kernel has read the ring.
    let p0 = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {p0}, [{start}];"));
    for r in 0..kk.saturating_sub(1) {
        let so = k.reg(Class::B32);
        k.ins(format!("sub.u32 {so}, {n}, {};", kk - 1 - r));
        let before = k.reg(Class::Pred);
        k.ins(format!("setp.lt.s32 {before}, {so}, 0;"));
        let skip = k.label("kept");
        k.ins(format!("@{before} bra {skip};"));
        let xi = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {xi}, {so}, {c}, {j};"));
        let xa = addr4(&mut k, x, xi);
        let v = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {v}, [{xa}];"));
        let p = k.reg(Class::B32);
        k.ins(format!("add.u32 {p}, {p0}, {so};"));
        let row = crate::rg_lru::ring_row(&mut k, p, 0, kk);
        let idx = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {idx}, {row}, {c}, {j};"));
        let at = addr4(&mut k, window, idx);
        k.ins(format!("st.global.f32 [{at}], {v};"));
        k.place(&skip);
    }
    k.place(&done);
    k.finish()
}

/// Prefill embedding gather: `out[t] = table[ids[t]] · scale` for t < count. Parameters:
/// count `i32[1]`, table `[V, D]`, ids `i32[T]`, out `f32[T, D]`. Launch:
/// `ceil(T_max·D / 256)` blocks of 256.
pub fn gather_tokens(
    name: &str,
    width: u32,
    max_tokens: u32,
    table: Storage,
    scale: Option<f32>,
) -> String {
    use crate::rg_lru::load_weight;
    assert!(max_tokens.checked_mul(width).is_some(), "chunk too large");
    let mut k = Kernel::new(name);
    let count = k.param_ptr("count");
    let tab = k.param_ptr("table");
    let ids = k.param_ptr("ids");
    let out = k.param_ptr("out");
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    let elements = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {elements}, {n}, {width};"));
    k.grid_stride(NORM_BLOCK, elements, &mut |k, e, _| {
        let (t, c) = (k.reg(Class::B32), k.reg(Class::B32));
        k.ins(format!("div.u32 {t}, {e}, {width};"));
        k.ins(format!("rem.u32 {c}, {e}, {width};"));
        let ia = addr4(k, ids, t);
        let id = k.reg(Class::B32);
        k.ins(format!("ld.global.u32 {id}, [{ia}];"));
        let at = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {at}, {id}, {width}, {c};"));
        let v = load_weight(k, table, tab, at);
        if let Some(sc) = scale {
            k.ins(format!("mul.f32 {v}, {v}, {};", Kernel::f32_imm(sc)));
        }
        let oa = addr4(k, out, e);
        k.ins(format!("st.global.f32 [{oa}], {v};"));
    });
    k.finish()
}

/// Copies row `count - 1` of `x [T, D]` to `out [D]`: generation needs the logits of a chunk's
/// last token only, so its projection runs as one decode-style GEMV on this row. Parameters:
/// count `i32[1]`, x, out. Launch: `ceil(D / 256)` blocks of 256.
pub fn last_row(name: &str, width: u32) -> String {
    let mut k = Kernel::new(name);
    let count = k.param_ptr("count");
    let x = k.param_ptr("x");
    let out = k.param_ptr("out");
    let c = k.global_index(NORM_BLOCK);
    let done = k.label("done");
    let outside = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {outside}, {c}, {width};"));
    k.ins(format!("@{outside} bra {done};"));
    let n = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {n}, [{count}];"));
    k.ins(format!("sub.u32 {n}, {n}, 1;"));
    let at = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {at}, {n}, {width}, {c};"));
    let xa = addr4(&mut k, x, at);
    let v = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {v}, [{xa}];"));
    let oa = addr4(&mut k, out, c);
    k.ins(format!("st.global.f32 [{oa}], {v};"));
    k.place(&done);
    k.finish()
}
