//! `griffin-gpu-probe`: runs the PTX backend's probe kernels (`griffin_backend_ptx::probe`:
//! tensor-core projections on `mma.sync` and `wgmma`, in k parts, the RG-LRU's gates, chunk
//! attention) on GPU 0
//! and in the PTX interpreter, and prints per probe how far the device's results are from the
//! interpreter's, as a table. Each probe runs in a process of its own (this program again, with
//! `--case NAME`), so a fault that poisons one CUDA context does not hide the others. Exit 1 if
//! any probe differs past `PROBE_TOLERANCE` or fails. Uses neither LLVM nor a model: the GPU
//! machine runs it as carried (`scripts/gpu-check.sh`).
//!
//! `--bisect DIR --ids LIST` replays a built model's launches one at a time against the
//! interpreter instead (`bisect.rs`).

mod bisect;

use std::process::{Command, ExitCode};

use griffin_backend_ptx::probe::{cases, ProbeCase, PROBE_TOLERANCE};
use griffin_runtime::cuda::{probe as driver_present, run_kernels, KernelRun};

/// The device's results for `case` against the interpreter's: the relative difference.
fn run_case(case: &ProbeCase) -> Result<f32, String> {
    let want = case.interpret().map_err(|e| format!("interpreter: {e}"))?;
    let launches: Vec<KernelRun> = case
        .launches
        .iter()
        .map(|l| KernelRun {
            kernel: l.kernel.clone(),
            grid: l.grid,
            block: l.block,
            buffers: l.params.clone(),
            offsets: Vec::new(),
        })
        .collect();
    let got = run_kernels(&case.ptx, &case.buffers, &launches).map_err(|e| e.to_string())?;
    Ok(case.difference(&want, &got))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all = cases();
    match args.as_slice() {
        [flag, name] if flag == "--case" => {
            let Some(case) = all.iter().find(|c| &c.name == name) else {
                eprintln!("error: no probe named {name}");
                return ExitCode::from(2);
            };
            match run_case(case) {
                Ok(d) => {
                    println!("{d:e}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("{}", e.lines().next().unwrap_or(""));
                    ExitCode::FAILURE
                }
            }
        }
        [] => {
            if let Err(e) = driver_present() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let Ok(me) = std::env::current_exe() else {
                eprintln!("error: cannot find this program's own path to run the probes");
                return ExitCode::FAILURE;
            };
            println!("| probe | relative difference (bound {PROBE_TOLERANCE:e}) | |");
            println!("| --- | --- | --- |");
            let mut failed = 0;
            for case in &all {
                let (text, ok) = match Command::new(&me).args(["--case", &case.name]).output() {
                    Ok(o) => {
                        let line = String::from_utf8_lossy(&o.stdout).trim().to_string();
                        let within = line.parse::<f32>().is_ok_and(|d| d <= PROBE_TOLERANCE);
                        let shown = if line.is_empty() {
                            format!("no result ({})", o.status)
                        } else {
                            line
                        };
                        (shown, o.status.success() && within)
                    }
                    Err(e) => (format!("could not run: {e}"), false),
                };
                failed += usize::from(!ok);
                let verdict = if ok { "ok" } else { "FAIL" };
                println!("| {} | {text} | {verdict} |", case.name);
            }
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: {failed} of {} probes differ or failed", all.len());
                ExitCode::FAILURE
            }
        }
        [flag, dir, ids_flag, ids] if flag == "--bisect" && ids_flag == "--ids" => {
            if let Err(e) = driver_present() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let ids: Result<Vec<u32>, _> = ids.split(',').map(|i| i.trim().parse()).collect();
            let Ok(ids) = ids else {
                eprintln!("error: --ids: expected comma-separated token ids");
                return ExitCode::from(2);
            };
            match bisect::bisect(std::path::Path::new(dir), &ids) {
                Ok(rows) => report_bisect(&rows),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("error: usage: griffin-gpu-probe [--case NAME | --bisect DIR --ids 2,17,5]");
            ExitCode::from(2)
        }
    }
}

/// The bisect's table, then the first launch past the bound (exit 1) or that none is.
fn report_bisect(rows: &[bisect::Row]) -> ExitCode {
    let bound = bisect::BISECT_TOLERANCE;
    println!("| program | launch | kernel | relative difference (bound {bound:e}) | |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows {
        let verdict = if r.difference <= bound { "ok" } else { "FAIL" };
        println!(
            "| {} | {} | {} | {:e} | {verdict} |",
            r.program, r.index, r.kernel, r.difference
        );
    }
    match rows
        .iter()
        .find(|r| r.difference.is_nan() || r.difference > bound)
    {
        Some(r) => {
            eprintln!(
                "error: the {} differs first at launch {} (`{}`): {:e}",
                r.program, r.index, r.kernel, r.difference
            );
            ExitCode::FAILURE
        }
        None => {
            println!("all {} launches within {bound:e}", rows.len());
            ExitCode::SUCCESS
        }
    }
}
