//! Incremental exports: the blocks that changed between two snapshots of
//! a volume (or every block holding data in one), in a file that
//! `import_diff` applies to a copy of the older snapshot.
//!
//! Format (integers little-endian):
//! - header: the 16 bytes `RAFTBLK-DIFF-v1\n`, the volume size at the
//!   newer snapshot (u64), then the older and the newer snapshot's names
//!   (each a u16 length and UTF-8 bytes; the older is empty for a full
//!   export);
//! - records: `D` offset (u64) length (u64) and that many bytes of data,
//!   or `Z` offset length for a range that reads as zeros (discarded);
//!   offsets and lengths are multiples of 512, records in offset order;
//! - end: `E` and the CRC32 (u32) of every byte before it.
//!
//! An import checks the whole file's CRC before it writes anything.

use std::io::{Read, Write};

use futures::stream::{self, StreamExt};
use raftblk_proto::block_io_client::BlockIoClient;
use raftblk_proto::{DiffRequest, BLOCK_BYTES};

use crate::error::ClientError;
use crate::router::Client;
use crate::volume::Volume;

pub const MAGIC: &[u8; 16] = b"RAFTBLK-DIFF-v1\n";
/// Largest record an import accepts (exports write at most a piece).
pub const RECORD_BYTES_MAX: u64 = 4 << 20;
/// Pieces read at once during an export.
const PIECES_IN_FLIGHT: usize = 8;

/// A diff file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub size_bytes: u64,
    pub from: String,
    pub to: String,
}

/// Writes a diff, keeping its CRC.
pub struct DiffWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> DiffWriter<W> {
    pub fn new(out: W, h: &Header) -> std::io::Result<Self> {
        let mut w = DiffWriter {
            out,
            crc: crc32fast::Hasher::new(),
        };
        w.put(MAGIC)?;
        w.put(&h.size_bytes.to_le_bytes())?;
        for name in [&h.from, &h.to] {
            let len = u16::try_from(name.len()).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "name too long")
            })?;
            w.put(&len.to_le_bytes())?;
            w.put(name.as_bytes())?;
        }
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.crc.update(b);
        self.out.write_all(b)
    }

    pub fn data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.put(b"D")?;
        self.put(&offset.to_le_bytes())?;
        self.put(&(data.len() as u64).to_le_bytes())?;
        self.put(data)
    }

    pub fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.put(b"Z")?;
        self.put(&offset.to_le_bytes())?;
        self.put(&len.to_le_bytes())
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.put(b"E")?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One record of a diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Reads a diff: the header, then records, checking bounds as it goes;
/// `finish` checks the CRC.
pub struct DiffReader<R: Read> {
    input: R,
    crc: crc32fast::Hasher,
    pub header: Header,
    ended: bool,
}

impl<R: Read> DiffReader<R> {
    pub fn new(input: R) -> std::io::Result<Self> {
        let mut r = DiffReader {
            input,
            crc: crc32fast::Hasher::new(),
            header: Header {
                size_bytes: 0,
                from: String::new(),
                to: String::new(),
            },
            ended: false,
        };
        let magic = r.take(16)?;
        if magic != MAGIC {
            return Err(bad("not a raftblk diff (bad magic)"));
        }
        r.header.size_bytes = r.u64()?;
        if r.header.size_bytes % 512 != 0 {
            return Err(bad("volume size is not a multiple of 512"));
        }
        let mut names = Vec::new();
        for _ in 0..2 {
            let mut l = [0u8; 2];
            l.copy_from_slice(&r.take(2)?);
            let n = r.take(u16::from_le_bytes(l) as usize)?;
            names.push(String::from_utf8(n).map_err(|_| bad("snapshot name is not UTF-8"))?);
        }
        r.header.to = names.pop().unwrap_or_default();
        r.header.from = names.pop().unwrap_or_default();
        Ok(r)
    }

    fn take(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.input
            .read_exact(&mut b)
            .map_err(|e| bad(format!("truncated diff: {e}")))?;
        self.crc.update(&b);
        Ok(b)
    }

