//! A loaded model and a running session over it: the carried state, the position, and the
//! calls that feed tokens through the prefill and decode graphs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use griffin_ir::{verify, Graph, InputRole, ValueType};

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, RunError};
use crate::interp::{Interpreter, Tensor};
use crate::passes::{optimize, Pass, PASSES};
use crate::sampling::{Sampler, SamplingParams};
use crate::trace::{names, trace, GraphKind};

/// A validated checkpoint with its traced graphs.
pub struct Model {
    pub checkpoint: Checkpoint,
    pub prefill: Graph,
    pub decode: Graph,
}

impl Model {
    /// Loads, traces and optimises with the default pipeline.
    pub fn load(dir: &Path) -> Result<Model, ModelError> {
        let passes: Vec<&'static Pass> = PASSES.iter().collect();
        Model::load_with_passes(dir, &passes)
    }

    /// Loads and traces, then runs `passes` on both graphs.
    pub fn load_with_passes(dir: &Path, passes: &[&'static Pass]) -> Result<Model, ModelError> {
        let mut model = Model::load_traced(dir)?;
        let _stage = crate::progress::spinner("optimizing", format!("{} passes", passes.len()));
        for graph in [&mut model.prefill, &mut model.decode] {
            optimize(graph, passes).map_err(|source| ModelError::Pass {
                graph: if graph.name == "prefill" {
                    "prefill"
                } else {
                    "decode"
                },
                source,
            })?;
        }
        Ok(model)
    }

    /// Loads and traces, with no pass run.
    pub fn load_traced(dir: &Path) -> Result<Model, ModelError> {
        let stage = crate::progress::spinner("loading", dir.display().to_string());
        let checkpoint = Checkpoint::open(dir)?;
        drop(stage);
        tracing::info!(
            layers = checkpoint.config.layers.len(),
            hidden = checkpoint.config.hidden_size,
            vocab = checkpoint.config.vocab_size,
            "checkpoint validated"
        );
        let _stage = crate::progress::spinner("tracing", "prefill and decode graphs");
        let params: BTreeMap<String, ValueType> = checkpoint
            .config
            .expected_tensors()
            .into_iter()
            .map(|(name, _)| {
                let ty = checkpoint
                    .value_type(&name)
                    .expect("validated checkpoint has every tensor");
                (name, ty)
            })
            .collect();
        let mut graphs = [GraphKind::Prefill, GraphKind::Decode]
            .into_iter()
            .map(|kind| {
                let g = trace(&checkpoint.config, &params, kind).map_err(|source| {
                    ModelError::Trace {
                        graph: kind.name(),
                        source,
                    }
                })?;
                verify(&g).unwrap_or_else(|e| {
                    panic!("traced {} graph does not verify: {e}", kind.name())
                });
                Ok::<_, ModelError>(g)
            });
        let prefill = graphs.next().expect("two graphs")?;
        let decode = graphs.next().expect("two graphs")?;
        Ok(Model {
            checkpoint,
            prefill,
            decode,
        })
    }

    /// Type names of the layers, in order (for kernel statistics).
    pub fn layer_types(&self) -> Vec<&'static str> {
        self.checkpoint
            .config
            .layers
            .iter()
            .map(|b| b.name())
            .collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.checkpoint.config.vocab_size
    }

    /// Rejects empty input and ids outside the vocabulary before anything runs.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), RunError> {
        check_ids(ids, self.vocab_size())
    }
}

/// Token ids a call may take: at least one, each below the vocabulary size.
pub fn check_ids(ids: &[u32], vocab: usize) -> Result<(), RunError> {
    if ids.is_empty() {
        return Err(RunError::EmptyIds);
    }
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(&id) => Err(RunError::TokenOutOfRange { id, vocab }),
        None => Ok(()),
    }
}

/// One document in flight: carried state and the position of the next token.
pub struct Session<'m> {
    model: &'m Model,
    interp: Interpreter<'m>,
    state: HashMap<String, Tensor>,
    position: usize,
}

