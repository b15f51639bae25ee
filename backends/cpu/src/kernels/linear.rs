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
    f.for_range(&begin, &end, |f, o| {
        // Where column o goes: the split it falls in, and its column there.
        let (mut dest, mut stride, mut col) = (outs[0].clone(), s.splits[0].to_string(), o.to_string());
        let mut boundary = 0;
        for (k, &n) in s.splits.iter().enumerate().skip(1) {
            boundary += s.splits[k - 1];
            let past = f.op(format!("icmp sge i64 {o}, {boundary}"));
            dest = f.op(format!("select i1 {past}, ptr {}, ptr {dest}", outs[k]));
            stride = f.op(format!("select i1 {past}, i64 {n}, i64 {stride}"));
            let shifted = f.ibin("sub", o, &boundary.to_string());
            col = f.op(format!("select i1 {past}, i64 {shifted}, i64 {col}"));
        }
        let rows: Vec<String> = if geglu {
            vec![o.to_string(), f.ibin("add", o, &width.to_string())]
        } else {
            vec![o.to_string()]
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
                    let scale = if offset == 0.0 { g } else { f.fbin("fadd", &f32_const(offset), &g) };
                    f.fbin("fmul", &wv, &scale)
                }
                _ => wv,
            }
        };
        // Dot products of every row with `tokens` consecutive tokens from `t0`, in one pass over
        // the weights: `sums[r · tokens + j]`.
        let dots = |f: &mut Func, t0: &str, tokens: usize| -> Vec<String> {
            let x_rows: Vec<String> = (0..tokens)
                .map(|j| {
                    let t = f.ibin("add", t0, &j.to_string());
                    f.ibin("mul", &t, &inputs)
                })
                .collect();
            f.sums(&inputs, rows.len() * tokens, |f, i| {
                let mut terms = Vec::new();
                let xs: Vec<String> = x_rows
                    .iter()
                    .map(|xr| {
                        let at = f.ibin("add", xr, i);
                        f.load_f32(&x, &at)
                    })
                    .collect();
                for r in 0..rows.len() {
                    let wv = weight(f, r, i);
                    for xv in &xs {
                        terms.push(f.fbin("fmul", &wv, xv));
                    }
                }
                terms
            })
        };
        // Bias, epilogue, residual and store of token t, from its dot products.
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
            let mut v = vals[0].clone();
            match s.epilogue {
                Epilogue::None => {}
                Epilogue::GeGlu => {
                    let g = f.gelu_tanh(&v);
                    v = f.fbin("fmul", &g, &vals[1]);
                }
                Epilogue::SoftCap(cap) => v = f.soft_cap(&v, cap),
            }
            let out_row = f.ibin("mul", t, &width.to_string());
            if let Some(r) = &residual {
                let at = f.ibin("add", &out_row, o);
                let rv = f.load_f32(r, &at);
                v = f.fbin("fadd", &v, &rv);
            }
            let dest_row = f.ibin("mul", t, &stride);
            let at = f.ibin("add", &dest_row, &col);
            f.store_f32(&v, &dest, &at);
        };

        // Blocks of TOKEN_BLOCK tokens share each weight load; the rest go one by one.
        let blocks = f.op(format!("sdiv i64 %tokens, {TOKEN_BLOCK}"));
        f.for_range("0", &blocks, |f, b| {
            let t0 = f.ibin("mul", b, &TOKEN_BLOCK.to_string());
            let accs = dots(f, &t0, TOKEN_BLOCK);
            for j in 0..TOKEN_BLOCK {
                let t = f.ibin("add", &t0, &j.to_string());
                let mine: Vec<String> = (0..rows.len()).map(|r| accs[r * TOKEN_BLOCK + j].clone()).collect();
                finish(f, &t, &mine);
            }
        });
        let done = f.ibin("mul", &blocks, &TOKEN_BLOCK.to_string());
        f.for_range(&done, "%tokens", |f, t| {
            let accs = dots(f, t, 1);
            finish(f, t, &accs);
        });
    });
    f.finish()
}
