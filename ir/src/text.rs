//! The canonical text format: deterministic, renumbered in topological order, parsed back.
//!
//! ```text
//! graph decode {
//!   %0: i32[1] = input.tokens "ids"
//!   %1: bf16[512,64] = param "model.embed_tokens.weight"
//!   %2: f32[1,64] = gather %1, %0
//!   %3: f32[1,64], %4: f32[3,64] = conv1d %2, %5, %6, %7, %8 {width=4}
//!   output.logits "logits" %2
//! }
//! ```
//! Each line is one node: its results with their types, the op mnemonic, a quoted name for
//! inputs, outputs and params, operands, then attributes in a fixed order. Lines starting with
//! `#` are comments.

use std::collections::HashMap;
use std::fmt::Write as _;

use thiserror::Error;

use crate::graph::{Graph, Value};
use crate::op::{
    BinaryOp, Epilogue, Expr, InputRole, NormPrologue, Op, OutputRole, ReduceOp, RotarySpec,
    UnaryOp,
};
use crate::types::{DType, Dim, Shape, ValueType};

#[derive(Debug, Error, Clone, PartialEq)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Shortest text that parses back to the same f64.
fn float_text(x: f64) -> String {
    format!("{x:?}")
}

/// Attributes in their fixed printing order; optional ones only when set.
fn attributes(op: &Op) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    match op {
        Op::Cast { to } => out.push(("to", to.name().to_string())),
        Op::Reshape { shape } => out.push(("shape", shape.to_string())),
        Op::Gather { scale: Some(s) } => out.push(("scale", float_text(*s))),
        Op::Linear {
            bias,
            norm,
            epilogue,
            residual,
            splits,
        } => {
            out.push(("bias", bias.to_string()));
            if let Some(n) = norm {
                out.push(("norm_eps", float_text(n.eps)));
                out.push(("norm_offset", float_text(n.weight_offset)));
            }
            match epilogue {
                Epilogue::None => {}
                Epilogue::GeGlu => out.push(("epilogue", "geglu".into())),
                Epilogue::SoftCap(cap) => out.push(("soft_cap", float_text(*cap))),
            }
            if *residual {
                out.push(("residual", "true".into()));
            }
            if !splits.is_empty() {
                let parts: Vec<String> = splits.iter().map(u64::to_string).collect();
                out.push(("splits", format!("[{}]", parts.join(","))));
            }
        }
        Op::BlockDiagonalLinear { bias } => out.push(("bias", bias.to_string())),
        Op::Concat { axis, parts } => {
            out.push(("axis", axis.to_string()));
            out.push(("parts", parts.to_string()));
        }
        Op::Reduce { axis, .. } => out.push(("axis", axis.to_string())),
        Op::RmsNorm { eps, weight_offset } => {
            out.push(("eps", float_text(*eps)));
            out.push(("weight_offset", float_text(*weight_offset)));
        }
        Op::SoftCap { cap } => out.push(("cap", float_text(*cap))),
        Op::Conv1d { width } => out.push(("width", width.to_string())),
        Op::Rotary { theta, rotary_dims } => {
            out.push(("theta", float_text(*theta)));
            out.push(("rotary_dims", rotary_dims.to_string()));
        }
        Op::LocalAttention {
            window,
            scale,
            rotary,
        } => {
            out.push(("window", window.to_string()));
            out.push(("scale", float_text(*scale)));
            if let Some(r) = rotary {
                out.push(("rotary_theta", float_text(r.theta)));
                out.push(("rotary_dims", r.dims.to_string()));
            }
        }
        Op::RgLru { width, gate_output } => {
            out.push(("width", width.to_string()));
            out.push(("gate_output", gate_output.to_string()));
        }
        Op::Elementwise { body } => out.push(("body", body.to_string())),
        _ => {}
    }
    out
}

/// The op as the text format spells it, without operands: mnemonic, name or value, attributes.
/// Two nodes with the same signature and the same operands compute the same values.
pub fn op_signature(op: &Op) -> String {
    let mut s = op.mnemonic();
    match op {
        Op::Input { name, ty, .. } => s.push_str(&format!(" {} {ty}", quote(name))),
        Op::Output { name, .. } => s.push_str(&format!(" {}", quote(name))),
        Op::Param { tensor, ty } => s.push_str(&format!(" {} {ty}", quote(tensor))),
        Op::Constant { value, dtype } => s.push_str(&format!(" {} {dtype}", float_text(*value))),
        _ => {}
    }
    let attrs = attributes(op);
    if !attrs.is_empty() {
        let parts: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.push_str(&format!(" {{{}}}", parts.join(", ")));
    }
    s
}

