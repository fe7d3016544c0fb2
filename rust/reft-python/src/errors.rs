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
        ErrorKind::Busy => "BusyError",
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

/// The message of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Runs `work` with the interpreter released, as `py.detach` does, and
/// turns a panic inside it into an `EngineError` (a bug of reft_rs, reported
/// as an error of the call rather than a `PanicException`).
pub fn detach<T, F>(py: Python<'_>, work: F) -> T
where
    T: Send + From<Panicked>,
    F: Send + FnOnce() -> T,
{
    py.detach(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .unwrap_or_else(|payload| T::from(Panicked(panic_message(payload.as_ref()))))
    })
}

/// A panic caught by [`detach`], with its message.
pub struct Panicked(String);

impl<T> From<Panicked> for reft_core::Result<T> {
    fn from(panic: Panicked) -> Self {
        Err(reft_core::Error::Backend(format!(
            "internal error in reft_rs (please report it): {}",
            panic.0
        )))
    }
}

/// Panics inside the extension with `message`, through [`detach`]: lets
/// the tests check that a panic reaches Python as an `EngineError`.
#[pyfunction]
pub fn _panic_for_tests(py: Python<'_>, message: String) -> PyResult<()> {
    detach(py, || -> reft_core::Result<()> { panic!("{message}") }).into_py_result()
}
