//! Executables built with `--target cuda`, and `griffinc --backend cuda`, run end to end on
//! `emucuda`: a stand-in `libcuda.so` (backends/emucuda) that runs the kernels on the PTX
//! interpreter. The kernels are checked by the interpreter elsewhere; this is the only check
//! of the host side that drives them through the CUDA driver API (`griffin_runtime::cuda`:
//! module loading, allocations, uploads, kernel parameters, graph capture and replay, events,
//! copies back) before a GPU runs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    expected, fails_with, golden_dir, ids_arg, max_abs_diff, read_logits, CASES, F32_TOLERANCE,
};

/// A folder holding the stand-in driver as `libcuda.so`, the name cudarc opens. The library is
/// built by `cargo build --workspace` beside griffinc under its own name, so it never shadows a
/// real driver anywhere else.
fn fake_driver_dir(tmp: &Path) -> PathBuf {
    let griffinc = PathBuf::from(env!("CARGO_BIN_EXE_griffinc"));
    let built = griffinc
        .parent()
        .expect("griffinc lies in a folder")
        .join("libgriffin_emucuda.so");
    assert!(
        built.is_file(),
        "{} not found: build it with `cargo build -p griffin-emucuda` (make test does)",
        built.display()
    );
    let dir = tmp.join("driver");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&built, dir.join("libcuda.so")).unwrap();
    dir
}

fn on_fake_driver(program: &Path, driver: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("LD_LIBRARY_PATH", driver)
        .output()
        .unwrap()
}

/// `on_fake_driver` with one of the stand-in's settings (`EMUCUDA_…`).
fn on_fake_driver_with(
    program: &Path,
    driver: &Path,
    args: &[&str],
    (var, value): (&str, &str),
) -> Output {
    Command::new(program)
        .args(args)
        .env("LD_LIBRARY_PATH", driver)
        .env(var, value)
        .output()
        .unwrap()
}

fn succeeded(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{stderr}");
    // The stand-in names every driver function it does not model, and every kernel failure.
    assert!(!stderr.contains("emucuda:"), "{stderr}");
    stderr
}

fn build_cuda(case: &str, out: &Path, extra: &[&str]) -> PathBuf {
    common::build_executable(case, out, "cuda", extra)
}

#[test]
fn golden_cases_through_cuda_executables_on_the_fake_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    for case in CASES {
        let e = expected(case);
        // Chunks of 5 tokens: a prompt of several chunks, the last one partial.
        let exe = build_cuda(case, tmp.path(), &["--prefill-chunk", "5"]);
        let ids = ids_arg(&e.input_ids);

        // Every position's logits: the prompt as prefill chunks, all rows copied back.
        let full = tmp.path().join(format!("{case}.logits"));
        let o = on_fake_driver(
            &exe,
            &driver,
            &["--ids", &ids, "--logits-out", full.to_str().unwrap()],
        );
        succeeded(&o);
        let (shape, logits) = read_logits(&full);
        assert_eq!(shape, vec![e.input_ids.len(), e.vocab]);
        let diff = max_abs_diff(&logits, &e.logits);
        println!("{case}: prefill chunks, max |diff| {diff:.2e}");
        assert!(diff <= F32_TOLERANCE, "{case}: {diff}");

        // Prefill T-S, then S decode steps: the step's graph is captured once and replayed.
        let prefill = (e.input_ids.len() - e.decode_steps).to_string();
        let steps = tmp.path().join(format!("{case}.steps"));
        let o = on_fake_driver(
            &exe,
            &driver,
            &[
                "--ids",
                &ids,
                "--prefill",
                &prefill,
                "--logits-out",
                steps.to_str().unwrap(),
            ],
        );
        succeeded(&o);
        let (_, logits) = read_logits(&steps);
        let tail = &logits[(e.input_ids.len() - e.decode_steps) * e.vocab..];
        let diff = max_abs_diff(tail, &e.decode_logits);
        println!("{case}: decode steps, max |diff| {diff:.2e}");
        assert!(diff <= F32_TOLERANCE, "{case}: {diff}");

        // Greedy ids, chosen by the device argmax, one id copied back per token.
        let n = e.generated_ids.len().to_string();
        let o = on_fake_driver(
            &exe,
            &driver,
            &[
                "--ids",
                &ids,
                "--max-new-tokens",
                &n,
                "--ignore-eos",
                "--format",
                "ids",
                "--stats",
            ],
        );
        let stats = succeeded(&o);
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            ids_arg(&e.generated_ids),
            "{case}"
        );
        assert!(stats.contains("device memory"), "{stats}");
    }
}

