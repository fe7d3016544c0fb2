//! Where a model's tensors come from: memory-mapped safetensors files (one
//! or sharded) or a GGUF file, possibly quantized.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};

/// A weight matrix `[out, in]` and optional bias, applied as `x Wᵀ + b`.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// float32, stored `[out, in]`.
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// A GGUF block-quantized matrix.
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// `x` is `[n, in]`; the result is `[n, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out, bias) = match self {
            Linear::Dense { weight, bias } => (x.matmul(&weight.t()?)?, bias),
            Linear::Quantized { weight, bias } => (weight.forward(x)?, bias),
        };
        Ok(match bias {
            Some(b) => out.broadcast_add(b)?,
            None => out,
        })
    }

    pub(crate) fn out_features(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.dim(0).unwrap_or(0),
            Linear::Quantized { weight, .. } => match weight {
                QMatMul::QTensor(q) => q.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dim(0).unwrap_or(0),
            },
        }
    }
}

/// Tensors by name from safetensors files or a GGUF file.
pub(crate) enum Source {
    Safetensors {
        files: MmapedSafetensors,
        names: BTreeSet<String>,
        path: PathBuf,
    },
    Gguf {
        content: gguf_file::Content,
        file: std::sync::Mutex<File>,
        path: PathBuf,
        /// Expand quantized matrices to float32 at load.
        dequantize: bool,
    },
}

fn load_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::ModelLoad {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Source {
    /// Opens `model.safetensors` or the shards named by
    /// `model.safetensors.index.json` in `folder`.
    pub(crate) fn safetensors(folder: &Path) -> Result<Self> {
        let single = folder.join("model.safetensors");
        let index = folder.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| load_error(&index, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| load_error(&index, "has no \"weight_map\""))?;
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.into_iter().map(|s| folder.join(s)).collect()
        } else {
            return Err(Error::ModelNotFound {
                path: folder.join("model.safetensors"),
            });
        };
        for file in &files {
            if !file.is_file() {
                return Err(Error::ModelNotFound { path: file.clone() });
            }
        }
        // SAFETY: the files are mapped read-only; like every memory-mapped
        // reader we rely on nobody truncating them while the engine loads.
        let mapped = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| load_error(folder, format!("not a valid safetensors file: {e}")))?;
        let names = mapped.tensors().into_iter().map(|(name, _)| name).collect();
        Ok(Source::Safetensors {
            files: mapped,
            names,
            path: folder.to_path_buf(),
        })
    }

    /// Opens a GGUF file and reads its header.
    pub(crate) fn gguf(path: &Path, dequantize: bool) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::ModelNotFound {
                path: path.to_path_buf(),
            },
            _ => Error::io(path, e),
        })?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| load_error(path, format!("not a readable GGUF file: {e}")))?;
        Ok(Source::Gguf {
            content,
            file: std::sync::Mutex::new(file),
            path: path.to_path_buf(),
            dequantize,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            Source::Safetensors { path, .. } | Source::Gguf { path, .. } => path,
        }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        match self {
            Source::Safetensors { names, .. } => names.contains(name),
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(name),
        }
    }

    pub(crate) fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match self {
            Source::Gguf { content, .. } => Some(&content.metadata),
            Source::Safetensors { .. } => None,
        }
    }

    fn qtensor(&self, name: &str) -> Result<QTensor> {
        match self {
            Source::Gguf {
                content,
                file,
                path,
                ..
            } => {
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                content
                    .tensor(&mut *file, name, &Device::Cpu)
                    .map_err(|e| load_error(path, format!("tensor {name}: {e}")))
            }
            Source::Safetensors { path, .. } => {
                Err(load_error(path, format!("{name} is not a GGUF tensor")))
            }
        }
    }

    /// A tensor as float32, checked against the expected shape.
    pub(crate) fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = match self {
            Source::Safetensors { files, path, names } => {
                if !names.contains(name) {
                    return Err(load_error(
                        path,
                        format!("the weights have no tensor {name}"),
                    ));
                }
                files
                    .load(name, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| load_error(path, format!("tensor {name}: {e}")))?
            }
            Source::Gguf { path, .. } => {
                if !self.contains(name) {
                    return Err(load_error(
                        path,
                        format!("the GGUF file has no tensor {name}"),
                    ));
                }
                self.qtensor(name)?.dequantize(&Device::Cpu)?
            }
        };
        if tensor.dims() != shape {
            return Err(load_error(
                self.path(),
                format!(
                    "tensor {name} has shape {:?}, expected {shape:?}",
                    tensor.dims()
                ),
            ));
        }
        Ok(tensor)
    }

    /// A weight matrix `[out, in]` (`transposed`: stored `[in, out]`, as
    /// GPT-2's Conv1D keeps it) with its bias when the file has one.
    pub(crate) fn linear(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
        transposed: bool,
    ) -> Result<Linear> {
        let weight_name = format!("{prefix}.weight");
        let bias_name = format!("{prefix}.bias");
        let bias = if self.contains(&bias_name) {
            Some(self.tensor(&bias_name, &[out])?)
        } else {
            None
        };
        if let Source::Gguf {
            path, dequantize, ..
        } = self
        {
            if !self.contains(&weight_name) {
                return Err(load_error(
                    path,
                    format!("the GGUF file has no tensor {weight_name}"),
                ));
            }
            let q = self.qtensor(&weight_name)?;
            // GGUF lists dimensions innermost first; candle reverses them to [out, in].
            if q.shape().dims() != [out, inp] {
                return Err(load_error(
                    path,
                    format!(
                        "tensor {weight_name} has shape {:?}, expected {:?}",
                        q.shape().dims(),
                        [out, inp]
                    ),
                ));
            }
            if *dequantize {
                return Ok(Linear::Dense {
                    weight: q.dequantize(&Device::Cpu)?,
                    bias,
                });
            }
            return Ok(Linear::Quantized {
                weight: QMatMul::from_arc(Arc::new(q))?,
                bias,
            });
        }
        let weight = if transposed {
            self.tensor(&weight_name, &[inp, out])?.t()?.contiguous()?
        } else {
            self.tensor(&weight_name, &[out, inp])?
        };
        Ok(Linear::Dense { weight, bias })
    }
}
