//! Writing logits as a safetensors file, atomically.

use std::path::{Path, PathBuf};

use crate::RuntimeError;

/// Writes one f32 tensor `logits` with `shape` to `path` through a temporary file in the same
/// folder, so a failure never leaves a partial file behind.
pub fn write_logits(path: &Path, shape: &[usize], values: &[f32]) -> Result<(), RuntimeError> {
    let fail = |m: String| RuntimeError::Output(format!("cannot write {}: {m}", path.display()));
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .map_err(|e| fail(e.to_string()))?;
    let serialized =
        safetensors::serialize([("logits", view)], None).map_err(|e| fail(e.to_string()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| fail("not a file path".into()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::write(&tmp, &serialized).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e.to_string()));
    }
    Ok(())
}
