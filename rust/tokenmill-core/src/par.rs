//! Parallel work whose results come back in order, to a consumer on the calling thread.
//!
//! Batch encoding from Python has a serial tail: every result has to become a Python list while
//! holding the GIL (about 15% of a 1-thread `encode_batch`: list fill, int refcounts and the cyclic
//! GC walking the new lists). Encoding everything first and converting afterwards caps two threads
//! at ~1.65x one; [`ordered_map`] lets the calling thread convert finished results while the other
//! threads keep encoding, and encode itself when nothing is ready to convert.
//!
//! [`Slots`] is the one collector of results computed out of order and taken in order:
//! [`ordered_map`] and corpus preparation (`data::prepare`, one pool job per record) use it.

use crate::{Error, Result};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The thread count a `num_threads` argument means: None or 0 is rayon's global pool size
/// (all cores, or RAYON_NUM_THREADS).
pub fn thread_count(num_threads: Option<usize>) -> usize {
    match num_threads {
        None | Some(0) => rayon::current_num_threads(),
        Some(n) => n,
    }
}

fn pool(n: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| Error::invalid(format!("cannot start {n} threads: {e}")))
}

const RUN: usize = 64;

/// Results of `n` items computed on any threads, stored in any order and taken in index order. A
/// panic caught while computing an item is stored in its place and resumed where it is taken.
pub struct Slots<R> {
    inner: Mutex<(Vec<Option<std::thread::Result<R>>>, usize)>, // (results, items not yet stored)
    stored: Condvar,
}

