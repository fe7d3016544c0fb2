//! Products of many rows (prompts, large batches) with stored weights:
//! each thread widens [`P`] weight rows at a time to float32 in a panel
//! that stays in L1 (chunks of [`STEP`] steps along `k`, the rows side by
//! side, so a tile finds every row at a fixed offset from one pointer), and
//! multiplies them with the activations transposed (`[k][m]`, once per
//! call): a register tile holds `P` weight rows × 32 activation rows, and
//! each step along `k` broadcasts one weight of each row against two
//! vectors of 16 activation rows (outer products, as general matrix
//! products are made; no sums across lanes). The weights are widened once
//! per call (the AVX-512 build straight from the blocks as stored for the
//! layouts the few-rows products read that way, a group of 16 weights to
//! one run of the panel; the others through `unpack_row`), with the next
//! panel's rows prefetched, and the products are float products with the values the blocks
//! stand for (no rounding of the activations: the caller rounds them first
//! for llama.cpp's arithmetic). Each task writes the columns of its own
//! weight rows straight into the `[m][n]` product.
//!
//! Each output is the fused multiply-adds along `k` in order, in its own
//! lane, whatever the tile it falls in and whatever the build (AVX-512,
//! AVX2 and plain Rust give the same bits): a row's result does not depend
//! on the other rows.

use rayon::prelude::*;

use super::kernels::{prefetch, Isa, Rows};
use super::quant::{unpack_row, Unpacked, GROUP};

/// Weight rows per tile.
const P: usize = 12;
/// Activation rows per vector step; `m` is padded to a multiple.
const LANES: usize = 16;
/// Activation rows per block (a multiple of 2 · [`LANES`]).
const BLOCK_ROWS: usize = 128;

/// Steps along `k` per chunk of a widened panel: one group of weights
/// ([`GROUP`], a scale each), so that a group widens into one run of the
/// panel (the tiles' loops are written out for 16).
const STEP: usize = GROUP;

/// Where weight `t` of row `b` of a widened panel lies: the panel holds
/// chunks of [`STEP`] steps, each the `P` rows' weights side by side
/// (`[k / STEP][P][STEP]`), so that a tile reads every row of a chunk at a
/// fixed offset from one pointer.
#[inline(always)]
fn at(b: usize, t: usize) -> usize {
    (t / STEP) * P * STEP + b * STEP + t % STEP
}

/// Floats a widened panel of `k` steps holds.
fn panel_len(k: usize) -> usize {
    k.div_ceil(STEP) * P * STEP
}

/// Row `n` of `w` as float32 into row `b` of the panel `out` (see [`at`]).
#[inline(always)]
unsafe fn widen<T: Tile>(
    w: Rows<'_>,
    n: usize,
    k: usize,
    unpacked: &mut Unpacked,
    b: usize,
    out: &mut [f32],
    simd: bool,
) {
    if let Rows::Blocks(t, data) = w {
        // The same row of the next panel on its way to the cache.
        let bytes = t.row_bytes(k);
        prefetch(&data[((n + P) * bytes).min(data.len())..], bytes);
    }
    if let Rows::F16(h) | Rows::Bf16(h) = w {
        prefetch(&h[((n + P) * k).min(h.len())..], 2 * k);
    }
    if T::stored(w, n, k, b, out) {
        return;
    }
    match w {
        Rows::Blocks(t, data) => {
            let bytes = t.row_bytes(k);
            unpack_row(t, &data[n * bytes..(n + 1) * bytes], unpacked, simd);
            let center = unpacked.center as f32;
            for (g, q) in unpacked.q.chunks_exact(GROUP).enumerate() {
                let q: &[u8; GROUP] = q.try_into().expect("a group");
                let first = at(b, g * GROUP);
                let run: &mut [f32; GROUP] = (&mut out[first..first + GROUP])
                    .try_into()
                    .expect("a group's run");
                T::group(q, unpacked.scale[g], unpacked.offset[g], center, run);
            }
        }
        Rows::F16(h) | Rows::Bf16(h) => {
            // Widened 64 at a time in a plain loop (vector conversions),
            // then laid out in chunks.
            let bf16 = matches!(w, Rows::Bf16(_));
            let mut values = [0f32; 64];
            for (c, part) in h[n * k..(n + 1) * k].chunks(64).enumerate() {
                let values = &mut values[..part.len()];
                if bf16 {
                    for (v, &x) in values.iter_mut().zip(part) {
                        *v = super::quant::bf16_to_f32(x);
                    }
                } else {
                    for (v, &x) in values.iter_mut().zip(part) {
                        *v = super::quant::f16_value(x);
                    }
                }
                let quads = values.chunks_exact(STEP);
                let tail = quads.remainder();
                let whole = quads.len();
                for (q, quad) in quads.enumerate() {
                    let first = at(b, c * 64 + q * STEP);
                    let quad: &[f32; STEP] = quad.try_into().expect("a chunk");
                    out[first..first + STEP].copy_from_slice(quad);
                }
                if !tail.is_empty() {
                    let first = at(b, c * 64 + whole * STEP);
                    out[first..first + tail.len()].copy_from_slice(tail);
                }
            }
        }
    }
}

