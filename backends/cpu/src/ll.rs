//! A small writer of LLVM IR text. Kernels are written as loops over `alloca` counters and
//! accumulators; LLVM's `mem2reg`, loop vectoriser and unroller turn them into vector code.

use std::fmt::Write as _;

/// Formats an f32 constant the way LLVM IR spells it (the f64 bit pattern of the f32 value).
pub fn f32_const(x: f64) -> String {
    format!("0x{:016X}", ((x as f32) as f64).to_bits())
}

/// How a weight's elements are stored (the plan's type).
pub use griffin_runtime::plan::Storage;

pub struct Func {
    symbol: String,
    entry: Vec<String>,
    body: Vec<String>,
    next: usize,
}

/// Every kernel has this signature: buffer pointers, tokens in this call, position of the
/// first token, this thread's index and the thread count.
pub const SIGNATURE: &str = "(ptr %args, i64 %tokens, i64 %start, i32 %thread32, i32 %threads32)";

impl Func {
    pub fn new(symbol: &str) -> Func {
        let mut f = Func {
            symbol: symbol.to_string(),
            entry: Vec::new(),
            body: Vec::new(),
            next: 0,
        };
        f.entry.push("%thread = sext i32 %thread32 to i64".into());
        f.entry.push("%threads = sext i32 %threads32 to i64".into());
        f
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}{}", self.next)
    }

    /// Emits `%name = text` and returns `%name`.
    pub fn op(&mut self, text: impl AsRef<str>) -> String {
        let name = format!("%{}", self.fresh("v"));
        self.body.push(format!("{name} = {}", text.as_ref()));
        name
    }

    pub fn line(&mut self, text: impl Into<String>) {
        self.body.push(text.into());
    }

    /// Pointer argument `index` of the kernel.
    pub fn arg(&mut self, index: usize) -> String {
        let slot = format!("%{}", self.fresh("argslot"));
        let ptr = format!("%{}", self.fresh("arg"));
        self.entry.push(format!(
            "{slot} = getelementptr ptr, ptr %args, i64 {index}"
        ));
        self.entry.push(format!("{ptr} = load ptr, ptr {slot}"));
        ptr
    }

    /// A stack slot in the entry block.
    pub fn alloca(&mut self, ty: &str) -> String {
        let name = format!("%{}", self.fresh("slot"));
        self.entry.push(format!("{name} = alloca {ty}, align 64"));
        name
    }

    pub fn load_f32(&mut self, base: &str, index: &str) -> String {
        let p = self.op(format!("getelementptr float, ptr {base}, i64 {index}"));
        self.op(format!("load float, ptr {p}"))
    }

    pub fn store_f32(&mut self, value: &str, base: &str, index: &str) {
        let p = self.op(format!("getelementptr float, ptr {base}, i64 {index}"));
        self.line(format!("store float {value}, ptr {p}"));
    }

    /// A weight element as f32, widened in registers from its storage type.
    pub fn load_weight(&mut self, storage: Storage, base: &str, index: &str) -> String {
        match storage {
            Storage::F32 => self.load_f32(base, index),
            Storage::Bf16 => {
                let p = self.op(format!("getelementptr i16, ptr {base}, i64 {index}"));
                let h = self.op(format!("load i16, ptr {p}"));
                let w = self.op(format!("zext i16 {h} to i32"));
                let s = self.op(format!("shl i32 {w}, 16"));
                self.op(format!("bitcast i32 {s} to float"))
            }
        }
    }

    pub fn load_i32_as_i64(&mut self, base: &str, index: &str) -> String {
        let p = self.op(format!("getelementptr i32, ptr {base}, i64 {index}"));
        let v = self.op(format!("load i32, ptr {p}"));
        self.op(format!("sext i32 {v} to i64"))
    }

    pub fn fbin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op(format!("{op} fast float {a}, {b}"))
    }

    pub fn ibin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op(format!("{op} i64 {a}, {b}"))
    }

    pub fn call_f32(&mut self, function: &str, args: &[&str]) -> String {
        let list: Vec<String> = args.iter().map(|a| format!("float {a}")).collect();
        self.op(format!("call fast float @{function}({})", list.join(", ")))
    }

    pub fn min_i64(&mut self, a: &str, b: &str) -> String {
        let c = self.op(format!("icmp slt i64 {a}, {b}"));
        self.op(format!("select i1 {c}, i64 {a}, i64 {b}"))
    }

    pub fn max_i64(&mut self, a: &str, b: &str) -> String {
        let c = self.op(format!("icmp sgt i64 {a}, {b}"));
        self.op(format!("select i1 {c}, i64 {a}, i64 {b}"))
    }

    /// This thread's share `[begin, end)` of `0..n`.
    pub fn partition(&mut self, n: &str) -> (String, String) {
        let sum = self.ibin("add", n, "%threads");
        let up = self.ibin("sub", &sum, "1");
        let per = self.op(format!("sdiv i64 {up}, %threads"));
        let begin = self.ibin("mul", "%thread", &per);
        let end_raw = self.ibin("add", &begin, &per);
        let end = self.min_i64(&end_raw, n);
        (begin, end)
    }

    /// `for i in start..end { body(i) }`; `end` must be computed before the loop.
    pub fn for_range(&mut self, start: &str, end: &str, body: impl FnOnce(&mut Func, &str)) {
        let counter = self.alloca("i64");
        let head = self.fresh("head");
        let inner = self.fresh("body");
        let exit = self.fresh("exit");
        self.line(format!("store i64 {start}, ptr {counter}"));
        self.line(format!("br label %{head}"));
        self.line(format!("{head}:"));
        let i = self.op(format!("load i64, ptr {counter}"));
        let c = self.op(format!("icmp slt i64 {i}, {end}"));
        self.line(format!("br i1 {c}, label %{inner}, label %{exit}"));
        self.line(format!("{inner}:"));
        body(self, &i);
        let n = self.ibin("add", &i, "1");
        self.line(format!("store i64 {n}, ptr {counter}"));
        self.line(format!("br label %{head}"));
        self.line(format!("{exit}:"));
    }

    /// `if cond { body }` on an i1 value.
    pub fn if_then(&mut self, cond: &str, body: impl FnOnce(&mut Func)) {
        let then = self.fresh("then");
        let done = self.fresh("done");
        self.line(format!("br i1 {cond}, label %{then}, label %{done}"));
        self.line(format!("{then}:"));
        body(self);
        self.line(format!("br label %{done}"));
        self.line(format!("{done}:"));
    }

    /// `sum_{i in 0..n} term(i)` accumulated in f32 (reassociable, so it vectorises).
    pub fn sum(&mut self, n: &str, term: impl FnOnce(&mut Func, &str) -> String) -> String {
        let acc = self.alloca("float");
        self.line(format!("store float 0.0, ptr {acc}"));
        self.for_range("0", n, |f, i| {
            let t = term(f, i);
            let old = f.op(format!("load float, ptr {acc}"));
            let new = f.fbin("fadd", &old, &t);
            f.line(format!("store float {new}, ptr {acc}"));
        });
        self.op(format!("load float, ptr {acc}"))
    }

    /// Several sums over the same `i in 0..n` in one loop: `terms(i)` gives one term per sum.
    pub fn sums(
        &mut self,
        n: &str,
        count: usize,
        terms: impl FnOnce(&mut Func, &str) -> Vec<String>,
    ) -> Vec<String> {
        let accs: Vec<String> = (0..count).map(|_| self.alloca("float")).collect();
        for a in &accs {
            self.line(format!("store float 0.0, ptr {a}"));
        }
        self.for_range("0", n, |f, i| {
            let ts = terms(f, i);
            assert_eq!(ts.len(), accs.len(), "one term per sum");
            for (acc, t) in accs.iter().zip(ts) {
                let old = f.op(format!("load float, ptr {acc}"));
                let new = f.fbin("fadd", &old, &t);
                f.line(format!("store float {new}, ptr {acc}"));
            }
        });
        accs.iter()
            .map(|a| self.op(format!("load float, ptr {a}")))
            .collect()
    }

    pub fn finish(self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "define void @{}{} #0 {{", self.symbol, SIGNATURE);
        out.push_str("entry:\n");
        for l in &self.entry {
            let _ = writeln!(out, "  {l}");
        }
        out.push_str("  br label %kernel\nkernel:\n");
        for l in &self.body {
            if l.ends_with(':') {
                let _ = writeln!(out, "{l}");
            } else {
                let _ = writeln!(out, "  {l}");
            }
        }
        out.push_str("  ret void\n}\n");
        out
    }
}

