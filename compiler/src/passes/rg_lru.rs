//! Fusing the recurrent block's conv, gates, decay, normaliser and scan into one `rg_lru`.

use std::collections::HashSet;

use griffin_ir::{BinaryOp, Graph, IrError, NodeId, Op, UnaryOp, Value};

use super::util::{constant, def, prune};

/// The pieces of one matched recurrence, in the fused op's operand order.
struct Matched {
    operands: Vec<Value>,
    width: u32,
    conv: NodeId,
    /// Nodes whose results only the pattern may read.
    inner: HashSet<NodeId>,
}

/// `(p, q)` of a binary `op` at `v`, in either order: `pick` says which operand order fits.
fn commutative<T>(
    g: &Graph,
    v: Value,
    op: BinaryOp,
    mut pick: impl FnMut(Value, Value) -> Option<T>,
) -> Option<T> {
    let (o, x) = def(g, v);
    if *o != Op::Binary(op) {
        return None;
    }
    pick(x[0], x[1]).or_else(|| pick(x[1], x[0]))
}

fn unary(g: &Graph, v: Value, u: UnaryOp) -> Option<Value> {
    let (o, x) = def(g, v);
    (*o == Op::Unary(u)).then(|| x[0])
}

fn is_const(g: &Graph, v: Value, value: f64) -> bool {
    constant(g, v) == Some(value)
}

/// `sigmoid(block_diagonal_linear(c, w, b))`: returns (w, b) and the two nodes.
fn gate(g: &Graph, v: Value, c: Value) -> Option<(Value, Value, [NodeId; 2])> {
    let z = unary(g, v, UnaryOp::Sigmoid)?;
    let (o, x) = def(g, z);
    (*o == Op::BlockDiagonalLinear { bias: true } && x[0] == c)
        .then(|| (x[1], x[2], [v.node, z.node]))
}

fn match_scan(g: &Graph, scan: NodeId) -> Option<Matched> {
    let [a, b, positions, state] = g.operands(scan)[..] else {
        return None;
    };
    let mut inner = HashSet::new();

    // a = exp(log_a), log_a = (-8 · recurrent_gate) · decay_rate
    let log_a = unary(g, a, UnaryOp::Exp)?;
    inner.insert(a.node);
    let (scaled, decay_rate) = commutative(g, log_a, BinaryOp::Mul, |p, q| {
        g.is_weight_expression(q.node).then_some((p, q))
    })?;
    inner.insert(log_a.node);
    let recurrent_gate = commutative(g, scaled, BinaryOp::Mul, |p, q| {
        is_const(g, p, -8.0).then_some(q)
    })?;
    inner.insert(scaled.node);

    // b = (c · input_gate) · normaliser
    let (gated, normaliser) = commutative(g, b, BinaryOp::Mul, |p, q| {
        matches!(def(g, q).0, Op::Select).then_some((p, q))
    })?;
    inner.insert(b.node);
    let (c, input_gate) = commutative(g, gated, BinaryOp::Mul, |p, q| {
        matches!(def(g, q).0, Op::Unary(UnaryOp::Sigmoid)).then_some((p, q))
    })?;
    inner.insert(gated.node);

    // c = conv1d(x, positions, window, w, bias)
    let (conv_op, conv_x) = def(g, c);
    let Op::Conv1d { width } = *conv_op else {
        return None;
    };
    if c.output != 0 || conv_x[1] != positions {
        return None;
    }
    let (igw, igb, gate_nodes) = gate(g, input_gate, c)?;
    inner.extend(gate_nodes);
    let (rgw, rgb, gate_nodes) = gate(g, recurrent_gate, c)?;
    inner.extend(gate_nodes);

    // normaliser = select(position == 0, 1, sqrt(-expm1(2 · log_a)))
    let (select_op, sel) = def(g, normaliser);
    if *select_op != Op::Select || !is_const(g, sel[1], 1.0) {
        return None;
    }
    inner.insert(normaliser.node);
    let (eq_op, eq) = def(g, sel[0]);
    if *eq_op != Op::Binary(BinaryOp::Eq) || !is_const(g, eq[1], 0.0) {
        return None;
    }
    let (reshape_op, reshaped) = def(g, eq[0]);
    if !matches!(reshape_op, Op::Reshape { .. }) || reshaped[0] != positions {
        return None;
    }
    let neg = unary(g, sel[2], UnaryOp::Sqrt)?;
    let expm1 = unary(g, neg, UnaryOp::Neg)?;
    let twice = unary(g, expm1, UnaryOp::Expm1)?;
    let again = commutative(g, twice, BinaryOp::Mul, |p, q| {
        is_const(g, p, 2.0).then_some(q)
    })?;
    if again != log_a {
        return None;
    }
    inner.extend([sel[2].node, neg.node, expm1.node, twice.node]);

    Some(Matched {
        operands: vec![
            conv_x[0], positions, conv_x[2], conv_x[3], conv_x[4], igw, igb, rgw, rgb, decay_rate,
            state,
        ],
        width,
        conv: c.node,
        inner,
    })
}

/// Replaces each matched recurrence by one `rg_lru {gate_output=false}`.
pub fn fuse_rg_lru(g: &mut Graph) -> Result<usize, IrError> {
    let mut rewrites = 0;
    let scans: Vec<NodeId> = g
        .topo_order()
        .into_iter()
        .filter(|&id| g.node(id).op == Op::LinearScan)
        .collect();
    for scan in scans {
        let Some(m) = match_scan(g, scan) else {
            continue;
        };
        // Fusing must not leave an intermediate needed elsewhere (that would compute it twice).
        let private = |v: Value| {
            g.value_users(v)
                .iter()
                .all(|(user, _)| m.inner.contains(user) || *user == scan)
        };
        let conv_out = Value {
            node: m.conv,
            output: 0,
        };
        if !private(conv_out)
            || !m
                .inner
                .iter()
                .all(|&n| private(Value { node: n, output: 0 }))
        {
            continue;
        }
        let fused = g.add(
            Op::RgLru {
                width: m.width,
                gate_output: false,
            },
            &m.operands,
        )?;
        let result = |output| Value {
            node: fused,
            output,
        };
        g.replace_all_uses(
            Value {
                node: scan,
                output: 0,
            },
            result(0),
        );
        g.replace_all_uses(
            Value {
                node: m.conv,
                output: 1,
            },
            result(1),
        );
        g.replace_all_uses(
            Value {
                node: scan,
                output: 1,
            },
            result(2),
        );
        g.remove(scan);
        rewrites += 1;
    }
    if rewrites > 0 {
        prune(g);
    }
    Ok(rewrites)
}
