//! Interventions from a reft_rs checkpoint, applied inside the layer loop.
//!
//! Every type of SPEC section 1 is written as the change it makes to a
//! state, `Φ(h) − h`, for the chosen rows, added back with `index_add`, so
//! rows that are not chosen are never touched. As in the torch path, the
//! edit is computed in float32, or in float64 for float64 parameters (the
//! rows are cast to it, `Φ(h)` is computed there and cast back, and the
//! change is taken against the float32 rows); half-precision parameters
//! are widened to float32 exactly. Which
//! rows are chosen comes from [`crate::positions::locate`], the same code the
//! torch path uses, over each prompt of the left-padded batch.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType as CandleDType, Device, Tensor};

use super::config::ModelConfig;
use super::model::EditSite;
use crate::checkpoint::{self, Checkpoint};
use crate::config::{Component, DType, InterventionConfig, InterventionType, ReftConfig};
use crate::error::{Error, Result};
use crate::positions::{locate, LocateOptions, PaddingSide, PositionSpec, MASKED};

#[derive(Debug, Clone, Copy)]
enum SourceActivation {
    Identity,
    Relu,
    Gelu,
    GeluTanh,
    Silu,
    Tanh,
    Sigmoid,
}

impl SourceActivation {
    fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "identity" => SourceActivation::Identity,
            "relu" => SourceActivation::Relu,
            "gelu" => SourceActivation::Gelu,
            "gelu_tanh" => SourceActivation::GeluTanh,
            "silu" => SourceActivation::Silu,
            "tanh" => SourceActivation::Tanh,
            "sigmoid" => SourceActivation::Sigmoid,
            other => {
                return Err(Error::Incompatible(format!(
                    "activation {other:?} is not known to the engine"
                )))
            }
        })
    }

    fn apply(self, x: Tensor) -> Result<Tensor> {
        Ok(match self {
            SourceActivation::Identity => x,
            SourceActivation::Relu => x.relu()?,
            SourceActivation::Gelu => x.gelu_erf()?,
            SourceActivation::GeluTanh => x.gelu()?,
            SourceActivation::Silu => x.silu()?,
            SourceActivation::Tanh => x.tanh()?,
            SourceActivation::Sigmoid => (x.neg()?.exp()? + 1.0)?.recip()?,
        })
    }
}

/// One intervention's parameters, in the dtype the edit is computed in.
struct Intervention {
    /// float32, or float64 for float64 parameters.
    dtype: CandleDType,
    config: InterventionConfig,
    kind: InterventionType,
    spec: PositionSpec,
    activation: SourceActivation,
    /// R or W₂, `[r, d]`.
    basis: Option<Tensor>,
    /// W or W₁, `[r, d]`.
    weight: Option<Tensor>,
    /// b, `[r]` (`[d]` for `red`).
    bias: Option<Tensor>,
    /// b₂, `[r]`.
    projection_bias: Option<Tensor>,
    /// s of `red`, `[d]`.
    scale: Option<Tensor>,
    /// α v of `steer`, `[d]`.
    vector: Option<Tensor>,
}

fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&weight.t()?)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

impl Intervention {
    fn every_token(&self) -> bool {
        matches!(self.spec, PositionSpec::All)
    }

