//! The layer loop of Llama-style and GPT-2 models, written on candle's
//! tensor operations, with an edit point at every component the
//! interventions may target.
//!
//! States stay two-dimensional, `[batch * tokens, hidden]`, between the
//! layers, so every projection is one matrix product. Batches are
//! left-padded: row `b` has `pad[b]` padding tokens before its prompt, which
//! no real token attends to and whose positions do not count.

use candle_core::{Device, Tensor, D};

use super::config::{Family, ModelConfig, RopeStyle};
use super::weights::{Fused, Linear, Source};
use crate::config::Component;
use crate::error::{Error, Result};

/// Edits applied at a component of a layer to `[rows, hidden]` states.
pub(crate) trait EditSite {
    /// Whether anything edits `(layer, component)` (skips the call otherwise).
    fn wants(&self, layer: usize, component: Component) -> bool;
    /// The edited states.
    fn apply(&self, layer: usize, component: Component, hidden: Tensor) -> Result<Tensor>;
}

/// No edits at all.
pub(crate) struct NoEdits;

impl EditSite for NoEdits {
    fn wants(&self, _: usize, _: Component) -> bool {
        false
    }
    fn apply(&self, _: usize, _: Component, hidden: Tensor) -> Result<Tensor> {
        Ok(hidden)
    }
}

#[derive(Debug, Clone)]
enum Norm {
    Rms {
        weight: Tensor,
        eps: f64,
    },
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Norm::Rms { weight, eps } => {
                let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_mul(&(variance + *eps)?.sqrt()?.recip()?)?
                    .broadcast_mul(weight)?
            }
            Norm::Layer { weight, bias, eps } => {
                let mean = x.mean_keepdim(D::Minus1)?;
                let centred = x.broadcast_sub(&mean)?;
                let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
                centred
                    .broadcast_mul(&(variance + *eps)?.sqrt()?.recip()?)?
                    .broadcast_mul(weight)?
                    .broadcast_add(bias)?
            }
        })
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
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => x.silu()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::GeluErf => x.gelu_erf()?,
            Activation::Relu => x.relu()?,
        })
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
    o: Linear,
    mlp_norm: Norm,
    mlp: Mlp,
}

