//! A PTX interpreter for the subset of PTX this backend writes, so every kernel's numbers are
//! checked on machines without a GPU (CI included) before a GPU ever runs it.
//!
//! Each thread runs on its own until it reaches a `shfl.sync`, a `bar.sync` or its end; a
//! shuffle executes once every lane of the warp waits at the same one (a lane that has left or
//! waits elsewhere is an error: on hardware a full-mask shuffle would be undefined), a barrier
//! releases once every live thread of the block waits at it. Approximate instructions
//! (`ex2.approx`, `rsqrt.approx`, …) are computed exactly in f32, so tests compare against a
//! tolerance that covers the hardware's documented error.

use std::collections::HashMap;

/// A failure to parse or run a kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct EmuError(pub String);

impl std::fmt::Display for EmuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EmuError {}

fn err<T>(m: impl Into<String>) -> Result<T, EmuError> {
    Err(EmuError(m.into()))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Special {
    Tid,
    Ntid,
    Ctaid,
    Nctaid,
    Laneid,
}

#[derive(Clone, Debug, PartialEq)]
enum Base {
    Reg(usize),
    Param(usize),
    Shared(u64),
    Abs,
}

#[derive(Clone, Debug, PartialEq)]
enum Operand {
    Reg(usize),
    Imm(u64),
    Special(Special),
    Mem(Base, i64),
    Vec(Vec<usize>),
    Label(usize),
    /// A `.shared` variable's address.
    Symbol(u64),
}

#[derive(Clone, Debug)]
struct Instr {
    guard: Option<(bool, usize)>,
    /// The opcode split at dots: `ld.global.nc.v4.u32` → `["ld","global","nc","v4","u32"]`.
    op: Vec<String>,
    args: Vec<Operand>,
    line: String,
}

/// One parsed `.entry`.
#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    params: Vec<String>,
    registers: usize,
    shared_bytes: u64,
    /// `.maxntid`: the most threads a block of this kernel may have.
    max_threads: Option<u32>,
    code: Vec<Instr>,
}

/// A parsed PTX module.
#[derive(Clone, Debug)]
pub struct Module {
    functions: Vec<Function>,
}

fn strip_comment(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Splits operands at top-level commas (not inside `{}` or `[]`).
fn split_operands(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '{' | '[' => {
                depth += 1;
                cur.push(c)
            }
            '}' | ']' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

struct Parser {
    regs: HashMap<String, usize>,
    labels: HashMap<String, usize>,
    params: Vec<String>,
    shared: HashMap<String, u64>,
}

impl Parser {
    fn reg(&mut self, name: &str) -> usize {
        let n = self.regs.len();
        *self.regs.entry(name.to_string()).or_insert(n)
    }

    fn int(s: &str) -> Option<i64> {
        let (neg, body) = match s.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, s),
        };
        let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            i64::from_str_radix(h, 16).ok()?
        } else {
            body.parse::<i64>().ok()?
        };
        Some(if neg { -v } else { v })
    }

    fn operand(&mut self, s: &str) -> Result<Operand, EmuError> {
        let s = s.trim();
        if let Some(inner) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
            let regs = inner
                .split(',')
                .map(|r| self.reg(r.trim()))
                .collect::<Vec<_>>();
            return Ok(Operand::Vec(regs));
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            let (base, off) = match inner.find('+') {
                Some(i) => (
                    inner[..i].trim(),
                    Self::int(inner[i + 1..].trim())
                        .ok_or_else(|| EmuError(format!("bad offset in {s}")))?,
                ),
                None => (inner.trim(), 0),
            };
            let base = if base.starts_with('%') {
                Base::Reg(self.reg(base))
            } else if let Some(i) = self.params.iter().position(|p| p == base) {
                Base::Param(i)
            } else if let Some(&a) = self.shared.get(base) {
                Base::Shared(a)
            } else if let Some(v) = Self::int(base) {
                return Ok(Operand::Mem(Base::Abs, v + off));
            } else {
                return err(format!("unknown address `{base}`"));
            };
            return Ok(Operand::Mem(base, off));
        }
        let special = match s {
            "%tid.x" => Some(Special::Tid),
            "%ntid.x" => Some(Special::Ntid),
            "%ctaid.x" => Some(Special::Ctaid),
            "%nctaid.x" => Some(Special::Nctaid),
            "%laneid" => Some(Special::Laneid),
            _ => None,
        };
        if let Some(sp) = special {
            return Ok(Operand::Special(sp));
        }
        if s.starts_with('%') {
            return Ok(Operand::Reg(self.reg(s)));
        }
        if let Some(hex) = s.strip_prefix("0d").or_else(|| s.strip_prefix("0D")) {
            let bits =
                u64::from_str_radix(hex, 16).map_err(|_| EmuError(format!("bad double {s}")))?;
            return Ok(Operand::Imm(bits));
        }
        if let Some(hex) = s.strip_prefix("0f").or_else(|| s.strip_prefix("0F")) {
            let bits =
                u32::from_str_radix(hex, 16).map_err(|_| EmuError(format!("bad float {s}")))?;
            return Ok(Operand::Imm(bits as u64));
        }
        if let Some(v) = Self::int(s) {
            return Ok(Operand::Imm(v as u64));
        }
        if let Some(&l) = self.labels.get(s) {
            return Ok(Operand::Label(l));
        }
        if let Some(&a) = self.shared.get(s) {
            return Ok(Operand::Symbol(a));
        }
        err(format!("cannot read operand `{s}`"))
    }
}

