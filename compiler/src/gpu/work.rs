//! Each launch's work (bytes it must move, FLOPs it must do) for `--profile`'s rates.

use griffin_backend_ptx::gemv::{Epilogue as GemvEpilogue, GemvSpec};
use griffin_backend_ptx::rg_lru::RgLruSpec;
use griffin_runtime::gpu_plan::Work;

/// A projection's work for `--profile`: its weights (and bias) once, its inputs, outputs and
/// residual per token (`per_token`: a prefill chunk's) or once (decode), two FLOP per weight
/// and token times `mma` (2 for tensor cores on split inputs, which run two MMAs per tile).
pub(super) fn projection_work(spec: &GemvSpec, per_token: bool, mma: u64) -> Work {
    let rows = spec.width as u64
        * if spec.epilogue == GemvEpilogue::GeGlu {
            2
        } else {
            1
        };
    let element = spec.weights.bytes() as u64;
    let fixed = rows * spec.inputs as u64 * element + if spec.bias { 4 * rows } else { 0 };
    let outputs = if spec.residual { 2 } else { 1 } * spec.width as u64;
    let token_bytes = 4 * (spec.inputs as u64 + outputs);
    work(
        per_token,
        fixed,
        token_bytes,
        2 * rows * spec.inputs as u64 * mma,
    )
}

/// `fixed` bytes once, `bytes` and `flops` per token (`per_token`: a prefill chunk's launch) or
/// once (a decode step's).
pub(super) fn work(per_token: bool, fixed: u64, bytes: u64, flops: u64) -> Work {
    if per_token {
        Work {
            bytes: fixed,
            bytes_per_token: bytes,
            flops: 0,
            flops_per_token: flops,
        }
    } else {
        Work {
            bytes: fixed + bytes,
            bytes_per_token: 0,
            flops,
            flops_per_token: 0,
        }
    }
}

/// The recurrence's work for `--profile`: both gates' block-diagonal matrices and the conv
/// weights once; per token (`per_token`: the prefill gates kernel's chunk) or once (a decode
/// step) the input, the scan's coefficients or state, window and output rows, and the gates'
/// and conv's FLOPs.
pub(super) fn rg_lru_work(spec: &RgLruSpec, per_token: bool) -> Work {
    let (c, k) = (spec.channels as u64, spec.width as u64);
    // The gates', and the conv's weights once and its FLOPs.
    gates_work(spec, per_token) + work(per_token, 4 * c * k, 0, 2 * c * k)
}

/// The gates' part of `rg_lru_work` (all of it but the conv): both block-diagonal matrices
/// once; per token or once: x in and a, b out in a chunk, x, y, the state and a window row
/// read and written and the output in a step; the gates' FLOPs.
pub(super) fn gates_work(spec: &RgLruSpec, per_token: bool) -> Work {
    let (c, b) = (spec.channels as u64, (spec.channels / spec.blocks) as u64);
    let rows = if per_token { 3 } else { 7 };
    work(
        per_token,
        2 * c * b * spec.gates.bytes() as u64,
        4 * rows * c,
        2 * 2 * c * b,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use griffin_backend_ptx::rg_lru::Storage;

    #[test]
    fn projection_work_counts_weights_once_and_activations_per_token() {
        // The 2B MLP's up projection: GeGLU, so 2 · 7680 rows of 2560 bf16 weights.
        let spec = GemvSpec {
            name: "up".into(),
            inputs: 2560,
            width: 7680,
            bias: false,
            epilogue: GemvEpilogue::GeGlu,
            residual: false,
            weights: Storage::Bf16,
            norm: None,
        };
        let weights = 2 * 7680 * 2560 * 2;
        let decode = projection_work(&spec, false, 1);
        assert_eq!(
            decode.at(1),
            (weights + 4 * (2560 + 7680), 2 * 2 * 7680 * 2560)
        );
        // A chunk of 512 on tensor cores with split inputs: two MMAs per weight and token.
        let chunk = projection_work(&spec, true, 2);
        assert_eq!(
            chunk.at(512),
            (
                weights + 512 * 4 * (2560 + 7680),
                512 * 2 * 2 * 2 * 7680 * 2560
            )
        );
    }

    #[test]
    fn rg_lru_work_counts_both_gates() {
        // The 2B recurrence: 2560 channels in 10 blocks of 256, bf16 gates, conv of 4.
        let spec = RgLruSpec {
            name: "r".into(),
            channels: 2560,
            blocks: 10,
            width: 4,
            conv: Storage::F32,
            gates: Storage::Bf16,
            gate_output: true,
        };
        let (bytes, flops) = rg_lru_work(&spec, false).at(1);
        // 2.6 MB of gate matrices, 41 KB of conv weights, 72 KB of rows.
        assert_eq!(bytes, 2 * 2560 * 256 * 2 + 4 * 2560 * 4 + 4 * 7 * 2560);
        assert_eq!(flops, 4 * 2560 * 256 + 2 * 2560 * 4);
    }
}
