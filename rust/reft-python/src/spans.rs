//! Python face of `reft_core::spans`.
//!
//! The copies are bitwise, so one implementation per element size serves
//! every dtype: the Python wrapper views float16 and bfloat16 arrays as
//! uint16 before calling in.

use numpy::ndarray::Array4;
use numpy::{
    Element, IntoPyArray, PyArray3, PyArrayMethods, PyReadonlyArray3, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use reft_core::spans::{self, HiddenShape, LocationsView};

use crate::errors::IntoPyResult;

fn hidden_shape(shape: &[usize]) -> HiddenShape {
    HiddenShape {
        batch: shape[0],
        sequence: shape[1],
        hidden: shape[2],
    }
}

fn locations_view<'a>(locations: &'a PyReadonlyArray3<'_, i64>) -> PyResult<LocationsView<'a>> {
    let shape = locations.shape();
    Ok(LocationsView {
        data: locations.as_slice()?,
        groups: shape[0],
        batch: shape[1],
        width: shape[2],
    })
}

fn gather_typed<'py, T: Element + Copy + Default + Send + Sync>(
    py: Python<'py>,
    hidden: &Bound<'py, PyArray3<T>>,
    locations: &PyReadonlyArray3<'py, i64>,
    parallel: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let hidden = hidden.try_readonly()?;
    let shape = hidden_shape(hidden.shape());
    let view = locations_view(locations)?;
    let states = hidden.as_slice()?;
    let out = crate::errors::detach(py, || spans::gather(states, shape, view, parallel))
        .into_py_result()?;
    let dims = (view.groups, view.batch, view.width, shape.hidden);
    let array =
        Array4::from_shape_vec(dims, out).expect("gather returns groups*batch*width*hidden values");
    Ok(array.into_pyarray(py).into_any())
}

fn scatter_typed<'py, T: Element + Copy + Send + Sync>(
    py: Python<'py>,
    hidden: &Bound<'py, PyArray3<T>>,
    locations: &PyReadonlyArray3<'py, i64>,
    values: &Bound<'py, PyUntypedArray>,
    parallel: bool,
) -> PyResult<()> {
    let values = values
        .cast::<numpy::PyArray4<T>>()
        .map_err(|_| {
            PyTypeError::new_err("values must be a 4-D array of the same dtype as hidden")
        })?
        .try_readonly()?;
    let mut hidden = hidden.try_readwrite().map_err(|e| {
        PyValueError::new_err(format!(
            "hidden must be a writeable array that is not borrowed elsewhere ({e})"
        ))
    })?;
    let shape = hidden_shape(hidden.shape());
    let view = locations_view(locations)?;
    let values_shape = values.shape();
    if values_shape[3] != shape.hidden {
        return Err(reft_core::Error::Shape(format!(
            "values have hidden size {} but the hidden states have {}",
            values_shape[3], shape.hidden
        )))
        .into_py_result();
    }
    let values_shape = (values_shape[0], values_shape[1], values_shape[2]);
    if values_shape != (view.groups, view.batch, view.width) {
        return Err(reft_core::Error::Shape(format!(
            "values have leading shape {values_shape:?} but the locations have ({}, {}, {})",
            view.groups, view.batch, view.width
        )))
        .into_py_result();
    }
    let source = values.as_slice()?;
    let states = hidden.as_slice_mut()?;
    crate::errors::detach(py, || spans::scatter(states, shape, view, source, parallel))
        .into_py_result()
}

/// See `reft_rs.spans.gather`.
#[pyfunction]
#[pyo3(signature = (hidden, locations, *, parallel=true))]
pub fn gather<'py>(
    py: Python<'py>,
    hidden: &Bound<'py, PyUntypedArray>,
    locations: PyReadonlyArray3<'py, i64>,
    parallel: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(array) = hidden.cast::<PyArray3<f32>>() {
        return gather_typed(py, array, &locations, parallel);
    }
    if let Ok(array) = hidden.cast::<PyArray3<u16>>() {
        return gather_typed(py, array, &locations, parallel);
    }
    if let Ok(array) = hidden.cast::<PyArray3<f64>>() {
        return gather_typed(py, array, &locations, parallel);
    }
    Err(unsupported(hidden))
}

/// See `reft_rs.spans.scatter`.
#[pyfunction]
#[pyo3(signature = (hidden, locations, values, *, parallel=true))]
pub fn scatter<'py>(
    py: Python<'py>,
    hidden: &Bound<'py, PyUntypedArray>,
    locations: PyReadonlyArray3<'py, i64>,
    values: &Bound<'py, PyUntypedArray>,
    parallel: bool,
) -> PyResult<()> {
    if let Ok(array) = hidden.cast::<PyArray3<f32>>() {
        return scatter_typed(py, array, &locations, values, parallel);
    }
    if let Ok(array) = hidden.cast::<PyArray3<u16>>() {
        return scatter_typed(py, array, &locations, values, parallel);
    }
    if let Ok(array) = hidden.cast::<PyArray3<f64>>() {
        return scatter_typed(py, array, &locations, values, parallel);
    }
    Err(unsupported(hidden))
}

fn unsupported(hidden: &Bound<'_, PyUntypedArray>) -> PyErr {
    let described = hidden
        .dtype()
        .str()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "?".into());
    PyTypeError::new_err(format!(
        "hidden must be a 3-D (batch, sequence, hidden) array of float32, float16, bfloat16 or float64, found {}-D {described}",
        hidden.ndim()
    ))
}
