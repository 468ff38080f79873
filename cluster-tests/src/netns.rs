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
