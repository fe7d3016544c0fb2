//! The contents of `reft_config.json`: what a checkpoint holds and how to
//! rebuild each intervention exactly.
//!
//! Every intervention records its type, placement (layer, component,
//! positions, position group), shapes (rank, embedding size), options
//! (activation, dropout, bias flags, steering scale) and parameter dtype.
//! [`InterventionConfig::parameters`] derives from these the tensors the
//! checkpoint must hold, so a tensor file can be checked against its config.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::positions::PositionSpec;

/// The checkpoint format this build writes, and the newest it reads.
///
/// * 1: the first format.
/// * 2: interventions record `include_last` (whether the last prompt token
///   may be chosen). Version 1 files lack it and read as `true`, the rule
///   every version-1 writer used.
pub const FORMAT_VERSION: u64 = 2;

/// The version of reft_rs, recorded in every checkpoint it writes.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The kinds of intervention (SPEC section 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InterventionType {
    /// `h + Rᵀ(act(Wh + b) − Rh)`, R with orthonormal rows.
    LoReft,
    /// `h + W₂ᵀ(act(W₁h + b₁) − (W₂h + b₂))`, no orthogonality.
    NoReft,
    /// `h + Rᵀ act(Wh + b)`, R with orthonormal rows.
    DiReft,
    /// `h + W₂ᵀ act(W₁h + b₁)`, no orthogonality (the paper's DiReFT).
    NoDiReft,
    /// `h + Rᵀ(b − Rh)`.
    ConsReft,
    /// `h + Rᵀ b`.
    LoBiReft,
    /// `s ⊙ h + b` (Representation EDiting).
    Red,
    /// `h + α v`, a steering vector.
    Steer,
}

impl InterventionType {
    /// Every type, in the order the spec lists them.
    pub const ALL: [InterventionType; 8] = [
        InterventionType::LoReft,
        InterventionType::NoReft,
        InterventionType::DiReft,
        InterventionType::NoDiReft,
        InterventionType::ConsReft,
        InterventionType::LoBiReft,
        InterventionType::Red,
        InterventionType::Steer,
    ];

    /// The name used in configs (`loreft`, `noreft`, ...).
    pub fn name(self) -> &'static str {
        match self {
            InterventionType::LoReft => "loreft",
            InterventionType::NoReft => "noreft",
            InterventionType::DiReft => "direft",
            InterventionType::NoDiReft => "nodireft",
            InterventionType::ConsReft => "consreft",
            InterventionType::LoBiReft => "lobireft",
            InterventionType::Red => "red",
            InterventionType::Steer => "steer",
        }
    }

    /// Whether this type has a low-rank dimension.
    pub fn is_low_rank(self) -> bool {
        !matches!(self, InterventionType::Red | InterventionType::Steer)
    }

    /// Whether this type has the orthonormal R.
    pub fn has_rotation(self) -> bool {
        matches!(
            self,
            InterventionType::LoReft
                | InterventionType::DiReft
                | InterventionType::ConsReft
                | InterventionType::LoBiReft
        )
    }

    /// Whether this type has the learned source `act(Wh + b)`.
    pub fn has_source(self) -> bool {
        matches!(
            self,
            InterventionType::LoReft
                | InterventionType::NoReft
                | InterventionType::DiReft
                | InterventionType::NoDiReft
        )
    }

    /// Whether this type has the non-orthogonal projection W₂ (`noreft`,
    /// `nodireft`).
    pub fn has_projection(self) -> bool {
        matches!(self, InterventionType::NoReft | InterventionType::NoDiReft)
    }

    /// The position spec an intervention of this type gets when none is
    /// given: the last prompt token for the low-rank types, every token for
    /// `red` and `steer`.
    pub fn default_positions(self) -> &'static str {
        if self.is_low_rank() {
            "l1"
        } else {
            "all"
        }
    }

    /// The parameters of this type with the given bias flags, in checkpoint
    /// order: `(name, shape)` with each extent the rank r or the width d.
    ///
    /// `bias` may be turned off only for the types with a learned source;
    /// `projection_bias` exists only for `noreft`. The flags are taken as
    /// given here; [`InterventionConfig::check`] refuses impossible ones.
    pub fn parameter_layout(
        self,
        bias: bool,
        projection_bias: bool,
    ) -> Vec<(&'static str, Vec<Extent>)> {
        use Extent::{Rank, Width};
        let mut layout = Vec::new();
        match self {
            InterventionType::Red => {
                layout.push(("scale", vec![Width]));
                layout.push(("bias", vec![Width]));
            }
            InterventionType::Steer => layout.push(("vector", vec![Width])),
            _ => {
                if self.has_rotation() {
                    layout.push(("rotation", vec![Rank, Width]));
                }
                if self.has_source() {
                    layout.push(("weight", vec![Rank, Width]));
                }
                if bias || !self.has_source() {
                    layout.push(("bias", vec![Rank]));
                }
                if self.has_projection() {
                    layout.push(("projection_weight", vec![Rank, Width]));
                }
                if projection_bias && self == InterventionType::NoReft {
                    layout.push(("projection_bias", vec![Rank]));
                }
            }
        }
        layout
    }

    fn known_names() -> String {
        InterventionType::ALL.map(|t| t.name()).join(", ")
    }
}

/// One extent of a parameter's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// The rank r (`low_rank_dimension`).
    Rank,
    /// The width d of the edited state.
    Width,
}

impl Extent {
    /// `"rank"` or `"width"`.
    pub fn name(self) -> &'static str {
        match self {
            Extent::Rank => "rank",
            Extent::Width => "width",
        }
    }
}

impl fmt::Display for InterventionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for InterventionType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        InterventionType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| Error::UnknownInterventionType {
                path: None,
                name: s.to_string(),
                known: InterventionType::known_names(),
            })
    }
}

/// Where in a layer an intervention reads and writes the hidden state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The residual stream after the layer.
    BlockOutput,
    /// The residual stream entering the layer.
    BlockInput,
    /// The output of the layer's feed-forward block.
    MlpOutput,
    /// The output of the layer's attention block.
    AttentionOutput,
    /// The output of a decoder layer's attention over the encoder's states
    /// (encoder-decoder models only).
    CrossAttentionOutput,
}

