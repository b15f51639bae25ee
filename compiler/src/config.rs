//! `config.json` of a RecurrentGemma checkpoint, in both published layouts, checked for
//! consistency before anything else reads it.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockType {
    Recurrent,
    Attention,
}

impl BlockType {
    pub fn name(self) -> &'static str {
        match self {
            BlockType::Recurrent => "recurrent",
            BlockType::Attention => "attention",
        }
    }
}

/// Everything the trace needs, with derived sizes resolved (names follow GRIFFIN.md).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// D
    pub hidden_size: usize,
    /// L
    pub lru_width: usize,
    /// H
    pub num_heads: usize,
    /// Hkv
    pub num_kv_heads: usize,
    /// hd = D / H
    pub head_dim: usize,
    /// F = intermediate_size / 2: the width of each MLP branch.
    pub mlp_width: usize,
    /// V
    pub vocab_size: usize,
    /// W
    pub window: usize,
    /// K
    pub conv_width: usize,
    pub soft_cap: f64,
    pub eps: f64,
    pub rope_theta: f64,
    /// Dims of each head that rotary embedding touches: hd · partial_rotary_factor.
    pub rotary_dims: usize,
    pub attention_bias: bool,
    /// The type of every layer, pattern already repeated to `num_hidden_layers`.
    pub layers: Vec<BlockType>,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

fn bad(field: &str, message: impl Into<String>) -> ModelError {
    ModelError::BadField {
        field: field.to_string(),
        message: message.into(),
    }
}

fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

fn required_usize(obj: &Map<String, Value>, field: &str) -> Result<usize, ModelError> {
    match get(obj, field) {
        None => Err(ModelError::MissingField(field.to_string())),
        Some(v) => positive_usize(v, field),
    }
}

fn optional_usize(obj: &Map<String, Value>, field: &str) -> Result<Option<usize>, ModelError> {
    get(obj, field)
        .map(|v| positive_usize(v, field))
        .transpose()
}

fn positive_usize(v: &Value, field: &str) -> Result<usize, ModelError> {
    match v.as_u64() {
        Some(n) if n > 0 => Ok(n as usize),
        _ => Err(bad(field, format!("expected a positive integer, got {v}"))),
    }
}

fn optional_f64(obj: &Map<String, Value>, field: &str) -> Result<Option<f64>, ModelError> {
    match get(obj, field) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(bad(field, format!("expected a number, got {v}"))),
        },
    }
}

fn optional_token(obj: &Map<String, Value>, field: &str, default: u32) -> Result<u32, ModelError> {
    match get(obj, field) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(field, format!("expected a token id, got {v}"))),
    }
}

