//! Every generated kernel assembles with a real `ptxas` for sm_90 (installed by
//! `scripts/setup.sh` from PyPI's nvidia-cuda-nvcc; no GPU needed). Any ptxas error fails.

use std::path::PathBuf;
use std::process::Command;

use griffin_backend_ptx::gemv::{gemv, Epilogue, GemvSpec};
use griffin_backend_ptx::module;

/// `$PTXAS`, else the copy `scripts/setup.sh` installs under `.tools/`, else `ptxas` on PATH.
fn ptxas() -> PathBuf {
    if let Some(p) = std::env::var_os("PTXAS") {
        return PathBuf::from(p);
    }
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/venv/lib");
    if let Ok(entries) = std::fs::read_dir(&tools) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/nvidia/cu13/bin/ptxas");
            if p.is_file() {
                return p;
            }
        }
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v ptxas"])
        .output()
        .ok();
    match on_path.filter(|o| o.status.success()) {
        Some(o) => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        None => panic!("ptxas not found: run scripts/setup.sh (it installs nvidia-cuda-nvcc from PyPI into .tools/) or set PTXAS"),
    }
}

/// Assembles `ptx`; returns ptxas's `-v` report.
fn assemble(ptx: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("k.ptx");
    std::fs::write(&src, ptx).unwrap();
    let out = Command::new(ptxas())
        .args(["-arch=sm_90", "-v", "-o"])
        .arg(dir.path().join("k.cubin"))
        .arg(&src)
        .output()
        .expect("ptxas runs");
    let report = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ptxas failed:\n{report}\n{ptx}");
    report
}

fn specs() -> Vec<GemvSpec> {
    let spec = |name: &str, inputs, width, bias, epilogue, residual| GemvSpec {
        name: name.into(),
        inputs,
        width,
        bias,
        epilogue,
        residual,
    };
    vec![
        // tiny configs (D=64, F=96)
        spec("tiny_qkv", 64, 96, false, Epilogue::None, false),
        spec("tiny_mlp_gate_up", 64, 96, true, Epilogue::GeGlu, false),
        spec("tiny_down", 96, 64, true, Epilogue::None, true),
        spec(
            "tiny_logits",
            64,
            512,
            false,
            Epilogue::SoftCap(30.0),
            false,
        ),
        // the 2B shape (D=2560, F=7680, V=256000)
        spec("b2_x_y", 2560, 5120, true, Epilogue::None, false),
        spec("b2_mlp_gate_up", 2560, 7680, true, Epilogue::GeGlu, false),
        spec("b2_down", 7680, 2560, true, Epilogue::None, true),
        spec(
            "b2_logits",
            2560,
            256000,
            false,
            Epilogue::SoftCap(30.0),
            false,
        ),
    ]
}

#[test]
fn gemv_kernels_assemble_for_sm90() {
    let kernels: Vec<String> = specs().iter().map(gemv).collect();
    let report = assemble(&module(&kernels));
    for s in specs() {
        assert!(
            report.contains(&s.name),
            "{} not in the ptxas report:\n{report}",
            s.name
        );
    }
    // Print registers and spills per kernel (recorded in docs/ptx-backend.md).
    for line in report
        .lines()
        .filter(|l| l.contains("registers") || l.contains("spill") || l.contains("Compiling"))
    {
        println!("{line}");
    }
    for line in report.lines().filter(|l| l.contains("spill stores")) {
        let stores: u64 = line
            .split(" bytes spill stores")
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(stores, 0, "a kernel spills: {line}");
    }
}

#[test]
fn gemv_ptx_snapshot() {
    let spec = &specs()[1];
    insta::assert_snapshot!("tiny_mlp_gate_up_gemv", module(&[gemv(spec)]));
}
