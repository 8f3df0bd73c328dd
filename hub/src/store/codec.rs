//! The compact form of a stored sample.
//!
//! A sample is split in two: its **shape** (which sections it has, how many cores, disks and
//! interfaces, their names, a GPU's index) and its **numbers**. A device sends the same shape
//! sample after sample, so the store keeps each shape once (`sample_shapes`: a small id → the
//! shape) and each sample as `0x00, shape id, numbers`. Numbers are varints: integers as they
//! are, and a double as the decimal it came from where it is one (`30.1` is `301` at one
//! digit, 2 bytes instead of 8), else its 8 bytes. Nothing is rounded: a value is stored as a
//! decimal only where reading it back gives the same bits.
//!
//! A value that starts with any other byte is the sample's protobuf (no protobuf field has
//! tag 0), as stores before this format hold them; both read the same.
//!
//! Rollups read a sample's metric points straight from its numbers: per shape, the position of
//! each point in the numbers is found once ([`Shape::points`]) by walking a probe sample through
//! [`shoal_proto::metrics::for_each_point`].

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use shoal_proto::v1::{
    Cpu, Disk, Gpu, LoadAverage, Memory, NetInterface, PiBoard, Sample, Temperature,
};

use super::StoreError;

/// The first byte of a compact value.
pub(crate) const MARK: u8 = 0;

/// What a walk over a sample meets: numbers go to the numbers, the rest to the shape.
trait Walk {
    fn u64(&mut self, v: &mut u64);
    fn i64(&mut self, v: &mut i64);
    fn u32(&mut self, v: &mut u32);
    fn f64(&mut self, v: &mut f64);
    /// A number that names points (a GPU's index): kept in the shape.
    fn key(&mut self, v: &mut u32);
    fn flag(&mut self, v: &mut bool);
    fn text(&mut self, v: &mut String);
    /// How many items a list has (`n` when encoding); kept in the shape.
    fn count(&mut self, n: usize) -> usize;

    fn present(&mut self, some: bool) -> bool {
        let mut p = some;
        self.flag(&mut p);
        p
    }

    fn opt_u64(&mut self, v: &mut Option<u64>) {
        if self.present(v.is_some()) {
            self.u64(v.get_or_insert(0));
        }
    }

    fn opt_u32(&mut self, v: &mut Option<u32>) {
        if self.present(v.is_some()) {
            self.u32(v.get_or_insert(0));
        }
    }

    fn opt_f64(&mut self, v: &mut Option<f64>) {
        if self.present(v.is_some()) {
            self.f64(v.get_or_insert(0.0));
        }
    }

    fn list<T: Default>(&mut self, items: &mut Vec<T>, mut each: impl FnMut(&mut Self, &mut T)) {
        let n = self.count(items.len());
        items.resize_with(n, T::default);
        for item in items {
            each(self, item);
        }
    }

    fn message<T: Default>(&mut self, m: &mut Option<T>, mut each: impl FnMut(&mut Self, &mut T)) {
        if self.present(m.is_some()) {
            each(self, m.get_or_insert_with(T::default));
        }
    }
}

