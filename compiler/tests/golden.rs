//! Every golden case through the library: full logits, stepwise decode, greedy ids, tokenizer.

mod common;

use common::{expected, golden_dir, max_abs_diff, CASES, F32_TOLERANCE};
use griffinc::session::{eval, generate_greedy, Model};
use griffinc::tokenizer::TextTokenizer;

fn model(case: &str) -> Model {
    Model::load(&golden_dir().join(case)).unwrap()
}

#[test]
fn full_logits_match_reference() {
    for case in CASES {
        let e = expected(case);
        // The traced graph and the optimised one (`model` runs the default pipeline).
        let traced = Model::load_traced(&golden_dir().join(case)).unwrap();
        for (pipeline, m) in [("none", traced), ("default", model(case))] {
            let logits = eval(&m, &e.input_ids, None).unwrap();
            let diff = max_abs_diff(logits.floats(), &e.logits);
            println!("{case} (passes {pipeline}): full pass max |diff| = {diff:e}");
            assert!(diff <= F32_TOLERANCE, "{case}, passes {pipeline}: {diff}");
        }
    }
}

#[test]
fn stepwise_decode_matches_reference() {
    for case in CASES {
        let (m, e) = (model(case), expected(case));
        let t = e.input_ids.len();
        let prefill = t - e.decode_steps;
        let logits = eval(&m, &e.input_ids, Some(prefill)).unwrap();
        let tail = &logits.floats()[prefill * e.vocab..];
        let diff = max_abs_diff(tail, &e.decode_logits);
        println!(
            "{case}: prefill {prefill} + {} steps max |diff| = {diff:e}",
            e.decode_steps
        );
        assert!(diff <= F32_TOLERANCE, "{case}: {diff}");
    }
}

#[test]
fn every_split_gives_the_same_logits() {
    // Prefill of any length followed by steps is one function: also across the window (8).
    let case = "tiny-f32";
    let (m, e) = (model(case), expected(case));
    for prefill in [0, 1, 7, 8, 9, 23] {
        let logits = eval(&m, &e.input_ids, Some(prefill)).unwrap();
        let diff = max_abs_diff(logits.floats(), &e.logits);
        assert!(diff <= F32_TOLERANCE, "prefill {prefill}: {diff}");
    }
}

#[test]
fn greedy_ids_match_reference_exactly() {
    for case in CASES {
        let (m, e) = (model(case), expected(case));
        let ids = generate_greedy(&m, &e.input_ids, e.generated_ids.len(), true, |_| {}).unwrap();
        assert_eq!(ids, e.generated_ids, "{case}");
    }
}

#[test]
fn tokenizer_ids_match_reference() {
    let case = "tiny-text";
    let (m, e) = (model(case), expected(case));
    let tok =
        TextTokenizer::load(&golden_dir().join(case), m.checkpoint.config.bos_token_id).unwrap();
    let ids = tok.encode(e.prompt.as_deref().unwrap()).unwrap();
    assert_eq!(ids, e.input_ids);
}
