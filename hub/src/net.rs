//! Listening sockets and the process limits a fleet's connections need.
//!
//! A hub restart is a connection storm: every device reconnects within its backoff window.
//! [`listen`] gives each port an accept queue as deep as the system allows (`somaxconn`), so a
//! storm waits in the kernel instead of overflowing it, and [`OpenFiles::raise`] lifts the
//! soft open-files limit to the hard one, since every connected device holds a descriptor.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// The accept queue asked for when the system's `somaxconn` cannot be read. The kernel caps
/// it at `somaxconn` anyway.
const DEFAULT_BACKLOG: u32 = 4096;

/// Descriptors the hub keeps for itself (store files, listeners, sinks, job logs, clients of
/// peer servers): what is left of the limit is for devices.
pub const RESERVED_FDS: u64 = 256;

/// The accept queue length the kernel allows (`/proc/sys/net/core/somaxconn`).
pub fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_BACKLOG)
}

/// Binds `addr` (`HOST:PORT`, names resolved) with an accept queue of [`somaxconn`] entries
/// and `SO_REUSEADDR`, so a restarted hub takes its port back at once.
pub async fn listen(addr: &str) -> io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        match listen_on(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(somaxconn())
}

/// The process's open-files limit, as found and after [`OpenFiles::raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit before raising.
    pub was: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit, the most an unprivileged process may raise to.
    pub hard: u64,
}

impl OpenFiles {
    /// Raises the soft open-files limit to the hard limit; returns both. An unlimited hard
    /// limit is raised to as far as the kernel allows (`/proc/sys/fs/nr_open`).
    pub fn raise() -> io::Result<Self> {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let now = getrlimit(Resource::Nofile);
        let was = now.current.unwrap_or(u64::MAX);
        let hard = now.maximum.unwrap_or_else(nr_open);
        if was >= hard {
            return Ok(Self {
                was,
                soft: was,
                hard,
            });
        }
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: now.maximum,
            },
        )?;
        Ok(Self {
            was,
            soft: hard,
            hard,
        })
    }

    /// How many devices can be connected at once within the soft limit.
    pub fn devices(&self) -> u64 {
        self.soft.saturating_sub(RESERVED_FDS)
    }

    /// Logs the limit and what it allows; warns when the fleet the hub knows is bigger.
    pub fn report(&self, known_devices: usize) {
        tracing::info!(
            open_files = self.soft,
            was = self.was,
            hard = self.hard,
            devices = self.devices(),
            "open-files limit allows about this many connected devices"
        );
        if known_devices as u64 > self.devices() {
            tracing::warn!(
                open_files = self.soft,
                devices_allowed = self.devices(),
                devices_known = known_devices,
                "the open-files limit is lower than the fleet: raise LimitNOFILE (systemd) or `ulimit -Hn` (see docs/scaling.md)"
            );
        }
    }
}

/// The kernel's ceiling on a process's descriptors.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_gets_its_port_back_after_a_restart() {
        let first = listen("127.0.0.1:0").await.unwrap();
        let addr = first.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (served, _) = first.accept().await.unwrap();
        // The hub's side closes first, as when it is killed: its end waits in TIME_WAIT.
        drop(served);
        drop(first);
        drop(client);
        let again = listen(&addr.to_string()).await.unwrap();
        assert_eq!(again.local_addr().unwrap(), addr);
    }

    /// A storm waits in the accept queue: 1,500 connections (more than the 1,024 a default
    /// listener queues) all complete their handshakes while nothing accepts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storm_waits_in_an_accept_queue_as_deep_as_somaxconn() {
        const STORM: usize = 1500;
        assert!(
            somaxconn() as usize > STORM,
            "net.core.somaxconn is {}; this test needs more than {STORM}",
            somaxconn()
        );
        OpenFiles::raise().unwrap();
        let listener = listen("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..STORM).map(|_| {
            tokio::time::timeout(
                std::time::Duration::from_secs(3),
                tokio::net::TcpStream::connect(addr),
            )
        });
        let results = futures::future::join_all(connects).await;
        let up = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(up, STORM, "every connection waits in the queue");
        drop(listener);
    }

    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let files = OpenFiles::raise().unwrap();
        assert_eq!(files.soft, files.hard);
        assert!(files.was <= files.soft);
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(now.current, Some(files.soft));
        assert_eq!(files.devices(), files.soft - RESERVED_FDS);
    }
}
