//! Python face of `reft_core::tokenize`: `_core.BatchTokenizer`, used by
//! `reft_rs.data` to tokenize whole datasets. Calls release the interpreter.

use std::path::PathBuf;

use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use reft_core::tokenize::{BatchTokenizer, PairFormat};

use crate::errors::IntoPyResult;

/// Flat int32 tokens and int64 offsets.
type Flat<'py> = (Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<i64>>);

fn as_i32(tokens: Vec<u32>) -> Vec<i32> {
    // Vocabularies are far below 2**31 ids.
    tokens.into_iter().map(|t| t as i32).collect()
}

/// A Hugging Face tokenizer that encodes many texts at once.
#[pyclass(module = "reft_rs._core", name = "BatchTokenizer", frozen)]
pub struct PyBatchTokenizer {
    inner: BatchTokenizer,
}

#[pymethods]
impl PyBatchTokenizer {
    /// From the JSON text of a `tokenizer.json`.
    #[staticmethod]
    fn from_json(py: Python<'_>, json: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| BatchTokenizer::from_json(json))
            .into_py_result()?;
        Ok(PyBatchTokenizer { inner })
    }

    /// From a `tokenizer.json` file or a folder holding one.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py
            .detach(|| BatchTokenizer::from_file(&path))
            .into_py_result()?;
        Ok(PyBatchTokenizer { inner })
    }

    /// Whether ASCII texts take the fast path.
    #[getter]
    fn fast_path(&self) -> bool {
        self.inner.has_fast_path()
    }

    /// `(tokens, offsets)`: text `i` is `tokens[offsets[i]:offsets[i + 1]]`.
    #[pyo3(signature = (texts, add_special_tokens=false))]
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        add_special_tokens: bool,
    ) -> PyResult<Flat<'py>> {
        let (tokens, offsets) = py
            .detach(|| self.inner.encode_batch(&texts, add_special_tokens))
            .into_py_result()?;
        Ok((as_i32(tokens).into_pyarray(py), offsets.into_pyarray(py)))
    }

    /// `(tokens, offsets, prompt_lengths)` of prompt/response pairs; `affixes`
    /// is `(prompt_before, prompt_after, response_before, response_after)`.
    #[pyo3(signature = (prompts, responses, affixes, prompt_special_tokens, max_length=None))]
    #[allow(clippy::type_complexity)]
    fn encode_pairs<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<String>,
        responses: Option<Vec<String>>,
        affixes: (String, String, String, String),
        prompt_special_tokens: bool,
        max_length: Option<usize>,
    ) -> PyResult<(
        Bound<'py, PyArray1<i32>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i64>>,
    )> {
        let format = PairFormat {
            prompt_before: affixes.0,
            prompt_after: affixes.1,
            response_before: affixes.2,
            response_after: affixes.3,
            prompt_special_tokens,
        };
        let encoded = py
            .detach(|| {
                self.inner
                    .encode_pairs(&prompts, responses.as_deref(), &format, max_length)
            })
            .into_py_result()?;
        Ok((
            as_i32(encoded.tokens).into_pyarray(py),
            encoded.offsets.into_pyarray(py),
            encoded.prompt_lengths.into_pyarray(py),
        ))
    }
}
