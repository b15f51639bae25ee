//! `griffinc build --target cpu`: a standalone executable. The generated kernels, a table of
//! them in launch order and the plan go into one object file, linked by the system C compiler
//! with the runner (`libgriffin_runner.a`); the packed weights go beside it in `<name>.weights`.

use std::path::{Path, PathBuf};
use std::process::Command;

use griffin_backend_cpu::compile_object;

use crate::cpu::{build, CpuOptions};
use crate::error::RunError;
use crate::progress;
use crate::session::Model;

const RUNNER: &str = "libgriffin_runner.a";

/// Where the runner library is: `$GRIFFIN_RUNNER_LIB`, else beside this program (cargo puts
/// `target/<profile>/libgriffin_runner.a` next to `griffinc`; tests run from `deps/`).
pub fn runner_library() -> Result<PathBuf, RunError> {
    if let Some(p) = std::env::var_os("GRIFFIN_RUNNER_LIB") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(RunError::Backend(format!(
                "GRIFFIN_RUNNER_LIB={}: no such file",
                p.display()
            )));
        }
        return Ok(p);
    }
    let exe = std::env::current_exe()
        .map_err(|e| RunError::Backend(format!("cannot locate griffinc: {e}")))?;
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(RUNNER))
        .collect::<Vec<_>>();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        RunError::Backend(format!(
            "{RUNNER} not found beside griffinc (looked in {}): build it with `cargo build -p griffin-runner` \
             (same profile as griffinc) or set GRIFFIN_RUNNER_LIB",
            candidates[0].parent().map_or_else(String::new, |p| p.display().to_string())
        ))
    })
}

/// An object holding each blob as `NAME` (64-byte aligned bytes) and `NAME_len` (u64), put in
/// by the assembler's `.incbin`: large blobs (weights, a real tokenizer) are never copied
/// through text.
fn data_object(
    scratch: &Path,
    cc: &str,
    blobs: &[(&str, &[u8])],
    extra: &str,
) -> Result<PathBuf, RunError> {
    let fail = |m: String| RunError::Backend(m);
    let mut asm = String::from(".section .rodata\n");
    asm.push_str(extra);
    for (name, bytes) in blobs {
        // Relative to the scratch folder the assembler runs in: no quoting of user paths.
        let file = format!("{name}.bin");
        std::fs::write(scratch.join(&file), bytes)
            .map_err(|e| fail(format!("cannot write {file}: {e}")))?;
        asm.push_str(&format!(
            ".balign 64\n.globl {name}\n{name}:\n.incbin \"{file}\"\n.balign 8\n.globl {name}_len\n{name}_len:\n.quad {}\n",
            bytes.len()
        ));
    }
    asm.push_str(".section .note.GNU-stack,\"\",@progbits\n");
    let source = scratch.join("data.S");
    std::fs::write(&source, asm).map_err(|e| fail(e.to_string()))?;
    let object = scratch.join("data.o");
    let output = Command::new(cc)
        .current_dir(scratch)
        .args(["-c", "data.S", "-o", "data.o"])
        .output()
        .map_err(|e| fail(format!("cannot run the system assembler `{cc}`: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(fail(format!(
            "assembling the executable's data failed: {}",
            stderr.lines().next().unwrap_or("")
        )));
    }
    Ok(object)
}

/// What `build_executable` wrote.
pub struct Built {
    pub executable: PathBuf,
    /// The weights file, unless the weights are embedded.
    pub weights: Option<PathBuf>,
    pub weights_bytes: u64,
}

/// What goes into an executable besides the runner library.
struct Parts<'a> {
    /// The kernels' LLVM module (CPU builds), compiled to an object.
    llvm_module: Option<(&'a str, &'a CpuOptions)>,
    /// Assembly defining further symbols (the empty kernel table of GPU builds).
    extra_asm: &'a str,
    blobs: Vec<(&'a str, &'a [u8])>,
    weights_hash: &'a str,
    weights: &'a [u8],
}

