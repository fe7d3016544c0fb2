//! The private extension module `reft_rs._core`: the Python face of
//! `reft-core`. The public API lives in the `reft_rs` Python package.

mod checkpoint;
mod config;
mod engine;
mod errors;
mod positions;
mod spans;
mod tokenize;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", reft_core::config::LIBRARY_VERSION)?;
    m.add("FORMAT_VERSION", reft_core::config::FORMAT_VERSION)?;
    m.add("MASKED", reft_core::positions::MASKED)?;
    m.add("CONFIG_FILE", reft_core::checkpoint::CONFIG_FILE)?;
    m.add("TENSORS_FILE", reft_core::checkpoint::TENSORS_FILE)?;
    m.add_class::<positions::PyPositionSpec>()?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyStream>()?;
    m.add_class::<engine::PyScheduler>()?;
    m.add_class::<tokenize::PyBatchTokenizer>()?;
    m.add_function(wrap_pyfunction!(engine::read_gguf_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(engine::kernel_isa, m)?)?;
    m.add_function(wrap_pyfunction!(positions::locate, m)?)?;
    m.add_function(wrap_pyfunction!(positions::locate_char_spans, m)?)?;
    m.add_function(wrap_pyfunction!(positions::locate_in_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(spans::gather, m)?)?;
    m.add_function(wrap_pyfunction!(tokenize::pad_rows, m)?)?;
    m.add_function(wrap_pyfunction!(spans::scatter, m)?)?;
    m.add_function(wrap_pyfunction!(config::schema, m)?)?;
    m.add_function(wrap_pyfunction!(config::parameter_layout, m)?)?;
    m.add_function(wrap_pyfunction!(config::normalize_intervention, m)?)?;
    m.add_function(wrap_pyfunction!(config::check_placement, m)?)?;
    m.add_function(wrap_pyfunction!(config::check_fits, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::normalize_config, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::config_parameters, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::save_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::load_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(errors::_panic_for_tests, m)?)?;
    Ok(())
}