/// Prints the graph in the canonical text format.
pub fn print(graph: &Graph) -> String {
    let mut out = String::new();
    let mut names: HashMap<Value, usize> = HashMap::new();
    let _ = writeln!(out, "graph {} {{", graph.name);
    for id in graph.topo_order() {
        let node = graph.node(id);
        let mut line = String::from("  ");
        let results: Vec<String> = node
            .results
            .iter()
            .enumerate()
            .map(|(i, ty)| {
                let number = names.len();
                names.insert(
                    Value {
                        node: id,
                        output: i as u32,
                    },
                    number,
                );
                format!("%{number}: {ty}")
            })
            .collect();
        if !results.is_empty() {
            line.push_str(&results.join(", "));
            line.push_str(" = ");
        }
        line.push_str(&node.op.mnemonic());
        match &node.op {
            Op::Input { name, .. } | Op::Output { name, .. } => {
                line.push(' ');
                line.push_str(&quote(name));
            }
            Op::Param { tensor, .. } => {
                line.push(' ');
                line.push_str(&quote(tensor));
            }
            Op::Constant { value, dtype } => {
                line.push(' ');
                if dtype.is_float() {
                    line.push_str(&float_text(*value));
                } else {
                    line.push_str(&format!("{}", *value as i64));
                }
            }
            _ => {}
        }
        let operands: Vec<String> = graph
            .operands(id)
            .iter()
            .map(|v| match names.get(v) {
                Some(n) => format!("%{n}"),
                None => format!("%?{v}"),
            })
            .collect();
        if !operands.is_empty() {
            line.push(' ');
            line.push_str(&operands.join(", "));
        }
        let attrs = attributes(&node.op);
        if !attrs.is_empty() {
            let parts: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = write!(line, " {{{}}}", parts.join(", "));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("}\n");
    out
}

struct Cursor<'a> {
    rest: &'a str,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn err<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            line: self.line,
            message: message.into(),
        })
    }

    fn skip_ws(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if let Some(r) = self.rest.strip_prefix(token) {
            self.rest = r;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), ParseError> {
        if self.eat(token) {
            Ok(())
        } else {
            self.err(format!("expected `{token}` at `{}`", self.rest))
        }
    }

    fn word(&mut self) -> Result<&'a str, ParseError> {
        self.skip_ws();
        let end = self
            .rest
            .find(|c: char| {
                !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' || c == '+')
            })
            .unwrap_or(self.rest.len());
        if end == 0 {
            return self.err(format!("expected a word at `{}`", self.rest));
        }
        let (w, r) = self.rest.split_at(end);
        self.rest = r;
        Ok(w)
    }

    fn number<T: std::str::FromStr>(&mut self) -> Result<T, ParseError> {
        let w = self.word()?;
        match w.parse() {
            Ok(n) => Ok(n),
            Err(_) => self.err(format!("bad number `{w}`")),
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.skip_ws();
        let mut chars = self.rest.char_indices();
        if !matches!(chars.next(), Some((_, '"'))) {
            return self.err(format!("expected a quoted name at `{}`", self.rest));
        }
        let mut out = String::new();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &self.rest[i + 1..];
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, c)) => out.push(c),
                    None => break,
                },
                c => out.push(c),
            }
        }
        self.err("unterminated string")
    }

    fn shape(&mut self) -> Result<Shape, ParseError> {
        self.expect("[")?;
        let mut dims = Vec::new();
        if self.eat("]") {
            return Ok(Shape(dims));
        }
        loop {
            let w = self.word()?;
            dims.push(match w.parse::<u64>() {
                Ok(n) => Dim::Fixed(n),
                Err(_) if w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => Dim::sym(w),
                Err(_) => return self.err(format!("bad dimension `{w}`")),
            });
            if self.eat("]") {
                return Ok(Shape(dims));
            }
            self.expect(",")?;
        }
    }

    fn value_type(&mut self) -> Result<ValueType, ParseError> {
        self.skip_ws();
        let end = self.rest.find('[').unwrap_or(0);
        let name = &self.rest[..end];
        let Some(dtype) = DType::from_name(name) else {
            return self.err(format!("unknown dtype `{name}`"));
        };
        self.rest = &self.rest[end..];
        Ok(ValueType::new(dtype, self.shape()?))
    }

    fn value_number(&mut self) -> Result<usize, ParseError> {
        self.expect("%")?;
        self.number()
    }
}

