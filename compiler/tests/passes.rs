//! The optimisation passes: snapshots after each pass, kernel counts, the 2B target, and
//! passes that find nothing to match.

mod common;

use common::golden_dir;
use griffin_ir::text::{parse, print};
use griffin_ir::verify;
use griffinc::config::{PUBLISHED_2B as CONFIG_2B, PUBLISHED_9B as CONFIG_9B};
use griffinc::passes::stats::kernel_stats;
use griffinc::passes::{find, run_pipeline, PASSES};
use griffinc::session::Model;
use griffinc::trace::{trace, uniform_param_types, GraphKind};
use griffinc::Config;

/// Snapshots of the tiny-text graphs after each pass of the default pipeline, in order.
#[test]
fn snapshot_after_each_pass() {
    let m = Model::load_traced(&golden_dir().join("tiny-text")).unwrap();
    for traced in [&m.prefill, &m.decode] {
        let mut g = traced.clone();
        let passes: Vec<_> = PASSES.iter().collect();
        let mut step = 0;
        run_pipeline(&mut g, &passes, true, None, |report, graph| {
            step += 1;
            let name = format!("tiny_text_{}_{step:02}_{}", graph.name, report.pass);
            insta::assert_snapshot!(name, print(graph));
        })
        .unwrap();
    }
}

/// Kernel counts of tiny-text's decode graph (layers: recurrent, recurrent, attention) after
/// each pass: proof that each one fired, and by how much.
#[test]
fn each_pass_removes_the_kernels_it_should() {
    let m = Model::load_traced(&golden_dir().join("tiny-text")).unwrap();
    let types = m.layer_types();
    let mut g = m.decode.clone();
    let mut counts = vec![("traced", kernel_stats(&g, &types).kernels)];
    let passes: Vec<_> = PASSES.iter().collect();
    run_pipeline(&mut g, &passes, true, None, |report, graph| {
        counts.push((report.pass, kernel_stats(graph, &types).kernels));
    })
    .unwrap();
    let expected = [
        ("traced", 83),
        // The embedding scale's multiply moves into the gather.
        ("fold-weights", 82),
        // 16 kernels of each recurrent layer become one; the shared reset test goes too.
        ("fuse-rg-lru", 51),
        // x/y, gate/up (three MLPs) and q/k/v projections merge: 2 + 3 + 2.
        ("merge-projections", 44),
        // gelu·mul of three MLPs and two recurrent output gates.
        ("fuse-geglu", 34),
        // Two norms per layer and the final norm.
        ("fuse-norm", 27),
        // Two residual adds per layer.
        ("fuse-residual", 21),
        ("fuse-soft-cap", 20),
        // The two rotaries of the attention layer.
        ("fuse-rotary", 18),
        ("fuse-elementwise", 18),
        ("cse", 18),
        ("dce", 18),
    ];
    assert_eq!(counts, expected);
    let s = kernel_stats(&g, &types);
    assert_eq!(s.kernels_per_layer["recurrent"], 5);
    assert_eq!(s.kernels_per_layer["attention"], 5);
    assert_eq!(s.kernels_outside_layers, 3);
}

#[test]
fn published_shapes_meet_the_kernel_target() {
    // (name, config, recurrent layers, attention layers)
    for (name, json, recurrent, attention) in [("2B", CONFIG_2B, 18, 8), ("9B", CONFIG_9B, 26, 12)]
    {
        let config = Config::from_json(json).unwrap();
        let types: Vec<&str> = config.layers.iter().map(|b| b.name()).collect();
        let params = uniform_param_types(&config, griffin_ir::DType::BF16);
        for kind in [GraphKind::Decode, GraphKind::Prefill] {
            let traced = trace(&config, &params, kind).unwrap();
            let before = kernel_stats(&traced, &types);
            let mut g = traced.clone();
            let passes: Vec<_> = PASSES.iter().collect();
            run_pipeline(&mut g, &passes, true, None, |_, _| {}).unwrap();
            let after = kernel_stats(&g, &types);
            println!("{name} {}: {before:?} -> {after:?}", kind.name());
            // Recurrent layers of 30 kernels, attention layers of 16, 7 outside.
            assert_eq!(before.kernels, recurrent * 30 + attention * 16 + 7);
            assert_eq!(before.kernels_per_layer["recurrent"], 30);
            assert_eq!(before.kernels_per_layer["attention"], 16);
            assert!(
                after.kernels_per_layer.values().all(|&k| k <= 6),
                "{after:?}"
            );
            assert!(after.kernels_outside_layers <= 3, "{after:?}");
            assert_eq!(after.kernels, (recurrent + attention) * 5 + 3);
        }
    }
}

