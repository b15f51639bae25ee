//! A latency model: how long a launch's longest chain of dependent instructions takes, in
//! cycles, where every block runs at once (true of the decode kernels, whose grids fit the
//! GPU). Each thread issues in order, one instruction a cycle at best, and an instruction waits
//! for the registers it reads; a warp collective starts when its last thread arrives, a barrier
//! releases when the block's last thread arrives. Global loads take an L2 or a DRAM latency by
//! where the line likely is: written by one of the last few launches, prefetched, or loaded
//! by another thread of this launch (L2, or the rest of the earliest such load's wait, in the
//! model's time, not the interpreter's order); else DRAM.
//!
//! It leaves out bandwidth, issue contention between warps, and launch overhead: a kernel
//! that streams much memory is bounded by bytes over bandwidth instead, which callers add. So
//! it finds kernels bound by latency (a loop that waits on each load before issuing the next)
//! and compares forms of one kernel; it is not a measurement, and its constants are
//! approximations for an H100/H200-class GPU, not calibrated on one.

use std::collections::HashMap;

use super::parse::Instr;

/// Latencies in cycles.
#[derive(Clone, Copy, Debug)]
pub struct Latencies {
    /// Integer and f32 arithmetic, moves, compares, conversions.
    pub alu: u64,
    /// f64 arithmetic.
    pub f64: u64,
    /// Integer division and remainder, rounded f32 division and square root (several
    /// instructions each on the GPU).
    pub long_alu: u64,
    /// Special-function unit: `ex2`, `rsqrt`, `sin`, `tanh`, ... (`.approx`).
    pub mufu: u64,
    /// Shared memory loads and `ldmatrix`; also parameter loads.
    pub shared: u64,
    /// Shuffles.
    pub shuffle: u64,
    /// `mma.sync`.
    pub mma: u64,
    /// `wgmma.mma_async` (issue to accumulators ready).
    pub wgmma: u64,
    /// A global load that finds its line in L2.
    pub l2: u64,
    /// A global load from DRAM.
    pub dram: u64,
    /// From the last thread reaching `bar.sync` to the block going on.
    pub barrier: u64,
}

impl Default for Latencies {
    /// Approximate Hopper latencies (microbenchmarks published for the H100: shared memory
    /// ~30 cycles, L2 ~260, DRAM ~500-650 under light load).
    fn default() -> Self {
        Latencies {
            alu: 5,
            f64: 8,
            long_alu: 40,
            mufu: 18,
            shared: 30,
            shuffle: 30,
            mma: 32,
            wgmma: 128,
            l2: 270,
            dram: 650,
            barrier: 20,
        }
    }
}

/// Bytes of an L2 line.
const LINE: u64 = 128;

/// Launches back whose writes a load still finds in L2.
const RECENT_LAUNCHES: u32 = 4;

/// The model's state: latencies, when each line touched in the current launch reaches L2,
/// and the launch's critical path.
pub(super) struct Timing {
    pub(super) lat: Latencies,
    /// Lines loaded or prefetched in this launch: the cycle each is in L2.
    lines: HashMap<u64, u64>,
    /// The longest thread of the current (or last) launch, in cycles.
    pub(super) critical: u64,
}

impl Timing {
    pub(super) fn new(lat: Latencies) -> Timing {
        Timing {
            lat,
            lines: HashMap::new(),
            critical: 0,
        }
    }

    /// A launch starts: no line is known to be in L2 by this launch's own loads yet.
    pub(super) fn start_launch(&mut self) {
        self.lines.clear();
        self.critical = 0;
    }

    /// The latency of a global load (or prefetch) at `addr`, whose word a kernel last wrote in
    /// launch `written` (0: never), issued at cycle `now` in launch `launch`; the line is in
    /// L2 for later loads from then on.
    pub(super) fn global_load(&mut self, addr: u64, written: u32, now: u64, launch: u32) -> u64 {
        let recent = written != 0 && launch.wrapping_sub(written) <= RECENT_LAUNCHES;
        let line = addr / LINE;
        let first = if recent { self.lat.l2 } else { self.lat.dram };
        // Blocks run one after another here but at once in the model, so a line's first
        // loader in this order may come later in time than this load: the line is in L2 from
        // the earliest of them on.
        let arrives = match self.lines.get(&line) {
            Some(&at) => at.min(now + first),
            None => now + first,
        };
        self.lines.insert(line, arrives);
        arrives.saturating_sub(now).max(self.lat.l2)
    }
}

