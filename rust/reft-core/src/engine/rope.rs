//! Rotary position embeddings: the plain kind and the scaled kinds that
//! long-context configs name (`linear`, `dynamic`, `yarn`, `llama3`,
//! `longrope`), with their inverse frequencies computed as transformers
//! computes them, and per-dimension factors as GGUF files store them.

use serde_json::Value;

/// How the inverse frequencies of a rotary embedding are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// The plain frequencies.
    None,
    /// Every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// NTK scaling of the base once a sequence passes `positions`
    /// (transformers' `dynamic`): the base grows with the sequence length.
    Dynamic {
        /// The scaling factor.
        factor: f64,
        /// The context length the model was trained on.
        positions: usize,
    },
    /// YaRN: frequencies blended between interpolated and original along
    /// a ramp over the dimensions, and cos/sin scaled by `attention_factor`.
    Yarn {
        /// The interpolation factor.
        factor: f64,
        /// The pretraining context length.
        original: usize,
        /// Rotations where the ramp ends at extrapolation.
        beta_fast: f64,
        /// Rotations where the ramp starts from interpolation.
        beta_slow: f64,
        /// The factor on cos and sin.
        attention_factor: f64,
        /// Whether the ramp's ends are rounded outwards.
        truncate: bool,
    },
    /// Llama 3.1: low frequencies divided by `factor`, a smooth ramp
    /// between `low_freq_factor` and `high_freq_factor`.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Where the ramp starts (in units of the pretraining length).
        low_freq_factor: f64,
        /// Where the ramp ends.
        high_freq_factor: f64,
        /// The pretraining context length.
        original: usize,
    },
    /// LongRoPE (Phi-3): per-dimension factors, `short` while a sequence is
    /// within `original` positions and `long` past it.
    LongRope {
        /// Divisors within the pretraining length.
        short: Vec<f64>,
        /// Divisors past it.
        long: Vec<f64>,
        /// The pretraining context length.
        original: usize,
        /// The factor on cos and sin.
        attention_factor: f64,
    },
    /// Per-dimension divisors of the frequencies as a GGUF file stores them
    /// (`rope_freqs.weight`, llama.cpp's form of Llama 3.1 scaling).
    Factors {
        /// One divisor per rotated pair.
        factors: Vec<f32>,
        /// The factor on cos and sin.
        attention_factor: f64,
    },
}

/// One rotary embedding: its base, how many dimensions of each head it
/// turns (the first `dim`; the rest pass unchanged) and its scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// The base wavelength (`rope_theta`).
    pub theta: f64,
    /// Rotated dimensions of a head (even; `head_dim` unless the rotation
    /// is partial).
    pub dim: usize,
    /// How the frequencies are scaled.
    pub scaling: RopeScaling,
}

