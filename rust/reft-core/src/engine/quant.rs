//! GGUF block layouts and their weights as small unsigned integers.
//!
//! Every layout the engine reads is unpacked, a row at a time, into one
//! form: each weight a byte `u` and, per group of 16 weights, a scale `s`
//! and an offset `o`, the weight being `s·(u − c) + o` with `c` the
//! layout's center: `Q4_0` is `d·(u − 8)`, so `s = d, c = 8, o = 0`; the
//! K-quants' 6- and 8-bit sub-block scales are multiplied out; `Q8_0`'s
//! signed bytes are shifted by 128 and centered back. The kernels
//! (`kernels.rs`) then take every layout through the same integer products.
//!
//! The layouts follow ggml's (`ggml-common.h`) and the `gguf` package's
//! `quants.py`, which the tests check against.

use candle_core::quantized::GgmlDType;

/// Weights per scale group of the unpacked form.
pub(crate) const GROUP: usize = 16;

/// A GGUF block layout with kernels of the engine's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BlockType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// All of them, for tests.
#[cfg(test)]
pub(crate) const BLOCK_TYPES: [BlockType; 10] = [
    BlockType::Q4_0,
    BlockType::Q4_1,
    BlockType::Q5_0,
    BlockType::Q5_1,
    BlockType::Q8_0,
    BlockType::Q2K,
    BlockType::Q3K,
    BlockType::Q4K,
    BlockType::Q5K,
    BlockType::Q6K,
];

impl BlockType {
    pub(crate) fn from_ggml(dtype: GgmlDType) -> Option<BlockType> {
        Some(match dtype {
            GgmlDType::Q4_0 => BlockType::Q4_0,
            GgmlDType::Q4_1 => BlockType::Q4_1,
            GgmlDType::Q5_0 => BlockType::Q5_0,
            GgmlDType::Q5_1 => BlockType::Q5_1,
            GgmlDType::Q8_0 => BlockType::Q8_0,
            GgmlDType::Q2K => BlockType::Q2K,
            GgmlDType::Q3K => BlockType::Q3K,
            GgmlDType::Q4K => BlockType::Q4K,
            GgmlDType::Q5K => BlockType::Q5K,
            GgmlDType::Q6K => BlockType::Q6K,
            _ => return None,
        })
    }

    /// The type's name as GGUF tools print it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            BlockType::Q4_0 => "Q4_0",
            BlockType::Q4_1 => "Q4_1",
            BlockType::Q5_0 => "Q5_0",
            BlockType::Q5_1 => "Q5_1",
            BlockType::Q8_0 => "Q8_0",
            BlockType::Q2K => "Q2_K",
            BlockType::Q3K => "Q3_K",
            BlockType::Q4K => "Q4_K",
            BlockType::Q5K => "Q5_K",
            BlockType::Q6K => "Q6_K",
        }
    }

    /// Weights per block.
    pub(crate) fn weights(self) -> usize {
        match self {
            BlockType::Q4_0
            | BlockType::Q4_1
            | BlockType::Q5_0
            | BlockType::Q5_1
            | BlockType::Q8_0 => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub(crate) fn bytes(self) -> usize {
        match self {
            BlockType::Q4_0 => 18,
            BlockType::Q4_1 => 20,
            BlockType::Q5_0 => 22,
            BlockType::Q5_1 => 24,
            BlockType::Q8_0 => 34,
            BlockType::Q2K => 84,
            BlockType::Q3K => 110,
            BlockType::Q4K => 144,
            BlockType::Q5K => 176,
            BlockType::Q6K => 210,
        }
    }

    /// Bytes of a row of `k` weights (`k` a multiple of [`Self::weights`]).
    pub(crate) fn row_bytes(self, k: usize) -> usize {
        k / self.weights() * self.bytes()
    }
}

/// The name of GGUF type id `id` (ggml's `ggml_type`), for messages.
pub(crate) fn ggml_type_name(id: u32) -> String {
    let name = match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => return format!("unknown type {id}"),
    };
    name.to_string()
}

