//! Lowering a fused graph to kernels and an execution plan: one LLVM function per kernel, every
//! value assigned a buffer (activations reused by liveness, state in place, weights packed).

use std::collections::{BTreeMap, HashMap};

use griffin_ir::{DType, Dim, Graph, InputRole, NodeId, Op, OutputRole, Value, ValueType};
use griffin_runtime::plan::{
    Buffer, BufferKind, Elem, LastRowLaunch, Launch, Layout, Plan, Recipe, PLAN_VERSION,
};

use crate::kernels::attention::{attend, rotate_keys, write_ring, AttentionSpec};
use crate::kernels::linear::{linear, rms_norm_rows, LinearSpec, Tile};
use crate::kernels::misc::{elementwise, gather, Operand};
use crate::kernels::rg_lru::{rg_lru, RgLruSpec};
use crate::ll::{Storage, ATTRIBUTES, PRELUDE};
use crate::BackendError;

/// A weight the plan needs: a param or a weight expression, stored as `storage`.
#[derive(Clone, Debug)]
pub struct WeightSlot {
    pub buffer: usize,
    pub value: Value,
    /// The checkpoint tensor for a param; the expression's text otherwise.
    pub name: String,
    pub storage: Storage,
    pub elements: u64,
}

/// What lowering produces; the caller packs the weights and fills in their offsets.
pub struct Lowered {
    pub plan: Plan,
    /// The LLVM IR module of every kernel.
    pub module: String,
    /// Each kernel's LLVM function, by symbol (for inspection and snapshots).
    pub functions: BTreeMap<String, String>,
    pub weights: Vec<WeightSlot>,
}

pub struct Options {
    pub max_tokens: u64,
    pub vocab_size: u64,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub weights: WeightsDtype,
    /// The projection kernel's register tile (`TargetCpu::tile`).
    pub tile: Tile,
}

/// How params are packed; weight expressions are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsDtype {
    /// bf16 stays bf16, f32 stays f32, f16 is widened to f32.
    AsStored,
    F32,
    Bf16,
}

/// Elements per token (when the first dimension is the token count) and fixed elements.
fn extent(ty: &ValueType) -> Result<(u64, u64), BackendError> {
    let dims = ty.shape.dims();
    let rest = |ds: &[Dim]| -> Result<u64, BackendError> {
        ds.iter()
            .map(|d| {
                d.fixed().ok_or_else(|| {
                    BackendError::Unsupported(format!("shape {ty} has an inner symbolic dimension"))
                })
            })
            .product()
    };
    match dims.first() {
        Some(Dim::Sym(_)) => Ok((rest(&dims[1..])?, 0)),
        _ => Ok((0, rest(dims)?)),
    }
}

/// How to compute a weight (a param or a weight expression of `g`) from checkpoint tensors:
/// the recipe both the CPU and the GPU lowering pack weights by.
pub fn recipe_of(g: &Graph, v: Value) -> Result<Recipe, BackendError> {
    let x = g.operands(v.node);
    let boxed =
        |i: usize| -> Result<Box<Recipe>, BackendError> { Ok(Box::new(recipe_of(g, x[i])?)) };
    Ok(match &g.node(v.node).op {
        Op::Param { tensor, .. } => Recipe::Tensor(tensor.clone()),
        Op::Constant { value, .. } => Recipe::Scalar(*value),
        // Values are f32 already; a cast to f32 changes nothing.
        Op::Cast { to: DType::F32 } => recipe_of(g, x[0])?,
        Op::Unary(u) => Recipe::Unary(u.name().to_string(), boxed(0)?),
        Op::Binary(b) if !b.is_comparison() => {
            Recipe::Binary(b.name().to_string(), boxed(0)?, boxed(1)?)
        }
        Op::Concat { axis: 0, .. } => Recipe::Concat(
            x.iter()
                .map(|p| recipe_of(g, *p))
                .collect::<Result<_, _>>()?,
        ),
        other => {
            return Err(BackendError::Unsupported(format!(
                "weight expression `{}` cannot be packed",
                other.mnemonic()
            )))
        }
    })
}