/// Declarations of the libm functions and intrinsics kernels call, and the attribute group.
pub const PRELUDE: &str = "\
declare float @expf(float)
declare float @expm1f(float)
declare float @tanhf(float)
declare float @log1pf(float)
declare float @llvm.sqrt.f32(float)
declare double @sin(double)
declare double @cos(double)
declare float @llvm.maxnum.f32(float, float)
declare float @llvm.rint.f32(float)
declare float @llvm.minnum.f32(float, float)
declare float @llvm.fabs.f32(float)
declare <16 x float> @llvm.fmuladd.v16f32(<16 x float>, <16 x float>, <16 x float>)
";

pub const ATTRIBUTES: &str = "attributes #0 = { nounwind }\n";

/// Emits common math on f32 values.
impl Func {
    pub fn constant(&mut self, x: f64) -> String {
        f32_const(x)
    }

    /// `e^x` in straight-line arithmetic (no libm call), so loops using it vectorise: range
    /// reduction `x = n·ln2 + r`, a degree-6 Taylor polynomial on |r| ≤ ln2/2 (relative error
    /// below 2e-7), scaled by `2^n` built in the exponent bits.
    pub fn exp(&mut self, x: &str) -> String {
        let lo = self.op(format!(
            "call float @llvm.maxnum.f32(float {x}, float {})",
            f32_const(-87.0)
        ));
        let x = self.op(format!(
            "call float @llvm.minnum.f32(float {lo}, float {})",
            f32_const(88.0)
        ));
        let scaled = self.op(format!(
            "fmul float {x}, {}",
            f32_const(std::f64::consts::LOG2_E)
        ));
        let n = self.op(format!("call float @llvm.rint.f32(float {scaled})"));
        let hi = self.op(format!(
            "fmul float {n}, {}",
            f32_const(0.693_145_751_953_125)
        ));
        let r0 = self.op(format!("fsub float {x}, {hi}"));
        let lo_part = self.op(format!(
            "fmul float {n}, {}",
            f32_const(1.428_606_765_330_187e-6)
        ));
        let r = self.op(format!("fsub float {r0}, {lo_part}"));
        // Horner: 1 + r(1 + r/2(1 + r/3(1 + r/4(1 + r/5(1 + r/6)))))
        let mut p = "1.0".to_string();
        for k in (1..=6).rev() {
            let t = self.op(format!("fmul float {r}, {}", f32_const(1.0 / k as f64)));
            let tp = self.op(format!("fmul float {t}, {p}"));
            p = self.op(format!("fadd float {tp}, 1.0"));
        }
        let ni = self.op(format!("fptosi float {n} to i32"));
        let biased = self.op(format!("add i32 {ni}, 127"));
        let bits = self.op(format!("shl i32 {biased}, 23"));
        let scale = self.op(format!("bitcast i32 {bits} to float"));
        self.op(format!("fmul float {p}, {scale}"))
    }

