//! Where a model's tensors come from: memory-mapped safetensors files (one
//! or sharded) or a GGUF file, possibly quantized.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};

use super::gemm;
use super::kernels::{self, Rows};
use crate::error::{Error, Result};

/// GGUF block layouts with kernels of our own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockKind {
    Q4_1,
    Q8_0,
}

/// A weight matrix `[out, in]` and optional bias, applied as `x Wᵀ + b`.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// float32, packed for [`gemm::matmul`].
    Dense {
        weight: Arc<gemm::Packed>,
        bias: Option<Vec<f32>>,
    },
    /// GGUF `Q4_1` or `Q8_0` blocks, row after row.
    Blocks {
        kind: BlockKind,
        data: Vec<u8>,
        out: usize,
        bias: Option<Vec<f32>>,
        /// Activations in two 8-bit parts (see [`Activations`]).
        precise: bool,
    },
    /// Another GGUF block-quantized layout, through candle's kernels.
    Quantized {
        weight: QMatMul,
        bias: Option<Vec<f32>>,
        /// Activations in two 8-bit parts (see [`Activations`]).
        precise: bool,
    },
}

/// How the activations meet block-quantized weights. Products with GGUF
/// blocks round each activation block to 8 bits, as llama.cpp does: the
/// weights' own values are exact, the rounding of the activations is what
/// moves the results (logits by up to a few units on a small model).
/// `Int16` adds a second product with the 8-bit rounding of what the first
/// rounding left out, so the activations count to about 16 bits and the
/// results follow the dequantized model's float32 ones closely: the same
/// weights are read once, for twice the rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// One 8-bit rounding per activation block (llama.cpp's arithmetic).
    Int8,
    /// Two 8-bit parts per activation block (the default).
    #[default]
    Int16,
}

/// `x` minus its rounding to the 8-bit activation blocks of `T` (what a
/// product with `T`'s weights leaves out of `x`).
fn residual_of<T: GgmlType>(x: &[f32]) -> Vec<f32> {
    let mut blocks = vec![T::zeros(); x.len() / T::BLCK_SIZE];
    T::from_float(x, &mut blocks);
    let mut rounded = vec![0f32; x.len()];
    T::to_float(&blocks, &mut rounded);
    x.iter().zip(rounded).map(|(a, b)| a - b).collect()
}

/// The rounding residual of `x` for products with weights of `dtype`
/// (candle rounds activations to the type's `VecDotType`); `None` for
/// weights whose products take float activations.
fn candle_residual(dtype: GgmlDType, x: &[f32]) -> Option<Vec<f32>> {
    use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, BlockQ8_1};
    let block = |size: usize| x.len().is_multiple_of(size);
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 if block(32) => {
            Some(residual_of::<BlockQ8_0>(x))
        }
        GgmlDType::Q4_1 | GgmlDType::Q5_1 if block(32) => Some(residual_of::<BlockQ8_1>(x)),
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
            if block(256) =>
        {
            Some(residual_of::<BlockQ8K>(x))
        }
        _ => None,
    }
}

/// Runs `product` on the `m` rows of `xs` and the `m` rows of `residual`
/// in one call (`[xs; residual]`, `2m` rows) and adds the two halves of its
/// output.
fn in_two_parts(
    xs: &[f32],
    m: usize,
    residual: &[f32],
    product: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let mut both = Vec::with_capacity(2 * xs.len());
    both.extend_from_slice(xs);
    both.extend_from_slice(residual);
    let y = product(&both, 2 * m)?;
    let (first, second) = y.split_at(y.len() / 2);
    Ok(first.iter().zip(second).map(|(a, b)| a + b).collect())
}

/// Rows of `x` per pass of the streaming kernel over GGUF blocks: up to
/// `BLOCKS_DEQUANTIZE_ROWS` rows, a pass per group of this many rows; past
/// it, the blocks are expanded to float32 for candle's product.
const FEW_ROWS_BLOCKS: usize = 32;

/// Rows from which the block types without kernels of the engine's own
/// (K-quants, Q5_0, ...) are expanded to float32 for each product: candle's
/// quantized product runs at a few GFLOP/s on these CPUs, so expanding the
/// blocks pays for itself from a handful of rows (SmolLM2 Q4_K_M, the
/// logits of 32 tokens: 6.5 → 87 tok/s on 2 cores).
const QUANTIZED_EXPAND_ROWS: usize = 8;

/// Rows past which GGUF blocks are expanded for candle's product (decode
/// at batch 32 measured 1.3x faster in groups than expanded; at batch 64,
/// candle's product on the expanded rows measured 1.2x faster than packing
/// them for [`gemm::matmul`] at each call).
const BLOCKS_DEQUANTIZE_ROWS: usize = 48;

