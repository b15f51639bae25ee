//! The projection kernel: `x·wᵀ + b`, GeGLU or soft-cap epilogue, residual add, columns
//! written to split outputs, over a weight packed in blocks of output rows
//! (`griffin_runtime::plan::Layout::Blocked`). Threads split the blocks; a block's weights are
//! streamed once per group of tokens (the tile's `tokens`), and every weight vector loaded is
//! used for each token of the group, every input value broadcast to each panel of the block.

use griffin_ir::Epilogue;
use griffin_runtime::plan::{Layout, PANEL};

use crate::ll::{f32_const, Func, Storage};

/// The register tile of the projection kernel: `panels` 16-lane vectors of output rows ×
/// `tokens` tokens of accumulators (the weight vectors and broadcast inputs live beside them).
/// Chosen by the target's vector registers (`TargetCpu::tile`); measured with
/// `cargo bench -p griffin-backend-cpu --bench prefill_matmul` (see docs/benchmarks.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub panels: u64,
    pub tokens: u64,
}

impl Tile {
    /// 32 vector registers of 512 bits (AVX-512): 4 panels × 4 tokens = 16 accumulators
    /// (4 × 6 spills the bf16 kernel's widened weights).
    pub const WIDE: Tile = Tile {
        panels: 4,
        tokens: 4,
    };
    /// 16 registers of 256 bits (AVX2; a 16-lane vector takes two): 1 panel × 6 tokens.
    pub const NARROW: Tile = Tile {
        panels: 1,
        tokens: 6,
    };
    /// 16 registers of 128 bits (SSE2; four per 16-lane vector): 1 panel × 3 tokens.
    pub const BASELINE: Tile = Tile {
        panels: 1,
        tokens: 3,
    };
}

pub struct LinearSpec {
    pub symbol: String,
    pub inputs: u64,
    /// Rows of the weight (twice the output width with GeGLU).
    pub rows: u64,
    pub weight: Storage,
    pub bias: Option<Storage>,
    pub epilogue: Epilogue,
    pub residual: bool,
    /// Output column blocks; one entry covering everything when unsplit.
    pub splits: Vec<u64>,
    pub tile: Tile,
}

impl LinearSpec {
    /// How the kernel expects its weight packed.
    pub fn layout(&self) -> Layout {
        Layout::Blocked {
            rows: self.rows,
            cols: self.inputs,
            panels: self.tile.panels,
            geglu: self.epilogue == Epilogue::GeGlu,
        }
    }
}

const VF: &str = "<16 x float>";
const VI: &str = "<16 x i32>";

/// The constant `<16 x i32>` with `v` in every lane.
fn lanes(v: i32) -> String {
    format!("<{}>", vec![format!("i32 {v}"); 16].join(", "))
}

/// `x` in all 16 lanes.
fn splat(f: &mut Func, x: &str) -> String {
    let one = f.op(format!("insertelement {VF} poison, float {x}, i64 0"));
    f.op(format!(
        "shufflevector {VF} {one}, {VF} poison, <16 x i32> zeroinitializer"
    ))
}

