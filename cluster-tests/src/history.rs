//! Operation histories and their checker.
//!
//! Every write is unique and traceable: block `b` written by write `w`
//! carries `w` and `b` in its first 16 bytes and a pseudo-random fill
//! derived from both, so any block a read returns names the write that
//! produced it (or is zeros: never written, or discarded), and bytes that
//! no write ever produced are detected.
//!
//! # What is checked
//!
//! Each block of each volume is a register, checked on its own: a write,
//! discard or read of `n` blocks is `n` register operations with the same
//! interval. A multi-block write is *not* required to be atomic across
//! blocks (the client splits requests at chunk boundaries and each chunk is
//! its own raft group), so a read may see a multi-block write in one block
//! and not yet in the next; what is checked is every block's history.
//!
//! Times are the recorded invoke (taken before the call) and completion
//! (taken after it returns) in microseconds, so a recorded interval
//! contains the real one. An operation precedes another in real time only
//! if it completed strictly before the other was invoked; equal times count
//! as concurrent. Each operation of a register must take effect at one
//! point within its interval, and a read returns the value of the latest
//! write before its point: that is per-register linearizability.
//!
//! Per-read checks: a read must not return bytes no write produced
//! (garbage), nor a write that never wrote that block, nor a write invoked
//! after the read completed. Failed reads (no completion) are ignored.
//!
//! Nonzero values are unique, which makes the check cheap (Gibbons and
//! Korach, "Testing shared memories", 1997). The *cluster* of write `a` is
//! `a` and every read that returned `a`; in a linearization it is
//! contiguous (no other write between `a` and a read of `a`). Let `f_a` be
//! the earliest completion in the cluster (`a` is in place by then) and
//! `s_a` the latest invocation (it is still in place then). Two clusters
//! `a` and `b` cannot be ordered either way exactly when `s_a > f_b` and
//! `s_b > f_a`, and for unique values that pairwise condition (plus the
//! per-read checks) is also sufficient (the unit tests compare the checker
//! with an exhaustive search on random small histories). It catches a stale read (a write
//! `b` certainly between `a` and a read of `a`), a lost write, a new→old
//! inversion (a read sees `b`, a later read sees the older `a`) and a
//! flip-flop (`a`, then `b`, then `a` again).
//!
//! Zeros are not unique: the initial contents and every discard (or write
//! zeroes) read as zeros. The rules, which never flag a linearizable
//! history:
//! - a completed discard is a write like any other, so its own interval
//!   must fit before or after every nonzero cluster (same condition), e.g. a
//!   read of `a` after a discard certainly overwrote `a` is stale;
//! - a read of zeros must be explained by one zero source `z`: the initial
//!   value, or a discard invoked no later than the read completed, with no
//!   write between `z` and the read. The pair (`z`, read) is then
//!   contiguous like a cluster, with `f` = the earlier of their
//!   completions and `s` = the later of their invocations, and must fit
//!   every nonzero cluster. The initial value (before everything) fits iff
//!   no nonzero cluster was in place (`f_a`) before the read began. A read
//!   of zeros no source fits is flagged: a lost write (an acknowledged
//!   write, then zeros) or a zero inversion (a read saw `a`, a later read
//!   zeros, and no discard can fall between);
//! - not checked: which discard several zero reads share, and the order of
//!   zero sources among themselves. A history that is wrong only through
//!   such a joint assignment passes, so for histories with zero reads the
//!   check is sound but not complete; for the unique values it is exact.
//!
//! Failed or timed-out writes and discards (no completion) may take effect
//! at any point after their invocation, however late, or never: their
//! completion counts as +infinity. One that no read observed never
//! conflicts (as if it never happened or happened last); one a read
//! returned certainly happened, by the time that read completed, and is
//! then checked like any other: a read that sees it and a later read that
//! sees an older value is an inversion.
//!
//! Cost: O(k log k) per register with `k` clusters (a sort and a prefix
//! maximum), plus O(log k) per (read of zeros, discard) pair; anomalies
//! are then listed with a linear scan. Flushes are not checked here.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Completion time of an operation that never completed.
const NEVER: Micros = Micros::MAX;

/// A nonzero write to one block and the reads that returned it.
struct Cluster {
    id: u64,
    invoke: Micros,
    complete: Option<Micros>,
    reads: usize,
    /// Earliest completion in the cluster: the write is in place by then.
    f: Micros,
    /// Latest invocation in the cluster: the write is still in place then.
    s: Micros,
}