/// Every field of a sample, in one order for encoding and decoding. A field added to the
/// protocol must be added here; `every_field_survives` fails until it is.
fn walk<W: Walk>(w: &mut W, s: &mut Sample) {
    w.u64(&mut s.seq);
    w.i64(&mut s.timestamp_ms);
    w.message(&mut s.cpu, |w, c: &mut Cpu| {
        w.f64(&mut c.total_percent);
        w.list(&mut c.core_percent, |w, v| w.f64(v));
    });
    w.message(&mut s.load, |w, l: &mut LoadAverage| {
        w.f64(&mut l.one);
        w.opt_f64(&mut l.five);
        w.opt_f64(&mut l.fifteen);
    });
    w.message(&mut s.memory, |w, m: &mut Memory| {
        w.u64(&mut m.total_bytes);
        w.u64(&mut m.used_bytes);
        w.u64(&mut m.available_bytes);
        w.u64(&mut m.swap_total_bytes);
        w.u64(&mut m.swap_used_bytes);
    });
    w.list(&mut s.disks, |w, d: &mut Disk| {
        w.text(&mut d.mount_point);
        w.text(&mut d.device);
        w.text(&mut d.filesystem);
        w.u64(&mut d.total_bytes);
        w.u64(&mut d.used_bytes);
    });
    w.list(&mut s.networks, |w, n: &mut NetInterface| {
        w.text(&mut n.name);
        w.u64(&mut n.rx_bytes);
        w.u64(&mut n.tx_bytes);
        w.f64(&mut n.rx_bytes_per_second);
        w.f64(&mut n.tx_bytes_per_second);
    });
    w.opt_u64(&mut s.uptime_seconds);
    w.list(&mut s.temperatures, |w, t: &mut Temperature| {
        w.text(&mut t.sensor);
        w.f64(&mut t.celsius);
    });
    w.opt_u32(&mut s.process_count);
    w.list(&mut s.gpus, gpu);
    w.message(&mut s.pi, |w, p: &mut PiBoard| {
        w.f64(&mut p.soc_temperature_celsius);
        w.u32(&mut p.throttled_flags);
        w.u32(&mut p.cpu_frequency_mhz);
        w.flag(&mut p.throttled_known);
        w.u32(&mut p.emmc_life_time_a);
        w.u32(&mut p.emmc_life_time_b);
        w.u32(&mut p.emmc_pre_eol);
    });
}

fn gpu<W: Walk>(w: &mut W, g: &mut Gpu) {
    w.key(&mut g.index);
    w.text(&mut g.name);
    w.text(&mut g.uuid);
    w.f64(&mut g.utilization_percent);
    w.f64(&mut g.memory_utilization_percent);
    w.u64(&mut g.memory_used_bytes);
    w.u64(&mut g.memory_total_bytes);
    w.f64(&mut g.temperature_celsius);
    w.f64(&mut g.power_watts);
    w.f64(&mut g.power_limit_watts);
    w.u32(&mut g.sm_clock_mhz);
    w.u32(&mut g.memory_clock_mhz);
    w.f64(&mut g.fan_percent);
    w.u64(&mut g.throttle_reasons);
    w.u64(&mut g.ecc_errors_corrected);
    w.u64(&mut g.ecc_errors_uncorrected);
    w.u32(&mut g.process_count);
    w.text(&mut g.source);
    w.list(&mut g.mig_devices, gpu);
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

const POW10: [f64; 7] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];
/// The low 3 bits of a double's varint: digits after the point, or this for the raw bits.
const RAW_F64: u64 = 7;

/// Writes `v` as the decimal it is (a varint of its digits, shifted by 3 bits that say how
/// many are after the point), or as its 8 bytes when no decimal of up to 6 places reads back
/// as the same bits.
pub(crate) fn put_f64(out: &mut Vec<u8>, v: f64) {
    put_f64_within(out, v, 0.0);
}

/// Like [`put_f64`], but takes the shortest decimal within `v`'s magnitude times `tolerance`
/// of it: for sums, whose last bits are the noise of adding decimals in binary.
pub(crate) fn put_f64_within(out: &mut Vec<u8>, v: f64, tolerance: f64) {
    for (digits, p) in POW10.iter().enumerate() {
        let m = (v * p).round();
        if m.abs() < (1u64 << 53) as f64 {
            let i = m as i64;
            let back = (i as f64) / p;
            if back.to_bits() == v.to_bits()
                || (tolerance > 0.0 && (back - v).abs() <= v.abs() * tolerance)
            {
                put_varint(out, (zigzag(i) << 3) | digits as u64);
                return;
            }
        }
    }
    put_varint(out, RAW_F64);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Encodes a sample: its shape and its numbers.
struct Encoder {
    shape: Vec<u8>,
    numbers: Vec<u8>,
}

impl Walk for Encoder {
    fn u64(&mut self, v: &mut u64) {
        put_varint(&mut self.numbers, *v);
    }
    fn i64(&mut self, v: &mut i64) {
        put_varint(&mut self.numbers, zigzag(*v));
    }
    fn u32(&mut self, v: &mut u32) {
        put_varint(&mut self.numbers, u64::from(*v));
    }
    fn f64(&mut self, v: &mut f64) {
        put_f64(&mut self.numbers, *v);
    }
    fn key(&mut self, v: &mut u32) {
        put_varint(&mut self.shape, u64::from(*v));
    }
    fn flag(&mut self, v: &mut bool) {
        self.shape.push(u8::from(*v));
    }
    fn text(&mut self, v: &mut String) {
        put_varint(&mut self.shape, v.len() as u64);
        self.shape.extend_from_slice(v.as_bytes());
    }
    fn count(&mut self, n: usize) -> usize {
        put_varint(&mut self.shape, n as u64);
        n
    }
}

/// A sample split for storing: the writer turns `shape` into an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub shape: Vec<u8>,
    pub numbers: Vec<u8>,
}

