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
fn data_object(scratch: &Path, cc: &str, blobs: &[(&str, &[u8])]) -> Result<PathBuf, RunError> {
    let fail = |m: String| RunError::Backend(m);
    let mut asm = String::from(".section .rodata\n");
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
    // The tokenizer goes in too, so the executable takes --prompt and prints text.
    let tokenizer_path = model.checkpoint.dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.is_file() {
        std::fs::read(&tokenizer_path)
            .map_err(|e| fail(format!("cannot read {}: {e}", tokenizer_path.display())))?
    } else {
        Vec::new()
    };
    let empty = Vec::new();
    let blobs: [(&str, &[u8]); 3] = [
        ("griffin_plan", &plan_json),
        ("griffin_tokenizer", &tokenizer),
        (
            "griffin_embedded_weights",
            if embed_weights {
                &artifact.weights
            } else {
                &empty
            },
        ),
    ];

    std::fs::create_dir_all(out_dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", out_dir.display())))?;
    let executable = out_dir.join(name);
    let weights = out_dir.join(format!("{name}.weights"));
    let scratch = tempfile_dir(out_dir)?;
    let object = scratch.join("kernels.o");
    let result = (|| {
        let stage = progress::spinner("compiling", "kernels with LLVM");
        compile_object(&module, &opts.target_cpu, &object).map_err(|e| fail(e.to_string()))?;
        drop(stage);
        let stage = progress::spinner("linking", name.to_string());
        let linked = scratch.join(name);
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let data = data_object(&scratch, &cc, &blobs)?;
        let output = Command::new(&cc)
            .arg("-o")
            .arg(&linked)
            .arg(&object)
            .arg(&data)
            .arg(&runner)
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
            griffin_runtime::weights::write(
                &weights,
                &artifact.plan.weights_hash,
                &artifact.weights,
            )
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
        weights_bytes: artifact.weights.len() as u64,
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
