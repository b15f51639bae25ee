//! The device sampler's kernels (`griffin_backend_ptx::sample`) built with the host sampler's
//! likelihood constants, so both draw the same ids for a seed; and the sampler alone on the
//! interpreter (`EmuSampler`).

use griffin_backend_ptx::emu;
use griffin_backend_ptx::sample::{kernels, layout, ExpConstants, SampleKernel};
use griffin_runtime::gpu_plan::GpuSample;
use griffin_runtime::sampling::{exp, Sampler, DEVICE_CONFIG_BYTES, DEVICE_RNG_OFFSET};

// The host writes the configuration the kernels read (`Sampler::device_config`): the two
// crates' layouts agree where they meet.
const _: () = assert!(layout::CONFIG_BYTES as usize == DEVICE_CONFIG_BYTES);
const _: () = assert!(layout::RNG as u64 == DEVICE_RNG_OFFSET);

/// The host sampler's constants, for the device's copy of its likelihood.
pub fn exp_constants() -> ExpConstants {
    ExpConstants {
        cutoff: exp::CUTOFF,
        log2_e: exp::LOG2_E,
        ln2_hi: exp::LN2_HI,
        ln2_lo: exp::LN2_LO,
        round: exp::ROUND,
        poly: exp::POLY,
    }
}

/// The sampler's launches for a vocabulary of `vocab` tokens, kernel names starting `prefix`.
pub fn sampler_kernels(prefix: &str, vocab: u32) -> Vec<SampleKernel> {
    kernels(prefix, vocab, &exp_constants())
}

/// The device sampler alone on the PTX interpreter for one vocabulary: its kernels and three
/// buffers (logits, state, next id), set up as the runtime sets them up. Tests compare its
/// draws with the host sampler's; the decode estimate times its launches.
pub struct EmuSampler {
    module: emu::Module,
    kernels: Vec<SampleKernel>,
    /// Its device memory (for timing its launches: `emu::Memory::enable_timing`).
    pub memory: emu::Memory,
    logits: u64,
    state: u64,
    next: u64,
    vocab: usize,
}

impl EmuSampler {
    pub fn new(vocab: usize) -> Result<EmuSampler, emu::EmuError> {
        let kernels = sampler_kernels("sample", vocab as u32);
        let ptx: Vec<String> = kernels.iter().map(|k| k.ptx.clone()).collect();
        let module = emu::Module::parse(&griffin_backend_ptx::module(&ptx))?;
        let mut memory = emu::Memory::new();
        let logits = memory.alloc(&vec![0; 4 * vocab]);
        let state = memory.alloc(&vec![0; layout::bytes(vocab as u32) as usize]);
        let next = memory.alloc(&[0; 4]);
        Ok(EmuSampler {
            module,
            kernels,
            memory,
            logits,
            state,
            next,
            vocab,
        })
    }

    /// Hands `host`'s configuration, generator state and the seen bits of `history` over, as
    /// the runtime does (`GpuSample::uploads`).
    pub fn start(&mut self, host: &Sampler, history: &[u32]) -> Result<(), emu::EmuError> {
        let plan = GpuSample {
            launches: Vec::new(),
            state: 0,
            seen_offset: layout::seen(self.vocab as u32) as u64,
        };
        for (offset, bytes) in plan.uploads(host, history, self.vocab) {
            self.memory.write_bytes(self.state + offset, &bytes)?;
        }
        Ok(())
    }

    /// Draws from `logits` with every launch in order, `after(kernel, instructions, memory)`
    /// after each; the id drawn.
    pub fn draw(
        &mut self,
        logits: &[f32],
        after: &mut dyn FnMut(&SampleKernel, u64, &emu::Memory),
    ) -> Result<u32, emu::EmuError> {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.memory.write_bytes(self.logits, &bytes)?;
        for k in &self.kernels {
            let params = k.params.args(self.logits, self.state, self.next);
            let launch = emu::Launch {
                grid: k.grid,
                block: k.block,
                params: &params,
            };
            let instructions = emu::run(&self.module, &k.name, &launch, &mut self.memory)
                .map_err(|e| emu::EmuError(format!("{}: {e}", k.name)))?;
            after(k, instructions, &self.memory);
        }
        Ok(self.memory.read_u32(self.next, 1)?[0])
    }
}
