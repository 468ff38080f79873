//! Real guests for end-to-end tests: a `raftblk-vhost` process serving a
//! volume, and a Linux guest under QEMU (TCG) booting with that disk over
//! vhost-user-blk (or over NBD from `raftblk-nbd` under an emulated AHCI
//! or virtio-scsi controller: `run_guest_nbd`), running a shell script
//! and powering off.
//!
//! The guest kernel and base initramfs come from
//! `vhost-frontend/guest/build.sh` (built on first use, cached in
//! `RAFTBLK_GUEST_DIR` or `/var/tmp/raftblk-guest`); a test's script is
//! appended as a second cpio archive holding `/test.sh`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::bin;

/// Directory with `vmlinuz` and `base.cpio.gz`, built if missing.
pub fn guest_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("RAFTBLK_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/raftblk-guest"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vhost-frontend/guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "building the test guest failed (install qemu-system-x86, cpio, busybox-static, fio; see .ci/run):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir)
}

/// A running `raftblk-vhost` serving one volume.
pub struct VhostDaemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

impl VhostDaemon {
    /// Starts the daemon and waits (bounded) for its socket.
    pub fn start(
        dir: &Path,
        cluster: &str,
        volume: &str,
        queues: u16,
    ) -> anyhow::Result<VhostDaemon> {
        Self::start_with(dir, cluster, volume, queues, &[])
    }