/// Arguments: x `[T, inputs]`, weight (blocked), [bias `[rows]`], [residual `[T, width]`], one
/// output per split.
pub fn linear(s: &LinearSpec) -> String {
    assert_eq!(PANEL, 16, "the kernel's vectors are 16 lanes");
    let mut f = Func::new(&s.symbol);
    let mut next = 0;
    let mut arg = |f: &mut Func| {
        next += 1;
        f.arg(next - 1)
    };
    let x = arg(&mut f);
    let w = arg(&mut f);
    let bias = s.bias.map(|_| arg(&mut f));
    let residual = s.residual.then(|| arg(&mut f));
    let outs: Vec<String> = s.splits.iter().map(|_| arg(&mut f)).collect();
    let geglu = s.epilogue == Epilogue::GeGlu;
    let width = if geglu { s.rows / 2 } else { s.rows };
    let panels = s.tile.panels;
    let block_rows = Layout::block_rows(panels);
    let kp = Layout::padded_cols(s.inputs, s.weight);
    let block_elems = block_rows * kp;
    // Weight blocks per block of output columns: the gate's and the up's with GeGLU.
    let parts: u64 = if geglu { 2 } else { 1 };
    let blocks = s.layout().elements(s.rows * s.inputs, s.weight) / block_elems / parts;
    let inputs = s.inputs.to_string();
    let part_stride = s.tile.tokens * block_rows;
    let tile = f.alloca(&format!("[{} x float]", parts * part_stride));

    // Where output column c goes: the split it falls in, its row stride and its column there.
    let route = |f: &mut Func, c: &str| -> (String, String, String) {
        let (mut dest, mut stride, mut col) =
            (outs[0].clone(), s.splits[0].to_string(), c.to_string());
        let mut boundary = 0;
        for (k, &n) in s.splits.iter().enumerate().skip(1) {
            boundary += s.splits[k - 1];
            let past = f.op(format!("icmp sge i64 {c}, {boundary}"));
            dest = f.op(format!("select i1 {past}, ptr {}, ptr {dest}", outs[k]));
            stride = f.op(format!("select i1 {past}, i64 {n}, i64 {stride}"));
            let shifted = f.ibin("sub", c, &boundary.to_string());
            col = f.op(format!("select i1 {past}, i64 {shifted}, i64 {col}"));
        }
        (dest, stride, col)
    };

    // Output column c of token t from its accumulated dot products (`acc`, and `up` with
    // GeGLU, whose gate is `acc`): bias, epilogue, residual, store.
    let finish = |f: &mut Func, t: &str, c: &str, acc: &str, up: Option<&str>| {
        let with_bias = |f: &mut Func, v: &str, row: &str| -> String {
            match (s.bias, &bias) {
                (Some(storage), Some(b)) => {
                    let bv = f.load_weight(storage, b, row);
                    f.fbin("fadd", v, &bv)
                }
                _ => v.to_string(),
            }
        };
        let mut v = with_bias(f, acc, c);
        if let Some(up) = up {
            let up_row = f.ibin("add", c, &width.to_string());
            let u = with_bias(f, up, &up_row);
            let g = f.gelu_tanh(&v);
            v = f.fbin("fmul", &g, &u);
        }
        if let Epilogue::SoftCap(cap) = s.epilogue {
            v = f.soft_cap(&v, cap);
        }
        if let Some(r) = &residual {
            let row = f.ibin("mul", t, &width.to_string());
            let at = f.ibin("add", &row, c);
            let rv = f.load_f32(r, &at);
            v = f.fbin("fadd", &v, &rv);
        }
        let (dest, stride, col) = route(f, c);
        let dest_row = f.ibin("mul", t, &stride);
        let at = f.ibin("add", &dest_row, &col);
        f.store_f32(&v, &dest, &at);
    };

    // `count` tokens from `t0` against weight block `wb`: accumulate in registers, then store
    // the accumulators to the tile from `tile_at`.
    let accumulate = |f: &mut Func, wb: &str, t0: &str, count: u64, tile_at: u64| {
        let accs: Vec<String> = (0..panels * count)
            .map(|_| {
                let a = f.alloca(VF);
                f.line(format!("store {VF} zeroinitializer, ptr {a}"));
                a
            })
            .collect();
        let wbase = f.ibin("mul", wb, &block_elems.to_string());
        let x_rows: Vec<String> = (0..count)
            .map(|j| {
                let t = f.ibin("add", t0, &j.to_string());
                f.ibin("mul", &t, &inputs)
            })
            .collect();
        // One step: weight vectors of every panel for input `k` (and `k + 1` when paired),
        // times each token's input broadcast.
        let step = |f: &mut Func, wvs: &[Vec<String>], k: &str| {
            for (half, per_panel) in wvs.iter().enumerate() {
                let xs: Vec<String> = x_rows
                    .iter()
                    .map(|xr| {
                        let at = f.ibin("add", xr, k);
                        let at = if half == 1 {
                            f.ibin("add", &at, "1")
                        } else {
                            at
                        };
                        let xv = f.load_f32(&x, &at);
                        splat(f, &xv)
                    })
                    .collect();
                for (p, wv) in per_panel.iter().enumerate() {
                    for (j, xv) in xs.iter().enumerate() {
                        let acc = &accs[p * count as usize + j];
                        let old = f.op(format!("load {VF}, ptr {acc}"));
                        let new = f.op(format!(
                            "call fast {VF} @llvm.fmuladd.v16f32({VF} {wv}, {VF} {xv}, {VF} {old})"
                        ));
                        f.line(format!("store {VF} {new}, ptr {acc}"));
                    }
                }
            }
        };
        match s.weight {
            Storage::F32 => f.for_range("0", &inputs, |f, k| {
                let row = f.ibin("mul", k, &block_rows.to_string());
                let at = f.ibin("add", &wbase, &row);
                let wvs: Vec<String> = (0..panels)
                    .map(|p| {
                        let pa = f.ibin("add", &at, &(p * PANEL).to_string());
                        let ptr = f.op(format!("getelementptr float, ptr {w}, i64 {pa}"));
                        f.op(format!("load {VF}, ptr {ptr}, align 4"))
                    })
                    .collect();
                step(f, &[wvs], k);
            }),
            Storage::Bf16 => {
                // Each 32-bit lane holds inputs (k, k + 1) of one row: `lane << 16` is the
                // first as f32, `lane & 0xffff0000` the second.
                let pair_vectors = |f: &mut Func, pair: &str, both: bool| -> Vec<Vec<String>> {
                    let row = f.ibin("mul", pair, &(block_rows * 2).to_string());
                    let at = f.ibin("add", &wbase, &row);
                    let (mut lo, mut hi) = (Vec::new(), Vec::new());
                    for p in 0..panels {
                        let pa = f.ibin("add", &at, &(p * PANEL * 2).to_string());
                        let ptr = f.op(format!("getelementptr i16, ptr {w}, i64 {pa}"));
                        let v = f.op(format!("load {VI}, ptr {ptr}, align 4"));
                        let shifted = f.op(format!("shl {VI} {v}, {}", lanes(16)));
                        lo.push(f.op(format!("bitcast {VI} {shifted} to {VF}")));
                        if both {
                            let masked = f.op(format!("and {VI} {v}, {}", lanes(-65536)));
                            hi.push(f.op(format!("bitcast {VI} {masked} to {VF}")));
                        }
                    }
                    if both {
                        vec![lo, hi]
                    } else {
                        vec![lo]
                    }
                };
                let pairs = (s.inputs / 2).to_string();
                f.for_range("0", &pairs, |f, pair| {
                    let wvs = pair_vectors(f, pair, true);
                    let k = f.ibin("mul", pair, "2");
                    step(f, &wvs, &k);
                });
                if s.inputs % 2 == 1 {
                    let wvs = pair_vectors(f, &pairs, false);
                    step(f, &wvs, &(s.inputs - 1).to_string());
                }
            }
        }
        for (i, acc) in accs.iter().enumerate() {
            let (p, j) = (i as u64 / count, i as u64 % count);
            let v = f.op(format!("load {VF}, ptr {acc}"));
            let ptr = f.op(format!(
                "getelementptr float, ptr {tile}, i64 {}",
                tile_at + j * block_rows + p * PANEL
            ));
            f.line(format!("store {VF} {v}, ptr {ptr}"));
        }
    };
    // `count` tokens from `t0` against output column block `b` (its gate and up weight blocks
    // with GeGLU), then finish every (token, column) of the block that exists.
    let run = |f: &mut Func, b: &str, t0: &str, count: u64| {
        for part in 0..parts {
            let first = f.ibin("mul", b, &parts.to_string());
            let wb = f.ibin("add", &first, &part.to_string());
            accumulate(f, &wb, t0, count, part * part_stride);
        }
        let first_col = f.ibin("mul", b, &block_rows.to_string());
        f.for_range("0", &count.to_string(), |f, j| {
            let t = f.ibin("add", t0, j);
            let tile_row = f.ibin("mul", j, &block_rows.to_string());
            f.for_range("0", &block_rows.to_string(), |f, i| {
                let c = f.ibin("add", &first_col, i);
                let exists = f.op(format!("icmp slt i64 {c}, {width}"));
                f.if_then(&exists, |f| {
                    let at = f.ibin("add", &tile_row, i);
                    let acc = f.load_f32(&tile, &at);
                    let up = geglu.then(|| {
                        let up_at = f.ibin("add", &at, &part_stride.to_string());
                        f.load_f32(&tile, &up_at)
                    });
                    finish(f, &t, &c, &acc, up.as_deref());
                });
            });
        });
    };

    // Full groups of `tile.tokens`, then the rest in groups of descending powers of two.
    let group = s.tile.tokens;
    let remainders: Vec<u64> = (0..group.max(2).ilog2() + 1)
        .rev()
        .map(|e| 1u64 << e)
        .filter(|&n| n < group)
        .collect();
    let (begin, end) = f.partition(&blocks.to_string());
    let full = f.op(format!("sdiv i64 %tokens, {group}"));
    let covered = f.ibin("mul", &full, &group.to_string());
    let rest = f.ibin("sub", "%tokens", &covered);
    f.for_range(&begin, &end, |f, b| {
        f.for_range("0", &full, |f, g| {
            let t0 = f.ibin("mul", g, &group.to_string());
            run(f, b, &t0, group);
        });
        let mut t0 = covered.clone();
        for &n in &remainders {
            let bit = f.op(format!("and i64 {rest}, {n}"));
            let has = f.op(format!("icmp ne i64 {bit}, 0"));
            let here = t0.clone();
            f.if_then(&has, |f| run(f, b, &here, n));
            let step = f.op(format!("select i1 {has}, i64 {n}, i64 0"));
            t0 = f.ibin("add", &t0, &step);
        }
    });
    f.finish()
}

