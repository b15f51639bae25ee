//! The main program of every executable `griffinc build` writes. It is linked, as a static
//! library, with the object file holding the generated kernels, the kernel table and the
//! execution plan; the packed weights lie beside the executable in `<name>.weights`.

use std::ffi::c_int;
use std::io::Write;
use std::path::PathBuf;

use griffin_runtime::plan::Plan;
use griffin_runtime::sampling::{Sampler, SamplingParams};
use griffin_runtime::stats::GenerationTimer;
use griffin_runtime::text::{StopScanner, TextStream};
use griffin_runtime::weights::Weights;
use griffin_runtime::{Executor, KernelFn};

extern "C" {
    /// The execution plan as JSON.
    static griffin_plan: u8;
    static griffin_plan_len: u64;
    /// One kernel per launch of the plan, in launch order.
    static griffin_kernel_table: KernelFn;
    static griffin_kernel_count: u64;
    /// Packed weights linked in with `--embed-weights` (length 0 otherwise).
    static griffin_embedded_weights: u8;
    static griffin_embedded_weights_len: u64;
    /// `tokenizer.json` of the model folder (length 0 if it had none).
    static griffin_tokenizer: u8;
    static griffin_tokenizer_len: u64;
    /// For `--target cuda`: the GPU plan as JSON and the PTX module (length 0 for CPU builds,
    /// whose kernels are in the kernel table instead).
    static griffin_gpu_plan: u8;
    static griffin_gpu_plan_len: u64;
    static griffin_ptx: u8;
    static griffin_ptx_len: u64;
}

/// The GPU plan and PTX of a `--target cuda` build.
fn embedded_gpu() -> Result<Option<(griffin_runtime::gpu_plan::GpuPlan, String)>, String> {
    // SAFETY: the object file defines these symbols with these types.
    let (plan, ptx) = unsafe {
        (
            std::slice::from_raw_parts(
                &griffin_gpu_plan as *const u8,
                griffin_gpu_plan_len as usize,
            ),
            std::slice::from_raw_parts(&griffin_ptx as *const u8, griffin_ptx_len as usize),
        )
    };
    if plan.is_empty() {
        return Ok(None);
    }
    let plan =
        serde_json::from_slice(plan).map_err(|e| format!("embedded GPU plan is corrupt: {e}"))?;
    let ptx =
        String::from_utf8(ptx.to_vec()).map_err(|_| "embedded PTX is not text".to_string())?;
    Ok(Some((plan, ptx)))
}

/// What runs the model: the CPU executor, or the CUDA executor of a `--target cuda` build
/// (one token per call; greedy decoding picks the next id on the device). One lives per
/// process, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Engine {
    Cpu(Executor),
    Cuda(griffin_runtime::cuda::CudaExecutor),
}

impl Engine {
    fn check_ids(&self, ids: &[u32]) -> Result<(), String> {
        match self {
            Engine::Cpu(e) => e.check_ids(ids),
            Engine::Cuda(e) => e.check_ids(ids),
        }
        .map_err(|e| e.to_string())
    }

    /// Logits of every token of `ids` run as a prompt (prefill chunks), appended to `rows`.
    fn rows(&mut self, ids: &[u32], rows: &mut Vec<f32>) -> Result<(), String> {
        match self {
            Engine::Cpu(e) => rows.extend_from_slice(e.call(ids).map_err(|e| e.to_string())?),
            Engine::Cuda(e) => {
                for c in ids.chunks(e.prefill_max_tokens()) {
                    rows.extend_from_slice(e.prefill_chunk(c, true).map_err(|e| e.to_string())?);
                }
            }
        }
        Ok(())
    }

    /// Logits of one token run as a decode step, appended to `rows`.
    fn step_rows(&mut self, id: u32, rows: &mut Vec<f32>) -> Result<(), String> {
        match self {
            Engine::Cpu(_) => self.rows(&[id], rows),
            Engine::Cuda(e) => {
                rows.extend_from_slice(e.step(id).map_err(|e| e.to_string())?);
                Ok(())
            }
        }
    }

