//! Instructions a warp or warpgroup executes together: `mma.sync`, `wgmma.mma_async`,
//! `ldmatrix`, `shfl.sync`.

use super::exec::*;
use super::memory::*;
use super::parse::*;
use super::{err, EmuError};

/// How an `mma`/`wgmma` widens its 16-bit operands: both `.bf16` or both `.f16`.
pub(super) fn operand_type(ins: &Instr) -> Result<fn(u16) -> f32, EmuError> {
    let of = |ty: &str| ins.op.iter().filter(|m| *m == ty).count() == 2;
    if of("bf16") {
        Ok(bf16_to_f32)
    } else if of("f16") {
        Ok(f16_to_f32)
    } else {
        err(format!(
            "`{}`: only bf16 or f16 operands are emulated",
            ins.line
        ))
    }
}

/// Lane `lane`'s share of a 16×16 A fragment (registers `a` of thread `t`), placed at rows
/// `row0`..: register r holds A[g + 8·(r & 1)][2q + 8·(r >> 1) + {0, 1}], low half first.
pub(super) fn a_fragment(
    am: &mut [[f32; 16]; 64],
    row0: usize,
    lane: usize,
    t: &Thread,
    a: &[usize],
    widen: fn(u16) -> f32,
) {
    let (g, q) = (lane / 4, lane % 4);
    for (r, &reg) in a.iter().enumerate() {
        let (row, col) = (row0 + g + 8 * (r & 1), 2 * q + 8 * (r >> 1));
        am[row][col] = widen(t.regs[reg] as u16);
        am[row][col + 1] = widen((t.regs[reg] >> 16) as u16);
    }
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0..d3}, {a0..a3}, {b0, b1},
/// {c0..c3}`: D (16×8) = A (16×16) · B (16×8) + C, fragments laid out over the warp as the PTX
/// ISA's "Matrix Fragments for mma.m16n8k16" says: with g = lane / 4 and q = lane % 4, register
/// a_r holds A[g + 8·(r & 1)][2q + 8·(r >> 1) + {0, 1}] (low half first), b_r holds
/// B[2q + 8·r + {0, 1}][g], c/d_i holds C[g + 8·(i >> 1)][2q + (i & 1)].
/// `.f16.f16` operands are laid out the same way.
pub(super) fn mma(ins: &Instr, warp: &mut [Thread]) -> Result<(), EmuError> {
    let widen = operand_type(ins)?;
    if !ins.op.iter().any(|m| m == "m16n8k16") || warp.len() != 32 {
        return err(format!("`{}`: only m16n8k16 is emulated", ins.line));
    }
    let regs = |o: &Operand, n: usize| -> Result<Vec<usize>, EmuError> {
        match o {
            Operand::Vec(v) if v.len() == n => Ok(v.clone()),
            _ => err(format!("`{}`: a {{…}} of {n} registers expected", ins.line)),
        }
    };
    let (d, a, b, c) = (
        regs(&ins.args[0], 4)?,
        regs(&ins.args[1], 4)?,
        regs(&ins.args[2], 2)?,
        regs(&ins.args[3], 4)?,
    );
    let half = |word: u64, hi: bool| widen(if hi { (word >> 16) as u16 } else { word as u16 });
    let mut am = [[0f32; 16]; 64];
    let mut bm = [[0f32; 8]; 16];
    let mut cm = [[0f32; 8]; 16];
    for (lane, t) in warp.iter().enumerate() {
        let (g, q) = (lane / 4, lane % 4);
        a_fragment(&mut am, 0, lane, t, &a, widen);
        for (r, &reg) in b.iter().enumerate() {
            let k = 2 * q + 8 * r;
            bm[k][g] = half(t.regs[reg], false);
            bm[k + 1][g] = half(t.regs[reg], true);
        }
        for (i, &reg) in c.iter().enumerate() {
            cm[g + 8 * (i >> 1)][2 * q + (i & 1)] = f32_of(t.regs[reg]);
        }
    }
    for (lane, t) in warp.iter_mut().enumerate() {
        let (g, q) = (lane / 4, lane % 4);
        for (i, &reg) in d.iter().enumerate() {
            let (row, col) = (g + 8 * (i >> 1), 2 * q + (i & 1));
            let mut acc = cm[row][col] as f64;
            for (k, arow) in am[row].iter().enumerate() {
                acc += *arow as f64 * bm[k][col] as f64;
            }
            t.set(reg, bits_f32(acc as f32));
        }
    }
    Ok(())
}

