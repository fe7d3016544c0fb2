//! Python face of `reft_core::positions`.

use numpy::ndarray::Array3;
use numpy::{IntoPyArray, PyArray3, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use reft_core::positions::{self, LocateOptions, Locations, PaddingSide};

use crate::errors::IntoPyResult;

/// A parsed position spec (`f7+l7`, `f5`, `l3`, `all`, or token indices).
#[pyclass(
    module = "reft_rs._core",
    name = "PositionSpec",
    frozen,
    eq,
    from_py_object
)]
#[derive(Clone, PartialEq)]
pub struct PyPositionSpec {
    pub inner: positions::PositionSpec,
}

impl From<positions::PositionSpec> for PyPositionSpec {
    fn from(inner: positions::PositionSpec) -> Self {
        PyPositionSpec { inner }
    }
}

/// Reads a spec given as a string, a list of indices, or a `PositionSpec`.
pub fn extract_spec(spec: &Bound<'_, PyAny>) -> PyResult<positions::PositionSpec> {
    if let Ok(parsed) = spec.cast::<PyPositionSpec>() {
        return Ok(parsed.get().inner.clone());
    }
    if let Ok(text) = spec.extract::<String>() {
        return positions::PositionSpec::parse(&text).into_py_result();
    }
    if let Ok(indices) = spec.extract::<Vec<i64>>() {
        return positions::PositionSpec::from_indices(indices).into_py_result();
    }
    Err(PyTypeError::new_err(format!(
        "a position spec is a string such as 'f7+l7' or a list of token indices, not {}",
        spec.get_type().name()?
    )))
}

#[pymethods]
impl PyPositionSpec {
    #[new]
    fn new(spec: &Bound<'_, PyAny>) -> PyResult<Self> {
        extract_spec(spec).map(Self::from)
    }

    /// `"first_last"`, `"all"` or `"indices"`: the rule, over the tokens it
    /// counts (image tokens for an `image` spec, see `images`).
    #[getter]
    fn kind(&self) -> &'static str {
        match self.inner.counted() {
            positions::PositionSpec::FirstLast { .. } => "first_last",
            positions::PositionSpec::Indices(_) => "indices",
            _ => "all",
        }
    }

    /// Whether the spec counts over a vision-language prompt's image
    /// tokens (`image`, `image:f4`, ...) rather than its text.
    #[getter]
    fn images(&self) -> bool {
        matches!(self.inner, positions::PositionSpec::Image(_))
    }

    /// Tokens taken from the start of the prompt (0 if none).
    #[getter]
    fn first(&self) -> usize {
        match self.inner.counted() {
            positions::PositionSpec::FirstLast { first, .. } => *first,
            _ => 0,
        }
    }

    /// Tokens taken from the end of the prompt (0 if none).
    #[getter]
    fn last(&self) -> usize {
        match self.inner.counted() {
            positions::PositionSpec::FirstLast { last, .. } => *last,
            _ => 0,
        }
    }

    /// The explicit indices, or `None`.
    #[getter]
    fn indices(&self) -> Option<Vec<i64>> {
        match self.inner.counted() {
            positions::PositionSpec::Indices(list) => Some(list.clone()),
            _ => None,
        }
    }

    /// Position groups per example (2 only for unshared `f{p}+l{s}`).
    #[pyo3(signature = (share_weights=false))]
    fn group_count(&self, share_weights: bool) -> usize {
        self.inner.group_count(share_weights)
    }

    /// Slots per group row, or `None` when it depends on the data (`all`).
    #[pyo3(signature = (share_weights=false))]
    fn width(&self, share_weights: bool) -> Option<usize> {
        self.inner.fixed_width(share_weights)
    }

    fn __str__(&self) -> String {
        self.inner.to_string()
    }

    fn __repr__(&self) -> String {
        format!("PositionSpec('{}')", self.inner)
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut hasher = DefaultHasher::new();
        self.inner.to_string().hash(&mut hasher);
        hasher.finish()
    }
}

fn options(
    share_weights: bool,
    include_last: bool,
    padding_side: &str,
    padded_length: Option<usize>,
    parallel: bool,
) -> PyResult<LocateOptions> {
    Ok(LocateOptions {
        share_weights,
        include_last,
        padding_side: padding_side.parse::<PaddingSide>().into_py_result()?,
        padded_length,
        parallel,
    })
}