/// Attribute values by key, as raw text; each key must be consumed.
struct Attrs {
    items: Vec<(String, String)>,
}

impl Attrs {
    fn take(&mut self, key: &str) -> Option<String> {
        let i = self.items.iter().position(|(k, _)| k == key)?;
        Some(self.items.remove(i).1)
    }

    fn req<T: std::str::FromStr>(&mut self, key: &str) -> Result<T, String> {
        let v = self
            .take(key)
            .ok_or_else(|| format!("missing attribute `{key}`"))?;
        v.parse()
            .map_err(|_| format!("bad value `{v}` for attribute `{key}`"))
    }

    fn opt<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("bad value `{v}` for attribute `{key}`")),
        }
    }
}

fn parse_shape_text(text: &str) -> Result<Shape, String> {
    let mut c = Cursor {
        rest: text,
        line: 0,
    };
    let shape = c.shape().map_err(|e| e.message)?;
    if !c.rest.trim().is_empty() {
        return Err(format!("unexpected `{}` after shape", c.rest));
    }
    Ok(shape)
}

fn parse_dtype(text: &str) -> Result<DType, String> {
    DType::from_name(text).ok_or_else(|| format!("unknown dtype `{text}`"))
}

fn parse_splits(text: &str) -> Result<Vec<u64>, String> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or_else(|| format!("splits must be a list, got `{text}`"))?;
    inner
        .split(',')
        .map(|p| p.trim().parse().map_err(|_| format!("bad split `{p}`")))
        .collect()
}

/// Parses an elementwise body such as `mul(gelu_tanh($0), $1)`.
pub fn parse_expr(text: &str) -> Result<Expr, String> {
    fn parse(s: &str) -> Result<(Expr, &str), String> {
        let s = s.trim_start();
        if let Some(rest) = s.strip_prefix('$') {
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            let i = rest[..end]
                .parse()
                .map_err(|_| format!("bad operand at `{s}`"))?;
            return Ok((Expr::Operand(i), &rest[end..]));
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        let (name, mut rest) = s.split_at(end);
        let mut param = None;
        if let Some(r) = rest.strip_prefix('[') {
            let close = r.find(']').ok_or("unclosed `[`")?;
            param = Some(&r[..close]);
            rest = &r[close + 1..];
        }
        rest = rest
            .strip_prefix('(')
            .ok_or_else(|| format!("expected `(` after `{name}`"))?;
        let mut args = Vec::new();
        loop {
            let (e, r) = parse(rest)?;
            args.push(e);
            let r = r.trim_start();
            if let Some(r) = r.strip_prefix(',') {
                rest = r;
            } else if let Some(r) = r.strip_prefix(')') {
                rest = r;
                break;
            } else {
                return Err(format!("expected `,` or `)` at `{r}`"));
            }
        }
        let given = args.len();
        let arity = |n: usize| {
            if given == n {
                Ok(())
            } else {
                Err(format!("`{name}` takes {n} arguments, got {given}"))
            }
        };
        let mut boxed = args.into_iter().map(Box::new);
        let mut next = || boxed.next().expect("arity checked");
        let e = if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == name) {
            arity(1)?;
            Expr::Unary(u, next())
        } else if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == name) {
            arity(2)?;
            Expr::Binary(b, next(), next())
        } else {
            match (name, param) {
                ("select", None) => {
                    arity(3)?;
                    Expr::Select(next(), next(), next())
                }
                ("soft_cap", Some(p)) => {
                    arity(1)?;
                    Expr::SoftCap(p.parse().map_err(|_| format!("bad cap `{p}`"))?, next())
                }
                ("cast", Some(p)) => {
                    arity(1)?;
                    Expr::Cast(parse_dtype(p)?, next())
                }
                _ => return Err(format!("unknown elementwise op `{name}`")),
            }
        };
        Ok((e, rest))
    }
    let (e, rest) = parse(text)?;
    if !rest.trim().is_empty() {
        return Err(format!("unexpected `{rest}` after expression"));
    }
    Ok(e)
}