    /// Logits of the last token of `ids` (a prompt chunk, or one token to decode).
    fn last(&mut self, ids: &[u32]) -> Result<&[f32], String> {
        match self {
            Engine::Cpu(e) => e.call_last(ids).map_err(|e| e.to_string()),
            Engine::Cuda(e) => {
                if let [id] = ids {
                    return e.step(*id).map_err(|e| e.to_string());
                }
                let max = e.prefill_max_tokens();
                let mut chunks = ids.chunks(max).peekable();
                while let Some(c) = chunks.next() {
                    if chunks.peek().is_none() {
                        return e.prefill_chunk(c, false).map_err(|e| e.to_string());
                    }
                    e.prefill_chunk(c, false).map_err(|e| e.to_string())?;
                }
                Err("no token ids given".into())
            }
        }
    }

    fn threads(&self) -> usize {
        match self {
            Engine::Cpu(e) => e.threads(),
            Engine::Cuda(_) => 1,
        }
    }
}

fn embedded_tokenizer() -> Result<Option<tokenizers::Tokenizer>, String> {
    // SAFETY: the object file defines these symbols with these types.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &griffin_tokenizer as *const u8,
            griffin_tokenizer_len as usize,
        )
    };
    if bytes.is_empty() {
        return Ok(None);
    }
    tokenizers::Tokenizer::from_bytes(bytes)
        .map(Some)
        .map_err(|e| {
            format!(
                "packed tokenizer is corrupt: {}",
                e.to_string().replace('\n', " ")
            )
        })
}

fn embedded_weights() -> Option<&'static [u8]> {
    // SAFETY: the object files define these symbols with these types.
    let data = unsafe {
        std::slice::from_raw_parts(
            &griffin_embedded_weights as *const u8,
            griffin_embedded_weights_len as usize,
        )
    };
    (!data.is_empty()).then_some(data)
}

const USAGE: &str =
    "usage: MODEL (--prompt TEXT | --ids 2,17,5) [--max-new-tokens N] [--ignore-eos] [--format text|ids] \
[--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R] [--seed S] [--stop STRING] \
[--prefill N --logits-out FILE] [--threads N] [--weights FILE] [--pack-weights-from MODEL_DIR] [--stats] \
[--profile] [--dump-gpu-plan DIR]";

#[derive(PartialEq)]
enum Format {
    Text,
    Ids,
}

struct Args {
    ids: Vec<u32>,
    prompt: Option<String>,
    format: Option<Format>,
    max_new_tokens: usize,
    ignore_eos: bool,
    prefill: Option<usize>,
    logits_out: Option<PathBuf>,
    threads: usize,
    weights: Option<PathBuf>,
    pack_from: Option<PathBuf>,
    stats: bool,
    /// GPU builds: after generating, time one prefill chunk and one decode step kernel by
    /// kernel.
    profile: bool,
    /// GPU builds: write the GPU plan, PTX module and packed weights to this folder and stop
    /// (for `griffin-gpu-probe --bisect`).
    dump_gpu_plan: Option<PathBuf>,
    sampling: SamplingParams,
    stops: Vec<String>,
}

