//! Architecture settings of a model, read from a Hugging Face `config.json`
//! or from GGUF metadata.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The layer layouts the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama, Mistral, Qwen2, SmolLM: RMSNorm, rotary embeddings,
    /// grouped-query attention, SwiGLU.
    Llama,
    /// GPT-2: LayerNorm, learned positions, GELU MLP, fused qkv.
    Gpt2,
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension i with i + head_dim/2 (Hugging Face weights).
    Halves,
    /// Dimension 2i with 2i + 1 (GGUF files, whose q/k rows are permuted).
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
    /// Rotary base (Llama family).
    pub rope_theta: f64,
    /// Rotary dimension pairing.
    pub rope_style: RopeStyle,
    /// Longest sequence the model supports (learned positions, rotary tables).
    pub max_position_embeddings: usize,
    /// Whether the output layer reuses the token embeddings.
    pub tie_word_embeddings: bool,
    /// Activation of the feed-forward block (`silu`, `gelu_new`, ...).
    pub hidden_act: String,
    /// End-of-sequence token ids from the config, if any.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id, if any.
    pub bos_token_id: Option<u32>,
}

/// Model types read as the Llama family.
const LLAMA_TYPES: [&str; 5] = ["llama", "mistral", "qwen2", "smollm", "smollm2"];

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
    /// Positions (the rotary tables hold `positions × head_dim` floats).
    pub const POSITIONS: usize = 1 << 20;
    /// Floats of the rotary tables, 1 GiB.
    pub const ROPE_FLOATS: usize = 1 << 28;
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
                // transformers 5 moves rope_theta into rope_parameters
                let rope = get("rope_parameters").or_else(|| get("rope_scaling"));
                if let Some(rope) = rope {
                    let kind = rope
                        .get("rope_type")
                        .or_else(|| rope.get("type"))
                        .and_then(Value::as_str)
                        .unwrap_or("default");
                    if kind != "default" {
                        return Err(bad(format!(
                            "rope scaling {kind:?} is not supported by the engine (only plain rotary embeddings)"
                        )));
                    }
                }
                let theta = match rope.and_then(|r| r.get("rope_theta")) {
                    Some(v) => v
                        .as_f64()
                        .ok_or_else(|| bad(format!("rope_theta is {v}, not a number")))?,
                    None => float_of(&["rope_theta"], 10000.0)?,
                };
                ModelConfig {
                    model_type,
                    family,
                    hidden_size,
                    intermediate_size: need(&["intermediate_size"])?,
                    num_hidden_layers: need(&["num_hidden_layers"])?,
                    num_attention_heads: heads,
                    num_key_value_heads: kv_heads,
                    head_dim: usize_of(&["head_dim"])?.unwrap_or(hidden_size / heads.max(1)),
                    vocab_size: need(&["vocab_size"])?,
                    norm_eps: float_of(&["rms_norm_eps"], 1e-6)?,
                    rope_theta: theta,
                    rope_style: RopeStyle::Halves,
                    // Attention beyond a sliding window is not implemented:
                    // sequences are held within it instead.
                    max_position_embeddings: {
                        let most = usize_of(&["max_position_embeddings"])?.unwrap_or(4096);
                        let sliding =
                            get("use_sliding_window").and_then(Value::as_bool) != Some(false);
                        match usize_of(&["sliding_window"])? {
                            Some(window) if sliding && window > 0 => most.min(window),
                            _ => most,
                        }
                    },
                    tie_word_embeddings: get("tie_word_embeddings")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    hidden_act: get("hidden_act")
                        .and_then(Value::as_str)
                        .unwrap_or("silu")
                        .to_string(),
                    eos_token_ids,
                    bos_token_id,
                }
            }
            Family::Gpt2 => {
                let hidden_size = need(&["n_embd", "hidden_size"])?;
                let heads = need(&["n_head", "num_attention_heads"])?;
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
                    num_hidden_layers: need(&["n_layer", "num_hidden_layers"])?,
                    num_attention_heads: heads,
                    num_key_value_heads: heads,
                    head_dim: hidden_size / heads.max(1),
                    vocab_size: need(&["vocab_size"])?,
                    norm_eps: float_of(&["layer_norm_epsilon"], 1e-5)?,
                    rope_theta: 0.0,
                    rope_style: RopeStyle::Halves,
                    max_position_embeddings: need(&["n_positions", "max_position_embeddings"])?,
                    tie_word_embeddings: true,
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
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!("head size {} must be even", self.head_dim)));
        }
        use limits::*;
        for (name, value, most) in [
            ("hidden size", self.hidden_size, HIDDEN),
            ("feed-forward size", self.intermediate_size, INTERMEDIATE),
            ("layer count", self.num_hidden_layers, LAYERS),
            ("attention head count", self.num_attention_heads, HEADS),
            ("head size", self.head_dim, HEAD_DIM),
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
        if self.family == Family::Llama {
            if self.max_position_embeddings * self.head_dim > ROPE_FLOATS {
                return Err(bad(format!(
                    "rotary tables for {} positions of head size {} are past the engine's limit",
                    self.max_position_embeddings, self.head_dim
                )));
            }
            if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
                return Err(bad(format!(
                    "rope_theta {} must be a finite number above 1",
                    self.rope_theta
                )));
            }
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
            (c.family, c.head_dim, c.rope_theta),
            (Family::Llama, 16, 5e5)
        );
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn sliding_windows_cap_the_length() {
        let c = parse(&format!(r#"{LLAMA}, "model_type": "mistral", "max_position_embeddings": 9000, "sliding_window": 4096}}"#)).unwrap();
        assert_eq!(c.max_position_embeddings, 4096);
        let c = parse(&format!(r#"{LLAMA}, "max_position_embeddings": 9000, "sliding_window": 4096, "use_sliding_window": false}}"#)).unwrap();
        assert_eq!(c.max_position_embeddings, 9000);
    }

    #[test]
    fn unsupported_models_and_settings_are_named() {
        let e = parse(r#"{"model_type": "bert", "hidden_size": 8}"#).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedModel { ref model_type, .. } if model_type == "bert"),
            "{e}"
        );
        let e = parse(&format!(
            r#"{LLAMA}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("\"yarn\""), "{e}");
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
            (
                r#""max_position_embeddings": 1000000, "head_dim": 2048"#,
                "rotary tables",
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
