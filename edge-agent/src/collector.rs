//! The system collector: CPU, load, memory, disks, network, uptime, temperatures and process
//! count, read through `sysinfo`. Only the parts that are sampled are refreshed, so the agent
//! stays small.

use std::path::Path;
use std::time::Instant;

use crate::board::{Board, Sysroot};
use shoal_proto::v1::{
    Cpu, DeviceHello, Disk, LoadAverage, Memory, NetInterface, Sample, Temperature,
};
use sysinfo::{
    Components, CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System,
};

pub struct SystemCollector {
    system: System,
    // Each optional part is `None` on a host that does not expose it; the rest still works.
    disks: Option<Disks>,
    networks: Option<Networks>,
    components: Option<Components>,
    last_net: Instant,
    root: Sysroot,
    board: Board,
    gpu: Option<crate::gpu::GpuCollector>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read system statistics: {0}")]
pub struct CollectorError(String);

/// Logs once that an optional part of the collector is unavailable.
fn optional<T>(what: &str, r: Result<T, sysinfo::Error>) -> Option<T> {
    r.map_err(|e| tracing::warn!(error = %e, "{what} statistics unavailable on this host; reporting without them"))
        .ok()
}

impl SystemCollector {
    pub fn new() -> Result<Self, CollectorError> {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(MemoryRefreshKind::everything()),
        )
        .map_err(|e| CollectorError(e.to_string()))?;
        Ok(Self {
            system,
            disks: optional("disk", Disks::new_with_refreshed_list()),
            networks: optional("network", Networks::new_with_refreshed_list()),
            components: optional("temperature", Components::new_with_refreshed_list()),
            last_net: Instant::now(),
            board: Board::detect(&Sysroot::default()),
            root: Sysroot::default(),
            gpu: crate::gpu::GpuCollector::new(),
        })
    }

    /// Takes one sample. CPU usage and network rates are measured since the previous call (the
    /// first call after [`Self::new`] measures since construction).
    pub fn sample(&mut self) -> Sample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        if let Some(d) = &mut self.disks {
            d.refresh(true);
        }
        if let Some(n) = &mut self.networks {
            n.refresh(true);
        }
        if let Some(c) = &mut self.components {
            c.refresh(true);
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_net).as_secs_f64().max(1e-3);
        self.last_net = now;

        let load = System::load_average().ok();
        let disks = self.disks();
        let networks = self.networks(elapsed);
        let temperatures = self.temperatures();

        let mut sample = Sample {
            seq: 0,
            timestamp_ms: crate::clock::now_ms(),
            cpu: Some(Cpu {
                total_percent: f64::from(self.system.global_cpu_usage()),
                core_percent: self
                    .system
                    .cpus()
                    .iter()
                    .map(|c| f64::from(c.usage()))
                    .collect(),
            }),
            load: load.map(|l| LoadAverage {
                one: l.one,
                five: Some(l.five),
                fifteen: Some(l.fifteen),
            }),
            memory: Some(Memory {
                total_bytes: self.system.total_memory(),
                used_bytes: self.system.used_memory(),
                available_bytes: self.system.available_memory(),
                swap_total_bytes: self.system.total_swap(),
                swap_used_bytes: self.system.used_swap(),
            }),
            disks,
            networks,
            uptime_seconds: System::uptime().ok(),
            temperatures,
            process_count: process_count(Path::new("/proc")),
            gpus: Vec::new(),
            pi: None,
        };
        if let Some(gpu) = &self.gpu {
            sample.gpus = gpu.sample();
        }
        crate::board::enrich(&self.root, &self.board, &mut sample);
        sample
    }

    /// Mounted filesystems, one per mount point, sorted by it.
    fn disks(&self) -> Vec<Disk> {
        let mut disks: Vec<Disk> = self
            .disks
            .iter()
            .flat_map(|d| d.iter())
            .map(|d| Disk {
                mount_point: d.mount_point().to_string_lossy().into_owned(),
                device: d.name().to_string_lossy().into_owned(),
                filesystem: d.file_system().to_string_lossy().into_owned(),
                total_bytes: d.total_space(),
                used_bytes: d.total_space().saturating_sub(d.available_space()),
            })
            .collect();
        disks.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
        disks.dedup_by(|a, b| a.mount_point == b.mount_point);
        disks
    }

    /// Network interfaces sorted by name, with rates over the last `elapsed` seconds.
    fn networks(&self, elapsed: f64) -> Vec<NetInterface> {
        let mut networks: Vec<NetInterface> = self
            .networks
            .iter()
            .flat_map(|n| n.iter())
            .map(|(name, n)| NetInterface {
                name: name.to_string_lossy().into_owned(),
                rx_bytes: n.total_received(),
                tx_bytes: n.total_transmitted(),
                rx_bytes_per_second: n.received() as f64 / elapsed,
                tx_bytes_per_second: n.transmitted() as f64 / elapsed,
            })
            .collect();
        networks.sort_by(|a, b| a.name.cmp(&b.name));
        networks
    }

    /// Temperature sensors with a finite reading.
    fn temperatures(&self) -> Vec<Temperature> {
        self.components
            .iter()
            .flat_map(|c| c.iter())
            .filter_map(|c| {
                c.temperature()
                    .filter(|t| t.is_finite())
                    .map(|t| Temperature {
                        sensor: c.label().to_string(),
                        celsius: f64::from(t),
                    })
            })
            .collect()
    }

    /// NVIDIA driver and CUDA versions, when NVML is there.
    pub fn gpu_versions(&self) -> (String, String) {
        self.gpu
            .as_ref()
            .map(|g| (g.driver_version.clone(), g.cuda_version.clone()))
            .unwrap_or_default()
    }
}

/// Counts the numeric entries of `/proc` (one per process) without loading process details.
/// `None` when `/proc` cannot be read: a missing reading, not zero processes.
fn process_count(proc_root: &Path) -> Option<u32> {
    std::fs::read_dir(proc_root).ok().map(|dir| {
        dir.filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .count() as u32
    })
}

/// Who this device is, for the hello message.
pub fn describe_device(
    device_id: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> DeviceHello {
    DeviceHello {
        device_id: device_id.to_string(),
        hostname: System::host_name().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        os: System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.to_string()),
        kernel: System::kernel_version().unwrap_or_default(),
        hardware_model: Board::detect(&Sysroot::default()).model().to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        last_written_seq: 0,
        gpu_driver_version: String::new(),
        cuda_version: String::new(),
    }
}

/// A stable id for this machine: `/etc/machine-id` (systemd), else the D-Bus one, else the
/// hostname. `None` when none of them gives a valid device id.
pub fn default_device_id() -> Option<String> {
    for path in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(s) = std::fs::read_to_string(path) {
            let s = s.trim();
            if shoal_proto::device_id::validate(s).is_ok() {
                return Some(s.to_string());
            }
        }
    }
    System::host_name()
        .ok()
        .filter(|h| shoal_proto::device_id::validate(h).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_host() {
        let mut c = SystemCollector::new().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let s = c.sample();
        let mem = s.memory.unwrap();
        assert!(mem.total_bytes > 0 && mem.used_bytes <= mem.total_bytes);
        assert!(!s.cpu.unwrap().core_percent.is_empty());
        assert!(s.process_count.is_some_and(|n| n > 0));
        assert!(s.uptime_seconds.is_some_and(|u| u > 0));
        assert!(s.timestamp_ms > 1_700_000_000_000);
    }

    #[test]
    fn counts_processes_from_proc_entries() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["1", "42", "self", "cpuinfo", "1000"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        assert_eq!(process_count(dir.path()), Some(3));
    }
}
