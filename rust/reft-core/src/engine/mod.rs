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
mod gemm;
mod kernels;
mod model;
mod quant;
mod reply;
mod rope;
mod sample;
mod scheduler;
mod text;
mod vocab;
mod weights;
mod widened;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

pub use config::{same_architecture, Family, ModelConfig, RopeStyle};
pub use kernels::Isa;
pub use reply::ReplyText;
pub use rope::{Rope, RopeScaling};
pub use sample::Sampling;
pub use scheduler::{Event, Finish, Request, Scheduler, SchedulerOptions, Session};
pub use text::Text;
pub use weights::{read_gguf_tensor, Activations};

use crate::error::{Error, Result};
use edits::{BatchEdits, EditSet, Span};
use model::{SeqCache, Transformer};
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
    /// The edit strength α: each edited state becomes h + α·(Φ(h) − h)
    /// (1 the trained edit, 0 the base model, negative reverses a steering
    /// vector).
    pub strength: f32,
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
            strength: 1.0,
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
    /// GGUF only: how activations meet the quantized matrices.
    pub activations: Activations,
}

/// A loaded model, its tokenizer and, optionally, interventions: the
/// checkpoint it was loaded with, and any number of named adapters
/// (checkpoints added and removed while it runs).
///
/// Any number of threads may call an engine at once, each call with its own
/// KV caches.
pub struct Engine {
    model: Transformer,
    text: Option<Text>,
    edits: Option<Arc<EditSet>>,
    adapters: RwLock<HashMap<String, Arc<EditSet>>>,
    pool: Option<rayon::ThreadPool>,
    /// The threads asked for, to rebuild the pool in a forked process.
    threads: Option<usize>,
    /// The process that built `pool`.
    created_by: u32,
    /// A pool of this process when it was forked from the one that built
    /// `pool` or used rayon's global pool: the parent's pools have no
    /// threads here (work handed to them would wait forever).
    forked_pool: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>>,
    quantized: bool,
}

/// A thread pool of `threads` threads (rayon's default count for `None`).
fn build_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    builder
        .build()
        .map_err(|e| Error::Backend(format!("cannot start a thread pool: {e}")))
}

/// The pool that stands in for rayon's global pool in a process forked
/// after its parent used that pool: one per process, shared by its engines.
fn process_pool(threads: Option<usize>) -> Result<Arc<rayon::ThreadPool>> {
    static POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((owner, pool)) = &*slot {
        if *owner == pid {
            return Ok(pool.clone());
        }
    }
    let pool = Arc::new(build_pool(threads)?);
    if let Some(stale) = slot.replace((pid, pool.clone())) {
        std::mem::forget(stale);
    }
    Ok(pool)
}

/// Longest adapter name.
pub const MAX_ADAPTER_NAME: usize = 128;

fn check_adapter_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ADAPTER_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:@+/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "adapter name {name:?} must be 1 to {MAX_ADAPTER_NAME} characters of letters, digits and . _ - : @ + /"
        )))
    }
}

