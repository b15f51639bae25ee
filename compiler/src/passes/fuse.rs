//! Prologue and epilogue fusions onto projections, the recurrence and attention.

use griffin_ir::{
    BinaryOp, Epilogue, Graph, IrError, NodeId, NormPrologue, Op, RotarySpec, UnaryOp, Value,
};

use super::util::{def, only_read_by, prune, replace_node};

fn nodes_with(g: &Graph, pred: impl Fn(&Op) -> bool) -> Vec<NodeId> {
    g.topo_order()
        .into_iter()
        .filter(|&id| pred(&g.node(id).op))
        .collect()
}

fn result(node: NodeId, output: u32) -> Value {
    Value { node, output }
}

/// The other operand of a binary node, given one of them.
fn other_operand(g: &Graph, node: NodeId, one: Value) -> Option<Value> {
    match g.operands(node)[..] {
        [a, b] if a == one => Some(b),
        [a, b] if b == one => Some(a),
        _ => None,
    }
}

/// `mul(gelu(v), other)` where gelu and the mul read nothing else: returns (mul, other).
fn gelu_times(g: &Graph, v: Value) -> Option<(NodeId, Value)> {
    let gelu = g.sole_user(v)?;
    if g.node(gelu).op != Op::Unary(UnaryOp::GeluTanh) {
        return None;
    }
    let mul = g.sole_user(result(gelu, 0))?;
    if g.node(mul).op != Op::Binary(BinaryOp::Mul) {
        return None;
    }
    Some((mul, other_operand(g, mul, result(gelu, 0))?))
}

/// `gelu(gate)·up` over a linear split `[n, n]` → `linear{epilogue=geglu}`;
/// `rg_lru.out · gelu(y)` → `rg_lru{gate_output}` reading y.
pub fn fuse_geglu(g: &mut Graph) -> Result<usize, IrError> {
    let mut rewrites = 0;
    for id in nodes_with(g, |op| matches!(op, Op::Linear { .. })) {
        let Op::Linear {
            bias,
            norm,
            epilogue: Epilogue::None,
            residual: false,
            splits,
        } = g.node(id).op.clone()
        else {
            continue;
        };
        if splits.len() != 2 || splits[0] != splits[1] {
            continue;
        }
        let (gate, up) = (result(id, 0), result(id, 1));
        let Some((mul, other)) = gelu_times(g, gate) else {
            continue;
        };
        if other != up || !only_read_by(g, up, mul) {
            continue;
        }
        let op = Op::Linear {
            bias,
            norm,
            epilogue: Epilogue::GeGlu,
            residual: false,
            splits: Vec::new(),
        };
        let operands = g.operands(id);
        replace_node(g, mul, op, &operands)?;
        g.remove(id);
        rewrites += 1;
    }
    for id in nodes_with(g, |op| {
        matches!(
            op,
            Op::RgLru {
                gate_output: false,
                ..
            }
        )
    }) {
        let Op::RgLru { width, .. } = g.node(id).op else {
            continue;
        };
        let out = result(id, 0);
        let Some(mul) = g.sole_user(out) else {
            continue;
        };
        if g.node(mul).op != Op::Binary(BinaryOp::Mul) {
            continue;
        }
        let Some(gelu_value) = other_operand(g, mul, out) else {
            continue;
        };
        let (gelu_op, y) = def(g, gelu_value);
        if *gelu_op != Op::Unary(UnaryOp::GeluTanh) || !only_read_by(g, gelu_value, mul) {
            continue;
        }
        let y = y[0];
        let mut operands = g.operands(id);
        operands.push(y);
        let fused = g.add(
            Op::RgLru {
                width,
                gate_output: true,
            },
            &operands,
        )?;
        g.replace_all_uses(
            Value {
                node: mul,
                output: 0,
            },
            result(fused, 0),
        );
        g.remove(mul);
        g.replace_all_uses(result(id, 1), result(fused, 1));
        g.replace_all_uses(result(id, 2), result(fused, 2));
        g.remove(id);
        rewrites += 1;
    }
    if rewrites > 0 {
        prune(g);
    }
    Ok(rewrites)
}

/// `linear(rms_norm(x, w), ..)`, the norm read by nothing else → `linear{norm}(x, w, ..)`.
pub fn fuse_norm(g: &mut Graph) -> Result<usize, IrError> {
    let mut rewrites = 0;
    for id in nodes_with(g, |op| matches!(op, Op::RmsNorm { .. })) {
        let Op::RmsNorm { eps, weight_offset } = g.node(id).op else {
            continue;
        };
        let [(linear, 0)] = g.value_users(result(id, 0))[..] else {
            continue;
        };
        let Op::Linear {
            bias,
            norm: None,
            epilogue,
            residual,
            splits,
        } = g.node(linear).op.clone()
        else {
            continue;
        };
        let norm_operands = g.operands(id);
        let mut operands = vec![norm_operands[0], norm_operands[1]];
        operands.extend(&g.operands(linear)[1..]);
        let op = Op::Linear {
            bias,
            norm: Some(NormPrologue { eps, weight_offset }),
            epilogue,
            residual,
            splits,
        };
        replace_node(g, linear, op, &operands)?;
        g.remove(id);
        rewrites += 1;
    }
    Ok(rewrites)
}