struct Lowering<'g> {
    g: &'g Graph,
    opts: &'g Options,
    buffers: Vec<Buffer>,
    launches: Vec<Launch>,
    functions: BTreeMap<String, String>,
    function_of_body: HashMap<String, String>,
    weights: Vec<WeightSlot>,
    weight_of: HashMap<Value, usize>,
    buffer_of: HashMap<Value, usize>,
    /// Weights that projections read, in the layout the projection kernel wants.
    layouts: HashMap<Value, Layout>,
    free: Vec<usize>,
    /// Launch index after which each activation buffer may be reused.
    tokens: Option<usize>,
    logits: Option<usize>,
}

impl Lowering<'_> {
    fn add_buffer(
        &mut self,
        kind: BufferKind,
        elem: Elem,
        (per_token, fixed): (u64, u64),
    ) -> usize {
        self.buffers.push(Buffer {
            kind,
            elem,
            per_token,
            fixed,
        });
        self.buffers.len() - 1
    }

    /// An activation buffer of at least this extent, reusing a free one where it fits.
    fn activation(&mut self, elem: Elem, extent: (u64, u64)) -> usize {
        let fits = |b: &Buffer| b.elem == elem && b.per_token >= extent.0 && b.fixed >= extent.1;
        if let Some(pos) = self.free.iter().position(|&i| fits(&self.buffers[i])) {
            return self.free.remove(pos);
        }
        self.add_buffer(BufferKind::Activation, elem, extent)
    }

    fn storage_of(&self, v: Value) -> Result<Storage, BackendError> {
        let ty = self
            .g
            .value_type(v)
            .map_err(|e| BackendError::Graph(e.to_string()))?;
        match &self.g.node(v.node).op {
            Op::Param { .. } => Ok(match (ty.dtype, self.opts.weights) {
                (DType::BF16, WeightsDtype::AsStored) | (_, WeightsDtype::Bf16) => Storage::Bf16,
                _ => Storage::F32,
            }),
            // Concatenating bf16 weights is exact in bf16: keep the packed projection narrow.
            Op::Concat { .. } => {
                let parts = self.g.operands(v.node);
                let mut all_bf16 = true;
                for p in parts {
                    let is_param = matches!(self.g.node(p.node).op, Op::Param { .. });
                    all_bf16 &= is_param && self.storage_of(p)? == Storage::Bf16;
                }
                Ok(if all_bf16 {
                    Storage::Bf16
                } else {
                    Storage::F32
                })
            }
            _ => Ok(Storage::F32),
        }
    }

    /// The buffer of a weight operand, adding a weight slot on first use.
    fn weight(&mut self, v: Value) -> Result<(usize, Storage), BackendError> {
        let storage = self.storage_of(v)?;
        if let Some(&b) = self.weight_of.get(&v) {
            return Ok((b, storage));
        }
        let ty = self
            .g
            .value_type(v)
            .map_err(|e| BackendError::Graph(e.to_string()))?
            .clone();
        let (per_token, elements) = extent(&ty)?;
        if per_token != 0 {
            return Err(BackendError::Unsupported(format!(
                "weight {ty} depends on the token count"
            )));
        }
        let name = match &self.g.node(v.node).op {
            Op::Param { tensor, .. } => tensor.clone(),
            _ => format!(
                "{}#{}",
                griffin_ir::text::op_signature(&self.g.node(v.node).op),
                v.node.index()
            ),
        };
        let elem = Elem::F32;
        let layout = self.layouts.get(&v).copied().unwrap_or_default();
        let bytes =
            layout.elements(elements, storage) * if storage == Storage::Bf16 { 2 } else { 4 };
        let fixed = bytes.div_ceil(4);
        let recipe = self.recipe(v)?;
        let b = self.add_buffer(
            BufferKind::Weight {
                name: name.clone(),
                offset: 0,
                bytes,
                storage,
                recipe,
                layout,
            },
            elem,
            (0, fixed),
        );
        self.weights.push(WeightSlot {
            buffer: b,
            value: v,
            name,
            storage,
            elements,
        });
        self.weight_of.insert(v, b);
        Ok((b, storage))
    }

    /// A weight read element by element in row-major order (not by a projection or a gather).
    fn plain_weight(&mut self, v: Value) -> Result<(usize, Storage), BackendError> {
        if self.layouts.contains_key(&v) {
            return Err(BackendError::Unsupported(format!(
                "weight {v} is read both by a projection (blocked) and row by row"
            )));
        }
        self.weight(v)
    }

    fn recipe(&self, v: Value) -> Result<Recipe, BackendError> {
        recipe_of(self.g, v)
    }

    fn value(&self, v: Value) -> Result<usize, BackendError> {
        self.buffer_of
            .get(&v)
            .copied()
            .ok_or_else(|| BackendError::Graph(format!("value {v} has no buffer")))
    }

    fn result_buffer(&mut self, v: Value) -> Result<usize, BackendError> {
        let ty = self
            .g
            .value_type(v)
            .map_err(|e| BackendError::Graph(e.to_string()))?
            .clone();
        let b = self.activation(Elem::F32, extent(&ty)?);
        self.buffer_of.insert(v, b);
        Ok(b)
    }

    /// A launch of `function`, or of an earlier kernel with the same body (the layers' kernels
    /// differ only in name: LLVM compiles each body once).
    fn launch(&mut self, symbol: String, function: String, args: Vec<usize>) {
        let body = function.replacen(&format!("@{symbol}("), "@(", 1);
        let symbol = match self.function_of_body.get(&body) {
            Some(same) => same.clone(),
            None => {
                self.function_of_body.insert(body, symbol.clone());
                self.functions.insert(symbol.clone(), function);
                symbol
            }
        };
        self.launches.push(Launch {
            kernel: symbol,
            args,
        });
    }

    fn fixed_dim(&self, v: Value, axis: usize) -> Result<u64, BackendError> {
        let ty = self
            .g
            .value_type(v)
            .map_err(|e| BackendError::Graph(e.to_string()))?;
        ty.shape.dims()[axis].fixed().ok_or_else(|| {
            BackendError::Unsupported(format!("{ty}: dimension {axis} must be fixed"))
        })
    }

    fn node(&mut self, id: NodeId, index: usize) -> Result<(), BackendError> {
        let g = self.g;
        let op = g.node(id).op.clone();
        let x = g.operands(id);
        let r = |output: u32| Value { node: id, output };
        let symbol = format!("k{index}_{}", op.mnemonic());
        match &op {
            Op::Input { role, name, ty } => match role {
                InputRole::Tokens => {
                    let b = self.add_buffer(BufferKind::Activation, Elem::I32, extent(ty)?);
                    self.tokens = Some(b);
                    self.buffer_of.insert(r(0), b);
                }
                // Kernels compute positions as start + t from their `start` argument.
                InputRole::Position => {}
                InputRole::State => {
                    let b = self.add_buffer(
                        BufferKind::State { name: name.clone() },
                        Elem::F32,
                        extent(ty)?,
                    );
                    self.buffer_of.insert(r(0), b);
                }
            },
            Op::Output { role, name } => {
                let b = self.value(x[0])?;
                match role {
                    OutputRole::Logits => self.logits = Some(b),
                    OutputRole::State => match &self.buffers[b].kind {
                        BufferKind::State { name: held } if held == name => {}
                        _ => {
                            return Err(BackendError::Unsupported(format!(
                                "state `{name}` is not updated in place by one kernel"
                            )))
                        }
                    },
                }
            }
            Op::Param { .. } | Op::Constant { .. } => {}
            _ if g.is_weight_expression(id) => {}
            Op::Positions => {}
            Op::Reshape { .. } => {
                let b = self.value(x[0])?;
                self.buffer_of.insert(r(0), b);
            }
            Op::Gather { scale } => {
                let layout = self.layouts.get(&x[0]).copied().unwrap_or_default();
                let (table, storage) = self.weight(x[0])?;
                let ids = self.value(x[1])?;
                let out = self.result_buffer(r(0))?;
                let width = self.fixed_dim(x[0], 1)?;
                self.launch(
                    symbol.clone(),
                    gather(&symbol, width, storage, layout, *scale)?,
                    vec![table, ids, out],
                );
            }
            Op::Linear {
                bias,
                norm,
                epilogue,
                residual,
                splits,
            } => {
                let mut args = vec![self.value(x[0])?];
                let mut next = 1;
                // The norm prologue runs as its own kernel into a scratch buffer (see
                // `rms_norm_rows`); the projection then reads normalised inputs.
                let mut scratch = None;
                if let Some(n) = norm {
                    let (g, storage) = self.plain_weight(x[next])?;
                    next += 1;
                    let inputs = self.fixed_dim(x[0], 1)?;
                    let normed = self.activation(Elem::F32, (inputs, 0));
                    let name = format!("{symbol}_norm");
                    self.launch(
                        name.clone(),
                        rms_norm_rows(&name, inputs, n.eps, n.weight_offset, storage),
                        vec![args[0], g, normed],
                    );
                    args[0] = normed;
                    scratch = Some(normed);
                }
                let (w, weight_storage) = self.weight(x[next])?;
                let rows = self.fixed_dim(x[next], 0)?;
                let inputs = self.fixed_dim(x[next], 1)?;
                args.push(w);
                next += 1;
                let bias_storage = if *bias {
                    let (b, s) = self.plain_weight(x[next])?;
                    args.push(b);
                    next += 1;
                    Some(s)
                } else {
                    None
                };
                if *residual {
                    args.push(self.value(x[next])?);
                }
                let width = if *epilogue == griffin_ir::Epilogue::GeGlu {
                    rows / 2
                } else {
                    rows
                };
                let split_sizes = if splits.is_empty() {
                    vec![width]
                } else {
                    splits.clone()
                };
                for i in 0..split_sizes.len() {
                    args.push(self.result_buffer(r(i as u32))?);
                }
                let spec = LinearSpec {
                    symbol: symbol.clone(),
                    inputs,
                    rows,
                    weight: weight_storage,
                    bias: bias_storage,
                    epilogue: *epilogue,
                    residual: *residual,
                    splits: split_sizes,
                    tile: self.opts.tile,
                };
                self.launch(symbol, linear(&spec), args);
                if let Some(b) = scratch {
                    self.free.push(b);
                }
            }
            Op::RgLru { width, gate_output } => {
                let input = self.value(x[0])?;
                let window = self.value(x[2])?;
                let (conv_w, conv) = self.plain_weight(x[3])?;
                let (conv_b, _) = self.plain_weight(x[4])?;
                let (igw, gates) = self.plain_weight(x[5])?;
                let (igb, _) = self.plain_weight(x[6])?;
                let (rgw, _) = self.plain_weight(x[7])?;
                let (rgb, _) = self.plain_weight(x[8])?;
                let (decay, _) = self.plain_weight(x[9])?;
                let state = self.value(x[10])?;
                let mut args = vec![
                    input, window, conv_w, conv_b, igw, igb, rgw, rgb, decay, state,
                ];
                if *gate_output {
                    args.push(self.value(x[11])?);
                }
                let channels = self.fixed_dim(x[0], 1)?;
                let blocks = self.fixed_dim(x[5], 0)?;
                let out = self.result_buffer(r(0))?;
                self.buffer_of.insert(r(1), window);
                self.buffer_of.insert(r(2), state);
                let scratch = self.activation(Elem::F32, (channels, 0));
                args.extend([out, scratch]);
                // Storage of the conv bias and gate biases follows their weights' dtype.
                let spec = RgLruSpec {
                    symbol: symbol.clone(),
                    channels,
                    blocks,
                    width: *width as u64,
                    conv,
                    gates,
                    gate_output: *gate_output,
                };
                self.launch(symbol, rg_lru(&spec), args);
                self.free.push(scratch);
            }
            Op::LocalAttention {
                window,
                scale,
                rotary,
            } => {
                let (q, k, v) = (self.value(x[0])?, self.value(x[1])?, self.value(x[2])?);
                let (keys, values) = (self.value(x[4])?, self.value(x[5])?);
                let spec = AttentionSpec {
                    symbol: symbol.clone(),
                    heads: self.fixed_dim(x[0], 1)?,
                    kv_heads: self.fixed_dim(x[1], 1)?,
                    head_dim: self.fixed_dim(x[0], 2)?,
                    window: *window as u64,
                    scale: *scale,
                    rotary: rotary.map(|r| (r.theta, r.dims as u64)),
                };
                if let Some(function) = rotate_keys(&spec) {
                    self.launch(format!("{symbol}_rotate_keys"), function, vec![k]);
                }
                let out = self.result_buffer(r(0))?;
                self.launch(
                    format!("{symbol}_attend"),
                    attend(&spec),
                    vec![q, k, v, keys, values, out],
                );
                self.launch(
                    format!("{symbol}_write_ring"),
                    write_ring(&spec),
                    vec![k, v, keys, values],
                );
                self.buffer_of.insert(r(1), keys);
                self.buffer_of.insert(r(2), values);
            }
            Op::Elementwise { .. } | Op::Unary(_) | Op::Binary(_) | Op::SoftCap { .. } => {
                let body = match &op {
                    Op::Elementwise { body } => body.clone(),
                    Op::Unary(u) => {
                        griffin_ir::Expr::Unary(*u, Box::new(griffin_ir::Expr::Operand(0)))
                    }
                    Op::Binary(b) => griffin_ir::Expr::Binary(
                        *b,
                        Box::new(griffin_ir::Expr::Operand(0)),
                        Box::new(griffin_ir::Expr::Operand(1)),
                    ),
                    Op::SoftCap { cap } => {
                        griffin_ir::Expr::SoftCap(*cap, Box::new(griffin_ir::Expr::Operand(0)))
                    }
                    _ => unreachable!("matched above"),
                };
                let out_ty = g.node(id).results[0].clone();
                if out_ty.dtype != DType::F32 {
                    return Err(BackendError::Unsupported(format!(
                        "elementwise result {out_ty}"
                    )));
                }
                let mut args = Vec::new();
                let mut kinds = Vec::new();
                for o in &x {
                    let ty = g
                        .value_type(*o)
                        .map_err(|e| BackendError::Graph(e.to_string()))?
                        .clone();
                    let kind = if ty.shape.dims().is_empty() {
                        Operand::Scalar
                    } else if ty.shape == out_ty.shape && ty.dtype == DType::F32 {
                        Operand::Full
                    } else {
                        return Err(BackendError::Unsupported(format!(
                            "elementwise operand {ty} broadcast to {out_ty}"
                        )));
                    };
                    kinds.push(kind);
                    args.push(if g.is_weight_expression(o.node) {
                        self.plain_weight(*o)?.0
                    } else {
                        self.value(*o)?
                    });
                }
                let (per_token, fixed) = extent(&out_ty)?;
                let out = self.result_buffer(r(0))?;
                args.push(out);
                let function = elementwise(&symbol, &body, &kinds, per_token, fixed)?;
                self.launch(symbol, function, args);
            }
            other => {
                return Err(BackendError::Unsupported(format!(
                "`{}` is not lowered by the CPU backend (compile with the default pass pipeline)",
                other.mnemonic()
            )))
            }
        }
        Ok(())
    }
}

