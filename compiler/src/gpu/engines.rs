//! Running a GPU program: on the PTX interpreter (`EmuEngine`, `--backend ptx-emu`) or on the
//! GPU through the CUDA runtime (`CudaEngine`, `--backend cuda`).

use griffin_backend_ptx::emu;
use griffin_runtime::gpu_plan::{GpuBufferKind, GpuLaunch};

use super::{lower, pack_weights, GpuOptions, GpuProgram, PREFILL_CHUNK};
use crate::error::RunError;
use crate::sampling::{Sampler, DEVICE_RNG_OFFSET};
use crate::session::{check_ids, DeviceSampling, Engine, Model};

/// Whether sampled decoding may draw on the device: not where `GRIFFIN_SAMPLE_ON_HOST=1`
/// (each step's logits then come back and the host samples them: the same ids).
fn device_sampling_allowed() -> bool {
    std::env::var("GRIFFIN_SAMPLE_ON_HOST").as_deref() != Ok("1")
}

/// A GPU program run by the PTX interpreter: slow (every thread of every kernel interpreted),
/// but the same kernels, launches and buffers a GPU would run.
pub struct EmuEngine {
    program: GpuProgram,
    module: emu::Module,
    memory: emu::Memory,
    addresses: Vec<u64>,
    position: u32,
    /// Draw sampled tokens with the plan's sampler kernels (where it has them).
    pub sample_on_device: bool,
    sampling: DeviceSampling,
}

fn emu_error(e: emu::EmuError) -> RunError {
    RunError::Backend(format!("PTX interpreter: {e}"))
}

/// Runs one launch on the interpreter; the threads' instructions executed.
fn run_launch(
    module: &emu::Module,
    memory: &mut emu::Memory,
    addresses: &[u64],
    launch: &GpuLaunch,
) -> Result<u64, RunError> {
    let params: Vec<u64> = launch
        .args
        .iter()
        .map(|a| addresses[a.buffer] + a.offset)
        .collect();
    let run = emu::Launch {
        grid: launch.grid,
        block: launch.block,
        params: &params,
    };
    emu::run(module, &launch.kernel, &run, memory).map_err(emu_error)
}

/// Runs `launches` in order on the interpreter (a free function over the engine's fields, so
/// the launch list can stay borrowed from the plan).
fn run_launches(
    module: &emu::Module,
    memory: &mut emu::Memory,
    addresses: &[u64],
    launches: &[GpuLaunch],
) -> Result<(), RunError> {
    for launch in launches {
        run_launch(module, memory, addresses, launch)?;
    }
    Ok(())
}

/// One launch of a decode step under the interpreter's latency model
/// (`EmuEngine::time_decode_step`).
#[derive(Clone, Debug)]
pub struct LaunchLatency {
    pub kernel: String,
    pub grid: u32,
    pub block: u32,
    /// Threads' instructions executed.
    pub instructions: u64,
    /// The model's critical path: its longest thread, every block at once.
    pub cycles: u64,
    /// Bytes it must move at the least (`Work::bytes`), for a bandwidth bound beside it.
    pub bytes: u64,
}

impl EmuEngine {
    pub fn new(model: &Model) -> Result<EmuEngine, RunError> {
        EmuEngine::with_prefill_chunk(model, Some(PREFILL_CHUNK))
    }

    /// With prompts in chunks of `chunk` tokens (`None`: as decode steps).
    pub fn with_prefill_chunk(model: &Model, chunk: Option<u32>) -> Result<EmuEngine, RunError> {
        EmuEngine::with_options(
            model,
            &GpuOptions {
                prefill_chunk: chunk,
                ..GpuOptions::default()
            },
        )
    }

    pub fn with_options(model: &Model, opts: &GpuOptions) -> Result<EmuEngine, RunError> {
        let mut program = lower(model, opts)?;
        let weights = pack_weights(&mut program, model)?;
        let module = emu::Module::parse(&program.ptx).map_err(emu_error)?;
        let mut memory = emu::Memory::new();
        let addresses = program
            .plan
            .starting_bytes(&weights)
            .map_err(RunError::Backend)?
            .iter()
            .map(|bytes| memory.alloc(bytes))
            .collect();
        Ok(EmuEngine {
            program,
            module,
            memory,
            addresses,
            position: 0,
            sample_on_device: device_sampling_allowed(),
            sampling: DeviceSampling::default(),
        })
    }