fn parse_ids(text: &str) -> Result<Vec<u32>, String> {
    if text.trim().is_empty() {
        return Err("--ids is empty: give comma-separated token ids, e.g. --ids 2,17,5".into());
    }
    text.split(',')
        .map(|p| {
            let p = p.trim();
            p.parse().map_err(|_| {
                format!("--ids: `{p}` is not a token id (expected a non-negative integer)")
            })
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        ids: Vec::new(),
        prompt: None,
        format: None,
        max_new_tokens: 32,
        ignore_eos: false,
        prefill: None,
        logits_out: None,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        weights: None,
        pack_from: None,
        stats: false,
        profile: false,
        dump_gpu_plan: None,
        sampling: SamplingParams::default(),
        stops: Vec::new(),
    };
    let mut have_ids = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value ({USAGE})"))
        };
        let number = |name: &str, v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: `{v}` is not a number"))
        };
        let float = |name: &str, v: String| {
            v.parse::<f32>()
                .map_err(|_| format!("{name}: `{v}` is not a number"))
        };
        match flag.as_str() {
            "--ids" => {
                args.ids = parse_ids(&value("--ids")?)?;
                have_ids = true;
            }
            "--max-new-tokens" => {
                args.max_new_tokens = number("--max-new-tokens", value("--max-new-tokens")?)?
            }
            "--ignore-eos" => args.ignore_eos = true,
            "--prefill" => args.prefill = Some(number("--prefill", value("--prefill")?)?),
            "--logits-out" => args.logits_out = Some(PathBuf::from(value("--logits-out")?)),
            "--threads" => {
                args.threads = number("--threads", value("--threads")?)?;
                if args.threads == 0 {
                    return Err("--threads must be at least 1".into());
                }
            }
            "--weights" => args.weights = Some(PathBuf::from(value("--weights")?)),
            "--pack-weights-from" => {
                args.pack_from = Some(PathBuf::from(value("--pack-weights-from")?))
            }
            "--stats" => args.stats = true,
            "--profile" => args.profile = true,
            "--dump-gpu-plan" => {
                args.dump_gpu_plan = Some(PathBuf::from(value("--dump-gpu-plan")?))
            }
            "--temperature" => {
                args.sampling.temperature = float("--temperature", value("--temperature")?)?
            }
            "--top-k" => args.sampling.top_k = number("--top-k", value("--top-k")?)?,
            "--top-p" => args.sampling.top_p = float("--top-p", value("--top-p")?)?,
            "--min-p" => args.sampling.min_p = float("--min-p", value("--min-p")?)?,
            "--repetition-penalty" => {
                args.sampling.repetition_penalty =
                    float("--repetition-penalty", value("--repetition-penalty")?)?
            }
            "--seed" => args.sampling.seed = number("--seed", value("--seed")?)? as u64,
            "--stop" => args.stops.push(value("--stop")?),
            "--format" => {
                args.format = Some(match value("--format")?.as_str() {
                    "text" => Format::Text,
                    "ids" => Format::Ids,
                    other => return Err(format!("--format {other}: expected `text` or `ids`")),
                })
            }
            "--prompt" => args.prompt = Some(value("--prompt")?),
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument `{other}` ({USAGE})")),
        }
    }
    args.sampling.validate()?;
    if have_ids && args.prompt.is_some() {
        return Err("give --prompt or --ids, not both".into());
    }
    if !have_ids
        && args.prompt.is_none()
        && args.pack_from.is_none()
        && args.dump_gpu_plan.is_none()
    {
        return Err(format!(
            "give a prompt with --prompt TEXT or --ids ({USAGE})"
        ));
    }
    Ok(args)
}

fn embedded_plan() -> Result<Plan, String> {
    // SAFETY: the object file defines these symbols with these types.
    let (bytes, table) = unsafe {
        let bytes =
            std::slice::from_raw_parts(&griffin_plan as *const u8, griffin_plan_len as usize);
        let table = std::slice::from_raw_parts(
            &griffin_kernel_table as *const KernelFn,
            griffin_kernel_count as usize,
        );
        (bytes, table)
    };
    let plan: Plan =
        serde_json::from_slice(bytes).map_err(|e| format!("embedded plan is corrupt: {e}"))?;
    if plan.launches.len() != table.len() {
        return Err("embedded plan and kernel table disagree".into());
    }
    Ok(plan)
}

fn kernel_table() -> &'static [KernelFn] {
    // SAFETY: as in `embedded_plan`.
    unsafe {
        std::slice::from_raw_parts(
            &griffin_kernel_table as *const KernelFn,
            griffin_kernel_count as usize,
        )
    }
}

