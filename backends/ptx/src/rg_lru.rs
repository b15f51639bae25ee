//! The fused RG-LRU step for one decode token: causal conv1d over the carried window, both
//! block-diagonal gates, decay and normaliser, the scan and the output gate (GELU of the `y`
//! branch), in one launch of many blocks, each finishing a few channels of one gate block
//! (`rg_lru_step`). The window is a ring of K rows on the GPU (`ring_row`).
use crate::builder::{Class, Kernel, Reg};
use crate::math::{exp, gelu, sigmoid};

/// How a weight is stored in device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    F32,
    Bf16,
}

impl Storage {
    /// Bytes of one element.
    pub fn bytes(self) -> u32 {
        match self {
            Storage::F32 => 4,
            Storage::Bf16 => 2,
        }
    }
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
    /// How both gates' matrices are stored (their biases are f32).
    pub gates: Storage,
    /// Multiply by GELU(y) (the recurrent block's other branch).
    pub gate_output: bool,
}

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

/// Threads per block of the chunk's gates kernel (`prefill::rg_lru_gates_tokens`): one per
/// channel of a gate block.
pub fn block_size(spec: &RgLruSpec) -> u32 {
    spec.channels / spec.blocks
}

/// Channels of a gate block that one block of the decode step finishes: the largest divisor
/// of the gate block's width up to 16 (16 for the published models' 256-channel blocks, so
/// their 10 gate blocks make 160 thread blocks).
pub fn step_columns(spec: &RgLruSpec) -> u32 {
    let b = block_size(spec);
    (1..=16.min(b)).rev().find(|d| b % d == 0).unwrap_or(1)
}

/// Groups of gate rows a decode-step block splits its dot products into: one thread per
/// (row group, column), about 256 threads.
fn step_row_groups(spec: &RgLruSpec) -> u32 {
    (256 / step_columns(spec)).max(1)
}

/// Blocks of the decode step: one per (gate block, group of `step_columns` channels).
pub fn step_grid(spec: &RgLruSpec) -> u32 {
    spec.channels / step_columns(spec)
}

/// Threads per block of the decode step.
pub fn step_block(spec: &RgLruSpec) -> u32 {
    step_columns(spec) * step_row_groups(spec)
}

/// The conv window on the GPU is a ring of K rows: the input at position p sits in row
/// `p mod K`. A step reads the rows of positions p-K+1..p-1 and writes row `p mod K`, which
/// holds p-K and which nobody reads at p, so the blocks that split a gate block (each
/// convolving all of its channels) never race with the block that stores a channel's input.
/// Row of position `pos - back` (for `pos ≥ back`; any row otherwise, the tap then counting
/// zero).
pub(crate) fn ring_row(k: &mut Kernel, pos: Reg, back: u32, width: u32) -> Reg {
    let row = k.reg(Class::B32);
    k.ins(format!("add.u32 {row}, {pos}, {};", width - back));
    k.ins(format!("rem.u32 {row}, {row}, {width};"));
    row
}

