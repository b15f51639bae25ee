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
use crate::op::{BinaryOp, InputRole, Op, OutputRole, ReduceOp, UnaryOp};
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

fn attributes(op: &Op) -> Vec<(&'static str, String)> {
    match op {
        Op::Cast { to } => vec![("to", to.name().to_string())],
        Op::Reshape { shape } => vec![("shape", shape.to_string())],
        Op::Linear { bias } | Op::BlockDiagonalLinear { bias } => vec![("bias", bias.to_string())],
        Op::Reduce { axis, .. } => vec![("axis", axis.to_string())],
        Op::RmsNorm { eps, weight_offset } => vec![
            ("eps", float_text(*eps)),
            ("weight_offset", float_text(*weight_offset)),
        ],
        Op::SoftCap { cap } => vec![("cap", float_text(*cap))],
        Op::Conv1d { width } => vec![("width", width.to_string())],
        Op::Rotary { theta, rotary_dims } => vec![
            ("theta", float_text(*theta)),
            ("rotary_dims", rotary_dims.to_string()),
        ],
        Op::LocalAttention { window, scale } => vec![
            ("window", window.to_string()),
            ("scale", float_text(*scale)),
        ],
        _ => vec![],
    }
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

fn op_from_mnemonic(m: &str) -> Option<Op> {
    if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == m) {
        return Some(Op::Unary(u));
    }
    if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == m) {
        return Some(Op::Binary(b));
    }
    if let Some(r) = ReduceOp::ALL
        .into_iter()
        .find(|r| m.strip_prefix("reduce_") == Some(r.name()))
    {
        return Some(Op::Reduce { op: r, axis: 0 });
    }
    // Attribute fields are placeholders here; `parse_line` fills them in.
    let placeholder_ty = ValueType::scalar(DType::F32);
    Some(match m {
        "input.tokens" | "input.position" | "input.state" => Op::Input {
            name: String::new(),
            role: match m {
                "input.tokens" => InputRole::Tokens,
                "input.position" => InputRole::Position,
                _ => InputRole::State,
            },
            ty: placeholder_ty,
        },
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
            ty: placeholder_ty,
        },
        "constant" => Op::Constant {
            value: 0.0,
            dtype: DType::F32,
        },
        "positions" => Op::Positions,
        "cast" => Op::Cast { to: DType::F32 },
        "reshape" => Op::Reshape {
            shape: Shape::scalar(),
        },
        "gather" => Op::Gather,
        "linear" => Op::Linear { bias: false },
        "block_diagonal_linear" => Op::BlockDiagonalLinear { bias: false },
        "select" => Op::Select,
        "rms_norm" => Op::RmsNorm {
            eps: 0.0,
            weight_offset: 0.0,
        },
        "soft_cap" => Op::SoftCap { cap: 0.0 },
        "conv1d" => Op::Conv1d { width: 0 },
        "linear_scan" => Op::LinearScan,
        "rotary" => Op::Rotary {
            theta: 0.0,
            rotary_dims: 0,
        },
        "local_attention" => Op::LocalAttention {
            window: 0,
            scale: 0.0,
        },
        _ => return None,
    })
}

fn parse_attributes(c: &mut Cursor, op: &mut Op) -> Result<(), ParseError> {
    let expected: Vec<&str> = attributes(op).into_iter().map(|(k, _)| k).collect();
    if expected.is_empty() {
        return Ok(());
    }
    c.expect("{")?;
    for (i, key) in expected.iter().enumerate() {
        if i > 0 {
            c.expect(",")?;
        }
        let got = c.word()?;
        if got != *key {
            return c.err(format!("expected attribute `{key}`, got `{got}`"));
        }
        c.expect("=")?;
        match (&mut *op, *key) {
            (Op::Cast { to }, "to") => {
                let w = c.word()?;
                *to = match DType::from_name(w) {
                    Some(d) => d,
                    None => return c.err(format!("unknown dtype `{w}`")),
                };
            }
            (Op::Reshape { shape }, "shape") => *shape = c.shape()?,
            (Op::Linear { bias } | Op::BlockDiagonalLinear { bias }, "bias") => {
                *bias = c.number()?
            }
            (Op::Reduce { axis, .. }, "axis") => *axis = c.number()?,
            (Op::RmsNorm { eps, .. }, "eps") => *eps = c.number()?,
            (Op::RmsNorm { weight_offset, .. }, "weight_offset") => *weight_offset = c.number()?,
            (Op::SoftCap { cap }, "cap") => *cap = c.number()?,
            (Op::Conv1d { width }, "width") => *width = c.number()?,
            (Op::Rotary { theta, .. }, "theta") => *theta = c.number()?,
            (Op::Rotary { rotary_dims, .. }, "rotary_dims") => *rotary_dims = c.number()?,
            (Op::LocalAttention { window, .. }, "window") => *window = c.number()?,
            (Op::LocalAttention { scale, .. }, "scale") => *scale = c.number()?,
            _ => unreachable!("attributes() and this match list the same keys"),
        }
    }
    c.expect("}")
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
    let Some(mut op) = op_from_mnemonic(mnemonic) else {
        return c.err(format!("unknown op `{mnemonic}`"));
    };
    let first_result = results.first().map(|(_, t)| t.clone());
    let needs_result = |c: &Cursor| match &first_result {
        Some(t) => Ok(t.clone()),
        None => c.err(format!("`{mnemonic}` needs a typed result")),
    };
    match &mut op {
        Op::Input { name, ty, .. } => {
            *name = c.string()?;
            *ty = needs_result(c)?;
        }
        Op::Output { name, .. } => *name = c.string()?,
        Op::Param { tensor, ty } => {
            *tensor = c.string()?;
            *ty = needs_result(c)?;
        }
        Op::Constant { value, dtype } => {
            *value = c.number()?;
            *dtype = needs_result(c)?.dtype;
        }
        _ => {}
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
    parse_attributes(c, &mut op)?;
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
