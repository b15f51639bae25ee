//! Matching and rewriting helpers shared by the passes.

use griffin_ir::{Graph, IrError, NodeId, Op, Value};

/// The op producing `v` and its operands.
pub fn def(g: &Graph, v: Value) -> (&Op, Vec<Value>) {
    (&g.node(v.node).op, g.operands(v.node))
}

/// The value of a scalar constant.
pub fn constant(g: &Graph, v: Value) -> Option<f64> {
    match g.node(v.node).op {
        Op::Constant { value, .. } => Some(value),
        _ => None,
    }
}

/// `v` is read exactly once, by `user`.
pub fn only_read_by(g: &Graph, v: Value, user: NodeId) -> bool {
    g.sole_user(v) == Some(user)
}

/// Adds `op` over `operands`, moves every reader of `old`'s results to the new node's results
/// of the same index, and removes `old`.
pub fn replace_node(
    g: &mut Graph,
    old: NodeId,
    op: Op,
    operands: &[Value],
) -> Result<NodeId, IrError> {
    let new = g.add(op, operands)?;
    g.replace_results(old, new);
    g.remove(old);
    Ok(new)
}

/// Removes every node whose results nobody reads, except graph inputs and outputs.
pub fn prune(g: &mut Graph) -> usize {
    let mut removed = 0;
    loop {
        let dead: Vec<NodeId> = g
            .node_ids()
            .filter(|&id| {
                !matches!(g.node(id).op, Op::Input { .. } | Op::Output { .. })
                    && g.users(id).is_empty()
            })
            .collect();
        if dead.is_empty() {
            return removed;
        }
        for id in dead {
            g.remove(id);
            removed += 1;
        }
    }
}