/// candle runs element-wise operations on a spinning thread pool of its
/// own beside rayon's; on a few cores the two fight (a prefill took 40%
/// longer). This keeps element-wise work on the calling thread
/// (`CANDLE_NUM_THREADS=1`) and pins `RAYON_NUM_THREADS` to the size of
/// rayon's global pool (candle sizes each matrix product's split from it,
/// and without it reads the CPU topology from /proc on every product),
/// unless the user set them.
///
/// It changes the process environment, which is safe only while no other
/// thread may read it: call it at the start of `main`, before any threads
/// start. [`Engine::load`] does not call it; the Python package sets the
/// same variables when it is imported.
pub fn configure_threads_env() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
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
        let threads = options.threads;
        let pool = match threads {
            Some(0) => return Err(Error::InvalidArgument("threads must be at least 1".into())),
            Some(n) => Some(build_pool(Some(n))?),
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
                let source = Source::gguf(model_path, options.dequantize, options.activations)?;
                let meta = source.gguf_metadata().expect("a GGUF source");
                let config = ModelConfig::from_gguf(meta, &source, model_path)?;
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
            None if crate::parallel::parallelism_available() => load()?,
            // A child forked after its parent used rayon: a pool of its own.
            None => process_pool(None)?.install(load)?,
        };
        let edits = match reft {
            Some(dir) => Some(Arc::new(EditSet::load(dir, &model.config)?)),
            None => None,
        };
        Ok(Engine {
            model,
            text,
            edits,
            adapters: RwLock::default(),
            pool,
            threads,
            created_by: std::process::id(),
            forked_pool: Mutex::new(None),
            quantized,
        })
    }

    /// Runs `work` on the engine's threads: its own pool, rayon's global
    /// pool, or, in a process forked from the one that used those, a pool
    /// built for this process on first use; on one of the pool's workers,
    /// with the others waiting for its jobs awake
    /// ([`crate::parallel::with_waiting_workers`]).
    fn run<T: Send>(&self, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let pid = std::process::id();
        match &self.pool {
            Some(pool) if pid == self.created_by => {
                return pool.install(|| crate::parallel::with_waiting_workers(work))
            }
            // On one of the global pool's workers, so that the others can
            // wait for its jobs (`with_waiting_workers`).
            None if crate::parallel::parallelism_available() => {
                return rayon::scope(|_| crate::parallel::with_waiting_workers(work))
            }
            _ => {}
        }
        let pool = {
            let mut slot = self.forked_pool.lock().unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some((owner, pool)) if *owner == pid => pool.clone(),
                _ => {
                    let pool = match self.threads {
                        Some(n) => Arc::new(build_pool(Some(n))?),
                        None => process_pool(None)?,
                    };
                    // A pool inherited from another process is left alone:
                    // its threads are not here to be stopped.
                    if let Some(stale) = slot.replace((pid, pool.clone())) {
                        std::mem::forget(stale);
                    }
                    pool
                }
            }
        };
        pool.install(|| crate::parallel::with_waiting_workers(work))
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

    /// Loads the checkpoint at `dir` as adapter `name`, checked against
    /// the model as at load time. Requests that name it run with it from now on.
    pub fn add_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        check_adapter_name(name)?;
        if self.read_adapters().contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "an adapter named {name:?} is loaded already; remove it first"
            )));
        }
        let set = Arc::new(EditSet::load(dir, &self.model.config)?);
        let mut adapters = self.adapters.write().unwrap_or_else(|p| p.into_inner());
        if adapters.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "an adapter named {name:?} is loaded already; remove it first"
            )));
        }
        adapters.insert(name.to_string(), set);
        Ok(())
    }

    /// Unloads adapter `name`; requests already running with it finish with it.
    pub fn remove_adapter(&self, name: &str) -> Result<()> {
        let mut adapters = self.adapters.write().unwrap_or_else(|p| p.into_inner());
        match adapters.remove(name) {
            Some(_) => Ok(()),
            None => Err(Error::InvalidArgument(format!(
                "no adapter named {name:?} is loaded"
            ))),
        }
    }

    /// Names of the loaded adapters and their checkpoint configs, by name.
    pub fn adapters(&self) -> Vec<(String, crate::config::ReftConfig)> {
        let mut out: Vec<_> = self
            .read_adapters()
            .iter()
            .map(|(name, set)| (name.clone(), set.config.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn read_adapters(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<EditSet>>> {
        self.adapters.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The interventions a request runs with: adapter `name`, or with
    /// `None` the checkpoint the engine was loaded with (if any).
    fn resolve_adapter(&self, name: Option<&str>) -> Result<Option<Arc<EditSet>>> {
        match name {
            None => Ok(self.edits.clone()),
            Some(name) => self
                .read_adapters()
                .get(name)
                .cloned()
                .map(Some)
                .ok_or_else(|| {
                    let mut known: Vec<String> = self.read_adapters().keys().cloned().collect();
                    known.sort();
                    Error::InvalidArgument(format!(
                        "no adapter named {name:?} is loaded (loaded: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ))
                }),
        }
    }

    /// Float32 logits `[len, vocab]` (row-major) of every position of one
    /// sequence, with the interventions applied (the whole sequence is the
    /// prompt).
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.logits_with(ids, None, 1.0)
    }

    /// [`Engine::logits`] with adapter `adapter` (see [`Request::adapter`])
    /// at edit strength `strength` (see [`GenerateOptions::strength`]).
    pub fn logits_with(
        &self,
        ids: &[u32],
        adapter: Option<&str>,
        strength: f32,
    ) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument("no token ids given".into()));
        }
        let set = self.resolve_adapter(adapter)?;
        self.run(|| {
            let c = &self.model.config;
            let mut cache = SeqCache::new(c.num_hidden_layers, self.model.kv_width(), ids.len());
            let span = Span {
                set: set.as_deref(),
                first_row: 0,
                tokens: ids.len(),
                prompt: true,
                on_generated: false,
                strength,
            };
            let edits = BatchEdits::new(&[span])?;
            let logits = self
                .model
                .forward(ids, &[ids.len()], &mut [&mut cache], &edits, true)?;
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
        self.generate_streaming(prompts, &[], options, |_, _| {})
    }

    /// [`Engine::generate`] with one adapter per prompt (`adapters` empty:
    /// the engine's own checkpoint for all), calling `on_token(prompt
    /// index, token)` for each token as soon as it is chosen.
    pub fn generate_streaming(
        self: &Arc<Self>,
        prompts: &[Vec<u32>],
        adapters: &[Option<String>],
        options: &GenerateOptions,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        let mut session = self.session(prompts, adapters, options)?;
        while let Some(tokens) = session.step()? {
            for (row, token) in tokens.into_iter().enumerate() {
                if let Some(token) = token {
                    on_token(row, token);
                }
            }
        }
        Ok(session.into_generated())
    }

    /// The text of each prompt's reply, cut before its first stop string
    /// (one adapter per prompt, as in [`Engine::generate_streaming`]).
    /// Needs the model's tokenizer.
    pub fn generate_text(
        self: &Arc<Self>,
        prompts: &[Vec<u32>],
        adapters: &[Option<String>],
        options: &GenerateOptions,
    ) -> Result<Vec<String>> {
        if self.text().is_none() {
            return Err(Error::InvalidArgument(
                "text generation needs a tokenizer, and the model has none".into(),
            ));
        }
        let mut session = self.session(prompts, adapters, options)?;
        while session.step()?.is_some() {}
        Ok(session.into_texts())
    }

    fn session(
        self: &Arc<Self>,
        prompts: &[Vec<u32>],
        adapters: &[Option<String>],
        options: &GenerateOptions,
    ) -> Result<Session> {
        Session::new(
            Arc::clone(self),
            prompts.to_vec(),
            adapters.to_vec(),
            options.clone(),
        )
    }
}