impl Component {
    /// Every component, in the order the spec lists them.
    pub const ALL: [Component; 5] = [
        Component::BlockOutput,
        Component::BlockInput,
        Component::MlpOutput,
        Component::AttentionOutput,
        Component::CrossAttentionOutput,
    ];

    /// The name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            Component::BlockOutput => "block_output",
            Component::BlockInput => "block_input",
            Component::MlpOutput => "mlp_output",
            Component::AttentionOutput => "attention_output",
            Component::CrossAttentionOutput => "cross_attention_output",
        }
    }
}

/// Which stack of layers of a model an intervention's layer index counts in,
/// for models with more than one (encoder-decoders, vision-language
/// models). Absent for a model's one stack of layers (a decoder-only or
/// encoder-only model) and for a vision-language model's language model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tower {
    /// The encoder of an encoder-decoder: it reads the whole input once.
    Encoder,
    /// The decoder of an encoder-decoder: it reads the tokens being
    /// generated (and the encoder's states through cross-attention).
    Decoder,
    /// The vision encoder of a vision-language model: it reads the images'
    /// patches (every patch is edited: positions `all`).
    Vision,
    /// A vision-language model's projector, which turns the vision
    /// encoder's states into the language model's image tokens: one
    /// "layer" (0) whose `block_output` is the projected image features.
    Projector,
}

impl Tower {
    /// Every tower, in the order the spec lists them.
    pub const ALL: [Tower; 4] = [
        Tower::Encoder,
        Tower::Decoder,
        Tower::Vision,
        Tower::Projector,
    ];

    /// The name used in configs (and as a component's prefix,
    /// `encoder.block_output`).
    pub fn name(self) -> &'static str {
        match self {
            Tower::Encoder => "encoder",
            Tower::Decoder => "decoder",
            Tower::Vision => "vision",
            Tower::Projector => "projector",
        }
    }

    fn parse(name: &str) -> Option<Tower> {
        Tower::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Element types of checkpoint tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// IEEE float32.
    Float32,
    /// IEEE float16.
    Float16,
    /// bfloat16.
    Bfloat16,
    /// IEEE float64.
    Float64,
    /// Signed 64-bit integers (extra tensors only).
    Int64,
    /// Signed 32-bit integers (extra tensors only).
    Int32,
    /// Unsigned bytes (extra tensors only).
    Uint8,
    /// Booleans, one byte each (extra tensors only).
    Bool,
}

impl DType {
    /// The dtypes intervention parameters may have.
    pub const PARAMETER: [DType; 4] = [
        DType::Float32,
        DType::Float16,
        DType::Bfloat16,
        DType::Float64,
    ];

    /// Every dtype a checkpoint tensor may have (extra tensors included).
    pub const ALL: [DType; 8] = [
        DType::Float32,
        DType::Float16,
        DType::Bfloat16,
        DType::Float64,
        DType::Int64,
        DType::Int32,
        DType::Uint8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Float64 | DType::Int64 => 8,
            DType::Float32 | DType::Int32 => 4,
            DType::Float16 | DType::Bfloat16 => 2,
            DType::Uint8 | DType::Bool => 1,
        }
    }

    /// The numpy-style name (`float32`, `bfloat16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Float16 => "float16",
            DType::Bfloat16 => "bfloat16",
            DType::Float64 => "float64",
            DType::Int64 => "int64",
            DType::Int32 => "int32",
            DType::Uint8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Whether intervention parameters may have this type.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::Float32 | DType::Float16 | DType::Bfloat16 | DType::Float64
        )
    }

    pub(crate) fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::Float32 => safetensors::Dtype::F32,
            DType::Float16 => safetensors::Dtype::F16,
            DType::Bfloat16 => safetensors::Dtype::BF16,
            DType::Float64 => safetensors::Dtype::F64,
            DType::Int64 => safetensors::Dtype::I64,
            DType::Int32 => safetensors::Dtype::I32,
            DType::Uint8 => safetensors::Dtype::U8,
            DType::Bool => safetensors::Dtype::BOOL,
        }
    }

    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        Some(match dtype {
            safetensors::Dtype::F32 => DType::Float32,
            safetensors::Dtype::F16 => DType::Float16,
            safetensors::Dtype::BF16 => DType::Bfloat16,
            safetensors::Dtype::F64 => DType::Float64,
            safetensors::Dtype::I64 => DType::Int64,
            safetensors::Dtype::I32 => DType::Int32,
            safetensors::Dtype::U8 => DType::Uint8,
            safetensors::Dtype::BOOL => DType::Bool,
            _ => return None,
        })
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            Error::InvalidConfig {
                path: None,
                reason: format!(
                    "unknown dtype {s:?} (known: {})",
                    DType::ALL.map(DType::name).join(", ")
                ),
            }
        })
    }
}

/// Activations an intervention may apply to its learned source.
pub const ACTIVATIONS: [&str; 7] = [
    "identity",
    "relu",
    "gelu",
    "gelu_tanh",
    "silu",
    "tanh",
    "sigmoid",
];

/// The model an intervention set was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseModel {
    /// Hub id or path the model was loaded from.
    pub name_or_path: String,
    /// `config.model_type` of the model (`llama`, `gpt2`, ...).
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer layers (of the encoder, in an encoder-decoder).
    pub num_hidden_layers: usize,
    /// Number of decoder layers of an encoder-decoder, when it differs from
    /// or is recorded beside `num_hidden_layers`; absent for other models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_decoder_layers: Option<usize>,
    /// Number of layers of a vision-language model's vision encoder (its
    /// language model's are `num_hidden_layers`); absent for other models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_vision_layers: Option<usize>,
}

impl BaseModel {
    /// How many layers the stack `tower` has (`None`: the model's one stack,
    /// an encoder's, or a vision-language model's language model).
    pub fn layers_of(&self, tower: Option<Tower>) -> usize {
        match tower {
            Some(Tower::Decoder) => self.num_decoder_layers.unwrap_or(self.num_hidden_layers),
            Some(Tower::Vision) => self.num_vision_layers.unwrap_or(self.num_hidden_layers),
            Some(Tower::Projector) => 1,
            _ => self.num_hidden_layers,
        }
    }
}

