//! Network topology for the failure tests: every node in its own network
//! namespace, plus one for the test's clients, all joined by a bridge that
//! lives in a switch namespace the test creates. Names and the subnet are
//! unique per test process; namespaces of test processes that no longer
//! exist are swept at start; everything is deleted on drop.
//!
//! Traffic stays inside these namespaces: the test's client threads enter
//! the client namespace (`enter_client`), the host namespace never talks to
//! the test subnet. Partitions are iptables DROP rules inside the nodes'
//! namespaces; a slow link is a tbf qdisc on a node's interface.

use std::os::fd::AsRawFd as _;
use std::process::Command;

use anyhow::{bail, Context as _};

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A test network.
pub struct Net {
    tag: String,
    third_octet: u32,
    nodes: usize,
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces left by test processes that died.
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("rbt") else {
            continue;
        };
        let pid: u32 = rest
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap_or(0);
        if pid != 0 && !pid_alive(pid) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Net {
    /// Creates the switch, one namespace per node and one for clients.
    pub fn create(nodes: usize, seq: u32) -> anyhow::Result<Net> {
        sweep_stale();
        let pid = std::process::id();
        let net = Net {
            tag: format!("rbt{pid}s{seq}"),
            third_octet: (pid + seq * 7) % 250 + 1,
            nodes,
        };
        let sw = net.switch_ns();
        run(&["ip", "netns", "add", &sw])?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..=nodes {
            let ns = if i == 0 {
                net.client_ns()
            } else {
                net.node_ns(i)
            };
            let addr = if i == 0 {
                net.client_addr()
            } else {
                net.node_ip(i)
            };
            // Interface names are global until moved: keep them unique.
            let a = format!("r{}{}a", pid % 100_000, i);
            let b = format!("r{}{}b", pid % 100_000, i);
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
            run(&["ip", "link", "set", &a, "netns", &ns])?;
            run(&["ip", "link", "set", &b, "netns", &sw])?;
            run(&["ip", "-n", &ns, "link", "set", &a, "name", "eth0"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &sw, "link", "set", &b, "master", "br0"])?;
            run(&["ip", "-n", &sw, "link", "set", &b, "up"])?;
        }
        Ok(net)
    }

    fn switch_ns(&self) -> String {
        format!("{}sw", self.tag)
    }
    pub fn client_ns(&self) -> String {
        format!("{}c", self.tag)
    }
    pub fn node_ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }
    pub fn node_ip(&self, i: usize) -> String {
        format!("10.231.{}.{}", self.third_octet, 10 + i)
    }
    pub fn client_addr(&self) -> String {
        format!("10.231.{}.200", self.third_octet)
    }

    fn ipt(&self, i: usize, args: &[&str]) -> anyhow::Result<()> {
        let ns = self.node_ns(i);
        let mut v = vec!["ip", "netns", "exec", ns.as_str(), "iptables"];
        v.extend_from_slice(args);
        run(&v)
    }

    /// Drops every packet between node `i` and each node in `others`.
    pub fn isolate(&self, i: usize, others: &[usize]) -> anyhow::Result<()> {
        for &j in others {
            let ip = self.node_ip(j);
            self.ipt(i, &["-A", "INPUT", "-s", &ip, "-j", "DROP"])?;
            self.ipt(i, &["-A", "OUTPUT", "-d", &ip, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Drops packets travelling from node `from` to node `to` only.
    pub fn cut_one_way(&self, from: usize, to: usize) -> anyhow::Result<()> {
        self.ipt(
            from,
            &["-A", "OUTPUT", "-d", &self.node_ip(to), "-j", "DROP"],
        )
    }

    /// Limits node `i`'s outgoing bandwidth.
    pub fn slow_link(&self, i: usize, rate: &str) -> anyhow::Result<()> {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.node_ns(i),
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "32kbit",
            "latency",
            "400ms",
        ])
    }

    /// Removes every partition and link limit.
    pub fn heal(&self) -> anyhow::Result<()> {
        for i in 1..=self.nodes {
            self.ipt(i, &["-F"])?;
            let _ = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.node_ns(i),
                    "tc",
                    "qdisc",
                    "del",
                    "dev",
                    "eth0",
                    "root",
                ])
                .output();
        }
        Ok(())
    }