/// Tensor names of a Llama-style layer: its prefix, then the suffixes of
/// the two norms and of the q, k, v, o, gate, up and down projections.
struct LayerNames {
    prefix: &'static str,
    norms: [&'static str; 2],
    projections: [&'static str; 7],
}

const HF_NAMES: LayerNames = LayerNames {
    prefix: "model.layers",
    norms: ["input_layernorm.weight", "post_attention_layernorm.weight"],
    projections: [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
};

const GGUF_NAMES: LayerNames = LayerNames {
    prefix: "blk",
    norms: ["attn_norm.weight", "ffn_norm.weight"],
    projections: [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ],
};

fn llama_layers(c: &ModelConfig, source: &Source, names: &LayerNames) -> Result<Vec<Layer>> {
    let (d, inter) = (c.hidden_size, c.intermediate_size);
    let q_out = c.num_attention_heads * c.head_dim;
    let kv_out = c.num_key_value_heads * c.head_dim;
    let shapes = [
        (q_out, d),
        (kv_out, d),
        (kv_out, d),
        (d, q_out),
        (inter, d),
        (inter, d),
        (d, inter),
    ];
    (0..c.num_hidden_layers)
        .map(|i| {
            let p = format!("{}.{i}", names.prefix);
            let norm = |suffix: &str| -> Result<Norm> {
                Ok(Norm::Rms {
                    weight: source.tensor(&format!("{p}.{suffix}"), &[d])?,
                    eps: c.norm_eps,
                })
            };
            let mut linears = names
                .projections
                .iter()
                .zip(shapes)
                .map(|(suffix, (out, inp))| {
                    source.linear(&format!("{p}.{suffix}"), out, inp, false)
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter();
            let mut next = || linears.next().expect("seven projections");
            Ok(Layer {
                attn_norm: norm(names.norms[0])?,
                qkv: Fused::new(vec![next(), next(), next()])?,
                o: next(),
                mlp_norm: norm(names.norms[1])?,
                mlp: Mlp::Gated {
                    gate_up: Fused::new(vec![next(), next()])?,
                    down: next(),
                },
            })
        })
        .collect()
}

/// Keys and values of the tokens seen so far, per layer, for one batch.
pub(crate) struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens in the cache (padding included).
    pub(crate) len: usize,
    /// Left padding of each row.
    pub(crate) pad: Vec<usize>,
}

impl KvCache {
    pub(crate) fn new(layers: usize, pad: Vec<usize>) -> Self {
        KvCache {
            layers: vec![None; layers],
            len: 0,
            pad,
        }
    }
    pub(crate) fn batch(&self) -> usize {
        self.pad.len()
    }
}

/// A loaded model.
pub(crate) struct Transformer {
    pub(crate) config: ModelConfig,
    embed: Tensor,
    positions: Option<Tensor>,
    layers: Vec<Layer>,
    final_norm: Norm,
    head: Linear,
    /// `[max_positions, head_dim / 2]` cos and sin tables.
    rope: Option<(Tensor, Tensor)>,
    act: Activation,
}

impl Transformer {
    /// Builds the model from Hugging Face tensor names (`model.layers.0...`, `transformer.h.0...`).
    pub(crate) fn from_hf(config: ModelConfig, source: &Source) -> Result<Self> {
        let c = &config;
        let (d, inter) = (c.hidden_size, c.intermediate_size);
        match c.family {
            Family::Llama => {
                let layers = llama_layers(c, source, &HF_NAMES)?;
                let embed = source.tensor("model.embed_tokens.weight", &[c.vocab_size, d])?;
                let head = if source.contains("lm_head.weight") && !c.tie_word_embeddings {
                    source.linear("lm_head", c.vocab_size, d, false)?
                } else {
                    Linear::Dense {
                        weight: embed.clone(),
                        bias: None,
                    }
                };
                Self::assemble(
                    config.clone(),
                    embed,
                    None,
                    layers,
                    Norm::Rms {
                        weight: source.tensor("model.norm.weight", &[d])?,
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
                        weight: source.tensor(&format!("{name}.weight"), &[d])?,
                        bias: source.tensor(&format!("{name}.bias"), &[d])?,
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
                    });
                }
                let embed = source.tensor(&format!("{prefix}wte.weight"), &[c.vocab_size, d])?;
                let positions = source.tensor(
                    &format!("{prefix}wpe.weight"),
                    &[c.max_position_embeddings, d],
                )?;
                let head = Linear::Dense {
                    weight: embed.clone(),
                    bias: None,
                };
                Self::assemble(
                    config.clone(),
                    embed,
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
        let layers = llama_layers(c, source, &GGUF_NAMES)?;
        let embed = source.tensor("token_embd.weight", &[c.vocab_size, d])?;
        let head = if source.contains("output.weight") {
            source.linear("output", c.vocab_size, d, false)?
        } else {
            source.linear("token_embd", c.vocab_size, d, false)?
        };
        Self::assemble(
            config.clone(),
            embed,
            None,
            layers,
            Norm::Rms {
                weight: source.tensor("output_norm.weight", &[d])?,
                eps: c.norm_eps,
            },
            head,
        )
    }

    fn assemble(
        config: ModelConfig,
        embed: Tensor,
        positions: Option<Tensor>,
        layers: Vec<Layer>,
        final_norm: Norm,
        head: Linear,
    ) -> Result<Self> {
        let rope = match config.family {
            Family::Llama => Some(rope_tables(&config)?),
            Family::Gpt2 => None,
        };
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
            rope,
            act,
        })
    }

    /// Runs `ids` (`[batch, tokens]`, row-major, left-padded as the cache's
    /// `pad` says) through the model after the tokens already in `cache`.
    ///
    /// Returns the logits `[batch * tokens, vocab]` when `all_logits`, else
    /// those of each row's last token, `[batch, vocab]`.
    pub(crate) fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        edits: &dyn EditSite,
        all_logits: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let batch = cache.batch();
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(Error::InvalidArgument(format!(
                "{} token ids do not form a batch of {batch} rows",
                ids.len()
            )));
        }
        let t = ids.len() / batch;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        let start = cache.len;
        let total = start + t;
        if total > c.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "{total} tokens exceed the model's {} positions",
                c.max_position_embeddings
            )));
        }
        // Position of each token, counted over the row's real tokens.
        let mut pos = Vec::with_capacity(batch * t);
        for &pad in &cache.pad {
            for i in 0..t {
                pos.push((start + i).saturating_sub(pad) as u32);
            }
        }
        let pos = Tensor::from_vec(pos, batch * t, &Device::Cpu)?;
        let id_tensor = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
        let mut h = self.embed.index_select(&id_tensor, 0)?;
        if let Some(table) = &self.positions {
            h = h.add(&table.index_select(&pos, 0)?)?;
        }
        let rope = match &self.rope {
            Some((cos, sin)) => {
                let half = c.head_dim / 2;
                Some((
                    cos.index_select(&pos, 0)?.reshape((batch, 1, t, half))?,
                    sin.index_select(&pos, 0)?.reshape((batch, 1, t, half))?,
                ))
            }
            None => None,
        };
        let mask = attention_mask(&cache.pad, start, t)?;
        for (index, layer) in self.layers.iter().enumerate() {
            if edits.wants(index, Component::BlockInput) {
                h = edits.apply(index, Component::BlockInput, h)?;
            }
            let x = layer.attn_norm.forward(&h)?;
            let mut a = self.attention(
                layer,
                index,
                &x,
                batch,
                t,
                cache,
                rope.as_ref(),
                mask.as_ref(),
            )?;
            if edits.wants(index, Component::AttentionOutput) {
                a = edits.apply(index, Component::AttentionOutput, a)?;
            }
            h = h.add(&a)?;
            let x = layer.mlp_norm.forward(&h)?;
            let mut m = match &layer.mlp {
                Mlp::Gated { gate_up, down } => {
                    let parts = gate_up.forward(&x)?;
                    let g = self.act.apply(&parts[0])?;
                    down.forward(&g.mul(&parts[1])?)?
                }
                Mlp::Plain { fc, proj } => proj.forward(&self.act.apply(&fc.forward(&x)?)?)?,
            };
            if edits.wants(index, Component::MlpOutput) {
                m = edits.apply(index, Component::MlpOutput, m)?;
            }
            h = h.add(&m)?;
            if edits.wants(index, Component::BlockOutput) {
                h = edits.apply(index, Component::BlockOutput, h)?;
            }
        }
        cache.len = total;
        let h = if all_logits || t == 1 {
            h
        } else {
            h.reshape((batch, t, c.hidden_size))?
                .narrow(1, t - 1, 1)?
                .reshape((batch, c.hidden_size))?
        };
        let h = self.final_norm.forward(&h)?;
        self.head.forward(&h)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        batch: usize,
        t: usize,
        cache: &mut KvCache,
        rope: Option<&(Tensor, Tensor)>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((batch, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let mut parts = layer.qkv.forward(x)?.into_iter();
        let mut next = || parts.next().expect("three projections");
        let mut q = split(next(), heads)?;
        let mut k = split(next(), kv_heads)?;
        let v = split(next(), kv_heads)?;
        if let Some((cos, sin)) = rope {
            q = apply_rope(&q, cos, sin, c.rope_style)?;
            k = apply_rope(&k, cos, sin, c.rope_style)?;
        }
        let (k, v) = match cache.layers[index].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        cache.layers[index] = Some((k.clone(), v.clone()));
        let keys = k.dim(2)?;
        let group = heads / kv_heads;
        // Query heads that share a key/value head become extra query rows.
        let q = q.reshape((batch, kv_heads, group * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((batch, kv_heads, group, t, keys))?
                .broadcast_add(mask)?
                .reshape((batch, kv_heads, group * t, keys))?,
            None => scores,
        };
        let probs = softmax_last(&scores)?;
        let out = probs.matmul(&v)?; // [batch, kv_heads, group * t, hd]
        let out = out
            .reshape((batch, heads, t, hd))?
            .transpose(1, 2)?
            .reshape((batch * t, heads * hd))?;
        layer.o.forward(&out)
    }
}

fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `[batch, 1, 1, t, start + t]` additive mask: each token sees its row's
/// real tokens up to itself. `None` when nothing is masked.
fn attention_mask(pad: &[usize], start: usize, t: usize) -> Result<Option<Tensor>> {
    let keys = start + t;
    if t == 1 && pad.iter().all(|&p| p == 0) {
        return Ok(None);
    }
    let mut data = vec![0f32; pad.len() * t * keys];
    for (b, &p) in pad.iter().enumerate() {
        for i in 0..t {
            let row = &mut data[(b * t + i) * keys..(b * t + i + 1) * keys];
            let me = start + i;
            for (j, value) in row.iter_mut().enumerate() {
                if j < p || j > me {
                    // Large but finite: a padding query that sees no key still
                    // gets a uniform (unused) distribution rather than NaN.
                    *value = -1e30;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(
        data,
        (pad.len(), 1, 1, t, keys),
        &Device::Cpu,
    )?))
}

fn rope_tables(c: &ModelConfig) -> Result<(Tensor, Tensor)> {
    let half = c.head_dim / 2;
    // As transformers computes them: float32 inverse frequencies and angles.
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (c.rope_theta as f32).powf((2 * i) as f32 / c.head_dim as f32))
        .collect();
    let n = c.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &f in &inv {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), &Device::Cpu)?,
        Tensor::from_vec(sin, (n, half), &Device::Cpu)?,
    ))
}

/// Rotates `[batch, heads, t, head_dim]` by the `[batch, 1, t, head_dim/2]` tables.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    let half = hd / 2;
    Ok(match style {
        RopeStyle::Halves => {
            let x1 = x.narrow(3, 0, half)?;
            let x2 = x.narrow(3, half, half)?;
            let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
            let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
            Tensor::cat(&[&r1, &r2], 3)?
        }
        RopeStyle::Interleaved => {
            let pairs = x.reshape((b, h, t, half, 2))?;
            let even = pairs.narrow(4, 0, 1)?.squeeze(4)?;
            let odd = pairs.narrow(4, 1, 1)?.squeeze(4)?;
            let r_even = (even.broadcast_mul(cos)? - odd.broadcast_mul(sin)?)?;
            let r_odd = (odd.broadcast_mul(cos)? + even.broadcast_mul(sin)?)?;
            Tensor::stack(&[&r_even, &r_odd], 4)?.reshape((b, h, t, hd))?
        }
    })
}
