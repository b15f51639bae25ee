//! A stand-in for the CUDA driver: a shared library exporting the driver API's C functions
//! (the ones cudarc resolves), with kernels run by the PTX interpreter
//! (`griffin_backend_ptx::emu`) on host memory. Put where cudarc looks for `libcuda.so`
//! (`LD_LIBRARY_PATH`), it lets an executable built with `--target cuda` run end to end
//! without a GPU: module loading, allocation, uploads, launches with their parameter
//! marshalling, graph capture and replay, events, copies back. Tests run the golden cases
//! through it; the kernels alone are already checked by the interpreter, but the host side
//! (`griffin_runtime::cuda`) is only exercised this way.
//!
//! What it checks, as the driver would: calls before `cuInit`, unknown handles, copies
//! outside a live allocation, launches that are not one-dimensional or exceed 1024 threads,
//! kernel parameters counted by the module's signature, copies and synchronisation inside
//! a stream capture (refused: the runtime captures launches only), launching a graph on a
//! capturing stream, timing events created without timing, a programmatic dependent launch
//! (`cuLaunchKernelEx`) of a kernel with no `griddepcontrol.wait`. Fresh allocations are
//! filled with 0xFF bytes (f32 NaN), so reading memory nothing wrote shows in the results.
//! Launches run one after the other, so an early launch computes what a plain one does; the
//! interpreter itself refuses a kernel that writes, or reads what a kernel wrote, before its
//! wait.
//!
//! `EMUCUDA_FAIL_KERNEL=N` makes the Nth kernel run fail as a device fault would, and
//! `EMUCUDA_NO_PDL=1` refuses programmatic dependent launches, for tests of the runtime's
//! error and fallback paths; `EMUCUDA_SET_UP_FRONT=1` fails any allocation or graph capture
//! after the first kernel ran; `EMUCUDA_COMPUTE_CAPABILITY=M.N` reports another GPU generation
//! (9.0 otherwise); `EMUCUDA_MEMORY_BYTES=N` sizes the device's memory (141 GiB otherwise);
//! `EMUCUDA_CORRUPT_KERNEL=N` makes the Nth kernel leave a wrong value in its output.
//!
//! What it does not model: it is synchronous (every operation completes before its call
//! returns, so it cannot catch a missing stream synchronisation), has one device and one
//! context, and reports a kernel's failure at its launch rather than at the next
//! synchronisation. Event times are the interpreter's instruction count at 1 ns each: they
//! order kernels by work, they are not GPU timings.
//!
//! Every other symbol of the driver API (cudarc resolves all of them when it opens the
//! library) is exported by `stubs.rs` and answers `CUDA_ERROR_NOT_SUPPORTED` after naming
//! itself on stderr.

// The exported names are the driver API's; their safety contract is CUDA's.
#![allow(non_snake_case, clippy::missing_safety_doc)]

mod stubs;

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Mutex, MutexGuard};

use griffin_backend_ptx::emu;

type CUresult = c_uint;
type CUdeviceptr = u64;
type Handle = *mut c_void;

const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const NOT_INITIALIZED: CUresult = 3;
const INVALID_DEVICE: CUresult = 101;
const INVALID_PTX: CUresult = 218;
const INVALID_HANDLE: CUresult = 400;
const NOT_FOUND: CUresult = 500;
const LAUNCH_FAILED: CUresult = 719;
const NOT_SUPPORTED: CUresult = 801;
const CAPTURE_UNSUPPORTED: CUresult = 900;
const CAPTURE_INVALIDATED: CUresult = 901;

/// The memory the stand-in device reports unless told otherwise (an H200's, roughly).
const H200_MEMORY: usize = 141 << 30;
/// `CU_EVENT_DISABLE_TIMING`.
const EVENT_DISABLE_TIMING: c_uint = 2;

/// One recorded kernel launch: what a graph node holds.
#[derive(Clone)]
struct Launch {
    function: usize,
    grid: u32,
    block: u32,
    params: Vec<u64>,
}

