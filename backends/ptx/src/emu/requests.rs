//! How many transactions a warp's memory accesses take, against the fewest the same bytes
//! could (off unless asked for: `Memory::enable_access_stats`). Counted, not timed: it says
//! where a layout costs bandwidth, not how much time.
//!
//! Shared memory (bank conflicts): 32 banks of 4-byte words; a warp's access is split into
//! phases of 128 bytes' worth of threads (all 32 for 4-byte accesses, 16 for 8-byte, 8 for
//! 16-byte; each of an `ldmatrix`'s matrices, 8 rows of 16 bytes, is one), and a phase takes
//! as many wavefronts as the most distinct words any one bank holds among those its threads
//! touch (threads touching the same word share it); the fewest is its distinct words over 32.
//!
//! Global memory (coalescing): a warp's access takes one transaction per 32-byte sector any of
//! its threads touches; the fewest is its distinct bytes over 32.

use std::collections::{BTreeMap, HashMap};

/// Transactions taken, and the fewest the same bytes could take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub taken: u64,
    pub fewest: u64,
}

impl Cost {
    fn add(&mut self, other: Cost) {
        self.taken += other.taken;
        self.fewest += other.fewest;
    }

    /// One shared-memory phase touching `words` (4-byte word indices, repeats allowed).
    fn of_phase(words: &mut [u32]) -> Cost {
        words.sort_unstable();
        let mut per_bank = [0u64; 32];
        let mut distinct = 0u64;
        let mut last = None;
        for &w in words.iter() {
            if last != Some(w) {
                per_bank[w as usize % 32] += 1;
                distinct += 1;
                last = Some(w);
            }
        }
        Cost {
            taken: per_bank.iter().copied().max().unwrap_or(0),
            fewest: distinct.div_ceil(32),
        }
    }

    /// A warp's shared-memory access: per lane, the words it touched (each lane as many).
    fn of_shared(lanes: &BTreeMap<u32, Vec<u32>>) -> Cost {
        let width = lanes.values().map(Vec::len).max().unwrap_or(1).clamp(1, 32);
        // Lanes per phase: 128 bytes' worth.
        let per_phase = (32 / width) as u32;
        let mut phases: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (&lane, words) in lanes {
            phases
                .entry(lane / per_phase)
                .or_default()
                .extend(words.iter().copied());
        }
        let mut total = Cost::default();
        for words in phases.values_mut() {
            total.add(Cost::of_phase(words));
        }
        total
    }

    /// A warp's global access: per 32-byte sector, the bytes of it any lane touched.
    fn of_global(sectors: &HashMap<u64, u32>) -> Cost {
        let bytes: u64 = sectors.values().map(|m| m.count_ones() as u64).sum();
        Cost {
            taken: sectors.len() as u64,
            fewest: bytes.div_ceil(32),
        }
    }
}

/// Per kernel and per instruction (kernel, PTX line): what their accesses cost, over every
/// launch since `Memory::enable_access_stats`.
#[derive(Clone, Debug, Default)]
pub struct CostTable {
    pub kernels: BTreeMap<String, Cost>,
    pub lines: BTreeMap<(String, String), Cost>,
}

impl CostTable {
    /// The instructions whose accesses took more than they could, worst first.
    pub fn excess(&self) -> Vec<(&(String, String), Cost)> {
        let mut v: Vec<_> = self
            .lines
            .iter()
            .filter(|(_, c)| c.taken > c.fewest)
            .map(|(k, c)| (k, *c))
            .collect();
        v.sort_by_key(|(_, c)| std::cmp::Reverse(c.taken - c.fewest));
        v
    }

    fn add_block<'a>(
        &mut self,
        kernel: &str,
        line: &impl Fn(usize) -> &'a String,
        per_pc: HashMap<usize, Cost>,
    ) {
        for (pc, c) in per_pc {
            self.kernels.entry(kernel.to_string()).or_default().add(c);
            self.lines
                .entry((kernel.to_string(), line(pc).clone()))
                .or_default()
                .add(c);
        }
    }
}

/// Each kernel's transactions (taken / fewest), then each instruction taking more than the
/// fewest, worst first.
impl std::fmt::Display for CostTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (kernel, c) in &self.kernels {
            writeln!(f, "- {kernel}: {} / {}", c.taken, c.fewest)?;
        }
        for ((kernel, line), c) in self.excess() {
            writeln!(
                f,
                "  - more: {kernel}: `{line}`: {} / {}",
                c.taken, c.fewest
            )?;
        }
        Ok(())
    }
}

/// Shared-memory wavefronts and global sectors.
#[derive(Clone, Debug, Default)]
pub struct AccessStats {
    pub shared: CostTable,
    pub global: CostTable,
}

impl AccessStats {
    /// A block of `kernel` ran (`line(pc)`: an instruction's text).
    pub(super) fn add_block<'a>(
        &mut self,
        kernel: &str,
        line: impl Fn(usize) -> &'a String,
        recorded: AccessRecorder,
    ) {
        let (shared, global) = recorded.finish();
        self.shared.add_block(kernel, &line, shared);
        self.global.add_block(kernel, &line, global);
    }
}

/// (warp, pc, the how-manieth time its threads run that pc).
type Key = (u32, usize, u32);