/// One row in the unpacked form: `q[i]` per weight, `scale[g]` and
/// `offset[g]` per group of [`GROUP`] weights.
#[derive(Debug, Clone, Default)]
pub(crate) struct Unpacked {
    pub(crate) q: Vec<u8>,
    pub(crate) scale: Vec<f32>,
    pub(crate) offset: Vec<f32>,
    /// Subtracted from every `q` (the symmetric layouts' zero: 8 for
    /// `Q4_0`, 128 for `Q8_0`, ...), so their products stay exact integers.
    /// A layout with a center has no offsets (all zero); one without has.
    pub(crate) center: i16,
}

impl Unpacked {
    pub(crate) fn new(k: usize) -> Unpacked {
        Unpacked {
            q: vec![0; k],
            scale: vec![0.0; k / GROUP],
            offset: vec![0.0; k / GROUP],
            center: 0,
        }
    }

    /// The float weights, `s·(u − center) + o`.
    pub(crate) fn values(&self, out: &mut [f32]) {
        for (i, v) in out.iter_mut().enumerate() {
            let g = i / GROUP;
            *v = self.scale[g] * (self.q[i] as i16 - self.center) as f32 + self.offset[g];
        }
    }
}

/// float16 bits as float32 without branches on the common path (the
/// exponent moved into place, then scaled by 2^112; infinities and NaN
/// kept), so that unpacking loops stay straight.
#[inline(always)]
pub(crate) fn f16_value(h: u16) -> f32 {
    let magnitude = ((h & 0x7fff) as u32) << 13;
    let sign = ((h & 0x8000) as u32) << 16;
    let v = if h & 0x7c00 == 0x7c00 {
        f32::from_bits(magnitude | 0x7f80_0000)
    } else {
        f32::from_bits(magnitude) * f32::from_bits(0x7780_0000)
    };
    f32::from_bits(v.to_bits() | sign)
}

