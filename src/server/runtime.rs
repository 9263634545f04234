//! Building a monoio runtime with the io driver the config asks for.
//!
//! `auto` probes io_uring once (it is refused under some seccomp profiles and when
//! `kernel.io_uring_disabled` is set) and falls back to epoll; the caller logs which one runs.

use std::io;

use monoio::{FusionRuntime, IoUringDriver, LegacyDriver, time::TimeDriver};

use crate::config::Driver;

/// A monoio runtime on either driver, with timers.
pub type Runtime = FusionRuntime<TimeDriver<IoUringDriver>, TimeDriver<LegacyDriver>>;

/// The driver a runtime ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    IoUring,
    Epoll,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::IoUring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// Which driver `driver` resolves to on this machine.
pub fn resolve(driver: Driver) -> io::Result<DriverKind> {
    match driver {
        Driver::Epoll => Ok(DriverKind::Epoll),
        Driver::IoUring if monoio::utils::detect_uring() => Ok(DriverKind::IoUring),
        Driver::IoUring => Err(io::Error::other(
            "server.driver is io_uring but the kernel refuses io_uring \
             (seccomp or kernel.io_uring_disabled); use auto or epoll",
        )),
        Driver::Auto if monoio::utils::detect_uring() => Ok(DriverKind::IoUring),
        Driver::Auto => Ok(DriverKind::Epoll),
    }
}

/// The settings of a worker's ring. Each ring is used by its own thread only (SINGLE_ISSUER),
/// and the kernel work that posts a completion waits for the thread's next entry into the
/// kernel (COOP_TASKRUN) instead of interrupting it: monoio enters the kernel on every turn of
/// its loop anyway, and this took 15-20% off loraplex's CPU per proxied request
/// (`docs/hotpath.md`). DEFER_TASKRUN is not set: monoio submits without asking for
/// completions while it has ready tasks, which would hold them back.
fn ring_builder() -> io_uring::Builder {
    let mut urb = io_uring::IoUring::builder();
    urb.setup_coop_taskrun().setup_single_issuer();
    urb
}

/// Build a runtime for the current thread.
pub fn build(kind: DriverKind) -> io::Result<Runtime> {
    // 4096 entries: room for every connection's in-flight read plus writes on a busy core.
    Ok(match kind {
        DriverKind::IoUring => {
            let uring = |urb| {
                monoio::RuntimeBuilder::<IoUringDriver>::new()
                    .with_entries(4096)
                    .uring_builder(urb)
                    .enable_timer()
                    .build()
            };
            match uring(ring_builder()) {
                Ok(rt) => rt.into(),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring without COOP_TASKRUN and SINGLE_ISSUER \
                        (they need Linux 6.0): each completion interrupts its worker");
                    uring(io_uring::IoUring::builder())?.into()
                }
            }
        }
        DriverKind::Epoll => monoio::RuntimeBuilder::<LegacyDriver>::new()
            .with_entries(4096)
            .enable_timer()
            .build()?
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker ring takes the cheaper flags on a kernel that has them (6.0 and later).
    #[test]
    fn worker_rings_are_single_issuer_with_cooperative_task_running() {
        if !monoio::utils::detect_uring() {
            eprintln!("SKIPPED: io_uring is refused on this machine");
            return;
        }
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let major: u32 = release.split('.').next().unwrap().parse().unwrap();
        let ring = ring_builder().build(8);
        if major < 6 {
            assert!(
                ring.is_err(),
                "a kernel before 6.0 took the flags: {release}"
            );
            return;
        }
        let ring = ring.expect("the tuned ring");
        assert!(ring.params().is_setup_single_issuer());
        // And a whole worker runtime builds on it and runs.
        let mut rt = build(DriverKind::IoUring).unwrap();
        assert_eq!(rt.block_on(async { 7 }), 7);
    }
}
