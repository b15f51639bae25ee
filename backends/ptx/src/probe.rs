//! Kernels to run on a GPU beside this crate's interpreter, to say which instruction family a
//! device disagrees on before a whole model is blamed: the tensor-core projections (`ldmatrix`,
//! `mma.sync` on split, bf16 and f16 operands with row scales, `wgmma` through its shared-memory
//! descriptor, k parts and their reduction), the RG-LRU's gates (`ldmatrix.trans`) and chunk
//! attention on tensor cores. Each case
//! is a small module, its buffers (random, deterministic) and launches; the interpreter's
//! results are the expected ones. `griffin-gpu-probe` runs them on the device
//! (`scripts/gpu-check.sh` first of all), the tests on the stand-in driver.

use crate::emu::{run, EmuError, Launch, Memory, Module};
use crate::gemv::{Epilogue, GemvSpec};
use crate::prefill::{elementwise_grid, NORM_BLOCK};
use crate::rg_lru::{RgLruSpec, Storage};
use crate::tc::{
    gates_tc_grid, gates_tc_token_warps, gemm_reduce_tokens, gemm_tokens_tc,
    gemm_tokens_tc_partial, rg_lru_gates_tc, tc_block, tc_grid, tc_token_warps, TcConfig, TcInputs,
    TcMma,
};

/// One launch: a kernel of the case's module over some of its buffers, in parameter order.
pub struct ProbeLaunch {
    pub kernel: String,
    pub grid: u32,
    pub block: u32,
    pub params: Vec<usize>,
}

/// A module, its buffers' initial bytes and its launches; `outputs` are the buffers (f32
/// rows of the given length) to compare afterwards.
pub struct ProbeCase {
    pub name: String,
    pub ptx: String,
    pub buffers: Vec<Vec<u8>>,
    pub launches: Vec<ProbeLaunch>,
    pub outputs: Vec<(usize, usize)>,
}

impl ProbeCase {
    /// Every buffer's bytes after the launches, run by the interpreter.
    pub fn interpret(&self) -> Result<Vec<Vec<u8>>, EmuError> {
        let module = Module::parse(&self.ptx)?;
        let mut memory = Memory::new();
        let at: Vec<u64> = self.buffers.iter().map(|b| memory.alloc(b)).collect();
        for l in &self.launches {
            let params: Vec<u64> = l.params.iter().map(|&i| at[i]).collect();
            let launch = Launch {
                grid: l.grid,
                block: l.block,
                params: &params,
            };
            run(&module, &l.kernel, &launch, &mut memory)?;
        }
        self.buffers
            .iter()
            .zip(at)
            .map(|(b, a)| memory.read(a, b.len()).map(<[u8]>::to_vec))
            .collect()
    }

    /// The largest |got - want| over the output rows, each relative to its row's largest
    /// |want| (at least 1: rows with row scales reach ~1e12); infinite where either is NaN or
    /// infinite, or a buffer's size differs.
    pub fn difference(&self, want: &[Vec<u8>], got: &[Vec<u8>]) -> f32 {
        let mut worst = 0f32;
        for &(o, row) in &self.outputs {
            let (w, g) = match (want.get(o), got.get(o)) {
                (Some(w), Some(g)) if w.len() == g.len() => (floats(w), floats(g)),
                _ => return f32::INFINITY,
            };
            for (wr, gr) in w.chunks(row).zip(g.chunks(row)) {
                let scale = wr.iter().fold(1f32, |m, v| m.max(v.abs()));
                for (a, b) in wr.iter().zip(gr) {
                    let d = (a - b).abs();
                    if !d.is_finite() {
                        return f32::INFINITY;
                    }
                    worst = worst.max(d / scale);
                }
            }
        }
        worst
    }
}

/// Little-endian f32s.
fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Differences past this are a disagreement about what an instruction does, not rounding:
/// the device accumulates f32 in its own order where the interpreter sums in f64, ~1e-6 here;
/// a misplaced fragment or tile is of the order of the values themselves.
pub const PROBE_TOLERANCE: f32 = 1e-3;

