//! The golden cases through the `griffinc` binary, as a user runs it.

mod common;

use common::{
    expected, golden_dir, griffinc, ids_arg, max_abs_diff, read_logits, CASES, F32_TOLERANCE,
};

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "griffinc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn eval_full_and_stepwise_match_reference() {
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let e = expected(case);
        let dir = golden_dir().join(case);
        let ids = ids_arg(&e.input_ids);
        let full = tmp.path().join(format!("{case}-full.safetensors"));
        stdout(&griffinc(&[
            "eval",
            dir.to_str().unwrap(),
            "--ids",
            &ids,
            "--out",
            full.to_str().unwrap(),
        ]));
        let (shape, logits) = read_logits(&full);
        assert_eq!(shape, vec![e.input_ids.len(), e.vocab]);
        assert!(max_abs_diff(&logits, &e.logits) <= F32_TOLERANCE, "{case}");

        let prefill = (e.input_ids.len() - e.decode_steps).to_string();
        let steps = tmp.path().join(format!("{case}-steps.safetensors"));
        stdout(&griffinc(&[
            "eval",
            dir.to_str().unwrap(),
            "--ids",
            &ids,
            "--prefill",
            &prefill,
            "--backend",
            "interp",
            "--passes",
            "none",
            "--out",
            steps.to_str().unwrap(),
        ]));
        let (_, logits) = read_logits(&steps);
        let tail = &logits[(e.input_ids.len() - e.decode_steps) * e.vocab..];
        assert!(
            max_abs_diff(tail, &e.decode_logits) <= F32_TOLERANCE,
            "{case}"
        );
    }
}

#[test]
fn generate_ids_match_reference() {
    for case in CASES {
        let e = expected(case);
        let dir = golden_dir().join(case);
        let out = stdout(&griffinc(&[
            "generate",
            dir.to_str().unwrap(),
            "--ids",
            &ids_arg(&e.input_ids),
            "--max-new-tokens",
            &e.generated_ids.len().to_string(),
            "--ignore-eos",
            "--format",
            "ids",
        ]));
        assert_eq!(out.trim(), ids_arg(&e.generated_ids), "{case}");
    }
}

#[test]
fn generate_from_prompt_text() {
    let e = expected("tiny-text");
    let dir = golden_dir().join("tiny-text");
    let n = e.generated_ids.len().to_string();
    let prompt = e.prompt.clone().unwrap();
    let base = [
        "generate",
        dir.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--max-new-tokens",
        &n,
        "--ignore-eos",
    ];
    let ids = stdout(&griffinc(&[&base[..], &["--format", "ids"]].concat()));
    assert_eq!(ids.trim(), ids_arg(&e.generated_ids));
    // Text is the default where the folder has a tokenizer.
    let text = stdout(&griffinc(&base));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    assert_eq!(
        text.strip_suffix('\n').unwrap(),
        meta["generated_text"].as_str().unwrap()
    );
}

#[test]
fn ir_dump_parses_and_verifies() {
    for case in CASES {
        let dir = golden_dir().join(case);
        for graph in ["prefill", "decode"] {
            let text = stdout(&griffinc(&["ir", dir.to_str().unwrap(), "--graph", graph]));
            let parsed = griffin_ir::text::parse(&text).unwrap();
            griffin_ir::verify(&parsed).unwrap();
            assert_eq!(griffin_ir::text::print(&parsed), text);
        }
        let dot = stdout(&griffinc(&["ir", dir.to_str().unwrap(), "--format", "dot"]));
        assert!(dot.starts_with("digraph \"prefill\" {"));
        assert!(dot.contains("local_attention"));
    }
}

