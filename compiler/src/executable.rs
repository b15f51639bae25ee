//! `griffinc build --target cpu`: a standalone executable. The generated kernels, a table of
//! them in launch order and the plan go into one object file, linked by the system C compiler
//! with the runner (`libgriffin_runner.a`); the packed weights go beside it in `<name>.weights`.

use std::path::{Path, PathBuf};
use std::process::Command;

use griffin_backend_cpu::compile_object;

use crate::cpu::{build, CpuOptions};
use crate::error::RunError;
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

/// LLVM IR for a constant byte string.
fn byte_string(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 8);
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\{b:02X}"));
        }
    }
    s
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
    module.push_str(&format!(
        "\n@griffin_plan = constant [{n} x i8] c\"{text}\"\n@griffin_plan_len = constant i64 {n}\n",
        n = plan_json.len(),
        text = byte_string(&plan_json)
    ));
    let table: Vec<String> = artifact
        .plan
        .launches
        .iter()
        .map(|l| format!("ptr @{}", l.kernel))
        .collect();
    module.push_str(&format!(
        "@griffin_kernel_table = constant [{k} x ptr] [{}]\n@griffin_kernel_count = constant i64 {k}\n",
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
    module.push_str(&format!(
        "@griffin_tokenizer = constant [{n} x i8] c\"{text}\"\n@griffin_tokenizer_len = constant i64 {n}\n",
        n = tokenizer.len(),
        text = byte_string(&tokenizer)
    ));
    if !embed_weights {
        module.push_str(
            "@griffin_embedded_weights = constant [0 x i8] zeroinitializer\n@griffin_embedded_weights_len = constant i64 0\n",
        );
    }

    std::fs::create_dir_all(out_dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", out_dir.display())))?;
    let executable = out_dir.join(name);
    let weights = out_dir.join(format!("{name}.weights"));
    let scratch = tempfile_dir(out_dir)?;
    let object = scratch.join("kernels.o");
    let result = (|| {
        compile_object(&module, &opts.target_cpu, &object).map_err(|e| fail(e.to_string()))?;
        let linked = scratch.join(name);
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let mut objects = vec![object.clone()];
        if embed_weights {
            // The weights go in as raw bytes through the assembler's .incbin: no text copy.
            let data = scratch.join("weights.bin");
            std::fs::write(&data, &artifact.weights)
                .map_err(|e| fail(format!("cannot write {}: {e}", data.display())))?;
            let asm = scratch.join("weights.S");
            let source = format!(
                ".section .rodata\n.balign 64\n.globl griffin_embedded_weights\ngriffin_embedded_weights:\n.incbin \"{}\"\n\
                 .balign 8\n.globl griffin_embedded_weights_len\ngriffin_embedded_weights_len:\n.quad {}\n\
                 .section .note.GNU-stack,\"\",@progbits\n",
                data.display(),
                artifact.weights.len()
            );
            std::fs::write(&asm, source).map_err(|e| fail(e.to_string()))?;
            let weights_object = scratch.join("weights.o");
            let status = Command::new(&cc)
                .arg("-c")
                .arg(&asm)
                .arg("-o")
                .arg(&weights_object)
                .status()
                .map_err(|e| fail(format!("cannot run the system assembler `{cc}`: {e}")))?;
            if !status.success() {
                return Err(fail("assembling the embedded weights failed".into()));
            }
            objects.push(weights_object);
        }
        let output = Command::new(&cc)
            .arg("-o")
            .arg(&linked)
            .args(&objects)
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
        if !embed_weights {
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
