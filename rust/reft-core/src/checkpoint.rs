//! Reading and writing checkpoint folders.
//!
//! A checkpoint is a folder holding [`CONFIG_FILE`] (a [`ReftConfig`] as
//! JSON) and [`TENSORS_FILE`] (safetensors: no code is ever loaded).
//!
//! Saving never leaves a half-written file in place of a good one: both files
//! are written under temporary names in the same folder and flushed to disk,
//! the previous tensor file is kept under [`PREVIOUS_TENSORS_FILE`], and the
//! new files are renamed into place (tensors first, config last). Config and
//! tensor file carry the same `save_id`; if a save is cut off between the two
//! renames, loading notices the mismatch and reads the previous tensor file,
//! which matches the previous config still in place.
//!
//! Loading checks everything: the config's fields and values, the format
//! version, that the tensor file is complete and well formed, and that it
//! holds exactly the tensors the config calls for, with the right dtypes and
//! shapes. Each problem is an [`Error`] naming the file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{DType, ReftConfig, FORMAT_VERSION, LIBRARY_VERSION};
use crate::error::{Error, Result};

/// Name of the config file in a checkpoint folder.
pub const CONFIG_FILE: &str = "reft_config.json";
/// Name of the tensor file in a checkpoint folder.
pub const TENSORS_FILE: &str = "reft_model.safetensors";
/// The previous tensor file, kept while a save is under way.
pub const PREVIOUS_TENSORS_FILE: &str = "reft_model.safetensors.previous";

const FORMAT_KEY: &str = "format";
const FORMAT_NAME: &str = "reft_rs";
const SAVE_ID_KEY: &str = "save_id";

/// A borrowed tensor to save: dtype, shape and raw little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: &'a [usize],
    /// Row-major element bytes.
    pub data: &'a [u8],
}

/// A loaded tensor: dtype, shape and raw little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major element bytes.
    pub data: Vec<u8>,
}

impl Tensor {
    /// Borrows this tensor for [`save`].
    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef {
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
        }
    }

    /// The values as float32, converting from any floating-point dtype.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let chunks = self.data.chunks_exact(self.dtype.size());
        Some(match self.dtype {
            DType::Float32 => chunks
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::Float64 => chunks
                .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32)
                .collect(),
            DType::Bfloat16 => chunks
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            DType::Float16 => chunks
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            _ => return None,
        })
    }
}

/// IEEE binary16 to binary32, exact.
#[inline]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exponent = ((bits >> 10) & 0x1f) as u32;
    let mantissa = (bits & 0x3ff) as u32;
    let magnitude = match (exponent, mantissa) {
        (0, 0) => 0,
        (0, m) => {
            // subnormal: m * 2^-24, exact in f32
            let value = m as f32 * 2f32.powi(-24);
            return if sign != 0 { -value } else { value };
        }
        (0x1f, m) => 0x7f80_0000 | (m << 13),
        (e, m) => ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(sign | magnitude)
}

/// A loaded checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The config, checked.
    pub config: ReftConfig,
    /// Every tensor by key, checked against the config.
    pub tensors: BTreeMap<String, Tensor>,
    /// True when the last save was cut off and the previous tensors were read.
    pub recovered: bool,
}

impl safetensors::View for TensorRef<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Checks `tensors` against what `config` calls for; `describe` turns a
/// problem into the error for the caller's context.
fn check_tensors<'t, I>(
    config: &ReftConfig,
    tensors: I,
    describe: &dyn Fn(String) -> Error,
) -> Result<()>
where
    I: IntoIterator<Item = (&'t str, DType, &'t [usize])>,
{
    let found: BTreeMap<&str, (DType, &[usize])> =
        tensors.into_iter().map(|(k, d, s)| (k, (d, s))).collect();
    let mut expected: BTreeMap<String, Option<(DType, Vec<usize>)>> = BTreeMap::new();
    for parameter in config.parameters()? {
        expected.insert(parameter.key, Some((parameter.dtype, parameter.shape)));
    }
    for extra in &config.extra_tensors {
        expected.insert(extra.clone(), None);
    }
    for (key, want) in &expected {
        let Some((dtype, shape)) = found.get(key.as_str()) else {
            return Err(describe(format!("tensor {key:?} is missing")));
        };
        if let Some((want_dtype, want_shape)) = want {
            if shape != want_shape {
                return Err(describe(format!(
                    "tensor {key:?} has shape {shape:?} but the config calls for {want_shape:?}"
                )));
            }
            if dtype != want_dtype {
                return Err(describe(format!(
                    "tensor {key:?} is {} but the config says {}",
                    dtype.name(),
                    want_dtype.name()
                )));
            }
        }
    }
    if let Some(key) = found.keys().find(|k| !expected.contains_key(**k)) {
        return Err(describe(format!(
            "tensor {key:?} belongs to no intervention in the config (list it in extra_tensors to keep it)"
        )));
    }
    Ok(())
}

