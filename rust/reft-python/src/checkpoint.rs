//! Python face of `reft_core::checkpoint` and `reft_core::config`.
//!
//! Configs cross the boundary as JSON text and tensors as raw bytes with a
//! dtype name and shape; `python/reft_rs/checkpoint.py` turns them into
//! dicts and numpy arrays or torch tensors.

use std::path::PathBuf;

use numpy::{PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;
use reft_core::checkpoint::{self, TensorRef};
use reft_core::config::{DType, ReftConfig};

use crate::errors::IntoPyResult;

/// `(key, dtype name, shape, bytes)` of one tensor to save.
type TensorArgs<'py> = (String, String, Vec<usize>, PyReadonlyArray1<'py, u8>);

/// Checks a config and returns it as canonical JSON, defaults filled in.
#[pyfunction]
pub fn normalize_config(config_json: &str) -> PyResult<String> {
    ReftConfig::from_json(config_json, None)
        .map(|c| c.to_json())
        .into_py_result()
}

/// The tensors a config calls for: `(key, dtype name, shape)` in config order.
#[pyfunction]
pub fn config_parameters(config_json: &str) -> PyResult<Vec<(String, &'static str, Vec<usize>)>> {
    let config = ReftConfig::from_json(config_json, None).into_py_result()?;
    Ok(config
        .parameters()
        .into_py_result()?
        .into_iter()
        .map(|p| (p.key, p.dtype.name(), p.shape))
        .collect())
}

/// See `reft_rs.checkpoint.save`.
#[pyfunction]
pub fn save_checkpoint(
    py: Python<'_>,
    path: PathBuf,
    config_json: &str,
    tensors: Vec<TensorArgs<'_>>,
) -> PyResult<()> {
    let config = ReftConfig::from_json(config_json, None).into_py_result()?;
    let mut dtypes = Vec::with_capacity(tensors.len());
    for (name, dtype, _, bytes) in &tensors {
        let dtype: DType = dtype.parse().into_py_result()?;
        if !bytes.is_contiguous() {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "tensor {name:?}: bytes must be contiguous"
            )));
        }
        dtypes.push(dtype);
    }
    let mut refs = Vec::with_capacity(tensors.len());
    for ((name, _, shape, bytes), dtype) in tensors.iter().zip(dtypes) {
        refs.push((
            name.as_str(),
            TensorRef {
                dtype,
                shape,
                data: bytes.as_slice()?,
            },
        ));
    }
    crate::errors::detach(py, || checkpoint::save(&path, &config, &refs)).into_py_result()
}

/// One loaded tensor: `(key, dtype name, shape, bytes)`.
type LoadedTensor<'py> = (String, &'static str, Vec<usize>, Bound<'py, PyByteArray>);

/// See `reft_rs.checkpoint.load`: `(config JSON, tensors, recovered)`.
#[pyfunction]
pub fn load_checkpoint(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<(String, Vec<LoadedTensor<'_>>, bool)> {
    let loaded = crate::errors::detach(py, || checkpoint::load(&path)).into_py_result()?;
    let tensors = loaded
        .tensors
        .into_iter()
        .map(|(key, tensor)| {
            (
                key,
                tensor.dtype.name(),
                tensor.shape,
                PyByteArray::new(py, &tensor.data),
            )
        })
        .collect();
    Ok((loaded.config.to_json(), tensors, loaded.recovered))
}
