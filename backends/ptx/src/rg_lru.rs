//! The fused RG-LRU step for one decode token: causal conv1d over the carried window, both
//! block-diagonal gates, decay and normaliser, the scan and the output gate (GELU of the `y`
//! branch), in one launch. One thread block per gate block (its channels depend only on each
//! other), one thread per channel: each thread convolves its channel into shared memory, the
//! block meets at a barrier, then each thread reads the block's conv outputs for its two gate
//! dot products (coalesced weight rows), updates its recurrence state and shifts its window.

use crate::builder::{Class, Kernel, Reg};
use crate::math::{exp, gelu, sigmoid};

/// How a weight is stored in device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    F32,
    Bf16,
}

/// `base[index]` as f32, widening bf16.
pub fn load_weight(k: &mut Kernel, storage: Storage, base: Reg, index: Reg) -> Reg {
    let off = k.reg(Class::B64);
    let p = k.reg(Class::B64);
    let v = k.reg(Class::F32);
    match storage {
        Storage::F32 => {
            k.ins(format!("mul.wide.u32 {off}, {index}, 4;"));
            k.ins(format!("add.u64 {p}, {base}, {off};"));
            k.ins(format!("ld.global.nc.f32 {v}, [{p}];"));
        }
        Storage::Bf16 => {
            k.ins(format!("mul.wide.u32 {off}, {index}, 2;"));
            k.ins(format!("add.u64 {p}, {base}, {off};"));
            let h = k.reg(Class::B32);
            k.ins(format!("ld.global.nc.u16 {h}, [{p}];"));
            k.ins(format!("shl.b32 {h}, {h}, 16;"));
            k.ins(format!("mov.b32 {v}, {h};"));
        }
    }
    v
}

/// Address of `base[index]` for 4-byte elements.
pub fn addr4(k: &mut Kernel, base: Reg, index: Reg) -> Reg {
    let off = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {off}, {index}, 4;"));
    let p = k.reg(Class::B64);
    k.ins(format!("add.u64 {p}, {base}, {off};"));
    p
}

#[derive(Clone, Debug)]
pub struct RgLruSpec {
    pub name: String,
    /// Channels (the LRU width).
    pub channels: u32,
    /// Gate blocks (heads); channels / blocks threads per thread block.
    pub blocks: u32,
    /// Conv taps K; the window holds K-1 rows.
    pub width: u32,
    pub conv: Storage,
    pub gates: Storage,
    /// Multiply by GELU(y) (the recurrent block's other branch).
    pub gate_output: bool,
}

/// Threads per block for `spec`.
/// The parameters both RG-LRU kernels with a conv (the decode step and the chunk's gates) take
/// in this order after their own leading ones: window, conv w and bias, input-gate w and bias,
/// recurrent-gate w and bias, decay.
pub struct RgLruWeights {
    pub window: Reg,
    pub conv_w: Reg,
    pub conv_b: Reg,
    pub igw: Reg,
    pub igb: Reg,
    pub rgw: Reg,
    pub rgb: Reg,
    pub decay: Reg,
}

impl RgLruWeights {
    pub fn declare(k: &mut Kernel) -> RgLruWeights {
        RgLruWeights {
            window: k.param_ptr("window"),
            conv_w: k.param_ptr("conv_w"),
            conv_b: k.param_ptr("conv_b"),
            igw: k.param_ptr("input_gate_w"),
            igb: k.param_ptr("input_gate_b"),
            rgw: k.param_ptr("recurrent_gate_w"),
            rgb: k.param_ptr("recurrent_gate_b"),
            decay: k.param_ptr("decay"),
        }
    }
}

pub fn block_size(spec: &RgLruSpec) -> u32 {
    spec.channels / spec.blocks
}

