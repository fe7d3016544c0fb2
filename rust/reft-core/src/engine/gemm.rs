//! `y = x Wᵀ + b` in float32 for any number of rows of `x`.
//!
//! The weights are static, so they are repacked once, when the model
//! loads, into panels of [`PANEL`] output columns: panel `p` holds, for
//! each input index `t`, the 16 weights `W[16p..16p + 16, t]` side by side
//! (zero past the last column). A product is then a sum of outer products:
//! for each `t`, a few rows' `x[i, t]` broadcast times one 16-wide line of a
//! panel, kept in vector registers (6 rows by 16 columns: 12 accumulators,
//! 8 loads per 12 fused multiply-adds). The packed copy replaces the row
//! layout, so the engine holds one copy of each matrix.
//!
//! Blocking: rows of `x` are taken in blocks that stay in L2 while the
//! panels pass over them, one panel at a time; each panel is cut into
//! steps of [`DEPTH`] along `t`, so a step's slice stays in L1 while every
//! 6 rows of the block pass over it. Fewer than 6 rows take several panels
//! per tile in one pass. Threads split the panels.
//!
//! Every output value is the fused multiply-add chain over `t = 0, 1, ...`
//! in order, from zero, whatever the tile it falls in and whatever the
//! number of rows, and the bias is added after: a row's result does not
//! depend on the other rows of the batch, so a sequence decoded alone and in
//! a batch gets bit-identical products.

use rayon::prelude::*;

/// Output columns per panel.
pub(crate) const PANEL: usize = 16;
/// Steps along `t` per pass (a panel slice of 16 KiB).
const DEPTH: usize = 256;
/// Bytes of `x` rows kept in L2 while the panels pass.
const ROWS_BYTES: usize = 512 * 1024;

/// Rows of `x` per L2 block, a multiple of the 6-row tile.
fn block_rows(k: usize) -> usize {
    (ROWS_BYTES / (4 * k.max(1))).max(6) / 6 * 6
}

/// One line of a panel, aligned to a cache line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; PANEL]);

/// A weight matrix `[n, k]` in panels (see the module notes).
#[derive(Debug, Clone)]
pub(crate) struct Packed {
    n: usize,
    k: usize,
    /// `panels * k` lines, panel after panel.
    lines: Vec<Line>,
}

impl Packed {
    /// Packs `w`, `n` rows of `k` values.
    pub(crate) fn new(w: &[f32], n: usize, k: usize) -> Packed {
        assert_eq!(w.len(), n * k, "a weight matrix of {n} rows of {k}");
        Packed::from_rows(n, k, |j, row| row.copy_from_slice(&w[j * k..][..k]))
    }

    /// Packs `n` rows of `k` values, `fill(j, row)` writing row `j`.
    pub(crate) fn from_rows(n: usize, k: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Packed {
        let panels = n.div_ceil(PANEL);
        let mut lines = vec![Line::default(); panels * k];
        lines
            .par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                let mut row = vec![0f32; k];
                for c in 0..PANEL.min(n - p * PANEL) {
                    fill(p * PANEL + c, &mut row);
                    for (line, &v) in panel.iter_mut().zip(&row) {
                        line.0[c] = v;
                    }
                }
            });
        Packed { n, k, lines }
    }

    pub(crate) fn rows(&self) -> usize {
        self.n
    }

    pub(crate) fn cols(&self) -> usize {
        self.k
    }

    /// Row `j` of the matrix (`k` values), e.g. a token's embedding when the
    /// head shares the embedding matrix.
    pub(crate) fn row(&self, j: usize) -> Vec<f32> {
        let (p, c) = (j / PANEL, j % PANEL);
        self.lines[p * self.k..(p + 1) * self.k]
            .iter()
            .map(|line| line.0[c])
            .collect()
    }

    /// The matrices one above the other (`[n1 + n2 + ..., k]`).
    pub(crate) fn stack(parts: &[&Packed]) -> Packed {
        let k = parts.first().map_or(0, |p| p.k);
        assert!(parts.iter().all(|p| p.k == k), "matrices of {k} columns");
        let n = parts.iter().map(|p| p.n).sum();
        if parts.iter().all(|p| p.n % PANEL == 0) {
            // Whole panels: they follow one another unchanged.
            let lines = parts.iter().flat_map(|p| p.lines.iter().copied()).collect();
            return Packed { n, k, lines };
        }
        let rows: Vec<f32> = parts.iter().flat_map(|p| p.unpack()).collect();
        Packed::new(&rows, n, k)
    }

    /// The matrix in rows again, `[n, k]`.
    pub(crate) fn unpack(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.n * self.k);
        for j in 0..self.n {
            w.extend(self.row(j));
        }
        w
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// The start of panel `p` at step `t`.
    fn at(&self, p: usize, t: usize) -> *const f32 {
        self.lines[p * self.k + t..].as_ptr().cast()
    }
}

