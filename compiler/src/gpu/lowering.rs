//! Lowering the optimised decode graph, then the prefill graph into the same buffers, to PTX
//! kernels and a launch list per program.

use std::collections::{BTreeMap, HashMap};

use griffin_backend_ptx::attention::{
    attend, attend_combine, attend_combine_grid, attend_grid, attend_scratch, inverse_frequencies,
    AttentionSpec, ATTEND_WARPS, COMBINE_BLOCK, MAX_GROUP,
};
use griffin_backend_ptx::gemv::{
    best_slots, gemv, gemv_with_best, grid, Epilogue as GemvEpilogue, GemvSpec, WARPS_PER_BLOCK,
};
use griffin_backend_ptx::misc::{argmax, argmax_best, gather, ARGMAX_THREADS, GATHER_BLOCK};
use griffin_backend_ptx::rg_lru::{
    block_size, rg_lru_step, step_block, step_grid, RgLruSpec, Storage,
};
use griffin_backend_ptx::tc::{TcConfig, TcInputs, TcMma};
use griffin_ir::{DType, Epilogue, Graph, InputRole, NodeId, Op, OutputRole, Value};
use griffin_runtime::gpu_plan::{
    Arg, GpuBuffer, GpuBufferKind, GpuLaunch, GpuPlan, GpuPrefill, GpuSample, LastRow, Work,
    GPU_PLAN_VERSION,
};
use griffin_runtime::plan::{Buffer, BufferKind, Elem, Plan, Storage as PackStorage, PLAN_VERSION};

use super::work::{gates_work, projection_work, rg_lru_work, work};
use super::{unsupported, GpuOptions, GpuProgram};
use crate::error::RunError;
use crate::session::Model;

mod prefill;

/// Lowers the decode graph, then (with a prefill chunk) the prefill graph into the same
/// buffers: state by name, weights by recipe, the position buffer as the chunk's start.
struct Lowering<'g> {
    g: &'g Graph,
    /// How matrices are stored.
    matrices: griffin_backend_cpu::WeightsDtype,
    tensor_cores: bool,
    tc_inputs: TcInputs,
    tc_mma: TcMma,
    k_parts: Option<u32>,
    /// The largest chunk, while lowering the prefill graph.
    prefill: Option<u32>,
    buffers: Vec<GpuBuffer>,
    launches: Vec<GpuLaunch>,
    kernels: BTreeMap<String, String>,
    weights: Vec<Buffer>,
    /// Weight buffers by (recipe, storage): both graphs share them.
    weight_of: HashMap<(String, Storage), usize>,
    /// State buffers by name: both graphs share them.
    state_of: HashMap<String, usize>,
    value_of: HashMap<Value, Arg>,
    ids: Option<usize>,
    position: Option<usize>,
    logits: Option<usize>,
    /// The prefill chunk's token count (device counter).
    count: Option<usize>,
    /// Each prefill projection launch's spec and whether a row-scale parameter follows its
    /// inputs, by launch index (for the last-row logits).
    gemm_specs: HashMap<usize, (GemvSpec, bool)>,
    /// Each decode projection launch's spec, by launch index (for the logits' best pairs).
    gemv_specs: HashMap<usize, GemvSpec>,
    /// The first kernel of each body (its text with the entry name taken out): the layers'
    /// kernels are mostly the same, and the module keeps one of each.
    kernel_of_body: HashMap<String, String>,
}

