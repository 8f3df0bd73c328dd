//! The durable spool: every sample is on disk, with its sequence number, before it is sent, and
//! leaves the disk only once the hub has acknowledged it.
//!
//! # On disk
//! ```text
//! SPOOL_DIR/state.json                   {"acked_seq":N,"dropped_total":M}  (replaced atomically)
//! SPOOL_DIR/segments/<first seq>.seg     records, appended and fsync'ed one sample at a time
//! ```
//! A record is `len: u32 LE | crc32: u32 LE | seq: u64 LE | payload[len]`, the CRC covering seq
//! and payload. On open each segment is scanned: a record that is cut short or fails its CRC ends
//! the segment (after power loss that is the torn tail); it and what follows are dropped, the
//! file is truncated there, and everything before it is kept.
//!
//! # Bounds
//! The spool holds at most `max_bytes`. When an append would pass that, whole segments are
//! dropped oldest first and the samples lost that way are counted in `dropped_total`, which
//! survives restarts. Acknowledged samples are trimmed a segment at a time.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const HEADER: usize = 16;
/// Largest payload a record may carry; anything bigger in a header is corruption.
pub const MAX_RECORD: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("spool state {path} is unreadable ({reason}); move it aside to start over")]
    BadState { path: PathBuf, reason: String },
    #[error("spool {0} is in use by another shoal-agent (its lock file is held)")]
    Locked(PathBuf),
    #[error("sample of {0} bytes is larger than the spool's record limit of {MAX_RECORD} bytes")]
    TooLarge(usize),
}

/// Why [`Spool::renumber_above`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum RenumberError<E> {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("a spooled record could not be rewritten: {0}")]
    Rewrite(E),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Sizes the spool keeps to.
#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    /// Total bytes on disk before the oldest samples are dropped.
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
}

impl SpoolLimits {
    /// Segments of an eighth of the bound (1 MiB at most), so dropping one loses little.
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        let segment_bytes = (max_bytes / 8).clamp(4096, 1024 * 1024);
        Self {
            max_bytes,
            segment_bytes,
        }
    }
}

/// What opening the spool found and repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub segments: usize,
    pub records: u64,
    /// Bytes cut off torn or corrupt tails.
    pub torn_bytes: u64,
}

/// Counters and positions, for status output and metrics.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SpoolStatus {
    pub acked_seq: u64,
    pub last_written_seq: u64,
    pub pending: u64,
    pub bytes: u64,
    pub segments: usize,
    pub dropped_total: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    acked_seq: u64,
    dropped_total: u64,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    first_seq: u64,
    /// 0 when the segment holds no record yet.
    last_seq: u64,
    records: u64,
    bytes: u64,
}

/// Where the last read stopped, so draining a backlog does not rescan segments.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    after_seq: u64,
    segment_first_seq: u64,
    offset: u64,
}

pub struct Spool {
    dir: PathBuf,
    /// Held for the spool's lifetime so two agents never share one spool.
    _lock: File,
    limits: SpoolLimits,
    segments: VecDeque<Segment>,
    active: Option<File>,
    state: State,
    last_seq: u64,
    total_bytes: u64,
    cursor: Option<Cursor>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, repairing torn tails.
    pub fn open(dir: &Path, limits: SpoolLimits) -> Result<(Self, OpenReport), SpoolError> {
        let seg_dir = dir.join("segments");
        fs::create_dir_all(&seg_dir).map_err(io_err(&seg_dir))?;
        let lock_path = dir.join("lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(SpoolError::Locked(dir.to_path_buf()));
        }
        let state = read_state(&dir.join("state.json"))?;

        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&seg_dir).map_err(io_err(&seg_dir))? {
            let path = entry.map_err(io_err(&seg_dir))?.path();
            let first = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(first) = first {
                names.push((first, path));
            }
        }
        names.sort();