#[inline(always)]
fn half(simd: bool, b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` callers run with F16C.
        return unsafe { x86::half(bits) };
    }
    let _ = simd;
    f16_value(bits)
}

/// The blocks of `row` as arrays of `$bytes` bytes, each with its `$n`
/// weights' bytes and its scales and offsets in `out`.
macro_rules! each_block {
    ($row:expr, $out:expr, $n:literal, $bytes:literal, |$block:ident, $q:ident, $scale:ident, $offset:ident| $body:block) => {{
        let out: &mut Unpacked = $out;
        for (b, ($block, $q)) in $row
            .chunks_exact($bytes)
            .zip(out.q.chunks_exact_mut($n))
            .enumerate()
        {
            let $block: &[u8; $bytes] = $block.try_into().expect("whole blocks");
            let $q: &mut [u8; $n] = $q.try_into().expect("whole blocks");
            let $scale = &mut out.scale[b * ($n / GROUP)..(b + 1) * ($n / GROUP)];
            let $offset = &mut out.offset[b * ($n / GROUP)..(b + 1) * ($n / GROUP)];
            $body
        }
    }};
}

/// A fixed part of a block.
#[inline(always)]
fn part<const A: usize, const N: usize, const L: usize>(block: &[u8; N]) -> &[u8; L] {
    block[A..A + L].try_into().expect("inside the block")
}

/// Unpacks `row` (whole blocks of type `t`) into `out`, which holds room
/// for exactly the row's weights. `simd`: with AVX2 and F16C (the caller
/// runs on a CPU that has them); else 8 bytes at a time in `u64`s.
#[inline(always)]
pub(crate) fn unpack_row(t: BlockType, row: &[u8], out: &mut Unpacked, simd: bool) {
    out.center = match t {
        BlockType::Q4_0 => 8,
        BlockType::Q5_0 => 16,
        BlockType::Q8_0 => 128,
        BlockType::Q3K => 4,
        BlockType::Q6K => 32,
        _ => 0,
    };
    match t {
        BlockType::Q4_0 => each_block!(row, out, 32, 18, |block, q, scale, offset| {
            let d = half(simd, block, 0);
            nibbles(simd, part::<2, 18, 16>(block), q);
            scale.fill(d);
            offset.fill(0.0);
        }),
        BlockType::Q4_1 => each_block!(row, out, 32, 20, |block, q, scale, offset| {
            nibbles(simd, part::<4, 20, 16>(block), q);
            scale.fill(half(simd, block, 0));
            offset.fill(half(simd, block, 2));
        }),
        BlockType::Q5_0 => each_block!(row, out, 32, 22, |block, q, scale, offset| {
            let d = half(simd, block, 0);
            nibbles(simd, part::<6, 22, 16>(block), q);
            fifth_bits(simd, part::<2, 22, 4>(block), q);
            scale.fill(d);
            offset.fill(0.0);
        }),
        BlockType::Q5_1 => each_block!(row, out, 32, 24, |block, q, scale, offset| {
            nibbles(simd, part::<8, 24, 16>(block), q);
            fifth_bits(simd, part::<4, 24, 4>(block), q);
            scale.fill(half(simd, block, 0));
            offset.fill(half(simd, block, 2));
        }),
        BlockType::Q8_0 => each_block!(row, out, 32, 34, |block, q, scale, offset| {
            let d = half(simd, block, 0);
            let qs = part::<2, 34, 32>(block);
            flip_signs(simd, qs, q);
            scale.fill(d);
            offset.fill(0.0);
        }),
        BlockType::Q2K => each_block!(row, out, 256, 84, |block, q, scale, offset| {
            let scales = part::<0, 84, 16>(block);
            let (d, dmin) = (half(simd, block, 80), half(simd, block, 82));
            crumbs(simd, part::<16, 84, 64>(block), q);
            for g in 0..16 {
                scale[g] = d * (scales[g] & 0x0f) as f32;
                offset[g] = -dmin * (scales[g] >> 4) as f32;
            }
        }),
        BlockType::Q3K => each_block!(row, out, 256, 110, |block, q, scale, offset| {
            let hmask = part::<0, 110, 32>(block);
            let packed = part::<96, 110, 12>(block);
            let d = half(simd, block, 108);
            crumbs(simd, part::<32, 110, 64>(block), q);
            // The high bit: 4 added where set (the stored value is `low − 4`
            // where the bit is clear).
            high_bits(simd, hmask, q, 2);
            for g in 0..16 {
                let low = if g < 8 {
                    packed[g] & 0x0f
                } else {
                    packed[g - 8] >> 4
                };
                let high = (packed[8 + g % 4] >> (2 * (g / 4))) & 3;
                let s = d * (((low | (high << 4)) as i8) - 32) as f32;
                scale[g] = s;
                offset[g] = 0.0;
            }
        }),
        BlockType::Q4K => each_block!(row, out, 256, 144, |block, q, scale, offset| {
            k_nibbles(simd, part::<16, 144, 128>(block), q);
            superblock_scales(t, block, scale, offset, simd);
        }),
        BlockType::Q5K => each_block!(row, out, 256, 176, |block, q, scale, offset| {
            k_nibbles(simd, part::<48, 176, 128>(block), q);
            high_bits(simd, part::<16, 176, 32>(block), q, 4);
            superblock_scales(t, block, scale, offset, simd);
        }),
        BlockType::Q6K => each_block!(row, out, 256, 210, |block, q, scale, offset| {
            let ql = part::<0, 210, 128>(block);
            let qh = part::<128, 210, 64>(block);
            q6_values(simd, ql, qh, q);
            superblock_scales(t, block, scale, offset, simd);
        }),
    }
}

// The bit unpacking works on 8 bytes at a time in `u64`s.
const LOW_NIBBLES: u64 = 0x0f0f_0f0f_0f0f_0f0f;
const LOW_CRUMBS: u64 = 0x0303_0303_0303_0303;
const LOW_BITS: u64 = 0x0101_0101_0101_0101;

#[inline(always)]
fn load8(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[inline(always)]
fn store8(q: &mut [u8], at: usize, v: u64) {
    q[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[inline(always)]
fn or8(q: &mut [u8], at: usize, v: u64) {
    let old = load8(q, at);
    store8(q, at, old | v);
}

/// Byte `b`'s 8 bits spread to the low bits of 8 bytes.
const SPREAD: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 8 {
            table[b] |= (((b >> i) & 1) as u64) << (8 * i);
            i += 1;
        }
        b += 1;
    }
    table
};

/// 16 bytes of nibbles: low nibbles are weights 0..16, high ones 16..32.
#[inline(always)]
fn nibbles(simd: bool, qs: &[u8; 16], q: &mut [u8; 32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` callers run with AVX2.
        return unsafe { x86::nibbles(qs, q) };
    }
    let _ = simd;
    for w in 0..2 {
        let v = load8(qs, 8 * w);
        store8(q, 8 * w, v & LOW_NIBBLES);
        store8(q, 16 + 8 * w, (v >> 4) & LOW_NIBBLES);
    }
}

