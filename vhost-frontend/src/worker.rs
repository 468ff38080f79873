//! One thread per virtqueue, for the life of a connection: it waits on the
//! queue's kick eventfd (new requests), the queue's completion eventfd
//! (I/O finished on the runtime) and a control eventfd (the protocol
//! handler changed the ring: a new kick fd, a start, or exit), and runs the
//! data path (`backend`) for its queue only. Nothing here blocks on the
//! network or on the frontend.

use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::BlkBackend;
use crate::ratelimit::LogLimiter;
use crate::vring::Vring;

const TOKEN_KICK: u64 = 1;
const TOKEN_DONE: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
/// Longest sleep without looking at the exit flag.
const WAIT_MS_MAX: i32 = 1000;

/// A queue's worker thread.
pub struct Worker {
    control: Arc<EventFd>,
    exit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(queue: usize, vring: Vring, backend: BlkBackend) -> io::Result<Worker> {
        let control = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let exit = Arc::new(AtomicBool::new(false));
        let (c, x) = (control.clone(), exit.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vring-{queue}"))
            .spawn(move || {
                if let Err(e) = run(queue, &vring, &backend, &c, &x) {
                    tracing::error!(queue, error = %e, "queue worker stopped");
                }
            })?;
        Ok(Worker {
            control,
            exit,
            thread: Some(thread),
        })
    }

    /// Tells the worker the ring changed (kick fd, started, enabled).
    pub fn poke(&self) {
        let _ = self.control.write(1);
    }

    /// Stops and joins the thread.
    pub fn stop(&mut self) {
        self.exit.store(true, Ordering::Release);
        self.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Empties an eventfd the frontend owns (non-blocking: it may have been
/// emptied already, or be a plain pipe-like fd that never blocks us).
fn drain(fd: &File) {
    let mut buf = [0u8; 8];
    let mut f: &File = fd;
    let _ = f.read(&mut buf);
}

fn run(
    queue: usize,
    vring: &Vring,
    backend: &BlkBackend,
    control: &EventFd,
    exit: &AtomicBool,
) -> io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        control.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_CONTROL),
    )?;
    if let Some(fd) = backend.completion_fd(queue) {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, TOKEN_DONE),
        )?;
    }
    let errors = LogLimiter::new(5);
    let mut kick: Option<File> = None;
    let mut seen_generation = u64::MAX;
    let mut events = vec![EpollEvent::default(); 4];
    let mut again = false;
    loop {
        let wait_ms = if again { 0 } else { WAIT_MS_MAX };
        let n = match epoll.wait(wait_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if exit.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut process = std::mem::take(&mut again);
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KICK => {
                    if let Some(k) = &kick {
                        drain(k);
                    }
                    process = true;
                }
                TOKEN_DONE => {
                    if let Err(e) = backend.complete(queue, vring) {
                        if let Some(suppressed) = errors.allow() {
                            tracing::error!(queue, suppressed, error = %e, "completing requests");
                        }
                    }
                }
                _ => {
                    let _ = control.read();
                    process = true;
                }
            }
        }
        // Follow the ring's kick fd when the handler changed it.
        let (generation, new_kick) = {
            let st = vring.lock();
            let k = if st.generation != seen_generation {
                match st.kick.as_ref().map(File::try_clone).transpose() {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::error!(queue, error = %e, "cannot follow the kick fd; the queue waits for the frontend to set it again");
                        None
                    }
                }
            } else {
                None
            };
            (st.generation, k)
        };
        if generation != seen_generation {
            if let Some(old) = kick.take() {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    old.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            if let Some(k) = new_kick {
                match epoll.ctl(
                    ControlOperation::Add,
                    k.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_KICK),
                ) {
                    Ok(()) => kick = Some(k),
                    Err(e) => {
                        tracing::error!(queue, error = %e, "the kick fd cannot be polled; the queue waits for the frontend to set it again")
                    }
                }
            }
            seen_generation = generation;
            process = true;
        }
        if process {
            match backend.process_queue(queue, vring) {
                Ok(more) => again = more,
                Err(e) => {
                    if let Some(suppressed) = errors.allow() {
                        tracing::error!(queue, suppressed, error = %e, "serving the queue");
                    }
                }
            }
        }
    }
}
