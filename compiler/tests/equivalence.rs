//! Property: the optimised graph computes what the traced one does, for random small
//! configurations, weights, inputs and carried states.

use std::collections::{BTreeMap, HashMap};

use griffin_ir::{DType, Graph, InputRole};
use griffinc::interp::{Interpreter, Tensor};
use griffinc::passes::{optimize, PASSES};
use griffinc::trace::{names, trace, uniform_param_types, GraphKind};
use griffinc::Config;
use proptest::prelude::*;

/// A small deterministic generator, so a failing case replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

#[derive(Debug, Clone)]
struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block: usize,
    mlp: usize,
    window: usize,
    conv: usize,
    pattern: Vec<&'static str>,
    layers: usize,
    tokens: usize,
    start: usize,
    bf16: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    let pattern = prop_oneof![
        Just(vec!["recurrent", "recurrent", "attention"]),
        Just(vec!["attention", "recurrent"]),
        Just(vec!["recurrent"]),
        Just(vec!["attention"]),
    ];
    (
        (
            1usize..=4,
            prop::bool::ANY,
            prop_oneof![Just(4usize), Just(8)],
            1usize..=3,
        ),
        (1usize..=6, 1usize..=5, 1usize..=4, pattern, 1usize..=4),
        (
            1usize..=7,
            prop_oneof![Just(0usize), Just(3), Just(9)],
            prop::bool::ANY,
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (heads, grouped, head_dim, block),
                (mlp, window, conv, pattern, layers),
                (tokens, start, bf16, seed),
            )| Case {
                heads,
                kv_heads: if grouped { 1 } else { heads },
                head_dim,
                block,
                mlp,
                window,
                conv,
                pattern,
                layers,
                tokens,
                start,
                bf16,
                seed: seed | 1,
            },
        )
}

fn config(c: &Case) -> Config {
    let json = serde_json::json!({
        "hidden_size": c.heads * c.head_dim,
        "lru_width": c.heads * c.block,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "num_hidden_layers": c.layers,
        "intermediate_size": 2 * c.mlp,
        "vocab_size": 32,
        "attention_window_size": c.window,
        "conv1d_width": c.conv,
        "block_types": c.pattern,
        "rope_theta": 100.0,
        "partial_rotary_factor": 0.5,
    });
    Config::from_json(&json.to_string()).unwrap()
}

fn round_bf16(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

fn random_weights(config: &Config, bf16: bool, rng: &mut Rng) -> HashMap<String, Vec<f32>> {
    config
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let fan_in = if shape.len() > 1 {
                *shape.last().unwrap()
            } else {
                1
            };
            let scale = 1.0 / (fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let values = (0..n)
                .map(|_| {
                    let v = rng.next() * scale;
                    if bf16 {
                        round_bf16(v)
                    } else {
                        v
                    }
                })
                .collect();
            (name, values)
        })
        .collect()
}

fn random_inputs(graph: &Graph, c: &Case, rng: &mut Rng) -> HashMap<String, Tensor> {
    let mut inputs = HashMap::new();
    for (_, name, role, ty) in graph.inputs() {
        if role != InputRole::State {
            continue;
        }
        let shape: Vec<usize> = ty
            .shape
            .dims()
            .iter()
            .map(|d| d.fixed().unwrap() as usize)
            .collect();
        let n = shape.iter().product();
        inputs.insert(
            name.to_string(),
            Tensor::f32(shape, (0..n).map(|_| rng.next()).collect()),
        );
    }
    let ids = (0..c.tokens)
        .map(|_| ((rng.next() + 1.0) * 15.9) as i64)
        .collect();
    inputs.insert(names::TOKENS.into(), Tensor::i32(vec![c.tokens], ids));
    inputs.insert(
        names::START.into(),
        Tensor::i32(vec![], vec![c.start as i64]),
    );
    inputs
}

fn check(c: &Case) {
    let config = config(c);
    let dtype = if c.bf16 { DType::BF16 } else { DType::F32 };
    let params: BTreeMap<_, _> = uniform_param_types(&config, dtype);
    let mut rng = Rng(c.seed);
    let weights = random_weights(&config, c.bf16, &mut rng);
    let kind = if c.tokens == 1 {
        GraphKind::Decode
    } else {
        GraphKind::Prefill
    };
    let traced = trace(&config, &params, kind).unwrap();
    let mut optimised = traced.clone();
    let passes: Vec<_> = PASSES.iter().collect();
    optimize(&mut optimised, &passes).unwrap();
    let inputs = random_inputs(&traced, c, &mut rng);

    let expected = Interpreter::new(&weights).run(&traced, &inputs).unwrap();
    let got = Interpreter::new(&weights).run(&optimised, &inputs).unwrap();
    assert_eq!(expected.len(), got.len());
    for (name, want) in &expected {
        let have = &got[name];
        assert_eq!(want.shape, have.shape, "{name}");
        for (i, (a, b)) in want.floats().iter().zip(have.floats()).enumerate() {
            let tolerance = 2e-5 * (1.0 + a.abs());
            assert!(
                (a - b).abs() <= tolerance,
                "{name}[{i}]: traced {a} vs optimised {b} ({c:?})"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn optimised_graph_computes_the_traced_function(c in case()) {
        check(&c);
    }
}