/// Parameters, in order: x `f32[C]`, position `i32[1]`, window `f32[K,C]` (a ring, see
/// `ring_row`), conv w `[C,K]`, conv bias `[C]`, input-gate w `[H,B,B]`, input-gate bias
/// `[H,B]`, recurrent-gate w, recurrent-gate bias, decay rate `f32[C]` (softplus of the
/// recurrent parameter), state `f32[C]`, [y `f32[C]`], out `f32[C]`. Window and state are
/// updated in place. Launch: `step_grid` blocks of `step_block` threads.
///
/// The two block-diagonal gates read 2·B² weights per gate block, most of the step's bytes: a
/// block per gate block (10 for the 2B model) would leave most of the GPU idle, so each block
/// takes `step_columns` channels of one gate block. It convolves all B channels of its gate
/// block into shared memory (cheap, and read from the ring only), splits the B rows of its
/// columns' dot products over its row groups (a warp reads whole row segments), sums the
/// groups' partials, then one thread per channel finishes the gates, the scan, the output
/// gate, and stores the channel's input into the ring.
pub fn rg_lru_step(s: &RgLruSpec) -> String {
    assert!(
        s.channels % s.blocks == 0,
        "channels must split into blocks"
    );
    let b = block_size(s);
    let (cs, rg, kk, c) = (step_columns(s), step_row_groups(s), s.width, s.channels);
    let threads = cs * rg;
    let mut k = Kernel::new(&s.name);
    k.shared("conv_out", 4 * b, 16);
    k.shared("partials", 4 * 2 * threads, 16);
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

    let (tid, blk) = k.thread_and_block();
    let (h, split) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("div.u32 {h}, {blk}, {};", b / cs));
    k.ins(format!("rem.u32 {split}, {blk}, {};", b / cs));
    let pos = k.reg(Class::B32);
    k.ins(format!("ld.global.u32 {pos}, [{position}];"));
    let sh = k.reg(Class::B64);
    k.ins(format!("mov.u64 {sh}, conv_out;"));
    // The ring rows of the previous K-1 positions, the same for every channel.
    let rows: Vec<Reg> = (1..kk)
        .map(|back| ring_row(&mut k, pos, back, kk))
        .collect();

    // Column `col` of the gate block is this thread's in the dot products below (rows r,
    // r + rg, ...), and its channel's if it finishes one (threads below `cs`).
    let (cc, r) = (k.reg(Class::B32), k.reg(Class::B32));
    k.ins(format!("rem.u32 {cc}, {tid}, {cs};"));
    k.ins(format!("div.u32 {r}, {tid}, {cs};"));
    let col = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {col}, {split}, {cs}, {cc};"));
    // Everything a load can fetch before the convolution is, so the step waits on memory
    // about once: the channel's biases, decay rate, state, y and x (every thread loads its
    // column's; only the finishing threads use them), and the gate weights of its rows
    // where they fit in registers (W[h, i, col] at (h·B + i)·B + col).
    let j = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {j}, {h}, {b}, {col};"));
    let bias_x = load_weight(&mut k, Storage::F32, igb, j);
    let bias_r = load_weight(&mut k, Storage::F32, rgb, j);
    let rate = addr4(&mut k, decay, j);
    let rv = k.reg(Class::F32);
    k.ins(format!("ld.global.nc.f32 {rv}, [{rate}];"));
    let st_at = addr4(&mut k, state, j);
    let old = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {old}, [{st_at}];"));
    let yv = y.map(|y| {
        let y_at = addr4(&mut k, y, j);
        let yv = k.reg(Class::F32);
        k.ins(format!("ld.global.f32 {yv}, [{y_at}];"));
        yv
    });
    let xj_at = addr4(&mut k, x, j);
    let xj = k.reg(Class::F32);
    k.ins(format!("ld.global.f32 {xj}, [{xj_at}];"));
    let wi = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {wi}, {h}, {b}, {r};"));
    k.ins(format!("mad.lo.u32 {wi}, {wi}, {b}, {col};"));
    let rows_each = b / rg;
    let preloaded: Option<Vec<(Reg, Reg)>> = (b % rg == 0 && rows_each <= 16).then(|| {
        (0..rows_each)
            .map(|u| {
                let wu = k.reg(Class::B32);
                k.ins(format!("add.u32 {wu}, {wi}, {};", u * rg * b));
                let wx = load_weight(&mut k, s.gates, igw, wu);
                let wr = load_weight(&mut k, s.gates, rgw, wu);
                (wx, wr)
            })
            .collect()
    });

    // Convolution of every channel of the gate block: tap t < K-1 reads the ring row of
    // position pos-(K-1-t), the last tap reads x; taps before the start of the text (position
    // < 0) count zero.
    let jj = k.reg(Class::B32);
    k.ins(format!("mov.u32 {jj}, {tid};"));
    k.strided(jj, b, threads, &mut |k| {
        let j = k.reg(Class::B32);
        k.ins(format!("mad.lo.u32 {j}, {h}, {b}, {jj};"));
        let acc = load_weight(k, s.conv, conv_b, j);
        let row_taps = k.reg(Class::B32);
        k.ins(format!("mul.lo.u32 {row_taps}, {j}, {kk};"));
        for tap in 0..kk {
            let back = kk - 1 - tap;
            let u = k.reg(Class::F32);
            let idx = k.reg(Class::B32);
            if back == 0 {
                k.ins(format!("mov.u32 {idx}, {j};"));
                let at = addr4(k, x, idx);
                k.ins(format!("ld.global.f32 {u}, [{at}];"));
            } else {
                k.ins(format!(
                    "mad.lo.u32 {idx}, {}, {c}, {j};",
                    rows[back as usize - 1]
                ));
                let at = addr4(k, window, idx);
                k.ins(format!("ld.global.f32 {u}, [{at}];"));
            }
            let wi = k.reg(Class::B32);
            k.ins(format!("add.u32 {wi}, {row_taps}, {tap};"));
            let w = load_weight(k, s.conv, conv_w, wi);
            if back == 0 {
                k.ins(format!("fma.rn.f32 {acc}, {w}, {u}, {acc};"));
            } else {
                let valid = k.reg(Class::Pred);
                k.ins(format!("setp.ge.s32 {valid}, {pos}, {back};"));
                k.ins(format!("@{valid} fma.rn.f32 {acc}, {w}, {u}, {acc};"));
            }
        }
        let sh_off = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {sh_off}, {jj}, 4;"));
        k.ins(format!("add.u64 {sh_off}, {sh_off}, {sh};"));
        k.ins(format!("st.shared.f32 [{sh_off}], {acc};"));
    });
    k.ins("bar.sync 0;");

    // This thread's share of both gates' dot products: rows r, r + rg, r + 2·rg, ... of
    // column `col`, in that order (the weights loaded above, or here four rows at a time).
    let (zx, zr) = (k.reg(Class::F32), k.reg(Class::F32));
    k.ins(format!("mov.f32 {zx}, 0f00000000;"));
    k.ins(format!("mov.f32 {zr}, 0f00000000;"));
    let conv_at = |k: &mut Kernel, row: Reg| -> Reg {
        let at = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {at}, {row}, 4;"));
        k.ins(format!("add.u64 {at}, {at}, {sh};"));
        let cv = k.reg(Class::F32);
        k.ins(format!("ld.shared.f32 {cv}, [{at}];"));
        cv
    };
    // Row's conv output `cv` times its weights in both gates.
    let add_row = |k: &mut Kernel, cv: Reg, wx: Reg, wr: Reg| {
        k.ins(format!("fma.rn.f32 {zx}, {cv}, {wx}, {zx};"));
        k.ins(format!("fma.rn.f32 {zr}, {cv}, {wr}, {zr};"));
    };
    if let Some(weights) = preloaded {
        for (u, (wx, wr)) in weights.into_iter().enumerate() {
            let iu = k.reg(Class::B32);
            k.ins(format!("add.u32 {iu}, {r}, {};", u as u32 * rg));
            let cv = conv_at(&mut k, iu);
            add_row(&mut k, cv, wx, wr);
        }
    } else {
        let i = k.reg(Class::B32);
        k.ins(format!("mov.u32 {i}, {r};"));
        let step = |k: &mut Kernel, i: Reg, wi: Reg, n: u32| {
            let mut loaded = Vec::new();
            for u in 0..n {
                let (iu, wu) = (k.reg(Class::B32), k.reg(Class::B32));
                k.ins(format!("add.u32 {iu}, {i}, {};", u * rg));
                k.ins(format!("add.u32 {wu}, {wi}, {};", u * rg * b));
                let wx = load_weight(k, s.gates, igw, wu);
                let wr = load_weight(k, s.gates, rgw, wu);
                let cv = conv_at(k, iu);
                loaded.push((cv, wx, wr));
            }
            for (cv, wx, wr) in loaded {
                add_row(k, cv, wx, wr);
            }
            k.ins(format!("add.u32 {i}, {i}, {};", n * rg));
            k.ins(format!("add.u32 {wi}, {wi}, {};", n * rg * b));
        };
        k.unrolled(i, b, rg, 4, &mut |k, m| step(k, i, wi, m));
    }
    // Partials at [gate][r][cc].
    let ps = k.reg(Class::B64);
    k.ins(format!("mov.u64 {ps}, partials;"));
    let mine = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {mine}, {tid}, 4;"));
    k.ins(format!("add.u64 {mine}, {mine}, {ps};"));
    k.ins(format!("st.shared.f32 [{mine}], {zx};"));
    k.ins(format!("st.shared.f32 [{mine}+{}], {zr};", 4 * threads));
    k.ins("bar.sync 0;");

    // One thread per channel of this block finishes it.
    let done = k.label("done");
    k.leave_unless_below(tid, cs, &done);
    let (zx, zr) = (bias_x, bias_r);
    for group in 0..rg {
        let (px, pr) = (k.reg(Class::F32), k.reg(Class::F32));
        k.ins(format!("ld.shared.f32 {px}, [{mine}+{}];", 4 * cs * group));
        k.ins(format!(
            "ld.shared.f32 {pr}, [{mine}+{}];",
            4 * (threads + cs * group)
        ));
        k.ins(format!("add.f32 {zx}, {zx}, {px};"));
        k.ins(format!("add.f32 {zr}, {zr}, {pr};"));
    }

    // log a = -8 · sigmoid(zr) · softplus(Λ); a = exp(log a); the normaliser
    // sqrt(1 - a²) = sqrt(-expm1(2 log a)), with expm1 by its series near 0 where 1 - exp
    // would cancel (the reference computes it the same way).
    let cv = k.reg(Class::F32);
    let c_at = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {c_at}, {col}, 4;"));
    k.ins(format!("add.u64 {c_at}, {c_at}, {sh};"));
    k.ins(format!("ld.shared.f32 {cv}, [{c_at}];"));
    let (a, bv) = gated_input(&mut k, zx, zr, rv, cv, pos);
    let hv = k.reg(Class::F32);
    k.ins(format!("fma.rn.f32 {hv}, {a}, {old}, {bv};"));
    k.ins(format!("st.global.f32 [{st_at}], {hv};"));
    let mut o = hv;
    if let Some(yv) = yv {
        let g = gelu(&mut k, yv);
        let v = k.reg(Class::F32);
        k.ins(format!("mul.f32 {v}, {hv}, {g};"));
        o = v;
    }
    let out_at = addr4(&mut k, out, j);
    k.ins(format!("st.global.f32 [{out_at}], {o};"));
    // This position's input into its ring row.
    let slot = ring_row(&mut k, pos, 0, kk);
    let idx = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {idx}, {slot}, {c}, {j};"));
    let at = addr4(&mut k, window, idx);
    k.ins(format!("st.global.f32 [{at}], {xj};"));
    k.place(&done);
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
