//! The decode projection: one warp per output column streams a bf16 weight row with 16-byte
//! loads, accumulates in f32, reduces across the warp with shuffles, and applies the epilogue
//! (bias, GeGLU, soft-cap, residual) in lane 0. Eight warps per block.

use crate::builder::{Class, Kernel, Reg};

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
}

pub const WARPS_PER_BLOCK: u32 = 8;

/// Thread blocks to launch for `spec` (each of `32 · WARPS_PER_BLOCK` threads).
pub fn grid(spec: &GemvSpec) -> u32 {
    spec.width.div_ceil(WARPS_PER_BLOCK)
}

/// Accumulates `w[row, i..i+8] · x[i..i+8]` into `acc`.
fn dot8(k: &mut Kernel, w: Reg, x: Reg, row: Reg, i: Reg, inputs: u32, acc: Reg) {
    let elem = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {elem}, {row}, {inputs}, {i};"));
    let off = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {off}, {elem}, 2;"));
    let wp = k.reg(Class::B64);
    k.ins(format!("add.u64 {wp}, {w}, {off};"));
    let words: Vec<Reg> = (0..4).map(|_| k.reg(Class::B32)).collect();
    k.ins(format!(
        "ld.global.nc.v4.u32 {{{}, {}, {}, {}}}, [{wp}];",
        words[0], words[1], words[2], words[3]
    ));
    let xoff = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {xoff}, {i}, 4;"));
    let xp = k.reg(Class::B64);
    k.ins(format!("add.u64 {xp}, {x}, {xoff};"));
    let xs: Vec<Reg> = (0..8).map(|_| k.reg(Class::F32)).collect();
    k.ins(format!(
        "ld.global.v4.f32 {{{}, {}, {}, {}}}, [{xp}];",
        xs[0], xs[1], xs[2], xs[3]
    ));
    k.ins(format!(
        "ld.global.v4.f32 {{{}, {}, {}, {}}}, [{xp}+16];",
        xs[4], xs[5], xs[6], xs[7]
    ));
    for (j, word) in words.iter().enumerate() {
        // A 32-bit word holds two bf16: the low half is the earlier element.
        let lo_bits = k.reg(Class::B32);
        k.ins(format!("shl.b32 {lo_bits}, {word}, 16;"));
        let hi_bits = k.reg(Class::B32);
        k.ins(format!("and.b32 {hi_bits}, {word}, -65536;"));
        for (bits, xv) in [(lo_bits, xs[2 * j]), (hi_bits, xs[2 * j + 1])] {
            let wv = k.reg(Class::F32);
            k.ins(format!("mov.b32 {wv}, {bits};"));
            k.ins(format!("fma.rn.f32 {acc}, {wv}, {xv}, {acc};"));
        }
    }
}

