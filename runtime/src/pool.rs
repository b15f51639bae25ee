//! A fixed pool of threads created once; dispatching a job allocates nothing.
//!
//! Kernels come back to back (a decode step is ~60 launches of a few hundred microseconds), so
//! waking a sleeping thread per launch (a futex wake and a reschedule, tens of microseconds on
//! a virtual machine) would cost a large share of the step. Workers therefore spin on the
//! job counter for a while after each job and only then sleep on a condition variable; the
//! caller spins for the last workers to finish.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_millis(2);
/// How long a waiting thread spins before it starts yielding its core between checks (with more
/// threads than free cores, spinning through a time slice would starve the thread with work;
/// yielding at once would add a system call to every wait).
const SPIN_ALONE: Duration = Duration::from_micros(10);

/// A borrowed job, valid while `ThreadPool::run` waits for every worker to finish it.
#[derive(Clone, Copy)]
struct Job(*const (dyn Fn(usize) + Sync));

struct Shared {
    /// Bumped once per job, after `job` is written.
    generation: AtomicU64,
    /// Written by `run` only while no worker reads it (every worker finished the last job).
    job: UnsafeCell<Option<Job>>,
    /// Workers still running the current job.
    remaining: AtomicUsize,
    /// Workers asleep (or about to be) on `wake`.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by `run` before `generation` is bumped and read by workers only
// after they see the bump; the pointee is `Sync` and outlives every read (`run` waits).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// `threads` workers in all, the calling thread included.
    pub fn new(threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            remaining: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .map(|index| {
                let shared = shared.clone();
                std::thread::spawn(move || worker(&shared, index))
            })
            .collect();
        ThreadPool { shared, workers }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(i)` for every thread index i, the caller taking index 0; returns when all are
    /// done.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            job(0);
            return;
        }
        // SAFETY: only the lifetime is erased; we wait below until no worker holds the job.
        let erased: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(job) };
        let shared = &*self.shared;
        // SAFETY: every worker finished the previous job, so none reads `job` now.
        unsafe { *shared.job.get() = Some(Job(erased)) };
        shared.remaining.store(self.workers.len(), SeqCst);
        shared.generation.fetch_add(1, SeqCst);
        shared.wake_sleepers();
        job(0);
        let mut backoff = Backoff::default();
        while shared.remaining.load(SeqCst) > 0 {
            backoff.pause();
        }
    }
}

/// A waiting thread's pause between checks: a spin, with the clock read only every 256 spins
/// (most waits end sooner), and the core yielded once the wait lasts `SPIN_ALONE`.
#[derive(Default)]
struct Backoff {
    started: Option<Instant>,
    spins: u32,
}

impl Backoff {
    /// One pause; how long the wait has lasted when the clock was read, else zero.
    fn pause(&mut self) -> Duration {
        self.spins = self.spins.wrapping_add(1);
        if self.spins % 256 != 0 {
            std::hint::spin_loop();
            return Duration::ZERO;
        }
        let waited = self.started.get_or_insert_with(Instant::now).elapsed();
        if waited >= SPIN_ALONE {
            std::thread::yield_now();
        }
        waited
    }
}

impl Shared {
    /// Wakes sleeping workers after a bump of `generation` or `shutdown`. A worker announces
    /// itself in `sleepers` under the lock and checks again before it waits, so either it sees
    /// the bump or we see it and notify under the same lock.
    fn wake_sleepers(&self) {
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = self.lock.lock().expect("pool lock");
            self.wake.notify_all();
        }
    }
}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        // Spin (then yield) for the next job, then sleep.
        let mut backoff = Backoff::default();
        while shared.generation.load(SeqCst) == seen && !shared.shutdown.load(SeqCst) {
            if backoff.pause() < SPIN {
                continue;
            }
            let mut guard = shared.lock.lock().expect("pool lock");
            shared.sleepers.fetch_add(1, SeqCst);
            while shared.generation.load(SeqCst) == seen && !shared.shutdown.load(SeqCst) {
                guard = shared.wake.wait(guard).expect("pool lock");
            }
            shared.sleepers.fetch_sub(1, SeqCst);
        }
        if shared.shutdown.load(SeqCst) {
            return;
        }
        seen = shared.generation.load(SeqCst);
        // SAFETY: `run` wrote the job before bumping `generation` and keeps it alive until
        // `remaining` drops to zero.
        let job = unsafe { (*shared.job.get()).expect("a job comes with each generation") };
        unsafe { (*job.0)(index) };
        shared.remaining.fetch_sub(1, SeqCst);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        self.shared.wake_sleepers();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_index_runs_once_per_job() {
        let pool = ThreadPool::new(4);
        let hits = [const { AtomicUsize::new(0) }; 4];
        for _ in 0..100 {
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 100));
    }

    /// More threads than cores must not stall every job on spinning workers (their spin gives
    /// way): 300 jobs through a pool of 4× the cores take less than 100 times as long as through
    /// a pool of one thread per core, or 0.1 s (a ratio, not a duration, with a floor for a fast
    /// baseline; without yielding it was 1.85 s against 0.1 ms), in one of three tries.
    #[test]
    fn oversubscribed_pools_still_make_progress() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            println!("skipped: one core, no pool of one thread per core to compare with");
            return;
        }
        let time = |threads: usize| {
            let pool = ThreadPool::new(threads);
            let sum = AtomicUsize::new(0);
            let start = std::time::Instant::now();
            for _ in 0..300 {
                pool.run(&|i| {
                    sum.fetch_add(i, Ordering::Relaxed);
                });
            }
            start.elapsed().as_secs_f64()
        };
        // Up to three tries: a machine busy with other work can stall one (a stalling pool
        // fails every try).
        let mut tries = Vec::new();
        for _ in 0..3 {
            let fitting = time(cores);
            let over = time(4 * cores);
            println!(
                "300 jobs: {fitting:.4} s on {cores} threads, {over:.4} s on {}",
                4 * cores
            );
            if over < 100.0 * fitting.max(1e-3) {
                return;
            }
            tries.push((over, fitting));
        }
        panic!("300 jobs on 4x the cores vs one per core, (s, s) per try: {tries:?}");
    }

    /// Jobs after the workers fell asleep still run on every thread (no lost wake-up).
    #[test]
    fn sleeping_workers_wake_for_the_next_job() {
        let pool = ThreadPool::new(3);
        let hits = [const { AtomicUsize::new(0) }; 3];
        for round in 0..3 {
            std::thread::sleep(SPIN * 3);
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == round + 1));
        }
    }
}
