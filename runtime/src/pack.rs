//! Packing weights from a checkpoint by the plan's recipes: the compiler at build time and an
//! executable (`--pack-weights-from`) run this same code, so both produce the same bytes.

use crate::plan::{BufferKind, Layout, Plan, Recipe, Storage};
use crate::weights::{align, Fnv};

/// Checkpoint tensors by name, widened to f32.
pub trait TensorSource {
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, String>;
}

fn unary(op: &str, x: f64) -> Result<f64, String> {
    Ok(match op {
        "neg" => -x,
        "exp" => x.exp(),
        "expm1" => x.exp_m1(),
        "log" => x.ln(),
        "sqrt" => x.sqrt(),
        "rsqrt" => 1.0 / x.sqrt(),
        "tanh" => x.tanh(),
        "sigmoid" => 1.0 / (1.0 + (-x).exp()),
        // log(1 + e^x) without overflow for large x.
        "softplus" if x > 30.0 => x,
        "softplus" => x.exp().ln_1p(),
        "gelu_tanh" => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        other => return Err(format!("unknown unary op `{other}` in a weight recipe")),
    })
}

fn binary(op: &str, a: f64, b: f64) -> Result<f64, String> {
    Ok(match op {
        "add" => a + b,
        "sub" => a - b,
        "mul" => a * b,
        "div" => a / b,
        "max" => a.max(b),
        "min" => a.min(b),
        other => return Err(format!("unknown binary op `{other}` in a weight recipe")),
    })
}

/// The values a recipe computes, as f32.
pub fn evaluate(recipe: &Recipe, source: &dyn TensorSource) -> Result<Vec<f32>, String> {
    Ok(match recipe {
        Recipe::Tensor(name) => source.tensor_f32(name)?,
        Recipe::Scalar(v) => vec![*v as f32],
        Recipe::Unary(op, a) => evaluate(a, source)?
            .into_iter()
            .map(|x| unary(op, x as f64).map(|y| y as f32))
            .collect::<Result<_, _>>()?,
        Recipe::Binary(op, a, b) => {
            let (x, y) = (evaluate(a, source)?, evaluate(b, source)?);
            let n = x.len().max(y.len());
            if !(x.len() == n || x.len() == 1) || !(y.len() == n || y.len() == 1) {
                return Err(format!(
                    "weight recipe `{op}` of {} and {} elements",
                    x.len(),
                    y.len()
                ));
            }
            let at = |v: &[f32], i: usize| v[if v.len() == 1 { 0 } else { i }] as f64;
            (0..n)
                .map(|i| binary(op, at(&x, i), at(&y, i)).map(|r| r as f32))
                .collect::<Result<_, _>>()?
        }
        Recipe::Concat(parts) => {
            let mut out = Vec::new();
            for p in parts {
                out.extend(evaluate(p, source)?);
            }
            out
        }
    })
}

/// Bytes of one element in `storage`.
fn element_bytes(storage: Storage) -> usize {
    match storage {
        Storage::F32 => 4,
        Storage::Bf16 => 2,
    }
}

/// Writes `v` as element `at` of `out` in `storage`.
fn put(out: &mut [u8], at: usize, v: f32, storage: Storage) {
    match storage {
        Storage::F32 => out[4 * at..4 * at + 4].copy_from_slice(&v.to_le_bytes()),
        Storage::Bf16 => out[2 * at..2 * at + 2]
            .copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
    }
}

/// Row-major values as the bytes of `storage`, in `layout`'s order (zeros where it pads):
/// converted and placed in one pass, with no rearranged copy of the values.
pub fn store(values: &[f32], layout: Layout, storage: Storage) -> Result<Vec<u8>, String> {
    let size = element_bytes(storage);
    let Layout::Blocked { rows, cols, .. } = layout else {
        let mut out = vec![0u8; values.len() * size];
        for (at, v) in values.iter().enumerate() {
            put(&mut out, at, *v, storage);
        }
        return Ok(out);
    };
    if values.len() as u64 != rows * cols {
        return Err(format!(
            "{} values for a [{rows}, {cols}] projection",
            values.len()
        ));
    }
    let mut out = vec![0u8; layout.elements(rows * cols, storage) as usize * size];
    if cols == 0 {
        return Ok(out);
    }
    let col_offsets: Vec<usize> = (0..cols)
        .map(|c| layout.col_offset(c, storage) as usize)
        .collect();
    for (r, row) in values.chunks_exact(cols as usize).enumerate() {
        let base = layout.row_offset(r as u64, storage) as usize;
        for (v, off) in row.iter().zip(&col_offsets) {
            put(&mut out, base + off, *v, storage);
        }
    }
    Ok(out)
}