/// Runs `$step!(u)` for every step along `k`, in order: whole chunks of
/// [`STEP`] steps (written out, so that the sums stay in registers) with
/// the weight pointer `$wp` and the activation pointer `$xr` moved past
/// each, then the tail.
macro_rules! along_k {
    ($k:expr, $mp:expr, $wp:ident, $xr:ident, $step:ident) => {{
        for _ in 0..$k / STEP {
            $step!(0);
            $step!(1);
            $step!(2);
            $step!(3);
            $step!(4);
            $step!(5);
            $step!(6);
            $step!(7);
            $step!(8);
            $step!(9);
            $step!(10);
            $step!(11);
            $step!(12);
            $step!(13);
            $step!(14);
            $step!(15);
            $wp = $wp.add(P * STEP);
            $xr = $xr.add(STEP * $mp);
        }
        for u in 0..$k % STEP {
            $step!(u);
        }
    }};
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

    /// Widens row `n` of `w` into row `b` of the panel straight from its
    /// blocks as stored, with the values [`Tile::group`] gives from the
    /// unpacked row, where the build can; false where it cannot.
    #[inline(always)]
    unsafe fn stored(_w: Rows<'_>, _n: usize, _k: usize, _b: usize, _out: &mut [f32]) -> bool {
        false
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

    /// [`Tile::tile`] for at most 8 activation rows from `i` (a block of
    /// 8 rows or fewer): the same sums in the same order, on half vectors
    /// where the build has them.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile8(
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
        Self::tile::<1>(xt, mp, i, w, p, k, m, limit, out)
    }
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
                let wv = w[at(b, t)];
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
    use crate::engine::quant::x86::{
        block32, chunk_k, splat_half512, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0,
    };
    use crate::engine::quant::{superblock_scales, BlockType};
    use std::arch::x86_64::*;

    pub(super) struct Avx512;

    /// 16 weights as unsigned bytes widened as [`Tile::group`] widens them
    /// (`scale · (q − center) + offset`, a product then a sum), into `out`.
    #[inline(always)]
    unsafe fn group16(q: __m128i, scale: __m512, offset: __m512, center: __m512, out: *mut f32) {
        let v = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), center);
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_mul_ps(v, scale), offset));
    }

    /// A row of 32-weight blocks of layout `L` (`bytes` each) widened.
    #[inline(always)]
    unsafe fn stored32<const L: u8>(row: &[u8], bytes: usize, k: usize, b: usize, out: &mut [f32]) {
        debug_assert!(row.len() == k / 32 * bytes && out.len() >= panel_len(k));
        let out = out.as_mut_ptr();
        for blk in 0..k / 32 {
            let (q, d, offset, center) = block32::<L>(row.as_ptr().add(blk * bytes));
            let (s, o) = (splat_half512(d), _mm512_set1_ps(offset));
            let c = _mm512_set1_ps(center as f32);
            group16(_mm256_castsi256_si128(q), s, o, c, out.add(at(b, 32 * blk)));
            group16(
                _mm256_extracti128_si256(q, 1),
                s,
                o,
                c,
                out.add(at(b, 32 * blk + 16)),
            );
        }
    }

    /// A row of `Q4_K`, `Q5_K` or `Q6_K` blocks (layout `L`) widened.
    #[inline(always)]
    unsafe fn stored_k<const L: u8>(t: BlockType, row: &[u8], k: usize, b: usize, out: &mut [f32]) {
        let bytes = t.bytes();
        debug_assert!(row.len() == k / 256 * bytes && out.len() >= panel_len(k));
        let out = out.as_mut_ptr();
        let c = _mm512_set1_ps(if L == Q6K { 32.0 } else { 0.0 });
        let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
        for sb in 0..k / 256 {
            let block = &row[sb * bytes..(sb + 1) * bytes];
            superblock_scales(t, block, &mut scale, &mut offset, true);
            for j in 0..8 {
                let q = chunk_k::<L>(block.as_ptr(), j);
                for (h, half) in [_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)]
                    .into_iter()
                    .enumerate()
                {
                    let g = 2 * j + h;
                    let (s, o) = (_mm512_set1_ps(scale[g]), _mm512_set1_ps(offset[g]));
                    group16(half, s, o, c, out.add(at(b, 256 * sb + 16 * g)));
                }
            }
        }
    }

    /// A row of float16 or bfloat16 weights (a whole number of chunks)
    /// widened, 16 to a store; the conversions are exact.
    #[inline(always)]
    unsafe fn stored_halves(row: &[u16], bf16: bool, b: usize, out: &mut [f32]) {
        debug_assert!(row.len().is_multiple_of(STEP) && out.len() >= panel_len(row.len()));
        let out = out.as_mut_ptr();
        for (c, chunk) in row.chunks_exact(STEP).enumerate() {
            let raw = _mm256_loadu_si256(chunk.as_ptr() as *const __m256i);
            let wide = if bf16 {
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
            } else {
                _mm512_cvtph_ps(raw)
            };
            _mm512_storeu_ps(out.add(at(b, c * STEP)), wide);
        }
    }

    impl Tile for Avx512 {
        #[inline(always)]
        unsafe fn stored(w: Rows<'_>, n: usize, k: usize, b: usize, out: &mut [f32]) -> bool {
            let (t, data) = match w {
                Rows::Blocks(t, data) => (t, data),
                Rows::F16(h) | Rows::Bf16(h) if k.is_multiple_of(STEP) => {
                    stored_halves(&h[n * k..(n + 1) * k], matches!(w, Rows::Bf16(_)), b, out);
                    return true;
                }
                _ => return false,
            };
            let bytes = t.row_bytes(k);
            let row = &data[n * bytes..(n + 1) * bytes];
            let block = t.bytes();
            match t {
                BlockType::Q4_0 => stored32::<Q4_0>(row, block, k, b, out),
                BlockType::Q4_1 => stored32::<Q4_1>(row, block, k, b, out),
                BlockType::Q5_0 => stored32::<Q5_0>(row, block, k, b, out),
                BlockType::Q5_1 => stored32::<Q5_1>(row, block, k, b, out),
                BlockType::Q8_0 => stored32::<Q8_0>(row, block, k, b, out),
                BlockType::Q4K => stored_k::<Q4K>(t, row, k, b, out),
                BlockType::Q5K => stored_k::<Q5K>(t, row, k, b, out),
                BlockType::Q6K => stored_k::<Q6K>(t, row, k, b, out),
                _ => return false,
            }
            true
        }

        #[inline(always)]
        unsafe fn tile8(
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
            Avx512::narrow(xt, mp, i, w, p, k, m, limit, out)
        }

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
            macro_rules! step {
                ($u:expr) => {{
                    let u = $u;
                    let mut xv = [_mm512_setzero_ps(); V];
                    for v in 0..V {
                        xv[v] = _mm512_loadu_ps(xr.add(u * mp + v * LANES));
                    }
                    for b in 0..P {
                        let wv = _mm512_set1_ps(*wp.add(b * STEP + u));
                        for v in 0..V {
                            acc[b][v] = _mm512_fmadd_ps(xv[v], wv, acc[b][v]);
                        }
                    }
                }};
            }
            along_k!(k, mp, wp, xr, step);
            let rows = (limit - i).min(V * LANES);
            // Constant indices into `acc` keep it in registers.
            for b in 0..P {
                for v in 0..V {
                    let first = v * LANES;
                    if b >= p || first >= rows {
                        continue;
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

    impl Avx512 {
        /// 8 activation rows on 256-bit vectors (AVX-512VL gives 32 of
        /// them): `P` accumulators, no lanes of padding.
        #[inline(always)]
        #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
        pub(super) unsafe fn narrow(
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
            debug_assert!(xt.len() >= k * mp && i + 8 <= mp && w.len() >= P * k);
            let mut acc = [_mm256_setzero_ps(); P];
            let mut wp = w.as_ptr();
            let mut xr = xt.as_ptr().add(i);
            macro_rules! step {
                ($u:expr) => {{
                    let u = $u;
                    let xv = _mm256_loadu_ps(xr.add(u * mp));
                    for b in 0..P {
                        let wv = _mm256_set1_ps(*wp.add(b * STEP + u));
                        acc[b] = _mm256_fmadd_ps(xv, wv, acc[b]);
                    }
                }};
            }
            along_k!(k, mp, wp, xr, step);
            let rows = (limit - i).min(8);
            let mask: __mmask8 = if rows >= 8 { 0xff } else { (1u8 << rows) - 1 };
            for b in 0..P {
                if b < p {
                    _mm256_mask_storeu_ps(out.as_mut_ptr().add(b * m + i), mask, acc[b]);
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
                    let mut wp = w.as_ptr().add(first_row * STEP);
                    let mut xr = xp;
                    macro_rules! step {
                        ($u:expr) => {{
                            let u = $u;
                            let x0 = _mm256_loadu_ps(xr.add(u * mp));
                            let x1 = _mm256_loadu_ps(xr.add(u * mp + 8));
                            for b in 0..HALF {
                                let wv = _mm256_set1_ps(*wp.add(b * STEP + u));
                                acc[b][0] = _mm256_fmadd_ps(x0, wv, acc[b][0]);
                                acc[b][1] = _mm256_fmadd_ps(x1, wv, acc[b][1]);
                            }
                        }};
                    }
                    along_k!(k, mp, wp, xr, step);
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
        count: usize,
        y: Output,
    ) {
        task::<Avx512>(w, blocks, m, k, first, count, y, true)
    }

    #[target_feature(enable = "avx2,fma,f16c,bmi2")]
    pub(super) unsafe fn task_avx2(
        w: Rows<'_>,
        blocks: &[Vec<f32>],
        m: usize,
        k: usize,
        first: usize,
        count: usize,
        y: Output,
    ) {
        task::<Avx2>(w, blocks, m, k, first, count, y, true)
    }
}

/// The product `[m][n]`, shared by the tasks: each writes the columns of
/// its own weight rows.
#[derive(Clone, Copy)]
struct Output {
    at: *mut f32,
    n: usize,
}

// SAFETY: tasks write disjoint columns (their own weight rows).
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

/// Fills columns `first..first + count` of `y` from the transposed
/// activations in blocks of rows (each `[k][width]`): each tile of `P`
/// weight rows is summed into `panel` (`[p][m]`, in L1/L2) and copied out.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn task<T: Tile>(
    w: Rows<'_>,
    blocks: &[Vec<f32>],
    m: usize,
    k: usize,
    first: usize,
    count: usize,
    y: Output,
    simd: bool,
) {
    let mut unpacked = Unpacked::new(if matches!(w, Rows::Blocks(..)) { k } else { 0 });
    let mut rows = vec![0f32; panel_len(k)];
    let mut panel = vec![0f32; P * m];
    for j in (0..count).step_by(P) {
        let p = (count - j).min(P);
        for b in 0..p {
            widen::<T>(w, first + j + b, k, &mut unpacked, b, &mut rows, simd);
        }
        let mut base = 0;
        for xt in blocks {
            let mp = xt.len() / k;
            let mut i = 0;
            while i < mp {
                let (limit, out) = (m - base, &mut panel[base..]);
                if mp - i >= 2 * LANES {
                    T::tile::<2>(xt, mp, i, &rows, p, k, m, limit, out);
                    i += 2 * LANES;
                } else if limit - i <= LANES / 2 {
                    T::tile8(xt, mp, i, &rows, p, k, m, limit, out);
                    i += LANES;
                } else {
                    T::tile::<1>(xt, mp, i, &rows, p, k, m, limit, out);
                    i += LANES;
                }
            }
            base += mp;
        }
        // SAFETY: row r's columns first + j .. first + j + p lie inside
        // `y` ([m][n]) and belong to this task alone.
        let from = panel.as_ptr();
        for r in 0..m {
            let line = y.at.add(r * y.n + first + j);
            for b in 0..p {
                *line.add(b) = *from.add(b * m + r);
            }
        }
    }
}

/// `y = x Wᵀ` (`[m, n]`) with the build `isa`, the weights widened
/// [`P`] rows at a time.
pub(crate) fn matmul(isa: Isa, w: Rows<'_>, x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
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
    let out = Output {
        at: y.as_mut_ptr(),
        n,
    };
    // Whole tiles of weight rows per task, at most 20 (240 rows), and a
    // count of tasks that is a multiple of the threads with tasks of
    // near-equal size, so that no thread is left with one task more.
    let threads = rayon::current_num_threads().max(1);
    let tiles = n.div_ceil(P);
    let tasks = threads * tiles.div_ceil(20 * threads).max(4);
    let per_task = tiles.div_ceil(tasks).max(1) * P;
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let first = t * per_task;
        let count = per_task.min(n - first);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` names a build the CPU runs (Isa::detect); the
            // task writes its own columns of `y`, which outlives the loop.
            Isa::Avx512 => unsafe { x86::task_avx512(w, blocks, m, k, first, count, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { x86::task_avx2(w, blocks, m, k, first, count, out) },
            // SAFETY: plain Rust; columns as above.
            _ => unsafe { task::<Portable>(w, blocks, m, k, first, count, out, false) },
        }
    });
    y
}
