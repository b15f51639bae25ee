//! Merging projections that read the same input into one over concatenated weights.

use std::collections::BTreeMap;

use griffin_ir::{DType, Epilogue, Graph, IrError, NodeId, Op, Value};

use super::util::prune;

/// A linear with nothing fused into it yet: `(x, w[, bias])`, one result.
fn plain(op: &Op) -> Option<bool> {
    match op {
        Op::Linear {
            bias,
            norm: None,
            epilogue: Epilogue::None,
            residual: false,
            splits,
        } if splits.is_empty() => Some(*bias),
        _ => None,
    }
}

/// Concatenates weights (rows) in a common dtype: widened to f32 where the parts differ.
fn concat_rows(g: &mut Graph, parts: &[Value]) -> Result<Value, IrError> {
    let dtypes: Vec<DType> = parts
        .iter()
        .map(|v| g.value_type(*v).map(|t| t.dtype))
        .collect::<Result<_, _>>()?;
    let mut parts = parts.to_vec();
    if dtypes.iter().any(|d| *d != dtypes[0]) {
        for (p, d) in parts.iter_mut().zip(dtypes) {
            if d != DType::F32 {
                *p = g.add1(Op::Cast { to: DType::F32 }, &[*p])?;
            }
        }
    }
    g.add1(
        Op::Concat {
            axis: 0,
            parts: parts.len() as u32,
        },
        &parts,
    )
}

/// Plain linears with the same input and bias flag become one linear whose weight (and bias)
/// concatenates theirs in node order, with one result per original.
pub fn merge_projections(g: &mut Graph) -> Result<usize, IrError> {
    let mut groups: BTreeMap<(Value, bool), Vec<NodeId>> = BTreeMap::new();
    for id in g.topo_order() {
        if let Some(bias) = plain(&g.node(id).op) {
            groups
                .entry((g.operands(id)[0], bias))
                .or_default()
                .push(id);
        }
    }
    let mut rewrites = 0;
    for ((x, bias), members) in groups {
        if members.len() < 2 {
            continue;
        }
        let operands: Vec<Vec<Value>> = members.iter().map(|&m| g.operands(m)).collect();
        let mut splits = Vec::new();
        for o in &operands {
            match g.value_type(o[1])?.shape.dims()[0].fixed() {
                Some(rows) => splits.push(rows),
                None => break,
            }
        }
        if splits.len() != members.len() {
            continue;
        }
        let weights: Vec<Value> = operands.iter().map(|o| o[1]).collect();
        let mut merged_operands = vec![x, concat_rows(g, &weights)?];
        if bias {
            let biases: Vec<Value> = operands.iter().map(|o| o[2]).collect();
            merged_operands.push(concat_rows(g, &biases)?);
        }
        let merged = g.add(
            Op::Linear {
                bias,
                norm: None,
                epilogue: Epilogue::None,
                residual: false,
                splits,
            },
            &merged_operands,
        )?;
        for (i, &m) in members.iter().enumerate() {
            g.replace_all_uses(
                Value { node: m, output: 0 },
                Value {
                    node: merged,
                    output: i as u32,
                },
            );
            g.remove(m);
        }
        rewrites += 1;
    }
    if rewrites > 0 {
        prune(g);
    }
    Ok(rewrites)
}
