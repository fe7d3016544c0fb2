//! Products of many rows (prompts, large batches) with stored weights:
//! each thread widens [`P`] weight rows at a time to float32 in a buffer
//! that stays in L1, and multiplies them with the activations transposed
//! (`[k][m]`, once per call): a register tile holds `P` weight rows × 32
//! activation rows, and each step along `k` broadcasts one weight of each
//! row against two vectors of 16 activation rows (outer products, as
//! general matrix products are made; no sums across lanes). The weights
//! are unpacked once per call and the products are float products with
//! the values the blocks stand for (no rounding of the activations: the
//! caller rounds them first for llama.cpp's arithmetic).
//!
//! Each output is the fused multiply-adds along `k` in order, in its own
//! lane, whatever the tile it falls in and whatever the build (AVX-512,
//! AVX2 and plain Rust give the same bits): a row's result does not depend
//! on the other rows.

use rayon::prelude::*;

use super::kernels::{Isa, Rows};
use super::quant::{unpack_row, Unpacked, GROUP};

/// Weight rows per tile.
const P: usize = 12;
/// Activation rows per vector step; `m` is padded to a multiple.
const LANES: usize = 16;
/// Activation rows per block (a multiple of 2 · [`LANES`]).
const BLOCK_ROWS: usize = 128;

/// Row `n` of `w` as float32 into `out` (`k` values).
#[inline(always)]
unsafe fn widen<T: Tile>(
    w: Rows<'_>,
    n: usize,
    k: usize,
    unpacked: &mut Unpacked,
    out: &mut [f32],
    simd: bool,
) {
    match w {
        Rows::Blocks(t, data) => {
            let bytes = t.row_bytes(k);
            unpack_row(t, &data[n * bytes..(n + 1) * bytes], unpacked, simd);
            let center = unpacked.center as f32;
            for (g, (out, q)) in out
                .chunks_exact_mut(GROUP)
                .zip(unpacked.q.chunks_exact(GROUP))
                .enumerate()
            {
                let out: &mut [f32; GROUP] = out.try_into().expect("a group");
                let q: &[u8; GROUP] = q.try_into().expect("a group");
                T::group(q, unpacked.scale[g], unpacked.offset[g], center, out);
            }
        }
        Rows::F16(h) => {
            for (v, &b) in out.iter_mut().zip(&h[n * k..(n + 1) * k]) {
                *v = super::quant::f16_value(b);
            }
        }
        Rows::Bf16(h) => {
            for (v, &b) in out.iter_mut().zip(&h[n * k..(n + 1) * k]) {
                *v = super::quant::bf16_to_f32(b);
            }
        }
    }
}

