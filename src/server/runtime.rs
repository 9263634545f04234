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

/// Build a runtime for the current thread.
pub fn build(kind: DriverKind) -> io::Result<Runtime> {
    // 4096 entries: room for every connection's in-flight read plus writes on a busy core.
    Ok(match kind {
        DriverKind::IoUring => monoio::RuntimeBuilder::<IoUringDriver>::new()
            .with_entries(4096)
            .enable_timer()
            .build()?
            .into(),
        DriverKind::Epoll => monoio::RuntimeBuilder::<LegacyDriver>::new()
            .with_entries(4096)
            .enable_timer()
            .build()?
            .into(),
    })
}
