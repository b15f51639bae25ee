//! Global and shared memory, with the shadow that finds data races between threads.

use std::collections::HashMap;

use super::requests::{AccessRecorder, AccessStats};
use super::sync::{AtomicWords, Releases, Sees};
use super::timing::{Latencies, Timing};
use super::{err, EmuError};

/// Who touched each 4-byte word of a memory during one launch (global memory) or one block
/// (shared memory), to find data races: two threads touching the same word, at least one
/// writing, with no barrier of a block they share between them. Such a program reads
/// whatever the hardware's scheduling gives it, while this interpreter runs threads in one
/// fixed order and would compute one plausible answer. Accesses are at least word-sized
/// except 16-bit loads, which mark their word (no kernel stores less than a word).
#[derive(Default)]
pub(super) struct Shadow {
    /// The launch an entry belongs to; older entries count as untouched (no clearing).
    pub(super) stamp: Vec<u32>,
    /// Thread (1 + block · block size + tid) of the last write, 0 if none.
    pub(super) writer: Vec<u32>,
    pub(super) write_epoch: Vec<u32>,
    /// Thread of the reads, 0 if none, `MANY` if several threads read.
    pub(super) reader: Vec<u32>,
    /// The block of the reads (the latest reading block, blocks running one after another)
    /// and their latest epoch.
    pub(super) read_block: Vec<u32>,
    pub(super) read_epoch: Vec<u32>,
    /// 1 + the latest epoch of reads by blocks before `read_block`, 0 if none.
    pub(super) earlier_reads: Vec<u32>,
    /// Read through the non-coherent cache (`ld.global.nc`) in this launch: a later write
    /// would leave the cached line stale. (An `.nc` read of what a kernel wrote, this launch
    /// or before, is refused by `Memory::access`.)
    pub(super) nc_read: Vec<bool>,
    /// The last write was an atomic read-modify-write (`atom`, `red`): another thread's
    /// atomic on the word is no race, a plain access still is.
    pub(super) atomic: Vec<bool>,
    /// 1 + the latest epoch of atomic writes by blocks before the last writer's, 0 if none
    /// (atomics of several blocks need no order among themselves; a plain access needs one
    /// after each).
    pub(super) earlier_writes: Vec<u32>,
}

pub(super) const MANY: u32 = u32::MAX;

/// How an access touches memory.
#[derive(Clone, Copy)]
pub(super) enum Touch {
    /// A read, through the non-coherent cache if `nc`.
    Read {
        nc: bool,
    },
    Write,
    /// An atomic read-modify-write (`atom`, `red`): ordered against plain accesses, not
    /// against other atomics.
    Atomic,
}

/// A thread's access to global memory: who, whether past its `griddepcontrol.wait`, and
/// what it sees of other blocks' accesses.
#[derive(Clone, Copy)]
pub(super) struct By<'a> {
    pub(super) who: Access,
    pub(super) waited: bool,
    pub(super) sees: Sees<'a>,
}

/// One thread's access: its launch-wide id (1-based), block, and epoch (barriers its block
/// has passed).
#[derive(Clone, Copy)]
pub(super) struct Access {
    pub(super) thread: u32,
    pub(super) block: u32,
    pub(super) epoch: u32,
    pub(super) block_size: u32,
}

impl Access {
    /// Whether this access is ordered after another thread's access (or is that thread's):
    /// same block, an earlier epoch.
    pub(super) fn after(&self, thread: u32, block: u32, epoch: u32) -> bool {
        thread == 0 || thread == self.thread || (block == self.block && epoch < self.epoch)
    }

    pub(super) fn describe(thread: u32, block_size: u32) -> String {
        let t = thread - 1;
        format!("block {} thread {}", t / block_size, t % block_size)
    }
}

impl Shadow {
    /// Forgets every entry (stamps restart).
    pub(super) fn reset(&mut self) {
        self.stamp.fill(0);
    }

