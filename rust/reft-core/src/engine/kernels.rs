//! Matrix products with weights kept as the file stores them: `y = x Wᵀ`
//! with `x` of `m` rows and `W` of `n` rows of `k` weights, either GGUF
//! blocks of any layout in [`BlockType`] or float16 / bfloat16 values.
//!
//! Few rows (decoding, below [`WIDENED_ROWS`]): the weights' stream is
//! the cost, so each weight row is unpacked once (`quant.rs`) and meets up
//! to [`TILE`] activation rows at a time.
//!
//! Blocks. The activations are rounded once per call to integers per block
//! of 32 (a scale each): to 16 bits by default, which leaves the product
//! within float rounding of the dequantized model's, or to 8 bits, as
//! llama.cpp does. Each weight row is unpacked into bytes with a scale and
//! an offset per 16 weights, and dotted in integer products of 32 weights
//! (`vpmaddwd`), scaled in float. The offsets meet each group's float sum
//! of the activations (the rounded sums with 8 bits, as llama.cpp).
//! With 8 bits, the x86 builds sum the products of 4 weights in integers
//! (`vpdpbusd` on AVX512-VNNI, `vpmaddubsw` + `vpmaddwd` otherwise: the
//! same integers), 8 lanes a block, each lane scaled in float
//! ([`Dots::blocks8`]).
//!
//! Float16 / bfloat16. Each 16 weights are widened in registers and meet
//! the float32 activations.
//!
//! Many rows: float32 products with weights widened a few rows at a time
//! (`widened.rs`).
//!
//! Every kernel has an AVX-512, an AVX2 and a portable build, chosen at run
//! time ([`Isa::detect`]). Below [`WIDENED_ROWS`] rows, and from there on,
//! a row of `x` is summed in the same order whatever the other rows, so a
//! sequence gets the same bits alone and in any batch of the same side.
//! Threads split the weight rows.

use rayon::prelude::*;

use super::quant::{self, superblock_scales, unpack_row, BlockType, Unpacked, GROUP};

/// Activation values per scale.
pub(crate) const BLOCK: usize = 32;
/// Activation rows per register tile.
const TILE: usize = 4;
/// Rows from which products take float32 activations against weights
/// widened a few rows at a time (`widened.rs`): the integer products win
/// below, where unpacking is most of the work.
pub(crate) const WIDENED_ROWS: usize = 8;

/// Weights as stored.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rows<'a> {
    Blocks(BlockType, &'a [u8]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

/// The instruction sets a kernel is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// AVX-512 (F and BW) with FMA and F16C.
    Avx512,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

impl Isa {
    /// The widest build this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// The builds this CPU runs, widest first. The first call says on the
    /// test log (past the test harness's capture) which builds the tests
    /// compare and which this CPU cannot run.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let all = [Isa::Avx512, Isa::Avx2, Isa::Portable];
        let widest = Isa::detect();
        let (skipped, run): (Vec<Isa>, Vec<Isa>) = all.into_iter().partition(|&isa| isa < widest);
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            let names = |list: &[Isa]| list.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ");
            let line = format!(
                "kernel builds compared: {}; not run on this CPU: {}\n",
                names(&run),
                if skipped.is_empty() {
                    "none".into()
                } else {
                    names(&skipped)
                }
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        });
        run
    }

    /// `avx512`, `avx2` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// Activations as integers: `x ≈ d[block] · q`, with each group's float sum.
pub(crate) struct Quantized {
    q: Vec<i16>,
    /// `q` as bytes when it holds 8-bit values (`levels` 127), else empty:
    /// the products then sum four weights at a time ([`Dots::blocks8`]).
    q8: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<f32>,
    k: usize,
}

