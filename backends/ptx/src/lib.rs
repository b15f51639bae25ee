//! The PTX backend: a small typed PTX writer, the kernels for sm_90 and a PTX interpreter
//! (`emu`) that checks their numbers without a GPU. Decode: projections as GEMV with norm
//! prologue and epilogues, the fused RG-LRU step, split-key attention over the KV ring,
//! embedding gather, argmax. Prefill chunks: RMS norm, projections on tensor cores (or CUDA
//! cores), the RG-LRU over the chunk, key-tiled attention, gather, last row. Kernels target
//! sm_90 with PTX ISA 8.0 and are assembled by a real `ptxas` in the tests. Lowering a graph to
//! these kernels is `griffinc::gpu`; running them is `griffin_runtime::cuda`.

pub mod attention;
pub mod attention_tc;
pub mod builder;
pub mod emu;
pub mod gemv;
pub mod math;
pub mod misc;
pub mod prefill;
pub mod probe;
pub mod rg_lru;
pub mod sample;
pub mod tc;

/// A module of kernels: the header, then each kernel. Kernels using `wgmma` need the
/// architecture-specific target `sm_90a` (which loads on sm_90 GPUs only, H100 and H200).
pub fn module(kernels: &[String]) -> String {
    let mut out = if kernels.iter().any(|k| k.contains("wgmma.")) {
        builder::HEADER.replace(".target sm_90\n", ".target sm_90a\n")
    } else {
        String::from(builder::HEADER)
    };
    for k in kernels {
        out.push('\n');
        out.push_str(k);
    }
    out
}

/// A `ptxas` to check generated PTX with (tests; no GPU needed): `$PTXAS`, else the copy
/// `scripts/setup.sh` installs under `.tools/` (PyPI's nvidia-cuda-nvcc), else one on PATH.
pub fn find_ptxas() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("PTXAS") {
        return Some(PathBuf::from(p));
    }
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/venv/lib");
    if let Ok(entries) = std::fs::read_dir(&tools) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/nvidia/cu13/bin/ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let on_path = std::process::Command::new("sh")
        .args(["-c", "command -v ptxas"])
        .output()
        .ok()?;
    on_path
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&on_path.stdout).trim()))
}