/// A fresh id for one save: time, process and a counter, as hex.
fn new_save_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{nanos:x}-{:x}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `bytes` to `path` and flushes them to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// Flushes a folder's entries (the renames in it) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Removes temporary files that an earlier, interrupted save left behind.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with(&format!(".{TENSORS_FILE}."))
            || name.starts_with(&format!(".{CONFIG_FILE}."));
        if ours && name.ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Saves a checkpoint into the folder `dir`, creating it if needed.
///
/// `config` is checked, and `tensors` must be exactly the tensors it calls
/// for, before any file is touched. `format_version`, `library_version` and
/// `save_id` are filled in by this function.
///
/// # Example
/// ```
/// # use reft_core::{checkpoint, config::ReftConfig};
/// # let dir = tempfile::tempdir().unwrap();
/// let config = ReftConfig::from_json(r#"{
///   "base_model": {"name_or_path": "tiny", "model_type": "gpt2", "hidden_size": 2, "num_hidden_layers": 1},
///   "interventions": [{"name": "steer0", "type": "steer", "layer": 0,
///                      "component": "block_output", "positions": "all"}]}"#, None).unwrap();
/// let vector = [1.0f32, -1.0];
/// let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
/// let tensor = checkpoint::TensorRef { dtype: reft_core::config::DType::Float32, shape: &[2], data: &bytes };
/// checkpoint::save(dir.path(), &config, &[("steer0.vector", tensor)]).unwrap();
/// let loaded = checkpoint::load(dir.path()).unwrap();
/// assert_eq!(loaded.tensors["steer0.vector"].data, bytes);
/// ```
pub fn save(dir: &Path, config: &ReftConfig, tensors: &[(&str, TensorRef<'_>)]) -> Result<()> {
    save_with_hook(dir, config, tensors, &mut |_| Ok(()))
}

/// The steps of a save, in order; tests cut a save off at each one.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveStep {
    /// Both temporary files are written and flushed.
    TemporariesWritten,
    /// The previous tensor file is kept under [`PREVIOUS_TENSORS_FILE`].
    PreviousKept,
    /// The new tensor file is in place; the config is not yet.
    TensorsRenamed,
    /// Both new files are in place.
    ConfigRenamed,
}

/// [`save`], calling `hook` after each [`SaveStep`]; an error from the hook
/// stops the save there, as a crash would (no clean-up).
#[doc(hidden)]
pub fn save_with_hook(
    dir: &Path,
    config: &ReftConfig,
    tensors: &[(&str, TensorRef<'_>)],
    hook: &mut dyn FnMut(SaveStep) -> Result<()>,
) -> Result<()> {
    let mut config = config.clone();
    config.format_version = FORMAT_VERSION;
    config.library_version = LIBRARY_VERSION.to_string();
    config.validate()?;
    for (name, tensor) in tensors {
        let elements: usize = tensor
            .shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .ok_or_else(|| Error::InvalidTensor {
                name: name.to_string(),
                reason: format!("shape {:?} is too large", tensor.shape),
            })?;
        if elements.checked_mul(tensor.dtype.size()) != Some(tensor.data.len()) {
            return Err(Error::InvalidTensor {
                name: name.to_string(),
                reason: format!(
                    "{} bytes do not make a {} tensor of shape {:?}",
                    tensor.data.len(),
                    tensor.dtype.name(),
                    tensor.shape
                ),
            });
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some((dup, _)) = tensors.iter().find(|(name, _)| !seen.insert(*name)) {
        return Err(Error::InvalidTensor {
            name: dup.to_string(),
            reason: "given twice".into(),
        });
    }
    check_tensors(
        &config,
        tensors.iter().map(|(name, t)| (*name, t.dtype, t.shape)),
        &|reason| Error::InvalidConfig {
            path: None,
            reason: format!("the tensors do not match the config: {reason}"),
        },
    )?;

    let save_id = new_save_id();
    config.save_id = Some(save_id.clone());
    let metadata = HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT_NAME.to_string()),
        (SAVE_ID_KEY.to_string(), save_id.clone()),
    ]);
    let tensor_bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (*n, *t)), Some(metadata)).map_err(
            |e| Error::InvalidTensor {
                name: String::new(),
                reason: e.to_string(),
            },
        )?;
    let config_bytes = config.to_json().into_bytes();

    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    remove_stale_temporaries(dir);
    let final_tensors = dir.join(TENSORS_FILE);
    let final_config = dir.join(CONFIG_FILE);
    let previous = dir.join(PREVIOUS_TENSORS_FILE);
    let temp_tensors = dir.join(format!(".{TENSORS_FILE}.{save_id}.tmp"));
    let temp_config = dir.join(format!(".{CONFIG_FILE}.{save_id}.tmp"));

    // An error from the hook stands for a crash: nothing may be cleaned up.
    let crashed = std::cell::Cell::new(false);
    let mut step = |done: SaveStep| hook(done).inspect_err(|_| crashed.set(true));
    let result = (|| {
        write_synced(&temp_tensors, &tensor_bytes)?;
        write_synced(&temp_config, &config_bytes)?;
        step(SaveStep::TemporariesWritten)?;
        // After an interrupted save the config on disk may match the kept
        // previous tensors, not the current ones: those are then the only
        // loadable pair, and stay.
        if final_tensors.exists() && !previous_matches_the_config(dir) {
            match fs::remove_file(&previous) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&previous, e)),
            }
            if fs::hard_link(&final_tensors, &previous).is_err() {
                fs::copy(&final_tensors, &previous).map_err(|e| Error::io(&previous, e))?;
                File::open(&previous)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(&previous, e))?;
            }
            sync_dir(dir)?;
        }
        step(SaveStep::PreviousKept)?;
        fs::rename(&temp_tensors, &final_tensors).map_err(|e| Error::io(&final_tensors, e))?;
        // The tensors' rename reaches the disk before the config's.
        sync_dir(dir)?;
        step(SaveStep::TensorsRenamed)?;
        fs::rename(&temp_config, &final_config).map_err(|e| Error::io(&final_config, e))?;
        sync_dir(dir)?;
        step(SaveStep::ConfigRenamed)?;
        let _ = fs::remove_file(&previous);
        Ok(())
    })();
    if result.is_err() && !crashed.get() {
        let _ = fs::remove_file(&temp_tensors);
        let _ = fs::remove_file(&temp_config);
    }
    result
}

