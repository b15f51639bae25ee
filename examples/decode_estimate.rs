//! Where the 2B model's decode step would wait, by the PTX interpreter's latency model: the
//! GPU program of a model with the 2B model's widths and window but three layers (recurrent,
//! recurrent, attention: one of each kind twice over, as in its 26) is lowered, its weights
//! zeros, and one decode step at position 3000 (the 2048-position window full) runs launch by
//! launch with the model on. For each launch it prints the critical path (the longest thread's
//! chain of dependent instructions, every block at once; `emu::Latencies`' constants) and the
//! time its bytes take at a bandwidth (the GPU's, or its blocks' own where it has fewer blocks
//! than SMs: one SM takes in an assumed 64 bytes a cycle), and then adds them up for the 2B
//! model's 18 recurrent and
//! 8 attention layers: each launch counted as the longer of the two, plus an assumed gap per
//! launch boundary. An estimate from assumed constants, never a measurement.
//!
//!     cargo run --release -p griffinc --example decode_estimate [-- VOCAB [KERNEL]]
//!
//! VOCAB (default 16384) sizes the embedding and logits the interpreter runs; the logits row
//! of the table is then scaled to the 2B model's 256,000 (its bandwidth time; its latency path
//! grows with its rows per warp, 61 at 256,000, which the table also scales), and the argmax
//! row is the argmax kernel run alone over the 2B logits projection's 4,224 best pairs.
//! KERNEL, a part of a kernel's name, times only those launches (the rest are skipped: a
//! minute less per try when working on one kernel, but their inputs then count as not written
//! by a recent kernel, so from DRAM: attend reads 3.47 µs so, 2.98 in the full run).

use griffin_backend_ptx::emu::{self, Latencies};
use griffin_backend_ptx::gemv::best_slots;
use griffin_backend_ptx::misc::{argmax_best, ARGMAX_THREADS};
use griffinc::checkpoint::write_zero_checkpoint;
use griffinc::config::PUBLISHED_2B;
use griffinc::gpu::sampling::EmuSampler;
use griffinc::gpu::{EmuEngine, GpuOptions, LaunchLatency};
use griffinc::sampling::{Sampler, SamplingParams};
use griffinc::session::Model;

/// Cycles per microsecond: an H200's boost clock (1.98 GHz).
const CYCLES_PER_US: f64 = 1980.0;
/// Bytes per microsecond at the 4.25 TB/s an H200 copies at (as measured for the issue).
const BYTES_PER_US: f64 = 4.25e6;
/// What one SM can take in from L2, bytes per µs: an assumed 64 bytes a cycle. A launch of
/// fewer blocks than SMs cannot spread its bytes wider than its blocks.
const SM_BYTES_PER_US: f64 = 64.0 * CYCLES_PER_US;
/// SMs of an H200.
const SMS: f64 = 132.0;
/// The published model's vocabulary.
const VOCAB_2B: u64 = 256_000;

/// The published 2B configuration with three layers (recurrent, recurrent, attention) and a
/// vocabulary of `vocab`.
fn config(vocab: u64) -> Result<String, Box<dyn std::error::Error>> {
    let mut c: serde_json::Value = serde_json::from_str(PUBLISHED_2B)?;
    c["num_hidden_layers"] = 3.into();
    c["vocab_size"] = vocab.into();
    Ok(serde_json::to_string_pretty(&c)?)
}

/// The greedy argmax of the 2B model's step, run alone: over the best pairs of the logits
/// projection's 528 × 8 warps (one block, so its path does not scale from a smaller
/// vocabulary's), in cycles.
fn argmax_2b_cycles(lat: Latencies) -> Result<u64, Box<dyn std::error::Error>> {
    let slots = best_slots(VOCAB_2B as u32);
    let module = emu::Module::parse(&griffin_backend_ptx::module(&[argmax_best(
        "argmax",
        slots,
        VOCAB_2B as u32,
    )]))?;
    let mut memory = emu::Memory::new();
    let pairs: Vec<u8> = (0..slots)
        .flat_map(|i| [0f32.to_bits(), i].into_iter().flat_map(u32::to_le_bytes))
        .collect();
    let best = memory.alloc(&pairs);
    let out = memory.alloc_u32(&[0]);
    memory.enable_timing(lat);
    let launch = emu::Launch {
        grid: 1,
        block: ARGMAX_THREADS,
        params: &[best, out],
    };
    emu::run(&module, "argmax", &launch, &mut memory)?;
    Ok(memory.last_launch_cycles().unwrap_or(0))
}

