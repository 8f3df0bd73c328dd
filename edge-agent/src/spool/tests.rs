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

/// Properties over damage no table can enumerate: any bytes flipped, cut or added in any
/// segment of a spool an agent wrote, and segment files of arbitrary bytes.
mod props {
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::*;

    /// How many records the template spool holds.
    const WRITTEN: u64 = 40;

    /// One closed segment as the spool wrote it: its file name and bytes, and where each of its
    /// records (seq, start, end) lies in them.
    #[derive(Debug, Clone)]
    struct SegmentFile {
        name: String,
        bytes: Vec<u8>,
        records: Vec<(u64, usize, usize)>,
    }

    fn payload_of(seq: u64) -> Vec<u8> {
        // Lengths 0 to 30, bytes of every value (so a damaged header can look like anything).
        let len = (seq * 7 % 31) as usize;
        (0..len)
            .map(|i| (seq as usize * 31 + i * 17) as u8)
            .collect()
    }

    /// The segments of a spool after `WRITTEN` appends, written once through [`Spool::append`]
    /// (every append is fsync'ed, so each case copies these instead of writing its own).
    fn template() -> &'static [SegmentFile] {
        static TEMPLATE: OnceLock<Vec<SegmentFile>> = OnceLock::new();
        TEMPLATE.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let small = SpoolLimits {
                max_bytes: 1 << 20,
                segment_bytes: 160,
            };
            let (mut spool, _) = Spool::open(dir.path(), small).unwrap();
            for seq in 1..=WRITTEN {
                spool.append(seq, &payload_of(seq)).unwrap();
            }
            drop(spool);
            let mut files: Vec<SegmentFile> = fs::read_dir(dir.path().join("segments"))
                .unwrap()
                .map(|e| {
                    let path = e.unwrap().path();
                    let bytes = fs::read(&path).unwrap();
                    // The framing as the module documents it: len, crc, seq, payload.
                    let mut records = Vec::new();
                    let mut at = 0;
                    while at < bytes.len() {
                        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
                        let seq = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
                        let end = at + HEADER + len as usize;
                        records.push((seq, at, end));
                        at = end;
                    }
                    SegmentFile {
                        name: path.file_name().unwrap().to_str().unwrap().to_string(),
                        bytes,
                        records,
                    }
                })
                .collect();
            files.sort_by(|a, b| a.name.cmp(&b.name));
            assert!(files.len() >= 4, "the template spans several segments");
            files
        })
    }

    /// The template's segments as they were after the first `n` appends.
    fn after_appends(n: u64) -> Vec<SegmentFile> {
        template()
            .iter()
            .filter_map(|seg| {
                let records: Vec<_> = seg
                    .records
                    .iter()
                    .copied()
                    .filter(|(seq, ..)| *seq <= n)
                    .collect();
                let end = records.last()?.2;
                Some(SegmentFile {
                    name: seg.name.clone(),
                    bytes: seg.bytes[..end].to_vec(),
                    records,
                })
            })
            .collect()
    }

    #[derive(Debug, Clone)]
    enum Damage {
        /// XOR one byte with a non-zero mask.
        Flip(prop::sample::Index, u8),
        /// Cut the file short (power loss mid-write), anywhere from empty to whole.
        Truncate(prop::sample::Index),
        /// Bytes after the last record: a torn next record, or garbage.
        Append(Vec<u8>),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, m)| Damage::Flip(i, m)),
            any::<prop::sample::Index>().prop_map(Damage::Truncate),
            prop::collection::vec(any::<u8>(), 1..40).prop_map(Damage::Append),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, d: &Damage) {
        match d {
            Damage::Flip(i, mask) => {
                if !bytes.is_empty() {
                    let at = i.index(bytes.len());
                    bytes[at] ^= mask;
                }
            }
            Damage::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            Damage::Append(more) => bytes.extend_from_slice(more),
        }
    }

    /// Records of `seg` that survive `damaged`: those wholly before the first byte that differs
    /// from what the spool wrote (or before the cut), the first damaged record and everything
    /// after it in that segment being dropped.
    fn surviving(seg: &SegmentFile, damaged: &[u8]) -> Vec<u64> {
        let first_diff = seg
            .bytes
            .iter()
            .zip(damaged)
            .position(|(a, b)| a != b)
            .unwrap_or(seg.bytes.len().min(damaged.len()));
        seg.records
            .iter()
            .take_while(|(_, _, end)| *end <= first_diff)
            .map(|(seq, ..)| *seq)
            .collect()
    }

    proptest! {
        // Disk-heavy: 64 cases unless PROPTEST_CASES asks for more (a longer run, docs/security.md).
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
        ))]

        /// Reopening a spool whose segments were damaged in any way never panics, keeps each
        /// segment's records up to its first damaged one (payloads unchanged), drops and cuts
        /// off the rest, and never yields a record that was not written.
        #[test]
        fn damaged_segments_keep_their_intact_prefix(
            n in 0..=WRITTEN,
            damages in prop::collection::vec((any::<prop::sample::Index>(), damage()), 0..5),
        ) {
            let pristine = after_appends(n);
            let mut files: Vec<Vec<u8>> = pristine.iter().map(|s| s.bytes.clone()).collect();
            if !files.is_empty() {
                for (which, d) in &damages {
                    let i = which.index(files.len());
                    apply(&mut files[i], d);
                }
            }
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("segments")).unwrap();
            for (seg, bytes) in pristine.iter().zip(&files) {
                fs::write(dir.path().join("segments").join(&seg.name), bytes).unwrap();
            }
            let kept: Vec<Vec<u64>> = pristine
                .iter()
                .zip(&files)
                .map(|(seg, bytes)| surviving(seg, bytes))
                .collect();
            let expected: Vec<u64> = kept.iter().flatten().copied().collect();
            let valid_bytes: Vec<u64> = pristine
                .iter()
                .zip(&kept)
                .map(|(seg, k)| seg.records[..k.len()].last().map_or(0, |r| r.2 as u64))
                .collect();
            let torn: u64 = files
                .iter()
                .zip(&valid_bytes)
                .map(|(f, v)| f.len() as u64 - v)
                .sum();

            // A read-only look first (what `shoal-agent spool status` does next to an agent).
            let inspected = Spool::inspect(dir.path())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;

            let (mut spool, report) = Spool::open(dir.path(), limits())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(report.records, expected.len() as u64);
            prop_assert_eq!(report.torn_bytes, torn);
            prop_assert_eq!(report.segments, kept.iter().filter(|k| !k.is_empty()).count());
            let read = spool.read_after(0, usize::MAX, usize::MAX).unwrap();
            for (seq, payload) in &read {
                prop_assert!(*seq >= 1 && *seq <= n, "seq {} was never written", seq);
                prop_assert_eq!(payload, &payload_of(*seq), "payload of seq {}", seq);
            }
            prop_assert_eq!(seqs(&read), expected.clone());
            prop_assert_eq!(spool.next_seq(), expected.iter().max().map_or(1, |s| s + 1));
            prop_assert_eq!(spool.status(), inspected);
            // The repair is on disk: damaged tails cut off, emptied segments gone.
            for ((seg, k), v) in pristine.iter().zip(&kept).zip(&valid_bytes) {
                let path = dir.path().join("segments").join(&seg.name);
                if k.is_empty() {
                    prop_assert!(!path.exists(), "{} emptied but kept", seg.name);
                } else {
                    prop_assert_eq!(fs::metadata(&path).unwrap().len(), *v);
                }
            }
            drop(spool);

            // A second open finds nothing more to repair and the same records.
            let (mut spool, again) = Spool::open(dir.path(), limits()).unwrap();
            prop_assert_eq!(again.torn_bytes, 0);
            prop_assert_eq!(again.records, expected.len() as u64);
            prop_assert_eq!(seqs(&spool.read_after(0, usize::MAX, usize::MAX).unwrap()), expected);
        }

        /// Segment files (and a state file) of arbitrary bytes: opening never panics, and since
        /// nothing was ever appended, nothing is read back.
        #[test]
        fn arbitrary_segment_files_yield_nothing(
            files in prop::collection::vec(
                (any::<u64>(), prop::collection::vec(any::<u8>(), 0..200)),
                1..4,
            ),
            state in proptest::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        ) {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("segments")).unwrap();
            for (first, bytes) in &files {
                fs::write(dir.path().join("segments").join(format!("{first:020}.seg")), bytes)
                    .unwrap();
            }
            if let Some(state) = &state {
                fs::write(dir.path().join("state.json"), state).unwrap();
            }
            let _ = Spool::inspect(dir.path());
            match Spool::open(dir.path(), limits()) {
                Ok((mut spool, report)) => {
                    prop_assert_eq!(report.records, 0);
                    prop_assert!(spool.read_after(0, usize::MAX, usize::MAX).unwrap().is_empty());
                    prop_assert_eq!(spool.status().pending, 0);
                }
                Err(SpoolError::BadState { .. }) => prop_assert!(state.is_some()),
                Err(e) => return Err(TestCaseError::fail(format!("unexpected error: {e}"))),
            }
        }
    }
}

