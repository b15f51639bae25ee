//! The executor: every buffer allocated once from the plan; a call writes token ids, runs the
//! launches across the thread pool, and leaves logits in their buffer.

use std::alloc::{alloc_zeroed, dealloc, Layout};

use crate::plan::{BufferKind, Plan};
use crate::pool::ThreadPool;
use crate::weights::Weights;
use crate::RuntimeError;

/// The ABI of every generated kernel.
pub type KernelFn =
    unsafe extern "C" fn(args: *const *mut u8, tokens: i64, start: i64, thread: i32, threads: i32);

struct Allocation {
    ptr: *mut u8,
    layout: Layout,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: allocated in `Executor::new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Raw pointers shared with the pool threads for the length of one launch.
struct LaunchArgs<'a> {
    kernel: KernelFn,
    args: &'a [*mut u8],
    tokens: i64,
    start: i64,
    threads: i32,
}

// SAFETY: kernels partition their writes by thread index; the pointers outlive the launch.
unsafe impl Sync for LaunchArgs<'_> {}

pub struct Executor {
    plan: Plan,
    kernels: Vec<KernelFn>,
    args: Vec<Vec<*mut u8>>,
    buffers: Vec<*mut u8>,
    state: Vec<(usize, usize)>,
    _memory: Vec<Allocation>,
    _weights: Weights,
    pool: ThreadPool,
    position: u64,
    /// Arguments of the logits launch moved to the last row (reused, never reallocated).
    last_row_args: Vec<*mut u8>,
}

impl Executor {
    /// Allocates every buffer of `plan` once; `resolve` finds each kernel by symbol.
    pub fn new(
        plan: Plan,
        resolve: &dyn Fn(&str) -> Option<KernelFn>,
        weights: Weights,
        threads: usize,
    ) -> Result<Executor, RuntimeError> {
        let mut memory = Vec::new();
        let mut buffers = Vec::with_capacity(plan.buffers.len());
        let mut state = Vec::new();
        for (i, b) in plan.buffers.iter().enumerate() {
            let bytes = b.bytes(plan.max_tokens) as usize;
            let ptr = match &b.kind {
                BufferKind::Weight {
                    name,
                    offset,
                    bytes,
                    ..
                } => weights
                    .slice(*offset, *bytes)
                    .ok_or_else(|| {
                        RuntimeError::Weights(format!(
                            "weight `{name}` lies outside the weights file"
                        ))
                    })?
                    .as_ptr() as *mut u8,
                kind => {
                    let layout = Layout::from_size_align(bytes.max(64), 64)
                        .map_err(|e| RuntimeError::Plan(format!("buffer {i}: {e}")))?;
                    // SAFETY: non-zero size, valid layout; freed by `Allocation::drop`.
                    let ptr = unsafe { alloc_zeroed(layout) };
                    if ptr.is_null() {
                        return Err(RuntimeError::OutOfMemory(bytes));
                    }
                    memory.push(Allocation { ptr, layout });
                    if matches!(kind, BufferKind::State { .. }) {
                        state.push((i, bytes));
                    }
                    ptr
                }
            };
            buffers.push(ptr);
        }
        let mut kernels = Vec::with_capacity(plan.launches.len());
        let mut args = Vec::with_capacity(plan.launches.len());
        for l in &plan.launches {
            kernels.push(
                resolve(&l.kernel)
                    .ok_or_else(|| RuntimeError::Plan(format!("no kernel `{}`", l.kernel)))?,
            );
            let a: Vec<*mut u8> = l
                .args
                .iter()
                .map(|&b| {
                    buffers
                        .get(b)
                        .copied()
                        .ok_or_else(|| RuntimeError::Plan(format!("no buffer {b}")))
                })
                .collect::<Result<_, _>>()?;
            args.push(a);
        }
        Ok(Executor {
            plan,
            kernels,
            args,
            buffers,
            state,
            _memory: memory,
            _weights: weights,
            pool: ThreadPool::new(threads),
            position: 0,
            last_row_args: Vec::with_capacity(64),
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Position of the next token in the document.
    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Starts a new document: zero state, position 0.
    pub fn reset(&mut self) {
        for &(i, bytes) in &self.state {
            // SAFETY: the buffer was allocated with at least `bytes` bytes.
            unsafe { std::ptr::write_bytes(self.buffers[i], 0, bytes) };
        }
        self.position = 0;
    }

    /// Checks ids before anything runs.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), RuntimeError> {
        crate::check_ids(ids, self.plan.vocab_size)
    }

    /// Runs at most `max_tokens` ids as one call; returns their logits `[ids.len(), V]`.
    /// Allocates nothing.
    pub fn call(&mut self, ids: &[u32]) -> Result<&[f32], RuntimeError> {
        self.run(ids, false)?;
        let logits = self.buffers[self.plan.logits] as *const f32;
        // SAFETY: the logits buffer holds max_tokens · vocab f32 values, written by `run`.
        Ok(
            unsafe {
                std::slice::from_raw_parts(logits, ids.len() * self.plan.vocab_size as usize)
            },
        )
    }

    /// Like `call`, but returns (and, where the plan allows, computes) the logits of the last
    /// token only: what generation needs.
    pub fn call_last(&mut self, ids: &[u32]) -> Result<&[f32], RuntimeError> {
        self.run(ids, true)?;
        let vocab = self.plan.vocab_size as usize;
        let logits = self.buffers[self.plan.logits] as *const f32;
        // SAFETY: row ids.len()-1 of the logits buffer was written by `run`.
        Ok(unsafe { std::slice::from_raw_parts(logits.add((ids.len() - 1) * vocab), vocab) })
    }

    fn run(&mut self, ids: &[u32], last_only: bool) -> Result<(), RuntimeError> {
        self.check_ids(ids)?;
        if ids.len() as u64 > self.plan.max_tokens {
            return Err(RuntimeError::ChunkTooLong {
                tokens: ids.len(),
                max: self.plan.max_tokens,
            });
        }
        let tokens = self.buffers[self.plan.tokens] as *mut i32;
        for (i, &id) in ids.iter().enumerate() {
            // SAFETY: the tokens buffer holds max_tokens i32 values.
            unsafe { *tokens.add(i) = id as i32 };
        }
        let threads = self.pool.threads() as i32;
        let last_row = if last_only {
            self.plan.logits_launch.as_ref()
        } else {
            None
        };
        for (index, (kernel, args)) in self.kernels.iter().zip(&self.args).enumerate() {
            let (args, count) = match last_row {
                Some(l) if l.launch == index => {
                    self.last_row_args.clear();
                    self.last_row_args.extend_from_slice(args);
                    for &(arg, per_token) in &l.row_args {
                        let offset = (ids.len() - 1) * per_token as usize * 4;
                        // SAFETY: row ids.len()-1 lies inside a buffer of max_tokens rows.
                        self.last_row_args[arg] = unsafe { self.last_row_args[arg].add(offset) };
                    }
                    (self.last_row_args.as_slice(), 1)
                }
                _ => (args.as_slice(), ids.len()),
            };
            let launch = LaunchArgs {
                kernel: *kernel,
                args,
                tokens: count as i64,
                start: self.position as i64 + (ids.len() - count) as i64,
                threads,
            };
            let launch = &launch;
            self.pool.run(&move |thread| {
                // SAFETY: the plan and the kernels were generated together for this ABI.
                unsafe {
                    (launch.kernel)(
                        launch.args.as_ptr(),
                        launch.tokens,
                        launch.start,
                        thread as i32,
                        launch.threads,
                    )
                }
            });
        }
        self.position += ids.len() as u64;
        Ok(())
    }
}
