//! A fixed pool of threads created once; dispatching a job allocates nothing.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A borrowed job, valid while `ThreadPool::run` waits for every worker to finish it.
#[derive(Clone, Copy)]
struct Job(*const (dyn Fn(usize) + Sync));

// SAFETY: the pointee is `Sync`, and `run` keeps it alive until every worker is done with it.
unsafe impl Send for Job {}

struct State {
    generation: u64,
    job: Option<Job>,
    remaining: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    start: Condvar,
    done: Condvar,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// `threads` workers in all, the calling thread included.
    pub fn new(threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generation: 0,
                job: None,
                remaining: 0,
                shutdown: false,
            }),
            start: Condvar::new(),
            done: Condvar::new(),
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
        {
            let mut s = self.shared.state.lock().expect("pool lock");
            s.job = Some(Job(erased));
            s.remaining = self.workers.len();
            s.generation += 1;
        }
        self.shared.start.notify_all();
        job(0);
        let mut s = self.shared.state.lock().expect("pool lock");
        while s.remaining > 0 {
            s = self.shared.done.wait(s).expect("pool lock");
        }
        s.job = None;
    }
}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let job = {
            let mut s = shared.state.lock().expect("pool lock");
            while s.generation == seen && !s.shutdown {
                s = shared.start.wait(s).expect("pool lock");
            }
            if s.shutdown {
                return;
            }
            seen = s.generation;
            s.job.expect("a job comes with each generation")
        };
        // SAFETY: `run` keeps the job alive until `remaining` drops to zero.
        unsafe { (*job.0)(index) };
        let mut s = shared.state.lock().expect("pool lock");
        s.remaining -= 1;
        if s.remaining == 0 {
            shared.done.notify_one();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.state.lock().expect("pool lock").shutdown = true;
        self.shared.start.notify_all();
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
}
