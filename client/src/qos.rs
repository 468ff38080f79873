//! Per-volume I/O limits where guest I/O enters: token buckets for
//! operations and bytes (reads and writes together, and each direction),
//! refilled at their rate. A request takes its cost from every bucket it
//! counts against, going into debt if need be, and waits until the debt
//! is paid: requests are delayed in arrival order, never failed. The
//! limits change online (`set`, from the catalog watcher).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raftblk_proto::QosLimits;

/// Longest delay one request is given, and so the deepest debt a bucket
/// keeps (a limit far below the requests' size must not hold them
/// forever: past it, the limit is not kept).
pub const DELAY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Refill per second; 0: no limit.
    rate: f64,
    /// Most the level may hold (the burst).
    depth: f64,
    /// Tokens now; negative: debt.
    level: f64,
}

impl Bucket {
    fn new(rate: u64, burst: u64) -> Bucket {
        Bucket {
            rate: rate as f64,
            depth: burst as f64,
            level: burst as f64,
        }
    }

    fn refill(&mut self, secs: f64) {
        if self.rate > 0.0 {
            self.level = (self.level + self.rate * secs).min(self.depth);
        }
    }

    /// Takes `cost`; returns how long until the level is back at 0.
    fn take(&mut self, cost: f64) -> f64 {
        if self.rate <= 0.0 || cost <= 0.0 {
            return 0.0;
        }
        self.level = (self.level - cost).max(-self.rate * DELAY_MAX.as_secs_f64());
        if self.level >= 0.0 {
            0.0
        } else {
            -self.level / self.rate
        }
    }
}

/// Index of each bucket.
const IOPS: usize = 0;
const READ_IOPS: usize = 1;
const WRITE_IOPS: usize = 2;
const BPS: usize = 3;
const READ_BPS: usize = 4;
const WRITE_BPS: usize = 5;

struct State {
    limits: Option<QosLimits>,
    buckets: [Bucket; 6],
    refilled: Instant,
}

/// The limits of one served volume, shared by its connections.
pub struct Qos {
    state: Mutex<State>,
    /// Wakes the requests waiting when the limits change.
    changed: tokio::sync::Notify,
    /// Whether any limit is set: requests of an unlimited volume skip the
    /// lock.
    limited: AtomicBool,
}

impl std::fmt::Debug for Qos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qos")
            .field("limits", &self.limits())
            .finish()
    }
}

fn buckets(q: &QosLimits) -> [Bucket; 6] {
    [
        Bucket::new(q.iops_max, q.iops_burst),
        Bucket::new(q.read_iops_max, q.iops_burst),
        Bucket::new(q.write_iops_max, q.iops_burst),
        Bucket::new(q.bps_max, q.bps_burst),
        Bucket::new(q.read_bps_max, q.bps_burst),
        Bucket::new(q.write_bps_max, q.bps_burst),
    ]
}

impl Qos {
    pub fn new(limits: Option<QosLimits>) -> Qos {
        let q = Qos {
            state: Mutex::new(State {
                limits: None,
                buckets: [Bucket::default(); 6],
                refilled: Instant::now(),
            }),
            limited: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        };
        q.set(limits);
        q
    }

    /// Applies new limits; true when they changed. Debt under the old
    /// limits is forgiven (a lifted limit takes effect at once).
    pub fn set(&self, limits: Option<QosLimits>) -> bool {
        let limits = limits.filter(|l| *l != QosLimits::default());
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.limits == limits {
            return false;
        }
        s.buckets = limits.as_ref().map(buckets).unwrap_or_default();
        self.limited.store(limits.is_some(), Ordering::Release);
        s.limits = limits;
        s.refilled = Instant::now();
        drop(s);
        // Requests waiting under the old limits go now: their debt is
        // forgiven with the rest.
        self.changed.notify_waiters();
        true
    }

    pub fn limits(&self) -> Option<QosLimits> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).limits
    }

    /// Reserves one request's cost; returns how long it must wait.
    pub fn reserve(&self, write: bool, bytes: u64) -> Duration {
        if !self.limited.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.limits.is_none() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let secs = now.duration_since(s.refilled).as_secs_f64();
        s.refilled = now;
        for b in s.buckets.iter_mut() {
            b.refill(secs);
        }
        let (ops, bw) = if write {
            (WRITE_IOPS, WRITE_BPS)
        } else {
            (READ_IOPS, READ_BPS)
        };
        let bytes = bytes as f64;
        let wait = [
            s.buckets[IOPS].take(1.0),
            s.buckets[ops].take(1.0),
            s.buckets[BPS].take(bytes),
            s.buckets[bw].take(bytes),
        ]
        .into_iter()
        .fold(0.0f64, f64::max);
        Duration::from_secs_f64(wait.min(DELAY_MAX.as_secs_f64()))
    }

    /// Waits until the request may run (at once if the limits change
    /// meanwhile).
    pub async fn admit(&self, write: bool, bytes: u64) {
        let changed = self.changed.notified();
        let wait = self.reserve(write, bytes);
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(iops: u64) -> Option<QosLimits> {
        Some(QosLimits {
            iops_max: iops,
            ..QosLimits::default()
        })
    }

    #[test]
    fn rate_burst_and_online_changes() {
        let q = Qos::new(None);
        assert_eq!(q.reserve(true, 4096), Duration::ZERO);
        assert!(q.set(limits(500)));
        assert!(!q.set(limits(500)));
        // Without burst, the n-th request of a back-to-back run waits
        // about n / 500 s: 500 of them take about one second.
        let mut last = Duration::ZERO;
        for _ in 0..500 {
            last = q.reserve(false, 4096);
        }
        assert!(
            last > Duration::from_millis(900) && last <= Duration::from_millis(1000),
            "{last:?}"
        );
        // Lifting the limit forgives the debt.
        assert!(q.set(None));
        assert_eq!(q.reserve(false, 4096), Duration::ZERO);
        // A burst lets that many through at once, then the rate holds.
        q.set(Some(QosLimits {
            write_iops_max: 100,
            iops_burst: 10,
            ..QosLimits::default()
        }));
        for _ in 0..10 {
            assert_eq!(q.reserve(true, 4096), Duration::ZERO);
        }
        assert!(q.reserve(true, 4096) > Duration::from_millis(5));
        // Reads do not count against a write limit.
        assert_eq!(q.reserve(false, 4096), Duration::ZERO);
        // Bytes: 1 MiB/s, a 256 KiB request waits a quarter second.
        q.set(Some(QosLimits {
            bps_max: 1 << 20,
            ..QosLimits::default()
        }));
        let w = q.reserve(false, 256 << 10);
        assert!(
            w > Duration::from_millis(240) && w <= Duration::from_millis(250),
            "{w:?}"
        );
        // A request far above a limit waits at most DELAY_MAX, and the
        // debt it leaves is no deeper than that either.
        assert!(q.reserve(false, 1 << 40) <= DELAY_MAX);
        assert!(q.reserve(false, 4096) <= DELAY_MAX + Duration::from_millis(5));
    }

    #[tokio::test]
    async fn a_change_wakes_waiting_requests() {
        let q = std::sync::Arc::new(Qos::new(limits(1)));
        // One second of debt: the next request would wait two.
        assert!(q.reserve(false, 0) > Duration::from_millis(900));
        let waiter = q.clone();
        let t = tokio::spawn(async move {
            let started = Instant::now();
            waiter.admit(false, 4096).await;
            started.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(q.set(None));
        let waited = t.await.unwrap_or(Duration::MAX);
        assert!(waited < Duration::from_millis(500), "{waited:?}");
    }
}