    /// `e^x - 1` without a libm call (so loops using it vectorise): `exp(x) - 1`, and near 0,
    /// where that would cancel, the series `x(1 + x/2(1 + x/3(1 + x/4)))` (|x| < 1/32: relative
    /// error below 1e-8). Elsewhere the relative error is below 7e-6 for x ≤ 0 (the RG-LRU's
    /// `2·log a`).
    pub fn expm1(&mut self, x: &str) -> String {
        let e = self.exp(x);
        let direct = self.op(format!("fsub float {e}, 1.0"));
        let mut p = "1.0".to_string();
        for k in (2..=4).rev() {
            let t = self.op(format!("fmul float {x}, {}", f32_const(1.0 / k as f64)));
            let tp = self.op(format!("fmul float {t}, {p}"));
            p = self.op(format!("fadd float {tp}, 1.0"));
        }
        let series = self.op(format!("fmul float {x}, {p}"));
        let ax = self.op(format!("call float @llvm.fabs.f32(float {x})"));
        let small = self.op(format!("fcmp olt float {ax}, {}", f32_const(1.0 / 32.0)));
        self.op(format!("select i1 {small}, float {series}, float {direct}"))
    }

    /// `tanh(x)` as `1 - 2/(e^{2x} + 1)` with the vectorisable `exp` (x clamped to ±9, where
    /// tanh is 1 to f32 precision).
    pub fn tanh(&mut self, x: &str) -> String {
        let lo = self.op(format!(
            "call float @llvm.maxnum.f32(float {x}, float {})",
            f32_const(-9.0)
        ));
        let x = self.op(format!(
            "call float @llvm.minnum.f32(float {lo}, float {})",
            f32_const(9.0)
        ));
        let twice = self.op(format!("fmul float {x}, 2.0"));
        let e = self.exp(&twice);
        let d = self.op(format!("fadd float {e}, 1.0"));
        let q = self.op(format!("fdiv float 2.0, {d}"));
        self.op(format!("fsub float 1.0, {q}"))
    }

    pub fn sigmoid(&mut self, x: &str) -> String {
        let neg = self.op(format!("fneg fast float {x}"));
        let e = self.exp(&neg);
        let d = self.fbin("fadd", "1.0", &e);
        self.fbin("fdiv", "1.0", &d)
    }

    pub fn gelu_tanh(&mut self, x: &str) -> String {
        let c = f32_const((2.0 / std::f64::consts::PI).sqrt());
        let k = f32_const(0.044715);
        let x2 = self.fbin("fmul", x, x);
        let x3 = self.fbin("fmul", &x2, x);
        let kx3 = self.fbin("fmul", &k, &x3);
        let inner = self.fbin("fadd", x, &kx3);
        let scaled = self.fbin("fmul", &c, &inner);
        let t = self.tanh(&scaled);
        let one_plus = self.fbin("fadd", "1.0", &t);
        let half_x = self.fbin("fmul", "0.5", x);
        self.fbin("fmul", &half_x, &one_plus)
    }

    pub fn soft_cap(&mut self, x: &str, cap: f64) -> String {
        let inv = f32_const(1.0 / cap);
        let scaled = self.fbin("fmul", x, &inv);
        let t = self.call_f32("tanhf", &[&scaled]);
        self.fbin("fmul", &f32_const(cap), &t)
    }
}