impl Lowering<'_> {
    /// How the tensor-core kernels without row scales (the RG-LRU's gates, attention) take their
    /// operands: as chosen, but split where f16 was chosen, whose range (±65504) their rows
    /// could pass; they are a few percent of a prefill's tensor-core work.
    fn unscaled_inputs(&self) -> TcInputs {
        match self.tc_inputs {
            TcInputs::F16 => TcInputs::Split,
            other => other,
        }
    }

    /// How projections run on tensor cores (`row_scales`: their inputs come with them).
    fn tc_config(&self, row_scales: bool) -> TcConfig {
        TcConfig {
            inputs: self.tc_inputs,
            mma: self.tc_mma,
            row_scales,
        }
    }

    fn buffer(&mut self, kind: GpuBufferKind, bytes: u64) -> usize {
        self.buffers.push(GpuBuffer { kind, bytes });
        self.buffers.len() - 1
    }

    fn elements(&self, v: Value) -> Result<u64, RunError> {
        let ty = self
            .g
            .value_type(v)
            .map_err(|e| unsupported(e.to_string()))?;
        let max_tokens = self.prefill;
        ty.shape
            .dims()
            .iter()
            .map(|d| {
                d.fixed()
                    .or(max_tokens.map(u64::from))
                    .ok_or_else(|| unsupported(format!("{ty} has a symbolic dimension")))
            })
            .product()
    }

    fn dim(&self, v: Value, axis: usize) -> Result<u32, RunError> {
        let ty = self
            .g
            .value_type(v)
            .map_err(|e| unsupported(e.to_string()))?;
        ty.shape
            .dims()
            .get(axis)
            .and_then(|d| d.fixed())
            .map(|d| d as u32)
            .ok_or_else(|| unsupported(format!("{ty}: dimension {axis} must be fixed")))
    }

    /// As chosen, or (as stored) bf16 for matrices whose every source tensor is bf16
    /// (concatenation is exact), else f32.
    fn matrix_storage(&self, v: Value) -> Storage {
        use griffin_backend_cpu::WeightsDtype;
        match self.matrices {
            WeightsDtype::Bf16 => return Storage::Bf16,
            WeightsDtype::F32 => return Storage::F32,
            WeightsDtype::AsStored => {}
        }
        let g = self.g;
        let bf16_param = |v: Value| {
            matches!(g.node(v.node).op, Op::Param { .. })
                && g.value_type(v).is_ok_and(|t| t.dtype == DType::BF16)
        };
        let all_bf16 = match g.node(v.node).op {
            Op::Concat { .. } => g.operands(v.node).into_iter().all(bf16_param),
            _ => bf16_param(v),
        };
        if all_bf16 {
            Storage::Bf16
        } else {
            Storage::F32
        }
    }

    /// The device buffer of a weight stored as `storage`, packed on first use.
    fn weight(&mut self, v: Value, storage: Storage) -> Result<Arg, RunError> {
        let recipe = griffin_backend_cpu::lower::recipe_of(self.g, v)
            .map_err(|e| unsupported(e.to_string()))?;
        let key = (
            serde_json::to_string(&recipe).map_err(|e| unsupported(e.to_string()))?,
            storage,
        );
        if let Some(&b) = self.weight_of.get(&key) {
            return Ok(Arg {
                buffer: b,
                offset: 0,
            });
        }
        let elements = self.elements(v)?;
        let bytes = elements * if storage == Storage::Bf16 { 2 } else { 4 };
        let name = match &self.g.node(v.node).op {
            Op::Param { tensor, .. } => tensor.clone(),
            op => format!("{}#{}", griffin_ir::text::op_signature(op), v.node.index()),
        };
        self.weights.push(Buffer {
            kind: BufferKind::Weight {
                name,
                offset: 0,
                bytes,
                storage: match storage {
                    Storage::Bf16 => PackStorage::Bf16,
                    Storage::F32 => PackStorage::F32,
                },
                recipe,
                // The GPU kernels read projection weights row by row.
                layout: Default::default(),
            },
            elem: Elem::F32,
            per_token: 0,
            fixed: bytes.div_ceil(4),
        });
        let b = self.buffer(GpuBufferKind::Weight(self.weights.len() - 1), bytes);
        self.weight_of.insert(key, b);
        Ok(Arg {
            buffer: b,
            offset: 0,
        })
    }

    fn value(&self, v: Value) -> Result<Arg, RunError> {
        self.value_of
            .get(&v)
            .copied()
            .ok_or_else(|| unsupported(format!("value {v} has no buffer")))
    }

    fn activation(&mut self, v: Value) -> Result<Arg, RunError> {
        let bytes = 4 * self.elements(v)?;
        let b = self.buffer(GpuBufferKind::Activation, bytes);
        let arg = Arg {
            buffer: b,
            offset: 0,
        };
        self.value_of.insert(v, arg);
        Ok(arg)
    }

    fn position_arg(&self) -> Result<Arg, RunError> {
        self.position
            .map(|b| Arg {
                buffer: b,
                offset: 0,
            })
            .ok_or_else(|| unsupported("no position input"))
    }

    /// Appends a launch (its work uncounted: the caller may set it on the launch returned).
    fn launch(
        &mut self,
        kernel: String,
        ptx: String,
        grid: u32,
        block: u32,
        args: Vec<Arg>,
    ) -> &mut GpuLaunch {
        let entry = format!(".entry {kernel}(");
        let body = ptx.replacen(&entry, ".entry (", 1);
        let kernel = match self.kernel_of_body.get(&body) {
            Some(same) => same.clone(),
            None => {
                self.kernel_of_body.insert(body, kernel.clone());
                self.kernels.insert(kernel.clone(), ptx);
                kernel
            }
        };
        self.launches.push(GpuLaunch {
            kernel,
            grid,
            block,
            args,
            work: Work::default(),
        });
        self.launches.last_mut().expect("just pushed")
    }

    /// The fused recurrence: one step in the decode graph, the chunk's tokens in the prefill
    /// graph (the same operands, the chunk kernel taking the token counter first).
    fn rg_lru(
        &mut self,
        id: NodeId,
        name: String,
        width: u32,
        gate_output: bool,
    ) -> Result<(), RunError> {
        let x = self.g.operands(id);
        let r = |output: u32| Value { node: id, output };
        let spec = self.rg_lru_spec(&name, &x, width, gate_output)?;
        let window = self.value(x[2])?;
        // The window is a ring of K rows on the GPU (`rg_lru::ring_row`), one more than the
        // graph's K-1: decode and prefill share the buffer and set the same size.
        self.buffers[window.buffer].bytes = 4 * (spec.width * spec.channels) as u64;
        let state = self.value(x[10])?;
        let input = self.value(x[0])?;
        // Conv weights, biases and decay in f32; the gate matrices as stored.
        let mut weights = Vec::new();
        for (i, w) in x.iter().enumerate().take(10).skip(3) {
            let storage = if i == 5 || i == 7 {
                spec.gates
            } else {
                Storage::F32
            };
            weights.push(self.weight(*w, storage)?);
        }
        let y = if gate_output {
            Some(self.value(x[11])?)
        } else {
            None
        };
        let out = self.activation(r(0))?;
        self.value_of.insert(r(1), window);
        self.value_of.insert(r(2), state);
        let Some(max_tokens) = self.prefill else {
            let mut args = vec![input, self.position_arg()?, window];
            args.extend(weights);
            args.push(state);
            args.extend(y);
            args.push(out);
            self.launch(
                name,
                rg_lru_step(&spec),
                step_grid(&spec),
                step_block(&spec),
                args,
            )
            .work = rg_lru_work(&spec, false);
            return Ok(());
        };
        // Prefill: the gates of every token in parallel, then the scan over their coefficients.
        use griffin_backend_ptx::prefill::{
            elementwise_grid, rg_lru_conv_tokens, rg_lru_gates_grid, rg_lru_gates_tokens,
            rg_lru_scan_grid, rg_lru_scan_tokens, NORM_BLOCK, SCAN_BLOCK,
        };
        use griffin_backend_ptx::tc::{
            gates_fit_tensor_cores, gates_tc_grid, gates_tc_token_warps, rg_lru_gates_tc, tc_block,
        };
        let count = self.count_arg()?;
        let coefficients = 4 * (max_tokens * spec.channels) as u64;
        let [a, b] = [(); 2].map(|_| Arg {
            buffer: self.buffer(GpuBufferKind::Activation, coefficients),
            offset: 0,
        });
        let gates = RgLruSpec {
            name: format!("{name}_gates"),
            ..spec.clone()
        };
        let position = self.position_arg()?;
        if self.tensor_cores && gates_fit_tensor_cores(&spec) {
            // The conv alone into [T, C], then both gates as one block-diagonal product on
            // tensor cores, finished into the coefficients.
            let conv_out = Arg {
                buffer: self.buffer(GpuBufferKind::Activation, coefficients),
                offset: 0,
            };
            let conv = RgLruSpec {
                name: format!("{name}_conv"),
                ..spec.clone()
            };
            let mut args = vec![count, input, position, window];
            args.extend_from_slice(&weights[..2]);
            args.push(conv_out);
            let (c, k) = (spec.channels as u64, spec.width as u64);
            self.launch(
                conv.name.clone(),
                rg_lru_conv_tokens(&conv),
                elementwise_grid(max_tokens * spec.channels, NORM_BLOCK),
                NORM_BLOCK,
                args,
            )
            // Its weights, bias and the window's rows once; x in and the conv out per token.
            .work = work(true, 4 * c * (2 * k + 1), 4 * 2 * c, 2 * c * k);
            let token_warps = gates_tc_token_warps(&spec, max_tokens);
            let mut args = vec![count, conv_out, position];
            args.extend_from_slice(&weights[2..]);
            args.extend([a, b]);
            self.launch(
                gates.name.clone(),
                rg_lru_gates_tc(&gates, self.unscaled_inputs(), token_warps),
                gates_tc_grid(&spec, max_tokens, token_warps),
                tc_block(token_warps),
                args,
            )
            .work = gates_work(&spec, true);
        } else {
            let mut args = vec![count, input, position, window];
            args.extend(weights);
            args.extend([a, b]);
            self.launch(
                gates.name.clone(),
                rg_lru_gates_tokens(&gates),
                rg_lru_gates_grid(&spec, max_tokens),
                block_size(&spec),
                args,
            )
            .work = rg_lru_work(&spec, true);
        }
        let mut args = vec![count, input, self.position_arg()?, window, state, a, b];
        args.extend(y);
        args.push(out);
        // a, b, [y] in and the output out per token and channel.
        let streams = if spec.gate_output { 4 } else { 3 };
        self.launch(
            name,
            rg_lru_scan_tokens(&spec),
            rg_lru_scan_grid(&spec),
            SCAN_BLOCK,
            args,
        )
        .work = Work {
            bytes_per_token: 4 * streams * spec.channels as u64,
            flops_per_token: 4 * spec.channels as u64,
            ..Work::default()
        };
        Ok(())
    }

    /// A projection's weight, [bias] and [residual] arguments (its operands from `next` on) and
    /// its kernel spec: both graphs lower projections through this.
    #[allow(clippy::too_many_arguments)]
    fn projection(
        &mut self,
        name: &str,
        x: &[Value],
        mut next: usize,
        bias: bool,
        residual: bool,
        epilogue: Epilogue,
        norm: Option<f32>,
    ) -> Result<(Vec<Arg>, GemvSpec), RunError> {
        let storage = self.matrix_storage(x[next]);
        let rows = self.dim(x[next], 0)?;
        let inputs = self.dim(x[next], 1)?;
        if inputs % 8 != 0 {
            return Err(unsupported(format!(
                "a projection of {inputs} inputs (a multiple of 8 is needed)"
            )));
        }
        let mut args = vec![self.weight(x[next], storage)?];
        next += 1;
        if bias {
            args.push(self.weight(x[next], Storage::F32)?);
            next += 1;
        }
        if residual {
            args.push(self.value(x[next])?);
        }
        let spec = GemvSpec {
            name: name.to_string(),
            inputs,
            width: if epilogue == Epilogue::GeGlu {
                rows / 2
            } else {
                rows
            },
            bias,
            epilogue: match epilogue {
                Epilogue::None => GemvEpilogue::None,
                Epilogue::GeGlu => GemvEpilogue::GeGlu,
                Epilogue::SoftCap(c) => GemvEpilogue::SoftCap(c as f32),
            },
            residual,
            norm,
            weights: storage,
        };
        Ok((args, spec))
    }

    /// The fused recurrence's kernel spec from its operands (both graphs).
    fn rg_lru_spec(
        &self,
        name: &str,
        x: &[Value],
        width: u32,
        gate_output: bool,
    ) -> Result<RgLruSpec, RunError> {
        let spec = RgLruSpec {
            name: name.to_string(),
            channels: self.dim(x[0], 1)?,
            blocks: self.dim(x[5], 0)?,
            width,
            conv: Storage::F32,
            gates: match (self.matrix_storage(x[5]), self.matrix_storage(x[7])) {
                (Storage::Bf16, Storage::Bf16) => Storage::Bf16,
                _ => Storage::F32,
            },
            gate_output,
        };
        if spec.channels % spec.blocks != 0 || block_size(&spec) > 1024 {
            return Err(unsupported("RG-LRU blocks of more than 1024 channels"));
        }
        Ok(spec)
    }

    /// Local attention's kernel spec from its operands (both graphs).
    fn attention_spec(
        &self,
        name: &str,
        x: &[Value],
        window: u32,
        scale: f64,
        rotary: Option<griffin_ir::RotarySpec>,
    ) -> Result<AttentionSpec, RunError> {
        let spec = AttentionSpec {
            name: name.to_string(),
            heads: self.dim(x[0], 1)?,
            kv_heads: self.dim(x[1], 1)?,
            head_dim: self.dim(x[0], 2)?,
            window,
            scale: scale as f32,
            rotary: rotary.map(|r| (r.theta, r.dims)),
        };
        if spec.group() > MAX_GROUP {
            return Err(unsupported(format!(
                "more than {MAX_GROUP} query heads per KV head"
            )));
        }
        // The prefill kernel's 16-byte key loads, and its key tile within 48 KiB of shared
        // memory (head widths up to 380).
        let tile = griffin_backend_ptx::attention::attend_tokens_shared(&spec);
        if spec.head_dim % 4 != 0 || tile > 48 * 1024 {
            return Err(unsupported(format!(
                "attention heads of {} features (a multiple of 4, at most 380)",
                spec.head_dim
            )));
        }
        Ok(spec)
    }

    fn count_arg(&self) -> Result<Arg, RunError> {
        self.count
            .map(|b| Arg {
                buffer: b,
                offset: 0,
            })
            .ok_or_else(|| unsupported("no chunk counter"))
    }

    /// The rotary inverse-frequency table (f64), shared by every attention layer.
    fn constant_table(&mut self, theta: f64, dims: u32) -> Arg {
        let table: Vec<u8> = inverse_frequencies(theta, dims)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let existing = self
            .buffers
            .iter()
            .position(|b| b.kind == GpuBufferKind::Constant(table.clone()));
        let buffer = match existing {
            Some(b) => b,
            None => {
                let bytes = table.len() as u64;
                self.buffer(GpuBufferKind::Constant(table), bytes)
            }
        };
        Arg { buffer, offset: 0 }
    }

    fn node(&mut self, id: NodeId, index: usize) -> Result<(), RunError> {
        let g = self.g;
        let op = g.node(id).op.clone();
        let x = g.operands(id);
        let r = |output: u32| Value { node: id, output };
        let prefix = if self.prefill.is_some() { "p" } else { "k" };
        let name = format!("{prefix}{index}_{}", op.mnemonic());
        if let Some(max_tokens) = self.prefill {
            if self.prefill_node(id, &op, &name, max_tokens)? {
                return Ok(());
            }
        }
        match &op {
            Op::Input { role, name, .. } => {
                let bytes = 4 * self.elements(r(0))?;
                let b = match role {
                    InputRole::Tokens => {
                        let b = self.buffer(GpuBufferKind::Ids, bytes);
                        self.ids = Some(b);
                        b
                    }
                    // Prefill's start is decode's position: one buffer.
                    InputRole::Position => match self.position {
                        Some(b) => b,
                        None => {
                            let b = self.buffer(GpuBufferKind::Position, bytes);
                            self.position = Some(b);
                            b
                        }
                    },
                    InputRole::State => match self.state_of.get(name) {
                        Some(&b) => b,
                        None => {
                            let b = self.buffer(GpuBufferKind::State(name.clone()), bytes);
                            self.state_of.insert(name.clone(), b);
                            b
                        }
                    },
                };
                self.value_of.insert(
                    r(0),
                    Arg {
                        buffer: b,
                        offset: 0,
                    },
                );
            }
            Op::Output { role, name } => {
                let a = self.value(x[0])?;
                match role {
                    OutputRole::Logits if a.offset == 0 => self.logits = Some(a.buffer),
                    OutputRole::Logits => return Err(unsupported("logits in a view")),
                    OutputRole::State => match &self.buffers[a.buffer].kind {
                        GpuBufferKind::State(held) if held == name => {}
                        _ => {
                            return Err(unsupported(format!(
                                "state `{name}` is not updated in place by one kernel"
                            )))
                        }
                    },
                }
            }
            Op::Param { .. } | Op::Constant { .. } => {}
            _ if g.is_weight_expression(id) => {}
            // Kernels read the position from its buffer.
            Op::Positions => {
                let p = self.position_arg()?;
                self.value_of.insert(r(0), p);
            }
            Op::Reshape { .. } => {
                let a = self.value(x[0])?;
                self.value_of.insert(r(0), a);
            }
            Op::Gather { scale } => {
                let storage = self.matrix_storage(x[0]);
                let table = self.weight(x[0], storage)?;
                let ids = self.value(x[1])?;
                let width = self.dim(x[0], 1)?;
                if self.elements(x[1])? != 1 {
                    return Err(unsupported("gather of more than one token"));
                }
                let out = self.activation(r(0))?;
                let ptx = gather(&name, width, storage, scale.map(|s| s as f32));
                self.launch(
                    name,
                    ptx,
                    width.div_ceil(GATHER_BLOCK),
                    GATHER_BLOCK,
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
                if let Some(n) = norm {
                    if n.weight_offset != 0.0 {
                        return Err(unsupported(
                            "a norm prologue with a weight offset (run the default passes)",
                        ));
                    }
                    args.push(self.weight(x[next], Storage::F32)?);
                    next += 1;
                }
                let (weight_args, spec) = self.projection(
                    &name,
                    &x,
                    next,
                    *bias,
                    *residual,
                    *epilogue,
                    norm.map(|n| n.eps as f32),
                )?;
                args.extend(weight_args);
                let width = spec.width;
                // One output buffer; split results are views into it.
                let out = self.activation(r(0))?;
                let out = Arg {
                    buffer: out.buffer,
                    offset: 0,
                };
                self.buffers[out.buffer].bytes = 4 * width as u64;
                let mut offset = 0u64;
                for (i, part) in splits.iter().enumerate() {
                    if part % 4 != 0 {
                        return Err(unsupported(format!(
                            "a split of {part} columns (views need 16-byte alignment)"
                        )));
                    }
                    self.value_of.insert(
                        r(i as u32),
                        Arg {
                            buffer: out.buffer,
                            offset,
                        },
                    );
                    offset += 4 * part;
                }
                args.push(out);
                let g = grid(&spec);
                self.gemv_specs.insert(self.launches.len(), spec.clone());
                self.launch(name, gemv(&spec), g, 32 * WARPS_PER_BLOCK, args)
                    .work = projection_work(&spec, false, 1);
            }
            Op::RgLru { width, gate_output } => {
                self.rg_lru(id, name, *width, *gate_output)?;
            }
            Op::LocalAttention {
                window,
                scale,
                rotary,
            } => {
                let (q, k, v) = (self.value(x[0])?, self.value(x[1])?, self.value(x[2])?);
                let (keys, values) = (self.value(x[4])?, self.value(x[5])?);
                let position = self.position_arg()?;
                let spec = self.attention_spec(&name, &x, *window, *scale, *rotary)?;
                // Split keys (flash-decoding): partial results per split, then combined. The
                // attend launch also rotates q and k and stores k and v into the ring.
                let (o_elems, ml_elems) = attend_scratch(&spec);
                let [o_part, ml_part] = [o_elems, ml_elems].map(|n| Arg {
                    buffer: self.buffer(GpuBufferKind::Activation, 4 * n as u64),
                    offset: 0,
                });
                let mut args = vec![q, k, v, position];
                if let Some((theta, dims)) = spec.rotary {
                    args.push(self.constant_table(theta, dims));
                }
                args.extend([keys, values, o_part, ml_part]);
                self.launch(
                    format!("{name}_attend"),
                    attend(&spec),
                    attend_grid(&spec),
                    32 * ATTEND_WARPS,
                    args,
                );
                let out = self.activation(r(0))?;
                self.launch(
                    format!("{name}_combine"),
                    attend_combine(&spec),
                    attend_combine_grid(&spec),
                    COMBINE_BLOCK,
                    vec![position, o_part, ml_part, out],
                );
                self.value_of.insert(r(1), keys);
                self.value_of.insert(r(2), values);
            }
            other => {
                return Err(unsupported(format!(
                    "`{}` has no GPU kernel (compile with the default pass pipeline)",
                    other.mnemonic()
                )))
            }
        }
        Ok(())
    }
}

