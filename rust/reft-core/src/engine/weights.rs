//! Where a model's tensors come from: memory-mapped safetensors files (one
//! or sharded) or a GGUF file, possibly quantized.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::gemm;
use super::kernels::{self, Rows};
use super::quant::BlockType;
use crate::error::{Error, Result};

/// Weights kept as the file stores them.
#[derive(Debug, Clone)]
pub(crate) enum Stored {
    /// GGUF blocks, row after row.
    Blocks(BlockType, Vec<u8>),
    /// float16 values, row after row.
    F16(Vec<u16>),
    /// bfloat16 values, row after row.
    Bf16(Vec<u16>),
}

impl Stored {
    fn rows(&self) -> Rows<'_> {
        match self {
            Stored::Blocks(t, data) => Rows::Blocks(*t, data),
            Stored::F16(h) => Rows::F16(h),
            Stored::Bf16(h) => Rows::Bf16(h),
        }
    }
}

/// A weight matrix `[out, in]` and optional bias, applied as `x Wᵀ + b`.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// float32, packed for [`gemm::matmul`].
    Dense {
        weight: Arc<gemm::Packed>,
        bias: Option<Vec<f32>>,
    },
    /// GGUF blocks or 2-byte floats, through [`kernels::matmul`].
    Stored {
        weights: Stored,
        out: usize,
        inp: usize,
        bias: Option<Vec<f32>>,
        /// The bound of the integer activations of block products (see
        /// [`Activations`]).
        levels: i16,
    },
}

/// How the activations meet block-quantized weights. Products with GGUF
/// blocks round each block of 32 activations to integers: llama.cpp rounds
/// them to 8 bits, which moves the results (logits by up to a few units on
/// a small model) though the weights' own values are exact. The engine
/// rounds them to 16 bits by default, which leaves the results within
/// float rounding of the dequantized model's, at the same speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// 8-bit activation blocks (llama.cpp's arithmetic).
    Int8,
    /// 16-bit activation blocks (the default).
    #[default]
    Int16,
}

impl Activations {
    fn levels(self) -> i16 {
        match self {
            Activations::Int8 => 127,
            Activations::Int16 => i16::MAX,
        }
    }
}

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
            Linear::Stored {
                weights,
                out,
                inp,
                bias,
                levels,
            } => {
                if m > 0 && k != *inp {
                    return Err(Error::Backend(format!(
                        "a product of {k} inputs with a matrix of {inp}"
                    )));
                }
                let mut y = kernels::matmul(weights.rows(), xs, m, k, *out, *levels);
                add_bias(&mut y, bias);
                Ok(y)
            }
        }
    }

    /// Row `j` of the matrix as float32 (a token's embedding).
    pub(crate) fn row(&self, j: usize) -> Vec<f32> {
        match self {
            Linear::Dense { weight, .. } => weight.row(j),
            Linear::Stored { weights, inp, .. } => {
                let mut row = vec![0f32; *inp];
                kernels::dequantize_row(weights.rows(), j, &mut row);
                row
            }
        }
    }

    pub(crate) fn out_features(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.rows(),
            Linear::Stored { out, .. } => *out,
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
                Linear::Dense { bias, .. } | Linear::Stored { bias, .. } => bias.as_ref(),
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
    // Stored matrices of one layout, inputs and activation rounding:
    // their rows one after another.
    let mut whole: Option<(Stored, usize, i16)> = None;
    for p in parts {
        let Linear::Stored {
            weights,
            inp,
            levels,
            ..
        } = p
        else {
            return Ok(None);
        };
        whole = match (whole, weights) {
            (None, w) => Some((w.clone(), *inp, *levels)),
            (Some((Stored::Blocks(t, mut d), i, l)), Stored::Blocks(u, e))
                if t == *u && i == *inp && l == *levels =>
            {
                d.extend_from_slice(e);
                Some((Stored::Blocks(t, d), i, l))
            }
            (Some((Stored::F16(mut d), i, l)), Stored::F16(e)) if i == *inp && l == *levels => {
                d.extend_from_slice(e);
                Some((Stored::F16(d), i, l))
            }
            (Some((Stored::Bf16(mut d), i, l)), Stored::Bf16(e)) if i == *inp && l == *levels => {
                d.extend_from_slice(e);
                Some((Stored::Bf16(d), i, l))
            }
            _ => return Ok(None),
        };
    }
    Ok(whole.map(|(weights, inp, levels)| Linear::Stored {
        weights,
        out: parts.iter().map(Linear::out_features).sum(),
        inp,
        bias: biases(),
        levels,
    }))
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

/// The first tensor of the GGUF file at `path` whose type the engine
/// cannot read, with the type's id; `None` when there is none or the
/// header cannot be walked (every read is bounded by the file's size).
fn unread_tensor_type(path: &Path) -> Option<(String, u32)> {
    use std::io::{BufReader, Read};
    const READ: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];
    let file = File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let mut r = BufReader::new(file).take(size);
    fn u32_of(r: &mut impl Read) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_of(r: &mut impl Read) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn skip(r: &mut impl Read, n: u64) -> Option<()> {
        (std::io::copy(&mut r.take(n), &mut std::io::sink()).ok()? == n).then_some(())
    }
    fn string(r: &mut impl Read, size: u64) -> Option<Vec<u8>> {
        let len = u64_of(r)?;
        if len > size {
            return None;
        }
        let mut b = vec![0u8; len as usize];
        r.read_exact(&mut b).ok()?;
        Some(b)
    }
    fn value(r: &mut impl Read, kind: u32, size: u64, depth: u32) -> Option<()> {
        match kind {
            0 | 1 | 7 => skip(r, 1),
            2 | 3 => skip(r, 2),
            4..=6 => skip(r, 4),
            10..=12 => skip(r, 8),
            8 => string(r, size).map(|_| ()),
            9 if depth == 0 => {
                let (inner, count) = (u32_of(r)?, u64_of(r)?);
                if count > size {
                    return None;
                }
                (0..count).try_for_each(|_| value(r, inner, size, 1))
            }
            _ => None,
        }
    }
    if u32_of(&mut r)? != u32::from_le_bytes(*b"GGUF") || u32_of(&mut r)? < 2 {
        return None;
    }
    let (tensors, entries) = (u64_of(&mut r)?, u64_of(&mut r)?);
    for _ in 0..entries.min(size) {
        string(&mut r, size)?;
        let kind = u32_of(&mut r)?;
        value(&mut r, kind, size, 0)?;
    }
    for _ in 0..tensors.min(size) {
        let name = string(&mut r, size)?;
        let dims = u32_of(&mut r)?;
        if dims > 8 {
            return None;
        }
        skip(&mut r, 8 * dims as u64)?;
        let id = u32_of(&mut r)?;
        skip(&mut r, 8)?;
        if !READ.contains(&id) {
            return Some((String::from_utf8_lossy(&name).into_owned(), id));
        }
    }
    None
}

