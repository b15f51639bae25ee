//! The `griffinc` command line. Names and flags here are a stable interface: scripts and
//! later backends rely on them.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use griffin_ir::{dot, text};

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
    #[arg(long, value_enum, default_value_t = GraphChoice::Prefill)]
    pub graph: GraphChoice,
    #[arg(long, value_enum, default_value_t = IrFormat::Text)]
    pub format: IrFormat,
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

fn load(dir: &Path) -> Result<Model> {
    Model::load(dir).with_context(|| format!("cannot load model from {}", dir.display()))
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ir(args) => run_ir(args),
        Command::Eval(args) => run_eval(args),
        Command::Generate(args) => run_generate(args),
    }
}

fn run_ir(args: IrArgs) -> Result<()> {
    let model = load(&args.model_dir)?;
    let graph = match args.graph {
        GraphChoice::Prefill => &model.prefill,
        GraphChoice::Decode => &model.decode,
    };
    let out = match args.format {
        IrFormat::Text => text::print(graph),
        IrFormat::Dot => dot::to_dot(graph),
    };
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
    let model = load(&args.model_dir)?;
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
    let model = load(&args.model_dir)?;
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