    /// `Φ(h) − h` for `[rows, d]` states in the compute dtype.
    fn change(&self, h: &Tensor) -> Result<Tensor> {
        let need = |t: &Option<Tensor>| t.clone().expect("checked at load");
        Ok(match self.kind {
            InterventionType::LoReft => {
                let r = need(&self.basis);
                let source =
                    self.activation
                        .apply(linear(h, &need(&self.weight), self.bias.as_ref())?)?;
                source.sub(&h.matmul(&r.t()?)?)?.matmul(&r)?
            }
            InterventionType::NoReft => {
                let w2 = need(&self.basis);
                let source =
                    self.activation
                        .apply(linear(h, &need(&self.weight), self.bias.as_ref())?)?;
                let projected = linear(h, &w2, self.projection_bias.as_ref())?;
                source.sub(&projected)?.matmul(&w2)?
            }
            InterventionType::DiReft | InterventionType::NoDiReft => {
                let source =
                    self.activation
                        .apply(linear(h, &need(&self.weight), self.bias.as_ref())?)?;
                source.matmul(&need(&self.basis))?
            }
            InterventionType::ConsReft => {
                let r = need(&self.basis);
                let b = need(&self.bias);
                h.matmul(&r.t()?)?.neg()?.broadcast_add(&b)?.matmul(&r)?
            }
            InterventionType::LoBiReft => {
                let r = need(&self.basis);
                let shift = need(&self.bias).unsqueeze(0)?.matmul(&r)?;
                shift.broadcast_as(h.shape())?.contiguous()?
            }
            InterventionType::Red => {
                let edited = h
                    .broadcast_mul(&need(&self.scale))?
                    .broadcast_add(&need(&self.bias))?;
                edited.sub(h)?
            }
            InterventionType::Steer => need(&self.vector)
                .unsqueeze(0)?
                .broadcast_as(h.shape())?
                .contiguous()?,
        })
    }

    /// `Φ(h)` for `[rows, d]` states in the compute dtype.
    fn edited(&self, h: &Tensor) -> Result<Tensor> {
        if self.kind == InterventionType::Red {
            return Ok(h
                .broadcast_mul(self.scale.as_ref().expect("checked at load"))?
                .broadcast_add(self.bias.as_ref().expect("checked at load"))?);
        }
        Ok(h.add(&self.change(h)?)?)
    }

    /// `Φ(h)` for float32 `[rows, d]` states, as float32.
    fn apply_all(&self, h: &Tensor) -> Result<Tensor> {
        if self.dtype == CandleDType::F32 {
            return self.edited(h);
        }
        Ok(self
            .edited(&h.to_dtype(self.dtype)?)?
            .to_dtype(CandleDType::F32)?)
    }

    /// `Φ(h) − h` for float32 `[rows, d]` states, as float32: the change
    /// itself in float32, or for float64 parameters `Φ(h)` computed in
    /// float64 and rounded (as the torch path rounds it) minus `h`.
    fn delta(&self, h: &Tensor) -> Result<Tensor> {
        if self.dtype == CandleDType::F32 {
            return self.change(h);
        }
        Ok(self.apply_all(h)?.sub(h)?)
    }
}

/// The interventions of one checkpoint, checked against one model.
pub(crate) struct EditSet {
    interventions: Vec<Intervention>,
    sites: HashSet<(usize, Component)>,
    pub(crate) config: ReftConfig,
}

