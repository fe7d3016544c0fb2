//! CPU inference with interventions, no torch: load a Hugging Face model
//! folder or a GGUF file, apply a reft_rs checkpoint, generate.
//!
//! ```no_run
//! use std::sync::Arc;
//! use reft_core::engine::{Engine, GenerateOptions};
//! let engine = Arc::new(Engine::load("model/".as_ref(), Some("reft/".as_ref()), None)?);
//! let text = engine.text().expect("the folder has tokenizer.json");
//! let prompt = text.encode("Hello", true)?;
//! let out = engine.generate(&[prompt], &GenerateOptions::greedy(32))?;
//! println!("{}", text.decode(&out[0])?);
//! # Ok::<(), reft_core::Error>(())
//! ```
//!
//! The layer loop is written here on candle's tensor operations (candle's
//! own model files take no per-layer hooks), with an edit point at each
//! component interventions may target. Weights are float32 (safetensors of
//! any float dtype are converted once) or GGUF block-quantized matrices,
//! multiplied by float32 activations. Interventions act in the prefill, on
//! the positions that [`crate::positions::locate`] picks from each prompt;
//! generated tokens see the edited prompt through the KV cache.

mod config;
mod edits;
mod kernels;
mod model;
mod sample;
mod text;
mod weights;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;

pub use config::{Family, ModelConfig, RopeStyle};
pub use sample::Sampling;
pub use text::Text;

use crate::error::{Error, Result};
use edits::EditSet;
use model::{KvCache, NoEdits, Transformer};
use weights::Source;

/// Settings of one generation call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate per prompt.
    pub max_new_tokens: usize,
    /// How tokens are picked.
    pub sampling: Sampling,
    /// Texts that end a prompt's generation (needs a tokenizer); the result
    /// is cut before the first one.
    pub stop: Vec<String>,
    /// Also edit every generated token with the position-based
    /// interventions (those at `all` positions always do).
    pub intervene_on_generated: bool,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerateOptions {
            max_new_tokens,
            sampling: Sampling::default(),
            stop: Vec::new(),
            intervene_on_generated: false,
            ignore_eos: false,
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Threads of a private pool; `None` uses the process-wide one.
    pub threads: Option<usize>,
    /// GGUF only: expand block-quantized matrices to float32 when loading
    /// (exactly what transformers computes from the file; 4-8x the memory).
    pub dequantize: bool,
}

/// A loaded model, its tokenizer and, optionally, interventions.
///
/// An engine is immutable once loaded: any number of threads may call it at
/// once, each call with its own KV cache.
pub struct Engine {
    model: Transformer,
    text: Option<Text>,
    edits: Option<EditSet>,
    pool: Option<rayon::ThreadPool>,
    quantized: bool,
}

fn gguf_config(meta: &HashMap<String, gguf_file::Value>, path: &Path) -> Result<ModelConfig> {
    let bad = |reason: String| Error::ModelLoad {
        path: path.to_path_buf(),
        reason,
    };
    let arch = meta
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad("the GGUF file names no general.architecture".into()))?;
    let rope_style = match arch.as_str() {
        "llama" | "mistral" => RopeStyle::Interleaved,
        "qwen2" => RopeStyle::Halves,
        _ => {
            return Err(Error::UnsupportedModel {
                path: path.to_path_buf(),
                model_type: arch,
            })
        }
    };
    let get = |key: &str| meta.get(&format!("{arch}.{key}"));
    let int = |key: &str| -> Option<usize> {
        get(key)
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .map(|n| n as usize)
    };
    let need =
        |key: &str| int(key).ok_or_else(|| bad(format!("the GGUF file has no {arch}.{key}")));
    let float = |key: &str, default: f64| -> f64 {
        get(key)
            .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
            .unwrap_or(default)
    };
    let hidden_size = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let vocab_size = match meta
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
    {
        Some(tokens) => tokens.len(),
        None => need("vocab_size")?,
    };
    let config = ModelConfig {
        model_type: arch.clone(),
        family: Family::Llama,
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        num_hidden_layers: need("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: int("attention.head_count_kv").unwrap_or(heads),
        head_dim: int("rope.dimension_count").unwrap_or(hidden_size / heads.max(1)),
        vocab_size,
        norm_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta: float("rope.freq_base", 10000.0),
        rope_style,
        max_position_embeddings: int("context_length").unwrap_or(4096),
        tie_word_embeddings: false,
        hidden_act: "silu".into(),
        eos_token_ids: Vec::new(),
        bos_token_id: None,
    };
    config.check(path)?;
    Ok(config)
}

/// candle runs element-wise operations on a spinning thread pool of its
/// own beside rayon's; on a few cores the two fight (a prefill took 40% longer).
/// Unless the user chose otherwise, element-wise work stays on the calling
/// thread and the matrix products use rayon. Must run before candle's first
/// operation, which creates its pool. Also pins `RAYON_NUM_THREADS` to the
/// size of rayon's global pool (which this call creates if needed).
fn limit_candle_pool() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        // candle sizes each matrix product's split from this variable, and
        // without it reads the CPU topology from /proc on every product.
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var(
                "RAYON_NUM_THREADS",
                rayon::current_num_threads().to_string(),
            );
        }
    });
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| &magic == b"GGUF")
        .unwrap_or(false)
}

