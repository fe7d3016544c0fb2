//! Architecture settings of a model, read from a Hugging Face `config.json`
//! or from GGUF metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;

use serde_json::Value;

use super::rope::{Rope, RopeScaling};
use super::weights::Source;
use crate::error::{Error, Result};

/// The layer layouts the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, SmolLM: RMSNorm,
    /// rotary embeddings, grouped-query attention, gated MLP; the
    /// [`ModelConfig`] flags add what each of them changes.
    Llama,
    /// GPT-2: LayerNorm, learned positions, GELU MLP, fused qkv.
    Gpt2,
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension i with i + dim/2 (Hugging Face weights).
    Halves,
    /// Dimension 2i with 2i + 1 (GGUF Llama files, whose q/k rows are permuted).
    Interleaved,
}

/// Everything the layer loop needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `model_type` as the model's config names it (`llama`, `qwen2`, `gpt2`, ...).
    pub model_type: String,
    /// The layer layout.
    pub family: Family,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Epsilon of the normalisations.
    pub norm_eps: f64,
    /// Rotary embedding of the layers that attend to the whole sequence
    /// (every layer unless `rope_local` is set); `None` for GPT-2.
    pub rope: Option<Rope>,
    /// Rotary embedding of the sliding-window layers when it differs
    /// (Gemma 3's local base).
    pub rope_local: Option<Rope>,
    /// Rotary dimension pairing.
    pub rope_style: RopeStyle,
    /// Per layer: how many positions attention reaches back, the token
    /// itself included (`None`: the whole sequence).
    pub sliding_windows: Vec<Option<usize>>,
    /// Longest sequence the model supports (learned positions).
    pub max_position_embeddings: usize,
    /// Whether the output layer reuses the token embeddings.
    pub tie_word_embeddings: bool,
    /// Activation of the feed-forward block (`silu`, `gelu_new`, ...).
    pub hidden_act: String,
    /// RMSNorm over each query and key head before the rotation (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norms on the attention and MLP outputs before the residual adds
    /// (Gemma 2 and 3: `post_attention_layernorm` is then the one after
    /// attention, `pre_feedforward_layernorm` the one before the MLP).
    pub post_norms: bool,
    /// Factor on the token embeddings (Gemma: √hidden).
    pub embedding_scale: Option<f32>,
    /// Attention scores are `q·k` times this (1/√head_dim unless the
    /// config sets `query_pre_attn_scalar`).
    pub attention_scale: f64,
    /// `c · tanh(score / c)` on the attention scores (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// `c · tanh(logit / c)` on the output logits (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// End-of-sequence token ids from the config, if any.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id, if any.
    pub bos_token_id: Option<u32>,
}

/// Model types read as the Llama family.
const LLAMA_TYPES: [&str; 11] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "smollm",
    "smollm2",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
];

/// Model types of the Gemma line (norm weights stored as w - 1, embeddings
/// scaled by √hidden).
pub(crate) fn is_gemma(model_type: &str) -> bool {
    model_type.starts_with("gemma")
}

/// Whether a checkpoint trained on a `trained` model applies to a `model`
/// model: the same names, or names the Hugging Face and GGUF forms of one
/// architecture give it (`gemma3_text` and `gemma3`; a Mistral converted
/// to GGUF calls itself `llama`).
pub fn same_architecture(trained: &str, model: &str) -> bool {
    fn canonical(t: &str) -> &str {
        match t {
            "gemma3_text" => "gemma3",
            "mistral" | "smollm" | "smollm2" => "llama",
            other => other,
        }
    }
    trained == model || canonical(trained) == canonical(model)
}

/// Token ids given as one number or a list (as `eos_token_id` may be);
/// `Err` names the first entry that is not a token id (negative, fractional,
/// past `u32`, not a number).
pub(crate) fn token_ids(value: Option<&Value>) -> std::result::Result<Vec<u32>, String> {
    let id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{v} is not a token id"))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(id).collect(),
        Some(v) => Ok(vec![id(v)?]),
    }
}

