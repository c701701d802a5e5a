//! Telling the requests a group commit made durable, one wake per thread.
//!
//! Every write the store queues gets the next number (`seq`), in the order
//! the log takes them, and its request waits ([`Wait`]) until the writer
//! reports everything up to some number durable ([`Durability::done`]).
//! Waking a request that waits on another thread costs that thread's
//! runtime a system call (an `eventfd` write) and often a trip out of
//! `epoll_wait`; a group holds several requests of each HTTP worker, and
//! waking each on its own made about one such wake per webhook. So the
//! writer wakes one request per thread, and hands it the others of its
//! thread: when it runs, it wakes them on their own thread, which costs no
//! system call.

use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Durability {
    /// The number of the last write queued.
    queued: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every write up to this number is durable.
    done: u64,
    /// No write from this number on will be, and why.
    failed: Option<(u64, String)>,
    waiting: Vec<Waiting>,
}

struct Waiting {
    seq: u64,
    thread: usize,
    slot: Arc<Mutex<Slot>>,
}

/// What a waiting request shares with the writer.
#[derive(Default)]
struct Slot {
    waker: Option<Waker>,
    /// Requests of the same thread, for this one to wake.
    others: Vec<Waker>,
    /// The request stopped waiting (its future was dropped).
    gone: bool,
}

/// A small number per thread, to group the requests waiting on each.
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

