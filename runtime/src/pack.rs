//! Packing weights from a checkpoint by the plan's recipes: the compiler at build time and an
//! executable (`--pack-weights-from`) run this same code, so both produce the same bytes.

use crate::plan::{BufferKind, Layout, Plan, Recipe, Storage};
use crate::weights::align;

/// How a checkpoint tensor is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDtype {
    F32,
    Bf16,
    F16,
}

/// Checkpoint tensors by name, widened to f32.
pub trait TensorSource {
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, String>;

    /// The tensor's stored dtype and little-endian bytes, where the source can lend them
    /// (memory-mapped files): a weight stored as it is in the checkpoint is then copied, not
    /// widened to f32 and narrowed again. `None`: use `tensor_f32`.
    fn tensor_raw(&self, _name: &str) -> Option<(SourceDtype, &[u8])> {
        None
    }
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

/// Bytes `values` take in `layout` and `storage` (padding included).
fn stored_bytes(values: &[f32], layout: Layout, storage: Storage) -> Result<usize, String> {
    if let Layout::Blocked { rows, cols, .. } = layout {
        if values.len() as u64 != rows * cols {
            return Err(format!(
                "{} values for a [{rows}, {cols}] projection",
                values.len()
            ));
        }
    }
    Ok(layout.elements(values.len() as u64, storage) as usize * element_bytes(storage))
}

/// Row-major values as the bytes of `storage`, in `layout`'s order (zeros where it pads):
/// converted and placed in one pass, with no rearranged copy of the values.
pub fn store(values: &[f32], layout: Layout, storage: Storage) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; stored_bytes(values, layout, storage)?];
    store_into(values, layout, storage, &mut out);
    Ok(out)
}

/// `store` into `out` (zeroed, `stored_bytes` long).
fn store_into(values: &[f32], layout: Layout, storage: Storage, out: &mut [u8]) {
    let Layout::Blocked { cols, .. } = layout else {
        for (at, v) in values.iter().enumerate() {
            put(out, at, *v, storage);
        }
        return;
    };
    if cols == 0 {
        return;
    }
    let rows = values.chunks_exact(cols as usize).map(|row| row.iter());
    scatter(layout, storage, rows, |at, v| put(out, at, *v, storage));
}

/// Walks a blocked weight's rows (each an iterator over its elements, row-major order) and
/// calls `place(slot, element)` with each element's slot in `layout` (an element index).
fn scatter<R: Iterator>(
    layout: Layout,
    storage: Storage,
    rows: impl Iterator<Item = R>,
    mut place: impl FnMut(usize, R::Item),
) {
    let Layout::Blocked { cols, .. } = layout else {
        unreachable!("row-major weights are stored as computed")
    };
    let col_offsets: Vec<usize> = (0..cols)
        .map(|c| layout.col_offset(c, storage) as usize)
        .collect();
    for (r, row) in rows.enumerate() {
        let base = layout.row_offset(r as u64, storage) as usize;
        for (v, off) in row.zip(&col_offsets) {
            place(base + off, v);
        }
    }
}

/// A weight that is a checkpoint tensor, or tensors joined along their first axis, stored in
/// the checkpoint's own dtype: its parts' bytes as they are in the files (row-major, rows
/// continuing from one part to the next).
fn raw_parts<'a>(
    recipe: &'a Recipe,
    storage: Storage,
    source: &'a dyn TensorSource,
) -> Option<Vec<&'a [u8]>> {
    let names: Vec<&String> = match recipe {
        Recipe::Tensor(name) => vec![name],
        Recipe::Concat(parts) => parts
            .iter()
            .map(|p| match p {
                Recipe::Tensor(name) => Some(name),
                _ => None,
            })
            .collect::<Option<_>>()?,
        _ => return None,
    };
    let want = match storage {
        Storage::F32 => SourceDtype::F32,
        Storage::Bf16 => SourceDtype::Bf16,
    };
    names
        .into_iter()
        .map(|name| match source.tensor_raw(name)? {
            (dtype, bytes) if dtype == want => Some(bytes),
            _ => None,
        })
        .collect()
}

