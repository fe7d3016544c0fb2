//! The layer loop of Llama-style and GPT-2 models, written on candle's
//! tensor operations, with an edit point at every component the
//! interventions may target.
//!
//! States stay two-dimensional, `[tokens, hidden]`, between the layers, so
//! every projection is one matrix product over all the sequences of a call.
//! Batches are ragged, with no padding: each sequence brings its own number
//! of new tokens (a whole prompt, or one token while decoding) and its own
//! key/value cache, and attention runs per sequence over that cache.

use candle_core::{Device, Tensor};

use super::config::{is_gemma, Family, ModelConfig, RopeStyle};
use super::rope;
use super::weights::{with_rows, Fused, Linear, Source};
use crate::config::Component;
use crate::error::{Error, Result};

/// Edits applied at a component of a layer to `[rows, hidden]` states.
pub(crate) trait EditSite {
    /// Whether anything edits `(layer, component)` (skips the call otherwise).
    fn wants(&self, layer: usize, component: Component) -> bool;
    /// The edited states.
    fn apply(&self, layer: usize, component: Component, hidden: Tensor) -> Result<Tensor>;
}

/// Values past which row-wise work (norms, activations) is split over the
/// threads; each row is computed the same way either way.
const PARALLEL_VALUES: usize = 1 << 15;

#[derive(Debug, Clone)]
enum Norm {
    Rms {
        weight: Vec<f32>,
        eps: f64,
    },
    Layer {
        weight: Vec<f32>,
        bias: Vec<f32>,
        eps: f64,
    },
}

impl Norm {
    fn parts(&self) -> (&[f32], Option<&[f32]>, f64) {
        match self {
            Norm::Rms { weight, eps } => (weight, None, *eps),
            Norm::Layer { weight, bias, eps } => (weight, Some(bias), *eps),
        }
    }

    /// The mean (LayerNorm; 0 for RMSNorm) and the inverse deviation of `row`.
    fn stats(&self, row: &[f32]) -> (f32, f32) {
        let (_, bias, eps) = self.parts();
        let k = row.len();
        let mean = match bias {
            Some(_) => row.iter().sum::<f32>() / k as f32,
            None => 0.0,
        };
        let variance = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / k as f32;
        (mean, ((variance as f64 + eps) as f32).sqrt().recip())
    }

    /// The normalised rows of `x`, row after row.
    fn apply(&self, x: &Tensor) -> Result<Vec<f32>> {
        with_rows(x, |xs, _| {
            let k = self.parts().0.len();
            let mut out = vec![0f32; xs.len()];
            let norm = |(row, y): (&[f32], &mut [f32])| {
                y.copy_from_slice(row);
                self.in_place(y);
            };
            if xs.len() >= PARALLEL_VALUES {
                use rayon::prelude::*;
                xs.par_chunks_exact(k)
                    .zip(out.par_chunks_exact_mut(k))
                    .for_each(norm);
            } else {
                xs.chunks_exact(k)
                    .zip(out.chunks_exact_mut(k))
                    .for_each(norm);
            }
            Ok(out)
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.apply(x)?, x.dims2()?, &Device::Cpu)?)
    }

