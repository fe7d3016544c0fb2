//! The one error type of the core.

use std::path::PathBuf;

/// Everything that can go wrong in `reft-core`.
///
/// Each variant carries enough context (the offending spec, index, file) for
/// the message alone to say what is wrong; the Python bindings map the
/// variants onto the `reft_rs.ReftError` hierarchy through [`Error::kind`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A position spec string (`f7+l7`, `l3`, `all`, `0,2,-1`, ...) could not be parsed.
    #[error("invalid position spec {spec:?}: {reason}")]
    PositionSpec {
        /// The spec as the caller wrote it.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Inputs to position selection disagree (a negative length, a padded
    /// length shorter than a sequence, arrays of different lengths, ...).
    #[error("invalid position input: {0}")]
    PositionInput(String),

    /// Arrays handed to gather/scatter have incompatible shapes.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// An output array is too large for the memory available.
    #[error("out of memory: {0}")]
    Allocation(String),

    /// A location points outside the sequence it indexes.
    #[error("location out of range: {0}")]
    Location(String),

    /// A checkpoint file or folder does not exist.
    #[error("checkpoint file not found: {}", path.display())]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
    },

    /// Reading or writing a checkpoint file failed at the operating-system level.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or folder being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint's tensor file is truncated, corrupt, or holds tensors that
    /// disagree with its config (missing, unexpected, wrong shape or dtype).
    #[error("corrupt checkpoint {}: {reason}", path.display())]
    CorruptCheckpoint {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A checkpoint config is not valid JSON, lacks a field, or holds a value
    /// that cannot be right (unknown component, layer past the model, ...).
    #[error("invalid checkpoint config{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    InvalidConfig {
        /// The config file, when the config came from one.
        path: Option<PathBuf>,
        /// What is wrong with it.
        reason: String,
    },

    /// An intervention's settings are invalid on their own (an unknown
    /// type or activation, a bad position spec, a rank of 0, a name with
    /// characters tensor keys cannot hold, ...), before any checkpoint is
    /// involved.
    #[error("{0}")]
    InvalidIntervention(String),

    /// A config names an intervention type this version does not know.
    #[error("unknown intervention type {name:?}{} (known types: {known})", path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    UnknownInterventionType {
        /// The config file, when the config came from one.
        path: Option<PathBuf>,
        /// The type name found.
        name: String,
        /// The type names this version knows, comma separated.
        known: String,
    },

    /// A checkpoint was written by a newer reft_rs with a format this version cannot read.
    #[error("checkpoint {} has format_version {found}, newer than the {supported} this reft_rs reads; upgrade reft_rs", path.display())]
    UnsupportedFormat {
        /// The config file.
        path: PathBuf,
        /// The version found in the file.
        found: u64,
        /// The newest version this build reads.
        supported: u64,
    },

    /// A tensor handed to `save` is inconsistent (its byte length disagrees
    /// with its dtype and shape, or its dtype is not one a checkpoint holds).
    #[error("invalid tensor {name:?}: {reason}")]
    InvalidTensor {
        /// The tensor's key.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A model file or folder is missing.
    #[error("model file not found: {}", path.display())]
    ModelNotFound {
        /// The file or folder that was looked for.
        path: PathBuf,
    },

    /// A model folder or file cannot be loaded (bad config, missing or
    /// misshapen weights, unreadable GGUF).
    #[error("cannot load model {}: {reason}", path.display())]
    ModelLoad {
        /// The file or folder at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A model whose architecture the engine does not implement.
    #[error("model {} has model_type {model_type:?}, which the engine does not support (supported: llama, mistral, qwen2, smollm, gpt2)", path.display())]
    UnsupportedModel {
        /// The model's config or file.
        path: PathBuf,
        /// The `model_type` found.
        model_type: String,
    },

    /// Interventions that do not fit the model they are applied to.
    #[error("incompatible checkpoint: {0}")]
    Incompatible(String),

    /// An argument outside its allowed range (a token id past the
    /// vocabulary, a negative temperature, top_p outside (0, 1], ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Text cannot be turned into tokens or back (no tokenizer, a bad chat
    /// template, ...).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The tensor backend failed.
    #[error("engine: {0}")]
    Backend(String),

    /// The work is refused for now: too much is queued already.
    #[error("busy: {0}")]
    Busy(String),
}

/// The broad class of an [`Error`], used by bindings to pick an exception type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad position spec or position inputs.
    Position,
    /// Incompatible array shapes.
    Shape,
    /// An index outside its sequence.
    Location,
    /// Not enough memory for an output.
    Memory,
    /// A checkpoint file that is not there.
    NotFound,
    /// An operating-system I/O failure.
    Io,
    /// Intervention settings that are invalid on their own.
    Config,
    /// A checkpoint config or tensor set that is invalid (bad field, unknown
    /// type, tensors that disagree with the config), on save or load.
    InvalidCheckpoint,
    /// A damaged checkpoint file (truncated, not safetensors, mixed saves).
    CorruptCheckpoint,
    /// A checkpoint format newer than this build reads.
    UnsupportedFormat,
    /// A model file that is not there.
    ModelNotFound,
    /// A model that cannot be loaded.
    ModelLoad,
    /// A model architecture the engine does not implement.
    UnsupportedModel,
    /// Interventions that do not fit the model.
    Incompatible,
    /// An argument outside its range.
    InvalidArgument,
    /// Tokenizer or chat-template failure.
    Tokenizer,
    /// Tensor backend failure.
    Backend,
    /// Too much work queued; retry later.
    Busy,
}

impl Error {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::PositionSpec { .. } | Error::PositionInput(_) => ErrorKind::Position,
            Error::Shape(_) => ErrorKind::Shape,
            Error::Location(_) => ErrorKind::Location,
            Error::Allocation(_) => ErrorKind::Memory,
            Error::MissingFile { .. } => ErrorKind::NotFound,
            Error::Io { .. } => ErrorKind::Io,
            Error::CorruptCheckpoint { .. } => ErrorKind::CorruptCheckpoint,
            Error::InvalidIntervention(_) => ErrorKind::Config,
            Error::InvalidConfig { .. }
            | Error::UnknownInterventionType { .. }
            | Error::InvalidTensor { .. } => ErrorKind::InvalidCheckpoint,
            Error::UnsupportedFormat { .. } => ErrorKind::UnsupportedFormat,
            Error::ModelNotFound { .. } => ErrorKind::ModelNotFound,
            Error::ModelLoad { .. } => ErrorKind::ModelLoad,
            Error::UnsupportedModel { .. } => ErrorKind::UnsupportedModel,
            Error::Incompatible(_) => ErrorKind::Incompatible,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Tokenizer(_) => ErrorKind::Tokenizer,
            Error::Backend(_) => ErrorKind::Backend,
            Error::Busy(_) => ErrorKind::Busy,
        }
    }

    /// The file this error is about, if any.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Error::MissingFile { path }
            | Error::Io { path, .. }
            | Error::CorruptCheckpoint { path, .. }
            | Error::UnsupportedFormat { path, .. }
            | Error::ModelNotFound { path }
            | Error::ModelLoad { path, .. }
            | Error::UnsupportedModel { path, .. } => Some(path),
            Error::InvalidConfig { path, .. } | Error::UnknownInterventionType { path, .. } => {
                path.as_deref()
            }
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile { path }
        } else {
            Error::Io { path, source }
        }
    }
}

#[cfg(feature = "engine")]
impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        Error::Backend(error.to_string())
    }
}

/// Shorthand for results of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
