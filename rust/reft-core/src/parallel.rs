//! When and how the core runs work on rayon's thread pool.
//!
//! A process that forks after using rayon (a torch `DataLoader` starting its
//! workers, say) hands its children a copy of the pool's bookkeeping but none
//! of its threads: work sent to that pool from a child waits forever. The
//! core therefore remembers which process first used the pool and runs
//! sequentially in any other process. Children whose parent never touched the
//! pool start their own, as usual.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

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

/// Runs that [`with_waiting_workers`] has under way, in the whole process.
static WAITING_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Waiting jobs running now, in the whole process.
static WAITING_JOBS: AtomicUsize = AtomicUsize::new(0);

/// Sets its flag when dropped (also when `work` panics).
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
        WAITING_RUNS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `work` on the current rayon worker while the pool's other workers
/// wait for its jobs by polling instead of sleeping.
///
/// An idle rayon worker goes to sleep after a few dozen yields, and the
/// next parallel product has to wake it (a futex call, then a few
/// microseconds to tens of them before it takes its share): at 2–7 rows a
/// product takes only a few dozen microseconds, so a forward pass of a few
/// hundred of them loses a good part of the second thread (measured on 2
/// cores: batch-4 decode 1.3× one thread's). Here the other workers each
/// run a job that takes the pool's pending jobs as they appear, pausing the
/// core between polls and yielding the CPU now and then, until `work`
/// returns. It only does so while this is the one such run in the process:
/// when another starts, the waiting jobs end and rayon's own scheduling
/// takes over (a thread that picks up a waiting job while another run's
/// frame waits below it would otherwise hold that run up until the first
/// one ends). Outside a rayon worker, or in a pool of one thread,
/// `work` simply runs.
pub(crate) fn with_waiting_workers<T>(work: impl FnOnce() -> T) -> T {
    let me = match rayon::current_thread_index() {
        Some(me) if rayon::current_num_threads() > 1 => me,
        _ => return work(),
    };
    let first = WAITING_RUNS.fetch_add(1, Ordering::AcqRel) == 0;
    let stop = Stop(Arc::new(AtomicBool::new(false)));
    if first {
        let done = stop.0.clone();
        rayon::spawn_broadcast(move |context| {
            if context.index() == me {
                return;
            }
            WAITING_JOBS.fetch_add(1, Ordering::AcqRel);
            let mut idle = 0u32;
            while !done.load(Ordering::Acquire) && WAITING_RUNS.load(Ordering::Acquire) == 1 {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => idle = 0,
                    _ => {
                        idle = idle.wrapping_add(1);
                        if idle.is_multiple_of(64) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                }
            }
            WAITING_JOBS.fetch_sub(1, Ordering::AcqRel);
        });
    }
    let out = work();
    drop(stop);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Mutex};
    use std::time::{Duration, Instant};

    fn new_pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a pool")
    }

    /// Many small parallel sums, as a forward pass runs its products.
    fn sums(seed: u64) -> u64 {
        (0..200u64)
            .map(|i| {
                (0..2000u64)
                    .into_par_iter()
                    .map(|v| v.wrapping_mul(i + seed) % 1009)
                    .sum::<u64>()
            })
            .sum()
    }

    fn plain_sums(seed: u64) -> u64 {
        (0..200u64)
            .map(|i| {
                (0..2000u64)
                    .map(|v| v.wrapping_mul(i + seed) % 1009)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Waits (5 s at most) until no waiting job runs in the process; other
    /// tests' runs end within that.
    fn no_waiting_jobs_left() {
        let start = Instant::now();
        while WAITING_JOBS.load(Ordering::Acquire) != 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "waiting jobs left running"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn waiting_workers_take_the_jobs_and_stop_after() {
        let pool = new_pool(3);
        for seed in 0..20 {
            let got = pool.install(|| with_waiting_workers(|| sums(seed)));
            assert_eq!(got, plain_sums(seed));
        }
        // Outside a worker, and in a pool of one thread: plain runs.
        assert_eq!(with_waiting_workers(|| sums(3)), plain_sums(3));
        assert_eq!(
            new_pool(1).install(|| with_waiting_workers(|| sums(4))),
            plain_sums(4)
        );
        no_waiting_jobs_left();
    }

    #[test]
    fn a_panic_in_the_work_stops_the_waiting_jobs() {
        let pool = new_pool(2);
        let caught = pool.install(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                with_waiting_workers(|| -> u64 { panic!("work failed") })
            }))
        });
        assert!(caught.is_err());
        no_waiting_jobs_left();
        assert_eq!(
            pool.install(|| with_waiting_workers(|| sums(5))),
            plain_sums(5)
        );
    }

    /// Runs from more threads at once than the pool has (one's waiting
    /// jobs meet the others' work, and end when their run does), sharing a
    /// lock between parallel sections: all finish, with the right sums. (No
    /// lock is held across a parallel section: in rayon a thread waiting at
    /// a join may start another caller's work on top, which would then wait
    /// for that lock forever, waiting jobs or not.)
    #[test]
    fn concurrent_runs_on_one_pool_all_finish() {
        let pool = Arc::new(new_pool(2));
        let lock = Arc::new(Mutex::new(0u64));
        let (done, finished) = mpsc::channel();
        for caller in 0..3u64 {
            let (pool, lock, done) = (pool.clone(), lock.clone(), done.clone());
            std::thread::spawn(move || {
                for round in 0..15 {
                    let seed = caller * 100 + round;
                    let got = pool.install(|| {
                        with_waiting_workers(|| {
                            let first = sums(seed);
                            *lock.lock().unwrap() += 1;
                            first + sums(seed + 1)
                        })
                    });
                    assert_eq!(got, plain_sums(seed) + plain_sums(seed + 1));
                }
                done.send(caller).unwrap();
            });
        }
        for _ in 0..3 {
            finished
                .recv_timeout(Duration::from_secs(60))
                .expect("a run never finished");
        }
        assert_eq!(*lock.lock().unwrap(), 45);
        no_waiting_jobs_left();
    }
}
