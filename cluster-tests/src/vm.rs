//! Guests a test drives while they run: a QEMU process with its console
//! lines as they come and a QMP socket for commands (live migration
//! between two QEMU processes, each with its own vhost-user-blk daemon).
//! The guest itself is the one `guest` builds.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::guest::{console_lines, exit_status, qemu_command};

/// Longest wait for one QMP reply.
const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// QMP lines (events included) read while waiting for one reply.
const QMP_LINES_MAX: usize = 10_000;

/// A QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and leaves
    /// capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => bail!("QMP {}: {e}", path.display()),
            }
        };
        stream.set_read_timeout(Some(QMP_REPLY_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting)?;
        anyhow::ensure!(greeting.contains("QMP"), "QMP greeting: {greeting}");
        q.execute("qmp_capabilities", "{}")?;
        Ok(q)
    }

    /// Runs `command` with `arguments` (a JSON object) and returns the
    /// reply line; a QMP error is an error.
    pub fn execute(&mut self, command: &str, arguments: &str) -> anyhow::Result<String> {
        writeln!(
            self.writer,
            r#"{{"execute": "{command}", "arguments": {arguments}}}"#
        )?;
        for _ in 0..QMP_LINES_MAX {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .with_context(|| format!("QMP reply to {command}"))?;
            anyhow::ensure!(n > 0, "QMP closed while waiting for {command}");
            if line.starts_with(r#"{"event""#) {
                continue;
            }
            if line.contains(r#""error""#) {
                bail!("QMP {command}: {}", line.trim());
            }
            return Ok(line);
        }
        bail!("QMP {command}: no reply among {QMP_LINES_MAX} lines")
    }

    /// `query-migrate`'s status ("active", "completed", "cancelled", ...).
    pub fn migration_status(&mut self) -> anyhow::Result<String> {
        let reply = self.execute("query-migrate", "{}")?;
        let status = reply
            .split(r#""status": ""#)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("none");
        Ok(status.to_owned())
    }

    /// Polls `query-migrate` until the status is one of `want` (or
    /// "failed", an error), bounded by `timeout`.
    pub fn wait_migration(&mut self, want: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.migration_status()?;
            if want.contains(&st.as_str()) {
                return Ok(st);
            }
            if st == "failed" {
                let reply = self.execute("query-migrate", "{}")?;
                bail!("migration failed: {}", reply.trim());
            }
            if Instant::now() >= deadline {
                bail!("migration still {st} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A running QEMU guest.
pub struct Vm {
    pub name: String,
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Console (and QEMU's stderr) so far.
    pub output: String,
    pub qmp_path: PathBuf,
}

impl Vm {
    /// Starts QEMU on `initrd` with `devices`, a QMP socket at `qmp_path`
    /// and, for a migration destination, `-incoming defer`.
    pub fn spawn(
        name: &str,
        initrd: &Path,
        devices: &[String],
        mem_mib: u64,
        qmp_path: &Path,
        incoming: bool,
    ) -> anyhow::Result<Vm> {
        let mut cmd = qemu_command(initrd, devices, mem_mib)?;
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let mut child = cmd
            .spawn()
            .context("spawn qemu-system-x86_64 (install qemu-system-x86)")?;
        let lines = console_lines(&mut child)?;
        Ok(Vm {
            name: name.to_owned(),
            child: Some(child),
            lines,
            output: String::new(),
            qmp_path: qmp_path.to_owned(),
        })
    }

    pub fn qmp(&self) -> anyhow::Result<Qmp> {
        Qmp::connect(&self.qmp_path, Duration::from_secs(20))
    }

    /// Takes the console lines that arrived within `wait`; false once
    /// QEMU's output has ended.
    pub fn pump(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.output.push_str(&line);
                    self.output.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return true,
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Waits for a console line containing `text`.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.output.contains(text) {
            if !self.pump(Duration::from_millis(100)) && !self.output.contains(text) {
                bail!(
                    "{}: QEMU ended before {text:?}:\n{}",
                    self.name,
                    self.output
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: no {text:?} within {timeout:?}:\n{}",
                    self.name,
                    self.output
                );
            }
        }
        Ok(())
    }

    /// Waits until QEMU exits (the guest powered off, or `quit`); returns
    /// the guest's `RAFTBLK-EXIT` status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        while self.pump(Duration::from_millis(100)) {
            if Instant::now() >= deadline {
                bail!(
                    "{}: still running after {timeout:?}:\n{}",
                    self.name,
                    self.output
                );
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        Ok(exit_status(&self.output))
    }

    /// Ends QEMU now (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
