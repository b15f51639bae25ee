//! The LLVM CPU backend against the golden cases, in process.

mod common;

use common::{expected, golden_dir, max_abs_diff, CASES, F32_TOLERANCE};
use griffin_backend_cpu::WeightsDtype;
use griffinc::cpu::{CpuEngine, CpuOptions};
use griffinc::session::{eval_with, generate_greedy_with, Model};

fn engine(model: &Model, opts: CpuOptions) -> CpuEngine {
    CpuEngine::new(model, &opts).unwrap()
}

fn options(threads: usize, chunk: usize) -> CpuOptions {
    CpuOptions {
        threads,
        prefill_chunk: chunk,
        ..CpuOptions::default()
    }
}

#[test]
fn full_and_stepwise_logits_match_reference() {
    for case in CASES {
        let (m, e) = (
            Model::load(&golden_dir().join(case)).unwrap(),
            expected(case),
        );
        let mut cpu = engine(&m, options(2, 64));
        let full = eval_with(&mut cpu, e.vocab, &e.input_ids, None).unwrap();
        let diff = max_abs_diff(full.floats(), &e.logits);
        println!("{case}: cpu full max |diff| = {diff:e}");
        assert!(diff <= F32_TOLERANCE, "{case}: {diff}");

        let prefill = e.input_ids.len() - e.decode_steps;
        let steps = eval_with(&mut cpu, e.vocab, &e.input_ids, Some(prefill)).unwrap();
        let diff = max_abs_diff(&steps.floats()[prefill * e.vocab..], &e.decode_logits);
        println!("{case}: cpu stepwise max |diff| = {diff:e}");
        assert!(diff <= F32_TOLERANCE, "{case}: {diff}");
    }
}

#[test]
fn greedy_ids_match_reference_exactly() {
    for case in CASES {
        let (m, e) = (
            Model::load(&golden_dir().join(case)).unwrap(),
            expected(case),
        );
        let mut cpu = engine(&m, options(2, 64));
        let ids = generate_greedy_with(
            &mut cpu,
            e.vocab,
            &e.input_ids,
            e.generated_ids.len(),
            None,
            |_| {},
        )
        .unwrap();
        assert_eq!(ids, e.generated_ids, "{case}");
    }
}

#[test]
fn chunks_and_threads_do_not_change_the_function() {
    // Chunks of 5 cross the window (8) and the prompt (24) in every way; state carries exactly.
    let case = "tiny-f32";
    let (m, e) = (
        Model::load(&golden_dir().join(case)).unwrap(),
        expected(case),
    );
    for (threads, chunk) in [(1, 1), (1, 5), (3, 5), (4, 7), (2, 24)] {
        let mut cpu = engine(&m, options(threads, chunk));
        let logits = eval_with(&mut cpu, e.vocab, &e.input_ids, None).unwrap();
        let diff = max_abs_diff(logits.floats(), &e.logits);
        assert!(
            diff <= F32_TOLERANCE,
            "threads {threads}, chunk {chunk}: {diff}"
        );
    }
}

#[test]
fn bf16_weights_stay_within_bf16_tolerance() {
    let case = "tiny-f32";
    let (m, e) = (
        Model::load(&golden_dir().join(case)).unwrap(),
        expected(case),
    );
    let mut opts = options(2, 64);
    opts.weights = WeightsDtype::Bf16;
    let mut cpu = engine(&m, opts);
    let logits = eval_with(&mut cpu, e.vocab, &e.input_ids, None).unwrap();
    let diff = max_abs_diff(logits.floats(), &e.logits);
    println!("{case}: bf16 weights max |diff| = {diff:e}");
    assert!(diff <= 0.02, "{diff}");
    assert!(diff > 1e-5, "bf16 packing did not happen: {diff}");
}

/// The generated LLVM IR of one fused recurrent kernel and one projection kernel.
#[test]
fn kernel_ir_snapshots() {
    let m = Model::load(&golden_dir().join("tiny-text")).unwrap();
    // A named target, so the tile (and the text) does not depend on the machine.
    let opts = CpuOptions {
        target_cpu: griffin_backend_cpu::TargetCpu::Named("znver4".into()),
        ..options(1, 64)
    };
    let artifact = griffinc::cpu::build(&m, &opts).unwrap();
    let functions = &artifact.lowered.functions;
    let pick = |suffix: &str| {
        functions
            .iter()
            .find(|(name, _)| name.ends_with(suffix))
            .map(|(_, body)| body.clone())
            .unwrap_or_else(|| panic!("no kernel ending in {suffix}: {:?}", functions.keys()))
    };
    insta::assert_snapshot!("tiny_text_rg_lru_kernel", pick("_rg_lru"));
    let projection = functions
        .iter()
        .find(|(name, body)| name.ends_with("_linear") && body.contains("icmp sge i64"))
        .map(|(_, body)| body.clone())
        .unwrap();
    insta::assert_snapshot!("tiny_text_split_projection_kernel", projection);
}

