//! Python face of `reft_core::engine`: `_core.Engine` and its token
//! stream. `python/reft_rs/engine.py` wraps them in the public
//! `reft_rs.Engine`. Every call that computes releases the interpreter.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::prelude::*;
use reft_core::engine::{
    Activations, Engine, Finish, GenerateOptions, LoadOptions, Request, Sampling, Scheduler,
    SchedulerOptions, Session,
};
use reft_core::Error;

use crate::errors::IntoPyResult;

/// A loaded model with optional interventions (see `reft_rs.Engine`).
#[pyclass(module = "reft_rs._core", name = "Engine", frozen)]
pub struct PyEngine {
    inner: Arc<Engine>,
}

/// A `reft_rs.SamplingParams`, read field by field by name (the Python
/// dataclass has checked and normalised them).
#[derive(FromPyObject)]
pub(crate) struct OptionArgs {
    #[pyo3(attribute)]
    max_new_tokens: usize,
    #[pyo3(attribute)]
    temperature: f64,
    #[pyo3(attribute)]
    top_k: Option<usize>,
    #[pyo3(attribute)]
    top_p: Option<f64>,
    #[pyo3(attribute)]
    seed: Option<u64>,
    #[pyo3(attribute)]
    stop: Vec<String>,
    #[pyo3(attribute)]
    intervene_on_generated: bool,
    #[pyo3(attribute)]
    ignore_eos: bool,
    #[pyo3(attribute)]
    strength: f32,
}

fn options(args: OptionArgs) -> GenerateOptions {
    let OptionArgs {
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop,
        intervene_on_generated,
        ignore_eos,
        strength,
    } = args;
    GenerateOptions {
        max_new_tokens,
        sampling: Sampling {
            temperature,
            top_k,
            top_p,
            seed,
        },
        stop,
        intervene_on_generated,
        ignore_eos,
        strength,
    }
}