/// `wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{bf16,f16} {d0..d(N/2-1)}, {a0..a3},
/// b_desc, scale_d, 1, 1, 0`: D (64×N) = A (64×16) · B (16×N) + (scale_d ? D : 0), by the
/// warpgroup's 128 threads, as the PTX ISA's "Asynchronous Warpgroup Level Matrix" sections lay
/// them out. A from registers: warp w of the group holds rows 16w.. as `mma.m16n8k16` holds its
/// A. D: register 4j + i of lane (g, q) of warp w is D[16w + g + 8·(i >> 1)][8j + 2q + (i & 1)].
/// B from shared memory through the 64-bit descriptor (start address >> 4 in bits 0–13, the
/// leading dimension byte offset >> 4 in 16–29, the stride dimension byte offset >> 4 in
/// 32–45, swizzle in 62–63), K-major (`imm-trans-b` 0) without swizzle: core matrices of 8
/// rows (along N) of 16 bytes (8 elements along K), 128 contiguous bytes each; the core matrix
/// holding (k, n) starts at start + (n / 8)·SBO + (k / 8)·LBO, and the element is at row n % 8,
/// column k % 8 of it. Only that layout is emulated.
pub(super) fn wgmma(
    ins: &Instr,
    group: &mut [Thread],
    shared: &mut SharedMemory,
    who: Access,
) -> Result<AsyncMma, EmuError> {
    let widen = operand_type(ins)?;
    let n = ins
        .op
        .iter()
        .find_map(|m| {
            m.strip_prefix("m64n")?
                .strip_suffix("k16")?
                .parse::<usize>()
                .ok()
        })
        .filter(|n| n % 8 == 0 && (8..=256).contains(n))
        .ok_or_else(|| EmuError(format!("`{}`: only m64nNk16 is emulated", ins.line)))?;
    if !ins.op.iter().any(|m| m == "f32") || ins.args.len() != 7 {
        return err(format!(
            "`{}`: f32 accumulators and A from registers expected",
            ins.line
        ));
    }
    let regs = |o: &Operand, len: usize| -> Result<Vec<usize>, EmuError> {
        match o {
            Operand::Vec(v) if v.len() == len => Ok(v.clone()),
            _ => err(format!(
                "`{}`: a {{…}} of {len} registers expected",
                ins.line
            )),
        }
    };
    let (d, a) = (regs(&ins.args[0], n / 2)?, regs(&ins.args[1], 4)?);
    // What other instructions wrote to its operands must be fenced (`wgmma.fence`) first.
    if group
        .iter()
        .any(|t| d.iter().chain(&a).any(|&r| t.unfenced[r]))
    {
        return err(format!(
            "`{}`: reads registers written since the last wgmma.fence",
            ins.line
        ));
    }
    // Of the registers of `wgmma`s still in flight, it may only accumulate into theirs.
    if group.iter().any(|t| {
        d.iter().any(|&r| t.in_flight[r] & ASYNC_READS != 0)
            || a.iter().any(|&r| t.in_flight[r] & ASYNC_WRITES != 0)
    }) {
        return err(format!(
            "`{}`: its operands are registers another wgmma in flight reads or writes",
            ins.line
        ));
    }
    // Every thread must give the same descriptor and scale-d; read them off thread 0.
    let scalar = |t: &Thread, o: &Operand| -> Result<u64, EmuError> {
        match o {
            Operand::Reg(r) => Ok(t.regs[*r]),
            Operand::Imm(v) => Ok(*v),
            _ => err(format!("`{}`: a register or immediate expected", ins.line)),
        }
    };
    let desc = scalar(&group[0], &ins.args[2])?;
    let scale_d = scalar(&group[0], &ins.args[3])? != 0;
    if group
        .iter()
        .any(|t| scalar(t, &ins.args[2]).ok() != Some(desc))
    {
        return err(format!(
            "`{}`: the descriptor differs between threads",
            ins.line
        ));
    }
    let imm = |i: usize| match ins.args[i] {
        Operand::Imm(v) => Some(v as i64),
        _ => None,
    };
    if imm(4) != Some(1) || imm(5) != Some(1) || imm(6) != Some(0) {
        return err(format!(
            "`{}`: only imm-scale 1, 1 and imm-trans-b 0 are emulated",
            ins.line
        ));
    }
    let field = |lo: u32| ((desc >> lo) & 0x3FFF) << 4;
    let (start, lbo, sbo) = (field(0), field(16), field(32));
    if desc >> 62 != 0 || (desc >> 49) & 7 != 0 {
        return err(format!(
            "`{}`: only descriptors without swizzle or base offset are emulated",
            ins.line
        ));
    }
    let mut bm = vec![[0f32; 256]; 16];
    let mut rows = Vec::with_capacity(n * 2);
    for core_n in 0..n / 8 {
        for core_k in 0..2 {
            for row in 0..8 {
                let at = start + core_n as u64 * sbo + core_k as u64 * lbo + 16 * row as u64;
                rows.push(at);
                let bytes = shared.read_async(at, 16, who)?;
                for e in 0..8 {
                    let h = u16::from_le_bytes([bytes[2 * e], bytes[2 * e + 1]]);
                    bm[8 * core_k + e][8 * core_n + row] = widen(h);
                }
            }
        }
    }
    let mut am = [[0f32; 16]; 64];
    for (index, t) in group.iter().enumerate() {
        a_fragment(&mut am, 16 * (index / 32), index % 32, t, &a, widen);
    }
    for (index, t) in group.iter_mut().enumerate() {
        let (w, lane) = (index / 32, index % 32);
        let (g, q) = (lane / 4, lane % 4);
        for (x, &reg) in d.iter().enumerate() {
            let (j, i) = (x / 4, x % 4);
            let (row, col) = (16 * w + g + 8 * (i >> 1), 8 * j + 2 * q + (i & 1));
            let mut acc = if scale_d {
                f32_of(t.regs[reg]) as f64
            } else {
                0.0
            };
            for (k, arow) in am[row].iter().enumerate() {
                acc += *arow as f64 * bm[k][col] as f64;
            }
            t.regs[reg] = bits_f32(acc as f32);
        }
    }
    Ok(AsyncMma {
        rows,
        reads: a,
        writes: d,
    })
}

