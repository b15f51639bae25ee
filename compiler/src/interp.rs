//! The reference interpreter: executes any verified graph on the CPU, one op at a time.
//!
//! It is the oracle every pass and backend is checked against, so it is written to be read:
//! values are stored as f32 (ints as i64), each op computes in f64 and rounds its results to
//! f32 once. Weights are widened to f32 on first use and kept for later calls.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use griffin_ir::text::op_signature;
use griffin_ir::{
    verify, BinaryOp, DType, Dim, Epilogue, Expr, Graph, NodeId, Op, ReduceOp, UnaryOp, Value,
};

/// Where the interpreter gets weights from, by checkpoint tensor name.
pub trait WeightSource {
    fn load_f32(&self, tensor: &str) -> Result<Vec<f32>, String>;
}

impl WeightSource for crate::checkpoint::Checkpoint {
    fn load_f32(&self, tensor: &str) -> Result<Vec<f32>, String> {
        self.tensor_f32(tensor).map_err(|e| e.to_string())
    }
}

impl WeightSource for HashMap<String, Vec<f32>> {
    fn load_f32(&self, tensor: &str) -> Result<Vec<f32>, String> {
        self.get(tensor)
            .cloned()
            .ok_or_else(|| format!("no tensor `{tensor}`"))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// Every float dtype; bf16 and f16 values are exactly representable.
    Float(Vec<f32>),
    /// Every integer dtype.
    Int(Vec<i64>),
    Bool(Vec<bool>),
}

/// A runtime value: dtype, concrete shape and elements in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape {shape:?}"
        );
        Tensor {
            dtype: DType::F32,
            shape,
            data: Data::Float(values),
        }
    }

    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(shape, vec![0.0; n])
    }

    pub fn i32(shape: Vec<usize>, values: Vec<i64>) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape {shape:?}"
        );
        Tensor {
            dtype: DType::I32,
            shape,
            data: Data::Int(values),
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The float elements; panics on an int or bool tensor (a verified graph never asks).
    pub fn floats(&self) -> &[f32] {
        match &self.data {
            Data::Float(v) => v,
            _ => panic!("expected a float tensor, got {}", self.dtype),
        }
    }

    fn ints(&self) -> &[i64] {
        match &self.data {
            Data::Int(v) => v,
            _ => panic!("expected an int tensor, got {}", self.dtype),
        }
    }

    fn bools(&self) -> &[bool] {
        match &self.data {
            Data::Bool(v) => v,
            _ => panic!("expected a bool tensor, got {}", self.dtype),
        }
    }
}

fn round_to(dtype: DType, x: f64) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(x).to_f32(),
        DType::F16 => half::f16::from_f64(x).to_f32(),
        _ => x as f32,
    }
}

fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

