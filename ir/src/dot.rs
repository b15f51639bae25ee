//! Graphviz export, for looking at a graph; the text format is the canonical view.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::graph::{Graph, NodeId};
use crate::op::Op;

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The graph in DOT; node labels carry the op, its name and its result types.
pub fn to_dot(graph: &Graph) -> String {
    let order = graph.topo_order();
    let position: HashMap<NodeId, usize> =
        order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", escape(&graph.name));
    out.push_str("  node [shape=box, fontname=monospace];\n");
    for id in &order {
        let node = graph.node(*id);
        let mut label = node.op.mnemonic();
        match &node.op {
            Op::Input { name, .. } | Op::Output { name, .. } => label = format!("{label} {name}"),
            Op::Param { tensor, .. } => label = format!("{label} {tensor}"),
            Op::Constant { value, .. } => label = format!("{label} {value:?}"),
            _ => {}
        }
        for ty in &node.results {
            label.push_str(&format!("\\n{ty}"));
        }
        let style = match node.op {
            Op::Input { .. } | Op::Output { .. } => ", style=filled, fillcolor=lightblue",
            Op::Param { .. } | Op::Constant { .. } => ", style=filled, fillcolor=lightgrey",
            _ if node.op.carries_state() => ", style=filled, fillcolor=orange",
            _ => "",
        };
        let _ = writeln!(
            out,
            "  n{} [label=\"{}\"{}];",
            position[id],
            escape(&label).replace("\\\\n", "\\n"),
            style
        );
    }
    for id in &order {
        for (slot, v) in graph.operands(*id).iter().enumerate() {
            let _ = writeln!(
                out,
                "  n{} -> n{} [label=\"{}:{}\"];",
                position[&v.node], position[id], v.output, slot
            );
        }
    }
    out.push_str("}\n");
    out
}