/// The fifth bit of 32 weights, bit `j` of a little-endian `u32`.
#[inline(always)]
fn fifth_bits(simd: bool, qh: &[u8; 4], q: &mut [u8; 32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` callers run with AVX2.
        return unsafe { x86::fifth_bits(qh, q) };
    }
    let _ = simd;
    for (i, &bits) in qh.iter().enumerate() {
        or8(q, 8 * i, SPREAD[bits as usize] << 4);
    }
}

/// Bit `e / 32` of byte `e % 32` of `bits`, as bit `at` of weight `e`.
#[inline(always)]
fn high_bits(simd: bool, bits: &[u8; 32], q: &mut [u8; 256], at: u32) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` callers run with AVX2.
        return unsafe { x86::high_bits(bits, q, at) };
    }
    let _ = simd;
    for w in 0..4 {
        let v = load8(bits, 8 * w);
        for bit in 0..8 {
            or8(q, bit * 32 + 8 * w, ((v >> bit) & LOW_BITS) << at);
        }
    }
}

/// 64 bytes of 2-bit values: weight `128h + 32j + l` is bits `2j..2j+2`
/// of byte `32h + l`.
#[inline(always)]
fn crumbs(simd: bool, qs: &[u8; 64], q: &mut [u8; 256]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` callers run with AVX2.
        return unsafe { x86::crumbs(qs, q) };
    }
    let _ = simd;
    for h in 0..2 {
        for w in 0..4 {
            let v = load8(qs, 32 * h + 8 * w);
            for j in 0..4 {
                store8(q, 128 * h + 32 * j + 8 * w, (v >> (2 * j)) & LOW_CRUMBS);
            }
        }
    }
}

/// `Q4_K` / `Q5_K` nibbles: weights `64c .. 64c + 32` are the low nibbles
/// of bytes `32c .. 32c + 32`, the next 32 their high nibbles.
#[inline(always)]
fn k_nibbles(simd: bool, qs: &[u8; 128], q: &mut [u8; 256]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` callers run with AVX2.
        return unsafe { x86::k_nibbles(qs, q) };
    }
    let _ = simd;
    for c in 0..4 {
        for w in 0..4 {
            let v = load8(qs, 32 * c + 8 * w);
            store8(q, 64 * c + 8 * w, v & LOW_NIBBLES);
            store8(q, 64 * c + 32 + 8 * w, (v >> 4) & LOW_NIBBLES);
        }
    }
}

/// `Q6_K`: low nibbles of `ql` and two high bits from `qh` per weight.
#[inline(always)]
fn q6_values(simd: bool, ql: &[u8; 128], qh: &[u8; 64], q: &mut [u8; 256]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` callers run with AVX2.
        return unsafe { x86::q6_values(ql, qh, q) };
    }
    let _ = simd;
    for h in 0..2 {
        for w in 0..8 {
            let v = load8(ql, 64 * h + 8 * w);
            store8(q, 128 * h + 8 * w, v & LOW_NIBBLES);
            store8(q, 128 * h + 64 + 8 * w, (v >> 4) & LOW_NIBBLES);
        }
        for w in 0..4 {
            let v = load8(qh, 32 * h + 8 * w);
            for j in 0..4 {
                or8(
                    q,
                    128 * h + 32 * j + 8 * w,
                    ((v >> (2 * j)) & LOW_CRUMBS) << 4,
                );
            }
        }
    }
}

/// `Q8_0`'s signed bytes plus 128.
#[inline(always)]
fn flip_signs(simd: bool, qs: &[u8; 32], q: &mut [u8; 32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` callers run with AVX2.
        return unsafe { x86::flip_signs(qs, q) };
    }
    let _ = simd;
    for w in 0..4 {
        store8(q, 8 * w, load8(qs, 8 * w) ^ 0x8080_8080_8080_8080);
    }
}