/// The plan's weight recipes compute what the interpreter computes for the same expressions.
#[test]
fn weight_recipes_equal_the_interpreter() {
    use griffin_runtime::plan::BufferKind;
    for case in ["tiny-f32", "tiny-bf16-sharded"] {
        let m = Model::load(&golden_dir().join(case)).unwrap();
        // A named target, so the tile (and the text) does not depend on the machine.
        let opts = CpuOptions {
            target_cpu: griffin_backend_cpu::TargetCpu::Named("znver4".into()),
            ..options(1, 64)
        };
        let artifact = griffinc::cpu::build(&m, &opts).unwrap();
        let values: Vec<_> = artifact.lowered.weights.iter().map(|w| w.value).collect();
        let interp = griffinc::interp::Interpreter::new(&m.checkpoint);
        let expected = interp.evaluate_weights(&m.prefill, &values).unwrap();
        assert!(
            expected.len() > 10,
            "{case}: only {} weights",
            expected.len()
        );
        for (slot, want) in artifact.lowered.weights.iter().zip(&expected) {
            let BufferKind::Weight { recipe, .. } = &artifact.plan.buffers[slot.buffer].kind else {
                panic!("{}: not a weight buffer", slot.name);
            };
            let got = griffin_runtime::pack::evaluate(recipe, &m.checkpoint).unwrap();
            assert_eq!(got, want.floats(), "{case}: {}", slot.name);
        }
    }
}

/// Random small configurations, odd widths included (the recurrent width and the MLP: bf16
/// input pairs padded; every width leaves a partial panel or block), through the CPU backend with every register tile this machine can run,
/// f32 and bf16 checkpoints, and chunks that leave every remainder of a token group: the
/// same logits as the interpreter.
mod random_configs {
    use super::*;
    use griffin_backend_cpu::TargetCpu;
    use griffinc::session::Session;
    use proptest::prelude::*;

    /// Targets whose tiles differ (`TargetCpu::tile`) and that this machine can run.
    fn targets() -> Vec<TargetCpu> {
        let mut targets = vec![TargetCpu::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                targets.push(TargetCpu::Named("haswell".into()));
            }
            if ["avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"]
                .iter()
                .all(|f| match *f {
                    "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
                    "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
                    "avx512dq" => std::arch::is_x86_feature_detected!("avx512dq"),
                    "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
                    _ => std::arch::is_x86_feature_detected!("avx512cd"),
                })
            {
                targets.push(TargetCpu::Named("skylake-avx512".into()));
            } else {
                println!("no AVX-512 here: the wide tile is not run");
            }
        }
        targets
    }

    fn config_json() -> impl Strategy<Value = (String, usize, usize, bool, u64)> {
        let pattern = prop_oneof![
            Just(vec!["recurrent", "attention"]),
            Just(vec!["attention", "recurrent", "recurrent"]),
            Just(vec!["recurrent"]),
        ];
        (
            (
                1usize..=3,
                prop::bool::ANY,
                prop_oneof![Just(4usize), Just(12), Just(20)],
            ),
            (1usize..=40, 1usize..=3, 1usize..=4),
            (
                pattern,
                1usize..=3,
                1usize..=20,
                1usize..=9,
                prop::bool::ANY,
            ),
            (any::<u64>(), 17usize..=70),
        )
            .prop_map(
                |(
                    (heads, grouped, head_dim),
                    (mlp, lru_per_head, conv),
                    (pattern, layers, tokens, chunk, bf16),
                    (seed, vocab),
                )| {
                    let json = serde_json::json!({
                        "hidden_size": heads * head_dim,
                        "lru_width": heads * (2 * lru_per_head + 1),
                        "num_attention_heads": heads,
                        "num_key_value_heads": if grouped { 1 } else { heads },
                        "num_hidden_layers": layers,
                        "intermediate_size": 2 * mlp,
                        "vocab_size": vocab,
                        "attention_window_size": 5,
                        "conv1d_width": conv,
                        "block_types": pattern,
                        "rope_theta": 100.0,
                        "partial_rotary_factor": 0.5,
                    });
                    (json.to_string(), tokens, chunk, bf16, seed)
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn cpu_backend_equals_the_interpreter(
            (json, tokens, chunk, bf16, seed) in config_json()
        ) {
            let tmp = tempfile::tempdir().unwrap();
            common::write_random_checkpoint_as(tmp.path(), &json, seed, bf16);
            let model = Model::load(tmp.path()).unwrap();
            let vocab = model.checkpoint.config.vocab_size;
            let ids: Vec<u32> = (0..tokens)
                .map(|i| 1 + ((i as u64 * 7 + seed) % (vocab as u64 - 1)) as u32)
                .collect();
            let mut reference = Session::new(&model);
            let want = eval_with(&mut reference, vocab, &ids, None).unwrap();
            for target in targets() {
                let opts = CpuOptions {
                    target_cpu: target.clone(),
                    ..options(2, chunk)
                };
                let mut cpu = engine(&model, opts);
                let got = eval_with(&mut cpu, vocab, &ids, None).unwrap();
                let diff = max_abs_diff(got.floats(), want.floats());
                prop_assert!(diff <= 1e-4, "{:?}: max |diff| {} for {}", target, diff, json);
            }
        }
    }
}