impl fmt::Display for Cluster {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(out, "write {} [{}us, ", self.id, self.invoke)?;
        match self.complete {
            Some(c) => write!(out, "{c}us]")?,
            None => write!(out, "timed out]")?,
        }
        if self.reads == 0 {
            write!(out, " (never read)")
        } else {
            write!(
                out,
                " (read {}x: in place by {}us, still read at {}us)",
                self.reads, self.f, self.s
            )
        }
    }
}

/// Whether cluster `a` and a group of operations with earliest completion
/// `f` and latest invocation `s`, which must not interleave, cannot be
/// ordered either way: `a` before the group needs `s_a <= f`, the group
/// before `a` needs `s <= f_a`.
fn conflict(a: &Cluster, f: Micros, s: Micros) -> bool {
    a.s > f && s > a.f
}

/// The clusters of one register sorted by `f`, with a prefix maximum of
/// `s`: "is there a cluster with `f_a < x` and `s_a > y`" in O(log k).
struct Zones {
    f: Vec<Micros>,
    /// Over the first `i + 1` clusters by `f`: the largest `s` and its
    /// cluster, and the second largest `s`.
    best: Vec<(Micros, usize, Option<Micros>)>,
}

impl Zones {
    fn new(clusters: &[Cluster]) -> Zones {
        let mut order: Vec<usize> = (0..clusters.len()).collect();
        order.sort_by_key(|&i| clusters[i].f);
        let mut best: Vec<(Micros, usize, Option<Micros>)> = Vec::with_capacity(order.len());
        for &i in &order {
            let s = clusters[i].s;
            let next = match best.last() {
                None => (s, i, None),
                Some(&(b, _, second)) if s > b => (s, i, Some(b).max(second)),
                Some(&(b, bi, second)) => (b, bi, Some(s).max(second)),
            };
            best.push(next);
        }
        Zones {
            f: order.iter().map(|&i| clusters[i].f).collect(),
            best,
        }
    }

    /// Whether some cluster other than `skip` conflicts with zone (f, s).
    fn conflicts(&self, f: Micros, s: Micros, skip: Option<usize>) -> bool {
        let n = self.f.partition_point(|&fa| fa < s);
        let Some(&(b, bi, second)) = n.checked_sub(1).and_then(|i| self.best.get(i)) else {
            return false;
        };
        let max_s = if Some(bi) == skip { second } else { Some(b) };
        max_s.is_some_and(|m| m > f)
    }

    /// Earliest time some cluster is in place.
    fn first_in_place(&self) -> Option<Micros> {
        self.f.first().copied()
    }
}

/// One register: a block of a volume.
#[derive(Default)]
struct Register {
    clusters: Vec<Cluster>,
    by_id: HashMap<u64, usize>,
    /// (id, invoke, completion or NEVER).
    discards: Vec<(u64, Micros, Micros)>,
    /// (invoke, completion) of each completed read that returned zeros.
    zero_reads: Vec<(Micros, Micros)>,
}

impl Register {
    fn check(&self, volume: u32, block: u64, out: &mut Vec<Anomaly>) {
        let mut push = |what: String| {
            out.push(Anomaly {
                volume,
                block,
                what,
            })
        };
        let cs = &self.clusters;
        let zones = Zones::new(cs);
        // Nonzero clusters pairwise: one anomaly per pair.
        for (i, b) in cs.iter().enumerate() {
            if !zones.conflicts(b.f, b.s, Some(i)) {
                continue;
            }
            for a in cs[i + 1..].iter().filter(|a| conflict(a, b.f, b.s)) {
                push(format!(
                    "not linearizable (stale read or new->old inversion): {b} and {a} \
                     cannot be ordered either way"
                ));
            }
        }
        // Completed discards are writes too.
        for &(id, s, f) in &self.discards {
            if f == NEVER || !zones.conflicts(f, s, None) {
                continue;
            }
            for a in cs.iter().filter(|a| conflict(a, f, s)) {
                push(format!(
                    "not linearizable (stale read): discard {id} [{s}us, {f}us] took effect \
                     while the block had to hold {a}"
                ));
            }
        }
        // Every read of zeros needs a zero source it can follow directly.
        for &(rs, rf) in &self.zero_reads {
            let initial = zones.first_in_place().is_none_or(|fa| fa >= rs);
            if initial {
                continue;
            }
            let mut candidates = 0;
            let discard = self.discards.iter().any(|&(_, ds, df)| {
                if ds > rf {
                    return false;
                }
                candidates += 1;
                !zones.conflicts(df.min(rf), ds.max(rs), None)
            });
            if discard {
                continue;
            }
            let first = cs.iter().filter(|a| a.f < rs).min_by_key(|a| a.f);
            let first = first.map_or_else(String::new, |a| a.to_string());
            push(format!(
                "not linearizable (lost write or zeros after newer data): read [{rs}us, {rf}us] \
                 saw zeros, but {first} was in place before it began and none of the \
                 {candidates} discard(s) invoked before it completed can fall in between"
            ));
        }
    }
}