/// A raw pointer to the output, written by several threads at disjoint
/// columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only its own columns of the output.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `y = x Wᵀ + b`: `x` is `[m, k]`, `b` has `n` values; returns `[m, n]`.
pub(crate) fn matmul(w: &Packed, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "{m} rows of {k} inputs");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "a bias of {n} values");
    }
    if m == 0 || n == 0 || k == 0 {
        // No steps: each value is its bias.
        let mut y = vec![0f32; m * n];
        if let Some(b) = bias {
            for row in y.chunks_exact_mut(n) {
                row.copy_from_slice(b);
            }
        }
        return y;
    }
    // Not zeroed: the first step of every tile stores its values without
    // reading them, and the tasks cover every column.
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let panels = w.panels();
    let threads = rayon::current_num_threads().max(1);
    // Two tasks per thread balance the threads; whole panels per task.
    let per_task = panels.div_ceil(threads * 2).max(1);
    let tasks = panels.div_ceil(per_task);
    let out = Out(y.as_mut_ptr());
    let build = Build::detect();
    (0..tasks).into_par_iter().for_each(|t| {
        let first = t * per_task;
        let last = (first + per_task).min(panels);
        // SAFETY: the task writes the columns of panels first..last of `y`
        // only, and `y` outlives the parallel loop.
        unsafe { task(w, x, m, first, last, bias, out, build) };
    });
    // SAFETY: the tasks above wrote all `m * n` values.
    unsafe { y.set_len(m * n) };
    y
}

pub(crate) fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernels a CPU can run. All three give the same bits: each output is
/// the same chain of fused multiply-adds, only more lanes at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Build {
    Portable,
    Avx2,
    Avx512,
}

impl Build {
    fn detect() -> Build {
        #[cfg(target_arch = "x86_64")]
        {
            if has_fma() && std::is_x86_feature_detected!("avx512f") {
                return Build::Avx512;
            }
            if has_fma() {
                return Build::Avx2;
            }
        }
        Build::Portable
    }
}

/// The columns of panels `first..last` of `y`, all rows.
///
/// # Safety
/// `out` points to `m * n` floats; no other thread writes these columns;
/// `build` is one the CPU can run ([`Build::detect`] or below it).
#[allow(clippy::too_many_arguments)]
unsafe fn task(
    w: &Packed,
    x: &[f32],
    m: usize,
    first: usize,
    last: usize,
    bias: Option<&[f32]>,
    out: Out,
    build: Build,
) {
    match build {
        #[cfg(target_arch = "x86_64")]
        Build::Avx512 => avx512::task(w, x, m, first, last, bias, out),
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => avx2::task(w, x, m, first, last, bias, out),
        _ => portable::task(w, x, m, first, last, bias, out),
    }
}

/// The tiles a build takes: panels per tile beside 6 rows, and beside
/// fewer rows (enough accumulators, up to 12, to keep the multiply-add
/// units busy, within the vector registers of the build).
#[derive(Clone, Copy)]
struct Shape {
    /// Panels per 6-row tile.
    wide: usize,
    /// Panels per tile of 1, 2, 3, 4 and 5 rows.
    few: [usize; 5],
}

impl Shape {
    fn panels_for(self, r: usize) -> usize {
        self.few[r.clamp(1, 5) - 1]
    }
}

/// 16 ymm registers: a panel line takes two.
const YMM: Shape = Shape {
    wide: 1,
    few: [4, 3, 2, 1, 1],
};
/// 32 zmm registers: a panel line takes one.
#[cfg(target_arch = "x86_64")]
const ZMM: Shape = Shape {
    wide: 2,
    few: [8, 4, 4, 3, 2],
};