    fn u64(&mut self) -> std::io::Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    /// The next record; `None` at the end mark.
    pub fn next_record(&mut self) -> std::io::Result<Option<Record>> {
        if self.ended {
            return Ok(None);
        }
        let tag = self.take(1)?;
        let (offset, len) = match tag[0] {
            b'E' => {
                self.ended = true;
                return Ok(None);
            }
            b'D' | b'Z' => (self.u64()?, self.u64()?),
            t => return Err(bad(format!("unknown record type {t:#04x}"))),
        };
        let end = offset
            .checked_add(len)
            .ok_or_else(|| bad("record overflows"))?;
        if offset % 512 != 0 || len % 512 != 0 || len == 0 || end > self.header.size_bytes {
            return Err(bad(format!(
                "record at {offset} of {len} bytes is unaligned or past the volume ({} bytes)",
                self.header.size_bytes
            )));
        }
        if tag[0] == b'Z' {
            return Ok(Some(Record::Zero(offset, len)));
        }
        if len > RECORD_BYTES_MAX {
            return Err(bad(format!("a data record of {len} bytes is too large")));
        }
        Ok(Some(Record::Data(offset, self.take(len as usize)?)))
    }

    /// Checks the CRC after the end mark (and that nothing follows).
    pub fn finish(mut self) -> std::io::Result<()> {
        if !self.ended {
            return Err(bad("diff has no end mark"));
        }
        let want = self.crc.clone().finalize();
        let mut c = [0u8; 4];
        self.input
            .read_exact(&mut c)
            .map_err(|e| bad(format!("truncated diff: {e}")))?;
        if u32::from_le_bytes(c) != want {
            return Err(bad("diff checksum mismatch: the file is damaged"));
        }
        let mut rest = [0u8; 1];
        if self.input.read(&mut rest)? != 0 {
            return Err(bad("bytes after the diff's end"));
        }
        Ok(())
    }
}

impl Client {
    /// Writes the blocks of `volume@to` that changed since `volume@from`
    /// (every block holding data when `from` is None) to `out`; calls
    /// `progress` with the bytes of volume scanned. Returns the bytes of
    /// data and of zeros written.
    pub async fn export_diff<W: Write>(
        &self,
        volume: &str,
        to: &str,
        from: Option<&str>,
        out: W,
        progress: impl Fn(u64),
    ) -> Result<(u64, u64), ClientError> {
        let v = self.volume_info(volume).await?;
        let to_snap = crate::snapshot::snapshot_named(&v, to)?.clone();
        let from_id = match from {
            Some(f) => {
                let s = crate::snapshot::snapshot_named(&v, f)?;
                if s.id >= to_snap.id {
                    return Err(ClientError::InvalidArgument(format!(
                        "--from-snap {f} is not older than {to}"
                    )));
                }
                s.id
            }
            None => 0,
        };
        let handle = self.open_snapshot(volume, to).await?;
        // A clone's full export reads through to its parent: every block.
        let all = from_id == 0 && handle.parent.is_some();
        let size = to_snap.size_bytes;
        let mut w = DiffWriter::new(
            out,
            &Header {
                size_bytes: size,
                from: from.unwrap_or_default().to_owned(),
                to: to.to_owned(),
            },
        )?;
        let pieces = handle.pieces(0, size);
        let handle = &handle;
        let mut results = stream::iter(pieces)
            .map(|p| async move {
                let changed = if all {
                    vec![0xffu8; (p.len.div_ceil(BLOCK_BYTES) as usize).div_ceil(8) + 1]
                } else {
                    self.diff_piece(handle, &p, from_id, to_snap.id).await?
                };
                let any = changed.iter().any(|&b| b != 0);
                let data = if any {
                    Some(handle.read(p.offset, p.len).await?)
                } else {
                    None
                };
                Ok::<_, ClientError>((p, changed, data))
            })
            .buffered(PIECES_IN_FLIGHT);
        let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
        while let Some(r) = results.next().await {
            let (p, changed, data) = r?;
            progress(p.len);
            let Some(data) = data else { continue };
            // Runs of changed blocks, split into data and zero runs.
            let first = p.offset / BLOCK_BYTES;
            let mut run: Option<(u64, u64, bool)> = None;
            let blocks = (p.offset + p.len - 1) / BLOCK_BYTES - first + 1;
            let mut flush = |run: (u64, u64, bool), w: &mut DiffWriter<W>| -> std::io::Result<()> {
                let (lo, hi, zero) = run;
                if zero {
                    zero_bytes += hi - lo;
                    w.zero(lo, hi - lo)
                } else {
                    data_bytes += hi - lo;
                    let at = (lo - p.offset) as usize;
                    w.data(lo, &data[at..at + (hi - lo) as usize])
                }
            };
            for i in 0..blocks {
                let lo = ((first + i) * BLOCK_BYTES).max(p.offset);
                let hi = ((first + i + 1) * BLOCK_BYTES).min(p.offset + p.len);
                let is_changed = changed
                    .get((i / 8) as usize)
                    .is_some_and(|b| b & (1 << (i % 8)) != 0);
                if !is_changed {
                    if let Some(r) = run.take() {
                        flush(r, &mut w)?;
                    }
                    continue;
                }
                let at = (lo - p.offset) as usize;
                let zero = data[at..at + (hi - lo) as usize].iter().all(|&b| b == 0);
                match &mut run {
                    Some((_, rhi, rz)) if *rhi == lo && *rz == zero => *rhi = hi,
                    _ => {
                        if let Some(r) = run.take() {
                            flush(r, &mut w)?;
                        }
                        run = Some((lo, hi, zero));
                    }
                }
            }
            if let Some(r) = run.take() {
                flush(r, &mut w)?;
            }
        }
        w.finish()?;
        Ok((data_bytes, zero_bytes))
    }

