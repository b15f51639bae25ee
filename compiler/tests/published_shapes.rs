//! The published model shapes (RecurrentGemma 2B and 9B) through the whole GPU compile short
//! of packing: load a checkpoint of the right names, shapes and dtype, trace, optimise, lower
//! to the GPU plan, and assemble its PTX with a real `ptxas`. The checkpoints are sparse files
//! (a safetensors header, then a hole as long as the weights: 5.4 GB and 17 GB of zeros that
//! take no disk), since no golden case has these shapes and their layouts (the 9B model's 16
//! heads of 256 on one KV head, 16 gate blocks of 256, MLP inputs of 12288) are where a
//! lowering bound on the golden cases' small shapes would break.

mod common;

use griffin_runtime::gpu_plan::GpuBufferKind;
use griffinc::checkpoint::write_zero_checkpoint;
use griffinc::gpu::{lower, GpuOptions, GpuProgram};
use griffinc::session::Model;
use griffinc::Config;

use griffinc::config::{PUBLISHED_2B as CONFIG_2B, PUBLISHED_9B as CONFIG_9B};

/// Loads the model and lowers it with `opts`.
fn lowered(config_json: &str, opts: &GpuOptions) -> (GpuProgram, u64, Config) {
    let dir = tempfile::tempdir().unwrap();
    let weights = write_zero_checkpoint(dir.path(), config_json).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let program = lower(&model, opts).unwrap();
    (program, weights, Config::from_json(config_json).unwrap())
}

/// Assembles the module for its target; ptxas's report.
fn assemble(ptx: &str) -> String {
    let ptxas = griffin_backend_ptx::find_ptxas().expect(
        "ptxas not found: run scripts/setup.sh (it installs nvidia-cuda-nvcc from PyPI into .tools/) or set PTXAS",
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.ptx");
    std::fs::write(&src, ptx).unwrap();
    let arch = if ptx.contains(".target sm_90a") {
        "-arch=sm_90a"
    } else {
        "-arch=sm_90"
    };
    let out = std::process::Command::new(ptxas)
        .args([arch, "-v", "-o"])
        .arg(dir.path().join("m.cubin"))
        .arg(&src)
        .output()
        .expect("ptxas runs");
    let report = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ptxas failed:\n{report}");
    report
}

/// Launch counts, weight bytes and device memory of a lowered program, checked against the
/// layer structure, and its PTX assembled without spills.
fn check(name: &str, config_json: &str, opts: &GpuOptions) -> (usize, usize, u64) {
    let (program, checkpoint_bytes, config) = lowered(config_json, opts);
    let plan = &program.plan;
    let attention = config
        .layers
        .iter()
        .filter(|b| b.name() == "attention")
        .count();
    let recurrent = config.layers.len() - attention;
    // Decode: the embedding and the logits, and per layer its projections (norms, GeGLU and
    // residuals in their prologues and epilogues) with the RG-LRU step, or attention's attend
    // and combine.
    assert_eq!(
        plan.launches.len(),
        2 + 5 * recurrent + 6 * attention,
        "{name}"
    );
    let weight_bytes: u64 = plan
        .buffers
        .iter()
        .filter(|b| matches!(b.kind, GpuBufferKind::Weight(_)))
        .map(|b| b.bytes)
        .sum();
    // bf16 matrices as stored; norms, biases and the gates' vectors widened to f32 (a few MB).
    assert!(
        weight_bytes >= checkpoint_bytes && weight_bytes < checkpoint_bytes + (64 << 20),
        "{name}: {weight_bytes} bytes of weights for a checkpoint of {checkpoint_bytes}"
    );
    let (_, arena) = plan.arena_layout(false);
    let prefill = plan.prefill.as_ref().unwrap();
    let kernels = program.ptx.matches(".entry ").count();
    println!(
        "{name}: {kernels} kernels, {} decode and {} prefill launches (chunks of {}), weights {:.2} GB, arena {:.1} MB",
        plan.launches.len(),
        prefill.launches.len(),
        prefill.max_tokens,
        weight_bytes as f64 / 1e9,
        arena as f64 / 1e6,
    );
    let report = assemble(&program.ptx);
    assert!(
        report
            .lines()
            .filter(|l| l.contains("spill stores"))
            .all(|l| l.contains(" 0 bytes spill stores")),
        "{name} spills:\n{report}"
    );
    (kernels, prefill.launches.len(), arena)
}

#[test]
fn two_b_lowers_and_assembles() {
    let (kernels, prefill, arena) = check("2B", CONFIG_2B, &GpuOptions::default());
    // As docs/ptx-backend.md states them.
    assert_eq!((kernels, prefill), (37, 305));
    assert_eq!((arena as f64 / 1e5).round() / 10.0, 184.5);
}

#[test]
fn nine_b_lowers_and_assembles() {
    let (_, _, arena) = check("9B", CONFIG_9B, &GpuOptions::default());
    // Its activations for chunks of 2048 tokens, state and KV rings stay small beside its
    // 17 GB of weights: the H200's 141 GB hold both many times over.
    assert!(arena < 400 << 20, "{arena}");
}

#[test]
fn nine_b_lowers_with_wgmma_and_f16_inputs() {
    let opts = GpuOptions {
        tc_mma: griffin_backend_ptx::tc::TcMma::Warpgroup,
        tc_inputs: griffin_backend_ptx::tc::TcInputs::F16,
        ..GpuOptions::default()
    };
    check("9B wgmma f16", CONFIG_9B, &opts);
}