/// One block's memory accesses, gathered per warp and dynamic instance of an instruction while
/// its threads run one at a time.
#[derive(Default)]
pub(super) struct AccessRecorder {
    /// How many times each (thread, pc) has accessed memory so far.
    instances: HashMap<(u32, usize), u32>,
    /// The access under way and its lane.
    current: Option<(Key, u32)>,
    /// Shared: each lane's words.
    shared: HashMap<Key, BTreeMap<u32, Vec<u32>>>,
    /// Global: per 32-byte sector, a mask of the bytes touched.
    global: HashMap<Key, HashMap<u64, u32>>,
}

impl AccessRecorder {
    /// Thread `tid` starts the memory instruction at `pc`.
    pub(super) fn begin(&mut self, tid: u32, pc: usize) {
        let n = self.instances.entry((tid, pc)).or_insert(0);
        self.current = Some(((tid / 32, pc, *n), tid % 32));
        *n += 1;
    }

    pub(super) fn end(&mut self) {
        self.current = None;
    }

    /// Shared bytes `at..at + len` touched by the access under way (none: not counted).
    pub(super) fn touch_shared(&mut self, at: usize, len: usize) {
        if let Some((key, lane)) = self.current {
            let words = self.shared.entry(key).or_default().entry(lane).or_default();
            words.extend((at / 4) as u32..(at + len).div_ceil(4) as u32);
        }
    }

    /// Global bytes `addr..addr + len` touched by the access under way.
    pub(super) fn touch_global(&mut self, addr: u64, len: usize) {
        if let Some((key, _)) = self.current {
            let sectors = self.global.entry(key).or_default();
            for byte in addr..addr + len as u64 {
                *sectors.entry(byte / 32).or_default() |= 1 << (byte % 32);
            }
        }
    }

    /// An `ldmatrix` of `rows` (16-byte rows at these byte addresses, 8 per matrix) by the
    /// warp at `pc`: each matrix is one phase.
    pub(super) fn ldmatrix(&mut self, warp: u32, pc: usize, rows: &[usize]) {
        // Each row as its lane's 16-byte access, so 8 make a phase: one matrix.
        for (lane, &at) in rows.iter().enumerate() {
            self.begin(32 * warp + lane as u32, pc);
            self.touch_shared(at, 16);
            self.end();
        }
    }

    /// The block's costs per pc: shared, global.
    fn finish(self) -> (HashMap<usize, Cost>, HashMap<usize, Cost>) {
        let mut shared: HashMap<usize, Cost> = HashMap::new();
        for ((_, pc, _), lanes) in &self.shared {
            shared.entry(*pc).or_default().add(Cost::of_shared(lanes));
        }
        let mut global: HashMap<usize, Cost> = HashMap::new();
        for ((_, pc, _), sectors) in &self.global {
            global.entry(*pc).or_default().add(Cost::of_global(sectors));
        }
        (shared, global)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(lane_words: impl Fn(u32) -> Vec<u32>) -> (u64, u64) {
        let c = Cost::of_shared(&(0..32).map(|l| (l, lane_words(l))).collect());
        (c.taken, c.fewest)
    }

    fn global(lane_bytes: impl Fn(u64) -> std::ops::Range<u64>) -> (u64, u64) {
        let mut r = AccessRecorder::default();
        for lane in 0..32 {
            r.begin(lane, 0);
            let bytes = lane_bytes(lane as u64);
            r.touch_global(bytes.start, (bytes.end - bytes.start) as usize);
            r.end();
        }
        let c = r.finish().1[&0];
        (c.taken, c.fewest)
    }

    #[test]
    fn shared_wavefronts_follow_the_bank_rule() {
        // Consecutive words: one wavefront; all the same word: one (a broadcast).
        assert_eq!(shared(|l| vec![l]), (1, 1));
        assert_eq!(shared(|_| vec![7]), (1, 1));
        // A stride of 2 words: two lanes per bank; of 32 words: all in bank 0.
        assert_eq!(shared(|l| vec![2 * l]), (2, 1));
        assert_eq!(shared(|l| vec![32 * l]), (32, 1));
        // 16-byte accesses, consecutive: four phases of 8 lanes, none conflicting.
        let v4 = |base: u32| (base..base + 4).collect::<Vec<u32>>();
        assert_eq!(shared(|l| v4(4 * l)), (4, 4));
        // Rows 32 bytes apart: two lanes of a phase share each bank.
        assert_eq!(shared(|l| v4(8 * l)), (8, 4));
        // Rows padded to 48 bytes (12 words), 8 to a phase: conflict-free.
        assert_eq!(shared(|l| v4(12 * l)), (4, 4));
    }

    #[test]
    fn global_sectors_count_what_a_warp_touches() {
        // 16 bytes a lane, consecutive: 16 sectors, all of each used.
        assert_eq!(global(|l| 16 * l..16 * l + 16), (16, 16));
        // The same 4 bytes for every lane: one sector.
        assert_eq!(global(|_| 64..68), (1, 1));
        // 16 bytes a lane, 32 apart: 32 sectors half used.
        assert_eq!(global(|l| 32 * l..32 * l + 16), (32, 16));
        // 4 bytes a lane, one row of 4 KiB each: a sector per lane for 4 bytes.
        assert_eq!(global(|l| 4096 * l..4096 * l + 4), (32, 4));
    }
}
