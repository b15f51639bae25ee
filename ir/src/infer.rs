//! Result types of each op: the rules the builder applies and the verifier re-checks.

use crate::op::{BinaryOp, Epilogue, Expr, Op};
use crate::types::{DType, Dim, Shape, ValueType};

type Res<T> = Result<T, String>;

fn float(t: &ValueType, what: &str) -> Res<()> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(format!("{what} must be a float, got {t}"))
    }
}

fn f32_only(t: &ValueType, what: &str) -> Res<()> {
    if t.dtype == DType::F32 {
        Ok(())
    } else {
        Err(format!("{what} must be f32, got {t}"))
    }
}

fn int(t: &ValueType, what: &str) -> Res<()> {
    if t.dtype.is_int() {
        Ok(())
    } else {
        Err(format!("{what} must be an integer, got {t}"))
    }
}

fn rank(t: &ValueType, r: usize, what: &str) -> Res<()> {
    if t.shape.rank() == r {
        Ok(())
    } else {
        Err(format!("{what} must have rank {r}, got {t}"))
    }
}

fn same_dim(a: &Dim, b: &Dim, what: &str) -> Res<()> {
    if a == b {
        Ok(())
    } else {
        Err(format!("{what}: {a} != {b}"))
    }
}

fn dim(t: &ValueType, i: usize) -> &Dim {
    &t.shape.0[i]
}

fn fixed(d: &Dim, what: &str) -> Res<u64> {
    d.fixed()
        .ok_or_else(|| format!("{what} must be a fixed dimension, got {d}"))
}

/// Numpy broadcasting, aligned on the trailing dimensions.
pub fn broadcast(a: &Shape, b: &Shape) -> Res<Shape> {
    let rank = a.rank().max(b.rank());
    let mut dims = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.rank()).checked_sub(rank).map(|j| &a.0[j]);
        let db = (i + b.rank()).checked_sub(rank).map(|j| &b.0[j]);
        let d = match (da, db) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(Dim::Fixed(1)), Some(y)) => y.clone(),
            (Some(x), Some(Dim::Fixed(1))) => x.clone(),
            (Some(x), Some(y)) => {
                return Err(format!("shapes {a} and {b} do not broadcast ({x} vs {y})"))
            }
            (None, None) => unreachable!("i < rank of at least one operand"),
        };
        dims.push(d);
    }
    Ok(Shape(dims))
}

