//! The interpreter's fragment layouts (`mma.m16n8k16`, `wgmma.m64nNk16` with A from registers
//! and B through a descriptor, `ldmatrix` plain and transposed) checked against a second reading
//! of the same hardware: the layouts NVIDIA's CUTLASS (CuTe) library states for these
//! instructions (`cute/atom/mma_traits_sm80.hpp`, `mma_traits_sm90_gmma.hpp`,
//! `copy_traits_sm75.hpp`). The interpreter's own code reads the PTX ISA's fragment figures;
//! a misreading there would pass every kernel test here and fail on a GPU, so each test places
//! the operands where CuTe's layouts say, runs the instruction in the interpreter, and reads
//! the result back through CuTe's layouts.
//!
//! A CuTe layout maps (thread, value) to an index: each of the two coordinates is split over
//! its modes, first mode fastest, and the index is the sum of each mode's coordinate times its
//! stride. For MMA operands the index is column-major in the operand (A: m + M·k; B: n + N·k;
//! C: m + M·n); a thread's values fill its 32-bit registers in order, two 16-bit values a
//! register, low half first. For `ldmatrix` the index is a bit of the 32 rows × 128 bits that
//! the lanes' addresses name.

use griffin_backend_ptx::emu::{run, Launch, Memory, Module};

/// A CuTe layout's thread or value modes: (size, stride) pairs, first mode fastest.
type Modes = &'static [(usize, usize)];

/// The index `coord` maps to through `modes`.
fn index(modes: Modes, mut coord: usize) -> usize {
    let mut at = 0;
    for &(size, stride) in modes {
        at += (coord % size) * stride;
        coord /= size;
    }
    assert_eq!(coord, 0, "coordinate past the layout");
    at
}

/// (thread modes, value modes) of one operand.
struct Layout(Modes, Modes);

impl Layout {
    fn at(&self, thread: usize, value: usize) -> usize {
        index(self.0, thread) + index(self.1, value)
    }
}

// SM80_16x8x16_F32BF16BF16F32_TN (its F16 twin's layouts).
const MMA_A: Layout = Layout(&[(4, 32), (8, 1)], &[(2, 16), (2, 8), (2, 128)]);
const MMA_B: Layout = Layout(&[(4, 16), (8, 1)], &[(2, 8), (2, 64)]);
// SM80_16x8_Row.
const MMA_C: Layout = Layout(&[(4, 32), (8, 1)], &[(2, 16), (2, 8)]);
// GMMA: A from registers (64 × 16) and the accumulators (CLayout_64xN, here N = 16).
const WG_A: Layout = Layout(&[(4, 128), (8, 1), (4, 16)], &[(2, 64), (2, 8), (2, 512)]);
const WG_C16: Layout = Layout(&[(4, 128), (8, 1), (4, 16)], &[(2, 64), (2, 8), (2, 512)]);
// SM75_U32x4_LDSM_N and SM75_U16x8_LDSM_T: (destination lane, bit of its 4 registers) -> bit
// of the rows; source lane s gives row s (bits 128·s..).
const LDSM_N: Layout = Layout(&[(32, 32)], &[(32, 1), (4, 1024)]);
const LDSM_T: Layout = Layout(&[(4, 256), (8, 16)], &[(16, 1), (2, 128), (4, 1024)]);

/// Small integers as bf16 bits (exact), different for each `i`.
fn value(i: usize) -> f32 {
    ((i * 7 + 3) % 11) as f32 - 5.0
}

