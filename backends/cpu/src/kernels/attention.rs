//! Sliding-window attention over the KV ring, in three launches: rotate this call's keys in
//! place, attend (threads split the query heads; queries are rotated on the fly), then write
//! this call's keys and values into the ring (slot = position mod W).

use crate::ll::{f32_const, Func};

pub struct AttentionSpec {
    pub symbol: String,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub window: u64,
    pub scale: f64,
    /// (theta, rotated dims)
    pub rotary: Option<(f64, u64)>,
}

/// Rotates `rows` vectors of `head_dim` at `base` (row r belongs to token r / per_token) by
/// position; rotate-half on the first `dims` features.
fn rotate_row(
    f: &mut Func,
    src: &str,
    dst: &str,
    src_at: &str,
    dst_at: &str,
    p: &str,
    (theta, dims): (f64, u64),
) {
    let half = dims / 2;
    let pf = f.op(format!("sitofp i64 {p} to double"));
    for i in 0..half {
        let inv_freq = theta.powf(-(2.0 * i as f64) / dims as f64);
        let angle = f.op(format!("fmul double {pf}, 0x{:016X}", inv_freq.to_bits()));
        let sin_d = f.op(format!("call double @sin(double {angle})"));
        let cos_d = f.op(format!("call double @cos(double {angle})"));
        let sin = f.op(format!("fptrunc double {sin_d} to float"));
        let cos = f.op(format!("fptrunc double {cos_d} to float"));
        let ia = f.ibin("add", src_at, &i.to_string());
        let ib = f.ibin("add", src_at, &(i + half).to_string());
        let a = f.load_f32(src, &ia);
        let b = f.load_f32(src, &ib);
        let ac = f.fbin("fmul", &a, &cos);
        let bs = f.fbin("fmul", &b, &sin);
        let na = f.fbin("fsub", &ac, &bs);
        let bc = f.fbin("fmul", &b, &cos);
        let as_ = f.fbin("fmul", &a, &sin);
        let nb = f.fbin("fadd", &bc, &as_);
        let oa = f.ibin("add", dst_at, &i.to_string());
        let ob = f.ibin("add", dst_at, &(i + half).to_string());
        f.store_f32(&na, dst, &oa);
        f.store_f32(&nb, dst, &ob);
    }
}

/// Arguments: k `[T,G,hd]` (rotated in place).
pub fn rotate_keys(s: &AttentionSpec) -> Option<String> {
    let (theta, dims) = s.rotary?;
    let mut f = Func::new(&format!("{}_rotate_keys", s.symbol));
    let k = f.arg(0);
    let rows = f.ibin("mul", "%tokens", &s.kv_heads.to_string());
    let (begin, end) = f.partition(&rows);
    f.for_range(&begin, &end, |f, r| {
        let t = f.op(format!("sdiv i64 {r}, {}", s.kv_heads));
        let p = f.ibin("add", "%start", &t);
        let at = f.ibin("mul", r, &s.head_dim.to_string());
        rotate_row(f, &k, &k, &at, &at, &p, (theta, dims));
    });
    Some(f.finish())
}

