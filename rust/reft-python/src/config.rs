//! Python face of `reft_core::config`: the checkpoint schema (intervention
//! types, components, activations, dtypes, parameter layouts, the name rule)
//! and the checks every path runs. `python/reft_rs/config.py` and
//! `python/reft_rs/interventions.py` read their tables from here.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use reft_core::config::{self, BaseModel, Component, DType, InterventionType, Tower, ACTIVATIONS};

use crate::errors::IntoPyResult;

/// The schema tables: `types` (name -> properties), `components`,
/// `activations`, `dtypes` (of parameters), `tensor_dtypes` (any tensor a
/// checkpoint holds) and `format_version`.
#[pyfunction]
pub fn schema(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let types = PyDict::new(py);
    for kind in InterventionType::ALL {
        let entry = PyDict::new(py);
        entry.set_item("low_rank", kind.is_low_rank())?;
        entry.set_item("rotation", kind.has_rotation())?;
        entry.set_item("source", kind.has_source())?;
        entry.set_item("projection", kind.has_projection())?;
        entry.set_item("default_positions", kind.default_positions())?;
        types.set_item(kind.name(), entry)?;
    }
    let out = PyDict::new(py);
    out.set_item("types", types)?;
    out.set_item(
        "components",
        PyList::new(py, Component::ALL.map(Component::name))?,
    )?;
    out.set_item("towers", PyList::new(py, Tower::ALL.map(Tower::name))?)?;
    out.set_item("activations", PyList::new(py, ACTIVATIONS)?)?;
    out.set_item(
        "dtypes",
        PyList::new(py, DType::PARAMETER.map(DType::name))?,
    )?;
    out.set_item(
        "tensor_dtypes",
        PyList::new(py, DType::ALL.map(DType::name))?,
    )?;
    out.set_item("format_version", config::FORMAT_VERSION)?;
    Ok(out)
}

/// The parameters of `kind` with the given bias flags: `(name, extents)`,
/// each extent `"rank"` or `"width"`, in checkpoint order.
#[pyfunction]
pub fn parameter_layout(
    kind: &str,
    bias: bool,
    projection_bias: bool,
) -> PyResult<Vec<(&'static str, Vec<&'static str>)>> {
    let kind: InterventionType = kind.parse().into_py_result()?;
    Ok(kind
        .parameter_layout(bias, projection_bias)
        .into_iter()
        .map(|(name, extents)| (name, extents.into_iter().map(|e| e.name()).collect()))
        .collect())
}

/// Checks an intervention as written (JSON; `name`, `group`, `positions`
/// may be null) and returns it with defaults filled in, as JSON. Raises
/// `ConfigError` naming the field at fault.
#[pyfunction]
pub fn normalize_intervention(entry_json: &str) -> PyResult<String> {
    let value: serde_json::Value = serde_json::from_str(entry_json).map_err(|e| {
        crate::errors::to_py_err(reft_core::Error::InvalidIntervention(format!(
            "not valid JSON: {e}"
        )))
    })?;
    let out = config::normalize_intervention(value).into_py_result()?;
    Ok(out.to_string())
}

/// Checks that an intervention named `name` at `layer` with rank `rank` fits
/// a model of `num_hidden_layers` layers whose edited states are `width` wide.
#[pyfunction]
#[pyo3(signature = (name, layer, rank, width, num_hidden_layers))]
pub fn check_placement(
    name: &str,
    layer: usize,
    rank: Option<usize>,
    width: usize,
    num_hidden_layers: usize,
) -> PyResult<()> {
    config::check_placement(layer, rank, width, num_hidden_layers)
        .map_err(|reason| reft_core::Error::InvalidIntervention(format!("{name}: {reason}")))
        .into_py_result()
}

/// Whether a checkpoint's base model (`base`: name_or_path, model_type,
/// hidden_size, num_hidden_layers) fits a model; returns warnings or raises
/// `IncompatibleModelError`. See `BaseModel::check_fits`.
#[pyfunction]
#[pyo3(signature = (base, source, *, inferred, hidden_size, num_hidden_layers, model_type, strict))]
#[allow(clippy::too_many_arguments)]
pub fn check_fits(
    base: (String, String, usize, usize),
    source: &str,
    inferred: bool,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    model_type: Option<&str>,
    strict: bool,
) -> PyResult<Vec<String>> {
    let (name_or_path, base_type, base_hidden, base_layers) = base;
    let base = BaseModel {
        name_or_path,
        model_type: base_type,
        hidden_size: base_hidden,
        num_hidden_layers: base_layers,
        num_decoder_layers: None,
        num_vision_layers: None,
    };
    base.check_fits(
        source,
        inferred,
        hidden_size,
        num_hidden_layers,
        model_type,
        strict,
    )
    .into_py_result()
}
