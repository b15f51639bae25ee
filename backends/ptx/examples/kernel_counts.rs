//! Counts the instructions the prefill kernels that have both a CUDA-core and a tensor-core
//! form execute at the 2B model's shape, on the PTX interpreter, and prints them per token:
//! attention at a full window (2048 keys: the chunk starts at position 4096, so every key comes
//! from the ring) and the RG-LRU's gates; and the tensor-core projection's k-step loop, MMAs
//! against the other instructions. Counts, not timings: what each form asks the GPU to issue
//! (an `mma` counts as one instruction of its warp's 32 threads).
//!
//! `cargo run --release -p griffin-backend-ptx --example kernel_counts`

use griffin_backend_ptx::attention::{
    attend_tokens, attend_tokens_block, attend_tokens_grid, attend_tokens_per_block, AttentionSpec,
};
use griffin_backend_ptx::attention_tc::{
    attend_tokens_tc, attend_tokens_tc_block, attend_tokens_tc_grid, attend_tokens_tc_scratch,
    kv_split_bytes, kv_split_threads, kv_split_tokens,
};
use griffin_backend_ptx::emu::{run, Launch, Memory, Module};
use griffin_backend_ptx::gemv::{Epilogue, GemvSpec};
use griffin_backend_ptx::module;
use griffin_backend_ptx::prefill::{
    elementwise_grid, gate_tokens, rg_lru_conv_tokens, rg_lru_gates_grid, rg_lru_gates_tokens,
    NORM_BLOCK,
};
use griffin_backend_ptx::rg_lru::{block_size, RgLruSpec, Storage};
use griffin_backend_ptx::tc::{
    gates_tc_grid, gates_tc_token_warps, gemm_tokens_tc, rg_lru_gates_tc, tc_block, tc_token_warps,
    TcConfig, TcInputs, TcMma,
};

/// Deterministic values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn bf16(&mut self, n: usize) -> Vec<u8> {
        self.vec(n)
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect()
    }
}

fn launch(
    m: &Module,
    mem: &mut Memory,
    kernel: &str,
    grid: u32,
    block: u32,
    params: &[u64],
) -> u64 {
    run(
        m,
        kernel,
        &Launch {
            grid,
            block,
            params,
        },
        mem,
    )
    .unwrap_or_else(|e| panic!("{kernel}: {e}"))
}

