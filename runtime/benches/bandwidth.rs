//! Read bandwidth with the runtime's own thread pool: the ceiling for memory-bound decode.
//! Prints GB/s (best of 5 passes over 1 GiB).
//!
//!     cargo bench -p griffin-runtime --bench bandwidth [-- THREADS]

use std::time::Instant;

use griffin_runtime::pool::ThreadPool;

fn main() {
    let threads: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let data: Vec<f32> = (0..(1usize << 28)).map(|i| (i % 7) as f32).collect();
    let pool = ThreadPool::new(threads);
    let per = data.len().div_ceil(threads);
    let sums: Vec<std::sync::Mutex<f32>> =
        (0..threads).map(|_| std::sync::Mutex::new(0.0)).collect();
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let start = Instant::now();
        pool.run(&|t| {
            let part = &data[(t * per).min(data.len())..((t + 1) * per).min(data.len())];
            // Eight independent partial sums let the compiler keep several loads in flight.
            let mut acc = [0f32; 8];
            for chunk in part.chunks_exact(8) {
                for (a, v) in acc.iter_mut().zip(chunk) {
                    *a += v;
                }
            }
            *sums[t].lock().unwrap() = acc.iter().sum();
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    let total: f32 = sums.iter().map(|s| *s.lock().unwrap()).sum();
    println!(
        "{:.1} GB/s read with {threads} threads (checksum {total})",
        (data.len() * 4) as f64 / best / 1e9
    );
}
