//! The closed set of operations. Each op documents its operands in slot order and its results.
//!
//! The level is chosen so that passes can rewrite what Griffin computes: projections, the
//! recurrence and attention are explicit ops with their carried state as operands and results;
//! gates, activations and the RG-LRU normaliser are decomposed into elementwise ops so that a
//! fusion pass can see and regroup them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::types::{DType, Shape, ValueType};

/// What a graph input carries; the runtime feeds each kind differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InputRole {
    /// Token ids of this call, `i32[T]`.
    Tokens,
    /// Position of the first token of this call in the document, `i32[]`.
    Position,
    /// Carried state read at the start of the call; paired with an `Output` of role `State`
    /// and the same name.
    State,
}

/// What a graph output carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputRole {
    Logits,
    /// Carried state written at the end of the call; paired with the `State` input of the
    /// same name.
    State,
}

impl InputRole {
    pub fn name(self) -> &'static str {
        match self {
            InputRole::Tokens => "tokens",
            InputRole::Position => "position",
            InputRole::State => "state",
        }
    }
}

impl OutputRole {
    pub fn name(self) -> &'static str {
        match self {
            OutputRole::Logits => "logits",
            OutputRole::State => "state",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnaryOp {
    Neg,
    Exp,
    /// `exp(x) - 1`, exact near 0: the RG-LRU normaliser is `sqrt(-expm1(2·log_a))`.
    Expm1,
    Log,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    /// `log(1 + exp(x))`.
    Softplus,
    /// The tanh approximation of GELU used by Gemma.
    GeluTanh,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 10] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Expm1,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Softplus,
        UnaryOp::GeluTanh,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Expm1 => "expm1",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Softplus => "softplus",
            UnaryOp::GeluTanh => "gelu_tanh",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    /// Comparison; the result is `bool`.
    Eq,
    /// Comparison; the result is `bool`.
    Lt,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 8] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Eq,
        BinaryOp::Lt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Eq => "eq",
            BinaryOp::Lt => "lt",
        }
    }

    pub fn is_comparison(self) -> bool {
        matches!(self, BinaryOp::Eq | BinaryOp::Lt)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];

    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
        }
    }
}

/// RMS normalisation applied to a projection's input row before the matmul.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NormPrologue {
    pub eps: f64,
    pub weight_offset: f64,
}

/// What a projection applies to its output before the optional residual add.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Epilogue {
    None,
    /// The output's first half is the gate, the second half the up branch:
    /// the result is `gelu_tanh(gate) · up`, half as wide.
    GeGlu,
    /// `cap · tanh(z / cap)`.
    SoftCap(f64),
}

/// Rotary embedding applied by attention to queries and keys before the scores.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RotarySpec {
    pub theta: f64,
    pub dims: u32,
}

/// The body of a fused elementwise kernel: a tree over the kernel's operands `$i`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Expr {
    Operand(u32),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    SoftCap(f64, Box<Expr>),
    Cast(DType, Box<Expr>),
}

impl Expr {
    /// One more than the largest operand index used.
    pub fn num_operands(&self) -> usize {
        match self {
            Expr::Operand(i) => *i as usize + 1,
            Expr::Unary(_, a) | Expr::SoftCap(_, a) | Expr::Cast(_, a) => a.num_operands(),
            Expr::Binary(_, a, b) => a.num_operands().max(b.num_operands()),
            Expr::Select(c, a, b) => c.num_operands().max(a.num_operands()).max(b.num_operands()),
        }
    }

    /// Number of elementwise operations in the tree.
    pub fn size(&self) -> usize {
        match self {
            Expr::Operand(_) => 0,
            Expr::Unary(_, a) | Expr::SoftCap(_, a) | Expr::Cast(_, a) => 1 + a.size(),
            Expr::Binary(_, a, b) => 1 + a.size() + b.size(),
            Expr::Select(c, a, b) => 1 + c.size() + a.size() + b.size(),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Operand(i) => write!(f, "${i}"),
            Expr::Unary(u, a) => write!(f, "{}({a})", u.name()),
            Expr::Binary(b, x, y) => write!(f, "{}({x}, {y})", b.name()),
            Expr::Select(c, a, b) => write!(f, "select({c}, {a}, {b})"),
            Expr::SoftCap(cap, a) => write!(f, "soft_cap[{cap:?}]({a})"),
            Expr::Cast(to, a) => write!(f, "cast[{}]({a})", to.name()),
        }
    }
}