/// The layout of every weight a projection reads (`LinearSpec::layout`), known before lowering
/// starts because a tied embedding is gathered before the logits projection reads it.
fn projection_layouts(g: &Graph, tile: Tile) -> Result<HashMap<Value, Layout>, BackendError> {
    let mut layouts = HashMap::new();
    for id in g.topo_order() {
        let Op::Linear { norm, epilogue, .. } = &g.node(id).op else {
            continue;
        };
        let w = g.operands(id)[1 + usize::from(norm.is_some())];
        let ty = g
            .value_type(w)
            .map_err(|e| BackendError::Graph(e.to_string()))?;
        let dims = ty.shape.dims();
        let (Some(rows), Some(cols)) = (dims[0].fixed(), dims[1].fixed()) else {
            return Err(BackendError::Unsupported(format!(
                "projection weight {ty} is not fixed"
            )));
        };
        let layout = Layout::Blocked {
            rows,
            cols,
            panels: tile.panels,
            geglu: *epilogue == griffin_ir::Epilogue::GeGlu,
        };
        if layouts.insert(w, layout).is_some_and(|old| old != layout) {
            return Err(BackendError::Unsupported(format!(
                "weight {w} is read by two projections with different epilogues"
            )));
        }
    }
    Ok(layouts)
}