fn default_dtype() -> DType {
    DType::Float32
}
fn default_activation() -> String {
    "identity".into()
}
fn default_true() -> bool {
    true
}
fn default_alpha() -> f64 {
    1.0
}
fn is_false(value: &bool) -> bool {
    !*value
}

/// One intervention: everything needed to rebuild it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterventionConfig {
    /// Unique name; its tensors are stored as `{name}.{parameter}`.
    pub name: String,
    /// Intervention type name (`loreft`, `red`, ...); see [`InterventionType`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Layer index, counted from 0.
    pub layer: usize,
    /// Which hidden state of the layer.
    pub component: Component,
    /// Which stack `layer` counts in, for encoder-decoders; `None` for a
    /// model with one stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tower: Option<Tower>,
    /// Dotted path of the module to hook when the component cannot be found
    /// by the model family's layout; `None` for the standard layouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_path: Option<String>,
    /// Position spec string (`f7+l7`, `all`, ...).
    pub positions: String,
    /// Whether prefix and suffix positions share this intervention.
    #[serde(default)]
    pub share_weights: bool,
    /// Which group of the locations array this intervention reads (0: prefix
    /// or shared, 1: suffix).
    #[serde(default)]
    pub group: usize,
    /// Rank r of the low-rank types; `None` for `red` and `steer`.
    #[serde(default)]
    pub low_rank_dimension: Option<usize>,
    /// Width d of the hidden state edited; defaults to the model's hidden size.
    #[serde(default)]
    pub embed_dim: Option<usize>,
    /// Activation applied to the learned source.
    #[serde(default = "default_activation")]
    pub activation: String,
    /// Dropout probability applied to the edited state during training.
    #[serde(default)]
    pub dropout: f64,
    /// Parameter dtype.
    #[serde(default = "default_dtype")]
    pub dtype: DType,
    /// Whether the learned source `Wh + b` has its bias b.
    #[serde(default = "default_true")]
    pub bias: bool,
    /// `noreft` only: whether the projection `W₂h + b₂` has its bias b₂.
    #[serde(default, skip_serializing_if = "is_false")]
    pub projection_bias: bool,
    /// `steer` only: the scale α of the steering vector.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Whether the parameters were trained (false for a fixed steering vector).
    #[serde(default = "default_true")]
    pub trainable: bool,
    /// Whether the last prompt token may be chosen by the position spec
    /// (`true`, the ReFT paper's scripts) or is left out (`false`, pyreft's
    /// library datasets). Training data and inference follow the same rule.
    /// Absent from format-1 checkpoints, which all used `true`.
    #[serde(default = "default_true")]
    pub include_last: bool,
}