/// `lower_decode` with a chosen prefill chunk (`None`: decode only; prompts then run as decode
/// steps).
pub fn lower(model: &Model, opts: &GpuOptions) -> Result<GpuProgram, RunError> {
    let prefill_chunk = opts.prefill_chunk;
    let g = &model.decode;
    let mut l = Lowering {
        g,
        matrices: opts.weights,
        tensor_cores: opts.tensor_cores,
        tc_inputs: opts.tc_inputs,
        tc_mma: opts.tc_mma,
        k_parts: opts.k_parts,
        prefill: None,
        buffers: Vec::new(),
        launches: Vec::new(),
        kernels: BTreeMap::new(),
        kernel_of_body: HashMap::new(),
        weights: Vec::new(),
        weight_of: HashMap::new(),
        state_of: HashMap::new(),
        value_of: HashMap::new(),
        ids: None,
        position: None,
        logits: None,
        count: None,
        gemm_specs: HashMap::new(),
        gemv_specs: HashMap::new(),
    };
    for (i, id) in g.topo_order().into_iter().enumerate() {
        l.node(id, i)?;
    }
    let ids = l.ids.ok_or_else(|| unsupported("no token input"))?;
    let position = l.position.ok_or_else(|| unsupported("no position input"))?;
    let logits = l.logits.ok_or_else(|| unsupported("no logits output"))?;
    let best = best_pairs(&mut l, logits);
    // The prefill graph into the same state, weights and position buffers.
    let prefill = match prefill_chunk {
        None => None,
        Some(max_tokens) => {
            let decode_launches = std::mem::take(&mut l.launches);
            l.g = &model.prefill;
            l.prefill = Some(max_tokens);
            l.value_of.clear();
            l.ids = None;
            l.logits = None;
            l.count = Some(l.buffer(GpuBufferKind::Activation, 4));
            for (i, id) in model.prefill.topo_order().into_iter().enumerate() {
                l.node(id, i)?;
            }
            let logits = l
                .logits
                .ok_or_else(|| unsupported("no logits in prefill"))?;
            let last_row = last_row_variant(&mut l, logits);
            let prefill = GpuPrefill {
                launches: std::mem::replace(&mut l.launches, decode_launches),
                ids: l
                    .ids
                    .ok_or_else(|| unsupported("no token input in prefill"))?,
                count: l.count.expect("set above"),
                logits,
                max_tokens,
                last_row,
            };
            Some(prefill)
        }
    };
    let vocab = model.vocab_size();
    let next_id = l.buffer(GpuBufferKind::NextId, 4);
    // The greedy argmax over the logits projection's best pairs where it writes them, else
    // over the logits.
    let (argmax_ptx, argmax_in, argmax_bytes) = match best {
        Some((pairs, slots)) => (
            argmax_best("greedy_argmax", slots, vocab as u32),
            pairs,
            8 * slots as u64,
        ),
        None => (
            argmax("greedy_argmax", vocab as u32),
            logits,
            4 * vocab as u64,
        ),
    };
    l.kernels.insert("greedy_argmax".into(), argmax_ptx);
    let at = |buffer| Arg { buffer, offset: 0 };
    let argmax_launch = GpuLaunch {
        kernel: "greedy_argmax".into(),
        grid: 1,
        block: ARGMAX_THREADS,
        args: vec![at(argmax_in), at(next_id)],
        work: Work {
            bytes: argmax_bytes,
            ..Work::default()
        },
    };
    let sample = lower_sampler(&mut l, vocab as u32, logits, next_id);
    let ptx = griffin_backend_ptx::module(&l.kernels.values().cloned().collect::<Vec<_>>());
    let config = &model.checkpoint.config;
    let mut program = GpuProgram {
        ptx,
        kernels: l.kernels,
        plan: GpuPlan {
            version: GPU_PLAN_VERSION,
            buffers: l.buffers,
            launches: l.launches,
            argmax: argmax_launch,
            weights: Plan {
                version: PLAN_VERSION,
                max_tokens: 1,
                vocab_size: vocab as u64,
                bos_token_id: config.bos_token_id,
                eos_token_id: config.eos_token_id,
                pad_token_id: config.pad_token_id,
                buffers: l.weights,
                launches: Vec::new(),
                tokens: 0,
                logits: 0,
                logits_launch: None,
                weights_hash: String::new(),
            },
            ids,
            position,
            logits,
            next_id,
            prefill,
            sample,
        },
    };
    // Activations whose lives do not overlap share device memory (the 2B shape with chunks of
    // 512: 2.11 GB of activation buffers in a 31.5 MB arena; the chunk's logits, 524 MB, are
    // read by the host and stay apart).
    program.plan.pool_activations();
    Ok(program)
}