/// The loops of a task, shared by both builds; `$tile` is the build's
/// kernel: `$tile::<R, P>(a, lda, b, stride, depth, c, ldc, first)` adds
/// `R` rows of `a` (row stride `lda`) times `P` panels (`b`, panels
/// `stride` floats apart) over `depth` steps into the `R x 16P` tile `c`
/// (row stride `ldc`), which starts from zero when `first`.
macro_rules! task_body {
    ($w:ident, $x:ident, $m:ident, $first:ident, $last:ident, $bias:ident, $out:ident,
     $tile:ident, $shape:ident) => {{
        let (n, k) = ($w.n, $w.k);
        let stride = k * PANEL;
        // One tile of `r` rows from row `i` and `count` panels from panel
        // `p`, at steps `t..t + depth`.
        let tile = |i: usize, r: usize, p: usize, count: usize, t: usize, depth: usize| {
            let a = $x.as_ptr().add(i * k + t);
            let b = $w.at(p, t);
            let start = t == 0;
            let columns = (n - p * PANEL).min(count * PANEL);
            // Every (rows, panels) that `$shape` can ask for.
            let run = |c: *mut f32, ldc: usize| match (r, count) {
                (6, 2) => $tile::<6, 2>(a, k, b, stride, depth, c, ldc, start),
                (6, 1) => $tile::<6, 1>(a, k, b, stride, depth, c, ldc, start),
                (5, 2) => $tile::<5, 2>(a, k, b, stride, depth, c, ldc, start),
                (5, 1) => $tile::<5, 1>(a, k, b, stride, depth, c, ldc, start),
                (4, 3) => $tile::<4, 3>(a, k, b, stride, depth, c, ldc, start),
                (4, 2) => $tile::<4, 2>(a, k, b, stride, depth, c, ldc, start),
                (4, 1) => $tile::<4, 1>(a, k, b, stride, depth, c, ldc, start),
                (3, 4) => $tile::<3, 4>(a, k, b, stride, depth, c, ldc, start),
                (3, 3) => $tile::<3, 3>(a, k, b, stride, depth, c, ldc, start),
                (3, 2) => $tile::<3, 2>(a, k, b, stride, depth, c, ldc, start),
                (3, 1) => $tile::<3, 1>(a, k, b, stride, depth, c, ldc, start),
                (2, 4) => $tile::<2, 4>(a, k, b, stride, depth, c, ldc, start),
                (2, 3) => $tile::<2, 3>(a, k, b, stride, depth, c, ldc, start),
                (2, 2) => $tile::<2, 2>(a, k, b, stride, depth, c, ldc, start),
                (2, 1) => $tile::<2, 1>(a, k, b, stride, depth, c, ldc, start),
                (1, 8) => $tile::<1, 8>(a, k, b, stride, depth, c, ldc, start),
                (1, 7) => $tile::<1, 7>(a, k, b, stride, depth, c, ldc, start),
                (1, 6) => $tile::<1, 6>(a, k, b, stride, depth, c, ldc, start),
                (1, 5) => $tile::<1, 5>(a, k, b, stride, depth, c, ldc, start),
                (1, 4) => $tile::<1, 4>(a, k, b, stride, depth, c, ldc, start),
                (1, 3) => $tile::<1, 3>(a, k, b, stride, depth, c, ldc, start),
                (1, 2) => $tile::<1, 2>(a, k, b, stride, depth, c, ldc, start),
                (1, 1) => $tile::<1, 1>(a, k, b, stride, depth, c, ldc, start),
                _ => unreachable!("no {r}-row tile of {count} panels"),
            };
            if columns == count * PANEL {
                run($out.0.add(i * n + p * PANEL), n);
            } else {
                // The last panel sticks out past `n`: work on a copy.
                let ldc = count * PANEL;
                // At most 12 panel lines of accumulators in any tile.
                let mut spare = [0f32; 12 * PANEL];
                assert!(
                    r * ldc <= spare.len(),
                    "a tile of {r} rows and {count} panels"
                );
                if !start {
                    for row in 0..r {
                        for col in 0..columns {
                            spare[row * ldc + col] = *$out.0.add((i + row) * n + p * PANEL + col);
                        }
                    }
                }
                run(spare.as_mut_ptr(), ldc);
                for row in 0..r {
                    for col in 0..columns {
                        *$out.0.add((i + row) * n + p * PANEL + col) = spare[row * ldc + col];
                    }
                }
            }
        };
        if $m < 6 {
            // A few rows: several panels per tile, each panel read once
            // from end to end.
            let mut p = $first;
            while p < $last {
                let count = $shape.panels_for($m).min($last - p);
                tile(0, $m, p, count, 0, k);
                p += count;
            }
        } else {
            let rows = block_rows(k);
            let mut block = 0;
            while block < $m {
                let end = (block + rows).min($m);
                for p in ($first..$last).step_by($shape.wide) {
                    let count = $shape.wide.min($last - p);
                    let mut t = 0;
                    while t < k {
                        let depth = DEPTH.min(k - t);
                        let mut i = block;
                        while i < end {
                            let r = 6.min(end - i);
                            tile(i, r, p, count, t, depth);
                            i += r;
                        }
                        t += depth;
                    }
                }
                block = end;
            }
        }
        if let Some(b) = $bias {
            let (from, to) = ($first * PANEL, ($last * PANEL).min(n));
            for i in 0..$m {
                for j in from..to {
                    *$out.0.add(i * n + j) += b[j];
                }
            }
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// See [`task_body`].
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<const R: usize, const P: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        stride: usize,
        depth: usize,
        c: *mut f32,
        ldc: usize,
        start: bool,
    ) {
        let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
        if !start {
            for r in 0..R {
                for q in 0..P {
                    acc[r][q][0] = _mm256_loadu_ps(c.add(r * ldc + q * PANEL));
                    acc[r][q][1] = _mm256_loadu_ps(c.add(r * ldc + q * PANEL + 8));
                }
            }
        }
        for t in 0..depth {
            let mut line = [[_mm256_setzero_ps(); 2]; P];
            for q in 0..P {
                let at = b.add(q * stride + t * PANEL);
                line[q][0] = _mm256_load_ps(at);
                line[q][1] = _mm256_load_ps(at.add(8));
            }
            for r in 0..R {
                let v = _mm256_broadcast_ss(&*a.add(r * lda + t));
                for q in 0..P {
                    acc[r][q][0] = _mm256_fmadd_ps(v, line[q][0], acc[r][q][0]);
                    acc[r][q][1] = _mm256_fmadd_ps(v, line[q][1], acc[r][q][1]);
                }
            }
        }
        for r in 0..R {
            for q in 0..P {
                _mm256_storeu_ps(c.add(r * ldc + q * PANEL), acc[r][q][0]);
                _mm256_storeu_ps(c.add(r * ldc + q * PANEL + 8), acc[r][q][1]);
            }
        }
    }

    /// # Safety
    /// As [`super::task`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task(
        w: &Packed,
        x: &[f32],
        m: usize,
        first: usize,
        last: usize,
        bias: Option<&[f32]>,
        out: Out,
    ) {
        task_body!(w, x, m, first, last, bias, out, tile, YMM)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// See [`task_body`]; a panel line is one register.
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<const R: usize, const P: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        stride: usize,
        depth: usize,
        c: *mut f32,
        ldc: usize,
        start: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        if !start {
            for r in 0..R {
                for q in 0..P {
                    acc[r][q] = _mm512_loadu_ps(c.add(r * ldc + q * PANEL));
                }
            }
        }
        for t in 0..depth {
            let mut line = [_mm512_setzero_ps(); P];
            for q in 0..P {
                line[q] = _mm512_load_ps(b.add(q * stride + t * PANEL));
            }
            for r in 0..R {
                let v = _mm512_set1_ps(*a.add(r * lda + t));
                for q in 0..P {
                    acc[r][q] = _mm512_fmadd_ps(v, line[q], acc[r][q]);
                }
            }
        }
        for r in 0..R {
            for q in 0..P {
                _mm512_storeu_ps(c.add(r * ldc + q * PANEL), acc[r][q]);
            }
        }
    }

    /// # Safety
    /// As [`super::task`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn task(
        w: &Packed,
        x: &[f32],
        m: usize,
        first: usize,
        last: usize,
        bias: Option<&[f32]>,
        out: Out,
    ) {
        task_body!(w, x, m, first, last, bias, out, tile, ZMM)
    }
}