/// What a `wgmma` issued keeps in flight until its warpgroup's `wgmma.wait_group` retires
/// it: the shared-memory rows (16 bytes each) it read, the registers it reads (A) and
/// writes (D). Here it computed D when issued; on the hardware the tensor cores may read
/// and write any of these until then.
pub(super) struct AsyncMma {
    pub(super) rows: Vec<u64>,
    pub(super) reads: Vec<usize>,
    pub(super) writes: Vec<usize>,
}

/// A warpgroup's `wgmma`s in flight: those since its last `commit_group`, then its
/// committed groups, oldest first.
#[derive(Default)]
pub(super) struct AsyncGroups {
    open: Vec<AsyncMma>,
    committed: std::collections::VecDeque<Vec<AsyncMma>>,
}

impl AsyncGroups {
    /// A `wgmma` issued by the warpgroup's threads (`group`).
    pub(super) fn issue(&mut self, mma: AsyncMma, group: &mut [Thread]) {
        self.open.push(mma);
        self.mark(group);
    }

    /// `wgmma.commit_group`: the open `wgmma`s become a group.
    pub(super) fn commit(&mut self) {
        let open = std::mem::take(&mut self.open);
        self.committed.push_back(open);
    }

    /// `wgmma.wait_group n` by the warpgroup's threads (`group`): every committed group but
    /// the newest `n` is retired; its rows are read as of now (`who`, this epoch), and the
    /// threads' registers stay marked only for the `wgmma`s still in flight.
    pub(super) fn wait(
        &mut self,
        n: usize,
        group: &mut [Thread],
        shared: &mut SharedMemory,
        who: Access,
    ) -> Result<(), EmuError> {
        while self.committed.len() > n {
            for mma in self.committed.pop_front().into_iter().flatten() {
                for &at in &mma.rows {
                    shared.retire_async(at, who)?;
                }
            }
        }
        self.mark(group);
        Ok(())
    }

    /// The threads' `in_flight` flags: the registers of the `wgmma`s still in flight.
    fn mark(&self, group: &mut [Thread]) {
        let pending: Vec<&AsyncMma> = self.committed.iter().flatten().chain(&self.open).collect();
        for t in group.iter_mut() {
            t.in_flight.fill(0);
            for mma in &pending {
                for &r in &mma.reads {
                    t.in_flight[r] |= ASYNC_READS;
                }
                for &r in &mma.writes {
                    t.in_flight[r] |= ASYNC_WRITES;
                }
            }
        }
    }
}

/// Memory accesses must be aligned to their whole width (a `v4.f32` to 16 bytes), as on the
/// hardware, where a misaligned access is a launch error.
pub(super) fn aligned(addr: u64, width: usize) -> Result<(), EmuError> {
    if addr % width as u64 != 0 {
        return err(format!("misaligned {width}-byte access at {addr:#x}"));
    }
    Ok(())
}