/// One operation. Operand lists below are in slot order; `T` is the token count of the call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input. No operands; one result of type `ty`.
    Input {
        name: String,
        role: InputRole,
        ty: ValueType,
    },
    /// A graph output. One operand; no results.
    Output { name: String, role: OutputRole },
    /// A weight, referenced by its checkpoint tensor name (never copied into the graph).
    Param { tensor: String, ty: ValueType },
    /// A scalar constant of a numeric dtype.
    Constant { value: f64, dtype: DType },
    /// `(start i32[], tokens [T]) -> i32[T]`: `start + t` for each token index t.
    Positions,
    /// `(x) -> x` converted to `to`; float narrowing rounds to nearest even.
    Cast { to: DType },
    /// `(x) -> x` with the same elements in a new shape of equal volume.
    Reshape { shape: Shape },
    /// Embedding lookup: `(table float[V,D], ids int[T]) -> f32[T,D]`, rows times `scale`.
    Gather { scale: Option<f64> },
    /// A projection, `x·wᵀ + bias`, with what fusion folded into it:
    /// `(x f32[..,I], norm_weight float[I] if norm, w float[O,I], bias float[O] if bias,
    ///   residual f32[..,O'] if residual) -> one f32[..,n] per split` (one result of width O'
    /// when `splits` is empty). In order: the input is RMS-normalised (`norm`), projected,
    /// biased, passed through the epilogue (O' = O/2 for GeGLU), the residual added, and the
    /// columns cut into `splits`.
    Linear {
        bias: bool,
        norm: Option<NormPrologue>,
        epilogue: Epilogue,
        residual: bool,
        splits: Vec<u64>,
    },
    /// Joins `parts` operands of one dtype along `axis`; used for weights packed at build time.
    Concat { axis: u32, parts: u32 },
    /// Per-block matmul with untransposed weights, as the RG-LRU gates use them:
    /// `(x f32[..,H·B], w float[H,B,B], bias float[H,B] if bias) -> f32[..,H·B]`,
    /// block h of the result is `x[h]·w[h] + bias[h]`.
    BlockDiagonalLinear { bias: bool },
    /// Elementwise; result has the operand's type.
    Unary(UnaryOp),
    /// Elementwise with numpy broadcasting; both operands share a dtype.
    Binary(BinaryOp),
    /// `(cond bool, a, b) -> a where cond else b`, broadcast like `Binary`.
    Select,
    /// Reduces `axis` away.
    Reduce { op: ReduceOp, axis: u32 },
    /// `(x f32[..,D], w float[D]) -> x / sqrt(mean(x²) + eps) · (weight_offset + w)`.
    RmsNorm { eps: f64, weight_offset: f64 },
    /// Elementwise `cap · tanh(x / cap)`.
    SoftCap { cap: f64 },
    /// Depthwise causal convolution over time with carried window:
    /// `(x f32[T,C], positions i32[T], window f32[K-1,C], w float[C,1,K], bias float[C])
    ///  -> (y f32[T,C], window' f32[K-1,C])`.
    /// `y_p = bias + Σ_k w[:,0,k]·x_{p-K+1+k}`; `window` holds the K-1 inputs before the first
    /// token; inputs at negative positions count as zero. `window'` holds the last K-1 inputs.
    Conv1d { width: u32 },
    /// The RG-LRU linear recurrence with carried state:
    /// `(a f32[T,C], b f32[T,C], positions i32[T], state f32[C]) -> (h f32[T,C], state' f32[C])`.
    /// `h_p = a_p·h_{p-1} + b_p` with `h_{start-1} = state`, and `a_p` taken as 0 where
    /// `position == 0` (the document start resets the recurrence).
    LinearScan,
    /// Rotary embedding on the first `rotary_dims` features of each head, rotate-half
    /// convention: `(x f32[T,N,hd], positions i32[T]) -> f32[T,N,hd]`.
    Rotary { theta: f64, rotary_dims: u32 },
    /// Sliding-window attention for one sequence with grouped KV heads, reading and writing
    /// a ring of the last `window` keys and values (slot = position mod window):
    /// `(q f32[T,H,hd], k f32[T,G,hd], v f32[T,G,hd], positions i32[T],
    ///   keys f32[W,G,hd], values f32[W,G,hd]) -> (o f32[T,H,hd], keys', values')`.
    /// Query at p attends keys at p' with `p - W < p' <= p` and `p' >= 0`. With `rotary`,
    /// queries and keys are first rotated as by `Rotary` (the ring stores rotated keys).
    LocalAttention {
        window: u32,
        scale: f64,
        rotary: Option<RotarySpec>,
    },
    /// The fused recurrent operation of a Griffin block: causal conv1d, both RG-LRU gates, the
    /// decay `a = exp(-8·recurrent_gate·decay_rate)`, the normaliser `sqrt(1-a²)` (1 at the
    /// document start), the scan and, with `gate_output`, the output gating `h·gelu(y)`:
    /// `(x f32[T,C], positions i32[T], window f32[K-1,C], conv_w float[C,1,K], conv_bias float[C],
    ///   input_gate_w float[H,B,B], input_gate_bias float[H,B], recurrent_gate_w float[H,B,B],
    ///   recurrent_gate_bias float[H,B], decay_rate f32[C], state f32[C], y f32[T,C] if gate_output)
    ///  -> (out f32[T,C], window' f32[K-1,C], state' f32[C])`.
    /// `decay_rate` is `softplus(recurrent_param)`, computed at build time.
    RgLru { width: u32, gate_output: bool },
    /// A fused tree of elementwise ops over its operands (numpy broadcasting).
    Elementwise { body: Expr },
}

