//! The crate's one error type.

use std::path::PathBuf;

/// Every fallible function of this crate returns `Result<T, Error>`.
///
/// Variants name what was wrong with the input (a file, a tensor, a config field, an
/// argument) so that a caller can tell bad input from a bug without parsing messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A configuration (an HF `config.json`, GGUF metadata or a `ModConfig`) is malformed,
    /// incomplete or inconsistent.
    #[error("invalid config{}: {reason}", .path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        /// The file the config came from, when it came from a file.
        path: Option<PathBuf>,
        /// What is wrong with it.
        reason: String,
    },

    /// The checkpoint names a model architecture this crate does not implement.
    #[error("unsupported architecture `{0}`: only LLaMA-family decoders (`llama`) are supported")]
    UnsupportedArchitecture(String),

    /// A checkpoint file is malformed or truncated.
    #[error("malformed checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A GGUF tensor is stored in a type this crate cannot dequantize.
    #[error("unsupported GGUF tensor type in {path}: {reason}")]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The type as the reader reported it.
        reason: String,
    },

    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor {
        /// Its HF name, e.g. `model.layers.3.self_attn.q_proj.weight`.
        name: String,
    },

    /// A tensor has a shape other than the config implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Its HF name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found in the checkpoint.
        found: Vec<usize>,
    },

    /// The tokenizer could not be built, loaded, saved or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A sequence is longer than the model's context (`max_position_embeddings`).
    #[error("sequence of {len} tokens is longer than the model's context of {max} tokens")]
    SequenceTooLong {
        /// Tokens in the sequence.
        len: usize,
        /// The model's context length.
        max: usize,
    },

    /// A conversion's estimated peak memory exceeds what the machine has available
    /// ([`crate::train::memory`]).
    #[error(
        "the conversion needs an estimated {:.1} GB but {:.1} GB is available: {estimate}; \
         try --dtype bf16, --train lora or routers, or a smaller --batch-size / --seq-len",
        .needed / 1e9, .available / 1e9
    )]
    InsufficientMemory {
        /// Estimated peak, bytes.
        needed: f64,
        /// Available memory, bytes.
        available: f64,
        /// The estimate by part, as text.
        estimate: String,
    },

    /// An argument is outside its valid range (an empty input, p outside (0, 1), ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A batch does not continue the sequence its KV cache holds: row `row` starts at
    /// position `got`, the cache expects `expected` (the number of tokens it has seen).
    /// A restart needs [`KvCache::reset`](crate::model::kv_cache::KvCache::reset) or
    /// [`truncate`](crate::model::kv_cache::KvCache::truncate).
    #[error("row {row} starts at position {got}, but its KV cache continues at {expected}")]
    PositionMismatch {
        /// The batch row.
        row: usize,
        /// The position the cache continues at.
        expected: usize,
        /// The position the batch starts at.
        got: usize,
    },

    /// A corpus source is missing, unreadable, empty or too short.
    #[error("corpus source `{source_name}`: {reason}")]
    Data {
        /// The source's name (its folder name by default).
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A target compute fraction that no setting of the operator reaches.
    #[error("target compute fraction {target:.3} is unreachable: this model reaches {min:.3} to {max:.3}")]
    UnreachableTarget {
        /// The requested fraction.
        target: f64,
        /// The smallest reachable fraction (every routed token skipped but the sinks).
        min: f64,
        /// The largest (every token kept).
        max: f64,
    },

    /// Training produced a non-finite loss; the last checkpoint written before it is kept.
    #[error("non-finite loss {loss} at step {step}; the last good checkpoint is kept")]
    NonFiniteLoss {
        /// The optimisation step (1-based) whose loss was not finite.
        step: usize,
        /// The loss value.
        loss: f64,
    },

    /// A model could not be fetched from the Hugging Face hub.
    #[error("could not fetch `{repo}` from the Hugging Face hub: {reason}")]
    Hub {
        /// The hub id.
        repo: String,
        /// Why (offline machines land here).
        reason: String,
    },

    /// A tensor operation failed; with valid input this is a bug in this crate.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// JSON (de)serialisation failed outside a config file.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Config`] without a file.
    pub(crate) fn config(reason: impl Into<String>) -> Self {
        Error::Config {
            path: None,
            reason: reason.into(),
        }
    }
}
