//! The `griffinc` command line. Names and flags here are a stable interface: scripts and
//! later backends rely on them.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use griffin_ir::{dot, text, Graph};

use crate::passes::{self, stats::kernel_stats, Pass};
use crate::session::{eval, generate_greedy, Model};
use crate::tokenizer::TextTokenizer;

#[derive(Parser, Debug)]
#[command(
    name = "griffinc",
    version,
    about = "Ahead-of-time compiler for Griffin (RecurrentGemma) models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the traced IR of a checkpoint.
    Ir(IrArgs),
    /// Compute logits for given token ids and write them to a safetensors file.
    Eval(EvalArgs),
    /// Continue a prompt greedily.
    Generate(GenerateArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphChoice {
    Prefill,
    Decode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IrFormat {
    Text,
    Dot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The reference interpreter.
    Interp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Ids,
}

#[derive(Args, Debug)]
pub struct IrArgs {
    pub model_dir: PathBuf,
    /// Which graph (default prefill; with --stats, both).
    #[arg(long, value_enum)]
    pub graph: Option<GraphChoice>,
    #[arg(long, value_enum, default_value_t = IrFormat::Text)]
    pub format: IrFormat,
    /// `default`, `none`, or pass names separated by commas.
    #[arg(long, default_value = "default")]
    pub passes: String,
    /// Print the graph after every pass.
    #[arg(long, conflicts_with = "print_after")]
    pub print_after_all: bool,
    /// Print the graph after the named pass.
    #[arg(long, value_name = "NAME")]
    pub print_after: Option<String>,
    /// Stop the pipeline after the named pass.
    #[arg(long, value_name = "NAME")]
    pub stop_after: Option<String>,
    /// Print each pass's time and rewrite count to stderr.
    #[arg(long)]
    pub time_passes: bool,
    /// Print node and kernel counts, one JSON object per line and graph, instead of the IR.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    pub model_dir: PathBuf,
    /// Comma-separated token ids, e.g. 2,17,5.
    #[arg(long)]
    pub ids: String,
    /// How many of the ids go through the prefill graph (default all); the rest are decoded
    /// one at a time.
    #[arg(long)]
    pub prefill: Option<usize>,
    #[arg(long, value_enum, default_value_t = Backend::Interp)]
    pub backend: Backend,
    /// `default`, `none`, or pass names separated by commas.
    #[arg(long, default_value = "default")]
    pub passes: String,
    /// Where to write the `logits` tensor, f32 [T, V].
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    pub model_dir: PathBuf,
    /// Prompt text; needs tokenizer.json in MODEL_DIR. BOS is prepended.
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids (BOS included if wanted).
    #[arg(long)]
    pub ids: Option<String>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Keep going after the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// `text` (default when MODEL_DIR has tokenizer.json) or `ids`, comma-separated.
    #[arg(long, value_enum)]
    pub format: Option<OutputFormat>,
    #[arg(long, value_enum, default_value_t = Backend::Interp)]
    pub backend: Backend,
    /// `default`, `none`, or pass names separated by commas.
    #[arg(long, default_value = "default")]
    pub passes: String,
}

/// Parses `2,17,5`; spaces around ids are allowed.
pub fn parse_ids(text: &str) -> Result<Vec<u32>> {
    if text.trim().is_empty() {
        bail!("--ids is empty: give comma-separated token ids, e.g. --ids 2,17,5");
    }
    text.split(',')
        .map(|part| {
            let part = part.trim();
            part.parse::<u32>().with_context(|| {
                format!("--ids: `{part}` is not a token id (expected a non-negative integer)")
            })
        })
        .collect()
}

fn pipeline(spec: &str) -> Result<Vec<&'static Pass>> {
    passes::parse_pipeline(spec).map_err(|e| anyhow::anyhow!("--passes: {e}"))
}

fn load(dir: &Path, passes: &[&'static Pass]) -> Result<Model> {
    Model::load_with_passes(dir, passes)
        .with_context(|| format!("cannot load model from {}", dir.display()))
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ir(args) => run_ir(args),
        Command::Eval(args) => run_eval(args),
        Command::Generate(args) => run_generate(args),
    }
}

fn run_ir(args: IrArgs) -> Result<()> {
    let passes = pipeline(&args.passes)?;
    for name in [&args.print_after, &args.stop_after].into_iter().flatten() {
        if !passes.iter().any(|p| p.name == name.as_str()) {
            bail!("pass `{name}` is not in the pipeline `{}`", args.passes);
        }
    }
    let model = Model::load_traced(&args.model_dir)
        .with_context(|| format!("cannot load model from {}", args.model_dir.display()))?;
    let layer_types = model.layer_types();
    let graphs: Vec<&Graph> = match (args.graph, args.stats) {
        (Some(GraphChoice::Prefill), _) | (None, false) => vec![&model.prefill],
        (Some(GraphChoice::Decode), _) => vec![&model.decode],
        (None, true) => vec![&model.prefill, &model.decode],
    };
    let render = |g: &Graph| match args.format {
        IrFormat::Text => text::print(g),
        IrFormat::Dot => dot::to_dot(g),
    };
    let mut out = String::new();
    for traced in graphs {
        let mut graph = traced.clone();
        let reports = passes::run_pipeline(
            &mut graph,
            &passes,
            cfg!(debug_assertions),
            args.stop_after.as_deref(),
            |report, g| {
                if args.print_after_all || args.print_after.as_deref() == Some(report.pass) {
                    out.push_str(&format!(
                        "# after {} ({} rewrites)\n",
                        report.pass, report.rewrites
                    ));
                    out.push_str(&render(g));
                }
            },
        )?;
        if args.time_passes {
            for r in &reports {
                eprintln!(
                    "{:>8.3} ms  {:>4} rewrites  {:>5} nodes  {} ({})",
                    r.time.as_secs_f64() * 1e3,
                    r.rewrites,
                    r.nodes_after,
                    r.pass,
                    graph.name
                );
            }
        }
        if args.stats {
            let s = kernel_stats(&graph, &layer_types);
            let unfused = kernel_stats(traced, &layer_types);
            let line = serde_json::json!({
                "graph": graph.name,
                "passes": args.passes,
                "nodes": s.nodes,
                "kernels": s.kernels,
                "kernels_per_layer": s.kernels_per_layer,
                "kernels_outside_layers": s.kernels_outside_layers,
                "unfused_kernels": unfused.kernels,
                "unfused_kernels_per_layer": unfused.kernels_per_layer,
            });
            out.push_str(&format!("{line}\n"));
        } else if !args.print_after_all && args.print_after.is_none() {
            out.push_str(&render(&graph));
        }
    }
    write_stdout(&out)
}

fn write_stdout(s: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(s.as_bytes()).and_then(|_| stdout.flush()) {
        // A closed pipe (`griffinc ir ... | head`) is not an error worth reporting.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to standard output"),
    }
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let ids = parse_ids(&args.ids)?;
    let passes = pipeline(&args.passes)?;
    let model = load(&args.model_dir, &passes)?;
    if let Some(p) = args.prefill {
        if p > ids.len() {
            bail!(crate::RunError::PrefillTooLong {
                prefill: p,
                ids: ids.len()
            });
        }
    }
    model.check_ids(&ids)?;
    let logits = match args.backend {
        Backend::Interp => eval(&model, &ids, args.prefill)?,
    };
    write_logits(&args.out, &logits.shape, logits.floats())
}

/// Writes `logits` to `path` through a temporary file in the same folder, so a failure never
/// leaves a partial file behind.
pub fn write_logits(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .context("cannot build the logits tensor")?;
    let serialized =
        safetensors::serialize([("logits", view)], None).context("cannot serialize logits")?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .with_context(|| format!("--out {}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::write(&tmp, &serialized).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let given_ids = args.ids.as_deref().map(parse_ids).transpose()?;
    let passes = pipeline(&args.passes)?;
    let model = load(&args.model_dir, &passes)?;
    let config = &model.checkpoint.config;
    let bos = config.bos_token_id;
    let control_ids = [bos, config.eos_token_id, config.pad_token_id];
    let has_tokenizer = args.model_dir.join("tokenizer.json").is_file();
    let format = args.format.unwrap_or(if has_tokenizer {
        OutputFormat::Text
    } else {
        OutputFormat::Ids
    });
    let tokenizer = if args.prompt.is_some() || format == OutputFormat::Text {
        Some(TextTokenizer::load(&args.model_dir, bos)?)
    } else {
        None
    };
    let prompt = match (&args.prompt, given_ids) {
        (Some(text), _) => tokenizer
            .as_ref()
            .expect("loaded for --prompt")
            .encode(text)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?,
        (None, Some(ids)) => ids,
        (None, None) => bail!("give a prompt with --prompt TEXT or --ids 2,17,5"),
    };
    model.check_ids(&prompt)?;
    let new_ids = match args.backend {
        Backend::Interp => generate_greedy(
            &model,
            &prompt,
            args.max_new_tokens,
            args.ignore_eos,
            |_| {},
        )?,
    };
    let out = match format {
        OutputFormat::Ids => {
            let parts: Vec<String> = new_ids.iter().map(u32::to_string).collect();
            parts.join(",")
        }
        OutputFormat::Text => tokenizer
            .as_ref()
            .expect("loaded for --format text")
            .decode(&new_ids, &control_ids)
            .map_err(|e| anyhow::anyhow!("cannot decode generated ids: {e}"))?,
    };
    write_stdout(&format!("{out}\n"))
}
