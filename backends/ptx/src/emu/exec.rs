//! Running a launch: blocks, threads, their scheduling at collectives and barriers, and
//! each instruction's semantics.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use super::collective::*;
use super::memory::*;
use super::parse::*;
use super::requests::AccessRecorder;
use super::sync::{BlockSync, Releases, Sees, ThreadSync};
use super::timing::{latency, Clock};
use super::{err, EmuError};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Wait {
    Running,
    Shfl,
    /// At a warpgroup-collective instruction (`wgmma.mma_async`).
    Group,
    Bar,
    Done,
}

pub(super) struct Thread {
    pub(super) regs: Vec<u64>,
    /// Registers written (by anything but a `wgmma`) since this thread's last `wgmma.fence`:
    /// a `wgmma` reading one is undefined on the hardware, so an error here.
    pub(super) unfenced: Vec<bool>,
    /// Per register: read (`ASYNC_READS`) or written (`ASYNC_WRITES`) by a `wgmma` its
    /// warpgroup has not yet retired with `wgmma.wait_group`.
    pub(super) in_flight: Vec<u8>,
    pub(super) pc: usize,
    pub(super) wait: Wait,
    /// Past `griddepcontrol.wait`: earlier kernels' writes are visible.
    pub(super) waited: bool,
    /// Its place in the latency model, where that is on.
    pub(super) clock: Option<Clock>,
}

/// `Thread::in_flight` flags: an A fragment (other instructions may read it, not write it)
/// and an accumulator (other instructions may neither read nor write it).
pub(super) const ASYNC_READS: u8 = 1;
pub(super) const ASYNC_WRITES: u8 = 2;

impl Thread {
    pub(super) fn set(&mut self, reg: usize, v: u64) {
        self.regs[reg] = v;
        self.unfenced[reg] = true;
    }
}

/// A launch: grid and block size (one dimension) and the parameter values, in order.
pub struct Launch<'a> {
    pub grid: u32,
    pub block: u32,
    pub params: &'a [u64],
}

/// Instructions executed, for tests that check work per launch.
pub fn run(
    module: &Module,
    kernel: &str,
    launch: &Launch,
    memory: &mut Memory,
) -> Result<u64, EmuError> {
    let f = module.function_named(kernel)?;
    if launch.params.len() != f.params.len() {
        return err(format!(
            "{kernel}: {} parameters given, the kernel takes {}",
            launch.params.len(),
            f.params.len()
        ));
    }
    // Up to 256 threads a block always has the registers it asks for (ptxas gives at most 255
    // a thread); past that, only launch bounds make ptxas keep within 65536 per block, and
    // without them the launch could fail for want of registers on the GPU.
    if launch.block > 256 && f.max_threads.is_none() {
        return err(format!(
            "{kernel}: blocks of {} threads without launch bounds (.maxntid)",
            launch.block
        ));
    }
    if let Some(max) = f.max_threads.filter(|&m| launch.block > m) {
        return err(format!(
            "{kernel}: blocks of {} threads, the kernel allows {max} (.maxntid)",
            launch.block
        ));
    }
    if let Some(t) = &mut memory.timing {
        t.start_launch();
    }
    memory.launch = memory.launch.wrapping_add(1);
    if memory.launch == 0 {
        // Stamps wrapped: forget every entry rather than mistake an old one for this launch's.
        memory.shadow.reset();
        memory.launch = 1;
    }
    let mut executed = 0u64;
    memory.atomic_words.clear();
    for block in memory.blocks(launch.grid) {
        executed += run_block(f, launch, block, memory)?;
    }
    Ok(executed)
}

/// Whether a warp or warpgroup (`group`; a warpgroup must have all `size` threads, a warp is
/// whatever the block's last one holds) meets at the collective
/// instruction its threads wait at with `wait`: `Ok(Some(pc))` once every one waits at the same
/// one, `Ok(None)` while none waits or some still run, `Err(pc)` when the rest never will (they
/// left, or wait elsewhere).
pub(super) fn meeting(group: &[Thread], wait: Wait, size: usize) -> Result<Option<usize>, usize> {
    let Some(pc) = group.iter().find(|t| t.wait == wait).map(|t| t.pc) else {
        return Ok(None);
    };
    if group.len() == size && group.iter().all(|t| t.wait == wait && t.pc == pc) {
        Ok(Some(pc))
    } else if group.iter().any(|t| t.wait == Wait::Running) {
        Ok(None)
    } else {
        Err(pc)
    }
}

/// Moves every thread of a group that met past the collective instruction `ins`; with the
/// latency model on (`lat`), it issued when the last of them could, and its results are ready
/// `lat` cycles later.
pub(super) fn release(group: &mut [Thread], ins: &Instr, lat: Option<u64>) {
    let issue = group
        .iter()
        .filter_map(|t| t.clock.as_ref().map(|c| c.pending))
        .max()
        .unwrap_or(0);
    for t in group.iter_mut() {
        if let (Some(lat), Some(c)) = (lat, &mut t.clock) {
            c.collective(ins, issue, lat);
        }
        t.pc += 1;
        t.wait = Wait::Running;
    }
}