/// Checks a history; returns every anomaly.
pub fn check(ops: &[Op]) -> Vec<Anomaly> {
    let mut regs: BTreeMap<(u32, u64), Register> = BTreeMap::new();
    // Write id -> (volume, first block, blocks, invoke).
    let mut write_ids: HashMap<u64, (u32, u64, u64, Micros)> = HashMap::new();
    for op in ops {
        let blocks = op.first_block..op.first_block.saturating_add(op.blocks);
        match op.kind {
            OpKind::Write { id } => {
                write_ids.insert(id, (op.volume, op.first_block, op.blocks, op.invoke));
                for b in blocks {
                    let reg = regs.entry((op.volume, b)).or_default();
                    reg.by_id.insert(id, reg.clusters.len());
                    reg.clusters.push(Cluster {
                        id,
                        invoke: op.invoke,
                        complete: op.complete,
                        reads: 0,
                        f: op.complete.unwrap_or(NEVER),
                        s: op.invoke,
                    });
                }
            }
            OpKind::Discard { id } => {
                for b in blocks {
                    regs.entry((op.volume, b)).or_default().discards.push((
                        id,
                        op.invoke,
                        op.complete.unwrap_or(NEVER),
                    ));
                }
            }
            OpKind::Read { .. } | OpKind::Flush => {}
        }
    }
    let mut out = Vec::new();
    for op in ops {
        let (OpKind::Read { seen }, Some(r_done)) = (&op.kind, op.complete) else {
            continue;
        };
        let r_start = op.invoke;
        for (block, s) in (op.first_block..).zip(seen) {
            let mut anomaly = |what: String| {
                out.push(Anomaly {
                    volume: op.volume,
                    block,
                    what,
                })
            };
            match *s {
                Seen::Garbage => anomaly(format!(
                    "read [{r_start}us, {r_done}us] returned bytes no write produced"
                )),
                Seen::Zeros => regs
                    .entry((op.volume, block))
                    .or_default()
                    .zero_reads
                    .push((r_start, r_done)),
                Seen::Write(id) => {
                    let wrote = write_ids.get(&id).is_some_and(|&(vol, first, n, _)| {
                        vol == op.volume && block >= first && block - first < n
                    });
                    let cluster = regs
                        .get_mut(&(op.volume, block))
                        .and_then(|reg| Some(&mut reg.clusters[*reg.by_id.get(&id)?]));
                    match cluster {
                        Some(c) if wrote => {
                            if c.invoke > r_done {
                                anomaly(format!(
                                    "read [{r_start}us, {r_done}us] returned write {id}, \
                                     invoked later, at {}us",
                                    c.invoke
                                ));
                            } else {
                                c.reads += 1;
                                c.f = c.f.min(r_done);
                                c.s = c.s.max(r_start);
                            }
                        }
                        _ => anomaly(format!(
                            "read [{r_start}us, {r_done}us] returned write {id}, which never \
                             wrote this block"
                        )),
                    }
                }
            }
        }
    }
    for (&(volume, block), reg) in &regs {
        reg.check(volume, block, &mut out);
    }
    out
}

/// Anomalies the checker finds in each synthetic history of the negative
/// control; each must be exactly 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NegativeControl {
    /// Write 1, then write 2, then a read of 1.
    pub stale_read: usize,
    /// An acknowledged write, then a read of zeros.
    pub lost_write: usize,
    /// Write 1; write 2 concurrent with two reads one after the other: the
    /// first sees 2, the second 1.
    pub inversion: usize,
}

impl NegativeControl {
    /// Whether each violation was caught, once.
    pub fn caught(&self) -> bool {
        self.stale_read == 1 && self.lost_write == 1 && self.inversion == 1
    }
}