/// Whether the folder's config was saved with the kept previous tensors
/// rather than the current ones (a save was cut off after its tensors'
/// rename): `load` then reads the previous tensors.
fn previous_matches_the_config(dir: &Path) -> bool {
    let saved_with = fs::read(dir.join(CONFIG_FILE))
        .ok()
        .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
        .and_then(|v| v.get("save_id")?.as_str().map(str::to_string));
    let Some(saved_with) = saved_with else {
        return false;
    };
    let id_of = |file: &str| Header::read(&dir.join(file)).ok().and_then(|h| h.save_id);
    id_of(TENSORS_FILE).as_deref() != Some(saved_with.as_str())
        && id_of(PREVIOUS_TENSORS_FILE).as_deref() == Some(saved_with.as_str())
}

/// Bytes a checkpoint's safetensors header may hold (a header lists a few
/// dozen tensors; safetensors itself allows 100 MB).
const MAX_HEADER_BYTES: u64 = 16 << 20;
/// Bytes of tensors a checkpoint may hold: a rank-64 LoReFT at every layer
/// of a 70B model is about 340 MB.
pub const MAX_TENSOR_BYTES: u64 = 4 << 30;

/// The header of a safetensors file, read and validated (by the
/// safetensors crate) without reading the tensors.
struct Header {
    file: File,
    /// Where the tensor bytes start.
    data_start: u64,
    metadata: safetensors::tensor::Metadata,
    save_id: Option<String>,
}

impl Header {
    fn read(path: &Path) -> Result<Header> {
        let corrupt = |reason: String| Error::CorruptCheckpoint {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let length = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let incomplete = || corrupt("not a complete safetensors file".into());
        let mut prefix = [0u8; 8];
        file.read_exact(&mut prefix).map_err(|_| incomplete())?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER_BYTES {
            return Err(corrupt(format!(
                "its header claims {header_len} bytes, more than the {MAX_HEADER_BYTES} a checkpoint's may have"
            )));
        }
        if 8 + header_len > length {
            return Err(incomplete());
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|_| incomplete())?;
        let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
            .map_err(|e| corrupt(format!("not a readable safetensors header ({e})")))?;
        // The crate checked that the tensors lie end to end from 0; they
        // must end where the file does.
        let data_len = metadata
            .tensors()
            .values()
            .map(|info| info.data_offsets.1 as u64)
            .max()
            .unwrap_or(0);
        if data_len > MAX_TENSOR_BYTES {
            return Err(corrupt(format!(
                "it holds {data_len} bytes of tensors, more than the {MAX_TENSOR_BYTES} a checkpoint may have"
            )));
        }
        if 8 + header_len + data_len != length {
            return Err(corrupt(format!(
                "not a complete safetensors file ({} bytes where the header describes {})",
                length,
                8 + header_len + data_len
            )));
        }
        let save_id = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(SAVE_ID_KEY).cloned());
        Ok(Header {
            file,
            data_start: 8 + header_len,
            metadata,
            save_id,
        })
    }