/// Splits `sample` into its shape and numbers.
pub fn split(mut sample: Sample) -> Split {
    let mut e = Encoder {
        shape: Vec::with_capacity(128),
        numbers: Vec::with_capacity(128),
    };
    walk(&mut e, &mut sample);
    Split {
        shape: e.shape,
        numbers: e.numbers,
    }
}

/// The stored value of a split sample whose shape has id `shape_id`.
pub(crate) fn value(shape_id: u32, numbers: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(numbers.len() + 6);
    out.push(MARK);
    put_varint(&mut out, u64::from(shape_id));
    out.extend_from_slice(numbers);
    out
}

/// Reads bytes front to back; running out is corruption.
pub(crate) struct Reader<'a> {
    pub bytes: &'a [u8],
}

impl Reader<'_> {
    pub fn varint(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.bytes.split_first().ok_or_else(torn)?;
            self.bytes = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(StoreError::Corrupt(
            "a stored sample has an overlong number".into(),
        ))
    }

    pub fn take(&mut self, n: usize) -> Result<&[u8], StoreError> {
        if n > self.bytes.len() {
            return Err(torn());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub fn f64(&mut self) -> Result<f64, StoreError> {
        let v = self.varint()?;
        let digits = v & 7;
        if digits == RAW_F64 {
            let b = self.take(8)?;
            return Ok(f64::from_le_bytes(b.try_into().expect("8 bytes")));
        }
        Ok(unzigzag(v >> 3) as f64 / POW10[digits as usize])
    }
}

fn torn() -> StoreError {
    StoreError::Corrupt("a stored sample is cut short".into())
}

/// Rebuilds a sample from its shape and numbers. The first error sticks; the walk goes on
/// harmlessly (counts read as 0) and the error is returned at the end.
struct Decoder<'a> {
    shape: Reader<'a>,
    numbers: Reader<'a>,
    error: Option<StoreError>,
}

impl Decoder<'_> {
    fn keep<T: Default>(&mut self, r: Result<T, StoreError>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => {
                self.error.get_or_insert(e);
                T::default()
            }
        }
    }
}

impl Walk for Decoder<'_> {
    fn u64(&mut self, v: &mut u64) {
        let r = self.numbers.varint();
        *v = self.keep(r);
    }
    fn i64(&mut self, v: &mut i64) {
        let r = self.numbers.varint().map(unzigzag);
        *v = self.keep(r);
    }
    fn u32(&mut self, v: &mut u32) {
        let r = self.numbers.varint().map(|n| n as u32);
        *v = self.keep(r);
    }
    fn f64(&mut self, v: &mut f64) {
        let r = self.numbers.f64();
        *v = self.keep(r);
    }
    fn key(&mut self, v: &mut u32) {
        let r = self.shape.varint().map(|n| n as u32);
        *v = self.keep(r);
    }
    fn flag(&mut self, v: &mut bool) {
        let r = self.shape.take(1).map(|b| b[0] != 0);
        *v = self.keep(r);
    }
    fn text(&mut self, v: &mut String) {
        let r = self.shape.varint().and_then(|n| {
            let b = self.shape.take(n as usize)?;
            String::from_utf8(b.to_vec())
                .map_err(|_| StoreError::Corrupt("a stored sample's name is not UTF-8".into()))
        });
        *v = self.keep(r);
    }
    fn count(&mut self, _: usize) -> usize {
        let r = self.shape.varint();
        let n = self.keep(r) as usize;
        // Every item takes at least a byte of the shape or the numbers: a larger count is
        // corruption, not a reason to allocate.
        if n > self.shape.bytes.len() + self.numbers.bytes.len() {
            self.error.get_or_insert_with(torn);
            return 0;
        }
        n
    }
}