fn default_weights_path() -> Result<PathBuf, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find this executable's path: {e}"))?;
    let mut name = exe.file_name().unwrap_or_default().to_os_string();
    name.push(".weights");
    Ok(exe.with_file_name(name))
}

/// Packs the weights file from the original checkpoint folder, on the machine where the
/// executable runs; the result must hash to what the build recorded.
fn pack_weights(plan: &Plan, dir: &std::path::Path, out: &std::path::Path) -> Result<(), String> {
    if !dir.join("config.json").is_file() {
        return Err(format!(
            "{}: no config.json in this folder (is it the checkpoint this was built from?)",
            dir.display()
        ));
    }
    let source = griffin_runtime::safetensors_dir::SafetensorsDir::open(dir)?;
    let mut packed = plan.clone();
    let data = griffin_runtime::pack::pack(&mut packed, &source).map_err(|e| {
        format!(
            "{}: this checkpoint is not the one the executable was built from (cannot pack: {e})",
            dir.display()
        )
    })?;
    if packed.weights_hash != plan.weights_hash {
        return Err(format!(
            "{}: this checkpoint is not the one the executable was built from (packed weights hash {}, expected {})",
            dir.display(),
            packed.weights_hash,
            plan.weights_hash
        ));
    }
    griffin_runtime::weights::write(out, &plan.weights_hash, &data).map_err(|e| e.to_string())?;
    eprintln!(
        "packed {:.1} MB of weights into {}",
        data.len() as f64 / 1e6,
        out.display()
    );
    Ok(())
}