    /// Each tensor's dtype and shape, by name.
    fn shapes(&self, path: &Path) -> Result<Vec<(String, DType, Vec<usize>)>> {
        let mut out = Vec::new();
        for (name, info) in self.metadata.tensors() {
            let dtype =
                DType::from_safetensors(info.dtype).ok_or_else(|| Error::CorruptCheckpoint {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor {name:?} has dtype {:?}, which checkpoints do not use",
                        info.dtype
                    ),
                })?;
            out.push((name, dtype, info.shape.clone()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The tensors `shapes` lists (from [`Header::shapes`]), each read once
    /// from the file into its own buffer.
    fn tensors(
        mut self,
        path: &Path,
        shapes: Vec<(String, DType, Vec<usize>)>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let mut tensors = BTreeMap::new();
        for (name, dtype, shape) in shapes {
            let info = self.metadata.info(&name).expect("named by the header");
            let (start, end) = info.data_offsets;
            let mut data = vec![0u8; end - start];
            self.file
                .seek(SeekFrom::Start(self.data_start + start as u64))
                .and_then(|_| self.file.read_exact(&mut data))
                .map_err(|e| Error::io(path, e))?;
            tensors.insert(name, Tensor { dtype, shape, data });
        }
        Ok(tensors)
    }
}

/// Loads and checks the checkpoint in folder `dir`.
///
/// Errors name the file at fault: [`Error::MissingFile`] for a missing
/// folder or file, [`Error::InvalidConfig`] / [`Error::UnknownInterventionType`]
/// / [`Error::UnsupportedFormat`] for the config, [`Error::CorruptCheckpoint`]
/// for a damaged tensor file or one that disagrees with the config.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(if dir.exists() {
            Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::other("a checkpoint is a folder, and this is a file"),
            }
        } else {
            Error::MissingFile {
                path: dir.to_path_buf(),
            }
        });
    }
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let text = String::from_utf8(text).map_err(|_| Error::InvalidConfig {
        path: Some(config_path.clone()),
        reason: "not UTF-8 text".into(),
    })?;
    let config = ReftConfig::from_json(&text, Some(&config_path))?;

    let tensors_path = dir.join(TENSORS_FILE);
    let mut header = Header::read(&tensors_path)?;
    let mut source = tensors_path;
    let mut recovered = false;
    if config.save_id.is_some() && header.save_id != config.save_id {
        let previous = dir.join(PREVIOUS_TENSORS_FILE);
        let matching = previous
            .exists()
            .then(|| Header::read(&previous).ok())
            .flatten()
            .filter(|h| h.save_id == config.save_id);
        match matching {
            Some(previous_header) => {
                header = previous_header;
                source = previous;
                recovered = true;
            }
            None => {
                return Err(Error::CorruptCheckpoint {
                    path: source,
                    reason: format!(
                        "it comes from a different save than {CONFIG_FILE} (save_id {:?} vs {:?}); a save was interrupted and the matching tensors are gone",
                        header.save_id.unwrap_or_default(),
                        config.save_id.clone().unwrap_or_default()
                    ),
                })
            }
        }
    }
    // Names, dtypes and shapes against the config before any tensor is read.
    let shapes = header.shapes(&source)?;
    check_tensors(
        &config,
        shapes
            .iter()
            .map(|(k, dtype, shape)| (k.as_str(), *dtype, shape.as_slice())),
        &|reason| Error::CorruptCheckpoint {
            path: source.clone(),
            reason,
        },
    )?;
    let tensors = header.tensors(&source, shapes)?;
    Ok(Checkpoint {
        config,
        tensors,
        recovered,
    })
}

/// The paths of a checkpoint folder's two files.
pub fn files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(CONFIG_FILE), dir.join(TENSORS_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact_on_landmarks() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