pub(super) fn run_block(
    f: &Function,
    launch: &Launch,
    block: u32,
    memory: &mut Memory,
) -> Result<u64, EmuError> {
    let n = launch.block as usize;
    let starts_waited = !f.waits_for_earlier_kernels();
    let mut shared = SharedMemory {
        bytes: vec![0u8; f.shared_bytes as usize],
        shadow: Shadow::default(),
        unfenced: vec![0; (f.shared_bytes as usize).div_ceil(16)],
        unfenced_by: HashMap::new(),
        async_readers: vec![0; (f.shared_bytes as usize).div_ceil(16)],
        requests: memory
            .access_stats
            .as_ref()
            .map(|_| AccessRecorder::default()),
    };
    // Each warpgroup's `wgmma`s in flight.
    let mut async_groups: Vec<AsyncGroups> = (0..n.div_ceil(128))
        .map(|_| AsyncGroups::default())
        .collect();
    // Barriers this block has passed: accesses in different epochs are ordered.
    let mut epoch = 0u32;
    let mut threads: Vec<Thread> = (0..n)
        .map(|_| Thread {
            regs: vec![0; f.registers],
            unfenced: vec![false; f.registers],
            in_flight: vec![0; f.registers],
            pc: 0,
            wait: Wait::Running,
            waited: starts_waited,
            clock: memory.timing.as_ref().map(|_| Clock::new(f.registers)),
        })
        .collect();
    // Ordering with other blocks (`sync.rs`).
    let syncs: Vec<RefCell<ThreadSync>> = (0..n).map(|_| RefCell::default()).collect();
    let mut block_sync = BlockSync::default();
    let collective_latency =
        |ins: &Instr, memory: &Memory| memory.timing.as_ref().map(|t| latency(&t.lat, &ins.op));
    let mut executed = 0;
    loop {
        for (t, thread) in threads.iter_mut().enumerate() {
            if thread.wait == Wait::Running {
                let ctx = Ctx {
                    f,
                    launch,
                    block,
                    tid: t as u32,
                    epoch,
                    now: Cell::new(0),
                    memory_latency: Cell::new(None),
                    sync: &syncs[t],
                    block_sync: &block_sync,
                };
                executed += ctx.run_thread(thread, memory, &mut shared)?;
            }
        }
        if threads.iter().all(|t| t.wait == Wait::Done) {
            if let (Some(stats), Some(rec)) = (&mut memory.access_stats, shared.requests.take()) {
                stats.add_block(&f.name, |pc| &f.code[pc].line, rec);
            }
            if let Some(timing) = &mut memory.timing {
                let longest = threads
                    .iter()
                    .filter_map(|t| t.clock.as_ref())
                    .map(|c| c.issued);
                let longest = longest.max().unwrap_or(0);
                timing.critical = timing.critical.max(longest);
            }
            return Ok(executed);
        }
        let mut progressed = false;
        // Shuffles: per warp, every lane must wait at the same instruction.
        for (warp_index, warp) in threads.chunks_mut(32).enumerate() {
            let pc = match meeting(warp, Wait::Shfl, warp.len()) {
                Ok(Some(pc)) => pc,
                Ok(None) => continue,
                Err(pc) => {
                    return err(format!(
                        "{}: `{}` reached by only part of a warp (full mask): lanes {:?}",
                        f.name,
                        f.code[pc].line,
                        warp.iter().map(|t| (t.wait, t.pc)).collect::<Vec<_>>()
                    ))
                }
            };
            match f.code[pc].op[0].as_str() {
                "mma" => mma(&f.code[pc], warp)?,
                "ldmatrix" => {
                    let first = warp_index as u32 * 32;
                    let who = |lane: usize| Access {
                        thread: 1 + block * launch.block + first + lane as u32,
                        block,
                        epoch,
                        block_size: launch.block,
                    };
                    let rows = ldmatrix(&f.code[pc], warp, &mut shared, who)
                        .map_err(|e| EmuError(format!("{}: {e}", f.name)))?;
                    if let Some(rec) = &mut shared.requests {
                        rec.ldmatrix(warp_index as u32, pc, &rows);
                    }
                }
                _ => shuffle(&f.code[pc], warp)?,
            }
            release(warp, &f.code[pc], collective_latency(&f.code[pc], memory));
            progressed = true;
        }
        // Warpgroup collectives: every thread of the four warps at the same instruction.
        for (group_index, group) in threads.chunks_mut(128).enumerate() {
            let pc = match meeting(group, Wait::Group, 128) {
                Ok(Some(pc)) => pc,
                Ok(None) => continue,
                Err(pc) => {
                    return err(format!(
                        "{}: `{}` reached by only part of a warpgroup",
                        f.name, f.code[pc].line
                    ))
                }
            };
            let who = Access {
                thread: 1 + block * launch.block + group_index as u32 * 128,
                block,
                epoch,
                block_size: launch.block,
            };
            let ins = &f.code[pc];
            let pending = &mut async_groups[group_index];
            let done = match ins.op[1].as_str() {
                "mma_async" => {
                    wgmma(ins, group, &mut shared, who).map(|mma| pending.issue(mma, group))
                }
                "commit_group" => {
                    pending.commit();
                    Ok(())
                }
                _ => match ins.args.first() {
                    Some(Operand::Imm(n)) => pending.wait(*n as usize, group, &mut shared, who),
                    _ => err(format!("`{}`: a group count expected", ins.line)),
                },
            };
            done.map_err(|e| EmuError(format!("{}: {e}", f.name)))?;
            release(group, &f.code[pc], collective_latency(&f.code[pc], memory));
            progressed = true;
        }
        let live: Vec<&Thread> = threads.iter().filter(|t| t.wait != Wait::Done).collect();
        if !progressed && !live.is_empty() && live.iter().all(|t| t.wait == Wait::Bar) {
            let last = live
                .iter()
                .filter_map(|t| t.clock.as_ref())
                .map(|c| c.issued);
            let last = last.max().unwrap_or(0);
            let barrier = memory.timing.as_ref().map_or(0, |t| t.lat.barrier);
            block_sync.barrier(&syncs);
            for t in threads.iter_mut().filter(|t| t.wait == Wait::Bar) {
                if let Some(c) = &mut t.clock {
                    c.boundary(last + barrier);
                }
                t.pc += 1;
                t.wait = Wait::Running;
            }
            epoch += 1;
            progressed = true;
        }
        if !progressed && threads.iter().all(|t| t.wait != Wait::Running) {
            return err(format!(
                "{}: block {block} deadlocked (threads wait at a barrier others never reach)",
                f.name
            ));
        }
    }
}

