//! The reading side: one `GET /metrics` over HTTP/1.1 (hyper's client,
//! with a deadline and a size limit) and a parser of the text format's
//! samples, for `raftblk top` and the tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Largest scrape accepted.
pub const SCRAPE_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("{addr}: no answer within {timeout_ms} ms")]
    Timeout { addr: SocketAddr, timeout_ms: u64 },
    #[error("{addr}: {message}")]
    Http { addr: SocketAddr, message: String },
}

/// Fetches `http://addr/metrics` within `timeout`.
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<String, ScrapeError> {
    let http = |message: String| ScrapeError::Http { addr, message };
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| http(format!("connect: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(format!("handshake: {e}")))?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get("/metrics")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| http(format!("request: {e}")))?;
        if !resp.status().is_success() {
            driver.abort();
            return Err(http(format!("HTTP status {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), SCRAPE_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| http(format!("body: {e}")))?
            .to_bytes();
        driver.abort();
        String::from_utf8(body.to_vec()).map_err(|e| http(format!("not UTF-8: {e}")))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ScrapeError::Timeout {
            addr,
            timeout_ms: timeout.as_millis() as u64,
        })?
}

/// One sample: a series name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// The samples of a text-format scrape (comments and lines that do not
/// parse are skipped; label values may hold escaped quotes).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches(',');
            if let Some(after) = r.strip_prefix('}') {
                break after;
            }
            let (key, after) = r.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.insert(key.trim().to_owned(), value);
            r = &after[end + 1..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The sum of the samples named `name` whose labels include every pair of
/// `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum()
}

/// A quantile (0..1) of the change in a histogram between two scrapes,
/// from the `NAME_bucket` series matching `labels` (summed over the other
/// labels), interpolated inside the bucket as Prometheus does; None when
/// nothing was observed in between.
pub fn quantile_between(
    before: &[Sample],
    after: &[Sample],
    name: &str,
    labels: &[(&str, &str)],
    q: f64,
) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let buckets = |samples: &[Sample]| -> BTreeMap<u64, f64> {
        let mut m = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == bucket && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        {
            let le: f64 = match s.label("le") {
                Some("+Inf") => f64::INFINITY,
                Some(v) => match v.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                None => continue,
            };
            *m.entry(le.to_bits()).or_insert(0.0) += s.value;
        }
        m
    };
    let (b, a) = (buckets(before), buckets(after));
    let mut delta: Vec<(f64, f64)> = a
        .iter()
        .map(|(le, v)| (f64::from_bits(*le), v - b.get(le).copied().unwrap_or(0.0)))
        .collect();
    delta.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let span = count - prev.1;
            let frac = if span > 0.0 {
                (rank - prev.1) / span
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_labels_and_escapes() {
        let t = "# HELP x y\nx_total{a=\"1\",b=\"q\\\"uote\"} 3\ny 4.5\nz{le=\"+Inf\"} +Inf\nbad line\n";
        let s = parse(t);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].label("b"), Some("q\"uote"));
        assert_eq!(sum(&s, "x_total", &[("a", "1")]), 3.0);
        assert_eq!(sum(&s, "y", &[]), 4.5);
        assert!(s[2].value.is_infinite());
    }

    #[test]
    fn quantile_of_the_change_between_scrapes() {
        let before = parse(
            "h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.01\"} 10\nh_bucket{le=\"+Inf\"} 10\n",
        );
        let after = parse(
            "h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.01\"} 110\nh_bucket{le=\"+Inf\"} 110\n",
        );
        // 100 new observations, all in (0.001, 0.01]: the median sits half
        // way through that bucket.
        let p50 = quantile_between(&before, &after, "h", &[], 0.5).expect("p50");
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        assert_eq!(quantile_between(&after, &after, "h", &[], 0.5), None);
    }
}