fn warp_sum(k: &mut Kernel, acc: Reg) {
    for offset in [16, 8, 4, 2, 1] {
        let other = k.reg(Class::F32);
        k.ins(format!(
            "shfl.sync.bfly.b32 {other}, {acc}, {offset}, 31, -1;"
        ));
        k.ins(format!("add.f32 {acc}, {acc}, {other};"));
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

fn gelu(k: &mut Kernel, x: Reg) -> Reg {
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
    let t = k.reg(Class::F32);
    k.ins(format!("tanh.approx.f32 {t}, {inner};"));
    k.ins(format!("add.f32 {t}, {t}, {};", Kernel::f32_imm(1.0)));
    let half = k.reg(Class::F32);
    k.ins(format!("mul.f32 {half}, {x}, {};", Kernel::f32_imm(0.5)));
    let out = k.reg(Class::F32);
    k.ins(format!("mul.f32 {out}, {half}, {t};"));
    out
}

/// Parameters, in order: x `f32[I]`, w `bf16[rows, I]`, [bias `f32[rows]`], [residual
/// `f32[width]`], out `f32[width]`.
pub fn gemv(spec: &GemvSpec) -> String {
    assert!(spec.inputs % 8 == 0, "inputs must be a multiple of 8");
    let mut k = Kernel::new(&spec.name);
    let x = k.param_ptr("x");
    let w = k.param_ptr("w");
    let bias = spec.bias.then(|| k.param_ptr("bias"));
    let residual = spec.residual.then(|| k.param_ptr("residual"));
    let out = k.param_ptr("out");

    let (tid, block) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("mov.u32 {tid}, %tid.x;"));
    k.ins(format!("mov.u32 {block}, %ctaid.x;"));
    let (warp, lane) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("shr.u32 {warp}, {tid}, 5;"));
    k.ins(format!("and.b32 {lane}, {tid}, 31;"));
    let col = k.reg(Class::B32);
    k.ins(format!(
        "mad.lo.u32 {col}, {block}, {WARPS_PER_BLOCK}, {warp};"
    ));
    let outside = k.reg(Class::Pred);
    let done = k.label("done");
    // Whole warps leave together, so the shuffles below always see full warps.
    k.ins(format!("setp.ge.u32 {outside}, {col}, {};", spec.width));
    k.ins(format!("@{outside} bra {done};"));

    let geglu = spec.epilogue == Epilogue::GeGlu;
    let up_row = k.reg(Class::B32);
    k.ins(format!("add.u32 {up_row}, {col}, {};", spec.width));
    let acc = k.reg(Class::F32);
    k.ins(format!("mov.f32 {acc}, 0f00000000;"));
    let acc_up = k.reg(Class::F32);
    k.ins(format!("mov.f32 {acc_up}, 0f00000000;"));

    let i = k.reg(Class::B32);
    k.ins(format!("shl.b32 {i}, {lane}, 3;"));
    let (head, end) = (k.label("loop"), k.label("end"));
    k.place(&head);
    let stop = k.reg(Class::Pred);
    k.ins(format!("setp.ge.u32 {stop}, {i}, {};", spec.inputs));
    k.ins(format!("@{stop} bra {end};"));
    dot8(&mut k, w, x, col, i, spec.inputs, acc);
    if geglu {
        dot8(&mut k, w, x, up_row, i, spec.inputs, acc_up);
    }
    k.ins(format!("add.u32 {i}, {i}, 256;"));
    k.ins(format!("bra {head};"));
    k.place(&end);

    warp_sum(&mut k, acc);
    if geglu {
        warp_sum(&mut k, acc_up);
    }
    let not_first = k.reg(Class::Pred);
    k.ins(format!("setp.ne.u32 {not_first}, {lane}, 0;"));
    k.ins(format!("@{not_first} bra {done};"));
    if let Some(b) = bias {
        let bv = load_f32_at(&mut k, b, col);
        k.ins(format!("add.f32 {acc}, {acc}, {bv};"));
        if geglu {
            let bu = load_f32_at(&mut k, b, up_row);
            k.ins(format!("add.f32 {acc_up}, {acc_up}, {bu};"));
        }
    }
    let mut value = acc;
    match spec.epilogue {
        Epilogue::None => {}
        Epilogue::GeGlu => {
            let g = gelu(&mut k, acc);
            let v = k.reg(Class::F32);
            k.ins(format!("mul.f32 {v}, {g}, {acc_up};"));
            value = v;
        }
        Epilogue::SoftCap(cap) => {
            let v = k.reg(Class::F32);
            k.ins(format!(
                "mul.f32 {v}, {acc}, {};",
                Kernel::f32_imm(1.0 / cap)
            ));
            k.ins(format!("tanh.approx.f32 {v}, {v};"));
            k.ins(format!("mul.f32 {v}, {v}, {};", Kernel::f32_imm(cap)));
            value = v;
        }
    }
    if let Some(r) = residual {
        let rv = load_f32_at(&mut k, r, col);
        k.ins(format!("add.f32 {value}, {value}, {rv};"));
    }
    let off = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {off}, {col}, 4;"));
    let p = k.reg(Class::B64);
    k.ins(format!("add.u64 {p}, {out}, {off};"));
    k.ins(format!("st.global.f32 [{p}], {value};"));
    k.place(&done);
    k.finish()
}