    /// Runs every later launch's blocks in `order` (the hardware runs them in any order: no
    /// kernel's answer may depend on it).
    pub fn set_block_order(&mut self, order: emu::BlockOrder) {
        self.memory.set_block_order(order);
    }

    /// Counts the memory transactions of every later launch: shared-memory wavefronts (bank
    /// conflicts) and global sectors (coalescing).
    pub fn enable_access_stats(&mut self) {
        self.memory.enable_access_stats();
    }

    /// What `enable_access_stats` counted so far.
    pub fn access_stats(&self) -> Option<&emu::AccessStats> {
        self.memory.access_stats()
    }

    /// Writes a decode step's token id and position into device memory.
    fn set_step(&mut self, id: u32, position: u32) -> Result<(), RunError> {
        check_ids(&[id], self.program.plan.vocab())?;
        let (ids, pos) = (
            self.addresses[self.program.plan.ids],
            self.addresses[self.program.plan.position],
        );
        self.memory
            .write_bytes(ids, &id.to_le_bytes())
            .and_then(|_| self.memory.write_bytes(pos, &position.to_le_bytes()))
            .map_err(emu_error)
    }

    /// Runs one decode step for `id`; the logits stay in device memory.
    fn step_device(&mut self, id: u32) -> Result<(), RunError> {
        self.set_step(id, self.position)?;
        run_launches(
            &self.module,
            &mut self.memory,
            &self.addresses,
            &self.program.plan.launches,
        )?;
        self.position += 1;
        Ok(())
    }

    fn logits(&self) -> Result<Vec<f32>, RunError> {
        self.memory
            .read_f32(
                self.addresses[self.program.plan.logits],
                self.program.plan.vocab(),
            )
            .map_err(emu_error)
    }

    /// Runs `ids` through the prefill program in chunks; `on_rows` sees each chunk's logits
    /// (every row, or with `last_only` and a last-row program, the last row alone).
    fn prefill_chunks(
        &mut self,
        ids: &[u32],
        last_only: bool,
        on_rows: &mut dyn FnMut(&[f32]),
    ) -> Result<(), RunError> {
        check_ids(ids, self.program.plan.vocab())?;
        let vocab = self.program.plan.vocab();
        let prefill = self
            .program
            .plan
            .prefill
            .as_ref()
            .expect("checked by the caller");
        let (launches, last) = match (&prefill.last_row, last_only) {
            (Some(l), true) => (&l.launches, Some(l.logits)),
            _ => (&prefill.launches, None),
        };
        let position = self.addresses[self.program.plan.position];
        for chunk in ids.chunks(prefill.max_tokens as usize) {
            // The chunk's ids, count and start position.
            let bytes: Vec<u8> = chunk.iter().flat_map(|i| i.to_le_bytes()).collect();
            let count = (chunk.len() as u32).to_le_bytes();
            for (buffer, data) in [
                (self.addresses[prefill.ids], &bytes[..]),
                (self.addresses[prefill.count], &count[..]),
                (position, &self.position.to_le_bytes()[..]),
            ] {
                self.memory.write_bytes(buffer, data).map_err(emu_error)?;
            }
            run_launches(&self.module, &mut self.memory, &self.addresses, launches)?;
            self.position += chunk.len() as u32;
            let (buffer, rows) = match last {
                Some(b) => (b, 1),
                None => (prefill.logits, chunk.len()),
            };
            let logits = self
                .memory
                .read_f32(self.addresses[buffer], rows * vocab)
                .map_err(emu_error)?;
            on_rows(&logits);
        }
        Ok(())
    }

    /// The greedy next id, computed on the device by the argmax kernel.
    pub fn device_argmax(&mut self) -> Result<u32, RunError> {
        run_launches(
            &self.module,
            &mut self.memory,
            &self.addresses,
            std::slice::from_ref(&self.program.plan.argmax),
        )?;
        let v = self
            .memory
            .read_u32(self.addresses[self.program.plan.next_id], 1)
            .map_err(emu_error)?;
        Ok(v[0])
    }

    pub fn program(&self) -> &GpuProgram {
        &self.program
    }