/// An executable whose projections run in two k parts (`--k-parts 2`: partial sums, then the
/// reduction launch), one with f16 tensor-core inputs, and one on the warpgroup MMA (`--wgmma`,
/// an sm_90a module): the same logits through the CUDA runtime, within 5e-4 (the bf16 bound
/// for f16 inputs).
#[test]
fn k_parts_f16_inputs_and_wgmma_through_a_cuda_executable() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let case = "gen-b64-bf16";
    let e = expected(case);
    let ids = ids_arg(&e.input_ids);
    for (i, (flags, bound)) in [
        (&["--k-parts", "2"][..], F32_TOLERANCE),
        (&["--tensor-core-inputs", "f16"][..], 0.02),
        (&["--wgmma"][..], F32_TOLERANCE),
    ]
    .into_iter()
    .enumerate()
    {
        let mut args = vec!["--prefill-chunk", "5"];
        args.extend(flags);
        let exe = build_cuda(case, &tmp.path().join(i.to_string()), &args);
        let out = tmp.path().join(format!("{i}.logits"));
        let o = on_fake_driver(
            &exe,
            &driver,
            &["--ids", &ids, "--logits-out", out.to_str().unwrap()],
        );
        succeeded(&o);
        let (_, logits) = read_logits(&out);
        let diff = max_abs_diff(&logits, &e.logits);
        assert!(diff <= bound, "{flags:?}: {diff}");
    }
}

#[test]
fn griffinc_cuda_backend_on_the_fake_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let griffinc = PathBuf::from(env!("CARGO_BIN_EXE_griffinc"));
    let case = "gen-h3-bf16";
    let e = expected(case);
    let dir = golden_dir().join(case);
    let ids = ids_arg(&e.input_ids);
    let out = tmp.path().join("l.safetensors");
    let o = on_fake_driver(
        &griffinc,
        &driver,
        &[
            "eval",
            dir.to_str().unwrap(),
            "--ids",
            &ids,
            "--backend",
            "cuda",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    succeeded(&o);
    let (_, logits) = read_logits(&out);
    assert!(max_abs_diff(&logits, &e.logits) <= F32_TOLERANCE);

    let n = e.generated_ids.len().to_string();
    let o = on_fake_driver(
        &griffinc,
        &driver,
        &[
            "generate",
            dir.to_str().unwrap(),
            "--ids",
            &ids,
            "--backend",
            "cuda",
            "--max-new-tokens",
            &n,
            "--ignore-eos",
            "--format",
            "ids",
        ],
    );
    succeeded(&o);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        ids_arg(&e.generated_ids)
    );
}

#[test]
fn device_memory_and_graphs_are_set_up_before_any_kernel() {
    // The stand-in fails any allocation or graph capture after the first kernel (so none
    // falls inside the timed prompt or decode steps): a 23-token prompt in chunks
    // of 5, then 100 generated tokens (past the attention window of 8 many times), sampled and
    // greedy, and the logits of every position.
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("tiny-text", tmp.path(), &["--prefill-chunk", "5"]);
    let ids: Vec<u32> = (0..23).map(|i| 2 + (i * 7) % 200).collect();
    let ids = ids_arg(&ids);
    let logits = tmp.path().join("all.logits");
    for args in [
        vec!["--ids", &ids, "--max-new-tokens", "100", "--ignore-eos"],
        vec![
            "--ids",
            &ids,
            "--max-new-tokens",
            "300",
            "--ignore-eos",
            "--temperature",
            "0.8",
            "--seed",
            "3",
        ],
        vec!["--ids", &ids, "--logits-out", logits.to_str().unwrap()],
    ] {
        let o = on_fake_driver_with(&exe, &driver, &args, ("EMUCUDA_SET_UP_FRONT", "1"));
        let stderr = succeeded(&o);
        // Every program ran from its graph: none fell back to launches one by one.
        assert!(!stderr.contains("not captured"), "{stderr}");
    }
}

