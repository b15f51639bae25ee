//! Every generated kernel assembles with a real `ptxas` for sm_90 (installed by
//! `scripts/setup.sh` from PyPI's nvidia-cuda-nvcc; no GPU needed). Any ptxas error fails.

use std::path::PathBuf;
use std::process::Command;

use griffin_backend_ptx::attention::{
    attend, attend_combine, attend_tokens, rotate_tokens, write_ring_tokens, AttentionSpec,
};
use griffin_backend_ptx::attention_tc::{
    attend_tokens_tc, attention_fits_tensor_cores, kv_split_tokens,
};
use griffin_backend_ptx::gemv::{gemv, Epilogue, GemvSpec};
use griffin_backend_ptx::misc::{argmax, gather};
use griffin_backend_ptx::module;
use griffin_backend_ptx::prefill::{
    gemm_tokens, rg_lru_conv_tokens, rg_lru_gates_tokens, rg_lru_scan_tokens, rms_norm_tokens,
};
use griffin_backend_ptx::rg_lru::{rg_lru_step, RgLruSpec, Storage};
use griffin_backend_ptx::tc::{
    gates_fit_tensor_cores, gates_tc_token_warps, gemm_tokens_tc, rg_lru_gates_tc, tc_token_warps,
    TcInputs,
};

fn ptxas() -> PathBuf {
    griffin_backend_ptx::find_ptxas().unwrap_or_else(|| {
        panic!("ptxas not found: run scripts/setup.sh (it installs nvidia-cuda-nvcc from PyPI into .tools/) or set PTXAS")
    })
}

/// Assembles `ptx`; returns ptxas's `-v` report.
fn assemble(ptx: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("k.ptx");
    std::fs::write(&src, ptx).unwrap();
    // `wgmma` needs the architecture-specific target, which `module` then declares.
    let arch = if ptx.contains(".target sm_90a") {
        "-arch=sm_90a"
    } else {
        "-arch=sm_90"
    };
    let out = Command::new(ptxas())
        .args([arch, "-v", "-o"])
        .arg(dir.path().join("k.cubin"))
        .arg(&src)
        .output()
        .expect("ptxas runs");
    let report = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ptxas failed:\n{report}\n{ptx}");
    report
}

fn specs() -> Vec<GemvSpec> {
    let spec = |name: &str, inputs, width, bias, epilogue, residual| GemvSpec {
        name: name.into(),
        inputs,
        width,
        bias,
        epilogue,
        residual,
        // Projections that read the residual stream normalise it first.
        norm: (!residual).then_some(1e-6),
        weights: Storage::Bf16,
    };
    vec![
        // tiny configs (D=64, F=96)
        spec("tiny_qkv", 64, 96, false, Epilogue::None, false),
        spec("tiny_mlp_gate_up", 64, 96, true, Epilogue::GeGlu, false),
        spec("tiny_down", 96, 64, true, Epilogue::None, true),
        spec(
            "tiny_logits",
            64,
            512,
            false,
            Epilogue::SoftCap(30.0),
            false,
        ),
        // the 2B shape (D=2560, F=7680, V=256000)
        spec("b2_x_y", 2560, 5120, true, Epilogue::None, false),
        spec("b2_mlp_gate_up", 2560, 7680, true, Epilogue::GeGlu, false),
        spec("b2_down", 7680, 2560, true, Epilogue::None, true),
        // inputs too wide to stage in shared memory (read from global memory)
        spec("wide_down", 15360, 4096, true, Epilogue::None, true),
        spec(
            "b2_logits",
            2560,
            256000,
            false,
            Epilogue::SoftCap(30.0),
            false,
        ),
    ]
}