#[derive(Default)]
struct Stream {
    /// Launches recorded since `cuStreamBeginCapture`; `None` when not capturing.
    capture: Option<Vec<Launch>>,
    /// An operation the capture could not take: `cuStreamEndCapture` then fails.
    invalidated: bool,
}

struct Function {
    module: usize,
    name: String,
    params: usize,
    /// Whether it has a `griddepcontrol.wait` (may be launched early).
    waits: bool,
}

struct Event {
    timing: bool,
    /// The fake clock (ms) when recorded.
    at: Option<f64>,
}

/// The fake device. Handles are 1-based indices into these tables (a destroyed entry is
/// `None`), cast to pointers.
#[derive(Default)]
struct Driver {
    initialised: bool,
    memory: emu::Memory,
    /// Live allocations: start address -> bytes.
    allocations: BTreeMap<u64, usize>,
    /// Live page-locked host allocations (`cuMemHostAlloc`): address -> bytes.
    host_allocations: BTreeMap<usize, usize>,
    modules: Vec<Option<emu::Module>>,
    functions: Vec<Function>,
    streams: Vec<Option<Stream>>,
    graphs: Vec<Option<Vec<Launch>>>,
    executables: Vec<Option<Vec<Launch>>>,
    events: Vec<Option<Event>>,
    /// Interpreted instructions so far, at 1 ns each (event times).
    clock_ms: f64,
    /// Kernels run so far (graph nodes included).
    kernels_run: u64,
    /// `EMUCUDA_FAIL_KERNEL=N`: the Nth kernel to run fails with `CUDA_ERROR_LAUNCH_FAILED`,
    /// silently, as a device fault would (tests of the runtime's error paths).
    fail_kernel: Option<u64>,
    /// `EMUCUDA_CORRUPT_KERNEL=N`: the Nth kernel to run leaves a wrong value (12345.0) in the
    /// first word of its last parameter, silently, as a miscompiled kernel would (tests that
    /// `griffin-gpu-probe --bisect` finds it).
    corrupt_kernel: Option<u64>,
    /// `EMUCUDA_NO_PDL=1`: programmatic dependent launches are refused.
    refuse_early_launch: bool,
    /// `EMUCUDA_SET_UP_FRONT=1`: device allocations (out of memory) and graph captures after
    /// the first kernel launch fail, for tests that memory is allocated and graphs are
    /// captured before any work (so neither falls inside a timed prompt or step).
    set_up_late_fails: bool,
    /// The device's memory: `EMUCUDA_MEMORY_BYTES`, else an H200's 141 GiB. Allocations past
    /// it fail (out of memory).
    memory_bytes: usize,
}

static DRIVER: Mutex<Option<Driver>> = Mutex::new(None);

fn driver() -> MutexGuard<'static, Option<Driver>> {
    DRIVER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on the initialised driver, or answers `CUDA_ERROR_NOT_INITIALIZED`.
fn with(f: impl FnOnce(&mut Driver) -> Result<(), CUresult>) -> CUresult {
    let mut d = driver();
    match d.as_mut() {
        Some(d) if d.initialised => match f(d) {
            Ok(()) => SUCCESS,
            Err(e) => e,
        },
        _ => NOT_INITIALIZED,
    }
}

fn handle(index: usize) -> Handle {
    (index + 1) as Handle
}

/// The live entry a handle names.
fn entry<T>(table: &mut [Option<T>], h: Handle) -> Result<&mut T, CUresult> {
    (h as usize)
        .checked_sub(1)
        .and_then(|i| table.get_mut(i))
        .and_then(Option::as_mut)
        .ok_or(INVALID_HANDLE)
}

fn destroy<T>(table: &mut [Option<T>], h: Handle) -> Result<(), CUresult> {
    let i = (h as usize).checked_sub(1).ok_or(INVALID_HANDLE)?;
    match table.get_mut(i) {
        Some(slot @ Some(_)) => {
            *slot = None;
            Ok(())
        }
        _ => Err(INVALID_HANDLE),
    }
}

