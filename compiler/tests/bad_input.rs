//! Bad input: a one-line error naming the cause, a non-zero exit, no panic, no output file.

mod common;

use std::path::{Path, PathBuf};

use common::{golden_dir, griffinc};
use safetensors::{Dtype, SafeTensors};

/// A scratch copy of a golden checkpoint that a test may break.
fn scratch(case: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(case);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(golden_dir().join(case)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Reads a safetensors file, lets `edit` change its tensors, writes it back.
fn rewrite(file: &Path, edit: impl FnOnce(&mut Tensors)) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, file).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// Runs `griffinc eval DIR --ids IDS [extra]` and checks the failure contract; returns stderr.
fn eval_fails(dir: &Path, ids: &str, extra: &[&str]) -> String {
    let out_dir = tempfile::tempdir().unwrap();
    let out_file = out_dir.path().join("logits.safetensors");
    let mut args = vec![
        "eval",
        dir.to_str().unwrap(),
        "--ids",
        ids,
        "--out",
        out_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = griffinc(&args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    let leftovers: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "output left behind: {leftovers:?}");
    stderr
}

fn assert_mentions(stderr: &str, parts: &[&str]) {
    for p in parts {
        assert!(stderr.contains(p), "{stderr:?} does not mention {p:?}");
    }
}

#[test]
fn no_config_json() {
    let (_tmp, dir) = scratch("tiny-f32");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_mentions(&eval_fails(&dir, "2,3", &[]), &["no config.json"]);
}

#[test]
fn config_missing_a_field() {
    let (_tmp, dir) = scratch("tiny-f32");
    edit_config(&dir, |c| {
        c.remove("hidden_size");
    });
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["config.json", "missing field `hidden_size`"],
    );
}

#[test]
fn config_with_unknown_block_type() {
    let (_tmp, dir) = scratch("tiny-f32");
    edit_config(&dir, |c| {
        c.insert(
            "block_types".into(),
            serde_json::json!(["recurrent", "mamba"]),
        );
    });
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["unknown block type", "mamba"],
    );
}

#[test]
fn config_with_heads_not_dividing_width() {
    let (_tmp, dir) = scratch("tiny-f32");
    edit_config(&dir, |c| {
        c.insert("num_attention_heads".into(), serde_json::json!(5));
    });
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["num_attention_heads 5", "hidden_size 64"],
    );
}

#[test]
fn missing_tensor() {
    let (_tmp, dir) = scratch("tiny-f32");
    rewrite(&dir.join("model.safetensors"), |t| {
        t.retain(|(n, ..)| n != "model.final_norm.weight")
    });
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["missing tensor `model.final_norm.weight`"],
    );
}

#[test]
fn unexpected_tensor() {
    let (_tmp, dir) = scratch("tiny-f32");
    rewrite(&dir.join("model.safetensors"), |t| {
        t.push(("lm_head.weight".into(), Dtype::F32, vec![2], vec![0; 8]));
    });
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["unexpected tensor `lm_head.weight`"],
    );
}

#[test]
fn wrong_shape_tensor() {
    let (_tmp, dir) = scratch("tiny-f32");
    rewrite(&dir.join("model.safetensors"), |t| {
        let e = t
            .iter_mut()
            .find(|(n, ..)| n == "model.final_norm.weight")
            .unwrap();
        e.2 = vec![32];
        e.3.truncate(32 * 4);
    });
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["`model.final_norm.weight`", "shape [32]", "expected [64]"],
    );
}

#[test]
fn wrong_dtype_tensor() {
    let (_tmp, dir) = scratch("tiny-f32");
    rewrite(&dir.join("model.safetensors"), |t| {
        let e = t
            .iter_mut()
            .find(|(n, ..)| n == "model.final_norm.weight")
            .unwrap();
        e.1 = Dtype::I32;
    });
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["`model.final_norm.weight`", "dtype I32"],
    );
}

#[test]
fn truncated_safetensors_file() {
    let (_tmp, dir) = scratch("tiny-f32");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["model.safetensors", "truncated"],
    );
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["model.safetensors", "shorter than"],
    );
}

#[test]
fn header_length_larger_than_file() {
    let (_tmp, dir) = scratch("tiny-f32");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(10u64 << 20).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["header length 10485760 is larger"],
    );
}

#[test]
fn shard_named_in_index_but_absent() {
    let (_tmp, dir) = scratch("tiny-bf16-sharded");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    assert_mentions(
        &eval_fails(&dir, "2,3", &[]),
        &["model-00002-of-00003.safetensors", "missing"],
    );
}

#[test]
fn token_id_out_of_vocabulary() {
    let dir = golden_dir().join("tiny-f32");
    assert_mentions(
        &eval_fails(&dir, "2,512", &[]),
        &["token id 512", "512 entries"],
    );
}

#[test]
fn empty_ids() {
    let dir = golden_dir().join("tiny-f32");
    assert_mentions(&eval_fails(&dir, "", &[]), &["--ids is empty"]);
    assert_mentions(&eval_fails(&dir, "2,,3", &[]), &["`` is not a token id"]);
    assert_mentions(&eval_fails(&dir, "2,-1", &[]), &["`-1` is not a token id"]);
}

#[test]
fn prefill_larger_than_ids() {
    let dir = golden_dir().join("tiny-f32");
    assert_mentions(
        &eval_fails(&dir, "2,3", &["--prefill", "3"]),
        &["--prefill 3", "2 ids"],
    );
}

#[test]
fn unwritable_output_leaves_nothing() {
    let dir = golden_dir().join("tiny-f32");
    let out = griffinc(&[
        "eval",
        dir.to_str().unwrap(),
        "--ids",
        "2",
        "--out",
        "/nonexistent-dir/x.safetensors",
    ]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_mentions(&stderr, &["cannot write /nonexistent-dir/x.safetensors"]);
}

#[test]
fn prompt_without_tokenizer() {
    let dir = golden_dir().join("tiny-f32");
    let out = griffinc(&["generate", dir.to_str().unwrap(), "--prompt", "hello"]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_mentions(&stderr, &["tokenizer.json", "--ids"]);
}