fn rg_lru_specs() -> Vec<RgLruSpec> {
    let spec = |name: &str, channels, blocks, gates| RgLruSpec {
        name: name.into(),
        channels,
        blocks,
        width: 4,
        conv: gates,
        gates,
        gate_output: true,
    };
    vec![
        spec("tiny_rg_lru", 64, 4, Storage::F32),
        spec("b2_rg_lru", 2560, 10, Storage::Bf16),
        // The 9B shape: 4096 channels in 16 gate blocks (one per head) of 256.
        spec("b9_rg_lru", 4096, 16, Storage::Bf16),
        // The widest gate block taken (1024 channels): the chunk-gates kernel's shared memory
        // must stay within 48 KiB.
        spec("wide_rg_lru", 1024, 1, Storage::F32),
    ]
}

fn attention_specs() -> Vec<AttentionSpec> {
    vec![
        AttentionSpec {
            name: "tiny_attention".into(),
            heads: 4,
            kv_heads: 1,
            head_dim: 16,
            window: 8,
            scale: 0.25,
            rotary: Some((10000.0, 8)),
        },
        // The 9B shape: 16 query heads of 256 features on one KV head (two blocks of 8 heads
        // in the chunk kernel, against the 2B model's two of 5).
        AttentionSpec {
            name: "b9_attention".into(),
            heads: 16,
            kv_heads: 1,
            head_dim: 256,
            window: 2048,
            scale: 1.0 / 16.0,
            rotary: Some((10000.0, 128)),
        },
        AttentionSpec {
            name: "b2_attention".into(),
            heads: 10,
            kv_heads: 1,
            head_dim: 256,
            window: 2048,
            scale: 1.0 / 16.0,
            rotary: Some((10000.0, 128)),
        },
    ]
}

