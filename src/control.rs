//! The control plane: a small tokio runtime on its own threads, for the libraries that need
//! tokio (origin clients, discovery, health polling, talking to vLLM's admin API).
//!
//! Data-plane workers are monoio threads. They hand work to the control plane with
//! [`Control::run`] and await the answer; the future returned is runtime-agnostic (a tokio
//! oneshot), and monoio's `sync` feature lets a tokio thread wake a monoio task. A task that
//! panics answers its waiter with an internal error (a 500), never a panic of the worker.

use std::{any::Any, future::Future, io, panic::AssertUnwindSafe};

use futures_util::FutureExt;
use tokio::runtime::{Builder, Handle, Runtime};

use crate::error::Error;

/// Owns the control-plane runtime. Dropping it shuts the runtime down.
pub struct ControlPlane {
    runtime: Option<Runtime>,
}

/// A cheap, clonable handle to spawn work on the control plane from any thread.
#[derive(Clone, Debug)]
pub struct Control {
    handle: Handle,
}

impl ControlPlane {
    /// Start the runtime with `threads` worker threads (1-2 is plenty).
    pub fn start(threads: usize) -> io::Result<ControlPlane> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("loraplex-ctl")
            .enable_all()
            .build()?;
        Ok(ControlPlane {
            runtime: Some(runtime),
        })
    }

    pub fn control(&self) -> Control {
        Control {
            handle: self
                .runtime
                .as_ref()
                .expect("runtime is live")
                .handle()
                .clone(),
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Control {
    /// Wrap the current tokio runtime (tests and tools that already run inside tokio).
    pub fn current() -> Control {
        Control {
            handle: Handle::current(),
        }
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Run `fut` on the control plane and await its output from any runtime (monoio included).
    /// Dropping the returned future does not cancel `fut`: work that others may wait on (a
    /// fetch) must survive one waiter going away. If `fut` panics, or the runtime stops before
    /// it ends, the waiter gets an internal error.
    pub fn run<F>(&self, fut: F) -> impl Future<Output = Result<F::Output, Error>> + use<F>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.handle.spawn(async move {
            let out = AssertUnwindSafe(fut).catch_unwind().await;
            let _ = tx.send(out.map_err(panic_message));
        });
        async move {
            match rx.await {
                Ok(Ok(out)) => Ok(out),
                Ok(Err(why)) => {
                    tracing::error!(panic = %why, "a control-plane task panicked");
                    Err(Error::internal(format!(
                        "a control-plane task failed: {why}"
                    )))
                }
                Err(_) => Err(Error::internal("the control plane stopped")),
            }
        }
    }

    /// Fire and forget.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(fut);
    }
}

/// What a panic said (`panic!("...")` payloads are `&str` or `String`).
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "a panic".to_owned(), |s| (*s).to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monoio_task_awaits_control_plane_work() {
        let cp = ControlPlane::start(1).unwrap();
        let control = cp.control();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        let out = rt.block_on(async move {
            control
                .run(async {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    41 + 1
                })
                .await
        });
        assert_eq!(out, Ok(42));
    }

    #[test]
    fn a_panicking_task_is_an_internal_error_for_its_waiter() {
        let cp = ControlPlane::start(1).unwrap();
        let control = cp.control();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async move {
            for round in 0..3 {
                let e = control
                    .run(async move {
                        if round < 3 {
                            panic!("boom {round}");
                        }
                    })
                    .await
                    .unwrap_err();
                assert_eq!(e.status(), 500);
                assert!(
                    e.message.contains(&format!("boom {round}")),
                    "{}",
                    e.message
                );
                // The control plane keeps its threads, the waiter its runtime.
                assert_eq!(control.run(async { 7 }).await, Ok(7));
            }
        });
        drop(cp);
    }
}