/// The model folder's tokenizer.json, if it has one (it goes into the executable so it takes
/// --prompt and prints text).
fn tokenizer_bytes(model: &Model) -> Result<Vec<u8>, RunError> {
    let path = model.checkpoint.dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    std::fs::read(&path)
        .map_err(|e| RunError::Backend(format!("cannot read {}: {e}", path.display())))
}

/// Builds `out_dir/name` and, unless `embed_weights`, `out_dir/name.weights`. Nothing is left
/// behind on failure.
pub fn build_executable(
    model: &Model,
    opts: &CpuOptions,
    out_dir: &Path,
    name: &str,
    embed_weights: bool,
) -> Result<Built, RunError> {
    let fail = |m: String| RunError::Backend(m);
    let runner = runner_library()?;
    let artifact = build(model, opts)?;
    let plan_json = serde_json::to_vec(&artifact.plan).map_err(|e| fail(e.to_string()))?;
    let mut module = artifact.lowered.module.clone();
    let table: Vec<String> = artifact
        .plan
        .launches
        .iter()
        .map(|l| format!("ptr @{}", l.kernel))
        .collect();
    module.push_str(&format!(
        "\n@griffin_kernel_table = constant [{k} x ptr] [{}]\n@griffin_kernel_count = constant i64 {k}\n",
        table.join(", "),
        k = table.len()
    ));
    let tokenizer = tokenizer_bytes(model)?;
    let parts = Parts {
        llvm_module: Some((&module, opts)),
        extra_asm: "",
        blobs: vec![
            ("griffin_plan", &plan_json),
            ("griffin_tokenizer", &tokenizer),
            ("griffin_gpu_plan", &[]),
            ("griffin_ptx", &[]),
        ],
        weights_hash: &artifact.plan.weights_hash,
        weights: &artifact.weights,
    };
    link(&runner, out_dir, name, embed_weights, parts)
}

/// `griffinc build --target cuda`: the GPU plan and PTX module go into the executable, which
/// loads them through the CUDA driver at start. No LLVM is involved. With `emit_ptx`, each
/// kernel's PTX and the whole module are also written to that folder.
pub fn build_cuda_executable(
    model: &Model,
    opts: &crate::gpu::GpuOptions,
    out_dir: &Path,
    name: &str,
    embed_weights: bool,
    emit_ptx: Option<&Path>,
) -> Result<Built, RunError> {
    let fail = |m: String| RunError::Backend(m);
    let runner = runner_library()?;
    let stage = progress::spinner("lowering", "the decode and prefill graphs to PTX kernels");
    let mut program = crate::gpu::lower(model, opts)?;
    drop(stage);
    let stage = progress::spinner("packing", "weights");
    let weights = crate::gpu::pack_weights(&mut program, model)?;
    drop(stage);
    // What the executable will allocate on the device (`-v`), besides the weights.
    let (_, arena) = program.plan.arena_layout(false);
    let (_, arena_all_rows) = program.plan.arena_layout(true);
    tracing::info!(
        kernels = program.ptx.matches(".entry ").count(),
        decode_launches = program.plan.launches.len(),
        prefill_launches = program
            .plan
            .prefill
            .as_ref()
            .map_or(0, |p| p.launches.len()),
        prefill_tokens = program.plan.prefill.as_ref().map_or(0, |p| p.max_tokens),
        weight_bytes = weights.len(),
        arena_bytes = arena,
        every_row_logits_bytes = arena_all_rows - arena,
        "GPU plan"
    );
    if let Some(dir) = emit_ptx {
        write_ptx(dir, &program)?;
    }
    let plan = &program.plan;
    let weights_plan = serde_json::to_vec(&plan.weights).map_err(|e| fail(e.to_string()))?;
    let gpu_plan = serde_json::to_vec(plan).map_err(|e| fail(e.to_string()))?;
    let tokenizer = tokenizer_bytes(model)?;
    let parts = Parts {
        llvm_module: None,
        extra_asm: ".balign 8\n.globl griffin_kernel_table\ngriffin_kernel_table:\n.globl griffin_kernel_count\ngriffin_kernel_count:\n.quad 0\n",
        blobs: vec![
            ("griffin_plan", &weights_plan),
            ("griffin_tokenizer", &tokenizer),
            ("griffin_gpu_plan", &gpu_plan),
            ("griffin_ptx", program.ptx.as_bytes()),
        ],
        weights_hash: &plan.weights.weights_hash,
        weights: &weights,
    };
    link(&runner, out_dir, name, embed_weights, parts)
}