/// Every kernel of the tiny configs and of the 2B shape, with its name.
fn all_kernels() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        specs().iter().map(|s| (s.name.clone(), gemv(s))).collect();
    out.extend(
        rg_lru_specs()
            .iter()
            .map(|s| (s.name.clone(), rg_lru_step(s))),
    );
    for s in attention_specs() {
        out.push((format!("{}_attend", s.name), attend(&s)));
        out.push((format!("{}_combine", s.name), attend_combine(&s)));
        // Prefill, chunks of up to 64 tokens.
        out.push((format!("{}_rotate_tokens", s.name), rotate_tokens(&s, 64)));
        out.push((format!("{}_attend_tokens", s.name), attend_tokens(&s)));
        if attention_fits_tensor_cores(&s) {
            out.push((
                format!("{}_attend_tokens_tc", s.name),
                attend_tokens_tc(&s, TcInputs::Split, 2048),
            ));
            out.push((
                format!("{}_kv_split_tokens", s.name),
                kv_split_tokens(&s, TcInputs::Split, 2048),
            ));
            let f16 = AttentionSpec {
                name: format!("{}_f16", s.name),
                ..s.clone()
            };
            out.push((
                format!("{}_attend_tokens_tc", f16.name),
                attend_tokens_tc(&f16, TcInputs::F16, 2048),
            ));
        }
        out.push((
            format!("{}_write_ring_tokens", s.name),
            write_ring_tokens(&s, 64),
        ));
    }
    out.push((
        "tiny_gather".into(),
        gather("tiny_gather", 64, Storage::F32, Some(8.0)),
    ));
    out.push((
        "b2_gather".into(),
        gather("b2_gather", 2560, Storage::Bf16, Some(50.5)),
    ));
    out.push(("b2_argmax".into(), argmax("b2_argmax", 256000)));
    // Prefill (T tokens per launch): the 2B projections without their norm prologue.
    for s in specs().into_iter().filter(|s| s.name.starts_with("b2_")) {
        let s = GemvSpec {
            name: format!("{}_tokens", s.name),
            norm: None,
            ..s
        };
        out.push((s.name.clone(), gemm_tokens(&s)));
        // The same on tensor cores, chunks of 64 tokens (the x/y projection split in two).
        let splits: Vec<u32> = if s.name == "b2_x_y_tokens" {
            vec![2560, 2560]
        } else {
            vec![]
        };
        let tc = GemvSpec {
            name: format!("{}_tc", s.name),
            ..s
        };
        out.push((
            tc.name.clone(),
            gemm_tokens_tc(&tc, &splits, TcInputs::Split, tc_token_warps(&tc, 512)),
        ));
        let name = format!("{}_f16_row_scaled", tc.name);
        out.push((
            name.clone(),
            gemm_tokens_tc(
                &GemvSpec { name, ..tc.clone() },
                &splits,
                griffin_backend_ptx::tc::TcConfig {
                    inputs: TcInputs::F16,
                    mma: griffin_backend_ptx::tc::TcMma::Sync,
                    row_scales: true,
                },
                tc_token_warps(&tc, 512),
            ),
        ));
        for (suffix, inputs) in [("bf16", TcInputs::Bf16), ("f16", TcInputs::F16)] {
            let name = format!("{}_{suffix}_inputs", tc.name);
            out.push((
                name.clone(),
                gemm_tokens_tc(
                    &GemvSpec { name, ..tc.clone() },
                    &splits,
                    inputs,
                    tc_token_warps(&tc, 512),
                ),
            ));
        }
    }
    for s in rg_lru_specs().into_iter().skip(1) {
        let gates = RgLruSpec {
            name: format!("{}_gates_tokens", s.name),
            ..s.clone()
        };
        out.push((gates.name.clone(), rg_lru_gates_tokens(&gates)));
        // bf16 gate blocks of 64 channels or more: the conv alone, the gates on tensor cores.
        if gates_fit_tensor_cores(&s) {
            let conv = RgLruSpec {
                name: format!("{}_conv_tokens", s.name),
                ..s.clone()
            };
            out.push((conv.name.clone(), rg_lru_conv_tokens(&conv)));
            let tc = RgLruSpec {
                name: format!("{}_gates_tc", s.name),
                ..s.clone()
            };
            let warps = gates_tc_token_warps(&tc, 2048);
            out.push((
                tc.name.clone(),
                rg_lru_gates_tc(&tc, TcInputs::Split, warps),
            ));
        }
        let scan = RgLruSpec {
            name: format!("{}_scan_tokens", s.name),
            ..s
        };
        out.push((scan.name.clone(), rg_lru_scan_tokens(&scan)));
    }
    out.push((
        "b2_norm_tokens".into(),
        rms_norm_tokens("b2_norm_tokens", 2560, 1e-6, false),
    ));
    out.push((
        "b2_norm_tokens_scaled".into(),
        rms_norm_tokens("b2_norm_tokens_scaled", 2560, 1e-6, true),
    ));
    out.push((
        "b2_row_scales_tokens".into(),
        griffin_backend_ptx::prefill::row_scales_tokens("b2_row_scales_tokens", 7680),
    ));
    // The device sampler for the 2B vocabulary (the constants' values do not matter here).
    let exp = griffin_backend_ptx::sample::ExpConstants {
        cutoff: -87.0,
        log2_e: std::f32::consts::LOG2_E,
        ln2_hi: 0.693_145_75,
        ln2_lo: 1.428_606_8e-6,
        round: 12_582_912.0,
        poly: [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ],
    };
    for k in griffin_backend_ptx::sample::kernels("b2_sample", 256_000, &exp) {
        out.push((k.name, k.ptx));
    }
    out
}

#[test]
fn kernels_assemble_for_sm90() {
    let kernels = all_kernels();
    let report = assemble(&module(
        &kernels.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>(),
    ));
    for (name, _) in &kernels {
        assert!(
            report.contains(&format!("'{name}'")),
            "{name} not in the ptxas report:\n{report}"
        );
    }
    // Print registers and spills per kernel (recorded in docs/ptx-backend.md).
    for line in report
        .lines()
        .filter(|l| l.contains("registers") || l.contains("spill") || l.contains("Compiling"))
    {
        println!("{line}");
    }
    // No kernel spills.
    let mut kernel = String::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            kernel = rest.split('\'').next().unwrap().to_string();
        }
        if !line.contains("spill stores") {
            continue;
        }
        let stores: u64 = line
            .split(" bytes spill stores")
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(stores, 0, "{kernel} spills: {line}");
    }
}

