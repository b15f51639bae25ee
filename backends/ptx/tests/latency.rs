//! The decode step's small kernels at the published models' shapes under the interpreter's
//! latency model (`emu::Latencies`): each must wait on memory a few times, not once per loop
//! iteration. Bounds in units of the model's DRAM latency, from what each kernel does in
//! order; before the changes these guard, the combine waited on memory once per split (64 at
//! a full window), the argmax ~16 times and once per leftover group, the RG-LRU step's gate
//! rows four times after its convolution. Cycles of a model, not durations: deterministic, so
//! they can be asserted.

use griffin_backend_ptx::attention::{
    attend, attend_combine, attend_combine_grid, attend_grid, attend_scratch, inverse_frequencies,
    AttentionSpec, ATTEND_WARPS, COMBINE_BLOCK,
};
use griffin_backend_ptx::emu::{run, Latencies, Launch, Memory, Module};
use griffin_backend_ptx::misc::{argmax, argmax_best, ARGMAX_THREADS};
use griffin_backend_ptx::module;
use griffin_backend_ptx::rg_lru::{rg_lru_step, step_block, step_grid, RgLruSpec, Storage};

/// Runs `kernel` of `ptx` once with the model on; its critical path in cycles.
fn cycles(ptx: &str, kernel: &str, grid: u32, block: u32, mem: &mut Memory, params: &[u64]) -> u64 {
    let m = Module::parse(ptx).unwrap();
    mem.enable_timing(Latencies::default());
    let launch = Launch {
        grid,
        block,
        params,
    };
    run(&m, kernel, &launch, mem).unwrap_or_else(|e| panic!("{kernel}: {e}"));
    mem.last_launch_cycles().unwrap()
}

/// The model's DRAM latency.
fn dram() -> u64 {
    Latencies::default().dram
}

#[test]
fn decode_attention_waits_on_memory_a_few_times_at_a_full_window() {
    // The 2B model's attention layer: 10 heads of 256 on one KV head, window 2048 (64
    // splits), at a position past the window.
    let spec = AttentionSpec {
        name: "attn".into(),
        heads: 10,
        kv_heads: 1,
        head_dim: 256,
        window: 2048,
        scale: 0.0625,
        rotary: Some((10000.0, 128)),
    };
    let ptx = module(&[attend(&spec), attend_combine(&spec)]);
    let mut mem = Memory::new();
    let floats = |mem: &mut Memory, n: u32| mem.alloc_f32(&vec![0.5; n as usize]);
    let (q, k, v) = (
        floats(&mut mem, 2560),
        floats(&mut mem, 256),
        floats(&mut mem, 256),
    );
    let pos = mem.alloc_u32(&[3000]);
    let inv: Vec<u8> = inverse_frequencies(10000.0, 128)
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    let inv = mem.alloc(&inv);
    let (keys, values) = (floats(&mut mem, 2048 * 256), floats(&mut mem, 2048 * 256));
    let (o_elems, ml_elems) = attend_scratch(&spec);
    let (o_part, ml_part) = (floats(&mut mem, o_elems), floats(&mut mem, ml_elems));
    let out = floats(&mut mem, 2560);
    let attend_cycles = cycles(
        &ptx,
        "attn_attend",
        attend_grid(&spec),
        32 * ATTEND_WARPS,
        &mut mem,
        &[q, k, v, pos, inv, keys, values, o_part, ml_part],
    );
    let combine_cycles = cycles(
        &ptx,
        "attn_combine",
        attend_combine_grid(&spec),
        COMBINE_BLOCK,
        &mut mem,
        &[pos, o_part, ml_part, out],
    );
    println!("attend {attend_cycles} cycles, combine {combine_cycles}");
    // attend: the position, then the query rows (with the rotation's table), the keys and
    // the values, each phase waiting about once, with the score reductions and the softmax
    // between; combine: the position, then every split at once (in L2: attend just wrote
    // them).
    assert!(
        attend_cycles < 11 * dram(),
        "attend: {attend_cycles} cycles"
    );
    assert!(
        combine_cycles < 3 * dram(),
        "combine: {combine_cycles} cycles"
    );
}