    /// Moves the calling thread into the client namespace.
    pub fn enter_client(&self) -> anyhow::Result<()> {
        enter(&format!("/run/netns/{}", self.client_ns()))
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    // SAFETY: setns(2) on an fd we own for a network namespace file; it
    // only changes the calling thread's namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..=self.nodes {
            let ns = if i == 0 {
                self.client_ns()
            } else {
                self.node_ns(i)
            };
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch_ns()])
            .status();
    }
}

/// A TCP delay line in front of one node: inside the node's namespace,
/// iptables redirects incoming connections for the node's port to the
/// proxy, which forwards each byte after `delay` (adjustable at run time).
/// Traffic from the node's own namespace to itself is not redirected.
pub struct DelayProxy {
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Connections one proxy serves at most.
const PROXY_CONNECTIONS_MAX: usize = 64;

impl DelayProxy {
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Net {
    /// Starts a delay proxy for node `i` whose server listens on `port`.
    pub fn delay_proxy(&self, i: usize, port: u16) -> anyhow::Result<DelayProxy> {
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
        use std::sync::Arc;
        let proxy_port = port + 100;
        let ns = self.node_ns(i);
        run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            &proxy_port.to_string(),
        ])?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let target = format!("{}:{port}", self.node_ip(i));
        let path = format!("/run/netns/{ns}");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (d, s) = (delay_ms.clone(), stop.clone());
        std::thread::spawn(move || {
            // This thread (and every thread it spawns) lives in the node's
            // namespace.
            if let Err(e) = enter(&path) {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
            let listener = match std::net::TcpListener::bind(("0.0.0.0", proxy_port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = listener.set_nonblocking(true);
            let _ = ready_tx.send(Ok(()));
            let live = Arc::new(AtomicUsize::new(0));
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inbound, _)) => {
                        if live.load(Ordering::Relaxed) >= PROXY_CONNECTIONS_MAX {
                            continue;
                        }
                        let Ok(outbound) = std::net::TcpStream::connect(&target) else {
                            continue;
                        };
                        let _ = inbound.set_nonblocking(false);
                        for (from, to) in [
                            (inbound.try_clone(), outbound.try_clone()),
                            (outbound.try_clone(), inbound.try_clone()),
                        ] {
                            if let (Ok(from), Ok(to)) = (from, to) {
                                live.fetch_add(1, Ordering::Relaxed);
                                let (d, s, live) = (d.clone(), s.clone(), live.clone());
                                std::thread::spawn(move || {
                                    pump(from, to, d, s);
                                    live.fetch_sub(1, Ordering::Relaxed);
                                });
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        match ready_rx.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(DelayProxy { delay_ms, stop }),
            Ok(Err(e)) => bail!("delay proxy: {e}"),
            Err(_) => bail!("delay proxy did not start"),
        }
    }
}

/// Copies `from` → `to`, each chunk released `delay` after it was read.
fn pump(
    mut from: std::net::TcpStream,
    to: std::net::TcpStream,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(std::time::Instant, Vec<u8>)>(1024);
    let mut writer_to = match to.try_clone() {
        Ok(t) => t,
        Err(_) => return,
    };
    let writer = std::thread::spawn(move || {
        while let Ok((due, buf)) = rx.recv() {
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if writer_to.write_all(&buf).is_err() {
                break;
            }
        }
        let _ = writer_to.shutdown(std::net::Shutdown::Write);
    });
    let _ = from.set_read_timeout(Some(std::time::Duration::from_millis(200)));
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let due = std::time::Instant::now()
                    + std::time::Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = to.shutdown(std::net::Shutdown::Both);
}