impl Module {
    /// Parses the module text this backend writes.
    pub fn parse(text: &str) -> Result<Module, EmuError> {
        let mut functions = Vec::new();
        let mut lines = text.lines().map(strip_comment).peekable();
        while let Some(line) = lines.next() {
            let Some(rest) = line.trim().strip_prefix(".visible .entry ") else {
                continue;
            };
            let name = rest.split('(').next().unwrap_or("").trim().to_string();
            // Parameters until `)`, then the body between `{` and the matching `}`.
            let mut params = Vec::new();
            for l in lines.by_ref() {
                let l = l.trim();
                if l == ")" {
                    break;
                }
                if let Some(p) = l.trim_end_matches(',').split_whitespace().last() {
                    if l.starts_with(".param") {
                        params.push(p.to_string());
                    }
                }
            }
            let mut body = Vec::new();
            let mut depth = 0;
            let mut max_threads = None;
            for l in lines.by_ref() {
                let t = l.trim();
                if depth == 0 && t != "{" {
                    // Performance directives between the parameters and the body.
                    if let Some(n) = t.strip_prefix(".maxntid") {
                        let n = n.split(',').next().unwrap_or("").trim();
                        max_threads = Some(
                            n.parse::<u32>()
                                .map_err(|_| EmuError(format!("{name}: cannot read `{t}`")))?,
                        );
                    }
                    continue;
                }
                if t == "{" {
                    depth += 1;
                    if depth == 1 {
                        continue;
                    }
                }
                if t == "}" {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                body.push(t.to_string());
            }
            let mut f = Self::function(name, params, &body)?;
            f.max_threads = max_threads;
            functions.push(f);
        }
        Ok(Module { functions })
    }

    fn function(name: String, params: Vec<String>, body: &[String]) -> Result<Function, EmuError> {
        let mut p = Parser {
            regs: HashMap::new(),
            labels: HashMap::new(),
            params: params.clone(),
            shared: HashMap::new(),
        };
        let mut shared_bytes = 0u64;
        // First pass: labels, shared variables, and the statements.
        let mut statements = Vec::new();
        for l in body {
            if l.is_empty() || l.starts_with(".reg") {
                continue;
            }
            if let Some(decl) = l.strip_prefix(".shared") {
                // `.shared .align 16 .b8 name[bytes];`
                let words: Vec<&str> = decl.trim_end_matches(';').split_whitespace().collect();
                let align = words
                    .windows(2)
                    .find(|w| w[0] == ".align")
                    .and_then(|w| w[1].parse::<u64>().ok())
                    .unwrap_or(4);
                let last = words.last().copied().unwrap_or("");
                let (var, bytes) = last
                    .split_once('[')
                    .map(|(v, n)| (v, n.trim_end_matches(']').parse::<u64>().unwrap_or(0)))
                    .ok_or_else(|| EmuError(format!("cannot read `{l}`")))?;
                shared_bytes = shared_bytes.div_ceil(align) * align;
                p.shared.insert(var.to_string(), shared_bytes);
                shared_bytes += bytes;
                continue;
            }
            if let Some(label) = l.strip_suffix(':') {
                p.labels.insert(label.to_string(), statements.len());
                continue;
            }
            statements.push(l.trim_end_matches(';').trim().to_string());
        }
        let mut code = Vec::new();
        for s in statements {
            let (guard, rest) = match s.strip_prefix('@') {
                Some(r) => {
                    let (g, rest) = r
                        .split_once(char::is_whitespace)
                        .ok_or_else(|| EmuError(format!("cannot read `{s}`")))?;
                    let (neg, g) = match g.strip_prefix('!') {
                        Some(g) => (true, g),
                        None => (false, g),
                    };
                    (Some((neg, p.reg(g))), rest.trim().to_string())
                }
                None => (None, s.clone()),
            };
            let (op, operands) = match rest.split_once(char::is_whitespace) {
                Some((o, a)) => (o.to_string(), a.to_string()),
                None => (rest.clone(), String::new()),
            };
            let args = split_operands(&operands)
                .iter()
                .map(|a| p.operand(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| EmuError(format!("{name}: `{s}`: {e}")))?;
            code.push(Instr {
                guard,
                op: op.split('.').map(str::to_string).collect(),
                args,
                line: s,
            });
        }
        Ok(Function {
            name,
            params,
            registers: p.regs.len(),
            shared_bytes,
            max_threads: None,
            code,
        })
    }

    pub fn function_named(&self, name: &str) -> Result<&Function, EmuError> {
        self.functions
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| EmuError(format!("no kernel `{name}` in the module")))
    }
}

impl Function {
    /// Parameters the kernel takes (each a 64-bit value: every parameter this backend writes
    /// is a device address).
    pub fn param_count(&self) -> usize {
        self.params.len()
    }

    /// Whether the kernel waits for earlier kernels (`griddepcontrol.wait`), so it may be
    /// launched to start before they end (programmatic dependent launch). Without a wait its
    /// threads count as past it from the start: such a kernel must be launched plainly.
    pub fn waits_for_earlier_kernels(&self) -> bool {
        self.code
            .iter()
            .any(|i| i.op.len() == 2 && i.op[0] == "griddepcontrol" && i.op[1] == "wait")
    }
}

/// Who touched each 4-byte word of a memory during one launch (global memory) or one block
/// (shared memory), to find data races: two threads touching the same word, at least one
/// writing, with no barrier of a block they share between them. Such a program reads
/// whatever the hardware's scheduling gives it, while this interpreter runs threads in one
/// fixed order and would compute one plausible answer. Accesses are at least word-sized
/// except 16-bit loads, which mark their word (no kernel stores less than a word).
#[derive(Default)]
struct Shadow {
    /// The launch an entry belongs to; older entries count as untouched (no clearing).
    stamp: Vec<u32>,
    /// Thread (1 + block · block size + tid) of the last write, 0 if none.
    writer: Vec<u32>,
    write_epoch: Vec<u32>,
    /// Thread of the reads, 0 if none, `MANY` if several threads read.
    reader: Vec<u32>,
    /// The readers' block, `MANY` if they span blocks; the latest read's epoch.
    read_block: Vec<u32>,
    read_epoch: Vec<u32>,
    /// Read through the non-coherent cache (`ld.global.nc`) in this launch: a later write
    /// would leave the cached line stale. (An `.nc` read of what a kernel wrote, this launch
    /// or before, is refused by `Memory::access`.)
    nc_read: Vec<bool>,
}

const MANY: u32 = u32::MAX;

/// One thread's access: its launch-wide id (1-based), block, and epoch (barriers its block
/// has passed).
#[derive(Clone, Copy)]
struct Access {
    thread: u32,
    block: u32,
    epoch: u32,
    block_size: u32,
}

impl Access {
    /// Whether this access is ordered after another thread's access (or is that thread's):
    /// same block, an earlier epoch.
    fn after(&self, thread: u32, block: u32, epoch: u32) -> bool {
        thread == 0 || thread == self.thread || (block == self.block && epoch < self.epoch)
    }

    fn describe(thread: u32, block_size: u32) -> String {
        let t = thread - 1;
        format!("block {} thread {}", t / block_size, t % block_size)
    }
}

impl Shadow {
    /// Forgets every entry (stamps restart).
    fn reset(&mut self) {
        self.stamp.fill(0);
    }

    /// Makes room for `words` words.
    fn grow(&mut self, words: usize) {
        if words <= self.stamp.len() {
            return;
        }
        self.nc_read.resize(words, false);
        for v in [
            &mut self.stamp,
            &mut self.writer,
            &mut self.write_epoch,
            &mut self.reader,
            &mut self.read_block,
            &mut self.read_epoch,
        ] {
            v.resize(words, 0);
        }
    }

