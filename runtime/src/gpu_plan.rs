//! The plan of a compiled GPU decode step: device buffers, kernel launches with their grid and
//! block sizes, and the weights to pack. Written by the compiler (`griffinc::gpu`), followed by
//! the CUDA executor (`cuda`) and, in tests, by the PTX interpreter.

use serde::{Deserialize, Serialize};

use crate::plan::Plan;
use crate::sampling::{seen_bits, Sampler};

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
    /// The device sampler's configuration, seen bits and scratch: written by the host when a
    /// sampled generation starts, carried between steps, never pooled or cleared by `reset`.
    SamplerState,
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
    /// What it moves and computes, for `--profile`'s rates (zero where not counted).
    #[serde(default)]
    pub work: Work,
}

/// What a launch must move and compute at the least, counted from its kernel's shape: bytes of
/// global memory read or written once each (weights, inputs, outputs), and floating-point
/// operations as the kernel executes them (an FMA is two; the tensor-core projections' split
/// inputs count both MMAs). The `per_token` parts scale with a prefill chunk's tokens. Only the
/// projections and the recurrence are counted: attention's work depends on the position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    pub bytes: u64,
    pub bytes_per_token: u64,
    pub flops: u64,
    pub flops_per_token: u64,
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work {
            bytes: self.bytes + o.bytes,
            bytes_per_token: self.bytes_per_token + o.bytes_per_token,
            flops: self.flops + o.flops,
            flops_per_token: self.flops_per_token + o.flops_per_token,
        }
    }
}

impl Work {
    /// (bytes, flops) for a launch over `tokens` tokens (1 for a decode step).
    pub fn at(&self, tokens: u64) -> (u64, u64) {
        (
            self.bytes + self.bytes_per_token * tokens,
            self.flops + self.flops_per_token * tokens,
        )
    }
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
    /// Sampled decoding's tail, if compiled: the device sampler (`griffin_backend_ptx::sample`)
    /// drawing the next id from the step's logits into the next-id buffer.
    #[serde(default)]
    pub sample: Option<GpuSample>,
}

/// The device sampler's launches and state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub launches: Vec<GpuLaunch>,
    /// The `SamplerState` buffer: the configuration (`Sampler::device_config`) at offset 0.
    pub state: usize,
    /// Where in it the seen bits (`sampling::seen_bits`) lie.
    pub seen_offset: u64,
}

impl GpuSample {
    /// What handing sampling to the device writes into the state buffer, as (offset, bytes):
    /// `sampler`'s configuration and generator state, and the seen bits of `history`. From
    /// then on the sampler's launches draw what `sampler` would after `history`.
    pub fn uploads(&self, sampler: &Sampler, history: &[u32], vocab: usize) -> [(u64, Vec<u8>); 2] {
        let mut seen = Vec::new();
        seen_bits(&mut seen, history, vocab);
        let seen = seen.iter().flat_map(|w| w.to_le_bytes()).collect();
        [
            (0, sampler.device_config(vocab).to_vec()),
            (self.seen_offset, seen),
        ]
    }
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

    /// Where each buffer other than the weights lies in one device arena (256-byte aligned),
    /// and the arena's bytes. With `all_rows` false, the prefill chunk's buffer of every row's
    /// logits is left out where a last-row program makes it unnecessary (generation); its
    /// offset is then `None`, as are the weights'.
    pub fn arena_layout(&self, all_rows: bool) -> (Vec<Option<u64>>, u64) {
        let unused = self
            .prefill
            .as_ref()
            .filter(|p| !all_rows && p.last_row.is_some())
            .map(|p| p.logits);
        let mut offsets = Vec::new();
        let mut bytes = 0u64;
        for (i, b) in self.buffers.iter().enumerate() {
            if matches!(b.kind, GpuBufferKind::Weight(_)) || unused == Some(i) {
                offsets.push(None);
            } else {
                offsets.push(Some(bytes));
                bytes += b.bytes.div_ceil(POOL_ALIGN) * POOL_ALIGN;
            }
        }
        (offsets, bytes)
    }

