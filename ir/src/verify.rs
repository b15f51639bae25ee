//! The verifier: the invariants every graph holds after construction and after every rewrite.

use std::collections::{BTreeMap, HashMap};

use thiserror::Error;

use crate::graph::{Graph, NodeId};
use crate::op::{infer, InputRole, Op, OutputRole};
use crate::types::ValueType;

/// One broken invariant, naming the node (`n<index>`, op mnemonic) where it was found.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum VerifyError {
    #[error("node n{node} ({op}): edge reads result {output} but the source n{source_node} has {available} results")]
    DanglingEdge {
        node: usize,
        op: String,
        source_node: usize,
        output: u32,
        available: usize,
    },
    #[error(
        "node n{node} ({op}): expected operands in slots 0..{expected}, found slots {found:?}"
    )]
    Arity {
        node: usize,
        op: String,
        expected: usize,
        found: Vec<u32>,
    },
    #[error("graph has a cycle through node n{node} ({op})")]
    Cycle { node: usize, op: String },
    #[error("node n{node} ({op}): {message}")]
    Type {
        node: usize,
        op: String,
        message: String,
    },
    #[error("node n{node} ({op}): declared results {declared} but operands give {inferred}")]
    ResultMismatch {
        node: usize,
        op: String,
        declared: String,
        inferred: String,
    },
    #[error("{kind} name {name:?} is used twice")]
    DuplicateName { kind: &'static str, name: String },
    #[error("state input {name:?} has no state output of the same name")]
    UnpairedStateInput { name: String },
    #[error("state output {name:?} has no state input of the same name")]
    UnpairedStateOutput { name: String },
    #[error("state {name:?} is read as {input} but written as {output}")]
    StateTypeMismatch {
        name: String,
        input: String,
        output: String,
    },
    #[error("parameter {tensor:?} is declared both as {first} and as {second}")]
    ParamTypeMismatch {
        tensor: String,
        first: String,
        second: String,
    },
}

fn types_text(types: &[ValueType]) -> String {
    let parts: Vec<String> = types.iter().map(ToString::to_string).collect();
    format!("({})", parts.join(", "))
}

/// Checks every invariant; returns the first violation found, in a deterministic order.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let mut ids: Vec<NodeId> = graph.node_ids().collect();
    ids.sort();
    let describe = |id: NodeId| (id.index(), graph.node(id).op.mnemonic());

    for &id in &ids {
        let (node, op) = describe(id);
        let mut slots = Vec::new();
        for (slot, value) in graph.operand_edges(id) {
            let available = graph.node(value.node).results.len();
            if value.output as usize >= available {
                return Err(VerifyError::DanglingEdge {
                    node,
                    op,
                    source_node: value.node.index(),
                    output: value.output,
                    available,
                });
            }
            slots.push(slot);
        }
        slots.sort_unstable();
        let expected = graph.node(id).op.arity();
        if slots.iter().copied().ne(0..expected as u32) {
            return Err(VerifyError::Arity {
                node,
                op,
                expected,
                found: slots,
            });
        }
    }

    if graph.is_cyclic() {
        let ordered: std::collections::HashSet<NodeId> = graph.topo_order().into_iter().collect();
        let on_cycle = ids
            .iter()
            .copied()
            .find(|id| !ordered.contains(id))
            .expect("a cyclic graph leaves nodes out of the topological order");
        let (node, op) = describe(on_cycle);
        return Err(VerifyError::Cycle { node, op });
    }

    for &id in &ids {
        let (node, op) = describe(id);
        let operands = graph.operands(id);
        let types: Vec<&ValueType> = operands
            .iter()
            .map(|v| &graph.node(v.node).results[v.output as usize])
            .collect();
        let inferred = infer(&graph.node(id).op, &types).map_err(|message| VerifyError::Type {
            node,
            op: op.clone(),
            message,
        })?;
        if inferred != graph.node(id).results {
            return Err(VerifyError::ResultMismatch {
                node,
                op,
                declared: types_text(&graph.node(id).results),
                inferred: types_text(&inferred),
            });
        }
    }

    verify_interface(graph, &ids)
}

/// Input, output and parameter names: unique, state paired and typed alike.
fn verify_interface(graph: &Graph, ids: &[NodeId]) -> Result<(), VerifyError> {
    let mut inputs: BTreeMap<&str, (InputRole, &ValueType)> = BTreeMap::new();
    let mut outputs: BTreeMap<&str, (OutputRole, &ValueType)> = BTreeMap::new();
    let mut params: HashMap<&str, &ValueType> = HashMap::new();
    for &id in ids {
        match &graph.node(id).op {
            Op::Input { name, role, ty } => {
                let previous = inputs.insert(name, (*role, ty));
                if previous.is_some() {
                    return Err(VerifyError::DuplicateName {
                        kind: "input",
                        name: name.clone(),
                    });
                }
            }
            Op::Output { name, role } => {
                let operand = graph.operands(id)[0];
                let ty = &graph.node(operand.node).results[operand.output as usize];
                let previous = outputs.insert(name, (*role, ty));
                if previous.is_some() {
                    return Err(VerifyError::DuplicateName {
                        kind: "output",
                        name: name.clone(),
                    });
                }
            }
            Op::Param { tensor, ty } => {
                if let Some(first) = params.insert(tensor, ty) {
                    if first != ty {
                        return Err(VerifyError::ParamTypeMismatch {
                            tensor: tensor.clone(),
                            first: first.to_string(),
                            second: ty.to_string(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    for (name, (role, ty)) in &inputs {
        if *role != InputRole::State {
            continue;
        }
        match outputs.get(name) {
            Some((OutputRole::State, out_ty)) if out_ty == ty => {}
            Some((OutputRole::State, out_ty)) => {
                return Err(VerifyError::StateTypeMismatch {
                    name: name.to_string(),
                    input: ty.to_string(),
                    output: out_ty.to_string(),
                })
            }
            _ => {
                return Err(VerifyError::UnpairedStateInput {
                    name: name.to_string(),
                })
            }
        }
    }
    for (name, (role, _)) in &outputs {
        if *role == OutputRole::State && !matches!(inputs.get(name), Some((InputRole::State, _))) {
            return Err(VerifyError::UnpairedStateOutput {
                name: name.to_string(),
            });
        }
    }
    Ok(())
}
