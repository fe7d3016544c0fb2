//! Turning core errors into the `reft_rs.errors` exception hierarchy.
//!
//! The exception classes are defined in Python (`python/reft_rs/errors.py`),
//! where each subclass can derive from both `ReftError` and the fitting
//! built-in (`ValueError`, `OSError`, ...); this module only picks the class.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use reft_core::ErrorKind;

/// The `reft_rs.errors` class for each kind of core error.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Position => "PositionError",
        ErrorKind::Shape => "ShapeError",
        ErrorKind::Location => "LocationError",
        ErrorKind::Memory => "ReftMemoryError",
        ErrorKind::NotFound => "CheckpointNotFoundError",
        ErrorKind::Io => "CheckpointIOError",
        ErrorKind::Config => "ConfigError",
        ErrorKind::InvalidCheckpoint => "InvalidCheckpointError",
        ErrorKind::CorruptCheckpoint => "CorruptCheckpointError",
        ErrorKind::UnsupportedFormat => "UnsupportedFormatError",
        ErrorKind::ModelNotFound => "ModelNotFoundError",
        ErrorKind::ModelLoad => "ModelLoadError",
        ErrorKind::UnsupportedModel => "UnsupportedModelError",
        ErrorKind::Incompatible => "IncompatibleModelError",
        ErrorKind::InvalidArgument => "InvalidArgumentError",
        ErrorKind::Tokenizer => "TokenizerError",
        ErrorKind::Backend => "EngineError",
    }
}

/// Builds the Python exception for a core error; the file it concerns, if
/// any, becomes the exception's `path` attribute.
pub fn to_py_err(error: reft_core::Error) -> PyErr {
    Python::attach(|py| {
        let message = error.to_string();
        let path = error.path().map(|p| p.to_string_lossy().into_owned());
        let built = py
            .import("reft_rs.errors")
            .and_then(|module| module.getattr(class_name(error.kind())))
            .and_then(|class| class.call1((message.clone(), path)));
        match built {
            Ok(instance) => PyErr::from_value(instance),
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}

/// `?`-friendly conversion of core results.
pub trait IntoPyResult<T> {
    /// Maps the error through [`to_py_err`].
    fn into_py_result(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for reft_core::Result<T> {
    fn into_py_result(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}
