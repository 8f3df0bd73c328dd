//! The NVIDIA GPU collector, through NVML (`libnvidia-ml.so`, loaded at run time by
//! nvml-wrapper): a machine without the library gets one log line that the collector is
//! disabled, and the agent runs on. Each reading that a GPU does not support (fans on a
//! data-centre card, ECC on a consumer one) is left at zero rather than failing the sample.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use shoal_proto::v1::Gpu;

pub struct GpuCollector {
    nvml: Nvml,
    /// Driver version, e.g. "550.54.15".
    pub driver_version: String,
    /// CUDA version the driver supports, e.g. "12.4".
    pub cuda_version: String,
}

impl GpuCollector {
    /// Loads NVML; `None` (logged once) when there is no NVIDIA driver on this machine.
    pub fn new() -> Option<Self> {
        match Nvml::init() {
            Ok(nvml) => {
                let driver_version = nvml.sys_driver_version().unwrap_or_default();
                let cuda_version = nvml
                    .sys_cuda_driver_version()
                    .map(|v| {
                        format!(
                            "{}.{}",
                            nvml_wrapper::cuda_driver_version_major(v),
                            nvml_wrapper::cuda_driver_version_minor(v)
                        )
                    })
                    .unwrap_or_default();
                let count = nvml.device_count().unwrap_or(0);
                tracing::info!(gpus = count, driver = %driver_version, cuda = %cuda_version, "NVML GPU collector enabled");
                Some(Self {
                    nvml,
                    driver_version,
                    cuda_version,
                })
            }
            Err(e) => {
                tracing::info!(reason = %e, "NVML GPU collector disabled (no NVIDIA driver library); the agent runs on");
                None
            }
        }
    }

    /// One reading of every GPU (and its MIG instances when MIG is on).
    pub fn sample(&self) -> Vec<Gpu> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let device = self.nvml.device_by_index(i).ok()?;
                let mut gpu = read(&device, i);
                if device.mig_mode().is_ok_and(|m| m.current == 1) {
                    let max = device.mig_device_count().unwrap_or(0);
                    gpu.mig_devices = (0..max)
                        .filter_map(|m| device.mig_device_by_index(m).ok().map(|d| read(&d, m)))
                        .collect();
                }
                Some(gpu)
            })
            .collect()
    }
}

fn read(device: &nvml_wrapper::Device<'_>, index: u32) -> Gpu {
    let utilization = device.utilization_rates().ok();
    let memory = device.memory_info().ok();
    let fans = device.num_fans().unwrap_or(0);
    Gpu {
        index,
        name: device.name().unwrap_or_default(),
        uuid: device.uuid().unwrap_or_default(),
        utilization_percent: utilization.as_ref().map_or(0.0, |u| f64::from(u.gpu)),
        memory_utilization_percent: utilization.as_ref().map_or(0.0, |u| f64::from(u.memory)),
        memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
        memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
        temperature_celsius: device
            .temperature(TemperatureSensor::Gpu)
            .map_or(0.0, f64::from),
        power_watts: device
            .power_usage()
            .map_or(0.0, |mw| f64::from(mw) / 1000.0),
        power_limit_watts: device
            .enforced_power_limit()
            .map_or(0.0, |mw| f64::from(mw) / 1000.0),
        sm_clock_mhz: device.clock_info(Clock::SM).unwrap_or(0),
        memory_clock_mhz: device.clock_info(Clock::Memory).unwrap_or(0),
        fan_percent: if fans > 0 {
            device.fan_speed(0).map_or(0.0, f64::from)
        } else {
            0.0
        },
        throttle_reasons: device.current_throttle_reasons().map_or(0, |r| r.bits()),
        ecc_errors_corrected: device
            .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
            .unwrap_or(0),
        ecc_errors_uncorrected: device
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            .unwrap_or(0),
        process_count: device
            .running_compute_processes()
            .map_or(0, |p| p.len() as u32),
        source: "nvml".into(),
        mig_devices: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without an NVIDIA driver (CI), the collector is simply absent.
    #[test]
    fn without_a_driver_the_collector_is_disabled() {
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            // A real GPU machine: the collector must come up and see its GPUs.
            let c = GpuCollector::new().expect("NVML loads where the NVIDIA driver runs");
            assert!(!c.sample().is_empty());
        } else {
            assert!(GpuCollector::new().is_none());
        }
    }
}