/// Rebuilds the sample stored as `shape` and `numbers`.
fn join(shape: &[u8], numbers: &[u8]) -> Result<Sample, StoreError> {
    let mut d = Decoder {
        shape: Reader { bytes: shape },
        numbers: Reader { bytes: numbers },
        error: None,
    };
    let mut s = Sample::default();
    walk(&mut d, &mut s);
    match d.error {
        Some(e) => Err(e),
        None if !d.shape.bytes.is_empty() || !d.numbers.bytes.is_empty() => Err(
            StoreError::Corrupt("a stored sample has bytes after its last field".into()),
        ),
        None => Ok(s),
    }
}

/// How a number is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unsigned,
    Signed,
    Double,
}

/// Walks a shape, giving number `i` a value no collector would send (`BASE + i`), or 0, and
/// noting each number's kind.
struct Probe<'a> {
    shape: Reader<'a>,
    zero: bool,
    kinds: Vec<Kind>,
    ok: bool,
}

const BASE: u64 = 1_000_003;

impl Probe<'_> {
    fn next(&mut self, kind: Kind) -> u64 {
        self.kinds.push(kind);
        if self.zero {
            0
        } else {
            BASE + self.kinds.len() as u64 - 1
        }
    }
    fn shape_varint(&mut self) -> u64 {
        self.shape.varint().unwrap_or_else(|_| {
            self.ok = false;
            0
        })
    }
}

impl Walk for Probe<'_> {
    fn u64(&mut self, v: &mut u64) {
        *v = self.next(Kind::Unsigned);
    }
    fn i64(&mut self, v: &mut i64) {
        *v = self.next(Kind::Signed) as i64;
    }
    fn u32(&mut self, v: &mut u32) {
        *v = self.next(Kind::Unsigned) as u32;
    }
    fn f64(&mut self, v: &mut f64) {
        *v = self.next(Kind::Double) as f64;
    }
    fn key(&mut self, v: &mut u32) {
        *v = self.shape_varint() as u32;
    }
    fn flag(&mut self, v: &mut bool) {
        match self.shape.take(1) {
            Ok(b) => *v = b[0] != 0,
            Err(_) => self.ok = false,
        }
    }
    fn text(&mut self, v: &mut String) {
        let n = self.shape_varint() as usize;
        match self.shape.take(n) {
            Ok(b) => *v = String::from_utf8_lossy(b).into_owned(),
            Err(_) => self.ok = false,
        }
    }
    fn count(&mut self, _: usize) -> usize {
        let n = self.shape_varint() as usize;
        if n > self.shape.bytes.len() + 4096 {
            self.ok = false;
            return 0;
        }
        n
    }
}

/// Where a shape's metric points sit among its numbers.
#[derive(Debug)]
pub(crate) struct PointMap {
    kinds: Vec<Kind>,
    /// `(number index, metric name)`, in [`shoal_proto::metrics::for_each_point`]'s order.
    pub points: Vec<(usize, String)>,
}

/// Finds where `shape`'s points sit, or `None` when a point is not simply one number (a
/// value computed from others, or a point present only for some values): rollups then read
/// such samples whole.
fn point_map(shape: &[u8]) -> Option<PointMap> {
    let probe = |zero: bool| {
        let mut p = Probe {
            shape: Reader { bytes: shape },
            zero,
            kinds: Vec::new(),
            ok: true,
        };
        let mut s = Sample::default();
        walk(&mut p, &mut s);
        let mut points = Vec::new();
        shoal_proto::metrics::for_each_point(&s, |name, v| points.push((name.to_string(), v)));
        (p.ok && p.shape.bytes.is_empty()).then_some((p.kinds, points))
    };
    let (kinds, numbered) = probe(false)?;
    let (_, zeroed) = probe(true)?;
    if numbered.len() != zeroed.len() || numbered.iter().zip(&zeroed).any(|(a, b)| a.0 != b.0) {
        return None;
    }
    let mut seen = vec![false; kinds.len()];
    let mut points = Vec::with_capacity(numbered.len());
    for (name, v) in numbered {
        let i = v - BASE as f64;
        if i < 0.0 || i != i.trunc() || i as usize >= kinds.len() || seen[i as usize] {
            return None;
        }
        seen[i as usize] = true;
        points.push((i as usize, name));
    }
    Some(PointMap { kinds, points })
}