    /// Each buffer's bytes as an interpreter run starts from them: weights cut from the packed
    /// `weights`, constants, activations as NaN (a kernel reading one that nothing wrote, in
    /// this call, spreads it to the logits; pooled buffers would hold other values'
    /// leftovers), state and inputs zero.
    pub fn starting_bytes(&self, weights: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::with_capacity(self.buffers.len());
        for (i, b) in self.buffers.iter().enumerate() {
            out.push(match &b.kind {
                GpuBufferKind::Weight(_) => {
                    let (offset, bytes) = self
                        .weight_range(i)
                        .ok_or_else(|| format!("buffer {i}: a weight without a range"))?;
                    weights
                        .get(offset as usize..(offset + bytes) as usize)
                        .ok_or("the packed weights are shorter than the plan's")?
                        .to_vec()
                }
                GpuBufferKind::Constant(c) => c.clone(),
                GpuBufferKind::Activation => vec![0xFF; b.bytes as usize],
                _ => vec![0; b.bytes as usize],
            });
        }
        Ok(out)
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

/// Alignment of pooled activations in the arena (what `cudaMalloc` gives a buffer).
pub const POOL_ALIGN: u64 = 256;

impl GpuPlan {
    /// Buffers the host reads or writes between launches: never pooled.
    fn host_visible(&self) -> Vec<usize> {
        let mut v = vec![self.ids, self.position, self.logits, self.next_id];
        if let Some(p) = &self.prefill {
            v.extend([p.ids, p.count, p.logits]);
            if let Some(l) = &p.last_row {
                v.push(l.logits);
            }
        }
        v
    }

    /// The launch sequences, one per program that runs on its own (never two at once): the
    /// decode step with the argmax after it, the prefill chunk, its last-row variant.
    fn programs(&self) -> Vec<Vec<&GpuLaunch>> {
        let mut out = vec![self.launches.iter().chain([&self.argmax]).collect()];
        if let Some(s) = &self.sample {
            out.push(self.launches.iter().chain(&s.launches).collect());
        }
        if let Some(p) = &self.prefill {
            out.push(p.launches.iter().collect());
            if let Some(l) = &p.last_row {
                out.push(l.launches.iter().collect());
            }
        }
        out
    }

    /// Shares device memory between activations whose lives do not overlap: every activation
    /// buffer the host does not touch becomes a view into one arena buffer (appended), at an
    /// offset where no buffer live at the same time in the same program lies; the old entries
    /// keep their index with zero bytes. A buffer lives, in each program, from its first to its
    /// last launch. Values do not live across programs or calls (state does, and is not
    /// pooled), so programs are separate timelines. Returns the bytes saved.
    pub fn pool_activations(&mut self) -> u64 {
        let keep = self.host_visible();
        let pooled: Vec<usize> = (0..self.buffers.len())
            .filter(|b| {
                self.buffers[*b].kind == GpuBufferKind::Activation
                    && self.buffers[*b].bytes > 0
                    && !keep.contains(b)
            })
            .collect();
        if pooled.is_empty() {
            return 0;
        }
        // Live ranges: per buffer, (program, first launch, last launch).
        let mut lives: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); self.buffers.len()];
        for (p, launches) in self.programs().iter().enumerate() {
            for (i, launch) in launches.iter().enumerate() {
                for a in &launch.args {
                    let ranges = &mut lives[a.buffer];
                    match ranges.last_mut() {
                        Some((q, _, last)) if *q == p => *last = i,
                        _ => ranges.push((p, i, i)),
                    }
                }
            }
        }
        let overlap = |a: &[(usize, usize, usize)], b: &[(usize, usize, usize)]| {
            a.iter()
                .any(|&(p, f, l)| b.iter().any(|&(q, g, m)| p == q && f <= m && g <= l))
        };
        // Largest first, each at the lowest aligned offset clear of every placed buffer whose
        // life overlaps its own.
        let mut order = pooled.clone();
        order.sort_by_key(|b| (std::cmp::Reverse(self.buffers[*b].bytes), *b));
        let mut placed: Vec<(usize, u64, u64)> = Vec::new();
        let mut offset_of = std::collections::HashMap::new();
        for &b in &order {
            let bytes = self.buffers[b].bytes.div_ceil(POOL_ALIGN) * POOL_ALIGN;
            let mut busy: Vec<(u64, u64)> = placed
                .iter()
                .filter(|(o, _, _)| overlap(&lives[*o], &lives[b]))
                .map(|&(_, at, len)| (at, at + len))
                .collect();
            busy.sort();
            let mut at = 0;
            for (start, end) in busy {
                if at + bytes <= start {
                    break;
                }
                at = at.max(end);
            }
            placed.push((b, at, bytes));
            offset_of.insert(b, at);
        }
        let arena_bytes = placed
            .iter()
            .map(|(_, at, len)| at + len)
            .max()
            .unwrap_or(0);
        let before: u64 = pooled.iter().map(|b| self.buffers[*b].bytes).sum();
        let arena = self.buffers.len();
        self.buffers.push(GpuBuffer {
            kind: GpuBufferKind::Activation,
            bytes: arena_bytes,
        });
        for b in &pooled {
            self.buffers[*b].bytes = 0;
        }
        let rewrite = |launches: &mut [GpuLaunch]| {
            for l in launches {
                for a in &mut l.args {
                    if let Some(at) = offset_of.get(&a.buffer) {
                        *a = Arg {
                            buffer: arena,
                            offset: at + a.offset,
                        };
                    }
                }
            }
        };
        rewrite(&mut self.launches);
        rewrite(std::slice::from_mut(&mut self.argmax));
        if let Some(s) = &mut self.sample {
            rewrite(&mut s.launches);
        }
        if let Some(p) = &mut self.prefill {
            rewrite(&mut p.launches);
            if let Some(l) = &mut p.last_row {
                rewrite(&mut l.launches);
            }
        }
        before.saturating_sub(arena_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(args: &[usize]) -> GpuLaunch {
        GpuLaunch {
            work: Work::default(),
            kernel: "k".into(),
            grid: 1,
            block: 1,
            args: args
                .iter()
                .map(|&buffer| Arg { buffer, offset: 0 })
                .collect(),
        }
    }

    fn plan(buffers: &[u64], launches: Vec<GpuLaunch>) -> GpuPlan {
        let mut all: Vec<GpuBuffer> = [GpuBufferKind::Ids, GpuBufferKind::Position]
            .into_iter()
            .map(|kind| GpuBuffer { kind, bytes: 4 })
            .collect();
        all.extend(buffers.iter().map(|&bytes| GpuBuffer {
            kind: GpuBufferKind::Activation,
            bytes,
        }));
        GpuPlan {
            version: GPU_PLAN_VERSION,
            buffers: all,
            launches,
            argmax: launch(&[2]),
            weights: Plan {
                version: 0,
                max_tokens: 1,
                vocab_size: 1,
                bos_token_id: 0,
                eos_token_id: 0,
                pad_token_id: 0,
                buffers: Vec::new(),
                launches: Vec::new(),
                tokens: 0,
                logits: 0,
                logits_launch: None,
                weights_hash: String::new(),
            },
            ids: 0,
            position: 1,
            logits: 2,
            next_id: 0,
            prefill: None,
            sample: None,
        }
    }

    #[test]
    fn buffers_live_apart_share_bytes_and_overlapping_ones_do_not() {
        // Buffer 2 is the logits (host-visible). 3 → 4 → 5 → 6: a chain where each launch
        // reads the previous buffer and writes the next; 3 and 5 never live together.
        let launches = vec![
            launch(&[0, 3]),
            launch(&[3, 4]),
            launch(&[4, 5]),
            launch(&[5, 6]),
            launch(&[6, 2]),
        ];
        let sizes = [1000u64, 300, 1000, 300, 700];
        let mut p = plan(&sizes, launches);
        let saved = p.pool_activations();
        let arena = p.buffers.len() - 1;
        assert_eq!(p.buffers[2].bytes, 1000, "the logits are not pooled");
        // Where each launch's arguments now point.
        let at = |launch: usize, arg: usize| p.launches[launch].args[arg];
        let (b3, b4, b5, b6) = (at(0, 1), at(1, 1), at(2, 1), at(3, 1));
        for a in [b3, b4, b5, b6] {
            assert_eq!(a.buffer, arena);
            assert_eq!(a.offset % POOL_ALIGN, 0);
        }
        let span = |a: Arg, len: u64| (a.offset, a.offset + len.div_ceil(POOL_ALIGN) * POOL_ALIGN);
        let disjoint = |x: (u64, u64), y: (u64, u64)| x.1 <= y.0 || y.1 <= x.0;
        // Live together (one launch reads one, writes the other): apart.
        assert!(disjoint(span(b3, 300), span(b4, 1000)));
        assert!(disjoint(span(b4, 1000), span(b5, 300)));
        assert!(disjoint(span(b5, 300), span(b6, 700)));
        // 3 and 5 (and 4 and 6) never live together: the arena is two buffers wide, not four.
        assert_eq!(p.buffers[arena].bytes, 1024 + 512);
        assert_eq!(saved, 1000 + 300 + 300 + 700 - 1536);
        assert!(p.buffers[3..7].iter().all(|b| b.bytes == 0));
    }

    #[test]
    fn views_keep_their_offsets_and_separate_programs_are_separate_timelines() {
        // Buffer 3 is split into views; buffer 4 lives across the whole decode step but only
        // in the prefill program does it meet buffer 5.
        // Buffer 6 lives in the decode step only, 7 in the prefill only: they may share.
        let mut p = plan(
            &[100, 512, 256, 256, 128, 128],
            vec![launch(&[3, 4]), launch(&[4, 2]), launch(&[6])],
        );
        p.launches[0].args[0].offset = 256;
        p.prefill = Some(GpuPrefill {
            launches: vec![launch(&[4, 5]), launch(&[5, 3]), launch(&[7])],
            ids: 0,
            count: 1,
            logits: 2,
            max_tokens: 1,
            last_row: None,
        });
        p.pool_activations();
        let arena = p.buffers.len() - 1;
        let view = p.launches[0].args[0];
        let whole = p.prefill.as_ref().unwrap().launches[1].args[1];
        assert_eq!((view.buffer, whole.buffer), (arena, arena));
        assert_eq!(view.offset, whole.offset + 256, "a view keeps its offset");
        let p4 = p.prefill.as_ref().unwrap().launches[0].args[0].offset;
        let p5 = p.prefill.as_ref().unwrap().launches[0].args[1].offset;
        assert_ne!(p4, p5, "4 and 5 live together in the prefill");
        assert_eq!(p.launches[0].args[1].offset, p4, "one buffer, one place");
        let (b6, b7) = (
            p.launches[2].args[0],
            p.prefill.as_ref().unwrap().launches[2].args[0],
        );
        assert_eq!(b6, b7, "lives in different programs never overlap");
    }
}