fn bf16(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

/// Thread `t`'s registers holding `n` 16-bit values of an operand laid out by `layout` over a
/// column-major matrix `m` rows tall.
fn packed(
    layout: &Layout,
    t: usize,
    n: usize,
    m: usize,
    get: impl Fn(usize, usize) -> f32,
) -> Vec<u32> {
    (0..n / 2)
        .map(|r| {
            let half = |v: usize| {
                let i = layout.at(t, v);
                bf16(get(i % m, i / m)) as u32
            };
            half(2 * r) | half(2 * r + 1) << 16
        })
        .collect()
}

/// Runs `ptx`'s kernel `k` on one block of `threads` with the given input words; the first
/// `out_words` words of its output.
fn run_kernel(ptx: &str, threads: u32, input: &[u32], out_words: usize) -> Vec<u32> {
    let m = Module::parse(ptx).unwrap();
    let mut mem = Memory::new();
    let params = [mem.alloc_u32(input), mem.alloc_u32(&vec![0; out_words])];
    run(
        &m,
        "k",
        &Launch {
            grid: 1,
            block: threads,
            params: &params,
        },
        &mut mem,
    )
    .unwrap();
    mem.read_u32(params[1], out_words).unwrap()
}

/// Kernel `k(inp, out)`: `body` after the registers' declarations and the two parameters'
/// loads into `%rd0` (input) and `%rd1` (output), `%r0` the thread index and `%rd7` the
/// shared tile `s` (512 bytes).
fn kernel(body: &str) -> String {
    format!(
        "
.visible .entry k(
	.param .u64 inp,
	.param .u64 out
)
{{
	.shared .align 16 .b8 s[512];
	.reg .b32 %r<12>;
	.reg .b64 %rd<10>;
	.reg .f32 %f<8>;
	.reg .pred %p<2>;
	ld.param.u64 %rd0, [inp];
	ld.param.u64 %rd1, [out];
	mov.u32 %r0, %tid.x;
	mov.u64 %rd7, s;
{body}
	ret;
}}
"
    )
}

fn floats(words: Vec<u32>) -> Vec<f32> {
    words.into_iter().map(f32::from_bits).collect()
}

#[test]
fn mma_m16n8k16_fragments_are_cutes() {
    let a = |m: usize, k: usize| value(m * 16 + k);
    let b = |k: usize, n: usize| value(3 * k + 5 * n + 1);
    let c = |m: usize, n: usize| (m * 8 + n) as f32;
    // Per thread 12 words: A (4 registers), B (2), pad (2), C (4).
    let mut input = vec![0u32; 32 * 12];
    for t in 0..32 {
        let w = &mut input[12 * t..12 * t + 12];
        w[..4].copy_from_slice(&packed(&MMA_A, t, 8, 16, a));
        w[4..6].copy_from_slice(&packed(&MMA_B, t, 4, 8, |n, k| b(k, n)));
        for v in 0..4 {
            let i = MMA_C.at(t, v);
            w[8 + v] = c(i % 16, i / 16).to_bits();
        }
    }
    let ptx = kernel(
        "	mul.wide.u32 %rd2, %r0, 48;
	add.u64 %rd3, %rd0, %rd2;
	ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd3];
	ld.global.v2.b32 {%r5, %r6}, [%rd3+16];
	ld.global.v4.f32 {%f0, %f1, %f2, %f3}, [%rd3+32];
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f4, %f5, %f6, %f7}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f0, %f1, %f2, %f3};
	mul.wide.u32 %rd2, %r0, 16;
	add.u64 %rd4, %rd1, %rd2;
	st.global.v4.f32 [%rd4], {%f4, %f5, %f6, %f7};",
    );
    let d = floats(run_kernel(&ptx, 32, &input, 32 * 4));
    for t in 0..32 {
        for v in 0..4 {
            let i = MMA_C.at(t, v);
            let (m, n) = (i % 16, i / 16);
            let want = c(m, n) + (0..16).map(|k| a(m, k) * b(k, n)).sum::<f32>();
            assert_eq!(d[4 * t + v], want, "thread {t} value {v}: D[{m}][{n}]");
        }
    }
}