impl PointMap {
    /// The sample's numbers as doubles (what `for_each_point` would give for each).
    pub fn numbers(&self, numbers: &[u8], out: &mut Vec<f64>) -> Result<(), StoreError> {
        out.clear();
        let mut r = Reader { bytes: numbers };
        for kind in &self.kinds {
            out.push(match kind {
                Kind::Unsigned => r.varint()? as f64,
                Kind::Signed => unzigzag(r.varint()?) as f64,
                Kind::Double => r.f64()?,
            });
        }
        Ok(())
    }
}

/// A known shape.
#[derive(Debug)]
pub(crate) struct Shape {
    pub id: u32,
    pub bytes: Box<[u8]>,
    points: OnceLock<Option<PointMap>>,
}

impl Shape {
    fn new(id: u32, bytes: Box<[u8]>) -> Self {
        Self {
            id,
            bytes,
            points: OnceLock::new(),
        }
    }

    /// Where its points sit among the numbers; `None`: read such samples whole.
    pub fn points(&self) -> Option<&PointMap> {
        self.points.get_or_init(|| point_map(&self.bytes)).as_ref()
    }
}

/// A compact stored sample: its shape and its numbers.
pub(crate) type Parts<'a> = (Arc<Shape>, &'a [u8]);

/// The store's shapes, in memory; `sample_shapes` is the truth.
#[derive(Debug, Default)]
pub(crate) struct Shapes {
    inner: RwLock<ShapesInner>,
}

#[derive(Debug, Default)]
struct ShapesInner {
    ids: HashMap<Box<[u8]>, u32>,
    /// Shape `id` at `id - 1`.
    by_id: Vec<Arc<Shape>>,
}

impl Shapes {
    /// Loads shapes `1..` in id order.
    pub fn load(rows: impl IntoIterator<Item = (u32, Vec<u8>)>) -> Result<Self, StoreError> {
        let mut inner = ShapesInner::default();
        for (id, bytes) in rows {
            if id as usize != inner.by_id.len() + 1 {
                return Err(StoreError::Corrupt(format!(
                    "sample shape {id} follows shape {}",
                    inner.by_id.len()
                )));
            }
            let bytes = bytes.into_boxed_slice();
            inner.ids.insert(bytes.clone(), id);
            inner.by_id.push(Arc::new(Shape::new(id, bytes)));
        }
        Ok(Self {
            inner: RwLock::new(inner),
        })
    }

    /// The id of `shape`, and whether it is new (then the caller stores it, or calls
    /// [`Shapes::forget_from`] if its transaction fails).
    pub fn id(&self, shape: &[u8]) -> (u32, bool) {
        if let Some(id) = self.inner.read().expect("shapes lock").ids.get(shape) {
            return (*id, false);
        }
        let mut inner = self.inner.write().expect("shapes lock");
        if let Some(id) = inner.ids.get(shape) {
            return (*id, false);
        }
        let id = inner.by_id.len() as u32 + 1;
        let bytes: Box<[u8]> = shape.into();
        inner.ids.insert(bytes.clone(), id);
        inner.by_id.push(Arc::new(Shape::new(id, bytes)));
        (id, true)
    }

    /// Drops shapes `id..`, handed out in a transaction that did not commit.
    pub fn forget_from(&self, id: u32) {
        let mut inner = self.inner.write().expect("shapes lock");
        let keep = (id as usize).saturating_sub(1).min(inner.by_id.len());
        let gone = inner.by_id.split_off(keep);
        for s in gone {
            inner.ids.remove(&s.bytes);
        }
    }

    pub fn get(&self, id: u32) -> Option<Arc<Shape>> {
        let inner = self.inner.read().expect("shapes lock");
        (id as usize)
            .checked_sub(1)
            .and_then(|i| inner.by_id.get(i).cloned())
    }