/// A linear with one result, read only by what the caller fuses, and no residual yet.
fn single_result_linear(g: &Graph, v: Value) -> Option<(bool, Option<NormPrologue>, Epilogue)> {
    match &g.node(v.node).op {
        Op::Linear {
            bias,
            norm,
            epilogue,
            residual: false,
            splits,
        } if splits.is_empty() => Some((*bias, *norm, *epilogue)),
        _ => None,
    }
}

/// `add(r, linear(..))` (either order), same types, linear read only by the add →
/// `linear{residual}(.., r)`.
pub fn fuse_residual(g: &mut Graph) -> Result<usize, IrError> {
    let mut rewrites = 0;
    for add in nodes_with(g, |op| *op == Op::Binary(BinaryOp::Add)) {
        let [a, b] = g.operands(add)[..] else {
            continue;
        };
        let sum_type = g.node(add).results[0].clone();
        let candidate = [(a, b), (b, a)].into_iter().find(|&(lin, r)| {
            single_result_linear(g, lin).is_some()
                && only_read_by(g, lin, add)
                && g.value_type(r).ok() == Some(&sum_type)
                && g.value_type(lin).ok() == Some(&sum_type)
        });
        let Some((lin, r)) = candidate else {
            continue;
        };
        let (bias, norm, epilogue) = single_result_linear(g, lin).expect("checked");
        let mut operands = g.operands(lin.node);
        operands.push(r);
        let op = Op::Linear {
            bias,
            norm,
            epilogue,
            residual: true,
            splits: Vec::new(),
        };
        replace_node(g, add, op, &operands)?;
        g.remove(lin.node);
        rewrites += 1;
    }
    Ok(rewrites)
}

/// `soft_cap(linear(..))`, the linear read only by it → `linear{soft_cap}`.
pub fn fuse_soft_cap(g: &mut Graph) -> Result<usize, IrError> {
    let mut rewrites = 0;
    for cap_node in nodes_with(g, |op| matches!(op, Op::SoftCap { .. })) {
        let Op::SoftCap { cap } = g.node(cap_node).op else {
            continue;
        };
        let lin = g.operands(cap_node)[0];
        let Some((bias, norm, Epilogue::None)) = single_result_linear(g, lin) else {
            continue;
        };
        if !only_read_by(g, lin, cap_node) {
            continue;
        }
        let op = Op::Linear {
            bias,
            norm,
            epilogue: Epilogue::SoftCap(cap),
            residual: false,
            splits: Vec::new(),
        };
        let operands = g.operands(lin.node);
        replace_node(g, cap_node, op, &operands)?;
        g.remove(lin.node);
        rewrites += 1;
    }
    Ok(rewrites)
}

/// `local_attention(rotary(q), rotary(k), ..)` with one rotary spec and the attention's own
/// positions, both rotaries read only by it → `local_attention{rotary}(q, k, ..)`.
pub fn fuse_rotary(g: &mut Graph) -> Result<usize, IrError> {
    let mut rewrites = 0;
    for attn in nodes_with(g, |op| {
        matches!(op, Op::LocalAttention { rotary: None, .. })
    }) {
        let Op::LocalAttention { window, scale, .. } = g.node(attn).op else {
            continue;
        };
        let operands = g.operands(attn);
        let rotated = |v: Value| -> Option<(RotarySpec, Value)> {
            let (op, x) = def(g, v);
            match op {
                Op::Rotary { theta, rotary_dims }
                    if x[1] == operands[3] && only_read_by(g, v, attn) =>
                {
                    Some((
                        RotarySpec {
                            theta: *theta,
                            dims: *rotary_dims,
                        },
                        x[0],
                    ))
                }
                _ => None,
            }
        };
        let (Some((q_spec, q)), Some((k_spec, k))) = (rotated(operands[0]), rotated(operands[1]))
        else {
            continue;
        };
        if q_spec != k_spec {
            continue;
        }
        let mut new_operands = operands.clone();
        new_operands[0] = q;
        new_operands[1] = k;
        let op = Op::LocalAttention {
            window,
            scale,
            rotary: Some(q_spec),
        };
        replace_node(g, attn, op, &new_operands)?;
        g.remove(operands[0].node);
        g.remove(operands[1].node);
        rewrites += 1;
    }
    Ok(rewrites)
}
