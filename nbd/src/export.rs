//! One served export: its name, its backend, whether it is read-only,
//! the transmission flags it advertises, and the claim a client must
//! hold to use it (a writable export serves one client at a time; a
//! read-only one any number, within the server's connection bound).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::Backend;
use crate::proto;

/// How long a client choosing a busy writable export waits for the
/// previous client to finish (a client that just disconnected may still
/// be winding down) before it is refused.
pub const CLAIM_WAIT: Duration = Duration::from_secs(2);

pub struct Export {
    name: String,
    backend: Arc<dyn Backend>,
    read_only: bool,
    /// A writable export's single client slot.
    slot: Option<Arc<Semaphore>>,
    claim_wait: Duration,
}

/// The right to use an export for one connection's transmission phase;
/// dropping it frees a writable export for the next client.
#[derive(Debug)]
pub struct Claim {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Claim {
    /// A claim on nothing (tests of the transmission phase alone).
    pub fn none() -> Claim {
        Claim { _permit: None }
    }
}

impl Export {
    pub fn new(name: &str, backend: Arc<dyn Backend>, read_only: bool) -> Export {
        Export {
            name: name.to_owned(),
            backend,
            read_only,
            slot: (!read_only).then(|| Arc::new(Semaphore::new(1))),
            claim_wait: CLAIM_WAIT,
        }
    }

    /// The same with another wait for a busy export (tests).
    pub fn with_claim_wait(mut self, wait: Duration) -> Export {
        self.claim_wait = wait;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether a client asking for `name` means this export (the empty
    /// name is the default export).
    pub fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    /// The transmission flags advertised.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH;
        if self.read_only {
            // Several clients may read at once; nothing is cached here.
            f |= proto::FLAG_READ_ONLY | proto::FLAG_CAN_MULTI_CONN;
        } else {
            f |= proto::FLAG_SEND_FUA | proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES;
        }
        f
    }

    /// Claims the export for one client; an error says why not.
    pub async fn claim(&self) -> Result<Claim, String> {
        let Some(slot) = &self.slot else {
            return Ok(Claim { _permit: None });
        };
        match tokio::time::timeout(self.claim_wait, slot.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Claim { _permit: Some(p) }),
            _ => Err(format!(
                "export {:?} is in use by another client (a writable export serves one client at a time)",
                self.name
            )),
        }
    }
}