impl fmt::Display for NegativeControl {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |k: usize| if k == 1 { "anomaly" } else { "anomalies" };
        write!(
            out,
            "stale read -> {} {}, lost write -> {} {}, new->old inversion -> {} {}",
            self.stale_read,
            n(self.stale_read),
            self.lost_write,
            n(self.lost_write),
            self.inversion,
            n(self.inversion)
        )
    }
}

/// Runs the checker on three synthetic histories it must flag: a stale
/// read, a lost write and a new→old inversion.
pub fn negative_control() -> NegativeControl {
    let op = |kind, invoke, complete| Op {
        client: 0,
        volume: 0,
        first_block: 0,
        blocks: 1,
        kind,
        invoke,
        complete,
    };
    let write = |id, invoke, complete| op(OpKind::Write { id }, invoke, complete);
    let read =
        |seen, invoke, complete| op(OpKind::Read { seen: vec![seen] }, invoke, Some(complete));
    let stale = [
        write(1, 0, Some(10)),
        write(2, 20, Some(30)),
        read(Seen::Write(1), 40, 50),
    ];
    let lost = [write(1, 5, Some(10)), read(Seen::Zeros, 40, 50)];
    let inversion = [
        write(1, 0, Some(10)),
        write(2, 20, Some(100)),
        read(Seen::Write(2), 30, 40),
        read(Seen::Write(1), 50, 60),
    ];
    NegativeControl {
        stale_read: check(&stale).len(),
        lost_write: check(&lost).len(),
        inversion: check(&inversion).len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, first_block: u64, blocks: u64, invoke: Micros, c: Option<Micros>) -> Op {
        Op {
            client: 0,
            volume: 0,
            first_block,
            blocks,
            kind,
            invoke,
            complete: c,
        }
    }
    fn w(id: u64, block: u64, invoke: Micros, complete: Option<Micros>) -> Op {
        op(OpKind::Write { id }, block, 1, invoke, complete)
    }
    fn d(id: u64, block: u64, invoke: Micros, complete: Option<Micros>) -> Op {
        op(OpKind::Discard { id }, block, 1, invoke, complete)
    }
    fn r(block: u64, seen: Seen, invoke: Micros, complete: Micros) -> Op {
        let kind = OpKind::Read { seen: vec![seen] };
        op(kind, block, 1, invoke, Some(complete))
    }
    /// Asserts `h` has exactly one anomaly, and that it mentions `what`.
    fn one(h: &[Op], what: &str) {
        let a = check(h);
        assert_eq!(a.len(), 1, "{a:#?}");
        assert!(a[0].what.contains(what), "{a:#?}");
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
            r(0, Seen::Zeros, 16, 19),    // concurrent, overlaps the read that saw it
            r(0, Seen::Write(1), 20, 40), // touching times count as concurrent
            w(2, 0, 50, None),            // failed: may or may not apply
            r(0, Seen::Write(2), 60, 70),
            r(0, Seen::Write(2), 80, 90),
            w(3, 0, 100, None), // failed, never seen: as if it never happened
            r(0, Seen::Write(2), 200, 210),
        ];
        assert_eq!(check(&h), vec![]);
        // Two concurrent writes: readers may see them in either order, as
        // long as all agree.
        let h = vec![
            w(1, 0, 0, Some(100)),
            w(2, 0, 0, Some(100)),
            r(0, Seen::Write(2), 10, 20),
            r(0, Seen::Write(1), 30, 40),
            r(0, Seen::Write(1), 30, 120),
            r(0, Seen::Write(1), 130, 140),
        ];
        assert_eq!(check(&h), vec![]);
        // A failed write the next read does not see and a later one does:
        // it took effect late.
        let h = vec![
            w(1, 0, 0, Some(10)),
            w(2, 0, 20, None),
            r(0, Seen::Write(1), 30, 40),
            r(0, Seen::Write(2), 1_000, 1_010),
            r(0, Seen::Write(2), 2_000, 2_010),
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn zeros_pass_when_a_zero_source_fits() {
        let h = vec![
            w(1, 0, 0, Some(10)),
            d(2, 0, 20, Some(30)),
            r(0, Seen::Zeros, 40, 50),
            w(3, 0, 60, Some(70)),
            r(0, Seen::Write(3), 80, 90),
            d(4, 0, 100, None), // failed discard that did take effect
            r(0, Seen::Zeros, 110, 120),
            r(0, Seen::Zeros, 130, 140),
            // A discard concurrent with reads: the first sees the write,
            // the second zeros.
            w(5, 0, 200, Some(210)),
            d(6, 0, 220, Some(260)),
            r(0, Seen::Write(5), 230, 240),
            r(0, Seen::Zeros, 250, 255),
            // A write concurrent with a discard, both orders seen once.
            d(7, 0, 300, Some(400)),
            w(8, 0, 300, Some(400)),
            r(0, Seen::Write(8), 310, 320),
            r(0, Seen::Zeros, 330, 340),
            r(0, Seen::Zeros, 410, 420),
        ];
        assert_eq!(check(&h), vec![]);
        // Zeros concurrent with the first write are the initial value.
        let h = vec![
            w(1, 0, 0, Some(100)),
            r(0, Seen::Zeros, 10, 20),
            r(0, Seen::Zeros, 90, 95),
            r(0, Seen::Write(1), 99, 110),
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn multi_block_ops_are_per_block_registers() {
        let wide = |kind, invoke, complete| op(kind, 0, 2, invoke, complete);
        let read = |a, b, invoke, complete| {
            let kind = OpKind::Read { seen: vec![a, b] };
            wide(kind, invoke, Some(complete))
        };
        let h = vec![
            wide(OpKind::Write { id: 1 }, 0, Some(10)),
            wide(OpKind::Write { id: 2 }, 20, Some(100)),
            // Not atomic across blocks: block 0 already has write 2, block
            // 1 not yet.
            read(Seen::Write(2), Seen::Write(1), 30, 40),
            read(Seen::Write(2), Seen::Write(2), 50, 60),
            wide(OpKind::Discard { id: 3 }, 200, Some(300)),
            read(Seen::Zeros, Seen::Write(2), 210, 220),
            read(Seen::Zeros, Seen::Zeros, 310, 320),
        ];
        assert_eq!(check(&h), vec![]);
        // A new->old inversion in one block of a multi-block read is caught
        // in that block.
        let mut bad = h.clone();
        bad.push(read(Seen::Write(2), Seen::Write(1), 70, 80));
        let a = check(&bad);
        assert_eq!(a.len(), 1, "{a:#?}");
        assert_eq!(a[0].block, 1);
    }

    /// The negative control run by the suite.
    #[test]
    fn negative_control_catches_each_once() {
        let n = negative_control();
        assert!(n.caught(), "{n}");
        assert_eq!(
            n.to_string(),
            "stale read -> 1 anomaly, lost write -> 1 anomaly, new->old inversion -> 1 anomaly"
        );
    }

    #[test]
    fn stale_reads_are_caught() {
        let stale = [
            w(1, 0, 0, Some(10)),
            w(2, 0, 20, Some(30)),
            r(0, Seen::Write(1), 40, 50),
        ];
        one(&stale, "stale");
        // Overwritten by a discard.
        let stale = [
            w(1, 0, 0, Some(10)),
            d(2, 0, 20, Some(30)),
            r(0, Seen::Write(1), 40, 50),
        ];
        one(&stale, "discard 2");
        // Flip-flop: 1, 2, 1 again.
        let h = [
            w(1, 0, 0, Some(100)),
            w(2, 0, 0, Some(100)),
            r(0, Seen::Write(2), 10, 20),
            r(0, Seen::Write(1), 30, 40),
            r(0, Seen::Write(2), 50, 60),
        ];
        one(&h, "cannot be ordered");
    }

    #[test]
    fn lost_writes_are_caught() {
        let lost = [w(1, 3, 0, Some(10)), r(3, Seen::Zeros, 100, 110)];
        one(&lost, "lost write");
        // Lost after an older write: the final read sees write 1.
        let lost = [
            w(1, 3, 0, Some(10)),
            w(2, 3, 20, Some(30)),
            r(3, Seen::Write(1), 100, 110),
        ];
        one(&lost, "write 2");
        // A discard lost: it completed, then the old data is read.
        let lost = [
            w(1, 3, 0, Some(10)),
            d(2, 3, 20, Some(30)),
            r(3, Seen::Write(1), 100, 110),
        ];
        one(&lost, "discard 2");
    }

    #[test]
    fn new_to_old_inversions_are_caught() {
        let h = [
            w(1, 0, 0, Some(10)),
            w(2, 0, 20, Some(100)),
            r(0, Seen::Write(2), 30, 40),
            r(0, Seen::Write(1), 50, 60),
        ];
        one(&h, "inversion");
        // Without the later read the history is fine.
        assert_eq!(check(&h[..3]), vec![]);
        // The same with write 2 timed out: a read saw it, so it happened.
        let h = [
            w(1, 0, 0, Some(10)),
            w(2, 0, 20, None),
            r(0, Seen::Write(2), 30, 40),
            r(0, Seen::Write(1), 50, 60),
        ];
        one(&h, "inversion");
        // A timed-out write seen much later, then the older value again.
        let h = [
            w(1, 0, 0, Some(10)),
            w(2, 0, 20, None),
            r(0, Seen::Write(1), 30, 40),
            r(0, Seen::Write(2), 1_000, 1_010),
            r(0, Seen::Write(1), 2_000, 2_010),
        ];
        one(&h, "timed out");
    }

    #[test]
    fn zero_inversions_are_caught() {
        // Zeros after a read saw an (unacknowledged) write.
        let h = [
            w(1, 0, 0, None),
            r(0, Seen::Write(1), 5, 15),
            r(0, Seen::Zeros, 20, 30),
        ];
        one(&h, "zeros after newer data");
        // A discard concurrent with both reads: zeros first, then the
        // write the discard replaced.
        let h = [
            w(1, 0, 0, Some(10)),
            d(2, 0, 20, Some(100)),
            r(0, Seen::Zeros, 30, 40),
            r(0, Seen::Write(1), 50, 60),
        ];
        one(&h, "1 discard");
        // The same with the discard timed out.
        let h = [
            w(1, 0, 0, Some(10)),
            d(2, 0, 20, None),
            r(0, Seen::Zeros, 30, 40),
            r(0, Seen::Write(1), 50, 60),
        ];
        one(&h, "zeros");
        // Zeros, then write 3, then zeros again: the only discard was
        // certainly before write 3.
        let h = [
            d(1, 0, 0, Some(10)),
            r(0, Seen::Zeros, 20, 30),
            w(3, 0, 40, Some(50)),
            r(0, Seen::Zeros, 60, 70),
        ];
        one(&h, "lost write");
        // A discard invoked after the read completed cannot explain it.
        let h = [
            w(1, 0, 0, Some(10)),
            r(0, Seen::Zeros, 20, 30),
            d(2, 0, 40, Some(50)),
        ];
        one(&h, "0 discard");
    }

    #[test]
    fn impossible_reads_are_caught() {
        // A read of a write that had not started yet.
        one(
            &[r(0, Seen::Write(9), 0, 5), w(9, 0, 10, Some(20))],
            "invoked later",
        );
        // A write's data in a block it did not write.
        one(
            &[w(9, 0, 0, Some(20)), r(1, Seen::Write(9), 30, 40)],
            "never wrote this block",
        );
        one(&[r(0, Seen::Write(9), 30, 40)], "never wrote this block");
        one(&[r(0, Seen::Garbage, 0, 1)], "no write produced");
        // Failed reads are ignored.
        let failed = op(OpKind::Read { seen: vec![] }, 0, 1, 0, None);
        assert_eq!(check(&[w(1, 0, 0, Some(10)), failed]), vec![]);
    }

    /// xorshift64*, so the test needs no seeded RNG crate.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    /// A history as the workload records it (6 clients, 2 volumes of 256
    /// blocks, 50 000 operations), produced by a simulated linearizable
    /// store: every block of an operation takes effect at its own random
    /// point within the interval; timed-out writes and discards take effect
    /// later or never; reads return what their points see.
    fn linearizable_history(seed: u64, ops_max: usize) -> Vec<Op> {
        const BLOCKS: u64 = 256;
        let mut rng = Rng(seed | 1);
        let mut ops = Vec::new();
        // (point, tiebreak, op, block index in the op): write or read events.
        let mut events: Vec<(Micros, u64, usize, u64)> = Vec::new();
        let mut clock = [0 as Micros; 6];
        while ops.len() < ops_max {
            let c = ops.len() % clock.len();
            let volume = rng.below(2) as u32;
            let blocks = 1 + rng.below(4);
            let first_block = rng.below(BLOCKS - blocks + 1);
            let invoke = clock[c] + rng.below(20);
            let latency = if rng.below(100) == 0 {
                5_000 + rng.below(20_000)
            } else {
                rng.below(300)
            };
            let failed = rng.below(200) == 0;
            let complete = (!failed).then_some(invoke + latency);
            clock[c] = invoke + if failed { 30_000 } else { latency };
            let id = ops.len() as u64 + 1;
            let dice = rng.below(100);
            let kind = if dice < 55 {
                OpKind::Write { id }
            } else if dice < 90 {
                OpKind::Read { seen: Vec::new() }
            } else if dice < 96 {
                OpKind::Discard { id }
            } else {
                OpKind::Flush
            };
            let i = ops.len();
            let takes_effect = match kind {
                OpKind::Flush => false,
                OpKind::Read { .. } => !failed,
                _ => !failed || rng.below(2) == 0,
            };
            if takes_effect {
                for b in 0..blocks {
                    let point = match complete {
                        Some(done) => invoke + rng.below(done - invoke + 1),
                        None => invoke + rng.below(100_000),
                    };
                    events.push((point, rng.below(u64::MAX), i, b));
                }
            }
            ops.push(Op {
                client: c as u32,
                volume,
                first_block,
                blocks,
                kind,
                invoke,
                complete,
            });
        }
        events.sort_unstable();
        let mut value: HashMap<(u32, u64), Seen> = HashMap::new();
        for (_, _, i, b) in events {
            let (block, n) = (ops[i].first_block + b, ops[i].blocks as usize);
            let key = (ops[i].volume, block);
            match &mut ops[i].kind {
                OpKind::Write { id } => {
                    value.insert(key, Seen::Write(*id));
                }
                OpKind::Discard { .. } => {
                    value.insert(key, Seen::Zeros);
                }
                OpKind::Read { seen } => {
                    // Points of one read's blocks are not sorted by block:
                    // fill in place.
                    if seen.len() < n {
                        seen.resize(n, Seen::Garbage);
                    }
                    seen[b as usize] = value.get(&key).copied().unwrap_or(Seen::Zeros);
                }
                OpKind::Flush => {}
            }
        }
        ops
    }

    /// No false positives on workload-sized linearizable histories, and
    /// fast enough for them.
    #[test]
    fn simulated_linearizable_histories_pass() {
        for seed in 1..=3 {
            let h = linearizable_history(seed, 50_000);
            let reads = h
                .iter()
                .filter(|o| matches!(&o.kind, OpKind::Read { seen } if !seen.is_empty()))
                .count();
            assert!(reads > 10_000);
            let t = std::time::Instant::now();
            let a = check(&h);
            let took = t.elapsed();
            println!("seed {seed}: {} ops checked in {took:?}", h.len());
            assert_eq!(a, vec![], "seed {seed}");
        }
    }

    /// The same histories with one read's result replaced by an older
    /// value of that block, certainly overwritten before the read began,
    /// are caught.
    #[test]
    fn simulated_stale_reads_are_caught() {
        let h = linearizable_history(7, 20_000);
        // Completed writes per block: (complete, invoke, id).
        type Completed = Vec<(Micros, Micros, u64)>;
        let mut writes: HashMap<(u32, u64), Completed> = HashMap::new();
        for o in &h {
            if let (OpKind::Write { id }, Some(done)) = (&o.kind, o.complete) {
                for b in o.first_block..o.first_block + o.blocks {
                    writes
                        .entry((o.volume, b))
                        .or_default()
                        .push((done, o.invoke, *id));
                }
            }
        }
        let mut mutated = 0;
        for (i, o) in h.iter().enumerate() {
            let (OpKind::Read { seen }, Some(_)) = (&o.kind, o.complete) else {
                continue;
            };
            for (k, s) in seen.iter().enumerate() {
                let Seen::Write(b) = *s else { continue };
                let Some(ws) = writes.get(&(o.volume, o.first_block + k as u64)) else {
                    continue;
                };
                // The read saw b, b completed before the read began, and a
                // completed before b began: a is certainly overwritten.
                let Some(&(b_done, b_invoke, _)) = ws.iter().find(|w| w.2 == b) else {
                    continue;
                };
                let Some(&(_, _, a)) = ws.iter().find(|w| w.0 < b_invoke) else {
                    continue;
                };
                if b_done >= o.invoke {
                    continue;
                }
                let mut bad = h.clone();
                if let OpKind::Read { seen } = &mut bad[i].kind {
                    seen[k] = Seen::Write(a);
                }
                assert!(!check(&bad).is_empty(), "read {i} block {k}: {b} -> {a}");
                mutated += 1;
                break;
            }
            if mutated == 5 {
                break;
            }
        }
        assert_eq!(mutated, 5);
    }

    /// Exact linearizability of a one-block history by search (small
    /// histories only): some order of every completed operation and any
    /// subset of the failed writes and discards that respects real time and
    /// in which every read returns the latest write before it.
    fn linearizable(ops: &[Op]) -> bool {
        let ops: Vec<&Op> = ops
            .iter()
            .filter(|o| !matches!(o.kind, OpKind::Read { .. }) || o.complete.is_some())
            .collect();
        let done = |o: &Op| o.complete.unwrap_or(NEVER);
        let full: u32 = ops
            .iter()
            .enumerate()
            .filter(|(_, o)| o.complete.is_some())
            .fold(0, |m, (i, _)| m | 1 << i);
        fn search(
            ops: &[&Op],
            done: &dyn Fn(&Op) -> Micros,
            full: u32,
            placed: u32,
            value: Seen,
            seen: &mut std::collections::HashSet<(u32, Seen)>,
        ) -> bool {
            if placed & full == full {
                return true;
            }
            if !seen.insert((placed, value)) {
                return false;
            }
            for (i, o) in ops.iter().enumerate() {
                if placed & (1 << i) != 0 {
                    continue;
                }
                // Every unplaced op that completed before o began must come first.
                let blocked = ops
                    .iter()
                    .enumerate()
                    .any(|(j, x)| j != i && placed & (1 << j) == 0 && done(x) < o.invoke);
                if blocked {
                    continue;
                }
                let next = match &o.kind {
                    OpKind::Write { id } => Seen::Write(*id),
                    OpKind::Discard { .. } => Seen::Zeros,
                    OpKind::Read { seen } if seen[0] == value => value,
                    OpKind::Read { .. } | OpKind::Flush => continue,
                };
                if search(ops, done, full, placed | 1 << i, next, seen) {
                    return true;
                }
            }
            false
        }
        let mut memo = std::collections::HashSet::new();
        search(&ops, &done, full, 0, Seen::Zeros, &mut memo)
    }

    /// Random small one-block histories against the exact search: the
    /// checker never flags a linearizable history, and without discards
    /// (all values unique but the initial zeros) it flags every history
    /// that is not.
    #[test]
    fn agrees_with_exhaustive_search() {
        let mut rng = Rng(0x5eed);
        let (mut flagged, mut missed_with_discards) = (0, 0);
        for _ in 0..20_000 {
            let n = 3 + rng.below(5) as usize;
            let discards = rng.below(3) == 0;
            let mut h = Vec::new();
            let mut ids = Vec::new();
            for i in 0..n {
                let invoke = rng.below(30);
                let complete = (rng.below(6) != 0).then(|| invoke + rng.below(15));
                let id = i as u64 + 1;
                let dice = rng.below(10);
                if dice < 4 {
                    ids.push(id);
                    h.push(w(id, 0, invoke, complete));
                } else if dice < 5 && discards {
                    h.push(d(id, 0, invoke, complete));
                } else {
                    let pick = rng.below(ids.len() as u64 + 1) as usize;
                    let seen = ids.get(pick).map_or(Seen::Zeros, |&id| Seen::Write(id));
                    h.push(r(0, seen, invoke, invoke + rng.below(15)));
                }
            }
            // Reads may name writes that come later in the list.
            for o in &mut h {
                if let OpKind::Read { seen } = &mut o.kind {
                    if rng.below(4) == 0 && !ids.is_empty() {
                        seen[0] = Seen::Write(ids[rng.below(ids.len() as u64) as usize]);
                    }
                }
            }
            let lin = linearizable(&h);
            let a = check(&h);
            assert!(!lin || a.is_empty(), "false positive: {h:#?}\n{a:#?}");
            let has_discard = h.iter().any(|o| matches!(o.kind, OpKind::Discard { .. }));
            if !lin && a.is_empty() {
                assert!(has_discard, "missed: {h:#?}");
                missed_with_discards += 1;
            }
            flagged += usize::from(!a.is_empty());
        }
        println!("flagged {flagged} of 20000; missed {missed_with_discards} (with discards)");
        assert!(flagged > 2_000);
    }
}