#[test]
fn sampled_decoding_on_the_device_draws_the_host_samplers_ids() {
    // The same executable, settings and seed, sampling on the device (the default) and on the
    // host (GRIFFIN_SAMPLE_ON_HOST=1, which copies every step's logits back): the same ids.
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("tiny-text", tmp.path(), &["--prefill-chunk", "5"]);
    let ids: Vec<u32> = (0..12).map(|i| 2 + (i * 11) % 200).collect();
    let ids = ids_arg(&ids);
    for settings in [
        vec!["--temperature", "1.0", "--seed", "11"],
        vec![
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--top-k",
            "40",
            "--seed",
            "5",
        ],
        vec![
            "--temperature",
            "1.5",
            "--min-p",
            "0.02",
            "--repetition-penalty",
            "1.3",
        ],
        vec!["--temperature", "0", "--repetition-penalty", "2.0"],
    ] {
        let mut args = vec!["--ids", &ids, "--max-new-tokens", "24", "--ignore-eos"];
        args.extend(settings.iter().copied());
        args.extend(["--format", "ids"]);
        let device = on_fake_driver(&exe, &driver, &args);
        let host = on_fake_driver_with(&exe, &driver, &args, ("GRIFFIN_SAMPLE_ON_HOST", "1"));
        succeeded(&device);
        succeeded(&host);
        let drawn = String::from_utf8_lossy(&device.stdout).trim().to_string();
        assert_eq!(
            drawn,
            String::from_utf8_lossy(&host.stdout).trim(),
            "{settings:?}"
        );
        let distinct: std::collections::HashSet<&str> = drawn.split(',').collect();
        assert!(distinct.len() > 3, "{settings:?}: {drawn}");
    }
}

#[test]
fn a_driver_refusing_early_launches_gets_plain_stream_order() {
    // Kernels are launched to overlap the one before (programmatic dependent launch); a
    // driver that refuses it gets plain launches, with one note, and the same answers.
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let case = "tiny-text";
    let e = expected(case);
    let exe = build_cuda(case, tmp.path(), &["--prefill-chunk", "5"]);
    let n = e.generated_ids.len().to_string();
    let args = [
        "--ids",
        &ids_arg(&e.input_ids),
        "--max-new-tokens",
        &n,
        "--ignore-eos",
        "--format",
        "ids",
    ];
    for (refuse, plain) in [(true, false), (true, true), (false, true)] {
        let mut c = Command::new(&exe);
        c.args(args).env("LD_LIBRARY_PATH", &driver);
        if refuse {
            c.env("EMUCUDA_NO_PDL", "1");
        }
        if plain {
            c.env("GRIFFIN_CUDA_PDL", "0");
        }
        let o = c.output().unwrap();
        let stderr = succeeded(&o);
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            ids_arg(&e.generated_ids)
        );
        // Asked for early launches and refused: one note (later programs do not ask again).
        let notes = stderr
            .matches("programmatic dependent launch failed")
            .count();
        assert_eq!(notes, usize::from(refuse && !plain), "{stderr}");
    }
}

#[test]
fn profile_times_every_launch_of_a_chunk_and_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("tiny-bf16-sharded", tmp.path(), &[]);
    let o = on_fake_driver(&exe, &driver, &["--ids", "2,17,5,9", "--profile"]);
    let stderr = succeeded(&o);
    // One table for the prefill chunk, one for the decode step, each with its launch count
    // and the tensor-core projection among the chunk's kernels.
    assert!(
        stderr.contains("profile: prefill chunk of 4 tokens"),
        "{stderr}"
    );
    assert!(
        stderr.contains("profile: decode step at position 4"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "| kernel | grid × block | launches | µs in all | µs each | share | GB/s | TFLOP/s |"
        ),
        "{stderr}"
    );
    let rows = stderr.lines().filter(|l| l.starts_with("| p")).count();
    assert!(rows > 3, "{stderr}");
    // The projections' and the recurrence's work is counted (rates; the stand-in's clock
    // makes them tiny), attention's is not (blank).
    for line in stderr.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let rated = !cells[7].is_empty() && !cells[8].is_empty();
        if cells[1].ends_with("_linear") || cells[1].ends_with("_rg_lru") {
            assert!(rated, "{line}");
        }
        if cells[1].contains("attend") {
            assert!(!rated, "{line}");
        }
    }
    // Sampled generation profiles the sampled step: the sampler's launches after the layers.
    let args = [
        "--ids",
        "2,17,5,9",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
    ];
    let o = on_fake_driver(&exe, &driver, &[&args[..], &["--profile"]].concat());
    let stderr = succeeded(&o);
    assert!(
        stderr.contains("profile: sampled decode step at position 4"),
        "{stderr}"
    );
    for kernel in [
        "sample_max",
        "sample_weights",
        "sample_hist_p3",
        "sample_blocks",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("| {kernel} "))),
            "{kernel}: {stderr}"
        );
    }
}