/// The fixed latency of an instruction by its opcode's parts (global loads are `Timing`'s).
pub(super) fn latency(lat: &Latencies, op: &[String]) -> u64 {
    let ty = op.last().map(String::as_str).unwrap_or("");
    match op[0].as_str() {
        "ld" | "ldmatrix" => lat.shared,
        // Global atomics are carried out at L2.
        "atom" if op.iter().any(|p| p == "shared") => lat.shared,
        "atom" => lat.l2,
        "shfl" => lat.shuffle,
        "mma" => lat.mma,
        "wgmma" if op.get(1).map(String::as_str) == Some("mma_async") => lat.wgmma,
        "ex2" | "lg2" | "sin" | "cos" | "tanh" | "rsqrt" => lat.mufu,
        "rcp" | "sqrt" if op.iter().any(|p| p == "approx") => lat.mufu,
        "div" | "rem" | "rcp" | "sqrt" => lat.long_alu,
        _ if ty == "f64" => lat.f64,
        _ => lat.alu,
    }
}

/// One thread's place in the latency model: it issues in order within a basic block as a
/// scheduler would place instructions (ptxas reorders there), each once the registers it reads
/// are ready and not before its block's start, loads after its last store to their space.
pub(super) struct Clock {
    /// The latest cycle it issued an instruction.
    pub(super) issued: u64,
    /// The earliest cycle its next instruction may issue.
    front: u64,
    /// The cycle of its last store to global and to shared memory.
    last_store: [u64; 2],
    /// The cycle each register's value is ready.
    ready: Vec<u64>,
    /// When the collective instruction it waits at could issue for it.
    pub(super) pending: u64,
}

impl Clock {
    pub(super) fn new(registers: usize) -> Clock {
        Clock {
            issued: 0,
            front: 0,
            last_store: [0; 2],
            ready: vec![0; registers],
            pending: 0,
        }
    }

    /// A scheduling boundary (a basic block's start, a branch, a barrier): nothing after it
    /// issues before everything before it has.
    pub(super) fn boundary(&mut self, at: u64) {
        self.issued = self.issued.max(at);
        self.front = self.front.max(self.issued + 1);
    }

    /// The cycle `ins` issues (a barrier after everything before it; a collective's is its
    /// `pending`, settled when its last thread arrives: `collective`).
    pub(super) fn issue(&mut self, ins: &Instr) -> u64 {
        if ins.starts_block {
            self.boundary(0);
        }
        let mut at = ins
            .reads
            .iter()
            .fold(self.front, |at, &r| at.max(self.ready[r]));
        let op = ins.op[0].as_str();
        if matches!(op, "ld" | "atom" | "ldmatrix") {
            at = at.max(self.last_store[space(ins)] + 1);
        }
        if op == "bar" {
            at = at.max(self.issued);
        }
        self.pending = at;
        self.front += 1;
        self.issued = self.issued.max(at);
        at
    }

    /// `ins`, issued at `at`, has its results `lat` cycles later.
    pub(super) fn complete(&mut self, ins: &Instr, at: u64, lat: u64) {
        for &w in &ins.writes {
            self.ready[w] = at + lat;
        }
        if matches!(ins.op[0].as_str(), "st" | "red" | "atom") {
            self.last_store[space(ins)] = at;
        }
    }

    /// A collective `ins` its group issued at `at` (when the last of them could).
    pub(super) fn collective(&mut self, ins: &Instr, at: u64, lat: u64) {
        self.issued = self.issued.max(at);
        self.complete(ins, at, lat);
    }
}

/// An access's memory space: 1 for shared memory, 0 for the rest.
fn space(ins: &Instr) -> usize {
    usize::from(ins.op[0] == "ldmatrix" || ins.op.iter().any(|p| p == "shared"))
}
