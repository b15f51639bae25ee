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
    f.for_range(&begin, &end, |f, o| {
        // Where column o goes: the split it falls in, and its column there.
        let (mut dest, mut stride, mut col) =
            (outs[0].clone(), s.splits[0].to_string(), o.to_string());
        let mut boundary = 0;
        for (k, &n) in s.splits.iter().enumerate().skip(1) {
            boundary += s.splits[k - 1];
            let past = f.op(format!("icmp sge i64 {o}, {boundary}"));
            dest = f.op(format!("select i1 {past}, ptr {}, ptr {dest}", outs[k]));
            stride = f.op(format!("select i1 {past}, i64 {n}, i64 {stride}"));
            let shifted = f.ibin("sub", o, &boundary.to_string());
            col = f.op(format!("select i1 {past}, i64 {shifted}, i64 {col}"));
        }
        let up_row = f.ibin("add", o, &width.to_string());
        f.for_range("0", "%tokens", |f, t| {
            let xrow = f.ibin("mul", t, &inputs);
            let dot = |f: &mut Func, row: &str| {
                let wrow = f.ibin("mul", row, &inputs);
                let acc = f.sum(&inputs, |f, i| {
                    let xi = f.ibin("add", &xrow, i);
                    let mut xv = f.load_f32(&x, &xi);
                    if let (Some((_, offset, storage)), Some(nw)) = (s.norm, &norm_w) {
                        let g = f.load_weight(storage, nw, i);
                        let scale = if offset == 0.0 {
                            g
                        } else {
                            f.fbin("fadd", &f32_const(offset), &g)
                        };
                        xv = f.fbin("fmul", &xv, &scale);
                    }
                    let wi = f.ibin("add", &wrow, i);
                    let wv = f.load_weight(s.weight, &w, &wi);
                    f.fbin("fmul", &wv, &xv)
                });
                let acc = match &inv_rms {
                    Some(slot) => {
                        let inv = f.load_f32(slot, t);
                        f.fbin("fmul", &acc, &inv)
                    }
                    None => acc,
                };
                match (s.bias, &bias) {
                    (Some(storage), Some(b)) => {
                        let bv = f.load_weight(storage, b, row);
                        f.fbin("fadd", &acc, &bv)
                    }
                    _ => acc,
                }
            };
            let mut v = dot(f, o);
            match s.epilogue {
                Epilogue::None => {}
                Epilogue::GeGlu => {
                    let up = dot(f, &up_row);
                    let g = f.gelu_tanh(&v);
                    v = f.fbin("fmul", &g, &up);
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
        });
    });
    f.finish()
}