    /// Like `start`, with more arguments (`--takeover`, `--incoming`).
    pub fn start_with(
        dir: &Path,
        cluster: &str,
        volume: &str,
        queues: u16,
        extra: &[&str],
    ) -> anyhow::Result<VhostDaemon> {
        let socket = dir.join(format!("{volume}.sock"));
        let log = dir.join(format!("vhost-{volume}.log"));
        std::fs::File::create(&log)?;
        let mut args = vec![
            "--socket".to_owned(),
            socket.display().to_string(),
            "--volume".to_owned(),
            volume.to_owned(),
            "--cluster".to_owned(),
            cluster.to_owned(),
            "--queues".to_owned(),
            queues.to_string(),
            "--io-timeout-secs".to_owned(),
            "60".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = VhostDaemon {
            child: None,
            socket,
            log,
            args,
        };
        d.spawn()?;
        Ok(d)
    }

    /// The attach-lease holder name this daemon uses.
    pub fn holder(&self) -> String {
        raftblk_client::attach::daemon_holder("raftblk-vhost", &self.socket)
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to the running daemon; for
    /// SIGSTOP, returns once every thread of it has stopped (bounded).
    pub fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let Some(c) = self.child.as_ref() else {
            bail!("raftblk-vhost is not running");
        };
        let pid = i32::try_from(c.id())?;
        // SAFETY: kill(2) on the pid of our own child process, which has
        // not been reaped (we hold its Child), so the pid is still ours.
        let rc = unsafe { libc::kill(pid, signal) };
        anyhow::ensure!(
            rc == 0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
        if signal != libc::SIGSTOP {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let states: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))?
                .filter_map(|t| t.ok())
                .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
                .collect();
            // The state follows the parenthesised command name.
            let stopped = states.iter().all(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
            });
            if stopped && !states.is_empty() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "raftblk-vhost did not stop: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the daemon again with the same arguments (as systemd's
    /// `Restart=always` would), its log appended to the same file.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let logf = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let child = Command::new(bin("raftblk-vhost"))
            .args(&self.args)
            .envs(crate::tls::env(raftblk_tls::Role::Client))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawn raftblk-vhost")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("raftblk-vhost exited ({st}): {}", self.log_text());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "raftblk-vhost did not create its socket: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Sum of the integer field `name=` over the log lines containing
    /// `message`.
    pub fn log_field_sum(&self, message: &str, name: &str) -> u64 {
        self.log_text()
            .lines()
            .filter(|l| l.contains(message))
            .filter_map(|l| {
                let at = l.find(&format!("{name}="))? + name.len() + 1;
                let digits: String = l[at..].chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse::<u64>().ok()
            })
            .sum()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the daemon serves its metrics (started with `--metrics-addr`).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        crate::metrics::logged_addr(&self.log_text())
    }

    /// Requests answered per queue, from the statistics the daemon logs at
    /// the end of each connection (summed over connections).
    pub fn answered_per_queue(&self) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for line in self.log_text().lines() {
            if !line.contains("queue statistics") {
                continue;
            }
            let field = |name: &str| -> Option<u64> {
                let at = line.find(&format!("{name}="))? + name.len() + 1;
                let rest = &line[at..];
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse().ok()
            };
            if let (Some(q), Some(n)) = (field("queue"), field("requests")) {
                let q = q as usize;
                if out.len() <= q {
                    out.resize(q + 1, 0);
                }
                out[q] += n;
            }
        }
        out
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

impl Drop for VhostDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a guest run printed.
pub struct GuestRun {
    pub output: String,
    /// `RAFTBLK-EXIT` status of `/test.sh`, if the guest got that far.
    pub exit: Option<i32>,
    /// The run was cut short by `on_line` asking for a power cut.
    pub cut: bool,
}

impl GuestRun {
    /// Values of lines `KEY v1 v2 ...`.
    pub fn values(&self, key: &str) -> Vec<Vec<String>> {
        self.output
            .lines()
            .filter_map(|l| l.trim().strip_prefix(key))
            .filter(|rest| rest.starts_with(' ') || rest.is_empty())
            .map(|rest| rest.split_whitespace().map(str::to_owned).collect())
            .collect()
    }
}

/// Boots the guest with the vhost-user-blk disk at `socket` (`queues`
/// virtqueues, 2 vCPUs), runs `script` as `/test.sh`, and returns its
/// output. `on_line` sees every console line as it arrives.
pub fn run_guest(
    socket: &Path,
    queues: u16,
    script: &str,
    timeout: Duration,
    on_line: impl FnMut(&str),
) -> anyhow::Result<GuestRun> {
    run_guest_vhost(socket, queues, None, script, timeout, on_line)
}

/// `run_guest`, with QEMU reconnecting to the socket every
/// `reconnect_ms` when the daemon goes away (`reconnect-ms`), if set.
pub fn run_guest_vhost(
    socket: &Path,
    queues: u16,
    reconnect_ms: Option<u64>,
    script: &str,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
) -> anyhow::Result<GuestRun> {
    let reconnect = reconnect_ms.map_or(String::new(), |ms| format!(",reconnect-ms={ms}"));
    let devices = vec![
        "-chardev".to_owned(),
        format!("socket,id=c0,path={}{reconnect}", socket.display()),
        "-device".to_owned(),
        format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"),
    ];
    run_qemu(script, &[], &devices, 512, "", timeout, |l| {
        on_line(l);
        false
    })
}

/// How a guest's NBD-backed disk is attached: an emulated SATA disk on
/// an AHCI controller (full virtualization: no paravirtual driver in the
/// guest) or a SCSI disk on virtio-scsi. Either is `/dev/sda`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdController {
    Ahci,
    VirtioScsi,
}

/// Boots the guest with the NBD export `export` at unix socket `socket`
/// (QEMU's NBD client, `-blockdev driver=nbd`) as its disk `/dev/sda`
/// behind `controller`, the host files `files` copied in, and runs
/// `script` as `/test.sh`.
pub fn run_guest_nbd(
    socket: &Path,
    export: &str,
    controller: NbdController,
    files: &[(&str, &Path)],
    script: &str,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
) -> anyhow::Result<GuestRun> {
    let mut devices = vec![
        "-blockdev".to_owned(),
        format!(
            "driver=nbd,server.type=unix,server.path={},export={export},node-name=d0",
            socket.display()
        ),
    ];
    match controller {
        NbdController::Ahci => devices.extend([
            "-device".to_owned(),
            "ahci,id=ahci".to_owned(),
            "-device".to_owned(),
            "ide-hd,bus=ahci.0,drive=d0".to_owned(),
        ]),
        NbdController::VirtioScsi => devices.extend([
            "-device".to_owned(),
            "virtio-scsi-pci,id=scsi0".to_owned(),
            "-device".to_owned(),
            "scsi-hd,bus=scsi0.0,drive=d0".to_owned(),
        ]),
    }
    run_qemu(
        script,
        files,
        &devices,
        512,
        "raftblk.disk=sda",
        timeout,
        |l| {
            on_line(l);
            false
        },
    )
}

/// Boots the guest with `disk` (a raw file) as its virtio-blk disk
/// `/dev/vda` (QEMU's default writeback cache: what the guest wrote to the
/// disk survives QEMU, what sat in the guest's page cache does not), the
/// host files `files` copied in at the guest paths given (binaries
/// stripped, with the libraries they load), and `mem_mib` of RAM; runs
/// `script` as `/test.sh`. When `on_line` returns true for a console line
/// the guest loses power at once: QEMU is killed with SIGKILL.
pub fn run_guest_with_disk(
    disk: &Path,
    files: &[(&str, &Path)],
    script: &str,
    mem_mib: u64,
    timeout: Duration,
    on_line: impl FnMut(&str) -> bool,
) -> anyhow::Result<GuestRun> {
    let devices = vec![
        // The node binaries use SSE4.2 and PCLMUL (RocksDB's CRC32C):
        // TCG's default CPU model has neither.
        "-cpu".to_owned(),
        "max".to_owned(),
        "-drive".to_owned(),
        format!(
            "file={},if=virtio,format=raw,cache=writeback",
            disk.display()
        ),
    ];
    run_qemu(script, files, &devices, mem_mib, "", timeout, on_line)
}

/// Copies host binary `src` into `root` at guest path `dest`, stripped,
/// with the shared libraries `ldd` lists at their own paths.
fn copy_binary(root: &Path, dest: &str, src: &Path) -> anyhow::Result<()> {
    let to = root.join(dest.trim_start_matches('/'));
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d)?;
    }
    let st = Command::new("strip")
        .arg("-o")
        .arg(&to)
        .arg(src)
        .status()
        .context("run strip (binutils)")?;
    anyhow::ensure!(st.success(), "strip {} failed", src.display());
    let out = Command::new("ldd").arg(src).output().context("run ldd")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let lib = match line.split("=>").nth(1) {
            Some(rest) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|l| l.starts_with('/')),
        };
        let Some(lib) = lib.filter(|l| l.starts_with('/')) else {
            continue;
        };
        let lto = root.join(lib.trim_start_matches('/'));
        if let Some(d) = lto.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::copy(lib, &lto).with_context(|| format!("copy {lib}"))?;
    }
    Ok(())
}

