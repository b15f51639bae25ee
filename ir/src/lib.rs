//! Typed graph IR for Griffin (RecurrentGemma) models.
//!
//! A [`Graph`] holds nodes whose ops come from the closed [`Op`] enum; every result has a
//! [`ValueType`] (dtype and possibly symbolic shape). [`verify`] checks the invariants between
//! construction and every rewrite; [`text::print`] and [`text::parse`] give the canonical text
//! form. This crate depends on neither LLVM nor CUDA.

pub mod dot;
pub mod graph;
mod infer;
pub mod op;
pub mod text;
pub mod types;
pub mod verify;

pub use graph::{Graph, Node, NodeId, Value};
pub use infer::broadcast;
pub use op::{
    infer, BinaryOp, Epilogue, Expr, InputRole, NormPrologue, Op, OutputRole, ReduceOp, RotarySpec,
    UnaryOp,
};
pub use types::{DType, Dim, Shape, ValueType};
pub use verify::{verify, VerifyError};

use thiserror::Error;

/// Errors from building a graph.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum IrError {
    #[error("{op}: {message}")]
    Type { op: String, message: String },
    #[error("no value {0} in the graph")]
    NoSuchValue(Value),
}