/// A deterministic generator of values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn f32s(&mut self, n: usize) -> Vec<u8> {
        (0..n).flat_map(|_| self.next().to_le_bytes()).collect()
    }

    /// bf16 values (the top halves of f32s).
    fn bf16s(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|_| ((self.next().to_bits() >> 16) as u16).to_le_bytes())
            .collect()
    }
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Tokens in the probes' chunks (two token groups, the second partial) and the plan's maximum.
const TOKENS: u32 = 100;
const MAX_TOKENS: u32 = 128;

/// A projection over a chunk on tensor cores as `config` says: inputs x (with row scales, rows
/// times 2^k up to 2^20 and their scales), weights, bias, residual, one output.
fn projection(name: &str, spec_of: (u32, u32, Epilogue), config: TcConfig) -> ProbeCase {
    let (inputs, width, epilogue) = spec_of;
    let spec = GemvSpec {
        name: name.into(),
        inputs,
        width,
        bias: true,
        epilogue,
        residual: epilogue == Epilogue::None,
        norm: None,
        weights: Storage::Bf16,
    };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ inputs as u64 ^ (width as u64) << 20);
    let rows = if epilogue == Epilogue::GeGlu {
        2 * width
    } else {
        width
    };
    let (t, n) = (MAX_TOKENS as usize, inputs as usize);
    let scales: Vec<f32> = (0..t)
        .map(|i| {
            if config.row_scales {
                2f32.powi(((7 * i) % 21) as i32)
            } else {
                1.0
            }
        })
        .collect();
    let x: Vec<u8> = (0..t * n)
        .flat_map(|i| (rng.next() * scales[i / n]).to_le_bytes())
        .collect();
    let mut buffers = vec![u32s(&[TOKENS]), x];
    if config.row_scales {
        buffers.push(scales.iter().flat_map(|s| s.to_le_bytes()).collect());
    }
    buffers.push(rng.bf16s(rows as usize * n));
    buffers.push(rng.f32s(rows as usize));
    if spec.residual {
        buffers.push(rng.f32s(t * width as usize));
    }
    buffers.push(vec![0; 4 * t * width as usize]);
    let out = buffers.len() - 1;
    let warps = tc_token_warps(&spec, MAX_TOKENS);
    ProbeCase {
        name: name.into(),
        ptx: crate::module(&[gemm_tokens_tc(&spec, &[], config, warps)]),
        launches: vec![ProbeLaunch {
            kernel: name.into(),
            grid: tc_grid(&spec, MAX_TOKENS, warps),
            block: tc_block(warps),
            params: (0..buffers.len()).collect(),
        }],
        buffers,
        outputs: vec![(out, width as usize)],
    }
}

/// A plain projection in two k parts: partial sums, then the reduction.
fn projection_in_k_parts(config: TcConfig) -> ProbeCase {
    let name = "probe_k_parts";
    let spec = GemvSpec {
        name: name.into(),
        inputs: 128,
        width: 72,
        bias: true,
        epilogue: Epilogue::None,
        residual: true,
        norm: None,
        weights: Storage::Bf16,
    };
    let reduce = GemvSpec {
        name: format!("{name}_reduce"),
        ..spec.clone()
    };
    let mut rng = Rng(0x5851_F42D_4C95_7F2D);
    let (t, n, w) = (MAX_TOKENS as usize, 128, 72);
    // count, x, w, partial, bias, residual, out
    let buffers = vec![
        u32s(&[TOKENS]),
        rng.f32s(t * n),
        rng.bf16s(w * n),
        vec![0; 2 * 4 * t * w],
        rng.f32s(w),
        rng.f32s(t * w),
        vec![0; 4 * t * w],
    ];
    let warps = tc_token_warps(&spec, MAX_TOKENS);
    ProbeCase {
        name: name.into(),
        ptx: crate::module(&[
            gemm_tokens_tc_partial(&spec, config, warps, 2, MAX_TOKENS),
            gemm_reduce_tokens(&reduce, &[], 2, MAX_TOKENS),
        ]),
        launches: vec![
            ProbeLaunch {
                kernel: name.into(),
                grid: 2 * tc_grid(&spec, MAX_TOKENS, warps),
                block: tc_block(warps),
                params: vec![0, 1, 2, 3],
            },
            ProbeLaunch {
                kernel: reduce.name.clone(),
                grid: elementwise_grid(MAX_TOKENS * 72, NORM_BLOCK),
                block: NORM_BLOCK,
                params: vec![0, 3, 4, 5, 6],
            },
        ],
        buffers,
        outputs: vec![(6, 72)],
    }
}