/// The initramfs of a test guest: the base archive, then a second one
/// holding `script` as `/test.sh` and `files` at their guest paths.
/// Returns the directory it lives in (deleted on drop) and its path.
pub fn guest_initrd(
    script: &str,
    files: &[(&str, &Path)],
) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let dir = guest_dir()?;
    let work = tempfile::tempdir()?;
    let tdir = work.path().join("t");
    std::fs::create_dir_all(&tdir)?;
    let test_sh = tdir.join("test.sh");
    std::fs::write(&test_sh, script)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&test_sh, std::fs::Permissions::from_mode(0o755))?;
    for (dest, src) in files {
        copy_binary(&tdir, dest, src)?;
    }
    // A second, gzipped archive: Linux unpacks concatenated archives.
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -mindepth 1 | cpio -o -H newc --quiet | gzip -1")
        .current_dir(&tdir)
        .output()
        .context("run cpio")?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!("cpio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut initrd = std::fs::read(dir.join("base.cpio.gz"))?;
    initrd.extend_from_slice(&out.stdout);
    let initrd_path = work.path().join("initrd");
    std::fs::write(&initrd_path, &initrd)?;
    Ok((work, initrd_path))
}

/// The QEMU command line of a test guest (2 vCPUs under TCG, `mem_mib`
/// of shared memfd RAM, console on stdio) with `devices` appended.
pub fn qemu_command(initrd: &Path, devices: &[String], mem_mib: u64) -> anyhow::Result<Command> {
    qemu_command_append(initrd, devices, mem_mib, "")
}