/// How an op is spelled in the text format, without attributes.
impl Op {
    pub fn mnemonic(&self) -> String {
        match self {
            Op::Input { role, .. } => format!("input.{}", role.name()),
            Op::Output { role, .. } => format!("output.{}", role.name()),
            Op::Param { .. } => "param".into(),
            Op::Constant { .. } => "constant".into(),
            Op::Positions => "positions".into(),
            Op::Cast { .. } => "cast".into(),
            Op::Reshape { .. } => "reshape".into(),
            Op::Gather { .. } => "gather".into(),
            Op::Linear { .. } => "linear".into(),
            Op::Concat { .. } => "concat".into(),
            Op::BlockDiagonalLinear { .. } => "block_diagonal_linear".into(),
            Op::Unary(u) => u.name().into(),
            Op::Binary(b) => b.name().into(),
            Op::Select => "select".into(),
            Op::Reduce { op, .. } => format!("reduce_{}", op.name()),
            Op::RmsNorm { .. } => "rms_norm".into(),
            Op::SoftCap { .. } => "soft_cap".into(),
            Op::Conv1d { .. } => "conv1d".into(),
            Op::LinearScan => "linear_scan".into(),
            Op::Rotary { .. } => "rotary".into(),
            Op::LocalAttention { .. } => "local_attention".into(),
            Op::RgLru { .. } => "rg_lru".into(),
            Op::Elementwise { .. } => "elementwise".into(),
        }
    }

    /// Number of operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } => 0,
            Op::Output { .. } => 1,
            Op::Cast { .. } | Op::Reshape { .. } | Op::Unary(_) => 1,
            Op::Reduce { .. } | Op::SoftCap { .. } => 1,
            Op::Positions | Op::Gather { .. } | Op::Binary(_) | Op::RmsNorm { .. } => 2,
            Op::Rotary { .. } => 2,
            Op::BlockDiagonalLinear { bias } => 2 + usize::from(*bias),
            Op::Linear {
                bias,
                norm,
                residual,
                ..
            } => 2 + usize::from(*bias) + usize::from(norm.is_some()) + usize::from(*residual),
            Op::Concat { parts, .. } => *parts as usize,
            Op::RgLru { gate_output, .. } => 11 + usize::from(*gate_output),
            Op::Elementwise { body } => body.num_operands(),
            Op::Select => 3,
            Op::LinearScan => 4,
            Op::Conv1d { .. } => 5,
            Op::LocalAttention { .. } => 6,
        }
    }

    /// Number of results the op produces.
    pub fn num_results(&self) -> usize {
        match self {
            Op::Output { .. } => 0,
            Op::Conv1d { .. } | Op::LinearScan => 2,
            Op::LocalAttention { .. } | Op::RgLru { .. } => 3,
            Op::Linear { splits, .. } => splits.len().max(1),
            _ => 1,
        }
    }

    /// Applies to every element independently (with broadcasting); fusion passes group these.
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Unary(_)
                | Op::Binary(_)
                | Op::Select
                | Op::SoftCap { .. }
                | Op::Cast { .. }
                | Op::Elementwise { .. }
        )
    }

    /// Reads or writes state carried between calls through its operands and results.
    pub fn carries_state(&self) -> bool {
        matches!(
            self,
            Op::Conv1d { .. } | Op::LinearScan | Op::LocalAttention { .. } | Op::RgLru { .. }
        )
    }

    /// A plain projection `x·wᵀ (+ bias)` with nothing fused into it.
    pub fn linear(bias: bool) -> Op {
        Op::Linear {
            bias,
            norm: None,
            epilogue: Epilogue::None,
            residual: false,
            splits: Vec::new(),
        }
    }

    pub fn is_source(&self) -> bool {
        self.arity() == 0
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.mnemonic())
    }
}

/// Types of the results an op produces from operands of the given types, or why it can't.
pub fn infer(op: &Op, operands: &[&ValueType]) -> Result<Vec<ValueType>, String> {
    if operands.len() != op.arity() {
        return Err(format!(
            "{} takes {} operands, got {}",
            op.mnemonic(),
            op.arity(),
            operands.len()
        ));
    }
    crate::infer::infer_checked_arity(op, operands)
}