/// `x CMP y` for setp's comparison names.
pub(super) fn compare<T: PartialOrd>(cmp: &str, x: T, y: T) -> Option<bool> {
    Some(match cmp {
        "eq" => x == y,
        "ne" => x != y,
        "lt" => x < y,
        "le" => x <= y,
        "gt" => x > y,
        "ge" => x >= y,
        _ => return None,
    })
}

/// An opcode's dot-separated parts, read without allocating.
pub(super) struct Op<'a>(&'a [String]);

impl<'a> Op<'a> {
    pub(super) fn at(&self, i: usize) -> &'a str {
        self.0[i].as_str()
    }
    pub(super) fn last(&self) -> &'a str {
        self.0[self.0.len() - 1].as_str()
    }
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
    pub(super) fn has(&self, m: &str) -> bool {
        self.0.iter().any(|p| p == m)
    }
    /// `n` of a `.vN` vector access.
    pub(super) fn vector_width(&self) -> Option<usize> {
        self.0
            .iter()
            .find_map(|m| m.strip_prefix('v')?.parse::<usize>().ok())
    }
}

/// How a global load counts for the interpreter's checks.
#[derive(Clone, Copy)]
pub(super) enum LoadKind {
    /// A hint: no data the program depends on, so neither a race nor an early read.
    Prefetch,
    /// A read, by a thread past its `griddepcontrol.wait` or not, through the non-coherent
    /// cache or not.
    Read { waited: bool, nc: bool },
}

pub(super) struct Ctx<'a> {
    pub(super) f: &'a Function,
    pub(super) launch: &'a Launch<'a>,
    pub(super) block: u32,
    pub(super) tid: u32,
    /// Barriers the block has passed.
    pub(super) epoch: u32,
    /// The latency model: the cycle the current instruction issues, and its global loads'
    /// latency (the longest of a vector's).
    pub(super) now: Cell<u64>,
    pub(super) memory_latency: Cell<Option<u64>>,
    /// The thread's and its block's ordering with other blocks (`sync.rs`).
    pub(super) sync: &'a RefCell<ThreadSync>,
    pub(super) block_sync: &'a BlockSync,
}

pub(super) fn f32_of(bits: u64) -> f32 {
    f32::from_bits(bits as u32)
}

pub(super) fn bits_f32(v: f32) -> u64 {
    v.to_bits() as u64
}

pub(super) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// IEEE half precision as f32 (exact).
pub(super) fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// Round to nearest even, as `cvt.rn.f16.f32`: subnormals below 2^-14, infinity from 65520
/// (halfway past the largest half, 65504) on.
pub(super) fn f32_to_f16(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

/// Round to nearest even, as `cvt.rn.bf16.f32`.
pub(super) fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return 0x7FC0;
    }
    let round = ((b >> 16) & 1) + 0x7FFF;
    ((b + round) >> 16) as u16
}

