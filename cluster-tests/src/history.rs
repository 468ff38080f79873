//! Operation histories and their checker.
//!
//! Every write is unique and traceable: block `b` written by write `w`
//! carries `w` and `b` in its first 16 bytes and a pseudo-random fill
//! derived from both, so any block a read returns names the write that
//! produced it (or is zeros: never written, or discarded), and bytes that
//! no write ever produced are detected.
//!
//! The checker is a per-block register check: each block is a register,
//! writes and discards are its writes (a discard writes "zeros"), reads
//! must return the value of a write that was invoked before the read
//! completed and that was not certainly overwritten before the read began
//! (some other write both started after it completed and completed before
//! the read was invoked). Failed or timed-out writes may or may not have
//! happened: they count as never completing. This catches stale reads,
//! lost acknowledged writes (the final reads see an older value), reads of
//! writes that never happened, and garbage.

use std::collections::HashMap;

/// Bytes per tracked block.
pub const BLOCK: usize = 4096;

/// Contents of block `block` as written by write `write` (> 0).
pub fn block_payload(write: u64, block: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK);
    v.extend_from_slice(&write.to_le_bytes());
    v.extend_from_slice(&block.to_le_bytes());
    let mut x = (write.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.rotate_left(29)) | 1;
    while v.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(BLOCK);
    v
}

/// What a read found in one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Zeros,
    Write(u64),
    /// Bytes no write produced (or a write's bytes in the wrong block).
    Garbage,
}

/// Decodes one 4 KiB block read at block index `block`.
pub fn decode(block: u64, data: &[u8]) -> Seen {
    if data.iter().all(|&b| b == 0) {
        return Seen::Zeros;
    }
    if data.len() < 16 {
        return Seen::Garbage;
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&data[..8]);
    let write = u64::from_le_bytes(w);
    if write == 0 || data != block_payload(write, block).as_slice() {
        return Seen::Garbage;
    }
    Seen::Write(write)
}

/// Time in microseconds since the workload started.
pub type Micros = u64;

#[derive(Debug, Clone)]
pub enum OpKind {
    /// Write `id` over `blocks` (volume, first block, count).
    Write {
        id: u64,
    },
    /// Discard / write-zeroes over the blocks.
    Discard {
        id: u64,
    },
    /// Read: what each block held.
    Read {
        seen: Vec<Seen>,
    },
    Flush,
}

#[derive(Debug, Clone)]
pub struct Op {
    pub client: u32,
    pub volume: u32,
    pub first_block: u64,
    pub blocks: u64,
    pub kind: OpKind,
    pub invoke: Micros,
    /// None: failed or timed out (outcome unknown for writes).
    pub complete: Option<Micros>,
}

/// One violation found by the checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    pub volume: u32,
    pub block: u64,
    pub what: String,
}

#[derive(Clone, Copy)]
struct W {
    /// 0 = zeros (initial state or a discard).
    value: u64,
    invoke: Micros,
    complete: Micros,
}

