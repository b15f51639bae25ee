//! Running a GPU plan on an NVIDIA GPU through the CUDA driver (cudarc, loaded dynamically: every
//! crate builds and every test runs where there is no CUDA). The PTX module is loaded once;
//! two device allocations hold everything (the packed weights, and an arena of every other
//! buffer: activations, carried state, KV rings, token id, position); each launch sequence
//! (the decode step, the greedy step with its argmax, the prefill chunk) is captured as a CUDA
//! graph when the executor is made, so that no capture falls inside a timed prompt or step,
//! and replayed per token or chunk; greedy decoding copies one token id back per step.
//!
//! Kernels are launched with programmatic dependent launch (Hopper): each may start while the
//! one before it finishes, and runs up to its `griddepcontrol.wait` (prefetching weights)
//! before depending on it. Where the driver refuses that, launches fall back to plain stream
//! order (`GRIFFIN_CUDA_PDL=0` asks for plain order from the start).
//!
//! Written without a GPU at hand: it has run only on `emucuda`, the stand-in driver over the
//! PTX interpreter (tests), never on a device.

use std::cell::Cell;
use std::ffi::{c_void, CString};
use std::sync::Arc;

use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys::{
    self, CUdeviceptr, CUevent_flags, CUgraphInstantiate_flags, CUlaunchAttributeID,
    CUstreamCaptureMode,
};
use cudarc::driver::{CudaContext, CudaGraph, CudaStream};

use crate::gpu_plan::{GpuBufferKind, GpuLaunch, GpuPlan, GpuSample};
use crate::sampling::{Sampler, DEVICE_RNG_OFFSET};
use crate::stats::LaunchTime;
use crate::RuntimeError;

/// `what` failed with `e`, as "what: CUDA_ERROR_NAME (the driver's message)".
fn driver(what: &str, e: DriverError) -> RuntimeError {
    let name = e.error_name().map_or_else(
        |_| format!("CUDA error {}", e.0 as u32),
        |n| n.to_string_lossy().into_owned(),
    );
    match e.error_string() {
        Ok(m) => RuntimeError::Device(format!("{what}: {name} ({})", m.to_string_lossy())),
        Err(_) => RuntimeError::Device(format!("{what}: {name}")),
    }
}

/// Err with "no CUDA driver" unless libcuda can be loaded (cudarc panics on first use
/// otherwise).
pub fn probe() -> Result<(), RuntimeError> {
    // SAFETY: only tries to open the library.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(RuntimeError::Device(
            "no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver, or use the CPU backend)"
                .into(),
        ))
    }
}

/// Opens GPU 0 for the module `ptx` (an error for a GPU that could not load it), a stream of
/// our own to run it on, and the loaded module.
fn open_gpu(ptx: &str) -> Result<(Arc<CudaContext>, Arc<CudaStream>, Module), RuntimeError> {
    probe()?;
    let ctx = CudaContext::new(0).map_err(|e| driver("opening GPU 0", e))?;
    // The kernels are PTX for sm_90 (Hopper), which newer GPUs compile too; older ones
    // would fail at loading with a less telling error.
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| driver("reading GPU 0's compute capability", e))?;
    if major < 9 {
        return Err(RuntimeError::Device(format!(
            "GPU 0 has compute capability {major}.{minor}; griffinc's GPU kernels need 9.0 or newer (H100, H200)"
        )));
    }
    // `wgmma` kernels are PTX for the architecture-specific target sm_90a, which only
    // compute capability 9.0 loads.
    if ptx.contains(".target sm_90a") && (major, minor) != (9, 0) {
        return Err(RuntimeError::Device(format!(
            "GPU 0 has compute capability {major}.{minor}; this executable was built with --wgmma (PTX for sm_90a), which runs on 9.0 only (H100, H200): rebuild without --wgmma"
        )));
    }
    // One stream, synchronised by hand: no per-buffer events (they would also get in the way
    // of graph capture).
    // SAFETY: everything run in this context runs on this one stream.
    unsafe { ctx.disable_event_tracking() };
    // A stream of our own: the legacy default stream cannot be captured into a graph.
    let stream = ctx
        .new_stream()
        .map_err(|e| driver("creating a stream", e))?;
    let module = Module::load(&ctx, ptx)?;
    Ok((ctx, stream, module))
}

/// One launch of `run_kernels`: kernel name, blocks, threads per block, and its parameters as
/// indices of buffers.
pub struct KernelRun {
    pub kernel: String,
    pub grid: u32,
    pub block: u32,
    pub buffers: Vec<usize>,
    /// A byte offset into each parameter's buffer (missing ones: 0).
    pub offsets: Vec<u64>,
}

