//! The daemon's Prometheus series (default registry, served on
//! `--metrics-addr` by `raftblk-metrics`): per volume and queue, requests
//! by type and their bytes, requests in flight and malformed chains
//! rejected; per volume, latency histograms by type, errors by kind and
//! requests resubmitted from the inflight region; per daemon, the client's
//! retries. Labels are the volume's name (the volumes this daemon serves),
//! the queue index (at most 64) and the request type (six).
//!
//! Each queue resolves its series once (`QueueMetrics`): the data path
//! only bumps atomics.

use std::sync::LazyLock;
use std::time::Duration;

use raftblk_metrics::prometheus::{
    self, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use crate::request::Kind;

/// Request types, as the `op` label spells them.
pub const OPS: [&str; 6] = [
    "read",
    "write",
    "flush",
    "discard",
    "write_zeroes",
    "get_id",
];

/// Why a request failed, as the `kind` label spells it.
#[derive(Debug, Clone, Copy)]
pub enum ErrorKind {
    /// Past the I/O deadline (`--io-timeout-secs`).
    Timeout,
    /// The attach lease is held by another daemon (fenced).
    Fenced,
    /// Any other failure the cluster reported.
    Io,
    /// The request's buffers were not readable guest memory.
    GuestMemory,
}

impl ErrorKind {
    fn label(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Fenced => "fenced",
            ErrorKind::Io => "io",
            ErrorKind::GuestMemory => "guest_memory",
        }
    }
}

/// The `op` label index of a request.
pub fn op_index(kind: &Kind) -> usize {
    match kind {
        Kind::Read { .. } => 0,
        Kind::Write { .. } => 1,
        Kind::Flush => 2,
        Kind::Discard { .. } => 3,
        Kind::WriteZeroes { .. } => 4,
        Kind::GetId => 5,
    }
}

struct Families {
    requests: IntCounterVec,
    bytes: IntCounterVec,
    in_flight: IntGaugeVec,
    malformed: IntCounterVec,
    latency: HistogramVec,
    errors: IntCounterVec,
    resubmitted: IntCounterVec,
    retries: IntCounter,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    if let Err(e) = prometheus::register(Box::new(c.clone())) {
        tracing::warn!(error = %e, "metric not registered");
    }
    c
}

/// A malformed constant definition: a bug the first test run shows.
fn bad_metric(name: &str, e: prometheus::Error) -> ! {
    panic!("metric {name} is malformed: {e}")
}

fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| bad_metric(name, e)),
    )
}

static FAMILIES: LazyLock<Families> = LazyLock::new(|| {
    Families {
    requests: counters(
        "raftblk_vhost_requests_total",
        "Guest requests answered, by volume, queue and type.",
        &["volume", "queue", "op"],
    ),
    bytes: counters(
        "raftblk_vhost_request_bytes_total",
        "Bytes guests read and wrote, by volume, queue and type.",
        &["volume", "queue", "op"],
    ),
    in_flight: register(
        IntGaugeVec::new(
            Opts::new(
                "raftblk_vhost_requests_in_flight",
                "Guest requests taken from the ring and not yet answered.",
            ),
            &["volume", "queue"],
        )
        .unwrap_or_else(|e| bad_metric("raftblk_vhost_requests_in_flight", e)),
    ),
    malformed: counters(
        "raftblk_vhost_malformed_requests_total",
        "Descriptor chains rejected as malformed (answered with an error status or dropped).",
        &["volume", "queue"],
    ),
    latency: register(
        HistogramVec::new(
            HistogramOpts::new(
                "raftblk_vhost_request_duration_seconds",
                "Time from taking a request off the ring to its answer (I/O limits' delays included), by type.",
            )
            .buckets(raftblk_metrics::latency_buckets_seconds()),
            &["volume", "op"],
        )
        .unwrap_or_else(|e| bad_metric("raftblk_vhost_request_duration_seconds", e)),
    ),
    errors: counters(
        "raftblk_vhost_request_errors_total",
        "Guest requests answered with an I/O error, by volume and cause.",
        &["volume", "kind"],
    ),
    resubmitted: counters(
        "raftblk_vhost_resubmitted_requests_total",
        "Requests served again from the inflight region after a reconnect.",
        &["volume"],
    ),
    retries: register(
        IntCounter::with_opts(Opts::new(
            "raftblk_vhost_client_retries_total",
            "Cluster request attempts after an operation's first (leader changes, timeouts, unreachable nodes).",
        ))
        .unwrap_or_else(|e| bad_metric("raftblk_vhost_client_retries_total", e)),
    ),
}
});

/// One queue's series, resolved once.
pub struct QueueMetrics {
    volume: String,
    requests: [IntCounter; 6],
    bytes: [IntCounter; 6],
    latency: [prometheus::Histogram; 6],
    pub in_flight: IntGauge,
    pub malformed: IntCounter,
    pub resubmitted: IntCounter,
}

impl QueueMetrics {
    pub fn new(volume: &str, queue: usize) -> QueueMetrics {
        let f = &*FAMILIES;
        let q = queue.to_string();
        // Exported at 0 from the start: an alert on an increase needs the
        // series before the first error.
        for kind in [
            ErrorKind::Timeout,
            ErrorKind::Fenced,
            ErrorKind::Io,
            ErrorKind::GuestMemory,
        ] {
            f.errors.with_label_values(&[volume, kind.label()]);
        }
        QueueMetrics {
            volume: volume.to_owned(),
            requests: OPS.map(|op| f.requests.with_label_values(&[volume, &q, op])),
            bytes: OPS.map(|op| f.bytes.with_label_values(&[volume, &q, op])),
            latency: OPS.map(|op| f.latency.with_label_values(&[volume, op])),
            in_flight: f.in_flight.with_label_values(&[volume, &q]),
            malformed: f.malformed.with_label_values(&[volume, &q]),
            resubmitted: f.resubmitted.with_label_values(&[volume]),
        }
    }

    /// Counts one answered request of type `op` moving `bytes`.
    pub fn answered(&self, op: usize, bytes: u64, took: Duration) {
        if let (Some(r), Some(b), Some(l)) = (
            self.requests.get(op),
            self.bytes.get(op),
            self.latency.get(op),
        ) {
            r.inc();
            b.inc_by(bytes);
            l.observe(took.as_secs_f64());
        }
    }

    /// Counts one request failed for `kind`.
    pub fn error(&self, kind: ErrorKind) {
        FAMILIES
            .errors
            .with_label_values(&[&self.volume, kind.label()])
            .inc();
    }
}

/// Catches the client retry counter up to `total` (called at scrape).
pub fn set_client_retries(total: u64) {
    let c = &FAMILIES.retries;
    c.inc_by(total.saturating_sub(c.get()));
}
