//! griffinc: an ahead-of-time compiler for Griffin (RecurrentGemma) models.
//!
//! In processing order: [`config`] and [`checkpoint`] read and validate a checkpoint folder,
//! [`trace`] turns it into `prefill` and `decode` graphs of the `griffin-ir` IR, [`interp`]
//! executes those graphs as the reference oracle, and [`session`] carries state across calls.
//! [`cli`] is the `griffinc` command line.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod demo;
pub mod error;
pub mod executable;
pub mod gpu;
pub mod interp;
pub mod passes;
pub mod progress;
pub mod session;
/// Sampling lives in the runtime, shared with built executables.
pub use griffin_runtime::sampling;
pub mod tokenizer;
pub mod trace;

pub use checkpoint::Checkpoint;
pub use config::{BlockType, Config};
pub use error::{ModelError, RunError};
pub use session::{eval, generate_greedy, Model, Session};
pub use trace::GraphKind;