/// Builds the op named `m` from its attributes (names and sources filled in by the caller).
fn op_from_text(m: &str, a: &mut Attrs) -> Result<Op, String> {
    if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == m) {
        return Ok(Op::Unary(u));
    }
    if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == m) {
        return Ok(Op::Binary(b));
    }
    if let Some(r) = ReduceOp::ALL
        .into_iter()
        .find(|r| m.strip_prefix("reduce_") == Some(r.name()))
    {
        return Ok(Op::Reduce {
            op: r,
            axis: a.req("axis")?,
        });
    }
    // Names, types and values of sources are placeholders here; `parse_node` fills them in.
    let placeholder_ty = ValueType::scalar(DType::F32);
    let input = |role| Op::Input {
        name: String::new(),
        role,
        ty: placeholder_ty.clone(),
    };
    Ok(match m {
        "input.tokens" => input(InputRole::Tokens),
        "input.position" => input(InputRole::Position),
        "input.state" => input(InputRole::State),
        "output.logits" => Op::Output {
            name: String::new(),
            role: OutputRole::Logits,
        },
        "output.state" => Op::Output {
            name: String::new(),
            role: OutputRole::State,
        },
        "param" => Op::Param {
            tensor: String::new(),
            ty: placeholder_ty.clone(),
        },
        "constant" => Op::Constant {
            value: 0.0,
            dtype: DType::F32,
        },
        "positions" => Op::Positions,
        "cast" => Op::Cast {
            to: parse_dtype(&a.take("to").ok_or("missing attribute `to`")?)?,
        },
        "reshape" => Op::Reshape {
            shape: parse_shape_text(&a.take("shape").ok_or("missing attribute `shape`")?)?,
        },
        "gather" => Op::Gather {
            scale: a.opt("scale")?,
        },
        "linear" => {
            let bias = a.req("bias")?;
            let norm = match a.opt::<f64>("norm_eps")? {
                Some(eps) => Some(NormPrologue {
                    eps,
                    weight_offset: a.req("norm_offset")?,
                }),
                None => None,
            };
            let epilogue = match (a.take("epilogue").as_deref(), a.opt::<f64>("soft_cap")?) {
                (None, None) => Epilogue::None,
                (Some("geglu"), None) => Epilogue::GeGlu,
                (None, Some(cap)) => Epilogue::SoftCap(cap),
                (e, cap) => return Err(format!("bad epilogue {e:?} with soft_cap {cap:?}")),
            };
            Op::Linear {
                bias,
                norm,
                epilogue,
                residual: a.opt("residual")?.unwrap_or(false),
                splits: match a.take("splits") {
                    Some(t) => parse_splits(&t)?,
                    None => Vec::new(),
                },
            }
        }
        "block_diagonal_linear" => Op::BlockDiagonalLinear {
            bias: a.req("bias")?,
        },
        "concat" => Op::Concat {
            axis: a.req("axis")?,
            parts: a.req("parts")?,
        },
        "select" => Op::Select,
        "rms_norm" => Op::RmsNorm {
            eps: a.req("eps")?,
            weight_offset: a.req("weight_offset")?,
        },
        "soft_cap" => Op::SoftCap { cap: a.req("cap")? },
        "conv1d" => Op::Conv1d {
            width: a.req("width")?,
        },
        "linear_scan" => Op::LinearScan,
        "rotary" => Op::Rotary {
            theta: a.req("theta")?,
            rotary_dims: a.req("rotary_dims")?,
        },
        "local_attention" => Op::LocalAttention {
            window: a.req("window")?,
            scale: a.req("scale")?,
            rotary: match a.opt::<f64>("rotary_theta")? {
                Some(theta) => Some(RotarySpec {
                    theta,
                    dims: a.req("rotary_dims")?,
                }),
                None => None,
            },
        },
        "rg_lru" => Op::RgLru {
            width: a.req("width")?,
            gate_output: a.req("gate_output")?,
        },
        "elementwise" => Op::Elementwise {
            body: parse_expr(&a.take("body").ok_or("missing attribute `body`")?)?,
        },
        _ => return Err(format!("unknown op `{m}`")),
    })
}