    /// Makes room for `words` words.
    pub(super) fn grow(&mut self, words: usize) {
        if words <= self.stamp.len() {
            return;
        }
        self.nc_read.resize(words, false);
        self.atomic.resize(words, false);
        for v in [
            &mut self.stamp,
            &mut self.writer,
            &mut self.write_epoch,
            &mut self.reader,
            &mut self.read_block,
            &mut self.read_epoch,
            &mut self.earlier_reads,
            &mut self.earlier_writes,
        ] {
            v.resize(words, 0);
        }
    }

    /// Records a `touch` of bytes `[at, at + len)` (offsets in this memory) in launch
    /// `stamp`; an error names the race. `sees`: what the thread acquired from other blocks
    /// (global memory; `sync.rs`).
    pub(super) fn access(
        &mut self,
        stamp: u32,
        at: usize,
        len: usize,
        a: Access,
        touch: Touch,
        sees: Option<Sees>,
    ) -> Result<(), EmuError> {
        // Ordered after an access by `thread` of `block` in `epoch`: by program order, a
        // barrier of their block, or another block's release.
        let ordered = |thread: u32, block: u32, epoch: u32| {
            a.after(thread, block, epoch)
                || (block != a.block && sees.is_some_and(|s| s.block(block, epoch)))
        };
        // Ordered after accesses of every block but this one up to an epoch (1 + it; 0 for
        // none).
        let after_earlier =
            |earlier: u32| earlier == 0 || sees.is_some_and(|s| s.all_but(a.block, earlier - 1));
        let (write, nc, atomic) = match touch {
            Touch::Read { nc } => (false, nc, false),
            Touch::Write => (true, false, false),
            Touch::Atomic => (true, false, true),
        };
        let words = at / 4..(at + len).div_ceil(4);
        self.grow(words.end);
        for w in words {
            if self.stamp[w] != stamp {
                self.stamp[w] = stamp;
                self.writer[w] = 0;
                self.reader[w] = 0;
                self.earlier_reads[w] = 0;
                self.nc_read[w] = false;
                self.atomic[w] = false;
                self.earlier_writes[w] = 0;
            }
            if write && self.nc_read[w] {
                return err(format!(
                    "word {:#x} is written after a read through the non-coherent cache (ld.global.nc) in one launch",
                    4 * w
                ));
            }
            self.nc_read[w] |= nc;
            let writer = self.writer[w];
            let writer_block = writer.wrapping_sub(1) / a.block_size;
            let both_atomic = atomic && self.atomic[w];
            let after_writes = writer == 0
                || (ordered(writer, writer_block, self.write_epoch[w])
                    && after_earlier(self.earlier_writes[w]));
            if !both_atomic && !after_writes {
                return err(format!(
                    "data race: {} {} word {:#x}, which {} wrote, with nothing ordering them (a barrier in a block; a fence and an atomic between blocks)",
                    Access::describe(a.thread, a.block_size),
                    if write { "writes" } else { "reads" },
                    4 * w,
                    Access::describe(writer, a.block_size),
                ));
            }
            let reader = self.reader[w];
            if write {
                let (block, epoch) = (self.read_block[w], self.read_epoch[w]);
                let latest = reader == 0 || reader == a.thread || ordered(reader, block, epoch);
                if !(latest && after_earlier(self.earlier_reads[w])) {
                    let who = if latest {
                        "threads of earlier blocks".to_string()
                    } else if reader == MANY {
                        "other threads".to_string()
                    } else {
                        Access::describe(reader, a.block_size)
                    };
                    return err(format!(
                        "data race: {} writes word {:#x}, which {who} read, with nothing ordering them (a barrier in a block; a fence and an atomic between blocks)",
                        Access::describe(a.thread, a.block_size),
                        4 * w,
                    ));
                }
                if !both_atomic {
                    // Ordered after every earlier write.
                    self.earlier_writes[w] = 0;
                } else if writer != 0 && writer_block != a.block {
                    // Another block's atomics before this one's: summarised.
                    let e = &mut self.earlier_writes[w];
                    *e = (*e).max(self.write_epoch[w] + 1);
                }
                self.write_epoch[w] = a.epoch;
                self.writer[w] = a.thread;
                self.atomic[w] = atomic;
            } else if reader == 0 || reader == a.thread || self.read_block[w] != a.block {
                if reader != 0 && self.read_block[w] != a.block {
                    // A block's first read: the earlier blocks' reads summarised.
                    let e = &mut self.earlier_reads[w];
                    *e = (*e).max(self.read_epoch[w] + 1);
                }
                self.reader[w] = a.thread;
                self.read_block[w] = a.block;
                self.read_epoch[w] = a.epoch;
            } else {
                self.reader[w] = MANY;
                self.read_epoch[w] = self.read_epoch[w].max(a.epoch);
            }
        }
        Ok(())
    }
}

