//! A small typed PTX writer: virtual registers by class, numbered as they are created and
//! declared at the top of the kernel when it is finished.

use std::fmt::Write as _;

/// PTX register classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Pred,
    B32,
    B64,
    F32,
    F64,
}

impl Class {
    fn prefix(self) -> &'static str {
        match self {
            Class::Pred => "p",
            Class::B32 => "r",
            Class::B64 => "rd",
            Class::F32 => "f",
            Class::F64 => "fd",
        }
    }

    fn decl(self) -> &'static str {
        match self {
            Class::Pred => ".pred",
            Class::B32 => ".b32",
            Class::B64 => ".b64",
            Class::F32 => ".f32",
            Class::F64 => ".f64",
        }
    }
}

/// A register: its class and number, printed `%f3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reg(Class, u32);

impl std::fmt::Display for Reg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "%{}{}", self.0.prefix(), self.1)
    }
}

pub struct Kernel {
    name: String,
    params: Vec<String>,
    counts: [u32; 5],
    shared: Vec<String>,
    body: String,
    labels: u32,
    /// `.maxntid` and `.minnctapersm`: see `launch_bounds`.
    bounds: Option<(u32, u32)>,
    /// Whether the body waits for earlier kernels itself (`wait_for_earlier_kernels`);
    /// otherwise `finish` puts the wait first.
    waits: bool,
}

/// The module header for sm_90 with PTX ISA 8.0 (loaded by driver 580 / CUDA 13.0).
pub const HEADER: &str = ".version 8.0\n.target sm_90\n.address_size 64\n";

impl Kernel {
    pub fn new(name: &str) -> Kernel {
        Kernel {
            name: name.to_string(),
            params: Vec::new(),
            counts: [0; 5],
            shared: Vec::new(),
            body: String::new(),
            labels: 0,
            bounds: None,
            waits: false,
        }
    }

    /// Waits until the kernels launched before this one have finished and their writes are
    /// visible (`griddepcontrol.wait`). Kernels are launched with programmatic dependent
    /// launch: each lets the next one start early (`finish` puts
    /// `griddepcontrol.launch_dependents` first), and the next one may run everything before
    /// this wait while the previous is still running. So nothing before it may write global
    /// memory or read what a kernel wrote: only weights and the host's inputs (the
    /// interpreter checks both). Without a call, the wait is the kernel's first instruction.
    /// On a launch without that attribute the wait returns at once.
    pub fn wait_for_earlier_kernels(&mut self) {
        assert!(!self.waits, "{}: one wait per kernel", self.name);
        self.waits = true;
        self.ins("griddepcontrol.wait;");
    }

    /// Tells ptxas the kernel runs in blocks of at most `threads` and should fit `blocks` of
    /// them on one SM (`.maxntid`, `.minnctapersm`): it then keeps registers within
    /// 65536 / (threads · blocks) per thread. A launch with more threads fails, on the
    /// hardware and in the interpreter.
    pub fn launch_bounds(&mut self, threads: u32, blocks: u32) {
        self.bounds = Some((threads, blocks));
    }

    /// The last-block-done pattern, so one launch can finish what all of its blocks computed
    /// instead of a one-block launch after it: every thread fences its global accesses so
    /// far and the block meets at a barrier; thread 0 counts the block done on the u32 at
    /// `counter` (shared by the launch's blocks, 0 before the launch: `atom.inc` wraps it
    /// back to 0 with the last block, ready for the next) and, in the last block, fences
    /// again, so every block's accesses before its count are ordered before what follows
    /// (the interpreter checks this: `emu/sync.rs`). Returns a predicate, true in every
    /// thread of the last block. Every thread of the block must reach it.
    pub fn last_block_done(&mut self, counter: Reg, tid: Reg) -> Reg {
        let flag = self.label("last_block").replace('$', "");
        self.shared(&flag, 4, 4);
        self.ins("fence.acq_rel.gpu;");
        self.ins("bar.sync 0;");
        let counted = self.label("counted");
        let others = self.reg(Class::Pred);
        self.ins(format!("setp.ne.u32 {others}, {tid}, 0;"));
        self.ins(format!("@{others} bra {counted};"));
        let bound = self.reg(Class::B32);
        self.ins(format!("mov.u32 {bound}, %nctaid.x;"));
        self.ins(format!("sub.u32 {bound}, {bound}, 1;"));
        let old = self.reg(Class::B32);
        self.ins(format!("atom.global.inc.u32 {old}, [{counter}], {bound};"));
        let last = self.reg(Class::Pred);
        self.ins(format!("setp.eq.u32 {last}, {old}, {bound};"));
        let told = self.label("told");
        self.ins(format!("@!{last} bra {told};"));
        self.ins("fence.acq_rel.gpu;");
        self.place(&told);
        let v = self.reg(Class::B32);
        self.ins(format!("selp.u32 {v}, 1, 0, {last};"));
        self.ins(format!("st.shared.u32 [{flag}], {v};"));
        self.place(&counted);
        self.ins("bar.sync 0;");
        let v = self.reg(Class::B32);
        self.ins(format!("ld.shared.u32 {v}, [{flag}];"));
        let is_last = self.reg(Class::Pred);
        self.ins(format!("setp.ne.u32 {is_last}, {v}, 0;"));
        is_last
    }

