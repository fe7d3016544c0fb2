//! Allocation of large output arrays.
//!
//! A fresh array of hundreds of megabytes costs more in page faults than in
//! the work that fills it: one fault per 4 KiB page. On Linux the core asks
//! for transparent huge pages on such arrays (as numpy does for its own),
//! which cuts the faults 512-fold where the system allows it.

use std::mem::MaybeUninit;

use crate::error::{Error, Result};

/// Arrays at least this large are worth huge pages.
const HUGE_PAGE_THRESHOLD: usize = 4 << 20;

/// An empty `Vec` with room for exactly `len` values, or an error (never a
/// process abort) when the memory is not there.
pub(crate) fn with_capacity<T>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut data: Vec<T> = Vec::new();
    data.try_reserve_exact(len).map_err(|_| {
        Error::Allocation(format!(
            "cannot allocate {what}: {len} values ({} MiB)",
            len.saturating_mul(std::mem::size_of::<T>()) >> 20
        ))
    })?;
    advise_huge_pages(data.spare_capacity_mut());
    Ok(data)
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(memory: &mut [MaybeUninit<T>]) {
    let bytes = std::mem::size_of_val(memory);
    if bytes < HUGE_PAGE_THRESHOLD {
        return;
    }
    const PAGE: usize = 4096;
    let start = memory.as_mut_ptr() as usize;
    let aligned = start.next_multiple_of(PAGE);
    let end = (start + bytes) & !(PAGE - 1);
    if end > aligned {
        // SAFETY: the range lies inside memory this Vec owns; MADV_HUGEPAGE
        // is advice about how to back it and changes no contents. A refusal
        // (THP disabled) is harmless, so the result is ignored.
        unsafe {
            libc::madvise(
                aligned as *mut libc::c_void,
                end - aligned,
                libc::MADV_HUGEPAGE,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_memory: &mut [MaybeUninit<T>]) {}