        let mut report = OpenReport::default();
        let mut segments = VecDeque::new();
        let mut last_seq = state.acked_seq;
        for (first_seq, path) in names {
            let scan = scan_segment(&path, last_seq)?;
            if scan.valid_bytes < scan.file_bytes {
                report.torn_bytes += scan.file_bytes - scan.valid_bytes;
                tracing::warn!(
                    segment = %path.display(),
                    kept_records = scan.records,
                    dropped_bytes = scan.file_bytes - scan.valid_bytes,
                    "spool segment has a torn or corrupt tail; dropped it and kept the rest"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(scan.valid_bytes).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            if scan.records == 0 {
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            last_seq = last_seq.max(scan.last_seq);
            report.records += scan.records;
            segments.push_back(Segment {
                path,
                first_seq: first_seq.max(scan.first_seq),
                last_seq: scan.last_seq,
                records: scan.records,
                bytes: scan.valid_bytes,
            });
        }
        report.segments = segments.len();
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            _lock: lock,
            limits,
            segments,
            active: None,
            state,
            last_seq,
            total_bytes,
            cursor: None,
        };
        spool.trim()?;
        Ok((spool, report))
    }

    /// Reads the spool's positions without changing anything, even while an agent runs on it.
    pub fn inspect(dir: &Path) -> Result<SpoolStatus, SpoolError> {
        let state = read_state(&dir.join("state.json"))?;
        let seg_dir = dir.join("segments");
        let mut paths: Vec<PathBuf> = match fs::read_dir(&seg_dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(SpoolError::Io {
                    path: seg_dir,
                    source: e,
                });
            }
        };
        paths.sort();
        let mut status = SpoolStatus {
            acked_seq: state.acked_seq,
            last_written_seq: state.acked_seq,
            pending: 0,
            bytes: 0,
            segments: 0,
            dropped_total: state.dropped_total,
        };
        let mut prev = state.acked_seq;
        for path in paths {
            let scan = scan_segment(&path, prev)?;
            if scan.records == 0 {
                continue;
            }
            status.segments += 1;
            status.bytes += scan.valid_bytes;
            status.pending += if scan.first_seq > state.acked_seq {
                scan.records
            } else {
                scan.last_seq
                    .saturating_sub(state.acked_seq)
                    .min(scan.records)
            };
            status.last_written_seq = status.last_written_seq.max(scan.last_seq);
            prev = scan.last_seq;
        }
        Ok(status)
    }

    /// The seq the next appended sample must carry.
    pub fn next_seq(&self) -> u64 {
        self.last_seq + 1
    }

    pub fn acked_seq(&self) -> u64 {
        self.state.acked_seq
    }

    pub fn last_written_seq(&self) -> u64 {
        self.last_seq
    }

    /// Writes one record and fsyncs it. `seq` must be [`Self::next_seq`].
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> Result<(), SpoolError> {
        assert_eq!(seq, self.next_seq(), "spool seqs are assigned by the spool");
        if payload.len() > MAX_RECORD {
            return Err(SpoolError::TooLarge(payload.len()));
        }
        let record_len = (HEADER + payload.len()) as u64;
        self.make_room(record_len)?;

        let need_new = match self.segments.back() {
            None => true,
            Some(s) => s.bytes + record_len > self.limits.segment_bytes && s.records > 0,
        };
        if need_new || self.active.is_none() {
            self.open_active(need_new, seq)?;
        }
        let seg = self.segments.back_mut().expect("active segment exists");
        let mut buf = Vec::with_capacity(record_len as usize);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&record_crc(seq, payload).to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(payload);
        let file = self.active.as_mut().expect("active segment is open");
        file.write_all(&buf).map_err(io_err(&seg.path))?;
        file.sync_data().map_err(io_err(&seg.path))?;
        seg.bytes += record_len;
        seg.records += 1;
        seg.last_seq = seq;
        self.total_bytes += record_len;
        self.last_seq = seq;
        Ok(())
    }