/// Appends a weight's stored-dtype bytes (`raw_parts`) to `out` in `layout`'s order: copied
/// whole when row-major, element by element into the blocked order otherwise (the same bytes
/// widening and narrowing each value would give, without an f32 copy of the weight).
fn place_raw(
    parts: &[&[u8]],
    layout: Layout,
    storage: Storage,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let Layout::Blocked { rows, cols, .. } = layout else {
        for part in parts {
            out.extend_from_slice(part);
        }
        return Ok(());
    };
    let size = element_bytes(storage);
    let given: usize = parts.iter().map(|p| p.len()).sum();
    if given as u64 != rows * cols * size as u64 {
        return Err(format!(
            "{} values for a [{rows}, {cols}] projection",
            given / size
        ));
    }
    let start = out.len();
    out.resize(
        start + layout.elements(rows * cols, storage) as usize * size,
        0,
    );
    if cols == 0 {
        return Ok(());
    }
    let row_bytes = cols as usize * size;
    if let Some(p) = parts.iter().find(|p| p.len() % row_bytes != 0) {
        return Err(format!(
            "a part of {} values is not whole rows of {cols}",
            p.len() / size
        ));
    }
    let dst = &mut out[start..];
    let rows = parts
        .iter()
        .flat_map(|p| p.chunks_exact(row_bytes))
        .map(|row| row.chunks_exact(size));
    scatter(layout, storage, rows, |at, v| {
        dst[size * at..size * (at + 1)].copy_from_slice(v)
    });
    Ok(())
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
    // The plan's sizes, where known, so the buffer is allocated once.
    let expected: u64 = plan
        .buffers
        .iter()
        .filter_map(|b| match b.kind {
            BufferKind::Weight { bytes, .. } => Some(align(bytes)),
            _ => None,
        })
        .sum();
    let mut data = Vec::with_capacity(expected as usize);
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
            *offset = align(data.len() as u64);
            data.resize(*offset as usize, 0);
            if let Some(parts) = raw_parts(recipe, *storage, source) {
                place_raw(&parts, *layout, *storage, &mut data)
                    .map_err(|e| format!("weight `{name}`: {e}"))?;
            } else {
                let values =
                    evaluate(recipe, source).map_err(|e| format!("weight `{name}`: {e}"))?;
                let n = stored_bytes(&values, *layout, *storage)
                    .map_err(|e| format!("weight `{name}`: {e}"))?;
                data.resize(*offset as usize + n, 0);
                store_into(&values, *layout, *storage, &mut data[*offset as usize..]);
            }
            *bytes = data.len() as u64 - *offset;
            done += 1;
            progress(done, total);
        }
    }
    plan.weights_hash = weights_hash(&data);
    Ok(data)
}

