//! Traces the Griffin forward pass (GRIFFIN.md) into the IR: a `prefill` graph over a symbolic
//! number of tokens `T` and a `decode` graph over one token. Both take the carried state as
//! inputs and return it as outputs, so any number of calls compose into one pass.

use std::collections::{BTreeMap, HashMap};

use griffin_ir::{
    BinaryOp, DType, Dim, Graph, InputRole, IrError, Op, OutputRole, Shape, UnaryOp, Value,
    ValueType,
};

use crate::config::{BlockType, Config};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphKind {
    Prefill,
    Decode,
}

impl GraphKind {
    pub fn name(self) -> &'static str {
        match self {
            GraphKind::Prefill => "prefill",
            GraphKind::Decode => "decode",
        }
    }

    /// The token dimension of the graph's inputs and outputs.
    pub fn tokens(self) -> Dim {
        match self {
            GraphKind::Prefill => Dim::sym("T"),
            GraphKind::Decode => Dim::Fixed(1),
        }
    }
}

/// Names of the graph interface, shared by the interpreter session and later runtimes.
pub mod names {
    pub const TOKENS: &str = "ids";
    pub const START: &str = "start";
    pub const LOGITS: &str = "logits";

    pub fn conv_window(layer: usize) -> String {
        format!("layers.{layer}.conv_window")
    }
    pub fn rg_lru_state(layer: usize) -> String {
        format!("layers.{layer}.rg_lru_state")
    }
    pub fn keys(layer: usize) -> String {
        format!("layers.{layer}.keys")
    }
    pub fn values(layer: usize) -> String {
        format!("layers.{layer}.values")
    }
}

/// Param types for a checkpoint whose tensors all have one dtype (used for synthetic models).
pub fn uniform_param_types(config: &Config, dtype: DType) -> BTreeMap<String, ValueType> {
    config
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let dims: Vec<Dim> = shape.into_iter().map(Dim::from).collect();
            (name, ValueType::new(dtype, dims))
        })
        .collect()
}

struct Tracer<'a> {
    config: &'a Config,
    params: &'a BTreeMap<String, ValueType>,
    g: Graph,
    tokens: Dim,
    param_values: HashMap<String, Value>,
    constants: HashMap<(u64, DType), Value>,
    positions: Option<Value>,
    reset: Option<Value>,
}

/// Traces one graph. `params` gives the stored type of every tensor in
/// `config.expected_tensors()`.
pub fn trace(
    config: &Config,
    params: &BTreeMap<String, ValueType>,
    kind: GraphKind,
) -> Result<Graph, IrError> {
    let mut t = Tracer {
        config,
        params,
        g: Graph::new(kind.name()),
        tokens: kind.tokens(),
        param_values: HashMap::new(),
        constants: HashMap::new(),
        positions: None,
        reset: None,
    };
    t.forward()?;
    Ok(t.g)
}