/// Computes every weight of `plan` from `source` and lays them out 64-byte aligned in buffer
/// order; writes each one's offset and size into the plan and its hash into `weights_hash`.
pub fn pack(plan: &mut Plan, source: &dyn TensorSource) -> Result<Vec<u8>, String> {
    pack_with_progress(plan, source, &mut |_, _| {})
}

/// `pack`, calling `progress(done, total)` after each weight (for progress bars).
pub fn pack_with_progress(
    plan: &mut Plan,
    source: &dyn TensorSource,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<u8>, String> {
    let total = plan
        .buffers
        .iter()
        .filter(|b| matches!(b.kind, BufferKind::Weight { .. }))
        .count();
    let mut done = 0;
    let mut data = Vec::new();
    for buffer in &mut plan.buffers {
        if let BufferKind::Weight {
            name,
            offset,
            bytes,
            storage,
            recipe,
            layout,
        } = &mut buffer.kind
        {
            let values = evaluate(recipe, source).map_err(|e| format!("weight `{name}`: {e}"))?;
            let packed =
                store(&values, *layout, *storage).map_err(|e| format!("weight `{name}`: {e}"))?;
            *offset = align(data.len() as u64);
            *bytes = packed.len() as u64;
            data.resize(*offset as usize, 0);
            data.extend_from_slice(&packed);
            done += 1;
            progress(done, total);
        }
    }
    let mut hash = Fnv::default();
    hash.update(&data);
    plan.weights_hash = hash.hex();
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element lands in its own slot of the blocked layout, the rest is zero padding,
    /// and `index` finds each element where `arrange` put it.
    #[test]
    fn blocked_layouts_place_every_element_once() {
        for storage in [Storage::F32, Storage::Bf16] {
            for (rows, cols, panels, geglu) in [
                (40, 7, 1, false),
                (40, 8, 4, false),
                (70, 3, 2, true),
                (16, 1, 1, true),
                (100, 33, 4, false),
            ] {
                let layout = Layout::Blocked {
                    rows,
                    cols,
                    panels,
                    geglu,
                };
                // Distinct values exact in bf16 (7 fraction bits), none zero.
                let value = |i: u64| (1.0 + (i % 128) as f32 / 128.0) * 2f32.powi((i / 128) as i32);
                let values: Vec<f32> = (0..rows * cols).map(value).collect();
                let bytes = store(&values, layout, storage).unwrap();
                let packed: Vec<f32> = match storage {
                    Storage::F32 => bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                    Storage::Bf16 => bytes
                        .chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                };
                assert_eq!(packed.len() as u64, layout.elements(rows * cols, storage));
                let mut seen = vec![false; packed.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        let at = layout.index(r, c, storage) as usize;
                        assert_eq!(packed[at], value(r * cols + c), "{layout:?}");
                        assert!(!seen[at], "{layout:?}: ({r}, {c}) shares a slot");
                        seen[at] = true;
                    }
                }
                let padding = packed.iter().zip(&seen).filter(|(_, s)| !**s);
                assert!(padding.clone().all(|(v, _)| *v == 0.0), "{layout:?}");
            }
        }
    }

    #[test]
    fn a_blocked_weight_of_the_wrong_size_is_refused() {
        let layout = Layout::Blocked {
            rows: 4,
            cols: 4,
            panels: 1,
            geglu: false,
        };
        let err = store(&[0.0; 15], layout, Storage::F32).unwrap_err();
        assert_eq!(err, "15 values for a [4, 4] projection");
    }
}
