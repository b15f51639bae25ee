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
        /// Absent in plans that predate blocked projections: row-major.
        #[serde(default)]
        layout: Layout,
    },
}

/// Output rows per panel of a blocked projection weight: one 16-lane f32 vector.
pub const PANEL: u64 = 16;

/// The order a packed weight's elements are stored in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// As the recipe computes them.
    #[default]
    RowMajor,
    /// A projection weight `[rows, cols]` (output rows, input columns) in blocks of
    /// `panels · PANEL` output rows, the order the CPU projection kernel reads them in: within
    /// a block, input column by input column, all the block's rows side by side, so one vector
    /// load gives one input's weights for 16 outputs. bf16 blocks store columns in pairs
    /// (`[cols/2][rows of the block][2]`, cols padded to even), so one 32-bit lane holds two
    /// consecutive inputs and widening is one shift or one mask. With `geglu` (gate rows first,
    /// then as many up rows), each block of gate rows is followed by the block of their up
    /// rows, so the kernel computes both before its epilogue. Rows past the end are zero.
    Blocked {
        rows: u64,
        cols: u64,
        panels: u64,
        geglu: bool,
    },
}

impl Layout {
    /// Rows of one block.
    pub fn block_rows(panels: u64) -> u64 {
        panels * PANEL
    }

    /// Packed elements (padding included) of a weight of `count` elements in this layout.
    pub fn elements(&self, count: u64, storage: Storage) -> u64 {
        match *self {
            Layout::RowMajor => count,
            Layout::Blocked {
                rows,
                cols,
                panels,
                geglu,
            } => {
                let per_block = Layout::block_rows(panels);
                let blocks = if geglu {
                    (rows / 2).div_ceil(per_block) * 2
                } else {
                    rows.div_ceil(per_block)
                };
                blocks * per_block * Layout::padded_cols(cols, storage)
            }
        }
    }

    /// Input columns as stored: bf16 pairs pad an odd count.
    pub fn padded_cols(cols: u64, storage: Storage) -> u64 {
        match storage {
            Storage::F32 => cols,
            Storage::Bf16 => cols.next_multiple_of(2),
        }
    }

    /// Where element (row, col) goes, as an element index: `row_offset(row) + col_offset(col)`.
    pub fn index(&self, row: u64, col: u64, storage: Storage) -> u64 {
        self.row_offset(row, storage) + self.col_offset(col, storage)
    }

    /// The element index of (row, 0).
    pub fn row_offset(&self, row: u64, storage: Storage) -> u64 {
        let Layout::Blocked {
            rows,
            cols,
            panels,
            geglu,
        } = *self
        else {
            unreachable!("row-major weights are stored as computed")
        };
        let per_block = Layout::block_rows(panels);
        let (block, slot) = if geglu {
            let width = rows / 2;
            let (gate_row, up) = if row < width {
                (row, 0)
            } else {
                (row - width, 1)
            };
            (2 * (gate_row / per_block) + up, gate_row % per_block)
        } else {
            (row / per_block, row % per_block)
        };
        let base = block * per_block * Layout::padded_cols(cols, storage);
        match storage {
            Storage::F32 => base + slot,
            Storage::Bf16 => base + slot * 2,
        }
    }

    /// How far column `col` is from column 0 of the same row, in elements.
    pub fn col_offset(&self, col: u64, storage: Storage) -> u64 {
        let Layout::Blocked { panels, .. } = *self else {
            unreachable!("row-major weights are stored as computed")
        };
        let per_block = Layout::block_rows(panels);
        match storage {
            Storage::F32 => col * per_block,
            Storage::Bf16 => (col / 2) * per_block * 2 + col % 2,
        }
    }
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