/// `f` on the float32 values of the `[m, k]` tensor `x`, row after row,
/// without a copy where `x` is already laid out so.
pub(crate) fn with_rows<R>(x: &Tensor, f: impl FnOnce(&[f32], usize) -> Result<R>) -> Result<R> {
    let (m, k) = x.dims2()?;
    let x = if x.dtype() == DType::F32 {
        x.contiguous()?
    } else {
        x.to_dtype(DType::F32)?.contiguous()?
    };
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>()?;
            f(&all[layout.start_offset()..][..m * k], m)
        }
        _ => Err(Error::Backend("states must live on the CPU".into())),
    }
}

fn add_bias(y: &mut [f32], bias: &Option<Vec<f32>>) {
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(b.len()) {
            for (v, &c) in row.iter_mut().zip(b) {
                *v += c;
            }
        }
    }
}

impl Linear {
    /// A float32 matrix `[out, in]`, packed.
    pub(crate) fn dense(weight: &Tensor, bias: Option<Vec<f32>>) -> Result<Linear> {
        let (n, k) = weight.dims2()?;
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = weight.storage_and_layout();
        let packed = match &*storage {
            candle_core::Storage::Cpu(cpu) => {
                let all = cpu.as_slice::<f32>()?;
                gemm::Packed::new(&all[layout.start_offset()..][..n * k], n, k)
            }
            _ => return Err(Error::Backend("weights must live on the CPU".into())),
        };
        Ok(Linear::Dense {
            weight: Arc::new(packed),
            bias,
        })
    }

    /// `x` is `[n, in]`; the result is `[n, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = with_rows(x, |xs, m| self.apply(xs, m))?;
        let m = x.dim(0)?;
        Ok(Tensor::from_vec(y, (m, self.out_features()), &Device::Cpu)?)
    }

    /// The product of `m` rows of `xs`, row after row.
    pub(crate) fn apply(&self, xs: &[f32], m: usize) -> Result<Vec<f32>> {
        let k = xs.len().checked_div(m).unwrap_or(0);
        match self {
            Linear::Dense { weight, bias } => {
                if m > 0 && k != weight.cols() {
                    return Err(Error::Backend(format!(
                        "a product of {k} inputs with a matrix of {}",
                        weight.cols()
                    )));
                }
                Ok(gemm::matmul(weight, xs, m, bias.as_deref()))
            }
            Linear::Blocks {
                kind,
                data,
                out,
                bias,
                precise,
            } => {
                let rows = match kind {
                    BlockKind::Q4_1 => Rows::Q4_1(data),
                    BlockKind::Q8_0 => Rows::Q8_0(data),
                };
                let mut y = if m > BLOCKS_DEQUANTIZE_ROWS {
                    // Many rows: expanding the blocks once for the float
                    // product beats re-reading them per row.
                    let w = kernels::dequantize(rows, *out, k);
                    let w = Tensor::from_vec(w, (*out, k), &Device::Cpu)?;
                    let x = Tensor::from_slice(xs, (m, k), &Device::Cpu)?;
                    x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?
                } else {
                    let streamed = |xs: &[f32], m: usize| -> Result<Vec<f32>> {
                        // Groups of at most FEW_ROWS_BLOCKS rows, one pass over the blocks each.
                        let mut y = Vec::with_capacity(m * *out);
                        for group in xs.chunks(FEW_ROWS_BLOCKS * k.max(1)) {
                            y.extend(kernels::matmul_rows(rows, group, group.len() / k, k, *out));
                        }
                        Ok(y)
                    };
                    match kernels::activation_residual(xs).filter(|_| *precise) {
                        Some(residual) => in_two_parts(xs, m, &residual, streamed)?,
                        None => streamed(xs, m)?,
                    }
                };
                add_bias(&mut y, bias);
                Ok(y)
            }
            Linear::Quantized {
                weight,
                bias,
                precise,
            } => {
                let product = |xs: &[f32], m: usize| -> Result<Vec<f32>> {
                    let x = Tensor::from_slice(xs, (m, k), &Device::Cpu)?;
                    Ok(weight.forward(&x)?.flatten_all()?.to_vec1::<f32>()?)
                };
                if let (QMatMul::QTensor(q), true) = (weight, m >= QUANTIZED_EXPAND_ROWS) {
                    // Many rows: the blocks expanded once for a float product
                    // (float activations: no rounding to correct).
                    let w = q.dequantize(&Device::Cpu)?;
                    let x = Tensor::from_slice(xs, (m, k), &Device::Cpu)?;
                    let mut y = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                    add_bias(&mut y, bias);
                    return Ok(y);
                }
                let residual = match weight {
                    QMatMul::QTensor(q) if *precise => candle_residual(q.dtype(), xs),
                    _ => None,
                };
                let mut y = match residual {
                    Some(residual) => in_two_parts(xs, m, &residual, product)?,
                    None => product(xs, m)?,
                };
                add_bias(&mut y, bias);
                Ok(y)
            }
        }
    }

    pub(crate) fn out_features(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.rows(),
            Linear::Blocks { out, .. } => *out,
            Linear::Quantized { weight, .. } => match weight {
                QMatMul::QTensor(q) => q.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dim(0).unwrap_or(0),
            },
        }
    }
}