impl<R> Slots<R> {
    pub fn new(n: usize) -> Self {
        Slots {
            inner: Mutex::new(((0..n).map(|_| None).collect(), n)),
            stored: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (Vec<Option<std::thread::Result<R>>>, usize)> {
        // A panic is caught before the lock is taken, so poisoning cannot hide a bad state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Store item `i`'s result, or the panic caught while computing it.
    pub fn set(&self, i: usize, r: std::thread::Result<R>) {
        let mut g = self.lock();
        g.0[i] = Some(r);
        g.1 -= 1;
        self.stored.notify_all();
    }

    /// The stored results from `from` on, up to the first item not stored yet.
    fn take_ready(&self, from: usize) -> Vec<std::thread::Result<R>> {
        self.lock().0[from..]
            .iter_mut()
            .map_while(Option::take)
            .collect()
    }

    /// Block until item `i` is stored.
    fn wait_for(&self, i: usize) {
        let mut g = self.lock();
        while g.0[i].is_none() {
            g = self.stored.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Every result, in order, once all are stored; a stored panic is resumed here. `check` runs
    /// every `poll` while waiting (Ctrl-C), and its error ends the wait.
    pub fn wait_all(&self, poll: Duration, check: impl Fn() -> Result<()>) -> Result<Vec<R>> {
        let mut g = self.lock();
        while g.1 > 0 {
            let (next, timeout) = self
                .stored
                .wait_timeout(g, poll)
                .unwrap_or_else(|e| e.into_inner());
            g = next;
            if timeout.timed_out() {
                drop(g);
                check()?;
                g = self.lock();
            }
        }
        Ok(std::mem::take(&mut g.0)
            .into_iter()
            .map(|r| match r.expect("every item is stored") {
                Ok(r) => r,
                Err(panic) => resume_unwind(panic),
            })
            .collect())
    }
}

/// Compute `work(i)` for every `i` in `0..n` on `threads` threads in all, the calling thread
/// included, and pass the results in index order to `consume`, on the calling thread, in runs of
/// whatever is ready. Items are claimed one at a time in index order, so sizes that vary by 1000x
/// still balance. The first error in index order is returned (the same whatever the thread
/// count); after an error no new items are started. A panic in `work` is resumed on the calling
/// thread once the other threads have stopped.
pub fn ordered_map<T: Send>(
    n: usize,
    threads: usize,
    work: impl Fn(usize) -> Result<T> + Sync,
    mut consume: impl FnMut(Vec<T>) -> Result<()>,
) -> Result<()> {
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        // In runs, so a consumer that has to take a lock (the GIL) takes it once per run.
        let mut run = Vec::with_capacity(n.min(RUN));
        for i in 0..n {
            run.push(work(i)?);
            if run.len() == RUN || i + 1 == n {
                consume(std::mem::replace(&mut run, Vec::with_capacity(RUN)))?;
            }
        }
        return Ok(());
    }
    let shared = Shared {
        slots: Slots::new(n),
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    };
    let helpers = threads - 1;
    // The helpers run on rayon's global pool when it has room for them (no threads to start);
    // on a pool of their own otherwise, so that `threads` is honoured.
    if helpers <= rayon::current_num_threads() {
        rayon::in_place_scope(|s| shared.run(s, helpers, n, &work, &mut consume))
    } else {
        pool(helpers)?.in_place_scope(|s| shared.run(s, helpers, n, &work, &mut consume))
    }
}

struct Shared<T> {
    slots: Slots<Result<T>>,
    next: AtomicUsize,
    stop: AtomicBool,
}

impl<T: Send> Shared<T> {
    fn run<'s>(
        &'s self,
        scope: &rayon::Scope<'s>,
        helpers: usize,
        n: usize,
        work: &'s (impl Fn(usize) -> Result<T> + Sync),
        consume: &mut impl FnMut(Vec<T>) -> Result<()>,
    ) -> Result<()> {
        for _ in 0..helpers {
            scope.spawn(move |_| while self.claim_and_run(n, work) {});
        }
        let result = self.drain(n, work, consume);
        // Stop the helpers after an error (or a panic being resumed) instead of encoding the rest.
        self.stop.store(true, Ordering::Relaxed);
        result
    }

    /// Claim the next item and compute it; false when there is none left (or after an error).
    fn claim_and_run(&self, n: usize, work: &(impl Fn(usize) -> Result<T> + Sync)) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return false;
        }
        let r = catch_unwind(AssertUnwindSafe(|| work(i)));
        if !matches!(r, Ok(Ok(_))) {
            self.stop.store(true, Ordering::Relaxed);
        }
        self.slots.set(i, r);
        true
    }

    /// The calling thread's loop: hand every ready run of results to `consume`; when nothing is
    /// ready, compute the next unclaimed item; when none is left, wait for the next result.
    fn drain(
        &self,
        n: usize,
        work: &(impl Fn(usize) -> Result<T> + Sync),
        consume: &mut impl FnMut(Vec<T>) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0;
        while done < n {
            let run = self.slots.take_ready(done);
            if !run.is_empty() {
                done += run.len();
                let mut batch = Vec::with_capacity(run.len());
                for r in run {
                    match r {
                        Ok(r) => batch.push(r?),
                        Err(panic) => {
                            self.stop.store(true, Ordering::Relaxed);
                            resume_unwind(panic)
                        }
                    }
                }
                consume(batch)?;
            } else if !self.claim_and_run(n, work) {
                self.slots.wait_for(done);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(n: usize, threads: usize, fail_at: Option<usize>) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        let mut runs = 0;
        ordered_map(
            n,
            threads,
            |i| {
                // Uneven sizes, so results finish out of order.
                std::thread::sleep(std::time::Duration::from_micros(
                    ((i * 7919) % 13) as u64 * 50,
                ));
                match fail_at {
                    Some(f) if i >= f => Err(Error::invalid(format!("item {i}"))),
                    _ => Ok(i * i),
                }
            },
            |batch| {
                runs += 1;
                out.extend(batch);
                Ok(())
            },
        )?;
        assert!(runs >= 1 || n == 0);
        Ok(out)
    }

    #[test]
    fn results_come_in_order_for_any_thread_count() {
        for threads in [1, 2, 3, 8] {
            for n in [0, 1, 2, 5, 200] {
                let want: Vec<usize> = (0..n).map(|i| i * i).collect();
                assert_eq!(
                    collect(n, threads, None).unwrap(),
                    want,
                    "{threads} threads, {n} items"
                );
            }
        }
    }

    #[test]
    fn first_error_in_index_order_wins() {
        for threads in [1, 2, 4] {
            let err = collect(100, threads, Some(37)).unwrap_err().to_string();
            assert!(err.contains("item 37"), "{threads} threads: {err}");
        }
    }

    #[test]
    fn consumer_error_stops_the_run() {
        let claimed = AtomicUsize::new(0);
        let err = ordered_map(
            10_000,
            2,
            |i| {
                claimed.fetch_add(1, Ordering::Relaxed);
                // Slow enough that the helper cannot run through the items before the consumer's
                // first run fails (it would need 10 s).
                std::thread::sleep(std::time::Duration::from_millis(1));
                Ok(i)
            },
            |_| Err(Error::invalid("consumer says no")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("consumer says no"));
        assert!(claimed.load(Ordering::Relaxed) < 1_000);
    }

    #[test]
    fn panic_in_work_reaches_the_caller_without_hanging() {
        let r = catch_unwind(|| {
            ordered_map(
                50,
                2,
                |i| if i == 20 { panic!("boom") } else { Ok(i) },
                |_| Ok(()),
            )
        });
        assert!(r.is_err());
    }
}
