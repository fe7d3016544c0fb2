//! Choosing the next token from logits: greedy, or sampled with temperature,
//! top-k and top-p from a seeded generator (same seed, same tokens).

use crate::error::{Error, Result};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); above 0 samples from the
    /// softmax of `logits / temperature`.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the fewest most likely tokens whose probabilities sum to at least `p`.
    pub top_p: Option<f64>,
    /// Seed of the generator; `None` draws one from the clock.
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: None,
        }
    }
}

impl Sampling {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "temperature must be a finite number >= 0, found {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::InvalidArgument("top_k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "top_p must lie in (0, 1], found {p}"
                )));
            }
        }
        Ok(())
    }
}

/// SplitMix64: small, fast and fully determined by its seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        let seed = seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        });
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The index of the largest value (the first one on ties, as `argmax` in torch).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || (logits[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best as u32
}

/// Picks one token from one row of logits.
pub(crate) fn choose(logits: &[f32], sampling: &Sampling, rng: &mut Rng) -> u32 {
    if sampling.temperature == 0.0 || logits.len() <= 1 {
        return argmax(logits);
    }
    let t = sampling.temperature;
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let key = |i: &u32| logits[*i as usize];
    let keep = sampling.top_k.unwrap_or(logits.len()).min(logits.len());
    if keep < order.len() {
        order.select_nth_unstable_by(keep - 1, |a, b| key(b).total_cmp(&key(a)));
        order.truncate(keep);
    }
    order.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
    let top = key(&order[0]) as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - top) / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = sampling.top_p {
        let mut cumulative = 0.0;
        let mut cut = probs.len();
        for (i, &q) in probs.iter().enumerate() {
            cumulative += q;
            if cumulative >= p {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut);
        order.truncate(cut);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let mut u = rng.next_f64();
    for (i, &q) in probs.iter().enumerate() {
        if u < q {
            return order[i];
        }
        u -= q;
    }
    order[probs.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, -1.0]), 1);
        let mut rng = Rng::new(Some(1));
        assert_eq!(choose(&[0.0, 3.0, 1.0], &Sampling::default(), &mut rng), 1);
    }

    #[test]
    fn same_seed_same_draws_and_filters_hold() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let sampling = Sampling {
            temperature: 0.8,
            top_k: Some(5),
            top_p: Some(0.9),
            seed: Some(7),
        };
        let draw = |seed| {
            let mut rng = Rng::new(Some(seed));
            (0..200)
                .map(|_| choose(&logits, &sampling, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut top5: Vec<u32> = (0..50).collect();
        top5.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        top5.truncate(5);
        assert!(draw(7).iter().all(|t| top5.contains(t)));
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()];
        let sampling = Sampling {
            temperature: 1.0,
            seed: Some(3),
            ..Sampling::default()
        };
        let mut rng = Rng::new(Some(3));
        let mut counts = [0usize; 3];
        for _ in 0..60_000 {
            counts[choose(&logits, &sampling, &mut rng) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let expected = (i + 1) as f64 / 6.0;
            assert!((c as f64 / 60_000.0 - expected).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn ranges_are_checked() {
        for bad in [
            Sampling {
                temperature: -1.0,
                ..Sampling::default()
            },
            Sampling {
                top_k: Some(0),
                ..Sampling::default()
            },
            Sampling {
                top_p: Some(1.5),
                ..Sampling::default()
            },
            Sampling {
                top_p: Some(0.0),
                ..Sampling::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(Error::InvalidArgument(_))));
        }
    }
}