/// Moves the locations into a numpy array without copying them.
fn into_numpy(py: Python<'_>, locations: Locations) -> Bound<'_, PyArray3<i64>> {
    let shape = locations.shape();
    Array3::from_shape_vec(shape, locations.into_vec())
        .expect("Locations holds exactly groups*examples*width values")
        .into_pyarray(py)
}

/// See `reft_rs.positions.locate`.
#[pyfunction]
#[pyo3(signature = (lengths, spec, *, share_weights=false, include_last=true, padding_side="right", padded_length=None, sequence_lengths=None, parallel=true))]
#[allow(clippy::too_many_arguments)]
pub fn locate<'py>(
    py: Python<'py>,
    lengths: PyReadonlyArray1<'py, i64>,
    spec: &Bound<'py, PyAny>,
    share_weights: bool,
    include_last: bool,
    padding_side: &str,
    padded_length: Option<usize>,
    sequence_lengths: Option<PyReadonlyArray1<'py, i64>>,
    parallel: bool,
) -> PyResult<Bound<'py, PyArray3<i64>>> {
    let spec = extract_spec(spec)?;
    let options = options(
        share_weights,
        include_last,
        padding_side,
        padded_length,
        parallel,
    )?;
    let lengths = lengths.as_slice()?;
    let sequence = sequence_lengths
        .as_ref()
        .map(|s| s.as_slice())
        .transpose()?;
    let locations =
        crate::errors::detach(py, || positions::locate(lengths, sequence, &spec, &options))
            .into_py_result()?;
    Ok(into_numpy(py, locations))
}

/// See `reft_rs.positions.locate_in_tokens`.
#[pyfunction]
#[pyo3(signature = (tokens, offsets, lengths, spec, image_token, *, share_weights=false, include_last=true, padding_side="right", padded_length=None, sequence_lengths=None, parallel=true))]
#[allow(clippy::too_many_arguments)]
pub fn locate_in_tokens<'py>(
    py: Python<'py>,
    tokens: PyReadonlyArray1<'py, i64>,
    offsets: PyReadonlyArray1<'py, i64>,
    lengths: PyReadonlyArray1<'py, i64>,
    spec: &Bound<'py, PyAny>,
    image_token: i64,
    share_weights: bool,
    include_last: bool,
    padding_side: &str,
    padded_length: Option<usize>,
    sequence_lengths: Option<PyReadonlyArray1<'py, i64>>,
    parallel: bool,
) -> PyResult<Bound<'py, PyArray3<i64>>> {
    let spec = extract_spec(spec)?;
    let options = options(
        share_weights,
        include_last,
        padding_side,
        padded_length,
        parallel,
    )?;
    let (tokens, offsets, lengths) = (tokens.as_slice()?, offsets.as_slice()?, lengths.as_slice()?);
    let sequence = sequence_lengths
        .as_ref()
        .map(|s| s.as_slice())
        .transpose()?;
    let locations = crate::errors::detach(py, || {
        positions::locate_in_tokens(
            tokens,
            offsets,
            lengths,
            image_token,
            sequence,
            &spec,
            &options,
        )
    })
    .into_py_result()?;
    Ok(into_numpy(py, locations))
}

/// See `reft_rs.positions.locate_spans`.
#[pyfunction]
#[pyo3(signature = (token_offsets, token_counts, char_spans, *, max_positions=None, padding_side="right", padded_length=None, sequence_lengths=None, parallel=true))]
#[allow(clippy::too_many_arguments)]
pub fn locate_char_spans<'py>(
    py: Python<'py>,
    token_offsets: PyReadonlyArray2<'py, i64>,
    token_counts: PyReadonlyArray1<'py, i64>,
    char_spans: numpy::PyReadonlyArray3<'py, i64>,
    max_positions: Option<usize>,
    padding_side: &str,
    padded_length: Option<usize>,
    sequence_lengths: Option<PyReadonlyArray1<'py, i64>>,
    parallel: bool,
) -> PyResult<Bound<'py, PyArray3<i64>>> {
    let options = options(false, true, padding_side, padded_length, parallel)?;
    let offsets = pairs(token_offsets.as_slice()?, "token_offsets")?;
    let groups = char_spans.shape()[1];
    let spans = pairs(char_spans.as_slice()?, "char_spans")?;
    let counts = token_counts.as_slice()?;
    let sequence = sequence_lengths
        .as_ref()
        .map(|s| s.as_slice())
        .transpose()?;
    let locations = crate::errors::detach(py, || {
        positions::locate_char_spans(
            offsets,
            counts,
            spans,
            groups,
            max_positions,
            sequence,
            &options,
        )
    })
    .into_py_result()?;
    Ok(into_numpy(py, locations))
}

/// Views a flat `[a0, b0, a1, b1, ...]` slice as pairs.
fn pairs<'a>(flat: &'a [i64], name: &str) -> PyResult<&'a [[i64; 2]]> {
    let (pairs, rest) = flat.as_chunks::<2>();
    if !rest.is_empty() {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{name} must end in a dimension of size 2"
        )));
    }
    Ok(pairs)
}
