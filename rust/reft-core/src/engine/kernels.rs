//! Matrix products for the few-rows case of decoding: `y = x Wᵀ` with `x`
//! of `m` rows (one per sequence in the batch) and `W` of `n` rows of `k`
//! weights, stored as float32 or as GGUF `Q4_1` / `Q8_0` blocks.
//!
//! Decoding reads every weight once per token, so these loops stream `W`
//! once per call, rows split across threads, and dot each row with every
//! row of `x`. Quantized rows are expanded block by block in registers and
//! multiplied with float32 activations (no rounding of the activations, unlike
//! llama.cpp's integer dot products). Each loop has an AVX2+FMA build chosen
//! at run time and a portable one.

use rayon::prelude::*;

/// Bytes of one GGUF `Q4_1` block: f16 scale, f16 minimum, 16 bytes of nibbles.
pub(crate) const Q4_1_BYTES: usize = 20;
/// Bytes of one GGUF `Q8_0` block: f16 scale, 32 signed bytes.
pub(crate) const Q8_0_BYTES: usize = 34;
/// Weights per block.
pub(crate) const BLOCK: usize = 32;

/// A weight matrix in one of the layouts the kernels read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rows<'a> {
    Q4_1(&'a [u8]),
    Q8_0(&'a [u8]),
}

use crate::checkpoint::f16_to_f32 as f16;

/// One `Q4_1` row dotted with `x` (`k` values), plus nothing else.
#[inline(always)]
fn dot_q4_1(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    let mut total = 0.0f32;
    for (b, block) in row.chunks_exact(Q4_1_BYTES).enumerate() {
        let d = f16(u16::from_le_bytes([block[0], block[1]]));
        let m = f16(u16::from_le_bytes([block[2], block[3]]));
        let qs = &block[4..20];
        let xs = &x[b * BLOCK..b * BLOCK + BLOCK];
        let mut acc = [0f32; 16];
        for j in 0..16 {
            acc[j] = ((qs[j] & 0x0f) as f32).mul_add(xs[j], acc[j]);
            acc[j] = ((qs[j] >> 4) as f32).mul_add(xs[j + 16], acc[j]);
        }
        let mut s = 0.0;
        for v in acc {
            s += v;
        }
        total += d * s + m * sums[b];
    }
    total
}

#[inline(always)]
fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    let mut total = 0.0f32;
    for (b, block) in row.chunks_exact(Q8_0_BYTES).enumerate() {
        let d = f16(u16::from_le_bytes([block[0], block[1]]));
        let xs = &x[b * BLOCK..b * BLOCK + BLOCK];
        let mut acc = [0f32; 16];
        for j in 0..16 {
            acc[j] = (block[2 + j] as i8 as f32).mul_add(xs[j], acc[j]);
            acc[j] = (block[18 + j] as i8 as f32).mul_add(xs[j + 16], acc[j]);
        }
        let mut s = 0.0;
        for v in acc {
            s += v;
        }
        total += d * s;
    }
    total
}

