//! One virtqueue's state as the vhost-user protocol sets it up: the
//! virtio-queue `Queue` (sizes, ring addresses, indices), the kick and call
//! eventfds the frontend hands over, the enable and started flags, and the
//! queue's part of the inflight region. The protocol handler (`handler`)
//! writes it; the queue's worker thread (`worker`) and the data path
//! (`backend`) read it, always under its one mutex.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::inflight::InflightQueue;

/// The state behind one virtqueue.
pub struct VringState {
    pub queue: Queue,
    /// Kick eventfd from the frontend (SET_VRING_KICK).
    pub kick: Option<File>,
    /// Call eventfd to the frontend (SET_VRING_CALL).
    pub call: Option<File>,
    /// SET_VRING_ENABLE (on from the start when PROTOCOL_FEATURES is not
    /// negotiated).
    pub enabled: bool,
    /// Between the kick fd arriving and GET_VRING_BASE: the ring may be
    /// processed.
    pub started: bool,
    /// Set when the used ring could not be written: the queue is left
    /// alone until the frontend sets it up again.
    pub broken: bool,
    /// This queue's part of the inflight region, when the frontend set one.
    pub inflight: Option<InflightQueue>,
    /// Heads found in flight in the inflight region at start, oldest
    /// first: served before anything new is popped.
    pub resubmit: VecDeque<u16>,
    /// Bumped on every change the worker must notice (kick fd, start).
    pub generation: u64,
}

/// A shared handle on one virtqueue.
#[derive(Clone)]
pub struct Vring {
    state: Arc<Mutex<VringState>>,
}

impl Vring {
    pub fn new(queue_size_max: u16) -> io::Result<Vring> {
        let queue = Queue::new(queue_size_max).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Vring {
            state: Arc::new(Mutex::new(VringState {
                queue,
                kick: None,
                call: None,
                enabled: false,
                started: false,
                broken: false,
                inflight: None,
                resubmit: VecDeque::new(),
                generation: 0,
            })),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, VringState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VringState {
    /// Whether requests may be taken from the ring now.
    pub fn serving(&self) -> bool {
        self.started && self.enabled && !self.broken && self.queue.ready()
    }

    /// Puts `head` on the used ring with `len` bytes written, keeping the
    /// inflight region in step (the vhost-user spec's pre-put / put /
    /// post-put order, one element per batch, so a crash anywhere in
    /// between is repaired at the next start).
    pub fn add_used<M: GuestMemory>(&mut self, mem: &M, head: u16, len: u32) -> io::Result<()> {
        if let Some(inf) = &self.inflight {
            inf.pre_put(head);
        }
        if let Err(e) = self.queue.add_used(mem, head, len) {
            self.broken = true;
            return Err(io::Error::other(format!("used ring: {e}")));
        }
        let next_used = self.queue.next_used();
        if let Some(inf) = &self.inflight {
            inf.post_put(head, next_used);
        }
        Ok(())
    }

    /// Interrupts the guest when the ring's notification rules ask for it.
    pub fn notify_if_needed<M: GuestMemory>(&mut self, mem: &M) -> io::Result<()> {
        let needed = self
            .queue
            .needs_notification(mem)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if needed {
            self.signal_used()?;
        }
        Ok(())
    }

    /// Writes the call eventfd (no-op before the frontend set one).
    pub fn signal_used(&self) -> io::Result<()> {
        match &self.call {
            Some(f) => {
                let mut f: &File = f;
                f.write_all(&1u64.to_ne_bytes())
            }
            None => Ok(()),
        }
    }
}