    /// The shape and numbers of a compact stored value; `None` for a protobuf one.
    pub fn parts<'a>(&self, value: &'a [u8]) -> Result<Option<Parts<'a>>, StoreError> {
        if value.first() != Some(&MARK) {
            return Ok(None);
        }
        let mut r = Reader { bytes: &value[1..] };
        let id = r.varint()? as u32;
        let shape = self.get(id).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "a stored sample names shape {id}, which is not stored"
            ))
        })?;
        Ok(Some((shape, r.bytes)))
    }

    /// The sample stored as `value`, in either form.
    pub fn decode(&self, value: &[u8]) -> Result<Sample, StoreError> {
        match self.parts(value)? {
            Some((shape, numbers)) => join(&shape.bytes, numbers),
            None => prost::Message::decode(value).map_err(|e| StoreError::Corrupt(e.to_string())),
        }
    }

    /// The timestamp of the sample stored as `value`, without rebuilding the rest.
    pub fn timestamp(&self, value: &[u8]) -> Result<i64, StoreError> {
        if value.first() != Some(&MARK) {
            return self.decode(value).map(|s| s.timestamp_ms);
        }
        let mut r = Reader { bytes: &value[1..] };
        r.varint()?; // shape id
        r.varint()?; // seq
        Ok(unzigzag(r.varint()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample with every field set to something other than its default.
    fn full() -> Sample {
        let gpu = |index: u32, mig: Vec<Gpu>| Gpu {
            index,
            name: "NVIDIA H100".into(),
            uuid: format!("GPU-{index}"),
            utilization_percent: 87.5,
            memory_utilization_percent: 40.25,
            memory_used_bytes: 30 << 30,
            memory_total_bytes: 80 << 30,
            temperature_celsius: 61.0,
            power_watts: 412.317,
            power_limit_watts: 700.0,
            sm_clock_mhz: 1980,
            memory_clock_mhz: 2619,
            fan_percent: 33.0,
            throttle_reasons: 4,
            ecc_errors_corrected: 2,
            ecc_errors_uncorrected: 1,
            process_count: 3,
            source: "nvml".into(),
            mig_devices: mig,
        };
        Sample {
            seq: 42,
            timestamp_ms: 1_800_000_000_123,
            cpu: Some(Cpu {
                total_percent: 12.3,
                core_percent: vec![0.1, 99.9, 1.0 / 3.0, -0.0],
            }),
            load: Some(LoadAverage {
                one: 0.52,
                five: Some(0.61),
                fifteen: Some(f64::NAN),
            }),
            memory: Some(Memory {
                total_bytes: 16 << 30,
                used_bytes: 6 << 30,
                available_bytes: 10 << 30,
                swap_total_bytes: 2 << 30,
                swap_used_bytes: 1,
            }),
            disks: vec![Disk {
                mount_point: "/".into(),
                device: "/dev/mmcblk0p2".into(),
                filesystem: "ext4".into(),
                total_bytes: 64 << 30,
                used_bytes: u64::MAX,
            }],
            networks: vec![NetInterface {
                name: "wlan0".into(),
                rx_bytes: 1 << 40,
                tx_bytes: 3,
                rx_bytes_per_second: 1234.0,
                tx_bytes_per_second: f64::INFINITY,
            }],
            uptime_seconds: Some(86_400),
            temperatures: vec![Temperature {
                sensor: "cpu_thermal".into(),
                celsius: 48.312,
            }],
            process_count: Some(0),
            gpus: vec![gpu(0, vec![gpu(7, vec![])]), gpu(1, vec![])],
            pi: Some(PiBoard {
                soc_temperature_celsius: 51.6,
                throttled_flags: 0x5_0005,
                cpu_frequency_mhz: 1500,
                throttled_known: true,
                emmc_life_time_a: 2,
                emmc_life_time_b: 1,
                emmc_pre_eol: 1,
            }),
        }
    }

    fn roundtrip(s: &Sample) -> Sample {
        let split = split(s.clone());
        let shapes = Shapes::default();
        let (id, new) = shapes.id(&split.shape);
        assert!(new);
        shapes.decode(&value(id, &split.numbers)).unwrap()
    }

    fn same(a: &Sample, b: &Sample) -> bool {
        // Bit for bit, NaN included.
        prost::Message::encode_to_vec(a) == prost::Message::encode_to_vec(b)
    }

    #[test]
    fn every_field_survives() {
        // `full` names every field (no `..Default::default()`), so a field added to the
        // protocol stops this compiling until it is set there, and fails here until the walk
        // stores it.
        let s = full();
        assert!(same(&roundtrip(&s), &s));
        assert!(same(&roundtrip(&Sample::default()), &Sample::default()));
    }

    #[test]
    fn doubles_are_stored_as_their_decimals_and_nothing_is_rounded() {
        for v in [
            0.0,
            -0.0,
            30.1,
            -30.1,
            99.99,
            48.312,
            1e15,
            1.0 / 3.0,
            f64::NAN,
            f64::INFINITY,
            f64::MIN_POSITIVE,
            5e-324,
            123_456.789_012,
        ] {
            let mut out = Vec::new();
            put_f64(&mut out, v);
            let back = Reader { bytes: &out }.f64().unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{v}");
        }
        let size = |v: f64| {
            let mut out = Vec::new();
            put_f64(&mut out, v);
            out.len()
        };
        assert_eq!(size(30.1), 2);
        assert_eq!(size(48.312), 3);
        assert_eq!(size(1.0 / 3.0), 9);
    }

    #[test]
    fn a_server_sample_takes_a_few_bytes_a_point() {
        let s = full();
        let split = split(s.clone());
        let points = shoal_proto::metrics::point_count(&s);
        let protobuf = prost::Message::encode_to_vec(&s).len();
        assert!(
            split.numbers.len() * 2 < protobuf,
            "{} bytes of numbers for {points} points ({protobuf} as protobuf)",
            split.numbers.len()
        );
    }

    #[test]
    fn the_old_form_still_reads() {
        let s = full();
        let shapes = Shapes::default();
        let old = prost::Message::encode_to_vec(&s);
        assert!(same(&shapes.decode(&old).unwrap(), &s));
        assert_eq!(shapes.timestamp(&old).unwrap(), s.timestamp_ms);
        let split = split(s.clone());
        let (id, _) = shapes.id(&split.shape);
        assert_eq!(
            shapes.timestamp(&value(id, &split.numbers)).unwrap(),
            s.timestamp_ms
        );
    }

    #[test]
    fn damaged_values_are_errors_not_panics() {
        let s = full();
        let split = split(s);
        let shapes = Shapes::default();
        let (id, _) = shapes.id(&split.shape);
        let v = value(id, &split.numbers);
        for cut in 1..v.len() {
            assert!(shapes.decode(&v[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = v.clone();
        longer.push(1);
        assert!(shapes.decode(&longer).is_err());
        assert!(shapes.decode(&value(id + 1, &split.numbers)).is_err());
        // A shape whose count claims more items than there are bytes.
        let (bad, _) = shapes.id(&[1, 0, 0xff, 0xff, 0xff, 0x7f]);
        assert!(shapes.decode(&value(bad, &[0, 0, 0])).is_err());
    }

    #[test]
    fn points_are_read_straight_from_the_numbers_where_the_shape_allows() {
        let mut s = full();
        s.pi = None;
        let split = split(s.clone());
        let shape = Shape::new(1, split.shape.clone().into_boxed_slice());
        let map = shape.points().expect("a shape without a Pi board maps");
        let mut numbers = Vec::new();
        map.numbers(&split.numbers, &mut numbers).unwrap();
        let mut expected = Vec::new();
        shoal_proto::metrics::for_each_point(&s, |name, v| expected.push((name.to_string(), v)));
        let got: Vec<(String, f64)> = map
            .points
            .iter()
            .map(|(i, name)| (name.clone(), numbers[*i]))
            .collect();
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g.0, e.0);
            assert_eq!(g.1.to_bits(), e.1.to_bits(), "{}", g.0);
        }
        // A Pi board's throttle bits are computed from its flags: read whole.
        let with_pi = Shape::new(2, super::split(full()).shape.into_boxed_slice());
        assert!(with_pi.points().is_none());
    }

    #[test]
    fn forgotten_shapes_are_handed_out_again() {
        let shapes = Shapes::default();
        let (a, _) = shapes.id(b"a");
        let (b, new) = shapes.id(b"b");
        assert!(new);
        shapes.forget_from(b);
        assert!(shapes.get(b).is_none());
        assert_eq!(shapes.id(b"a"), (a, false));
        assert_eq!(shapes.id(b"c"), (b, true));
        let loaded = Shapes::load([(1, b"a".to_vec()), (2, b"c".to_vec())]).unwrap();
        assert_eq!(loaded.id(b"c"), (2, false));
        assert!(Shapes::load([(2, b"x".to_vec())]).is_err());
    }
}
