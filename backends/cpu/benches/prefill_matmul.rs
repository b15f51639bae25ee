//! Prefill projections: our generated kernel against a well-kept GEMM crate (matrixmultiply,
//! threaded) on the shapes of one prefill chunk. Prints a table; never run in CI.
//!
//!     cargo bench -p griffin-backend-cpu --bench prefill_matmul [-- THREADS]
//!
//! `CPU=name` compiles for an LLVM CPU instead of this machine; `TILE=panels,tokens` overrides
//! the register tile that target gets (how `Tile`'s choices were measured).
//!
//! Both compute `y[t, o] = Σ_i x[t, i] · w[o, i]` for a 64-token chunk with f32 weights (the
//! GEMM crate has no bf16 input; our kernel with bf16 weights is measured too).

use std::time::Instant;

use griffin_backend_cpu::kernels::linear::{linear, LinearSpec};
use griffin_backend_cpu::ll::{Storage, ATTRIBUTES, PRELUDE};
use griffin_backend_cpu::{Jit, TargetCpu, Tile};
use griffin_ir::Epilogue;
use griffin_runtime::pack::store;
use griffin_runtime::pool::ThreadPool;

const TOKENS: usize = 64;

fn cpu() -> TargetCpu {
    std::env::var("CPU").map_or(TargetCpu::Host, |c| TargetCpu::parse(&c))
}

fn tile() -> Tile {
    let Ok(t) = std::env::var("TILE") else {
        return cpu().tile();
    };
    let (panels, tokens) = t.split_once(',').expect("TILE=panels,tokens");
    Tile {
        panels: panels.parse().expect("panels"),
        tokens: tokens.parse().expect("tokens"),
    }
}

fn spec(inputs: u64, rows: u64, weight: Storage) -> LinearSpec {
    LinearSpec {
        symbol: format!("bench_linear_{inputs}_{rows}_{weight:?}"),
        inputs,
        rows,
        weight,
        bias: None,
        epilogue: Epilogue::None,
        residual: false,
        splits: vec![rows],
        tile: tile(),
    }
}

fn kernel(spec: &LinearSpec) -> Jit {
    let module = format!("{PRELUDE}\n{}\n{ATTRIBUTES}", linear(spec));
    Jit::new(&module, &cpu()).expect("kernel compiles")
}

struct Ptrs([*mut u8; 3]);
// SAFETY: the kernel partitions its writes by thread index.
unsafe impl Sync for Ptrs {}

/// Best of `runs` wall times, in seconds.
fn best(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let threads: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    let pool = ThreadPool::new(threads);
    println!("prefill matmul, {TOKENS} tokens, {threads} threads; GFLOP/s (best of 5)");
    println!("| shape (in → out) | generated f32 | generated bf16 | matrixmultiply f32 |");
    println!("| --- | --- | --- | --- |");
    for (inputs, rows) in [
        (1024usize, 2048usize),
        (1024, 6144),
        (3072, 1024),
        (2560, 5120),
        (2560, 15360),
    ] {
        let x: Vec<f32> = (0..TOKENS * inputs)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect();
        let w: Vec<f32> = (0..rows * inputs)
            .map(|i| ((i % 89) as f32 - 44.0) / 890.0)
            .collect();
        // The weights packed as the kernel reads them (the runtime's own packing).
        let packed = |storage: Storage| {
            let layout = spec(inputs as u64, rows as u64, storage).layout();
            store(&w, layout, storage).expect("weights pack")
        };
        let (w_f32, w_bf16) = (packed(Storage::F32), packed(Storage::Bf16));
        let flops = 2.0 * (TOKENS * inputs * rows) as f64;
        let mut y = vec![0f32; TOKENS * rows];

        let generated = |storage: Storage, weights: *const u8, y: &mut Vec<f32>| {
            let spec = spec(inputs as u64, rows as u64, storage);
            let jit = kernel(&spec);
            let f = jit.kernel(&spec.symbol).expect("kernel symbol");
            let ptrs = Ptrs([
                x.as_ptr() as *mut u8,
                weights as *mut u8,
                y.as_mut_ptr() as *mut u8,
            ]);
            let ptrs = &ptrs;
            let t = best(5, || {
                pool.run(&|thread| unsafe {
                    f(
                        ptrs.0.as_ptr(),
                        TOKENS as i64,
                        0,
                        thread as i32,
                        threads as i32,
                    )
                })
            });
            flops / t / 1e9
        };
        let ours_f32 = generated(Storage::F32, w_f32.as_ptr(), &mut y);
        let check = y.clone();
        let ours_bf16 = generated(Storage::Bf16, w_bf16.as_ptr(), &mut y);

        let t = best(5, || unsafe {
            // y[t, o] = x[t, :] · w[o, :]  (w read transposed: row stride 1, column stride K)
            matrixmultiply::sgemm(
                TOKENS,
                inputs,
                rows,
                1.0,
                x.as_ptr(),
                inputs as isize,
                1,
                w.as_ptr(),
                1,
                inputs as isize,
                0.0,
                y.as_mut_ptr(),
                rows as isize,
                1,
            )
        });
        let theirs = flops / t / 1e9;
        let diff = check
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // NaN compares false in f32::max: check for it apart.
        assert!(
            diff < 1e-2 && y.iter().all(|v| !v.is_nan()),
            "results differ by {diff}"
        );
        println!("| {inputs} → {rows} | {ours_f32:.1} | {ours_bf16:.1} | {theirs:.1} |");
    }
}