/// Runs kernels of the module `ptx` in order (plain stream order) over device copies of
/// `buffers` and returns every buffer's bytes afterwards: for checking kernels on a device
/// against the PTX interpreter (`griffin-gpu-probe`).
pub fn run_kernels(
    ptx: &str,
    buffers: &[Vec<u8>],
    launches: &[KernelRun],
) -> Result<Vec<Vec<u8>>, RuntimeError> {
    KernelRunner::new(ptx)?.run(buffers, launches)
}

/// The module `ptx` loaded once for several `run_kernels`-like runs (`griffin-gpu-probe
/// --bisect` runs a plan's launches one at a time).
pub struct KernelRunner {
    /// Field order: the module unloads before the stream and context go.
    module: Module,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

impl KernelRunner {
    pub fn new(ptx: &str) -> Result<KernelRunner, RuntimeError> {
        let (ctx, stream, module) = open_gpu(ptx)?;
        Ok(KernelRunner {
            module,
            stream,
            ctx,
        })
    }

    /// Device copies of `buffers`, `launches` over them in order, every buffer's bytes back.
    pub fn run(
        &self,
        buffers: &[Vec<u8>],
        launches: &[KernelRun],
    ) -> Result<Vec<Vec<u8>>, RuntimeError> {
        let stream = &self.stream;
        let memory = buffers
            .iter()
            .map(|b| DeviceMemory::new(&self.ctx, b.len()))
            .collect::<Result<Vec<_>, _>>()?;
        for (m, b) in memory.iter().zip(buffers) {
            // SAFETY: the allocation holds b.len() bytes.
            unsafe { cu::memcpy_htod_async(m.ptr, b.as_slice(), stream.cu_stream()) }
                .map_err(|e| driver("copying a buffer to the device", e))?;
        }
        for l in launches {
            let kernel = self.module.kernel(&l.kernel)?;
            let params = l
                .buffers
                .iter()
                .enumerate()
                .map(|(p, &i)| {
                    let offset = l.offsets.get(p).copied().unwrap_or(0);
                    let m = memory.get(i)?;
                    (offset < buffers[i].len().max(1) as u64).then_some(m.ptr + offset)
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    RuntimeError::Plan(format!("`{}`: no such buffer or offset", l.kernel))
                })?;
            if params.len() > MAX_PARAMS {
                return Err(RuntimeError::Plan(format!(
                    "`{}`: more than {MAX_PARAMS} parameters",
                    l.kernel
                )));
            }
            launch_on(stream, kernel, &l.kernel, (l.grid, l.block), &params, false)?;
        }
        let mut out: Vec<Vec<u8>> = buffers.iter().map(|b| vec![0u8; b.len()]).collect();
        for (m, o) in memory.iter().zip(out.iter_mut()) {
            // SAFETY: the allocation holds o.len() bytes.
            unsafe { cu::memcpy_dtoh_async(o.as_mut_slice(), m.ptr, stream.cu_stream()) }
                .map_err(|e| driver("copying a buffer back", e))?;
        }
        stream
            .synchronize()
            .map_err(|e| driver("running the kernels", e))?;
        Ok(out)
    }
}

/// Launches `kernel` (`name`, for errors) on `stream` as (blocks, threads per block), its
/// parameters `params` by value; with `early`, as a programmatic dependent launch (it may start
/// before the kernel before it ends; it waits for it at its `griddepcontrol.wait`).
fn launch_on(
    stream: &CudaStream,
    kernel: Kernel,
    name: &str,
    (grid, block): (u32, u32),
    params: &[u64],
    early: bool,
) -> Result<(), RuntimeError> {
    // At most MAX_PARAMS: checked by the callers. The driver reads each parameter through a
    // pointer to it.
    debug_assert!(params.len() <= MAX_PARAMS);
    let mut args = [std::ptr::null_mut::<c_void>(); MAX_PARAMS];
    for (a, p) in args.iter_mut().zip(params) {
        *a = (p as *const u64).cast_mut().cast();
    }
    // SAFETY: a plain C struct and union, valid zeroed; the fields set below are the ones
    // the driver reads for this attribute.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: u32::from(early),
    };
    // SAFETY: the parameters are device addresses of buffers sized for the kernels, one per
    // kernel parameter; `args`, `attribute` and `params` outlive the call (the driver copies
    // them).
    unsafe { sys::cuLaunchKernelEx(&config, kernel.0, args.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(|e| driver(&format!("launching `{name}`"), e))
}

/// A device allocation freed on drop.
struct DeviceMemory {
    ptr: CUdeviceptr,
    ctx: Arc<CudaContext>,
}

impl DeviceMemory {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DeviceMemory, RuntimeError> {
        ctx.bind_to_thread()
            .map_err(|e| driver("binding the context", e))?;
        // SAFETY: plain allocation; freed in Drop.
        let ptr = unsafe { cu::malloc_sync(bytes.max(1)) }
            .map_err(|e| driver(&format!("allocating {bytes} bytes"), e))?;
        Ok(DeviceMemory {
            ptr,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_sync, freed once.
        let _ = unsafe { cu::free_sync(self.ptr) };
    }
}

/// One row of logits in page-locked host memory, where every step's logits come back: the
/// driver copies into it by DMA, while a copy into pageable memory goes through a staging
/// buffer (for the 2B vocabulary, 1 MB a sampled token).
struct PinnedRow {
    ptr: *mut f32,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl PinnedRow {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedRow, RuntimeError> {
        ctx.bind_to_thread()
            .map_err(|e| driver("binding the context", e))?;
        // SAFETY: plain allocation of len f32 (at least one); freed in Drop.
        let ptr = unsafe { cu::malloc_host(4 * len.max(1), 0) }
            .map_err(|e| driver(&format!("allocating {} bytes of host memory", 4 * len), e))?;
        Ok(PinnedRow {
            ptr: ptr.cast(),
            len,
            ctx: ctx.clone(),
        })
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: len f32, allocated by `new`; the host reads it only after the stream
        // synchronised past the copy into it.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as `as_slice`; `&mut self` keeps it unique on the host.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedRow {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_host, freed once.
        let _ = unsafe { cu::free_host(self.ptr.cast()) };
    }
}

/// The PTX module, loaded once, unloaded on drop.
struct Module {
    raw: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

impl Module {
    fn load(ctx: &Arc<CudaContext>, ptx: &str) -> Result<Module, RuntimeError> {
        let text = CString::new(ptx)
            .map_err(|_| RuntimeError::Plan("the PTX module holds a NUL byte".into()))?;
        ctx.bind_to_thread()
            .map_err(|e| driver("binding the context", e))?;
        // SAFETY: a NUL-terminated PTX text, which the driver copies.
        let raw = unsafe { cu::module::load_data(text.as_ptr().cast()) }
            .map_err(|e| driver("loading the PTX module", e))?;
        Ok(Module {
            raw,
            ctx: ctx.clone(),
        })
    }

    fn kernel(&self, name: &str) -> Result<Kernel, RuntimeError> {
        let c = CString::new(name)
            .map_err(|_| RuntimeError::Plan(format!("kernel name {name:?} holds a NUL byte")))?;
        // SAFETY: the module is loaded until self drops, which outlives every launch (the
        // executor holds both).
        unsafe { cu::module::get_function(self.raw, c) }
            .map(Kernel)
            .map_err(|e| driver(&format!("kernel `{name}`"), e))
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: loaded by load_data, unloaded once.
        let _ = unsafe { cu::module::unload(self.raw) };
    }
}

/// A kernel of the module.
#[derive(Clone, Copy)]
struct Kernel(sys::CUfunction);

/// The most parameters a kernel of the plan takes (the launch builds their pointer array on
/// the stack).
const MAX_PARAMS: usize = 32;

/// A GPU plan loaded on device 0.
pub struct CudaExecutor {
    plan: GpuPlan,
    stream: Arc<CudaStream>,
    /// Whether launches may overlap the kernel before them (programmatic dependent launch);
    /// cleared for good when the driver refuses it.
    early_launch: Cell<bool>,
    addresses: Vec<u64>,
    /// The decode step.
    step_program: Program,
    /// The decode step, then the argmax of its logits into the next-id buffer.
    greedy_program: Program,
    /// The decode step, then the device sampler into the next-id buffer, if the plan has one.
    sampled_program: Option<Program>,
    /// The prefill chunk, if the plan has one.
    prefill_program: Option<Program>,
    /// The prefill chunk computing its last token's logits only (generation).
    prefill_last_program: Option<Program>,
    _weights: DeviceMemory,
    _arena: DeviceMemory,
    position: u32,
    /// Every row's logits of a prefill chunk (pageable: up to max_tokens rows).
    logits: Vec<f32>,
    /// A step's logits, or a chunk's last row.
    row: PinnedRow,
    /// Bytes of device memory this executor allocated.
    pub device_bytes: u64,
    /// Last, so that it drops after the programs' graphs, which launch its kernels.
    _module: Module,
}

/// What a decode step ends with.
#[derive(Clone, Copy)]
enum Tail {
    /// Its logits (the host reads them).
    Logits,
    /// The argmax into the next-id buffer.
    Argmax,
    /// The device sampler into the next-id buffer.
    Sample,
}

/// A launch sequence as a CUDA graph, captured when the executor is made; if capture fails (an
/// old driver, a debugger), it runs as plain launches, which compute the same thing.
enum Graph {
    Captured(CudaGraph),
    Unavailable,
}

/// A launch sequence (the decode step, or a prefill chunk) with its kernels resolved and its
/// parameters as device addresses. Its inputs (ids, count, position) live in device buffers,
/// so one captured graph serves every call.
struct Program {
    name: &'static str,
    launches: Vec<GpuLaunch>,
    kernels: Vec<Kernel>,
    params: Vec<Vec<u64>>,
    graph: Graph,
}

impl Program {
    /// Resolves `launches` and captures them into a graph (capture runs no kernel), so that
    /// capturing and instantiating a graph of hundreds of launches never counts against a
    /// timed prompt chunk or decode step. `early` is cleared for good when the driver refuses
    /// early launches.
    fn new(
        name: &'static str,
        launches: &[GpuLaunch],
        resolve: impl Fn(&GpuLaunch) -> Result<(Kernel, Vec<u64>), RuntimeError>,
        stream: &Arc<CudaStream>,
        early: &Cell<bool>,
    ) -> Result<Program, RuntimeError> {
        let (kernels, params) = launches
            .iter()
            .map(resolve)
            .collect::<Result<(Vec<_>, Vec<_>), _>>()?;
        let mut p = Program {
            name,
            launches: launches.to_vec(),
            kernels,
            params,
            graph: Graph::Unavailable,
        };
        if early.get() {
            match p.capture(stream, true) {
                Ok(g) => p.graph = Graph::Captured(g),
                Err(why) => {
                    eprintln!(
                        "note: programmatic dependent launch failed while capturing the {name} ({why}); kernels run in plain stream order"
                    );
                    early.set(false);
                }
            }
        }
        if matches!(p.graph, Graph::Unavailable) {
            match p.capture(stream, false) {
                Ok(g) => p.graph = Graph::Captured(g),
                Err(why) => eprintln!(
                    "note: {name} not captured as a CUDA graph ({why}); launching kernels one by one"
                ),
            }
        }
        Ok(p)
    }

    /// Launch `i` on `stream`, early (programmatic dependent launch) or not. (At most
    /// MAX_PARAMS parameters: checked when the program was resolved.)
    fn launch(&self, i: usize, stream: &CudaStream, early: bool) -> Result<(), RuntimeError> {
        let l = &self.launches[i];
        let grid = (l.grid, l.block);
        launch_on(
            stream,
            self.kernels[i],
            &l.kernel,
            grid,
            &self.params[i],
            early,
        )
    }

    fn launch_all(&self, stream: &CudaStream, early: bool) -> Result<(), RuntimeError> {
        (0..self.launches.len()).try_for_each(|i| self.launch(i, stream, early))
    }

    /// Captures the launches into a graph, early or not.
    fn capture(&self, stream: &Arc<CudaStream>, early: bool) -> Result<CudaGraph, String> {
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| e.to_string())?;
        let launched = self.launch_all(stream, early);
        let ended = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        match (launched, ended) {
            (Ok(()), Ok(Some(g))) => Ok(g),
            (Ok(()), Ok(None)) => Err("empty capture".into()),
            (Err(e), _) => Err(e.to_string()),
            (_, Err(e)) => Err(e.to_string()),
        }
    }
}

impl CudaExecutor {
    /// Loads `ptx`, allocates every buffer, uploads the packed `weights`.
    pub fn new(plan: GpuPlan, ptx: &str, weights: &[u8]) -> Result<CudaExecutor, RuntimeError> {
        CudaExecutor::with_rows(plan, ptx, weights, true)
    }

    /// As `new`, for generation: prefill chunks give their last token's logits only, so the
    /// buffer of every row's logits (`max_tokens · V` floats: 524 MB for the 2B shape at 512
    /// tokens) is not allocated where the plan has a last-row program.
    pub fn for_generation(
        plan: GpuPlan,
        ptx: &str,
        weights: &[u8],
    ) -> Result<CudaExecutor, RuntimeError> {
        CudaExecutor::with_rows(plan, ptx, weights, false)
    }

    fn with_rows(
        plan: GpuPlan,
        ptx: &str,
        weights: &[u8],
        all_rows: bool,
    ) -> Result<CudaExecutor, RuntimeError> {
        let (ctx, stream, module) = open_gpu(ptx)?;
        // Every other buffer in one arena (every row's logits only where they can be asked
        // for).
        let (offsets, arena_bytes) = plan.arena_layout(all_rows);
        // One clear error before any allocation where the two cannot fit (the driver's own
        // would name neither the model's needs nor the device's memory).
        ctx.bind_to_thread()
            .map_err(|e| driver("binding the context", e))?;
        let (free, total) = cu::mem_get_info().map_err(|e| driver("reading device memory", e))?;
        if weights.len() as u64 + arena_bytes > free as u64 {
            return Err(RuntimeError::DeviceTooSmall {
                weights: weights.len() as u64,
                buffers: arena_bytes,
                free: free as u64,
                total: total as u64,
            });
        }
        let weights_mem = DeviceMemory::new(&ctx, weights.len())?;
        // SAFETY: the allocation holds weights.len() bytes.
        unsafe { cu::memcpy_htod_async(weights_mem.ptr, weights, stream.cu_stream()) }
            .map_err(|e| driver("uploading the weights", e))?;
        let arena = DeviceMemory::new(&ctx, arena_bytes as usize)?;
        let mut addresses = Vec::new();
        for (i, b) in plan.buffers.iter().enumerate() {
            addresses.push(match &b.kind {
                GpuBufferKind::Weight(_) => {
                    let (offset, _) = plan.weight_range(i).ok_or_else(|| {
                        RuntimeError::Plan(format!("buffer {i}: weight without a range"))
                    })?;
                    if offset + b.bytes > weights.len() as u64 {
                        return Err(RuntimeError::Weights(format!(
                            "buffer {i} lies past the end of the weights"
                        )));
                    }
                    weights_mem.ptr + offset
                }
                // Left out of the arena: no launch that runs refers to it.
                _ => offsets[i].map_or(0, |o| arena.ptr + o),
            });
        }
        // SAFETY: the arena holds arena_bytes bytes.
        unsafe { cu::memset_d8_async(arena.ptr, 0, arena_bytes as usize, stream.cu_stream()) }
            .map_err(|e| driver("clearing device memory", e))?;
        for (i, b) in plan.buffers.iter().enumerate() {
            if let GpuBufferKind::Constant(bytes) = &b.kind {
                // SAFETY: the buffer was sized for these bytes.
                unsafe { cu::memcpy_htod_async(addresses[i], bytes, stream.cu_stream()) }
                    .map_err(|e| driver("uploading constants", e))?;
            }
        }
        // Each launch's parameters as device addresses, checked once here against the array
        // `launch` passes them in.
        let params_of = |l: &GpuLaunch| -> Result<Vec<u64>, RuntimeError> {
            if l.args.len() > MAX_PARAMS {
                return Err(RuntimeError::Plan(format!(
                    "kernel `{}`: {} parameters, at most {MAX_PARAMS}",
                    l.kernel,
                    l.args.len()
                )));
            }
            Ok(l.args
                .iter()
                .map(|a| addresses[a.buffer] + a.offset)
                .collect())
        };
        // Uploads done before anything is captured on the stream.
        stream
            .synchronize()
            .map_err(|e| driver("setting up the device", e))?;
        let early = Cell::new(std::env::var("GRIFFIN_CUDA_PDL").as_deref() != Ok("0"));
        let program = |name: &'static str, launches: &[GpuLaunch]| {
            let resolve = |l: &GpuLaunch| Ok((module.kernel(&l.kernel)?, params_of(l)?));
            Program::new(name, launches, resolve, &stream, &early)
        };
        let step_program = program("decode step", &plan.launches)?;
        let mut greedy = plan.launches.clone();
        greedy.push(plan.argmax.clone());
        let greedy_program = program("greedy decode step", &greedy)?;
        let sampled_program = match &plan.sample {
            Some(sample) => {
                let mut launches = plan.launches.clone();
                launches.extend(sample.launches.iter().cloned());
                Some(program("sampled decode step", &launches)?)
            }
            None => None,
        };
        let prefill_program = match &plan.prefill {
            Some(p) if offsets[p.logits].is_some() => Some(program("prefill chunk", &p.launches)?),
            _ => None,
        };
        let last_row = plan.prefill.as_ref().and_then(|p| p.last_row.as_ref());
        let prefill_last_program = match last_row {
            Some(l) => Some(program("prefill chunk (last row)", &l.launches)?),
            None => None,
        };
        let vocab = plan.vocab();
        Ok(CudaExecutor {
            device_bytes: weights.len() as u64 + arena_bytes,
            _module: module,
            plan,
            stream,
            early_launch: early,
            step_program,
            greedy_program,
            sampled_program,
            prefill_program,
            prefill_last_program,
            addresses,
            _weights: weights_mem,
            _arena: arena,
            position: 0,
            logits: Vec::new(),
            row: PinnedRow::new(&ctx, vocab)?,
        })
    }

    /// Runs a program: its graph, or its launches one by one where it has none.
    fn run_program(&self, p: &Program) -> Result<(), RuntimeError> {
        match &p.graph {
            Graph::Captured(g) => g
                .launch()
                .map_err(|e| driver(&format!("replaying the {}", p.name), e)),
            Graph::Unavailable => p.launch_all(&self.stream, self.early_launch.get()),
        }
    }

    /// Starts a new document: state zeroed, position 0.
    pub fn reset(&mut self) -> Result<(), RuntimeError> {
        for (i, b) in self.plan.buffers.iter().enumerate() {
            if matches!(b.kind, GpuBufferKind::State(_)) {
                // SAFETY: the buffer holds b.bytes bytes.
                unsafe {
                    cu::memset_d8_async(
                        self.addresses[i],
                        0,
                        b.bytes as usize,
                        self.stream.cu_stream(),
                    )
                }
                .map_err(|e| driver("clearing state", e))?;
            }
        }
        self.position = 0;
        Ok(())
    }

    /// Runs one token: uploads its id and position, replays the step's graph (with `tail`,
    /// the one ending in the argmax or the sampler).
    fn run_step(&mut self, id: u32, tail: Tail) -> Result<(), RuntimeError> {
        self.upload_step(id)?;
        let program = match tail {
            Tail::Logits => &self.step_program,
            Tail::Argmax => &self.greedy_program,
            Tail::Sample => self
                .sampled_program
                .as_ref()
                .ok_or_else(|| RuntimeError::Plan("this plan has no device sampler".into()))?,
        };
        self.run_program(program)?;
        self.position += 1;
        Ok(())
    }

    /// The decode step's inputs: its token id and position.
    fn upload_step(&mut self, id: u32) -> Result<(), RuntimeError> {
        self.check_ids(&[id])?;
        let s = self.stream.cu_stream();
        // SAFETY: both buffers hold one i32.
        unsafe {
            cu::memcpy_htod_async(self.addresses[self.plan.ids], &[id], s).and_then(|_| {
                cu::memcpy_htod_async(self.addresses[self.plan.position], &[self.position], s)
            })
        }
        .map_err(|e| driver("uploading the token", e))
    }

    /// Runs `p` launch by launch (no graph, no early launches: an event between kernels
    /// orders them anyway) with a timing event before and after each; the device time of
    /// every launch, with its work counted for `tokens` tokens.
    fn timed(&self, p: &Program, tokens: u64) -> Result<Vec<LaunchTime>, RuntimeError> {
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let mut marks = Vec::new();
        for (i, l) in p.launches.iter().enumerate() {
            let start = self
                .stream
                .record_event(timing)
                .map_err(|e| driver("recording an event", e))?;
            p.launch(i, &self.stream, false)?;
            let end = self
                .stream
                .record_event(timing)
                .map_err(|e| driver("recording an event", e))?;
            marks.push((l, start, end));
        }
        self.stream
            .synchronize()
            .map_err(|e| driver(&format!("running the {}", p.name), e))?;
        marks
            .into_iter()
            .map(|(l, start, end)| {
                let (bytes, flops) = l.work.at(tokens);
                Ok(LaunchTime {
                    kernel: l.kernel.clone(),
                    grid: l.grid,
                    block: l.block,
                    ms: start
                        .elapsed_ms(&end)
                        .map_err(|e| driver("reading an event", e))?,
                    bytes,
                    flops,
                })
            })
            .collect()
    }

    /// One decode step for `id` as greedy generation runs it (the argmax last; with
    /// `sampled`, as sampled generation runs it: the sampler last, with the settings
    /// `start_sampling` gave), the position advancing as for `step`, timed launch by launch
    /// (`--profile`).
    pub fn profile_step(
        &mut self,
        id: u32,
        sampled: bool,
    ) -> Result<Vec<LaunchTime>, RuntimeError> {
        self.upload_step(id)?;
        let program = match (&self.sampled_program, sampled) {
            (Some(p), true) => p,
            _ => &self.greedy_program,
        };
        let times = self.timed(program, 1)?;
        self.position += 1;
        Ok(times)
    }

    /// One prefill chunk of `ids` as generation runs it (last row's logits only, where the
    /// plan has that variant), timed launch by launch; `None` without a prefill program.
    pub fn profile_prefill(
        &mut self,
        ids: &[u32],
    ) -> Result<Option<Vec<LaunchTime>>, RuntimeError> {
        if self.plan.prefill.is_none() {
            return Ok(None);
        }
        self.check_ids(ids)?;
        self.upload_chunk(ids)?;
        let times = self.timed(self.chunk_program(false)?, ids.len() as u64)?;
        self.position += ids.len() as u32;
        Ok(Some(times))
    }

    /// The prefill chunk's program: its last-row variant when only the last token's logits
    /// are wanted and the plan has one; an error for every row's logits from an executor made
    /// `for_generation`.
    fn chunk_program(&self, all_rows: bool) -> Result<&Program, RuntimeError> {
        match (&self.prefill_last_program, all_rows) {
            (Some(p), false) => Ok(p),
            _ => self.prefill_program.as_ref().ok_or_else(|| {
                RuntimeError::Plan(
                    "every row's logits: this GPU executor was made for generation (last rows only)"
                        .into(),
                )
            }),
        }
    }

    /// A prefill chunk's inputs (ids already checked): its ids, their count and the start
    /// position.
    fn upload_chunk(&mut self, ids: &[u32]) -> Result<(), RuntimeError> {
        let prefill = self.plan.prefill.as_ref().expect("plan has a prefill");
        if ids.len() > prefill.max_tokens as usize {
            return Err(RuntimeError::ChunkTooLong {
                tokens: ids.len(),
                max: prefill.max_tokens as u64,
            });
        }
        let s = self.stream.cu_stream();
        let n = ids.len() as u32;
        // SAFETY: the ids buffer holds max_tokens i32, count and position one each.
        unsafe {
            cu::memcpy_htod_async(self.addresses[prefill.ids], ids, s)
                .and_then(|_| cu::memcpy_htod_async(self.addresses[prefill.count], &[n], s))
                .and_then(|_| {
                    cu::memcpy_htod_async(self.addresses[self.plan.position], &[self.position], s)
                })
        }
        .map_err(|e| driver("uploading the prompt chunk", e))
    }

    /// One token whose logits nobody reads (a prompt's tokens before its last).
    pub fn advance(&mut self, id: u32) -> Result<(), RuntimeError> {
        self.run_step(id, Tail::Logits)
    }

    /// One token; its logits.
    pub fn step(&mut self, id: u32) -> Result<&[f32], RuntimeError> {
        self.run_step(id, Tail::Logits)?;
        self.read_rows(
            self.addresses[self.plan.logits],
            1,
            "running the decode step",
        )
    }

    /// Copies `rows` rows of logits from `at` back (one into the page-locked row, more into
    /// the pageable buffer) once the stream gets there; `what` names the work in an error.
    fn read_rows(&mut self, at: u64, rows: usize, what: &str) -> Result<&[f32], RuntimeError> {
        let s = self.stream.cu_stream();
        let out = if rows == 1 {
            self.row.as_mut_slice()
        } else {
            self.logits.resize(rows * self.plan.vocab(), 0.0);
            &mut self.logits[..]
        };
        // SAFETY: `at` holds `rows` rows of vocab f32 (a logits buffer of the plan).
        unsafe { cu::memcpy_dtoh_async(out, at, s) }
            .map_err(|e| driver("reading the logits", e))?;
        self.stream.synchronize().map_err(|e| driver(what, e))?;
        Ok(if rows == 1 {
            self.row.as_slice()
        } else {
            &self.logits
        })
    }

    /// One token; the greedy next id, chosen on the device (4 bytes copied back).
    pub fn step_greedy(&mut self, id: u32) -> Result<u32, RuntimeError> {
        self.run_step(id, Tail::Argmax)?;
        self.read_next_id()
    }

    /// Whether the plan has a device sampler (`start_sampling`, `step_sampled`).
    pub fn samples_on_device(&self) -> bool {
        self.sampled_program.is_some()
    }

    /// The plan's device sampler, or the error for a plan without one.
    fn sampler_plan(&self) -> Result<&GpuSample, RuntimeError> {
        self.plan
            .sample
            .as_ref()
            .ok_or_else(|| RuntimeError::Plan("this plan has no device sampler".into()))
    }

    /// Hands sampling to the device (`GpuSample::uploads`): from then on `step_sampled` draws
    /// what `sampler` would after `history`.
    pub fn start_sampling(
        &mut self,
        sampler: &Sampler,
        history: &[u32],
    ) -> Result<(), RuntimeError> {
        let sample = self.sampler_plan()?;
        let (at, bytes) = (
            self.addresses[sample.state],
            self.plan.buffers[sample.state].bytes,
        );
        for (offset, data) in sample.uploads(sampler, history, self.plan.vocab()) {
            if offset + data.len() as u64 > bytes {
                return Err(RuntimeError::Plan(
                    "the sampler's state buffer is smaller than its settings".into(),
                ));
            }
            // SAFETY: checked above to lie within the state buffer.
            unsafe { cu::memcpy_htod_async(at + offset, &data, self.stream.cu_stream()) }
                .map_err(|e| driver("uploading the sampler's settings", e))?;
        }
        Ok(())
    }

    /// One token; the next id drawn on the device (4 bytes copied back). With `generator`,
    /// also the device generator's state after the draw (8 bytes more, the same
    /// synchronisation), for a host sampler that must stay in step.
    pub fn step_sampled(
        &mut self,
        id: u32,
        generator: Option<&mut u64>,
    ) -> Result<u32, RuntimeError> {
        self.run_step(id, Tail::Sample)?;
        if let Some(state) = generator {
            let at = self.addresses[self.sampler_plan()?.state] + DEVICE_RNG_OFFSET;
            // SAFETY: the state buffer holds the generator's u64 at DEVICE_RNG_OFFSET.
            unsafe {
                cu::memcpy_dtoh_async(std::slice::from_mut(state), at, self.stream.cu_stream())
            }
            .map_err(|e| driver("reading the sampler's state", e))?;
        }
        self.read_next_id()
    }

    /// The next-id buffer, once the stream gets there.
    fn read_next_id(&mut self) -> Result<u32, RuntimeError> {
        let mut next = [0u32];
        let s = self.stream.cu_stream();
        // SAFETY: the next-id buffer holds one i32.
        unsafe { cu::memcpy_dtoh_async(&mut next, self.addresses[self.plan.next_id], s) }
            .map_err(|e| driver("reading the next id", e))?;
        self.stream
            .synchronize()
            .map_err(|e| driver("running the decode step", e))?;
        Ok(next[0])
    }

    pub fn vocab(&self) -> usize {
        self.plan.vocab()
    }

    /// At least one id, each within the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), RuntimeError> {
        crate::check_ids(ids, self.plan.vocab() as u64)
    }

    /// Runs `ids` (at most the plan's prefill chunk) as one prefill chunk; with `all_rows`,
    /// returns the logits of every token, else of the last only. Without a prefill program the
    /// tokens run as decode steps.
    pub fn prefill_chunk(&mut self, ids: &[u32], all_rows: bool) -> Result<&[f32], RuntimeError> {
        self.check_ids(ids)?;
        let vocab = self.plan.vocab();
        if self.plan.prefill.is_none() {
            let mut rows = Vec::new();
            let (&last, before) = ids.split_last().ok_or(RuntimeError::EmptyIds)?;
            for &id in before {
                if all_rows {
                    rows.extend_from_slice(self.step(id)?);
                } else {
                    self.advance(id)?;
                }
            }
            rows.extend_from_slice(self.step(last)?);
            self.logits = rows;
            return Ok(&self.logits);
        }
        let n = ids.len() as u32;
        self.upload_chunk(ids)?;
        let prefill = self.plan.prefill.as_ref().expect("checked above");
        let last_row = prefill.last_row.as_ref().filter(|_| !all_rows);
        self.run_program(self.chunk_program(all_rows)?)?;
        self.position += n;
        let (at, rows) = match last_row {
            Some(l) => (self.addresses[l.logits], 1),
            None if all_rows => (self.addresses[prefill.logits], ids.len()),
            None => (
                self.addresses[prefill.logits] + ((ids.len() - 1) * vocab * 4) as u64,
                1,
            ),
        };
        self.read_rows(at, rows, "running the prefill chunk")
    }

    /// Tokens per prefill chunk (1 without a prefill program).
    pub fn prefill_max_tokens(&self) -> usize {
        self.plan
            .prefill
            .as_ref()
            .map_or(1, |p| p.max_tokens as usize)
    }
}