/// The packed weights' hash, which an executable checks its weights file against: FNV-1a's
/// step over 64-bit little-endian words in four interleaved lanes (so the multiplies do not
/// wait on each other: a byte at a time took ~7 s for the 2B model's 5.4 GB), the tail bytewise,
/// then the lanes and the length folded together.
pub fn weights_hash(data: &[u8]) -> String {
    const PRIME: u64 = 0x100_0000_01b3;
    let mut lanes = [0xcbf2_9ce4_8422_2325u64; 4];
    for (i, lane) in lanes.iter_mut().enumerate() {
        *lane ^= i as u64;
    }
    let mut blocks = data.chunks_exact(32);
    for block in &mut blocks {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(PRIME);
        }
    }
    for &b in blocks.remainder() {
        lanes[0] = (lanes[0] ^ b as u64).wrapping_mul(PRIME);
    }
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in lanes.into_iter().chain([data.len() as u64]) {
        h = (h ^ v).wrapping_mul(PRIME);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Buffer;

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

    /// bf16 and f32 tensors, lent as bytes (a memory-mapped checkpoint) or only widened.
    struct Source {
        lends: bool,
    }

    impl Source {
        fn tensor(name: &str) -> (SourceDtype, Vec<u8>) {
            // Values exact in bf16, some negative, a NaN-free spread of exponents.
            let n = 6 + name.len();
            let values = (0..n).map(|i| (i as f32 - 3.0) * 0.375 * (1 << (i % 5)) as f32);
            if name.starts_with("f32") {
                (
                    SourceDtype::F32,
                    values.flat_map(|v| v.to_le_bytes()).collect(),
                )
            } else {
                let bits = values.map(|v| half::bf16::from_f32(v).to_bits());
                (
                    SourceDtype::Bf16,
                    bits.flat_map(|b| b.to_le_bytes()).collect(),
                )
            }
        }
    }

    impl TensorSource for Source {
        fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, String> {
            Ok(match Source::tensor(name) {
                (SourceDtype::F32, b) => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                (_, b) => b
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            })
        }

        fn tensor_raw(&self, name: &str) -> Option<(SourceDtype, &[u8])> {
            // Leaked: the test's few bytes live as long as the source would lend them.
            let (dtype, bytes) = Source::tensor(name);
            self.lends
                .then(|| (dtype, &*Box::leak(bytes.into_boxed_slice())))
        }
    }

    fn weight(recipe: Recipe, storage: Storage) -> Buffer {
        blocked(recipe, storage, Layout::RowMajor)
    }

    fn blocked(recipe: Recipe, storage: Storage, layout: Layout) -> Buffer {
        Buffer {
            kind: BufferKind::Weight {
                name: format!("{recipe:?}"),
                offset: 0,
                bytes: 0,
                storage,
                recipe,
                layout,
            },
            elem: crate::plan::Elem::F32,
            per_token: 0,
            fixed: 0,
        }
    }

    /// Weights copied from a checkpoint's own bytes (a tensor, tensors joined, in the stored
    /// dtype) pack to exactly the bytes, offsets and hash that widening and narrowing give;
    /// the rest (another dtype, a computed recipe) take the widened path either way.
    #[test]
    fn lent_bytes_pack_the_same_weights_as_widened_values() {
        let t = |n: &str| Recipe::Tensor(n.to_string());
        let buffers = vec![
            weight(t("bf16_a"), Storage::Bf16),
            weight(
                Recipe::Concat(vec![t("bf16_b"), t("bf16_cc")]),
                Storage::Bf16,
            ),
            weight(t("f32_a"), Storage::F32),
            weight(t("bf16_d"), Storage::F32),
            weight(t("f32_b"), Storage::Bf16),
            weight(
                Recipe::Binary(
                    "add".into(),
                    Box::new(Recipe::Scalar(1.0)),
                    Box::new(t("bf16_e")),
                ),
                Storage::Bf16,
            ),
            // The CPU's blocked order: 12 + 14 values as 13 rows of 2, 14 f32 values as 7
            // rows of 2, 16 as 8 GeGLU rows (gate, then up).
            blocked(
                Recipe::Concat(vec![t("bf16_x"), t("bf16_blk")]),
                Storage::Bf16,
                Layout::Blocked {
                    rows: 13,
                    cols: 2,
                    panels: 1,
                    geglu: false,
                },
            ),
            blocked(
                t("f32_blk1"),
                Storage::F32,
                Layout::Blocked {
                    rows: 7,
                    cols: 2,
                    panels: 1,
                    geglu: false,
                },
            ),
            blocked(
                t("bf16_geglu"),
                Storage::Bf16,
                Layout::Blocked {
                    rows: 8,
                    cols: 2,
                    panels: 1,
                    geglu: true,
                },
            ),
        ];
        let mut plans = [0, 1].map(|_| Plan {
            version: crate::plan::PLAN_VERSION,
            max_tokens: 1,
            vocab_size: 1,
            bos_token_id: 0,
            eos_token_id: 0,
            pad_token_id: 0,
            buffers: buffers.clone(),
            launches: Vec::new(),
            tokens: 0,
            logits: 0,
            logits_launch: None,
            weights_hash: String::new(),
        });
        let lent = pack(&mut plans[0], &Source { lends: true }).unwrap();
        let widened = pack(&mut plans[1], &Source { lends: false }).unwrap();
        assert_eq!(lent, widened);
        assert_eq!(plans[0], plans[1]);
        assert_eq!(plans[0].weights_hash, weights_hash(&widened));
        // All but the converted and computed ones were copied, and only from a lending source.
        let copied: Vec<bool> = buffers
            .iter()
            .map(|b| match &b.kind {
                BufferKind::Weight {
                    recipe, storage, ..
                } => raw_parts(recipe, *storage, &Source { lends: true }).is_some(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            copied,
            [true, true, true, false, false, false, true, true, true]
        );
        let t = Recipe::Tensor("bf16_a".into());
        assert!(raw_parts(&t, Storage::Bf16, &Source { lends: false }).is_none());
        // The bf16 tensor, lent, is its checkpoint bytes at offset 0.
        assert_eq!(
            &lent[..Source::tensor("bf16_a").1.len()],
            &Source::tensor("bf16_a").1[..]
        );
    }

    /// The hash sees every byte, where it is and how many there are.
    #[test]
    fn weights_hash_changes_with_any_byte_and_the_length() {
        let data: Vec<u8> = (0..100u32).map(|i| (i * 7) as u8).collect();
        let h = weights_hash(&data);
        for at in [0, 31, 32, 63, 96, 99] {
            let mut other = data.clone();
            other[at] ^= 1;
            assert_ne!(weights_hash(&other), h, "byte {at}");
        }
        let mut swapped = data.clone();
        swapped.swap(0, 8);
        assert_ne!(weights_hash(&swapped), h);
        assert_ne!(weights_hash(&data[..99]), h);
        let mut padded = data.clone();
        padded.push(0);
        assert_ne!(weights_hash(&padded), h);
        assert_eq!(weights_hash(&data), h);
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