    /// Up to `max_records` records (and about `max_bytes`) with seq greater than `after_seq`, in
    /// order. Records dropped by the size bound are skipped.
    pub fn read_after(
        &mut self,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut after = after_seq;
        let start = self.segments.iter().position(|s| s.last_seq > after);
        let Some(start) = start else { return Ok(out) };
        for idx in start..self.segments.len() {
            let seg = &self.segments[idx];
            let offset = match self.cursor {
                Some(c) if c.after_seq == after && c.segment_first_seq == seg.first_seq => c.offset,
                _ => 0,
            };
            let mut file = File::open(&seg.path).map_err(io_err(&seg.path))?;
            file.seek(SeekFrom::Start(offset))
                .map_err(io_err(&seg.path))?;
            let mut reader = BufReader::new(file.take(seg.bytes - offset));
            let mut pos = offset;
            while let Some((seq, payload)) = read_record(&mut reader).map_err(io_err(&seg.path))? {
                pos += (HEADER + payload.len()) as u64;
                if seq <= after {
                    continue;
                }
                bytes += payload.len();
                after = seq;
                out.push((seq, payload));
                if out.len() >= max_records || bytes >= max_bytes {
                    self.cursor = Some(Cursor {
                        after_seq: after,
                        segment_first_seq: seg.first_seq,
                        offset: pos,
                    });
                    return Ok(out);
                }
            }
            self.cursor = Some(Cursor {
                after_seq: after,
                segment_first_seq: seg.first_seq,
                offset: pos,
            });
        }
        Ok(out)
    }