fn zero_state(graph: &Graph) -> HashMap<String, Tensor> {
    graph
        .inputs()
        .into_iter()
        .filter(|(_, _, role, _)| *role == InputRole::State)
        .map(|(_, name, _, ty)| {
            let shape = ty
                .shape
                .dims()
                .iter()
                .map(|d| d.fixed().expect("state has a fixed shape") as usize)
                .collect();
            (name.to_string(), Tensor::zeros(shape))
        })
        .collect()
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model) -> Session<'m> {
        Session {
            model,
            interp: Interpreter::new(&model.checkpoint),
            state: zero_state(&model.decode),
            position: 0,
        }
    }

    pub fn position(&self) -> usize {
        self.position
    }

    /// Feeds `ids` through `graph`, carrying state; returns logits `[len, V]`.
    fn call(&mut self, graph: &Graph, ids: &[u32]) -> Result<Tensor, RunError> {
        self.model.check_ids(ids)?;
        let mut inputs = std::mem::take(&mut self.state);
        inputs.insert(
            names::TOKENS.into(),
            Tensor::i32(vec![ids.len()], ids.iter().map(|&i| i as i64).collect()),
        );
        inputs.insert(
            names::START.into(),
            Tensor::i32(vec![], vec![self.position as i64]),
        );
        let result = self.interp.run(graph, &inputs);
        inputs.remove(names::TOKENS);
        inputs.remove(names::START);
        let mut outputs = match result {
            Ok(o) => o,
            Err(e) => {
                self.state = inputs;
                return Err(RunError::Interp(e));
            }
        };
        let logits = outputs
            .remove(names::LOGITS)
            .expect("graph has a logits output");
        self.state = outputs;
        self.position += ids.len();
        Ok(logits)
    }

    /// Runs a prompt chunk through the prefill graph; logits for every position.
    pub fn prefill_all(&mut self, ids: &[u32]) -> Result<Tensor, RunError> {
        let graph = &self.model.prefill;
        self.call(graph, ids)
    }

    /// Runs one token through the decode graph; its logits.
    pub fn step_one(&mut self, id: u32) -> Result<Vec<f32>, RunError> {
        let graph = &self.model.decode;
        let logits = self.call(graph, &[id])?;
        Ok(logits.floats().to_vec())
    }
}