/// The device sampler's launches over 256,000 logits (spread over 64 values, so top-p keeps
/// many) at temperature 0.8, top-p 0.95 and repetition penalty 1.1 (gpu-check.sh's sampled
/// setting) with 100 tokens of history, run alone.
fn sampler_2b(lat: Latencies) -> Result<Vec<LaunchLatency>, Box<dyn std::error::Error>> {
    let vocab = VOCAB_2B as u32;
    let mut device = EmuSampler::new(vocab as usize)?;
    let logits: Vec<f32> = (0..vocab)
        .map(|i| (i.wrapping_mul(2654435761) >> 26) as f32 * 0.25 - 8.0)
        .collect();
    let sampler = Sampler::new(SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        repetition_penalty: 1.1,
        ..SamplingParams::default()
    });
    let history: Vec<u32> = (0..100).map(|i| i * 2003 % vocab).collect();
    device.start(&sampler, &history)?;
    device.memory.enable_timing(lat);
    let mut out = Vec::new();
    device.draw(&logits, &mut |k, instructions, memory| {
        out.push(LaunchLatency {
            kernel: k.name.clone(),
            grid: k.grid,
            block: k.block,
            instructions,
            cycles: memory.last_launch_cycles().unwrap_or(0),
            bytes: k.bytes,
        });
    })?;
    Ok(out)
}

/// Microseconds to move `bytes` at the GPU's bandwidth, or at the SMs' own where the grid
/// has fewer blocks than SMs.
fn bandwidth_us(bytes: u64, grid: u32) -> f64 {
    let sms = (grid as f64).min(SMS);
    (bytes as f64 / BYTES_PER_US).max(bytes as f64 / (sms * SM_BYTES_PER_US))
}