/// `wgmma.m64n16k16` with B in shared memory as CuTe's K-major canonical layout without
/// swizzle, `((8, n), (8, 2)) : ((16 B, SBO), (2 B, LBO))` over (n, k): with the leading
/// (k) offset smaller than the stride (n) offset, and the other way round.
#[test]
fn wgmma_m64nk16_fragments_and_descriptor_are_cutes() {
    let a = |m: usize, k: usize| value(m * 16 + k);
    let b = |k: usize, n: usize| value(3 * k + 5 * n + 2);
    let c = |m: usize, n: usize| (m * 16 + n) as f32;
    for (lbo, sbo) in [(128usize, 256usize), (256, 128)] {
        // Words 0..128: the B tile's 512 bytes as laid out in shared memory; then per thread
        // 12 words: A (4 registers), C (8).
        let mut tile = vec![0u16; 256];
        for n in 0..16 {
            for k in 0..16 {
                let byte = (n % 8) * 16 + (n / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo;
                tile[byte / 2] = bf16(b(k, n));
            }
        }
        let mut input: Vec<u32> = tile
            .chunks(2)
            .map(|p| p[0] as u32 | (p[1] as u32) << 16)
            .collect();
        for t in 0..128 {
            input.extend(packed(&WG_A, t, 8, 64, a));
            input.extend((0..8).map(|v| {
                let i = WG_C16.at(t, v);
                c(i % 64, i / 64).to_bits()
            }));
        }
        let desc = ((lbo as u64 >> 4) << 16) | ((sbo as u64 >> 4) << 32);
        let ptx = kernel(&format!(
            "	setp.lt.u32 %p0, %r0, 32;
	mul.wide.u32 %rd2, %r0, 16;
	add.u64 %rd3, %rd0, %rd2;
	@%p0 ld.global.v4.b32 {{%r1, %r2, %r3, %r4}}, [%rd3];
	add.u64 %rd4, %rd7, %rd2;
	@%p0 st.shared.v4.b32 [%rd4], {{%r1, %r2, %r3, %r4}};
	fence.proxy.async.shared::cta;
	bar.sync 0;
	mul.wide.u32 %rd2, %r0, 48;
	add.u64 %rd3, %rd0, %rd2;
	ld.global.v4.b32 {{%r5, %r6, %r7, %r8}}, [%rd3+512];
	ld.global.v4.f32 {{%f0, %f1, %f2, %f3}}, [%rd3+528];
	ld.global.v4.f32 {{%f4, %f5, %f6, %f7}}, [%rd3+544];
	shr.u64 %rd5, %rd7, 4;
	and.b64 %rd5, %rd5, 16383;
	or.b64 %rd5, %rd5, {desc};
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {{%f0, %f1, %f2, %f3, %f4, %f5, %f6, %f7}}, {{%r5, %r6, %r7, %r8}}, %rd5, 1, 1, 1, 0;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 0;
	mul.wide.u32 %rd2, %r0, 32;
	add.u64 %rd6, %rd1, %rd2;
	st.global.v4.f32 [%rd6], {{%f0, %f1, %f2, %f3}};
	st.global.v4.f32 [%rd6+16], {{%f4, %f5, %f6, %f7}};"
        ));
        let d = floats(run_kernel(&ptx, 128, &input, 128 * 8));
        for t in 0..128 {
            for v in 0..8 {
                let i = WG_C16.at(t, v);
                let (m, n) = (i % 64, i / 64);
                let want = c(m, n) + (0..16).map(|k| a(m, k) * b(k, n)).sum::<f32>();
                assert_eq!(
                    d[8 * t + v],
                    want,
                    "LBO {lbo}, SBO {sbo}: thread {t} value {v}: D[{m}][{n}]"
                );
            }
        }
    }
}

/// `ldmatrix.x4` and `ldmatrix.x4.trans`: lane s gives the address of row s (the rows stored
/// in another order, so the addresses decide); every bit of every lane's four registers is the
/// row bit CuTe's layout names.
#[test]
fn ldmatrix_x4_plain_and_transposed_are_cutes() {
    // Row s is stored at slot (5·s + 3) mod 32; element e of row s holds 100·s + e.
    let slot = |s: usize| (5 * s + 3) % 32;
    let mut rows = vec![0u16; 32 * 8];
    for s in 0..32 {
        for e in 0..8 {
            rows[slot(s) * 8 + e] = (100 * s + e) as u16;
        }
    }
    let input: Vec<u32> = rows
        .chunks(2)
        .map(|p| p[0] as u32 | (p[1] as u32) << 16)
        .collect();
    for (trans, layout) in [("", &LDSM_N), (".trans", &LDSM_T)] {
        let ptx = kernel(&format!(
            "	mul.wide.u32 %rd2, %r0, 16;
	add.u64 %rd3, %rd0, %rd2;
	ld.global.v4.b32 {{%r1, %r2, %r3, %r4}}, [%rd3];
	add.u64 %rd4, %rd7, %rd2;
	st.shared.v4.b32 [%rd4], {{%r1, %r2, %r3, %r4}};
	bar.sync 0;
	mul.lo.u32 %r5, %r0, 5;
	add.u32 %r5, %r5, 3;
	rem.u32 %r5, %r5, 32;
	mul.wide.u32 %rd5, %r5, 16;
	add.u64 %rd5, %rd7, %rd5;
	ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{%r6, %r7, %r8, %r9}}, [%rd5];
	add.u64 %rd6, %rd1, %rd2;
	st.global.v4.b32 [%rd6], {{%r6, %r7, %r8, %r9}};"
        ));
        let got = run_kernel(&ptx, 32, &input, 128);
        for t in 0..32 {
            for bit in 0..128 {
                let at = layout.at(t, bit);
                let (row, within) = (at / 128, at % 128);
                let want = ((100 * row + within / 16) >> (within % 16)) & 1;
                let have = (got[4 * t + bit / 32] >> (bit % 32)) & 1;
                assert_eq!(
                    have as usize,
                    want,
                    "ldmatrix{trans}: lane {t} register {} bit {}",
                    bit / 32,
                    bit % 32
                );
            }
        }
    }
}