/// Rounds `m` rows of `k` activations (`k` a multiple of [`BLOCK`]) to
/// integers of at most `levels` in magnitude (127: 8 bits; 32767: 16 bits).
pub(crate) fn quantize(x: &[f32], k: usize, levels: i16) -> Quantized {
    let mut out = Quantized {
        q: vec![0; x.len()],
        q8: Vec::new(),
        d: Vec::with_capacity(x.len() / BLOCK),
        sums: Vec::with_capacity(x.len() / GROUP),
        k,
    };
    let top = levels as f32;
    for (block, q) in x.chunks_exact(BLOCK).zip(out.q.chunks_exact_mut(BLOCK)) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / top;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(block) {
            *q = round_even(v * inv).clamp(-top, top) as i16;
        }
        if levels == 127 {
            // llama.cpp's arithmetic (`Q8_0` / `Q8_1` blocks): the scale
            // kept as float16, the offsets meeting the rounded sums.
            out.d.push(to_half_precision(d));
            let whole: i32 = q.iter().map(|&v| v as i32).sum();
            for group in q.chunks_exact(GROUP) {
                let part: i32 = group.iter().map(|&v| v as i32).sum();
                // Each group's share of the block's float16 sum.
                let block_sum = to_half_precision(d * whole as f32);
                out.sums.push(if whole == 0 {
                    d * part as f32
                } else {
                    block_sum * part as f32 / whole as f32
                });
            }
        } else {
            out.d.push(d);
            for group in block.chunks_exact(GROUP) {
                out.sums.push(group.iter().sum());
            }
        }
    }
    if levels == 127 {
        out.q8 = out.q.iter().map(|&v| v as i8).collect();
    }
    out
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22`
/// (what `round_ties_even` gives, without a call to the C library: adding
/// and taking away 1.5 · 2^23 leaves no fraction bits, and the addition
/// rounds to nearest even).
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (v + SHIFT) - SHIFT
}

/// `v` rounded to the nearest float16 value (ties to even), as float32.
fn to_half_precision(v: f32) -> f32 {
    let bits = v.to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    if !v.is_finite() || v == 0.0 || exponent > 15 {
        return v;
    }
    // Mantissa bits kept: 10 for normal halves, fewer below 2^-14.
    let keep = (10 - (-14 - exponent).max(0)).max(-1);
    let drop = (23 - keep) as u32;
    if drop >= 32 {
        return 0.0f32.copysign(v);
    }
    let half = 1u32 << (drop - 1);
    let mask = (1u32 << drop) - 1;
    let rest = bits & mask;
    let mut kept = bits & !mask;
    if rest > half || (rest == half && (kept >> drop) & 1 == 1) {
        kept += 1 << drop;
    }
    f32::from_bits(kept)
}

/// `Σ_g offset[g] · sums[g]` in a fixed order; nothing to add for the
/// symmetric layouts (those with a center have no offsets).
#[inline(always)]
fn offsets(u: &Unpacked, sums: &[f32]) -> f32 {
    if u.center != 0 {
        return 0.0;
    }
    let offset = &u.offset;
    let mut acc = [0f32; 4];
    let mut chunks = offset.chunks_exact(4).zip(sums.chunks_exact(4));
    for (o, s) in &mut chunks {
        for j in 0..4 {
            acc[j] = o[j].mul_add(s[j], acc[j]);
        }
    }
    let tail = offset.len() / 4 * 4;
    for g in tail..offset.len() {
        acc[0] = offset[g].mul_add(sums[g], acc[0]);
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// One build's dot products of an unpacked weight row (or a float16 /
/// bfloat16 row) with `C` activation rows from `first`.
trait Dots {
    /// Whether the build unpacks with AVX2 and F16C.
    const SIMD: bool;
    /// Whether the build reads 32-weight blocks (`Q4_0` … `Q8_0`) and
    /// `Q4_K`, `Q5_K`, `Q6_K` blocks straight from the row ([`Dots::row32`])
    /// instead of unpacking it first.
    const ROW32: bool = false;
    unsafe fn blocks<const C: usize>(u: &Unpacked, x: &Quantized, first: usize) -> [f32; C];
    /// [`Dots::blocks`] with 8-bit activations (`x.q8`): in every build,
    /// lane l of block b is the integer sum of weights `32 b + 4 l .. + 4`
    /// times their activations; in float it is multiplied by the block's
    /// activation scale, then multiply-added with its group's scale (group
    /// `2 b + l / 4`) into accumulator `b % 2` (8 lanes each); a row's result is [`lanes8`] of
    /// its accumulators plus its offsets. Four products per integer lane is
    /// what `vpdpbusd` computes.
    unsafe fn blocks8<const C: usize>(u: &Unpacked, x: &Quantized, first: usize) -> [f32; C];
    /// [`Dots::blocks8`] of a row of [`reads_as_stored8`] blocks read as
    /// stored: the same operations in the same order, so the same bits.
    unsafe fn row8<const C: usize>(
        _t: BlockType,
        _row: &[u8],
        _x: &Quantized,
        _first: usize,
    ) -> [f32; C] {
        unreachable!("only builds with ROW32 read rows as stored")
    }
    /// [`Dots::blocks`] of a row of 32-weight blocks read as stored: the
    /// same operations in the same order, so the same bits.
    unsafe fn row32<const C: usize>(
        _t: BlockType,
        _row: &[u8],
        _x: &Quantized,
        _first: usize,
    ) -> [f32; C] {
        unreachable!("only builds with ROW32 read rows as stored")
    }
    unsafe fn halves<const C: usize>(
        row: &[u16],
        bf16: bool,
        x: &[f32],
        k: usize,
        first: usize,
    ) -> [f32; C];
}

/// The layouts whose rows builds with [`Dots::ROW32`] read as stored.
fn reads_as_stored(t: BlockType) -> bool {
    t.weights() == BLOCK || matches!(t, BlockType::Q4K | BlockType::Q5K | BlockType::Q6K)
}

/// The layouts whose products with 8-bit activations sum 4 weights at a
/// time ([`Dots::blocks8`]): where that is faster on this project's
/// measurements (`kernel_speeds`, 4 rows: Q4_0 32 → 51, Q5_0 43 → 50, Q2_K
/// 31 → 39, Q3_K 34 → 39 GMAC/s). Q8_0 and Q6_K rows read as stored are
/// as fast or faster with `vpmaddwd`; the other layouts gain nothing.
fn sums_quads(t: BlockType) -> bool {
    matches!(
        t,
        BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q2K | BlockType::Q3K
    )
}

/// The layouts of [`sums_quads`] whose rows builds with [`Dots::ROW32`]
/// read as stored.
fn reads_as_stored8(t: BlockType) -> bool {
    matches!(t, BlockType::Q4_0 | BlockType::Q5_0)
}

/// The sum of 8-lane accumulators `acc[0] + acc[1]`, in the order of a
/// 256-bit horizontal sum.
#[inline(always)]
fn lanes8(acc: &[[f32; 8]; 2]) -> f32 {
    let t: [f32; 8] = std::array::from_fn(|l| acc[0][l] + acc[1][l]);
    ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]))
}

/// Weight rows between a row's prefetch and its unpacking.
const PREFETCH_ROWS: usize = 8;

/// Asks for the first `bytes` of `data` (as far as it goes) to be brought
/// into the cache.
#[inline(always)]
pub(crate) fn prefetch<T>(data: &[T], bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for at in (0..bytes.min(std::mem::size_of_val(data))).step_by(64) {
        // SAFETY: a prefetch of an address inside `data`; it reads nothing.
        unsafe {
            std::arch::x86_64::_mm_prefetch(
                (data.as_ptr() as *const i8).add(at),
                std::arch::x86_64::_MM_HINT_T0,
            )
        };
    }
    let _ = (data, bytes);
}

/// Fills `out` (`[rows of W][m]`, W rows from `first_row`); `m` is below
/// [`WIDENED_ROWS`], so the activations stay in L1.
#[inline(always)]
unsafe fn task<D: Dots>(
    w: Rows<'_>,
    x: &Quantized,
    xf: &[f32],
    m: usize,
    k: usize,
    first_row: usize,
    out: &mut [f32],
) {
    let mut unpacked = Unpacked::new(if matches!(w, Rows::Blocks(..)) { k } else { 0 });
    let int8 = !x.q8.is_empty() && matches!(w, Rows::Blocks(t, _) if sums_quads(t));
    let direct = D::ROW32
        && matches!(w, Rows::Blocks(t, _) if if int8 { reads_as_stored8(t) } else { reads_as_stored(t) });
    for (r, target) in out.chunks_exact_mut(m).enumerate() {
        let n = first_row + r;
        let mut row: &[u8] = &[];
        if let Rows::Blocks(t, data) = w {
            let bytes = t.row_bytes(k);
            // The row PREFETCH_ROWS ahead on its way to the cache.
            prefetch(
                &data[((n + PREFETCH_ROWS) * bytes).min(data.len())..],
                bytes,
            );
            row = &data[n * bytes..(n + 1) * bytes];
            if !direct {
                unpack_row(t, row, &mut unpacked, D::SIMD);
            }
        }
        if let Rows::F16(h) | Rows::Bf16(h) = w {
            prefetch(&h[((n + PREFETCH_ROWS) * k).min(h.len())..], 2 * k);
        }
        let mut i = 0;
        while i < m {
            let c = (m - i).min(TILE);
            macro_rules! tile {
                ($c:literal) => {{
                    let got: [f32; $c] = match w {
                        Rows::Blocks(t, _) if direct && int8 => D::row8::<$c>(t, row, x, i),
                        Rows::Blocks(t, _) if direct => D::row32::<$c>(t, row, x, i),
                        Rows::Blocks(..) if int8 => D::blocks8::<$c>(&unpacked, x, i),
                        Rows::Blocks(..) => D::blocks::<$c>(&unpacked, x, i),
                        Rows::F16(h) => D::halves::<$c>(&h[n * k..(n + 1) * k], false, xf, k, i),
                        Rows::Bf16(h) => D::halves::<$c>(&h[n * k..(n + 1) * k], true, xf, k, i),
                    };
                    target[i..i + $c].copy_from_slice(&got);
                }};
            }
            match c {
                4 => tile!(4),
                3 => tile!(3),
                2 => tile!(2),
                _ => tile!(1),
            }
            i += c;
        }
    }
}

struct Portable;

impl Dots for Portable {
    const SIMD: bool = false;

    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn blocks8<const C: usize>(u: &Unpacked, x: &Quantized, first: usize) -> [f32; C] {
        let k = x.k;
        let mut out = [0f32; C];
        for (c, o) in out.iter_mut().enumerate() {
            let row = first + c;
            let xq = &x.q8[row * k..(row + 1) * k];
            let xd = &x.d[row * k / BLOCK..];
            let mut acc = [[0f32; 8]; 2];
            for b in 0..k / BLOCK {
                for l in 0..8 {
                    let at = b * BLOCK + 4 * l;
                    let dot: i32 = (at..at + 4)
                        .map(|i| (u.q[i] as i32 - u.center as i32) * xq[i] as i32)
                        .sum();
                    let scale = u.scale[2 * b + l / 4];
                    acc[b % 2][l] = (dot as f32 * xd[b]).mul_add(scale, acc[b % 2][l]);
                }
            }
            let sums = &x.sums[row * k / GROUP..(row + 1) * k / GROUP];
            *o = lanes8(&acc) + offsets(u, sums);
        }
        out
    }

    #[inline(always)]
    unsafe fn blocks<const C: usize>(u: &Unpacked, x: &Quantized, first: usize) -> [f32; C] {
        let k = x.k;
        let mut out = [0f32; C];
        for (c, o) in out.iter_mut().enumerate() {
            let row = first + c;
            let xq = &x.q[row * k..(row + 1) * k];
            let xd = &x.d[row * k / BLOCK..];
            let mut acc = [0f32; 2];
            for g in 0..k / GROUP {
                let span = g * GROUP..(g + 1) * GROUP;
                let isum: i32 = u.q[span.clone()]
                    .iter()
                    .zip(&xq[span])
                    .map(|(&w, &v)| (w as i32 - u.center as i32) * v as i32)
                    .sum();
                acc[g & 1] = (isum as f32 * xd[g / 2]).mul_add(u.scale[g], acc[g & 1]);
            }
            let sums = &x.sums[row * k / GROUP..(row + 1) * k / GROUP];
            *o = (acc[0] + acc[1]) + offsets(u, sums);
        }
        out
    }

    #[inline(always)]
    unsafe fn halves<const C: usize>(
        row: &[u16],
        bf16: bool,
        x: &[f32],
        k: usize,
        first: usize,
    ) -> [f32; C] {
        let mut out = [0f32; C];
        for (c, o) in out.iter_mut().enumerate() {
            let xs = &x[(first + c) * k..(first + c + 1) * k];
            let mut acc = [0f32; 8];
            for (t, (&h, &v)) in row.iter().zip(xs).enumerate() {
                acc[t % 8] = half_value(h, bf16).mul_add(v, acc[t % 8]);
            }
            *o = acc.iter().sum();
        }
        out
    }
}

#[inline(always)]
fn half_value(h: u16, bf16: bool) -> f32 {
    if bf16 {
        super::quant::bf16_to_f32(h)
    } else {
        super::quant::f16_value(h)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use quant::x86::{
        block32, chunk_k, splat_half, splat_half512, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0,
    };
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Where [`dots8`] reads a weight row's blocks: block `b` as signed
    /// bytes and its lanes' weight scales (group `2 b` in lanes 0–3,
    /// `2 b + 1` in 4–7). A trait, not a closure: a closure's body is built
    /// without its function's CPU features.
    trait Blocks8 {
        unsafe fn block(&mut self, b: usize) -> (__m256i, __m256);
    }

    /// An unpacked row.
    struct UnpackedRow<'a>(&'a Unpacked);

    impl Blocks8 for UnpackedRow<'_> {
        #[inline(always)]
        unsafe fn block(&mut self, b: usize) -> (__m256i, __m256) {
            let u = self.0;
            let q = _mm256_loadu_si256(u.q.as_ptr().add(b * BLOCK) as *const __m256i);
            let w = _mm256_sub_epi8(q, _mm256_set1_epi8(u.center as i8));
            let s = _mm256_set_m128(
                _mm_set1_ps(*u.scale.get_unchecked(2 * b + 1)),
                _mm_set1_ps(*u.scale.get_unchecked(2 * b)),
            );
            (w, s)
        }
    }

    /// A row of 32-weight blocks of layout `L`, one with a center.
    struct Stored32<'a, const L: u8> {
        row: &'a [u8],
        bytes: usize,
    }

    impl<const L: u8> Blocks8 for Stored32<'_, L> {
        #[inline(always)]
        unsafe fn block(&mut self, b: usize) -> (__m256i, __m256) {
            let (q, d, _, center) = block32::<L>(self.row.as_ptr().add(b * self.bytes));
            (
                _mm256_sub_epi8(q, _mm256_set1_epi8(center as i8)),
                splat_half(d),
            )
        }
    }

    /// [`Dots::blocks8`]'s accumulators of `C` rows from `first`, the
    /// weights of block `b` given by `weights(b)` (signed bytes, lane
    /// scales). `VNNI`: one `vpdpbusd` per product of 32 (the CPU must have
    /// AVX512-VNNI), else `vpmaddubsw` and `vpmaddwd`: the same integers
    /// (|w| ≤ 128 and |x| ≤ 127, so no pair sum saturates).
    #[inline(always)]
    unsafe fn dots8<const C: usize, const VNNI: bool>(
        x: &Quantized,
        first: usize,
        weights: &mut impl Blocks8,
    ) -> [[__m256; 2]; C] {
        let k = x.k;
        let qx = x.q8.as_ptr().add(first * k);
        let xd = x.d.as_ptr().add(first * k / BLOCK);
        let mut acc = [[_mm256_setzero_ps(); 2]; C];
        macro_rules! block {
            ($b:expr, $lane:literal) => {{
                let b = $b;
                let (w, s) = weights.block(b);
                let magnitude = _mm256_abs_epi8(w);
                for c in 0..C {
                    let xv = _mm256_loadu_si256(qx.add(c * k + b * BLOCK) as *const __m256i);
                    // |w| · (x with w's sign) = w · x, unsigned times signed.
                    let signed = _mm256_sign_epi8(xv, w);
                    let dot = if VNNI {
                        _mm256_dpbusd_epi32(_mm256_setzero_si256(), magnitude, signed)
                    } else {
                        _mm256_madd_epi16(
                            _mm256_maddubs_epi16(magnitude, signed),
                            _mm256_set1_epi16(1),
                        )
                    };
                    let dx = _mm256_mul_ps(
                        _mm256_cvtepi32_ps(dot),
                        _mm256_set1_ps(*xd.add(c * k / BLOCK + b)),
                    );
                    acc[c][$lane] = _mm256_fmadd_ps(dx, s, acc[c][$lane]);
                }
            }};
        }
        let blocks = k / BLOCK;
        let mut b = 0;
        while b + 2 <= blocks {
            block!(b, 0);
            block!(b + 1, 1);
            b += 2;
        }
        if b < blocks {
            block!(b, 0);
        }
        acc
    }

    /// [`dots8`]'s accumulators of one row summed as [`lanes8`] sums them.
    #[inline(always)]
    unsafe fn lanes8_of(acc: &[__m256; 2]) -> f32 {
        hsum256(_mm256_add_ps(acc[0], acc[1]))
    }

    /// [`Dots::blocks8`] of an unpacked row, for the AVX2 and AVX-512 builds.
    #[inline(always)]
    unsafe fn blocks8_unpacked<const C: usize, const VNNI: bool>(
        u: &Unpacked,
        x: &Quantized,
        first: usize,
    ) -> [f32; C] {
        let acc = dots8::<C, VNNI>(x, first, &mut UnpackedRow(u));
        let k = x.k;
        let mut out = [0f32; C];
        for (c, o) in out.iter_mut().enumerate() {
            let row = first + c;
            let sums = &x.sums[row * k / GROUP..(row + 1) * k / GROUP];
            *o = lanes8_of(&acc[c]) + offsets(u, sums);
        }
        out
    }

    pub(super) struct Avx2;

    impl Dots for Avx2 {
        const SIMD: bool = true;

        #[inline(always)]
        unsafe fn blocks8<const C: usize>(u: &Unpacked, x: &Quantized, first: usize) -> [f32; C] {
            blocks8_unpacked::<C, false>(u, x, first)
        }

        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn blocks<const C: usize>(u: &Unpacked, x: &Quantized, first: usize) -> [f32; C] {
            let k = x.k;
            let mut acc = [[_mm256_setzero_ps(); 2]; C];
            let qx = x.q.as_ptr().add(first * k);
            let xd = x.d.as_ptr().add(first * k / BLOCK);
            let center = _mm256_set1_epi16(u.center);
            macro_rules! group {
                ($g:expr, $lane:literal) => {{
                    let g = $g;
                    let w = _mm256_sub_epi16(
                        _mm256_cvtepu8_epi16(_mm_loadu_si128(
                            u.q.as_ptr().add(g * GROUP) as *const __m128i
                        )),
                        center,
                    );
                    let s = _mm256_set1_ps(*u.scale.get_unchecked(g));
                    for c in 0..C {
                        let xv = _mm256_loadu_si256(qx.add(c * k + g * GROUP) as *const __m256i);
                        let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(w, xv));
                        let px = _mm256_mul_ps(p, _mm256_set1_ps(*xd.add(c * k / BLOCK + g / 2)));
                        acc[c][$lane] = _mm256_fmadd_ps(px, s, acc[c][$lane]);
                    }
                }};
            }
            let groups = k / GROUP;
            let mut g = 0;
            while g + 2 <= groups {
                group!(g, 0);
                group!(g + 1, 1);
                g += 2;
            }
            let mut out = [0f32; C];
            for c in 0..C {
                let row = first + c;
                let sums = &x.sums[row * k / GROUP..(row + 1) * k / GROUP];
                out[c] = hsum256(_mm256_add_ps(acc[c][0], acc[c][1])) + offsets(u, sums);
            }
            out
        }

        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn halves<const C: usize>(
            row: &[u16],
            bf16: bool,
            x: &[f32],
            k: usize,
            first: usize,
        ) -> [f32; C] {
            let mut acc = [[_mm256_setzero_ps(); 2]; C];
            let xp = x.as_ptr().add(first * k);
            let wide = |t: usize| -> __m256 {
                let raw = _mm_loadu_si128(row.as_ptr().add(t) as *const __m128i);
                if bf16 {
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
                } else {
                    _mm256_cvtph_ps(raw)
                }
            };
            let full = k / 16 * 16;
            let mut t = 0;
            while t < full {
                let (w0, w1) = (wide(t), wide(t + 8));
                for c in 0..C {
                    let xr = xp.add(c * k + t);
                    acc[c][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[c][0]);
                    acc[c][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), acc[c][1]);
                }
                t += 16;
            }
            let mut out = [0f32; C];
            for c in 0..C {
                let mut s = hsum256(_mm256_add_ps(acc[c][0], acc[c][1]));
                for j in full..k {
                    s = half_value(row[j], bf16).mul_add(*xp.add(c * k + j), s);
                }
                out[c] = s;
            }
            out
        }
    }

    /// [`Dots::row32`] of the AVX-512 build for K-quant layout `L`: the
    /// operations of `blocks` on the unpacked row, in its order.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn row_k_of<const C: usize, const L: u8>(
        t: BlockType,
        row: &[u8],
        x: &Quantized,
        first: usize,
    ) -> [f32; C] {
        let k = x.k;
        let bytes = t.bytes();
        let blocks = k / BLOCK;
        debug_assert_eq!(row.len(), k / 256 * bytes);
        let groups = k / GROUP;
        let whole = groups / 4 * 4;
        let center: i16 = if L == Q6K { 32 } else { 0 };
        let mut acc = [[_mm512_setzero_ps(); 2]; C];
        let mut spread = [[0f32; 4]; C];
        let qx = x.q.as_ptr().add(first * k);
        let xd = x.d.as_ptr().add(first * k / BLOCK);
        let sums = x.sums.as_ptr().add(first * groups);
        let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
        // Block `b` into accumulator `$lane` and its groups' offsets into
        // `spread[$at]`: constant indices, so that everything stays in
        // registers (an index `b & 1` put the accumulators on the stack).
        macro_rules! block {
            ($b:expr, $lane:literal, $at:literal) => {{
                let b = $b;
                let (sb, j) = (b / 8, b % 8);
                let block = &row[sb * bytes..(sb + 1) * bytes];
                let q = chunk_k::<L>(block.as_ptr(), j);
                let w = _mm512_sub_epi16(_mm512_cvtepu8_epi16(q), _mm512_set1_epi16(center));
                let s = _mm512_insertf32x8(
                    _mm512_castps256_ps512(_mm256_set1_ps(scale[2 * j])),
                    _mm256_set1_ps(scale[2 * j + 1]),
                    1,
                );
                for c in 0..C {
                    let xv = _mm512_loadu_si512(qx.add(c * k + b * BLOCK) as *const __m512i);
                    let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(w, xv));
                    let px = _mm512_mul_ps(p, _mm512_set1_ps(*xd.add(c * k / BLOCK + b)));
                    acc[c][$lane] = _mm512_fmadd_ps(px, s, acc[c][$lane]);
                    if center == 0 {
                        let (g, at) = (2 * b, $at);
                        spread[c][at] =
                            offset[2 * j].mul_add(*sums.add(c * groups + g), spread[c][at]);
                        spread[c][at + 1] = offset[2 * j + 1]
                            .mul_add(*sums.add(c * groups + g + 1), spread[c][at + 1]);
                    }
                }
            }};
        }
        // A row holds whole superblocks: 8 blocks each, so whole pairs, and
        // every group lies below `whole` (group g into g % 4).
        debug_assert!(blocks.is_multiple_of(8) && whole == groups);
        let mut b = 0;
        while b < blocks {
            if b % 8 == 0 {
                let block = &row[b / 8 * bytes..(b / 8 + 1) * bytes];
                superblock_scales(t, block, &mut scale, &mut offset, true);
            }
            block!(b, 0, 0);
            block!(b + 1, 1, 2);
            b += 2;
        }
        finish(&acc, &spread, center)
    }

    /// Each row's lane sums plus its offset sums (`offsets`' order; none
    /// for a layout with a center).
    #[inline(always)]
    unsafe fn finish<const C: usize>(
        acc: &[[__m512; 2]; C],
        spread: &[[f32; 4]; C],
        center: i16,
    ) -> [f32; C] {
        let mut out = [0f32; C];
        for (o, (acc, spread)) in out.iter_mut().zip(acc.iter().zip(spread)) {
            let offsets = if center != 0 {
                0.0
            } else {
                (spread[0] + spread[1]) + (spread[2] + spread[3])
            };
            *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + offsets;
        }
        out
    }

    /// [`Dots::row32`] of the AVX-512 build for layout `L`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn row32_of<const C: usize, const L: u8>(
        bytes: usize,
        row: &[u8],
        x: &Quantized,
        first: usize,
    ) -> [f32; C] {
        let k = x.k;
        let blocks = k / BLOCK;
        debug_assert_eq!(row.len(), blocks * bytes);
        let groups = k / GROUP;
        // `offsets`' accumulators: group g into g % 4, the groups past the
        // last whole four into the first.
        let whole = groups / 4 * 4;
        let mut acc = [[_mm512_setzero_ps(); 2]; C];
        let mut spread = [[0f32; 4]; C];
        let qx = x.q.as_ptr().add(first * k);
        let xd = x.d.as_ptr().add(first * k / BLOCK);
        let sums = x.sums.as_ptr().add(first * groups);
        // What block32 gives as each block's center.
        let center: i16 = match L {
            Q4_0 => 8,
            Q5_0 => 16,
            Q4_1 | Q5_1 => 0,
            _ => 128,
        };
        // Block `b` into accumulator `$lane`, its two groups' offsets into
        // `spread[$at]` and `spread[$at + $step]`: constant indices, so that
        // everything stays in registers.
        macro_rules! block {
            ($b:expr, $lane:literal, $at:literal, $step:literal) => {{
                let b = $b;
                let (q, d, offset, c0) = block32::<L>(row.as_ptr().add(b * bytes));
                debug_assert_eq!(c0, center);
                let w = _mm512_sub_epi16(_mm512_cvtepu8_epi16(q), _mm512_set1_epi16(center));
                let s = splat_half512(d);
                for c in 0..C {
                    let xv = _mm512_loadu_si512(qx.add(c * k + b * BLOCK) as *const __m512i);
                    let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(w, xv));
                    let px = _mm512_mul_ps(p, _mm512_set1_ps(*xd.add(c * k / BLOCK + b)));
                    acc[c][$lane] = _mm512_fmadd_ps(px, s, acc[c][$lane]);
                    if center == 0 {
                        let at = $at;
                        spread[c][at] =
                            offset.mul_add(*sums.add(c * groups + 2 * b), spread[c][at]);
                        let at = $at + $step;
                        spread[c][at] =
                            offset.mul_add(*sums.add(c * groups + 2 * b + 1), spread[c][at]);
                    }
                }
            }};
        }
        // Pairs of blocks cover groups 4i .. 4i + 3 (group g into g % 4); a
        // last odd block's two groups lie past `whole`, into spread[0].
        let mut b = 0;
        while b + 2 <= blocks {
            block!(b, 0, 0, 1);
            block!(b + 1, 1, 2, 1);
            b += 2;
        }
        if b < blocks {
            debug_assert!(2 * b >= whole);
            block!(b, 0, 0, 0);
        }
        finish(&acc, &spread, center)
    }

    /// The AVX-512 build; `VNNI`: the CPU has AVX512-VNNI too.
    pub(super) struct Avx512<const VNNI: bool>;

    impl<const VNNI: bool> Dots for Avx512<VNNI> {
        const SIMD: bool = true;
        const ROW32: bool = true;

        #[inline(always)]
        unsafe fn blocks8<const C: usize>(u: &Unpacked, x: &Quantized, first: usize) -> [f32; C] {
            blocks8_unpacked::<C, VNNI>(u, x, first)
        }

        #[inline(always)]
        unsafe fn row8<const C: usize>(
            t: BlockType,
            row: &[u8],
            x: &Quantized,
            first: usize,
        ) -> [f32; C] {
            let bytes = t.bytes();
            let acc = match t {
                BlockType::Q4_0 => dots8::<C, VNNI>(x, first, &mut Stored32::<Q4_0> { row, bytes }),
                _ => dots8::<C, VNNI>(x, first, &mut Stored32::<Q5_0> { row, bytes }),
            };
            std::array::from_fn(|c| lanes8_of(&acc[c]))
        }

        #[inline(always)]
        unsafe fn row32<const C: usize>(
            t: BlockType,
            row: &[u8],
            x: &Quantized,
            first: usize,
        ) -> [f32; C] {
            let bytes = t.bytes();
            match t {
                BlockType::Q4_0 => row32_of::<C, Q4_0>(bytes, row, x, first),
                BlockType::Q4_1 => row32_of::<C, Q4_1>(bytes, row, x, first),
                BlockType::Q5_0 => row32_of::<C, Q5_0>(bytes, row, x, first),
                BlockType::Q5_1 => row32_of::<C, Q5_1>(bytes, row, x, first),
                BlockType::Q8_0 => row32_of::<C, Q8_0>(bytes, row, x, first),
                BlockType::Q4K => row_k_of::<C, Q4K>(t, row, x, first),
                BlockType::Q5K => row_k_of::<C, Q5K>(t, row, x, first),
                BlockType::Q6K => row_k_of::<C, Q6K>(t, row, x, first),
                _ => unreachable!("a layout read as stored"),
            }
        }

        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn blocks<const C: usize>(u: &Unpacked, x: &Quantized, first: usize) -> [f32; C] {
            let k = x.k;
            let mut acc = [[_mm512_setzero_ps(); 2]; C];
            let qx = x.q.as_ptr().add(first * k);
            let xd = x.d.as_ptr().add(first * k / BLOCK);
            let center = _mm512_set1_epi16(u.center);
            // One activation block (32 values, two weight groups) per step.
            macro_rules! block {
                ($b:expr, $lane:literal) => {{
                    let b = $b;
                    let w = _mm512_sub_epi16(
                        _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                            u.q.as_ptr().add(b * BLOCK) as *const __m256i
                        )),
                        center,
                    );
                    let s = _mm512_insertf32x8(
                        _mm512_castps256_ps512(_mm256_set1_ps(*u.scale.get_unchecked(2 * b))),
                        _mm256_set1_ps(*u.scale.get_unchecked(2 * b + 1)),
                        1,
                    );
                    for c in 0..C {
                        let xv = _mm512_loadu_si512(qx.add(c * k + b * BLOCK) as *const __m512i);
                        let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(w, xv));
                        // The activation scale first, broadcast from memory
                        // into the product; the weight scale, shared by the
                        // rows, in the multiply-add.
                        let px = _mm512_mul_ps(p, _mm512_set1_ps(*xd.add(c * k / BLOCK + b)));
                        acc[c][$lane] = _mm512_fmadd_ps(px, s, acc[c][$lane]);
                    }
                }};
            }
            let blocks = k / BLOCK;
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
                let row = first + c;
                let sums = &x.sums[row * k / GROUP..(row + 1) * k / GROUP];
                out[c] =
                    _mm512_reduce_add_ps(_mm512_add_ps(acc[c][0], acc[c][1])) + offsets(u, sums);
            }
            out
        }

        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn halves<const C: usize>(
            row: &[u16],
            bf16: bool,
            x: &[f32],
            k: usize,
            first: usize,
        ) -> [f32; C] {
            let mut acc = [[_mm512_setzero_ps(); 2]; C];
            let xp = x.as_ptr().add(first * k);
            let wide = |t: usize| -> __m512 {
                let raw = _mm256_loadu_si256(row.as_ptr().add(t) as *const __m256i);
                if bf16 {
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
                } else {
                    _mm512_cvtph_ps(raw)
                }
            };
            let full = k / 32 * 32;
            let mut t = 0;
            while t < full {
                let (w0, w1) = (wide(t), wide(t + 16));
                for c in 0..C {
                    let xr = xp.add(c * k + t);
                    acc[c][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[c][0]);
                    acc[c][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr.add(16)), acc[c][1]);
                }
                t += 32;
            }
            let mut out = [0f32; C];
            for c in 0..C {
                let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc[c][0], acc[c][1]));
                for j in full..k {
                    s = half_value(row[j], bf16).mul_add(*xp.add(c * k + j), s);
                }
                out[c] = s;
            }
            out
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,bmi2")]
    pub(super) unsafe fn task_avx2(
        w: Rows<'_>,
        x: &Quantized,
        xf: &[f32],
        m: usize,
        k: usize,
        first_row: usize,
        out: &mut [f32],
    ) {
        task::<Avx2>(w, x, xf, m, k, first_row, out)
    }

    /// `(row32, blocks)` of the AVX-512 build for 1 and 4 activation rows
    /// from `first`: the row read as stored and the row unpacked.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")]
    pub(super) unsafe fn both_ways(
        t: BlockType,
        row: &[u8],
        x: &Quantized,
        first: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut u = Unpacked::new(x.k);
        unpack_row(t, row, &mut u, true);
        type Build = Avx512<false>;
        let quads = !x.q8.is_empty() && reads_as_stored8(t);
        let (mut direct, mut unpacked) = if !quads {
            let direct = Build::row32::<1>(t, row, x, first).to_vec();
            (direct, Build::blocks::<1>(&u, x, first).to_vec())
        } else {
            let direct = Build::row8::<1>(t, row, x, first).to_vec();
            (direct, Build::blocks8::<1>(&u, x, first).to_vec())
        };
        if !quads {
            direct.extend(Build::row32::<4>(t, row, x, first));
            unpacked.extend(Build::blocks::<4>(&u, x, first));
        } else {
            direct.extend(Build::row8::<4>(t, row, x, first));
            unpacked.extend(Build::blocks8::<4>(&u, x, first));
        }
        (direct, unpacked)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")]
    pub(super) unsafe fn task_avx512(
        w: Rows<'_>,
        x: &Quantized,
        xf: &[f32],
        m: usize,
        k: usize,
        first_row: usize,
        out: &mut [f32],
    ) {
        task::<Avx512<false>>(w, x, xf, m, k, first_row, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")]
    pub(super) unsafe fn task_avx512_vnni(
        w: Rows<'_>,
        x: &Quantized,
        xf: &[f32],
        m: usize,
        k: usize,
        first_row: usize,
        out: &mut [f32],
    ) {
        task::<Avx512<true>>(w, x, xf, m, k, first_row, out)
    }
}

/// `y = x Wᵀ` with the widest build: `x` is `[m, k]`, `W` has `n` rows of
/// `k`; returns `[m, n]`. `levels` bounds the integer activations of block
/// products (127 or 32767).
///
/// The caller checks that `W` holds `n` rows of `k` and, for blocks, that
/// `k` is a multiple of the block type's weights.
pub(crate) fn matmul(
    w: Rows<'_>,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    levels: i16,
) -> Vec<f32> {
    matmul_with(Isa::detect(), w, x, m, k, n, levels)
}

/// [`matmul`] with the build `isa` (which the CPU must run).
pub(crate) fn matmul_with(
    isa: Isa,
    w: Rows<'_>,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    levels: i16,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    if m >= WIDENED_ROWS {
        let rounded: Vec<f32>;
        let x = match w {
            Rows::Blocks(..) if levels < i16::MAX => {
                let q = quantize(x, k, levels);
                rounded =
                    q.q.iter()
                        .enumerate()
                        .map(|(i, &v)| v as f32 * q.d[i / BLOCK])
                        .collect();
                &rounded
            }
            _ => x,
        };
        return super::widened::matmul(isa, w, x, m, k, n);
    }
    let xq = match w {
        Rows::Blocks(..) => quantize(x, k, levels),
        _ => Quantized {
            q: Vec::new(),
            q8: Vec::new(),
            d: Vec::new(),
            sums: Vec::new(),
            k,
        },
    };
    // 8-bit activations take `vpdpbusd` where the CPU has it.
    let vnni = !xq.q8.is_empty() && has_vnni();
    let mut transposed = vec![0f32; n * m];
    // Enough rows per task to amortise scheduling, enough tasks to balance.
    let per_task = (n / (rayon::current_num_threads() * 8)).clamp(4, 256);
    transposed
        .par_chunks_mut(per_task * m)
        .enumerate()
        .for_each(|(t, out)| {
            let first = t * per_task;
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` names a build the CPU runs (Isa::detect),
                // and the CPU has AVX512-VNNI (has_vnni).
                Isa::Avx512 if vnni => unsafe {
                    x86::task_avx512_vnni(w, &xq, x, m, k, first, out)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` names a build the CPU runs.
                Isa::Avx512 => unsafe { x86::task_avx512(w, &xq, x, m, k, first, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => unsafe { x86::task_avx2(w, &xq, x, m, k, first, out) },
                // SAFETY: plain Rust.
                _ => unsafe { task::<Portable>(w, &xq, x, m, k, first, out) },
            }
        });
    transpose(transposed, m, n)
}

/// Whether the CPU has AVX512-VNNI (8-bit products of 4 in one step).
fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The float32 values of `n` rows of `k` weights.
pub(crate) fn dequantize(w: Rows<'_>, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * k];
    out.par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(r, row)| dequantize_row(w, r, row));
    out
}

/// The float32 values of row `r` (`row.len()` weights).
pub(crate) fn dequantize_row(w: Rows<'_>, r: usize, row: &mut [f32]) {
    let k = row.len();
    match w {
        Rows::Blocks(t, data) => {
            let bytes = t.row_bytes(k);
            super::quant::dequantize_row(t, &data[r * bytes..(r + 1) * bytes], row)
        }
        Rows::F16(h) | Rows::Bf16(h) => {
            let bf16 = matches!(w, Rows::Bf16(_));
            for (v, &b) in row.iter_mut().zip(&h[r * k..(r + 1) * k]) {
                *v = half_value(b, bf16);
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
    use crate::engine::quant::BLOCK_TYPES;

    fn values(count: usize, seed: u32) -> Vec<f32> {
        (0..count)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40503);
                (h.wrapping_mul(2_246_822_519) >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Random bytes as blocks of `t`, with sane float16 scales.
    fn random_blocks(t: BlockType, n: usize, k: usize, seed: u32) -> Vec<u8> {
        let mut bytes: Vec<u8> = values(n * t.row_bytes(k), seed)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect();
        // Every float16 field a small value (0.001 .. 0.03, either sign for
        // the minimum of Q4_1/Q5_1).
        let halves: &[usize] = match t {
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 => &[0],
            BlockType::Q4_1 | BlockType::Q5_1 | BlockType::Q4K | BlockType::Q5K => &[0, 2],
            BlockType::Q2K => &[80, 82],
            BlockType::Q3K => &[108],
            BlockType::Q6K => &[208],
        };
        for (b, block) in bytes.chunks_exact_mut(t.bytes()).enumerate() {
            for (j, &at) in halves.iter().enumerate() {
                let mantissa = ((b * 37 + j * 11) % 1024) as u16;
                let sign = if j == 1 && b % 2 == 1 { 0x8000 } else { 0 };
                let bits = sign | (8 << 10) | mantissa; // 2^-7 .. 2^-6
                block[at..at + 2].copy_from_slice(&bits.to_le_bytes());
            }
        }
        bytes
    }

    /// float16 bits of `v` rounded to the nearest (normal values).
    fn to_f16(v: f32) -> u16 {
        if v == 0.0 {
            return 0;
        }
        let bits = v.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
        let mant = ((bits & 0x7f_ffff) + 0x1000) >> 13;
        sign | (((exp as u32) << 10) + mant) as u16
    }

    fn plain(w: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        (0..m)
            .flat_map(|i| {
                (0..n).map(move |j| {
                    (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum()
                })
            })
            .collect()
    }

    fn largest(got: &[f32], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    /// Every block type, every build the CPU runs, few rows and many: each product is the
    /// dequantized float one, moved by no more than half an activation step
    /// per weight (a step is the block's largest magnitude over `levels`).
    #[test]
    fn block_products_follow_the_dequantized_float_product() {
        let (k, n) = (512, 21);
        // 150 rows: two blocks of activation rows in the widened products.
        for m in [7, WIDENED_ROWS + 3, 150] {
            let x = values(m * k, 5);
            for t in BLOCK_TYPES {
                let data = random_blocks(t, n, k, 9);
                let w = dequantize(Rows::Blocks(t, &data), n, k);
                let want = plain(&w, &x, m, k, n);
                let mut widened = Vec::new();
                for isa in Isa::available() {
                    for levels in [i16::MAX, 127] {
                        let got = matmul_with(isa, Rows::Blocks(t, &data), &x, m, k, n, levels);
                        if m >= WIDENED_ROWS {
                            widened.push((levels, got.clone()));
                        }
                        for i in 0..m {
                            for j in 0..n {
                                let bound: f64 = (0..k)
                                    .map(|c| {
                                        let block = &x[i * k + c / BLOCK * BLOCK..][..BLOCK];
                                        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                                        (w[j * k + c].abs() * amax) as f64 / levels as f64 / 2.0
                                    })
                                    .sum();
                                let e = (got[i * n + j] as f64 - want[i * n + j]).abs();
                                assert!(
                                    e <= bound * 1.01 + 1e-5,
                                    "{} {} {levels}: {e} > {bound}",
                                    t.name(),
                                    isa.name()
                                );
                            }
                        }
                    }
                }
                // Widened products (rows unpacked, or widened straight from
                // the blocks as stored): the same bits from every build.
                for levels in [i16::MAX, 127] {
                    let bits: Vec<_> = widened.iter().filter(|(l, _)| *l == levels).collect();
                    assert!(
                        bits.windows(2).all(|p| p[0].1 == p[1].1),
                        "{} m={m}",
                        t.name()
                    );
                }
            }
        }
    }

    /// The AVX-512 build reads rows of 32-weight blocks and of `Q4_K`,
    /// `Q5_K`, `Q6_K` blocks as stored; it must give the bits of the
    /// unpacked row, whatever the layout and the rows (32-weight rows of 11
    /// blocks: an odd count and groups past the last whole four).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn rows_read_as_stored_give_the_unpacked_rows_bits() {
        if Isa::detect() != Isa::Avx512 {
            println!("rows read as stored: skipped, this CPU has no AVX-512");
            return;
        }
        for t in BLOCK_TYPES.into_iter().filter(|&t| reads_as_stored(t)) {
            let k = if t.weights() == BLOCK {
                11 * BLOCK
            } else {
                3 * 256
            };
            let x = values(6 * k, 12);
            let data = random_blocks(t, 3, k, 13);
            for levels in [i16::MAX, 127] {
                let q = quantize(&x, k, levels);
                for r in 0..3 {
                    let row = &data[r * t.row_bytes(k)..(r + 1) * t.row_bytes(k)];
                    for first in [0, 2] {
                        // SAFETY: the CPU has AVX-512 (checked above).
                        let (direct, unpacked) = unsafe { x86::both_ways(t, row, &q, first) };
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&direct), bits(&unpacked), "{} row {r}", t.name());
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_without_the_c_library_is_round_ties_even() {
        let mut v = -40000.0f32;
        while v <= 40000.0 {
            for x in [v, v + 0.5, v + 0.25, v + 0.75, v + 0.499_999_97, v - 0.5] {
                assert_eq!(round_even(x), x.round_ties_even(), "{x}"); // -0 and 0 alike: both give 0
            }
            v += 1.0;
        }
        for x in [
            0.5f32,
            -0.5,
            1.5,
            2.5,
            -2.5,
            4_194_303.5,
            -4_194_303.5,
            1e-30,
            -1e-30,
        ] {
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn half_products_follow_the_float_product() {
        // k = 200: a tail past the last whole vector; k = 203: a tail past
        // the widened panels' last chunk as well; k = 208: whole chunks,
        // which the AVX-512 build widens straight from the stored halves.
        for (k, n) in [(200, 13), (203, 14), (208, 13)] {
            for m in [6, WIDENED_ROWS + 1] {
                let x = values(m * k, 2);
                let w = values(n * k, 8);
                let f16: Vec<u16> = w.iter().map(|&v| to_f16(v)).collect();
                let bf16: Vec<u16> = w.iter().map(|&v| (v.to_bits() >> 16) as u16).collect();
                for rows in [Rows::F16(&f16), Rows::Bf16(&bf16)] {
                    let wide = dequantize(rows, n, k);
                    let want = plain(&wide, &x, m, k, n);
                    let mut builds = Vec::new();
                    for isa in Isa::available() {
                        let got = matmul_with(isa, rows, &x, m, k, n, i16::MAX);
                        let err = largest(&got, &want);
                        assert!(err < 1e-4, "{isa:?} k={k} m={m}: {err}");
                        builds.push(got);
                    }
                    if m >= WIDENED_ROWS {
                        // Widened products: the same bits from every build.
                        assert!(builds.windows(2).all(|p| p[0] == p[1]), "k={k}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
        let (k, n) = (256, 19);
        let x = values(300 * k, 4);
        let blocks = random_blocks(BlockType::Q4K, n, k, 3);
        let stored = random_blocks(BlockType::Q5_0, n, k, 5);
        let half: Vec<u16> = values(n * k, 6).iter().map(|&v| to_f16(v)).collect();
        // 16-bit and 8-bit activations; Q4_K rows unpacked and Q5_0 rows
        // read as stored with 8-bit ones.
        for (w, levels) in [
            (Rows::Blocks(BlockType::Q4K, &blocks), i16::MAX),
            (Rows::Blocks(BlockType::Q4K, &blocks), 127),
            (Rows::Blocks(BlockType::Q5_0, &stored), 127),
            (Rows::F16(&half), i16::MAX),
        ] {
            let mut widened = Vec::new();
            for isa in Isa::available() {
                // Below WIDENED_ROWS rows against 7, from there on against 300.
                let few = matmul_with(isa, w, &x[..7 * k], 7, k, n, levels);
                let many = matmul_with(isa, w, &x, 300, k, n, levels);
                let cases = [
                    (0, 1),
                    (3, 1),
                    (6, 1),
                    (1, 2),
                    (4, 3),
                    (2, 5),
                    (0, 8),
                    (3, 9),
                    (4, 33),
                    (20, 17),
                    (100, 60),
                    (250, 50),
                    // A second block of 2 or 8 rows: the narrow tiles.
                    (150, 130),
                    (4, 136),
                ];
                for (from, count) in cases {
                    let whole = if count < WIDENED_ROWS { &few } else { &many };
                    let some = matmul_with(
                        isa,
                        w,
                        &x[from * k..(from + count) * k],
                        count,
                        k,
                        n,
                        levels,
                    );
                    assert_eq!(
                        some,
                        whole[from * n..(from + count) * n],
                        "{isa:?} {levels}: {count} rows from {from}"
                    );
                }
                widened.push(many);
            }
            // The widened products are the same sums in the same order in
            // every build.
            assert!(widened.windows(2).all(|p| p[0] == p[1]));
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::engine::quant::BLOCK_TYPES;

    /// Unpacking and product speeds per layout, on this CPU:
    /// `cargo test --release -p reft-core -- --ignored --nocapture kernel_speeds`
    #[test]
    #[ignore]
    fn kernel_speeds() {
        // REFT_KERNEL_SHAPE=n,k picks the weight shape (SmolLM2's is 1536,576).
        let shape = std::env::var("REFT_KERNEL_SHAPE").unwrap_or("1536,2304".into());
        let (n, k): (usize, usize) = match shape.split_once(',') {
            Some((n, k)) => (n.parse().unwrap(), k.parse().unwrap()),
            None => panic!("REFT_KERNEL_SHAPE is n,k"),
        };
        let x: Vec<f32> = (0..128 * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        // REFT_KERNEL_LEVELS=127 times the 8-bit activations' products.
        let levels: i16 =
            std::env::var("REFT_KERNEL_LEVELS").map_or(i16::MAX, |v| v.parse().unwrap());
        println!("kernels: {}, levels {levels}", Isa::detect().name());
        // REFT_KERNEL_TYPES=Q5_0,Q4_K picks the layouts.
        let names = std::env::var("REFT_KERNEL_TYPES").unwrap_or_default();
        for t in BLOCK_TYPES {
            if !names.is_empty() && !names.split(',').any(|name| name == t.name()) {
                continue;
            }
            if !k.is_multiple_of(t.weights()) {
                println!(
                    "{:5} skipped: k = {k} is not whole blocks of {}",
                    t.name(),
                    t.weights()
                );
                continue;
            }
            let data: Vec<u8> = (0..n * t.row_bytes(k))
                .map(|i| (i * 31 % 251) as u8 & 0x3b)
                .collect();
            let mut line = format!("{:5}", t.name());
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn unpack_simd(t: BlockType, data: &[u8], n: usize, k: usize) {
                unpack_all(t, data, n, k, true)
            }
            #[inline(always)]
            fn unpack_all(t: BlockType, data: &[u8], n: usize, k: usize, simd: bool) {
                let mut u = Unpacked::new(k);
                for r in 0..n {
                    let b = t.row_bytes(k);
                    unpack_row(t, &data[r * b..(r + 1) * b], &mut u, simd);
                    std::hint::black_box(&u);
                }
            }
            for simd in [false, true] {
                let start = std::time::Instant::now();
                if simd {
                    // SAFETY: the timing runs on x86 CPUs with AVX2.
                    unsafe { unpack_simd(t, &data, n, k) }
                } else {
                    unpack_all(t, &data, n, k, false)
                }
                let ns = start.elapsed().as_secs_f64() / (n * k) as f64 * 1e9;
                line += &format!(" unpack (simd {simd}) {ns:.3} ns/w;");
            }
            // REFT_KERNEL_M=4,16 picks the activation rows.
            let rows: Vec<usize> =
                std::env::var("REFT_KERNEL_M").map_or(vec![1, 4, 16, 32, 64], |v| {
                    v.split(',')
                        .map(|m| m.parse().expect("REFT_KERNEL_M lists row counts"))
                        .collect()
                });
            for m in rows {
                let reps = (4_000_000_000 / (m * n * k)).max(5);
                let start = std::time::Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(matmul(
                        Rows::Blocks(t, &data),
                        &x[..m * k],
                        m,
                        k,
                        n,
                        levels,
                    ));
                }
                let s = start.elapsed().as_secs_f64() / reps as f64;
                line += &format!(" m={m}: {:.1} GMAC/s;", (m * n * k) as f64 / s / 1e9);
            }
            println!("{line}");
        }
    }
}