/// The index of the last launch whose output (its last argument) is `buffer`.
fn last_writer(launches: &[GpuLaunch], buffer: usize) -> Option<usize> {
    launches
        .iter()
        .rposition(|launch| launch.args.last().map(|a| a.buffer) == Some(buffer))
}

/// The decode step's logits projection (the last launch writing `logits`, a GEMV) made to
/// also write each warp's best output and its index (`gemv_with_best`), so the greedy argmax
/// reads a few thousand pairs instead of the whole vocabulary in one block; the pairs' buffer
/// and slots. `None` where the logits come from something else.
fn best_pairs(l: &mut Lowering, logits: usize) -> Option<(usize, u32)> {
    let index = last_writer(&l.launches, logits)?;
    let spec = l.gemv_specs.get(&index)?;
    let spec = GemvSpec {
        name: format!("{}_best", spec.name),
        ..spec.clone()
    };
    let slots = best_slots(spec.width);
    let pairs = l.buffer(GpuBufferKind::Activation, 8 * slots as u64);
    let name = spec.name.clone();
    l.kernels.insert(name.clone(), gemv_with_best(&spec));
    let launch = &mut l.launches[index];
    let old = std::mem::replace(&mut launch.kernel, name);
    launch.args.push(Arg {
        buffer: pairs,
        offset: 0,
    });
    launch.work.bytes += 8 * slots as u64;
    // The plain kernel leaves the module unless another launch shares its body.
    if !l.launches.iter().any(|launch| launch.kernel == old) {
        l.kernels.remove(&old);
        l.kernel_of_body.retain(|_, kernel| *kernel != old);
    }
    Some((pairs, slots))
}