/// Writes what `griffin-gpu-probe --bisect` needs to replay this build's launches one at a
/// time: `gpu_plan.json`, `module.ptx`, `weights.bin` (the packed weights as uploaded).
fn dump_gpu_plan(
    dir: &std::path::Path,
    plan: &griffin_runtime::gpu_plan::GpuPlan,
    ptx: &str,
    weights: &[u8],
) -> Result<(), String> {
    let json = serde_json::to_vec(plan).map_err(|e| format!("cannot write the GPU plan: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (name, bytes) in [
        ("gpu_plan.json", &json[..]),
        ("module.ptx", ptx.as_bytes()),
        ("weights.bin", weights),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let plan = embedded_plan()?;
    let vocab = plan.vocab_size as usize;
    let eos = plan.eos_token_id;
    let cpu_chunk = plan.max_tokens as usize;
    let weights_path = match &args.weights {
        Some(p) => p.clone(),
        None => default_weights_path()?,
    };
    if let Some(dir) = &args.pack_from {
        pack_weights(&plan, dir, &weights_path)?;
        if args.ids.is_empty() && args.prompt.is_none() {
            return Ok(());
        }
    }
    let tokenizer = embedded_tokenizer()?;
    let format = match (&args.format, &tokenizer) {
        (Some(Format::Text), None) => {
            return Err("--format text: this executable has no tokenizer packed".into())
        }
        (Some(Format::Ids), _) | (None, None) => Format::Ids,
        (Some(Format::Text), Some(_)) | (None, Some(_)) => Format::Text,
    };
    let mut args = args;
    if let Some(prompt) = &args.prompt {
        let tok = tokenizer
            .as_ref()
            .ok_or("--prompt: this executable has no tokenizer packed (its model folder had no tokenizer.json); pass --ids")?;
        let encoding = tok
            .encode(prompt.as_str(), true)
            .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.first() != Some(&plan.bos_token_id) {
            ids.insert(0, plan.bos_token_id);
        }
        args.ids = ids;
    }
    let control = [plan.bos_token_id, plan.eos_token_id, plan.pad_token_id];
    let gpu = embedded_gpu()?;
    // Before any weights are read.
    if args.profile && gpu.is_none() {
        return Err(
            "--profile times GPU kernels: this executable was built for the CPU (build with --target cuda)"
                .into(),
        );
    }
    if args.dump_gpu_plan.is_some() && gpu.is_none() {
        return Err(
            "--dump-gpu-plan: this executable was built for the CPU (build with --target cuda)"
                .into(),
        );
    }
    let weights = match (embedded_weights(), &args.weights) {
        (Some(data), None) => Weights::from_static(data),
        _ => Weights::open(&weights_path, &plan.weights_hash).map_err(|e| e.to_string())?,
    };
    if let (Some(dir), Some((gpu_plan, ptx))) = (&args.dump_gpu_plan, &gpu) {
        return dump_gpu_plan(dir, gpu_plan, ptx, weights.bytes());
    }
    let mut exec = match gpu {
        Some((gpu_plan, ptx)) => Engine::Cuda(
            // Every row's logits only for --logits-out.
            if args.logits_out.is_some() {
                griffin_runtime::cuda::CudaExecutor::new(gpu_plan, &ptx, weights.bytes())
            } else {
                griffin_runtime::cuda::CudaExecutor::for_generation(gpu_plan, &ptx, weights.bytes())
            }
            .map_err(|e| e.to_string())?,
        ),
        None => {
            let table = kernel_table();
            let symbols: Vec<String> = plan.launches.iter().map(|l| l.kernel.clone()).collect();
            let resolve = |s: &str| symbols.iter().position(|k| k == s).map(|i| table[i]);
            Engine::Cpu(
                Executor::new(plan, &resolve, weights, args.threads).map_err(|e| e.to_string())?,
            )
        }
    };
    exec.check_ids(&args.ids)?;
    // The GPU engine cuts a prompt into its own prefill chunks (`rows`, `last`): one call.
    let chunk = match &exec {
        Engine::Cpu(_) => cpu_chunk,
        Engine::Cuda(_) => usize::MAX,
    };

    if let Some(path) = &args.logits_out {
        let prefill = args.prefill.unwrap_or(args.ids.len());
        if prefill > args.ids.len() {
            return Err(format!(
                "--prefill {prefill} is larger than the {} ids given",
                args.ids.len()
            ));
        }
        let mut rows = Vec::with_capacity(args.ids.len() * vocab);
        for c in args.ids[..prefill].chunks(chunk) {
            exec.rows(c, &mut rows)?;
        }
        for &id in &args.ids[prefill..] {
            exec.step_rows(id, &mut rows)?;
        }
        return griffin_runtime::output::write_logits(path, &[args.ids.len(), vocab], &rows)
            .map_err(|e| e.to_string());
    }
    if args.prefill.is_some() {
        return Err("--prefill goes with --logits-out".into());
    }

    let mut sampler = Sampler::new(args.sampling.clone());
    // History is kept only for the repetition penalty, so greedy runs stay in constant memory.
    let mut history: Vec<u32> = if args.sampling.repetition_penalty != 1.0 {
        args.ids.clone()
    } else {
        Vec::new()
    };
    let mut timer = GenerationTimer::start(args.ids.len());
    let mut next = 0;
    for c in args.ids.chunks(chunk) {
        let logits = exec.last(c)?;
        next = sampler.sample(logits, &history);
    }
    // Ids are printed as they come, through a fixed buffer: memory stays flat however many
    // tokens are generated.
    let stdout = std::io::stdout();
    let mut writer = std::io::BufWriter::with_capacity(8192, stdout.lock());
    let mut produced = 0usize;
    let mut stream = tokenizer.as_ref().map(|t| TextStream::new(t, &control));
    if !args.stops.is_empty() && stream.is_none() {
        return Err("--stop: this executable has no tokenizer packed to read the text with".into());
    }
    let mut stops = StopScanner::new(&args.stops);
    let mut stopped = false;
    let mut on_device = false;
    // GRIFFIN_SAMPLE_ON_HOST=1 copies each step's logits back and samples here instead (the
    // same ids: a check, and a way around a device sampler problem).
    let sample_on_host = std::env::var("GRIFFIN_SAMPLE_ON_HOST").as_deref() == Ok("1");
    while produced < args.max_new_tokens {
        let piece = match &mut stream {
            Some(s) => s.push(next)?,
            None => String::new(),
        };
        let (printable, hit) = stops.push(&piece);
        stopped = hit;
        if format == Format::Text {
            write!(writer, "{printable}").map_err(|e| format!("cannot write output: {e}"))?;
            writer
                .flush()
                .map_err(|e| format!("cannot write output: {e}"))?;
        } else {
            let separator = if produced == 0 { "" } else { "," };
            write!(writer, "{separator}{next}").map_err(|e| format!("cannot write output: {e}"))?;
        }
        produced += 1;
        timer.token();
        if hit || (next == eos && !args.ignore_eos) || produced == args.max_new_tokens {
            break;
        }
        if args.sampling.repetition_penalty != 1.0 {
            history.push(next);
        }
        next = match (&mut exec, sampler.is_greedy()) {
            // Greedy on the GPU: the argmax runs on the device, one id comes back.
            (Engine::Cuda(e), true) => e.step_greedy(next).map_err(|e| e.to_string())?,
            // Sampled on the GPU: the device sampler draws what `sampler` would, from its
            // generator's state and the history's seen bits, handed over once.
            (Engine::Cuda(e), false) if e.samples_on_device() && !sample_on_host => {
                if !on_device {
                    e.start_sampling(&sampler, &history)
                        .map_err(|e| e.to_string())?;
                    on_device = true;
                }
                e.step_sampled(next, None).map_err(|e| e.to_string())?
            }
            _ => {
                let logits = exec.last(&[next])?;
                sampler.sample(logits, &history)
            }
        };
    }
    if let (Format::Text, Some(s), false) = (&format, &mut stream, stopped) {
        let (printable, hit) = stops.push(&s.finish()?);
        write!(writer, "{printable}").map_err(|e| format!("cannot write output: {e}"))?;
        if !hit {
            write!(writer, "{}", stops.finish())
                .map_err(|e| format!("cannot write output: {e}"))?;
        }
    }
    writeln!(writer)
        .and_then(|_| writer.flush())
        .map_err(|e| format!("cannot write output: {e}"))?;
    if args.stats {
        let device = match &exec {
            Engine::Cuda(e) => format!(", device memory {:.1} MB", e.device_bytes as f64 / 1e6),
            Engine::Cpu(_) => String::new(),
        };
        eprintln!("{}{device}", timer.report(exec.threads()));
    }
    if let (true, Engine::Cuda(e)) = (args.profile, &mut exec) {
        profile(e, &args.ids, next, on_device)?;
    }
    Ok(())
}

/// `--profile`: from a fresh document, the prompt's first chunk as a prefill chunk and one
/// decode step after it, each launch timed by events (no graph), as tables on stderr.
fn profile(
    e: &mut griffin_runtime::cuda::CudaExecutor,
    ids: &[u32],
    next: u32,
    sampled: bool,
) -> Result<(), String> {
    use griffin_runtime::stats::profile_table;
    e.reset().map_err(|e| e.to_string())?;
    let chunk = &ids[..ids.len().min(e.prefill_max_tokens())];
    if let Some(times) = e.profile_prefill(chunk).map_err(|e| e.to_string())? {
        let title = format!("prefill chunk of {} tokens", chunk.len());
        eprintln!("{}", profile_table(&title, &times));
    }
    let times = e.profile_step(next, sampled).map_err(|e| e.to_string())?;
    let what = if sampled {
        "sampled decode step"
    } else {
        "decode step"
    };
    let title = format!("{what} at position {}", chunk.len());
    eprintln!("{}", profile_table(&title, &times));
    Ok(())
}

/// The C entry point of the executable.
#[no_mangle]
pub extern "C" fn main(_argc: c_int, _argv: *const *const std::ffi::c_char) -> c_int {
    match std::panic::catch_unwind(run) {
        Ok(Ok(())) => 0,
        Ok(Err(message)) => {
            eprintln!("error: {}", message.replace('\n', " "));
            1
        }
        Err(_) => {
            eprintln!("error: internal error (a bug: please report it)");
            2
        }
    }
}
