//! Counting kernels: the fused operations a backend launches.

use std::collections::{BTreeMap, HashMap};

use griffin_ir::{Graph, NodeId, Op};

/// A node a backend runs at run time as one kernel. Inputs, outputs, weights, constants,
/// reshapes (views) and weight expressions (materialised at build time) are not kernels.
pub fn is_kernel(g: &Graph, id: NodeId) -> bool {
    !matches!(
        g.node(id).op,
        Op::Input { .. }
            | Op::Output { .. }
            | Op::Param { .. }
            | Op::Constant { .. }
            | Op::Reshape { .. }
    ) && !g.is_weight_expression(id)
}

/// Where a node belongs: a layer, or outside every layer (embedding, final norm, logits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Home {
    Layer(usize),
    Outside,
}

fn home_of_name(name: &str, prefix: &str) -> Home {
    match name
        .strip_prefix(prefix)
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse().ok())
    {
        Some(i) => Home::Layer(i),
        None => Home::Outside,
    }
}

/// The home of each node: a weight's from its tensor name, state's from its name; a node
/// reading weights belongs where they do (outside wins: the logits read the final norm); any
/// other node belongs to the latest layer among its operands, else outside.
pub fn homes(g: &Graph) -> HashMap<NodeId, Option<Home>> {
    let mut home: HashMap<NodeId, Option<Home>> = HashMap::new();
    for id in g.topo_order() {
        let h = match &g.node(id).op {
            Op::Param { tensor, .. } => Some(home_of_name(tensor, "model.layers.")),
            Op::Input { name, .. } => match home_of_name(name, "layers.") {
                Home::Layer(i) => Some(Home::Layer(i)),
                Home::Outside => None,
            },
            _ => {
                let operands = g.operands(id);
                let from_weights = operands
                    .iter()
                    .filter(|v| g.is_weight_expression(v.node))
                    .filter_map(|v| home[&v.node])
                    .max();
                let latest_layer = operands
                    .iter()
                    .filter_map(|v| match home[&v.node] {
                        Some(Home::Layer(i)) => Some(Home::Layer(i)),
                        _ => None,
                    })
                    .max();
                from_weights.or(latest_layer)
            }
        };
        home.insert(id, h);
    }
    home
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelStats {
    pub nodes: usize,
    pub kernels: usize,
    /// For each layer type, the largest kernel count over layers of that type.
    pub kernels_per_layer: BTreeMap<String, usize>,
    pub kernels_outside_layers: usize,
}

/// Kernel counts of a graph whose layer `i` has type `layer_types[i]`.
pub fn kernel_stats(g: &Graph, layer_types: &[&str]) -> KernelStats {
    let homes = homes(g);
    let mut per_layer = vec![0usize; layer_types.len()];
    let mut outside = 0;
    let mut kernels = 0;
    for id in g.node_ids() {
        if !is_kernel(g, id) {
            continue;
        }
        kernels += 1;
        match homes[&id] {
            Some(Home::Layer(l)) if l < per_layer.len() => per_layer[l] += 1,
            _ => outside += 1,
        }
    }
    let mut kernels_per_layer = BTreeMap::new();
    for (count, ty) in per_layer.iter().zip(layer_types) {
        let entry = kernels_per_layer.entry(ty.to_string()).or_insert(0);
        *entry = (*entry).max(*count);
    }
    KernelStats {
        nodes: g.node_count(),
        kernels,
        kernels_per_layer,
        kernels_outside_layers: outside,
    }
}