impl Config {
    /// Reads and checks `DIR/config.json`.
    pub fn load(dir: &Path) -> Result<Config, ModelError> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(ModelError::NoConfig(dir.to_path_buf()));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Config::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Config, ModelError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ModelError::ConfigJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(ModelError::ConfigJson("expected a JSON object".into()));
        };
        Config::from_object(&obj)
    }

    fn from_object(obj: &Map<String, Value>) -> Result<Config, ModelError> {
        if let Some(model_type) = get(obj, "model_type").and_then(Value::as_str) {
            if model_type != "recurrent_gemma" {
                return Err(bad(
                    "model_type",
                    format!("{model_type:?} is not \"recurrent_gemma\""),
                ));
            }
        }
        if let Some(act) = get(obj, "hidden_activation").and_then(Value::as_str) {
            if act != "gelu_pytorch_tanh" {
                return Err(bad(
                    "hidden_activation",
                    format!("{act:?} is not supported (only \"gelu_pytorch_tanh\")"),
                ));
            }
        }
        let hidden_size = required_usize(obj, "hidden_size")?;
        let num_layers = required_usize(obj, "num_hidden_layers")?;
        let num_heads = required_usize(obj, "num_attention_heads")?;
        let intermediate_size = required_usize(obj, "intermediate_size")?;
        let vocab_size = required_usize(obj, "vocab_size")?;
        let window = required_usize(obj, "attention_window_size")?;
        let conv_width = required_usize(obj, "conv1d_width")?;
        let num_kv_heads = optional_usize(obj, "num_key_value_heads")?.unwrap_or(num_heads);
        let lru_width = optional_usize(obj, "lru_width")?.unwrap_or(hidden_size);

        let pattern = match get(obj, "block_types") {
            None => return Err(ModelError::MissingField("block_types".into())),
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|item| match item.as_str() {
                    Some("recurrent") => Ok(BlockType::Recurrent),
                    Some("attention") => Ok(BlockType::Attention),
                    _ => Err(ModelError::UnknownBlockType(item.to_string())),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => {
                return Err(bad(
                    "block_types",
                    format!("expected a non-empty list, got {v}"),
                ))
            }
        };
        let layers = (0..num_layers)
            .map(|i| pattern[i % pattern.len()])
            .collect();

        // Rotary settings: top-level in the configs published with the checkpoints,
        // inside `rope_parameters` in newer ones.
        let rope = match get(obj, "rope_parameters") {
            Some(Value::Object(r)) => r.clone(),
            Some(v) => {
                return Err(bad(
                    "rope_parameters",
                    format!("expected an object, got {v}"),
                ))
            }
            None => Map::new(),
        };
        let rope_theta = match optional_f64(&rope, "rope_theta")? {
            Some(t) => Some(t),
            None => optional_f64(obj, "rope_theta")?,
        }
        .unwrap_or(10000.0);
        let rotary_fraction = match optional_f64(&rope, "partial_rotary_factor")? {
            Some(f) => Some(f),
            None => optional_f64(obj, "partial_rotary_factor")?,
        }
        .unwrap_or(0.5);

        let soft_cap = optional_f64(obj, "logits_soft_cap")?.unwrap_or(30.0);
        let eps = optional_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6);
        let attention_bias = match get(obj, "attention_bias") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad("attention_bias", format!("expected true or false, got {v}")))?,
        };

        if hidden_size % num_heads != 0 {
            return Err(ModelError::Inconsistent(format!(
                "num_attention_heads {num_heads} does not divide hidden_size {hidden_size}"
            )));
        }
        if num_heads % num_kv_heads != 0 {
            return Err(ModelError::Inconsistent(format!(
                "num_key_value_heads {num_kv_heads} does not divide num_attention_heads {num_heads}"
            )));
        }
        if lru_width % num_heads != 0 {
            return Err(ModelError::Inconsistent(format!(
                "num_attention_heads {num_heads} does not divide lru_width {lru_width}"
            )));
        }
        if intermediate_size % 2 != 0 {
            return Err(ModelError::Inconsistent(format!(
                "intermediate_size {intermediate_size} is odd (each MLP branch is half of it)"
            )));
        }
        // The reference takes head_dim = hidden_size / num_attention_heads, whatever a
        // `head_dim` field says; so do we.
        let head_dim = hidden_size / num_heads;
        if !(0.0..=1.0).contains(&rotary_fraction) {
            return Err(bad(
                "partial_rotary_factor",
                format!("{rotary_fraction} is not in [0, 1]"),
            ));
        }
        let rotary_dims = (head_dim as f64 * rotary_fraction) as usize;
        if rotary_dims % 2 != 0 {
            return Err(ModelError::Inconsistent(format!(
                "rotary dims {rotary_dims} (head_dim {head_dim} × partial_rotary_factor {rotary_fraction}) must be even"
            )));
        }
        if !is_positive(rope_theta) {
            return Err(bad("rope_theta", format!("{rope_theta} is not positive")));
        }
        if !is_positive(soft_cap) {
            return Err(bad(
                "logits_soft_cap",
                format!("{soft_cap} is not positive"),
            ));
        }
        if !is_positive(eps) {
            return Err(bad("rms_norm_eps", format!("{eps} is not positive")));
        }

        Ok(Config {
            hidden_size,
            lru_width,
            num_heads,
            num_kv_heads,
            head_dim,
            mlp_width: intermediate_size / 2,
            vocab_size,
            window,
            conv_width,
            soft_cap,
            eps,
            rope_theta,
            rotary_dims,
            attention_bias,
            layers,
            bos_token_id: optional_token(obj, "bos_token_id", 2)?,
            eos_token_id: optional_token(obj, "eos_token_id", 1)?,
            pad_token_id: optional_token(obj, "pad_token_id", 0)?,
        })
    }

    /// `sqrt(D)` rounded to bfloat16, as the reference keeps the embedding scale.
    pub fn embed_scale(&self) -> f32 {
        half::bf16::from_f32((self.hidden_size as f32).sqrt()).to_f32()
    }

    /// Every tensor the checkpoint must hold, with its shape, in a fixed order.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, l, f, k) = (
            self.hidden_size,
            self.lru_width,
            self.mlp_width,
            self.conv_width,
        );
        let (h, hd, hkv) = (self.num_heads, self.head_dim, self.num_kv_heads);
        let bw = l / h;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, d],
        )];
        for (i, block) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut add = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
            add("temporal_pre_norm.weight", vec![d]);
            match block {
                BlockType::Recurrent => {
                    add("temporal_block.linear_y.weight", vec![l, d]);
                    add("temporal_block.linear_y.bias", vec![l]);
                    add("temporal_block.linear_x.weight", vec![l, d]);
                    add("temporal_block.linear_x.bias", vec![l]);
                    add("temporal_block.conv_1d.weight", vec![l, 1, k]);
                    add("temporal_block.conv_1d.bias", vec![l]);
                    add("temporal_block.rg_lru.input_gate_weight", vec![h, bw, bw]);
                    add("temporal_block.rg_lru.input_gate_bias", vec![h, bw]);
                    add(
                        "temporal_block.rg_lru.recurrent_gate_weight",
                        vec![h, bw, bw],
                    );
                    add("temporal_block.rg_lru.recurrent_gate_bias", vec![h, bw]);
                    add("temporal_block.rg_lru.recurrent_param", vec![l]);
                    add("temporal_block.linear_out.weight", vec![d, l]);
                    add("temporal_block.linear_out.bias", vec![d]);
                }
                BlockType::Attention => {
                    add("temporal_block.q_proj.weight", vec![h * hd, d]);
                    add("temporal_block.k_proj.weight", vec![hkv * hd, d]);
                    add("temporal_block.v_proj.weight", vec![hkv * hd, d]);
                    if self.attention_bias {
                        add("temporal_block.q_proj.bias", vec![h * hd]);
                        add("temporal_block.k_proj.bias", vec![hkv * hd]);
                        add("temporal_block.v_proj.bias", vec![hkv * hd]);
                    }
                    add("temporal_block.o_proj.weight", vec![d, h * hd]);
                    add("temporal_block.o_proj.bias", vec![d]);
                }
            }
            add("channel_pre_norm.weight", vec![d]);
            add("mlp_block.gate_proj.weight", vec![f, d]);
            add("mlp_block.gate_proj.bias", vec![f]);
            add("mlp_block.up_proj.weight", vec![f, d]);
            add("mlp_block.up_proj.bias", vec![f]);
            add("mlp_block.down_proj.weight", vec![d, f]);
            add("mlp_block.down_proj.bias", vec![d]);
        }
        out.push(("model.final_norm.weight".to_string(), vec![d]));
        out
    }
}