/// One build's tile: `V` × [`LANES`] activation rows from `i` (of a block
/// of the transposed, padded activations, `xt` as `[k][mp]`) against the
/// `p ≤ P` widened rows of `w` (rows of `k`); writes `out[b·m + row]` for
/// the rows below `limit`.
trait Tile {
    /// `out[j] = scale · (q[j] − center) + offset`.
    #[inline(always)]
    unsafe fn group(q: &[u8; GROUP], scale: f32, offset: f32, center: f32, out: &mut [f32; GROUP]) {
        for j in 0..GROUP {
            out[j] = scale * (q[j] as f32 - center) + offset;
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const V: usize>(
        xt: &[f32],
        mp: usize,
        i: usize,
        w: &[f32],
        p: usize,
        k: usize,
        m: usize,
        limit: usize,
        out: &mut [f32],
    );
}

/// Writes `acc[b][row]` to `out[b·m + i + row]` for `b < p`, rows below `m`.
#[inline(always)]
fn store<const V: usize>(
    acc: &[[[f32; LANES]; V]; P],
    p: usize,
    i: usize,
    m: usize,
    limit: usize,
    out: &mut [f32],
) {
    let rows = (limit - i).min(V * LANES);
    for (b, lines) in acc.iter().enumerate().take(p) {
        let target = &mut out[b * m + i..b * m + i + rows];
        for (row, t) in target.iter_mut().enumerate() {
            *t = lines[row / LANES][row % LANES];
        }
    }
}

struct Portable;

impl Tile for Portable {
    #[inline(always)]
    unsafe fn tile<const V: usize>(
        xt: &[f32],
        mp: usize,
        i: usize,
        w: &[f32],
        p: usize,
        k: usize,
        m: usize,
        limit: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[[0f32; LANES]; V]; P];
        for t in 0..k {
            let xs = &xt[t * mp + i..t * mp + i + V * LANES];
            for (b, lines) in acc.iter_mut().enumerate().take(p) {
                let wv = w[b * k + t];
                for (v, line) in lines.iter_mut().enumerate() {
                    for (lane, a) in line.iter_mut().enumerate() {
                        *a = xs[v * LANES + lane].mul_add(wv, *a);
                    }
                }
            }
        }
        store::<V>(&acc, p, i, m, limit, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    pub(super) struct Avx512;

    impl Tile for Avx512 {
        #[inline(always)]
        unsafe fn group(
            q: &[u8; GROUP],
            scale: f32,
            offset: f32,
            center: f32,
            out: &mut [f32; GROUP],
        ) {
            let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                q.as_ptr() as *const __m128i
            )));
            let v = _mm512_sub_ps(v, _mm512_set1_ps(center));
            let v = _mm512_add_ps(
                _mm512_mul_ps(v, _mm512_set1_ps(scale)),
                _mm512_set1_ps(offset),
            );
            _mm512_storeu_ps(out.as_mut_ptr(), v);
        }

        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn tile<const V: usize>(
            xt: &[f32],
            mp: usize,
            i: usize,
            w: &[f32],
            p: usize,
            k: usize,
            m: usize,
            limit: usize,
            out: &mut [f32],
        ) {
            debug_assert!(xt.len() >= k * mp && i + V * LANES <= mp && w.len() >= P * k);
            let mut acc = [[_mm512_setzero_ps(); V]; P];
            let xp = xt.as_ptr().add(i);
            // Rows past `p` hold stale values; never stored.
            let mut wp = w.as_ptr();
            let mut xr = xp;
            for _ in 0..k {
                let mut xv = [_mm512_setzero_ps(); V];
                for v in 0..V {
                    xv[v] = _mm512_loadu_ps(xr.add(v * LANES));
                }
                xr = xr.add(mp);
                for b in 0..P {
                    let wv = _mm512_set1_ps(*wp.add(b * k));
                    for v in 0..V {
                        acc[b][v] = _mm512_fmadd_ps(xv[v], wv, acc[b][v]);
                    }
                }
                wp = wp.add(1);
            }
            let rows = (limit - i).min(V * LANES);
            for b in 0..p {
                for v in 0..V {
                    let first = v * LANES;
                    if first >= rows {
                        break;
                    }
                    let mask: __mmask16 = if rows - first >= LANES {
                        0xffff
                    } else {
                        (1u16 << (rows - first)) - 1
                    };
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(b * m + i + first), mask, acc[b][v]);
                }
            }
        }
    }

    pub(super) struct Avx2;

    impl Tile for Avx2 {
        #[inline(always)]
        unsafe fn group(
            q: &[u8; GROUP],
            scale: f32,
            offset: f32,
            center: f32,
            out: &mut [f32; GROUP],
        ) {
            for h in 0..2 {
                let raw = _mm_loadl_epi64(q.as_ptr().add(8 * h) as *const __m128i);
                let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(raw));
                let v = _mm256_sub_ps(v, _mm256_set1_ps(center));
                let v = _mm256_add_ps(
                    _mm256_mul_ps(v, _mm256_set1_ps(scale)),
                    _mm256_set1_ps(offset),
                );
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), v);
            }
        }

        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn tile<const V: usize>(
            xt: &[f32],
            mp: usize,
            i: usize,
            w: &[f32],
            p: usize,
            k: usize,
            m: usize,
            limit: usize,
            out: &mut [f32],
        ) {
            debug_assert!(xt.len() >= k * mp && i + V * LANES <= mp && w.len() >= P * k);
            // Half the weight rows at a time keep the sums in 16 registers:
            // 6 rows × 2 vectors of 8 activation rows.
            const HALF: usize = P / 2;
            for v in 0..V {
                for half in 0..2 {
                    let first_row = half * HALF;
                    if first_row >= p {
                        break;
                    }
                    let count = (p - first_row).min(HALF);
                    let mut acc = [[_mm256_setzero_ps(); 2]; HALF];
                    let xp = xt.as_ptr().add(i + v * LANES);
                    let mut wp = w.as_ptr().add(first_row * k);
                    let mut xr = xp;
                    for _ in 0..k {
                        let x0 = _mm256_loadu_ps(xr);
                        let x1 = _mm256_loadu_ps(xr.add(8));
                        xr = xr.add(mp);
                        for b in 0..HALF {
                            let wv = _mm256_set1_ps(*wp.add(b * k));
                            acc[b][0] = _mm256_fmadd_ps(x0, wv, acc[b][0]);
                            acc[b][1] = _mm256_fmadd_ps(x1, wv, acc[b][1]);
                        }
                        wp = wp.add(1);
                    }
                    let rows_here = (limit - i)
                        .min(V * LANES)
                        .saturating_sub(v * LANES)
                        .min(LANES);
                    for b in 0..count {
                        let mut lanes = [0f32; LANES];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[b][0]);
                        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[b][1]);
                        let at = (first_row + b) * m + i + v * LANES;
                        out[at..at + rows_here].copy_from_slice(&lanes[..rows_here]);
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")]
    pub(super) unsafe fn task_avx512(
        w: Rows<'_>,
        blocks: &[Vec<f32>],
        m: usize,
        k: usize,
        first: usize,
        out: &mut [f32],
    ) {
        task::<Avx512>(w, blocks, m, k, first, out, true)
    }

    #[target_feature(enable = "avx2,fma,f16c,bmi2")]
    pub(super) unsafe fn task_avx2(
        w: Rows<'_>,
        blocks: &[Vec<f32>],
        m: usize,
        k: usize,
        first: usize,
        out: &mut [f32],
    ) {
        task::<Avx2>(w, blocks, m, k, first, out, true)
    }
}

/// Fills `out` (`[rows of W][m]`, W rows from `first`) from the
/// transposed activations in blocks of rows (each `[k][width]`).
#[inline(always)]
unsafe fn task<T: Tile>(
    w: Rows<'_>,
    blocks: &[Vec<f32>],
    m: usize,
    k: usize,
    first: usize,
    out: &mut [f32],
    simd: bool,
) {
    let count = out.len() / m;
    let mut unpacked = Unpacked::new(if matches!(w, Rows::Blocks(..)) { k } else { 0 });
    let mut rows = vec![0f32; P * k];
    for j in (0..count).step_by(P) {
        let p = (count - j).min(P);
        for b in 0..p {
            widen::<T>(
                w,
                first + j + b,
                k,
                &mut unpacked,
                &mut rows[b * k..(b + 1) * k],
                simd,
            );
        }
        let panel = &mut out[j * m..(j + p) * m];
        let mut base = 0;
        for xt in blocks {
            let mp = xt.len() / k;
            let mut i = 0;
            while i < mp {
                let (limit, out) = (m - base, &mut panel[base..]);
                if mp - i >= 2 * LANES {
                    T::tile::<2>(xt, mp, i, &rows, p, k, m, limit, out);
                    i += 2 * LANES;
                } else {
                    T::tile::<1>(xt, mp, i, &rows, p, k, m, limit, out);
                    i += LANES;
                }
            }
            base += mp;
        }
    }
}

/// `y = x Wᵀ` (`[m, n]`) with the build `isa`, the weights widened
/// [`P`] rows at a time; the result is transposed, `[n][m]`.
pub(crate) fn matmul_transposed(
    isa: Isa,
    w: Rows<'_>,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    let mut transposed = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return transposed;
    }
    // The activations as blocks of up to BLOCK_ROWS rows, each `[k][width]`
    // (the last padded with zeros to whole vectors), so that the block a
    // panel of weights meets stays in L2.
    let blocks: Vec<Vec<f32>> = x
        .chunks(BLOCK_ROWS * k)
        .map(|part| {
            let rows = part.len() / k;
            let width = rows.div_ceil(LANES) * LANES;
            let mut xt = vec![0f32; k * width];
            for (r, row) in part.chunks_exact(k).enumerate() {
                for (t, &v) in row.iter().enumerate() {
                    xt[t * width + r] = v;
                }
            }
            xt
        })
        .collect();
    let blocks = &blocks;
    // Whole tiles of weight rows per task, enough tasks to balance.
    let per_task = (n / (rayon::current_num_threads() * 4)).clamp(P, 240) / P * P;
    transposed
        .par_chunks_mut(per_task * m)
        .enumerate()
        .for_each(|(t, out)| {
            let first = t * per_task;
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` names a build the CPU runs (Isa::detect).
                Isa::Avx512 => unsafe { x86::task_avx512(w, blocks, m, k, first, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => unsafe { x86::task_avx2(w, blocks, m, k, first, out) },
                // SAFETY: plain Rust.
                _ => unsafe { task::<Portable>(w, blocks, m, k, first, out, false) },
            }
        });
    transposed
}