/// Fills `out` (`[rows of W][m]`) for the W rows starting at `first`.
#[inline(always)]
fn rows_body(
    w: Rows<'_>,
    x: &[f32],
    sums: &[f32],
    m: usize,
    k: usize,
    first: usize,
    out: &mut [f32],
) {
    let blocks = k / BLOCK;
    for (r, out_row) in out.chunks_exact_mut(m).enumerate() {
        let n = first + r;
        match w {
            Rows::Q4_1(data) => {
                let row = &data[n * blocks * Q4_1_BYTES..(n + 1) * blocks * Q4_1_BYTES];
                for (i, o) in out_row.iter_mut().enumerate() {
                    *o = dot_q4_1(
                        row,
                        &x[i * k..i * k + k],
                        &sums[i * blocks..i * blocks + blocks],
                    );
                }
            }
            Rows::Q8_0(data) => {
                let row = &data[n * blocks * Q8_0_BYTES..(n + 1) * blocks * Q8_0_BYTES];
                for (i, o) in out_row.iter_mut().enumerate() {
                    *o = dot_q8_0(row, &x[i * k..i * k + k]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(
    w: Rows<'_>,
    x: &[f32],
    sums: &[f32],
    m: usize,
    k: usize,
    first: usize,
    out: &mut [f32],
) {
    rows_body(w, x, sums, m, k, first, out)
}

fn rows(w: Rows<'_>, x: &[f32], sums: &[f32], m: usize, k: usize, first: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { rows_avx2(w, x, sums, m, k, first, out) };
        }
    }
    rows_body(w, x, sums, m, k, first, out)
}

/// Activations rounded to 8-bit blocks of 32, as llama.cpp's `Q8_1`: per
/// block a float32 scale `d`, the sum `d·Σq`, and 32 signed bytes.
#[cfg(target_arch = "x86_64")]
struct Q8Rows {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
fn quantize_rows(x: &[f32]) -> Q8Rows {
    let blocks = x.len() / BLOCK;
    let mut out = Q8Rows {
        q: vec![0; x.len()],
        d: Vec::with_capacity(blocks),
        s: Vec::with_capacity(blocks),
    };
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (j, v) in block.iter().enumerate() {
            let q = (v * inv).round() as i32;
            out.q[b * BLOCK + j] = q as i8;
            sum += q;
        }
        out.d.push(d);
        out.s.push(d * sum as f32);
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{f16, Q8Rows, BLOCK, Q4_1_BYTES, Q8_0_BYTES};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Scale and minimum of a block: two float16 values, converted together.
    #[inline(always)]
    unsafe fn halves(block: *const u8) -> (f32, f32) {
        let packed = _mm_cvtsi32_si128(std::ptr::read_unaligned(block as *const i32));
        let both = _mm_cvtph_ps(packed);
        (_mm_cvtss_f32(both), _mm_cvtss_f32(_mm_movehdup_ps(both)))
    }

    /// The nibbles of a `Q4_1` block as 32 bytes (low nibbles first).
    #[inline(always)]
    unsafe fn q4_nibbles(block: *const u8) -> __m256i {
        let mask = _mm_set1_epi8(0x0f);
        let raw = _mm_loadu_si128(block.add(4) as *const __m128i);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// 32 weight nibbles times 32 activation bytes, as 8 float sums.
    #[inline(always)]
    unsafe fn q4_sums(qw: __m256i, qx: *const i8) -> __m256 {
        let qx = _mm256_loadu_si256(qx as *const __m256i);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(
            _mm256_maddubs_epi16(qw, qx),
            _mm256_set1_epi16(1),
        ))
    }

    /// Σ over blocks of `Q4_1` weights times 8-bit activations, for the `C`
    /// activation rows from `first_row` (`blocks` blocks each): each block
    /// decoded once for all of them. Every row's sums are those of a tile
    /// of one row (even and odd blocks apart, in order), so a row gets the
    /// same bits in any tile.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn dot_q4_1<const C: usize>(
        row: &[u8],
        x: &Q8Rows,
        first_row: usize,
        blocks: usize,
    ) -> [f32; C] {
        let mut acc = [[_mm256_setzero_ps(); 2]; C];
        let mut mins = [[0f32; 2]; C];
        let base = row.as_ptr();
        let first = first_row * blocks;
        let qx = x.q.as_ptr().add(first * BLOCK);
        let (xd, xs) = (x.d.as_ptr().add(first), x.s.as_ptr().add(first));
        // One block into the accumulators `LANE` (even blocks 0, odd 1),
        // a constant index so that they stay in registers.
        macro_rules! block {
            ($b:expr, $lane:literal) => {{
                let b = $b;
                let p = base.add(b * Q4_1_BYTES);
                let (d, m) = halves(p);
                let qw = q4_nibbles(p);
                for c in 0..C {
                    let at = c * blocks + b;
                    let sums = q4_sums(qw, qx.add(at * BLOCK));
                    acc[c][$lane] =
                        _mm256_fmadd_ps(sums, _mm256_set1_ps(d * *xd.add(at)), acc[c][$lane]);
                    mins[c][$lane] += m * *xs.add(at);
                }
            }};
        }
        let mut b = 0;
        while b + 2 <= blocks {
            block!(b, 0);
            block!(b + 1, 1);
            b += 2;
        }
        if b < blocks {
            block!(b, 0);
        }
        let mut out = [0f32; C];
        for c in 0..C {
            out[c] = hsum(_mm256_add_ps(acc[c][0], acc[c][1])) + mins[c][0] + mins[c][1];
        }
        out
    }

    /// Σ over blocks of `Q8_0` weights times 8-bit activations.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0(row: &[u8], x: &Q8Rows, first_block: usize) -> f32 {
        let blocks = row.len() / Q8_0_BYTES;
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for b in 0..blocks {
            let block = row.as_ptr().add(b * Q8_0_BYTES);
            let d = f16(u16::from_le_bytes([*block, *block.add(1)]));
            let qw = _mm256_loadu_si256(block.add(2) as *const __m256i);
            let xb = first_block + b;
            let qx = _mm256_loadu_si256(x.q.as_ptr().add(xb * BLOCK) as *const __m256i);
            // maddubs wants an unsigned operand: |w| times x carrying w's sign.
            let products = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
            let products = _mm256_madd_epi16(products, ones);
            acc = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(products),
                _mm256_set1_ps(d * x.d[xb]),
                acc,
            );
        }
        hsum(acc)
    }

    /// Fills `out` (`[rows of W][m]`) for the W rows starting at `first`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows(
        data: &[u8],
        q4: bool,
        x: &Q8Rows,
        m: usize,
        k: usize,
        first: usize,
        out: &mut [f32],
    ) {
        let blocks = k / BLOCK;
        let width = blocks * if q4 { Q4_1_BYTES } else { Q8_0_BYTES };
        for (r, out_row) in out.chunks_exact_mut(m).enumerate() {
            let row = &data[(first + r) * width..(first + r + 1) * width];
            if q4 {
                // Activation rows 4 at a time, then the rest.
                let mut i = 0;
                while i < m {
                    let count = (m - i).min(4);
                    let target = &mut out_row[i..i + count];
                    match count {
                        4 => target.copy_from_slice(&dot_q4_1::<4>(row, x, i, blocks)),
                        3 => target.copy_from_slice(&dot_q4_1::<3>(row, x, i, blocks)),
                        2 => target.copy_from_slice(&dot_q4_1::<2>(row, x, i, blocks)),
                        _ => target.copy_from_slice(&dot_q4_1::<1>(row, x, i, blocks)),
                    }
                    i += count;
                }
            } else {
                for (i, o) in out_row.iter_mut().enumerate() {
                    *o = dot_q8_0(row, x, i * blocks);
                }
            }
        }
    }
}

/// What [`matmul_rows`]'s 8-bit rounding of the activations leaves out of
/// `x` (`x` minus its rounding), where the kernels round them (x86 with
/// AVX2); `None` where the products take float activations.
pub(crate) fn activation_residual(x: &[f32]) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
            && x.len().is_multiple_of(BLOCK)
        {
            let q = quantize_rows(x);
            let residual = x
                .chunks_exact(BLOCK)
                .zip(q.q.chunks_exact(BLOCK))
                .zip(&q.d)
                .flat_map(|((x, q), &d)| x.iter().zip(q).map(move |(&v, &q)| v - q as f32 * d))
                .collect();
            return Some(residual);
        }
    }
    let _ = x;
    None
}