/// Which part of the model a launch belongs to, by its place in the three-layer greedy step:
/// the embedding first, the logits and the argmax last, five launches per recurrent layer
/// between.
fn part(i: usize, launches: usize, recurrent_launches: usize) -> &'static str {
    if i == 0 {
        "embedding"
    } else if i + 1 == launches {
        "argmax"
    } else if i + 2 == launches {
        "logits"
    } else if i <= 2 * recurrent_launches {
        "recurrent"
    } else {
        "attention"
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vocab: u64 = match std::env::args().nth(1) {
        Some(v) => v.parse()?,
        None => 16384,
    };
    let dir = tempfile::tempdir()?;
    write_zero_checkpoint(dir.path(), &config(vocab)?)?;
    let model = Model::load(dir.path())?;
    let mut engine = EmuEngine::with_options(&model, &GpuOptions::default())?;
    engine.enable_access_stats();
    let started = std::time::Instant::now();
    let lat = Latencies::default();
    let only = std::env::args().nth(2);
    let keep = |kernel: &str| only.as_ref().map_or(true, |o| kernel.contains(o.as_str()));
    let launches = engine.time_decode_step(2, 3000, lat, &keep)?;
    if only.is_some() {
        for l in &launches {
            println!(
                "{}: {} × {}, {} instructions, critical path {:.2} µs",
                l.kernel,
                l.grid,
                l.block,
                l.instructions,
                l.cycles as f64 / CYCLES_PER_US
            );
        }
        for l in sampler_2b(lat)?.iter().filter(|l| keep(&l.kernel)) {
            let us = l.cycles as f64 / CYCLES_PER_US;
            println!(
                "{} (256,000 logits): {} × {}, critical path {us:.2} µs",
                l.kernel, l.grid, l.block
            );
        }
        return Ok(());
    }
    eprintln!(
        "interpreted {} launches in {:.1} s",
        launches.len(),
        started.elapsed().as_secs_f64()
    );
    // Two recurrent layers of five launches, one attention layer of six (the embedding,
    // logits and argmax outside): the 2B plan's shape (compiler/tests/published_shapes.rs
    // checks it).
    let recurrent_launches = 5;
    assert_eq!(
        launches.len(),
        3 + 2 * recurrent_launches + 6,
        "launch layout"
    );
    println!("{lat:?}, {CYCLES_PER_US} cycles/us, {BYTES_PER_US:.3e} bytes/us\n");
    println!(
        "| launch | part | grid × block | instructions | critical path µs | bytes MB | at bandwidth µs |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: |");
    // (part, latency µs, bandwidth µs) per launch, the logits scaled to the 2B vocabulary.
    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    for (i, l) in launches.iter().enumerate() {
        let p = part(i, launches.len(), recurrent_launches);
        let LaunchLatency {
            kernel,
            grid,
            block,
            instructions,
            cycles,
            mut bytes,
        } = l.clone();
        let mut latency = cycles as f64 / CYCLES_PER_US;
        if p == "logits" {
            // Rows per warp grow with the vocabulary (the grid is fixed past 8192 rows).
            let scale = VOCAB_2B as f64 / vocab as f64;
            bytes = (bytes as f64 * scale) as u64;
            latency *= scale;
        }
        if p == "argmax" {
            bytes = 8 * best_slots(VOCAB_2B as u32) as u64;
            latency = argmax_2b_cycles(lat)? as f64 / CYCLES_PER_US;
        }
        if kernel.ends_with("_attend") {
            // Attention's bytes depend on the position: the window's keys and values (f32).
            bytes = 2 * 2048 * 256 * 4;
        }
        let bandwidth = bandwidth_us(bytes, grid);
        println!(
            "| {kernel} | {p} | {grid} × {block} | {instructions} | {latency:.2} | {:.2} | {bandwidth:.2} |",
            bytes as f64 / 1e6
        );
        rows.push((p, latency, bandwidth));
    }
    // The 2B model: 18 recurrent layers (the table's two, nine times) and 8 attention layers.
    let weight = |p: &str| match p {
        "recurrent" => 9.0,
        "attention" => 8.0,
        _ => 1.0,
    };
    let launches_2b: f64 = rows.iter().map(|(p, _, _)| weight(p)).sum();
    let sum = |f: &dyn Fn(f64, f64) -> f64| -> f64 {
        rows.iter().map(|&(p, l, b)| weight(p) * f(l, b)).sum()
    };
    let bandwidth_only = sum(&|_, b| b);
    let longer = sum(&|l, b| l.max(b));
    println!("\n2B greedy decode step, {launches_2b} launches:");
    println!(
        "- bytes at bandwidth alone: {:.0} µs ({:.0} tokens/s)",
        bandwidth_only,
        1e6 / bandwidth_only
    );
    println!(
        "- each launch the longer of its critical path and its bytes: {longer:.0} µs ({:.0} tokens/s)",
        1e6 / longer
    );
    for gap in [1.0, 2.0, 3.0] {
        let t = longer + gap * launches_2b;
        println!(
            "- plus {gap} µs per launch boundary: {t:.0} µs ({:.0} tokens/s)",
            1e6 / t
        );
    }
    // Sampled decoding: the sampler's launches in place of the argmax.
    println!(
        "\nthe device sampler over 256,000 logits (temperature 0.8, top-p 0.95, penalty 1.1):\n"
    );
    println!("| launch | grid × block | critical path µs | bytes at bandwidth µs |");
    println!("| --- | --- | ---: | ---: |");
    let sampler = sampler_2b(lat)?;
    let mut sampler_us = 0.0;
    for l in &sampler {
        let us = l.cycles as f64 / CYCLES_PER_US;
        let bandwidth = bandwidth_us(l.bytes, l.grid);
        sampler_us += us.max(bandwidth);
        println!(
            "| {} | {} × {} | {us:.2} | {bandwidth:.2} |",
            l.kernel, l.grid, l.block
        );
    }
    let argmax_us = rows.last().map_or(0.0, |&(_, l, b)| l.max(b));
    println!(
        "\nsampled step: {:.0} µs before launch gaps ({} launches; the sampler {sampler_us:.1} µs in place of the argmax's {argmax_us:.1})",
        longer - argmax_us + sampler_us,
        launches_2b - 1.0 + sampler.len() as f64,
    );
    // Where the time goes beyond bandwidth: launches whose critical path is the longer.
    println!("\nlaunches bound by latency (critical path > bytes at bandwidth), 2B step total:");
    let mut by_kernel: Vec<(String, f64)> = Vec::new();
    for (l, &(p, lat_us, bw_us)) in launches.iter().zip(&rows) {
        if lat_us > bw_us {
            by_kernel.push((l.kernel.clone(), weight(p) * (lat_us - bw_us)));
        }
    }
    by_kernel.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (k, extra) in by_kernel {
        println!("- {k}: {extra:.1} µs over its bandwidth time");
    }
    // The step's memory transactions (the interpreter's count).
    if let Some(stats) = engine.access_stats() {
        println!(
            "\nshared-memory wavefronts (taken / fewest its words allow):\n{}",
            stats.shared
        );
        println!(
            "global sectors (taken / fewest its bytes allow):\n{}",
            stats.global
        );
    }
    Ok(())
}