/// Writes `module.ptx` and one `KERNEL.ptx` per kernel into `dir`.
pub fn write_ptx(dir: &Path, program: &crate::gpu::GpuProgram) -> Result<(), RunError> {
    let fail = |p: &Path, e: std::io::Error| {
        RunError::Backend(format!("--emit-ptx: cannot write {}: {e}", p.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
    let module = dir.join("module.ptx");
    std::fs::write(&module, &program.ptx).map_err(|e| fail(&module, e))?;
    for (name, ptx) in &program.kernels {
        let path = dir.join(format!("{name}.ptx"));
        let text = griffin_backend_ptx::module(std::slice::from_ref(ptx));
        std::fs::write(&path, text).map_err(|e| fail(&path, e))?;
    }
    Ok(())
}

fn link(
    runner: &Path,
    out_dir: &Path,
    name: &str,
    embed_weights: bool,
    parts: Parts,
) -> Result<Built, RunError> {
    let fail = |m: String| RunError::Backend(m);
    let mut blobs = parts.blobs.clone();
    blobs.push((
        "griffin_embedded_weights",
        if embed_weights { parts.weights } else { &[] },
    ));

    std::fs::create_dir_all(out_dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", out_dir.display())))?;
    let executable = out_dir.join(name);
    let weights = out_dir.join(format!("{name}.weights"));
    let scratch = tempfile_dir(out_dir)?;
    let result = (|| {
        let mut objects = Vec::new();
        if let Some((module, opts)) = parts.llvm_module {
            let object = scratch.join("kernels.o");
            let stage = progress::spinner("compiling", "kernels with LLVM");
            compile_object(module, &opts.target_cpu, &object).map_err(|e| fail(e.to_string()))?;
            drop(stage);
            objects.push(object);
        }
        let stage = progress::spinner("linking", name.to_string());
        let linked = scratch.join(name);
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        objects.push(data_object(&scratch, &cc, &blobs, parts.extra_asm)?);
        let output = Command::new(&cc)
            .arg("-o")
            .arg(&linked)
            .args(&objects)
            .arg(runner)
            .args(["-static-libgcc", "-lm", "-lpthread", "-ldl"])
            .output()
            .map_err(|e| fail(format!("cannot run the system linker `cc`: {e}")))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(fail(format!(
                "linking failed: {}",
                stderr.lines().take(3).collect::<Vec<_>>().join(" ")
            )));
        }
        drop(stage);
        if !embed_weights {
            let _stage = progress::spinner("writing", weights.display().to_string());
            griffin_runtime::weights::write(&weights, parts.weights_hash, parts.weights)
                .map_err(|e| fail(e.to_string()))?;
        }
        std::fs::rename(&linked, &executable)
            .map_err(|e| fail(format!("cannot write {}: {e}", executable.display())))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    if let Err(e) = result {
        if !embed_weights {
            let _ = std::fs::remove_file(&weights);
        }
        return Err(e);
    }
    Ok(Built {
        executable,
        weights: (!embed_weights).then_some(weights),
        weights_bytes: parts.weights.len() as u64,
    })
}

/// A fresh scratch folder inside `dir` (so the final renames stay on one file system).
fn tempfile_dir(dir: &Path) -> Result<PathBuf, RunError> {
    for attempt in 0..100 {
        let p = dir.join(format!(".griffinc-build-{}-{attempt}", std::process::id()));
        if std::fs::create_dir(&p).is_ok() {
            return Ok(p);
        }
    }
    Err(RunError::Backend(format!(
        "cannot create a scratch folder in {}",
        dir.display()
    )))
}
