//! `griffin-gpu-probe --bisect DIR --ids LIST`: a built model's launches (its prefill chunk of
//! LIST, then one decode step, then the device sampler over that step's logits) replayed one
//! at a time, each on the device and in the PTX interpreter from the same inputs, the
//! interpreter's state carried on; so when a golden case fails on a GPU, the first launch
//! whose results differ names the kernel to look at. DIR is what `EXECUTABLE --dump-gpu-plan
//! DIR` writes.

use std::path::Path;

use griffin_backend_ptx::emu;
use griffin_runtime::cuda::{KernelRun, KernelRunner};
use griffin_runtime::gpu_plan::{GpuBufferKind, GpuLaunch, GpuPlan};
use griffin_runtime::sampling::{Sampler, SamplingParams};

/// How far a launch's results may be from the interpreter's, relative to the largest value of
/// each buffer it touches: hardware approximations (`tanh.approx` to ~5e-4, `ex2.approx`) stay
/// well within it, a misread fragment or a race does not.
pub const BISECT_TOLERANCE: f32 = 1e-2;

/// One launch's comparison.
pub struct Row {
    pub program: &'static str,
    pub index: usize,
    pub kernel: String,
    pub difference: f32,
}

/// The plan's buffers as the interpreter holds them, with the chunk's or step's inputs.
struct State {
    plan: GpuPlan,
    module: emu::Module,
    memory: emu::Memory,
    addresses: Vec<u64>,
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, String> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

impl State {
    fn load(dir: &Path) -> Result<(State, String), String> {
        let plan: GpuPlan = serde_json::from_slice(&read(dir, "gpu_plan.json")?)
            .map_err(|e| format!("{}: not a GPU plan: {e}", dir.display()))?;
        let ptx = String::from_utf8(read(dir, "module.ptx")?)
            .map_err(|_| "module.ptx is not text".to_string())?;
        let weights = read(dir, "weights.bin")?;
        let module = emu::Module::parse(&ptx).map_err(|e| format!("module.ptx: {e}"))?;
        let mut memory = emu::Memory::new();
        let addresses = plan
            .starting_bytes(&weights)?
            .iter()
            .map(|bytes| memory.alloc(bytes))
            .collect();
        Ok((
            State {
                plan,
                module,
                memory,
                addresses,
            },
            ptx,
        ))
    }

    fn write_u32s(&mut self, buffer: usize, values: &[u32]) -> Result<(), String> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.memory
            .write_bytes(self.addresses[buffer], &bytes)
            .map_err(|e| e.to_string())
    }

    fn bytes(&self, buffer: usize) -> Result<Vec<u8>, String> {
        let len = self.plan.buffers[buffer].bytes as usize;
        Ok(self
            .memory
            .read(self.addresses[buffer], len)
            .map_err(|e| e.to_string())?
            .to_vec())
    }

    /// Runs `launch` on the device over copies of the buffers it touches, then in the
    /// interpreter; the largest difference, relative to each buffer's largest magnitude.
    fn compare(&mut self, device: &KernelRunner, launch: &GpuLaunch) -> Result<f32, String> {
        let mut touched: Vec<usize> = launch.args.iter().map(|a| a.buffer).collect();
        touched.sort_unstable();
        touched.dedup();
        let before = touched
            .iter()
            .map(|&b| self.bytes(b))
            .collect::<Result<Vec<_>, _>>()?;
        let run = KernelRun {
            kernel: launch.kernel.clone(),
            grid: launch.grid,
            block: launch.block,
            buffers: launch
                .args
                .iter()
                .map(|a| touched.binary_search(&a.buffer).expect("listed above"))
                .collect(),
            offsets: launch.args.iter().map(|a| a.offset).collect(),
        };
        let got = device
            .run(&before, std::slice::from_ref(&run))
            .map_err(|e| e.to_string())?;
        let params: Vec<u64> = launch
            .args
            .iter()
            .map(|a| self.addresses[a.buffer] + a.offset)
            .collect();
        let l = emu::Launch {
            grid: launch.grid,
            block: launch.block,
            params: &params,
        };
        emu::run(&self.module, &launch.kernel, &l, &mut self.memory)
            .map_err(|e| format!("interpreter: {e}"))?;
        let mut worst = 0f32;
        for (&b, got) in touched.iter().zip(&got) {
            let want = self.bytes(b)?;
            worst = worst.max(match self.plan.buffers[b].kind {
                // Integers, and the sampler's state, which must match bit for bit (its
                // arithmetic is exact or correctly rounded by design).
                GpuBufferKind::Ids
                | GpuBufferKind::Position
                | GpuBufferKind::NextId
                | GpuBufferKind::SamplerState => {
                    if want == *got {
                        0.0
                    } else {
                        f32::INFINITY
                    }
                }
                _ => relative_difference(&want, got),
            });
        }
        Ok(worst)
    }
}