/// The RMS norm a projection's prologue asks for, as its own kernel: `out[t] = x[t] ·
/// (offset + g) / sqrt(mean(x[t]²) + eps)`. Run before a normed projection so that the
/// projection's inner loop multiplies weights by inputs only (the gain would otherwise be
/// loaded and applied once per weight row). Threads split the tokens.
///
/// Arguments: x `[T, I]`, norm weight `[I]`, out `[T, I]`.
pub fn rms_norm_rows(symbol: &str, inputs: u64, eps: f64, offset: f64, gain: Storage) -> String {
    let mut f = Func::new(symbol);
    let (x, g, out) = (f.arg(0), f.arg(1), f.arg(2));
    let n = inputs.to_string();
    let (begin, end) = f.partition("%tokens");
    f.for_range(&begin, &end, |f, t| {
        let row = f.ibin("mul", t, &n);
        let ss = f.sum(&n, |f, i| {
            let at = f.ibin("add", &row, i);
            let v = f.load_f32(&x, &at);
            f.fbin("fmul", &v, &v)
        });
        let mean = f.fbin("fdiv", &ss, &f32_const(inputs as f64));
        let shifted = f.fbin("fadd", &mean, &f32_const(eps));
        let root = f.call_f32("llvm.sqrt.f32", &[&shifted]);
        let inv = f.fbin("fdiv", "1.0", &root);
        f.for_range("0", &n, |f, i| {
            let at = f.ibin("add", &row, i);
            let v = f.load_f32(&x, &at);
            let gv = f.load_weight(gain, &g, i);
            let scale = if offset == 0.0 {
                gv
            } else {
                f.fbin("fadd", &f32_const(offset), &gv)
            };
            let scaled = f.fbin("fmul", &v, &inv);
            let y = f.fbin("fmul", &scaled, &scale);
            f.store_f32(&y, &out, &at);
        });
    });
    f.finish()
}