impl PyEngine {
    fn text(&self) -> Result<&reft_core::engine::Text, Error> {
        self.inner.text().ok_or_else(|| {
            Error::Tokenizer(
                "the model has no tokenizer (no tokenizer.json); pass token ids".into(),
            )
        })
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model_path, reft=None, threads=None, dequantize=false, int8_activations=false))]
    fn new(
        py: Python<'_>,
        model_path: PathBuf,
        reft: Option<PathBuf>,
        threads: Option<usize>,
        dequantize: bool,
        int8_activations: bool,
    ) -> PyResult<Self> {
        let options = LoadOptions {
            threads,
            dequantize,
            activations: if int8_activations {
                Activations::Int8
            } else {
                Activations::Int16
            },
        };
        let engine = crate::errors::detach(py, || {
            Engine::load_with(&model_path, reft.as_deref(), &options)
        })
        .into_py_result()?;
        Ok(PyEngine {
            inner: Arc::new(engine),
        })
    }

    /// Loads the checkpoint at `path` as adapter `name`.
    fn add_adapter(&self, py: Python<'_>, name: &str, path: PathBuf) -> PyResult<()> {
        crate::errors::detach(py, || self.inner.add_adapter(name, &path)).into_py_result()
    }

    /// Unloads adapter `name`.
    fn remove_adapter(&self, name: &str) -> PyResult<()> {
        self.inner.remove_adapter(name).into_py_result()
    }

    /// `[(name, checkpoint config JSON)]` of the loaded adapters, by name.
    fn adapters(&self) -> Vec<(String, String)> {
        self.inner
            .adapters()
            .into_iter()
            .map(|(name, config)| (name, config.to_json()))
            .collect()
    }

    /// Logits `(len, vocab)` of every position of `token_ids`, float32.
    #[pyo3(signature = (token_ids, adapter=None, strength=1.0))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<u32>,
        adapter: Option<String>,
        strength: f32,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let vocab = self.inner.config().vocab_size;
        let values = crate::errors::detach(py, || {
            self.inner
                .logits_with(&token_ids, adapter.as_deref(), strength)
        })
        .into_py_result()?;
        let rows = values.len() / vocab;
        let array = numpy::ndarray::Array2::from_shape_vec((rows, vocab), values)
            .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
        Ok(array.into_pyarray(py))
    }

    /// New token ids for each prompt of token ids, each with its adapter
    /// (`adapters` empty: the engine's own checkpoint).
    #[pyo3(signature = (prompts, options, adapters=Vec::new()))]
    fn generate_ids(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<u32>>,
        options: OptionArgs,
        adapters: Vec<Option<String>>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let options = self::options(options);
        crate::errors::detach(py, || {
            self.inner
                .generate_streaming(&prompts, &adapters, &options, |_, _| {})
        })
        .into_py_result()
    }

    /// Text continuations of each prompt, cut before any stop string.
    #[pyo3(signature = (prompts, options, add_special_tokens, adapters=Vec::new()))]
    fn generate_text(
        &self,
        py: Python<'_>,
        prompts: Vec<String>,
        options: OptionArgs,
        add_special_tokens: bool,
        adapters: Vec<Option<String>>,
    ) -> PyResult<Vec<String>> {
        let options = self::options(options);
        crate::errors::detach(py, || -> Result<Vec<String>, Error> {
            let text = self.text()?;
            let ids = prompts
                .iter()
                .map(|p| text.encode(p, add_special_tokens))
                .collect::<Result<Vec<_>, _>>()?;
            self.inner.generate_text(&ids, &adapters, &options)
        })
        .into_py_result()
    }

    /// A stream of one prompt's tokens (see `reft_rs.Engine.stream`).
    #[pyo3(signature = (prompt, options, adapter=None))]
    fn stream_ids(
        &self,
        prompt: Vec<u32>,
        options: OptionArgs,
        adapter: Option<String>,
    ) -> PyResult<PyStream> {
        let options = self::options(options);
        let session = Session::new(
            Arc::clone(&self.inner),
            vec![prompt],
            vec![adapter],
            options,
        )
        .into_py_result()?;
        Ok(PyStream {
            state: Mutex::new(StreamState {
                session,
                emitted: 0,
                finished: false,
            }),
        })
    }

    /// Token ids of `text`.
    #[pyo3(signature = (text, add_special_tokens=true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        crate::errors::detach(py, || self.text()?.encode(text, add_special_tokens)).into_py_result()
    }

    /// Text of `token_ids`, special tokens left out.
    fn decode(&self, py: Python<'_>, token_ids: Vec<u32>) -> PyResult<String> {
        crate::errors::detach(py, || self.text()?.decode(&token_ids)).into_py_result()
    }

    /// `messages` (JSON text of a list of role/content objects) rendered
    /// with the model's chat template.
    #[pyo3(signature = (messages_json, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages_json: &str,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let messages: serde_json::Value = serde_json::from_str(messages_json)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("messages: {e}")))?;
        crate::errors::detach(py, || {
            self.text()
                .and_then(|t| t.render_chat(&messages, add_generation_prompt))
        })
        .into_py_result()
    }

    /// `(model_type, hidden_size, num_hidden_layers, vocab_size, quantized)`.
    #[getter]
    fn model_info(&self) -> (String, usize, usize, usize, bool) {
        let c = self.inner.config();
        (
            c.model_type.clone(),
            c.hidden_size,
            c.num_hidden_layers,
            c.vocab_size,
            self.inner.is_quantized(),
        )
    }

    /// Positions the model has (its context length).
    #[getter]
    fn context_length(&self) -> usize {
        self.inner.config().max_position_embeddings
    }

    #[getter]
    fn has_tokenizer(&self) -> bool {
        self.inner.text().is_some()
    }

    #[getter]
    fn has_chat_template(&self) -> bool {
        self.inner.text().is_some_and(|t| t.has_chat_template())
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids()
    }

    /// The checkpoint's config as JSON, or `None` without interventions.
    #[getter]
    fn reft_config_json(&self) -> Option<String> {
        self.inner.reft_config().map(|c| c.to_json())
    }
}

struct StreamState {
    session: Session,
    /// Bytes of the reply's text already handed out.
    emitted: usize,
    finished: bool,
}

/// Iterator over `(token_id, text)` pieces of one generation.
#[pyclass(module = "reft_rs._core", name = "TokenStream", frozen)]
pub struct PyStream {
    state: Mutex<StreamState>,
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next `(token_id, new_text)`: `new_text` is empty while a
    /// character is incomplete or could begin a stop string, or when the
    /// model has no tokenizer; `token_id` is `None` on the last piece of a
    /// reply that ended with an end-of-sequence token.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(Option<u32>, String)>> {
        crate::errors::detach(py, || -> Result<Option<(Option<u32>, String)>, Error> {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if state.finished {
                    return Ok(None);
                }
                let Some(step) = state.session.step()? else {
                    state.finished = true;
                    return Ok(None);
                };
                state.finished = state.session.is_done();
                let text = &state.session.texts()[0];
                let piece = text.get(state.emitted..).unwrap_or("").to_string();
                state.emitted = text.len();
                match step[0] {
                    Some(token) => return Ok(Some((Some(token), piece))),
                    None if !piece.is_empty() => return Ok(Some((None, piece))),
                    None => continue,
                }
            }
        })
        .into_py_result()
    }
}