/// A block's shared memory and who touched it.
pub(super) struct SharedMemory {
    pub(super) bytes: Vec<u8>,
    pub(super) shadow: Shadow,
    /// Per 16-byte unit: the thread (launch-wide id) whose generic-proxy store to it has not
    /// yet been followed by its `fence.proxy.async`, or 0. `wgmma` reads shared memory through
    /// the async proxy, which sees such stores only after that fence.
    pub(super) unfenced: Vec<u32>,
    /// The units each thread has stored to since its last `fence.proxy.async`.
    pub(super) unfenced_by: HashMap<u32, Vec<usize>>,
    /// Per 16-byte unit: how many `wgmma`s not yet retired by their warpgroup's
    /// `wgmma.wait_group` read it. The tensor cores may read it at any time until then, so a
    /// store to it (by any thread) is an error.
    pub(super) async_readers: Vec<u16>,
    /// The block's accesses for counting transactions, where asked for
    /// (`Memory::enable_access_stats`).
    pub(super) requests: Option<AccessRecorder>,
}

impl SharedMemory {
    pub(super) fn range(&self, at: u64, len: usize) -> Result<std::ops::Range<usize>, EmuError> {
        let a = at as usize;
        if a.checked_add(len)
            .map_or(true, |end| end > self.bytes.len())
        {
            return err(format!("shared access at {a} out of bounds"));
        }
        Ok(a..a + len)
    }

    pub(super) fn read(&mut self, at: u64, len: usize, who: Access) -> Result<&[u8], EmuError> {
        let r = self.range(at, len)?;
        self.count_shared(&r);
        self.shadow
            .access(1, r.start, len, who, Touch::Read { nc: false }, None)?;
        Ok(&self.bytes[r])
    }

    pub(super) fn write(&mut self, at: u64, data: &[u8], who: Access) -> Result<(), EmuError> {
        let r = self.range(at, data.len())?;
        self.not_read_in_flight(&r)?;
        self.count_shared(&r);
        self.shadow
            .access(1, r.start, data.len(), who, Touch::Write, None)?;
        for unit in r.start / 16..=(r.end - 1) / 16 {
            if self.unfenced[unit] != who.thread {
                self.unfenced[unit] = who.thread;
                self.unfenced_by.entry(who.thread).or_default().push(unit);
            }
        }
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }

    /// An atomic add of `value` to the `len`-byte integer at `at`; the old value.
    pub(super) fn atomic_add(
        &mut self,
        at: u64,
        len: usize,
        value: u64,
        who: Access,
    ) -> Result<u64, EmuError> {
        let r = self.range(at, len)?;
        self.not_read_in_flight(&r)?;
        self.count_shared(&r);
        self.shadow
            .access(1, r.start, len, who, Touch::Atomic, None)?;
        Ok(AtomicOp::Add(value).apply(&mut self.bytes[r]))
    }