/// Projections of the same input done as one matrix product (q, k, v; or
/// gate and up), so each call streams the weights in one pass.
#[derive(Debug, Clone)]
pub(crate) struct Fused {
    whole: Option<Linear>,
    parts: Vec<Linear>,
    sizes: Vec<usize>,
}

fn concat(parts: &[Linear]) -> Result<Option<Linear>> {
    let biases = || -> Option<Vec<f32>> {
        let have: Vec<Option<&Vec<f32>>> = parts
            .iter()
            .map(|p| match p {
                Linear::Dense { bias, .. }
                | Linear::Blocks { bias, .. }
                | Linear::Quantized { bias, .. } => bias.as_ref(),
            })
            .collect();
        if have.iter().all(Option::is_none) {
            return None;
        }
        let mut all = Vec::new();
        for (p, b) in parts.iter().zip(have) {
            match b {
                Some(b) => all.extend_from_slice(b),
                None => all.resize(all.len() + p.out_features(), 0.0),
            }
        }
        Some(all)
    };
    if parts.iter().all(|p| matches!(p, Linear::Dense { .. })) {
        let weights: Vec<&gemm::Packed> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Dense { weight, .. } => Some(&**weight),
                _ => None,
            })
            .collect();
        return Ok(Some(Linear::Dense {
            weight: Arc::new(gemm::Packed::stack(&weights)),
            bias: biases(),
        }));
    }
    let kinds: Vec<Option<BlockKind>> = parts
        .iter()
        .map(|p| match p {
            Linear::Blocks { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect();
    if kinds.iter().all(|k| k.is_some() && *k == kinds[0]) {
        let mut data = Vec::new();
        let mut precise = false;
        for p in parts {
            if let Linear::Blocks {
                data: d,
                precise: p,
                ..
            } = p
            {
                data.extend_from_slice(d);
                precise |= *p;
            }
        }
        return Ok(Some(Linear::Blocks {
            kind: kinds[0].expect("checked"),
            data,
            out: parts.iter().map(Linear::out_features).sum(),
            bias: biases(),
            precise,
        }));
    }
    Ok(None)
}

impl Fused {
    /// One product where the layouts allow it, else one per part.
    pub(crate) fn new(parts: Vec<Linear>) -> Result<Self> {
        let sizes = parts.iter().map(Linear::out_features).collect();
        Ok(match concat(&parts)? {
            Some(whole) => Fused {
                whole: Some(whole),
                parts: Vec::new(),
                sizes,
            },
            None => Fused {
                whole: None,
                parts,
                sizes,
            },
        })
    }

    /// A matrix already stored fused (GPT-2's `c_attn`), split as `sizes`.
    pub(crate) fn whole(linear: Linear, sizes: Vec<usize>) -> Self {
        Fused {
            whole: Some(linear),
            parts: Vec::new(),
            sizes,
        }
    }

    /// All the parts' outputs side by side, `[n, Σ sizes]`, row after row.
    pub(crate) fn apply(&self, xs: &[f32], m: usize) -> Result<Vec<f32>> {
        if let Some(whole) = &self.whole {
            return whole.apply(xs, m);
        }
        let outs = self
            .parts
            .iter()
            .map(|p| p.apply(xs, m))
            .collect::<Result<Vec<_>>>()?;
        let width: usize = self.sizes.iter().sum();
        let mut y = Vec::with_capacity(m * width);
        for i in 0..m {
            for (out, &size) in outs.iter().zip(&self.sizes) {
                y.extend_from_slice(&out[i * size..][..size]);
            }
        }
        Ok(y)
    }
}

/// Each tensor of a GGUF header must have a size that can be computed
/// without overflow, whole blocks, and bytes that lie inside the file:
/// candle multiplies the dimensions unchecked.
fn check_gguf_tensors(
    content: &gguf_file::Content,
    file_size: u64,
) -> std::result::Result<(), String> {
    for (name, info) in &content.tensor_infos {
        let elements = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                format!(
                    "tensor {name} has dimensions {:?}, too many elements",
                    info.shape.dims()
                )
            })?;
        let block = info.ggml_dtype.block_size();
        if !elements.is_multiple_of(block) {
            return Err(format!(
                "tensor {name} has {elements} elements, not whole blocks of {block}"
            ));
        }
        let bytes = (elements / block)
            .checked_mul(info.ggml_dtype.type_size())
            .ok_or_else(|| format!("tensor {name} is too large"))?;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes as u64));
        match end {
            Some(end) if end <= file_size => {}
            _ => {
                return Err(format!(
                    "tensor {name} ({bytes} bytes at offset {}) lies past the end of the file ({file_size} bytes)",
                    info.offset
                ))
            }
        }
    }
    Ok(())
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
        /// How activations meet the quantized matrices.
        activations: Activations,
    },
}

