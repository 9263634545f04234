//! A worker's own view of shutdown, for its idle connections.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
};

/// A worker's own view of shutdown, for its idle connections: waiting on it costs no atomic
/// and no cross-thread registration (one per keep-alive wait adds up at 50k requests/s).
/// The worker's accept loop calls [`Closing::close`] when the process shuts down.
#[derive(Default)]
pub struct Closing {
    closed: Cell<bool>,
    next: Cell<u64>,
    waiters: RefCell<Vec<(u64, Waker)>>,
}

impl Closing {
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Wake every waiter; later waits resolve at once.
    pub fn close(&self) {
        self.closed.set(true);
        for (_, w) in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves when the worker closes.
    pub fn wait(&self) -> ClosingWait<'_> {
        let id = self.next.get();
        self.next.set(id + 1);
        ClosingWait {
            closing: self,
            id,
            registered: false,
        }
    }
}

pub struct ClosingWait<'a> {
    closing: &'a Closing,
    id: u64,
    registered: bool,
}

impl Future for ClosingWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.closing.closed.get() {
            return Poll::Ready(());
        }
        let id = self.id;
        let mut waiters = self.closing.waiters.borrow_mut();
        match waiters.iter_mut().find(|(i, _)| *i == id) {
            Some((_, w)) => w.clone_from(cx.waker()),
            None => waiters.push((id, cx.waker().clone())),
        }
        drop(waiters);
        self.registered = true;
        Poll::Pending
    }
}

impl Drop for ClosingWait<'_> {
    fn drop(&mut self) {
        if self.registered {
            let mut waiters = self.closing.waiters.borrow_mut();
            if let Some(pos) = waiters.iter().position(|(i, _)| *i == self.id) {
                waiters.swap_remove(pos);
            }
        }
    }
}