mod portable {
    use super::*;

    /// The same chains as the vector build: one fused multiply-add per step
    /// for each value, in step order.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const P: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        stride: usize,
        depth: usize,
        c: *mut f32,
        ldc: usize,
        start: bool,
    ) {
        for r in 0..R {
            for q in 0..P {
                for col in 0..PANEL {
                    let dst = c.add(r * ldc + q * PANEL + col);
                    let mut s = if start { 0.0 } else { *dst };
                    for t in 0..depth {
                        s = (*a.add(r * lda + t)).mul_add(*b.add(q * stride + t * PANEL + col), s);
                    }
                    *dst = s;
                }
            }
        }
    }

    /// # Safety
    /// As [`super::task`].
    pub(super) unsafe fn task(
        w: &Packed,
        x: &[f32],
        m: usize,
        first: usize,
        last: usize,
        bias: Option<&[f32]>,
        out: Out,
    ) {
        task_body!(w, x, m, first, last, bias, out, tile, YMM)
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
        // Every row remainder of the 6-row tile, panels cut short, several
        // steps along k (k > 256) with a short last step, several L2 blocks
        // of rows (60 rows a block at k = 2000), a single row and a single
        // column.
        for (m, k, n) in [
            (1, 8, 1),
            (3, 0, 5),
            (2, 13, 5),
            (3, 300, 40),
            (4, 64, 7),
            (5, 33, 70),
            (7, 576, 300),
            (31, 40, 100),
            (40, 1000, 17),
            (100, 96, 64),
            (250, 520, 33),
            (130, 2000, 20),
        ] {
            let (w, x, b) = (values(n * k, 1), values(m * k, 2), values(n, 3));
            let got = matmul(&Packed::new(&w, n, k), &x, m, Some(&b));
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
        // k = 3000: blocks of 42 rows, 12 steps along k.
        let (k, n) = (3000, 37);
        let w = Packed::new(&values(n * k, 5), n, k);
        let x = values(100 * k, 6);
        let whole = matmul(&w, &x, 100, None);
        for i in [0, 1, 2, 3, 4, 5, 6, 26, 41, 42, 49, 83, 84, 99] {
            let alone = matmul(&w, &x[i * k..(i + 1) * k], 1, None);
            assert_eq!(alone, whole[i * n..(i + 1) * n], "row {i}");
        }
        // Few rows together (several panels per tile), at an offset that
        // shifts the tiles.
        for (from, count) in [(4, 2), (7, 3), (10, 5), (3, 8)] {
            let some = matmul(&w, &x[from * k..(from + count) * k], count, None);
            assert_eq!(
                some,
                whole[from * n..(from + count) * n],
                "{count} rows from {from}"
            );
        }
    }

    /// The product by one build, all panels in one task.
    fn product(build: Build, w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * w.rows()];
        // SAFETY: one task writes every column of `y`; `build` is one the
        // CPU runs (the caller checks).
        unsafe { task(w, x, m, 0, w.panels(), None, Out(y.as_mut_ptr()), build) };
        y
    }

    #[test]
    fn every_build_sums_the_same_bits() {
        let best = Build::detect();
        let builds: Vec<Build> = [Build::Portable, Build::Avx2, Build::Avx512]
            .into_iter()
            .filter(|&b| {
                b == Build::Portable || b == Build::Avx2 && best != Build::Portable || b == best
            })
            .collect();
        // Every row count below the 6-row tile and around it, panels cut
        // short and left over from the wide tiles (n = 8, 40, 70, 150).
        for (m, k, n) in [
            (1, 77, 150),
            (2, 300, 70),
            (3, 64, 150),
            (4, 33, 40),
            (5, 77, 8),
            (6, 40, 70),
            (13, 300, 40),
            (50, 520, 150),
        ] {
            let (w, x) = (values(n * k, 7), values(m * k, 8));
            let w = Packed::new(&w, n, k);
            let reference = product(Build::Portable, &w, &x, m);
            for &build in &builds {
                assert_eq!(
                    product(build, &w, &x, m),
                    reference,
                    "{build:?} {m}x{k}x{n}"
                );
            }
            assert_eq!(matmul(&w, &x, m, None), reference, "{m}x{k}x{n}");
        }
    }

    #[test]
    fn packing_keeps_every_weight() {
        let (n, k) = (37, 11);
        let w = values(n * k, 9);
        let packed = Packed::new(&w, n, k);
        assert_eq!((packed.rows(), packed.cols()), (n, k));
        assert_eq!(packed.unpack(), w);
        assert_eq!(packed.row(20), w[20 * k..21 * k]);
        // Three panels, the last one padded.
        assert_eq!(packed.lines.len(), 3 * k);
        // Stacked, with and without whole panels.
        let (a, b) = (values(32 * k, 10), values(5 * k, 11));
        let (pa, pb) = (Packed::new(&a, 32, k), Packed::new(&b, 5, k));
        for parts in [vec![&pa, &pa], vec![&pa, &pb, &packed], vec![&pb, &pa]] {
            let expected: Vec<f32> = parts.iter().flat_map(|p| p.unpack()).collect();
            let stacked = Packed::stack(&parts);
            assert_eq!(
                stacked.rows(),
                parts.iter().map(|p| p.rows()).sum::<usize>()
            );
            assert_eq!(stacked.unpack(), expected);
        }
    }
}
