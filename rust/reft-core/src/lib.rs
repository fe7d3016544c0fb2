//! # reft-core
//!
//! The core of reft_rs, a library for Representation Finetuning (ReFT) and
//! Representation Editing (RED): the parts that need no Python.
//!
//! * [`positions`]: which token positions each intervention edits, for a
//!   whole dataset at once (pyreft's `f{p}+l{s}` rule and more).
//! * [`spans`]: gathering hidden states at those positions and scattering
//!   edited states back.
//! * [`tokenize`] (feature `engine`): whole datasets tokenized at once.
//! * [`batch`]: examples of a flat token array padded into a batch.
//! * [`config`] and [`checkpoint`]: the checkpoint format (a JSON config and
//!   a safetensors file), written atomically and checked when read.
//!
//! Errors of every module are one type, [`Error`].
#![deny(missing_docs)]

pub mod batch;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "engine")]
pub mod engine;
pub mod error;
mod memory;
pub mod parallel;
pub mod positions;
pub mod spans;
#[cfg(feature = "engine")]
pub mod tokenize;

pub use checkpoint::{load, save, Checkpoint, Tensor, TensorRef};
pub use config::{BaseModel, Component, DType, InterventionConfig, InterventionType, ReftConfig};
pub use error::{Error, ErrorKind, Result};
pub use positions::{
    locate, locate_char_spans, LocateOptions, Locations, PaddingSide, PositionSpec, MASKED,
};
pub use spans::{gather, scatter, HiddenShape, LocationsView};