    /// The bytes in `r` for the access under way, where transactions are counted
    /// (`requests.rs`).
    fn count_shared(&mut self, r: &std::ops::Range<usize>) {
        if let Some(rec) = &mut self.requests {
            rec.touch_shared(r.start, r.len());
        }
    }

    /// Global bytes touched by the access under way, where transactions are counted.
    pub(super) fn count_global(&mut self, addr: u64, len: usize) {
        if let Some(rec) = &mut self.requests {
            rec.touch_global(addr, len);
        }
    }

    /// An error where a `wgmma` still in flight reads any of these bytes.
    fn not_read_in_flight(&self, r: &std::ops::Range<usize>) -> Result<(), EmuError> {
        match (r.start / 16..=(r.end - 1) / 16).find(|&u| self.async_readers[u] != 0) {
            Some(unit) => err(format!(
                "stores to shared byte {} that a wgmma still in flight reads (before its warpgroup's wgmma.wait_group)",
                16 * unit
            )),
            None => Ok(()),
        }
    }

    /// A `wgmma`'s 16-byte row at `at`, read when it was issued, is retired by its
    /// warpgroup's `wgmma.wait_group` (`who`): no longer in flight, and read as of now, so a
    /// store by another thread needs a barrier after this (stricter than the hardware for the
    /// warpgroup's own threads, which the wait orders already).
    pub(super) fn retire_async(&mut self, at: u64, who: Access) -> Result<(), EmuError> {
        let unit = at as usize / 16;
        self.async_readers[unit] -= 1;
        self.read(at, 16, who).map(|_| ())
    }

    /// `fence.proxy.async.shared::cta` by `thread`: its stores so far become visible to the
    /// async proxy.
    pub(super) fn fence_proxy_async(&mut self, thread: u32) {
        for unit in self.unfenced_by.remove(&thread).unwrap_or_default() {
            if self.unfenced[unit] == thread {
                self.unfenced[unit] = 0;
            }
        }
    }

    /// A read through the async proxy (`wgmma`'s operands): as `read`, and an error where a
    /// thread's store to these bytes was not followed by its `fence.proxy.async`; the bytes are
    /// then in flight until `retire_async`.
    pub(super) fn read_async(
        &mut self,
        at: u64,
        len: usize,
        who: Access,
    ) -> Result<&[u8], EmuError> {
        let r = self.range(at, len)?;
        for unit in r.start / 16..=(r.end - 1) / 16 {
            let writer = self.unfenced[unit];
            if writer != 0 {
                return err(format!(
                    "wgmma reads shared byte {} that thread {} stored without fence.proxy.async",
                    16 * unit,
                    writer
                ));
            }
            self.async_readers[unit] += 1;
        }
        self.read(at, len, who)
    }
}

/// Device memory: buffers in one arena at fake addresses.
pub struct Memory {
    pub(super) bytes: Vec<u8>,
    /// Who touched what during the current launch (`launch` is its stamp).
    pub(super) shadow: Shadow,
    pub(super) launch: u32,
    /// The launch (stamp) of each word's last kernel write, 0 if no kernel ever wrote it: a
    /// kernel may not read such a word before its `griddepcontrol.wait`, when the kernel that
    /// writes it may still be running; the latency model finds recent writes in L2.
    pub(super) written_in: Vec<u32>,
    /// The latency model, where asked for (`enable_timing`).
    pub(super) timing: Option<Timing>,
    /// What each atomic word carries from blocks' releases in this launch (`sync.rs`).
    pub(super) atomic_words: AtomicWords,
    /// The order blocks run in.
    pub(super) block_order: BlockOrder,
    /// Transactions per kernel and instruction, where asked for.
    pub(super) access_stats: Option<AccessStats>,
}