/// `y = x Wᵀ`: `x` is `[m, k]`, `W` has `n` rows of `k`; returns `[m, n]`.
///
/// The caller checks that `W` holds `n * k` weights and, for the block
/// layouts, that `k` is a multiple of 32.
pub(crate) fn matmul_rows(w: Rows<'_>, x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    // Block sums of x, for the minimum term of Q4_1.
    let sums: Vec<f32> = match w {
        Rows::Q4_1(_) => x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect(),
        _ => Vec::new(),
    };
    let mut transposed = vec![0f32; n * m];
    // Enough rows per task to amortise scheduling, enough tasks to balance.
    let per_task = (n / (rayon::current_num_threads() * 8)).clamp(8, 256);
    #[cfg(target_arch = "x86_64")]
    {
        let quantized = match w {
            Rows::Q4_1(data) => Some((data, true)),
            Rows::Q8_0(data) => Some((data, false)),
        };
        if let Some((data, q4)) = quantized {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                let xq = quantize_rows(x);
                transposed
                    .par_chunks_mut(per_task * m)
                    .enumerate()
                    // SAFETY: the CPU has the features the kernel is compiled for.
                    .for_each(|(t, out)| unsafe {
                        avx2::rows(data, q4, &xq, m, k, t * per_task, out)
                    });
                return transpose(transposed, m, n);
            }
        }
    }
    transposed
        .par_chunks_mut(per_task * m)
        .enumerate()
        .for_each(|(t, out)| rows(w, x, &sums, m, k, t * per_task, out));
    transpose(transposed, m, n)
}

/// The float32 values of `n` rows of `k` weights.
pub(crate) fn dequantize(w: Rows<'_>, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * k];
    out.par_chunks_mut(k)
        .enumerate()
        .for_each(|(r, row)| dequantize_row(w, r, row));
    out
}

/// The float32 values of row `r` (`row.len()` weights).
fn dequantize_row(w: Rows<'_>, r: usize, row: &mut [f32]) {
    let blocks = row.len() / BLOCK;
    match w {
        Rows::Q4_1(data) => {
            for b in 0..blocks {
                let block = &data[(r * blocks + b) * Q4_1_BYTES..][..Q4_1_BYTES];
                let d = f16(u16::from_le_bytes([block[0], block[1]]));
                let m = f16(u16::from_le_bytes([block[2], block[3]]));
                for j in 0..16 {
                    row[b * BLOCK + j] = d * (block[4 + j] & 0x0f) as f32 + m;
                    row[b * BLOCK + j + 16] = d * (block[4 + j] >> 4) as f32 + m;
                }
            }
        }
        Rows::Q8_0(data) => {
            for b in 0..blocks {
                let block = &data[(r * blocks + b) * Q8_0_BYTES..][..Q8_0_BYTES];
                let d = f16(u16::from_le_bytes([block[0], block[1]]));
                for j in 0..BLOCK {
                    row[b * BLOCK + j] = d * block[2 + j] as i8 as f32;
                }
            }
        }
    }
}

