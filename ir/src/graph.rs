//! The graph: nodes are ops, edges carry one result of a node into one operand slot of another.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};
use petgraph::Direction;

use crate::op::{infer, InputRole, Op, OutputRole};
use crate::types::ValueType;
use crate::IrError;

/// A node of a [`Graph`]. Stays valid while other nodes are removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub NodeIndex<u32>);

impl NodeId {
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// One result of a node: `output` counts the node's results from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeId,
    pub output: u32,
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}.{}", self.node.index(), self.output)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    /// Types of the node's results, in order.
    pub results: Vec<ValueType>,
}

/// An edge from result `output` of its source into operand `slot` of its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub output: u32,
    pub slot: u32,
}

#[derive(Clone, Debug)]
pub struct Graph {
    pub name: String,
    g: StableDiGraph<Node, Edge, u32>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            g: StableDiGraph::default(),
        }
    }

    /// Adds a node whose result types are inferred from its operands.
    pub fn add(&mut self, op: Op, operands: &[Value]) -> Result<NodeId, IrError> {
        let types: Vec<&ValueType> = operands
            .iter()
            .map(|v| self.value_type(*v))
            .collect::<Result<_, _>>()?;
        let results = infer(&op, &types).map_err(|message| IrError::Type {
            op: op.mnemonic(),
            message,
        })?;
        Ok(self.add_typed(op, operands, results))
    }

    /// Adds a node with the result types given, unchecked: the parser uses this so that the
    /// verifier, not the parser, judges a hand-written graph.
    pub fn add_typed(&mut self, op: Op, operands: &[Value], results: Vec<ValueType>) -> NodeId {
        let id = NodeId(self.g.add_node(Node { op, results }));
        for (slot, v) in operands.iter().enumerate() {
            self.g.add_edge(
                v.node.0,
                id.0,
                Edge {
                    output: v.output,
                    slot: slot as u32,
                },
            );
        }
        id
    }

    /// Adds a single-result node and returns its result.
    pub fn add1(&mut self, op: Op, operands: &[Value]) -> Result<Value, IrError> {
        let id = self.add(op, operands)?;
        Ok(Value {
            node: id,
            output: 0,
        })
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id.0)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id.0]
    }

    pub fn value_type(&self, v: Value) -> Result<&ValueType, IrError> {
        self.g
            .node_weight(v.node.0)
            .and_then(|n| n.results.get(v.output as usize))
            .ok_or(IrError::NoSuchValue(v))
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices().map(NodeId)
    }

    /// Operands of a node, in slot order.
    pub fn operands(&self, id: NodeId) -> Vec<Value> {
        let mut edges: Vec<(u32, Value)> = self
            .g
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().slot,
                    Value {
                        node: NodeId(e.source()),
                        output: e.weight().output,
                    },
                )
            })
            .collect();
        edges.sort_by_key(|(slot, _)| *slot);
        edges.into_iter().map(|(_, v)| v).collect()
    }

    /// Raw operand edges as (slot, value), unsorted; the verifier checks them.
    pub fn operand_edges(&self, id: NodeId) -> Vec<(u32, Value)> {
        self.g
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().slot,
                    Value {
                        node: NodeId(e.source()),
                        output: e.weight().output,
                    },
                )
            })
            .collect()
    }

    /// Nodes reading any result of `id`, each once, in index order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .g
            .edges_directed(id.0, Direction::Outgoing)
            .map(|e| NodeId(e.target()))
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// Readers of one result: (node, operand slot), in index order.
    pub fn value_users(&self, v: Value) -> Vec<(NodeId, u32)> {
        let mut users: Vec<(NodeId, u32)> = self
            .g
            .edges_directed(v.node.0, Direction::Outgoing)
            .filter(|e| e.weight().output == v.output)
            .map(|e| (NodeId(e.target()), e.weight().slot))
            .collect();
        users.sort();
        users
    }

    /// The single reader of `v`, if it has exactly one use.
    pub fn sole_user(&self, v: Value) -> Option<NodeId> {
        match self.value_users(v).as_slice() {
            [(n, _)] => Some(*n),
            _ => None,
        }
    }

    /// Makes operand `slot` of `node` read `v`.
    pub fn set_operand(&mut self, node: NodeId, slot: u32, v: Value) {
        let old: Vec<_> = self
            .g
            .edges_directed(node.0, Direction::Incoming)
            .filter(|e| e.weight().slot == slot)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
        self.g.add_edge(
            v.node.0,
            node.0,
            Edge {
                output: v.output,
                slot,
            },
        );
    }

    /// Makes every reader of any result of `old` read the same result of `new`.
    pub fn replace_results(&mut self, old: NodeId, new: NodeId) {
        for output in 0..self.node(old).results.len() as u32 {
            self.replace_all_uses(Value { node: old, output }, Value { node: new, output });
        }
    }

    /// Makes every reader of `old` read `new` instead.
    pub fn replace_all_uses(&mut self, old: Value, new: Value) {
        let edges: Vec<_> = self
            .g
            .edges_directed(old.node.0, Direction::Outgoing)
            .filter(|e| e.weight().output == old.output)
            .map(|e| (e.id(), e.target(), e.weight().slot))
            .collect();
        for (edge, target, slot) in edges {
            self.g.remove_edge(edge);
            self.g.add_edge(
                new.node.0,
                target,
                Edge {
                    output: new.output,
                    slot,
                },
            );
        }
    }

    /// Removes a node and every edge touching it.
    pub fn remove(&mut self, id: NodeId) -> Option<Node> {
        self.g.remove_node(id.0)
    }

    /// Adds a raw edge; only for tests that build broken graphs for the verifier.
    pub fn add_raw_edge(&mut self, from: Value, to: NodeId, slot: u32) {
        self.g.add_edge(
            from.node.0,
            to.0,
            Edge {
                output: from.output,
                slot,
            },
        );
    }

    /// Computed from params and constants alone: a backend materialises it once, at build
    /// time, and it is not a kernel.
    pub fn is_weight_expression(&self, node: NodeId) -> bool {
        match &self.node(node).op {
            Op::Param { .. } | Op::Constant { .. } => true,
            Op::Input { .. } | Op::Output { .. } => false,
            op if op.carries_state() => false,
            _ => self
                .operands(node)
                .iter()
                .all(|v| self.is_weight_expression(v.node)),
        }
    }

    pub fn is_cyclic(&self) -> bool {
        petgraph::algo::is_cyclic_directed(&self.g)
    }

    /// A deterministic topological order: among ready nodes, non-outputs before outputs, then
    /// the lowest index first. For a graph parsed from text this is the text's own order.
    /// Nodes on a cycle are left out; the verifier reports cycles.
    pub fn topo_order(&self) -> Vec<NodeId> {
        let key = |id: NodeIndex<u32>| {
            let is_output = matches!(self.g[id].op, Op::Output { .. });
            Reverse((is_output, id.index()))
        };
        let mut pending: Vec<usize> = vec![0; self.g.node_bound()];
        let mut ready = BinaryHeap::new();
        for id in self.g.node_indices() {
            let n = self.g.edges_directed(id, Direction::Incoming).count();
            pending[id.index()] = n;
            if n == 0 {
                ready.push(key(id));
            }
        }
        let mut order = Vec::with_capacity(self.g.node_count());
        while let Some(Reverse((_, index))) = ready.pop() {
            let id = NodeIndex::new(index);
            order.push(NodeId(id));
            for e in self.g.edges_directed(id, Direction::Outgoing) {
                let t = e.target();
                pending[t.index()] -= 1;
                if pending[t.index()] == 0 {
                    ready.push(key(t));
                }
            }
        }
        order
    }

    /// Graph inputs in topological order.
    pub fn inputs(&self) -> Vec<(NodeId, &str, InputRole, &ValueType)> {
        self.topo_order()
            .into_iter()
            .filter_map(|id| match &self.node(id).op {
                Op::Input { name, role, ty } => Some((id, name.as_str(), *role, ty)),
                _ => None,
            })
            .collect()
    }

    /// Graph outputs in topological order, with the value each one reads.
    pub fn outputs(&self) -> Vec<(NodeId, &str, OutputRole, Value)> {
        self.topo_order()
            .into_iter()
            .filter_map(|id| match &self.node(id).op {
                Op::Output { name, role } => {
                    let operand = *self.operands(id).first()?;
                    Some((id, name.as_str(), *role, operand))
                }
                _ => None,
            })
            .collect()
    }
}
