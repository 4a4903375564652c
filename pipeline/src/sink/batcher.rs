//! The batcher: pulls units from the bounded queue and cuts batches, with no
//! I/O of its own so it can be tested with paused time.
//!
//! A batch is cut when it holds at least `size` readings (full), or when its
//! oldest unit has waited `linger` since it was enqueued (old enough), or when
//! the queue is closed and drained (shutdown). Units are never split: a unit
//! larger than `size` is a batch by itself, and a batch may exceed `size` by
//! less than one unit. Bytes are a hard bound: a unit that would take the batch
//! past `max_bytes` starts the next batch instead (a unit larger than `max_bytes`
//! is a batch by itself), so a batch of large payloads stays within what one
//! Postgres attempt can write before its timeout.
//!
//! The linger adapts to the load ([`LingerMode::Adaptive`], the default): it is
//! `max × ρ²`, where ρ is the share of recent time the caller spent with the
//! batches it was given (storing them) rather than waiting in
//! [`Batcher::next_batch`]. Light traffic leaves the sink mostly idle, so a
//! reading is written almost at once; under load ρ nears 1 and batches linger up
//! to `max`, so per-batch costs are spread over more readings. The time spent
//! lingering counts as idle, which keeps the two in balance.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// Something the batcher can weigh and age.
pub trait Batchable {
    /// Readings it counts for.
    fn weight(&self) -> usize;
    /// Payload bytes it counts for.
    fn bytes(&self) -> usize;
    /// When it entered the queue; the batch deadline is the oldest's plus `linger`.
    fn enqueued_at(&self) -> Instant;
}

/// How a batch's linger is chosen (`--batch-linger-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LingerMode {
    /// From nearly 0 when the sink is idle up to `--batch-linger` when it is busy.
    #[default]
    Adaptive,
    /// Always `--batch-linger`.
    Fixed,
}

/// How quickly the load estimate follows a change: the weight of the past halves
/// in about `LOAD_TIME_CONSTANT × ln 2`.
const LOAD_TIME_CONSTANT: Duration = Duration::from_millis(250);

/// The share of recent time the caller was busy with its batches, an
/// exponentially weighted moving average over time.
#[derive(Debug, Default)]
struct Load {
    busy_share: f64,
    /// When the last batch was handed out.
    returned_at: Option<Instant>,
}

impl Load {
    /// One cycle: `busy` with the last batch, then `idle` waiting for the next.
    fn observe(&mut self, busy: Duration, idle: Duration) {
        let period = (busy + idle).as_secs_f64();
        if period <= 0.0 {
            return;
        }
        let weight = 1.0 - (-period / LOAD_TIME_CONSTANT.as_secs_f64()).exp();
        self.busy_share += weight * (busy.as_secs_f64() / period - self.busy_share);
    }
}

/// Cuts batches from a bounded queue.
pub struct Batcher<T> {
    rx: mpsc::Receiver<T>,
    size: usize,
    max_bytes: usize,
    /// The longest linger (`--batch-linger`).
    linger: Duration,
    mode: LingerMode,
    load: Load,
    /// A unit that did not fit the last batch's bytes: the next batch starts with it.
    carry: Option<T>,
    /// Cancelled by `SinkHandle::close`: stop taking new units, drain the queue.
    close: CancellationToken,
    closing: bool,
}

impl<T: Batchable> Batcher<T> {
    pub fn new(
        rx: mpsc::Receiver<T>,
        size: usize,
        max_bytes: usize,
        linger: Duration,
        mode: LingerMode,
        close: CancellationToken,
    ) -> Self {
        Batcher {
            rx,
            size: size.max(1),
            max_bytes: max_bytes.max(1),
            linger,
            mode,
            load: Load::default(),
            carry: None,
            close,
            closing: false,
        }
    }

    /// The linger the next batch gets.
    pub fn linger(&self) -> Duration {
        match self.mode {
            LingerMode::Fixed => self.linger,
            LingerMode::Adaptive => self.linger.mul_f64(self.load.busy_share.powi(2)),
        }
    }

    /// The next batch, or `None` once the queue is closed (all senders dropped,
    /// or `close` cancelled) and drained.
    pub async fn next_batch(&mut self) -> Option<Vec<T>> {
        let entered = Instant::now();
        let busy = self
            .load
            .returned_at
            .map_or(Duration::ZERO, |at| entered - at);
        let batch = self.cut(self.linger()).await;
        let now = Instant::now();
        self.load.observe(busy, now - entered);
        self.load.returned_at = Some(now);
        batch
    }