/// The RG-LRU's gates on tensor cores (weights read with `ldmatrix.trans`): 128 channels in
/// two gate blocks of 64, the chunk starting at position 3.
fn gates() -> ProbeCase {
    let name = "probe_gates_tc";
    let spec = RgLruSpec {
        name: name.into(),
        channels: 128,
        blocks: 2,
        width: 4,
        conv: Storage::F32,
        gates: Storage::Bf16,
        gate_output: true,
    };
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (t, c, b) = (MAX_TOKENS as usize, 128, 64);
    // Decay rates as the lowering packs them (softplus of a parameter, positive).
    let decay: Vec<u8> = (0..c)
        .flat_map(|_| (0.5 + 0.25 * rng.next()).to_le_bytes())
        .collect();
    // count, conv, start, input-gate w and bias, recurrent-gate w and bias, decay, a, b
    let buffers = vec![
        u32s(&[TOKENS]),
        rng.f32s(t * c),
        u32s(&[3]),
        rng.bf16s(2 * b * b),
        rng.f32s(c),
        rng.bf16s(2 * b * b),
        rng.f32s(c),
        decay,
        vec![0; 4 * t * c],
        vec![0; 4 * t * c],
    ];
    let warps = gates_tc_token_warps(&spec, MAX_TOKENS);
    ProbeCase {
        name: name.into(),
        ptx: crate::module(&[rg_lru_gates_tc(&spec, TcInputs::Split, warps)]),
        launches: vec![ProbeLaunch {
            kernel: name.into(),
            grid: gates_tc_grid(&spec, MAX_TOKENS, warps),
            block: tc_block(warps),
            params: (0..buffers.len()).collect(),
        }],
        buffers,
        outputs: vec![(8, 128), (9, 128)],
    }
}