impl Durability {
    /// The number of a write about to be queued. Callers queue writes in
    /// the order of their numbers (the store's lock orders both).
    pub fn next(&self) -> u64 {
        self.queued.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Waits until write `seq` is durable (or can no longer be).
    pub fn wait(self: &Arc<Self>, seq: u64) -> Wait {
        Wait {
            durability: self.clone(),
            seq,
            slot: None,
        }
    }

    /// Every write up to `seq` is durable: wakes one waiting request per
    /// thread and hands it the others of its thread.
    pub fn done(&self, seq: u64) {
        let mut ready = vec![];
        {
            let mut st = self.state.lock();
            st.done = st.done.max(seq);
            st.waiting.retain_mut(|w| {
                if w.seq <= seq {
                    ready.push((w.thread, w.slot.clone()));
                    false
                } else {
                    true
                }
            });
        }
        ready.sort_by_key(|(thread, _)| *thread);
        for group in ready.chunk_by(|a, b| a.0 == b.0) {
            // The first request still waiting wakes the others with it.
            let mut leader: Option<(&Arc<Mutex<Slot>>, Waker)> = None;
            let mut others = vec![];
            for (_, slot) in group {
                let mut s = slot.lock();
                if s.gone {
                    continue;
                }
                if let Some(waker) = s.waker.take() {
                    match leader {
                        None => leader = Some((slot, waker)),
                        Some(_) => others.push(waker),
                    }
                }
            }
            let Some((slot, first)) = leader else {
                continue;
            };
            if !others.is_empty() {
                let mut s = slot.lock();
                if s.gone {
                    // It finished meanwhile, and will not look again.
                    drop(s);
                    others.into_iter().for_each(Waker::wake);
                } else {
                    s.others.extend(others);
                }
            }
            first.wake();
        }
    }

    /// No write from `seq` on will be durable (the log failed): every
    /// waiting request learns it.
    pub fn failed(&self, seq: u64, why: String) {
        let waiting = {
            let mut st = self.state.lock();
            if st.failed.is_none() {
                st.failed = Some((seq, why));
            }
            std::mem::take(&mut st.waiting)
        };
        for w in waiting {
            let mut slot = w.slot.lock();
            let wakers: Vec<Waker> = slot
                .waker
                .take()
                .into_iter()
                .chain(slot.others.drain(..))
                .collect();
            drop(slot);
            wakers.into_iter().for_each(Waker::wake);
        }
    }
}

/// A request waiting for its write ([`Durability::wait`]).
pub struct Wait {
    durability: Arc<Durability>,
    seq: u64,
    slot: Option<Arc<Mutex<Slot>>>,
}

impl Wait {
    /// Stops waiting: wakes the requests of this thread that the writer
    /// handed over, and none are handed over after.
    fn finish(&mut self) {
        if let Some(slot) = self.slot.take() {
            let others = {
                let mut slot = slot.lock();
                slot.gone = true;
                slot.waker = None;
                std::mem::take(&mut slot.others)
            };
            others.into_iter().for_each(Waker::wake);
        }
    }
}

impl Future for Wait {
    type Output = Result<(), String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let outcome = {
            let mut st = this.durability.state.lock();
            if st.done >= this.seq {
                Some(Ok(()))
            } else if let Some((_, why)) = st.failed.as_ref().filter(|(from, _)| this.seq >= *from)
            {
                Some(Err(why.clone()))
            } else {
                match &this.slot {
                    Some(slot) => slot.lock().waker = Some(cx.waker().clone()),
                    None => {
                        let slot = Arc::new(Mutex::new(Slot {
                            waker: Some(cx.waker().clone()),
                            ..Slot::default()
                        }));
                        st.waiting.push(Waiting {
                            seq: this.seq,
                            thread: thread_number(),
                            slot: slot.clone(),
                        });
                        this.slot = Some(slot);
                    }
                }
                None
            }
        };
        match outcome {
            Some(result) => {
                this.finish();
                Poll::Ready(result)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Wait {
    /// A request that goes away while waiting (a client that hung up)
    /// still wakes the others it was handed.
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;
    use std::time::Duration;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Three requests of one thread: the writer wakes the first alone, and
    /// if it goes away before it runs, the other two are woken all the same.
    #[test]
    fn one_wake_per_thread_and_none_lost_when_the_woken_one_goes_away() {
        let d = Arc::new(Durability::default());
        let counts: Vec<Arc<Count>> = (0..3).map(|_| Arc::default()).collect();
        let mut waits: Vec<Pin<Box<Wait>>> = (0..3).map(|_| Box::pin(d.wait(d.next()))).collect();
        for (w, c) in waits.iter_mut().zip(&counts) {
            let waker = Waker::from(c.clone());
            assert!(w
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
        }
        d.done(3);
        let woken = || {
            counts
                .iter()
                .map(|c| c.0.load(Ordering::SeqCst))
                .collect::<Vec<_>>()
        };
        assert_eq!(woken(), [1, 0, 0], "one wake from the writer");
        drop(waits.remove(0));
        assert_eq!(woken(), [1, 1, 1], "the others, by the one that went away");
        for (w, c) in waits.iter_mut().zip(&counts[1..]) {
            let waker = Waker::from(c.clone());
            assert_eq!(
                w.as_mut().poll(&mut Context::from_waker(&waker)),
                Poll::Ready(Ok(()))
            );
        }
    }

    /// Requests waiting on one thread are all answered, by one wake from
    /// the writer's thread and the rest on their own thread; one that is
    /// dropped while waiting (the leader or not) leaves no other waiting.
    #[test]
    fn every_waiting_request_is_woken_even_when_some_go_away() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let d = Arc::new(Durability::default());
        let local = tokio::task::LocalSet::new();
        let seqs: Vec<u64> = (0..6).map(|_| d.next()).collect();
        let writer = {
            let d = d.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                d.done(3);
                std::thread::sleep(Duration::from_millis(50));
                d.done(5);
                std::thread::sleep(Duration::from_millis(50));
                d.failed(6, "the disk is full".into());
            })
        };
        let results = local.block_on(&rt, async {
            let mut tasks = vec![];
            for (n, seq) in seqs.iter().enumerate() {
                let wait = d.wait(*seq);
                // The first and the fourth give up before the writer is done.
                let gives_up = n == 0 || n == 3;
                tasks.push(tokio::task::spawn_local(async move {
                    if gives_up {
                        tokio::time::timeout(Duration::from_millis(20), wait)
                            .await
                            .ok()
                    } else {
                        Some(wait.await)
                    }
                }));
            }
            let mut results = vec![];
            for t in tasks {
                results.push(tokio::time::timeout(Duration::from_secs(5), t).await);
            }
            results
        });
        writer.join().unwrap();
        let results: Vec<_> = results
            .into_iter()
            .map(|r| r.expect("no request is left waiting").unwrap())
            .collect();
        assert_eq!(
            results,
            [
                None,
                Some(Ok(())),
                Some(Ok(())),
                None,
                Some(Ok(())),
                Some(Err("the disk is full".to_string())),
            ]
        );
        assert!(d.state.lock().waiting.is_empty());
    }
}