/// `qemu_command` with `append` added to the kernel command line.
pub fn qemu_command_append(
    initrd: &Path,
    devices: &[String],
    mem_mib: u64,
    append: &str,
) -> anyhow::Result<Command> {
    let dir = guest_dir()?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "q35,memory-backend=mem0",
        "-accel",
        "tcg,thread=multi",
    ])
    .args(["-smp", "2,maxcpus=2", "-m", &format!("{mem_mib}M")])
    .args([
        "-object",
        &format!("memory-backend-memfd,id=mem0,size={mem_mib}M,share=on"),
    ])
    .arg("-kernel")
    .arg(dir.join("vmlinuz"))
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        &format!("console=ttyS0 rdinit=/init panic=-1 quiet {append}"),
    ])
    .args([
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .args(devices)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    Ok(cmd)
}

/// Lines of a child's stdout and stderr (prefixed `qemu: `), as they come.
pub fn console_lines(child: &mut Child) -> anyhow::Result<mpsc::Receiver<String>> {
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let (tx, rx) = mpsc::channel::<String>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx2.send(format!("qemu: {line}")).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// What `fio_verify` printed (`rc=… secs=… errors=…`), if fio ended.
pub fn fio_result(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("RAFTBLK-FIO "))
        .map(str::to_owned)
}

/// Whether `fio_verify` ended with status 0 in a console transcript.
pub fn fio_passed(output: &str) -> bool {
    fio_result(output).is_some_and(|f| f.starts_with("rc=0 "))
}

/// `RAFTBLK-EXIT` status of `/test.sh` in a console transcript.
pub fn exit_status(output: &str) -> Option<i32> {
    output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("RAFTBLK-EXIT "))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
}

/// Boots the test guest with `devices` (QEMU arguments), `append` on the
/// kernel command line, `files` and `script` as `/test.sh` in a second
/// initramfs archive, and collects
/// its console until it powers off, `on_line` asks for a power cut
/// (SIGKILL of QEMU) or `timeout` passes (an error).
fn run_qemu(
    script: &str,
    files: &[(&str, &Path)],
    devices: &[String],
    mem_mib: u64,
    append: &str,
    timeout: Duration,
    mut on_line: impl FnMut(&str) -> bool,
) -> anyhow::Result<GuestRun> {
    let (_work, initrd_path) = guest_initrd(script, files)?;
    let mut child = qemu_command_append(&initrd_path, devices, mem_mib, append)?
        .spawn()
        .context("spawn qemu-system-x86_64 (install qemu-system-x86)")?;
    let rx = console_lines(&mut child)?;
    let deadline = Instant::now() + timeout;
    let mut output = String::new();
    let mut cut = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let power_off = on_line(&line);
                output.push_str(&line);
                output.push('\n');
                if power_off {
                    // Power loss: SIGKILL, nothing in the guest runs on.
                    let _ = child.kill();
                    cut = true;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("guest did not finish within {timeout:?}; console so far:\n{output}");
        }
    }
    let _ = child.wait();
    let exit = exit_status(&output);
    Ok(GuestRun { output, exit, cut })
}

/// sha256 of a file, via `sha256sum`.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Guest shell lines running an fio job with crc32c verification on both
/// queues of /dev/vda (one job pinned to each vCPU; blk-mq maps each CPU
/// to its own hardware queue): job q0 at `offset_mb`, q1 right after it,
/// `size_mb` each, `extra` fio options in [global]. Prints
/// `RAFTBLK-FIO rc=… secs=… errors=…`.
pub fn fio_verify(offset_mb: u64, size_mb: u64, extra: &str) -> String {
    format!(
        r#"cat > /tmp/verify.fio <<'JOB'
[global]
filename=/dev/vda
direct=1
ioengine=libaio
bs=4k
iodepth=16
rw=randwrite
verify=crc32c
verify_backlog=128
verify_fatal=1
size={size_mb}m
{extra}
[q0]
offset={offset_mb}m
cpus_allowed=0
[q1]
offset={o2}m
cpus_allowed=1
JOB
start=$(date +%s)
rc=0
fio --output-format=terse --terse-version=3 /tmp/verify.fio > /tmp/fio.out 2>&1 || rc=$?
echo "RAFTBLK-FIO rc=$rc secs=$(( $(date +%s) - start )) errors=$(cut -d';' -f5 /tmp/fio.out | tr '\n' ' ')"
[ $rc -eq 0 ] || {{ cat /tmp/fio.out; exit 1; }}
"#,
        o2 = offset_mb + size_mb
    )
}