/// Chunk attention on tensor cores (the window's keys and values split into planes once, then
/// flash attention with `ldmatrix`, `ldmatrix.trans` for the values, split MMAs): 4 query heads
/// on 2 KV heads of 32 features, a window of 64, a chunk of 48 tokens from position 40, so the
/// window spans the ring (wrapping) and the chunk.
fn attention() -> ProbeCase {
    use crate::attention::{
        inverse_frequencies, rotate_tokens, rotate_tokens_threads, AttentionSpec, ROTATE_BLOCK,
    };
    use crate::attention_tc::{
        attend_tokens_tc, attend_tokens_tc_block, attend_tokens_tc_grid, attend_tokens_tc_scratch,
        kv_split_bytes, kv_split_threads, kv_split_tokens,
    };
    let spec = AttentionSpec {
        name: "probe_attention".into(),
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        window: 64,
        scale: 1.0 / 32f32.sqrt(),
        rotary: Some((10000.0, 16)),
    };
    let (mt, chunk, start) = (64u32, 48u32, 40u32);
    let (m, h, g, hd, w) = (mt as usize, 4, 2, 32, 64);
    let mut rng = Rng(0x1405_7B7E_F767_814F);
    // count, start, q, k, v, inv_freq, rotated q, rotated k, key ring, value ring, out,
    // query scratch, key/value planes (as pooled buffers: NaN)
    let buffers = vec![
        u32s(&[chunk]),
        u32s(&[start]),
        rng.f32s(m * h * hd),
        rng.f32s(m * g * hd),
        rng.f32s(m * g * hd),
        inverse_frequencies(10000.0, 16)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        vec![0; 4 * m * h * hd],
        vec![0; 4 * m * g * hd],
        rng.f32s(w * g * hd),
        rng.f32s(w * g * hd),
        vec![0; 4 * m * h * hd],
        vec![0xFF; attend_tokens_tc_scratch(&spec, mt) as usize],
        vec![0xFF; kv_split_bytes(&spec, mt) as usize],
    ];
    let name = |kernel: &str| format!("{}_{kernel}", spec.name);
    ProbeCase {
        name: spec.name.clone(),
        ptx: crate::module(&[
            rotate_tokens(&spec, mt),
            kv_split_tokens(&spec, TcInputs::Split, mt),
            attend_tokens_tc(&spec, TcInputs::Split, mt),
        ]),
        launches: vec![
            ProbeLaunch {
                kernel: name("rotate_tokens"),
                grid: rotate_tokens_threads(&spec, mt).div_ceil(ROTATE_BLOCK),
                block: ROTATE_BLOCK,
                params: vec![0, 1, 2, 3, 5, 6, 7],
            },
            ProbeLaunch {
                kernel: name("kv_split_tokens"),
                grid: kv_split_threads(&spec, mt).div_ceil(NORM_BLOCK),
                block: NORM_BLOCK,
                params: vec![0, 1, 7, 4, 8, 9, 12],
            },
            ProbeLaunch {
                kernel: name("attend_tokens_tc"),
                grid: attend_tokens_tc_grid(&spec, mt),
                block: attend_tokens_tc_block(&spec),
                params: vec![6, 0, 1, 7, 4, 8, 9, 10, 11, 12],
            },
        ],
        buffers,
        outputs: vec![(10, hd)],
    }
}

/// Every probe: projections (plain with residual, and GeGLU) on `mma.sync` with split, bf16
/// and row-scaled f16 operands and on `wgmma` with split and row-scaled f16 operands, a
/// projection in k parts, the gates, chunk attention.
pub fn cases() -> Vec<ProbeCase> {
    let mut out = Vec::new();
    let configs = [
        ("sync_split", TcMma::Sync, TcInputs::Split, false),
        ("sync_bf16", TcMma::Sync, TcInputs::Bf16, false),
        ("sync_f16_scaled", TcMma::Sync, TcInputs::F16, true),
        ("wgmma_split", TcMma::Warpgroup, TcInputs::Split, false),
        ("wgmma_f16_scaled", TcMma::Warpgroup, TcInputs::F16, true),
    ];
    for (label, mma, inputs, row_scales) in configs {
        let config = TcConfig {
            inputs,
            mma,
            row_scales,
        };
        out.push(projection(
            &format!("probe_{label}"),
            (96, 80, Epilogue::None),
            config,
        ));
        out.push(projection(
            &format!("probe_{label}_geglu"),
            (64, 72, Epilogue::GeGlu),
            config,
        ));
    }
    out.push(projection_in_k_parts(TcInputs::Split.into()));
    out.push(gates());
    out.push(attention());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every probe runs in the interpreter and writes finite outputs; its own results compare
    /// equal, and a perturbed output does not.
    #[test]
    fn probes_run_in_the_interpreter() {
        let cases = cases();
        assert_eq!(cases.len(), 13);
        for case in &cases {
            let want = case
                .interpret()
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(case.difference(&want, &want), 0.0, "{}", case.name);
            // The first output's first value moved by twice its row's scale.
            let mut off = want.clone();
            let (o, row) = case.outputs[0];
            let first = floats(&want[o][..4 * row]);
            let scale = first.iter().fold(1f32, |m, v| m.max(v.abs()));
            off[o][0..4].copy_from_slice(&(first[0] + 2.0 * scale).to_le_bytes());
            assert!(
                case.difference(&want, &off) > PROBE_TOLERANCE,
                "{}",
                case.name
            );
        }
    }
}