/// Operand count already matches `op.arity()`.
pub(crate) fn infer_checked_arity(op: &Op, x: &[&ValueType]) -> Res<Vec<ValueType>> {
    let one = |t: ValueType| Ok(vec![t]);
    match op {
        Op::Input { ty, .. } | Op::Param { ty, .. } => one(ty.clone()),
        Op::Output { .. } => Ok(vec![]),
        Op::Constant { value, dtype } => {
            if *dtype == DType::Bool {
                return Err("constant must be numeric".into());
            }
            if !value.is_finite() {
                return Err(format!("constant {value} is not finite"));
            }
            one(ValueType::scalar(*dtype))
        }
        Op::Positions => {
            int(x[0], "positions start")?;
            rank(x[0], 0, "positions start")?;
            rank(x[1], 1, "positions tokens")?;
            one(ValueType::new(DType::I32, vec![dim(x[1], 0).clone()]))
        }
        Op::Cast { to } => one(ValueType::new(*to, x[0].shape.clone())),
        Op::Reshape { shape } => {
            if x[0].shape.volume() != shape.volume() {
                return Err(format!("cannot reshape {} to {shape}", x[0]));
            }
            one(ValueType::new(x[0].dtype, shape.clone()))
        }
        Op::Gather { scale } => {
            float(x[0], "gather table")?;
            rank(x[0], 2, "gather table")?;
            int(x[1], "gather ids")?;
            rank(x[1], 1, "gather ids")?;
            if scale.is_some_and(|s| !s.is_finite()) {
                return Err("gather scale must be finite".into());
            }
            one(ValueType::new(
                DType::F32,
                vec![dim(x[1], 0).clone(), dim(x[0], 1).clone()],
            ))
        }
        Op::Linear {
            bias,
            norm,
            epilogue,
            residual,
            splits,
        } => linear(x, *bias, norm.is_some(), *epilogue, *residual, splits),
        Op::Concat { axis, parts } => {
            if *parts == 0 {
                return Err("concat needs at least one part".into());
            }
            let axis = *axis as usize;
            let first = x[0];
            if axis >= first.shape.rank() {
                return Err(format!("concat axis {axis} out of range for {first}"));
            }
            let mut total = 0;
            for t in x {
                if t.dtype != first.dtype || t.shape.rank() != first.shape.rank() {
                    return Err(format!("concat parts differ: {first} vs {t}"));
                }
                for (i, (a, b)) in t.shape.0.iter().zip(&first.shape.0).enumerate() {
                    if i != axis && a != b {
                        return Err(format!(
                            "concat parts differ off axis {axis}: {first} vs {t}"
                        ));
                    }
                }
                total += fixed(dim(t, axis), "concat axis")?;
            }
            let mut dims = first.shape.0.clone();
            dims[axis] = Dim::Fixed(total);
            one(ValueType::new(first.dtype, dims))
        }
        Op::BlockDiagonalLinear { bias } => {
            f32_only(x[0], "block_diagonal_linear input")?;
            float(x[1], "block_diagonal_linear weight")?;
            rank(x[1], 3, "block_diagonal_linear weight")?;
            same_dim(
                dim(x[1], 1),
                dim(x[1], 2),
                "block_diagonal_linear blocks must be square",
            )?;
            let heads = fixed(dim(x[1], 0), "block count")?;
            let block = fixed(dim(x[1], 1), "block width")?;
            let in_dim = x[0]
                .shape
                .last()
                .ok_or("block_diagonal_linear input must not be a scalar")?;
            same_dim(
                in_dim,
                &Dim::Fixed(heads * block),
                "block_diagonal_linear input width vs heads·block",
            )?;
            if *bias {
                float(x[2], "block_diagonal_linear bias")?;
                rank(x[2], 2, "block_diagonal_linear bias")?;
                same_dim(dim(x[2], 0), dim(x[1], 0), "bias blocks")?;
                same_dim(dim(x[2], 1), dim(x[1], 1), "bias block width")?;
            }
            one(ValueType::new(DType::F32, x[0].shape.clone()))
        }
        Op::Unary(_) => {
            float(x[0], "unary operand")?;
            one(x[0].clone())
        }
        Op::Binary(b) => {
            if x[0].dtype != x[1].dtype {
                return Err(format!(
                    "{} operands differ in dtype: {} vs {}",
                    b.name(),
                    x[0],
                    x[1]
                ));
            }
            if x[0].dtype == DType::Bool {
                return Err(format!("{} of bool operands", b.name()));
            }
            let shape = broadcast(&x[0].shape, &x[1].shape)?;
            let dtype = if b.is_comparison() {
                DType::Bool
            } else {
                x[0].dtype
            };
            if matches!(b, BinaryOp::Div) && !x[0].dtype.is_float() {
                return Err("div needs float operands".into());
            }
            one(ValueType::new(dtype, shape))
        }
        Op::Select => {
            if x[0].dtype != DType::Bool {
                return Err(format!("select condition must be bool, got {}", x[0]));
            }
            if x[1].dtype != x[2].dtype {
                return Err(format!(
                    "select branches differ in dtype: {} vs {}",
                    x[1], x[2]
                ));
            }
            let shape = broadcast(&broadcast(&x[0].shape, &x[1].shape)?, &x[2].shape)?;
            one(ValueType::new(x[1].dtype, shape))
        }
        Op::Reduce { axis, .. } => {
            float(x[0], "reduce operand")?;
            let axis = *axis as usize;
            if axis >= x[0].shape.rank() {
                return Err(format!("reduce axis {axis} out of range for {}", x[0]));
            }
            let mut dims = x[0].shape.0.clone();
            dims.remove(axis);
            one(ValueType::new(x[0].dtype, dims))
        }
        Op::RmsNorm { eps, .. } => {
            f32_only(x[0], "rms_norm input")?;
            float(x[1], "rms_norm weight")?;
            rank(x[1], 1, "rms_norm weight")?;
            let d = x[0]
                .shape
                .last()
                .ok_or("rms_norm input must not be a scalar")?;
            same_dim(d, dim(x[1], 0), "rms_norm width vs weight")?;
            if !is_positive(*eps) {
                return Err(format!("rms_norm eps must be positive, got {eps}"));
            }
            one(x[0].clone())
        }
        Op::SoftCap { cap } => {
            float(x[0], "soft_cap operand")?;
            if !is_positive(*cap) {
                return Err(format!("soft_cap cap must be positive, got {cap}"));
            }
            one(x[0].clone())
        }
        Op::Conv1d { width } => {
            let (input, positions, window, weight, bias) = (x[0], x[1], x[2], x[3], x[4]);
            f32_only(input, "conv1d input")?;
            rank(input, 2, "conv1d input")?;
            positions_of(positions, dim(input, 0))?;
            if *width < 1 {
                return Err("conv1d width must be at least 1".into());
            }
            let channels = dim(input, 1);
            let expected_window = ValueType::new(
                DType::F32,
                vec![Dim::Fixed(*width as u64 - 1), channels.clone()],
            );
            if *window != expected_window {
                return Err(format!(
                    "conv1d window must be {expected_window}, got {window}"
                ));
            }
            float(weight, "conv1d weight")?;
            let expected_weight = Shape(vec![
                channels.clone(),
                Dim::Fixed(1),
                Dim::Fixed(*width as u64),
            ]);
            if weight.shape != expected_weight {
                return Err(format!(
                    "conv1d weight must have shape {expected_weight}, got {weight}"
                ));
            }
            float(bias, "conv1d bias")?;
            if bias.shape != Shape(vec![channels.clone()]) {
                return Err(format!(
                    "conv1d bias must have shape [{channels}], got {bias}"
                ));
            }
            Ok(vec![input.clone(), expected_window])
        }
        Op::LinearScan => {
            let (a, b, positions, state) = (x[0], x[1], x[2], x[3]);
            f32_only(a, "linear_scan a")?;
            rank(a, 2, "linear_scan a")?;
            if a != b {
                return Err(format!("linear_scan a and b differ: {a} vs {b}"));
            }
            positions_of(positions, dim(a, 0))?;
            let expected_state = ValueType::new(DType::F32, vec![dim(a, 1).clone()]);
            if *state != expected_state {
                return Err(format!(
                    "linear_scan state must be {expected_state}, got {state}"
                ));
            }
            Ok(vec![a.clone(), expected_state])
        }
        Op::Rotary { theta, rotary_dims } => {
            f32_only(x[0], "rotary input")?;
            rank(x[0], 3, "rotary input")?;
            positions_of(x[1], dim(x[0], 0))?;
            let hd = fixed(dim(x[0], 2), "rotary head dim")?;
            if *rotary_dims % 2 != 0 || *rotary_dims as u64 > hd {
                return Err(format!(
                    "rotary dims {rotary_dims} must be even and at most {hd}"
                ));
            }
            if !is_positive(*theta) {
                return Err(format!("rotary theta must be positive, got {theta}"));
            }
            one(x[0].clone())
        }
        Op::LocalAttention { window, rotary, .. } => {
            let (q, k, v, positions, keys, values) = (x[0], x[1], x[2], x[3], x[4], x[5]);
            if let Some(r) = rotary {
                let spec = Op::Rotary {
                    theta: r.theta,
                    rotary_dims: r.dims,
                };
                infer_checked_arity(&spec, &[q, positions])?;
                infer_checked_arity(&spec, &[k, positions])?;
            }
            for (t, what) in [(q, "query"), (k, "key"), (v, "value")] {
                f32_only(t, what)?;
                rank(t, 3, what)?;
            }
            if k != v {
                return Err(format!("key and value differ: {k} vs {v}"));
            }
            same_dim(dim(q, 0), dim(k, 0), "query vs key tokens")?;
            same_dim(dim(q, 2), dim(k, 2), "query vs key head dim")?;
            let heads = fixed(dim(q, 1), "query heads")?;
            let kv_heads = fixed(dim(k, 1), "key heads")?;
            if kv_heads == 0 || heads % kv_heads != 0 {
                return Err(format!(
                    "{heads} query heads are not a multiple of {kv_heads} key heads"
                ));
            }
            positions_of(positions, dim(q, 0))?;
            if *window < 1 {
                return Err("attention window must be at least 1".into());
            }
            let ring = ValueType::new(
                DType::F32,
                vec![
                    Dim::Fixed(*window as u64),
                    dim(k, 1).clone(),
                    dim(k, 2).clone(),
                ],
            );
            if *keys != ring || *values != ring {
                return Err(format!(
                    "key/value rings must be {ring}, got {keys} and {values}"
                ));
            }
            Ok(vec![q.clone(), ring.clone(), ring])
        }
        Op::RgLru { width, gate_output } => {
            let conv = infer_checked_arity(&Op::Conv1d { width: *width }, &x[..5])?;
            let gate = Op::BlockDiagonalLinear { bias: true };
            infer_checked_arity(&gate, &[&conv[0], x[5], x[6]])
                .map_err(|e| format!("input gate: {e}"))?;
            infer_checked_arity(&gate, &[&conv[0], x[7], x[8]])
                .map_err(|e| format!("recurrent gate: {e}"))?;
            let channels = ValueType::new(DType::F32, vec![dim(x[0], 1).clone()]);
            if *x[9] != channels {
                return Err(format!(
                    "rg_lru decay rate must be {channels}, got {}",
                    x[9]
                ));
            }
            if *x[10] != channels {
                return Err(format!("rg_lru state must be {channels}, got {}", x[10]));
            }
            if *gate_output && x[11] != x[0] {
                return Err(format!(
                    "rg_lru output gate must be {}, got {}",
                    x[0], x[11]
                ));
            }
            Ok(vec![x[0].clone(), conv[1].clone(), channels])
        }
        Op::Elementwise { body } => one(expr_type(body, x)?),
    }
}