    /// Records an access to bytes `[at, at + len)` (offsets in this memory) in launch
    /// `stamp`, a read through the non-coherent cache if `nc`; an error names the race.
    fn access(
        &mut self,
        stamp: u32,
        at: usize,
        len: usize,
        a: Access,
        write: bool,
        nc: bool,
    ) -> Result<(), EmuError> {
        let words = at / 4..(at + len).div_ceil(4);
        self.grow(words.end);
        for w in words {
            if self.stamp[w] != stamp {
                self.stamp[w] = stamp;
                self.writer[w] = 0;
                self.reader[w] = 0;
                self.nc_read[w] = false;
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
            if !a.after(writer, writer_block, self.write_epoch[w]) {
                return err(format!(
                    "data race: {} {} word {:#x}, which {} wrote with no barrier between",
                    Access::describe(a.thread, a.block_size),
                    if write { "writes" } else { "reads" },
                    4 * w,
                    Access::describe(writer, a.block_size),
                ));
            }
            let reader = self.reader[w];
            if write {
                let (block, epoch) = (self.read_block[w], self.read_epoch[w]);
                let ordered = reader == 0
                    || reader == a.thread
                    || (reader == MANY && block == a.block && epoch < a.epoch)
                    || (reader != MANY && a.after(reader, block, epoch));
                if !ordered {
                    let who = if reader == MANY {
                        "other threads".to_string()
                    } else {
                        Access::describe(reader, a.block_size)
                    };
                    return err(format!(
                        "data race: {} writes word {:#x}, which {who} read with no barrier between",
                        Access::describe(a.thread, a.block_size),
                        4 * w,
                    ));
                }
                self.writer[w] = a.thread;
                self.write_epoch[w] = a.epoch;
            } else if reader == 0 || reader == a.thread {
                self.reader[w] = a.thread;
                self.read_block[w] = a.block;
                self.read_epoch[w] = a.epoch;
            } else {
                self.reader[w] = MANY;
                if self.read_block[w] != a.block {
                    self.read_block[w] = MANY;
                }
                self.read_epoch[w] = self.read_epoch[w].max(a.epoch);
            }
        }
        Ok(())
    }
}

/// A block's shared memory and who touched it.
struct SharedMemory {
    bytes: Vec<u8>,
    shadow: Shadow,
    /// Per 16-byte unit: the thread (launch-wide id) whose generic-proxy store to it has not
    /// yet been followed by its `fence.proxy.async`, or 0. `wgmma` reads shared memory through
    /// the async proxy, which sees such stores only after that fence.
    unfenced: Vec<u32>,
    /// The units each thread has stored to since its last `fence.proxy.async`.
    unfenced_by: HashMap<u32, Vec<usize>>,
}

impl SharedMemory {
    fn range(&self, at: u64, len: usize) -> Result<std::ops::Range<usize>, EmuError> {
        let a = at as usize;
        if a.checked_add(len)
            .map_or(true, |end| end > self.bytes.len())
        {
            return err(format!("shared access at {a} out of bounds"));
        }
        Ok(a..a + len)
    }

    fn read(&mut self, at: u64, len: usize, who: Access) -> Result<&[u8], EmuError> {
        let r = self.range(at, len)?;
        self.shadow.access(1, r.start, len, who, false, false)?;
        Ok(&self.bytes[r])
    }

    fn write(&mut self, at: u64, data: &[u8], who: Access) -> Result<(), EmuError> {
        let r = self.range(at, data.len())?;
        self.shadow
            .access(1, r.start, data.len(), who, true, false)?;
        for unit in r.start / 16..=(r.end - 1) / 16 {
            if self.unfenced[unit] != who.thread {
                self.unfenced[unit] = who.thread;
                self.unfenced_by.entry(who.thread).or_default().push(unit);
            }
        }
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }

    /// `fence.proxy.async.shared::cta` by `thread`: its stores so far become visible to the
    /// async proxy.
    fn fence_proxy_async(&mut self, thread: u32) {
        for unit in self.unfenced_by.remove(&thread).unwrap_or_default() {
            if self.unfenced[unit] == thread {
                self.unfenced[unit] = 0;
            }
        }
    }