#[test]
fn ir_stats_report_kernel_counts() {
    let dir = golden_dir().join("tiny-text");
    let out = stdout(&griffinc(&["ir", dir.to_str().unwrap(), "--stats"]));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one line per graph: {out}");
    assert_eq!(lines[0]["graph"], "prefill");
    assert_eq!(lines[1]["graph"], "decode");
    for line in &lines {
        assert_eq!(line["kernels"], 18);
        assert_eq!(line["kernels_per_layer"]["recurrent"], 5);
        assert_eq!(line["kernels_per_layer"]["attention"], 5);
        assert_eq!(line["kernels_outside_layers"], 3);
        assert_eq!(line["unfused_kernels"], 83);
    }
    let none = stdout(&griffinc(&[
        "ir",
        dir.to_str().unwrap(),
        "--stats",
        "--graph",
        "decode",
        "--passes",
        "none",
    ]));
    let line: serde_json::Value = serde_json::from_str(none.trim()).unwrap();
    assert_eq!(line["kernels"], 83);
}

#[test]
fn ir_prints_after_passes_and_stops() {
    let dir = golden_dir().join("tiny-text");
    let d = dir.to_str().unwrap();
    let all = stdout(&griffinc(&[
        "ir",
        d,
        "--graph",
        "decode",
        "--print-after-all",
    ]));
    assert_eq!(
        all.matches("# after ").count(),
        griffinc::passes::PASSES.len()
    );
    assert!(all.contains("# after fuse-rg-lru (2 rewrites)\ngraph decode {"));

    let one = stdout(&griffinc(&[
        "ir",
        d,
        "--graph",
        "decode",
        "--print-after",
        "fuse-norm",
    ]));
    assert!(
        one.starts_with("# after fuse-norm (7 rewrites)\ngraph decode {"),
        "{one}"
    );
    assert_eq!(one.matches("graph decode").count(), 1);

    // Stopping after RG-LRU fusion leaves the projections unmerged.
    let stopped = stdout(&griffinc(&[
        "ir",
        d,
        "--graph",
        "decode",
        "--stop-after",
        "fuse-rg-lru",
    ]));
    assert!(stopped.contains("= rg_lru "));
    assert!(!stopped.contains("splits="));
    let parsed = griffin_ir::text::parse(&stopped).unwrap();
    griffin_ir::verify(&parsed).unwrap();

    let chosen = stdout(&griffinc(&[
        "ir",
        d,
        "--graph",
        "decode",
        "--passes",
        "fold-weights,fuse-rg-lru,dce",
    ]));
    assert_eq!(chosen, stopped);

    let timed = griffinc(&["ir", d, "--time-passes"]);
    assert!(timed.status.success());
    let stderr = String::from_utf8(timed.stderr).unwrap();
    assert_eq!(stderr.lines().count(), griffinc::passes::PASSES.len());
    assert!(stderr.contains("rewrites"));
}

#[test]
fn unknown_pass_is_a_one_line_error() {
    let dir = golden_dir().join("tiny-text");
    for args in [
        vec!["ir", dir.to_str().unwrap(), "--passes", "fuse-everything"],
        vec!["ir", dir.to_str().unwrap(), "--print-after", "nope"],
        vec![
            "eval",
            dir.to_str().unwrap(),
            "--ids",
            "2",
            "--passes",
            "nope",
            "--out",
            "/tmp/never.safetensors",
        ],
    ] {
        let out = griffinc(&args);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("nope") || stderr.contains("fuse-everything"),
            "{stderr}"
        );
    }
    assert!(!std::path::Path::new("/tmp/never.safetensors").exists());
}