/// The same unpacking with AVX2 (32 bytes at a time) and F16C.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn load(p: &[u8], at: usize) -> __m256i {
        _mm256_loadu_si256(p[at..at + 32].as_ptr() as *const __m256i)
    }

    #[inline(always)]
    unsafe fn store(q: &mut [u8], at: usize, v: __m256i) {
        _mm256_storeu_si256(q[at..at + 32].as_mut_ptr() as *mut __m256i, v)
    }

    #[inline(always)]
    unsafe fn or(q: &mut [u8], at: usize, v: __m256i) {
        let old = load(q, at);
        store(q, at, _mm256_or_si256(old, v));
    }

    /// Each byte shifted right by `by` (within bytes: `mask` keeps the bits
    /// that stayed in their byte).
    #[inline(always)]
    unsafe fn shifted(v: __m256i, by: i32, mask: __m256i) -> __m256i {
        _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(by)), mask)
    }

    #[inline(always)]
    pub(super) unsafe fn half(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// 16 bytes of nibbles as 32 weights in a register: low nibbles are
    /// weights 0..16, high ones 16..32.
    #[inline(always)]
    pub(crate) unsafe fn nibbles_of(qs: &[u8; 16]) -> __m256i {
        let v = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    #[inline(always)]
    pub(super) unsafe fn nibbles(qs: &[u8; 16], q: &mut [u8; 32]) {
        store(q, 0, nibbles_of(qs));
    }

    #[inline(always)]
    pub(super) unsafe fn fifth_bits(qh: &[u8; 4], q: &mut [u8; 32]) {
        or(q, 0, fifth_bits_of(qh));
    }

    /// The fifth bit of 32 weights (bit `j` of a little-endian `u32`) as
    /// 0x10 in byte `j` of a register.
    #[inline(always)]
    pub(crate) unsafe fn fifth_bits_of(qh: &[u8; 4]) -> __m256i {
        let bits = _mm256_set1_epi32(i32::from_le_bytes(*qh));
        // Byte j takes source byte j / 8, then its bit j % 8.
        let spread = _mm256_shuffle_epi8(
            bits,
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    #[inline(always)]
    pub(super) unsafe fn high_bits(bits: &[u8; 32], q: &mut [u8; 256], at: u32) {
        let v = load(bits, 0);
        let one = _mm256_set1_epi8(1);
        let to = _mm_cvtsi32_si128(at as i32);
        for bit in 0..8 {
            or(
                q,
                bit * 32,
                _mm256_sll_epi16(shifted(v, bit as i32, one), to),
            );
        }
    }

    #[inline(always)]
    pub(super) unsafe fn crumbs(qs: &[u8; 64], q: &mut [u8; 256]) {
        let mask = _mm256_set1_epi8(3);
        for h in 0..2 {
            let v = load(qs, 32 * h);
            for j in 0..4 {
                store(q, 128 * h + 32 * j, shifted(v, 2 * j as i32, mask));
            }
        }
    }

    #[inline(always)]
    pub(super) unsafe fn k_nibbles(qs: &[u8; 128], q: &mut [u8; 256]) {
        let mask = _mm256_set1_epi8(0x0f);
        for c in 0..4 {
            let v = load(qs, 32 * c);
            store(q, 64 * c, _mm256_and_si256(v, mask));
            store(q, 64 * c + 32, shifted(v, 4, mask));
        }
    }

    #[inline(always)]
    pub(super) unsafe fn q6_values(ql: &[u8; 128], qh: &[u8; 64], q: &mut [u8; 256]) {
        let low = _mm256_set1_epi8(0x0f);
        let two = _mm256_set1_epi8(3);
        for h in 0..2 {
            for w in 0..2 {
                let v = load(ql, 64 * h + 32 * w);
                store(q, 128 * h + 32 * w, _mm256_and_si256(v, low));
                store(q, 128 * h + 64 + 32 * w, shifted(v, 4, low));
            }
            let v = load(qh, 32 * h);
            for j in 0..4 {
                or(
                    q,
                    128 * h + 32 * j,
                    _mm256_slli_epi16(shifted(v, 2 * j as i32, two), 4),
                );
            }
        }
    }

    #[inline(always)]
    pub(super) unsafe fn flip_signs(qs: &[u8; 32], q: &mut [u8; 32]) {
        store(q, 0, _mm256_xor_si256(load(qs, 0), _mm256_set1_epi8(-128)));
    }

    // The 32-weight layouts, as constants for `block32`.
    pub(crate) const Q4_0: u8 = 0;
    pub(crate) const Q4_1: u8 = 1;
    pub(crate) const Q5_0: u8 = 2;
    pub(crate) const Q5_1: u8 = 3;
    pub(crate) const Q8_0: u8 = 4;

    /// One 32-weight block as stored: its weights as unsigned bytes, the
    /// bits of its float16 scale (for [`splat_half`] or [`splat_half512`]),
    /// its offset and the layout's center (as `unpack_row` gives them).
    #[inline(always)]
    pub(crate) unsafe fn block32<const L: u8>(block: *const u8) -> (__m256i, u16, f32, i16) {
        let bits = |at: usize| u16::from_le_bytes([*block.add(at), *block.add(at + 1)]);
        let part = |at: usize| block.add(at);
        let nibbles = |at: usize| nibbles_of(&*(part(at) as *const [u8; 16]));
        let fifth = |at: usize| fifth_bits_of(&*(part(at) as *const [u8; 4]));
        match L {
            Q4_0 => (nibbles(2), bits(0), 0.0, 8),
            Q4_1 => (nibbles(4), bits(0), half(bits(2)), 0),
            Q5_0 => (_mm256_or_si256(nibbles(6), fifth(2)), bits(0), 0.0, 16),
            Q5_1 => (
                _mm256_or_si256(nibbles(8), fifth(4)),
                bits(0),
                half(bits(2)),
                0,
            ),
            _ => (
                _mm256_xor_si256(
                    _mm256_loadu_si256(block.add(2) as *const __m256i),
                    _mm256_set1_epi8(-128),
                ),
                bits(0),
                0.0,
                128,
            ),
        }
    }

    /// The float16 `bits` as float32 in every lane. Converted from a
    /// broadcast, so that the conversion reads no other register: a
    /// scalar conversion may be given any register to fill its other
    /// lanes from, and waits for whatever last wrote it.
    #[inline(always)]
    pub(crate) unsafe fn splat_half(bits: u16) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
    }

    /// [`splat_half`] in 16 lanes (AVX-512 callers).
    #[inline(always)]
    pub(crate) unsafe fn splat_half512(bits: u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_set1_epi16(bits as i16))
    }

    /// Weights `32 j .. 32 j + 32` of a `Q4_K`, `Q5_K` or `Q6_K` block as
    /// stored, as unsigned bytes (what `unpack_row` writes there).
    #[inline(always)]
    pub(crate) unsafe fn chunk_k<const L: u8>(block: *const u8, j: usize) -> __m256i {
        let low = _mm256_set1_epi8(0x0f);
        let load = |at: usize| _mm256_loadu_si256(block.add(at) as *const __m256i);
        // Each byte shifted right by `by`, `mask` keeping its own bits.
        let shifted = |v: __m256i, by: i32, mask: __m256i| {
            _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(by)), mask)
        };
        match L {
            Q4K | Q5K => {
                let qs = if L == Q4K { 16 } else { 48 };
                let v = load(qs + 32 * (j / 2));
                let q = if j.is_multiple_of(2) {
                    _mm256_and_si256(v, low)
                } else {
                    shifted(v, 4, low)
                };
                if L == Q4K {
                    q
                } else {
                    // Bit j of byte e of the 32 high bits, as bit 4 of weight e.
                    let high = shifted(load(16), j as i32, _mm256_set1_epi8(1));
                    _mm256_or_si256(q, _mm256_slli_epi16(high, 4))
                }
            }
            _ => {
                let (h, jj) = (j / 4, j % 4);
                let v = load(64 * h + 32 * (jj % 2));
                let q = if jj < 2 {
                    _mm256_and_si256(v, low)
                } else {
                    shifted(v, 4, low)
                };
                let high = shifted(load(128 + 32 * h), 2 * jj as i32, _mm256_set1_epi8(3));
                _mm256_or_si256(q, _mm256_slli_epi16(high, 4))
            }
        }
    }

    pub(crate) const Q4K: u8 = 5;
    pub(crate) const Q5K: u8 = 6;
    pub(crate) const Q6K: u8 = 7;
}

