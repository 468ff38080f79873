//! The Prometheus endpoint shared by `raftblk-node`, `raftblk-vhost` and
//! `raftblk-nbd`: an HTTP/1.1 listener answering `GET /metrics` with the
//! process's default registry in the Prometheus text format (the
//! `prometheus` crate formats it; the process collector adds CPU, memory
//! and file descriptors).
//!
//! Each binary registers its own series in the default registry (statics,
//! as TiKV does) and may pass a `refresh` callback that sets its
//! scrape-time gauges (group roles, stored bytes, ...) just before a scrape
//! is encoded. The listener is bounded: at most `CONNECTIONS_MAX`
//! connections at once, each closed after `CONNECTION_TIMEOUT`, so a
//! stuck scraper cannot pin the process. `scrape` is the reading side
//! (`raftblk top`, the tests).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use prometheus;

pub mod scrape;

/// Connections served at once; more wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 16;
/// Longest one connection stays open, requests included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The Prometheus text exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Called before each scrape is encoded, to set scrape-time gauges.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Latency buckets in seconds, 50 µs to about 6.5 s (doubling): the range
/// from a lease read to a write held up by a leader change.
pub fn latency_buckets_seconds() -> Vec<f64> {
    // Constant arguments: exponential_buckets fails only on a zero count,
    // a non-positive start or a factor <= 1.
    prometheus::exponential_buckets(0.000_05, 2.0, 18).unwrap_or_default()
}

/// The process's CPU time in seconds at microsecond resolution (the
/// process collector's `process_cpu_seconds_total` counts whole seconds,
/// too coarse for a one-second view like `raftblk top`).
static CPU_SECONDS: std::sync::LazyLock<prometheus::Counter> = std::sync::LazyLock::new(|| {
    let c = prometheus::Counter::new(
        "raftblk_process_cpu_seconds_total",
        "User and system CPU time of this process, in seconds (microsecond resolution).",
    )
    .unwrap_or_else(|e| panic!("metric raftblk_process_cpu_seconds_total is malformed: {e}"));
    if let Err(e) = prometheus::register(Box::new(c.clone())) {
        tracing::warn!(error = %e, "metric not registered");
    }
    c
});

fn update_cpu_seconds() {
    // SAFETY: `rusage` is a plain C struct of integers, for which all
    // zero bytes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage(2) only writes the struct we own and pass by
    // exclusive reference; RUSAGE_SELF is always a valid target.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let now = secs(ru.ru_utime) + secs(ru.ru_stime);
    let c = &*CPU_SECONDS;
    let delta = now - c.get();
    if delta > 0.0 {
        c.inc_by(delta);
    }
}

/// Everything in the default registry, in the text format.
pub fn encode() -> String {
    update_cpu_seconds();
    let families = prometheus::gather();
    match prometheus::TextEncoder::new().encode_to_string(&families) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode metrics");
            String::new()
        }
    }
}

/// Starts serving `/metrics` on `addr` (port 0 picks one); returns the
/// bound address. The listener runs on the current tokio runtime until the
/// process exits.
pub async fn serve(addr: SocketAddr, refresh: Option<Refresh>) -> Result<SocketAddr, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Listen { addr, source })?;
    tokio::spawn(accept_loop(listener, refresh));
    tracing::info!(addr = %local, "serving Prometheus metrics on /metrics");
    Ok(local)
}

async fn accept_loop(listener: TcpListener, refresh: Option<Refresh>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let refresh = refresh.clone();
                let method = req.method().clone();
                let path = req.uri().path().to_owned();
                async move {
                    // The refresh reads RocksDB properties and the disk,
                    // and scrapes queue on one lock: off the async workers.
                    let r = tokio::task::spawn_blocking(move || {
                        respond(&method, &path, refresh.as_deref())
                    })
                    .await
                    .unwrap_or_else(|e| {
                        let mut r = Response::new(Full::new(Bytes::from(format!(
                            "metrics refresh failed: {e}\n"
                        ))));
                        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        r
                    });
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            // A timeout drops the connection; errors are the client's.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

fn respond(
    method: &Method,
    path: &str,
    refresh: Option<&(dyn Fn() + Send + Sync)>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET /metrics is served\n".into(),
        );
    }
    if path != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: metrics are on /metrics\n".into(),
        );
    }
    // One scrape at a time: the refresh catches counters up by
    // difference and resets gauge families, which concurrent scrapes
    // would double or see half done.
    static SCRAPE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SCRAPE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = refresh {
        f();
    }
    reply(StatusCode::OK, CONTENT_TYPE, encode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_the_registry_and_refreshes_first() {
        let gauge = prometheus::register_int_gauge!("raftblk_test_refreshed", "test gauge")
            .expect("register");
        let g = gauge.clone();
        let refresh: Refresh = Arc::new(move || g.set(42));
        let addr = serve("127.0.0.1:0".parse().expect("addr"), Some(refresh))
            .await
            .expect("serve");
        let body = get(addr, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("version=0.0.4"), "{body}");
        assert!(body.contains("raftblk_test_refreshed 42"), "{body}");
        assert!(body.contains("process_resident_memory_bytes"), "{body}");
        assert!(body.contains("raftblk_process_cpu_seconds_total"), "{body}");
        let missing = get(addr, "/other").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    }
}