/// `(id, token, finish, error, logits, text)` of one request in one step.
type PyEvent<'py> = (
    u64,
    Option<u32>,
    Option<&'static str>,
    Option<String>,
    Option<Bound<'py, PyArray1<f32>>>,
    String,
);

/// Continuous batching over an engine (see `reft_rs.Scheduler`).
#[pyclass(module = "reft_rs._core", name = "Scheduler", frozen)]
pub struct PyScheduler {
    inner: Arc<Scheduler>,
}

#[pymethods]
impl PyScheduler {
    #[new]
    fn new(
        engine: &PyEngine,
        max_batch: usize,
        kv_cache_bytes: usize,
        max_prefill_tokens: usize,
        max_waiting: usize,
    ) -> PyResult<Self> {
        let scheduler = Scheduler::new(
            Arc::clone(&engine.inner),
            SchedulerOptions {
                max_batch,
                kv_cache_bytes,
                max_prefill_tokens,
                max_waiting,
            },
        )
        .into_py_result()?;
        Ok(PyScheduler {
            inner: Arc::new(scheduler),
        })
    }

    /// Queues a request; returns its id.
    #[pyo3(signature = (prompt, options, adapter=None, return_logits=false, client=None))]
    fn submit(
        &self,
        prompt: Vec<u32>,
        options: OptionArgs,
        adapter: Option<String>,
        return_logits: bool,
        client: Option<String>,
    ) -> PyResult<u64> {
        self.inner
            .submit(Request {
                prompt,
                adapter,
                options: self::options(options),
                return_logits,
                client,
            })
            .into_py_result()
    }

    /// Ends request `id` at the next step.
    fn cancel(&self, id: u64) {
        self.inner.cancel(id)
    }

    /// One step: the events of every request it touched.
    fn step<'py>(&self, py: Python<'py>) -> PyResult<Vec<PyEvent<'py>>> {
        let events = crate::errors::detach(py, || self.inner.step()).into_py_result()?;
        Ok(events
            .into_iter()
            .map(|event| {
                let (finish, error) = match event.finish {
                    Some(Finish::Error(message)) => (Some("error"), Some(message)),
                    Some(other) => (Some(other.as_str()), None),
                    None => (None, None),
                };
                let logits = event.logits.map(|values| values.into_pyarray(py));
                (event.id, event.token, finish, error, logits, event.text)
            })
            .collect())
    }

    /// Blocks (the interpreter released) until there is work or
    /// `timeout` seconds have passed; returns whether there is work.
    fn wait(&self, py: Python<'_>, timeout: f64) -> bool {
        let timeout = std::time::Duration::from_secs_f64(timeout.clamp(0.0, 3600.0));
        py.detach(|| self.inner.wait(timeout))
    }

    #[getter]
    fn has_work(&self) -> bool {
        self.inner.has_work()
    }

    /// `(waiting, running, reserved cache bytes)`.
    #[getter]
    fn load(&self) -> (usize, usize, usize) {
        self.inner.load()
    }

    /// Bytes of key/value cache a sequence of `tokens` tokens holds.
    fn kv_bytes(&self, tokens: usize) -> usize {
        self.inner.kv_bytes(tokens)
    }

    /// `(max_batch, kv_cache_bytes, max_prefill_tokens, max_waiting)`.
    #[getter]
    fn limits(&self) -> (usize, usize, usize, usize) {
        let o = self.inner.options();
        (
            o.max_batch,
            o.kv_cache_bytes,
            o.max_prefill_tokens,
            o.max_waiting,
        )
    }
}

/// The float32 values of tensor `name` of a GGUF file, dequantized by the
/// engine's own readers, with its dimensions (outermost first).
#[pyfunction]
pub fn read_gguf_tensor<'py>(
    py: Python<'py>,
    path: PathBuf,
    name: &str,
) -> PyResult<(Vec<usize>, Bound<'py, PyArray1<f32>>)> {
    let (shape, values) =
        crate::errors::detach(py, || reft_core::engine::read_gguf_tensor(&path, name))
            .into_py_result()?;
    Ok((shape, values.into_pyarray(py)))
}

/// The instruction set of the engine's quantized kernels on this CPU
/// (`avx512`, `avx2` or `portable`).
#[pyfunction]
pub fn kernel_isa() -> &'static str {
    reft_core::engine::Isa::detect().name()
}
