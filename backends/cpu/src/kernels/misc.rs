//! Embedding gather and generic elementwise kernels.

use griffin_ir::{BinaryOp, Expr, UnaryOp};

use griffin_runtime::plan::Layout;

use crate::ll::{f32_const, Func, Storage};
use crate::BackendError;

/// Arguments: table `[V, D]` (row-major, or blocked when a tied projection reads it too), ids
/// `i32[T]`, out `[T, D]`. Threads split the columns.
pub fn gather(
    symbol: &str,
    width: u64,
    table: Storage,
    layout: Layout,
    scale: Option<f64>,
) -> Result<String, BackendError> {
    let mut f = Func::new(symbol);
    let (tab, ids, out) = (f.arg(0), f.arg(1), f.arg(2));
    let d = width.to_string();
    let (begin, end) = f.partition(&d);
    if let Layout::Blocked { geglu: true, .. } = layout {
        return Err(BackendError::Unsupported(
            "gather from a GeGLU projection's weight".into(),
        ));
    }
    f.for_range("0", "%tokens", |f, t| {
        let id = f.load_i32_as_i64(&ids, t);
        let src = row_offset(f, layout, table, &id, &d);
        let dst = f.ibin("mul", t, &d);
        f.for_range(&begin, &end, |f, c| {
            let off = col_offset(f, layout, table, c);
            let si = f.ibin("add", &src, &off);
            let mut v = f.load_weight(table, &tab, &si);
            if let Some(s) = scale {
                v = f.fbin("fmul", &v, &f32_const(s));
            }
            let di = f.ibin("add", &dst, c);
            f.store_f32(&v, &out, &di);
        });
    });
    Ok(f.finish())
}

/// The element index of (row, 0) of a `[rows, width]` weight, as `Layout::row_offset` says.
fn row_offset(f: &mut Func, layout: Layout, storage: Storage, row: &str, width: &str) -> String {
    match layout {
        Layout::RowMajor => f.ibin("mul", row, width),
        Layout::Blocked { cols, panels, .. } => {
            let block_rows = Layout::block_rows(panels);
            let per_block = block_rows * Layout::padded_cols(cols, storage);
            let block = f.op(format!("udiv i64 {row}, {block_rows}"));
            let slot = f.op(format!("urem i64 {row}, {block_rows}"));
            let base = f.ibin("mul", &block, &per_block.to_string());
            let lanes = if storage == Storage::Bf16 { "2" } else { "1" };
            let within = f.ibin("mul", &slot, lanes);
            f.ibin("add", &base, &within)
        }
    }
}

/// How far column `col` is from column 0 of its row, as `Layout::col_offset` says.
fn col_offset(f: &mut Func, layout: Layout, storage: Storage, col: &str) -> String {
    match (layout, storage) {
        (Layout::RowMajor, _) => col.to_string(),
        (Layout::Blocked { panels, .. }, Storage::F32) => {
            f.ibin("mul", col, &Layout::block_rows(panels).to_string())
        }
        (Layout::Blocked { panels, .. }, Storage::Bf16) => {
            let pair = f.op(format!("udiv i64 {col}, 2"));
            let odd = f.op(format!("urem i64 {col}, 2"));
            let at = f.ibin("mul", &pair, &(Layout::block_rows(panels) * 2).to_string());
            f.ibin("add", &at, &odd)
        }
    }
}

/// How an elementwise operand is indexed: like the output, or one scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    Full,
    Scalar,
}

fn emit_expr(f: &mut Func, e: &Expr, leaves: &[String]) -> Result<String, BackendError> {
    Ok(match e {
        Expr::Operand(i) => leaves[*i as usize].clone(),
        Expr::Unary(u, a) => {
            let x = emit_expr(f, a, leaves)?;
            match u {
                UnaryOp::Neg => f.op(format!("fneg fast float {x}")),
                UnaryOp::Exp => f.exp(&x),
                UnaryOp::Expm1 => f.call_f32("expm1f", &[&x]),
                UnaryOp::Sqrt => f.call_f32("llvm.sqrt.f32", &[&x]),
                UnaryOp::Rsqrt => {
                    let r = f.call_f32("llvm.sqrt.f32", &[&x]);
                    f.fbin("fdiv", "1.0", &r)
                }
                UnaryOp::Tanh => f.call_f32("tanhf", &[&x]),
                UnaryOp::Sigmoid => f.sigmoid(&x),
                UnaryOp::GeluTanh => f.gelu_tanh(&x),
                UnaryOp::Softplus => {
                    let e = f.exp(&x);
                    f.call_f32("log1pf", &[&e])
                }
                UnaryOp::Log => return Err(BackendError::Unsupported("log".into())),
            }
        }
        Expr::Binary(b, p, q) => {
            let (x, y) = (emit_expr(f, p, leaves)?, emit_expr(f, q, leaves)?);
            match b {
                BinaryOp::Add => f.fbin("fadd", &x, &y),
                BinaryOp::Sub => f.fbin("fsub", &x, &y),
                BinaryOp::Mul => f.fbin("fmul", &x, &y),
                BinaryOp::Div => f.fbin("fdiv", &x, &y),
                BinaryOp::Max => f.op(format!(
                    "call fast float @llvm.maxnum.f32(float {x}, float {y})"
                )),
                BinaryOp::Min => f.op(format!(
                    "call fast float @llvm.minnum.f32(float {x}, float {y})"
                )),
                BinaryOp::Eq | BinaryOp::Lt => {
                    return Err(BackendError::Unsupported(format!(
                        "{} (a bool result)",
                        b.name()
                    )))
                }
            }
        }
        Expr::SoftCap(cap, a) => {
            let x = emit_expr(f, a, leaves)?;
            f.soft_cap(&x, *cap)
        }
        Expr::Select(..) => return Err(BackendError::Unsupported("select".into())),
        Expr::Cast(..) => return Err(BackendError::Unsupported("cast".into())),
    })
}

/// Arguments: each operand, then the output. Threads split the elements.
pub fn elementwise(
    symbol: &str,
    body: &Expr,
    operands: &[Operand],
    per_token: u64,
    fixed: u64,
) -> Result<String, BackendError> {
    let mut f = Func::new(symbol);
    let ptrs: Vec<String> = (0..operands.len()).map(|i| f.arg(i)).collect();
    let out = f.arg(operands.len());
    let scaled = f.ibin("mul", "%tokens", &per_token.to_string());
    let n = f.ibin("add", &scaled, &fixed.to_string());
    let (begin, end) = f.partition(&n);
    let mut result = Ok(());
    f.for_range(&begin, &end, |f, i| {
        let leaves: Vec<String> = ptrs
            .iter()
            .zip(operands)
            .map(|(p, kind)| match kind {
                Operand::Full => f.load_f32(p, i),
                Operand::Scalar => f.load_f32(p, "0"),
            })
            .collect();
        match emit_expr(f, body, &leaves) {
            Ok(v) => f.store_f32(&v, &out, i),
            Err(e) => result = Err(e),
        }
    });
    result?;
    Ok(f.finish())
}