/// The 16 scales and offsets of a `Q4_K`, `Q5_K` or `Q6_K` block (what
/// [`unpack_row`] gives; also read by kernels that take rows as stored).
#[inline(always)]
pub(crate) fn superblock_scales(
    t: BlockType,
    block: &[u8],
    scale: &mut [f32],
    offset: &mut [f32],
    simd: bool,
) {
    match t {
        BlockType::Q4K | BlockType::Q5K => {
            let block: &[u8; 16] = block[..16].try_into().expect("a K-quant block");
            k_scales(simd, block, scale, offset)
        }
        BlockType::Q6K => {
            let scales: &[u8; 16] = block[192..208].try_into().expect("a Q6_K block");
            let d = half(simd, block, 208);
            for g in 0..16 {
                scale[g] = d * (scales[g] as i8) as f32;
                offset[g] = 0.0;
            }
        }
        _ => unreachable!("a K-quant layout with 16 scales"),
    }
}

/// The scales and offsets of a `Q4_K` / `Q5_K` block (which start alike).
#[inline(always)]
fn k_scales<const N: usize>(simd: bool, block: &[u8; N], scale: &mut [f32], offset: &mut [f32]) {
    let (d, dmin) = (half(simd, block, 0), half(simd, block, 2));
    let packed: &[u8; 12] = block[4..16].try_into().expect("inside the block");
    for j in 0..8 {
        let (sc, mn) = k_scale_min(packed, j);
        let (s, o) = (d * sc as f32, -dmin * mn as f32);
        scale[2 * j] = s;
        scale[2 * j + 1] = s;
        offset[2 * j] = o;
        offset[2 * j + 1] = o;
    }
}

