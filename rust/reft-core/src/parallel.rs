//! When and how the core runs work on rayon's thread pool.
//!
//! A process that forks after using rayon (a torch `DataLoader` starting its
//! workers, say) hands its children a copy of the pool's bookkeeping but none
//! of its threads: work sent to that pool from a child waits forever. The
//! core therefore remembers which process first used the pool and runs
//! sequentially in any other process. Children whose parent never touched the
//! pool start their own, as usual.

use std::sync::atomic::{AtomicU32, Ordering};

use rayon::prelude::*;

/// Process id of the process whose rayon pool the core uses (0: none yet).
static POOL_OWNER: AtomicU32 = AtomicU32::new(0);

/// Below this many output elements, splitting work across threads costs more
/// than it saves.
pub(crate) const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Whether this process may hand work to rayon's global pool.
///
/// True in the first process that asks, and false in a process forked from it
/// after it did (see the module documentation).
pub fn parallelism_available() -> bool {
    let pid = std::process::id();
    match POOL_OWNER.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => true,
        Err(owner) => owner == pid,
    }
}

/// Calls `fill(index, chunk)` on consecutive chunks of `out` of `chunk_len`
/// elements each (the last may be shorter), on several threads when
/// `parallel` is asked for, the output is large enough and the pool is usable.
pub(crate) fn for_each_chunk<T, F>(out: &mut [T], chunk_len: usize, parallel: bool, fill: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    let chunk_len = chunk_len.max(1);
    if parallel && out.len() >= PARALLEL_THRESHOLD && parallelism_available() {
        out.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(index, chunk)| fill(index, chunk));
    } else {
        for (index, chunk) in out.chunks_mut(chunk_len).enumerate() {
            fill(index, chunk);
        }
    }
}