#[test]
fn rg_lru_step_waits_on_memory_a_few_times() {
    // Gate blocks of 256 channels (the published models'), bf16 gates.
    let spec = RgLruSpec {
        name: "rg_lru".into(),
        channels: 512,
        blocks: 2,
        width: 4,
        conv: Storage::F32,
        gates: Storage::Bf16,
        gate_output: true,
    };
    let mut mem = Memory::new();
    let c = 512usize;
    let f = |mem: &mut Memory, n: usize| mem.alloc_f32(&vec![0.25; n]);
    let (x, window, conv_w, conv_b) = (
        f(&mut mem, c),
        f(&mut mem, 4 * c),
        f(&mut mem, 4 * c),
        f(&mut mem, c),
    );
    let gate = |mem: &mut Memory| mem.alloc(&vec![0u8; 2 * 2 * 256 * 256]);
    let (igw, igb, rgw, rgb) = (
        gate(&mut mem),
        f(&mut mem, c),
        gate(&mut mem),
        f(&mut mem, c),
    );
    let (decay, state, y, out) = (
        f(&mut mem, c),
        f(&mut mem, c),
        f(&mut mem, c),
        f(&mut mem, c),
    );
    let pos = mem.alloc_u32(&[3000]);
    let step = cycles(
        &module(&[rg_lru_step(&spec)]),
        "rg_lru",
        step_grid(&spec),
        step_block(&spec),
        &mut mem,
        &[
            x, pos, window, conv_w, conv_b, igw, igb, rgw, rgb, decay, state, y, out,
        ],
    );
    println!("rg_lru step {step} cycles");
    // The position, then everything else at once, then two barriers' worth of arithmetic.
    assert!(step < 4 * dram(), "RG-LRU step: {step} cycles");
}

#[test]
fn argmax_over_256000_logits_waits_on_memory_about_ten_times() {
    let vocab = 256_000u32;
    let mut mem = Memory::new();
    let logits = mem.alloc_f32(&vec![0.0; vocab as usize]);
    let out = mem.alloc_u32(&[0]);
    let argmax_cycles = cycles(
        &module(&[argmax("argmax", vocab)]),
        "argmax",
        1,
        ARGMAX_THREADS,
        &mut mem,
        &[logits, out],
    );
    println!("argmax {argmax_cycles} cycles");
    // 62.5 groups of four per thread, eight in flight: seven full batches and one of four,
    // two and one, with the four compare chains' work between them.
    assert!(
        argmax_cycles < 13 * dram(),
        "argmax: {argmax_cycles} cycles"
    );
}

#[test]
fn greedy_argmax_over_the_2b_logits_best_pairs_waits_on_memory_once() {
    // The 2B logits projection's 528 blocks of 8 warps: 4,224 pairs.
    let slots = 528 * 8;
    let mut mem = Memory::new();
    let pairs: Vec<u8> = (0..slots)
        .flat_map(|i: u32| [1f32.to_bits(), i].into_iter().flat_map(u32::to_le_bytes))
        .collect();
    let best = mem.alloc(&pairs);
    let out = mem.alloc_u32(&[u32::MAX]);
    let argmax_cycles = cycles(
        &module(&[argmax_best("argmax", slots, 256_000)]),
        "argmax",
        1,
        ARGMAX_THREADS,
        &mut mem,
        &[best, out],
    );
    println!("argmax over best pairs {argmax_cycles} cycles");
    // Four or five pairs per thread, loaded at once; then the block's reduction (shuffles,
    // and thread 0's pass over the 32 warps' bests).
    assert!(argmax_cycles < 4 * dram(), "argmax: {argmax_cycles} cycles");
    // All equal: the lowest index.
    assert_eq!(mem.read_u32(out, 1).unwrap()[0], 0);
}
