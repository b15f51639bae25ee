//! The projection kernel: optional RMS-norm prologue, `x·wᵀ + b`, GeGLU or soft-cap epilogue,
//! residual add, columns written to split outputs. Threads split the output rows; each weight
//! row is streamed once per call and reused across the call's tokens.

use griffin_ir::Epilogue;

use crate::ll::{f32_const, Func, Storage};

pub struct LinearSpec {
    pub symbol: String,
    pub inputs: u64,
    /// Rows of the weight (twice the output width with GeGLU).
    pub rows: u64,
    pub weight: Storage,
    pub norm: Option<(f64, f64, Storage)>,
    pub bias: Option<Storage>,
    pub epilogue: Epilogue,
    pub residual: bool,
    /// Output column blocks; one entry covering everything when unsplit.
    pub splits: Vec<u64>,
    pub max_tokens: u64,
}

/// Tokens whose dot products share one pass over a weight row (prefill).
const TOKEN_BLOCK: usize = 4;

/// Arguments: x, [norm weight], weight, [bias], [residual], one output per split.
pub fn linear(s: &LinearSpec) -> String {
    let mut f = Func::new(&s.symbol);
    let mut next = 0;
    let mut arg = |f: &mut Func| {
        next += 1;
        f.arg(next - 1)
    };
    let x = arg(&mut f);
    let norm_w = s.norm.map(|_| arg(&mut f));
    let w = arg(&mut f);
    let bias = s.bias.map(|_| arg(&mut f));
    let residual = s.residual.then(|| arg(&mut f));
    let outs: Vec<String> = s.splits.iter().map(|_| arg(&mut f)).collect();
    let width = if s.epilogue == Epilogue::GeGlu {
        s.rows / 2
    } else {
        s.rows
    };
    let inputs = s.inputs.to_string();

    // 1/rms of every token of the call, once per thread.
    let inv_rms = s.norm.map(|(eps, _, _)| {
        let slot = f.alloca(&format!("[{} x float]", s.max_tokens));
        f.for_range("0", "%tokens", |f, t| {
            let row = f.ibin("mul", t, &inputs);
            let ss = f.sum(&inputs, |f, i| {
                let at = f.ibin("add", &row, i);
                let v = f.load_f32(&x, &at);
                f.fbin("fmul", &v, &v)
            });
            let mean = f.fbin("fdiv", &ss, &f32_const(s.inputs as f64));
            let shifted = f.fbin("fadd", &mean, &f32_const(eps));
            let root = f.call_f32("llvm.sqrt.f32", &[&shifted]);
            let inv = f.fbin("fdiv", "1.0", &root);
            f.store_f32(&inv, &slot, t);
        });
        slot
    });

    let (begin, end) = f.partition(&width.to_string());
    let geglu = s.epilogue == Epilogue::GeGlu;

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

    // Computes output columns `cols` together: each weight element is loaded once for a block
    // of tokens and every column. With GeGLU a column reads two weight rows (gate, up).
    let columns = |f: &mut Func, cols: &[String]| {
        let routes: Vec<_> = cols.iter().map(|c| route(f, c)).collect();
        let rows: Vec<String> = if geglu {
            vec![cols[0].clone(), f.ibin("add", &cols[0], &width.to_string())]
        } else {
            cols.to_vec()
        };
        let row_starts: Vec<String> = rows.iter().map(|r| f.ibin("mul", r, &inputs)).collect();

        // Weight element (row r, input i), with the norm weight folded in: the norm scales
        // inputs, so `w·(x·g)` is computed as `(w·g)·x`, once for every token of a block.
        let weight = |f: &mut Func, r: usize, i: &str| -> String {
            let wi = f.ibin("add", &row_starts[r], i);
            let wv = f.load_weight(s.weight, &w, &wi);
            match (s.norm, &norm_w) {
                (Some((_, offset, storage)), Some(nw)) => {
                    let g = f.load_weight(storage, nw, i);
                    let scale = if offset == 0.0 {
                        g
                    } else {
                        f.fbin("fadd", &f32_const(offset), &g)
                    };
                    f.fbin("fmul", &wv, &scale)
                }
                _ => wv,
            }
        };
        // Dot products of every row with `tokens` consecutive tokens from `t0`, in one pass
        // over the weights: `sums[r · tokens + j]`.
        let dots = |f: &mut Func, t0: &str, tokens: usize| -> Vec<String> {
            let x_rows: Vec<String> = (0..tokens)
                .map(|j| {
                    let t = f.ibin("add", t0, &j.to_string());
                    f.ibin("mul", &t, &inputs)
                })
                .collect();
            f.sums(&inputs, rows.len() * tokens, |f, i| {
                let xs: Vec<String> = x_rows
                    .iter()
                    .map(|xr| {
                        let at = f.ibin("add", xr, i);
                        f.load_f32(&x, &at)
                    })
                    .collect();
                let mut terms = Vec::new();
                for r in 0..rows.len() {
                    let wv = weight(f, r, i);
                    for xv in &xs {
                        terms.push(f.fbin("fmul", &wv, xv));
                    }
                }
                terms
            })
        };
        // Scale, bias, epilogue, residual and store of token t for every column.
        let finish = |f: &mut Func, t: &str, accs: &[String]| {
            let mut vals = Vec::new();
            for (r, acc) in accs.iter().enumerate() {
                let mut v = acc.clone();
                if let Some(slot) = &inv_rms {
                    let inv = f.load_f32(slot, t);
                    v = f.fbin("fmul", &v, &inv);
                }
                if let (Some(storage), Some(b)) = (s.bias, &bias) {
                    let bv = f.load_weight(storage, b, &rows[r]);
                    v = f.fbin("fadd", &v, &bv);
                }
                vals.push(v);
            }
            if geglu {
                let g = f.gelu_tanh(&vals[0]);
                vals = vec![f.fbin("fmul", &g, &vals[1])];
            }
            let out_row = f.ibin("mul", t, &width.to_string());
            for ((c, (dest, stride, col)), mut v) in cols.iter().zip(&routes).zip(vals) {
                if let Epilogue::SoftCap(cap) = s.epilogue {
                    v = f.soft_cap(&v, cap);
                }
                if let Some(r) = &residual {
                    let at = f.ibin("add", &out_row, c);
                    let rv = f.load_f32(r, &at);
                    v = f.fbin("fadd", &v, &rv);
                }
                let dest_row = f.ibin("mul", t, stride);
                let at = f.ibin("add", &dest_row, col);
                f.store_f32(&v, dest, &at);
            }
        };

        // Blocks of TOKEN_BLOCK tokens share each weight load; the rest go one by one.
        let blocks = f.op(format!("sdiv i64 %tokens, {TOKEN_BLOCK}"));
        f.for_range("0", &blocks, |f, b| {
            let t0 = f.ibin("mul", b, &TOKEN_BLOCK.to_string());
            let accs = dots(f, &t0, TOKEN_BLOCK);
            for j in 0..TOKEN_BLOCK {
                let t = f.ibin("add", &t0, &j.to_string());
                let mine: Vec<String> = (0..rows.len())
                    .map(|r| accs[r * TOKEN_BLOCK + j].clone())
                    .collect();
                finish(f, &t, &mine);
            }
        });
        let done = f.ibin("mul", &blocks, &TOKEN_BLOCK.to_string());
        f.for_range(&done, "%tokens", |f, t| {
            let accs = dots(f, t, 1);
            finish(f, t, &accs);
        });
    };

    // Columns in pairs (GeGLU already reads two rows per column), then the odd one out.
    let per_step = if geglu { 1 } else { 2 };
    let count = f.ibin("sub", &end, &begin);
    let steps = f.op(format!("sdiv i64 {count}, {per_step}"));
    f.for_range("0", &steps, |f, k| {
        let first_offset = f.ibin("mul", k, &per_step.to_string());
        let first = f.ibin("add", &begin, &first_offset);
        let cols: Vec<String> = (0..per_step)
            .map(|j| f.ibin("add", &first, &j.to_string()))
            .collect();
        columns(f, &cols);
    });
    let covered_offset = f.ibin("mul", &steps, &per_step.to_string());
    let covered = f.ibin("add", &begin, &covered_offset);
    f.for_range(&covered, &end, |f, c| columns(f, &[c.to_string()]));
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