impl Engine {
    /// Loads a model folder (`config.json`, `model.safetensors` or a sharded
    /// index, `tokenizer.json` when present) or a GGUF file, then the
    /// checkpoint at `reft`, if any. `threads` sizes a private thread pool
    /// (by default the process-wide one).
    pub fn load(model_path: &Path, reft: Option<&Path>, threads: Option<usize>) -> Result<Self> {
        Self::load_with(
            model_path,
            reft,
            &LoadOptions {
                threads,
                ..LoadOptions::default()
            },
        )
    }

    /// [`Engine::load`] with every option.
    pub fn load_with(
        model_path: &Path,
        reft: Option<&Path>,
        options: &LoadOptions,
    ) -> Result<Self> {
        limit_candle_pool();
        let threads = options.threads;
        let pool = match threads {
            Some(0) => return Err(Error::InvalidArgument("threads must be at least 1".into())),
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| Error::Backend(format!("cannot start {n} threads: {e}")))?,
            ),
            None => None,
        };
        let load = || -> Result<(Transformer, Option<Text>, bool)> {
            if model_path.is_dir() {
                let config_path = model_path.join("config.json");
                let json = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Error::ModelNotFound {
                        path: config_path.clone(),
                    },
                    _ => Error::io(&config_path, e),
                })?;
                let config = ModelConfig::from_hf_json(&json, &config_path)?;
                let source = Source::safetensors(model_path)?;
                let text = Text::from_folder(model_path, &config.eos_token_ids)?;
                Ok((Transformer::from_hf(config, &source)?, text, false))
            } else if model_path.is_file() {
                if !is_gguf(model_path) {
                    return Err(Error::ModelLoad {
                        path: model_path.to_path_buf(),
                        reason:
                            "a model file must be GGUF; pass a Hugging Face model folder otherwise"
                                .into(),
                    });
                }
                let source = Source::gguf(model_path, options.dequantize)?;
                let meta = source.gguf_metadata().expect("a GGUF source");
                let config = gguf_config(meta, model_path)?;
                let text = match &source {
                    Source::Gguf { content, .. } => Text::from_gguf(content)?,
                    Source::Safetensors { .. } => None,
                };
                Ok((
                    Transformer::from_gguf(config, &source)?,
                    text,
                    !options.dequantize,
                ))
            } else {
                Err(Error::ModelNotFound {
                    path: model_path.to_path_buf(),
                })
            }
        };
        let (model, text, quantized) = match &pool {
            Some(pool) => pool.install(load)?,
            None => load()?,
        };
        let edits = match reft {
            Some(dir) => Some(EditSet::load(dir, &model.config)?),
            None => None,
        };
        Ok(Engine {
            model,
            text,
            edits,
            pool,
            quantized,
        })
    }

    fn run<T: Send>(&self, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        match &self.pool {
            Some(pool) => pool.install(work),
            None => work(),
        }
    }

    /// The model's architecture settings.
    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// The tokenizer, when the model came with one.
    pub fn text(&self) -> Option<&Text> {
        self.text.as_ref()
    }

    /// Whether the weights are GGUF block-quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized
    }

    /// The checkpoint config of the interventions, if any.
    pub fn reft_config(&self) -> Option<&crate::config::ReftConfig> {
        self.edits.as_ref().map(|e| &e.config)
    }

    /// Token ids that end generation.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.text {
            Some(text) if !text.eos_ids.is_empty() => text.eos_ids.clone(),
            _ => self.model.config.eos_token_ids.clone(),
        }
    }

    /// Float32 logits `[len, vocab]` (row-major) of every position of one
    /// sequence, with the interventions applied (the whole sequence is the
    /// prompt).
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument("no token ids given".into()));
        }
        self.run(|| {
            let mut cache = KvCache::new(self.model.config.num_hidden_layers, vec![0]);
            let logits = match &self.edits {
                Some(set) => {
                    let lengths = [ids.len() as i64];
                    let step = set.step(Some(&lengths), ids.len(), 0, ids.len(), false)?;
                    self.model.forward(ids, &mut cache, &step, true)?
                }
                None => self.model.forward(ids, &mut cache, &NoEdits, true)?,
            };
            Ok(logits.flatten_all()?.to_vec1::<f32>()?)
        })
    }

    /// Generates from a batch of token-id prompts; returns the new tokens
    /// of each (end-of-sequence tokens left out).
    pub fn generate(
        self: &Arc<Self>,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_streaming(prompts, options, |_, _| {})
    }

    /// [`Engine::generate`], calling `on_token(prompt index, token)` for each
    /// token as soon as it is chosen.
    pub fn generate_streaming(
        self: &Arc<Self>,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        let mut session = Session::new(Arc::clone(self), prompts.to_vec(), options.clone())?;
        while let Some(tokens) = session.step()? {
            for (row, token) in tokens.into_iter().enumerate() {
                if let Some(token) = token {
                    on_token(row, token);
                }
            }
        }
        Ok(session.generated)
    }
}