/// The order the interpreter runs a launch's blocks in, one after the other. The hardware
/// runs them in any order and at once: a kernel whose answer depends on the order (which
/// block is last, say) is wrong, and running it in another order shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BlockOrder {
    #[default]
    Forward,
    Reverse,
    /// A permutation drawn from the seed, another for each launch.
    Shuffled(u64),
}

pub(super) const BASE: u64 = 0x1000_0000;

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

impl Memory {
    pub fn new() -> Memory {
        Memory {
            bytes: Vec::new(),
            shadow: Shadow::default(),
            launch: 0,
            written_in: Vec::new(),
            timing: None,
            atomic_words: AtomicWords::default(),
            block_order: BlockOrder::Forward,
            access_stats: None,
        }
    }

    /// Runs every later launch's blocks in `order`.
    pub fn set_block_order(&mut self, order: BlockOrder) {
        self.block_order = order;
    }

    /// The order of a launch's `grid` blocks (advancing a shuffled order's seed).
    pub(super) fn blocks(&mut self, grid: u32) -> Vec<u32> {
        let mut blocks: Vec<u32> = (0..grid).collect();
        match &mut self.block_order {
            BlockOrder::Forward => {}
            BlockOrder::Reverse => blocks.reverse(),
            BlockOrder::Shuffled(seed) => {
                // Fisher-Yates with SplitMix64.
                for i in (1..blocks.len()).rev() {
                    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = *seed;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^= z >> 31;
                    blocks.swap(i, (z % (i as u64 + 1)) as usize);
                }
            }
        }
        blocks
    }

    /// Times every launch from now on by the latency model (`timing.rs`) with `lat`.
    pub fn enable_timing(&mut self, lat: Latencies) {
        self.timing = Some(Timing::new(lat));
    }

    /// Counts the transactions of every later launch's memory accesses: shared-memory
    /// wavefronts and global sectors (`requests.rs`).
    pub fn enable_access_stats(&mut self) {
        self.access_stats = Some(AccessStats::default());
    }

    /// What was counted since `enable_access_stats`.
    pub fn access_stats(&self) -> Option<&AccessStats> {
        self.access_stats.as_ref()
    }

    /// Stops timing launches.
    pub fn disable_timing(&mut self) {
        self.timing = None;
    }

    /// The latency model's critical path of the last launch, in cycles (with timing on).
    pub fn last_launch_cycles(&self) -> Option<u64> {
        self.timing.as_ref().map(|t| t.critical)
    }

    /// The latency of a global load (or prefetch) at `addr` issued at cycle `now` (timing
    /// on).
    pub(super) fn load_latency(&mut self, addr: u64, now: u64) -> Option<u64> {
        let word = (addr.checked_sub(BASE)? / 4) as usize;
        let written = self.written_in.get(word).copied().unwrap_or(0);
        Some(
            self.timing
                .as_mut()?
                .global_load(addr, written, now, self.launch),
        )
    }

    /// A kernel's access (as opposed to the host's copies, which are not tracked) `by` a
    /// thread.
    pub(super) fn access(
        &mut self,
        addr: u64,
        len: usize,
        touch: Touch,
        by: By,
    ) -> Result<(), EmuError> {
        let By { who, waited, sees } = by;
        let (write, nc) = match touch {
            Touch::Read { nc } => (false, nc),
            _ => (true, false),
        };
        let r = self.range(addr, len)?;
        let words = r.start / 4..r.end.div_ceil(4);
        if self.written_in.len() < words.end {
            self.written_in.resize(self.bytes.len().div_ceil(4), 0);
        }
        // The non-coherent cache is for data nothing writes while the kernel runs; with
        // programmatic dependent launch the kernel before may still be writing when this one
        // starts, so only weights and the host's inputs may be read through it.
        let written = |m: &Memory| m.written_in[words.clone()].iter().any(|&w| w != 0);
        if nc && written(self) {
            return err(format!(
                "ld.global.nc at {addr:#x} of memory a kernel wrote (only weights and host inputs may go through the non-coherent cache)"
            ));
        }
        if !waited {
            if write {
                return err(format!(
                    "writes global memory at {addr:#x} before griddepcontrol.wait (the kernel before may still be running)"
                ));
            }
            if written(self) {
                return err(format!(
                    "reads global memory at {addr:#x}, which a kernel wrote, before griddepcontrol.wait"
                ));
            }
        }
        if write {
            self.written_in[words].fill(self.launch);
        }
        self.shadow
            .access(self.launch, r.start, len, who, touch, Some(sees))
    }

