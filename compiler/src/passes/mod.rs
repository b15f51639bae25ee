//! Graph rewrites and the pass manager.
//!
//! Every pass is listed once, in [`PASSES`], with its contract. Each pass keeps the function
//! the graph computes (up to f32 rounding), duplicates no work (it fuses a node only where its
//! result has no other reader), reads and writes carried state in the same order, and removes
//! the nodes it replaced. A pass that finds nothing to match leaves the graph unchanged.

mod cleanup;
mod elementwise;
mod fold;
mod fuse;
mod merge;
mod rg_lru;
pub mod stats;
mod util;

use std::time::{Duration, Instant};

use griffin_ir::{verify, Graph, IrError, VerifyError};
use thiserror::Error;

/// A named rewrite with its contract.
pub struct Pass {
    pub name: &'static str,
    /// One line: what it matches and what it guarantees.
    pub contract: &'static str,
    /// Rewrites the graph; returns how many rewrites it made.
    pub run: fn(&mut Graph) -> Result<usize, IrError>,
}

/// Every pass, in the order of the default pipeline.
pub static PASSES: &[Pass] = &[
    Pass {
        name: "fold-weights",
        contract: "rms_norm's weight offset becomes a build-time weight (offset + w); a scalar \
                   multiply of an embedding gather becomes the gather's scale",
        run: fold::fold_weights,
    },
    Pass {
        name: "fuse-rg-lru",
        contract: "conv1d, both RG-LRU gates, decay, normaliser, reset and linear_scan become one \
                   rg_lru op with the same carried state",
        run: rg_lru::fuse_rg_lru,
    },
    Pass {
        name: "merge-projections",
        contract: "plain linears reading the same input become one linear over concatenated \
                   weights with one result per original",
        run: merge::merge_projections,
    },
    Pass {
        name: "fuse-geglu",
        contract: "gelu(gate)·up over a two-way split linear becomes its GeGLU epilogue; \
                   rg_lru's h·gelu(y) becomes its gated output",
        run: fuse::fuse_geglu,
    },
    Pass {
        name: "fuse-norm",
        contract: "an rms_norm read only by one linear becomes that linear's prologue",
        run: fuse::fuse_norm,
    },
    Pass {
        name: "fuse-residual",
        contract: "add(r, linear(..)) whose linear result has no other reader becomes the \
                   linear's residual epilogue",
        run: fuse::fuse_residual,
    },
    Pass {
        name: "fuse-soft-cap",
        contract: "soft_cap of a linear result with no other reader becomes the linear's epilogue",
        run: fuse::fuse_soft_cap,
    },
    Pass {
        name: "fuse-rotary",
        contract: "rotary on the queries and keys read only by local_attention moves into the \
                   attention op",
        run: fuse::fuse_rotary,
    },
    Pass {
        name: "fuse-elementwise",
        contract: "each maximal tree of elementwise ops whose inner results have one reader \
                   becomes one elementwise kernel",
        run: elementwise::fuse_elementwise,
    },
    Pass {
        name: "cse",
        contract: "nodes with the same op and operands are computed once",
        run: cleanup::cse,
    },
    Pass {
        name: "dce",
        contract: "nodes whose results nobody reads are removed (inputs and outputs stay)",
        run: cleanup::dce,
    },
];

pub fn find(name: &str) -> Option<&'static Pass> {
    PASSES.iter().find(|p| p.name == name)
}

/// `default` (every pass, in order), `none`, or a comma-separated list of pass names.
pub fn parse_pipeline(spec: &str) -> Result<Vec<&'static Pass>, String> {
    match spec.trim() {
        "default" => Ok(PASSES.iter().collect()),
        "none" | "" => Ok(Vec::new()),
        list => list
            .split(',')
            .map(|name| {
                let name = name.trim();
                find(name).ok_or_else(|| {
                    let known: Vec<&str> = PASSES.iter().map(|p| p.name).collect();
                    format!("unknown pass `{name}` (known: {})", known.join(", "))
                })
            })
            .collect(),
    }
}

#[derive(Debug, Error)]
pub enum PassError {
    #[error("pass `{pass}` failed: {source}")]
    Rewrite { pass: &'static str, source: IrError },
    #[error("graph does not verify after pass `{pass}`: {source}")]
    Verify {
        pass: &'static str,
        source: VerifyError,
    },
}

/// What one pass did.
#[derive(Clone, Debug)]
pub struct PassReport {
    pub pass: &'static str,
    pub rewrites: usize,
    pub time: Duration,
    pub nodes_after: usize,
}

/// Runs `passes` in order, verifying after each when `verify_each` (the default in tests and
/// debug builds), stopping after `stop_after` if given. `after_pass` sees the graph after each.
pub fn run_pipeline(
    graph: &mut Graph,
    passes: &[&'static Pass],
    verify_each: bool,
    stop_after: Option<&str>,
    mut after_pass: impl FnMut(&PassReport, &Graph),
) -> Result<Vec<PassReport>, PassError> {
    let mut reports = Vec::new();
    for pass in passes {
        let start = Instant::now();
        let rewrites = (pass.run)(graph).map_err(|source| PassError::Rewrite {
            pass: pass.name,
            source,
        })?;
        let time = start.elapsed();
        if verify_each {
            verify(graph).map_err(|source| PassError::Verify {
                pass: pass.name,
                source,
            })?;
        }
        let report = PassReport {
            pass: pass.name,
            rewrites,
            time,
            nodes_after: graph.node_count(),
        };
        tracing::debug!(
            graph = %graph.name,
            pass = pass.name,
            rewrites,
            nodes = report.nodes_after,
            micros = time.as_micros() as u64,
            "pass"
        );
        after_pass(&report, graph);
        reports.push(report);
        if stop_after == Some(pass.name) {
            break;
        }
    }
    Ok(reports)
}

/// Runs a pipeline with verification after every pass in debug builds and nothing printed.
pub fn optimize(graph: &mut Graph, passes: &[&'static Pass]) -> Result<(), PassError> {
    run_pipeline(graph, passes, cfg!(debug_assertions), None, |_, _| {})?;
    Ok(())
}
