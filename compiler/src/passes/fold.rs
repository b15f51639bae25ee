//! Folding weight arithmetic into build-time weight expressions.

use griffin_ir::{BinaryOp, DType, Graph, IrError, Op, Value};

use super::util::{constant, only_read_by, prune, replace_node};

/// `rms_norm{offset}(x, w)` → `rms_norm{0}(x, offset + w)`, the sum a weight expression;
/// `mul(gather(table, ids), c)` → `gather{scale=c}(table, ids)`.
pub fn fold_weights(g: &mut Graph) -> Result<usize, IrError> {
    let mut rewrites = 0;
    for id in g.topo_order() {
        let Op::RmsNorm { eps, weight_offset } = g.node(id).op else {
            continue;
        };
        if weight_offset == 0.0 {
            continue;
        }
        let operands = g.operands(id);
        let mut w = operands[1];
        if g.value_type(w)?.dtype != DType::F32 {
            w = g.add1(Op::Cast { to: DType::F32 }, &[w])?;
        }
        let offset = g.add1(
            Op::Constant {
                value: weight_offset,
                dtype: DType::F32,
            },
            &[],
        )?;
        let folded = g.add1(Op::Binary(BinaryOp::Add), &[w, offset])?;
        replace_node(
            g,
            id,
            Op::RmsNorm {
                eps,
                weight_offset: 0.0,
            },
            &[operands[0], folded],
        )?;
        rewrites += 1;
    }
    for id in g.topo_order() {
        if !g.contains(id) || g.node(id).op != (Op::Gather { scale: None }) {
            continue;
        }
        let gathered = Value {
            node: id,
            output: 0,
        };
        let Some(mul) = g.sole_user(gathered) else {
            continue;
        };
        if g.node(mul).op != Op::Binary(BinaryOp::Mul) {
            continue;
        }
        let mul_operands = g.operands(mul);
        let other = if mul_operands[0] == gathered {
            mul_operands[1]
        } else {
            mul_operands[0]
        };
        let Some(scale) = constant(g, other) else {
            continue;
        };
        if !only_read_by(g, gathered, mul) || !g.value_type(other)?.shape.dims().is_empty() {
            continue;
        }
        let table_ids = g.operands(id);
        replace_node(g, mul, Op::Gather { scale: Some(scale) }, &table_ids)?;
        rewrites += 1;
    }
    if rewrites > 0 {
        prune(g);
    }
    Ok(rewrites)
}