/// Parameters, in order: x `f32[C]`, position `i32[1]`, window `f32[K-1,C]`, conv w `[C,K]`,
/// conv bias `[C]`, input-gate w `[H,B,B]`, input-gate bias `[H,B]`, recurrent-gate w,
/// recurrent-gate bias, decay rate `f32[C]` (softplus of the recurrent parameter), state
/// `f32[C]`, [y `f32[C]`], out `f32[C]`. Window and state are updated in place.
pub fn rg_lru_step(s: &RgLruSpec) -> String {
    assert!(
        s.channels % s.blocks == 0,
        "channels must split into blocks"
    );
    let b = block_size(s);
    let mut k = Kernel::new(&s.name);
    k.shared("conv_out", 4 * b, 16);
    let x = k.param_ptr("x");
    let position = k.param_ptr("position");
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
    let state = k.param_ptr("state");
    let y = s.gate_output.then(|| k.param_ptr("y"));
    let out = k.param_ptr("out");

    let (jj, h) = k.thread_and_block();
    let j = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {j}, {h}, {b}, {jj};"));
    let pos = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {pos}, [{position}];"));

    // Convolution: tap t < K-1 reads window row t, the last tap reads x; taps before the
    // start of the text (position - (K-1-t) < 0) count zero.
    let acc = load_weight(&mut k, s.conv, conv_b, j);
    let xj_at = addr4(&mut k, x, j);
    let xj = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {xj}, [{xj_at}];"));
    let row_taps = k.reg(Class::B32);
    k.ins(format!("mul.lo.u32 {row_taps}, {j}, {};", s.width));
    for tap in 0..s.width {
        let u = if tap + 1 == s.width {
            xj
        } else {
            let idx = k.reg(Class::B32);
            k.ins(format!("add.u32 {idx}, {j}, {};", tap * s.channels));
            let at = addr4(&mut k, window, idx);
            let v = k.reg(Class::F32);
            k.ins(format!("ld.global.f32 {v}, [{at}];"));
            v
        };
        let wi = k.reg(Class::B32);
        k.ins(format!("add.u32 {wi}, {row_taps}, {tap};"));
        let w = load_weight(&mut k, s.conv, conv_w, wi);
        let back = s.width - 1 - tap;
        if back == 0 {
            k.ins(format!("fma.rn.f32 {acc}, {w}, {u}, {acc};"));
        } else {
            let valid = k.reg(Class::Pred);
            k.ins(format!("setp.ge.s32 {valid}, {pos}, {back};"));
            k.ins(format!("@{valid} fma.rn.f32 {acc}, {w}, {u}, {acc};"));
        }
    }
    // Window shift for this channel: row r takes row r+1, the last row takes x.
    for r in 0..s.width.saturating_sub(1) {
        let v = if r + 2 == s.width {
            xj
        } else {
            let idx = k.reg(Class::B32);
            k.ins(format!("add.u32 {idx}, {j}, {};", (r + 1) * s.channels));
            let at = addr4(&mut k, window, idx);
            let v = k.reg(Class::F32);
            k.ins(format!("ld.global.f32 {v}, [{at}];"));
            v
        };
        let idx = k.reg(Class::B32);
        k.ins(format!("add.u32 {idx}, {j}, {};", r * s.channels));
        let at = addr4(&mut k, window, idx);
        k.ins(format!("st.global.f32 [{at}], {v};"));
    }
    let sh = k.reg(Class::B64);
    k.ins(format!("mov.u64 {sh}, conv_out;"));
    let sh_off = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {sh_off}, {jj}, 4;"));
    let sh_j = k.reg(Class::B64);
    k.ins(format!("add.u64 {sh_j}, {sh}, {sh_off};"));
    k.ins(format!("st.shared.f32 [{sh_j}], {acc};"));
    k.ins("bar.sync 0;");

    // Gates: z[j] = bias[j] + Σ_i c[i] · W[h, i, jj]; the weight row index walks i.
    let zx = load_weight(&mut k, s.gates, igb, j);
    let zr = load_weight(&mut k, s.gates, rgb, j);
    let i = k.reg(Class::B32);
    k.ins(format!("mov.u32 {i}, 0;"));
    let wi = k.reg(Class::B32);
    // W[h, i, jj] = ((h·B + i)·B + jj); start at i = 0.
    k.ins(format!("mul.lo.u32 {wi}, {h}, {};", b * b));
    k.ins(format!("add.u32 {wi}, {wi}, {jj};"));
    let shi = k.reg(Class::B64);
    k.ins(format!("mov.u64 {shi}, {sh};"));
    let (head, end) = (k.label("gates"), k.label("gates_end"));
    k.place(&head);
    let ci = k.reg(Class::F32);
    k.ins(format!("ld.shared.f32 {ci}, [{shi}];"));
    let wx = load_weight(&mut k, s.gates, igw, wi);
    let wr = load_weight(&mut k, s.gates, rgw, wi);
    k.ins(format!("fma.rn.f32 {zx}, {ci}, {wx}, {zx};"));
    k.ins(format!("fma.rn.f32 {zr}, {ci}, {wr}, {zr};"));
    k.ins(format!("add.u32 {wi}, {wi}, {b};"));
    k.ins(format!("add.u64 {shi}, {shi}, 4;"));
    k.ins(format!("add.u32 {i}, {i}, 1;"));
    let more = k.reg(Class::Pred);
    k.ins(format!("setp.lt.u32 {more}, {i}, {b};"));
    k.ins(format!("@{more} bra {head};"));
    k.place(&end);

    // log a = -8 · sigmoid(zr) · softplus(Λ); a = exp(log a); the normaliser
    // sqrt(1 - a²) = sqrt(-expm1(2 log a)), with expm1 by its series near 0 where 1 - exp
    // would cancel (the reference computes it the same way).
    let rate = addr4(&mut k, decay, j);
    let rv = k.reg(Class::F32);
    k.ins(format!("ld.global.nc.f32 {rv}, [{rate}];"));
    let c = k.reg(Class::F32);
    k.ins(format!("ld.shared.f32 {c}, [{sh_j}];"));
    let (a, bv) = gated_input(&mut k, zx, zr, rv, c, pos);
    let st_at = addr4(&mut k, state, j);
    let old = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {old}, [{st_at}];"));
    let hv = k.reg(Class::F32);
    k.ins(format!("fma.rn.f32 {hv}, {a}, {old}, {bv};"));
    k.ins(format!("st.global.f32 [{st_at}], {hv};"));
    let mut o = hv;
    if let Some(y) = y {
        let y_at = addr4(&mut k, y, j);
        let yv = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {yv}, [{y_at}];"));
        let g = gelu(&mut k, yv);
        let v = k.reg(Class::F32);
        k.ins(format!("mul.f32 {v}, {hv}, {g};"));
        o = v;
    }
    let out_at = addr4(&mut k, out, j);
    k.ins(format!("st.global.f32 [{out_at}], {o};"));
    k.finish()
}