#[test]
fn sampling_is_seeded_and_stops_at_strings() {
    let dir = golden_dir().join("tiny-text");
    let d = dir.to_str().unwrap();
    let sample = |seed: &str| {
        stdout(&griffinc(&[
            "generate",
            d,
            "--ids",
            "2,40,41,42",
            "--max-new-tokens",
            "24",
            "--ignore-eos",
            "--format",
            "ids",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--min-p",
            "0.01",
            "--repetition-penalty",
            "1.1",
            "--seed",
            seed,
        ]))
    };
    let (a, b, c) = (sample("5"), sample("5"), sample("6"));
    assert_eq!(a, b, "same seed, same ids");
    assert_ne!(a, c, "another seed, other ids");
    assert_eq!(a.trim().split(',').count(), 24);

    // Greedy text is "xxxxxx" then byte pieces: stop at "xxx" after the third token.
    let e = expected("tiny-text");
    let prompt = e.prompt.clone().unwrap();
    let text = stdout(&griffinc(&[
        "generate",
        d,
        "--prompt",
        &prompt,
        "--max-new-tokens",
        "24",
        "--stop",
        "xxx",
    ]));
    assert_eq!(text, "\n");
    let ids = stdout(&griffinc(&[
        "generate",
        d,
        "--prompt",
        &prompt,
        "--max-new-tokens",
        "24",
        "--stop",
        "xxx",
        "--format",
        "ids",
    ]));
    assert_eq!(ids.trim(), "349,349,349");

    let bad = griffinc(&["generate", d, "--ids", "2", "--top-p", "0"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--top-p 0 must be in (0, 1]"));
}

#[test]
fn chat_keeps_state_between_turns() {
    use std::io::Write;
    let dir = golden_dir().join("tiny-text");
    let d = dir.to_str().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_griffinc"))
        .args([
            "generate",
            d,
            "--chat",
            "--max-new-tokens",
            "5",
            "--format",
            "ids",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello there\nand the fox?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replies: Vec<Vec<u32>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(replies.len(), 2);
    assert!(replies.iter().all(|r| r.len() == 5));

    // The second reply is what one pass over the whole transcript gives: the chat continued the
    // recurrent state instead of re-reading the history.
    let m = griffinc::session::Model::load(&dir).unwrap();
    let tok =
        griffinc::tokenizer::TextTokenizer::load(&dir, m.checkpoint.config.bos_token_id).unwrap();
    let mut transcript = tok
        .encode(&griffinc::cli::chat_turn("hello there", None))
        .unwrap();
    transcript.extend(&replies[0]);
    transcript.extend(
        tok.encode_continuation(&griffinc::cli::chat_turn("and the fox?", Some(false)))
            .unwrap(),
    );
    let whole = stdout(&griffinc(&[
        "generate",
        d,
        "--ids",
        &ids_arg(&transcript),
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--format",
        "ids",
    ]));
    assert_eq!(whole.trim(), ids_arg(&replies[1]));
}

#[test]
fn verbose_logs_stages_to_stderr_and_stats_report_rates() {
    let dir = golden_dir().join("tiny-text");
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "generate",
            dir.to_str().unwrap(),
            "--prompt",
            "hello",
            "--max-new-tokens",
            "5",
            "--backend",
            "cpu",
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| griffinc(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let quiet = run(args(&[]));
    let loud = run(args(&["-v", "--stats"]));
    // Logging and stats go to stderr only: the text is the same.
    assert_eq!(stdout(&quiet), stdout(&loud));
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
    let log = String::from_utf8(loud.stderr).unwrap();
    for stage in [
        "loading",
        "tracing",
        "optimizing",
        "lowering",
        "packing",
        "compiling",
    ] {
        assert!(
            log.contains(&format!("stage=\"{stage}\"")),
            "no {stage} in:\n{log}"
        );
    }
    let last = log.lines().last().unwrap();
    assert!(
        last.starts_with("time to first token ") && last.contains("(5 tokens)"),
        "{last}"
    );
    // -vv adds one line per pass.
    let debug = run(args(&["-vv"]));
    let log = String::from_utf8(debug.stderr).unwrap();
    assert!(log.contains("pass=\"fuse-rg-lru\""), "{log}");
}

#[test]
fn demo_model_greedy_text_matches_the_reference_sample() {
    // scripts/train_demo_model.py recorded the reference implementation's greedy text (40 new
    // tokens); the interpreter on the committed bf16 weights writes the same words.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-model");
    let training: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("training.json")).unwrap()).unwrap();
    let prompt = training["greedy_sample"]["prompt"].as_str().unwrap();
    let want = training["greedy_sample"]["text"].as_str().unwrap();
    let out = stdout(&griffinc(&[
        "generate",
        dir.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "40",
    ]));
    assert_eq!(format!("{prompt}{}", out.trim_end_matches('\n')), want);
}
