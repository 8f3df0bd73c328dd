use super::*;

fn limits() -> SpoolLimits {
    SpoolLimits {
        max_bytes: 1 << 20,
        segment_bytes: 256,
    }
}

fn fill(spool: &mut Spool, n: u64) {
    for _ in 0..n {
        let seq = spool.next_seq();
        spool
            .append(seq, format!("sample-{seq}").as_bytes())
            .unwrap();
    }
}

fn seqs(records: &[(u64, Vec<u8>)]) -> Vec<u64> {
    records.iter().map(|(s, _)| *s).collect()
}

#[test]
fn appends_reads_in_order_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, report) = Spool::open(dir.path(), limits()).unwrap();
    assert_eq!(report, OpenReport::default());
    fill(&mut spool, 50);
    assert!(spool.status().segments > 1, "small segments roll over");
    let all = spool.read_after(0, 1000, usize::MAX).unwrap();
    assert_eq!(seqs(&all), (1..=50).collect::<Vec<_>>());
    assert_eq!(all[9].1, b"sample-10");
    drop(spool);

    let (mut spool, report) = Spool::open(dir.path(), limits()).unwrap();
    assert_eq!(report.records, 50);
    assert_eq!(report.torn_bytes, 0);
    assert_eq!(spool.next_seq(), 51);
    assert_eq!(
        seqs(&spool.read_after(20, 5, usize::MAX).unwrap()),
        vec![21, 22, 23, 24, 25]
    );
}

#[test]
fn reads_in_batches_with_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(dir.path(), limits()).unwrap();
    fill(&mut spool, 40);
    let mut after = 0;
    let mut got = Vec::new();
    loop {
        let batch = spool.read_after(after, 7, usize::MAX).unwrap();
        if batch.is_empty() {
            break;
        }
        after = batch.last().unwrap().0;
        got.extend(seqs(&batch));
        if spool.next_seq() <= 60 {
            fill(&mut spool, 1); // appends interleave with reads
        }
    }
    assert_eq!(got, (1..=60).collect::<Vec<_>>());
}

#[test]
fn ack_trims_whole_segments_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(dir.path(), limits()).unwrap();
    fill(&mut spool, 60);
    let before = spool.status();
    spool.ack(30).unwrap();
    let after = spool.status();
    assert!(after.segments < before.segments);
    assert_eq!(after.pending, 30);
    assert_eq!(
        seqs(&spool.read_after(30, 2, usize::MAX).unwrap()),
        vec![31, 32]
    );
    drop(spool);
    let (mut spool, _) = Spool::open(dir.path(), limits()).unwrap();
    assert_eq!(spool.acked_seq(), 30);
    assert_eq!(spool.status().pending, 30);
    spool.ack(60).unwrap();
    assert_eq!(spool.status().segments, 0);
    assert_eq!(spool.status().bytes, 0);
    drop(spool);
    // Numbering continues after everything was trimmed.
    let (spool, _) = Spool::open(dir.path(), limits()).unwrap();
    assert_eq!(spool.next_seq(), 61);
}

/// Writes `n` records into a single segment, closes the spool, returns the segment's path.
fn one_closed_segment(dir: &Path, n: u64) -> PathBuf {
    let big = SpoolLimits {
        max_bytes: 1 << 20,
        segment_bytes: 1 << 20,
    };
    let (mut spool, _) = Spool::open(dir, big).unwrap();
    fill(&mut spool, n);
    drop(spool);
    fs::read_dir(dir.join("segments"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

#[test]
fn torn_tail_is_dropped_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let seg = one_closed_segment(dir.path(), 10);
    let len = fs::metadata(&seg).unwrap().len();
    // Power loss mid-write: half a record at the end.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 5).unwrap();
    drop(f);
    let (mut spool, report) = Spool::open(dir.path(), limits()).unwrap();
    assert_eq!(report.records, 9);
    assert!(report.torn_bytes > 0);
    assert_eq!(spool.next_seq(), 10, "the torn record's seq is reused");
    fill(&mut spool, 1);
    assert_eq!(
        seqs(&spool.read_after(0, 100, usize::MAX).unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
}

#[test]
fn flipped_bit_fails_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let seg = one_closed_segment(dir.path(), 5);
    let mut bytes = fs::read(&seg).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&seg, bytes).unwrap();
    let (mut spool, report) = Spool::open(dir.path(), limits()).unwrap();
    assert_eq!(report.records, 4);
    assert_eq!(
        seqs(&spool.read_after(0, 100, usize::MAX).unwrap()),
        vec![1, 2, 3, 4]
    );
}

#[test]
fn bound_drops_oldest_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let lim = SpoolLimits {
        max_bytes: 1000,
        segment_bytes: 200,
    };
    let (mut spool, _) = Spool::open(dir.path(), lim).unwrap();
    fill(&mut spool, 200);
    let st = spool.status();
    assert!(st.bytes <= 1000, "{st:?}");
    assert!(st.dropped_total > 0);
    assert_eq!(
        st.dropped_total + st.pending,
        200,
        "every sample is either pending or counted as dropped"
    );
    let left = spool.read_after(0, 1000, usize::MAX).unwrap();
    assert_eq!(left.last().unwrap().0, 200, "the newest are kept");
    let dropped = st.dropped_total;
    drop(spool);
    let (spool, _) = Spool::open(dir.path(), lim).unwrap();
    assert_eq!(
        spool.status().dropped_total,
        dropped,
        "the drop count survives restarts"
    );
}

#[test]
fn ack_past_written_rebases_numbering() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(dir.path(), limits()).unwrap();
    fill(&mut spool, 3);
    spool.ack(500).unwrap();
    assert_eq!(spool.next_seq(), 501);
    assert_eq!(spool.status().pending, 0);
}

#[test]
fn rejects_oversized_records() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(dir.path(), limits()).unwrap();
    let big = vec![0u8; MAX_RECORD + 1];
    assert!(matches!(
        spool.append(1, &big),
        Err(SpoolError::TooLarge(_))
    ));
    assert_eq!(spool.next_seq(), 1);
}

#[test]
fn one_spool_one_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (_spool, _) = Spool::open(dir.path(), limits()).unwrap();
    assert!(matches!(
        Spool::open(dir.path(), limits()),
        Err(SpoolError::Locked(_))
    ));
}

#[test]
fn inspect_reads_without_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(dir.path(), limits()).unwrap();
    fill(&mut spool, 20);
    spool.ack(5).unwrap();
    let seen = Spool::inspect(dir.path()).unwrap();
    assert_eq!(seen, spool.status());
}