/// `[n][m]` to `[m][n]`.
fn transpose(transposed: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m == 1 {
        return transposed;
    }
    let mut y = vec![0f32; m * n];
    for (j, row) in transposed.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(w: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn values(count: usize, seed: u32) -> Vec<f32> {
        (0..count)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn f16_bits(v: f32) -> u16 {
        // round-to-nearest f32 -> f16 for normal values, enough for tests
        let bits = v.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
        let mant = bits & 0x7f_ffff;
        if v == 0.0 {
            return sign;
        }
        let rounded = (mant + 0x1000) >> 13;
        sign | (((exp as u16) << 10) + rounded as u16)
    }

    /// `n` rows of `k` weights as GGUF `Q4_1` and `Q8_0` blocks, laid out
    /// as ggml lays them (f16 scale, f16 minimum for `Q4_1`, low nibbles
    /// for the first 16 weights), with the float values each block stands for.
    fn quantized(n: usize, k: usize) -> (Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>) {
        let mut q4 = Vec::new();
        let mut q8 = Vec::new();
        let (mut w4, mut w8) = (Vec::new(), Vec::new());
        for r in 0..n * k / BLOCK {
            let (d, mn) = (0.01 + r as f32 * 1e-3, -0.05 * (r % 3) as f32);
            let (d, mn) = (f16(f16_bits(d)), f16(f16_bits(mn)));
            q4.extend_from_slice(&f16_bits(d).to_le_bytes());
            q4.extend_from_slice(&f16_bits(mn).to_le_bytes());
            q8.extend_from_slice(&f16_bits(d).to_le_bytes());
            let nibbles: Vec<u8> = (0..32).map(|j| ((j * 7 + r) % 16) as u8).collect();
            for j in 0..16 {
                q4.push(nibbles[j] | (nibbles[j + 16] << 4));
            }
            for &q in &nibbles {
                w4.push(d * q as f32 + mn);
            }
            for j in 0..32 {
                let q = ((j * 13 + r) % 255) as i32 - 127;
                q8.push(q as i8 as u8);
                w8.push(d * q as f32);
            }
        }
        (q4, w4, q8, w8)
    }

    #[test]
    fn blocks_expand_to_the_values_they_stand_for() {
        let (n, k) = (5, 96);
        let (q4, w4, q8, w8) = quantized(n, k);
        assert_eq!(dequantize(Rows::Q4_1(&q4), n, k), w4);
        assert_eq!(dequantize(Rows::Q8_0(&q8), n, k), w8);
    }

    #[test]
    fn quantized_rows_match_their_expansion() {
        // 7 rows: a tile of 4 activation rows and one of 3; 3 blocks a row
        // (an odd block last).
        let (m, k, n) = (7, 96, 33);
        let x = values(m * k, 3);
        let (q4, w4, q8, w8) = quantized(n, k);
        let got4 = matmul_rows(Rows::Q4_1(&q4), &x, m, k, n);
        let got8 = matmul_rows(Rows::Q8_0(&q8), &x, m, k, n);
        for (got, w) in [(got4, w4), (got8, w8)] {
            let expected = naive(&w, &x, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    // Activations may be rounded to 8-bit blocks: each value
                    // moves by at most half a step, amax / 254.
                    let bound: f32 = (0..k)
                        .map(|t| {
                            let block = &x[i * k + t / BLOCK * BLOCK..][..BLOCK];
                            let step = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                            w[j * k + t].abs() * step / 2.0
                        })
                        .sum();
                    let (a, b) = (got[i * n + j], expected[i * n + j]);
                    assert!(
                        (a - b).abs() <= bound * 1.01 + 1e-4,
                        "{a} vs {b} (bound {bound})"
                    );
                }
            }
        }
    }

    #[test]
    fn a_quantized_row_gets_the_same_bits_alone_and_in_any_batch() {
        let (k, n) = (160, 19);
        let x = values(11 * k, 4);
        let (q4, _, q8, _) = quantized(n, k);
        for w in [Rows::Q4_1(&q4), Rows::Q8_0(&q8)] {
            let whole = matmul_rows(w, &x, 11, k, n);
            for (from, count) in [(0, 1), (3, 1), (10, 1), (1, 2), (5, 3), (2, 5), (4, 7)] {
                let some = matmul_rows(w, &x[from * k..(from + count) * k], count, k, n);
                assert_eq!(
                    some,
                    whole[from * n..(from + count) * n],
                    "{count} rows from {from}"
                );
            }
        }
    }
}