/// The largest sizes a model may declare: far above any model the engine
/// can run on a CPU, low enough that no size read from a file makes the
/// engine allocate without bound before the tensors are checked.
pub(crate) mod limits {
    pub const HIDDEN: usize = 1 << 16;
    pub const INTERMEDIATE: usize = 1 << 18;
    pub const LAYERS: usize = 1 << 10;
    pub const HEADS: usize = 1 << 10;
    pub const HEAD_DIM: usize = 1 << 11;
    /// Query heads times head width.
    pub const ATTENTION_WIDTH: usize = 1 << 17;
    pub const VOCAB: usize = 1 << 24;
    /// Positions.
    pub const POSITIONS: usize = 1 << 20;
}

/// The head size checked before the rotary embedding is sized by it.
fn check_head_dim(head_dim: usize, path: &Path) -> Result<()> {
    let reason = if head_dim == 0 || !head_dim.is_multiple_of(2) {
        format!("head size {head_dim} must be even")
    } else if head_dim > limits::HEAD_DIM {
        format!(
            "head size {head_dim} is past the engine's limit of {}",
            limits::HEAD_DIM
        )
    } else {
        return Ok(());
    };
    Err(Error::ModelLoad {
        path: path.to_path_buf(),
        reason,
    })
}

/// A size checked against the engine's limit before anything is sized by it.
fn check_limit(name: &str, value: usize, most: usize, path: &Path) -> Result<()> {
    if value > most {
        return Err(Error::ModelLoad {
            path: path.to_path_buf(),
            reason: format!("{name} {value} is past the engine's limit of {most}"),
        });
    }
    Ok(())
}

