//! Products of many rows (prompts, large batches) with stored weights:
//! each thread widens [`P`] weight rows at a time to float32 in a buffer
//! that stays in L1 and multiplies them with the float32 activations, [`R`]
//! rows at a time, in a register tile of `R × P` running sums along `k`.
//! The weights are unpacked once per call and the products are float
//! products with the values the blocks stand for (no rounding of the
//! activations: the caller rounds them first for llama.cpp's arithmetic).
//!
//! Each output is a fixed sequence of fused multiply-adds along `k` in 16
//! lanes, then the lanes summed in a fixed order, whatever the tile it
//! falls in: a row's result does not depend on the other rows.

use rayon::prelude::*;

use super::kernels::{Isa, Rows};
use super::quant::{unpack_row, Unpacked, GROUP};

/// Weight rows per tile.
const P: usize = 6;
/// Activation rows per tile.
const R: usize = 4;
/// Lanes of each running sum.
const LANES: usize = 16;

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

/// The lanes' sum in a fixed order (halving).
#[inline(always)]
fn fold(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for j in 0..width {
            lanes[j] += lanes[j + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// One build's tile: the `r ≤ R` activation rows from `i` (rows of `k`)
/// against the `p ≤ P` widened rows of `w` (rows of `k`), into
/// `out[row][col]` (`[r][p]`).
trait Tile {
    /// `out[j] = scale · (q[j] − center) + offset`.
    #[inline(always)]
    unsafe fn group(q: &[u8; GROUP], scale: f32, offset: f32, center: f32, out: &mut [f32; GROUP]) {
        for j in 0..GROUP {
            out[j] = scale * (q[j] as f32 - center) + offset;
        }
    }

    unsafe fn tile(x: &[f32], i: usize, r: usize, w: &[f32], p: usize, k: usize) -> [[f32; P]; R];
}

struct Portable;

impl Tile for Portable {
    #[inline(always)]
    unsafe fn tile(x: &[f32], i: usize, r: usize, w: &[f32], p: usize, k: usize) -> [[f32; P]; R] {
        let mut out = [[0f32; P]; R];
        for a in 0..r {
            let xs = &x[(i + a) * k..(i + a + 1) * k];
            for b in 0..p {
                let ws = &w[b * k..(b + 1) * k];
                let mut lanes = [0f32; LANES];
                for (t, (&xv, &wv)) in xs.iter().zip(ws).enumerate() {
                    lanes[t % LANES] = xv.mul_add(wv, lanes[t % LANES]);
                }
                out[a][b] = fold(lanes);
            }
        }
        out
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
        unsafe fn tile(
            x: &[f32],
            i: usize,
            r: usize,
            w: &[f32],
            p: usize,
            k: usize,
        ) -> [[f32; P]; R] {
            let mut acc = [[_mm512_setzero_ps(); P]; R];
            let xp = x.as_ptr().add(i * k);
            let wp = w.as_ptr();
            let mut t = 0;
            // Missing rows read row 0 again and are dropped at the end.
            let xr = |a: usize| if a < r { a } else { 0 };
            let wr = |b: usize| if b < p { b } else { 0 };
            while t < k {
                let mask: __mmask16 = if k - t >= LANES {
                    0xffff
                } else {
                    (1u16 << (k - t)) - 1
                };
                let mut wv = [_mm512_setzero_ps(); P];
                for b in 0..P {
                    wv[b] = _mm512_maskz_loadu_ps(mask, wp.add(wr(b) * k + t));
                }
                for a in 0..R {
                    let xv = _mm512_maskz_loadu_ps(mask, xp.add(xr(a) * k + t));
                    for b in 0..P {
                        acc[a][b] = _mm512_fmadd_ps(xv, wv[b], acc[a][b]);
                    }
                }
                t += LANES;
            }
            let mut out = [[0f32; P]; R];
            for a in 0..R {
                for b in 0..P {
                    out[a][b] = _mm512_reduce_add_ps(acc[a][b]);
                }
            }
            out
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
        unsafe fn tile(
            x: &[f32],
            i: usize,
            r: usize,
            w: &[f32],
            p: usize,
            k: usize,
        ) -> [[f32; P]; R] {
            // 16 lanes as two halves; two activation rows at a time keep
            // the sums in registers.
            let mut out = [[0f32; P]; R];
            let full = k / LANES * LANES;
            for a0 in (0..r).step_by(2) {
                let rows = (r - a0).min(2);
                let mut acc = [[[_mm256_setzero_ps(); 2]; P]; 2];
                let mut t = 0;
                while t < full {
                    let mut wv = [[_mm256_setzero_ps(); 2]; P];
                    for b in 0..P {
                        let at = w.as_ptr().add(b.min(p - 1) * k + t);
                        wv[b] = [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))];
                    }
                    for a in 0..2 {
                        let at = x.as_ptr().add((i + a0 + a.min(rows - 1)) * k + t);
                        let xv = [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))];
                        for b in 0..P {
                            for h in 0..2 {
                                acc[a][b][h] = _mm256_fmadd_ps(xv[h], wv[b][h], acc[a][b][h]);
                            }
                        }
                    }
                    t += LANES;
                }
                for a in 0..rows {
                    for b in 0..p {
                        let mut lanes = [0f32; LANES];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][b][0]);
                        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[a][b][1]);
                        // The tail past the whole lanes, lane by lane.
                        let xs = &x[(i + a0 + a) * k..(i + a0 + a + 1) * k];
                        let ws = &w[b * k..(b + 1) * k];
                        for t in full..k {
                            lanes[t % LANES] = xs[t].mul_add(ws[t], lanes[t % LANES]);
                        }
                        out[a0 + a][b] = fold(lanes);
                    }
                }
            }
            out
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")]
    pub(super) unsafe fn task_avx512(
        w: Rows<'_>,
        x: &[f32],
        m: usize,
        k: usize,
        first: usize,
        out: &mut [f32],
    ) {
        task::<Avx512>(w, x, m, k, first, out, true)
    }

    #[target_feature(enable = "avx2,fma,f16c,bmi2")]
    pub(super) unsafe fn task_avx2(
        w: Rows<'_>,
        x: &[f32],
        m: usize,
        k: usize,
        first: usize,
        out: &mut [f32],
    ) {
        task::<Avx2>(w, x, m, k, first, out, true)
    }
}

/// Fills `out` (`[rows of W][m]`, W rows from `first`).
#[inline(always)]
unsafe fn task<T: Tile>(
    w: Rows<'_>,
    x: &[f32],
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
        for i in (0..m).step_by(R) {
            let r = (m - i).min(R);
            let got = T::tile(x, i, r, &rows, p, k);
            for (a, line) in got.iter().enumerate().take(r) {
                for (b, &v) in line.iter().enumerate().take(p) {
                    out[(j + b) * m + i + a] = v;
                }
            }
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
    // Whole tiles of weight rows per task, enough tasks to balance.
    let per_task = (n / (rayon::current_num_threads() * 4)).clamp(P, 256) / P * P;
    transposed
        .par_chunks_mut(per_task * m)
        .enumerate()
        .for_each(|(t, out)| {
            let first = t * per_task;
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` names a build the CPU runs (Isa::detect).
                Isa::Avx512 => unsafe { x86::task_avx512(w, x, m, k, first, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => unsafe { x86::task_avx2(w, x, m, k, first, out) },
                // SAFETY: plain Rust.
                _ => unsafe { task::<Portable>(w, x, m, k, first, out, false) },
            }
        });
    transposed
}