#[test]
fn a_device_fault_is_a_one_line_error_without_output() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("tiny-f32", tmp.path(), &["--prefill-chunk", "2"]);
    // Kernel 3 falls in the first prefill chunk (54 launches each), kernel 100 in the second
    // (a replay of the chunk's captured graph); with generation, kernel 1000 in a decode step.
    for (nth, generate) in [("3", false), ("100", false), ("1000", true)] {
        let logits = tmp.path().join(format!("fault{nth}.logits"));
        let mut args = vec!["--ids", "2,17,5,9,11"];
        if generate {
            args.extend(["--max-new-tokens", "40", "--ignore-eos"]);
        } else {
            args.extend(["--logits-out", logits.to_str().unwrap()]);
        }
        let o = on_fake_driver_with(&exe, &driver, &args, ("EMUCUDA_FAIL_KERNEL", nth));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "kernel {nth}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "kernel {nth}: {stderr}"
        );
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains("CUDA_ERROR_LAUNCH_FAILED"), "{stderr}");
        assert!(!logits.exists(), "kernel {nth}: a partial logits file");
    }
}

#[test]
fn bad_input_to_a_cuda_executable() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("tiny-f32", tmp.path(), &[]);
    let run = |args: &[&str]| on_fake_driver(&exe, &driver, args);
    let weights = tmp.path().join("tiny-f32.weights");
    let good = std::fs::read(&weights).unwrap();

    fails_with(&run(&["--ids", "2,512"]), &["token id 512", "512 entries"]);
    fails_with(&run(&["--ids", ""]), &["--ids is empty"]);
    fails_with(&run(&["--ids", "2,x"]), &["`x` is not a token id"]);
    fails_with(&run(&["--ids", "2", "--frobnicate"]), &["unknown argument"]);
    let logits = tmp.path().join("never.safetensors");
    let logits_arg = logits.to_str().unwrap();
    fails_with(
        &run(&["--ids", "2,3", "--prefill", "3", "--logits-out", logits_arg]),
        &["--prefill 3", "2 ids"],
    );
    fails_with(
        &run(&["--ids", "2,700", "--logits-out", logits_arg]),
        &["token id 700"],
    );
    assert!(!logits.exists());

    std::fs::write(&weights, &good[..good.len() - 1000]).unwrap();
    fails_with(&run(&["--ids", "2"]), &["tiny-f32.weights", "truncated"]);
    std::fs::remove_file(&weights).unwrap();
    fails_with(&run(&["--ids", "2"]), &["tiny-f32.weights", "cannot open"]);
    std::fs::write(&weights, b"not weights at all").unwrap();
    fails_with(&run(&["--ids", "2"]), &["not a griffinc weights file"]);
    // Weights of another build of the same name.
    let other = tmp.path().join("other");
    let o = common::griffinc(&[
        "build",
        golden_dir().join("tiny-text").to_str().unwrap(),
        "--target",
        "cuda",
        "--name",
        "tiny-f32",
        "-o",
        other.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    std::fs::copy(other.join("tiny-f32.weights"), &weights).unwrap();
    fails_with(&run(&["--ids", "2"]), &["packed for another build"]);
    // A CPU build's weights.
    let cpu = tmp.path().join("cpu");
    let o = common::griffinc(&[
        "build",
        golden_dir().join("tiny-f32").to_str().unwrap(),
        "-o",
        cpu.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    std::fs::copy(cpu.join("tiny-f32.weights"), &weights).unwrap();
    fails_with(&run(&["--ids", "2"]), &["another build"]);

    std::fs::write(&weights, &good).unwrap();
    succeeded(&run(&["--ids", "2", "--max-new-tokens", "2"]));
}

#[test]
fn generation_allocates_no_buffer_for_every_rows_logits() {
    // With prefill chunks of 2048 tokens, every row's logits take 2048 · 512 · 4 bytes (4.2 MB
    // for tiny-text's vocabulary): more than all the device memory generation reports, which
    // only needs the last row. --logits-out still gets every row.
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("tiny-text", tmp.path(), &["--prefill-chunk", "2048"]);
    let o = on_fake_driver(
        &exe,
        &driver,
        &["--ids", "2,17,5", "--max-new-tokens", "2", "--stats"],
    );
    let stats = succeeded(&o);
    let mb: f64 = stats
        .split("device memory ")
        .nth(1)
        .and_then(|s| s.split(" MB").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no device memory in {stats}"));
    let all_rows_mb = (2048 * 512 * 4) as f64 / 1e6;
    assert!(mb < all_rows_mb, "{mb} MB of device memory: {stats}");
    let logits = tmp.path().join("rows.logits");
    let o = on_fake_driver(
        &exe,
        &driver,
        &["--ids", "2,17,5", "--logits-out", logits.to_str().unwrap()],
    );
    succeeded(&o);
    assert_eq!(read_logits(&logits).0, vec![3, 512]);
}

/// Two greedy steps of `exe` on the stand-in driver posing as a GPU of `capability`.
fn on_gpu_of_capability(exe: &Path, driver: &Path, capability: &str) -> std::process::Output {
    Command::new(exe)
        .args(["--ids", "2,3", "--max-new-tokens", "2", "--format", "ids"])
        .env("LD_LIBRARY_PATH", driver)
        .env("EMUCUDA_COMPUTE_CAPABILITY", capability)
        .output()
        .unwrap()
}

#[test]
fn a_gpu_older_than_hopper_is_a_one_line_error() {
    // The kernels are PTX for sm_90: an A100 (8.0) is refused before any module load; a newer
    // generation compiles the same PTX.
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("tiny-f32", tmp.path(), &[]);
    let run = |capability: &str| on_gpu_of_capability(&exe, &driver, capability);
    fails_with(&run("8.0"), &["compute capability 8.0", "9.0 or newer"]);
    succeeded(&run("10.0"));
}

#[test]
fn a_gpu_without_room_for_the_model_is_a_one_line_error() {
    // Checked against the device's free memory before any allocation: one line naming what
    // the model needs and what the GPU has, no logits file; with room, the same run works.
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("tiny-f32", tmp.path(), &[]);
    let logits = tmp.path().join("never.safetensors");
    let run = |memory: &str| {
        on_fake_driver_with(
            &exe,
            &driver,
            &["--ids", "2,3", "--logits-out", logits.to_str().unwrap()],
            ("EMUCUDA_MEMORY_BYTES", memory),
        )
    };
    fails_with(
        &run("100000"),
        &[
            "the model needs",
            "of device memory (weights",
            "the GPU has 100.0 kB free of 100.0 kB",
        ],
    );
    assert!(!logits.exists());
    succeeded(&run("100000000"));
    assert!(logits.exists());
}

#[test]
fn a_wgmma_executable_on_a_gpu_other_than_hopper_is_a_one_line_error() {
    // `--wgmma` kernels are PTX for sm_90a, which only compute capability 9.0 loads.
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("gen-b64-bf16", tmp.path(), &["--wgmma"]);
    let run = |capability: &str| on_gpu_of_capability(&exe, &driver, capability);
    fails_with(
        &run("10.0"),
        &["compute capability 10.0", "--wgmma", "9.0 only"],
    );
    succeeded(&run("9.0"));
}

/// `griffin-gpu-probe` on the stand-in driver: every probe (tensor-core projections on
/// `mma.sync` and `wgmma`, k parts, the gates) runs in its own process and equals the
/// interpreter exactly, exit 0; a device fault in one probe fails that row only, exit 1;
/// without a driver, one line and exit 1.
#[test]
fn gpu_probe_on_the_fake_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let probe = PathBuf::from(env!("CARGO_BIN_EXE_griffin-gpu-probe"));
    let o = Command::new(&probe)
        .env("LD_LIBRARY_PATH", &driver)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| probe_"))
        .collect();
    assert_eq!(rows.len(), 13, "{stdout}");
    assert!(rows.iter().all(|r| r.ends_with("| 0e0 | ok |")), "{stdout}");
    assert!(rows.iter().any(|r| r.contains("wgmma")), "{stdout}");

    // The first kernel of every probe faults: every row fails, in its own process.
    let o = on_fake_driver_with(&probe, &driver, &[], ("EMUCUDA_FAIL_KERNEL", "1"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    let failed = stdout.lines().filter(|l| l.ends_with("| FAIL |")).count();
    assert_eq!(failed, 13, "{stdout}");
    assert!(stdout.contains("CUDA_ERROR_LAUNCH_FAILED"), "{stdout}");

    let o = Command::new(&probe)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no CUDA driver"), "{stderr}");
    assert!(o.stdout.is_empty());
}

/// `griffin-gpu-probe --bisect` over what a cuda executable dumps: on the stand-in driver every
/// launch of the prefill chunk and the decode step equals the interpreter; a kernel that leaves
/// a wrong value (`EMUCUDA_CORRUPT_KERNEL`) is named as the first that differs, and only it.
#[test]
fn bisect_names_the_first_launch_whose_results_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = fake_driver_dir(tmp.path());
    let exe = build_cuda("tiny-f32", tmp.path(), &[]);
    let plan = tmp.path().join("plan");
    let plan_arg = plan.to_str().unwrap();
    succeeded(&on_fake_driver(
        &exe,
        &driver,
        &["--dump-gpu-plan", plan_arg],
    ));
    for f in ["gpu_plan.json", "module.ptx", "weights.bin"] {
        assert!(plan.join(f).is_file(), "{f}");
    }
    let probe = PathBuf::from(env!("CARGO_BIN_EXE_griffin-gpu-probe"));
    let args = ["--bisect", plan_arg, "--ids", "2,17,5,9"];
    let o = on_fake_driver(&probe, &driver, &args);
    succeeded(&o);
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| {
            ["| prefill chunk |", "| decode step |", "| sampler |"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    assert!(
        rows.iter().any(|r| r.starts_with("| prefill chunk")),
        "{table}"
    );
    assert!(rows.iter().any(|r| r.contains("greedy_argmax")), "{table}");
    // The sampler's 7 launches, its state bit for bit.
    assert_eq!(
        rows.iter().filter(|r| r.starts_with("| sampler |")).count(),
        7,
        "{table}"
    );
    assert!(rows.iter().all(|r| r.ends_with("| ok |")), "{table}");
    assert!(
        table.contains(&format!("all {} launches within", rows.len())),
        "{table}"
    );

    let o = on_fake_driver_with(&probe, &driver, &args, ("EMUCUDA_CORRUPT_KERNEL", "7"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("differs first at launch 7"), "{stderr}");
    let table = String::from_utf8_lossy(&o.stdout);
    let failed: Vec<&str> = table.lines().filter(|l| l.ends_with("| FAIL |")).collect();
    assert_eq!(failed.len(), 1, "{table}");
    assert!(failed[0].starts_with("| prefill chunk | 7 |"), "{table}");

    // A launch that faults ends the replay on its own row.
    let o = on_fake_driver_with(&probe, &driver, &args, ("EMUCUDA_FAIL_KERNEL", "3"));
    assert_eq!(o.status.code(), Some(1));
    let table = String::from_utf8_lossy(&o.stdout);
    let last = table.lines().last().unwrap_or("");
    assert!(
        last.starts_with("| prefill chunk | 3 |") && last.contains("CUDA_ERROR_LAUNCH_FAILED"),
        "{table}"
    );

    // Bad input: a CPU build has no GPU plan; a folder without one; ids past the vocabulary.
    let cpu = tmp.path().join("cpu");
    let o = common::griffinc(&[
        "build",
        golden_dir().join("tiny-f32").to_str().unwrap(),
        "-o",
        cpu.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let nowhere = tmp.path().join("nowhere");
    fails_with(
        &on_fake_driver(
            &cpu.join("tiny-f32"),
            &driver,
            &["--dump-gpu-plan", nowhere.to_str().unwrap()],
        ),
        &["--dump-gpu-plan", "built for the CPU"],
    );
    assert!(!nowhere.exists());
    let o = on_fake_driver(
        &probe,
        &driver,
        &["--bisect", nowhere.to_str().unwrap(), "--ids", "2"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("gpu_plan.json"));
    let o = on_fake_driver(
        &probe,
        &driver,
        &["--bisect", plan_arg, "--ids", "2,999999"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--ids"));
}
