//! A small Rust program that compiles a checkpoint with the CPU backend and generates from it
//! through the runtime, in process:
//!
//!     cargo run --release --example generate -- tests/golden/tiny-text "the quick brown fox"
//!
//! The same pieces `griffinc generate --backend cpu` uses: load and optimise the model, lower
//! and compile it (`CpuEngine`), then run the executor token by token with a sampler.

use std::io::Write;
use std::path::PathBuf;

use griffin_runtime::sampling::{Sampler, SamplingParams};
use griffin_runtime::text::TextStream;
use griffinc::cpu::{CpuEngine, CpuOptions};
use griffinc::session::Model;
use griffinc::tokenizer::TextTokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: generate MODEL_DIR [PROMPT]")?);
    let prompt = args
        .next()
        .unwrap_or_else(|| "In the beginning".to_string());

    let model = Model::load(&dir)?;
    let config = &model.checkpoint.config;
    let tokenizer = TextTokenizer::load(&dir, config.bos_token_id)?;
    let mut engine = CpuEngine::new(&model, &CpuOptions::default())?;
    let executor = engine.executor();
    executor.reset();

    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: 1,
        ..SamplingParams::default()
    });
    let ids = tokenizer.encode(&prompt)?;
    // Prompt in chunks of the plan's size; only the last position's logits are computed.
    let chunk = executor.plan().max_tokens as usize;
    let mut next = 0;
    for c in ids.chunks(chunk) {
        next = sampler.sample(executor.call_last(c)?, &[]);
    }
    let control = [
        config.bos_token_id,
        config.eos_token_id,
        config.pad_token_id,
    ];
    let mut text = TextStream::new(tokenizer.inner(), &control);
    print!("{prompt}");
    for _ in 0..48 {
        if next == config.eos_token_id {
            break;
        }
        print!("{}", text.push(next)?);
        std::io::stdout().flush()?;
        next = sampler.sample(executor.call_last(&[next])?, &[]);
    }
    println!("{}", text.finish()?);
    Ok(())
}