    async fn diff_piece(
        &self,
        handle: &Volume,
        p: &crate::volume::Piece,
        from: u64,
        to: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let range = handle.range(p);
        self.call_group(p.group, "diff", |ch| async move {
            let r = BlockIoClient::new(ch)
                .diff(DiffRequest {
                    range: Some(range),
                    from_snapshot: from,
                    to_snapshot: to,
                })
                .await?
                .into_inner();
            Ok((r.error, r.changed.to_vec()))
        })
        .await
        .map_err(|e| handle.map_err(e))
    }
}

/// Applies a diff file to `vol` (grown first if the diff's volume is
/// larger), after checking the file's CRC. Returns its header.
pub async fn import_diff(
    vol: &Volume,
    path: &std::path::Path,
    progress: impl Fn(u64),
) -> Result<Header, ClientError> {
    // Pass 1: structure and checksum, before any write.
    let open = || -> std::io::Result<DiffReader<std::io::BufReader<std::fs::File>>> {
        DiffReader::new(std::io::BufReader::new(std::fs::File::open(path)?))
    };
    let mut r = open()?;
    while r.next_record()?.is_some() {}
    let header = r.header.clone();
    r.finish()?;
    if header.size_bytes > vol.size_bytes() {
        vol.client()
            .grow_volume(&vol.info().name, header.size_bytes)
            .await?;
        vol.refresh_size().await?;
    }
    // Pass 2: apply.
    let mut r = open()?;
    while let Some(rec) = r.next_record()? {
        match rec {
            Record::Data(off, data) => {
                let n = data.len() as u64;
                vol.write(off, &data).await?;
                progress(n);
            }
            Record::Zero(off, len) => {
                vol.write_zeroes(off, len).await?;
                progress(len);
            }
        }
    }
    vol.flush().await?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let h = Header {
            size_bytes: 1 << 20,
            from: "a".into(),
            to: "b".into(),
        };
        let mut w = DiffWriter::new(Vec::new(), &h).unwrap_or_else(|e| panic!("{e}"));
        w.data(4096, &[7u8; 512]).unwrap_or_else(|e| panic!("{e}"));
        w.zero(8192, 4096).unwrap_or_else(|e| panic!("{e}"));
        let bytes = w.finish().unwrap_or_else(|e| panic!("{e}"));
        let mut r = DiffReader::new(&bytes[..]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.header, h);
        let mut recs = Vec::new();
        while let Some(rec) = r.next_record().unwrap_or_else(|e| panic!("{e}")) {
            recs.push(rec);
        }
        assert_eq!(
            recs,
            vec![Record::Data(4096, vec![7u8; 512]), Record::Zero(8192, 4096)]
        );
        assert!(r.finish().is_ok());
        // A flipped data byte fails the checksum.
        let mut bad_bytes = bytes.clone();
        bad_bytes[60] ^= 1;
        let mut r = DiffReader::new(&bad_bytes[..]).unwrap_or_else(|e| panic!("{e}"));
        while r.next_record().ok().flatten().is_some() {}
        assert!(r.finish().is_err());
        // A truncated file is refused.
        let mut r = DiffReader::new(&bytes[..bytes.len() - 3]).unwrap_or_else(|e| panic!("{e}"));
        while r.next_record().ok().flatten().is_some() {}
        assert!(r.finish().is_err());
    }
}
