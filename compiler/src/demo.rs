//! `griffinc demo`: compile a model into an executable and run it on a prompt. With no model
//! folder it uses the small demo model compiled into griffinc itself (examples/demo-model: a
//! 2.3M-parameter Griffin trained on the King James Bible by scripts/train_demo_model.py), so a
//! fresh machine sees a compiled Griffin model write text with no download.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpu::CpuOptions;
use crate::error::RunError;
use crate::executable::build_executable;
use crate::session::Model;

/// The demo model's files, as committed in examples/demo-model.
pub const DEMO_FILES: [(&str, &[u8]); 3] = [
    (
        "config.json",
        include_bytes!("../../examples/demo-model/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../examples/demo-model/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../examples/demo-model/tokenizer.json"),
    ),
];

/// Writes the embedded demo model into `dir` (created if missing).
pub fn write_demo_model(dir: &Path) -> Result<(), RunError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| RunError::Backend(format!("cannot create {}: {e}", dir.display())))?;
    for (name, bytes) in DEMO_FILES {
        let path = dir.join(name);
        std::fs::write(&path, bytes)
            .map_err(|e| RunError::Backend(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

/// How the demo samples: enough randomness to read like text rather than loop, fixed by a
/// seed so the same command prints the same text.
pub const DEMO_SAMPLING: [&str; 8] = [
    "--temperature",
    "0.8",
    "--top-p",
    "0.95",
    "--repetition-penalty",
    "1.1",
    "--seed",
    "1",
];

/// What `run_demo` does.
pub struct DemoRequest<'a> {
    /// The checkpoint folder; `None` for the embedded demo model.
    pub model_dir: Option<&'a Path>,
    /// Where the executable (and, for the embedded model, its checkpoint) go.
    pub out_dir: &'a Path,
    pub prompt: &'a str,
    pub max_new_tokens: usize,
    pub options: &'a CpuOptions,
}

/// Builds `out_dir/griffin-demo` from the model and runs it on the prompt, its output going
/// straight to this process's stdout and stderr. Returns the executable's path.
pub fn run_demo(req: &DemoRequest) -> Result<PathBuf, RunError> {
    let fail = RunError::Backend;
    let model_dir = match req.model_dir {
        Some(dir) => dir.to_path_buf(),
        None => {
            let dir = req.out_dir.join("demo-model");
            write_demo_model(&dir)?;
            dir
        }
    };
    let model = Model::load(&model_dir).map_err(|e| {
        fail(format!(
            "cannot load model from {}: {e}",
            model_dir.display()
        ))
    })?;
    let built = build_executable(&model, req.options, req.out_dir, "griffin-demo", false)?;
    eprintln!(
        "built {} ({:.1} MB of weights beside it); running it:",
        built.executable.display(),
        built.weights_bytes as f64 / 1e6
    );
    eprintln!(
        "  {} --prompt {:?} --max-new-tokens {} {} --stats",
        built.executable.display(),
        req.prompt,
        req.max_new_tokens,
        DEMO_SAMPLING.join(" ")
    );
    // The prompt first, so the continuation reads as one text.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{}", req.prompt).and_then(|_| out.flush());
    }
    let status = Command::new(&built.executable)
        .arg("--prompt")
        .arg(req.prompt)
        .arg("--max-new-tokens")
        .arg(req.max_new_tokens.to_string())
        .args(DEMO_SAMPLING)
        .arg("--threads")
        .arg(req.options.threads.to_string())
        .arg("--stats")
        .status()
        .map_err(|e| fail(format!("cannot run {}: {e}", built.executable.display())))?;
    if !status.success() {
        return Err(fail(format!(
            "{} exited with {status}",
            built.executable.display()
        )));
    }
    Ok(built.executable)
}