/// Result type of an elementwise tree, by the rules of the ops it is made of.
fn expr_type(e: &Expr, x: &[&ValueType]) -> Res<ValueType> {
    let op_type = |op: Op, operands: &[&ValueType]| {
        infer_checked_arity(&op, operands).map(|mut v| v.remove(0))
    };
    match e {
        Expr::Operand(i) => x
            .get(*i as usize)
            .map(|t| (*t).clone())
            .ok_or_else(|| format!("operand ${i} is missing")),
        Expr::Unary(u, a) => op_type(Op::Unary(*u), &[&expr_type(a, x)?]),
        Expr::Binary(b, p, q) => op_type(Op::Binary(*b), &[&expr_type(p, x)?, &expr_type(q, x)?]),
        Expr::Select(c, p, q) => op_type(
            Op::Select,
            &[&expr_type(c, x)?, &expr_type(p, x)?, &expr_type(q, x)?],
        ),
        Expr::SoftCap(cap, a) => op_type(Op::SoftCap { cap: *cap }, &[&expr_type(a, x)?]),
        Expr::Cast(to, a) => op_type(Op::Cast { to: *to }, &[&expr_type(a, x)?]),
    }
}

/// Operands: x, norm weight if `norm`, weight, bias if `bias`, residual if `residual`.
fn linear(
    x: &[&ValueType],
    bias: bool,
    norm: bool,
    epilogue: Epilogue,
    residual: bool,
    splits: &[u64],
) -> Res<Vec<ValueType>> {
    let mut next = 0;
    let mut take = || {
        next += 1;
        x[next - 1]
    };
    let input = take();
    f32_only(input, "linear input")?;
    let in_dim = input
        .shape
        .last()
        .ok_or("linear input must not be a scalar")?;
    if norm {
        let w = take();
        float(w, "linear norm weight")?;
        rank(w, 1, "linear norm weight")?;
        same_dim(in_dim, dim(w, 0), "linear input width vs norm weight")?;
    }
    let w = take();
    float(w, "linear weight")?;
    rank(w, 2, "linear weight")?;
    same_dim(in_dim, dim(w, 1), "linear input width vs weight [out,in]")?;
    let mut out = dim(w, 0).clone();
    if bias {
        let b = take();
        float(b, "linear bias")?;
        rank(b, 1, "linear bias")?;
        same_dim(dim(b, 0), &out, "linear bias vs weight rows")?;
    }
    match epilogue {
        Epilogue::GeGlu => {
            let rows = fixed(&out, "geglu weight rows")?;
            if rows % 2 != 0 {
                return Err(format!(
                    "geglu needs an even number of weight rows, got {rows}"
                ));
            }
            out = Dim::Fixed(rows / 2);
        }
        Epilogue::SoftCap(cap) if !is_positive(cap) => {
            return Err(format!("soft_cap cap must be positive, got {cap}"));
        }
        _ => {}
    }
    let with_last = |d: Dim| {
        let mut dims = input.shape.0.clone();
        *dims.last_mut().expect("rank checked") = d;
        ValueType::new(DType::F32, dims)
    };
    let full = with_last(out.clone());
    if residual {
        let r = take();
        if *r != full {
            return Err(format!("linear residual must be {full}, got {r}"));
        }
    }
    if splits.is_empty() {
        return Ok(vec![full]);
    }
    let width = fixed(&out, "split linear output width")?;
    if splits.iter().sum::<u64>() != width || splits.contains(&0) {
        return Err(format!("splits {splits:?} do not cut {width} columns"));
    }
    Ok(splits.iter().map(|&s| with_last(Dim::Fixed(s))).collect())
}