/// Reads `{key=value, ...}`; a value runs to the next top-level `,` or `}`.
fn parse_attribute_block(c: &mut Cursor) -> Result<Attrs, ParseError> {
    let mut items = Vec::new();
    c.skip_ws();
    if !c.rest.starts_with('{') {
        return Ok(Attrs { items });
    }
    c.rest = &c.rest[1..];
    loop {
        let key = c.word()?.to_string();
        c.expect("=")?;
        c.skip_ws();
        let mut depth = 0i32;
        let mut end = None;
        for (i, ch) in c.rest.char_indices() {
            match ch {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                ',' | '}' if depth == 0 => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            return c.err("unterminated attribute block");
        };
        items.push((key, c.rest[..end].trim().to_string()));
        let closing = c.rest[end..].starts_with('}');
        c.rest = &c.rest[end + 1..];
        if closing {
            return Ok(Attrs { items });
        }
    }
}

/// Parses the text format. The result is not verified: run [`crate::verify`] on it.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut graph: Option<Graph> = None;
    let mut values: HashMap<usize, Value> = HashMap::new();
    let mut closed = false;
    let mut last_line = 0;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        last_line = line;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut c = Cursor {
            rest: trimmed,
            line,
        };
        if closed {
            return c.err("text after the closing `}`");
        }
        let Some(g) = graph.as_mut() else {
            c.expect("graph")?;
            let name = c.word()?.to_string();
            c.expect("{")?;
            if !c.rest.trim().is_empty() {
                return c.err("expected a line break after `{`");
            }
            graph = Some(Graph::new(name));
            continue;
        };
        if trimmed == "}" {
            closed = true;
            continue;
        }
        parse_node(&mut c, g, &mut values)?;
    }
    match graph {
        Some(g) if closed => Ok(g),
        Some(_) => Err(ParseError {
            line: last_line,
            message: "missing closing `}`".into(),
        }),
        None => Err(ParseError {
            line: last_line.max(1),
            message: "expected `graph NAME {`".into(),
        }),
    }
}

fn parse_node(
    c: &mut Cursor,
    graph: &mut Graph,
    values: &mut HashMap<usize, Value>,
) -> Result<(), ParseError> {
    let mut results: Vec<(usize, ValueType)> = Vec::new();
    if c.rest.starts_with('%') {
        loop {
            let number = c.value_number()?;
            c.expect(":")?;
            results.push((number, c.value_type()?));
            if c.eat("=") {
                break;
            }
            c.expect(",")?;
        }
    }
    let mnemonic = c.word()?;
    if op_from_text(mnemonic, &mut Attrs { items: Vec::new() })
        .is_err_and(|e| e.starts_with("unknown op"))
    {
        return c.err(format!("unknown op `{mnemonic}`"));
    }
    let first_result = results.first().map(|(_, t)| t.clone());
    let needs_result = |c: &Cursor| match &first_result {
        Some(t) => Ok(t.clone()),
        None => c.err(format!("`{mnemonic}` needs a typed result")),
    };
    let mut source_name = None;
    let mut source_value = None;
    if mnemonic.starts_with("input.") || mnemonic.starts_with("output.") || mnemonic == "param" {
        source_name = Some(c.string()?);
    } else if mnemonic == "constant" {
        source_value = Some(c.number::<f64>()?);
    }
    let mut operands = Vec::new();
    c.skip_ws();
    if c.rest.starts_with('%') {
        loop {
            let number = c.value_number()?;
            match values.get(&number) {
                Some(v) => operands.push(*v),
                None => return c.err(format!("%{number} is used before it is defined")),
            }
            if !c.eat(",") {
                break;
            }
        }
    }
    let mut attrs = parse_attribute_block(c)?;
    let mut op = match op_from_text(mnemonic, &mut attrs) {
        Ok(op) => op,
        Err(e) => return c.err(e),
    };
    if let Some((key, _)) = attrs.items.first() {
        return c.err(format!("unknown attribute `{key}` for `{mnemonic}`"));
    }
    match &mut op {
        Op::Input { name, ty, .. } => {
            *name = source_name.take().expect("read above");
            *ty = needs_result(c)?;
        }
        Op::Output { name, .. } => *name = source_name.take().expect("read above"),
        Op::Param { tensor, ty } => {
            *tensor = source_name.take().expect("read above");
            *ty = needs_result(c)?;
        }
        Op::Constant { value, dtype } => {
            *value = source_value.expect("read above");
            *dtype = needs_result(c)?.dtype;
        }
        _ => {}
    }
    c.skip_ws();
    if !c.rest.is_empty() {
        return c.err(format!("unexpected `{}`", c.rest));
    }
    let types = results.iter().map(|(_, t)| t.clone()).collect();
    let id = graph.add_typed(op, &operands, types);
    for (i, (number, _)) in results.iter().enumerate() {
        let v = Value {
            node: id,
            output: i as u32,
        };
        if values.insert(*number, v).is_some() {
            return c.err(format!("%{number} is defined twice"));
        }
    }
    Ok(())
}
