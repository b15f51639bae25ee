//! The plan of a compiled GPU decode step: device buffers, kernel launches with their grid and
//! block sizes, and the weights to pack. Written by the compiler (`griffinc::gpu`), followed by
//! the CUDA executor (`cuda`) and, in tests, by the PTX interpreter.

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

pub const GPU_PLAN_VERSION: u32 = 1;

/// What a device buffer holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GpuBufferKind {
    Activation,
    /// Carried between steps; zeroed at the start of a document.
    State(String),
    /// The packed weight at this index of `GpuPlan::weights`' buffers.
    Weight(usize),
    /// Bytes computed at compile time (rotary inverse frequencies).
    Constant(Vec<u8>),
    /// The step's token id (i32).
    Ids,
    /// The step's position (i32).
    Position,
    /// The greedy next id (i32), written by the argmax launch.
    NextId,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuBuffer {
    pub kind: GpuBufferKind,
    pub bytes: u64,
}

/// A kernel argument: a buffer's address plus a byte offset (split projections write views).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Arg {
    pub buffer: usize,
    pub offset: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuLaunch {
    pub kernel: String,
    pub grid: u32,
    pub block: u32,
    pub args: Vec<Arg>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuPlan {
    pub version: u32,
    pub buffers: Vec<GpuBuffer>,
    /// One decode step, in order.
    pub launches: Vec<GpuLaunch>,
    /// Greedy decoding's tail: argmax of the logits into the next-id buffer.
    pub argmax: GpuLaunch,
    /// The weights to pack (weight buffers only), by the same code as the CPU path; also
    /// carries the vocabulary size and special ids.
    pub weights: Plan,
    pub ids: usize,
    pub position: usize,
    pub logits: usize,
    pub next_id: usize,
    /// The prefill program, if compiled: chunks of up to `max_tokens` tokens in one go, into
    /// the same state and weight buffers (the position buffer is the chunk's start).
    #[serde(default)]
    pub prefill: Option<GpuPrefill>,
}

/// A prefill chunk's launches when only its last token's logits are wanted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastRow {
    pub launches: Vec<GpuLaunch>,
    /// `f32[V]`: the last token's logits.
    pub logits: usize,
}

/// A chunk of prompt tokens at once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuPrefill {
    pub launches: Vec<GpuLaunch>,
    /// `i32[max_tokens]`: the chunk's ids.
    pub ids: usize,
    /// `i32[1]`: how many of them.
    pub count: usize,
    /// `f32[max_tokens, V]`: logits of every token of the chunk.
    pub logits: usize,
    pub max_tokens: u32,
    /// The same chunk computing the logits of its last token only (generation).
    #[serde(default)]
    pub last_row: Option<LastRow>,
}

impl GpuPlan {
    pub fn vocab(&self) -> usize {
        self.weights.vocab_size as usize
    }

    /// The byte range of each weight buffer in the packed weights.
    pub fn weight_range(&self, buffer: usize) -> Option<(u64, u64)> {
        match &self.buffers.get(buffer)?.kind {
            GpuBufferKind::Weight(i) => match &self.weights.buffers.get(*i)?.kind {
                crate::plan::BufferKind::Weight { offset, bytes, .. } => Some((*offset, *bytes)),
                _ => None,
            },
            _ => None,
        }
    }
}