impl EditSet {
    /// Loads `dir` (a reft_rs checkpoint) for `model`, refusing a checkpoint
    /// trained on another model.
    pub(crate) fn load(dir: &Path, model: &ModelConfig) -> Result<Self> {
        let Checkpoint {
            config, tensors, ..
        } = checkpoint::load(dir)?;
        let base = &config.base_model;
        let inferred = config
            .metadata
            .get("base_model_inferred")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        base.check_fits(
            &dir.display().to_string(),
            inferred,
            Some(model.hidden_size),
            Some(model.num_hidden_layers),
            // One architecture under its Hugging Face and GGUF names is one model type.
            Some(
                if super::config::same_architecture(&base.model_type, &model.model_type) {
                    &base.model_type
                } else {
                    &model.model_type
                },
            ),
            true,
        )?;
        let d = model.hidden_size;
        let mut interventions = Vec::with_capacity(config.interventions.len());
        let mut sites = HashSet::new();
        for item in &config.interventions {
            if let Some(path) = &item.module_path {
                return Err(Error::Incompatible(format!(
                    "{}: module_path {path:?} names a torch module; the engine edits only the standard components",
                    item.name
                )));
            }
            if let PositionSpec::Image(_) = item.position_spec()? {
                return Err(Error::Incompatible(format!(
                    "{}: positions {:?} choose image tokens; the engine runs text models",
                    item.name, item.positions
                )));
            }
            if let Some(tower) = item.tower {
                return Err(Error::Incompatible(format!(
                    "{}: edits the {} of an encoder-decoder; the engine runs decoder-only text models",
                    item.name,
                    tower.name()
                )));
            }
            if item.dim(d) != d {
                return Err(Error::Incompatible(format!(
                    "{}: edits width {}, but the model's states have width {d}",
                    item.name,
                    item.dim(d)
                )));
            }
            let dtype = match item.dtype {
                DType::Float64 => CandleDType::F64,
                _ => CandleDType::F32,
            };
            let tensor = |name: &str| -> Result<Option<Tensor>> {
                let key = format!("{}.{name}", item.name);
                let Some(t) = tensors.get(&key) else {
                    return Ok(None);
                };
                let corrupt = || Error::CorruptCheckpoint {
                    path: dir.to_path_buf(),
                    reason: format!("{key} is not a floating-point tensor"),
                };
                let shape = t.shape.as_slice();
                // float64 values are read as they are; half-precision ones
                // become float32 exactly.
                let values = if t.dtype == DType::Float64 {
                    let values: Vec<f64> = t
                        .data
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
                        .collect();
                    Tensor::from_vec(values, shape, &Device::Cpu)?
                } else {
                    Tensor::from_vec(t.to_f32().ok_or_else(corrupt)?, shape, &Device::Cpu)?
                };
                Ok(Some(values.to_dtype(dtype)?))
            };
            let kind = item.intervention_type()?;
            let basis = if kind.has_rotation() {
                tensor("rotation")?
            } else {
                tensor("projection_weight")?
            };
            // α v, in the compute dtype as torch computes it.
            let vector = match tensor("vector")? {
                Some(v) => Some(v.affine(item.alpha, 0.0)?),
                None => None,
            };
            interventions.push(Intervention {
                dtype,
                config: item.clone(),
                kind,
                spec: item.position_spec()?,
                activation: SourceActivation::from_name(&item.activation)?,
                basis,
                weight: tensor("weight")?,
                bias: tensor("bias")?,
                projection_bias: tensor("projection_bias")?,
                scale: tensor("scale")?,
                vector,
            });
            sites.insert((item.layer, item.component));
        }
        Ok(EditSet {
            interventions,
            sites,
            config,
        })
    }
}

/// One sequence's share of a forward call, as the edits see it.
#[derive(Clone, Copy)]
pub(crate) struct Span<'a> {
    /// The interventions the sequence runs with, if any.
    pub(crate) set: Option<&'a EditSet>,
    /// Its first row among the call's tokens.
    pub(crate) first_row: usize,
    /// Its number of rows (tokens) in the call.
    pub(crate) tokens: usize,
    /// The rows are the whole prompt; else they are generated tokens fed
    /// back while decoding.
    pub(crate) prompt: bool,
    /// Generated tokens are edited too (by the position-based interventions).
    pub(crate) on_generated: bool,
    /// The edit strength α: each edited state becomes h + α·(Φ(h) − h).
    pub(crate) strength: f32,
}

/// The rows each intervention of a checkpoint changes in a call (`None`:
/// no rows; `Some(None)`: every row of the call).
type Rows = Vec<Option<Option<Tensor>>>;

/// The edits of one forward call over a ragged batch whose sequences may
/// each run with a different checkpoint: which rows each intervention of
/// each checkpoint changes.
pub(crate) struct BatchEdits<'a> {
    /// Each checkpoint and strength in the call, with the rows of each of
    /// its interventions (`None`: no rows; `Some(None)`: every row of the call).
    groups: Vec<(&'a EditSet, f32, Rows)>,
    sites: HashSet<(usize, Component)>,
}

