//! A `raftblk-nbd` process serving one volume on a Unix socket, for
//! tests: started with bounded waits for its socket, killed (by PID) on
//! drop, stopped with SIGTERM to check that it gives its lease back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::bin;

pub struct NbdDaemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub volume: String,
}

impl NbdDaemon {
    /// Starts `raftblk-nbd --socket DIR/NAME.sock --volume VOLUME` with
    /// `extra` arguments and waits (bounded) for its socket.
    pub fn start(
        dir: &Path,
        name: &str,
        cluster: &str,
        volume: &str,
        extra: &[&str],
    ) -> anyhow::Result<NbdDaemon> {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("nbd-{name}.log"));
        let _ = std::fs::remove_file(&socket);
        let logf = std::fs::File::create(&log)?;
        let child = Command::new(bin("raftblk-nbd"))
            .arg("--socket")
            .arg(&socket)
            .args(["--volume", volume, "--cluster", cluster])
            .args(extra)
            .envs(crate::tls::env(raftblk_tls::Role::Client))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawn raftblk-nbd")?;
        let mut d = NbdDaemon {
            child: Some(child),
            socket,
            log,
            volume: volume.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.socket.exists() {
            if let Some(c) = d.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("raftblk-nbd exited ({st}): {}", d.log_text());
                }
            }
            if Instant::now() >= deadline {
                bail!("raftblk-nbd did not create its socket: {}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// `nbd+unix:///VOLUME?socket=PATH`, the URI qemu-img takes.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.volume,
            self.socket.display()
        )
    }

    /// The attach-lease holder name this daemon uses.
    pub fn holder(&self) -> String {
        raftblk_client::attach::daemon_holder("raftblk-nbd", &self.socket)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then waits (bounded) for the exit; its status code.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let Some(mut c) = self.child.take() else {
            bail!("raftblk-nbd is not running");
        };
        let pid = i32::try_from(c.id())?;
        // SAFETY: kill(2) on the pid of our own child, not yet reaped (we
        // hold its Child), so the pid is still ours.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        anyhow::ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st.code());
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("raftblk-nbd did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NbdDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}