    /// The sampler's launches after a step whose logits are in device memory (`handover`:
    /// write `GpuSample::uploads` first): the next id and the device generator's state.
    fn device_sample(
        &mut self,
        handover: Option<(&Sampler, &[u32])>,
    ) -> Result<(u32, u64), RunError> {
        let plan = &self.program.plan;
        let sample = plan.sample.as_ref().expect("checked by the caller");
        let state = self.addresses[sample.state];
        for (offset, bytes) in handover
            .into_iter()
            .flat_map(|(s, history)| sample.uploads(s, history, plan.vocab()))
        {
            self.memory
                .write_bytes(state + offset, &bytes)
                .map_err(emu_error)?;
        }
        run_launches(
            &self.module,
            &mut self.memory,
            &self.addresses,
            &sample.launches,
        )?;
        let next = self
            .memory
            .read_u32(self.addresses[plan.next_id], 1)
            .map_err(emu_error)?[0];
        let rng = self
            .memory
            .read(state + DEVICE_RNG_OFFSET, 8)
            .map_err(emu_error)?;
        Ok((next, u64::from_le_bytes(rng.try_into().expect("8 bytes"))))
    }

    /// Runs one greedy decode step (the step's launches and the argmax) for `id` at
    /// `position` (the KV window full from position W − 1 on) launch by launch with the
    /// interpreter's latency model (`emu::Latencies`), and
    /// leaves it off again; only the launches whose kernel `keep` accepts (the others are
    /// skipped, so their outputs are what the buffers held: for timing one kernel). An
    /// estimate of where a kernel waits, not a measurement.
    pub fn time_decode_step(
        &mut self,
        id: u32,
        position: u32,
        lat: emu::Latencies,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<LaunchLatency>, RunError> {
        self.set_step(id, position)?;
        self.memory.enable_timing(lat);
        let mut out = Vec::new();
        let plan = &self.program.plan;
        let step = plan.launches.iter().chain(std::iter::once(&plan.argmax));
        for launch in step.filter(|l| keep(&l.kernel)) {
            let run = run_launch(&self.module, &mut self.memory, &self.addresses, launch);
            let instructions = run.inspect_err(|_| self.memory.disable_timing())?;
            out.push(LaunchLatency {
                kernel: launch.kernel.clone(),
                grid: launch.grid,
                block: launch.block,
                instructions,
                cycles: self.memory.last_launch_cycles().unwrap_or(0),
                bytes: launch.work.bytes,
            });
        }
        self.memory.disable_timing();
        self.position = position + 1;
        Ok(out)
    }
}

impl Engine for EmuEngine {
    fn reset(&mut self) {
        self.position = 0;
        self.sampling.forget();
        for (i, b) in self.program.plan.buffers.iter().enumerate() {
            if matches!(b.kind, GpuBufferKind::State(_)) {
                let zeros = vec![0u8; b.bytes as usize];
                self.memory
                    .write_bytes(self.addresses[i], &zeros)
                    .expect("state buffers are allocated");
            }
        }
    }

    fn prefill(&mut self, ids: &[u32], on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
        if self.program.plan.prefill.is_none() {
            check_ids(ids, self.program.plan.vocab())?;
            for &id in ids {
                self.step_device(id)?;
                on_logits(&self.logits()?);
            }
            return Ok(());
        }
        self.prefill_chunks(ids, false, on_logits)
    }

    fn prefill_last(&mut self, ids: &[u32]) -> Result<Vec<f32>, RunError> {
        let mut last = Vec::new();
        if self.program.plan.prefill.is_none() {
            self.prefill(ids, &mut |rows| last = rows.to_vec())?;
        } else {
            self.prefill_chunks(ids, true, &mut |rows| last = rows.to_vec())?;
        }
        let vocab = self.program.plan.vocab();
        Ok(last[last.len() - vocab..].to_vec())
    }

    fn step(&mut self, id: u32, on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
        self.step_device(id)?;
        on_logits(&self.logits()?);
        Ok(())
    }

    fn step_to_argmax(&mut self, id: u32) -> Option<Result<u32, RunError>> {
        Some(self.step_device(id).and_then(|()| self.device_argmax()))
    }