/// A tensor a checkpoint must hold: its key, dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterSpec {
    /// `{intervention name}.{parameter}`.
    pub key: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl InterventionConfig {
    /// The parsed intervention type.
    pub fn intervention_type(&self) -> Result<InterventionType> {
        self.kind.parse()
    }

    /// The parsed position spec.
    pub fn position_spec(&self) -> Result<PositionSpec> {
        self.positions.parse()
    }

    /// Width of the edited hidden state for a model of the given hidden size.
    pub fn dim(&self, hidden_size: usize) -> usize {
        self.embed_dim.unwrap_or(hidden_size)
    }

    /// The tensors this intervention stores, with their shapes.
    ///
    /// Names: `rotation` (R, `[r, d]`, orthonormal rows), `weight` / `bias`
    /// (W `[r, d]`, b `[r]`), `projection_weight` / `projection_bias` (W₂,
    /// b₂ of the non-orthogonal types), `scale` / `bias` of `red` (`[d]`),
    /// `vector` of `steer` (`[d]`); see [`InterventionType::parameter_layout`].
    pub fn parameters(&self, hidden_size: usize) -> Result<Vec<ParameterSpec>> {
        let kind = self.intervention_type()?;
        let d = self.dim(hidden_size);
        let r = self.low_rank_dimension.unwrap_or(0);
        Ok(kind
            .parameter_layout(self.bias, self.projection_bias)
            .into_iter()
            .map(|(parameter, extents)| ParameterSpec {
                key: format!("{}.{}", self.name, parameter),
                dtype: self.dtype,
                shape: extents
                    .iter()
                    .map(|e| match e {
                        Extent::Rank => r,
                        Extent::Width => d,
                    })
                    .collect(),
            })
            .collect())
    }

    /// Number of trainable values, counted as the ReFT paper counts them.
    pub fn parameter_count(&self, hidden_size: usize) -> Result<usize> {
        Ok(self
            .parameters(hidden_size)?
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum())
    }

    /// Checks everything the intervention says on its own, with no model:
    /// its name, type, position spec and group, rank, activation, dropout,
    /// dtype and flags. The verdict of every path (building a config in
    /// Python, saving, loading, the engine) comes from here.
    ///
    /// Errors are [`Error::InvalidIntervention`] (or
    /// [`Error::UnknownInterventionType`]) naming the field.
    pub fn check(&self) -> Result<()> {
        self.problems().map_err(ConfigProblem::into_error)
    }

    fn problems(&self) -> std::result::Result<(), ConfigProblem> {
        check_name(&self.name).map_err(ConfigProblem::Invalid)?;
        let kind = self
            .intervention_type()
            .map_err(|_| ConfigProblem::UnknownType(self.kind.clone()))?;
        let invalid = |reason: String| Err(ConfigProblem::Invalid(reason));
        if let Some(path) = &self.module_path {
            if path.trim().is_empty() {
                return invalid("module_path is empty".into());
            }
        }
        let spec = self
            .position_spec()
            .map_err(|e| ConfigProblem::Invalid(format!("positions: {e}")))?;
        let groups = spec.group_count(self.share_weights);
        if self.group >= groups {
            return invalid(format!(
                "group {} does not exist: positions {:?} with share_weights={} give {groups} group(s)",
                self.group, self.positions, self.share_weights
            ));
        }
        if !self.include_last && matches!(spec, PositionSpec::All) {
            return invalid(
                "include_last=false has no meaning with positions \"all\" (every token is edited)"
                    .into(),
            );
        }
        if matches!(self.tower, Some(Tower::Vision | Tower::Projector))
            && !matches!(spec, PositionSpec::All)
        {
            return invalid(format!(
                "an intervention on the {} edits every image feature: positions \"all\", not {:?} \
                 (to edit image tokens in the language model, use positions \"image\" there)",
                self.tower.map_or("", Tower::name),
                self.positions
            ));
        }
        if matches!(spec, PositionSpec::Image(_)) && self.tower.is_some() {
            return invalid(format!(
                "positions {:?} choose a vision-language model's image tokens, which only its language \
                 model reads; leave tower unset (not {:?})",
                self.positions,
                self.tower.map_or("", Tower::name)
            ));
        }
        if self.tower == Some(Tower::Projector)
            && (self.layer != 0 || self.component != Component::BlockOutput)
        {
            return invalid(format!(
                "the projector is one step: layer 0, component block_output (its output), not layer {} {}",
                self.layer,
                self.component.name()
            ));
        }
        if self.component == Component::CrossAttentionOutput && self.tower != Some(Tower::Decoder) {
            return invalid(
                "cross_attention_output is a decoder component of an encoder-decoder; \
                 set tower=\"decoder\" (or component=\"decoder.cross_attention_output\")"
                    .into(),
            );
        }
        if self.embed_dim == Some(0) {
            return invalid("embed_dim must be at least 1".into());
        }
        match (kind.is_low_rank(), self.low_rank_dimension) {
            (true, None) | (true, Some(0)) => {
                return invalid(format!(
                    "{kind} needs low_rank_dimension, a positive integer"
                ))
            }
            (false, Some(_)) => {
                return invalid(format!("{kind} has no low_rank_dimension; leave it null"))
            }
            _ => {}
        }
        if !ACTIVATIONS.contains(&self.activation.as_str()) {
            return invalid(format!(
                "unknown activation {:?} (known: {})",
                self.activation,
                ACTIVATIONS.join(", ")
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return invalid(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if !self.dtype.is_float() {
            return invalid(format!(
                "dtype {} is not a floating-point type (known: {})",
                self.dtype.name(),
                DType::PARAMETER.map(DType::name).join(", ")
            ));
        }
        if !self.bias && !kind.has_source() {
            return invalid(format!(
                "{kind} always has its bias; bias=false is not possible"
            ));
        }
        if self.projection_bias && kind != InterventionType::NoReft {
            return invalid(format!(
                "projection_bias applies to noreft only, not {kind}"
            ));
        }
        if !self.alpha.is_finite() {
            return invalid(format!("alpha {} is not finite", self.alpha));
        }
        Ok(())
    }

    /// Checks the intervention against a model of `num_hidden_layers` layers
    /// whose edited states are `width` wide: the layer exists and the rank
    /// fits. See [`check_placement`].
    pub fn check_placement(&self, width: usize, num_hidden_layers: usize) -> Result<()> {
        check_placement(
            self.layer,
            self.low_rank_dimension,
            width,
            num_hidden_layers,
        )
        .map_err(Error::InvalidIntervention)
    }

    fn validate(&self, index: usize, base: &BaseModel) -> std::result::Result<(), ConfigProblem> {
        let at = |problem: ConfigProblem| match problem {
            ConfigProblem::Invalid(reason) => ConfigProblem::Invalid(format!(
                "interventions[{index}] ({:?}): {reason}",
                self.name
            )),
            other => other,
        };
        self.problems().map_err(at)?;
        check_placement(
            self.layer,
            self.low_rank_dimension,
            self.dim(base.hidden_size),
            base.layers_of(self.tower),
        )
        .map_err(|reason| at(ConfigProblem::Invalid(reason)))
    }
}

/// The name rule of interventions: non-empty, ASCII letters, digits, `_`
/// and `-` only (names become tensor keys `{name}.{parameter}` and file-safe
/// labels).
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "name {name:?} must be non-empty and use only ASCII letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks that an intervention at `layer` with rank `rank` fits a model of
/// `num_hidden_layers` layers whose edited states are `width` wide.
pub fn check_placement(
    layer: usize,
    rank: Option<usize>,
    width: usize,
    num_hidden_layers: usize,
) -> std::result::Result<(), String> {
    if layer >= num_hidden_layers {
        return Err(format!(
            "layer {layer} does not exist: the model has {num_hidden_layers} layers (0..{})",
            num_hidden_layers.saturating_sub(1)
        ));
    }
    if width == 0 {
        return Err("the edited states have width 0".into());
    }
    if let Some(r) = rank {
        if r > width {
            return Err(format!(
                "low_rank_dimension {r} must be between 1 and the hidden size {width}"
            ));
        }
    }
    Ok(())
}

/// Checks an intervention as a user writes it, before it has a name or a
/// position group: a JSON object with the fields of [`InterventionConfig`],
/// where `name`, `group` and `positions` may be missing or null (and
/// `type` and `component` default to `loreft` and `block_output`).
///
/// Returns the object with every default filled in: `positions` by type
/// ([`InterventionType::default_positions`]) and in canonical form (a list of
/// indices becomes `"0,2,-1"`); `name` and `group` stay null when they were.
/// Errors name the field at fault ([`Error::InvalidIntervention`]).
pub fn normalize_intervention(value: serde_json::Value) -> Result<serde_json::Value> {
    let serde_json::Value::Object(mut object) = value else {
        return Err(Error::InvalidIntervention(
            "an intervention is a JSON object".into(),
        ));
    };
    let kind: InterventionType = match object.get("type") {
        None | Some(serde_json::Value::Null) => InterventionType::LoReft,
        Some(serde_json::Value::String(name)) => name.parse().map_err(|_| {
            Error::InvalidIntervention(format!(
                "unknown intervention type {name:?} (known: {})",
                InterventionType::known_names()
            ))
        })?,
        Some(other) => {
            return Err(Error::InvalidIntervention(format!(
                "type must be a string, found {other}"
            )))
        }
    };
    object.insert("type".into(), kind.name().into());
    // A vision tower or a projector edits every image feature, whatever the
    // type's usual default.
    let tower = object.get("tower").and_then(|t| t.as_str());
    let prefix = object
        .get("component")
        .and_then(|c| c.as_str())
        .and_then(|c| c.split_once('.'))
        .map(|(prefix, _)| prefix);
    let vision = [Tower::Vision.name(), Tower::Projector.name()]
        .iter()
        .any(|name| tower == Some(*name) || prefix == Some(*name));
    let positions = match object.remove("positions") {
        None | Some(serde_json::Value::Null) if vision => "all".to_string(),
        None | Some(serde_json::Value::Null) => kind.default_positions().to_string(),
        Some(serde_json::Value::String(text)) => text,
        Some(serde_json::Value::Array(items)) => {
            let mut indices = Vec::with_capacity(items.len());
            for item in &items {
                match item.as_i64() {
                    Some(i) if item.is_i64() || item.is_u64() => indices.push(i),
                    _ => {
                        return Err(Error::InvalidIntervention(format!(
                            "positions: a list of positions holds integers, found {item}"
                        )))
                    }
                }
            }
            PositionSpec::Indices(indices).to_string()
        }
        Some(other) => {
            return Err(Error::InvalidIntervention(format!(
                "positions must be a spec string or a list of integers, found {other}"
            )))
        }
    };
    let spec: PositionSpec = positions
        .parse()
        .map_err(|e: Error| Error::InvalidIntervention(format!("positions: {e}")))?;
    object.insert("positions".into(), spec.to_string().into());
    let unnamed = matches!(object.get("name"), None | Some(serde_json::Value::Null));
    let ungrouped = matches!(object.get("group"), None | Some(serde_json::Value::Null));
    match object.get("component") {
        None | Some(serde_json::Value::Null) => {
            object.insert("component".into(), Component::BlockOutput.name().into());
        }
        Some(serde_json::Value::String(text)) if text.contains('.') => {
            // `encoder.block_output`: the tower as the component's prefix.
            let (prefix, component) = text.split_once('.').unwrap_or_default();
            let Some(tower) = Tower::parse(prefix) else {
                return Err(Error::InvalidIntervention(format!(
                    "component {text:?}: {prefix:?} is not a tower (known: {})",
                    Tower::ALL.map(Tower::name).join(", ")
                )));
            };
            match object.get("tower") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(named)) if named == tower.name() => {}
                Some(other) => {
                    return Err(Error::InvalidIntervention(format!(
                        "component {text:?} names the {prefix} but tower is {other}"
                    )))
                }
            }
            let component = component.to_string();
            object.insert("tower".into(), tower.name().into());
            object.insert("component".into(), component.into());
        }
        Some(_) => {}
    }
    if unnamed {
        object.insert("name".into(), "unnamed".into());
    }
    if ungrouped {
        object.insert("group".into(), 0.into());
    }
    let config: InterventionConfig =
        serde_path_to_error::deserialize(serde_json::Value::Object(object))
            .map_err(|e| Error::InvalidIntervention(field_error(&e)))?;
    config.check()?;
    let mut out = serde_json::to_value(&config).expect("a config always serialises");
    if let serde_json::Value::Object(map) = &mut out {
        if unnamed {
            map.insert("name".into(), serde_json::Value::Null);
        }
        if ungrouped {
            map.insert("group".into(), serde_json::Value::Null);
        }
    }
    Ok(out)
}

/// A serde error with the path of the field it concerns
/// (`interventions[2].layer: invalid type: ...`).
fn field_error(error: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = error.path().to_string();
    let inner = error.inner().to_string();
    // serde_json appends a position that means nothing for a Value.
    let inner = inner
        .split(" at line ")
        .next()
        .unwrap_or(&inner)
        .to_string();
    if path == "." || path.is_empty() {
        inner
    } else {
        format!("{path}: {inner}")
    }
}

impl BaseModel {
    /// Whether interventions trained on this model apply to another one with
    /// the given hidden size, layer count and `model_type` (each `None` when
    /// that model does not say).
    ///
    /// `inferred`: the layer count is only a lower bound (converted
    /// checkpoints that did not know their model), so a deeper model fits.
    /// Hidden size and layer count must always agree; a different
    /// `model_type` is refused when `strict`, else returned as a warning.
    /// `source` names the checkpoint in the messages.
    ///
    /// Returns the warnings, or [`Error::Incompatible`].
    pub fn check_fits(
        &self,
        source: &str,
        inferred: bool,
        hidden_size: Option<usize>,
        num_hidden_layers: Option<usize>,
        model_type: Option<&str>,
        strict: bool,
    ) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        if let Some(hidden) = hidden_size {
            if hidden != self.hidden_size {
                problems.push(format!(
                    "hidden size {} vs the model's {hidden}",
                    self.hidden_size
                ));
            }
        }
        if let Some(layers) = num_hidden_layers {
            let differ = if inferred {
                self.num_hidden_layers > layers
            } else {
                self.num_hidden_layers != layers
            };
            if differ {
                problems.push(format!(
                    "{} layers vs the model's {layers}",
                    self.num_hidden_layers
                ));
            }
        }
        let mut warnings = Vec::new();
        if let Some(other) = model_type.filter(|t| !t.is_empty()) {
            if !self.model_type.is_empty() && self.model_type != other {
                let problem = format!("model type {:?} vs the model's {other:?}", self.model_type);
                if strict {
                    problems.push(format!("{problem} (pass strict=False to load anyway)"));
                } else {
                    warnings.push(format!(
                        "the checkpoint at {source} was trained on a {} model, this is a {other} model",
                        self.model_type
                    ));
                }
            }
        }
        if problems.is_empty() {
            return Ok(warnings);
        }
        let name = if self.name_or_path.is_empty() {
            &self.model_type
        } else {
            &self.name_or_path
        };
        Err(Error::Incompatible(format!(
            "the checkpoint at {source} was trained on {name} and does not fit this model: {}",
            problems.join("; ")
        )))
    }
}

/// Everything in `reft_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReftConfig {
    /// Checkpoint format version ([`FORMAT_VERSION`] when written by this build).
    #[serde(default = "current_format")]
    pub format_version: u64,
    /// Version of reft_rs that wrote the checkpoint.
    #[serde(default = "current_library")]
    pub library_version: String,
    /// Identity of the model the interventions belong to.
    pub base_model: BaseModel,
    /// The interventions, in their application order.
    pub interventions: Vec<InterventionConfig>,
    /// Names of further tensors stored beside the interventions (a
    /// classification head, say); their shapes are not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_tensors: Vec<String>,
    /// Identifies one save; the tensor file carries the same id, so a config
    /// and a tensor file from different saves are never mixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_id: Option<String>,
    /// Free-form information (training settings, ...), kept as is.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

fn current_format() -> u64 {
    FORMAT_VERSION
}
fn current_library() -> String {
    LIBRARY_VERSION.to_string()
}

/// A problem found while checking a config, before it is tied to a file.
enum ConfigProblem {
    Invalid(String),
    UnknownType(String),
}

impl ConfigProblem {
    fn into_error(self) -> Error {
        match self {
            ConfigProblem::Invalid(reason) => Error::InvalidIntervention(reason),
            ConfigProblem::UnknownType(name) => Error::InvalidIntervention(format!(
                "unknown intervention type {name:?} (known: {})",
                InterventionType::known_names()
            )),
        }
    }
}

impl ReftConfig {
    /// Parses and checks a config from JSON text.
    ///
    /// `path` names the file in errors. A `format_version` newer than
    /// [`FORMAT_VERSION`] is refused before anything else is read.
    pub fn from_json(text: &str, path: Option<&Path>) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidConfig {
            path: path.map(Path::to_path_buf),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| invalid("the top level must be a JSON object".into()))?;
        match object.get("format_version") {
            Some(version) => match version.as_u64() {
                Some(found) if found > FORMAT_VERSION => {
                    return Err(Error::UnsupportedFormat {
                        path: path.map(Path::to_path_buf).unwrap_or_default(),
                        found,
                        supported: FORMAT_VERSION,
                    })
                }
                Some(0) | None => {
                    return Err(invalid(format!(
                        "format_version {version} is not a positive integer"
                    )))
                }
                Some(_) => {}
            },
            None if path.is_some() => return Err(invalid("missing field `format_version`".into())),
            None => {}
        }
        let config: ReftConfig =
            serde_path_to_error::deserialize(value).map_err(|e| invalid(field_error(&e)))?;
        config.validate_at(path)?;
        Ok(config)
    }

    /// The config as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Serialising plain data into a string cannot fail.
        serde_json::to_string_pretty(self).expect("a config always serialises")
    }

    /// Checks the config for consistency (unique names, layers within the
    /// model, ranks within the hidden size, known types, ...).
    pub fn validate(&self) -> Result<()> {
        self.validate_at(None)
    }

    fn validate_at(&self, path: Option<&Path>) -> Result<()> {
        let path = path.map(Path::to_path_buf);
        let invalid = |reason: String| Error::InvalidConfig {
            path: path.clone(),
            reason,
        };
        let base = &self.base_model;
        if base.hidden_size == 0 || base.num_hidden_layers == 0 {
            return Err(invalid(
                "base_model.hidden_size and num_hidden_layers must be positive".into(),
            ));
        }
        let mut names = BTreeSet::new();
        for (index, intervention) in self.interventions.iter().enumerate() {
            intervention
                .validate(index, base)
                .map_err(|problem| match problem {
                    ConfigProblem::Invalid(reason) => invalid(reason),
                    ConfigProblem::UnknownType(name) => Error::UnknownInterventionType {
                        path: path.clone(),
                        name,
                        known: InterventionType::known_names(),
                    },
                })?;
            if !names.insert(intervention.name.as_str()) {
                return Err(invalid(format!(
                    "two interventions are named {:?}",
                    intervention.name
                )));
            }
        }
        let mut keys = BTreeSet::new();
        for intervention in &self.interventions {
            for parameter in intervention.parameters(base.hidden_size)? {
                keys.insert(parameter.key);
            }
        }
        for extra in &self.extra_tensors {
            if extra.is_empty() || !keys.insert(extra.clone()) {
                return Err(invalid(format!(
                    "extra tensor {extra:?} is empty or clashes with another tensor name"
                )));
            }
        }
        Ok(())
    }

    /// Every tensor the checkpoint must hold for its interventions.
    pub fn parameters(&self) -> Result<Vec<ParameterSpec>> {
        let mut all = Vec::new();
        for intervention in &self.interventions {
            all.extend(intervention.parameters(self.base_model.hidden_size)?);
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_json(intervention: &str) -> String {
        format!(
            r#"{{"format_version": 1, "base_model": {{"name_or_path": "tiny", "model_type": "llama", "hidden_size": 16, "num_hidden_layers": 4}},
                "interventions": [{intervention}]}}"#
        )
    }

    #[test]
    fn loreft_parameters_match_the_paper_count() {
        let config = ReftConfig::from_json(
            &config_json(r#"{"name": "a", "type": "loreft", "layer": 1, "component": "block_output", "positions": "f1+l1", "low_rank_dimension": 4}"#),
            None,
        )
        .unwrap();
        let intervention = &config.interventions[0];
        // 2dr + r
        assert_eq!(intervention.parameter_count(16).unwrap(), 2 * 16 * 4 + 4);
        // the paper's example: r=4, d=4096 -> 32,772
        assert_eq!(intervention.parameter_count(4096).unwrap(), 32_772);
    }

    #[test]
    fn rejects_inconsistent_configs() {
        let cases = [
            (
                r#"{"name": "a", "type": "loreft", "layer": 4, "component": "block_output", "positions": "f1", "low_rank_dimension": 4}"#,
                "layer 4",
            ),
            (
                r#"{"name": "a", "type": "loreft", "layer": 0, "component": "block_output", "positions": "f1"}"#,
                "needs low_rank_dimension",
            ),
            (
                r#"{"name": "a", "type": "red", "layer": 0, "component": "block_output", "positions": "all", "low_rank_dimension": 2}"#,
                "no low_rank_dimension",
            ),
            (
                r#"{"name": "a", "type": "loreft", "layer": 0, "component": "mlp_input", "positions": "f1", "low_rank_dimension": 2}"#,
                "mlp_input",
            ),
            (
                r#"{"name": "a", "type": "loreft", "layer": 0, "component": "block_output", "positions": "f1", "low_rank_dimension": 2, "group": 1}"#,
                "group 1",
            ),
            (
                r#"{"name": "a.b", "type": "loreft", "layer": 0, "component": "block_output", "positions": "f1", "low_rank_dimension": 2}"#,
                "name",
            ),
            (
                r#"{"name": "a", "type": "loreft", "layer": 0, "component": "block_output", "positions": "x1", "low_rank_dimension": 2}"#,
                "x1",
            ),
            (
                r#"{"name": "a", "type": "loreft", "layer": 0, "component": "block_output", "positions": "f1", "low_rank_dimension": 2, "activation": "swish"}"#,
                "swish",
            ),
            (
                r#"{"name": "a", "type": "loreft", "layer": 0, "component": "block_output", "positions": "f1", "low_rank_dimension": 2, "dropuot": 0.1}"#,
                "dropuot",
            ),
        ];
        for (intervention, needle) in cases {
            let err = ReftConfig::from_json(&config_json(intervention), None).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        let err = ReftConfig::from_json(
            &config_json(r#"{"name": "a", "type": "megareft", "layer": 0, "component": "block_output", "positions": "f1"}"#),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::UnknownInterventionType { .. }),
            "{err}"
        );
    }

    #[test]
    fn format_1_configs_read_with_the_last_token_included() {
        let entry = r#"{"name": "a", "type": "loreft", "layer": 1, "component": "block_output", "positions": "l2", "low_rank_dimension": 2}"#;
        let config = ReftConfig::from_json(&config_json(entry), None).unwrap();
        assert!(config.interventions[0].include_last);
        let written = config.to_json();
        assert!(written.contains("\"include_last\": true"), "{written}");
        let excluded = entry.replace("\"l2\"", "\"l2\", \"include_last\": false");
        let config = ReftConfig::from_json(&config_json(&excluded), None).unwrap();
        assert!(!config.interventions[0].include_last);
        let every = entry
            .replace(
                "\"l2\", \"low_rank_dimension\": 2",
                "\"all\", \"include_last\": false",
            )
            .replace("loreft", "red");
        let err = ReftConfig::from_json(&config_json(&every), None).unwrap_err();
        assert!(err.to_string().contains("include_last"), "{err}");
    }

    #[test]
    fn field_errors_name_the_field() {
        let entry = r#"{"name": "a", "type": "loreft", "layer": "1", "component": "block_output", "positions": "l2", "low_rank_dimension": 2}"#;
        let err = ReftConfig::from_json(&config_json(entry), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("interventions[0].layer: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn drafts_are_normalized_with_defaults_by_type() {
        let draft = |text: &str| normalize_intervention(serde_json::from_str(text).unwrap());
        let out = draft(r#"{"layer": 2, "type": "red"}"#).unwrap();
        assert_eq!(out["positions"], "all");
        assert_eq!(out["name"], serde_json::Value::Null);
        assert_eq!(out["group"], serde_json::Value::Null);
        assert_eq!(out["dtype"], "float32");
        let out = draft(r#"{"layer": 2, "low_rank_dimension": 4, "positions": [0, -1]}"#).unwrap();
        assert_eq!(out["positions"], "0,-1");
        assert_eq!(out["type"], "loreft");
        let out = draft(r#"{"layer": 2, "low_rank_dimension": 4, "positions": "f3+l3", "name": "x", "group": 1}"#)
            .unwrap();
        assert_eq!(
            (out["name"].as_str(), out["group"].as_u64()),
            (Some("x"), Some(1))
        );
        let cases = [
            (
                r#"{"layer": 2, "type": "megareft"}"#,
                "unknown intervention type \"megareft\"",
            ),
            (r#"{"layer": 2}"#, "needs low_rank_dimension"),
            (r#"{"layer": -1, "type": "red"}"#, "layer: invalid value"),
            (
                r#"{"layer": 2, "type": "red", "name": "caf\u00e9"}"#,
                "ASCII",
            ),
            (
                r#"{"layer": 2, "type": "red", "dtype": "int64"}"#,
                "not a floating-point type",
            ),
            (
                r#"{"layer": 2, "type": "red", "positions": [1.5]}"#,
                "integers",
            ),
            (
                r#"{"layer": 2, "type": "red", "colour": 1}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"layer": 2, "type": "steer", "bias": false}"#,
                "always has its bias",
            ),
            (
                r#"{"layer": 2, "low_rank_dimension": 2, "positions": "f1", "group": 1}"#,
                "group 1",
            ),
        ];
        for (text, needle) in cases {
            let err = draft(text).unwrap_err();
            assert!(matches!(err, Error::InvalidIntervention(_)), "{err}");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn encoder_decoder_interventions_name_their_tower() {
        let draft = |text: &str| normalize_intervention(serde_json::from_str(text).unwrap());
        // The tower as the component's prefix, or on its own: the same entry.
        let prefixed =
            draft(r#"{"layer": 1, "type": "red", "component": "decoder.cross_attention_output"}"#)
                .unwrap();
        let separate = draft(r#"{"layer": 1, "type": "red", "component": "cross_attention_output", "tower": "decoder"}"#)
            .unwrap();
        assert_eq!(prefixed, separate);
        assert_eq!(
            (prefixed["tower"].as_str(), prefixed["component"].as_str()),
            (Some("decoder"), Some("cross_attention_output"))
        );
        // A decoder-only entry says nothing of towers (old checkpoints read alike).
        let plain = draft(r#"{"layer": 1, "type": "red"}"#).unwrap();
        assert!(plain.get("tower").is_none(), "{plain}");
        let cases = [
            (
                r#"{"layer": 1, "type": "red", "component": "cross_attention_output"}"#,
                "tower=\"decoder\"",
            ),
            (
                r#"{"layer": 1, "type": "red", "component": "cross_attention_output", "tower": "encoder"}"#,
                "decoder component",
            ),
            (
                r#"{"layer": 1, "type": "red", "component": "text.block_output"}"#,
                "not a tower",
            ),
            (
                r#"{"layer": 1, "type": "red", "component": "encoder.block_output", "tower": "decoder"}"#,
                "names the encoder but tower",
            ),
            (
                r#"{"layer": 1, "type": "red", "component": "encoder.mlp_input"}"#,
                "mlp_input",
            ),
            (r#"{"layer": 1, "type": "red", "tower": "middle"}"#, "tower"),
            (
                r#"{"layer": 1, "low_rank_dimension": 2, "tower": "encoder", "positions": "image"}"#,
                "leave tower unset",
            ),
        ];
        for (text, needle) in cases {
            let err = draft(text).unwrap_err();
            assert!(matches!(err, Error::InvalidIntervention(_)), "{err}");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        // A vision tower edits every patch: positions default to all, and
        // nothing else is accepted.
        let vision =
            draft(r#"{"layer": 1, "low_rank_dimension": 2, "component": "vision.block_output"}"#)
                .unwrap();
        assert_eq!(
            (vision["tower"].as_str(), vision["positions"].as_str()),
            (Some("vision"), Some("all"))
        );
        let err =
            draft(r#"{"layer": 1, "low_rank_dimension": 2, "tower": "vision", "positions": "l1"}"#)
                .unwrap_err();
        assert!(err.to_string().contains("every image feature"), "{err}");
        // The projector: one step, its output, every feature.
        let projector =
            draft(r#"{"layer": 0, "type": "red", "component": "projector.block_output"}"#).unwrap();
        assert_eq!(projector["tower"].as_str(), Some("projector"));
        for bad in [
            r#"{"layer": 1, "type": "red", "tower": "projector"}"#,
            r#"{"layer": 0, "type": "red", "tower": "projector", "component": "mlp_output"}"#,
        ] {
            let err = draft(bad).unwrap_err();
            assert!(
                err.to_string().contains("the projector is one step"),
                "{err}"
            );
        }
        // Decoder layers count against the decoder's own depth.
        let config = |layers: &str, entry: &str| {
            format!(
                r#"{{"format_version": 1, "base_model": {{"name_or_path": "t5", "model_type": "t5", "hidden_size": 16, "num_hidden_layers": 2{layers}}},
                "interventions": [{entry}]}}"#
            )
        };
        let deep = r#"{"name": "a", "type": "red", "layer": 3, "component": "block_output", "tower": "decoder", "positions": "all"}"#;
        let read =
            ReftConfig::from_json(&config(r#", "num_decoder_layers": 4"#, deep), None).unwrap();
        assert_eq!(read.interventions[0].tower, Some(Tower::Decoder));
        assert_eq!(read.base_model.layers_of(Some(Tower::Decoder)), 4);
        assert!(read.to_json().contains("\"tower\": \"decoder\""));
        let err = ReftConfig::from_json(&config("", deep), None).unwrap_err();
        assert!(err.to_string().contains("layer 3 does not exist"), "{err}");
        let encoder = deep.replace("decoder", "encoder");
        let err = ReftConfig::from_json(&config(r#", "num_decoder_layers": 4"#, &encoder), None)
            .unwrap_err();
        assert!(err.to_string().contains("the model has 2 layers"), "{err}");
    }

    #[test]
    fn parameter_layouts_follow_the_flags() {
        use InterventionType::*;
        let names = |kind: InterventionType, bias, projection_bias| -> Vec<&str> {
            kind.parameter_layout(bias, projection_bias)
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        };
        assert_eq!(names(LoReft, true, false), ["rotation", "weight", "bias"]);
        assert_eq!(names(LoReft, false, false), ["rotation", "weight"]);
        assert_eq!(
            names(NoReft, true, true),
            ["weight", "bias", "projection_weight", "projection_bias"]
        );
        assert_eq!(
            names(NoDiReft, true, true),
            ["weight", "bias", "projection_weight"]
        );
        assert_eq!(names(ConsReft, false, false), ["rotation", "bias"]);
        assert_eq!(names(Red, true, false), ["scale", "bias"]);
        assert_eq!(names(Steer, true, false), ["vector"]);
    }

    #[test]
    fn base_models_fit_by_size_and_type() {
        let base = BaseModel {
            name_or_path: "tiny".into(),
            model_type: "llama".into(),
            hidden_size: 16,
            num_hidden_layers: 4,
            num_decoder_layers: None,
            num_vision_layers: None,
        };
        assert!(base
            .check_fits("x", false, Some(16), Some(4), Some("llama"), true)
            .unwrap()
            .is_empty());
        assert!(base
            .check_fits("x", false, None, None, None, true)
            .unwrap()
            .is_empty());
        let err = base
            .check_fits("x", false, Some(8), Some(4), None, true)
            .unwrap_err();
        assert!(
            err.to_string().contains("hidden size 16 vs the model's 8"),
            "{err}"
        );
        assert!(base
            .check_fits("x", false, Some(16), Some(6), None, true)
            .is_err());
        assert!(base
            .check_fits("x", true, Some(16), Some(6), None, true)
            .unwrap()
            .is_empty());
        assert!(base
            .check_fits("x", true, Some(16), Some(3), None, true)
            .is_err());
        let err = base
            .check_fits("x", false, Some(16), Some(4), Some("gpt2"), true)
            .unwrap_err();
        assert!(matches!(err, Error::Incompatible(_)), "{err}");
        let warnings = base
            .check_fits("x", false, Some(16), Some(4), Some("gpt2"), false)
            .unwrap();
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn refuses_newer_formats() {
        let text = config_json("").replace("\"format_version\": 1", "\"format_version\": 9");
        let err = ReftConfig::from_json(&text, Some(Path::new("x/reft_config.json"))).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedFormat { found: 9, .. }),
            "{err}"
        );
    }
}
