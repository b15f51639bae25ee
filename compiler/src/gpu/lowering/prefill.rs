//! The prefill graph's kernels: a chunk of up to `max_tokens` tokens per launch list.

use griffin_backend_ptx::attention::ROTATE_BLOCK;
use griffin_backend_ptx::gemv::{grid, GemvSpec, WARPS_PER_BLOCK};
use griffin_backend_ptx::rg_lru::Storage;
use griffin_backend_ptx::tc::TcInputs;
use griffin_ir::{InputRole, NodeId, Op, Value};
use griffin_runtime::gpu_plan::{Arg, GpuBufferKind, Work};

use super::Lowering;
use crate::error::RunError;
use crate::gpu::unsupported;
use crate::gpu::work::projection_work;

impl Lowering<'_> {
    /// The prefill graph's kernel ops, over a chunk of up to `max_tokens` tokens; `false` for
    /// ops handled as in decode (inputs, outputs, weights, aliases).
    pub(super) fn prefill_node(
        &mut self,
        id: NodeId,
        op: &Op,
        name: &str,
        max_tokens: u32,
    ) -> Result<bool, RunError> {
        use griffin_backend_ptx::attention::{
            attend_tokens, attend_tokens_block, attend_tokens_grid, rotate_tokens,
            rotate_tokens_threads, write_ring_tokens,
        };
        use griffin_backend_ptx::attention_tc::{
            attend_tokens_tc, attend_tokens_tc_block, attend_tokens_tc_grid,
            attend_tokens_tc_scratch, attention_fits_tensor_cores, kv_split_bytes,
            kv_split_threads, kv_split_tokens,
        };
        use griffin_backend_ptx::prefill::{
            elementwise_grid, gather_tokens, gemm_tokens_split, norm_tokens_grid, rms_norm_tokens,
            row_scales_tokens, NORM_BLOCK,
        };
        use griffin_backend_ptx::tc::{
            gemm_reduce_tokens, gemm_tokens_tc, gemm_tokens_tc_partial, k_parts_fit, tc_block,
            tc_grid, tc_k_split, tc_token_warps, tensor_cores_fit,
        };
        let g = self.g;
        let x = g.operands(id);
        let r = |output: u32| Value { node: id, output };
        let count = self.count_arg()?;
        let name = name.to_string();
        match op {
            Op::Input {
                role: InputRole::Tokens,
                ..
            } => {
                let b = self.buffer(GpuBufferKind::Activation, 4 * max_tokens as u64);
                self.ids = Some(b);
                self.value_of.insert(
                    r(0),
                    Arg {
                        buffer: b,
                        offset: 0,
                    },
                );
            }
            Op::Gather { scale } => {
                let storage = self.matrix_storage(x[0]);
                let table = self.weight(x[0], storage)?;
                let ids = self.value(x[1])?;
                let width = self.dim(x[0], 1)?;
                let out = self.activation(r(0))?;
                let ptx = gather_tokens(&name, width, max_tokens, storage, scale.map(|s| s as f32));
                self.launch(
                    name,
                    ptx,
                    elementwise_grid(max_tokens * width, NORM_BLOCK),
                    NORM_BLOCK,
                    vec![count, table, ids, out],
                );
            }
            Op::Linear {
                bias,
                norm,
                epilogue,
                residual,
                splits,
            } => {
                let mut input = self.value(x[0])?;
                let inputs = self.dim(x[0], 1)?;
                // Operands: x, [gain], the weight, ...
                let next = if norm.is_some() { 2 } else { 1 };
                let (weight_args, spec) =
                    self.projection(&name, &x, next, *bias, *residual, *epilogue, None)?;
                let parts: Vec<u32> = splits.iter().map(|&p| p as u32).collect();
                let tc = self.tensor_cores && tensor_cores_fit(&spec, &parts);
                // f16 operands come with each row's power-of-two scale, so no row overflows
                // f16 (`TcConfig::row_scales`): from the norm, where there is one, else from a
                // launch of its own.
                let row_scales = tc && self.tc_inputs == TcInputs::F16;
                let mut scale = None;
                if row_scales {
                    let b = self.buffer(GpuBufferKind::Activation, 4 * max_tokens as u64);
                    scale = Some(Arg {
                        buffer: b,
                        offset: 0,
                    });
                }
                if let Some(n) = norm {
                    if n.weight_offset != 0.0 {
                        return Err(unsupported(
                            "a norm prologue with a weight offset (run the default passes)",
                        ));
                    }
                    let gain = self.weight(x[1], Storage::F32)?;
                    let scratch =
                        self.buffer(GpuBufferKind::Activation, 4 * (max_tokens * inputs) as u64);
                    let scratch = Arg {
                        buffer: scratch,
                        offset: 0,
                    };
                    let mut norm_args = vec![count, input, gain, scratch];
                    norm_args.extend(scale);
                    let norm_name = format!("{name}_norm");
                    self.launch(
                        norm_name.clone(),
                        rms_norm_tokens(&norm_name, inputs, n.eps as f32, row_scales),
                        norm_tokens_grid(max_tokens),
                        NORM_BLOCK,
                        norm_args,
                    );
                    input = scratch;
                } else if let Some(scale) = scale {
                    let scales_name = format!("{name}_row_scales");
                    self.launch(
                        scales_name.clone(),
                        row_scales_tokens(&scales_name, inputs),
                        norm_tokens_grid(max_tokens),
                        NORM_BLOCK,
                        vec![count, input, scale],
                    )
                    .work = Work {
                        bytes_per_token: 4 * inputs as u64,
                        ..Work::default()
                    };
                }
                // [count, x, (scale), w, ...]: the inputs' part ends at `inputs_end`.
                let mut args = vec![count, input];
                args.extend(scale);
                let inputs_end = args.len() + 1;
                args.extend(weight_args);
                let outputs = if parts.is_empty() { 1 } else { parts.len() };
                for i in 0..outputs {
                    args.push(self.activation(r(i as u32))?);
                }
                self.gemm_specs
                    .insert(self.launches.len(), (spec.clone(), row_scales));
                if tc {
                    let token_warps = tc_token_warps(&spec, max_tokens);
                    let mma = self.tc_inputs.mmas_per_tile() as u64;
                    let k_split = match self.k_parts {
                        None => tc_k_split(&spec, max_tokens, token_warps, mma as u32),
                        Some(n) if n > 1 && k_parts_fit(&spec, n) => n,
                        Some(_) => 1,
                    };
                    if k_split > 1 {
                        // Partial sums over k parts (a fuller last wave), then a launch that
                        // adds them and finishes: [count, x, w] + partial, and [count,
                        // partial] + the rest.
                        let partial = Arg {
                            buffer: self.buffer(
                                GpuBufferKind::Activation,
                                4 * (k_split * max_tokens * spec.width) as u64,
                            ),
                            offset: 0,
                        };
                        let mut sums = args[..inputs_end].to_vec();
                        sums.push(partial);
                        let mut finish = vec![count, partial];
                        finish.extend_from_slice(&args[inputs_end..]);
                        self.launch(
                            format!("{name}_k{k_split}"),
                            gemm_tokens_tc_partial(
                                &GemvSpec {
                                    name: format!("{name}_k{k_split}"),
                                    ..spec.clone()
                                },
                                self.tc_config(row_scales),
                                token_warps,
                                k_split,
                                max_tokens,
                            ),
                            k_split * tc_grid(&spec, max_tokens, token_warps),
                            tc_block(token_warps),
                            sums,
                        )
                        .work = Work {
                            bytes_per_token: 4 * (spec.inputs + k_split * spec.width) as u64,
                            ..projection_work(&spec, true, mma)
                        };
                        let reduce = GemvSpec {
                            name: format!("{name}_reduce"),
                            ..spec.clone()
                        };
                        let outputs = if spec.residual { 2 } else { 1 };
                        self.launch(
                            reduce.name.clone(),
                            gemm_reduce_tokens(&reduce, &parts, k_split, max_tokens),
                            elementwise_grid(max_tokens * spec.width, NORM_BLOCK),
                            NORM_BLOCK,
                            finish,
                        )
                        .work = Work {
                            bytes_per_token: 4 * ((k_split + outputs) * spec.width) as u64,
                            flops_per_token: (k_split * spec.width) as u64,
                            ..Work::default()
                        };
                        return Ok(true);
                    }
                    self.launch(
                        name,
                        gemm_tokens_tc(&spec, &parts, self.tc_config(row_scales), token_warps),
                        tc_grid(&spec, max_tokens, token_warps),
                        tc_block(token_warps),
                        args,
                    )
                    .work = projection_work(&spec, true, mma);
                } else {
                    let grid_size = grid(&spec);
                    self.launch(
                        name,
                        gemm_tokens_split(&spec, &parts),
                        grid_size,
                        32 * WARPS_PER_BLOCK,
                        args,
                    )
                    .work = projection_work(&spec, true, 1);
                }
            }
            Op::LocalAttention {
                window,
                scale,
                rotary,
            } => {
                let (q, k, v) = (self.value(x[0])?, self.value(x[1])?, self.value(x[2])?);
                let (keys, values) = (self.value(x[4])?, self.value(x[5])?);
                let start = self.position_arg()?;
                let spec = self.attention_spec(&name, &x, *window, *scale, *rotary)?;
                let scratch = |l: &mut Self, rows: u32| Arg {
                    buffer: l.buffer(
                        GpuBufferKind::Activation,
                        4 * (max_tokens * rows * spec.head_dim) as u64,
                    ),
                    offset: 0,
                };
                let q_rot = scratch(self, spec.heads);
                let k_rot = scratch(self, spec.kv_heads);
                let mut args = vec![count, start, q, k];
                if let Some((theta, dims)) = spec.rotary {
                    args.push(self.constant_table(theta, dims));
                }
                args.extend([q_rot, k_rot]);
                self.launch(
                    format!("{name}_rotate_tokens"),
                    rotate_tokens(&spec, max_tokens),
                    elementwise_grid(rotate_tokens_threads(&spec, max_tokens), ROTATE_BLOCK),
                    ROTATE_BLOCK,
                    args,
                );
                let out = self.activation(r(0))?;
                let mut args = vec![q_rot, count, start, k_rot, v, keys, values, out];
                if self.tensor_cores && attention_fits_tensor_cores(&spec) {
                    // The window's keys and values split once for every block, then attention.
                    let planes = Arg {
                        buffer: self
                            .buffer(GpuBufferKind::Activation, kv_split_bytes(&spec, max_tokens)),
                        offset: 0,
                    };
                    self.launch(
                        format!("{name}_kv_split_tokens"),
                        kv_split_tokens(&spec, self.unscaled_inputs(), max_tokens),
                        elementwise_grid(kv_split_threads(&spec, max_tokens), NORM_BLOCK),
                        NORM_BLOCK,
                        vec![count, start, k_rot, v, keys, values, planes],
                    );
                    let scratch = attend_tokens_tc_scratch(&spec, max_tokens);
                    args.push(Arg {
                        buffer: self.buffer(GpuBufferKind::Activation, scratch),
                        offset: 0,
                    });
                    args.push(planes);
                    self.launch(
                        format!("{name}_attend_tokens_tc"),
                        attend_tokens_tc(&spec, self.unscaled_inputs(), max_tokens),
                        attend_tokens_tc_grid(&spec, max_tokens),
                        attend_tokens_tc_block(&spec),
                        args,
                    );
                } else {
                    self.launch(
                        format!("{name}_attend_tokens"),
                        attend_tokens(&spec),
                        attend_tokens_grid(&spec, max_tokens),
                        attend_tokens_block(&spec),
                        args,
                    );
                }
                self.launch(
                    format!("{name}_write_ring_tokens"),
                    write_ring_tokens(&spec, max_tokens),
                    elementwise_grid(max_tokens * spec.kv_heads * spec.head_dim, ROTATE_BLOCK),
                    ROTATE_BLOCK,
                    vec![count, start, k_rot, v, keys, values],
                );
                self.value_of.insert(r(1), keys);
                self.value_of.insert(r(2), values);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}