/// The 2B shape's prefill projections on Hopper's warpgroup MMA (`--wgmma`): whole, GeGLU, and
/// in two k parts, split and f16 inputs, at chunks of 2048. They assemble for `sm_90a`, keep
/// within the launch bounds' 128 registers and do not spill.
#[test]
fn warpgroup_kernels_assemble_for_sm90a() {
    use griffin_backend_ptx::tc::{gemm_tokens_tc_partial, k_parts_fit, TcConfig, TcMma};
    let mut kernels = Vec::new();
    for s in specs().into_iter().filter(|s| s.name.starts_with("b2_")) {
        let s = GemvSpec { norm: None, ..s };
        let warps = tc_token_warps(&s, 2048);
        for inputs in [TcInputs::Split, TcInputs::F16] {
            let config = TcConfig {
                inputs,
                mma: TcMma::Warpgroup,
                row_scales: false,
            };
            let name = format!("{}_wg_{inputs:?}", s.name);
            kernels.push((
                name.clone(),
                gemm_tokens_tc(&GemvSpec { name, ..s.clone() }, &[], config, warps),
            ));
            if k_parts_fit(&s, 2) {
                let name = format!("{}_wg_k2_{inputs:?}", s.name);
                kernels.push((
                    name.clone(),
                    gemm_tokens_tc_partial(&GemvSpec { name, ..s.clone() }, config, warps, 2, 2048),
                ));
            }
        }
    }
    let ptx = module(&kernels.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>());
    assert!(ptx.contains(".target sm_90a"));
    let report = assemble(&ptx);
    let mut kernel = String::new();
    let mut seen = 0;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            kernel = rest.split('\'').next().unwrap().to_string();
            seen += 1;
        }
        if line.contains("registers") || line.contains("spill") {
            println!("{kernel}: {}", line.trim());
        }
        if line.contains("spill stores") {
            assert!(
                line.contains(" 0 bytes spill stores"),
                "{kernel} spills: {line}"
            );
        }
    }
    assert_eq!(seen, kernels.len(), "{report}");
}

/// A tiny projection (96 → 64, bias and residual) on the warpgroup MMA: weights staged as core
/// matrices, the proxy fence, the descriptor, `wgmma` and its fence, commit and wait.
#[test]
fn projection_wgmma_ptx_snapshot() {
    use griffin_backend_ptx::tc::{TcConfig, TcMma};
    let spec = GemvSpec {
        name: "tiny_down_wgmma".into(),
        inputs: 96,
        width: 64,
        bias: true,
        epilogue: Epilogue::None,
        residual: true,
        norm: None,
        weights: Storage::Bf16,
    };
    let config = TcConfig {
        inputs: TcInputs::Split,
        mma: TcMma::Warpgroup,
        row_scales: false,
    };
    insta::assert_snapshot!(
        "tiny_projection_wgmma",
        module(&[gemm_tokens_tc(&spec, &[], config, 1)])
    );
}

#[test]
fn gemv_ptx_snapshot() {
    let spec = &specs()[1];
    insta::assert_snapshot!("tiny_mlp_gate_up_gemv", module(&[gemv(spec)]));
}

#[test]
fn rg_lru_ptx_snapshot() {
    insta::assert_snapshot!("tiny_rg_lru", module(&[rg_lru_step(&rg_lru_specs()[0])]));
}

/// The tensor-core attention at the tiny shape (4 query heads of 16 features on one KV head):
/// fragment-order query scratch, `ldmatrix` and `ldmatrix.trans`, the split MMAs.
#[test]
fn attention_tc_ptx_snapshot() {
    insta::assert_snapshot!(
        "tiny_attend_tokens_tc",
        module(&[
            kv_split_tokens(&attention_specs()[0], TcInputs::Split, 64),
            attend_tokens_tc(&attention_specs()[0], TcInputs::Split, 64)
        ])
    );
}