fn main() {
    let mut rng = Rng(1);
    let mut rows: Vec<(String, f64)> = Vec::new();

    // Attention: 10 query heads of 256 features on one KV head, window 2048.
    let spec = AttentionSpec {
        name: "b2".into(),
        heads: 10,
        kv_heads: 1,
        head_dim: 256,
        window: 2048,
        scale: 1.0 / 16.0,
        rotary: Some((10000.0, 128)),
    };
    let (h, hd, w) = (10usize, 256usize, 2048usize);
    let tokens = 16usize;
    let bf16_spec = AttentionSpec {
        name: "b2_bf16".into(),
        ..spec.clone()
    };
    let m = Module::parse(&module(&[
        attend_tokens(&spec),
        kv_split_tokens(&spec, TcInputs::Split, tokens as u32),
        attend_tokens_tc(&spec, TcInputs::Split, tokens as u32),
        kv_split_tokens(&bf16_spec, TcInputs::Bf16, tokens as u32),
        attend_tokens_tc(&bf16_spec, TcInputs::Bf16, tokens as u32),
    ]))
    .unwrap();
    let mut mem = Memory::new();
    mem.enable_access_stats();
    let q = mem.alloc_f32(&rng.vec(tokens * h * hd));
    let ck = mem.alloc_f32(&rng.vec(tokens * hd));
    let cv = mem.alloc_f32(&rng.vec(tokens * hd));
    let ring_k = mem.alloc_f32(&rng.vec(w * hd));
    let ring_v = mem.alloc_f32(&rng.vec(w * hd));
    let out = mem.alloc_f32(&vec![0.0; tokens * h * hd]);
    let start = mem.alloc_u32(&[4096]);
    let per_block = attend_tokens_per_block(&spec) as usize;
    let count = mem.alloc_u32(&[per_block as u32]);
    let params = [q, count, start, ck, cv, ring_k, ring_v, out];
    let n = launch(
        &m,
        &mut mem,
        "b2_attend_tokens",
        attend_tokens_grid(&spec, per_block as u32),
        attend_tokens_block(&spec),
        &params,
    );
    rows.push((
        "attend_tokens (CUDA cores), per token, 2048 keys".into(),
        n as f64 / per_block as f64,
    ));
    let count = mem.alloc_u32(&[tokens as u32]);
    let scratch = mem.alloc(&vec![
        0;
        attend_tokens_tc_scratch(&spec, tokens as u32) as usize
    ]);
    let planes = mem.alloc(&vec![0; kv_split_bytes(&spec, tokens as u32) as usize]);
    // The planes hold the window before the chunk (2047 positions) and its 16 tokens; for a
    // 2048-token chunk they are ~2 positions per token, so per position is the fair unit.
    let positions = (w - 1 + tokens) as f64;
    for (prefix, label) in [("b2", "split"), ("b2_bf16", "bf16 inputs")] {
        let n = launch(
            &m,
            &mut mem,
            &format!("{prefix}_kv_split_tokens"),
            kv_split_threads(&spec, tokens as u32).div_ceil(NORM_BLOCK),
            NORM_BLOCK,
            &[count, start, ck, cv, ring_k, ring_v, planes],
        );
        rows.push((
            format!("kv_split_tokens ({label}), per key position"),
            n as f64 / positions,
        ));
        let n = launch(
            &m,
            &mut mem,
            &format!("{prefix}_attend_tokens_tc"),
            attend_tokens_tc_grid(&spec, tokens as u32),
            attend_tokens_tc_block(&spec),
            &[
                q, count, start, ck, cv, ring_k, ring_v, out, scratch, planes,
            ],
        );
        rows.push((
            format!("attend_tokens_tc ({label}), per token, 2048 keys"),
            n as f64 / tokens as f64,
        ));
    }

    // RG-LRU gates: 2560 channels in 10 blocks of 256, bf16 gate matrices.
    let s = RgLruSpec {
        name: "b2_gates".into(),
        channels: 2560,
        blocks: 10,
        width: 4,
        conv: Storage::F32,
        gates: Storage::Bf16,
        gate_output: true,
    };
    let named = |name: &str| RgLruSpec {
        name: name.into(),
        ..s.clone()
    };
    let tokens = 64usize;
    let warps = gates_tc_token_warps(&s, tokens as u32);
    let m = Module::parse(&module(&[
        rg_lru_gates_tokens(&named("cuda")),
        rg_lru_conv_tokens(&named("conv")),
        rg_lru_gates_tc(&named("tc"), TcInputs::Split, warps),
    ]))
    .unwrap();
    let (c, b, k) = (2560usize, block_size(&s) as usize, 4usize);
    let count = mem.alloc_u32(&[tokens as u32]);
    let x = mem.alloc_f32(&rng.vec(tokens * c));
    let start = mem.alloc_u32(&[4096]);
    let window = mem.alloc_f32(&rng.vec(k * c));
    let conv_w = mem.alloc_f32(&rng.vec(c * k));
    let conv_b = mem.alloc_f32(&rng.vec(c));
    let igw = mem.alloc(&rng.bf16(c * b));
    let igb = mem.alloc_f32(&rng.vec(c));
    let rgw = mem.alloc(&rng.bf16(c * b));
    let rgb = mem.alloc_f32(&rng.vec(c));
    let decay = mem.alloc_f32(&rng.vec(c));
    let conv = mem.alloc_f32(&vec![0.0; tokens * c]);
    let (a, bb) = (
        mem.alloc_f32(&vec![0.0; tokens * c]),
        mem.alloc_f32(&vec![0.0; tokens * c]),
    );
    let n = launch(
        &m,
        &mut mem,
        "cuda",
        rg_lru_gates_grid(&s, tokens as u32),
        block_size(&s),
        &[
            count, x, start, window, conv_w, conv_b, igw, igb, rgw, rgb, decay, a, bb,
        ],
    );
    rows.push((
        format!(
            "rg_lru_gates_tokens (CUDA cores, {} tokens a block), per token",
            gate_tokens(&s)
        ),
        n as f64 / tokens as f64,
    ));
    let conv_n = launch(
        &m,
        &mut mem,
        "conv",
        elementwise_grid((tokens * c) as u32, NORM_BLOCK),
        NORM_BLOCK,
        &[count, x, start, window, conv_w, conv_b, conv],
    );
    let tc_n = launch(
        &m,
        &mut mem,
        "tc",
        gates_tc_grid(&s, tokens as u32, warps),
        tc_block(warps),
        &[count, conv, start, igw, igb, rgw, rgb, decay, a, bb],
    );
    rows.push((
        "rg_lru_conv_tokens + rg_lru_gates_tc (split), per token".into(),
        (conv_n + tc_n) as f64 / tokens as f64,
    ));

    // The tensor-core projection's k-step loop (the 2B MLP up projection, GeGLU, 128-token
    // blocks): PTX instructions per warp and k-step by kind, MMAs against the rest.
    // With `wgmma`, a warp's share of the warpgroup's m64n128k16 (64 tokens × 128 weight rows,
    // as four warps of `mma.sync` take between them: 128 m16n8k16 per instruction's worth).
    let configs = [TcInputs::Split, TcInputs::Bf16, TcInputs::F16]
        .map(TcConfig::from)
        .into_iter()
        .chain([TcInputs::Split, TcInputs::F16].map(|inputs| TcConfig {
            inputs,
            mma: TcMma::Warpgroup,
            row_scales: false,
        }));
    for config in configs {
        let spec = GemvSpec {
            name: "up".into(),
            inputs: 2560,
            width: 7680,
            bias: true,
            epilogue: Epilogue::GeGlu,
            residual: false,
            weights: Storage::Bf16,
            norm: None,
        };
        let ptx = gemm_tokens_tc(&spec, &[], config, tc_token_warps(&spec, 2048));
        let lines: Vec<&str> = ptx.lines().collect();
        let at = |prefix: &str| {
            lines
                .iter()
                .position(|l| l.starts_with(prefix) && l.ends_with(':'))
                .expect("k-step loop labels")
        };
        let (from, to) = (at("$k_"), at("$k_end"));
        let body = lines[from + 1..to]
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty() && !l.ends_with(':'));
        let (mut mma, mut other) = (0, 0);
        for l in body {
            if l.starts_with("mma.") || l.starts_with("wgmma.mma_async") {
                mma += 1;
            } else {
                other += 1;
            }
        }
        let (inputs, kind) = (config.inputs, config.mma);
        println!("tensor-core projection k-step ({inputs:?} inputs, {kind:?}): {mma} mma, {other} other PTX instructions per warp");
    }
    println!();
    println!("| kernel (2B shape) | thread-instructions | warp-instructions |");
    println!("| --- | --- | --- |");
    for (name, n) in rows {
        println!("| {name} | {:.3e} | {:.3e} |", n, n / 32.0);
    }
    // The memory transactions of the kernels above (the interpreter's count).
    if let Some(stats) = mem.access_stats() {
        println!(
            "\nshared-memory wavefronts (taken / fewest its words allow):\n{}",
            stats.shared
        );
        println!(
            "global sectors (taken / fewest its bytes allow):\n{}",
            stats.global
        );
    }
}