impl Tracer<'_> {
    fn op(&mut self, op: Op, operands: &[Value]) -> Result<Value, IrError> {
        self.g.add1(op, operands)
    }

    fn results(&mut self, op: Op, operands: &[Value]) -> Result<Vec<Value>, IrError> {
        let n = op.num_results();
        let id = self.g.add(op, operands)?;
        Ok((0..n as u32)
            .map(|output| Value { node: id, output })
            .collect())
    }

    fn unary(&mut self, u: UnaryOp, x: Value) -> Result<Value, IrError> {
        self.op(Op::Unary(u), &[x])
    }

    fn binary(&mut self, b: BinaryOp, x: Value, y: Value) -> Result<Value, IrError> {
        self.op(Op::Binary(b), &[x, y])
    }

    fn constant(&mut self, value: f64, dtype: DType) -> Result<Value, IrError> {
        if let Some(v) = self.constants.get(&(value.to_bits(), dtype)) {
            return Ok(*v);
        }
        let v = self.op(Op::Constant { value, dtype }, &[])?;
        self.constants.insert((value.to_bits(), dtype), v);
        Ok(v)
    }

    fn input(&mut self, name: String, role: InputRole, ty: ValueType) -> Result<Value, IrError> {
        self.op(Op::Input { name, role, ty }, &[])
    }

    fn output(&mut self, name: String, role: OutputRole, v: Value) -> Result<(), IrError> {
        self.g.add(Op::Output { name, role }, &[v])?;
        Ok(())
    }

    fn state(&mut self, name: String, dims: Vec<Dim>) -> Result<Value, IrError> {
        self.input(name, InputRole::State, ValueType::new(DType::F32, dims))
    }

    fn param(&mut self, name: &str) -> Result<Value, IrError> {
        if let Some(v) = self.param_values.get(name) {
            return Ok(*v);
        }
        let ty = self
            .params
            .get(name)
            .cloned()
            .ok_or_else(|| IrError::Type {
                op: "param".into(),
                message: format!("no type given for tensor `{name}`"),
            })?;
        let v = self.op(
            Op::Param {
                tensor: name.to_string(),
                ty,
            },
            &[],
        )?;
        self.param_values.insert(name.to_string(), v);
        Ok(v)
    }

    /// A param widened to f32 for elementwise use (weights consumed by projections, norms and
    /// the convolution stay in their stored dtype).
    fn param_f32(&mut self, name: &str) -> Result<Value, IrError> {
        let p = self.param(name)?;
        if self.g.value_type(p)?.dtype == DType::F32 {
            Ok(p)
        } else {
            self.op(Op::Cast { to: DType::F32 }, &[p])
        }
    }

    /// `x·Wᵀ + b` for the projection `prefix` (`prefix.weight`, `prefix.bias`).
    fn linear(&mut self, x: Value, prefix: &str, bias: bool) -> Result<Value, IrError> {
        let w = self.param(&format!("{prefix}.weight"))?;
        if bias {
            let b = self.param(&format!("{prefix}.bias"))?;
            self.op(Op::linear(true), &[x, w, b])
        } else {
            self.op(Op::linear(false), &[x, w])
        }
    }

    fn rms_norm(&mut self, x: Value, weight: &str) -> Result<Value, IrError> {
        let w = self.param(weight)?;
        self.op(
            Op::RmsNorm {
                eps: self.config.eps,
                weight_offset: 1.0,
            },
            &[x, w],
        )
    }

    fn reshape(&mut self, x: Value, dims: Vec<Dim>) -> Result<Value, IrError> {
        self.op(Op::Reshape { shape: Shape(dims) }, &[x])
    }

    fn positions(&self) -> Value {
        self.positions.expect("positions are traced first")
    }

    /// `position == 0` as `bool[T,1]`, shared by every recurrent layer.
    fn reset(&mut self) -> Result<Value, IrError> {
        if let Some(r) = self.reset {
            return Ok(r);
        }
        let column = self.reshape(self.positions(), vec![self.tokens.clone(), Dim::Fixed(1)])?;
        let zero = self.constant(0.0, DType::I32)?;
        let r = self.binary(BinaryOp::Eq, column, zero)?;
        self.reset = Some(r);
        Ok(r)
    }

    fn forward(&mut self) -> Result<(), IrError> {
        let c = self.config;
        let ids = self.input(
            names::TOKENS.into(),
            InputRole::Tokens,
            ValueType::new(DType::I32, vec![self.tokens.clone()]),
        )?;
        let start = self.input(
            names::START.into(),
            InputRole::Position,
            ValueType::scalar(DType::I32),
        )?;
        self.positions = Some(self.op(Op::Positions, &[start, ids])?);

        let embed = self.param("model.embed_tokens.weight")?;
        let gathered = self.op(Op::Gather { scale: None }, &[embed, ids])?;
        let scale = self.constant(c.embed_scale() as f64, DType::F32)?;
        let mut x = self.binary(BinaryOp::Mul, gathered, scale)?;

        for (i, block) in c.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let h = self.rms_norm(x, &format!("{p}.temporal_pre_norm.weight"))?;
            let mixed = match block {
                BlockType::Recurrent => self.recurrent(i, h)?,
                BlockType::Attention => self.attention(i, h)?,
            };
            let r = self.binary(BinaryOp::Add, x, mixed)?;
            let h = self.rms_norm(r, &format!("{p}.channel_pre_norm.weight"))?;
            let m = self.mlp(&format!("{p}.mlp_block"), h)?;
            x = self.binary(BinaryOp::Add, r, m)?;
        }

        let x = self.rms_norm(x, "model.final_norm.weight")?;
        let logits = self.op(Op::linear(false), &[x, embed])?;
        let logits = self.op(Op::SoftCap { cap: c.soft_cap }, &[logits])?;
        self.output(names::LOGITS.into(), OutputRole::Logits, logits)
    }

    fn mlp(&mut self, prefix: &str, h: Value) -> Result<Value, IrError> {
        let gate = self.linear(h, &format!("{prefix}.gate_proj"), true)?;
        let gate = self.unary(UnaryOp::GeluTanh, gate)?;
        let up = self.linear(h, &format!("{prefix}.up_proj"), true)?;
        let product = self.binary(BinaryOp::Mul, gate, up)?;
        self.linear(product, &format!("{prefix}.down_proj"), true)
    }

    fn recurrent(&mut self, layer: usize, h: Value) -> Result<Value, IrError> {
        let c = self.config;
        let p = format!("model.layers.{layer}.temporal_block");
        let (l, k) = (c.lru_width, c.conv_width);

        let y = self.linear(h, &format!("{p}.linear_y"), true)?;
        let y = self.unary(UnaryOp::GeluTanh, y)?;
        let u = self.linear(h, &format!("{p}.linear_x"), true)?;

        let window = self.state(
            names::conv_window(layer),
            vec![Dim::from(k - 1), Dim::from(l)],
        )?;
        let conv_w = self.param(&format!("{p}.conv_1d.weight"))?;
        let conv_b = self.param(&format!("{p}.conv_1d.bias"))?;
        let positions = self.positions();
        let conv = self.results(
            Op::Conv1d { width: k as u32 },
            &[u, positions, window, conv_w, conv_b],
        )?;
        let (x, window_out) = (conv[0], conv[1]);

        let gate = |t: &mut Self, name: &str| -> Result<Value, IrError> {
            let w = t.param(&format!("{p}.rg_lru.{name}_weight"))?;
            let b = t.param(&format!("{p}.rg_lru.{name}_bias"))?;
            let z = t.op(Op::BlockDiagonalLinear { bias: true }, &[x, w, b])?;
            t.unary(UnaryOp::Sigmoid, z)
        };
        let input_gate = gate(self, "input_gate")?;
        let recurrent_gate = gate(self, "recurrent_gate")?;

        // log_a = -8 · recurrent_gate · softplus(recurrent_param), in the reference's order.
        let param = self.param_f32(&format!("{p}.rg_lru.recurrent_param"))?;
        let softplus = self.unary(UnaryOp::Softplus, param)?;
        let minus_eight = self.constant(-8.0, DType::F32)?;
        let scaled = self.binary(BinaryOp::Mul, minus_eight, recurrent_gate)?;
        let log_a = self.binary(BinaryOp::Mul, scaled, softplus)?;
        let a = self.unary(UnaryOp::Exp, log_a)?;

        // sqrt(1 - a²) computed as sqrt(-expm1(2·log_a)), which keeps its digits when a → 1;
        // 1 at the document start.
        let two = self.constant(2.0, DType::F32)?;
        let twice = self.binary(BinaryOp::Mul, two, log_a)?;
        let expm1 = self.unary(UnaryOp::Expm1, twice)?;
        let one_minus_a2 = self.unary(UnaryOp::Neg, expm1)?;
        let normaliser = self.unary(UnaryOp::Sqrt, one_minus_a2)?;
        let reset = self.reset()?;
        let one = self.constant(1.0, DType::F32)?;
        let normaliser = self.op(Op::Select, &[reset, one, normaliser])?;

        let gated = self.binary(BinaryOp::Mul, x, input_gate)?;
        let b = self.binary(BinaryOp::Mul, gated, normaliser)?;

        let state = self.state(names::rg_lru_state(layer), vec![Dim::from(l)])?;
        let scan = self.results(Op::LinearScan, &[a, b, positions, state])?;
        let (hidden, state_out) = (scan[0], scan[1]);

        let gated = self.binary(BinaryOp::Mul, hidden, y)?;
        let out = self.linear(gated, &format!("{p}.linear_out"), true)?;
        self.output(names::conv_window(layer), OutputRole::State, window_out)?;
        self.output(names::rg_lru_state(layer), OutputRole::State, state_out)?;
        Ok(out)
    }

    fn attention(&mut self, layer: usize, h: Value) -> Result<Value, IrError> {
        let c = self.config;
        let p = format!("model.layers.{layer}.temporal_block");
        let (heads, kv_heads, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let tokens = self.tokens.clone();

        let project = |t: &mut Self, name: &str, n: usize| -> Result<Value, IrError> {
            let flat = t.linear(h, &format!("{p}.{name}"), c.attention_bias)?;
            t.reshape(flat, vec![tokens.clone(), Dim::from(n), Dim::from(hd)])
        };
        let mut q = project(self, "q_proj", heads)?;
        let mut k = project(self, "k_proj", kv_heads)?;
        let v = project(self, "v_proj", kv_heads)?;

        let positions = self.positions();
        if c.rotary_dims > 0 {
            let rotary = Op::Rotary {
                theta: c.rope_theta,
                rotary_dims: c.rotary_dims as u32,
            };
            q = self.op(rotary.clone(), &[q, positions])?;
            k = self.op(rotary, &[k, positions])?;
        }

        let ring = vec![Dim::from(c.window), Dim::from(kv_heads), Dim::from(hd)];
        let keys = self.state(names::keys(layer), ring.clone())?;
        let values = self.state(names::values(layer), ring)?;
        let attn = self.results(
            Op::LocalAttention {
                window: c.window as u32,
                scale: 1.0 / (hd as f64).sqrt(),
                rotary: None,
            },
            &[q, k, v, positions, keys, values],
        )?;
        let flat = self.reshape(attn[0], vec![self.tokens.clone(), Dim::from(heads * hd)])?;
        let out = self.linear(flat, &format!("{p}.o_proj"), true)?;
        self.output(names::keys(layer), OutputRole::State, attn[1])?;
        self.output(names::values(layer), OutputRole::State, attn[2])?;
        Ok(out)
    }
}