/// `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16 {r0..}, [addr]` (N = 1, 2, 4): lanes
/// 8m..8m+7 give the shared addresses of the 8 rows (16 bytes each) of matrix m, and register
/// r_m of lane L receives the 32 bits at row L / 4, bytes 4·(L % 4) of matrix m; with `.trans`,
/// the matrix's transpose: the 16-bit elements at (row 2·(L % 4), column L / 4) in its low half
/// and (row 2·(L % 4) + 1, column L / 4) in its high half, as the PTX ISA's "Warp-level matrix
/// load instruction: ldmatrix" lays them out.
pub(super) fn ldmatrix(
    ins: &Instr,
    warp: &mut [Thread],
    shared: &mut SharedMemory,
    who: impl Fn(usize) -> Access,
) -> Result<Vec<usize>, EmuError> {
    let count = match ins
        .op
        .iter()
        .find(|m| m.starts_with('x'))
        .map(|m| m.as_str())
    {
        Some("x1") => 1,
        Some("x2") => 2,
        Some("x4") => 4,
        _ => return err(format!("`{}`: ldmatrix .x1, .x2 or .x4 expected", ins.line)),
    };
    if !ins.op.iter().any(|m| m == "shared") {
        return err(format!("`{}`: only shared ldmatrix is emulated", ins.line));
    }
    let transposed = ins.op.iter().any(|m| m == "trans");
    if warp.len() != 32 {
        return err(format!("`{}`: a whole warp must take part", ins.line));
    }
    let Operand::Vec(dst) = &ins.args[0] else {
        return err(format!("`{}`: a {{…}} of registers expected", ins.line));
    };
    if dst.len() != count {
        return err(format!("`{}`: {count} registers expected", ins.line));
    }
    let Operand::Mem(base, off) = &ins.args[1] else {
        return err(format!("`{}`: an address expected", ins.line));
    };
    let shared_len = shared.bytes.len();
    let row_address = |lane: usize| -> Result<usize, EmuError> {
        let at = match base {
            Base::Reg(r) => warp[lane].regs[*r].wrapping_add(*off as u64),
            Base::Shared(a) => a.wrapping_add(*off as u64),
            _ => return err(format!("`{}`: a shared address expected", ins.line)),
        } as usize;
        if at % 16 != 0 || at + 16 > shared_len {
            return err(format!(
                "`{}`: row address {at} unaligned or out of shared memory",
                ins.line
            ));
        }
        Ok(at)
    };
    let mut words = vec![[0u64; 4]; 32];
    for m in 0..count {
        for (lane, w) in words.iter_mut().enumerate() {
            // Each row is read by the lane that gave its address.
            let mut b = [0u8; 8];
            if transposed {
                for half in 0..2 {
                    let giver = 8 * m + 2 * (lane % 4) + half;
                    let at = row_address(giver)? + 2 * (lane / 4);
                    b[2 * half..2 * half + 2].copy_from_slice(shared.read(
                        at as u64,
                        2,
                        who(giver),
                    )?);
                }
            } else {
                let giver = 8 * m + lane / 4;
                let at = row_address(giver)? + 4 * (lane % 4);
                b[..4].copy_from_slice(shared.read(at as u64, 4, who(giver))?);
            }
            w[m] = u64::from_le_bytes(b);
        }
    }
    // The rows it read, in the order their lanes gave them.
    let rows = (0..8 * count).map(row_address).collect();
    for (t, w) in warp.iter_mut().zip(&words) {
        for (m, &reg) in dst.iter().enumerate() {
            t.set(reg, w[m]);
        }
    }
    rows
}

pub(super) fn shuffle(ins: &Instr, warp: &mut [Thread]) -> Result<(), EmuError> {
    // shfl.sync.MODE.b32 d, a, b, c, mask
    let mode = ins.op[2].as_str();
    let (Operand::Reg(d), Operand::Reg(a)) = (&ins.args[0], &ins.args[1]) else {
        return err(format!("`{}`: registers expected", ins.line));
    };
    let values: Vec<u64> = warp.iter().map(|t| t.regs[*a]).collect();
    let lanes = warp.len();
    for (lane, t) in warp.iter_mut().enumerate() {
        let b = match &ins.args[2] {
            Operand::Imm(v) => *v as usize,
            Operand::Reg(r) => t.regs[*r] as u32 as usize,
            _ => return err(format!("`{}`: bad lane operand", ins.line)),
        };
        let src = match mode {
            "bfly" => lane ^ b,
            "down" => {
                if lane + b < lanes {
                    lane + b
                } else {
                    lane
                }
            }
            "up" => lane.checked_sub(b).unwrap_or(lane),
            "idx" => b & 31,
            other => return err(format!("shfl mode `{other}` not supported")),
        };
        t.set(*d, values[src.min(lanes - 1)]);
    }
    Ok(())
}
