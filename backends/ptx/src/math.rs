//! Math the kernels share, written with PTX's own instructions (there is no libm on the GPU
//! without the CUDA toolkit's libdevice). `tanh.approx.f32` is not used: its relative error
//! (about 2^-11) times a soft-cap of 30 would move logits by up to 0.015, far outside the f32
//! path's 5e-4; tanh is built from `ex2.approx` (relative error about 2^-22) instead.

use crate::builder::{Class, Kernel, Reg};

/// log2(e), for `exp(x) = 2^(x · log2 e)`.
pub(crate) const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// `exp(x)`.
pub fn exp(k: &mut Kernel, x: Reg) -> Reg {
    let t = k.reg(Class::F32);
    k.ins(format!("mul.f32 {t}, {x}, {};", Kernel::f32_imm(LOG2_E)));
    k.ins(format!("ex2.approx.ftz.f32 {t}, {t};"));
    t
}

/// `tanh(x) = sign(x) · (1 - e) / (1 + e)` with `e = exp(-2|x|)`, which never overflows.
pub fn tanh(k: &mut Kernel, x: Reg) -> Reg {
    let a = k.reg(Class::F32);
    k.ins(format!("abs.f32 {a}, {x};"));
    let e = k.reg(Class::F32);
    k.ins(format!(
        "mul.f32 {e}, {a}, {};",
        Kernel::f32_imm(-2.0 * LOG2_E)
    ));
    k.ins(format!("ex2.approx.ftz.f32 {e}, {e};"));
    let (num, den) = (k.reg(Class::F32), k.reg(Class::F32));
    k.ins(format!("sub.f32 {num}, {}, {e};", Kernel::f32_imm(1.0)));
    k.ins(format!("add.f32 {den}, {}, {e};", Kernel::f32_imm(1.0)));
    let t = k.reg(Class::F32);
    k.ins(format!("div.rn.f32 {t}, {num}, {den};"));
    let neg = k.reg(Class::Pred);
    k.ins(format!("setp.lt.f32 {neg}, {x}, 0f00000000;"));
    let minus = k.reg(Class::F32);
    k.ins(format!("neg.f32 {minus}, {t};"));
    k.ins(format!("selp.f32 {t}, {minus}, {t}, {neg};"));
    t
}

/// `sigmoid(x) = 1 / (1 + exp(-x))`.
pub fn sigmoid(k: &mut Kernel, x: Reg) -> Reg {
    let n = k.reg(Class::F32);
    k.ins(format!("neg.f32 {n}, {x};"));
    let e = exp(k, n);
    k.ins(format!("add.f32 {e}, {e}, {};", Kernel::f32_imm(1.0)));
    let s = k.reg(Class::F32);
    k.ins(format!("rcp.rn.f32 {s}, {e};"));
    s
}

/// `softplus(x) = log(1 + exp(x))`, as `max(x, 0) + log(1 + exp(-|x|))` so it never overflows.
pub fn softplus(k: &mut Kernel, x: Reg) -> Reg {
    let a = k.reg(Class::F32);
    k.ins(format!("abs.f32 {a}, {x};"));
    k.ins(format!("neg.f32 {a}, {a};"));
    let e = exp(k, a);
    k.ins(format!("add.f32 {e}, {e}, {};", Kernel::f32_imm(1.0)));
    let l = k.reg(Class::F32);
    k.ins(format!("lg2.approx.ftz.f32 {l}, {e};"));
    k.ins(format!(
        "mul.f32 {l}, {l}, {};",
        Kernel::f32_imm(std::f32::consts::LN_2)
    ));
    let m = k.reg(Class::F32);
    k.ins(format!("max.f32 {m}, {x}, 0f00000000;"));
    k.ins(format!("add.f32 {m}, {m}, {l};"));
    m
}

/// GELU with the tanh approximation, as the reference's `gelu_pytorch_tanh`.
pub fn gelu(k: &mut Kernel, x: Reg) -> Reg {
    let x3 = k.reg(Class::F32);
    k.ins(format!("mul.f32 {x3}, {x}, {x};"));
    k.ins(format!("mul.f32 {x3}, {x3}, {x};"));
    let inner = k.reg(Class::F32);
    k.ins(format!(
        "fma.rn.f32 {inner}, {x3}, {}, {x};",
        Kernel::f32_imm(0.044715)
    ));
    k.ins(format!(
        "mul.f32 {inner}, {inner}, {};",
        Kernel::f32_imm((2.0f64 / std::f64::consts::PI).sqrt() as f32)
    ));
    let t = tanh(k, inner);
    k.ins(format!("add.f32 {t}, {t}, {};", Kernel::f32_imm(1.0)));
    let half = k.reg(Class::F32);
    k.ins(format!("mul.f32 {half}, {x}, {};", Kernel::f32_imm(0.5)));
    let out = k.reg(Class::F32);
    k.ins(format!("mul.f32 {out}, {half}, {t};"));
    out
}

/// The sum of `acc` over the warp, in every lane.
pub fn warp_sum(k: &mut Kernel, acc: Reg) {
    warp_reduce(k, "add", acc);
}

/// `acc` combined over the warp with `op` (`add`, `max`), in every lane.
pub fn warp_reduce(k: &mut Kernel, op: &str, acc: Reg) {
    lanes_reduce(k, op, acc, 32);
}

/// `acc` combined with `op` over each aligned group of `lanes` lanes (a power of two up to 32:
/// a butterfly stays inside its group), in every lane of the group.
pub fn lanes_reduce(k: &mut Kernel, op: &str, acc: Reg, lanes: u32) {
    debug_assert!(lanes.is_power_of_two() && lanes <= 32);
    let mut offset = lanes / 2;
    while offset >= 1 {
        let other = k.reg(Class::F32);
        k.ins(format!(
            "shfl.sync.bfly.b32 {other}, {acc}, {offset}, 31, -1;"
        ));
        k.ins(format!("{op}.f32 {acc}, {acc}, {other};"));
        offset /= 2;
    }
}

/// Lane 0 of each warp writes its (warp-reduced) `v` to the kernel's shared f32 array
/// `partial[warp]`; the block's threads read them back with `combine_partials` after a barrier.
pub fn store_warp_partial(k: &mut Kernel, v: Reg, warp: Reg, lane: Reg) {
    let p = k.reg(Class::B64);
    k.ins(format!("mov.u64 {p}, partial;"));
    let po = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {po}, {warp}, 4;"));
    k.ins(format!("add.u64 {po}, {po}, {p};"));
    let lane0 = k.reg(Class::Pred);
    k.ins(format!("setp.eq.u32 {lane0}, {lane}, 0;"));
    k.ins(format!("@{lane0} st.shared.f32 [{po}], {v};"));
}

/// The `warps` entries of `partial` combined with `op`, in every thread.
pub fn combine_partials(k: &mut Kernel, op: &str, warps: u32) -> Reg {
    let p = k.reg(Class::B64);
    k.ins(format!("mov.u64 {p}, partial;"));
    let total = k.reg(Class::F32);
    k.ins(format!("ld.shared.f32 {total}, [{p}];"));
    for w in 1..warps {
        let o = k.reg(Class::F32);
        k.ins(format!("ld.shared.f32 {o}, [{p}+{}];", 4 * w));
        k.ins(format!("{op}.f32 {total}, {total}, {o};"));
    }
    total
}
