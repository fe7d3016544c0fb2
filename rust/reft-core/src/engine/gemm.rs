//! `y = x Wᵀ + b` in float32 for any number of rows of `x`, with `W` stored
//! `[n, k]` as the model files store it: no packing of `W` per call, no
//! second copy of the weights.
//!
//! Both operands are read along `k`, so the product is a grid of dot
//! products, computed in tiles of 3 weight rows by 3 rows of `x` (9 vector
//! accumulators, 6 loads per 9 fused multiply-adds). The weight rows of a
//! tile stay in the L1 cache while every block of `x` rows passes over
//! them; blocks of `x` rows are sized to stay in L2. Threads split the
//! weight rows.
//!
//! Every output value is summed in the same order whatever the tile it
//! falls in and whatever the number of rows, so a row's result does not
//! depend on the other rows of the batch: a sequence decoded alone and in a
//! batch gets bit-identical products.

use rayon::prelude::*;

/// Weight rows per tile.
const TILE_W: usize = 3;
/// Rows of `x` per tile.
const TILE_X: usize = 3;
/// Bytes of `x` rows kept in L2 while a thread's weight rows pass.
const X_BLOCK_BYTES: usize = 256 * 1024;

/// A raw pointer to the output, written by several threads at disjoint
/// columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only its own columns of the output.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `y = x Wᵀ + b`: `x` is `[m, k]`, `W` has `n` rows of `k`, `b` has `n`
/// values; returns `[m, n]`.
///
pub(crate) fn matmul(
    w: &[f32],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let threads = rayon::current_num_threads().max(1);
    // Tasks of whole tiles: enough per task to amortise scheduling, enough
    // tasks to balance the threads.
    let tiles = n.div_ceil(TILE_W);
    let per_task = tiles.div_ceil(threads * 4).clamp(4, 64) * TILE_W;
    let out = Out(y.as_mut_ptr());
    let tasks = n.div_ceil(per_task);
    (0..tasks).into_par_iter().for_each(|t| {
        let first = t * per_task;
        let last = (first + per_task).min(n);
        // SAFETY: the task writes the columns first..last of `y` only, and
        // `y` outlives the parallel loop.
        unsafe { task(w, x, m, k, n, first, last, bias, out) };
    });
    y
}

/// Rows of `x` per L2 block, a multiple of the tile.
fn x_block(k: usize) -> usize {
    let rows = (X_BLOCK_BYTES / (4 * k.max(1))).max(TILE_X);
    rows / TILE_X * TILE_X
}

/// The columns `first..last` of `y`, all rows.
///
/// # Safety
/// `out` points to `m * n` floats; no other thread writes these columns.
#[allow(clippy::too_many_arguments)]
unsafe fn task(
    w: &[f32],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    first: usize,
    last: usize,
    bias: Option<&[f32]>,
    out: Out,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return avx2::task(w, x, m, k, n, first, last, bias, out);
        }
    }
    portable::task(w, x, m, k, n, first, last, bias, out)
}