/// Checks a history; returns every anomaly.
pub fn check(ops: &[Op]) -> Vec<Anomaly> {
    // Writes per (volume, block).
    let mut writes: HashMap<(u32, u64), Vec<W>> = HashMap::new();
    let mut write_ids: HashMap<u64, (Micros, u32, u64, u64)> = HashMap::new();
    for op in ops {
        let (value, is_write) = match op.kind {
            OpKind::Write { id } => (id, true),
            OpKind::Discard { .. } => (0, true),
            _ => (0, false),
        };
        if !is_write {
            continue;
        }
        if let OpKind::Write { id } = op.kind {
            write_ids.insert(id, (op.invoke, op.volume, op.first_block, op.blocks));
        }
        for b in op.first_block..op.first_block + op.blocks {
            writes.entry((op.volume, b)).or_default().push(W {
                value,
                invoke: op.invoke,
                complete: op.complete.unwrap_or(Micros::MAX),
            });
        }
    }
    let mut out = Vec::new();
    for op in ops {
        let (OpKind::Read { seen }, Some(r_done)) = (&op.kind, op.complete) else {
            continue;
        };
        let r_start = op.invoke;
        for (i, s) in seen.iter().enumerate() {
            let block = op.first_block + i as u64;
            let ws = writes
                .get(&(op.volume, block))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            // Writes certainly finished before the read began.
            let overwritten = |w: &W| {
                ws.iter()
                    .any(|w2| w2.invoke > w.complete && w2.complete < r_start)
            };
            let ok = match s {
                Seen::Garbage => {
                    out.push(Anomaly {
                        volume: op.volume,
                        block,
                        what: format!("read at {r_start}us returned bytes no write produced"),
                    });
                    continue;
                }
                Seen::Zeros => {
                    // The initial zeros (before every operation) or a discard.
                    let initial_overwritten = ws.iter().any(|w2| w2.complete < r_start);
                    !initial_overwritten
                        || ws
                            .iter()
                            .any(|w| w.value == 0 && w.invoke < r_done && !overwritten(w))
                }
                Seen::Write(id) => match write_ids.get(id) {
                    Some(&(_, vol, first, n))
                        if vol == op.volume && block >= first && block < first + n =>
                    {
                        ws.iter()
                            .any(|w| w.value == *id && w.invoke < r_done && !overwritten(w))
                    }
                    _ => {
                        out.push(Anomaly {
                            volume: op.volume,
                            block,
                            what: format!("read at {r_start}us returned write {id}, which never wrote this block"),
                        });
                        continue;
                    }
                },
            };
            if !ok {
                let latest = ws
                    .iter()
                    .filter(|w| w.complete < r_start)
                    .max_by_key(|w| w.complete)
                    .map(|w| w.value);
                out.push(Anomaly {
                    volume: op.volume,
                    block,
                    what: format!(
                        "stale or lost: read [{r_start}, {r_done}]us saw {s:?}; last write completed before it: {latest:?}"
                    ),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: u64, block: u64, invoke: Micros, complete: Option<Micros>) -> Op {
        Op {
            client: 0,
            volume: 0,
            first_block: block,
            blocks: 1,
            kind: OpKind::Write { id },
            invoke,
            complete,
        }
    }
    fn r(block: u64, seen: Seen, invoke: Micros, complete: Micros) -> Op {
        Op {
            client: 1,
            volume: 0,
            first_block: block,
            blocks: 1,
            kind: OpKind::Read { seen: vec![seen] },
            invoke,
            complete: Some(complete),
        }
    }

    #[test]
    fn payloads_decode() {
        assert_eq!(decode(7, &block_payload(3, 7)), Seen::Write(3));
        assert_eq!(decode(8, &block_payload(3, 7)), Seen::Garbage);
        assert_eq!(decode(7, &[0u8; BLOCK]), Seen::Zeros);
        let mut bad = block_payload(3, 7);
        bad[100] ^= 1;
        assert_eq!(decode(7, &bad), Seen::Garbage);
    }

    #[test]
    fn valid_histories_pass() {
        let h = vec![
            r(0, Seen::Zeros, 0, 5),
            w(1, 0, 10, Some(20)),
            r(0, Seen::Zeros, 12, 18),    // concurrent with write 1
            r(0, Seen::Write(1), 15, 25), // concurrent, sees it
            r(0, Seen::Write(1), 30, 40),
            w(2, 0, 50, None), // failed: may or may not apply
            r(0, Seen::Write(2), 60, 70),
            r(0, Seen::Write(1), 80, 90), // unknown write 2 not visible: fine
        ];
        assert_eq!(check(&h), vec![]);
    }

    /// Negative control: the checker catches a stale read and a lost write.
    #[test]
    fn stale_read_and_lost_write_are_caught() {
        let stale = vec![
            w(1, 0, 0, Some(10)),
            w(2, 0, 20, Some(30)),
            r(0, Seen::Write(1), 40, 50),
        ];
        let a = check(&stale);
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(a[0].what.contains("stale"));
        // An acknowledged write lost: the final read sees the initial zeros.
        let lost = vec![w(1, 3, 0, Some(10)), r(3, Seen::Zeros, 100, 110)];
        assert_eq!(check(&lost).len(), 1);
        // A read of a write that had not started yet.
        let future = vec![r(0, Seen::Write(9), 0, 5), w(9, 0, 10, Some(20))];
        assert_eq!(check(&future).len(), 1);
        // Garbage.
        assert_eq!(check(&[r(0, Seen::Garbage, 0, 1)]).len(), 1);
    }
}
