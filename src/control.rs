//! The control plane: a small tokio runtime on its own threads, for the libraries that need
//! tokio (origin clients, discovery, health polling, talking to vLLM's admin API).
//!
//! Data-plane workers are monoio threads. They hand work to the control plane with
//! [`Control::run`] and await the answer; the future returned is runtime-agnostic (a tokio
//! oneshot), and monoio's `sync` feature lets a tokio thread wake a monoio task.

use std::{future::Future, io};

use tokio::runtime::{Builder, Handle, Runtime};

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
    /// fetch) must survive one waiter going away.
    pub fn run<F>(&self, fut: F) -> impl Future<Output = F::Output> + use<F>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        async move {
            rx.await
                .expect("control-plane task panicked or runtime stopped")
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
        assert_eq!(out, 42);
    }
}