/// False for zero, negatives and NaN.
fn is_positive(x: f64) -> bool {
    x > 0.0
}

/// The published RecurrentGemma 2B `config.json` (for shape tests and estimates: no weights
/// come with it).
pub const PUBLISHED_2B: &str = r#"{
  "architectures": ["RecurrentGemmaForCausalLM"], "attention_bias": false,
  "attention_window_size": 2048, "block_types": ["recurrent", "recurrent", "attention"],
  "bos_token_id": 2, "conv1d_width": 4, "eos_token_id": 1, "head_dim": 256,
  "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2560, "intermediate_size": 15360,
  "logits_soft_cap": 30.0, "lru_width": 2560, "model_type": "recurrent_gemma",
  "num_attention_heads": 10, "num_hidden_layers": 26, "num_key_value_heads": 1,
  "pad_token_id": 0, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0, "vocab_size": 256000
}"#;

/// The published 9B configuration (D=4096, 38 layers, 16 heads of 256 on one KV head, an MLP
/// of 3·D as in the 2B model).
pub const PUBLISHED_9B: &str = r#"{
  "architectures": ["RecurrentGemmaForCausalLM"], "attention_bias": false,
  "attention_window_size": 2048, "block_types": ["recurrent", "recurrent", "attention"],
  "bos_token_id": 2, "conv1d_width": 4, "eos_token_id": 1, "head_dim": 256,
  "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 4096, "intermediate_size": 24576,
  "logits_soft_cap": 30.0, "lru_width": 4096, "model_type": "recurrent_gemma",
  "num_attention_heads": 16, "num_hidden_layers": 38, "num_key_value_heads": 1,
  "pad_token_id": 0, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0, "vocab_size": 256000
}"#;

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"hidden_size": 80, "num_hidden_layers": 4, "num_attention_heads": 5,
        "num_key_value_heads": 1, "intermediate_size": 240, "vocab_size": 512,
        "attention_window_size": 8, "conv1d_width": 4, "block_types": ["recurrent", "recurrent", "attention"],
        "rope_parameters": {"rope_theta": 500.0, "partial_rotary_factor": 0.5}}"#;

    #[test]
    fn reads_nested_rope_parameters_and_repeats_pattern() {
        let c = Config::from_json(BASE).unwrap();
        assert_eq!(c.rope_theta, 500.0);
        assert_eq!(c.rotary_dims, 8);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.lru_width, 80);
        assert_eq!(
            c.layers,
            [
                BlockType::Recurrent,
                BlockType::Recurrent,
                BlockType::Attention,
                BlockType::Recurrent
            ]
        );
    }

    #[test]
    fn embed_scale_is_rounded_to_bf16() {
        let c = Config::from_json(BASE).unwrap();
        assert_eq!(c.embed_scale(), 8.9375);
        let c2560 = Config {
            hidden_size: 2560,
            ..c
        };
        assert_eq!(c2560.embed_scale(), 50.5);
    }

    #[test]
    fn rejects_inconsistent_configs() {
        let e = Config::from_json(
            &BASE.replace("\"num_attention_heads\": 5", "\"num_attention_heads\": 3"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not divide hidden_size"), "{e}");
        let e = Config::from_json(&BASE.replace("\"attention\"]", "\"mamba\"]")).unwrap_err();
        assert!(
            e.to_string().contains("unknown block type \"mamba\""),
            "{e}"
        );
        let e = Config::from_json(&BASE.replace("\"vocab_size\": 512,", "")).unwrap_err();
        assert!(e.to_string().contains("missing field `vocab_size`"), "{e}");
    }
}