/// The hidden size, layer count and head size, checked before the per-layer
/// settings and the rotary embedding are sized by them.
fn check_early(hidden: usize, layers: usize, head_dim: usize, path: &Path) -> Result<()> {
    check_limit("hidden size", hidden, limits::HIDDEN, path)?;
    check_limit("layer count", layers, limits::LAYERS, path)?;
    check_head_dim(head_dim, path)
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::ModelLoad {
            path: path.to_path_buf(),
            reason,
        };
        let json: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let get = |key: &str| json.get(key).filter(|v| !v.is_null());
        let model_type = get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("has no \"model_type\"".into()))?
            .to_string();
        // A size present but not a whole number >= 0 is an error naming
        // it, not a default.
        let usize_of = |keys: &[&str]| -> Result<Option<usize>> {
            for k in keys {
                if let Some(v) = get(k) {
                    return v
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .map(Some)
                        .ok_or_else(|| bad(format!("{k} is {v}, not a size")));
                }
            }
            Ok(None)
        };
        let need = |keys: &[&str]| -> Result<usize> {
            usize_of(keys)?.ok_or_else(|| bad(format!("has no {:?}", keys[0])))
        };
        let float_of = |keys: &[&str], default: f64| -> Result<f64> {
            for k in keys {
                if let Some(v) = get(k) {
                    return v
                        .as_f64()
                        .ok_or_else(|| bad(format!("{k} is {v}, not a number")));
                }
            }
            Ok(default)
        };
        let family = if LLAMA_TYPES.contains(&model_type.as_str()) {
            Family::Llama
        } else if model_type == "gpt2" {
            Family::Gpt2
        } else {
            return Err(Error::UnsupportedModel {
                path: path.to_path_buf(),
                model_type,
            });
        };
        let eos_token_ids =
            token_ids(get("eos_token_id")).map_err(|e| bad(format!("eos_token_id: {e}")))?;
        let bos_token_id = token_ids(get("bos_token_id"))
            .map_err(|e| bad(format!("bos_token_id: {e}")))?
            .first()
            .copied();
        let config = match family {
            Family::Llama => {
                let hidden_size = need(&["hidden_size"])?;
                let heads = need(&["num_attention_heads"])?;
                let kv_heads = usize_of(&["num_key_value_heads"])?.unwrap_or(heads);
                let head_dim = usize_of(&["head_dim"])?.unwrap_or(hidden_size / heads.max(1));
                let layers = need(&["num_hidden_layers"])?;
                check_early(hidden_size, layers, head_dim, path)?;
                let positions = usize_of(&["max_position_embeddings"])?.unwrap_or(4096);
                let gemma = is_gemma(&model_type);
                let gemma3 = matches!(model_type.as_str(), "gemma3" | "gemma3_text");
                if gemma3
                    && get("use_bidirectional_attention").and_then(Value::as_bool) == Some(true)
                {
                    return Err(bad(
                        "bidirectional attention (use_bidirectional_attention) is not supported by the engine"
                            .into(),
                    ));
                }
                // transformers 5 keeps rotary settings in rope_parameters,
                // per layer kind for Gemma 3; 4.5x in rope_theta and rope_scaling.
                let params = get("rope_parameters").or_else(|| get("rope_scaling"));
                let nested = params.filter(|p| {
                    p.get("full_attention").is_some() || p.get("sliding_attention").is_some()
                });
                let partial = match get("partial_rotary_factor") {
                    Some(v) => Some(v.as_f64().ok_or_else(|| {
                        bad(format!("partial_rotary_factor is {v}, not a number"))
                    })?),
                    None => None,
                };
                let original = usize_of(&["original_max_position_embeddings"])?;
                let default_theta = if gemma3 { 1_000_000.0 } else { 10000.0 };
                let theta = float_of(&["rope_theta"], default_theta)?;
                let rope_of = |params: Option<&Value>, theta: f64| {
                    Rope::from_hf(params, theta, head_dim, partial, positions, original)
                        .map_err(&bad)
                };
                let (rope, rope_local) = match nested {
                    Some(p) => (
                        rope_of(p.get("full_attention"), theta)?,
                        Some(rope_of(
                            p.get("sliding_attention"),
                            float_of(&["rope_local_base_freq"], 10000.0)?,
                        )?),
                    ),
                    None if gemma3 => (
                        rope_of(params, theta)?,
                        Some(rope_of(
                            None,
                            float_of(&["rope_local_base_freq"], 10000.0)?,
                        )?),
                    ),
                    None => (rope_of(params, theta)?, None),
                };
                // Which layers attend through a sliding window: the saved
                // layer_types when present, else each family's rule.
                let window = usize_of(&["sliding_window"])?.filter(|&w| w > 0);
                let use_sliding = get("use_sliding_window").and_then(Value::as_bool);
                let sliding: Vec<bool> = match get("layer_types") {
                    Some(Value::Array(kinds)) => {
                        if kinds.len() != layers {
                            return Err(bad(format!(
                                "layer_types lists {} layers, the model has {layers}",
                                kinds.len()
                            )));
                        }
                        kinds
                            .iter()
                            .map(|k| match k.as_str() {
                                Some("sliding_attention") => Ok(true),
                                Some("full_attention") => Ok(false),
                                _ => Err(bad(format!(
                                    "layer type {k} is not supported by the engine"
                                ))),
                            })
                            .collect::<Result<_>>()?
                    }
                    Some(v) => return Err(bad(format!("layer_types is {v}, not a list"))),
                    None => {
                        let pattern = match model_type.as_str() {
                            "gemma2" => Some(2),
                            "gemma3" | "gemma3_text" => Some(
                                usize_of(&["sliding_window_pattern", "_sliding_window_pattern"])?
                                    .unwrap_or(6)
                                    .max(1),
                            ),
                            _ => None,
                        };
                        match pattern {
                            Some(p) => (0..layers).map(|i| (i + 1) % p != 0).collect(),
                            None => {
                                let from = match model_type.as_str() {
                                    // Qwen: the layers from max_window_layers on, when enabled.
                                    "qwen2" | "qwen3" if use_sliding == Some(true) => {
                                        usize_of(&["max_window_layers"])?.unwrap_or(layers)
                                    }
                                    "qwen2" | "qwen3" | "llama" | "gemma" => layers,
                                    // Mistral, Phi-3: every layer, when the config has a window.
                                    _ if use_sliding == Some(false) => layers,
                                    _ => 0,
                                };
                                (0..layers).map(|i| i >= from).collect()
                            }
                        }
                    }
                };
                let sliding_windows = sliding
                    .iter()
                    .map(|&s| if s { window } else { None })
                    .collect();
                let softcap = |key: &str| -> Result<Option<f64>> {
                    match get(key) {
                        None => Ok(None),
                        Some(v) => match v.as_f64() {
                            Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c)),
                            _ => Err(bad(format!("{key} is {v}, not a positive number"))),
                        },
                    }
                };
                let query_scalar = match get("query_pre_attn_scalar") {
                    Some(v) if gemma => Some(
                        v.as_f64()
                            .filter(|x| x.is_finite() && *x > 0.0)
                            .ok_or_else(|| {
                                bad(format!(
                                    "query_pre_attn_scalar is {v}, not a positive number"
                                ))
                            })?,
                    ),
                    _ => None,
                };
                let act_keys: &[&str] = if gemma {
                    &["hidden_activation", "hidden_act"]
                } else {
                    &["hidden_act"]
                };
                let hidden_act = act_keys
                    .iter()
                    .find_map(|k| get(k).and_then(Value::as_str))
                    .unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" })
                    .to_string();
                // Dynamic NTK scaling stretches the trained context by its factor.
                let context = match rope.scaling {
                    RopeScaling::Dynamic { factor, .. } if factor > 1.0 => {
                        ((positions as f64 * factor) as usize).min(limits::POSITIONS)
                    }
                    _ => positions,
                };
                ModelConfig {
                    hidden_size,
                    intermediate_size: need(&["intermediate_size"])?,
                    num_hidden_layers: layers,
                    num_attention_heads: heads,
                    num_key_value_heads: kv_heads,
                    head_dim,
                    vocab_size: need(&["vocab_size"])?,
                    norm_eps: float_of(&["rms_norm_eps"], 1e-6)?,
                    rope: Some(rope),
                    rope_local,
                    rope_style: RopeStyle::Halves,
                    sliding_windows,
                    max_position_embeddings: context,
                    tie_word_embeddings: get("tie_word_embeddings")
                        .and_then(Value::as_bool)
                        .unwrap_or(gemma),
                    hidden_act,
                    qk_norm: matches!(model_type.as_str(), "qwen3" | "gemma3" | "gemma3_text"),
                    post_norms: matches!(model_type.as_str(), "gemma2" | "gemma3" | "gemma3_text"),
                    embedding_scale: gemma.then(|| (hidden_size as f64).sqrt() as f32),
                    attention_scale: query_scalar.unwrap_or(head_dim as f64).powf(-0.5),
                    attn_logit_softcapping: if gemma {
                        softcap("attn_logit_softcapping")?
                    } else {
                        None
                    },
                    final_logit_softcapping: if gemma {
                        softcap("final_logit_softcapping")?
                    } else {
                        None
                    },
                    eos_token_ids,
                    bos_token_id,
                    model_type,
                    family,
                }
            }
            Family::Gpt2 => {
                let hidden_size = need(&["n_embd", "hidden_size"])?;
                let heads = need(&["n_head", "num_attention_heads"])?;
                let layers = need(&["n_layer", "num_hidden_layers"])?;
                check_limit("layer count", layers, limits::LAYERS, path)?;
                for flag in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
                    if get(flag).and_then(Value::as_bool) == Some(true) {
                        return Err(bad(format!("GPT-2 option {flag} is not supported")));
                    }
                }
                ModelConfig {
                    model_type,
                    family,
                    hidden_size,
                    intermediate_size: usize_of(&["n_inner"])?
                        .unwrap_or(4usize.saturating_mul(hidden_size)),
                    num_hidden_layers: layers,
                    num_attention_heads: heads,
                    num_key_value_heads: heads,
                    head_dim: hidden_size / heads.max(1),
                    vocab_size: need(&["vocab_size"])?,
                    norm_eps: float_of(&["layer_norm_epsilon"], 1e-5)?,
                    rope: None,
                    rope_local: None,
                    rope_style: RopeStyle::Halves,
                    sliding_windows: vec![None; layers],
                    max_position_embeddings: need(&["n_positions", "max_position_embeddings"])?,
                    tie_word_embeddings: true,
                    qk_norm: false,
                    post_norms: false,
                    embedding_scale: None,
                    attention_scale: ((hidden_size / heads.max(1)) as f64).powf(-0.5),
                    attn_logit_softcapping: None,
                    final_logit_softcapping: None,
                    hidden_act: get("activation_function")
                        .and_then(Value::as_str)
                        .unwrap_or("gelu_new")
                        .to_string(),
                    eos_token_ids,
                    bos_token_id,
                }
            }
        };
        config.check(path)?;
        Ok(config)
    }

    /// Reads the metadata of a GGUF file as llama.cpp's loaders read it
    /// (keys under the architecture's prefix, its defaults where a key is
    /// missing); `source` gives the rotary factor tensors some files hold.
    pub(crate) fn from_gguf(
        meta: &HashMap<String, gguf_file::Value>,
        source: &Source,
        path: &Path,
    ) -> Result<Self> {
        let bad = |reason: String| Error::ModelLoad {
            path: path.to_path_buf(),
            reason,
        };
        let arch = meta
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| bad("the GGUF file names no general.architecture".into()))?;
        // Only Llama's converter permutes the q/k rows into interleaved pairs.
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" | "qwen3" | "phi3" | "gemma" | "gemma2" | "gemma3" => RopeStyle::Halves,
            _ => {
                return Err(Error::UnsupportedModel {
                    path: path.to_path_buf(),
                    model_type: arch,
                })
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let get = |k: &str| meta.get(&key(k));
        let int = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .to_u64()
                    .ok()
                    .or_else(|| v.to_u32().ok().map(u64::from))
                    .or_else(|| v.to_i32().ok().and_then(|n| u64::try_from(n).ok()))
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| bad(format!("{} is not a size", key(k)))),
            }
        };
        let need = |k: &str| -> Result<usize> {
            int(k)?.ok_or_else(|| bad(format!("the GGUF file has no {}", key(k))))
        };
        let float = |k: &str| -> Result<Option<f64>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .to_f32()
                    .ok()
                    .map(f64::from)
                    .or_else(|| v.to_f64().ok())
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| bad(format!("{} is not a number", key(k)))),
            }
        };
        let hidden_size = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let layers = need("block_count")?;
        let vocab_size = match meta
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
        {
            Some(tokens) => tokens.len(),
            None => need("vocab_size")?,
        };
        let head_dim = int("attention.key_length")?.unwrap_or(hidden_size / heads.max(1));
        check_early(hidden_size, layers, head_dim, path)?;
        let rotated = int("rope.dimension_count")?.unwrap_or(head_dim);
        let positions = int("context_length")?.unwrap_or(4096);
        let gemma = is_gemma(&arch);
        let theta = float("rope.freq_base")?.unwrap_or(10000.0);
        let attn_factor = float("rope.scaling.attn_factor")?.unwrap_or(1.0);
        let original = int("rope.scaling.original_context_length")?.unwrap_or(positions);
        let factors = |name: &str| -> Result<Option<Vec<f32>>> {
            if source.contains(name) {
                source.vector(name, rotated / 2).map(Some)
            } else {
                Ok(None)
            }
        };
        let scaling_kind = get("rope.scaling.type")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("linear");
        let factor = float("rope.scaling.factor")?
            .or(float("rope.scale_linear")?)
            .filter(|&f| f != 0.0);
        let scaling = match (
            factors("rope_freqs.weight")?,
            factors("rope_factors_short.weight")?,
            factors("rope_factors_long.weight")?,
        ) {
            // Llama 3.1: per-dimension divisors written by the converter.
            (Some(f), _, _) => RopeScaling::Factors {
                factors: f,
                attention_factor: attn_factor,
            },
            // Phi-3's LongRoPE, chosen per sequence length as transformers does.
            (None, Some(short), Some(long)) => RopeScaling::LongRope {
                short: short.into_iter().map(f64::from).collect(),
                long: long.into_iter().map(f64::from).collect(),
                original,
                attention_factor: attn_factor,
            },
            _ => match (scaling_kind, factor) {
                ("none", _) | (_, None) => RopeScaling::None,
                ("linear", Some(f)) => RopeScaling::Linear { factor: f },
                ("yarn", Some(f)) => RopeScaling::Yarn {
                    factor: f,
                    original,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    attention_factor: (0.1 * f.ln() + 1.0) * attn_factor,
                    truncate: true,
                },
                (other, _) => {
                    return Err(bad(format!(
                        "rope scaling {other:?} is not supported by the engine"
                    )))
                }
            },
        };
        let rope = Rope {
            theta,
            dim: rotated,
            scaling,
        };
        // Sliding windows as llama.cpp applies them: Gemma 2 on even
        // layers, Gemma 3 on all but every sixth; llama.cpp runs the
        // other families' files with full attention.
        let window = int("attention.sliding_window")?.filter(|&w| w > 0);
        let period = match arch.as_str() {
            "gemma2" => Some(2),
            "gemma3" => Some(
                get("attention.sliding_window_pattern")
                    .and_then(|v| v.to_u32().ok())
                    .map_or(6, |p| p as usize),
            ),
            _ => None,
        };
        let sliding_windows = (0..layers)
            .map(|i| match (window, period) {
                (Some(w), Some(p)) if p == 0 || i % p < p - 1 => Some(w),
                _ => None,
            })
            .collect();
        let rope_local = (arch == "gemma3").then(|| {
            Rope::plain(
                float("rope.freq_base_swa")
                    .ok()
                    .flatten()
                    .unwrap_or(10000.0),
                rotated,
            )
        });
        // llama.cpp's attention scale for Gemma: by width per head for the
        // 27B models (46 / 62 layers), by head size otherwise.
        let scale_by_width = matches!((arch.as_str(), layers), ("gemma2", 46) | ("gemma3", 62));
        let attention_scale = if scale_by_width {
            ((hidden_size / heads.max(1)) as f64).powf(-0.5)
        } else {
            (head_dim as f64).powf(-0.5)
        };
        let cap = |k: &str, default: Option<f64>| -> Result<Option<f64>> {
            Ok(float(k)?.or(default).filter(|&c| c > 0.0))
        };
        let (attn_cap, final_cap) = match arch.as_str() {
            "gemma2" => (
                cap("attn_logit_softcapping", Some(50.0))?,
                cap("final_logit_softcapping", Some(30.0))?,
            ),
            "gemma3" => (None, cap("final_logit_softcapping", None)?),
            _ => (None, None),
        };
        let config = ModelConfig {
            model_type: arch.clone(),
            family: Family::Llama,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: int("attention.head_count_kv")?.unwrap_or(heads),
            head_dim,
            vocab_size,
            norm_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            rope: Some(rope),
            rope_local,
            rope_style,
            sliding_windows,
            max_position_embeddings: positions,
            tie_word_embeddings: false,
            hidden_act: if gemma { "gelu_pytorch_tanh" } else { "silu" }.into(),
            qk_norm: matches!(arch.as_str(), "qwen3" | "gemma3"),
            post_norms: matches!(arch.as_str(), "gemma2" | "gemma3"),
            embedding_scale: gemma.then(|| (hidden_size as f64).sqrt() as f32),
            attention_scale,
            attn_logit_softcapping: attn_cap,
            final_logit_softcapping: final_cap,
            eos_token_ids: Vec::new(),
            bos_token_id: None,
        };
        config.check(path)?;
        Ok(config)
    }

    /// Checks that the sizes fit together.
    pub(crate) fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::ModelLoad {
            path: path.to_path_buf(),
            reason,
        };
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return Err(bad(
                "hidden size, layer count and vocabulary must be positive".into(),
            ));
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(format!(
                "{} attention heads cannot share {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        check_head_dim(self.head_dim, path)?;
        use limits::*;
        for (name, value, most) in [
            ("hidden size", self.hidden_size, HIDDEN),
            ("feed-forward size", self.intermediate_size, INTERMEDIATE),
            ("layer count", self.num_hidden_layers, LAYERS),
            ("attention head count", self.num_attention_heads, HEADS),
            ("vocabulary size", self.vocab_size, VOCAB),
            ("context length", self.max_position_embeddings, POSITIONS),
        ] {
            if value > most {
                return Err(bad(format!(
                    "{name} {value} is past the engine's limit of {most}"
                )));
            }
        }
        if self.intermediate_size == 0 || self.max_position_embeddings == 0 {
            return Err(bad(
                "feed-forward size and context length must be positive".into()
            ));
        }
        let width = self.num_attention_heads * self.head_dim;
        if width > ATTENTION_WIDTH {
            return Err(bad(format!(
                "{} heads of {} ({width}) are past the engine's limit of {ATTENTION_WIDTH}",
                self.num_attention_heads, self.head_dim
            )));
        }
        if self.family == Family::Gpt2 && width != self.hidden_size {
            return Err(bad(format!(
                "a hidden size of {} does not split into {} heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.sliding_windows.len() != self.num_hidden_layers {
            return Err(bad(format!(
                "{} sliding windows for {} layers",
                self.sliding_windows.len(),
                self.num_hidden_layers
            )));
        }
        if self.family == Family::Llama {
            let ropes = [self.rope.as_ref(), self.rope_local.as_ref()];
            if ropes[0].is_none() {
                return Err(bad("a rotary model needs a rotary embedding".into()));
            }
            for rope in ropes.into_iter().flatten() {
                rope.check().map_err(bad)?;
                if rope.dim > self.head_dim {
                    return Err(bad(format!(
                        "{} rotated dimensions in a head of {}",
                        rope.dim, self.head_dim
                    )));
                }
            }
        }
        if !(self.attention_scale.is_finite() && self.attention_scale > 0.0) {
            return Err(bad(format!(
                "the attention scale {} must be a positive number",
                self.attention_scale
            )));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(bad(format!(
                "the norm epsilon {} must be between 0 and 1",
                self.norm_eps
            )));
        }

        let activations = ["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"];
        if !activations.contains(&self.hidden_act.as_str()) {
            return Err(bad(format!(
                "activation {:?} is not supported (supported: {})",
                self.hidden_act,
                activations.join(", ")
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(json, Path::new("config.json"))
    }

    const LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100"#;

    #[test]
    fn llama_defaults_and_transformers5_rope_parameters() {
        let c = parse(&format!(
            r#"{LLAMA}, "rope_parameters": {{"rope_type": "default", "rope_theta": 5e5}}}}"#
        ))
        .unwrap();
        assert_eq!(
            (c.family, c.head_dim, c.rope.as_ref().map(|r| r.theta)),
            (Family::Llama, 16, Some(5e5))
        );
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn sliding_windows_apply_per_layer_without_capping_the_length() {
        let c = parse(&format!(r#"{LLAMA}, "model_type": "mistral", "max_position_embeddings": 9000, "sliding_window": 4096}}"#)).unwrap();
        assert_eq!(c.max_position_embeddings, 9000);
        assert_eq!(c.sliding_windows, vec![Some(4096); 2]);
        let c = parse(&format!(r#"{LLAMA}, "model_type": "mistral", "sliding_window": 4096, "use_sliding_window": false}}"#)).unwrap();
        assert_eq!(c.sliding_windows, vec![None; 2]);
        // Qwen: from max_window_layers on, when enabled.
        let c = parse(&format!(r#"{LLAMA}, "model_type": "qwen2", "sliding_window": 8, "use_sliding_window": true, "max_window_layers": 1}}"#)).unwrap();
        assert_eq!(c.sliding_windows, vec![None, Some(8)]);
        let c = parse(&format!(
            r#"{LLAMA}, "model_type": "qwen2", "sliding_window": 8}}"#
        ))
        .unwrap();
        assert_eq!(c.sliding_windows, vec![None; 2]);
        // Gemma 3: every sixth layer global unless layer_types says otherwise.
        let gemma = format!(
            r#"{LLAMA}, "model_type": "gemma3_text", "num_hidden_layers": 7, "sliding_window": 3"#
        );
        let c = parse(&format!("{gemma}}}")).unwrap();
        let mut want = vec![Some(3); 7];
        want[5] = None;
        assert_eq!(c.sliding_windows, want);
        assert_eq!(c.rope.as_ref().map(|r| r.theta), Some(1e6));
        assert_eq!(c.rope_local.as_ref().map(|r| r.theta), Some(1e4));
        assert!(c.qk_norm && c.post_norms && c.tie_word_embeddings);
        let types = r#"["full_attention", "sliding_attention", "full_attention", "full_attention", "full_attention", "full_attention", "full_attention"]"#;
        let c = parse(&format!(r#"{gemma}, "layer_types": {types}}}"#)).unwrap();
        assert_eq!(c.sliding_windows.iter().filter(|w| w.is_some()).count(), 1);
    }

    #[test]
    fn unsupported_models_and_settings_are_named() {
        let e = parse(r#"{"model_type": "bert", "hidden_size": 8}"#).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedModel { ref model_type, .. } if model_type == "bert"),
            "{e}"
        );
        let e = parse(&format!(
            r#"{LLAMA}, "rope_scaling": {{"rope_type": "mrope", "factor": 4.0}}}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("\"mrope\""), "{e}");
        let e = parse(&format!(r#"{LLAMA}, "num_key_value_heads": 3}}"#)).unwrap_err();
        assert!(e.to_string().contains("cannot share"), "{e}");
        let e = parse(r#"{"model_type": "llama"}"#).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
        assert!(matches!(parse("not json"), Err(Error::ModelLoad { .. })));
    }

    #[test]
    fn sizes_past_the_limits_and_bad_numbers_are_named() {
        for (extra, named) in [
            (r#""hidden_size": 1000000"#, "hidden size 1000000"),
            (r#""num_hidden_layers": 100000"#, "layer count"),
            (r#""intermediate_size": 0"#, "feed-forward size"),
            (r#""vocab_size": 4000000000"#, "vocabulary size"),
            (r#""max_position_embeddings": 100000000"#, "context length"),
            (r#""max_position_embeddings": 0"#, "context length"),
            (r#""head_dim": 100000"#, "head size"),
            (
                r#""num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 2048"#,
                "heads of 2048",
            ),
            (r#""rope_theta": -1.0"#, "rope_theta"),
            (r#""rope_theta": "big""#, "rope_theta"),
            (r#""rms_norm_eps": 0.0"#, "epsilon"),
            (r#""rms_norm_eps": 5.0"#, "epsilon"),
            (r#""hidden_size": -64"#, "hidden_size is -64"),
            (r#""hidden_size": 64.5"#, "hidden_size is 64.5"),
            (r#""eos_token_id": 5000000000"#, "eos_token_id: 5000000000"),
            (r#""eos_token_id": [2, -1]"#, "eos_token_id: -1"),
            (r#""bos_token_id": "one""#, "bos_token_id"),
        ] {
            let e = parse(&format!("{LLAMA}, {extra}}}")).unwrap_err();
            assert!(matches!(e, Error::ModelLoad { .. }), "{extra}: {e}");
            assert!(e.to_string().contains(named), "{extra}: {e}");
        }
        let gpt2 = r#"{"model_type": "gpt2", "n_embd": 66, "n_head": 4, "n_layer": 1, "vocab_size": 10, "n_positions": 8}"#;
        let e = parse(gpt2).unwrap_err();
        assert!(e.to_string().contains("does not split into 4 heads"), "{e}");
        // The limits leave real models alone: a 128k-context model.
        let c = parse(&format!(
            r#"{LLAMA}, "max_position_embeddings": 131072, "eos_token_id": [1, 2]}}"#
        ))
        .unwrap();
        assert_eq!(
            (c.max_position_embeddings, c.eos_token_ids),
            (131072, vec![1, 2])
        );
    }
}
