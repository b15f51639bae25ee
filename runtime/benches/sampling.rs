//! Host-side cost of choosing one token from a 2B-sized vocabulary (256,000 logits): what a
//! sampled decode step adds to the device's step (greedy on the GPU runs its argmax there).
//! Prints µs per token, median of 200 draws, for each setting.
//!
//!     cargo bench -p griffin-runtime --bench sampling

use std::time::Instant;

use griffin_runtime::sampling::{Sampler, SamplingParams};

/// Logits shaped like a language model's: roughly normal around 0 (spread 2.5, from a sum of
/// four hashed uniforms), a few dozen plausible tokens well above the rest.
fn logits(vocab: usize) -> Vec<f32> {
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut uniform = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..vocab)
        .map(|i| {
            let z = (0..4).map(|_| uniform()).sum::<f32>() - 2.0;
            z * 2.5 * 1.73 + if i % 7919 == 0 { 12.0 } else { 0.0 }
        })
        .collect()
}

fn main() {
    let vocab = 256_000;
    let l = logits(vocab);
    let history: Vec<u32> = (0..1024).map(|i| (i * 193) % vocab as u32).collect();
    let sampled = |f: fn(&mut SamplingParams)| {
        let mut p = SamplingParams {
            temperature: 1.0,
            seed: 1,
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    };
    let settings: [(&str, SamplingParams); 7] = [
        ("greedy", SamplingParams::default()),
        ("temperature 1", sampled(|_| {})),
        (
            "temperature 0.7, top-p 0.9",
            sampled(|p| {
                p.temperature = 0.7;
                p.top_p = 0.9
            }),
        ),
        ("top-k 40", sampled(|p| p.top_k = 40)),
        ("min-p 0.05", sampled(|p| p.min_p = 0.05)),
        (
            "top-p 0.95, repetition penalty 1.1 (1024 seen)",
            sampled(|p| {
                p.top_p = 0.95;
                p.repetition_penalty = 1.1
            }),
        ),
        (
            "temperature 2, top-p 0.99",
            sampled(|p| {
                p.temperature = 2.0;
                p.top_p = 0.99
            }),
        ),
    ];
    println!("| setting | µs per token (median of 200) |");
    println!("| --- | --- |");
    for (name, params) in settings {
        let mut s = Sampler::new(params);
        let mut times = Vec::new();
        for _ in 0..200 {
            let start = Instant::now();
            std::hint::black_box(s.sample(&l, &history));
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        println!("| {name} | {:.1} |", times[100]);
    }
}