/// The float32 values and dimensions (outermost first) of tensor `name`
/// of the GGUF file at `path`, dequantized by the engine's own readers.
pub fn read_gguf_tensor(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let source = Source::gguf(path, false, Activations::Int16)?;
    let (dtype, dims) = source.gguf_info(name)?;
    let shape: Vec<usize> = dims.iter().rev().copied().collect();
    let count: usize = dims.iter().product();
    let k = dims.first().copied().unwrap_or(1).max(1);
    let bytes = source.gguf_bytes(name)?;
    let halves = || -> Vec<u16> {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    };
    if let Some(t) = BlockType::from_ggml(dtype).filter(|t| !k.is_multiple_of(t.weights())) {
        return Err(load_error(
            path,
            format!(
                "tensor {name}'s rows of {k} are not whole {} blocks",
                t.name()
            ),
        ));
    }
    let values = match (BlockType::from_ggml(dtype), dtype) {
        (Some(t), _) => kernels::dequantize(Rows::Blocks(t, &bytes), count / k, k),
        (None, GgmlDType::F16) => kernels::dequantize(Rows::F16(&halves()), count / k, k),
        (None, GgmlDType::BF16) => kernels::dequantize(Rows::Bf16(&halves()), count / k, k),
        (None, GgmlDType::F32) => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        (None, other) => {
            return Err(load_error(
                path,
                format!("tensor {name} has type {other:?}, which the engine does not read"),
            ))
        }
    };
    Ok((shape, values))
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
        .map_err(|e| match unread_tensor_type(path) {
            Some((name, id)) => load_error(
                path,
                format!(
                    "tensor {name} has type {}, which the engine does not read (it reads \
                     F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K; \
                     llama-quantize can convert the file to one of them)",
                    super::quant::ggml_type_name(id)
                ),
            ),
            None => load_error(path, format!("not a readable GGUF file: {e}")),
        })?;
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
            if !self.contains(&weight_name) {
                return Err(load_error(
                    path,
                    format!("the GGUF file has no tensor {weight_name}"),
                ));
            }
            let (dtype, dims) = self.gguf_info(&weight_name)?;
            // GGUF lists dimensions innermost first.
            if dims != [inp, out] {
                return Err(load_error(
                    path,
                    format!(
                        "tensor {weight_name} has shape {:?}, expected {:?}",
                        dims.iter().rev().collect::<Vec<_>>(),
                        [out, inp]
                    ),
                ));
            }
            let levels = activations.levels();
            let stored = |weights: Stored| Linear::Stored {
                weights,
                out,
                inp,
                bias: bias.clone(),
                levels,
            };
            let halves = |bytes: Vec<u8>| -> Vec<u16> {
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect()
            };
            return match (BlockType::from_ggml(dtype), dtype, *dequantize) {
                (_, GgmlDType::F32, _) | (_, _, true) => {
                    Linear::dense(&self.qtensor(&weight_name)?.dequantize(&Device::Cpu)?, bias)
                }
                (Some(t), _, false) if !inp.is_multiple_of(t.weights()) => Err(load_error(
                    path,
                    format!(
                        "tensor {weight_name}'s rows of {inp} are not whole {} blocks",
                        t.name()
                    ),
                )),
                (Some(t), _, false) => {
                    Ok(stored(Stored::Blocks(t, self.gguf_bytes(&weight_name)?)))
                }
                (None, GgmlDType::F16, false) => {
                    Ok(stored(Stored::F16(halves(self.gguf_bytes(&weight_name)?))))
                }
                (None, GgmlDType::BF16, false) => {
                    Ok(stored(Stored::Bf16(halves(self.gguf_bytes(&weight_name)?))))
                }
                (None, other, false) => Err(load_error(
                    path,
                    format!(
                        "tensor {weight_name} has type {other:?}, which the engine does not read \
                         as a weight matrix"
                    ),
                )),
            };
        }
        if let Some(stored) = self.stored_half(&weight_name, out, inp, transposed)? {
            return Ok(Linear::Stored {
                weights: stored,
                out,
                inp,
                bias,
                levels: i16::MAX,
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

    /// A GGUF tensor's type and dimensions (innermost first).
    fn gguf_info(&self, name: &str) -> Result<(GgmlDType, Vec<usize>)> {
        match self {
            Source::Gguf { content, path, .. } => content
                .tensor_infos
                .get(name)
                .map(|info| {
                    (
                        info.ggml_dtype,
                        info.shape.dims().iter().rev().copied().collect(),
                    )
                })
                .ok_or_else(|| load_error(path, format!("the GGUF file has no tensor {name}"))),
            Source::Safetensors { path, .. } => {
                Err(load_error(path, format!("{name} is not a GGUF tensor")))
            }
        }
    }

    /// A GGUF tensor's bytes as the file stores them (the header was
    /// checked to place them inside the file: [`check_gguf_tensors`]).
    fn gguf_bytes(&self, name: &str) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let Source::Gguf {
            content,
            file,
            path,
            ..
        } = self
        else {
            return Err(load_error(
                self.path(),
                format!("{name} is not a GGUF tensor"),
            ));
        };
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| load_error(path, format!("the GGUF file has no tensor {name}")))?;
        let dtype = info.ggml_dtype;
        let size = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let mut bytes = vec![0u8; size];
        let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
        file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| load_error(path, format!("tensor {name}: {e}")))?;
        Ok(bytes)
    }

    /// The mapped bytes of matrix `name` of a safetensors file when its
    /// dtype is one of `dtypes`, checked to hold `shape` values of `size`
    /// bytes; `None` for other dtypes, tensors and files.
    fn mapped_matrix(
        &self,
        name: &str,
        shape: [usize; 2],
        dtypes: &[(safetensors::Dtype, usize)],
    ) -> Result<Option<(safetensors::Dtype, &[u8])>> {
        let Source::Safetensors { files, path, names } = self else {
            return Ok(None);
        };
        if !names.contains(name) {
            return Ok(None);
        }
        let view = files
            .get(name)
            .map_err(|e| load_error(path, format!("tensor {name}: {e}")))?;
        let Some(&(dtype, size)) = dtypes.iter().find(|(d, _)| *d == view.dtype()) else {
            return Ok(None);
        };
        if view.shape() != shape {
            return Err(load_error(
                path,
                format!(
                    "tensor {name} has shape {:?}, expected {shape:?}",
                    view.shape()
                ),
            ));
        }
        let bytes = view.data();
        let want = shape[0] * shape[1] * size;
        if bytes.len() != want {
            return Err(load_error(
                path,
                format!("tensor {name} holds {} bytes, not {want}", bytes.len()),
            ));
        }
        Ok(Some((dtype, bytes)))
    }

    /// A float16 / bfloat16 matrix `[n, k]` of a safetensors file, kept at
    /// two bytes a weight (`transposed`: stored `[k, n]`); `None` for other
    /// dtypes and files.
    fn stored_half(
        &self,
        name: &str,
        n: usize,
        k: usize,
        transposed: bool,
    ) -> Result<Option<Stored>> {
        use safetensors::Dtype;
        let shape = if transposed { [k, n] } else { [n, k] };
        let Some((dtype, bytes)) =
            self.mapped_matrix(name, shape, &[(Dtype::F16, 2), (Dtype::BF16, 2)])?
        else {
            return Ok(None);
        };
        let at = |i: usize| u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        let values: Vec<u16> = if transposed {
            (0..n * k).map(|i| at((i % k) * n + i / k)).collect()
        } else {
            (0..n * k).map(at).collect()
        };
        Ok(Some(if dtype == Dtype::BF16 {
            Stored::Bf16(values)
        } else {
            Stored::F16(values)
        }))
    }

    /// A float32 matrix `[n, k]` of a safetensors file packed straight from
    /// the mapped bytes (no float copy on the way); `None` for other dtypes
    /// and files, which take [`Source::tensor`].
    fn packed_f32(&self, name: &str, n: usize, k: usize) -> Result<Option<gemm::Packed>> {
        let Some((_, bytes)) = self.mapped_matrix(name, [n, k], &[(safetensors::Dtype::F32, 4)])?
        else {
            return Ok(None);
        };
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

    fn stored(t: GgmlDType, n: usize, k: usize, seed: u32, levels: i16) -> (Linear, Vec<f32>) {
        let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, t).unwrap();
        let floats = q.dequantize(&Device::Cpu).unwrap();
        let floats = floats.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let linear = Linear::Stored {
            weights: Stored::Blocks(
                BlockType::from_ggml(t).unwrap(),
                q.data().unwrap().into_owned(),
            ),
            out: n,
            inp: k,
            bias: Some(values(n, seed + 1)),
            levels,
        };
        (linear, floats)
    }

    /// 16-bit activations follow the float product of the dequantized
    /// weights closely; 8-bit ones are a hundred times further off.
    #[test]
    fn activation_bounds_set_how_close_products_come_to_the_float_one() {
        let (m, k, n) = (3, 512, 24);
        let x = values(m * k, 7);
        for t in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let errors: Vec<f64> = [Activations::Int16, Activations::Int8]
                .iter()
                .map(|a| {
                    let (linear, w) = stored(t, n, k, 3, a.levels());
                    let got = linear.apply(&x, m).unwrap();
                    let bias = values(n, 4);
                    let mut worst = 0f64;
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                                .sum::<f64>()
                                + bias[j] as f64;
                            worst = worst.max((got[i * n + j] as f64 - want).abs());
                        }
                    }
                    worst
                })
                .collect();
            assert!(errors[0] < 2e-3, "{t:?}: {errors:?}");
            assert!(errors[0] * 100.0 < errors[1], "{t:?}: {errors:?}");
        }
    }

    /// Stored matrices of one layout fuse into one whose outputs are the
    /// parts' side by side; mixed layouts stay apart with the same outputs.
    #[test]
    fn fused_stored_matrices_give_their_parts_outputs() {
        let (m, k) = (5, 256);
        let x = values(m * k, 2);
        let parts = vec![
            stored(GgmlDType::Q4K, 8, k, 1, i16::MAX).0,
            stored(GgmlDType::Q4K, 16, k, 5, i16::MAX).0,
            stored(GgmlDType::Q6K, 8, k, 9, i16::MAX).0,
        ];
        let outs: Vec<Vec<f32>> = parts.iter().map(|p| p.apply(&x, m).unwrap()).collect();
        let mut want = Vec::new();
        for i in 0..m {
            for (o, p) in outs.iter().zip(&parts) {
                let w = p.out_features();
                want.extend_from_slice(&o[i * w..(i + 1) * w]);
            }
        }
        assert_eq!(
            Fused::new(parts.clone()).unwrap().apply(&x, m).unwrap(),
            want
        );
        let same = Fused::new(parts[..2].to_vec()).unwrap();
        assert!(same.whole.is_some());
        assert_eq!(same.apply(&x, m).unwrap().len(), m * 24);
        assert!(Fused::new(parts).unwrap().whole.is_none());
    }
}
