//! Reading the Prometheus endpoints of test processes: where a process
//! serves them (from its log line), one scrape over plain HTTP/1.1 with
//! timeouts, and the samples of a scrape by name and labels.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The address a process logged it serves metrics on (the last start in
/// the log wins).
pub fn logged_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .rev()
        .filter(|l| l.contains("serving Prometheus metrics"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .and_then(|a| a.parse().ok())
        })
}

/// One `GET /metrics`: the body, or an error naming what failed.
pub fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut out = Vec::new();
    s.take(64 << 20).read_to_end(&mut out)?;
    let text = String::from_utf8(out)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header end from {addr}"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{addr}: {head}");
    // hyper sends a small body with Content-Length, a large one chunked.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return dechunk(body);
    }
    Ok(body.to_owned())
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| anyhow::anyhow!("bad chunk header"))?;
        let n = usize::from_str_radix(size.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        anyhow::ensure!(rest.len() >= n + 2, "short chunk");
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

/// The sum of the samples of `name` whose labels include every
/// `key="value"` of `labels` (0 when none match).
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbls) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| lbls.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_by_name_and_labels() {
        let t = "# HELP a x\na_total{op=\"read\",q=\"0\"} 3\na_total{op=\"write\",q=\"0\"} 4\na_total{op=\"read\",q=\"1\"} 5\nb 7\n";
        assert_eq!(sum(t, "a_total", &[("op", "read")]), 8.0);
        assert_eq!(sum(t, "a_total", &[]), 12.0);
        assert_eq!(sum(t, "b", &[]), 7.0);
        assert_eq!(sum(t, "c", &[]), 0.0);
        let log =
            "x INFO raftblk_metrics: serving Prometheus metrics on /metrics addr=127.0.0.1:4567\n";
        assert_eq!(logged_addr(log), Some("127.0.0.1:4567".parse().unwrap()));
    }
}