/// The largest |got - want| over the largest |want| (1 at least), as f32 words; a NaN on one
/// side only is infinitely far, on both sides equal (bytes no launch wrote).
fn relative_difference(want: &[u8], got: &[u8]) -> f32 {
    let words = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect()
    };
    let (want, got) = (words(want), words(got));
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(1f32, |m, v| m.max(v.abs()));
    want.iter().zip(&got).fold(0f32, |worst, (&w, &g)| {
        let d = match (w.is_nan(), g.is_nan()) {
            (true, true) => 0.0,
            (false, false) if w == g => 0.0,
            (false, false) => (g - w).abs() / scale,
            _ => f32::INFINITY,
        };
        worst.max(d)
    })
}

/// Replays the prefill chunk of `ids` (if the plan has one; else they run as decode steps,
/// every one compared) and one decode step after it.
pub fn bisect(dir: &Path, ids: &[u32]) -> Result<Vec<Row>, String> {
    let (mut s, ptx) = State::load(dir)?;
    let device = KernelRunner::new(&ptx).map_err(|e| e.to_string())?;
    let vocab = s.plan.vocab() as u32;
    if ids.is_empty() || ids.iter().any(|&i| i >= vocab) {
        return Err(format!("--ids: give token ids below {vocab}"));
    }
    let mut rows = Vec::new();
    // A launch that fails (a fault poisons the context for every later one) ends the
    // replay: its row says why.
    let mut failed = false;
    let mut compare_all = |s: &mut State, program: &'static str, launches: &[GpuLaunch]| {
        for (index, launch) in launches.iter().enumerate() {
            if failed {
                return;
            }
            let (kernel, difference) = match s.compare(&device, launch) {
                Ok(d) => (launch.kernel.clone(), d),
                Err(e) => {
                    failed = true;
                    let why = e.lines().next().unwrap_or("").to_string();
                    (format!("{} ({why})", launch.kernel), f32::INFINITY)
                }
            };
            rows.push(Row {
                program,
                index: index + 1,
                kernel,
                difference,
            });
        }
    };
    let (position, step_ids) = (s.plan.position, s.plan.ids);
    let mut steps: Vec<u32> = ids.to_vec();
    if let Some(p) = s.plan.prefill.clone() {
        if ids.len() > p.max_tokens as usize {
            return Err(format!(
                "--ids: {} ids, the chunk holds {}",
                ids.len(),
                p.max_tokens
            ));
        }
        s.write_u32s(p.ids, ids)?;
        s.write_u32s(p.count, &[ids.len() as u32])?;
        s.write_u32s(position, &[0])?;
        compare_all(&mut s, "prefill chunk", &p.launches);
        steps = vec![*ids.last().expect("checked above")];
    }
    let start = if s.plan.prefill.is_some() {
        ids.len()
    } else {
        0
    };
    let mut greedy = s.plan.launches.clone();
    greedy.push(s.plan.argmax.clone());
    for (i, &id) in steps.iter().enumerate() {
        s.write_u32s(step_ids, &[id])?;
        s.write_u32s(position, &[(start + i) as u32])?;
        compare_all(&mut s, "decode step", &greedy);
    }
    // The sampler over the last step's logits, every cut and the penalty on (the ids as the
    // history).
    if let Some(sample) = s.plan.sample.clone() {
        let sampler = Sampler::new(SamplingParams {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.01,
            repetition_penalty: 1.1,
            seed: 1,
        });
        let state = s.addresses[sample.state];
        for (offset, bytes) in sample.uploads(&sampler, ids, vocab as usize) {
            s.memory
                .write_bytes(state + offset, &bytes)
                .map_err(|e| e.to_string())?;
        }
        compare_all(&mut s, "sampler", &sample.launches);
    }
    Ok(rows)
}