/// Lowers `graph` (after the default pipeline; its token dimension symbolic) into kernels and a
/// plan for calls of up to `opts.max_tokens` tokens.
pub fn lower(graph: &Graph, opts: &Options) -> Result<Lowered, BackendError> {
    let mut l = Lowering {
        g: graph,
        opts,
        buffers: Vec::new(),
        launches: Vec::new(),
        functions: BTreeMap::new(),
        function_of_body: HashMap::new(),
        weights: Vec::new(),
        weight_of: HashMap::new(),
        buffer_of: HashMap::new(),
        layouts: projection_layouts(graph, opts.tile)?,
        free: Vec::new(),
        tokens: None,
        logits: None,
    };
    let order = graph.topo_order();
    // The last node reading each value, to free activation buffers after it.
    let mut last_use: HashMap<usize, usize> = HashMap::new();
    let position: HashMap<NodeId, usize> =
        order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    for (i, id) in order.iter().enumerate() {
        for v in graph.operands(*id) {
            last_use.insert(position[&v.node], i);
        }
    }
    for (i, &id) in order.iter().enumerate() {
        l.node(id, i)?;
        // An operand's buffer becomes free once no value held in it (reshapes alias their
        // source) is read after this node; state, tokens and logits are never reused.
        let mut freed = Vec::new();
        for v in graph.operands(id) {
            let Some(&b) = l.buffer_of.get(&v) else {
                continue;
            };
            let read_later = l.buffer_of.iter().any(|(val, &buf)| {
                buf == b && last_use.get(&position[&val.node]).is_some_and(|&u| u > i)
            });
            let reusable = matches!(l.buffers[b].kind, BufferKind::Activation)
                && Some(b) != l.tokens
                && Some(b) != l.logits;
            if reusable && !read_later && !freed.contains(&b) && !l.free.contains(&b) {
                freed.push(b);
            }
        }
        l.free.extend(freed);
    }
    let tokens = l
        .tokens
        .ok_or_else(|| BackendError::Graph("no token input".into()))?;
    let logits = l
        .logits
        .ok_or_else(|| BackendError::Graph("no logits output".into()))?;
    // The logits projection reads the final hidden rows and writes only logits: for generation
    // it can run on the last token alone.
    let logits_launch = l
        .launches
        .iter()
        .rposition(|launch| launch.args.last() == Some(&logits))
        .and_then(|i| {
            let launch = &l.launches[i];
            if !launch.kernel.ends_with("_linear") {
                return None;
            }
            let row_args = launch
                .args
                .iter()
                .enumerate()
                .filter(|(_, &b)| {
                    matches!(l.buffers[b].kind, BufferKind::Activation)
                        && l.buffers[b].per_token > 0
                })
                .map(|(a, &b)| (a, l.buffers[b].per_token))
                .collect();
            Some(LastRowLaunch {
                launch: i,
                row_args,
            })
        });
    let mut module = String::from(PRELUDE);
    for f in l.functions.values() {
        module.push('\n');
        module.push_str(f);
    }
    module.push('\n');
    module.push_str(ATTRIBUTES);
    Ok(Lowered {
        plan: Plan {
            version: PLAN_VERSION,
            max_tokens: opts.max_tokens,
            vocab_size: opts.vocab_size,
            bos_token_id: opts.bos_token_id,
            eos_token_id: opts.eos_token_id,
            pad_token_id: opts.pad_token_id,
            buffers: l.buffers,
            launches: l.launches,
            tokens,
            logits,
            logits_launch,
            weights_hash: String::new(),
        },
        module,
        functions: l.functions,
        weights: l.weights,
    })
}
