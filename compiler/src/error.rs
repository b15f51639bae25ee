//! Errors of the compiler library. Each message is one line naming the cause.

use std::path::PathBuf;

use thiserror::Error;

/// Why a checkpoint folder cannot be used.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{}: no config.json in this folder (is it a RecurrentGemma checkpoint?)", .0.display())]
    NoConfig(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config.json: invalid JSON: {0}")]
    ConfigJson(String),
    #[error("config.json: missing field `{0}`")]
    MissingField(String),
    #[error("config.json: field `{field}`: {message}")]
    BadField { field: String, message: String },
    #[error("config.json: unknown block type {0} (expected \"recurrent\" or \"attention\")")]
    UnknownBlockType(String),
    #[error("config.json: {0}")]
    Inconsistent(String),
    #[error("{}: no model.safetensors or model.safetensors.index.json", .0.display())]
    NoWeights(PathBuf),
    #[error("model.safetensors.index.json: {0}")]
    BadIndex(String),
    #[error("{}: shard named in model.safetensors.index.json is missing", .0.display())]
    MissingShard(PathBuf),
    #[error("{}: not a valid safetensors file: {message}", file.display())]
    BadSafetensors { file: PathBuf, message: String },
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("unexpected tensor `{name}` in {file} (not part of this configuration)")]
    UnexpectedTensor { name: String, file: String },
    #[error("tensor `{name}` is listed in model.safetensors.index.json for {file} but is not in that file")]
    NotInShard { name: String, file: String },
    #[error("tensor `{name}` appears in both {first} and {second}")]
    DuplicateTensor {
        name: String,
        first: String,
        second: String,
    },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {found}, expected F32, BF16 or F16")]
    WrongDtype { name: String, found: String },
    #[error("tracing the {graph} graph: {source}")]
    Trace {
        graph: &'static str,
        source: griffin_ir::IrError,
    },
    #[error("optimising the {graph} graph: {source}")]
    Pass {
        graph: &'static str,
        source: crate::passes::PassError,
    },
    #[error("{}: cannot load tokenizer: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
}

/// Why a run of a compiled model failed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RunError {
    #[error("no token ids given")]
    EmptyIds,
    #[error("token id {id} is out of range: the vocabulary has {vocab} entries (ids 0..{vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("--prefill {prefill} is larger than the {ids} ids given")]
    PrefillTooLong { prefill: usize, ids: usize },
    #[error("interpreter: {0}")]
    Interp(String),
    #[error("{0}")]
    Backend(String),
}