/// One generation in progress, advanced a token at a time by [`Session::step`].
pub struct Session {
    engine: Arc<Engine>,
    options: GenerateOptions,
    cache: KvCache,
    prompt: Vec<u32>,
    lengths: Vec<i64>,
    width: usize,
    pending: Vec<u32>,
    done: Vec<bool>,
    generated: Vec<Vec<u32>>,
    steps: usize,
    rng: sample::Rng,
    eos: Vec<u32>,
}

impl Session {
    /// Prepares a left-padded batch of `prompts`.
    pub fn new(
        engine: Arc<Engine>,
        prompts: Vec<Vec<u32>>,
        options: GenerateOptions,
    ) -> Result<Self> {
        options.sampling.validate()?;
        if prompts.is_empty() {
            return Err(Error::InvalidArgument("no prompts given".into()));
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(Error::InvalidArgument(format!("prompt {i} has no tokens")));
        }
        if !options.stop.is_empty() && engine.text.is_none() {
            return Err(Error::Tokenizer(
                "stop strings need a tokenizer, and the model has none".into(),
            ));
        }
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut prompt = Vec::with_capacity(width * prompts.len());
        let mut pad = Vec::with_capacity(prompts.len());
        for p in &prompts {
            pad.push(width - p.len());
            prompt.extend(std::iter::repeat_n(0, width - p.len()));
            prompt.extend_from_slice(p);
        }
        let layers = engine.model.config.num_hidden_layers;
        let eos = if options.ignore_eos {
            Vec::new()
        } else {
            engine.eos_token_ids()
        };
        Ok(Session {
            lengths: prompts.iter().map(|p| p.len() as i64).collect(),
            done: vec![options.max_new_tokens == 0; prompts.len()],
            generated: vec![Vec::new(); prompts.len()],
            rng: sample::Rng::new(options.sampling.seed),
            cache: KvCache::new(layers, pad),
            engine,
            options,
            prompt,
            width,
            pending: Vec::new(),
            steps: 0,
            eos,
        })
    }

    /// Tokens generated so far, per prompt.
    pub fn generated(&self) -> &[Vec<u32>] {
        &self.generated
    }

    /// Whether every prompt has finished.
    pub fn is_done(&self) -> bool {
        self.done.iter().all(|&d| d)
    }

    /// Generates one token for every unfinished prompt: `None` once all
    /// have finished, else the new token of each prompt (`None` for prompts
    /// that had already finished or that just hit an end-of-sequence token).
    pub fn step(&mut self) -> Result<Option<Vec<Option<u32>>>> {
        if self.is_done() {
            return Ok(None);
        }
        let engine = Arc::clone(&self.engine);
        let prefill = self.steps == 0;
        let ids = if prefill {
            std::mem::take(&mut self.prompt)
        } else {
            self.pending.clone()
        };
        let width = if prefill { self.width } else { 1 };
        let logits = {
            let cache = &mut self.cache;
            let lengths = &self.lengths;
            let (prompt_width, on_generated) = (self.width, self.options.intervene_on_generated);
            engine.run(|| {
                let start = cache.len;
                let out = match &engine.edits {
                    Some(set) => {
                        let step = set.step(
                            prefill.then_some(lengths.as_slice()),
                            width,
                            start,
                            prompt_width,
                            on_generated,
                        )?;
                        engine.model.forward(&ids, cache, &step, false)?
                    }
                    None => engine.model.forward(&ids, cache, &NoEdits, false)?,
                };
                Ok(out.to_vec2::<f32>()?)
            })?
        };
        self.steps += 1;
        let mut out = Vec::with_capacity(logits.len());
        self.pending.clear();
        for (row, values) in logits.iter().enumerate() {
            if self.done[row] {
                out.push(None);
                self.pending.push(0);
                continue;
            }
            let token = sample::choose(values, &self.options.sampling, &mut self.rng);
            self.pending.push(token);
            if self.eos.contains(&token) {
                self.done[row] = true;
                out.push(None);
                continue;
            }
            self.generated[row].push(token);
            out.push(Some(token));
            if !self.options.stop.is_empty() {
                if let Some(text) = &engine.text {
                    let decoded = text.decode(&self.generated[row])?;
                    if self
                        .options
                        .stop
                        .iter()
                        .any(|s| decoded.contains(s.as_str()))
                    {
                        self.done[row] = true;
                    }
                }
            }
        }
        if self.steps >= self.options.max_new_tokens {
            self.done.iter_mut().for_each(|d| *d = true);
        }
        Ok(Some(out))
    }
}

/// `text` cut before the first of `stop` it contains.
pub fn cut_at_stop<'a>(text: &'a str, stop: &[String]) -> &'a str {
    let end = stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::cut_at_stop;

    #[test]
    fn text_is_cut_before_the_first_stop() {
        let stops = vec!["END".to_string(), "\n\n".to_string(), String::new()];
        assert_eq!(cut_at_stop("one\n\ntwo END", &stops), "one");
        assert_eq!(cut_at_stop("no stop here", &stops), "no stop here");
        assert_eq!(cut_at_stop("xEND\n\n", &stops), "x");
    }
}