/// The prefill launches with the logits projection run on the chunk's last row only (one
/// decode-style GEMV after copying that row), for generation; `None` when the logits come
/// from something else than an unsplit projection without residual.
fn last_row_variant(l: &mut Lowering, logits: usize) -> Option<LastRow> {
    use griffin_backend_ptx::prefill::{last_row, NORM_BLOCK};
    let index = last_writer(&l.launches, logits)?;
    let (spec, row_scales) = l.gemm_specs.get(&index)?.clone();
    if spec.residual {
        return None;
    }
    let launch = l.launches[index].clone();
    let (count, x) = (launch.args[0], launch.args[1]);
    let row = l.buffer(GpuBufferKind::Activation, 4 * spec.inputs as u64);
    let row = Arg {
        buffer: row,
        offset: 0,
    };
    let out = l.buffer(GpuBufferKind::Activation, 4 * spec.width as u64);
    let out = Arg {
        buffer: out,
        offset: 0,
    };
    let copy_name = format!("{}_last_row", spec.name);
    let copy = GpuLaunch {
        kernel: copy_name.clone(),
        grid: spec.inputs.div_ceil(NORM_BLOCK),
        block: NORM_BLOCK,
        args: vec![count, x, row],
        work: Work::default(),
    };
    l.kernels
        .insert(copy_name.clone(), last_row(&copy_name, spec.inputs));
    let gemv_spec = GemvSpec {
        name: format!("{}_last", spec.name),
        ..spec.clone()
    };
    // [count, x, (scale), w, (bias), out] -> [row, w, (bias), out_last] (the GEMV reads the
    // norm's unscaled rows).
    let mut args = vec![row];
    let weights_from = if row_scales { 3 } else { 2 };
    args.extend_from_slice(&launch.args[weights_from..launch.args.len() - 1]);
    args.push(out);
    let project = GpuLaunch {
        kernel: gemv_spec.name.clone(),
        grid: grid(&gemv_spec),
        block: 32 * WARPS_PER_BLOCK,
        args,
        work: projection_work(&gemv_spec, false, 1),
    };
    l.kernels.insert(gemv_spec.name.clone(), gemv(&gemv_spec));
    let mut launches = l.launches.clone();
    launches.splice(index..=index, [copy, project]);
    Some(LastRow {
        launches,
        logits: out.buffer,
    })
}

/// The device sampler after the decode step: its kernels, state buffer and launches (from the
/// step's logits into the next-id buffer). None for a vocabulary past its limit, which then
/// samples on the host.
fn lower_sampler(
    l: &mut Lowering<'_>,
    vocab: u32,
    logits: usize,
    next: usize,
) -> Option<GpuSample> {
    use griffin_backend_ptx::sample::{layout, MAX_VOCAB};
    if vocab > MAX_VOCAB {
        return None;
    }
    let state = l.buffer(GpuBufferKind::SamplerState, layout::bytes(vocab) as u64);
    let at = |buffer| Arg { buffer, offset: 0 };
    let mut launches = Vec::new();
    for k in super::sampling::sampler_kernels("sample", vocab) {
        let args = k.params.args(at(logits), at(state), at(next));
        launches.push(GpuLaunch {
            kernel: k.name.clone(),
            grid: k.grid,
            block: k.block,
            args,
            work: Work {
                bytes: k.bytes,
                ..Work::default()
            },
        });
        l.kernels.insert(k.name, k.ptx);
    }
    Some(GpuSample {
        launches,
        state,
        seen_offset: layout::seen(vocab) as u64,
    })
}