/// A graph that comes close to every pass's pattern and matches none.
const NEAR_MISSES: &str = r#"graph near_misses {
  %0: i32[T] = input.tokens "ids"
  %1: i32[] = input.position "start"
  %2: f32[8] = input.state "scan"
  %3: f32[4,1,4] = input.state "keys"
  %4: f32[4,1,4] = input.state "values"
  %5: i32[T] = positions %1, %0
  %6: f32[16,8] = param "embed"
  %7: f32[T,8] = gather %6, %0
  %8: f32[8] = param "norm"
  %9: f32[T,8] = rms_norm %7, %8 {eps=1e-6, weight_offset=0.0}
  %10: f32[8,8] = param "wa"
  %11: f32[8,8] = param "wb"
  %12: f32[8] = param "bb"
  %13: f32[T,8] = linear %9, %10 {bias=false}
  %14: f32[T,8] = linear %9, %11, %12 {bias=true}
  %15: f32[T,8] = gelu_tanh %14
  %16: f32[T,8] = mul %15, %7
  %17: f32[T,8] = exp %13
  %18: f32[T,8], %19: f32[8] = linear_scan %17, %16, %5, %2
  %20: f32[T,8] = linear %15, %10 {bias=false}
  %21: f32[T,8] = add %20, %18
  %22: f32[T,8] = soft_cap %20 {cap=30.0}
  %23: f32[T,2,4] = reshape %21 {shape=[T,2,4]}
  %24: f32[T,2,4] = rotary %23, %5 {theta=10000.0, rotary_dims=2}
  %25: f32[4,8] = param "wk"
  %26: f32[T,4] = linear %22, %25 {bias=false}
  %27: f32[T,1,4] = reshape %26 {shape=[T,1,4]}
  %28: f32[T,2,4], %29: f32[4,1,4], %30: f32[4,1,4] = local_attention %24, %27, %27, %5, %3, %4 {window=4, scale=0.5}
  %31: f32[T,8] = reshape %28 {shape=[T,8]}
  %32: f32[T,8] = mul %31, %22
  output.logits "logits" %32
  output.state "scan" %19
  output.state "keys" %29
  output.state "values" %30
}
"#;

fn leaves_near_misses_unchanged(pass: &str) {
    let mut g = parse(NEAR_MISSES).unwrap();
    verify(&g).unwrap();
    let rewrites = (find(pass).unwrap().run)(&mut g).unwrap();
    assert_eq!(rewrites, 0, "{pass} rewrote something");
    assert_eq!(print(&g), NEAR_MISSES, "{pass} changed the graph");
}

#[test]
fn fold_weights_without_match_changes_nothing() {
    leaves_near_misses_unchanged("fold-weights");
}
#[test]
fn fuse_rg_lru_without_match_changes_nothing() {
    leaves_near_misses_unchanged("fuse-rg-lru");
}
#[test]
fn merge_projections_without_match_changes_nothing() {
    leaves_near_misses_unchanged("merge-projections");
}
#[test]
fn fuse_geglu_without_match_changes_nothing() {
    leaves_near_misses_unchanged("fuse-geglu");
}
#[test]
fn fuse_norm_without_match_changes_nothing() {
    leaves_near_misses_unchanged("fuse-norm");
}
#[test]
fn fuse_residual_without_match_changes_nothing() {
    leaves_near_misses_unchanged("fuse-residual");
}
#[test]
fn fuse_soft_cap_without_match_changes_nothing() {
    leaves_near_misses_unchanged("fuse-soft-cap");
}
#[test]
fn fuse_rotary_without_match_changes_nothing() {
    leaves_near_misses_unchanged("fuse-rotary");
}
#[test]
fn fuse_elementwise_without_match_changes_nothing() {
    leaves_near_misses_unchanged("fuse-elementwise");
}
#[test]
fn cse_without_match_changes_nothing() {
    leaves_near_misses_unchanged("cse");
}
#[test]
fn dce_without_match_changes_nothing() {
    leaves_near_misses_unchanged("dce");
}

#[test]
fn every_pass_is_covered_by_a_no_match_test() {
    let source = include_str!("passes.rs");
    for pass in PASSES {
        let call = format!("leaves_near_misses_unchanged(\"{}\")", pass.name);
        assert!(source.contains(&call), "no no-match test for {}", pass.name);
    }
}

#[test]
fn the_optimised_pipeline_is_a_fixpoint() {
    // Running the pipeline again finds nothing more to do.
    let m = Model::load(&golden_dir().join("tiny-text")).unwrap();
    let mut g = m.decode.clone();
    let before = print(&g);
    let passes: Vec<_> = PASSES.iter().collect();
    let reports = run_pipeline(&mut g, &passes, true, None, |_, _| {}).unwrap();
    assert!(reports.iter().all(|r| r.rewrites == 0), "{reports:?}");
    assert_eq!(print(&g), before);
}

#[test]
fn elementwise_fusion_groups_trees() {
    // Alone on the traced graph, elementwise fusion groups the RG-LRU gate math.
    let m = Model::load_traced(&golden_dir().join("tiny-text")).unwrap();
    let types = m.layer_types();
    let mut g = m.decode.clone();
    let before = kernel_stats(&g, &types).kernels;
    let rewrites = (find("fuse-elementwise").unwrap().run)(&mut g).unwrap();
    verify(&g).unwrap();
    let after = kernel_stats(&g, &types).kernels;
    assert!(rewrites > 0 && after < before, "{before} -> {after}");
    let text = print(&g);
    assert!(text.contains("= elementwise "), "{text}");
}

/// A pass that breaks the graph: the verifier names it.
fn retype_first_linear(g: &mut griffin_ir::Graph) -> Result<usize, griffin_ir::IrError> {
    let id = g
        .node_ids()
        .find(|&id| matches!(g.node(id).op, griffin_ir::Op::Linear { .. }))
        .unwrap();
    g.node_mut(id).results[0].dtype = griffin_ir::DType::BF16;
    Ok(1)
}

#[test]
fn verifier_failure_names_the_pass() {
    static BREAKS: griffinc::passes::Pass = griffinc::passes::Pass {
        name: "break-types",
        contract: "retypes a linear's result, which no pass may do",
        run: retype_first_linear,
    };
    let m = Model::load_traced(&golden_dir().join("tiny-f32")).unwrap();
    let mut g = m.decode.clone();
    let err = run_pipeline(
        &mut g,
        &[find("fold-weights").unwrap(), &BREAKS],
        true,
        None,
        |_, _| {},
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("graph does not verify after pass `break-types`"),
        "{message}"
    );
}