    /// Normalises one row in place.
    fn in_place(&self, row: &mut [f32]) {
        let (mean, inv) = self.stats(row);
        let (weight, bias, _) = self.parts();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = (*v - mean) * inv * w;
        }
        if let Some(b) = bias {
            for (v, &c) in row.iter_mut().zip(b) {
                *v += c;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    Silu,
    GeluTanh,
    GeluErf,
    Relu,
}

impl Activation {
    fn from_name(name: &str) -> Self {
        match name {
            "silu" => Activation::Silu,
            "gelu" => Activation::GeluErf,
            "relu" => Activation::Relu,
            _ => Activation::GeluTanh, // gelu_new, gelu_pytorch_tanh
        }
    }

    /// The activation of one value where it is written with `exp` alone:
    /// SiLU `x / (1 + e^-x)`, ReLU, and the tanh form of GELU, since
    /// `0.5 x (1 + tanh u) = x / (1 + e^-2u)` with `u = √(2/π) (x + 0.044715 x³)`.
    /// The erf form of GELU has none.
    fn of_value(self) -> Option<fn(f32) -> f32> {
        match self {
            Activation::Silu => Some(|g| g / (1.0 + (-g).exp())),
            Activation::Relu => Some(|g| g.max(0.0)),
            Activation::GeluTanh => Some(|g| {
                const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
                let u = SQRT_TWO_OVER_PI * g * (1.0 + 0.044_715 * g * g);
                g / (1.0 + (-2.0 * u).exp())
            }),
            Activation::GeluErf => None,
        }
    }

    /// `act(gate) * up` for rows holding `[gate | up]` side by side, each
    /// `width` values.
    fn gated(self, gate_up: &[f32], width: usize) -> Result<Vec<f32>> {
        let rows = gate_up.len() / (2 * width).max(1);
        if let Some(act) = self.of_value() {
            let mut out = vec![0f32; rows * width];
            let row = |(row, out): (&[f32], &mut [f32])| {
                let (gate, up) = row.split_at(width);
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = act(g) * u;
                }
            };
            if out.len() >= PARALLEL_VALUES {
                use rayon::prelude::*;
                gate_up
                    .par_chunks_exact(2 * width)
                    .zip(out.par_chunks_exact_mut(width))
                    .for_each(row);
            } else {
                gate_up
                    .chunks_exact(2 * width)
                    .zip(out.chunks_exact_mut(width))
                    .for_each(row);
            }
            return Ok(out);
        }
        let both = Tensor::from_slice(gate_up, (rows, 2 * width), &Device::Cpu)?;
        let gate = self.apply(&both.narrow(1, 0, width)?.contiguous()?)?;
        let up = both.narrow(1, width, width)?;
        Ok(gate.mul(&up)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        if let Some(act) = self.of_value() {
            let mut values = x.flatten_all()?.to_vec1::<f32>()?;
            if values.len() >= PARALLEL_VALUES {
                use rayon::prelude::*;
                values
                    .par_chunks_mut(4096)
                    .for_each(|c| c.iter_mut().for_each(|v| *v = act(*v)));
            } else {
                values.iter_mut().for_each(|v| *v = act(*v));
            }
            return Ok(Tensor::from_vec(values, x.shape(), &Device::Cpu)?);
        }
        Ok(x.gelu_erf()?)
    }
}

#[derive(Debug, Clone)]
enum Mlp {
    Gated {
        /// gate and up projections.
        gate_up: Fused,
        down: Linear,
    },
    Plain {
        fc: Linear,
        proj: Linear,
    },
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Norm,
    /// q, k and v projections.
    qkv: Fused,
    /// Per-head norms of the queries and keys (Qwen3, Gemma 3).
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    o: Linear,
    /// The norm on the attention output before it joins the residual (Gemma 2/3).
    post_attn_norm: Option<Norm>,
    mlp_norm: Norm,
    mlp: Mlp,
    /// The norm on the MLP output before it joins the residual (Gemma 2/3).
    post_mlp_norm: Option<Norm>,
    /// Positions attention reaches back, the token itself included.
    window: Option<usize>,
    /// Whether the layer takes the local rotary embedding.
    local_rope: bool,
}

/// Tensor names of a rotary decoder's layer (after the layer prefix).
struct LayerNames {
    prefix: &'static str,
    /// The norm before attention.
    attn_norm: &'static str,
    /// The norm before the MLP: in a Llama layer.
    mlp_norm: &'static str,
    /// With norms after attention and MLP: the norms after attention,
    /// before the MLP and after the MLP.
    sandwich: [&'static str; 3],
    q_norm: &'static str,
    k_norm: &'static str,
    /// q, k, v and o projections.
    attention: [&'static str; 4],
    /// q, k and v in one matrix (Phi-3).
    qkv: &'static str,
    /// gate, up and down projections.
    mlp: [&'static str; 3],
    /// gate and up in one matrix (Phi-3).
    gate_up: &'static str,
}

const HF_NAMES: LayerNames = LayerNames {
    prefix: "model.layers",
    attn_norm: "input_layernorm.weight",
    mlp_norm: "post_attention_layernorm.weight",
    sandwich: [
        "post_attention_layernorm.weight",
        "pre_feedforward_layernorm.weight",
        "post_feedforward_layernorm.weight",
    ],
    q_norm: "self_attn.q_norm.weight",
    k_norm: "self_attn.k_norm.weight",
    attention: [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    ],
    qkv: "self_attn.qkv_proj",
    mlp: ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    gate_up: "mlp.gate_up_proj",
};

const GGUF_NAMES: LayerNames = LayerNames {
    prefix: "blk",
    attn_norm: "attn_norm.weight",
    mlp_norm: "ffn_norm.weight",
    sandwich: [
        "post_attention_norm.weight",
        "ffn_norm.weight",
        "post_ffw_norm.weight",
    ],
    q_norm: "attn_q_norm.weight",
    k_norm: "attn_k_norm.weight",
    attention: ["attn_q", "attn_k", "attn_v", "attn_output"],
    qkv: "attn_qkv",
    mlp: ["ffn_gate", "ffn_up", "ffn_down"],
    // Phi-3's fused gate and up keep the name of the up projection.
    gate_up: "ffn_up",
};

/// The layers of a rotary decoder. `norm_offset` is added to every norm
/// weight (1 for Gemma's Hugging Face weights, stored as w − 1; GGUF
/// files hold them with the 1 added).
fn llama_layers(
    c: &ModelConfig,
    source: &Source,
    names: &LayerNames,
    norm_offset: f32,
) -> Result<Vec<Layer>> {
    let (d, inter) = (c.hidden_size, c.intermediate_size);
    let q_out = c.num_attention_heads * c.head_dim;
    let kv_out = c.num_key_value_heads * c.head_dim;
    (0..c.num_hidden_layers)
        .map(|i| {
            let p = format!("{}.{i}", names.prefix);
            let name = |suffix: &str| format!("{p}.{suffix}");
            let norm = |suffix: &str, width: usize| -> Result<Norm> {
                let mut weight = source.vector(&name(suffix), width)?;
                if norm_offset != 0.0 {
                    weight.iter_mut().for_each(|w| *w += norm_offset);
                }
                Ok(Norm::Rms {
                    weight,
                    eps: c.norm_eps,
                })
            };
            let linear = |suffix: &str, out: usize, inp: usize| {
                source.linear(&name(suffix), out, inp, false)
            };
            // Phi-3 stores q, k and v (and gate and up) as one matrix;
            // GGUF files of other families keep an `ffn_up` of `inter` rows.
            let qkv = if source.contains(&name(&format!("{}.weight", names.qkv))) {
                Fused::whole(
                    linear(names.qkv, q_out + 2 * kv_out, d)?,
                    vec![q_out, kv_out, kv_out],
                )
            } else {
                let [q, k, v, _] = names.attention;
                Fused::new(vec![
                    linear(q, q_out, d)?,
                    linear(k, kv_out, d)?,
                    linear(v, kv_out, d)?,
                ])?
            };
            let [gate, up, down] = names.mlp;
            let fused_gate_up =
                c.model_type == "phi3" && !source.contains(&name(&format!("{gate}.weight")));
            let gate_up = if fused_gate_up {
                Fused::whole(linear(names.gate_up, 2 * inter, d)?, vec![inter, inter])
            } else {
                Fused::new(vec![linear(gate, inter, d)?, linear(up, inter, d)?])?
            };
            let (post_attn_norm, mlp_norm, post_mlp_norm) = if c.post_norms {
                let [after_attention, before_mlp, after_mlp] = names.sandwich;
                (
                    Some(norm(after_attention, d)?),
                    norm(before_mlp, d)?,
                    Some(norm(after_mlp, d)?),
                )
            } else {
                (None, norm(names.mlp_norm, d)?, None)
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(norm(names.q_norm, c.head_dim)?),
                    Some(norm(names.k_norm, c.head_dim)?),
                )
            } else {
                (None, None)
            };
            let window = c.sliding_windows[i];
            Ok(Layer {
                attn_norm: norm(names.attn_norm, d)?,
                qkv,
                q_norm,
                k_norm,
                o: linear(names.attention[3], d, q_out)?,
                post_attn_norm,
                mlp_norm,
                mlp: Mlp::Gated {
                    gate_up,
                    down: linear(down, d, inter)?,
                },
                post_mlp_norm,
                window,
                local_rope: window.is_some() && c.rope_local.is_some(),
            })
        })
        .collect()
}

/// Keys and values of one sequence's tokens so far, per layer, token-major:
/// `[len, kv_heads * head_dim]` float32 values per layer. Sequences of a
/// batch each keep their own, so they may start, grow and end apart.
#[derive(Debug, Clone)]
pub(crate) struct SeqCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Tokens in the cache.
    pub(crate) len: usize,
}

impl SeqCache {
    /// An empty cache with room for `capacity` tokens of a model with
    /// `layers` layers and `width` key (and value) values per token.
    pub(crate) fn new(layers: usize, width: usize, capacity: usize) -> Self {
        let room = || {
            (0..layers)
                .map(|_| Vec::with_capacity(width * capacity))
                .collect()
        };
        SeqCache {
            keys: room(),
            values: room(),
            len: 0,
        }
    }
}

impl SeqCache {
    /// Empties the cache, keeping its room.
    pub(crate) fn clear(&mut self) {
        self.keys.iter_mut().for_each(Vec::clear);
        self.values.iter_mut().for_each(Vec::clear);
        self.len = 0;
    }
}

/// A loaded model.
pub(crate) struct Transformer {
    pub(crate) config: ModelConfig,
    /// The token embeddings; `None` when they are the rows of the output
    /// layer's matrix (tied), which is then the one copy held.
    embed: Option<Linear>,
    positions: Option<Tensor>,
    layers: Vec<Layer>,
    final_norm: Norm,
    head: Linear,
    act: Activation,
}

impl Transformer {
    /// Builds the model from Hugging Face tensor names (`model.layers.0...`, `transformer.h.0...`).
    pub(crate) fn from_hf(config: ModelConfig, source: &Source) -> Result<Self> {
        let c = &config;
        let (d, inter) = (c.hidden_size, c.intermediate_size);
        match c.family {
            Family::Llama => {
                let offset = if is_gemma(&c.model_type) { 1.0 } else { 0.0 };
                let layers = llama_layers(c, source, &HF_NAMES, offset)?;
                let (embed, head) = if source.contains("lm_head.weight") && !c.tie_word_embeddings {
                    let head = source.linear("lm_head", c.vocab_size, d, false)?;
                    let embed = source.linear("model.embed_tokens", c.vocab_size, d, false)?;
                    (Some(embed), head)
                } else {
                    // Tied: the packed head is the one copy.
                    let head = source.linear("model.embed_tokens", c.vocab_size, d, false)?;
                    (None, head)
                };
                Self::assemble(
                    config.clone(),
                    embed,
                    None,
                    layers,
                    Norm::Rms {
                        weight: source
                            .vector("model.norm.weight", d)?
                            .into_iter()
                            .map(|w| w + offset)
                            .collect(),
                        eps: c.norm_eps,
                    },
                    head,
                )
            }
            Family::Gpt2 => {
                let prefix = if source.contains("transformer.wte.weight") {
                    "transformer."
                } else {
                    ""
                };
                let ln = |name: String| -> Result<Norm> {
                    Ok(Norm::Layer {
                        weight: source.vector(&format!("{name}.weight"), d)?,
                        bias: source.vector(&format!("{name}.bias"), d)?,
                        eps: c.norm_eps,
                    })
                };
                let mut layers = Vec::with_capacity(c.num_hidden_layers);
                for i in 0..c.num_hidden_layers {
                    let p = format!("{prefix}h.{i}");
                    let fused = source.linear(&format!("{p}.attn.c_attn"), 3 * d, d, true)?;
                    layers.push(Layer {
                        attn_norm: ln(format!("{p}.ln_1"))?,
                        qkv: Fused::whole(fused, vec![d, d, d]),
                        o: source.linear(&format!("{p}.attn.c_proj"), d, d, true)?,
                        mlp_norm: ln(format!("{p}.ln_2"))?,
                        mlp: Mlp::Plain {
                            fc: source.linear(&format!("{p}.mlp.c_fc"), inter, d, true)?,
                            proj: source.linear(&format!("{p}.mlp.c_proj"), d, inter, true)?,
                        },
                        q_norm: None,
                        k_norm: None,
                        post_attn_norm: None,
                        post_mlp_norm: None,
                        window: None,
                        local_rope: false,
                    });
                }
                let positions = source.tensor(
                    &format!("{prefix}wpe.weight"),
                    &[c.max_position_embeddings, d],
                )?;
                // Tied: the packed head is the one copy of the embeddings.
                let head = source.linear(&format!("{prefix}wte"), c.vocab_size, d, false)?;
                Self::assemble(
                    config.clone(),
                    None,
                    Some(positions),
                    layers,
                    ln(format!("{prefix}ln_f"))?,
                    head,
                )
            }
        }
    }

    /// Builds a Llama-family model from GGUF tensor names (`blk.0.attn_q`, ...).
    pub(crate) fn from_gguf(config: ModelConfig, source: &Source) -> Result<Self> {
        let c = &config;
        let d = c.hidden_size;
        let layers = llama_layers(c, source, &GGUF_NAMES, 0.0)?;
        // Tied (no `output`): the head is the one copy of the embeddings.
        let (embed, head) = if source.contains("output.weight") {
            (
                Some(source.linear("token_embd", c.vocab_size, d, false)?),
                source.linear("output", c.vocab_size, d, false)?,
            )
        } else {
            (None, source.linear("token_embd", c.vocab_size, d, false)?)
        };
        Self::assemble(
            config.clone(),
            embed,
            None,
            layers,
            Norm::Rms {
                weight: source.vector("output_norm.weight", d)?,
                eps: c.norm_eps,
            },
            head,
        )
    }

    fn assemble(
        config: ModelConfig,
        embed: Option<Linear>,
        positions: Option<Tensor>,
        layers: Vec<Layer>,
        final_norm: Norm,
        head: Linear,
    ) -> Result<Self> {
        if head.out_features() != config.vocab_size {
            return Err(Error::Backend(format!(
                "output layer has {} rows for a vocabulary of {}",
                head.out_features(),
                config.vocab_size
            )));
        }
        let act = Activation::from_name(&config.hidden_act);
        Ok(Transformer {
            config,
            embed,
            positions,
            layers,
            final_norm,
            head,
            act,
        })
    }

    /// The length after which a sequence's rotation changes for all its
    /// positions (LongRoPE's pretraining length), if any.
    fn restart_length(&self) -> Option<usize> {
        [&self.config.rope, &self.config.rope_local]
            .into_iter()
            .flatten()
            .find_map(|r| match r.scaling {
                rope::RopeScaling::LongRope { original, .. } => Some(original),
                _ => None,
            })
    }

    /// Whether a generation may have to run again from its start.
    pub(crate) fn may_restart(&self) -> bool {
        self.restart_length().is_some()
    }

    /// Whether a sequence with `cached` tokens in its cache must run again
    /// from its start to take one more: transformers' Phi-3 generation
    /// recomputes the cache once the sequence passes the pretraining
    /// length, so that every position turns with the long factors.
    pub(crate) fn restarts_after(&self, cached: usize) -> bool {
        self.restart_length() == Some(cached)
    }

    /// Key (and value) values per token and layer.
    pub(crate) fn kv_width(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    /// Runs a ragged batch through the model: `ids` holds, one sequence
    /// after another, `counts[s]` new tokens of sequence `s`, which follow
    /// the `caches[s].len` tokens already in its cache (and are added to it).
    ///
    /// Returns the logits `[sum(counts), vocab]` when `all_logits`, else
    /// those of each sequence's last new token, `[sequences, vocab]`.
    pub(crate) fn forward(
        &self,
        ids: &[u32],
        counts: &[usize],
        caches: &mut [&mut SeqCache],
        edits: &dyn EditSite,
        all_logits: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n: usize = counts.iter().sum();
        if counts.is_empty()
            || counts.len() != caches.len()
            || n != ids.len()
            || counts.contains(&0)
        {
            return Err(Error::InvalidArgument(format!(
                "{} token ids do not split into {} sequences of {counts:?} tokens",
                ids.len(),
                caches.len()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        // Each token's sequence and position.
        let mut rows = Vec::with_capacity(n);
        for (s, (&count, cache)) in counts.iter().zip(caches.iter()).enumerate() {
            let total = cache.len + count;
            if total > c.max_position_embeddings {
                return Err(Error::InvalidArgument(format!(
                    "{total} tokens exceed the model's {} positions",
                    c.max_position_embeddings
                )));
            }
            rows.extend((cache.len..total).map(|p| (s, p)));
        }
        let mut h = {
            let table = self.embed.as_ref().unwrap_or(&self.head);
            let rows: Vec<f32> = ids.iter().flat_map(|&id| table.row(id as usize)).collect();
            Tensor::from_vec(rows, (n, c.hidden_size), &Device::Cpu)?
        };
        if let Some(scale) = c.embedding_scale {
            h = h.affine(scale as f64, 0.0)?;
        }
        if let Some(table) = &self.positions {
            let pos: Vec<u32> = rows.iter().map(|&(_, p)| p as u32).collect();
            h = h.add(&table.index_select(&Tensor::from_vec(pos, n, &Device::Cpu)?, 0)?)?;
        }
        // The rotations of this call's rows, once for all layers: each
        // sequence's frequencies may depend on how far it reaches now.
        let reach: Vec<usize> = caches.iter().zip(counts).map(|(c, n)| c.len + n).collect();
        let positions: Vec<usize> = rows.iter().map(|&(_, p)| p).collect();
        let turn = |r: &Option<rope::Rope>| {
            r.as_ref()
                .map(|r| rope::angles(r, &positions, |i| reach[rows[i].0]))
        };
        let (global, local) = (turn(&c.rope), turn(&c.rope_local));
        for (index, layer) in self.layers.iter().enumerate() {
            if edits.wants(index, Component::BlockInput) {
                h = edits.apply(index, Component::BlockInput, h)?;
            }
            let x = layer.attn_norm.apply(&h)?;
            let angles = if layer.local_rope { &local } else { &global };
            let mut a = self.attention(layer, index, &x, &rows, angles.as_ref(), caches)?;
            if edits.wants(index, Component::AttentionOutput) {
                a = edits.apply(index, Component::AttentionOutput, a)?;
            }
            if let Some(norm) = &layer.post_attn_norm {
                a = norm.forward(&a)?;
            }
            h = h.add(&a)?;
            let x = layer.mlp_norm.apply(&h)?;
            let mut m = match &layer.mlp {
                Mlp::Gated { gate_up, down } => {
                    let inter = self.config.intermediate_size;
                    let g = self.act.gated(&gate_up.apply(&x, n)?, inter)?;
                    Tensor::from_vec(down.apply(&g, n)?, (n, h.dim(1)?), &Device::Cpu)?
                }
                Mlp::Plain { fc, proj } => {
                    let f =
                        Tensor::from_vec(fc.apply(&x, n)?, (n, fc.out_features()), &Device::Cpu)?;
                    proj.forward(&self.act.apply(&f)?)?
                }
            };
            if edits.wants(index, Component::MlpOutput) {
                m = edits.apply(index, Component::MlpOutput, m)?;
            }
            if let Some(norm) = &layer.post_mlp_norm {
                m = norm.forward(&m)?;
            }
            h = h.add(&m)?;
            if edits.wants(index, Component::BlockOutput) {
                h = edits.apply(index, Component::BlockOutput, h)?;
            }
        }
        for (cache, &count) in caches.iter_mut().zip(counts) {
            cache.len += count;
        }
        let h = if all_logits || n == counts.len() {
            h
        } else {
            let mut last = Vec::with_capacity(counts.len());
            let mut end = 0u32;
            for &count in counts {
                end += count as u32;
                last.push(end - 1);
            }
            let k = last.len();
            h.index_select(&Tensor::from_vec(last, k, &Device::Cpu)?, 0)?
        };
        let h = self.final_norm.forward(&h)?;
        let logits = self.head.forward(&h)?;
        match c.final_logit_softcapping {
            Some(cap) => Ok((logits / cap)?.tanh()?.affine(cap, 0.0)?),
            None => Ok(logits),
        }
    }

    /// Causal self-attention of the `[n, hidden]` states `x`, whose rows
    /// are the `(sequence, position)` tokens of `rows`: their keys and values
    /// join each sequence's cache, and each token attends to its sequence's
    /// tokens up to itself (the last `window` of them in a sliding-window
    /// layer). `angles` holds each row's rotation (cos, sin), if any.
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        x: &[f32],
        rows: &[(usize, usize)],
        angles: Option<&(Vec<f32>, Vec<f32>)>,
        caches: &mut [&mut SeqCache],
    ) -> Result<Tensor> {
        let c = &self.config;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (q_width, kv_width) = (heads * hd, kv_heads * hd);
        let n = rows.len();
        // Each row: its query, key and value side by side.
        let width = q_width + 2 * kv_width;
        let mut qkv = layer.qkv.apply(x, n)?;
        if let (Some(q_norm), Some(k_norm)) = (&layer.q_norm, &layer.k_norm) {
            for row in qkv.chunks_exact_mut(width) {
                let (q, rest) = row.split_at_mut(q_width);
                q.chunks_exact_mut(hd)
                    .for_each(|head| q_norm.in_place(head));
                rest[..kv_width]
                    .chunks_exact_mut(hd)
                    .for_each(|head| k_norm.in_place(head));
            }
        }
        if let Some((cos, sin)) = angles {
            let half = cos.len() / n.max(1);
            for (r, row) in qkv.chunks_exact_mut(width).enumerate() {
                let (cos, sin) = (&cos[r * half..][..half], &sin[r * half..][..half]);
                for head in row[..q_width + kv_width].chunks_exact_mut(hd) {
                    rotate(&mut head[..2 * half], cos, sin, c.rope_style);
                }
            }
        }
        for (row, &(s, _)) in qkv.chunks_exact(width).zip(rows) {
            let (k, v) = row[q_width..].split_at(kv_width);
            caches[s].keys[index].extend_from_slice(k);
            caches[s].values[index].extend_from_slice(v);
        }
        let q = &qkv;
        let caches: Vec<&SeqCache> = caches.iter().map(|c| &**c).collect();
        let group = heads / kv_heads;
        let scale = c.attention_scale as f32;
        let softcap = c.attn_logit_softcapping.map(|s| s as f32);
        let mut out = vec![0f32; n * q_width];
        // One unit of work per (token, head): its `[head_dim]` slice of `out`.
        let vector = super::gemm::has_fma();
        let work = |(unit, target): (usize, &mut [f32])| {
            let (r, head) = (unit / heads, unit % heads);
            let (s, p) = rows[r];
            let g = head / group;
            let start = layer.window.map_or(0, |w| (p + 1).saturating_sub(w));
            let unit = Attend {
                query: &q[r * width + head * hd..][..hd],
                keys: &caches[s].keys[index][start * kv_width + g * hd..],
                values: &caches[s].values[index][start * kv_width + g * hd..],
                stride: kv_width,
                len: p + 1 - start,
                scale,
                softcap,
            };
            unit.run(target, vector);
        };
        // Few tokens, short caches: threads would cost more than they save.
        let keys_seen: usize = rows
            .iter()
            .map(|&(_, p)| layer.window.map_or(p + 1, |w| (p + 1).min(w)))
            .sum();
        if keys_seen * heads * hd < 1 << 14 {
            out.chunks_mut(hd).enumerate().for_each(work);
        } else {
            use rayon::prelude::*;
            out.par_chunks_mut(hd).enumerate().for_each(work);
        }
        let out = Tensor::from_vec(out, (n, q_width), &Device::Cpu)?;
        layer.o.forward(&out)
    }
}

/// One query of one head against a sequence's keys and values.
struct Attend<'a> {
    query: &'a [f32],
    /// Key `j` of the head starts at `keys[j * stride]` (values likewise).
    keys: &'a [f32],
    values: &'a [f32],
    stride: usize,
    /// Keys attended to.
    len: usize,
    scale: f32,
    /// `c · tanh(score / c)` on each scaled score.
    softcap: Option<f32>,
}

impl Attend<'_> {
    /// Adds the attention-weighted values into `target` (`[head_dim]`).
    /// The vector build gives the same bits as the plain one: the same
    /// operations in the same order, eight lanes at a time.
    fn run(&self, target: &mut [f32], vector: bool) {
        #[cfg(target_arch = "x86_64")]
        if vector {
            // SAFETY: `vector` only where the CPU has AVX2 and FMA.
            return unsafe { self.run_avx2(target) };
        }
        let _ = vector;
        self.body(target)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, target: &mut [f32]) {
        use std::arch::x86_64::*;
        let hd = self.query.len();
        if !hd.is_multiple_of(8) || target.len() != hd {
            return self.body(target);
        }
        let q = self.query.as_ptr();
        let mut scores = vec![0f32; self.len];
        let mut max = f32::NEG_INFINITY;
        for (j, slot) in scores.iter_mut().enumerate() {
            let key = self.keys[j * self.stride..][..hd].as_ptr();
            // Eight lane sums, each as `dot` keeps it (multiply, then add).
            let mut acc = _mm256_setzero_ps();
            for c in (0..hd).step_by(8) {
                let product = _mm256_mul_ps(_mm256_loadu_ps(q.add(c)), _mm256_loadu_ps(key.add(c)));
                acc = _mm256_add_ps(acc, product);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            let score = self.capped(lanes.iter().sum::<f32>() * self.scale);
            *slot = score;
            max = max.max(score);
        }
        let mut sum = 0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        let t = target.as_mut_ptr();
        for (j, &score) in scores.iter().enumerate() {
            let weight = _mm256_set1_ps(score / sum);
            let value = self.values[j * self.stride..][..hd].as_ptr();
            for c in (0..hd).step_by(8) {
                let product = _mm256_mul_ps(weight, _mm256_loadu_ps(value.add(c)));
                _mm256_storeu_ps(t.add(c), _mm256_add_ps(_mm256_loadu_ps(t.add(c)), product));
            }
        }
    }

    fn capped(&self, score: f32) -> f32 {
        match self.softcap {
            Some(c) => (score / c).tanh() * c,
            None => score,
        }
    }

    fn body(&self, target: &mut [f32]) {
        let hd = self.query.len();
        let mut scores: Vec<f32> = (0..self.len)
            .map(|j| self.capped(dot(self.query, &self.keys[j * self.stride..][..hd]) * self.scale))
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        for (j, &score) in scores.iter().enumerate() {
            let weight = score / sum;
            let value = &self.values[j * self.stride..][..hd];
            for (t, &v) in target.iter_mut().zip(value) {
                *t += weight * v;
            }
        }
    }
}

/// `a · b` with eight running sums (which the compiler keeps in vector registers).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// Rotates one head's `[head_dim]` values by the angles whose cosines and
/// sines are `cos` and `sin` (`[head_dim / 2]`), as transformers pairs them.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = x.len() / 2;
    match style {
        RopeStyle::Halves => {
            let (x1, x2) = x.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
        RopeStyle::Interleaved => {
            for (i, pair) in x.chunks_exact_mut(2).enumerate() {
                let (even, odd) = (pair[0], pair[1]);
                pair[0] = even * cos[i] - odd * sin[i];
                pair[1] = odd * cos[i] + even * sin[i];
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1] for kernel tests.
    pub(crate) fn values(count: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Attention written out in f64: softmax of the scaled scores, then the
    /// weighted sum of the values.
    fn plain(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        stride: usize,
        len: usize,
        scale: f32,
    ) -> Vec<f64> {
        let hd = q.len();
        let scores: Vec<f64> = (0..len)
            .map(|j| {
                (0..hd)
                    .map(|i| q[i] as f64 * keys[j * stride + i] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        (0..hd)
            .map(|i| {
                (0..len)
                    .map(|j| (scores[j] - max).exp() / total * values[j * stride + i] as f64)
                    .sum()
            })
            .collect()
    }

    #[test]
    fn attention_of_one_query_matches_the_plain_formula_in_both_builds() {
        for (hd, len, stride) in [
            (64, 1, 192),
            (64, 37, 192),
            (8, 5, 24),
            (12, 9, 36),
            (64, 300, 64),
        ] {
            let query = values(hd, 1);
            let keys = values(len * stride, 2);
            let vals = values(len * stride, 3);
            let unit = Attend {
                query: &query,
                keys: &keys,
                values: &vals,
                stride,
                len,
                scale: 1.0 / (hd as f32).sqrt(),
                softcap: None,
            };
            let mut plain_build = vec![0f32; hd];
            unit.run(&mut plain_build, false);
            let mut vector_build = vec![0f32; hd];
            unit.run(&mut vector_build, crate::engine::gemm::has_fma());
            assert_eq!(
                plain_build.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                vector_build.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "head_dim {hd}, {len} keys"
            );
            let reference = plain(&query, &keys, &vals, stride, len, unit.scale);
            for (got, want) in plain_build.iter().zip(&reference) {
                assert!((*got as f64 - want).abs() < 1e-5, "{got} against {want}");
            }
        }
    }

    #[test]
    fn activations_of_one_value_match_their_textbook_formulas() {
        let gelu_tanh = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        let silu = |x: f64| x / (1.0 + (-x).exp());
        let cases: [(Activation, &dyn Fn(f64) -> f64); 3] = [
            (Activation::GeluTanh, &gelu_tanh),
            (Activation::Silu, &silu),
            (Activation::Relu, &|x: f64| x.max(0.0)),
        ];
        let mut points: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 100.0).collect();
        points.extend([-1e4, -200.0, 200.0, 1e4, 1e-30, -1e-30]);
        for (act, reference) in cases {
            let f = act.of_value().expect("written with exp");
            for &x in &points {
                let (got, want) = (f(x) as f64, reference(x as f64));
                assert!(got.is_finite(), "{act:?}({x}) = {got}");
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{act:?}({x}) = {got} against {want}"
                );
            }
        }
        assert!(Activation::GeluErf.of_value().is_none());
        let x = Tensor::from_vec(vec![-1.5f32, 0.0, 0.5, 2.0], (2, 2), &Device::Cpu).unwrap();
        let erf = Activation::GeluErf
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (got, x) in erf.iter().zip([-1.5f64, 0.0, 0.5, 2.0]) {
            let want = x * 0.5 * (1.0 + erf_series(x / std::f64::consts::SQRT_2));
            assert!(
                (*got as f64 - want).abs() < 1e-6,
                "gelu_erf({x}) = {got} against {want}"
            );
        }
    }

    /// erf by its series (enough terms for |x| < 2).
    fn erf_series(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..60 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