fn put<T>(out: *mut T, value: T) -> Result<(), CUresult> {
    if out.is_null() {
        return Err(INVALID_VALUE);
    }
    // SAFETY: the caller passes a valid out-pointer, as the driver API requires.
    unsafe { out.write(value) };
    Ok(())
}

/// A failure the caller only sees as an error code: the interpreter's reason goes to stderr.
fn report(what: &str, e: impl std::fmt::Display) {
    eprintln!("emucuda: {what}: {e}");
}

impl Driver {
    /// Checks that `[at, at + bytes)` lies inside one live allocation.
    fn check_range(&self, at: u64, bytes: usize) -> Result<(), CUresult> {
        match self.allocations.range(..=at).next_back() {
            Some((&start, &len)) if at + bytes as u64 <= start + len as u64 => Ok(()),
            _ => Err(INVALID_VALUE),
        }
    }

    /// A copy between host and `bytes` bytes at `device`: not inside a capture, within a live
    /// allocation, to or from a host pointer that is not null.
    fn check_copy(
        &mut self,
        stream: Handle,
        device: CUdeviceptr,
        bytes: usize,
        host_null: bool,
    ) -> Result<(), CUresult> {
        self.not_while_capturing(stream)?;
        self.check_range(device, bytes)?;
        if host_null {
            return Err(INVALID_VALUE);
        }
        Ok(())
    }

    /// The stream a handle names; the null (legacy default) stream is index 0 (`cuInit`
    /// creates it).
    fn stream(&mut self, h: Handle) -> Result<&mut Stream, CUresult> {
        if h.is_null() {
            return self.streams[0].as_mut().ok_or(INVALID_HANDLE);
        }
        entry(&mut self.streams, h)
    }

    /// Refuses an operation a capture cannot take, invalidating the capture.
    fn not_while_capturing(&mut self, h: Handle) -> Result<(), CUresult> {
        let s = self.stream(h)?;
        if s.capture.is_some() {
            s.invalidated = true;
            return Err(CAPTURE_UNSUPPORTED);
        }
        Ok(())
    }

    /// Under `EMUCUDA_SET_UP_FRONT`, `what` (set-up work) once a kernel has run: named on
    /// stderr and refused with `error`.
    fn set_up_front(&self, call: &str, what: &str, error: CUresult) -> Result<(), CUresult> {
        if self.set_up_late_fails && self.kernels_run > 0 {
            report(call, format!("{what} after the first kernel ran"));
            return Err(error);
        }
        Ok(())
    }

    fn run(&mut self, l: &Launch) -> Result<(), CUresult> {
        self.kernels_run += 1;
        if self.fail_kernel == Some(self.kernels_run) {
            return Err(LAUNCH_FAILED);
        }
        let f = self.functions.get(l.function).ok_or(INVALID_HANDLE)?;
        let module = self
            .modules
            .get(f.module)
            .and_then(Option::as_ref)
            .ok_or(INVALID_HANDLE)?;
        let launch = emu::Launch {
            grid: l.grid,
            block: l.block,
            params: &l.params,
        };
        match emu::run(module, &f.name, &launch, &mut self.memory) {
            Ok(instructions) => {
                self.clock_ms += instructions as f64 * 1e-6;
                if self.corrupt_kernel == Some(self.kernels_run) {
                    // A wrong result where kernels put theirs: the first word of the last
                    // parameter.
                    let at = *l.params.last().ok_or(INVALID_VALUE)?;
                    let wrong = 12345.0f32.to_le_bytes();
                    self.memory
                        .write_bytes(at, &wrong)
                        .map_err(|_| INVALID_VALUE)?;
                }
                Ok(())
            }
            Err(e) => {
                report(&format!("kernel `{}` failed", f.name), e);
                Err(LAUNCH_FAILED)
            }
        }
    }
}

// --- Initialisation, device, context ---