fn softplus(x: f64) -> f64 {
    // log(1 + e^x) without overflow for large x.
    if x > 30.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn unary(u: UnaryOp, x: f64) -> f64 {
    match u {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Expm1 => x.exp_m1(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Softplus => softplus(x),
        UnaryOp::GeluTanh => gelu_tanh(x),
    }
}

fn binary_float(b: BinaryOp, x: f64, y: f64) -> f64 {
    match b {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        BinaryOp::Max => x.max(y),
        BinaryOp::Min => x.min(y),
        BinaryOp::Eq | BinaryOp::Lt => unreachable!("comparisons handled apart"),
    }
}

fn binary_int(b: BinaryOp, x: i64, y: i64) -> i64 {
    match b {
        BinaryOp::Add => x.wrapping_add(y),
        BinaryOp::Sub => x.wrapping_sub(y),
        BinaryOp::Mul => x.wrapping_mul(y),
        BinaryOp::Max => x.max(y),
        BinaryOp::Min => x.min(y),
        BinaryOp::Div | BinaryOp::Eq | BinaryOp::Lt => {
            unreachable!("rejected by the verifier or handled apart")
        }
    }
}

/// Output shape of numpy broadcasting and, for each operand, the offset of every output element.
fn broadcast_offsets(shapes: &[&[usize]]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let padded: Vec<Vec<usize>> = shapes
        .iter()
        .map(|s| {
            let mut p = vec![1; rank - s.len()];
            p.extend_from_slice(s);
            p
        })
        .collect();
    let out: Vec<usize> = (0..rank)
        .map(|i| padded.iter().map(|p| p[i]).max().unwrap_or(1))
        .collect();
    let total: usize = out.iter().product();
    let offsets = padded
        .iter()
        .map(|p| {
            // Row-major strides, 0 along broadcast dimensions.
            let mut strides = vec![0; rank];
            let mut acc = 1;
            for i in (0..rank).rev() {
                strides[i] = if p[i] == 1 { 0 } else { acc };
                acc *= p[i];
            }
            let mut offs = Vec::with_capacity(total);
            let mut index = vec![0usize; rank];
            for _ in 0..total {
                offs.push(index.iter().zip(&strides).map(|(i, s)| i * s).sum());
                for d in (0..rank).rev() {
                    index[d] += 1;
                    if index[d] < out[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
            offs
        })
        .collect();
    (out, offsets)
}

pub struct Interpreter<'w> {
    weights: &'w dyn WeightSource,
    params: RefCell<HashMap<String, Rc<Tensor>>>,
    /// Values computed from weights and constants alone (packed, folded weights), by their
    /// expression, so each is computed once as a backend would at build time.
    weight_values: RefCell<HashMap<String, Vec<Rc<Tensor>>>>,
}

type Res<T> = Result<T, String>;

impl<'w> Interpreter<'w> {
    pub fn new(weights: &'w dyn WeightSource) -> Interpreter<'w> {
        Interpreter {
            weights,
            params: RefCell::new(HashMap::new()),
            weight_values: RefCell::new(HashMap::new()),
        }
    }

    fn param(&self, tensor: &str, dtype: DType, shape: Vec<usize>) -> Res<Rc<Tensor>> {
        if let Some(t) = self.params.borrow().get(tensor) {
            return Ok(t.clone());
        }
        let values = self.weights.load_f32(tensor)?;
        if values.len() != shape.iter().product::<usize>() {
            return Err(format!(
                "tensor `{tensor}` has {} elements, the graph expects shape {shape:?}",
                values.len()
            ));
        }
        let t = Rc::new(Tensor {
            dtype,
            shape,
            data: Data::Float(values),
        });
        self.params
            .borrow_mut()
            .insert(tensor.to_string(), t.clone());
        Ok(t)
    }

    /// Runs a graph on named inputs and returns its named outputs.
    pub fn run(
        &self,
        graph: &Graph,
        inputs: &HashMap<String, Tensor>,
    ) -> Res<HashMap<String, Tensor>> {
        verify(graph).map_err(|e| format!("graph {} does not verify: {e}", graph.name))?;
        let order = graph.topo_order();
        Ok(self.execute(graph, &order, inputs)?.1)
    }

    /// Values of weight expressions (or params) of a graph, as a backend packs them.
    pub fn evaluate_weights(&self, graph: &Graph, wanted: &[Value]) -> Res<Vec<Tensor>> {
        let mut needed: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = wanted.iter().map(|v| v.node).collect();
        while let Some(id) = stack.pop() {
            if needed.insert(id) {
                stack.extend(graph.operands(id).iter().map(|v| v.node));
            }
        }
        let order: Vec<NodeId> = graph
            .topo_order()
            .into_iter()
            .filter(|id| needed.contains(id))
            .collect();
        let (values, _) = self.execute(graph, &order, &HashMap::new())?;
        Ok(wanted.iter().map(|v| values[v].as_ref().clone()).collect())
    }

    /// Runs the nodes of `order` (a topological order of the nodes to run).
    #[allow(clippy::type_complexity)]
    fn execute(
        &self,
        graph: &Graph,
        order: &[NodeId],
        inputs: &HashMap<String, Tensor>,
    ) -> Res<(HashMap<Value, Rc<Tensor>>, HashMap<String, Tensor>)> {
        let mut symbols: HashMap<String, usize> = HashMap::new();
        let mut values: HashMap<Value, Rc<Tensor>> = HashMap::new();
        let mut outputs = HashMap::new();
        // Expression key of each node computed from weights and constants alone.
        let mut weight_keys: HashMap<NodeId, String> = HashMap::new();
        for &id in order {
            let node = graph.node(id);
            let operand_values = graph.operands(id);
            let weight_key = match &node.op {
                Op::Param { .. } | Op::Constant { .. } => Some(op_signature(&node.op)),
                Op::Input { .. } | Op::Output { .. } => None,
                op if !op.carries_state() && !operand_values.is_empty() => operand_values
                    .iter()
                    .map(|v| {
                        weight_keys
                            .get(&v.node)
                            .map(|k| format!("{k}#{}", v.output))
                    })
                    .collect::<Option<Vec<_>>>()
                    .map(|parts| format!("{}({})", op_signature(op), parts.join(", "))),
                _ => None,
            };
            if let Some(key) = &weight_key {
                weight_keys.insert(id, key.clone());
                let cached = self.weight_values.borrow().get(key).cloned();
                if let Some(results) = cached {
                    for (i, t) in results.into_iter().enumerate() {
                        values.insert(
                            Value {
                                node: id,
                                output: i as u32,
                            },
                            t,
                        );
                    }
                    continue;
                }
            }
            let operands: Vec<Rc<Tensor>> =
                operand_values.iter().map(|v| values[v].clone()).collect();
            let x: Vec<&Tensor> = operands.iter().map(|t| t.as_ref()).collect();
            let results: Vec<Tensor> = match &node.op {
                Op::Input { name, ty, .. } => {
                    let t = inputs
                        .get(name)
                        .ok_or_else(|| format!("missing input `{name}`"))?;
                    bind(&mut symbols, name, &ty.shape.0, &t.shape)?;
                    if t.dtype != ty.dtype {
                        return Err(format!(
                            "input `{name}` is {}, expected {}",
                            t.dtype, ty.dtype
                        ));
                    }
                    vec![t.clone()]
                }
                Op::Output { name, .. } => {
                    outputs.insert(name.clone(), x[0].clone());
                    vec![]
                }
                Op::Param { tensor, ty } => {
                    let shape = resolve(&symbols, &ty.shape.0)?;
                    let t = self.param(tensor, ty.dtype, shape)?;
                    values.insert(
                        Value {
                            node: id,
                            output: 0,
                        },
                        t,
                    );
                    continue;
                }
                other => eval(other, &x, &symbols)?,
            };
            let results: Vec<Rc<Tensor>> = results.into_iter().map(Rc::new).collect();
            if let Some(key) = weight_key {
                if !matches!(node.op, Op::Constant { .. }) {
                    self.weight_values.borrow_mut().insert(key, results.clone());
                }
            }
            for (i, t) in results.into_iter().enumerate() {
                values.insert(
                    Value {
                        node: id,
                        output: i as u32,
                    },
                    t,
                );
            }
        }
        Ok((values, outputs))
    }
}

fn bind(
    symbols: &mut HashMap<String, usize>,
    name: &str,
    declared: &[Dim],
    actual: &[usize],
) -> Res<()> {
    if declared.len() != actual.len() {
        return Err(format!(
            "input `{name}` has shape {actual:?}, expected rank {}",
            declared.len()
        ));
    }
    for (d, &n) in declared.iter().zip(actual) {
        match d {
            Dim::Fixed(f) if *f as usize == n => {}
            Dim::Fixed(f) => {
                return Err(format!(
                    "input `{name}` has shape {actual:?}, expected {f} at a fixed dimension"
                ))
            }
            Dim::Sym(s) => match symbols.get(s) {
                Some(&bound) if bound != n => {
                    return Err(format!(
                        "input `{name}`: {s} is {n} here but {bound} elsewhere"
                    ))
                }
                _ => {
                    symbols.insert(s.clone(), n);
                }
            },
        }
    }
    Ok(())
}

fn resolve(symbols: &HashMap<String, usize>, dims: &[Dim]) -> Res<Vec<usize>> {
    dims.iter()
        .map(|d| match d {
            Dim::Fixed(n) => Ok(*n as usize),
            Dim::Sym(s) => symbols
                .get(s)
                .copied()
                .ok_or_else(|| format!("symbol {s} is unbound")),
        })
        .collect()
}

/// Evaluates one non-source op.
fn eval(op: &Op, x: &[&Tensor], symbols: &HashMap<String, usize>) -> Res<Vec<Tensor>> {
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Input { .. } | Op::Output { .. } | Op::Param { .. } => unreachable!("handled by run"),
        Op::Constant { value, dtype } => one(if dtype.is_float() {
            Tensor {
                dtype: *dtype,
                shape: vec![],
                data: Data::Float(vec![round_to(*dtype, *value)]),
            }
        } else {
            Tensor {
                dtype: *dtype,
                shape: vec![],
                data: Data::Int(vec![*value as i64]),
            }
        }),
        Op::Positions => {
            let start = x[0].ints()[0];
            let t = x[1].shape[0];
            one(Tensor::i32(
                vec![t],
                (0..t as i64).map(|i| start + i).collect(),
            ))
        }
        Op::Cast { to } => one(cast(x[0], *to)),
        Op::Reshape { shape } => {
            let mut t = x[0].clone();
            t.shape = resolve(symbols, &shape.0)?;
            one(t)
        }
        Op::Gather { scale } => gather(x[0], x[1], *scale).map(|t| vec![t]),
        Op::Linear {
            bias,
            norm,
            epilogue,
            residual,
            splits,
        } => {
            let mut rest = x.iter().copied();
            let mut input = rest.next().expect("arity checked").clone();
            if let Some(n) = norm {
                input = rms_norm(&input, rest.next().expect("arity"), n.eps, n.weight_offset);
            }
            let w = rest.next().expect("arity");
            let b = if *bias { rest.next() } else { None };
            let mut out = linear(&input, w, b);
            match epilogue {
                Epilogue::None => {}
                Epilogue::GeGlu => out = geglu(&out),
                Epilogue::SoftCap(cap) => out = soft_cap(&out, *cap),
            }
            if *residual {
                out = binary(BinaryOp::Add, rest.next().expect("arity"), &out);
            }
            Ok(split_columns(out, splits))
        }
        Op::Concat { axis, .. } => one(concat(x, *axis as usize)),
        Op::RgLru { width, gate_output } => Ok(rg_lru(x, *width as usize, *gate_output)),
        Op::Elementwise { body } => one(elementwise(body, x, symbols)?),
        Op::BlockDiagonalLinear { .. } => one(block_diagonal_linear(x[0], x[1], x.get(2).copied())),
        Op::Unary(u) => {
            let v = x[0]
                .floats()
                .iter()
                .map(|&a| round_to(x[0].dtype, unary(*u, a as f64)))
                .collect();
            one(Tensor {
                dtype: x[0].dtype,
                shape: x[0].shape.clone(),
                data: Data::Float(v),
            })
        }
        Op::Binary(b) => one(binary(*b, x[0], x[1])),
        Op::Select => {
            let (shape, offs) = broadcast_offsets(&[&x[0].shape, &x[1].shape, &x[2].shape]);
            let cond = x[0].bools();
            let pick = |i: usize| cond[offs[0][i]];
            let n = offs[0].len();
            let data = match (&x[1].data, &x[2].data) {
                (Data::Float(a), Data::Float(b)) => Data::Float(select(n, pick, a, b, &offs)),
                (Data::Int(a), Data::Int(b)) => Data::Int(select(n, pick, a, b, &offs)),
                (Data::Bool(a), Data::Bool(b)) => Data::Bool(select(n, pick, a, b, &offs)),
                _ => return Err("select branches differ in kind".into()),
            };
            one(Tensor {
                dtype: x[1].dtype,
                shape,
                data,
            })
        }
        Op::Reduce { op, axis } => one(reduce(*op, *axis as usize, x[0])),
        Op::RmsNorm { eps, weight_offset } => one(rms_norm(x[0], x[1], *eps, *weight_offset)),
        Op::SoftCap { cap } => one(soft_cap(x[0], *cap)),
        Op::Conv1d { width } => Ok(conv1d(x[0], x[1], x[2], x[3], x[4], *width as usize)),
        Op::LinearScan => Ok(linear_scan(x[0], x[1], x[2], x[3])),
        Op::Rotary { theta, rotary_dims } => one(rotary(x[0], x[1], *theta, *rotary_dims as usize)),
        Op::LocalAttention {
            window,
            scale,
            rotary: spec,
        } => match spec {
            None => Ok(local_attention(x, *window as usize, *scale)),
            Some(r) => {
                let q = rotary(x[0], x[3], r.theta, r.dims as usize);
                let k = rotary(x[1], x[3], r.theta, r.dims as usize);
                let mut operands = x.to_vec();
                operands[0] = &q;
                operands[1] = &k;
                Ok(local_attention(&operands, *window as usize, *scale))
            }
        },
    }
}

/// Element i of the broadcast result: `a` where `pick(i)`, else `b`.
fn select<T: Copy>(
    n: usize,
    pick: impl Fn(usize) -> bool,
    a: &[T],
    b: &[T],
    offs: &[Vec<usize>],
) -> Vec<T> {
    (0..n)
        .map(|i| {
            if pick(i) {
                a[offs[1][i]]
            } else {
                b[offs[2][i]]
            }
        })
        .collect()
}

fn cast(x: &Tensor, to: DType) -> Tensor {
    let data = match (&x.data, to) {
        (Data::Float(v), t) if t.is_float() => {
            Data::Float(v.iter().map(|&a| round_to(t, a as f64)).collect())
        }
        (Data::Float(v), DType::Bool) => Data::Bool(v.iter().map(|&a| a != 0.0).collect()),
        (Data::Float(v), _) => Data::Int(v.iter().map(|&a| a as i64).collect()),
        (Data::Int(v), t) if t.is_float() => {
            Data::Float(v.iter().map(|&a| round_to(t, a as f64)).collect())
        }
        (Data::Int(v), DType::Bool) => Data::Bool(v.iter().map(|&a| a != 0).collect()),
        (Data::Int(v), t) => Data::Int(v.iter().map(|&a| wrap_int(t, a)).collect()),
        (Data::Bool(v), t) if t.is_float() => {
            Data::Float(v.iter().map(|&a| a as u8 as f32).collect())
        }
        (Data::Bool(v), DType::Bool) => Data::Bool(v.clone()),
        (Data::Bool(v), _) => Data::Int(v.iter().map(|&a| a as i64).collect()),
    };
    Tensor {
        dtype: to,
        shape: x.shape.clone(),
        data,
    }
}

fn wrap_int(to: DType, a: i64) -> i64 {
    match to {
        DType::I32 => a as i32 as i64,
        DType::I8 => a as i8 as i64,
        _ => a,
    }
}

fn gather(table: &Tensor, ids: &Tensor, scale: Option<f64>) -> Res<Tensor> {
    let (vocab, width) = (table.shape[0], table.shape[1]);
    let t = table.floats();
    let mut out = Vec::with_capacity(ids.len() * width);
    for &id in ids.ints() {
        if id < 0 || id as usize >= vocab {
            return Err(format!(
                "token id {id} is out of range for a table of {vocab} rows"
            ));
        }
        let row = &t[id as usize * width..(id as usize + 1) * width];
        match scale {
            None => out.extend_from_slice(row),
            Some(s) => out.extend(row.iter().map(|&v| (v as f64 * s) as f32)),
        }
    }
    Ok(Tensor::f32(vec![ids.len(), width], out))
}

fn soft_cap(x: &Tensor, cap: f64) -> Tensor {
    let v = x
        .floats()
        .iter()
        .map(|&a| round_to(x.dtype, cap * (a as f64 / cap).tanh()))
        .collect();
    Tensor {
        dtype: x.dtype,
        shape: x.shape.clone(),
        data: Data::Float(v),
    }
}

/// `gelu(first half) · second half` along the last axis.
fn geglu(z: &Tensor) -> Tensor {
    let width = *z.shape.last().expect("rank >= 1");
    let half = width / 2;
    let mut out = Vec::with_capacity(z.len() / 2);
    for row in z.floats().chunks_exact(width) {
        for j in 0..half {
            out.push((gelu_tanh(row[j] as f64) * row[half + j] as f64) as f32);
        }
    }
    let mut shape = z.shape.clone();
    *shape.last_mut().expect("rank >= 1") = half;
    Tensor::f32(shape, out)
}

/// Cuts the last axis into consecutive column blocks; no splits gives the tensor back.
fn split_columns(z: Tensor, splits: &[u64]) -> Vec<Tensor> {
    if splits.is_empty() {
        return vec![z];
    }
    let width = *z.shape.last().expect("rank >= 1");
    let mut start = 0;
    splits
        .iter()
        .map(|&n| {
            let n = n as usize;
            let values = z
                .floats()
                .chunks_exact(width)
                .flat_map(|row| row[start..start + n].iter().copied())
                .collect();
            start += n;
            let mut shape = z.shape.clone();
            *shape.last_mut().expect("rank >= 1") = n;
            Tensor::f32(shape, values)
        })
        .collect()
}

fn concat(parts: &[&Tensor], axis: usize) -> Tensor {
    let first = parts[0];
    let outer: usize = first.shape[..axis].iter().product();
    let inner: usize = first.shape[axis + 1..].iter().product();
    let mut out = Vec::new();
    for o in 0..outer {
        for p in parts {
            let block = p.shape[axis] * inner;
            out.extend_from_slice(&p.floats()[o * block..(o + 1) * block]);
        }
    }
    let mut shape = first.shape.clone();
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    Tensor {
        dtype: first.dtype,
        shape,
        data: Data::Float(out),
    }
}

/// The fused recurrent operation, composed from the same pieces as the unfused graph but
/// keeping the decay and normaliser in f64 between them.
fn rg_lru(x: &[&Tensor], width: usize, gate_output: bool) -> Vec<Tensor> {
    let conv = conv1d(x[0], x[1], x[2], x[3], x[4], width);
    let c = &conv[0];
    let input_gate = block_diagonal_linear(c, x[5], Some(x[6]));
    let recurrent_gate = block_diagonal_linear(c, x[7], Some(x[8]));
    let (decay_rate, state, positions) = (x[9].floats(), x[10], x[1].ints());
    let channels = decay_rate.len();
    let sigmoid = |v: f32| unary(UnaryOp::Sigmoid, v as f64);
    let mut a = Vec::with_capacity(c.len());
    let mut b = Vec::with_capacity(c.len());
    for (i, &cv) in c.floats().iter().enumerate() {
        let (t, ch) = (i / channels, i % channels);
        let log_a = -8.0 * sigmoid(recurrent_gate.floats()[i]) * decay_rate[ch] as f64;
        let normaliser = if positions[t] == 0 {
            1.0
        } else {
            (-(2.0 * log_a).exp_m1()).sqrt()
        };
        a.push(log_a.exp() as f32);
        b.push((cv as f64 * sigmoid(input_gate.floats()[i]) * normaliser) as f32);
    }
    let shape = c.shape.clone();
    let scan = linear_scan(
        &Tensor::f32(shape.clone(), a),
        &Tensor::f32(shape.clone(), b),
        x[1],
        state,
    );
    let mut out = scan[0].clone();
    if gate_output {
        let y = x[11].floats();
        let gated = out
            .floats()
            .iter()
            .zip(y)
            .map(|(&h, &yv)| (h as f64 * gelu_tanh(yv as f64)) as f32)
            .collect();
        out = Tensor::f32(shape, gated);
    }
    vec![out, conv[1].clone(), scan[1].clone()]
}

/// A fused elementwise tree, evaluated node by node with the unfused ops' own rules.
fn elementwise(body: &Expr, x: &[&Tensor], symbols: &HashMap<String, usize>) -> Res<Tensor> {
    let apply = |op: Op, operands: &[&Tensor]| -> Res<Tensor> {
        Ok(eval(&op, operands, symbols)?.remove(0))
    };
    match body {
        Expr::Operand(i) => Ok(x[*i as usize].clone()),
        Expr::Unary(u, a) => apply(Op::Unary(*u), &[&elementwise(a, x, symbols)?]),
        Expr::Binary(b, p, q) => apply(
            Op::Binary(*b),
            &[&elementwise(p, x, symbols)?, &elementwise(q, x, symbols)?],
        ),
        Expr::Select(c, p, q) => apply(
            Op::Select,
            &[
                &elementwise(c, x, symbols)?,
                &elementwise(p, x, symbols)?,
                &elementwise(q, x, symbols)?,
            ],
        ),
        Expr::SoftCap(cap, a) => Ok(soft_cap(&elementwise(a, x, symbols)?, *cap)),
        Expr::Cast(to, a) => Ok(cast(&elementwise(a, x, symbols)?, *to)),
    }
}

fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let (out_dim, in_dim) = (w.shape[0], w.shape[1]);
    let rows = x.len() / in_dim.max(1);
    let (xv, wv) = (x.floats(), w.floats());
    let mut out = Vec::with_capacity(rows * out_dim);
    for r in 0..rows {
        let xr = &xv[r * in_dim..(r + 1) * in_dim];
        for o in 0..out_dim {
            let wr = &wv[o * in_dim..(o + 1) * in_dim];
            let mut acc: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            if let Some(b) = bias {
                acc += b.floats()[o] as f64;
            }
            out.push(acc as f32);
        }
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("rank >= 1") = out_dim;
    Tensor::f32(shape, out)
}

fn block_diagonal_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let (heads, block) = (w.shape[0], w.shape[1]);
    let width = heads * block;
    let rows = x.len() / width.max(1);
    let (xv, wv) = (x.floats(), w.floats());
    let mut out = vec![0f32; rows * width];
    for r in 0..rows {
        for h in 0..heads {
            for j in 0..block {
                let mut acc = bias.map_or(0.0, |b| b.floats()[h * block + j] as f64);
                for i in 0..block {
                    acc += xv[r * width + h * block + i] as f64
                        * wv[(h * block + i) * block + j] as f64;
                }
                out[r * width + h * block + j] = acc as f32;
            }
        }
    }
    Tensor::f32(x.shape.clone(), out)
}

fn binary(b: BinaryOp, x: &Tensor, y: &Tensor) -> Tensor {
    let (shape, offs) = broadcast_offsets(&[&x.shape, &y.shape]);
    let n = offs[0].len();
    let data = match (&x.data, &y.data) {
        (Data::Float(a), Data::Float(c)) => {
            let pairs = (0..n).map(|i| (a[offs[0][i]] as f64, c[offs[1][i]] as f64));
            match b {
                BinaryOp::Eq => Data::Bool(pairs.map(|(p, q)| p == q).collect()),
                BinaryOp::Lt => Data::Bool(pairs.map(|(p, q)| p < q).collect()),
                _ => Data::Float(
                    pairs
                        .map(|(p, q)| round_to(x.dtype, binary_float(b, p, q)))
                        .collect(),
                ),
            }
        }
        (Data::Int(a), Data::Int(c)) => {
            let pairs = (0..n).map(|i| (a[offs[0][i]], c[offs[1][i]]));
            match b {
                BinaryOp::Eq => Data::Bool(pairs.map(|(p, q)| p == q).collect()),
                BinaryOp::Lt => Data::Bool(pairs.map(|(p, q)| p < q).collect()),
                _ => Data::Int(
                    pairs
                        .map(|(p, q)| wrap_int(x.dtype, binary_int(b, p, q)))
                        .collect(),
                ),
            }
        }
        _ => unreachable!("the verifier requires operands of one dtype"),
    };
    let dtype = if b.is_comparison() {
        DType::Bool
    } else {
        x.dtype
    };
    Tensor { dtype, shape, data }
}

fn reduce(op: ReduceOp, axis: usize, x: &Tensor) -> Tensor {
    let outer: usize = x.shape[..axis].iter().product();
    let n = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let v = x.floats();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let items = (0..n).map(|k| v[(o * n + k) * inner + i] as f64);
            let r = match op {
                ReduceOp::Sum => items.sum(),
                ReduceOp::Mean => items.sum::<f64>() / n as f64,
                ReduceOp::Max => items.fold(f64::NEG_INFINITY, f64::max),
            };
            out.push(round_to(x.dtype, r));
        }
    }
    let mut shape = x.shape.clone();
    shape.remove(axis);
    Tensor {
        dtype: x.dtype,
        shape,
        data: Data::Float(out),
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, offset: f64) -> Tensor {
    let d = w.shape[0];
    let (xv, wv) = (x.floats(), w.floats());
    let mut out = Vec::with_capacity(xv.len());
    for row in xv.chunks_exact(d.max(1)) {
        let mean_sq = row.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / d as f64;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        out.extend(
            row.iter()
                .zip(wv)
                .map(|(&a, &g)| (a as f64 * inv * (offset + g as f64)) as f32),
        );
    }
    Tensor::f32(x.shape.clone(), out)
}

fn conv1d(
    x: &Tensor,
    positions: &Tensor,
    window: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    k: usize,
) -> Vec<Tensor> {
    let (t_len, c) = (x.shape[0], x.shape[1]);
    let (xv, win, wv, bv) = (x.floats(), window.floats(), w.floats(), bias.floats());
    let pos = positions.ints();
    // Input at token offset j relative to the call (negative: from the carried window).
    let input = |j: isize, ch: usize| -> f64 {
        if j >= 0 {
            xv[j as usize * c + ch] as f64
        } else {
            win[((k - 1) as isize + j) as usize * c + ch] as f64
        }
    };
    let mut out = vec![0f32; t_len * c];
    for t in 0..t_len {
        for ch in 0..c {
            let mut acc = bv[ch] as f64;
            for tap in 0..k {
                let back = (k - 1 - tap) as i64;
                if pos[t] - back < 0 {
                    continue; // before the document start: zero
                }
                acc += wv[ch * k + tap] as f64 * input(t as isize - back as isize, ch);
            }
            out[t * c + ch] = acc as f32;
        }
    }
    let mut window_out = vec![0f32; (k - 1) * c];
    for r in 0..k - 1 {
        let j = t_len as isize - (k - 1) as isize + r as isize;
        for ch in 0..c {
            window_out[r * c + ch] = input(j, ch) as f32;
        }
    }
    vec![
        Tensor::f32(vec![t_len, c], out),
        Tensor::f32(vec![k - 1, c], window_out),
    ]
}

fn linear_scan(a: &Tensor, b: &Tensor, positions: &Tensor, state: &Tensor) -> Vec<Tensor> {
    let (t_len, c) = (a.shape[0], a.shape[1]);
    let (av, bv, pos) = (a.floats(), b.floats(), positions.ints());
    let mut h: Vec<f64> = state.floats().iter().map(|&s| s as f64).collect();
    let mut out = vec![0f32; t_len * c];
    for t in 0..t_len {
        for ch in 0..c {
            let decay = if pos[t] == 0 {
                0.0
            } else {
                av[t * c + ch] as f64
            };
            h[ch] = decay * h[ch] + bv[t * c + ch] as f64;
            out[t * c + ch] = h[ch] as f32;
        }
    }
    vec![
        Tensor::f32(vec![t_len, c], out),
        Tensor::f32(vec![c], h.iter().map(|&s| s as f32).collect()),
    ]
}

fn rotary(x: &Tensor, positions: &Tensor, theta: f64, rotary_dims: usize) -> Tensor {
    let (heads, hd) = (x.shape[1], x.shape[2]);
    let half = rotary_dims / 2;
    let mut out = x.floats().to_vec();
    for (t, &p) in positions.ints().iter().enumerate() {
        for i in 0..half {
            let inv_freq = theta.powf(-(2.0 * i as f64) / rotary_dims as f64);
            let angle = p as f64 * inv_freq;
            let (sin, cos) = angle.sin_cos();
            for h in 0..heads {
                let base = (t * heads + h) * hd;
                let (a, b) = (
                    x.floats()[base + i] as f64,
                    x.floats()[base + i + half] as f64,
                );
                out[base + i] = (a * cos - b * sin) as f32;
                out[base + i + half] = (b * cos + a * sin) as f32;
            }
        }
    }
    Tensor::f32(x.shape.clone(), out)
}

fn local_attention(x: &[&Tensor], window: usize, scale: f64) -> Vec<Tensor> {
    let (q, k, v, positions, keys, values) = (x[0], x[1], x[2], x[3], x[4], x[5]);
    let (t_len, heads, hd) = (q.shape[0], q.shape[1], q.shape[2]);
    let kv_heads = k.shape[1];
    let group = heads / kv_heads;
    let pos = positions.ints();
    let start = pos.first().copied().unwrap_or(0);
    let (qv, kv, vv, ring_k, ring_v) = (
        q.floats(),
        k.floats(),
        v.floats(),
        keys.floats(),
        values.floats(),
    );

    // Candidate keys: ring slots from before this call, then this call's own tokens.
    // Each is (position, key row, value row) with rows as slices of hd.
    let mut candidates: Vec<(i64, &[f32], &[f32])> = Vec::new();
    for slot in 0..window {
        if start == 0 {
            break;
        }
        let p = start - 1 - (start - 1 - slot as i64).rem_euclid(window as i64);
        if p >= 0 {
            candidates.push((
                p,
                &ring_k[slot * kv_heads * hd..],
                &ring_v[slot * kv_heads * hd..],
            ));
        }
    }
    for t in 0..t_len {
        candidates.push((pos[t], &kv[t * kv_heads * hd..], &vv[t * kv_heads * hd..]));
    }

    let mut out = vec![0f32; t_len * heads * hd];
    for t in 0..t_len {
        let p = pos[t];
        for h in 0..heads {
            let g = h / group;
            let qrow = &qv[(t * heads + h) * hd..(t * heads + h + 1) * hd];
            let visible: Vec<(f64, &[f32])> = candidates
                .iter()
                .filter(|(kp, ..)| *kp <= p && *kp > p - window as i64)
                .map(|(_, krow, vrow)| {
                    let key = &krow[g * hd..(g + 1) * hd];
                    let score = qrow
                        .iter()
                        .zip(key)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale;
                    (score, &vrow[g * hd..(g + 1) * hd])
                })
                .collect();
            let max = visible
                .iter()
                .map(|(s, _)| *s)
                .fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = visible.iter().map(|(s, _)| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..hd {
                let acc: f64 = visible
                    .iter()
                    .zip(&weights)
                    .map(|((_, vrow), w)| w * vrow[d] as f64)
                    .sum();
                out[(t * heads + h) * hd + d] = (acc / total) as f32;
            }
        }
    }

    let mut new_k = ring_k.to_vec();
    let mut new_v = ring_v.to_vec();
    let row = kv_heads * hd;
    for t in 0..t_len {
        let slot = pos[t].rem_euclid(window as i64) as usize;
        new_k[slot * row..(slot + 1) * row].copy_from_slice(&kv[t * row..(t + 1) * row]);
        new_v[slot * row..(slot + 1) * row].copy_from_slice(&vv[t * row..(t + 1) * row]);
    }
    vec![
        Tensor::f32(q.shape.clone(), out),
        Tensor::f32(keys.shape.clone(), new_k),
        Tensor::f32(values.shape.clone(), new_v),
    ]
}
