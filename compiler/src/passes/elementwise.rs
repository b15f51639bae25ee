//! Generic fusion of elementwise trees into single kernels.

use std::collections::HashSet;

use griffin_ir::{Expr, Graph, IrError, NodeId, Op, Value};

use super::util::prune;

/// An elementwise op that runs as a kernel (not one computed at build time).
fn fusible(g: &Graph, id: NodeId) -> bool {
    g.node(id).op.is_elementwise() && !g.is_weight_expression(id)
}

/// The node's op as an expression over `args`.
fn expr_of(op: &Op, args: Vec<Expr>) -> Expr {
    let mut args = args.into_iter().map(Box::new);
    let mut next = || args.next().expect("arity checked by the verifier");
    match op {
        Op::Unary(u) => Expr::Unary(*u, next()),
        Op::Binary(b) => Expr::Binary(*b, next(), next()),
        Op::Select => Expr::Select(next(), next(), next()),
        Op::SoftCap { cap } => Expr::SoftCap(*cap, next()),
        Op::Cast { to } => Expr::Cast(*to, next()),
        other => unreachable!("{} is not a plain elementwise op", other.mnemonic()),
    }
}

/// Builds the tree rooted at `v`, absorbing fusible producers read only by the tree;
/// `leaves` collects the kernel's operands, each once.
fn build(
    g: &Graph,
    v: Value,
    root: NodeId,
    absorbed: &mut Vec<NodeId>,
    leaves: &mut Vec<Value>,
) -> Expr {
    let absorbable = v.node == root
        || (fusible(g, v.node) && g.sole_user(v).is_some_and(|u| absorbed.contains(&u)));
    if absorbable {
        if let Op::Elementwise { body } = &g.node(v.node).op {
            // An already fused kernel is inlined with its operands renamed.
            let body = body.clone();
            absorbed.push(v.node);
            let inner: Vec<Expr> = g
                .operands(v.node)
                .into_iter()
                .map(|o| build(g, o, root, absorbed, leaves))
                .collect();
            return substitute(&body, &inner);
        }
        absorbed.push(v.node);
        let args = g
            .operands(v.node)
            .into_iter()
            .map(|o| build(g, o, root, absorbed, leaves))
            .collect();
        return expr_of(&g.node(v.node).op, args);
    }
    let index = match leaves.iter().position(|l| *l == v) {
        Some(i) => i,
        None => {
            leaves.push(v);
            leaves.len() - 1
        }
    };
    Expr::Operand(index as u32)
}

fn substitute(body: &Expr, args: &[Expr]) -> Expr {
    let sub = |e: &Expr| Box::new(substitute(e, args));
    match body {
        Expr::Operand(i) => args[*i as usize].clone(),
        Expr::Unary(u, a) => Expr::Unary(*u, sub(a)),
        Expr::Binary(b, x, y) => Expr::Binary(*b, sub(x), sub(y)),
        Expr::Select(c, x, y) => Expr::Select(sub(c), sub(x), sub(y)),
        Expr::SoftCap(cap, a) => Expr::SoftCap(*cap, sub(a)),
        Expr::Cast(to, a) => Expr::Cast(*to, sub(a)),
    }
}

/// Each maximal tree of two or more fusible elementwise ops, whose inner results are read only
/// inside the tree, becomes one `elementwise` kernel. Roots are the ops whose result is not
/// absorbed by a single fusible reader.
pub fn fuse_elementwise(g: &mut Graph) -> Result<usize, IrError> {
    let mut rewrites = 0;
    let mut done: HashSet<NodeId> = HashSet::new();
    let mut order = g.topo_order();
    order.reverse();
    for root in order {
        if done.contains(&root) || !g.contains(root) || !fusible(g, root) {
            continue;
        }
        let out = Value {
            node: root,
            output: 0,
        };
        if g.sole_user(out).is_some_and(|u| fusible(g, u)) {
            continue; // absorbed by its reader's tree
        }
        let mut absorbed = Vec::new();
        let mut leaves = Vec::new();
        let body = build(g, out, root, &mut absorbed, &mut leaves);
        done.extend(absorbed.iter().copied());
        if body.size() < 2 {
            continue;
        }
        let fused = g.add(Op::Elementwise { body }, &leaves)?;
        g.replace_results(root, fused);
        rewrites += 1;
    }
    if rewrites > 0 {
        prune(g);
    }
    Ok(rewrites)
}
