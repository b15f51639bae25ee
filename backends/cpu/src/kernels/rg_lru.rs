//! The fused recurrence: conv1d with its window, both block-diagonal gates, decay, normaliser,
//! scan and output gate. Threads split the gate blocks (a block's channels depend only on
//! themselves), and each thread walks its channels through time. Window and state are updated
//! in place.

use crate::ll::{f32_const, Func, Storage};

pub struct RgLruSpec {
    pub symbol: String,
    pub channels: u64,
    pub blocks: u64,
    pub width: u64,
    pub conv: Storage,
    pub gates: Storage,
    pub gate_output: bool,
}

/// Arguments: x `[T,C]`, window `[K-1,C]`, conv w `[C,1,K]`, conv bias, input-gate w `[H,B,B]`,
/// input-gate bias `[H,B]`, recurrent-gate w, recurrent-gate bias, decay rate `f32[C]`,
/// state `f32[C]`, [y `[T,C]`], out `[T,C]`, scratch `[T,C]`.
pub fn rg_lru(s: &RgLruSpec) -> String {
    let mut f = Func::new(&s.symbol);
    let a: Vec<String> = (0..10).map(|i| f.arg(i)).collect();
    let (x, window, conv_w, conv_b, igw, igb, rgw, rgb, decay, state) = (
        &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7], &a[8], &a[9],
    );
    let y = s.gate_output.then(|| f.arg(10));
    let base = if s.gate_output { 11 } else { 10 };
    let (out, scratch) = (f.arg(base), f.arg(base + 1));
    let (c, k, b) = (s.channels, s.width, s.channels / s.blocks);
    let (cs, ks, bs) = (c.to_string(), k.to_string(), b.to_string());
    let zx = f.alloca(&format!("[{b} x float]"));
    let zr = f.alloca(&format!("[{b} x float]"));

    // Input of channel j at token offset s (negative: from the window), as an f32.
    let input = |f: &mut Func, s_off: &str, j: &str| -> String {
        let xi = f.max_i64(s_off, "0");
        let xrow = f.ibin("mul", &xi, &cs);
        let xat = f.ibin("add", &xrow, j);
        let from_x = f.load_f32(x, &xat);
        if k == 1 {
            return from_x;
        }
        let wrow_raw = f.ibin("add", s_off, &(k - 1).to_string());
        let wrow_low = f.min_i64(&wrow_raw, &(k - 2).to_string());
        let wrow = f.max_i64(&wrow_low, "0");
        let wrow_off = f.ibin("mul", &wrow, &cs);
        let wat = f.ibin("add", &wrow_off, j);
        let from_w = f.load_f32(window, &wat);
        let is_x = f.op(format!("icmp sge i64 {s_off}, 0"));
        f.op(format!("select i1 {is_x}, float {from_x}, float {from_w}"))
    };

    let (begin, end) = f.partition(&s.blocks.to_string());
    f.for_range(&begin, &end, |f, h| {
        let first = f.ibin("mul", h, &bs);
        // Convolution of this block's channels for every token of the call.
        f.for_range("0", "%tokens", |f, t| {
            let p = f.ibin("add", "%start", t);
            f.for_range("0", &bs, |f, jj| {
                let j = f.ibin("add", &first, jj);
                let bias = f.load_weight(s.conv, conv_b, &j);
                let acc = f.alloca("float");
                f.line(format!("store float {bias}, ptr {acc}"));
                for tap in 0..k {
                    let back = (k - 1 - tap).to_string();
                    let s_off = f.ibin("sub", t, &back);
                    let u = input(f, &s_off, &j);
                    let wi_row = f.ibin("mul", &j, &ks);
                    let wi = f.ibin("add", &wi_row, &tap.to_string());
                    let wv = f.load_weight(s.conv, conv_w, &wi);
                    let prod = f.fbin("fmul", &wv, &u);
                    let pos = f.ibin("sub", &p, &back);
                    let valid = f.op(format!("icmp sge i64 {pos}, 0"));
                    let term = f.op(format!("select i1 {valid}, float {prod}, float 0.0"));
                    let old = f.op(format!("load float, ptr {acc}"));
                    let new = f.op(format!("fadd float {old}, {term}"));
                    f.line(format!("store float {new}, ptr {acc}"));
                }
                let cv = f.op(format!("load float, ptr {acc}"));
                let row = f.ibin("mul", t, &cs);
                let at = f.ibin("add", &row, &j);
                f.store_f32(&cv, &scratch, &at);
            });
        });
        // Gates, decay, normaliser and scan, token by token.
        f.for_range("0", "%tokens", |f, t| {
            let p = f.ibin("add", "%start", t);
            let at_start = f.op(format!("icmp eq i64 {p}, 0"));
            let row = f.ibin("mul", t, &cs);
            let block_row = f.ibin("add", &row, &first);
            f.for_range("0", &bs, |f, jj| {
                let bj = f.ibin("add", &first, jj);
                let bx = f.load_weight(s.gates, igb, &bj);
                let br = f.load_weight(s.gates, rgb, &bj);
                f.store_f32(&bx, &zx, jj);
                f.store_f32(&br, &zr, jj);
            });
            f.for_range("0", &bs, |f, i| {
                let ci_at = f.ibin("add", &block_row, i);
                let ci = f.load_f32(&scratch, &ci_at);
                let wrow_block = f.ibin("add", &first, i);
                let wrow = f.ibin("mul", &wrow_block, &bs);
                f.for_range("0", &bs, |f, jj| {
                    let wi = f.ibin("add", &wrow, jj);
                    let wx = f.load_weight(s.gates, igw, &wi);
                    let wr = f.load_weight(s.gates, rgw, &wi);
                    let px = f.fbin("fmul", &ci, &wx);
                    let pr = f.fbin("fmul", &ci, &wr);
                    let ox = f.load_f32(&zx, jj);
                    let or = f.load_f32(&zr, jj);
                    let nx = f.fbin("fadd", &ox, &px);
                    let nr = f.fbin("fadd", &or, &pr);
                    f.store_f32(&nx, &zx, jj);
                    f.store_f32(&nr, &zr, jj);
                });
            });
            f.for_range("0", &bs, |f, jj| {
                let j = f.ibin("add", &first, jj);
                let at = f.ibin("add", &row, &j);
                let cv = f.load_f32(&scratch, &at);
                let zxv = f.load_f32(&zx, jj);
                let zrv = f.load_f32(&zr, jj);
                let gx = f.sigmoid(&zxv);
                let ga = f.sigmoid(&zrv);
                let rate = f.load_f32(decay, &j);
                let m8 = f.fbin("fmul", &f32_const(-8.0), &ga);
                let log_a = f.fbin("fmul", &m8, &rate);
                let a_val = f.exp(&log_a);
                let twice = f.fbin("fmul", "2.0", &log_a);
                let em1 = f.expm1(&twice);
                let one_minus = f.op(format!("fneg fast float {em1}"));
                let root = f.call_f32("llvm.sqrt.f32", &[&one_minus]);
                let norm = f.op(format!("select i1 {at_start}, float 1.0, float {root}"));
                let decay_or_reset =
                    f.op(format!("select i1 {at_start}, float 0.0, float {a_val}"));
                let gated = f.fbin("fmul", &cv, &gx);
                let bv = f.fbin("fmul", &gated, &norm);
                let old = f.load_f32(state, &j);
                let kept = f.fbin("fmul", &decay_or_reset, &old);
                let hv = f.fbin("fadd", &kept, &bv);
                f.store_f32(&hv, state, &j);
                let mut o = hv;
                if let Some(y) = &y {
                    let yv = f.load_f32(y, &at);
                    let gy = f.gelu_tanh(&yv);
                    o = f.fbin("fmul", &o, &gy);
                }
                f.store_f32(&o, &out, &at);
            });
        });
        // The window now holds the last K-1 inputs; ascending rows read only rows not yet
        // overwritten.
        if k > 1 {
            f.for_range("0", &bs, |f, jj| {
                let j = f.ibin("add", &first, jj);
                f.for_range("0", &(k - 1).to_string(), |f, r| {
                    let back = f.ibin("sub", "%tokens", &(k - 1).to_string());
                    let s_off = f.ibin("add", &back, r);
                    let v = input(f, &s_off, &j);
                    let row = f.ibin("mul", r, &cs);
                    let at = f.ibin("add", &row, &j);
                    f.store_f32(&v, window, &at);
                });
            });
        }
    });
    f.finish()
}