    fn index(class: Class) -> usize {
        match class {
            Class::Pred => 0,
            Class::B32 => 1,
            Class::B64 => 2,
            Class::F32 => 3,
            Class::F64 => 4,
        }
    }

    pub fn reg(&mut self, class: Class) -> Reg {
        let i = Self::index(class);
        let r = Reg(class, self.counts[i]);
        self.counts[i] += 1;
        r
    }

    /// Four fresh registers of one class (a vector load's or an MMA fragment's).
    pub fn regs4(&mut self, class: Class) -> [Reg; 4] {
        [
            self.reg(class),
            self.reg(class),
            self.reg(class),
            self.reg(class),
        ]
    }

    /// A `.u64` pointer parameter, loaded into a register.
    pub fn param_ptr(&mut self, name: &str) -> Reg {
        self.params.push(format!(".param .u64 {name}"));
        let r = self.reg(Class::B64);
        self.ins(format!("ld.param.u64 {r}, [{name}];"));
        let g = self.reg(Class::B64);
        self.ins(format!("cvta.to.global.u64 {g}, {r};"));
        g
    }

    /// A block-shared array of `bytes` bytes named `name` (`mov.u64 %rd, name;` takes its
    /// address in the shared window).
    pub fn shared(&mut self, name: &str, bytes: u32, align: u32) {
        self.shared
            .push(format!(".shared .align {align} .b8 {name}[{bytes}];"));
    }

    /// One instruction (or directive) line.
    pub fn ins(&mut self, line: impl AsRef<str>) {
        let _ = writeln!(self.body, "\t{}", line.as_ref());
    }

    pub fn label(&mut self, hint: &str) -> String {
        self.labels += 1;
        format!("${hint}_{}", self.labels)
    }

    pub fn place(&mut self, label: &str) {
        let _ = writeln!(self.body, "{label}:");
    }

    /// This thread's index in its block and the block's index in the grid.
    pub fn thread_and_block(&mut self) -> (Reg, Reg) {
        let (tid, block) = (self.reg(Class::B32), self.reg(Class::B32));
        self.ins(format!("mov.u32 {tid}, %tid.x;"));
        self.ins(format!("mov.u32 {block}, %ctaid.x;"));
        (tid, block)
    }

    /// This thread's index in the grid, for blocks of `block_size` threads.
    pub fn global_index(&mut self, block_size: u32) -> Reg {
        let (tid, block) = self.thread_and_block();
        let e = self.reg(Class::B32);
        self.ins(format!("mad.lo.u32 {e}, {block}, {block_size}, {tid};"));
        e
    }

    /// The warp of thread `tid` in its block and its lane in the warp.
    pub fn warp_and_lane(&mut self, tid: Reg) -> (Reg, Reg) {
        let (warp, lane) = (self.reg(Class::B32), self.reg(Class::B32));
        self.ins(format!("shr.u32 {warp}, {tid}, 5;"));
        self.ins(format!("and.b32 {lane}, {tid}, 31;"));
        (warp, lane)
    }

    /// Branches to `to` where `value >= bound` (unsigned).
    /// A loop over `counter` from its current value while it is below `bound`, `stride`
    /// apart: `body` for each value.
    pub fn strided(
        &mut self,
        counter: Reg,
        bound: impl std::fmt::Display,
        stride: impl std::fmt::Display,
        body: &mut dyn FnMut(&mut Kernel),
    ) {
        let (head, end) = (self.label("loop"), self.label("loop_end"));
        self.place(&head);
        self.leave_unless_below(counter, &bound, &end);
        body(self);
        self.ins(format!("add.u32 {counter}, {counter}, {stride};"));
        self.ins(format!("bra {head};"));
        self.place(&end);
    }

