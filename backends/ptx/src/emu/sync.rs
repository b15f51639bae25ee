//! Ordering between blocks of one launch: a block hands its global accesses to others through
//! a fence and an atomic (the last-block-done pattern), and the race check accepts an access
//! ordered that way.
//!
//! The rule, stricter than the PTX memory model (it never accepts what the model would call a
//! race, and it rejects some programs the model allows): every thread of block B fences
//! (`fence.acq_rel.gpu`, `fence.sc.gpu`, `membar.gl`) after its last global access, the block
//! passes a barrier, opening epoch e, and a thread then does an atomic on a word X: that
//! *releases* B's accesses of the epochs before e at X. A thread of another block whose atomic
//! on X comes later (here: runs later) and which then fences has *acquired* them; after its
//! block's next barrier, every thread of its block has. An access conflicting with B's is
//! ordered after it when it acquired a release of B covering its epoch.

use std::cell::RefCell;
use std::collections::HashMap;

/// Per block, the epoch before which its accesses were released (the largest).
#[derive(Default, Clone, Debug)]
pub(super) struct Releases(HashMap<u32, u32>);

impl Releases {
    /// Records block `block`'s release of its accesses before `epoch`.
    pub(super) fn insert(&mut self, block: u32, epoch: u32) {
        let e = self.0.entry(block).or_insert(0);
        *e = (*e).max(epoch);
    }

    pub(super) fn join(&mut self, other: &Releases) {
        for (&b, &e) in &other.0 {
            self.insert(b, e);
        }
    }

    /// Whether block `block`'s accesses in `epoch` are covered.
    fn covers(&self, block: u32, epoch: u32) -> bool {
        self.0.get(&block).is_some_and(|&e| epoch < e)
    }
}

/// One thread's part.
#[derive(Default)]
pub(super) struct ThreadSync {
    /// A global access since its last fence.
    pub(super) dirty: bool,
    /// What its atomics saw, acquired at its next fence.
    pub(super) pending: Releases,
    pub(super) acquired: Releases,
}

impl ThreadSync {
    /// A global access (load, store, atomic).
    pub(super) fn touch(&mut self) {
        self.dirty = true;
    }

    /// A gpu-scope fence: earlier accesses may be released, earlier atomics' releases are
    /// acquired.
    pub(super) fn fence(&mut self) {
        self.dirty = false;
        let pending = std::mem::take(&mut self.pending);
        self.acquired.join(&pending);
    }
}

/// One block's part: what its threads acquired before its latest barrier (moved here from
/// theirs), and whether every thread had fenced after its global accesses there (so an
/// atomic in this epoch releases the earlier ones).
#[derive(Default)]
pub(super) struct BlockSync {
    pub(super) visible: Releases,
    pub(super) clean: bool,
}

impl BlockSync {
    /// The block's threads meet at a barrier.
    pub(super) fn barrier(&mut self, threads: &[RefCell<ThreadSync>]) {
        let mut clean = true;
        for t in threads {
            let mut t = t.borrow_mut();
            clean &= !t.dirty;
            let acquired = std::mem::take(&mut t.acquired);
            self.visible.join(&acquired);
        }
        self.clean = clean;
    }
}

/// What one accessing thread sees of other blocks: its block's and its own acquisitions.
#[derive(Clone, Copy)]
pub(super) struct Sees<'a> {
    pub(super) block: &'a Releases,
    pub(super) thread: &'a Releases,
    pub(super) grid: u32,
}

impl Sees<'_> {
    /// Block `block`'s accesses in `epoch` are ordered before this thread's.
    pub(super) fn block(&self, block: u32, epoch: u32) -> bool {
        self.block.covers(block, epoch) || self.thread.covers(block, epoch)
    }

    /// Every block's but `me`'s accesses up to `epoch` are.
    pub(super) fn all_but(&self, me: u32, epoch: u32) -> bool {
        (0..self.grid).all(|b| b == me || self.block(b, epoch))
    }
}

/// The releases carried by atomic words in the current launch.
#[derive(Default)]
pub(super) struct AtomicWords(HashMap<usize, Releases>);

impl AtomicWords {
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    /// An atomic on word `word` by a thread of `block` in `epoch`, releasing if `clean`:
    /// what the word carried before joins the thread's `pending` acquisitions.
    pub(super) fn atomic(
        &mut self,
        word: usize,
        block: u32,
        epoch: u32,
        clean: bool,
        pending: &mut Releases,
    ) {
        if let Some(carried) = self.0.get(&word) {
            pending.join(carried);
        }
        if clean && epoch > 0 {
            self.0.entry(word).or_default().insert(block, epoch);
        }
    }
}