impl Ctx<'_> {
    /// This thread's access to global memory (`Memory::access`), which then counts as one
    /// not yet fenced.
    fn global_access(
        &self,
        memory: &mut Memory,
        addr: u64,
        len: usize,
        touch: Touch,
        waited: bool,
    ) -> Result<(), EmuError> {
        let mut sync = self.sync.borrow_mut();
        memory.access(addr, len, touch, self.by(&sync.acquired, waited))?;
        sync.touch();
        Ok(())
    }

    /// This thread as a global access names it, `acquired` being what it acquired from
    /// other blocks since its block's last barrier.
    fn by<'s>(&'s self, acquired: &'s Releases, waited: bool) -> By<'s> {
        By {
            who: self.who(),
            waited,
            sees: Sees {
                block: &self.block_sync.visible,
                thread: acquired,
                grid: self.launch.grid,
            },
        }
    }

    pub(super) fn who(&self) -> Access {
        Access {
            thread: 1 + self.block * self.launch.block + self.tid,
            block: self.block,
            epoch: self.epoch,
            block_size: self.launch.block,
        }
    }

    pub(super) fn value(&self, t: &Thread, o: &Operand) -> Result<u64, EmuError> {
        Ok(match o {
            Operand::Reg(r) => t.regs[*r],
            Operand::Imm(v) => *v,
            Operand::Symbol(a) => *a,
            Operand::Special(s) => match s {
                Special::Tid => self.tid as u64,
                Special::Ntid => self.launch.block as u64,
                Special::Ctaid => self.block as u64,
                Special::Nctaid => self.launch.grid as u64,
                Special::Laneid => (self.tid % 32) as u64,
            },
            other => return err(format!("value expected, found {other:?}")),
        })
    }

    /// The address an operand names, in the space the opcode says (`op[1]`).
    pub(super) fn address(
        &self,
        t: &Thread,
        o: &Operand,
        space: &str,
    ) -> Result<(Base, u64), EmuError> {
        let Operand::Mem(base, off) = o else {
            return err(format!("address expected, found {o:?}"));
        };
        let at = match base {
            Base::Param(i) => return Ok((Base::Param(*i), 0)),
            Base::Reg(r) => t.regs[*r].wrapping_add(*off as u64),
            Base::Shared(a) => a.wrapping_add(*off as u64),
            Base::Abs => *off as u64,
        };
        Ok(match space {
            "shared" => (Base::Shared(0), at),
            "param" => return err("parameter loads take a parameter name"),
            _ => (Base::Abs, at),
        })
    }

    /// An error where `ins` (not a `wgmma`) writes a register a `wgmma` in flight reads or
    /// writes, or reads one it writes: on the hardware its value is undefined until the
    /// `wgmma.wait_group` that retires that `wgmma`.
    fn not_in_flight(&self, t: &Thread, ins: &Instr) -> Result<(), EmuError> {
        let flags = |r: &usize| t.in_flight[*r];
        if ins.reads.iter().any(|r| flags(r) & ASYNC_WRITES != 0)
            || ins.writes.iter().any(|r| flags(r) != 0)
        {
            return err(format!(
                "{}: `{}` touches a register of a wgmma still in flight (before its wgmma.wait_group)",
                self.f.name, ins.line
            ));
        }
        Ok(())
    }

    /// The thread ends: an error with a `wgmma` of its still in flight.
    fn leave(&self, t: &mut Thread) -> Result<(), EmuError> {
        if self.f.issues_wgmma && t.in_flight.iter().any(|&f| f != 0) {
            return err(format!(
                "{}: thread {} ends with a wgmma in flight (no wgmma.wait_group retired it)",
                self.f.name, self.tid
            ));
        }
        t.wait = Wait::Done;
        Ok(())
    }

    /// Runs until the thread must wait or ends; returns instructions executed.
    pub(super) fn run_thread(
        &self,
        t: &mut Thread,
        memory: &mut Memory,
        shared: &mut SharedMemory,
    ) -> Result<u64, EmuError> {
        let mut executed = 0;
        loop {
            let Some(ins) = self.f.code.get(t.pc) else {
                self.leave(t)?;
                return Ok(executed);
            };
            executed += 1;
            if executed > 50_000_000 {
                return err(format!("{}: thread {} runs away", self.f.name, self.tid));
            }
            if let Some(c) = &mut t.clock {
                // Where the latency model places it (`timing::Clock`).
                self.now.set(c.issue(ins));
                self.memory_latency.set(None);
            }
            if let Some((neg, p)) = ins.guard {
                if (t.regs[p] != 0) == neg {
                    t.pc += 1;
                    continue;
                }
            }
            if self.f.issues_wgmma && ins.op[0] != "wgmma" {
                self.not_in_flight(t, ins)?;
            }
            match ins.op[0].as_str() {
                "ret" | "exit" => {
                    self.leave(t)?;
                    return Ok(executed);
                }
                "bra" => {
                    let Operand::Label(l) = ins.args[0] else {
                        return err(format!("`{}`: label expected", ins.line));
                    };
                    if let Some(c) = &mut t.clock {
                        c.boundary(self.now.get());
                    }
                    t.pc = l;
                    continue;
                }
                // Warp-collective: the whole warp meets at the instruction (as at a shuffle).
                "shfl" | "mma" | "ldmatrix" => {
                    t.wait = Wait::Shfl;
                    return Ok(executed);
                }
                "bar" => {
                    t.wait = Wait::Bar;
                    return Ok(executed);
                }
                // Warpgroup-collective: the four warps meet at it. `mma_async` computes its
                // result when issued, but its registers and shared rows stay in flight (no
                // other instruction may touch them) until a `wait_group` retires its group.
                "wgmma" => match ins.op.get(1).map(String::as_str) {
                    Some("mma_async" | "commit_group" | "wait_group") => {
                        t.wait = Wait::Group;
                        return Ok(executed);
                    }
                    // Registers written before it may be read by the `wgmma`s after it.
                    Some("fence") => t.unfenced.fill(false),
                    _ => return err(format!("`{}`: unknown wgmma", ins.line)),
                },
                "fence" if ins.op.get(1).map(String::as_str) == Some("proxy") => {
                    if ins.op.get(2).map(String::as_str) != Some("async") {
                        return err(format!("`{}`: only fence.proxy.async", ins.line));
                    }
                    shared.fence_proxy_async(self.who().thread);
                }
                // A fence of gpu (or system) scope: orders this thread's accesses before and
                // after it for other blocks (`sync.rs`); it waits for an L2 round trip.
                "fence" | "membar" => {
                    let scope = ins.op.last().map(String::as_str);
                    if !matches!(scope, Some("gpu" | "sys" | "gl")) {
                        return err(format!("`{}`: only gpu- or system-scope fences", ins.line));
                    }
                    self.sync.borrow_mut().fence();
                    if let (Some(timing), Some(c)) = (&memory.timing, &mut t.clock) {
                        c.boundary(self.now.get() + timing.lat.l2);
                    }
                }
                // Launches are sequential here, so waiting for earlier kernels is immediate;
                // what it orders is checked by loads and stores (`LoadKind`).
                "griddepcontrol" => {
                    match ins.op.get(1).map(String::as_str) {
                        Some("wait") => t.waited = true,
                        Some("launch_dependents") => {}
                        _ => return err(format!("`{}`: unknown griddepcontrol", ins.line)),
                    }
                    t.pc += 1;
                    continue;
                }
                _ => {
                    // Memory instructions, where transactions are counted (`requests.rs`).
                    let counted = shared.requests.is_some()
                        && ins.op[0] != "prefetch"
                        && ins
                            .op
                            .get(1)
                            .is_some_and(|s| s == "shared" || s == "global");
                    if let Some(rec) = shared.requests.as_mut().filter(|_| counted) {
                        rec.begin(self.tid, t.pc);
                    }
                    self.step(ins, t, memory, shared)
                        .map_err(|e| EmuError(format!("{}: `{}`: {e}", self.f.name, ins.line)))?;
                    if let Some(rec) = shared.requests.as_mut().filter(|_| counted) {
                        rec.end();
                    }
                    if let (Some(timing), Some(c)) = (&memory.timing, &mut t.clock) {
                        let lat = self
                            .memory_latency
                            .get()
                            .unwrap_or_else(|| latency(&timing.lat, &ins.op));
                        c.complete(ins, self.now.get(), lat);
                    }
                }
            }
            t.pc += 1;
        }
    }

    /// A kernel's load of `size` bytes at `addr`.
    pub(super) fn load(
        &self,
        base: &Base,
        addr: u64,
        size: usize,
        memory: &mut Memory,
        shared: &mut SharedMemory,
        kind: LoadKind,
    ) -> Result<u64, EmuError> {
        let bytes: &[u8] = match base {
            Base::Param(i) => {
                return Ok(self.launch.params[*i]);
            }
            Base::Shared(_) => shared.read(addr, size, self.who())?,
            _ => {
                if let LoadKind::Read { waited, nc } = kind {
                    self.global_access(memory, addr, size, Touch::Read { nc }, waited)?;
                }
                shared.count_global(addr, size);
                if let Some(l) = memory.load_latency(addr, self.now.get()) {
                    let longest = self.memory_latency.get().map_or(l, |m| m.max(l));
                    self.memory_latency.set(Some(longest));
                }
                memory.read(addr, size)?
            }
        };
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(v))
    }

    /// A kernel's store of `bytes` at `addr`.
    pub(super) fn store(
        &self,
        base: &Base,
        addr: u64,
        bytes: &[u8],
        memory: &mut Memory,
        shared: &mut SharedMemory,
        waited: bool,
    ) -> Result<(), EmuError> {
        let size = bytes.len();
        match base {
            Base::Shared(_) => shared.write(addr, bytes, self.who()),
            Base::Param(_) => err("store to a parameter"),
            _ => {
                self.global_access(memory, addr, size, Touch::Write, waited)?;
                shared.count_global(addr, size);
                memory.write_bytes(addr, bytes)
            }
        }
    }

    pub(super) fn step(
        &self,
        ins: &Instr,
        t: &mut Thread,
        memory: &mut Memory,
        shared: &mut SharedMemory,
    ) -> Result<(), EmuError> {
        let op = Op(&ins.op);
        let ty = op.last();
        let size = match ty {
            "u8" | "s8" | "b8" => 1,
            "u16" | "s16" | "b16" | "f16" | "bf16" => 2,
            "u64" | "s64" | "b64" | "f64" => 8,
            _ => 4,
        };
        let dst = |t: &mut Thread, v: u64| -> Result<(), EmuError> {
            match &ins.args[0] {
                Operand::Reg(r) => {
                    t.set(*r, v);
                    Ok(())
                }
                other => err(format!("register destination expected, found {other:?}")),
            }
        };
        let arg = |t: &Thread, i: usize| self.value(t, &ins.args[i]);
        // Float operands widened to f64; results rounded back to the instruction's type (for
        // +, -, ×, ÷ and sqrt on f32 values this rounds exactly as f32 hardware does).
        let fa = |t: &Thread, i: usize| {
            arg(t, i).map(|v| {
                if ty == "f64" {
                    f64::from_bits(v)
                } else {
                    f32_of(v) as f64
                }
            })
        };
        let fr = |v: f64| {
            if ty == "f64" {
                v.to_bits()
            } else {
                bits_f32(v as f32)
            }
        };
        let mask = |v: u64| if size == 8 { v } else { v & 0xFFFF_FFFF };
        let signed = |v: u64| -> i64 {
            if size == 8 {
                v as i64
            } else {
                v as u32 as i32 as i64
            }
        };
        let is_float = ty == "f32" || ty == "f64";
        match op.at(0) {
            "ld" => {
                let vec = op.vector_width();
                let (base, addr) = self.address(t, &ins.args[1], op.at(1))?;
                aligned(addr, size * vec.unwrap_or(1))?;
                match (&ins.args[0], vec) {
                    (Operand::Vec(regs), Some(n)) if regs.len() == n => {
                        for (k, r) in regs.iter().enumerate() {
                            let at = addr + (k * size) as u64;
                            let kind = LoadKind::Read {
                                waited: t.waited,
                                nc: op.has("nc"),
                            };
                            let v = self.load(&base, at, size, memory, shared, kind)?;
                            t.set(*r, v);
                        }
                    }
                    (Operand::Reg(r), None) => {
                        let kind = LoadKind::Read {
                            waited: t.waited,
                            nc: op.has("nc"),
                        };
                        let mut v = self.load(&base, addr, size, memory, shared, kind)?;
                        if ty.starts_with('s') && size < 8 {
                            v = (v as i64).wrapping_shl(64 - 8 * size as u32) as u64;
                            v = ((v as i64) >> (64 - 8 * size as u32)) as u64;
                        }
                        t.set(*r, v);
                    }
                    _ => return err("vector load shape"),
                }
            }
            "st" => {
                let vec = op.vector_width();
                let (base, addr) = self.address(t, &ins.args[0], op.at(1))?;
                aligned(addr, size * vec.unwrap_or(1))?;
                match (&ins.args[1], vec) {
                    (Operand::Vec(regs), Some(n)) if regs.len() == n => {
                        for (k, r) in regs.iter().enumerate() {
                            let (v, at) = (t.regs[*r].to_le_bytes(), addr + (k * size) as u64);
                            self.store(&base, at, &v[..size], memory, shared, t.waited)?;
                        }
                    }
                    (o, None) => {
                        let v = self.value(t, o)?.to_le_bytes();
                        self.store(&base, addr, &v[..size], memory, shared, t.waited)?;
                    }
                    _ => return err("vector store shape"),
                }
            }
            // Atomic integer adds, and `atom.inc.u32` on global memory (`atom` returns the
            // old value, `red` nothing). A global one may release the block's accesses to
            // other blocks and carries theirs to this thread (`sync.rs`).
            "atom" | "red" => {
                let first = usize::from(op.at(0) == "atom");
                let (base, addr) = self.address(t, &ins.args[first], op.at(1))?;
                aligned(addr, size)?;
                let value = arg(t, first + 1)?;
                let atomic = if op.has("add") && matches!(ty, "u32" | "u64" | "s32") {
                    AtomicOp::Add(value)
                } else if op.has("inc") && ty == "u32" {
                    AtomicOp::Inc(value as u32)
                } else {
                    return err("only integer atomic adds and atom.inc.u32 are modelled");
                };
                let old = match (base, atomic) {
                    (Base::Shared(_), AtomicOp::Add(value)) => {
                        shared.atomic_add(addr, size, value, self.who())?
                    }
                    (Base::Shared(_), _) => return err("only adds on shared memory"),
                    (Base::Param(_), _) => return err("atomic on a parameter"),
                    _ => {
                        shared.count_global(addr, size);
                        let mut sync = self.sync.borrow_mut();
                        let ThreadSync {
                            acquired, pending, ..
                        } = &mut *sync;
                        let by = self.by(acquired, t.waited);
                        let release = self.block_sync.clean;
                        let old = memory.atomic(addr, size, atomic, by, release, pending)?;
                        sync.touch();
                        old
                    }
                };
                if first == 1 {
                    dst(t, mask(old))?;
                }
            }
            // A hint with no effect on results; its address must still be one the kernel may
            // read (the hardware would fetch from it).
            "prefetch" => {
                let (base, addr) = self.address(t, &ins.args[0], op.at(1))?;
                self.load(&base, addr, 1, memory, shared, LoadKind::Prefetch)?;
            }
            "cvta" => dst(t, arg(t, 1)?)?,
            "mov" => dst(t, mask(arg(t, 1)?))?,
            "selp" => {
                let p = arg(t, 3)? != 0;
                dst(t, if p { arg(t, 1)? } else { arg(t, 2)? })?
            }
            "setp" => {
                let cmp = op.at(1);
                let (a, b) = (arg(t, 1)?, arg(t, 2)?);
                // Unsigned comparisons also go by their own names (lo, ls, hi, hs).
                let cmp = match cmp {
                    "lo" => "lt",
                    "ls" => "le",
                    "hi" => "gt",
                    "hs" => "ge",
                    c => c,
                };
                let r = if is_float {
                    // Ordered comparisons are false where either side is NaN (`ne` too, unlike
                    // Rust's `!=`); the unordered ones (`ltu`, `geu`, …) true.
                    let (x, y) = (fa(t, 1)?, fa(t, 2)?);
                    let nan = x.is_nan() || y.is_nan();
                    match cmp.strip_suffix('u').filter(|c| c.len() == 2) {
                        Some(ordered) => compare(ordered, x, y).map(|r| r || nan),
                        None => compare(cmp, x, y).map(|r| r && !nan),
                    }
                } else if ty.starts_with('s') {
                    compare(cmp, signed(a), signed(b))
                } else {
                    compare(cmp, mask(a), mask(b))
                };
                let Some(r) = r else {
                    return err(format!("setp .{cmp}"));
                };
                // `setp.CMP.BOOL.type d, a, b, c`: the comparison combined with predicate c.
                let r = match (op.len(), op.at(2)) {
                    (3, _) => r,
                    (4, "and") => r && arg(t, 3)? != 0,
                    (4, "or") => r || arg(t, 3)? != 0,
                    (4, "xor") => r != (arg(t, 3)? != 0),
                    _ => return err(format!("`{}`: unsupported setp form", ins.line)),
                };
                dst(t, r as u64)?
            }
            // cvt.rn.bf16x2.f32 d, a, b: d's upper half is a, its lower half b; f16x2 alike.
            "cvt" if op.has("bf16x2") || op.has("f16x2") => {
                let narrow = if op.has("f16x2") {
                    f32_to_f16
                } else {
                    f32_to_bf16
                };
                let hi = narrow(fa(t, 1)? as f32) as u64;
                let lo = narrow(fa(t, 2)? as f32) as u64;
                dst(t, (hi << 16) | lo)?
            }
            "cvt" => {
                // cvt[.rn|.rzi|.rmi|.rpi|.rni].DST.SRC
                let (dt, st) = (op.at(op.len() - 2), op.last());
                let v = arg(t, 1)?;
                // Integer to integer: truncated or extended, never through a float.
                let int = |x: &str| matches!(x, "u32" | "s32" | "u64" | "s64");
                if int(dt) && int(st) {
                    let wide = match st {
                        "s32" => v as u32 as i32 as i64 as u64,
                        "u32" => v & 0xFFFF_FFFF,
                        _ => v,
                    };
                    let out = if dt.ends_with("32") {
                        wide & 0xFFFF_FFFF
                    } else {
                        wide
                    };
                    return dst(t, out);
                }
                let as_f64 = match st {
                    "f32" => f32_of(v) as f64,
                    "f64" => f64::from_bits(v),
                    "bf16" => bf16_to_f32(v as u16) as f64,
                    "u32" => v as u32 as f64,
                    "s32" => v as u32 as i32 as f64,
                    "u64" => v as f64,
                    "s64" => v as i64 as f64,
                    _ => return err(format!("cvt from .{st}")),
                };
                let rounded = if op.has("rzi") {
                    as_f64.trunc()
                } else if op.has("rmi") {
                    as_f64.floor()
                } else if op.has("rpi") {
                    as_f64.ceil()
                } else if op.has("rni") {
                    as_f64.round_ties_even()
                } else {
                    as_f64
                };
                let out = match dt {
                    "f32" => bits_f32(rounded as f32),
                    "f64" => rounded.to_bits(),
                    "bf16" => f32_to_bf16(rounded as f32) as u64,
                    "u32" => (rounded.max(0.0) as u64) & 0xFFFF_FFFF,
                    "s32" => (rounded as i64 as i32 as u32) as u64,
                    "u64" if st == "u32" => v & 0xFFFF_FFFF,
                    "u64" | "s64" if st == "s32" => v as u32 as i32 as i64 as u64,
                    "u64" => rounded as u64,
                    "s64" => rounded as i64 as u64,
                    _ => return err(format!("cvt to .{dt}")),
                };
                dst(t, out)?
            }
            "add" | "sub" | "mul" | "div" | "min" | "max" if is_float => {
                let (a, b) = (fa(t, 1)?, fa(t, 2)?);
                let r = match op.at(0) {
                    "add" => a + b,
                    "sub" => a - b,
                    "mul" => a * b,
                    "div" => a / b,
                    "min" => a.min(b),
                    _ => a.max(b),
                };
                dst(t, fr(r))?
            }
            "fma" | "mad" if is_float => {
                let r = fa(t, 1)?.mul_add(fa(t, 2)?, fa(t, 3)?);
                dst(t, fr(r))?
            }
            "neg" | "abs" | "sqrt" | "rsqrt" | "rcp" | "ex2" | "lg2" | "tanh" | "sin" | "cos"
                if is_float =>
            {
                let a = fa(t, 1)?;
                let r = match op.at(0) {
                    "neg" => -a,
                    "abs" => a.abs(),
                    "sqrt" => a.sqrt(),
                    "rsqrt" => 1.0 / a.sqrt(),
                    "rcp" => 1.0 / a,
                    "ex2" => a.exp2(),
                    "lg2" => a.log2(),
                    "tanh" => a.tanh(),
                    "sin" => a.sin(),
                    _ => a.cos(),
                };
                dst(t, fr(r))?
            }
            "add" | "sub" | "min" | "max" | "and" | "or" | "xor" | "shl" | "shr" | "rem"
            | "div" => {
                let (a, b) = (arg(t, 1)?, arg(t, 2)?);
                let sgn = ty.starts_with('s');
                let r = match op.at(0) {
                    "add" => a.wrapping_add(b),
                    "sub" => a.wrapping_sub(b),
                    "min" if sgn => signed(a).min(signed(b)) as u64,
                    "max" if sgn => signed(a).max(signed(b)) as u64,
                    "min" => mask(a).min(mask(b)),
                    "max" => mask(a).max(mask(b)),
                    "and" => a & b,
                    "or" => a | b,
                    "xor" => a ^ b,
                    "shl" => {
                        if b >= 8 * size as u64 {
                            0
                        } else {
                            a << b
                        }
                    }
                    "shr" if sgn => (signed(a) >> b.min(63)) as u64,
                    "shr" => {
                        if b >= 8 * size as u64 {
                            0
                        } else {
                            mask(a) >> b
                        }
                    }
                    "div" | "rem" if mask(b) == 0 => return err("integer division by zero"),
                    "div" if sgn => (signed(a) / signed(b)) as u64,
                    "rem" if sgn => (signed(a) % signed(b)) as u64,
                    "div" => mask(a) / mask(b),
                    _ => mask(a) % mask(b),
                };
                dst(t, mask(r))?
            }
            "not" => dst(t, mask(!arg(t, 1)?))?,
            "mul" => {
                let (a, b) = (arg(t, 1)?, arg(t, 2)?);
                let r = match op.at(1) {
                    "wide" if ty.starts_with('s') => (signed(a) * signed(b)) as u64,
                    "wide" => mask(a) * mask(b),
                    "lo" => mask(a.wrapping_mul(b)),
                    "hi" if size == 8 => ((a as u128 * b as u128) >> 64) as u64,
                    "hi" => (mask(a) * mask(b)) >> 32,
                    other => return err(format!("mul.{other}")),
                };
                dst(t, r)?
            }
            "mad" => {
                let (a, b, c) = (arg(t, 1)?, arg(t, 2)?, arg(t, 3)?);
                let r = match op.at(1) {
                    "lo" => mask(a.wrapping_mul(b).wrapping_add(c)),
                    "wide" => mask(a).wrapping_mul(mask(b)).wrapping_add(c),
                    other => return err(format!("mad.{other}")),
                };
                dst(t, r)?
            }
            other => return err(format!("instruction `{other}` is not emulated")),
        }
        Ok(())
    }
}