    /// A loop over `counter` (from its current value, while below `bound`): `step(k, many)`
    /// while the last of `many` items, `stride` apart, is below the bound (one basic block, so
    /// their loads are in flight together), then the fewer than `many` left in batches of
    /// descending powers of two, each at most once (so the rest waits on memory a few times,
    /// not once per item). `step` does the items at `counter`, `counter + stride`, … in order
    /// and advances `counter` by `n · stride`.
    pub fn unrolled(
        &mut self,
        counter: Reg,
        bound: impl std::fmt::Display,
        stride: u32,
        many: u32,
        step: &mut dyn FnMut(&mut Kernel, u32),
    ) {
        let (head, rest) = (self.label("many"), self.label("rest"));
        self.place(&head);
        let last = self.reg(Class::B32);
        self.ins(format!(
            "add.u32 {last}, {counter}, {};",
            (many - 1) * stride
        ));
        self.leave_unless_below(last, &bound, &rest);
        step(self, many);
        self.ins(format!("bra {head};"));
        self.place(&rest);
        // Fewer than `many` remain: a sum of distinct powers of two below it.
        let mut n = if many.is_power_of_two() {
            many / 2
        } else {
            1 << many.ilog2()
        };
        while n >= 1 {
            let skip = self.label("fewer");
            let last = self.reg(Class::B32);
            self.ins(format!("add.u32 {last}, {counter}, {};", (n - 1) * stride));
            self.leave_unless_below(last, &bound, &skip);
            step(self, n);
            self.place(&skip);
            n /= 2;
        }
    }

    /// Runs `body` for every index below `bound` (a register): thread t of block b takes
    /// b·`block_size` + t, then strides by the grid's threads, so a grid capped below the
    /// largest bound still covers it and a small bound leaves most threads idle at once (see
    /// `prefill::elementwise_grid`). `body` gets the index and a label that skips to the next.
    pub fn grid_stride(
        &mut self,
        block_size: u32,
        bound: Reg,
        body: &mut dyn FnMut(&mut Kernel, Reg, &str),
    ) {
        let e = self.global_index(block_size);
        let stride = self.reg(Class::B32);
        self.ins(format!("mov.u32 {stride}, %nctaid.x;"));
        self.ins(format!("mul.lo.u32 {stride}, {stride}, {block_size};"));
        let next = self.label("next");
        self.strided(e, bound, stride, &mut |k| {
            body(k, e, &next);
            k.place(&next);
        });
    }

    pub fn leave_unless_below(&mut self, value: Reg, bound: impl std::fmt::Display, to: &str) {
        let past = self.reg(Class::Pred);
        self.ins(format!("setp.ge.u32 {past}, {value}, {bound};"));
        self.ins(format!("@{past} bra {to};"));
    }

    /// A 32-bit immediate into a fresh register.
    pub fn imm_u32(&mut self, v: u32) -> Reg {
        let r = self.reg(Class::B32);
        self.ins(format!("mov.u32 {r}, {v};"));
        r
    }

    /// `value` as an f32 immediate, exactly (`0fXXXXXXXX`).
    pub fn f32_imm(value: f32) -> String {
        format!("0f{:08X}", value.to_bits())
    }

    /// `value` as an f64 immediate, exactly (`0dXXXXXXXXXXXXXXXX`).
    pub fn f64_imm(value: f64) -> String {
        format!("0d{:016X}", value.to_bits())
    }

    pub fn finish(self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            ".visible .entry {}(\n\t{}\n)",
            self.name,
            self.params.join(",\n\t")
        );
        if let Some((threads, blocks)) = self.bounds {
            let _ = writeln!(out, ".maxntid {threads}, 1, 1\n.minnctapersm {blocks}");
        }
        out.push_str("{\n");
        for class in [Class::Pred, Class::B32, Class::B64, Class::F32, Class::F64] {
            let n = self.counts[Self::index(class)];
            if n > 0 {
                let _ = writeln!(out, "\t.reg {} %{}<{}>;", class.decl(), class.prefix(), n);
            }
        }
        for decl in &self.shared {
            let _ = writeln!(out, "\t{decl}");
        }
        // The next kernel may be scheduled now: its blocks take SMs as this one's finish, and
        // run up to their own wait.
        out.push_str("\tgriddepcontrol.launch_dependents;\n");
        if !self.waits {
            out.push_str("\tgriddepcontrol.wait;\n");
        }
        out.push_str(&self.body);
        out.push_str("\tret;\n}\n");
        out
    }
}
