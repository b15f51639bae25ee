//! Common-subexpression and dead-code elimination.

use std::collections::HashMap;

use griffin_ir::text::op_signature;
use griffin_ir::{Graph, IrError, Op};

use super::util::prune;

/// Merges nodes with the same op signature and the same operands into the first of them.
pub fn cse(g: &mut Graph) -> Result<usize, IrError> {
    let mut seen: HashMap<String, griffin_ir::NodeId> = HashMap::new();
    let mut merged = 0;
    for id in g.topo_order() {
        if matches!(g.node(id).op, Op::Input { .. } | Op::Output { .. }) {
            continue;
        }
        let operands: Vec<String> = g
            .operands(id)
            .iter()
            .map(|v| format!("{}.{}", v.node.index(), v.output))
            .collect();
        let key = format!("{}({})", op_signature(&g.node(id).op), operands.join(","));
        match seen.get(&key) {
            Some(&first) => {
                g.replace_results(id, first);
                g.remove(id);
                merged += 1;
            }
            None => {
                seen.insert(key, id);
            }
        }
    }
    Ok(merged)
}

pub fn dce(g: &mut Graph) -> Result<usize, IrError> {
    Ok(prune(g))
}