fn load_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::ModelLoad {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The file of a shard named in the index: a plain file name in the
/// model folder itself (no separators, `..` or absolute paths, and no
/// link leading out of the folder).
fn shard_path(folder: &Path, index: &Path, shard: &str) -> Result<PathBuf> {
    use std::path::Component;
    let mut components = Path::new(shard).components();
    let plain = matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(_)), None)
    ) && !shard.contains(['/', '\\']);
    let outside = || {
        load_error(
            index,
            format!(
                "the shard {shard:?} is not a file in the model folder {}",
                folder.display()
            ),
        )
    };
    if !plain {
        return Err(outside());
    }
    let path = folder.join(shard);
    if let (Ok(real), Ok(root)) = (path.canonicalize(), folder.canonicalize()) {
        if real.parent() != Some(root.as_path()) {
            return Err(outside());
        }
    }
    Ok(path)
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
            let mut shards = BTreeSet::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().ok_or_else(|| {
                    load_error(
                        &index,
                        format!("the shard of {tensor:?} is not a file name"),
                    )
                })?;
                shards.insert(shard_path(folder, &index, shard)?);
            }
            shards.into_iter().collect()
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
    pub(crate) fn gguf(path: &Path, dequantize: bool, activations: Activations) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::ModelNotFound {
                path: path.to_path_buf(),
            },
            _ => Error::io(path, e),
        })?;
        // candle's reader divides by `general.alignment` unchecked; a file
        // that sets it to 0 would panic there.
        let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            gguf_file::Content::read(&mut file)
        }))
        .map_err(|_| load_error(path, "not a readable GGUF file: its header is damaged"))?
        .map_err(|e| load_error(path, format!("not a readable GGUF file: {e}")))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        check_gguf_tensors(&content, size).map_err(|reason| load_error(path, reason))?;
        Ok(Source::Gguf {
            content,
            file: std::sync::Mutex::new(file),
            path: path.to_path_buf(),
            dequantize,
            activations,
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
                // candle views an empty tensor's bytes through a dangling
                // pointer, which is undefined behaviour; no weight is empty.
                if let Some(info) = content.tensor_infos.get(name) {
                    if info.shape.elem_count() == 0 {
                        return Err(load_error(path, format!("tensor {name} has no elements")));
                    }
                }
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

    /// A float32 vector of `len` values (a norm's weight, a bias).
    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self
            .tensor(name, &[len])?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
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
            Some(self.vector(&bias_name, out)?)
        } else {
            None
        };
        if let Source::Gguf {
            path,
            dequantize,
            activations,
            ..
        } = self
        {
            let precise = *activations == Activations::Int16;
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
            let kind = match q.dtype() {
                GgmlDType::Q4_1 => Some(BlockKind::Q4_1),
                GgmlDType::Q8_0 => Some(BlockKind::Q8_0),
                _ => None,
            };
            if let (Some(kind), false, true) =
                (kind, *dequantize, inp.is_multiple_of(kernels::BLOCK))
            {
                return Ok(Linear::Blocks {
                    kind,
                    data: q.data()?.into_owned(),
                    out,
                    bias,
                    precise,
                });
            }
            // candle's kernels for the other block types assume an even
            // number of blocks per row (they assert it in debug builds).
            let even_blocks = inp.is_multiple_of(2 * q.dtype().block_size());
            if *dequantize || !even_blocks {
                return Linear::dense(&q.dequantize(&Device::Cpu)?, bias);
            }
            return Ok(Linear::Quantized {
                weight: QMatMul::from_arc(Arc::new(q))?,
                bias,
                precise,
            });
        }
        let weight = if transposed {
            self.tensor(&weight_name, &[inp, out])?.t()?.contiguous()?
        } else {
            if let Some(packed) = self.packed_f32(&weight_name, out, inp)? {
                return Ok(Linear::Dense {
                    weight: Arc::new(packed),
                    bias,
                });
            }
            self.tensor(&weight_name, &[out, inp])?
        };
        Linear::dense(&weight, bias)
    }

    /// A float32 matrix `[n, k]` of a safetensors file packed straight from
    /// the mapped bytes (no float copy on the way); `None` for other dtypes
    /// and files, which take [`Source::tensor`].
    fn packed_f32(&self, name: &str, n: usize, k: usize) -> Result<Option<gemm::Packed>> {
        let Source::Safetensors { files, path, names } = self else {
            return Ok(None);
        };
        if !names.contains(name) {
            return Ok(None);
        }
        let view = files
            .get(name)
            .map_err(|e| load_error(path, format!("tensor {name}: {e}")))?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Ok(None);
        }
        if view.shape() != [n, k] {
            return Err(load_error(
                path,
                format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    view.shape(),
                    [n, k]
                ),
            ));
        }
        let bytes = view.data();
        if bytes.len() != n * k * 4 {
            return Err(load_error(
                path,
                format!(
                    "tensor {name} holds {} bytes, not {}",
                    bytes.len(),
                    n * k * 4
                ),
            ));
        }
        Ok(Some(gemm::Packed::from_rows(n, k, |j, row| {
            let src = &bytes[j * k * 4..(j + 1) * k * 4];
            for (v, b) in row.iter_mut().zip(src.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::tests::values;

    /// The product in f64 with the weights the blocks stand for.
    fn reference(w: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        (0..m)
            .flat_map(|i| {
                (0..n).map(move |j| {
                    (0..k)
                        .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                        .sum()
                })
            })
            .collect()
    }

    fn largest_error(got: &[f32], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0.0, f64::max)
    }

    /// The largest errors against the float product of `x` (`[m, k]`) with
    /// `n` random weight rows of `dtype`, with two-part and with 8-bit
    /// activations; the first must be small and, where the activations are
    /// rounded at all, much smaller than the second.
    fn product_errors(dtype: GgmlDType, x: &[f32], m: usize, k: usize, n: usize) -> (f64, f64) {
        let w = Tensor::from_vec(values(n * k, 3), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let expanded = q.dequantize(&Device::Cpu).unwrap();
        let weights = expanded.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = reference(&weights, x, m, k, n);
        let linear = |precise: bool| match dtype {
            GgmlDType::Q8_0 | GgmlDType::Q4_1 => Linear::Blocks {
                kind: if dtype == GgmlDType::Q8_0 {
                    BlockKind::Q8_0
                } else {
                    BlockKind::Q4_1
                },
                data: q.data().unwrap().into_owned(),
                out: n,
                bias: None,
                precise,
            },
            _ => Linear::Quantized {
                weight: QMatMul::from_arc(Arc::new(QTensor::quantize(&w, dtype).unwrap())).unwrap(),
                bias: None,
                precise,
            },
        };
        let two = largest_error(&linear(true).apply(x, m).unwrap(), &want);
        let one = largest_error(&linear(false).apply(x, m).unwrap(), &want);
        assert!(two < 2e-3, "{dtype:?}: {two} with two parts");
        let rounds = match dtype {
            GgmlDType::Q8_0 | GgmlDType::Q4_1 => kernels::activation_residual(x).is_some(),
            _ => m < QUANTIZED_EXPAND_ROWS,
        };
        if rounds {
            assert!(two * 10.0 < one, "{dtype:?}: {two} against {one}");
        }
        (two, one)
    }

    /// With two 8-bit parts the activations' rounding all but vanishes from
    /// products with quantized weights; with one it stays (where the CPU's
    /// kernels round activations at all).
    #[test]
    fn two_part_activations_follow_the_float_product() {
        let (m, k, n) = (3, 512, 24);
        let x = values(m * k, 7);
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            product_errors(dtype, &x, m, k, n);
        }
    }

    /// Many rows: blocks without kernels of the engine's own are expanded
    /// for a float product, whatever the activation setting.
    #[test]
    fn expanded_blocks_give_the_float_product() {
        let (m, k, n) = (QUANTIZED_EXPAND_ROWS + 1, 512, 24);
        let x = values(m * k, 9);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5_0, GgmlDType::Q6K] {
            let (two, one) = product_errors(dtype, &x, m, k, n);
            assert!(two < 1e-4 && one < 1e-4, "{dtype:?}: {two}, {one}");
        }
    }
}