    /// The hub has dealt with everything up to `seq`: persist that and trim whole segments.
    /// Also used to jump past seqs a hub already holds when this spool's state was lost.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        if seq <= self.state.acked_seq {
            return Ok(());
        }
        self.state.acked_seq = seq;
        self.last_seq = self.last_seq.max(seq);
        self.write_state()?;
        self.trim()
    }

    /// Keeps what waits here when a hub holds seqs up to `floor` that this spool never had
    /// acknowledged (its state was lost, or another client sent under this device's id): every
    /// unacknowledged record is written again under a new seq above `floor` (`reseq` rewrites
    /// its payload for the new seq), then everything up to `floor` is acknowledged. Returns how
    /// many records moved. Crash-safe: until the acknowledgement, the old records stay too, and
    /// a hub answers a resent seq it already holds as a duplicate.
    pub fn renumber_above<E>(
        &mut self,
        floor: u64,
        mut reseq: impl FnMut(&[u8], u64) -> Result<Vec<u8>, E>,
    ) -> Result<u64, RenumberError<E>> {
        let old_last = self.last_seq;
        if floor <= old_last {
            return Ok(0);
        }
        self.last_seq = floor;
        let mut after = self.state.acked_seq;
        let mut moved = 0;
        'read: loop {
            let batch = self.read_after(after, 512, 1 << 20)?;
            if batch.is_empty() {
                break;
            }
            for (seq, payload) in batch {
                if seq > old_last {
                    break 'read;
                }
                let new_seq = self.next_seq();
                let rewritten = reseq(&payload, new_seq).map_err(RenumberError::Rewrite)?;
                self.append(new_seq, &rewritten)?;
                after = seq;
                moved += 1;
            }
        }
        self.ack(floor)?;
        Ok(moved)
    }

    pub fn status(&self) -> SpoolStatus {
        let pending = self
            .segments
            .iter()
            .map(|s| {
                if s.first_seq > self.state.acked_seq {
                    s.records
                } else {
                    s.last_seq
                        .saturating_sub(self.state.acked_seq)
                        .min(s.records)
                }
            })
            .sum();
        SpoolStatus {
            acked_seq: self.state.acked_seq,
            last_written_seq: self.last_seq,
            pending,
            bytes: self.total_bytes,
            segments: self.segments.len(),
            dropped_total: self.state.dropped_total,
        }
    }

    /// Removes segments that hold only acknowledged records.
    fn trim(&mut self) -> Result<(), SpoolError> {
        while let Some(front) = self.segments.front() {
            if front.last_seq > self.state.acked_seq {
                break;
            }
            let is_active = self.segments.len() == 1;
            if is_active {
                self.active = None;
            }
            let seg = self.segments.pop_front().expect("front exists");
            fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            self.total_bytes -= seg.bytes;
        }
        Ok(())
    }

    /// Drops the oldest segments until `incoming` more bytes fit within the bound.
    fn make_room(&mut self, incoming: u64) -> Result<(), SpoolError> {
        while self.total_bytes + incoming > self.limits.max_bytes && !self.segments.is_empty() {
            if self.segments.len() == 1 {
                self.active = None;
            }
            let seg = self.segments.pop_front().expect("non-empty");
            let unacked = if seg.first_seq > self.state.acked_seq {
                seg.records
            } else {
                seg.last_seq
                    .saturating_sub(self.state.acked_seq)
                    .min(seg.records)
            };
            self.state.dropped_total += unacked;
            self.state.acked_seq = self.state.acked_seq.max(seg.last_seq);
            self.write_state()?;
            fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            self.total_bytes -= seg.bytes;
            tracing::warn!(
                dropped = unacked,
                dropped_total = self.state.dropped_total,
                first_seq = seg.first_seq,
                last_seq = seg.last_seq,
                "spool full: dropped its oldest samples that the hub never acknowledged"
            );
        }
        Ok(())
    }

    fn open_active(&mut self, new_segment: bool, seq: u64) -> Result<(), SpoolError> {
        if new_segment {
            let path = self.dir.join("segments").join(format!("{seq:020}.seg"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            sync_dir(&self.dir.join("segments"))?;
            self.segments.push_back(Segment {
                path,
                first_seq: seq,
                last_seq: 0,
                records: 0,
                bytes: 0,
            });
            self.active = Some(file);
        } else {
            let path = self.segments.back().expect("segment exists").path.clone();
            let file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            self.active = Some(file);
        }
        Ok(())
    }

    fn write_state(&self) -> Result<(), SpoolError> {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let body = serde_json::to_vec(&self.state).expect("state serialises");
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&body).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)
    }
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn read_state(path: &Path) -> Result<State, SpoolError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SpoolError::BadState {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(SpoolError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn record_crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Reads one record; `None` at a clean end, `InvalidData`/`UnexpectedEof` on a bad one.
fn read_record(r: &mut impl Read) -> io::Result<Option<(u64, Vec<u8>)>> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut header[got..])?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record length out of range",
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    if record_crc(seq, &payload) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record checksum mismatch",
        ));
    }
    Ok(Some((seq, payload)))
}

struct Scan {
    first_seq: u64,
    last_seq: u64,
    records: u64,
    valid_bytes: u64,
    file_bytes: u64,
}

/// Reads a segment up to its first bad record. Seqs must rise above `prev_seq`.
fn scan_segment(path: &Path, prev_seq: u64) -> Result<Scan, SpoolError> {
    let file = File::open(path).map_err(io_err(path))?;
    let file_bytes = file.metadata().map_err(io_err(path))?.len();
    let mut reader = BufReader::new(file);
    let mut scan = Scan {
        first_seq: 0,
        last_seq: 0,
        records: 0,
        valid_bytes: 0,
        file_bytes,
    };
    let mut prev = prev_seq;
    loop {
        match read_record(&mut reader) {
            Ok(Some((seq, payload))) => {
                // Records below the acked mark are kept for position but never resent.
                if seq <= prev && scan.records > 0 {
                    break;
                }
                if scan.records == 0 {
                    scan.first_seq = seq;
                }
                prev = seq;
                scan.last_seq = seq;
                scan.records += 1;
                scan.valid_bytes += (HEADER + payload.len()) as u64;
            }
            Ok(None) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
                ) =>
            {
                break;
            }
            Err(e) => {
                return Err(SpoolError::Io {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
        }
    }
    Ok(scan)
}

#[cfg(test)]
mod tests;
