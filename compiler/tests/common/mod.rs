//! Shared by the integration tests: where the golden cases are and how to read them.
#![allow(dead_code)]

use std::path::PathBuf;

use safetensors::SafeTensors;

/// The golden cases copied into the repository (`tests/golden/`), never `../shared`.
pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

pub const CASES: [&str; 5] = [
    "tiny-f32",
    "tiny-bf16-sharded",
    "tiny-text",
    "gen-h3-bf16",
    "gen-b64-bf16",
];

pub struct Expected {
    pub input_ids: Vec<u32>,
    /// [T, V]
    pub logits: Vec<f32>,
    /// [S, V]: the last S positions, prefill(T-S) then S single steps.
    pub decode_logits: Vec<f32>,
    pub decode_steps: usize,
    pub generated_ids: Vec<u32>,
    pub vocab: usize,
    pub prompt: Option<String>,
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn i64s_as_ids(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

pub fn expected(case: &str) -> Expected {
    let dir = golden_dir().join(case);
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let logits = st.tensor("logits").unwrap();
    let decode = st.tensor("decode_logits").unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    Expected {
        input_ids: i64s_as_ids(st.tensor("input_ids").unwrap().data()),
        logits: f32s(logits.data()),
        decode_logits: f32s(decode.data()),
        decode_steps: decode.shape()[0],
        generated_ids: i64s_as_ids(st.tensor("generated_ids").unwrap().data()),
        vocab: logits.shape()[1],
        prompt: meta
            .get("prompt")
            .and_then(|p| p.as_str())
            .map(str::to_string),
    }
}

/// The largest |a - b|; infinite where either is NaN (`f32::max` alone would skip a NaN, and a
/// NaN logit must fail every bound).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

/// Tolerance of an f32 engine against the float64 reference (golden/README.md).
pub const F32_TOLERANCE: f32 = 5e-4;

/// Runs the built `griffinc` binary.
pub fn griffinc(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_griffinc"))
        .args(args)
        .output()
        .expect("griffinc runs")
}

/// Reads the `logits` tensor written by `griffinc eval`.
pub fn read_logits(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    (t.shape().to_vec(), f32s(t.data()))
}

pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Writes a checkpoint with random f32 weights for `config_json` into `dir` (for tests that
/// need a model larger than the golden ones).
pub fn write_random_checkpoint(dir: &std::path::Path, config_json: &str, seed: u64) {
    write_random_checkpoint_as(dir, config_json, seed, false)
}

/// `write_random_checkpoint`, its tensors stored as bf16 when `bf16` (values rounded to
/// nearest even).
#[allow(dead_code)]
pub fn write_random_checkpoint_as(dir: &std::path::Path, config_json: &str, seed: u64, bf16: bool) {
    let config = griffinc::Config::from_json(config_json).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json).unwrap();
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.1
    };
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = config
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let bytes = if bf16 {
                (0..n)
                    .flat_map(|_| half::bf16::from_f32(next()).to_bits().to_le_bytes())
                    .collect()
            } else {
                (0..n).flat_map(|_| next().to_le_bytes()).collect()
            };
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(
                    if bf16 {
                        safetensors::Dtype::BF16
                    } else {
                        safetensors::Dtype::F32
                    },
                    s.clone(),
                    b,
                )
                .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Builds golden case `case` into `out` for `target` (`cpu`, `cuda`) with `extra` flags;
/// the executable's path.
pub fn build_executable(
    case: &str,
    out: &std::path::Path,
    target: &str,
    extra: &[&str],
) -> std::path::PathBuf {
    let dir = golden_dir().join(case);
    let mut args = vec![
        "build",
        dir.to_str().unwrap(),
        "--target",
        target,
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = griffinc(&args);
    assert!(
        o.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out.join(case)
}

/// `o` failed as bad input must: exit 1, one line on stderr starting `error: ` and naming each
/// of `parts`, nothing on stdout.
pub fn fails_with(o: &std::process::Output, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    for p in parts {
        assert!(stderr.contains(p), "{stderr:?} lacks {p:?}");
    }
    assert!(o.stdout.is_empty(), "output on failure: {stderr}");
}