    /// A read through the async proxy (`wgmma`'s operands): as `read`, and an error where a
    /// thread's store to these bytes was not followed by its `fence.proxy.async`.
    fn read_async(&mut self, at: u64, len: usize, who: Access) -> Result<&[u8], EmuError> {
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
        }
        self.read(at, len, who)
    }
}

/// Device memory: buffers in one arena at fake addresses.
pub struct Memory {
    bytes: Vec<u8>,
    /// Who touched what during the current launch (`launch` is its stamp).
    shadow: Shadow,
    launch: u32,
    /// Words some kernel has written (ever): a kernel may not read them before its
    /// `griddepcontrol.wait`, when the kernel that writes them may still be running.
    kernel_written: Vec<bool>,
}

const BASE: u64 = 0x1000_0000;

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
            kernel_written: Vec::new(),
        }
    }

    /// A kernel's access (as opposed to the host's copies, which are not tracked).
    fn access(&mut self, addr: u64, len: usize, who: Access, op: GlobalOp) -> Result<(), EmuError> {
        let (write, waited, nc) = match op {
            GlobalOp::Read { waited, nc } => (false, waited, nc),
            GlobalOp::Write { waited } => (true, waited, false),
        };
        let r = self.range(addr, len)?;
        let words = r.start / 4..r.end.div_ceil(4);
        if self.kernel_written.len() < words.end {
            self.kernel_written
                .resize(self.bytes.len().div_ceil(4), false);
        }
        // The non-coherent cache is for data nothing writes while the kernel runs; with
        // programmatic dependent launch the kernel before may still be writing when this one
        // starts, so only weights and the host's inputs may be read through it.
        if nc && self.kernel_written[words.clone()].iter().any(|&w| w) {
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
            if self.kernel_written[words.clone()].iter().any(|&w| w) {
                return err(format!(
                    "reads global memory at {addr:#x}, which a kernel wrote, before griddepcontrol.wait"
                ));
            }
        }
        if write {
            self.kernel_written[words].fill(true);
        }
        self.shadow
            .access(self.launch, r.start, len, who, write, nc)
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

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, EmuError> {
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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Wait {
    Running,
    Shfl,
    /// At a warpgroup-collective instruction (`wgmma.mma_async`).
    Group,
    Bar,
    Done,
}

struct Thread {
    regs: Vec<u64>,
    /// Registers written (by anything but a `wgmma`) since this thread's last `wgmma.fence`:
    /// a `wgmma` reading one is undefined on the hardware, so an error here.
    unfenced: Vec<bool>,
    pc: usize,
    wait: Wait,
    /// Past `griddepcontrol.wait`: earlier kernels' writes are visible.
    waited: bool,
}

impl Thread {
    fn set(&mut self, reg: usize, v: u64) {
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
    memory.launch = memory.launch.wrapping_add(1);
    if memory.launch == 0 {
        // Stamps wrapped: forget every entry rather than mistake an old one for this launch's.
        memory.shadow.reset();
        memory.launch = 1;
    }
    let mut executed = 0u64;
    for block in 0..launch.grid {
        executed += run_block(f, launch, block, memory)?;
    }
    Ok(executed)
}

/// Whether a warp or warpgroup (`group`; a warpgroup must have all `size` threads, a warp is
/// whatever the block's last one holds) meets at the collective
/// instruction its threads wait at with `wait`: `Ok(Some(pc))` once every one waits at the same
/// one, `Ok(None)` while none waits or some still run, `Err(pc)` when the rest never will (they
/// left, or wait elsewhere).
fn meeting(group: &[Thread], wait: Wait, size: usize) -> Result<Option<usize>, usize> {
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

/// Moves every thread of a group that met past the collective instruction.
fn release(group: &mut [Thread]) {
    for t in group.iter_mut() {
        t.pc += 1;
        t.wait = Wait::Running;
    }
}

fn run_block(
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
    };
    // Barriers this block has passed: accesses in different epochs are ordered.
    let mut epoch = 0u32;
    let mut threads: Vec<Thread> = (0..n)
        .map(|_| Thread {
            regs: vec![0; f.registers],
            unfenced: vec![false; f.registers],
            pc: 0,
            wait: Wait::Running,
            waited: starts_waited,
        })
        .collect();
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
                };
                executed += ctx.run_thread(thread, memory, &mut shared)?;
            }
        }
        if threads.iter().all(|t| t.wait == Wait::Done) {
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
                    ldmatrix(&f.code[pc], warp, &mut shared, who)
                        .map_err(|e| EmuError(format!("{}: {e}", f.name)))?
                }
                _ => shuffle(&f.code[pc], warp)?,
            }
            release(warp);
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
            wgmma(&f.code[pc], group, &mut shared, who)
                .map_err(|e| EmuError(format!("{}: {e}", f.name)))?;
            release(group);
            progressed = true;
        }
        let live: Vec<&Thread> = threads.iter().filter(|t| t.wait != Wait::Done).collect();
        if !progressed && !live.is_empty() && live.iter().all(|t| t.wait == Wait::Bar) {
            for t in threads.iter_mut().filter(|t| t.wait == Wait::Bar) {
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

/// How an `mma`/`wgmma` widens its 16-bit operands: both `.bf16` or both `.f16`.
fn operand_type(ins: &Instr) -> Result<fn(u16) -> f32, EmuError> {
    let of = |ty: &str| ins.op.iter().filter(|m| *m == ty).count() == 2;
    if of("bf16") {
        Ok(bf16_to_f32)
    } else if of("f16") {
        Ok(f16_to_f32)
    } else {
        err(format!(
            "`{}`: only bf16 or f16 operands are emulated",
            ins.line
        ))
    }
}

/// Lane `lane`'s share of a 16×16 A fragment (registers `a` of thread `t`), placed at rows
/// `row0`..: register r holds A[g + 8·(r & 1)][2q + 8·(r >> 1) + {0, 1}], low half first.
fn a_fragment(
    am: &mut [[f32; 16]; 64],
    row0: usize,
    lane: usize,
    t: &Thread,
    a: &[usize],
    widen: fn(u16) -> f32,
) {
    let (g, q) = (lane / 4, lane % 4);
    for (r, &reg) in a.iter().enumerate() {
        let (row, col) = (row0 + g + 8 * (r & 1), 2 * q + 8 * (r >> 1));
        am[row][col] = widen(t.regs[reg] as u16);
        am[row][col + 1] = widen((t.regs[reg] >> 16) as u16);
    }
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0..d3}, {a0..a3}, {b0, b1},
/// {c0..c3}`: D (16×8) = A (16×16) · B (16×8) + C, fragments laid out over the warp as the PTX
/// ISA's "Matrix Fragments for mma.m16n8k16" says: with g = lane / 4 and q = lane % 4, register
/// a_r holds A[g + 8·(r & 1)][2q + 8·(r >> 1) + {0, 1}] (low half first), b_r holds
/// B[2q + 8·r + {0, 1}][g], c/d_i holds C[g + 8·(i >> 1)][2q + (i & 1)].
/// `.f16.f16` operands are laid out the same way.
fn mma(ins: &Instr, warp: &mut [Thread]) -> Result<(), EmuError> {
    let widen = operand_type(ins)?;
    if !ins.op.iter().any(|m| m == "m16n8k16") || warp.len() != 32 {
        return err(format!("`{}`: only m16n8k16 is emulated", ins.line));
    }
    let regs = |o: &Operand, n: usize| -> Result<Vec<usize>, EmuError> {
        match o {
            Operand::Vec(v) if v.len() == n => Ok(v.clone()),
            _ => err(format!("`{}`: a {{…}} of {n} registers expected", ins.line)),
        }
    };
    let (d, a, b, c) = (
        regs(&ins.args[0], 4)?,
        regs(&ins.args[1], 4)?,
        regs(&ins.args[2], 2)?,
        regs(&ins.args[3], 4)?,
    );
    let half = |word: u64, hi: bool| widen(if hi { (word >> 16) as u16 } else { word as u16 });
    let mut am = [[0f32; 16]; 64];
    let mut bm = [[0f32; 8]; 16];
    let mut cm = [[0f32; 8]; 16];
    for (lane, t) in warp.iter().enumerate() {
        let (g, q) = (lane / 4, lane % 4);
        a_fragment(&mut am, 0, lane, t, &a, widen);
        for (r, &reg) in b.iter().enumerate() {
            let k = 2 * q + 8 * r;
            bm[k][g] = half(t.regs[reg], false);
            bm[k + 1][g] = half(t.regs[reg], true);
        }
        for (i, &reg) in c.iter().enumerate() {
            cm[g + 8 * (i >> 1)][2 * q + (i & 1)] = f32_of(t.regs[reg]);
        }
    }
    for (lane, t) in warp.iter_mut().enumerate() {
        let (g, q) = (lane / 4, lane % 4);
        for (i, &reg) in d.iter().enumerate() {
            let (row, col) = (g + 8 * (i >> 1), 2 * q + (i & 1));
            let mut acc = cm[row][col] as f64;
            for (k, arow) in am[row].iter().enumerate() {
                acc += *arow as f64 * bm[k][col] as f64;
            }
            t.set(reg, bits_f32(acc as f32));
        }
    }
    Ok(())
}

/// `wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{bf16,f16} {d0..d(N/2-1)}, {a0..a3},
/// b_desc, scale_d, 1, 1, 0`: D (64×N) = A (64×16) · B (16×N) + (scale_d ? D : 0), by the
/// warpgroup's 128 threads, as the PTX ISA's "Asynchronous Warpgroup Level Matrix" sections lay
/// them out. A from registers: warp w of the group holds rows 16w.. as `mma.m16n8k16` holds its
/// A. D: register 4j + i of lane (g, q) of warp w is D[16w + g + 8·(i >> 1)][8j + 2q + (i & 1)].
/// B from shared memory through the 64-bit descriptor (start address >> 4 in bits 0–13, the
/// leading dimension byte offset >> 4 in 16–29, the stride dimension byte offset >> 4 in
/// 32–45, swizzle in 62–63), K-major (`imm-trans-b` 0) without swizzle: core matrices of 8
/// rows (along N) of 16 bytes (8 elements along K), 128 contiguous bytes each; the core matrix
/// holding (k, n) starts at start + (n / 8)·SBO + (k / 8)·LBO, and the element is at row n % 8,
/// column k % 8 of it. Only that layout is emulated.
fn wgmma(
    ins: &Instr,
    group: &mut [Thread],
    shared: &mut SharedMemory,
    who: Access,
) -> Result<(), EmuError> {
    let widen = operand_type(ins)?;
    let n = ins
        .op
        .iter()
        .find_map(|m| {
            m.strip_prefix("m64n")?
                .strip_suffix("k16")?
                .parse::<usize>()
                .ok()
        })
        .filter(|n| n % 8 == 0 && (8..=256).contains(n))
        .ok_or_else(|| EmuError(format!("`{}`: only m64nNk16 is emulated", ins.line)))?;
    if !ins.op.iter().any(|m| m == "f32") || ins.args.len() != 7 {
        return err(format!(
            "`{}`: f32 accumulators and A from registers expected",
            ins.line
        ));
    }
    let regs = |o: &Operand, len: usize| -> Result<Vec<usize>, EmuError> {
        match o {
            Operand::Vec(v) if v.len() == len => Ok(v.clone()),
            _ => err(format!(
                "`{}`: a {{…}} of {len} registers expected",
                ins.line
            )),
        }
    };
    let (d, a) = (regs(&ins.args[0], n / 2)?, regs(&ins.args[1], 4)?);
    // What other instructions wrote to its operands must be fenced (`wgmma.fence`) first.
    if group
        .iter()
        .any(|t| d.iter().chain(&a).any(|&r| t.unfenced[r]))
    {
        return err(format!(
            "`{}`: reads registers written since the last wgmma.fence",
            ins.line
        ));
    }
    // Every thread must give the same descriptor and scale-d; read them off thread 0.
    let scalar = |t: &Thread, o: &Operand| -> Result<u64, EmuError> {
        match o {
            Operand::Reg(r) => Ok(t.regs[*r]),
            Operand::Imm(v) => Ok(*v),
            _ => err(format!("`{}`: a register or immediate expected", ins.line)),
        }
    };
    let desc = scalar(&group[0], &ins.args[2])?;
    let scale_d = scalar(&group[0], &ins.args[3])? != 0;
    if group
        .iter()
        .any(|t| scalar(t, &ins.args[2]).ok() != Some(desc))
    {
        return err(format!(
            "`{}`: the descriptor differs between threads",
            ins.line
        ));
    }
    let imm = |i: usize| match ins.args[i] {
        Operand::Imm(v) => Some(v as i64),
        _ => None,
    };
    if imm(4) != Some(1) || imm(5) != Some(1) || imm(6) != Some(0) {
        return err(format!(
            "`{}`: only imm-scale 1, 1 and imm-trans-b 0 are emulated",
            ins.line
        ));
    }
    let field = |lo: u32| ((desc >> lo) & 0x3FFF) << 4;
    let (start, lbo, sbo) = (field(0), field(16), field(32));
    if desc >> 62 != 0 || (desc >> 49) & 7 != 0 {
        return err(format!(
            "`{}`: only descriptors without swizzle or base offset are emulated",
            ins.line
        ));
    }
    let mut bm = vec![[0f32; 256]; 16];
    for core_n in 0..n / 8 {
        for core_k in 0..2 {
            for row in 0..8 {
                let at = start + core_n as u64 * sbo + core_k as u64 * lbo + 16 * row as u64;
                let bytes = shared.read_async(at, 16, who)?;
                for e in 0..8 {
                    let h = u16::from_le_bytes([bytes[2 * e], bytes[2 * e + 1]]);
                    bm[8 * core_k + e][8 * core_n + row] = widen(h);
                }
            }
        }
    }
    let mut am = [[0f32; 16]; 64];
    for (index, t) in group.iter().enumerate() {
        a_fragment(&mut am, 16 * (index / 32), index % 32, t, &a, widen);
    }
    for (index, t) in group.iter_mut().enumerate() {
        let (w, lane) = (index / 32, index % 32);
        let (g, q) = (lane / 4, lane % 4);
        for (x, &reg) in d.iter().enumerate() {
            let (j, i) = (x / 4, x % 4);
            let (row, col) = (16 * w + g + 8 * (i >> 1), 8 * j + 2 * q + (i & 1));
            let mut acc = if scale_d {
                f32_of(t.regs[reg]) as f64
            } else {
                0.0
            };
            for (k, arow) in am[row].iter().enumerate() {
                acc += *arow as f64 * bm[k][col] as f64;
            }
            t.regs[reg] = bits_f32(acc as f32);
        }
    }
    Ok(())
}

/// Memory accesses must be aligned to their whole width (a `v4.f32` to 16 bytes), as on the
/// hardware, where a misaligned access is a launch error.
fn aligned(addr: u64, width: usize) -> Result<(), EmuError> {
    if addr % width as u64 != 0 {
        return err(format!("misaligned {width}-byte access at {addr:#x}"));
    }
    Ok(())
}

/// `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16 {r0..}, [addr]` (N = 1, 2, 4): lanes
/// 8m..8m+7 give the shared addresses of the 8 rows (16 bytes each) of matrix m, and register
/// r_m of lane L receives the 32 bits at row L / 4, bytes 4·(L % 4) of matrix m; with `.trans`,
/// the matrix's transpose: the 16-bit elements at (row 2·(L % 4), column L / 4) in its low half
/// and (row 2·(L % 4) + 1, column L / 4) in its high half, as the PTX ISA's "Warp-level matrix
/// load instruction: ldmatrix" lays them out.
fn ldmatrix(
    ins: &Instr,
    warp: &mut [Thread],
    shared: &mut SharedMemory,
    who: impl Fn(usize) -> Access,
) -> Result<(), EmuError> {
    let count = match ins
        .op
        .iter()
        .find(|m| m.starts_with('x'))
        .map(|m| m.as_str())
    {
        Some("x1") => 1,
        Some("x2") => 2,
        Some("x4") => 4,
        _ => return err(format!("`{}`: ldmatrix .x1, .x2 or .x4 expected", ins.line)),
    };
    if !ins.op.iter().any(|m| m == "shared") {
        return err(format!("`{}`: only shared ldmatrix is emulated", ins.line));
    }
    let transposed = ins.op.iter().any(|m| m == "trans");
    if warp.len() != 32 {
        return err(format!("`{}`: a whole warp must take part", ins.line));
    }
    let Operand::Vec(dst) = &ins.args[0] else {
        return err(format!("`{}`: a {{…}} of registers expected", ins.line));
    };
    if dst.len() != count {
        return err(format!("`{}`: {count} registers expected", ins.line));
    }
    let Operand::Mem(base, off) = &ins.args[1] else {
        return err(format!("`{}`: an address expected", ins.line));
    };
    let shared_len = shared.bytes.len();
    let row_address = |lane: usize| -> Result<usize, EmuError> {
        let at = match base {
            Base::Reg(r) => warp[lane].regs[*r].wrapping_add(*off as u64),
            Base::Shared(a) => a.wrapping_add(*off as u64),
            _ => return err(format!("`{}`: a shared address expected", ins.line)),
        } as usize;
        if at % 16 != 0 || at + 16 > shared_len {
            return err(format!(
                "`{}`: row address {at} unaligned or out of shared memory",
                ins.line
            ));
        }
        Ok(at)
    };
    let mut words = vec![[0u64; 4]; 32];
    for m in 0..count {
        for (lane, w) in words.iter_mut().enumerate() {
            // Each row is read by the lane that gave its address.
            let mut b = [0u8; 8];
            if transposed {
                for half in 0..2 {
                    let giver = 8 * m + 2 * (lane % 4) + half;
                    let at = row_address(giver)? + 2 * (lane / 4);
                    b[2 * half..2 * half + 2].copy_from_slice(shared.read(
                        at as u64,
                        2,
                        who(giver),
                    )?);
                }
            } else {
                let giver = 8 * m + lane / 4;
                let at = row_address(giver)? + 4 * (lane % 4);
                b[..4].copy_from_slice(shared.read(at as u64, 4, who(giver))?);
            }
            w[m] = u64::from_le_bytes(b);
        }
    }
    for (t, w) in warp.iter_mut().zip(&words) {
        for (m, &reg) in dst.iter().enumerate() {
            t.set(reg, w[m]);
        }
    }
    Ok(())
}

fn shuffle(ins: &Instr, warp: &mut [Thread]) -> Result<(), EmuError> {
    // shfl.sync.MODE.b32 d, a, b, c, mask
    let mode = ins.op[2].as_str();
    let (Operand::Reg(d), Operand::Reg(a)) = (&ins.args[0], &ins.args[1]) else {
        return err(format!("`{}`: registers expected", ins.line));
    };
    let values: Vec<u64> = warp.iter().map(|t| t.regs[*a]).collect();
    let lanes = warp.len();
    for (lane, t) in warp.iter_mut().enumerate() {
        let b = match &ins.args[2] {
            Operand::Imm(v) => *v as usize,
            Operand::Reg(r) => t.regs[*r] as u32 as usize,
            _ => return err(format!("`{}`: bad lane operand", ins.line)),
        };
        let src = match mode {
            "bfly" => lane ^ b,
            "down" => {
                if lane + b < lanes {
                    lane + b
                } else {
                    lane
                }
            }
            "up" => lane.checked_sub(b).unwrap_or(lane),
            "idx" => b & 31,
            other => return err(format!("shfl mode `{other}` not supported")),
        };
        t.set(*d, values[src.min(lanes - 1)]);
    }
    Ok(())
}

/// `x CMP y` for setp's comparison names.
fn compare<T: PartialOrd>(cmp: &str, x: T, y: T) -> Option<bool> {
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
struct Op<'a>(&'a [String]);

impl<'a> Op<'a> {
    fn at(&self, i: usize) -> &'a str {
        self.0[i].as_str()
    }
    fn last(&self) -> &'a str {
        self.0[self.0.len() - 1].as_str()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn has(&self, m: &str) -> bool {
        self.0.iter().any(|p| p == m)
    }
    /// `n` of a `.vN` vector access.
    fn vector_width(&self) -> Option<usize> {
        self.0
            .iter()
            .find_map(|m| m.strip_prefix('v')?.parse::<usize>().ok())
    }
}

/// How a global load counts for the interpreter's checks.
#[derive(Clone, Copy)]
enum LoadKind {
    /// A hint: no data the program depends on, so neither a race nor an early read.
    Prefetch,
    /// A read, by a thread past its `griddepcontrol.wait` or not, through the non-coherent
    /// cache or not.
    Read { waited: bool, nc: bool },
}

/// A kernel's global memory access, as `Memory::access` checks it.
#[derive(Clone, Copy)]
enum GlobalOp {
    Read { waited: bool, nc: bool },
    Write { waited: bool },
}

struct Ctx<'a> {
    f: &'a Function,
    launch: &'a Launch<'a>,
    block: u32,
    tid: u32,
    /// Barriers the block has passed.
    epoch: u32,
}