/// Arguments: q `[T,H,hd]`, k `[T,G,hd]`, v `[T,G,hd]`, keys `[W,G,hd]`, values `[W,G,hd]`,
/// out `[T,H,hd]`.
pub fn attend(s: &AttentionSpec) -> String {
    let mut f = Func::new(&format!("{}_attend", s.symbol));
    let (q, k, v, ring_k, ring_v, out) =
        (f.arg(0), f.arg(1), f.arg(2), f.arg(3), f.arg(4), f.arg(5));
    let (hd, g_count, w) = (s.head_dim, s.kv_heads, s.window);
    let hds = hd.to_string();
    let group = s.heads / s.kv_heads;
    let qr = f.alloca(&format!("[{hd} x float]"));
    let scores = f.alloca(&format!("[{w} x float]"));
    let acc = f.alloca(&format!("[{hd} x float]"));
    let (begin, end) = f.partition(&s.heads.to_string());
    f.for_range(&begin, &end, |f, h| {
        let g = f.op(format!("sdiv i64 {h}, {group}"));
        f.for_range("0", "%tokens", |f, t| {
            let p = f.ibin("add", "%start", t);
            let qrow_t = f.ibin("mul", t, &s.heads.to_string());
            let qrow = f.ibin("add", &qrow_t, h);
            let q_at = f.ibin("mul", &qrow, &hds);
            // This query, rotated, in qr.
            f.for_range("0", &hds, |f, d| {
                let at = f.ibin("add", &q_at, d);
                let val = f.load_f32(&q, &at);
                f.store_f32(&val, &qr, d);
            });
            if let Some((theta, dims)) = s.rotary {
                rotate_row(f, &q, &qr, &q_at, "0", &p, (theta, dims));
            }
            let lo_raw = f.ibin("sub", &p, &(w - 1).to_string());
            let lo = f.max_i64(&lo_raw, "0");
            let count_raw = f.ibin("sub", &p, &lo);
            let count = f.ibin("add", &count_raw, "1");
            // Row of position pp: this call's k/v if pp >= start, else the ring.
            let row_of = |f: &mut Func, pp: &str| -> (String, String, String) {
                let in_call = f.op(format!("icmp sge i64 {pp}, %start"));
                let tt = f.ibin("sub", pp, "%start");
                let tt0 = f.max_i64(&tt, "0");
                let call_row_t = f.ibin("mul", &tt0, &g_count.to_string());
                let call_row = f.ibin("add", &call_row_t, &g);
                let slot = f.op(format!("srem i64 {pp}, {w}"));
                let ring_row_t = f.ibin("mul", &slot, &g_count.to_string());
                let ring_row = f.ibin("add", &ring_row_t, &g);
                let row = f.op(format!(
                    "select i1 {in_call}, i64 {call_row}, i64 {ring_row}"
                ));
                let at = f.ibin("mul", &row, &hds);
                let kp = f.op(format!("select i1 {in_call}, ptr {k}, ptr {ring_k}"));
                let vp = f.op(format!("select i1 {in_call}, ptr {v}, ptr {ring_v}"));
                (at, kp, vp)
            };
            let max_slot = f.alloca("float");
            f.line(format!("store float 0xFFF0000000000000, ptr {max_slot}"));
            f.for_range("0", &count, |f, n| {
                let pp = f.ibin("add", &lo, n);
                let (at, kp, _) = row_of(f, &pp);
                let dot = f.sum(&hds, |f, d| {
                    let qa = f.load_f32(&qr, d);
                    let ka_at = f.ibin("add", &at, d);
                    let ka = f.load_f32(&kp, &ka_at);
                    f.fbin("fmul", &qa, &ka)
                });
                let sc = f.fbin("fmul", &dot, &f32_const(s.scale));
                f.store_f32(&sc, &scores, n);
                let m = f.op(format!("load float, ptr {max_slot}"));
                let mx = f.op(format!(
                    "call fast float @llvm.maxnum.f32(float {m}, float {sc})"
                ));
                f.line(format!("store float {mx}, ptr {max_slot}"));
            });
            let m = f.op(format!("load float, ptr {max_slot}"));
            f.for_range("0", &hds, |f, d| f.store_f32("0.0", &acc, d));
            let total = f.sum(&count, |f, n| {
                let sc = f.load_f32(&scores, n);
                let shifted = f.fbin("fsub", &sc, &m);
                let e = f.exp(&shifted);
                let pp = f.ibin("add", &lo, n);
                let (at, _, vp) = row_of(f, &pp);
                f.for_range("0", &hds, |f, d| {
                    let va_at = f.ibin("add", &at, d);
                    let va = f.load_f32(&vp, &va_at);
                    let wv = f.fbin("fmul", &e, &va);
                    let old = f.load_f32(&acc, d);
                    let new = f.fbin("fadd", &old, &wv);
                    f.store_f32(&new, &acc, d);
                });
                e
            });
            let inv = f.fbin("fdiv", "1.0", &total);
            f.for_range("0", &hds, |f, d| {
                let a = f.load_f32(&acc, d);
                let r = f.fbin("fmul", &a, &inv);
                let at = f.ibin("add", &q_at, d);
                f.store_f32(&r, &out, &at);
            });
        });
    });
    f.finish()
}

/// Arguments: k `[T,G,hd]`, v `[T,G,hd]`, keys `[W,G,hd]`, values `[W,G,hd]`.
pub fn write_ring(s: &AttentionSpec) -> String {
    let mut f = Func::new(&format!("{}_write_ring", s.symbol));
    let (k, v, ring_k, ring_v) = (f.arg(0), f.arg(1), f.arg(2), f.arg(3));
    let row = (s.kv_heads * s.head_dim).to_string();
    let first_raw = f.ibin("sub", "%tokens", &s.window.to_string());
    let first = f.max_i64(&first_raw, "0");
    let is_first_thread = f.op("icmp eq i64 %thread, 0");
    f.if_then(&is_first_thread, |f| {
        f.for_range(&first, "%tokens", |f, t| {
            let p = f.ibin("add", "%start", t);
            let slot = f.op(format!("srem i64 {p}, {}", s.window));
            let src = f.ibin("mul", t, &row);
            let dst = f.ibin("mul", &slot, &row);
            f.for_range("0", &row, |f, e| {
                let si = f.ibin("add", &src, e);
                let di = f.ibin("add", &dst, e);
                let kv = f.load_f32(&k, &si);
                f.store_f32(&kv, &ring_k, &di);
                let vv = f.load_f32(&v, &si);
                f.store_f32(&vv, &ring_v, &di);
            });
        });
    });
    f.finish()
}