    async fn cut(&mut self, linger: Duration) -> Option<Vec<T>> {
        let mut batch: Vec<T> = Vec::new();
        let (mut weight, mut bytes) = (0usize, 0usize);
        let mut deadline: Option<Instant> = None;
        let mut next = self.carry.take();
        loop {
            if let Some(item) = next.take() {
                if !batch.is_empty() && bytes + item.bytes() > self.max_bytes {
                    self.carry = Some(item);
                    return Some(batch);
                }
                if deadline.is_none() {
                    deadline = Some(item.enqueued_at() + linger);
                }
                weight += item.weight();
                bytes += item.bytes();
                batch.push(item);
            }
            if weight >= self.size || bytes >= self.max_bytes {
                return Some(batch);
            }
            let item = tokio::select! {
                // Take what is queued before looking at the clock, so a backlog
                // drains in full batches.
                biased;
                item = self.rx.recv() => item,
                () = self.close.cancelled(), if !self.closing => {
                    // Senders now get an error; what is buffered is still received.
                    self.rx.close();
                    self.closing = true;
                    continue;
                }
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    return Some(batch);
                }
            };
            match item {
                Some(item) => next = Some(item),
                None if batch.is_empty() => return None,
                None => return Some(batch),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weight `.0`, enqueued at `.1`; 100 bytes per reading.
    struct Item(usize, Instant);
    impl Batchable for Item {
        fn weight(&self) -> usize {
            self.0
        }
        fn bytes(&self) -> usize {
            self.0 * 100
        }
        fn enqueued_at(&self) -> Instant {
            self.1
        }
    }

    fn batcher(cap: usize) -> (mpsc::Sender<Item>, Batcher<Item>, CancellationToken) {
        let (tx, rx) = mpsc::channel(cap);
        let close = CancellationToken::new();
        (
            tx,
            Batcher::new(
                rx,
                3,
                10_000,
                Duration::from_millis(20),
                LingerMode::Fixed,
                close.clone(),
            ),
            close,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn full_batch_flushes_without_waiting() {
        let (tx, mut b, _) = batcher(10);
        let start = Instant::now();
        for _ in 0..4 {
            tx.send(Item(1, Instant::now())).await.unwrap();
        }
        let batch = b.next_batch().await.unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(
            Instant::now(),
            start,
            "a full batch must not wait for the linger"
        );
        // The fourth waits for its linger.
        let batch = b.next_batch().await.unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(Instant::now() - start, Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn linger_counts_from_the_oldest() {
        let (tx, mut b, _) = batcher(10);
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            tx.send(Item(1, Instant::now())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
            tx.send(Item(1, Instant::now())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
            tx.send(Item(1, Instant::now())).await.unwrap();
            // Keep the queue open past the last linger (closing flushes at once).
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        let batch = b.next_batch().await.unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(Instant::now() - start, Duration::from_millis(20));
        let batch = b.next_batch().await.unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(Instant::now() - start, Duration::from_millis(50));
        sender.await.unwrap();
        assert!(b.next_batch().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn backlog_older_than_linger_flushes_at_once() {
        let (tx, mut b, _) = batcher(10);
        let old = Instant::now();
        tokio::time::advance(Duration::from_millis(100)).await;
        tx.send(Item(1, old)).await.unwrap();
        tx.send(Item(1, old)).await.unwrap();
        let now = Instant::now();
        assert_eq!(b.next_batch().await.unwrap().len(), 2);
        assert_eq!(Instant::now(), now);
    }

    #[tokio::test(start_paused = true)]
    async fn big_unit_is_a_batch_of_its_own() {
        let (tx, mut b, _) = batcher(10);
        tx.send(Item(2, Instant::now())).await.unwrap();
        tx.send(Item(5, Instant::now())).await.unwrap();
        tx.send(Item(1, Instant::now())).await.unwrap();
        let w: Vec<usize> = b.next_batch().await.unwrap().iter().map(|i| i.0).collect();
        assert_eq!(w, vec![2, 5]);
        let w: Vec<usize> = b.next_batch().await.unwrap().iter().map(|i| i.0).collect();
        assert_eq!(w, vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_cut_before_the_unit_that_would_pass_them() {
        let (tx, rx) = mpsc::channel(10);
        let mut b = Batcher::new(
            rx,
            100,
            450,
            Duration::from_millis(20),
            LingerMode::Fixed,
            CancellationToken::new(),
        );
        let start = Instant::now();
        for w in [2, 2, 1, 9, 1] {
            tx.send(Item(w, Instant::now())).await.unwrap();
        }
        let weights = |batch: Vec<Item>| batch.iter().map(|i| i.0).collect::<Vec<_>>();
        // 200 + 200 = 400; the third (100) would make 500 > 450.
        assert_eq!(weights(b.next_batch().await.unwrap()), vec![2, 2]);
        assert_eq!(Instant::now(), start, "a batch cut by bytes does not wait");
        assert_eq!(weights(b.next_batch().await.unwrap()), vec![1]);
        // Larger than max_bytes on its own: a batch by itself.
        assert_eq!(weights(b.next_batch().await.unwrap()), vec![9]);
        assert_eq!(weights(b.next_batch().await.unwrap()), vec![1]);
    }

    fn adaptive(cap: usize) -> (mpsc::Sender<Item>, Batcher<Item>) {
        let (tx, rx) = mpsc::channel(cap);
        let b = Batcher::new(
            rx,
            1_000,
            1_000_000,
            Duration::from_millis(20),
            LingerMode::Adaptive,
            CancellationToken::new(),
        );
        (tx, b)
    }

    /// Sends one reading every `every` until `n` are sent, then keeps the queue open.
    fn steady(tx: mpsc::Sender<Item>, n: usize, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            for _ in 0..n {
                tx.send(Item(1, Instant::now())).await.unwrap();
                tokio::time::sleep(every).await;
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
    }

    /// Takes `n` readings in batches, spending `busy` with each batch (the store),
    /// and returns the longest wait of a reading, from enqueue to its batch.
    async fn drain(b: &mut Batcher<Item>, n: usize, busy: Duration) -> Duration {
        let (mut seen, mut longest) = (0, Duration::ZERO);
        while seen < n {
            let batch = b.next_batch().await.unwrap();
            let now = Instant::now();
            seen += batch.len();
            longest = batch.iter().map(|i| now - i.1).fold(longest, Duration::max);
            tokio::time::sleep(busy).await;
        }
        longest
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_sink_writes_a_lone_reading_at_once() {
        let (tx, mut b) = adaptive(10);
        assert_eq!(b.linger(), Duration::ZERO);
        let start = Instant::now();
        tx.send(Item(1, Instant::now())).await.unwrap();
        assert_eq!(b.next_batch().await.unwrap().len(), 1);
        assert_eq!(Instant::now(), start, "nothing to wait for: no linger");
    }

    #[tokio::test(start_paused = true)]
    async fn the_linger_grows_with_the_load_and_falls_back() {
        let (tx, mut b) = adaptive(10_000);
        // Busy: a reading every 1 ms, and each batch takes 20 ms to store.
        let sender = steady(tx.clone(), 2_000, Duration::from_millis(1));
        drain(&mut b, 2_000, Duration::from_millis(20)).await;
        let busy = b.linger();
        assert!(
            busy > Duration::from_millis(18) && busy <= Duration::from_millis(20),
            "under load the linger nears --batch-linger: {busy:?}"
        );
        sender.abort();
        // What the busy phase left queued, then light traffic: a reading every 100 ms,
        // stored in 1 ms.
        while !b.rx.is_empty() {
            b.next_batch().await.unwrap();
        }
        let sender = steady(tx, 40, Duration::from_millis(100));
        drain(&mut b, 10, Duration::from_millis(1)).await;
        let longest = drain(&mut b, 20, Duration::from_millis(1)).await;
        let light = b.linger();
        assert!(light < Duration::from_millis(1), "light traffic: {light:?}");
        // tokio's timers tick in whole milliseconds.
        assert!(
            longest <= Duration::from_millis(1),
            "a lone reading is written at once: {longest:?}"
        );
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn at_a_moderate_load_readings_wait_less_than_the_fixed_linger() {
        // A reading every 1 ms, each batch stored in 5 ms: the fixed linger makes
        // the first reading of a batch wait the whole 20 ms.
        let (tx, mut b) = adaptive(10_000);
        let sender = steady(tx, 5_000, Duration::from_millis(1));
        drain(&mut b, 1_000, Duration::from_millis(5)).await;
        let longest = drain(&mut b, 2_000, Duration::from_millis(5)).await;
        let linger = b.linger();
        assert!(
            linger > Duration::ZERO && linger < Duration::from_millis(10),
            "between idle and busy: {linger:?}"
        );
        assert!(
            longest < Duration::from_millis(15),
            "the longest wait, settled: {longest:?}"
        );
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn close_drains_then_ends() {
        let (tx, mut b, close) = batcher(10);
        tx.send(Item(1, Instant::now())).await.unwrap();
        close.cancel();
        assert_eq!(b.next_batch().await.unwrap().len(), 1);
        assert!(b.next_batch().await.is_none());
        assert!(tx.send(Item(1, Instant::now())).await.is_err());
    }
}