/// Rotary settings that were read from a config but cannot be used.
pub(crate) type RopeResult<T> = std::result::Result<T, String>;

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Rope {
    /// A plain rotary embedding of `dim` dimensions.
    pub fn plain(theta: f64, dim: usize) -> Self {
        Rope {
            theta,
            dim,
            scaling: RopeScaling::None,
        }
    }

    /// Reads a `rope_parameters` / `rope_scaling` object of a Hugging Face
    /// config (transformers 4.5x and 5.x forms): `theta` and `dim` are
    /// the base and rotated width found elsewhere in the config (the
    /// object's own `rope_theta` and `partial_rotary_factor` win), and
    /// `positions` / `original` the config's `max_position_embeddings` and
    /// top-level `original_max_position_embeddings`.
    pub(crate) fn from_hf(
        params: Option<&Value>,
        theta: f64,
        head_dim: usize,
        partial: Option<f64>,
        positions: usize,
        original: Option<usize>,
    ) -> RopeResult<Self> {
        let params = params.filter(|p| !p.is_null());
        let get = |key: &str| params.and_then(|p| p.get(key)).filter(|v| !v.is_null());
        let number = |key: &str| -> RopeResult<Option<f64>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| format!("rope parameter {key} is {v}, not a number")),
            }
        };
        let size = |key: &str| -> RopeResult<Option<usize>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .map(Some)
                    .ok_or_else(|| format!("rope parameter {key} is {v}, not a positive size")),
            }
        };
        let kind = get("rope_type")
            .or_else(|| get("type"))
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("rope_type is {v}, not a name"))
            })
            .transpose()?
            .unwrap_or_else(|| "default".to_string());
        let theta = number("rope_theta")?.unwrap_or(theta);
        let partial = number("partial_rotary_factor")?.or(partial).unwrap_or(1.0);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(format!("partial_rotary_factor {partial} must be in (0, 1]"));
        }
        // int(head_dim * partial_rotary_factor), as transformers sizes it.
        let dim = (head_dim as f64 * partial) as usize;
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(format!(
                "{dim} rotated dimensions of a head of {head_dim}: must be even and positive"
            ));
        }
        // A scaled kind's pretraining length: the top-level field first
        // (Phi-3 keeps it there), then the parameters', then the context.
        let original = || -> RopeResult<usize> {
            Ok(original
                .or(size("original_max_position_embeddings")?)
                .unwrap_or(positions))
        };
        let factor = |what: &str| -> RopeResult<f64> {
            let f =
                number("factor")?.ok_or_else(|| format!("{what} rope scaling needs a factor"))?;
            if f > 0.0 {
                Ok(f)
            } else {
                Err(format!("rope scaling factor {f} must be positive"))
            }
        };
        let scaling = match kind.as_str() {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: factor("linear")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: factor("dynamic")?,
                positions,
            },
            "yarn" => {
                let original = original()?;
                let factor = match number("factor")? {
                    Some(f) if f > 0.0 => f,
                    Some(f) => return Err(format!("rope scaling factor {f} must be positive")),
                    None => positions as f64 / original as f64,
                };
                let attention_factor = match number("attention_factor")? {
                    Some(a) => a,
                    None => match (number("mscale")?, number("mscale_all_dim")?) {
                        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, all)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                let beta = |key: &str, default: f64| -> RopeResult<f64> {
                    // `or` in transformers: a zero falls back too.
                    Ok(number(key)?.filter(|&b| b != 0.0).unwrap_or(default))
                };
                RopeScaling::Yarn {
                    factor,
                    original,
                    beta_fast: beta("beta_fast", 32.0)?,
                    beta_slow: beta("beta_slow", 1.0)?,
                    attention_factor,
                    truncate: get("truncate").and_then(Value::as_bool).unwrap_or(true),
                }
            }
            "llama3" => {
                let need = |key: &str| -> RopeResult<f64> {
                    number(key)?.ok_or_else(|| format!("llama3 rope scaling needs {key}"))
                };
                let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
                if low >= high {
                    return Err(format!(
                        "llama3 rope scaling needs low_freq_factor {low} below high_freq_factor {high}"
                    ));
                }
                RopeScaling::Llama3 {
                    factor: factor("llama3")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original: original()?,
                }
            }
            "longrope" => {
                let original = original()?;
                let list = |key: &str| -> RopeResult<Vec<f64>> {
                    let items = get(key)
                        .and_then(Value::as_array)
                        .ok_or_else(|| format!("longrope scaling needs a list {key}"))?;
                    let values: Vec<f64> = items.iter().filter_map(Value::as_f64).collect();
                    if values.len() != dim / 2
                        || values.iter().any(|v| !(v.is_finite() && *v > 0.0))
                    {
                        return Err(format!(
                            "longrope {key} must hold {} positive numbers",
                            dim / 2
                        ));
                    }
                    Ok(values)
                };
                let factor = match number("factor")? {
                    Some(f) => f,
                    None => positions as f64 / original as f64,
                };
                let attention_factor = match number("attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short: list("short_factor")?,
                    long: list("long_factor")?,
                    original,
                    attention_factor,
                }
            }
            other => {
                return Err(format!(
                    "rope scaling {other:?} is not supported by the engine \
                     (supported: default, linear, dynamic, yarn, llama3, longrope)"
                ))
            }
        };
        let rope = Rope {
            theta,
            dim,
            scaling,
        };
        rope.check()?;
        Ok(rope)
    }

    /// Checks the numbers that the frequencies are computed from.
    pub(crate) fn check(&self) -> RopeResult<()> {
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(format!(
                "rope_theta {} must be a finite number above 1",
                self.theta
            ));
        }
        let positive = |name: &str, v: f64| -> RopeResult<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("rope scaling {name} {v} must be a positive number"))
            }
        };
        match &self.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor, .. } => {
                positive("factor", *factor)?
            }
            RopeScaling::Yarn {
                factor,
                attention_factor,
                beta_fast,
                beta_slow,
                ..
            } => {
                positive("factor", *factor)?;
                positive("attention_factor", *attention_factor)?;
                positive("beta_fast", *beta_fast)?;
                positive("beta_slow", *beta_slow)?;
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                ..
            } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
            }
            RopeScaling::LongRope {
                attention_factor, ..
            } => positive("attention_factor", *attention_factor)?,
            RopeScaling::Factors {
                factors,
                attention_factor,
            } => {
                positive("attention_factor", *attention_factor)?;
                if factors.len() != self.dim / 2
                    || factors.iter().any(|f| !(f.is_finite() && *f > 0.0))
                {
                    return Err(format!(
                        "rope frequency factors must be {} positive numbers",
                        self.dim / 2
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the frequencies depend on the length of the sequence.
    pub(crate) fn depends_on_length(&self) -> bool {
        matches!(
            self.scaling,
            RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }
        )
    }

    /// `base ** (2i / dim)` for each rotated pair, in float32 as
    /// transformers computes `base ** (arange(0, dim, 2).float() / dim)`.
    fn powers(&self, base: f64) -> Vec<f32> {
        (0..self.dim / 2)
            .map(|i| (base as f32).powf((2 * i) as f32 / self.dim as f32))
            .collect()
    }

    /// The inverse frequencies (`dim / 2`) and the factor on cos and sin
    /// for a sequence whose positions reach `seq_len - 1` in this call.
    pub(crate) fn frequencies(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let plain = |powers: Vec<f32>| -> Vec<f32> { powers.iter().map(|p| 1.0 / p).collect() };
        match &self.scaling {
            RopeScaling::None => (plain(self.powers(self.theta)), 1.0),
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                (
                    plain(self.powers(self.theta))
                        .into_iter()
                        .map(|v| v / f)
                        .collect(),
                    1.0,
                )
            }
            RopeScaling::Dynamic { factor, positions } => {
                let seq = seq_len.max(*positions) as f64;
                let d = self.dim as f64;
                let base = self.theta
                    * ((factor * seq / *positions as f64) - (factor - 1.0)).powf(d / (d - 2.0));
                (plain(self.powers(base)), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let d = self.dim as f64;
                let correction = |rotations: f64| {
                    (d * (*original as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let powers = self.powers(self.theta);
                let f = *factor as f32;
                let freqs = powers
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let extrapolation = 1.0 / p;
                        let interpolation = 1.0 / (f * p);
                        let ramp =
                            ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        interpolation * (1.0 - keep) + extrapolation * keep
                    })
                    .collect();
                (freqs, *attention_factor as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original,
            } => {
                let f = *factor as f32;
                let old = *original as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let freqs = plain(self.powers(self.theta))
                    .into_iter()
                    .map(|inv| {
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        let scaled = if (wavelen as f64) > low_wavelen {
                            inv / f
                        } else {
                            inv
                        };
                        let smooth = ((old as f32 / wavelen) - *low_freq_factor as f32)
                            / (*high_freq_factor as f32 - *low_freq_factor as f32);
                        // Neither below the high-frequency wavelength nor above the low one.
                        let w = wavelen as f64;
                        let medium = w >= high_wavelen && w <= low_wavelen;
                        if medium {
                            (1.0 - smooth) * scaled / f + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect();
                (freqs, 1.0)
            }
            RopeScaling::LongRope {
                short,
                long,
                original,
                attention_factor,
            } => {
                let factors = if seq_len > *original { long } else { short };
                let freqs = self
                    .powers(self.theta)
                    .iter()
                    .zip(factors)
                    .map(|(&p, &e)| 1.0 / (e as f32 * p))
                    .collect();
                (freqs, *attention_factor as f32)
            }
            RopeScaling::Factors {
                factors,
                attention_factor,
            } => {
                let freqs = plain(self.powers(self.theta))
                    .into_iter()
                    .zip(factors)
                    .map(|(inv, &f)| inv / f)
                    .collect();
                (freqs, *attention_factor as f32)
            }
        }
    }
}

/// The cosines and sines of the rotation of each row of a call: `rows[r]`
/// is at `positions[r]` of a sequence whose positions reach `seq_len(r)`.
/// Returns `[rows, dim / 2]` cosines and sines.
pub(crate) fn angles(
    rope: &Rope,
    positions: &[usize],
    seq_len: impl Fn(usize) -> usize,
) -> (Vec<f32>, Vec<f32>) {
    let half = rope.dim / 2;
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    let fixed = (!rope.depends_on_length()).then(|| rope.frequencies(0));
    let mut last: Option<(usize, Vec<f32>, f32)> = None;
    for (r, &p) in positions.iter().enumerate() {
        let (freqs, scale) = match &fixed {
            Some((f, s)) => (f.as_slice(), *s),
            None => {
                let len = seq_len(r);
                if last.as_ref().is_none_or(|(l, _, _)| *l != len) {
                    let (f, s) = rope.frequencies(len);
                    last = Some((len, f, s));
                }
                let (_, f, s) = last.as_ref().expect("just set");
                (f.as_slice(), *s)
            }
        };
        for &f in freqs {
            // float32 angles, as transformers multiplies positions and frequencies.
            let angle = p as f32 * f;
            cos.push(angle.cos() * scale);
            sin.push(angle.sin() * scale);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, positions: usize) -> RopeResult<Rope> {
        let v: Value = serde_json::from_str(json).unwrap();
        Rope::from_hf(Some(&v), 10000.0, 64, None, positions, None)
    }

    #[test]
    fn plain_and_linear_frequencies() {
        let plain = Rope::plain(10000.0, 8).frequencies(0).0;
        let want: Vec<f32> = (0..4)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0))
            .collect();
        assert_eq!(plain, want);
        let linear = parse(r#"{"rope_type": "linear", "factor": 4.0}"#, 128).unwrap();
        let (f, s) = linear.frequencies(0);
        assert_eq!(s, 1.0);
        assert!((f[0] - 0.25).abs() < 1e-7);
    }

    #[test]
    fn dynamic_changes_only_past_the_context() {
        let rope = parse(r#"{"type": "dynamic", "factor": 2.0}"#, 16).unwrap();
        assert_eq!(rope.frequencies(10), rope.frequencies(16));
        assert_ne!(rope.frequencies(16).0, rope.frequencies(20).0);
        assert!(rope.frequencies(20).0[1] < rope.frequencies(16).0[1]);
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        let rope = parse(
            r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500000.0}"#,
            512,
        )
        .unwrap();
        let plain = Rope::plain(500000.0, 64).frequencies(0).0;
        let (scaled, _) = rope.frequencies(0);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn unknown_kinds_and_bad_numbers_are_named() {
        let e = parse(r#"{"rope_type": "mrope"}"#, 64).unwrap_err();
        assert!(e.contains("\"mrope\""), "{e}");
        let e = parse(r#"{"rope_type": "linear", "factor": -1}"#, 64).unwrap_err();
        assert!(e.contains("factor"), "{e}");
        let e = parse(r#"{"rope_type": "longrope", "short_factor": [1.0]}"#, 64).unwrap_err();
        assert!(e.contains("short_factor"), "{e}");
        let e = parse(r#"{"rope_type": "llama3", "factor": 8.0}"#, 64).unwrap_err();
        assert!(e.contains("low_freq_factor"), "{e}");
    }
}