#[test]
fn renumbering_keeps_every_unacknowledged_record_above_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(dir.path(), limits()).unwrap();
    fill(&mut spool, 30);
    spool.ack(10).unwrap();
    let moved = spool
        .renumber_above(100, |payload, seq| {
            Ok::<_, std::convert::Infallible>(
                format!("{}->{seq}", String::from_utf8_lossy(payload)).into_bytes(),
            )
        })
        .unwrap();
    assert_eq!(moved, 20);
    assert_eq!(spool.acked_seq(), 100);
    let check = |spool: &mut Spool| {
        let all = spool
            .read_after(spool.acked_seq(), 1000, usize::MAX)
            .unwrap();
        assert_eq!(seqs(&all), (101..=120).collect::<Vec<_>>());
        assert_eq!(all[0].1, b"sample-11->101");
        assert_eq!(all[19].1, b"sample-30->120");
    };
    check(&mut spool);
    assert_eq!(spool.next_seq(), 121);
    drop(spool);
    let (mut spool, _) = Spool::open(dir.path(), limits()).unwrap();
    check(&mut spool);
    assert_eq!(
        spool
            .renumber_above(50, |p, _| Ok::<_, std::convert::Infallible>(p.to_vec()))
            .unwrap(),
        0,
        "a floor below what the spool holds changes nothing"
    );
}
