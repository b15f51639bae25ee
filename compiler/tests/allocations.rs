//! The compiled decode loop allocates nothing, and memory does not grow with the text.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

use common::golden_dir;
use griffinc::cpu::{CpuEngine, CpuOptions};
use griffinc::session::{argmax, Model};

/// Counts allocations and live bytes of the whole test process.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_allocates_nothing_and_memory_stays_flat() {
    let model = Model::load(&golden_dir().join("tiny-f32")).unwrap();
    let opts = CpuOptions {
        threads: 2,
        prefill_chunk: 8,
        ..CpuOptions::default()
    };
    let mut engine = CpuEngine::new(&model, &opts).unwrap();
    let exec = engine.executor();
    exec.reset();
    // A prompt longer than a chunk, then greedy decoding, all through the executor.
    let prompt: Vec<u32> = (2..30).collect();
    let mut next = 0;
    for chunk in prompt.chunks(8) {
        let logits = exec.call(chunk).unwrap();
        next = argmax(&logits[logits.len() - 512..]);
    }
    for _ in 0..100 {
        next = argmax(exec.call(&[next]).unwrap());
    }
    let (allocations, live) = (
        ALLOCATIONS.load(Ordering::SeqCst),
        LIVE_BYTES.load(Ordering::SeqCst),
    );
    for _ in 0..5000 {
        next = argmax(exec.call(&[next]).unwrap());
    }
    assert_eq!(
        ALLOCATIONS.load(Ordering::SeqCst),
        allocations,
        "decode steps allocated"
    );
    assert_eq!(
        LIVE_BYTES.load(Ordering::SeqCst),
        live,
        "live heap grew over 5000 tokens"
    );
    assert_eq!(exec.position(), 28 + 5100);
}