fn positions_of(positions: &ValueType, tokens: &Dim) -> Res<()> {
    let expected = ValueType::new(DType::I32, vec![tokens.clone()]);
    if *positions == expected {
        Ok(())
    } else {
        Err(format!("positions must be {expected}, got {positions}"))
    }
}

/// False for zero, negatives and NaN.
fn is_positive(x: f64) -> bool {
    x > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dtype: DType, dims: Vec<Dim>) -> ValueType {
        ValueType::new(dtype, dims)
    }

    #[test]
    fn broadcasting_follows_numpy() {
        let a = Shape(vec![Dim::sym("T"), Dim::Fixed(1)]);
        let b = Shape(vec![Dim::Fixed(64)]);
        assert_eq!(
            broadcast(&a, &b).unwrap(),
            Shape(vec![Dim::sym("T"), Dim::Fixed(64)])
        );
        assert!(broadcast(&Shape::from([3u64]), &Shape::from([4u64])).is_err());
        assert_eq!(broadcast(&Shape::scalar(), &b).unwrap(), b);
    }

    #[test]
    fn linear_replaces_last_dim() {
        let x = t(DType::F32, vec![Dim::sym("T"), Dim::Fixed(64)]);
        let w = t(DType::BF16, vec![Dim::Fixed(96), Dim::Fixed(64)]);
        let out = crate::op::infer(&Op::linear(false), &[&x, &w]).unwrap();
        assert_eq!(out[0].to_string(), "f32[T,96]");
        let bad = t(DType::BF16, vec![Dim::Fixed(96), Dim::Fixed(65)]);
        assert!(crate::op::infer(&Op::linear(false), &[&x, &bad]).is_err());
    }

    #[test]
    fn comparison_yields_bool() {
        let p = t(DType::I32, vec![Dim::sym("T"), Dim::Fixed(1)]);
        let zero = ValueType::scalar(DType::I32);
        let out = crate::op::infer(&Op::Binary(BinaryOp::Eq), &[&p, &zero]).unwrap();
        assert_eq!(out[0].to_string(), "bool[T,1]");
    }
}