#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 {
        return INVALID_VALUE;
    }
    let mut d = driver();
    let d = d.get_or_insert_with(Driver::default);
    if d.streams.is_empty() {
        // Index 0 is the legacy default stream.
        d.streams.push(Some(Stream::default()));
    }
    d.initialised = true;
    d.fail_kernel = std::env::var("EMUCUDA_FAIL_KERNEL")
        .ok()
        .and_then(|n| n.parse().ok());
    d.corrupt_kernel = std::env::var("EMUCUDA_CORRUPT_KERNEL")
        .ok()
        .and_then(|n| n.parse().ok());
    d.refuse_early_launch = std::env::var("EMUCUDA_NO_PDL").as_deref() == Ok("1");
    d.set_up_late_fails = std::env::var("EMUCUDA_SET_UP_FRONT").as_deref() == Ok("1");
    d.memory_bytes = std::env::var("EMUCUDA_MEMORY_BYTES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(H200_MEMORY);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    match put(version, 13000) {
        Ok(()) => SUCCESS,
        Err(e) => e,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    with(|_| put(count, 1))
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut c_int, ordinal: c_int) -> CUresult {
    with(|_| {
        if ordinal != 0 {
            return Err(INVALID_DEVICE);
        }
        put(device, 0)
    })
}

/// Attributes of an H100/H200 (SXM) where a program might ask; 0 for the rest.
/// `EMUCUDA_COMPUTE_CAPABILITY=M.N` pretends to be another GPU generation.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attribute: c_uint,
    dev: c_int,
) -> CUresult {
    with(|_| {
        if dev != 0 {
            return Err(INVALID_DEVICE);
        }
        let v = match attribute {
            1 => 1024,      // max threads per block
            2 | 3 => 1024,  // max block dim x, y
            4 => 64,        // max block dim z
            5 => i32::MAX,  // max grid dim x
            8 => 48 * 1024, // max shared memory per block
            10 => 32,       // warp size
            16 => 132,      // multiprocessors
            75 => compute_capability().0,
            76 => compute_capability().1,
            81 => 228 * 1024, // max shared memory per multiprocessor
            97 => 227 * 1024, // max shared memory per block, opt-in
            _ => 0,
        };
        put(value, v)
    })
}

