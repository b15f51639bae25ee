//! Reading a PTX module: entries, their parameters, registers, shared variables and
//! instructions as operands the executor indexes.

use std::collections::HashMap;

use super::{err, EmuError};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Special {
    Tid,
    Ntid,
    Ctaid,
    Nctaid,
    Laneid,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Base {
    Reg(usize),
    Param(usize),
    Shared(u64),
    Abs,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Operand {
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
pub(super) struct Instr {
    pub(super) guard: Option<(bool, usize)>,
    /// The opcode split at dots: `ld.global.nc.v4.u32` → `["ld","global","nc","v4","u32"]`.
    pub(super) op: Vec<String>,
    pub(super) args: Vec<Operand>,
    pub(super) line: String,
    /// Registers it reads (its guard, sources, addresses) and writes, for the timing model.
    pub(super) reads: Vec<usize>,
    pub(super) writes: Vec<usize>,
    /// A label names it: a basic block starts here.
    pub(super) starts_block: bool,
}

/// The registers an instruction reads and writes: the first operand is the destination of
/// every opcode but stores, reductions, prefetches, branches, barriers and fences (a `wgmma`'s
/// accumulators are both read and written).
fn roles(
    op: &[String],
    args: &[Operand],
    guard: Option<(bool, usize)>,
) -> (Vec<usize>, Vec<usize>) {
    let regs = |o: &Operand| -> Vec<usize> {
        match o {
            Operand::Reg(r) | Operand::Mem(Base::Reg(r), _) => vec![*r],
            Operand::Vec(v) => v.clone(),
            _ => Vec::new(),
        }
    };
    let writes_first = match op[0].as_str() {
        "st" | "red" | "prefetch" | "bra" | "bar" | "ret" | "exit" | "fence" | "membar"
        | "griddepcontrol" => false,
        "wgmma" => op.get(1).map(String::as_str) == Some("mma_async"),
        _ => true,
    };
    let mut reads: Vec<usize> = guard.map(|(_, p)| p).into_iter().collect();
    let mut writes = Vec::new();
    for (i, a) in args.iter().enumerate() {
        match a {
            Operand::Mem(..) => reads.extend(regs(a)),
            _ if i == 0 && writes_first => {
                writes = regs(a);
                if op[0] == "wgmma" {
                    reads.extend(regs(a));
                }
            }
            _ => reads.extend(regs(a)),
        }
    }
    (reads, writes)
}

/// One parsed `.entry`.
#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    pub(super) params: Vec<String>,
    pub(super) registers: usize,
    pub(super) shared_bytes: u64,
    /// `.maxntid`: the most threads a block of this kernel may have.
    pub(super) max_threads: Option<u32>,
    pub(super) code: Vec<Instr>,
    /// Whether it has `wgmma` instructions (only then can registers be in flight).
    pub(super) issues_wgmma: bool,
}

/// A parsed PTX module.
#[derive(Clone, Debug)]
pub struct Module {
    pub(super) functions: Vec<Function>,
}

pub(super) fn strip_comment(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Splits operands at top-level commas (not inside `{}` or `[]`).
pub(super) fn split_operands(s: &str) -> Vec<String> {
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

pub(super) struct Parser {
    pub(super) regs: HashMap<String, usize>,
    pub(super) labels: HashMap<String, usize>,
    pub(super) params: Vec<String>,
    pub(super) shared: HashMap<String, u64>,
}

impl Parser {
    pub(super) fn reg(&mut self, name: &str) -> usize {
        let n = self.regs.len();
        *self.regs.entry(name.to_string()).or_insert(n)
    }

    pub(super) fn int(s: &str) -> Option<i64> {
        let (neg, body) = match s.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, s),
        };
        let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            u64::from_str_radix(h, 16).ok()? as i64
        } else {
            body.parse::<i64>().ok()?
        };
        Some(if neg { -v } else { v })
    }

    pub(super) fn operand(&mut self, s: &str) -> Result<Operand, EmuError> {
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

    pub(super) fn function(
        name: String,
        params: Vec<String>,
        body: &[String],
    ) -> Result<Function, EmuError> {
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
            let op: Vec<String> = op.split('.').map(str::to_string).collect();
            let (reads, writes) = roles(&op, &args, guard);
            code.push(Instr {
                guard,
                op,
                args,
                line: s,
                reads,
                writes,
                starts_block: false,
            });
        }
        for &at in p.labels.values() {
            if let Some(ins) = code.get_mut(at) {
                ins.starts_block = true;
            }
        }
        let issues_wgmma = code.iter().any(|i| i.op[0] == "wgmma");
        Ok(Function {
            name,
            params,
            registers: p.regs.len(),
            shared_bytes,
            max_threads: None,
            code,
            issues_wgmma,
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
