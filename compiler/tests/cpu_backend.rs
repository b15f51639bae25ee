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
    let artifact = griffinc::cpu::build(&m, &options(1, 64)).unwrap();
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
        let artifact = griffinc::cpu::build(&m, &options(1, 64)).unwrap();
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
