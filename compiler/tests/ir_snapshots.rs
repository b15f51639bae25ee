//! The traced IR, pinned as text. Review changes with `cargo insta review`.

mod common;

use common::golden_dir;
use griffin_ir::text::{parse, print};
use griffin_ir::verify;
use griffinc::session::Model;

#[test]
fn tiny_text_prefill_ir() {
    let m = Model::load_traced(&golden_dir().join("tiny-text")).unwrap();
    insta::assert_snapshot!("tiny_text_prefill", print(&m.prefill));
}

#[test]
fn tiny_text_decode_ir() {
    let m = Model::load_traced(&golden_dir().join("tiny-text")).unwrap();
    insta::assert_snapshot!("tiny_text_decode", print(&m.decode));
}

#[test]
fn tiny_bf16_decode_ir() {
    // bf16 weights: params keep their stored dtype, the recurrent param is cast for elementwise use.
    let m = Model::load_traced(&golden_dir().join("tiny-bf16-sharded")).unwrap();
    insta::assert_snapshot!("tiny_bf16_decode", print(&m.decode));
}

/// Every IR snapshot parses, verifies and prints back to itself.
#[test]
fn every_snapshot_round_trips() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "snap") {
            continue;
        }
        let snap = std::fs::read_to_string(&path).unwrap();
        // An insta snapshot is a `---` delimited header, then the content.
        let body = snap.splitn(3, "---\n").nth(2).expect("insta header");
        if !body.starts_with("graph ") {
            continue;
        }
        let text = format!("{}\n", body.trim_end());
        let g = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        verify(&g).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(print(&g), text, "{}", path.display());
        checked += 1;
    }
    assert!(
        checked >= 3,
        "found only {checked} IR snapshots in {}",
        dir.display()
    );
}
