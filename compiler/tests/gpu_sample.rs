//! The device sampler (`griffin_backend_ptx::sample`) on the PTX interpreter against the
//! host's (`griffin_runtime::sampling`): the same logits, settings, seed and history give the
//! same ids, draw after draw (the generator's state and the seen bits carried on the device).

mod common;

use griffinc::gpu::sampling::EmuSampler;
use griffinc::gpu::EmuEngine;
use griffinc::sampling::{Sampler, SamplingParams};
use griffinc::session::{step_and_choose, Engine, Model};

/// SplitMix64, for test data.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The device sampler on the interpreter for one vocabulary, its blocks run in a shuffled
/// order (another each launch): each launch's last block to finish does the one-block work,
/// and which block that is must not matter.
struct Device(EmuSampler);

impl Device {
    fn new(vocab: usize) -> Device {
        let mut sampler = EmuSampler::new(vocab).unwrap();
        sampler
            .memory
            .set_block_order(griffin_backend_ptx::emu::BlockOrder::Shuffled(vocab as u64));
        Device(sampler)
    }

    /// Configuration and seen bits from the host's sampler and history, as the runtime
    /// uploads them.
    fn start(&mut self, host: &Sampler, history: &[u32]) {
        self.0.start(host, history).unwrap();
    }

    fn sample(&mut self, logits: &[f32]) -> u32 {
        self.0.draw(logits, &mut |_, _, _| {}).unwrap()
    }
}

/// Logits on a coarse grid (many ties) with a few far above the rest, some -inf or NaN.
fn logits(gen: &mut Gen, vocab: usize, spread: f32) -> Vec<f32> {
    (0..vocab)
        .map(|i| match gen.next() % 97 {
            0 => f32::NEG_INFINITY,
            1 => f32::NAN,
            r => (r % 40) as f32 * spread - 10.0 + if i % 101 == 7 { 8.0 } else { 0.0 },
        })
        .collect()
}

#[test]
fn device_draws_what_the_host_draws() {
    let mut gen = Gen(5);
    let settings: Vec<SamplingParams> = vec![
        SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.3,
            top_k: 40,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 300,
            top_p: 0.8,
            min_p: 0.01,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 2.0,
            min_p: 0.05,
            repetition_penalty: 1.3,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 0.5,
            top_p: 0.999,
            top_k: 5000,
            repetition_penalty: 0.8,
            ..SamplingParams::default()
        },
        // Penalised argmax: nothing drawn.
        SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.5,
            ..SamplingParams::default()
        },
    ];
    for (case, vocab) in [1usize, 33, 700, 2048, 2500].into_iter().enumerate() {
        let mut device = Device::new(vocab);
        for (s, params) in settings.iter().enumerate() {
            let params = SamplingParams {
                seed: (case * 100 + s) as u64,
                ..params.clone()
            };
            let mut host = Sampler::new(params.clone());
            let mut history: Vec<u32> = (0..20)
                .map(|_| (gen.next() % vocab as u64) as u32)
                .collect();
            device.start(&host, &history);
            for draw in 0..4 {
                let l = logits(&mut gen, vocab, [0.25, 0.5, 1.0][draw % 3]);
                let want = host.sample(&l, &history);
                let got = device.sample(&l);
                assert_eq!(got, want, "vocab {vocab}, draw {draw}: {params:?}");
                history.push(want);
            }
        }
    }
}

#[test]
fn cuts_ending_in_one_tie_keep_the_fewest_lowest_ids() {
    // Every token equally likely (a few masked): top-k, top-p and min-p all end among the
    // same tied likelihood, so the kept set is the lowest ids, as many as the strictest cut.
    let vocab = 2100;
    let flat: Vec<f32> = (0..vocab)
        .map(|i| if i % 13 == 4 { f32::NEG_INFINITY } else { 1.0 })
        .collect();
    let mut device = Device::new(vocab);
    for (top_k, top_p, min_p) in [
        (10, 0.5, 0.0),
        (4, 0.9, 0.5),
        (1500, 0.3, 1.0),
        (0, 0.001, 0.0),
        (3000, 1.0, 0.2),
    ] {
        let params = SamplingParams {
            temperature: 1.0,
            top_k,
            top_p,
            min_p,
            seed: top_k as u64,
            ..SamplingParams::default()
        };
        let mut host = Sampler::new(params.clone());
        device.start(&host, &[]);
        let mut ids = Vec::new();
        for _ in 0..6 {
            let want = host.sample(&flat, &[]);
            assert_eq!(device.sample(&flat), want, "{params:?}");
            ids.push(want);
        }
        println!("{top_k} {top_p} {min_p}: {ids:?}");
    }
}

/// One chat turn: `new_ids` prefilled on top of the document so far, the first reply token
/// drawn by the host from the prompt's logits, the next `n - 1` by `step_and_choose`.
fn turn(
    engine: &mut EmuEngine,
    sampler: &mut Sampler,
    history: &mut Vec<u32>,
    new_ids: &[u32],
    n: usize,
) -> Vec<u32> {
    let vocab = engine.program().plan.vocab();
    history.extend_from_slice(new_ids);
    let rows = engine.prefill_last(new_ids).unwrap();
    let mut next = sampler.sample(&rows[rows.len() - vocab..], history);
    let (mut out, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..n {
        history.push(next);
        out.push(next);
        next = step_and_choose(engine, next, history, sampler, &mut logits).unwrap();
    }
    out
}

#[test]
fn engines_draw_on_the_device_what_the_host_draws_across_turns() {
    // `griffinc generate --backend ptx-emu` / `cuda`, `--chat` included: one sampler over two
    // turns of one document and a second document, the first token of each turn drawn by the
    // host from the prompt's logits, the rest on the device (the generator's state read back
    // after each device draw; configuration and seen bits uploaded again after the host
    // draws): the same ids as an engine sampling on the host.
    let model = Model::load(&common::golden_dir().join("tiny-text")).unwrap();
    let mut device = EmuEngine::with_prefill_chunk(&model, Some(8)).unwrap();
    device.sample_on_device = true;
    let mut host = EmuEngine::with_prefill_chunk(&model, Some(8)).unwrap();
    host.sample_on_device = false;
    for params in [
        SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            repetition_penalty: 1.2,
            seed: 3,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 0.0,
            repetition_penalty: 3.0,
            ..SamplingParams::default()
        },
    ] {
        let (mut on_device, mut on_host) = (Sampler::new(params.clone()), Sampler::new(params));
        for document in 0..2u32 {
            device.reset();
            host.reset();
            let (mut hd, mut hh) = (Vec::new(), Vec::new());
            for new_ids in [vec![2u32, 17 + document, 90, 5], vec![44, 8]] {
                let a = turn(&mut device, &mut on_device, &mut hd, &new_ids, 10);
                let b = turn(&mut host, &mut on_host, &mut hh, &new_ids, 10);
                assert_eq!(a, b, "document {document}, turn {new_ids:?}");
                let distinct: std::collections::HashSet<_> = a.iter().collect();
                assert!(distinct.len() > 3, "{a:?}");
            }
        }
    }
}
