//! Python face of `reft_core::tokenize`: `_core.BatchTokenizer`, used by
//! `reft_rs.data` to tokenize whole datasets, and `_core.pad_rows`, which
//! lays their examples out in batches. Calls release the interpreter.

use std::path::PathBuf;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;
use reft_core::batch::{self, PadOptions};
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
        let inner =
            crate::errors::detach(py, || BatchTokenizer::from_json(json)).into_py_result()?;
        Ok(PyBatchTokenizer { inner })
    }

    /// From a `tokenizer.json` file or a folder holding one.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner =
            crate::errors::detach(py, || BatchTokenizer::from_file(&path)).into_py_result()?;
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
        let (tokens, offsets) =
            crate::errors::detach(py, || self.inner.encode_batch(&texts, add_special_tokens))
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
        let encoded = crate::errors::detach(py, || {
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

/// `(input_ids, attention_mask, labels)` of examples `indices` padded to
/// `width` (labels `None` unless `prompt_lengths` is given).
#[pyfunction]
#[pyo3(signature = (tokens, offsets, prompt_lengths, indices, width, pad_token_id, left))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn pad_rows<'py>(
    py: Python<'py>,
    tokens: PyReadonlyArray1<'py, i32>,
    offsets: PyReadonlyArray1<'py, i64>,
    prompt_lengths: Option<PyReadonlyArray1<'py, i64>>,
    indices: PyReadonlyArray1<'py, i64>,
    width: usize,
    pad_token_id: i64,
    left: bool,
) -> PyResult<(
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<i64>>,
    Option<Bound<'py, PyArray2<i64>>>,
)> {
    let rows = indices.len();
    let cells = rows * width;
    let (mut ids, mut mask) = (vec![0i64; cells], vec![0i64; cells]);
    let mut labels = prompt_lengths.as_ref().map(|_| vec![0i64; cells]);
    let options = PadOptions {
        width,
        pad_token_id,
        left,
    };
    let prompts = prompt_lengths.as_ref().map(|p| p.as_slice()).transpose()?;
    batch::pad_rows(
        tokens.as_slice()?,
        offsets.as_slice()?,
        prompts,
        indices.as_slice()?,
        options,
        &mut ids,
        &mut mask,
        labels.as_deref_mut(),
    )
    .into_py_result()?;
    let shape = |v: Vec<i64>| -> PyResult<Bound<'py, PyArray2<i64>>> {
        Ok(Array2::from_shape_vec((rows, width), v)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?
            .into_pyarray(py))
    };
    Ok((shape(ids)?, shape(mask)?, labels.map(shape).transpose()?))
}