    fn step_to_sample(
        &mut self,
        id: u32,
        sampler: &mut Sampler,
        history: &[u32],
    ) -> Option<Result<u32, RunError>> {
        if !self.sample_on_device || self.program.plan.sample.is_none() {
            return None;
        }
        let mut sampling = std::mem::take(&mut self.sampling);
        let drawn = self.step_device(id).and_then(|()| {
            sampling.draw(sampler, history, |handover| {
                self.device_sample(handover.map(|s| (s, history)))
            })
        });
        self.sampling = sampling;
        Some(drawn)
    }
}

/// A GPU program on the GPU, through the CUDA runtime (`--backend cuda`).
pub struct CudaEngine {
    executor: griffin_runtime::cuda::CudaExecutor,
    /// Draw sampled tokens with the plan's sampler kernels (where it has them).
    pub sample_on_device: bool,
    sampling: DeviceSampling,
}

impl CudaEngine {
    pub fn new(model: &Model) -> Result<CudaEngine, RunError> {
        CudaEngine::with_options(model, &GpuOptions::default())
    }

    pub fn with_options(model: &Model, opts: &GpuOptions) -> Result<CudaEngine, RunError> {
        // Before any work: a machine without the driver gets the one-line reason at once.
        griffin_runtime::cuda::probe().map_err(|e| RunError::Backend(e.to_string()))?;
        let mut program = lower(model, opts)?;
        let weights = pack_weights(&mut program, model)?;
        let executor =
            griffin_runtime::cuda::CudaExecutor::new(program.plan, &program.ptx, &weights)
                .map_err(|e| RunError::Backend(e.to_string()))?;
        Ok(CudaEngine {
            executor,
            sample_on_device: device_sampling_allowed(),
            sampling: DeviceSampling::default(),
        })
    }

    /// Greedy decoding with the argmax on the device: the next id after `id`.
    pub fn step_greedy(&mut self, id: u32) -> Result<u32, RunError> {
        self.executor
            .step_greedy(id)
            .map_err(|e| RunError::Backend(e.to_string()))
    }
}

impl Engine for CudaEngine {
    fn reset(&mut self) {
        self.sampling.forget();
        if let Err(e) = self.executor.reset() {
            // The next step reports the device's error; reset itself has no error channel.
            tracing::warn!("resetting the GPU state: {e}");
        }
    }

    fn prefill(&mut self, ids: &[u32], on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
        if ids.is_empty() {
            return Err(RunError::EmptyIds);
        }
        for chunk in ids.chunks(self.executor.prefill_max_tokens()) {
            let rows = self
                .executor
                .prefill_chunk(chunk, true)
                .map_err(|e| RunError::Backend(e.to_string()))?;
            on_logits(rows);
        }
        Ok(())
    }

    fn prefill_last(&mut self, ids: &[u32]) -> Result<Vec<f32>, RunError> {
        if ids.is_empty() {
            return Err(RunError::EmptyIds);
        }
        let mut last = Vec::new();
        for chunk in ids.chunks(self.executor.prefill_max_tokens()) {
            let row = self
                .executor
                .prefill_chunk(chunk, false)
                .map_err(|e| RunError::Backend(e.to_string()))?;
            last = row.to_vec();
        }
        Ok(last)
    }

    fn step(&mut self, id: u32, on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
        let logits = self
            .executor
            .step(id)
            .map_err(|e| RunError::Backend(e.to_string()))?;
        on_logits(logits);
        Ok(())
    }

    fn step_to_argmax(&mut self, id: u32) -> Option<Result<u32, RunError>> {
        Some(self.step_greedy(id))
    }

    fn step_to_sample(
        &mut self,
        id: u32,
        sampler: &mut Sampler,
        history: &[u32],
    ) -> Option<Result<u32, RunError>> {
        if !self.sample_on_device || !self.executor.samples_on_device() {
            return None;
        }
        let backend = |e: griffin_runtime::RuntimeError| RunError::Backend(e.to_string());
        let executor = &mut self.executor;
        Some(self.sampling.draw(sampler, history, |handover| {
            if let Some(s) = handover {
                executor.start_sampling(s, history).map_err(backend)?;
            }
            let mut state = 0;
            let next = executor
                .step_sampled(id, Some(&mut state))
                .map_err(backend)?;
            Ok((next, state))
        }))
    }
}