/// The compute capability the stand-in reports: 9.0, or `EMUCUDA_COMPUTE_CAPABILITY`.
fn compute_capability() -> (c_int, c_int) {
    std::env::var("EMUCUDA_COMPUTE_CAPABILITY")
        .ok()
        .and_then(|v| {
            let (major, minor) = v.split_once('.')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .unwrap_or((9, 0))
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    with(|_| {
        if dev != 0 {
            return Err(INVALID_DEVICE);
        }
        let text = b"emucuda (PTX interpreter)\0";
        if name.is_null() || (len as usize) < text.len() {
            return Err(INVALID_VALUE);
        }
        // SAFETY: `name` holds `len` bytes, checked above.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr().cast(), name, text.len()) };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> CUresult {
    with(|d| {
        if dev != 0 {
            return Err(INVALID_DEVICE);
        }
        put(bytes, d.memory_bytes)
    })
}

/// The one context's handle.
const CONTEXT: Handle = 1 as Handle;

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Handle, dev: c_int) -> CUresult {
    with(|_| {
        if dev != 0 {
            return Err(INVALID_DEVICE);
        }
        put(ctx, CONTEXT)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: c_int) -> CUresult {
    with(|_| {
        if dev != 0 {
            Err(INVALID_DEVICE)
        } else {
            Ok(())
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: Handle) -> CUresult {
    with(|_| {
        if ctx.is_null() || ctx == CONTEXT {
            Ok(())
        } else {
            Err(INVALID_HANDLE)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut Handle) -> CUresult {
    with(|_| put(ctx, CONTEXT))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    with(|_| Ok(()))
}

// --- Modules ---

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut Handle, image: *const c_void) -> CUresult {
    with(|d| {
        if image.is_null() {
            return Err(INVALID_VALUE);
        }
        // SAFETY: a PTX image is a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(image.cast()) }
            .to_str()
            .map_err(|_| INVALID_PTX)?;
        let parsed = emu::Module::parse(text).map_err(|e| {
            report("loading the PTX module", e);
            INVALID_PTX
        })?;
        d.modules.push(Some(parsed));
        put(module, handle(d.modules.len() - 1))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(module: Handle) -> CUresult {
    with(|d| destroy(&mut d.modules, module))
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut Handle,
    module: Handle,
    name: *const c_char,
) -> CUresult {
    with(|d| {
        if name.is_null() {
            return Err(INVALID_VALUE);
        }
        // SAFETY: a NUL-terminated kernel name.
        let name = unsafe { CStr::from_ptr(name) }
            .to_str()
            .map_err(|_| NOT_FOUND)?;
        let index = (module as usize).checked_sub(1).ok_or(INVALID_HANDLE)?;
        let m = entry(&mut d.modules, module)?;
        let f = m.function_named(name).map_err(|_| NOT_FOUND)?;
        let (params, waits) = (f.param_count(), f.waits_for_earlier_kernels());
        d.functions.push(Function {
            module: index,
            name: name.to_string(),
            params,
            waits,
        });
        put(function, handle(d.functions.len() - 1))
    })
}

// --- Memory ---

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(ptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    with(|d| {
        if bytes == 0 {
            return Err(INVALID_VALUE);
        }
        d.set_up_front("cuMemAlloc", "an allocation", OUT_OF_MEMORY)?;
        let used: usize = d.allocations.values().sum();
        if used + bytes > d.memory_bytes {
            return Err(OUT_OF_MEMORY);
        }
        let at = d.memory.alloc(&vec![0xFF; bytes]);
        d.allocations.insert(at, bytes);
        put(ptr, at)
    })
}

/// Page-locked host memory: here plain host memory (copies into it work as into any host
/// buffer), allocated up front like device memory under `EMUCUDA_SET_UP_FRONT`.
#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    ptr: *mut *mut c_void,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    with(|d| {
        if bytes == 0 {
            return Err(INVALID_VALUE);
        }
        d.set_up_front("cuMemHostAlloc", "an allocation", OUT_OF_MEMORY)?;
        let layout = host_layout(bytes)?;
        // SAFETY: a layout of nonzero size.
        let at = unsafe { std::alloc::alloc_zeroed(layout) };
        if at.is_null() {
            return Err(OUT_OF_MEMORY);
        }
        d.host_allocations.insert(at as usize, bytes);
        put(ptr, at.cast())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(ptr: *mut c_void) -> CUresult {
    with(|d| {
        let bytes = d
            .host_allocations
            .remove(&(ptr as usize))
            .ok_or(INVALID_VALUE)?;
        // SAFETY: allocated by cuMemHostAlloc with this layout, freed once (removed above).
        unsafe { std::alloc::dealloc(ptr.cast(), host_layout(bytes)?) };
        Ok(())
    })
}

/// Page-aligned, as the driver's page-locked allocations are.
fn host_layout(bytes: usize) -> Result<std::alloc::Layout, CUresult> {
    std::alloc::Layout::from_size_align(bytes, 4096).map_err(|_| INVALID_VALUE)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(ptr: CUdeviceptr) -> CUresult {
    // The interpreter's memory only grows; a freed range is no longer valid to copy to.
    with(|d| d.allocations.remove(&ptr).map(|_| ()).ok_or(INVALID_VALUE))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    stream: Handle,
) -> CUresult {
    with(|d| {
        d.check_copy(stream, dst, bytes, src.is_null())?;
        // SAFETY: the caller's buffer holds `bytes` bytes.
        let data = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), bytes) };
        d.memory.write_bytes(dst, data).map_err(|_| INVALID_VALUE)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
) -> CUresult {
    // SAFETY: as the asynchronous copy, on the default stream.
    unsafe { cuMemcpyHtoDAsync_v2(dst, src, bytes, std::ptr::null_mut()) }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    stream: Handle,
) -> CUresult {
    with(|d| {
        d.check_copy(stream, src, bytes, dst.is_null())?;
        let data = d.memory.read(src, bytes).map_err(|_| INVALID_VALUE)?;
        // SAFETY: the caller's buffer holds `bytes` bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.cast::<u8>(), bytes) };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
) -> CUresult {
    // SAFETY: as the asynchronous copy, on the default stream.
    unsafe { cuMemcpyDtoHAsync_v2(dst, src, bytes, std::ptr::null_mut()) }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    value: u8,
    bytes: usize,
    stream: Handle,
) -> CUresult {
    with(|d| {
        d.not_while_capturing(stream)?;
        d.check_range(dst, bytes)?;
        d.memory
            .write_bytes(dst, &vec![value; bytes])
            .map_err(|_| INVALID_VALUE)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: u8, bytes: usize) -> CUresult {
    // SAFETY: as the asynchronous memset, on the default stream.
    unsafe { cuMemsetD8Async(dst, value, bytes, std::ptr::null_mut()) }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    with(|d| {
        let used: usize = d.allocations.values().sum();
        put(total, d.memory_bytes)?;
        put(free, d.memory_bytes.saturating_sub(used))
    })
}

// --- Streams and launches ---

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut Handle, _flags: c_uint) -> CUresult {
    with(|d| {
        d.streams.push(Some(Stream::default()));
        put(stream, handle(d.streams.len() - 1))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: Handle) -> CUresult {
    with(|d| {
        if stream.is_null() {
            return Err(INVALID_HANDLE);
        }
        destroy(&mut d.streams, stream)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(stream: Handle) -> CUresult {
    // Everything already ran; inside a capture this is an error, as on a GPU.
    with(|d| d.not_while_capturing(stream))
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(
    stream: Handle,
    event: Handle,
    _flags: c_uint,
) -> CUresult {
    with(|d| {
        entry(&mut d.events, event)?;
        d.stream(stream).map(|_| ())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(stream: Handle, _mode: c_uint) -> CUresult {
    with(|d| {
        if stream.is_null() {
            // The legacy default stream cannot be captured.
            return Err(CAPTURE_UNSUPPORTED);
        }
        d.set_up_front("cuStreamBeginCapture", "a graph capture", NOT_SUPPORTED)?;
        let s = d.stream(stream)?;
        if s.capture.is_some() {
            return Err(INVALID_VALUE);
        }
        s.capture = Some(Vec::new());
        s.invalidated = false;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(stream: Handle, graph: *mut Handle) -> CUresult {
    with(|d| {
        let s = d.stream(stream)?;
        let launches = s.capture.take().ok_or(INVALID_VALUE)?;
        if std::mem::take(&mut s.invalidated) {
            put(graph, std::ptr::null_mut())?;
            return Err(CAPTURE_INVALIDATED);
        }
        d.graphs.push(Some(launches));
        put(graph, handle(d.graphs.len() - 1))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(stream: Handle, status: *mut c_uint) -> CUresult {
    with(|d| {
        let s = d.stream(stream)?;
        let active = match (&s.capture, s.invalidated) {
            (None, _) => 0,
            (Some(_), false) => 1,
            (Some(_), true) => 2,
        };
        put(status, active)
    })
}

/// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`.
const ATTRIBUTE_PROGRAMMATIC: c_uint = 6;

/// `CUlaunchConfig`, as laid out in C.
#[repr(C)]
pub struct LaunchConfig {
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared_bytes: c_uint,
    stream: Handle,
    attributes: *const LaunchAttribute,
    attribute_count: c_uint,
}

/// `CUlaunchAttribute`: an id and a 64-byte value union (an int for the attribute modelled).
#[repr(C)]
pub struct LaunchAttribute {
    id: c_uint,
    pad: [u8; 4],
    value: [u8; 64],
}

/// A launch as `cuLaunchKernel` and `cuLaunchKernelEx` take it.
struct LaunchRequest {
    function: Handle,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared_bytes: c_uint,
    stream: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
    /// Programmatic dependent launch: the kernel may start before the one before it ends.
    early: bool,
}

/// Checks and runs (or, while its stream captures, records) a launch.
unsafe fn launch(d: &mut Driver, r: LaunchRequest) -> Result<(), CUresult> {
    let index = (r.function as usize).checked_sub(1).ok_or(INVALID_HANDLE)?;
    let f = d.functions.get(index).ok_or(INVALID_HANDLE)?;
    let what = format!("launching `{}`", f.name);
    if r.grid[1..] != [1, 1] || r.block[1..] != [1, 1] || !r.extra.is_null() {
        report(
            &what,
            "only one-dimensional launches with kernelParams are modelled",
        );
        return Err(NOT_SUPPORTED);
    }
    let (grid, block) = (r.grid[0], r.block[0]);
    if grid == 0 || block == 0 || block > 1024 || r.shared_bytes != 0 {
        report(
            &what,
            format!(
                "grid {grid}, block {block}, dynamic shared memory {}",
                r.shared_bytes
            ),
        );
        return Err(INVALID_VALUE);
    }
    if r.early {
        // A kernel that may start before the one before it ends must wait for it before
        // touching what it writes; one that never waits would race it on a GPU.
        if !f.waits {
            report(
                &what,
                "programmatic dependent launch of a kernel without griddepcontrol.wait",
            );
            return Err(INVALID_VALUE);
        }
    }
    if f.params > 0 && r.params.is_null() {
        return Err(INVALID_VALUE);
    }
    // As the driver does, the kernel's signature says how many parameters to read; every
    // parameter of this backend's kernels is a 64-bit device address.
    let values = (0..f.params)
        // SAFETY: `params` holds one pointer per kernel parameter, each to 8 bytes.
        .map(|i| unsafe { (*r.params.add(i)).cast::<u64>().read_unaligned() })
        .collect();
    let launch = Launch {
        function: index,
        grid,
        block,
        params: values,
    };
    let s = d.stream(r.stream)?;
    match &mut s.capture {
        Some(recorded) => {
            recorded.push(launch);
            Ok(())
        }
        // Launches run one after the other, so an early launch computes what a plain one
        // does; the interpreter checks that nothing before a kernel's wait depends on it.
        None => d.run(&launch),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    function: Handle,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    with(|d| {
        let r = LaunchRequest {
            function,
            grid: [grid_x, grid_y, grid_z],
            block: [block_x, block_y, block_z],
            shared_bytes,
            stream,
            params,
            extra,
            early: false,
        };
        // SAFETY: the caller's pointers, as the driver API requires them.
        unsafe { launch(d, r) }
    })
}

/// `EMUCUDA_NO_PDL=1` refuses programmatic dependent launch, as a driver or GPU without it
/// would (tests of the runtime's fallback).
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const LaunchConfig,
    function: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    with(|d| {
        // SAFETY: the caller passes a valid config, and `attribute_count` attributes.
        let c = unsafe { config.as_ref() }.ok_or(INVALID_VALUE)?;
        let attributes = if c.attribute_count == 0 {
            &[][..]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(c.attributes, c.attribute_count as usize) }
        };
        let mut early = false;
        for a in attributes {
            if a.id != ATTRIBUTE_PROGRAMMATIC {
                report(
                    "cuLaunchKernelEx",
                    format!("launch attribute {} is not modelled", a.id),
                );
                return Err(NOT_SUPPORTED);
            }
            if d.refuse_early_launch {
                return Err(NOT_SUPPORTED);
            }
            early = i32::from_ne_bytes([a.value[0], a.value[1], a.value[2], a.value[3]]) != 0;
        }
        let r = LaunchRequest {
            function,
            grid: c.grid,
            block: c.block,
            shared_bytes: c.shared_bytes,
            stream: c.stream,
            params,
            extra,
            early,
        };
        // SAFETY: the caller's pointers, as the driver API requires them.
        unsafe { launch(d, r) }
    })
}

// --- Graphs ---

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut Handle,
    graph: Handle,
    _flags: u64,
) -> CUresult {
    with(|d| {
        let launches = entry(&mut d.graphs, graph)?.clone();
        d.executables.push(Some(launches));
        put(exec, handle(d.executables.len() - 1))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: Handle, stream: Handle) -> CUresult {
    with(|d| {
        let launches = entry(&mut d.executables, exec)?.clone();
        if d.stream(stream)?.capture.is_some() {
            return Err(NOT_SUPPORTED);
        }
        launches.iter().try_for_each(|l| d.run(l))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: Handle) -> CUresult {
    with(|d| destroy(&mut d.executables, exec))
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(graph: Handle) -> CUresult {
    with(|d| destroy(&mut d.graphs, graph))
}

// --- Events ---

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(event: *mut Handle, flags: c_uint) -> CUresult {
    with(|d| {
        d.events.push(Some(Event {
            timing: flags & EVENT_DISABLE_TIMING == 0,
            at: None,
        }));
        put(event, handle(d.events.len() - 1))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(event: Handle, stream: Handle) -> CUresult {
    with(|d| {
        d.not_while_capturing(stream)?;
        let now = d.clock_ms;
        entry(&mut d.events, event)?.at = Some(now);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(event: Handle) -> CUresult {
    with(|d| entry(&mut d.events, event).map(|_| ()))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(event: Handle) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuEventSynchronize(event) }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: Handle,
    end: Handle,
) -> CUresult {
    with(|d| {
        let at = |d: &mut Driver, h| -> Result<f64, CUresult> {
            let e = entry(&mut d.events, h)?;
            if !e.timing {
                return Err(INVALID_HANDLE);
            }
            e.at.ok_or(INVALID_HANDLE)
        };
        let (a, b) = (at(d, start)?, at(d, end)?);
        put(ms, (b - a) as f32)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: Handle, end: Handle) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuEventElapsedTime_v2(ms, start, end) }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(event: Handle) -> CUresult {
    with(|d| destroy(&mut d.events, event))
}

// --- Errors ---

fn error_text(code: CUresult) -> Option<(&'static CStr, &'static CStr)> {
    Some(match code {
        SUCCESS => (c"CUDA_SUCCESS", c"no error"),
        INVALID_VALUE => (c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
        OUT_OF_MEMORY => (c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
        NOT_INITIALIZED => (c"CUDA_ERROR_NOT_INITIALIZED", c"initialization error"),
        INVALID_DEVICE => (c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
        INVALID_PTX => (c"CUDA_ERROR_INVALID_PTX", c"a PTX JIT compilation failed"),
        INVALID_HANDLE => (c"CUDA_ERROR_INVALID_HANDLE", c"invalid resource handle"),
        NOT_FOUND => (c"CUDA_ERROR_NOT_FOUND", c"named symbol not found"),
        LAUNCH_FAILED => (c"CUDA_ERROR_LAUNCH_FAILED", c"unspecified launch failure"),
        NOT_SUPPORTED => (c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
        CAPTURE_UNSUPPORTED => (
            c"CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
            c"operation not permitted when stream is capturing",
        ),
        CAPTURE_INVALIDATED => (
            c"CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
            c"operation failed due to a previous error during capture",
        ),
        _ => return None,
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: CUresult, text: *mut *const c_char) -> CUresult {
    match error_text(code) {
        Some((name, _)) => put(text, name.as_ptr()).err().unwrap_or(SUCCESS),
        None => INVALID_VALUE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: CUresult, text: *mut *const c_char) -> CUresult {
    match error_text(code) {
        Some((_, message)) => put(text, message.as_ptr()).err().unwrap_or(SUCCESS),
        None => INVALID_VALUE,
    }
}