/// One RG-LRU update's coefficients: `h' = a·h + b`. From the gate pre-activations `zx`, `zr`,
/// the decay rate (softplus of the recurrent parameter), the conv output `c` and the position:
/// `log a = -8·sigmoid(zr)·rate`, `b = c·sigmoid(zx)·sqrt(1 - a²)`, and at position 0 `a = 0`,
/// `b = c·sigmoid(zx)` (the document start resets the recurrence).
pub(crate) fn gated_input(
    k: &mut Kernel,
    zx: Reg,
    zr: Reg,
    rate: Reg,
    c: Reg,
    pos: Reg,
) -> (Reg, Reg) {
    let gx = sigmoid(k, zx);
    let ga = sigmoid(k, zr);
    let log_a = k.reg(Class::F32);
    k.ins(format!("mul.f32 {log_a}, {ga}, {rate};"));
    k.ins(format!(
        "mul.f32 {log_a}, {log_a}, {};",
        Kernel::f32_imm(-8.0)
    ));
    let a = exp(k, log_a);
    let two = k.reg(Class::F32);
    k.ins(format!("add.f32 {two}, {log_a}, {log_a};"));
    let one_minus = neg_expm1(k, two);
    let norm = k.reg(Class::F32);
    k.ins(format!("sqrt.rn.f32 {norm}, {one_minus};"));
    let at_start = k.reg(Class::Pred);
    k.ins(format!("setp.eq.s32 {at_start}, {pos}, 0;"));
    k.ins(format!(
        "selp.f32 {norm}, {}, {norm}, {at_start};",
        Kernel::f32_imm(1.0)
    ));
    k.ins(format!("selp.f32 {a}, 0f00000000, {a}, {at_start};"));
    let bv = k.reg(Class::F32);
    k.ins(format!("mul.f32 {bv}, {c}, {gx};"));
    k.ins(format!("mul.f32 {bv}, {bv}, {norm};"));
    (a, bv)
}

/// `-expm1(x)` for x ≤ 0: `1 - exp(x)`, by the series `-(x + x²/2 + x³/6 + x⁴/24)` when
/// |x| < 2^-5 (relative error below 1e-8 there), where `1 - exp(x)` would lose digits.
pub(crate) fn neg_expm1(k: &mut Kernel, x: Reg) -> Reg {
    let e = exp(k, x);
    let direct = k.reg(Class::F32);
    k.ins(format!("sub.f32 {direct}, {}, {e};", Kernel::f32_imm(1.0)));
    // Horner: x · (1 + x · (1/2 + x · (1/6 + x/24))).
    let p = k.reg(Class::F32);
    k.ins(format!(
        "fma.rn.f32 {p}, {x}, {}, {};",
        Kernel::f32_imm(1.0 / 24.0),
        Kernel::f32_imm(1.0 / 6.0)
    ));
    k.ins(format!(
        "fma.rn.f32 {p}, {x}, {p}, {};",
        Kernel::f32_imm(0.5)
    ));
    k.ins(format!(
        "fma.rn.f32 {p}, {x}, {p}, {};",
        Kernel::f32_imm(1.0)
    ));
    k.ins(format!("mul.f32 {p}, {p}, {x};"));
    k.ins(format!("neg.f32 {p}, {p};"));
    let ax = k.reg(Class::F32);
    k.ins(format!("abs.f32 {ax}, {x};"));
    let small = k.reg(Class::Pred);
    k.ins(format!(
        "setp.lt.f32 {small}, {ax}, {};",
        Kernel::f32_imm(1.0 / 32.0)
    ));
    k.ins(format!("selp.f32 {direct}, {p}, {direct}, {small};"));
    direct
}