/// Something that runs a model over a document, carrying its state: the interpreter session,
/// or a compiled backend.
pub trait Engine {
    /// Starts a new document.
    fn reset(&mut self);
    /// Runs `ids` as (part of) the prompt; `on_logits` sees the logits rows `[n, V]` of each
    /// chunk it ran, in order.
    fn prefill(&mut self, ids: &[u32], on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError>;
    /// Runs one token; `on_logits` sees its logits `[V]`.
    fn step(&mut self, id: u32, on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError>;
    /// Runs `ids` as the prompt and returns the logits of its last token only (an engine may
    /// skip computing the others).
    fn prefill_last(&mut self, ids: &[u32]) -> Result<Vec<f32>, RunError> {
        let mut last = Vec::new();
        self.prefill(ids, &mut |rows| {
            last.clear();
            last.extend_from_slice(rows);
        })?;
        Ok(last)
    }
    /// Runs one token and returns the greedy next id where the engine chooses it itself (a
    /// GPU's argmax kernel: one id copied back instead of the vocabulary's logits); `None`
    /// where it cannot, and the caller takes the logits from `step`.
    fn step_to_argmax(&mut self, _id: u32) -> Option<Result<u32, RunError>> {
        None
    }
    /// Runs one token and returns the next id drawn as `sampler` would draw it after
    /// `history` (which ends with `id`), where the engine draws it itself (a GPU's sampler
    /// kernels); it keeps `sampler`'s generator in step. `None` where it cannot.
    fn step_to_sample(
        &mut self,
        _id: u32,
        _sampler: &mut Sampler,
        _history: &[u32],
    ) -> Option<Result<u32, RunError>> {
        None
    }
}

/// What a device sampler was last told: the history length and generator state it would
/// continue from. Its configuration, generator and seen bits are uploaded again whenever the
/// host's differ (a token the host chose, a new document), so host and device draws can
/// alternate and stay those of one sampler.
#[derive(Default)]
pub struct DeviceSampling {
    known: Option<(usize, u64)>,
}

impl DeviceSampling {
    /// One device draw after `history`: `device(handover)` hands sampling to the device
    /// first where `handover` is `Some` (the device's state is stale: `GpuSample::uploads`
    /// for this sampler), runs the sampler's launches and returns the id and the device
    /// generator's state, which `sampler` then takes.
    pub fn draw(
        &mut self,
        sampler: &mut Sampler,
        history: &[u32],
        device: impl FnOnce(Option<&Sampler>) -> Result<(u32, u64), RunError>,
    ) -> Result<u32, RunError> {
        let stale = self.known != Some((history.len(), sampler.generator_state()));
        let (next, state) = device(stale.then_some(&*sampler))?;
        self.known = Some((history.len() + 1, state));
        sampler.set_generator_state(state);
        Ok(next)
    }

    /// A new document: upload before the next draw.
    pub fn forget(&mut self) {
        self.known = None;
    }
}

/// Runs `id` as one decode step and chooses the token after it: on the engine's side where
/// the engine can (`Engine::step_to_argmax` when `sampler` is greedy,
/// `Engine::step_to_sample` otherwise), else by `sampler` from the step's logits (gathered in
/// `logits`).
pub fn step_and_choose(
    engine: &mut dyn Engine,
    id: u32,
    history: &[u32],
    sampler: &mut Sampler,
    logits: &mut Vec<f32>,
) -> Result<u32, RunError> {
    if sampler.is_greedy() {
        if let Some(next) = engine.step_to_argmax(id) {
            return next;
        }
    } else if let Some(next) = engine.step_to_sample(id, sampler, history) {
        return next;
    }
    logits.clear();
    engine.step(id, &mut |l| logits.extend_from_slice(l))?;
    Ok(sampler.sample(logits, history))
}

impl Engine for Session<'_> {
    fn reset(&mut self) {
        self.state = zero_state(&self.model.decode);
        self.position = 0;
    }

    fn prefill(&mut self, ids: &[u32], on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
        let logits = self.prefill_all(ids)?;
        on_logits(logits.floats());
        Ok(())
    }

    fn step(&mut self, id: u32, on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
        let logits = self.step_one(id)?;
        on_logits(&logits);
        Ok(())
    }
}

/// Logits `[T, V]` for `ids`: the first `prefill` ids (default all) through prefill, each later
/// id through one decode step; row t is the logits after id t.
pub fn eval_with(
    engine: &mut dyn Engine,
    vocab: usize,
    ids: &[u32],
    prefill: Option<usize>,
) -> Result<Tensor, RunError> {
    let prefill = prefill.unwrap_or(ids.len());
    if prefill > ids.len() {
        return Err(RunError::PrefillTooLong {
            prefill,
            ids: ids.len(),
        });
    }
    if ids.is_empty() {
        return Err(RunError::EmptyIds);
    }
    engine.reset();
    let mut rows: Vec<f32> = Vec::with_capacity(ids.len() * vocab);
    if prefill > 0 {
        engine.prefill(&ids[..prefill], &mut |l| rows.extend_from_slice(l))?;
    }
    for &id in &ids[prefill..] {
        engine.step(id, &mut |l| rows.extend_from_slice(l))?;
    }
    Ok(Tensor::f32(vec![ids.len(), vocab], rows))
}

/// `eval_with` on the reference interpreter.
pub fn eval(model: &Model, ids: &[u32], prefill: Option<usize>) -> Result<Tensor, RunError> {
    model.check_ids(ids)?;
    eval_with(&mut Session::new(model), model.vocab_size(), ids, prefill)
}

/// The sampler's argmax (first maximum, NaN never wins), for greedy loops over raw logits.
pub use crate::sampling::argmax;

/// Continuation of `prompt`: up to `max_new` new ids chosen by `sampler`, stopping after
/// `eos` (if given) or when `on_token` returns false for the id just produced.
pub fn generate_with(
    engine: &mut dyn Engine,
    vocab: usize,
    prompt: &[u32],
    max_new: usize,
    eos: Option<u32>,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>, RunError> {
    if prompt.is_empty() {
        return Err(RunError::EmptyIds);
    }
    engine.reset();
    let mut history = prompt.to_vec();
    if max_new == 0 {
        return Ok(Vec::new());
    }
    let rows = engine.prefill_last(prompt)?;
    let mut next = sampler.sample(&rows[rows.len() - vocab..], &history);
    let mut logits = Vec::with_capacity(vocab);
    loop {
        history.push(next);
        let go_on = on_token(next);
        if !go_on || history.len() - prompt.len() == max_new || Some(next) == eos {
            return Ok(history.split_off(prompt.len()));
        }
        next = step_and_choose(engine, next, &history, sampler, &mut logits)?;
    }
}

/// Greedy continuation of `prompt` (argmax every step).
pub fn generate_greedy_with(
    engine: &mut dyn Engine,
    vocab: usize,
    prompt: &[u32],
    max_new: usize,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, RunError> {
    let mut greedy = Sampler::new(SamplingParams::default());
    generate_with(engine, vocab, prompt, max_new, eos, &mut greedy, |id| {
        on_token(id);
        true
    })
}

/// `generate_greedy_with` on the reference interpreter.
pub fn generate_greedy(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    ignore_eos: bool,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>, RunError> {
    model.check_ids(prompt)?;
    let eos = (!ignore_eos).then_some(model.checkpoint.config.eos_token_id);
    generate_greedy_with(
        &mut Session::new(model),
        model.vocab_size(),
        prompt,
        max_new,
        eos,
        on_token,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine whose logits always favour token 3 and whose own argmax always answers 2, so
    /// the ids say which path chose them.
    struct Marked {
        steps: usize,
        argmaxes: usize,
    }

    impl Engine for Marked {
        fn reset(&mut self) {}
        fn prefill(&mut self, ids: &[u32], on: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
            on(&[0.0, 0.0, 0.0, 9.0].repeat(ids.len()));
            Ok(())
        }
        fn step(&mut self, _id: u32, on: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
            self.steps += 1;
            on(&[0.0, 0.0, 0.0, 9.0]);
            Ok(())
        }
        fn step_to_argmax(&mut self, _id: u32) -> Option<Result<u32, RunError>> {
            self.argmaxes += 1;
            Some(Ok(2))
        }
    }

    #[test]
    fn greedy_decoding_takes_the_engines_own_argmax_and_sampling_its_logits() {
        let mut e = Marked {
            steps: 0,
            argmaxes: 0,
        };
        let mut greedy = Sampler::new(SamplingParams::default());
        let ids = generate_with(&mut e, 4, &[1], 4, None, &mut greedy, |_| true).unwrap();
        // The first id from the prompt's logits, the others from the engine's argmax.
        assert_eq!(ids, [3, 2, 2, 2]);
        assert_eq!((e.steps, e.argmaxes), (0, 3));
        let mut sampled = Sampler::new(SamplingParams {
            temperature: 0.01,
            ..SamplingParams::default()
        });
        let ids = generate_with(&mut e, 4, &[1], 4, None, &mut sampled, |_| true).unwrap();
        assert_eq!(ids, [3, 3, 3, 3]);
        assert_eq!((e.steps, e.argmaxes), (3, 3));
    }
}