impl<'a> BatchEdits<'a> {
    pub(crate) fn new(spans: &[Span<'a>]) -> Result<Self> {
        let rows = spans
            .iter()
            .map(|s| s.first_row + s.tokens)
            .max()
            .unwrap_or(0);
        let mut chosen: Vec<(&'a EditSet, f32, Vec<Vec<u32>>)> = Vec::new();
        // Positions of a prompt, one locate call per (spec, sharing, length).
        let mut located: HashMap<(String, bool, bool, usize), crate::positions::Locations> =
            HashMap::new();
        for span in spans {
            let Some(set) = span.set else { continue };
            if !span.strength.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "the edit strength must be a finite number, found {}",
                    span.strength
                )));
            }
            if span.strength == 0.0 {
                continue; // the base model's states, exactly
            }
            let slot = match chosen.iter().position(|(s, strength, _)| {
                std::ptr::eq(*s, set) && strength.to_bits() == span.strength.to_bits()
            }) {
                Some(slot) => slot,
                None => {
                    chosen.push((
                        set,
                        span.strength,
                        vec![Vec::new(); set.interventions.len()],
                    ));
                    chosen.len() - 1
                }
            };
            let all = span.first_row as u32..(span.first_row + span.tokens) as u32;
            for (index, item) in set.interventions.iter().enumerate() {
                let out = &mut chosen[slot].2[index];
                if item.every_token() || (!span.prompt && span.on_generated) {
                    out.extend(all.clone());
                    continue;
                }
                if !span.prompt {
                    continue;
                }
                let key = (
                    item.config.positions.clone(),
                    item.config.share_weights,
                    item.config.include_last,
                    span.tokens,
                );
                if !located.contains_key(&key) {
                    let options = LocateOptions {
                        share_weights: item.config.share_weights,
                        include_last: item.config.include_last,
                        padding_side: PaddingSide::Left,
                        padded_length: Some(span.tokens),
                        parallel: false,
                    };
                    let lengths = [span.tokens as i64];
                    located.insert(key.clone(), locate(&lengths, None, &item.spec, &options)?);
                }
                for &p in located[&key].row(item.config.group, 0) {
                    if p != MASKED {
                        out.push((span.first_row + p as usize) as u32);
                    }
                }
            }
        }
        let mut groups = Vec::with_capacity(chosen.len());
        let mut sites = HashSet::new();
        for (set, strength, lists) in chosen {
            sites.extend(set.sites.iter().copied());
            let tensors = lists
                .into_iter()
                .map(|list| -> Result<Option<Option<Tensor>>> {
                    let n = list.len();
                    Ok(if n == 0 {
                        None
                    } else if n == rows && list.iter().enumerate().all(|(i, &r)| r as usize == i) {
                        Some(None)
                    } else {
                        Some(Some(Tensor::from_vec(list, n, &Device::Cpu)?))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            groups.push((set, strength, tensors));
        }
        Ok(BatchEdits { groups, sites })
    }
}

impl EditSite for BatchEdits<'_> {
    fn wants(&self, layer: usize, component: Component) -> bool {
        self.sites.contains(&(layer, component))
    }

    fn apply(&self, layer: usize, component: Component, mut hidden: Tensor) -> Result<Tensor> {
        for (set, strength, rows) in &self.groups {
            let scale = |delta: Tensor| -> Result<Tensor> {
                Ok(if *strength == 1.0 {
                    delta
                } else {
                    delta.affine(*strength as f64, 0.0)?
                })
            };
            for (item, rows) in set.interventions.iter().zip(rows) {
                if item.config.layer != layer || item.config.component != component {
                    continue;
                }
                match rows {
                    None => {}
                    Some(None) if *strength == 1.0 => hidden = item.apply_all(&hidden)?,
                    Some(None) => hidden = hidden.add(&scale(item.delta(&hidden)?)?)?,
                    Some(Some(rows)) => {
                        let chosen = hidden.index_select(rows, 0)?;
                        hidden = hidden.index_add(rows, &scale(item.delta(&chosen)?)?, 0)?;
                    }
                }
            }
        }
        Ok(hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::SourceActivation;
    use crate::config::ACTIVATIONS;

    #[test]
    fn every_activation_of_the_schema_runs_in_the_engine() {
        for name in ACTIVATIONS {
            assert!(SourceActivation::from_name(name).is_ok(), "{name}");
        }
    }
}
