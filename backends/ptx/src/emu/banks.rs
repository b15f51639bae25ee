//! Shared-memory bank conflicts, counted as the hardware serves a warp's access (off unless
//! asked for: `Memory::enable_bank_stats`). Shared memory is 32 banks of 4-byte words; a
//! warp's access is split into phases of 128 bytes' worth of threads (all 32 for 4-byte
//! accesses, 16 for 8-byte, 8 for 16-byte; each of an `ldmatrix`'s matrices, 8 rows of 16
//! bytes, is one), and a phase takes as many wavefronts as the most distinct words any one
//! bank holds among those its threads touch (threads touching the same word share it). The
//! fewest a phase could take is its distinct words over 32, rounded up; the difference is
//! what a layout's conflicts cost.

use std::collections::{BTreeMap, HashMap};

/// Wavefronts of shared-memory accesses: those taken, and the fewest the same words could take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wavefronts {
    pub taken: u64,
    pub ideal: u64,
}

impl Wavefronts {
    fn add(&mut self, other: Wavefronts) {
        self.taken += other.taken;
        self.ideal += other.ideal;
    }

    /// One phase touching `words` (4-byte word indices, repeats allowed).
    fn of_phase(words: &mut [u32]) -> Wavefronts {
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
        Wavefronts {
            taken: per_bank.iter().copied().max().unwrap_or(0),
            ideal: distinct.div_ceil(32),
        }
    }

    /// A warp's access: per lane, the words it touched (each lane the same count).
    fn of_access(lanes: &BTreeMap<u32, Vec<u32>>) -> Wavefronts {
        let width = lanes.values().map(Vec::len).max().unwrap_or(1).max(1);
        // Lanes per phase: 128 bytes' worth.
        let per_phase = (32 / width.min(32)).max(1) as u32;
        let mut phases: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (&lane, words) in lanes {
            phases
                .entry(lane / per_phase)
                .or_default()
                .extend(words.iter().copied());
        }
        let mut total = Wavefronts::default();
        for words in phases.values_mut() {
            total.add(Wavefronts::of_phase(words));
        }
        total
    }
}

/// Per kernel and per instruction (kernel, PTX line): the wavefronts their shared-memory
/// accesses took, over every launch since `Memory::enable_bank_stats`.
#[derive(Clone, Debug, Default)]
pub struct BankStats {
    pub kernels: BTreeMap<String, Wavefronts>,
    pub lines: BTreeMap<(String, String), Wavefronts>,
}

impl BankStats {
    /// The instructions whose accesses took more wavefronts than they could, worst first.
    pub fn conflicted(&self) -> Vec<(&(String, String), Wavefronts)> {
        let mut v: Vec<_> = self
            .lines
            .iter()
            .filter(|(_, w)| w.taken > w.ideal)
            .map(|(k, w)| (k, *w))
            .collect();
        v.sort_by_key(|(_, w)| std::cmp::Reverse(w.taken - w.ideal));
        v
    }
}

/// One block's shared-memory accesses, gathered per warp and dynamic instance of an
/// instruction while its threads run one at a time.
#[derive(Default)]
pub(super) struct BankRecorder {
    /// How many times each (thread, pc) has accessed shared memory so far.
    instances: HashMap<(u32, usize), u32>,
    /// The access under way: (warp, pc, instance) and the lane.
    current: Option<((u32, usize, u32), u32)>,
    /// Per (warp, pc, instance): each lane's words.
    accesses: HashMap<(u32, usize, u32), BTreeMap<u32, Vec<u32>>>,
}

impl BankRecorder {
    /// Thread `tid` starts the shared-memory instruction at `pc`.
    pub(super) fn begin(&mut self, tid: u32, pc: usize) {
        let n = self.instances.entry((tid, pc)).or_insert(0);
        self.current = Some(((tid / 32, pc, *n), tid % 32));
        *n += 1;
    }

    pub(super) fn end(&mut self) {
        self.current = None;
    }

    /// Bytes `at..at + len` touched by the access under way (none: not counted).
    pub(super) fn touch(&mut self, at: usize, len: usize) {
        if let Some((key, lane)) = self.current {
            let words = self
                .accesses
                .entry(key)
                .or_default()
                .entry(lane)
                .or_default();
            words.extend((at / 4) as u32..(at + len).div_ceil(4) as u32);
        }
    }

    /// An `ldmatrix` of `rows` (16-byte rows at these byte addresses, 8 per matrix) by the
    /// warp at `pc`: each matrix is one phase.
    pub(super) fn ldmatrix(&mut self, warp: u32, pc: usize, rows: &[usize]) {
        let n = self.instances.entry((32 * warp, pc)).or_insert(0);
        let lanes = self.accesses.entry((warp, pc, *n)).or_default();
        *n += 1;
        // As lanes 4 words wide, so 8 make a phase: one matrix.
        for (lane, &at) in rows.iter().enumerate() {
            lanes
                .entry(lane as u32)
                .or_default()
                .extend((at / 4) as u32..(at / 4 + 4) as u32);
        }
    }

    /// The block's wavefronts per pc.
    pub(super) fn finish(self) -> HashMap<usize, Wavefronts> {
        let mut per_pc: HashMap<usize, Wavefronts> = HashMap::new();
        for ((_, pc, _), lanes) in &self.accesses {
            per_pc
                .entry(*pc)
                .or_default()
                .add(Wavefronts::of_access(lanes));
        }
        per_pc
    }
}

impl BankStats {
    /// A block of `kernel` ran: its wavefronts per instruction (`line(pc)` its text).
    pub(super) fn add_block<'a>(
        &mut self,
        kernel: &str,
        line: impl Fn(usize) -> &'a String,
        per_pc: HashMap<usize, Wavefronts>,
    ) {
        for (pc, w) in per_pc {
            self.kernels.entry(kernel.to_string()).or_default().add(w);
            self.lines
                .entry((kernel.to_string(), line(pc).clone()))
                .or_default()
                .add(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(lane_words: impl Fn(u32) -> Vec<u32>) -> Wavefronts {
        Wavefronts::of_access(&(0..32).map(|l| (l, lane_words(l))).collect())
    }

    #[test]
    fn wavefronts_follow_the_bank_rule() {
        // Consecutive words: one wavefront; all the same word: one (a broadcast).
        assert_eq!(access(|l| vec![l]), Wavefronts { taken: 1, ideal: 1 });
        assert_eq!(access(|_| vec![7]), Wavefronts { taken: 1, ideal: 1 });
        // A stride of 2 words: two lanes per bank; of 32 words: all in bank 0.
        assert_eq!(access(|l| vec![2 * l]), Wavefronts { taken: 2, ideal: 1 });
        assert_eq!(
            access(|l| vec![32 * l]),
            Wavefronts {
                taken: 32,
                ideal: 1
            }
        );
        // 16-byte accesses, consecutive: four phases of 8 lanes, none conflicting.
        let v4 = |base: u32| (base..base + 4).collect::<Vec<u32>>();
        assert_eq!(access(|l| v4(4 * l)), Wavefronts { taken: 4, ideal: 4 });
        // Rows 32 bytes apart: two lanes of a phase share each bank.
        assert_eq!(access(|l| v4(8 * l)), Wavefronts { taken: 8, ideal: 4 });
        // Rows padded to 48 bytes (12 words), 8 to a phase: conflict-free.
        assert_eq!(access(|l| v4(12 * l)), Wavefronts { taken: 4, ideal: 4 });
    }
}