fn f32_of(bits: u64) -> f32 {
    f32::from_bits(bits as u32)
}

fn bits_f32(v: f32) -> u64 {
    v.to_bits() as u64
}

fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// IEEE half precision as f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// Round to nearest even, as `cvt.rn.f16.f32`: subnormals below 2^-14, infinity from 65520
/// (halfway past the largest half, 65504) on.
fn f32_to_f16(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

/// Round to nearest even, as `cvt.rn.bf16.f32`.
fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return 0x7FC0;
    }
    let round = ((b >> 16) & 1) + 0x7FFF;
    ((b + round) >> 16) as u16
}

impl Ctx<'_> {
    fn who(&self) -> Access {
        Access {
            thread: 1 + self.block * self.launch.block + self.tid,
            block: self.block,
            epoch: self.epoch,
            block_size: self.launch.block,
        }
    }

    fn value(&self, t: &Thread, o: &Operand) -> Result<u64, EmuError> {
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
    fn address(&self, t: &Thread, o: &Operand, space: &str) -> Result<(Base, u64), EmuError> {
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

    /// Runs until the thread must wait or ends; returns instructions executed.
    fn run_thread(
        &self,
        t: &mut Thread,
        memory: &mut Memory,
        shared: &mut SharedMemory,
    ) -> Result<u64, EmuError> {
        let mut executed = 0;
        loop {
            let Some(ins) = self.f.code.get(t.pc) else {
                t.wait = Wait::Done;
                return Ok(executed);
            };
            executed += 1;
            if executed > 50_000_000 {
                return err(format!("{}: thread {} runs away", self.f.name, self.tid));
            }
            if let Some((neg, p)) = ins.guard {
                if (t.regs[p] != 0) == neg {
                    t.pc += 1;
                    continue;
                }
            }
            match ins.op[0].as_str() {
                "ret" | "exit" => {
                    t.wait = Wait::Done;
                    return Ok(executed);
                }
                "bra" => {
                    let Operand::Label(l) = ins.args[0] else {
                        return err(format!("`{}`: label expected", ins.line));
                    };
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
                // Warpgroup-collective: the four warps meet at it. The rest of `wgmma`
                // (fence, commit, wait) orders an asynchronous unit this interpreter does not
                // have: `mma_async` completes where the warpgroup meets.
                "wgmma" => match ins.op.get(1).map(String::as_str) {
                    Some("mma_async") => {
                        t.wait = Wait::Group;
                        return Ok(executed);
                    }
                    // Registers written before it may be read by the `wgmma`s after it.
                    Some("fence") => t.unfenced.fill(false),
                    Some("commit_group" | "wait_group") => {}
                    _ => return err(format!("`{}`: unknown wgmma", ins.line)),
                },
                "fence" if ins.op.get(1).map(String::as_str) == Some("proxy") => {
                    if ins.op.get(2).map(String::as_str) != Some("async") {
                        return err(format!("`{}`: only fence.proxy.async", ins.line));
                    }
                    shared.fence_proxy_async(self.who().thread);
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
                _ => self
                    .step(ins, t, memory, shared)
                    .map_err(|e| EmuError(format!("{}: `{}`: {e}", self.f.name, ins.line)))?,
            }
            t.pc += 1;
        }
    }

    /// A kernel's load of `size` bytes at `addr`.
    fn load(
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
                    memory.access(addr, size, self.who(), GlobalOp::Read { waited, nc })?;
                }
                memory.read(addr, size)?
            }
        };
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(v))
    }

    /// A kernel's store of `bytes` at `addr`.
    fn store(
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
                memory.access(addr, size, self.who(), GlobalOp::Write { waited })?;
                memory.write_bytes(addr, bytes)
            }
        }
    }

    fn step(
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
                    compare(cmp, fa(t, 1)?, fa(t, 2)?)
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
                // cvt[.rn|.rzi|.rmi].DST.SRC
                let (dt, st) = (op.at(op.len() - 2), op.last());
                let v = arg(t, 1)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs kernel `k` of `ptx` on one warp with an output buffer of `words` u32 (its only
    /// parameter); returns what the kernel left there.
    fn run_one_warp(ptx: &str, words: usize) -> Result<Vec<u32>, EmuError> {
        let m = Module::parse(ptx)?;
        let mut mem = Memory::new();
        let out = mem.alloc(&vec![0; 4 * words]);
        run(
            &m,
            "k",
            &Launch {
                grid: 1,
                block: 32,
                params: &[out],
            },
            &mut mem,
        )?;
        mem.read_u32(out, words)
    }

    #[test]
    fn f16_conversions_round_to_nearest_even_and_keep_subnormals() {
        for (v, h) in [
            (1.0f32, 0x3C00u16),
            (-2.0, 0xC000),
            (65504.0, 0x7BFF),
            (65519.0, 0x7BFF),
            (65520.0, 0x7C00),
            (2f32.powi(-14), 0x0400),
            (2f32.powi(-24), 0x0001),
            (2f32.powi(-25), 0x0000),
            (3.0 * 2f32.powi(-25), 0x0002),
            (0.1, 0x2E66),
        ] {
            assert_eq!(f32_to_f16(v), h, "{v}");
        }
        // Halfway between 1 and 1 + 2^-10: ties go to the even one.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3C00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
        // Every half widens exactly and narrows back to itself.
        for h in (0u16..=0xFFFF).filter(|h| (h >> 10) & 0x1F != 0x1F) {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#06x}");
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
    }

    #[test]
    fn partial_warp_shuffle_is_an_error() {
        let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.reg .b32 %r<3>;\n\t.reg .pred %p<1>;\n\tmov.u32 %r0, %tid.x;\n\tsetp.eq.u32 %p0, %r0, 3;\n\t@%p0 bra $end;\n\tshfl.sync.bfly.b32 %r1, %r0, 1, 31, -1;\n$end:\n\tret;\n}\n";
        let e = run_one_warp(ptx, 1).unwrap_err();
        assert!(e.0.contains("only part of a warp"), "{e}");
    }

    #[test]
    fn launch_beyond_maxntid_is_an_error() {
        let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n.maxntid 16, 1, 1\n.minnctapersm 8\n{\n\tret;\n}\n";
        let e = run_one_warp(ptx, 1).unwrap_err();
        assert!(e.0.contains(".maxntid"), "{e}");
        // Blocks past 256 threads need launch bounds at all.
        let m = Module::parse(".visible .entry k(\n\t.param .u64 out\n)\n{\n\tret;\n}\n").unwrap();
        let mut mem = Memory::new();
        let out = mem.alloc(&[0; 4]);
        let params = [out];
        let launch = |block| Launch {
            grid: 1,
            block,
            params: &params,
        };
        assert!(run(&m, "k", &launch(256), &mut mem).is_ok());
        let e = run(&m, "k", &launch(288), &mut mem).unwrap_err();
        assert!(e.0.contains("without launch bounds"), "{e}");
    }

    /// Lane 8m + r gives the address of row r of matrix m; register m of lane L receives word
    /// L % 4 of row L / 4 of matrix m. Rows are interleaved in shared memory so that the
    /// addresses, not the order, decide.
    #[test]
    fn ldmatrix_distributes_rows_as_the_isa_says() {
        let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.shared .align 16 .b8 s[512];\n\t.reg .b32 %r<12>;\n\t.reg .b64 %rd<8>;\n\tld.param.u64 %rd0, [out];\n\tcvta.to.global.u64 %rd1, %rd0;\n\tmov.u32 %r0, %tid.x;\n\tmov.u64 %rd2, s;\n\tshl.b32 %r1, %r0, 2;\n\tadd.u32 %r2, %r1, 1;\n\tadd.u32 %r3, %r1, 2;\n\tadd.u32 %r4, %r1, 3;\n\tmul.wide.u32 %rd3, %r0, 16;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tst.shared.v4.b32 [%rd4], {%r1, %r2, %r3, %r4};\n\tbar.sync 0;\n\tand.b32 %r5, %r0, 7;\n\tshr.u32 %r6, %r0, 3;\n\tmad.lo.u32 %r7, %r5, 4, %r6;\n\tmul.wide.u32 %rd3, %r7, 16;\n\tadd.u64 %rd5, %rd2, %rd3;\n\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r8, %r9, %r10, %r11}, [%rd5];\n\tmul.wide.u32 %rd3, %r0, 16;\n\tadd.u64 %rd6, %rd1, %rd3;\n\tst.global.v4.u32 [%rd6], {%r8, %r9, %r10, %r11};\n\tret;\n}\n";
        let got = run_one_warp(ptx, 128).unwrap();
        for lane in 0..32u32 {
            for matrix in 0..4u32 {
                // Row (matrix, lane / 4) is stored at row slot (lane / 4) · 4 + matrix.
                let want = ((lane / 4) * 4 + matrix) * 4 + lane % 4;
                assert_eq!(
                    got[(lane * 4 + matrix) as usize],
                    want,
                    "lane {lane} matrix {matrix}"
                );
            }
        }
    }

    /// With `.trans` each lane receives a column pair of the matrix: register m of lane L holds
    /// elements (2·(L % 4), L / 4) and (2·(L % 4) + 1, L / 4) of matrix m. Row slot s holds the
    /// 16-bit elements 8s..8s+7, rows interleaved as above.
    #[test]
    fn ldmatrix_trans_distributes_columns_as_the_isa_says() {
        let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.shared .align 16 .b8 s[512];\n\t.reg .b32 %r<20>;\n\t.reg .b64 %rd<8>;\n\tld.param.u64 %rd0, [out];\n\tcvta.to.global.u64 %rd1, %rd0;\n\tmov.u32 %r0, %tid.x;\n\tmov.u64 %rd2, s;\n\tshl.b32 %r1, %r0, 3;\n\tmad.lo.u32 %r12, %r1, 65537, 65536;\n\tadd.u32 %r2, %r12, 131074;\n\tadd.u32 %r3, %r12, 262148;\n\tadd.u32 %r4, %r12, 393222;\n\tmul.wide.u32 %rd3, %r0, 16;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tst.shared.v4.b32 [%rd4], {%r12, %r2, %r3, %r4};\n\tbar.sync 0;\n\tand.b32 %r5, %r0, 7;\n\tshr.u32 %r6, %r0, 3;\n\tmad.lo.u32 %r7, %r5, 4, %r6;\n\tmul.wide.u32 %rd3, %r7, 16;\n\tadd.u64 %rd5, %rd2, %rd3;\n\tldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%r8, %r9, %r10, %r11}, [%rd5];\n\tmul.wide.u32 %rd3, %r0, 16;\n\tadd.u64 %rd6, %rd1, %rd3;\n\tst.global.v4.u32 [%rd6], {%r8, %r9, %r10, %r11};\n\tret;\n}\n";
        let got = run_one_warp(ptx, 128).unwrap();
        let element = |matrix: u32, row: u32, col: u32| (row * 4 + matrix) * 8 + col;
        for lane in 0..32u32 {
            for matrix in 0..4u32 {
                let (row, col) = (2 * (lane % 4), lane / 4);
                let want = element(matrix, row, col) | element(matrix, row + 1, col) << 16;
                assert_eq!(
                    got[(lane * 4 + matrix) as usize],
                    want,
                    "lane {lane} matrix {matrix}"
                );
            }
        }
    }

    #[test]
    fn barrier_orders_shared_memory() {
        // Thread i writes i to shared[i]; after the barrier it reads shared[31 - i].
        let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.shared .align 4 .b8 s[128];\n\t.reg .b32 %r<4>;\n\t.reg .b64 %rd<6>;\n\tld.param.u64 %rd0, [out];\n\tcvta.to.global.u64 %rd1, %rd0;\n\tmov.u32 %r0, %tid.x;\n\tmov.u64 %rd2, s;\n\tmul.wide.u32 %rd3, %r0, 4;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tst.shared.u32 [%rd4], %r0;\n\tbar.sync 0;\n\tsub.u32 %r1, 31, %r0;\n\tmul.wide.u32 %rd3, %r1, 4;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tld.shared.u32 %r2, [%rd4];\n\tmul.wide.u32 %rd3, %r0, 4;\n\tadd.u64 %rd5, %rd1, %rd3;\n\tst.global.u32 [%rd5], %r2;\n\tret;\n}\n";
        let got = run_one_warp(ptx, 32).unwrap();
        assert_eq!(got, (0..32).rev().collect::<Vec<u32>>());
    }

    #[test]
    fn nothing_before_griddepcontrol_wait_touches_what_kernels_write() {
        // Thread i copies p[i + 32] to p[i], waiting for earlier kernels at `wait` (0: first,
        // 1: between the load and the store, 2: last, 3: never).
        let copy = |wait: usize| {
            let w = |at| {
                if at == wait {
                    "griddepcontrol.wait;"
                } else {
                    ""
                }
            };
            format!(".visible .entry k(\n\t.param .u64 p\n)\n{{\n\t.reg .b32 %r<3>;\n\t.reg .b64 %rd<4>;\n\t{}\n\tld.param.u64 %rd0, [p];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tld.global.u32 %r1, [%rd2+128];\n\t{}\n\tst.global.u32 [%rd2], %r1;\n\t{}\n\tret;\n}}\n", w(0), w(1), w(2))
        };
        // Two launches: the first copies host-written words 64.. to 32..; the second reads
        // those (a kernel's output) into 0...
        let run_twice = |ptx: &str| -> Result<(), EmuError> {
            let m = Module::parse(ptx)?;
            let mut mem = Memory::new();
            let out = mem.alloc(&[0; 4 * 128]);
            for p in [out + 128, out] {
                let launch = Launch {
                    grid: 1,
                    block: 32,
                    params: &[p],
                };
                run(&m, "k", &launch, &mut mem)?;
            }
            Ok(())
        };
        assert!(run_twice(&copy(0)).is_ok());
        // Reading what the host wrote before the wait is allowed, what a kernel wrote is not.
        let e = run_twice(&copy(1)).unwrap_err();
        assert!(
            e.0.contains("which a kernel wrote, before griddepcontrol.wait"),
            "{e}"
        );
        let e = run_twice(&copy(2)).unwrap_err();
        assert!(
            e.0.contains("writes global memory") && e.0.contains("before"),
            "{e}"
        );
        // A kernel without a wait is launched plainly: nothing to check.
        assert!(run_twice(&copy(3)).is_ok());
    }

    #[test]
    fn non_coherent_loads_of_what_the_launch_writes_are_errors() {
        // Each thread stores to p[i], then loads p[i] (its own write: no race) with `load`.
        let kernel = |load: &str| {
            format!(".visible .entry k(\n\t.param .u64 p\n)\n{{\n\t.reg .b32 %r<3>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [p];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tst.global.u32 [%rd2], %r0;\n\t{load} %r1, [%rd2];\n\tst.global.u32 [%rd2+128], %r1;\n\tret;\n}}\n")
        };
        assert!(run_one_warp(&kernel("ld.global.u32"), 64).is_ok());
        let e = run_one_warp(&kernel("ld.global.nc.u32"), 64).unwrap_err();
        assert!(e.0.contains("non-coherent"), "{e}");
        // Each thread reads p[i + 1] (written by no kernel), then, after a barrier (so no
        // race), writes p[i]: thread i + 1's write lands on a word thread i read through the
        // non-coherent cache in the same launch.
        let write_after = |load: &str| {
            format!(".visible .entry k(\n\t.param .u64 p\n)\n{{\n\t.reg .b32 %r<3>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [p];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\t{load} %r1, [%rd2+4];\n\tbar.sync 0;\n\tst.global.u32 [%rd2], %r1;\n\tret;\n}}\n")
        };
        assert!(run_one_warp(&write_after("ld.global.u32"), 64).is_ok());
        let e = run_one_warp(&write_after("ld.global.nc.u32"), 64).unwrap_err();
        assert!(
            e.0.contains("written after a read through the non-coherent"),
            "{e}"
        );
    }

    /// A kernel, its launch shape, and whether the interpreter reports a data race in it.
    fn races(ptx: &str, grid: u32) -> bool {
        let m = Module::parse(ptx).unwrap();
        let mut mem = Memory::new();
        let out = mem.alloc(&[0; 4 * 64]);
        match run(
            &m,
            "k",
            &Launch {
                grid,
                block: 32,
                params: &[out],
            },
            &mut mem,
        ) {
            Ok(_) => false,
            Err(e) if e.0.contains("data race") => true,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn data_races_are_errors() {
        let shared_swap = |barrier: &str| {
            format!(".visible .entry k(\n\t.param .u64 out\n)\n{{\n\t.shared .align 4 .b8 s[128];\n\t.reg .b32 %r<4>;\n\t.reg .b64 %rd<6>;\n\tld.param.u64 %rd0, [out];\n\tmov.u32 %r0, %tid.x;\n\tmov.u64 %rd2, s;\n\tmul.wide.u32 %rd3, %r0, 4;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tst.shared.u32 [%rd4], %r0;\n\t{barrier}\n\tsub.u32 %r1, 31, %r0;\n\tmul.wide.u32 %rd3, %r1, 4;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tld.shared.u32 %r2, [%rd4];\n\tmul.wide.u32 %rd3, %r0, 4;\n\tadd.u64 %rd5, %rd0, %rd3;\n\tst.global.u32 [%rd5], %r2;\n\tret;\n}}\n")
        };
        // Reading another thread's shared write: ordered by a barrier, a race without one.
        assert!(!races(&shared_swap("bar.sync 0;"), 1));
        assert!(races(&shared_swap(""), 1));
        // Each thread writes out[tid]: one block is fine; two blocks write the same words.
        let global_store = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.reg .b32 %r<2>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [out];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tst.global.u32 [%rd2], %r0;\n\tret;\n}\n";
        assert!(!races(global_store, 1));
        assert!(races(global_store, 2));
        // Thread i reads out[i + 1], then writes out[i]: its neighbour's write races its read
        // (a barrier between them orders them, within one block).
        let shift = |barrier: &str| {
            format!(".visible .entry k(\n\t.param .u64 out\n)\n{{\n\t.reg .b32 %r<3>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [out];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tld.global.u32 %r1, [%rd2+4];\n\t{barrier}\n\tst.global.u32 [%rd2], %r1;\n\tret;\n}}\n")
        };
        assert!(races(&shift(""), 1));
        assert!(!races(&shift("bar.sync 0;"), 1));
    }
}
