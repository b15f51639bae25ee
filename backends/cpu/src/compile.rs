//! LLVM: parse the generated module, optimise it for the target, emit an object file or load
//! it in process.

use std::path::Path;

use inkwell::context::Context;
use inkwell::execution_engine::ExecutionEngine;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine,
};
use inkwell::OptimizationLevel;

use crate::kernels::linear::Tile;
use crate::BackendError;

/// Which CPU to generate code for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetCpu {
    /// The machine griffinc runs on (all its vector extensions).
    Host,
    /// Portable x86-64 (SSE2 only), for executables that must run anywhere.
    Baseline,
    /// An LLVM CPU name, e.g. `skylake`, `znver3`.
    Named(String),
}

impl TargetCpu {
    pub fn parse(s: &str) -> TargetCpu {
        match s {
            "native" | "host" => TargetCpu::Host,
            "baseline" | "x86-64" => TargetCpu::Baseline,
            other => TargetCpu::Named(other.to_string()),
        }
    }
}

/// LLVM CPU names with AVX-512 (32 vector registers of 512 bits).
const AVX512_CPUS: &[&str] = &[
    "skylake-avx512",
    "cascadelake",
    "cooperlake",
    "cannonlake",
    "icelake-client",
    "icelake-server",
    "tigerlake",
    "rocketlake",
    "sapphirerapids",
    "emeraldrapids",
    "graniterapids",
    "graniterapids-d",
    "znver4",
    "znver5",
    "x86-64-v4",
];

impl TargetCpu {
    /// The projection kernel's register tile for this target's vector registers: a named CPU
    /// is judged by name (LLVM does not report a named CPU's features), an unknown name as
    /// AVX2.
    pub fn tile(&self) -> Tile {
        let (name, features) = self.name_and_features();
        let has = |f: &str| features.split(',').any(|x| x == f);
        match self {
            TargetCpu::Baseline => Tile::BASELINE,
            TargetCpu::Host if has("+avx512f") => Tile::WIDE,
            TargetCpu::Host if has("+avx2") => Tile::NARROW,
            TargetCpu::Host => Tile::BASELINE,
            TargetCpu::Named(_) if AVX512_CPUS.contains(&name.as_str()) => Tile::WIDE,
            TargetCpu::Named(_) => Tile::NARROW,
        }
    }

    /// The LLVM CPU name and feature string.
    fn name_and_features(&self) -> (String, String) {
        match self {
            TargetCpu::Host => (
                TargetMachine::get_host_cpu_name().to_string(),
                TargetMachine::get_host_cpu_features().to_string(),
            ),
            TargetCpu::Baseline => ("x86-64".to_string(), String::new()),
            TargetCpu::Named(n) => (n.clone(), String::new()),
        }
    }
}

fn machine(cpu: &TargetCpu, reloc: RelocMode) -> Result<TargetMachine, BackendError> {
    Target::initialize_native(&InitializationConfig::default()).map_err(BackendError::Llvm)?;
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(|e| BackendError::Llvm(e.to_string()))?;
    let (name, features) = cpu.name_and_features();
    target
        .create_target_machine(
            &triple,
            &name,
            &features,
            OptimizationLevel::Aggressive,
            reloc,
            CodeModel::Default,
        )
        .ok_or_else(|| BackendError::Llvm(format!("no target machine for {triple:?} / {name}")))
}

/// The CPU name and features for `cpu`, recorded on every function so that any code generator
/// (object emission or the in-process JIT) targets the same vector extensions.
fn cpu_attributes(cpu: &TargetCpu) -> String {
    let (name, features) = cpu.name_and_features();
    format!("attributes #0 = {{ nounwind \"target-cpu\"=\"{name}\" \"target-features\"=\"{features}\" }}")
}

fn parse<'c>(context: &'c Context, ir: &str, cpu: &TargetCpu) -> Result<Module<'c>, BackendError> {
    let ir = ir.replace(crate::ll::ATTRIBUTES.trim_end(), &cpu_attributes(cpu));
    let buffer = MemoryBuffer::create_from_memory_range_copy(ir.as_bytes(), "griffin_kernels");
    let module = context
        .create_module_from_ir(buffer)
        .map_err(|e| BackendError::Llvm(format!("generated IR does not parse: {e}")))?;
    module
        .verify()
        .map_err(|e| BackendError::Llvm(format!("generated IR does not verify: {e}")))?;
    Ok(module)
}

fn optimise(module: &Module, machine: &TargetMachine) -> Result<(), BackendError> {
    module.set_triple(&machine.get_triple());
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    let options = PassBuilderOptions::create();
    options.set_loop_vectorization(true);
    options.set_loop_slp_vectorization(true);
    options.set_loop_unrolling(true);
    module
        .run_passes("default<O3>", machine, options)
        .map_err(|e| BackendError::Llvm(e.to_string()))
}

/// The optimised module as LLVM IR text (for inspection).
pub fn optimised_ir(ir: &str, cpu: &TargetCpu) -> Result<String, BackendError> {
    let context = Context::create();
    let module = parse(&context, ir, cpu)?;
    let machine = machine(cpu, RelocMode::PIC)?;
    optimise(&module, &machine)?;
    Ok(module.print_to_string().to_string())
}

/// Compiles the module to a relocatable object file.
pub fn compile_object(ir: &str, cpu: &TargetCpu, path: &Path) -> Result<(), BackendError> {
    let context = Context::create();
    let module = parse(&context, ir, cpu)?;
    let machine = machine(cpu, RelocMode::PIC)?;
    optimise(&module, &machine)?;
    machine
        .write_to_file(&module, FileType::Object, path)
        .map_err(|e| BackendError::Llvm(e.to_string()))
}

/// Compiles the module to a position-independent object in memory.
pub fn compile_object_bytes(ir: &str, cpu: &TargetCpu) -> Result<Vec<u8>, BackendError> {
    let context = Context::create();
    let module = parse(&context, ir, cpu)?;
    let machine = machine(cpu, RelocMode::PIC)?;
    optimise(&module, &machine)?;
    let buffer = machine
        .write_to_memory_buffer(&module, FileType::Object)
        .map_err(|e| BackendError::Llvm(e.to_string()))?;
    Ok(buffer.as_slice().to_vec())
}

/// Kernels compiled and loaded into this process.
pub struct Jit {
    engine: ExecutionEngine<'static>,
}

// SAFETY: after construction the engine is only asked for function addresses, which is
// read-only; the compiled code itself is immutable.
unsafe impl Send for Jit {}

impl Jit {
    /// Optimises the module for `cpu` and compiles it in memory. The LLVM context is leaked:
    /// the code it owns lives as long as the process may call it.
    pub fn new(ir: &str, cpu: &TargetCpu) -> Result<Jit, BackendError> {
        let context: &'static Context = Box::leak(Box::new(Context::create()));
        let module = parse(context, ir, cpu)?;
        let machine = machine(cpu, RelocMode::Default)?;
        optimise(&module, &machine)?;
        let engine = module
            .create_jit_execution_engine(OptimizationLevel::Aggressive)
            .map_err(|e| BackendError::Llvm(e.to_string()))?;
        Ok(Jit { engine })
    }

    /// The address of a kernel, as the runtime calls it.
    pub fn kernel(&self, symbol: &str) -> Option<griffin_runtime::KernelFn> {
        let address = self.engine.get_function_address(symbol).ok()?;
        // SAFETY: every kernel is generated with the runtime's `KernelFn` signature.
        Some(unsafe { std::mem::transmute::<usize, griffin_runtime::KernelFn>(address) })
    }
}