/// The loops of a task, shared by both builds; `tile` is the build's kernel.
macro_rules! task_body {
    ($w:ident, $x:ident, $m:ident, $k:ident, $n:ident, $first:ident, $last:ident,
     $bias:ident, $out:ident, $tile:ident) => {{
        let block = x_block($k);
        let mut start = 0;
        while start < $m {
            let end = (start + block).min($m);
            let mut j = $first;
            while j < $last {
                let count = TILE_W.min($last - j);
                let rows = &$w[j * $k..(j + count) * $k];
                let mut i = start;
                while i < end {
                    let xs = &$x[i * $k..];
                    let take = TILE_X.min(end - i);
                    let mut sums = [[0f32; TILE_X]; TILE_W];
                    match (count, take) {
                        (3, 3) => $tile::<3, 3>(rows, xs, $k, &mut sums),
                        (3, 2) => $tile::<3, 2>(rows, xs, $k, &mut sums),
                        (3, 1) => $tile::<3, 1>(rows, xs, $k, &mut sums),
                        (2, 3) => $tile::<2, 3>(rows, xs, $k, &mut sums),
                        (2, 2) => $tile::<2, 2>(rows, xs, $k, &mut sums),
                        (2, 1) => $tile::<2, 1>(rows, xs, $k, &mut sums),
                        (1, 3) => $tile::<1, 3>(rows, xs, $k, &mut sums),
                        (1, 2) => $tile::<1, 2>(rows, xs, $k, &mut sums),
                        _ => $tile::<1, 1>(rows, xs, $k, &mut sums),
                    }
                    for (r, column) in sums.iter().enumerate().take(count) {
                        let b = $bias.map_or(0.0, |b| b[j + r]);
                        for (c, &v) in column.iter().enumerate().take(take) {
                            *$out.0.add((i + c) * $n + j + r) = v + b;
                        }
                    }
                    i += take;
                }
                j += count;
            }
            start = end;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
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

    /// `sums[r][c] = W[r] · x[c]` for `R` weight rows and `C` rows of `x`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const R: usize, const C: usize>(
        w: &[f32],
        x: &[f32],
        k: usize,
        sums: &mut [[f32; TILE_X]; TILE_W],
    ) {
        debug_assert!(w.len() >= R * k && x.len() >= C * k);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let whole = k / 8 * 8;
        let mut t = 0;
        while t < whole {
            let mut wv = [_mm256_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(r * k + t));
            }
            for c in 0..C {
                let xv = _mm256_loadu_ps(xp.add(c * k + t));
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
                }
            }
            t += 8;
        }
        for r in 0..R {
            for c in 0..C {
                let mut s = hsum(acc[r][c]);
                for u in whole..k {
                    s = (*wp.add(r * k + u)).mul_add(*xp.add(c * k + u), s);
                }
                sums[r][c] = s;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn task(
        w: &[f32],
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        first: usize,
        last: usize,
        bias: Option<&[f32]>,
        out: Out,
    ) {
        task_body!(w, x, m, k, n, first, last, bias, out, tile)
    }
}

mod portable {
    use super::*;

    /// The same sums in the same order as the vector build: 8 lanes along
    /// `k`, then the lanes added pairwise, then the tail.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    fn tile<const R: usize, const C: usize>(
        w: &[f32],
        x: &[f32],
        k: usize,
        sums: &mut [[f32; TILE_X]; TILE_W],
    ) {
        let whole = k / 8 * 8;
        for r in 0..R {
            for c in 0..C {
                let (wr, xc) = (&w[r * k..r * k + k], &x[c * k..c * k + k]);
                let mut lanes = [0f32; 8];
                for t in (0..whole).step_by(8) {
                    for l in 0..8 {
                        lanes[l] = wr[t + l].mul_add(xc[t + l], lanes[l]);
                    }
                }
                let quad: [f32; 4] = std::array::from_fn(|l| lanes[l] + lanes[l + 4]);
                let (a, b) = (quad[0] + quad[2], quad[1] + quad[3]);
                let mut s = a + b;
                for u in whole..k {
                    s = wr[u].mul_add(xc[u], s);
                }
                sums[r][c] = s;
            }
        }
    }

    /// # Safety
    /// As [`super::task`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn task(
        w: &[f32],
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        first: usize,
        last: usize,
        bias: Option<&[f32]>,
        out: Out,
    ) {
        task_body!(w, x, m, k, n, first, last, bias, out, tile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(count: usize, seed: u32) -> Vec<f32> {
        (0..count)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn plain(w: &[f32], x: &[f32], m: usize, k: usize, n: usize, b: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                y[i * n + j] = (dot + b[j] as f64) as f32;
            }
        }
        y
    }

    #[test]
    fn products_match_the_plain_sum_at_every_shape() {
        // Remainders of both tiles, k with and without a tail, blocks of x
        // rows split (k = 4096 gives 15-row blocks).
        for (m, k, n) in [
            (1, 8, 1),
            (2, 13, 5),
            (4, 64, 7),
            (7, 576, 300),
            (31, 40, 100),
            (40, 4096, 11),
            (100, 96, 64),
        ] {
            let (w, x, b) = (values(n * k, 1), values(m * k, 2), values(n, 3));
            let got = matmul(&w, &x, m, k, n, Some(&b));
            let expected = plain(&w, &x, m, k, n, &b);
            for (a, e) in got.iter().zip(&expected) {
                assert!(
                    (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{m}x{k}x{n}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
        let (k, n) = (200, 37);
        let w = values(n * k, 5);
        let x = values(50 * k, 6);
        let whole = matmul(&w, &x, 50, k, n, None);
        for i in [0, 1, 2, 3, 4, 26, 49] {
            let alone = matmul(&w, &x[i * k..(i + 1) * k], 1, k, n, None);
            assert_eq!(alone, whole[i * n..(i + 1) * n], "row {i}");
        }
        // Two rows taken together, at an offset that shifts the tiles.
        let pair = matmul(&w, &x[4 * k..6 * k], 2, k, n, None);
        assert_eq!(pair, whole[4 * n..6 * n]);
    }

    #[test]
    fn the_portable_build_sums_as_the_vector_build() {
        let (m, k, n) = (5, 77, 8);
        let (w, x) = (values(n * k, 7), values(m * k, 8));
        let fast = matmul(&w, &x, m, k, n, None);
        let mut slow = vec![0f32; m * n];
        // SAFETY: one task writes every column of `slow`.
        unsafe { portable::task(&w, &x, m, k, n, 0, n, None, Out(slow.as_mut_ptr())) };
        assert_eq!(fast, slow);
    }
}
