//! The execution plan a backend writes and the runtime follows: buffers, launches, interface.

use serde::{Deserialize, Serialize};

pub const PLAN_VERSION: u32 = 1;

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Elem {
    F32,
    I32,
}

impl Elem {
    pub fn size(self) -> usize {
        4
    }
}

/// What a buffer holds and so how long it lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BufferKind {
    /// Activations and scratch of one call; slots reused by liveness (the plan already did).
    Activation,
    /// Carried between calls: zeroed at the start of a document, never reused.
    State { name: String },
    /// A packed weight: `bytes` at `offset` in the weights file, computed by `recipe` from the
    /// checkpoint's tensors and stored as `storage`.
    Weight {
        name: String,
        offset: u64,
        bytes: u64,
        storage: Storage,
        recipe: Recipe,
    },
}

/// How a packed weight's elements are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Storage {
    F32,
    Bf16,
}

/// How to compute a packed weight from checkpoint tensors, elementwise in f64 over values
/// widened to f32 (the same arithmetic as the compiler's interpreter). A scalar broadcasts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Recipe {
    /// A checkpoint tensor by name, widened to f32.
    Tensor(String),
    Scalar(f64),
    /// `neg`, `exp`, `expm1`, `log`, `sqrt`, `rsqrt`, `tanh`, `sigmoid`, `softplus`, `gelu_tanh`.
    Unary(String, Box<Recipe>),
    /// `add`, `sub`, `mul`, `div`, `max`, `min`.
    Binary(String, Box<Recipe>, Box<Recipe>),
    /// Row-major parts joined along their first axis.
    Concat(Vec<Recipe>),
}

/// One buffer: `per_token · tokens + fixed` elements, allocated once for the largest chunk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub kind: BufferKind,
    pub elem: Elem,
    pub per_token: u64,
    pub fixed: u64,
}

impl Buffer {
    pub fn bytes(&self, max_tokens: u64) -> u64 {
        (self.per_token * max_tokens + self.fixed) * self.elem.size() as u64
    }
}

/// One kernel call: the kernel's symbol and the buffers it reads and writes, in its order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub kernel: String,
    pub args: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastRowLaunch {
    pub launch: usize,
    pub row_args: Vec<(usize, u64)>,
}

/// Everything the runtime needs besides the kernels' code and the weights' bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub version: u32,
    /// Tokens per call at most (the prefill chunk); buffers are sized for it.
    pub max_tokens: u64,
    pub vocab_size: u64,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub buffers: Vec<Buffer>,
    pub launches: Vec<Launch>,
    /// The i32 buffer the token ids of a call go into.
    pub tokens: usize,
    /// The f32 buffer of logits `[tokens, vocab]`.
    pub logits: usize,
    /// The launch that writes the logits, if it can run for the last token alone (generation
    /// needs no other row): its index, and its per-token arguments with their row sizes in
    /// elements, to be moved to the last row.
    pub logits_launch: Option<LastRowLaunch>,
    /// Identifies the packed weights this plan was built for.
    pub weights_hash: String,
}