/// Sub-block `j`'s 6-bit scale and minimum in the 12 packed bytes of a
/// `Q4_K` / `Q5_K` block.
#[inline(always)]
fn k_scale_min(p: &[u8; 12], j: usize) -> (u8, u8) {
    if j < 4 {
        (p[j] & 63, p[j + 4] & 63)
    } else {
        (
            (p[j + 4] & 0x0f) | ((p[j - 4] >> 6) << 4),
            (p[j + 4] >> 4) | ((p[j] >> 6) << 4),
        )
    }
}

/// The float32 values of `row` (whole blocks of type `t`), into `out`.
pub(crate) fn dequantize_row(t: BlockType, row: &[u8], out: &mut [f32]) {
    let mut unpacked = Unpacked::new(out.len());
    unpack_row(t, row, &mut unpacked, false);
    unpacked.values(out);
}

/// A float16 or bfloat16 value's bits as float32.
#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    #[test]
    fn every_float16_value_widens_exactly() {
        for bits in 0..=u16::MAX {
            let (a, b) = (f16_value(bits), crate::checkpoint::f16_to_f32(bits));
            assert_eq!(a.to_bits(), b.to_bits(), "{bits:#06x}");
        }
    }

    /// candle's own dequantization (a second reading of ggml's layouts)
    /// agrees with ours on blocks candle quantized; the `gguf` package's
    /// reading is checked from Python on random blocks.
    #[test]
    fn unpacking_matches_candle_on_quantized_rows() {
        let (n, k) = (3, 512);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        for t in BLOCK_TYPES {
            let dtype = match t {
                BlockType::Q4_0 => GgmlDType::Q4_0,
                BlockType::Q4_1 => GgmlDType::Q4_1,
                BlockType::Q5_0 => GgmlDType::Q5_0,
                BlockType::Q5_1 => GgmlDType::Q5_1,
                BlockType::Q8_0 => GgmlDType::Q8_0,
                BlockType::Q2K => GgmlDType::Q2K,
                BlockType::Q3K => GgmlDType::Q3K,
                BlockType::Q4K => GgmlDType::Q4K,
                BlockType::Q5K => GgmlDType::Q5K,
                BlockType::Q6K => GgmlDType::Q6K,
            };
            assert_eq!(BlockType::from_ggml(dtype), Some(t));
            assert_eq!(dtype.type_size(), t.bytes(), "{}", t.name());
            assert_eq!(dtype.block_size(), t.weights(), "{}", t.name());
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap();
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let data = q.data().unwrap();
            let mut got = vec![0f32; n * k];
            for r in 0..n {
                let bytes = &data[r * t.row_bytes(k)..(r + 1) * t.row_bytes(k)];
                dequantize_row(t, bytes, &mut got[r * k..(r + 1) * k]);
            }
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{} at {i}: {a} vs {b}",
                    t.name()
                );
            }
        }
    }
}