    /// A kernel's atomic `op` on the `len`-byte integer at `addr` `by` a thread, releasing
    /// its block's earlier accesses if `release`, what the word carried joining the thread's
    /// `pending` acquisitions (`sync.rs`); the old value.
    pub(super) fn atomic(
        &mut self,
        addr: u64,
        len: usize,
        op: AtomicOp,
        by: By,
        release: bool,
        pending: &mut Releases,
    ) -> Result<u64, EmuError> {
        let who = by.who;
        self.access(addr, len, Touch::Atomic, by)?;
        let r = self.range(addr, len).expect("checked by access");
        self.atomic_words
            .atomic(r.start / 4, who.block, who.epoch, release, pending);
        Ok(op.apply(&mut self.bytes[r]))
    }

    /// Allocates `data` (256-byte aligned) and returns its device address.
    pub fn alloc(&mut self, data: &[u8]) -> u64 {
        let at = self.bytes.len().div_ceil(256) * 256;
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(data);
        // A guard gap so an overrun reads into nothing that belongs to another buffer.
        self.bytes.resize(self.bytes.len() + 256, 0xEE);
        BASE + at as u64
    }

    pub fn alloc_f32(&mut self, data: &[f32]) -> u64 {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.alloc(&bytes)
    }

    pub fn alloc_u32(&mut self, data: &[u32]) -> u64 {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.alloc(&bytes)
    }

    pub(super) fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, EmuError> {
        let start = addr
            .checked_sub(BASE)
            .ok_or_else(|| EmuError(format!("global access at {addr:#x}, below memory")))?
            as usize;
        if start + len > self.bytes.len() {
            return err(format!("global access at {addr:#x} past the end of memory"));
        }
        Ok(start..start + len)
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<&[u8], EmuError> {
        let r = self.range(addr, len)?;
        Ok(&self.bytes[r])
    }

    pub fn read_f32(&self, addr: u64, n: usize) -> Result<Vec<f32>, EmuError> {
        Ok(self
            .read(addr, 4 * n)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    pub fn read_u32(&self, addr: u64, n: usize) -> Result<Vec<u32>, EmuError> {
        Ok(self
            .read(addr, 4 * n)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    /// Writes `data` at a device address (host-to-device copy).
    pub fn write_bytes(&mut self, addr: u64, data: &[u8]) -> Result<(), EmuError> {
        let r = self.range(addr, data.len())?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }
}

/// The atomic read-modify-writes modelled.
#[derive(Clone, Copy)]
pub(super) enum AtomicOp {
    /// Adds (wrapping).
    Add(u64),
    /// `atom.inc.u32`: the old value plus one, or 0 where the old value is at least the bound.
    Inc(u32),
}

impl AtomicOp {
    /// Applies it to the little-endian integer in `bytes` (4 or 8 of them); the old value.
    fn apply(self, bytes: &mut [u8]) -> u64 {
        let mut v = [0u8; 8];
        v[..bytes.len()].copy_from_slice(bytes);
        let old = u64::from_le_bytes(v);
        let new = match self {
            AtomicOp::Add(value) => old.wrapping_add(value),
            AtomicOp::Inc(bound) => {
                if old >= bound as u64 {
                    0
                } else {
                    old + 1
                }
            }
        };
        bytes.copy_from_slice(&new.to_le_bytes()[..bytes.len()]);
        old
    }
}
