//! One file written by the storage thread: data copied into 4096-aligned 2 MiB buffers,
//! written with O_DIRECT at increasing offsets with up to [`DEPTH`] writes in flight (each
//! write a local task; its buffer comes back for reuse), the tail zero-padded and then cut
//! back with `ftruncate`, the file fsynced and closed. Where O_DIRECT is refused at open
//! (EINVAL), the file is written buffered (exact lengths, no padding) and fsynced.

use std::{
    cell::RefCell,
    collections::VecDeque,
    io,
    os::fd::AsRawFd,
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
    },
};

use monoio::{fs::File, task::JoinHandle as TaskHandle};

use super::aligned::{ALIGN, AlignedBuf};
use crate::error::{Error, ErrorKind};

/// Bytes per write.
pub const BUF: usize = 2 << 20;
/// Writes in flight per file.
pub const DEPTH: usize = 4;
/// Aligned buffers kept for reuse by the storage thread.
const POOL: usize = 2 * DEPTH;

/// Fault injection for tests: refuse O_DIRECT, or fail writes with an errno after some bytes.
#[derive(Debug, Default)]
pub struct Faults {
    pub refuse_direct: AtomicBool,
    errno: AtomicI32,
    after: AtomicU64,
}

impl Faults {
    /// Fail every write once `after` more bytes have been written, with `errno`.
    pub fn fail_writes(&self, errno: i32, after: u64) {
        self.after.store(after, Ordering::SeqCst);
        self.errno.store(errno, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.errno.store(0, Ordering::SeqCst);
    }

    pub(super) fn check(&self, n: usize) -> io::Result<()> {
        let errno = self.errno.load(Ordering::SeqCst);
        if errno == 0 {
            return Ok(());
        }
        let left = self.after.load(Ordering::SeqCst);
        if left >= n as u64 {
            self.after.fetch_sub(n as u64, Ordering::SeqCst);
            return Ok(());
        }
        Err(io::Error::from_raw_os_error(errno))
    }
}

/// What the storage thread's file writers share: whether O_DIRECT is still allowed (the first
/// refusal turns it off for good), and the test faults.
pub(super) struct Shared {
    pub(super) direct: AtomicBool,
    pub(super) faults: Arc<Faults>,
}

/// An I/O error as the user sees it: 507 for a full disk, 502 otherwise.
pub fn storage_error(e: io::Error, what: &str) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::new(
            ErrorKind::InsufficientStorage,
            format!("no space left on the storage device ({what})"),
        ),
        _ => Error::new(
            ErrorKind::BadGateway,
            format!("storage I/O error ({what}): {e}"),
        ),
    }
}

thread_local! {
    static BUFFERS: RefCell<Vec<AlignedBuf>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> AlignedBuf {
    BUFFERS
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| AlignedBuf::new(BUF))
}

fn give_buf(mut b: AlignedBuf) {
    b.clear();
    BUFFERS.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL {
            p.push(b);
        }
    });
}

type WriteTask = TaskHandle<(io::Result<()>, AlignedBuf)>;

/// One file being written.
pub struct FileWriter {
    file: Rc<File>,
    path: PathBuf,
    direct: bool,
    buf: Option<AlignedBuf>,
    inflight: VecDeque<WriteTask>,
    /// Offset of the next write.
    offset: u64,
    /// Bytes accepted (the file's true length).
    len: u64,
    faults: Arc<Faults>,
}

impl FileWriter {
    pub async fn create(
        path: PathBuf,
        size: Option<u64>,
        shared: &Shared,
    ) -> Result<FileWriter, Error> {
        let mut direct = shared.direct.load(Ordering::Relaxed);
        let what = path.display().to_string();
        let file = loop {
            let mut opts = monoio::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            if direct {
                if shared.faults.refuse_direct.load(Ordering::Relaxed) {
                    // As tmpfs on older kernels answers O_DIRECT.
                    direct = false;
                    shared.direct.store(false, Ordering::Relaxed);
                    continue;
                }
                opts.custom_flags(libc::O_DIRECT);
            }
            match opts.open(&path).await {
                Ok(f) => break f,
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(path = %what, "O_DIRECT refused by the filesystem; writing buffered + fsync");
                    direct = false;
                    shared.direct.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(storage_error(e, &what)),
            }
        };
        if direct && let Some(size) = size.filter(|s| *s > 0) {
            // Allocate the whole file up front (its padded length; `finish` cuts it to the
            // bytes written): the O_DIRECT writes then land in place instead of extending the
            // file one buffer at a time, and a full disk shows before any byte is fetched.
            let len = size.next_multiple_of(ALIGN as u64);
            // SAFETY: a valid open fd.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
            if rc != 0 {
                // A filesystem without fallocate just gets the writes as before.
                let e = io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) {
                    return Err(storage_error(e, &what));
                }
            }
        }
        Ok(FileWriter {
            file: Rc::new(file),
            path,
            direct,
            buf: Some(take_buf()),
            inflight: VecDeque::new(),
            offset: 0,
            len: 0,
            faults: shared.faults.clone(),
        })
    }

    fn err(&self, e: io::Error) -> Error {
        storage_error(e, &self.path.display().to_string())
    }

    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let buf = self.buf.as_mut().expect("a buffer between writes");
            let n = buf.fill(data);
            data = &data[n..];
            self.len += n as u64;
            if buf.is_full() {
                let full = self.buf.take().expect("checked");
                self.submit(full)?;
                self.buf = Some(if self.inflight.len() < DEPTH {
                    take_buf()
                } else {
                    self.reap_one().await?
                });
            }
        }
        Ok(())
    }

    /// Start writing `buf` at the current offset.
    fn submit(&mut self, buf: AlignedBuf) -> Result<(), Error> {
        self.faults.check(buf.len()).map_err(|e| self.err(e))?;
        let file = self.file.clone();
        let at = self.offset;
        self.offset += buf.len() as u64;
        self.inflight.push_back(monoio::spawn(
            async move { file.write_all_at(buf, at).await },
        ));
        Ok(())
    }

    /// Wait for the oldest write; its buffer comes back for reuse.
    async fn reap_one(&mut self) -> Result<AlignedBuf, Error> {
        let task = self.inflight.pop_front().expect("a write in flight");
        let (res, mut buf) = task.await;
        res.map_err(|e| self.err(e))?;
        buf.clear();
        Ok(buf)
    }

    /// Write the tail, wait for every write, fix the length, fsync, close. Returns the length.
    pub async fn finish(mut self) -> Result<u64, Error> {
        let mut tail = self.buf.take().expect("a buffer between writes");
        let mut first_err = None;
        if !tail.is_empty() {
            if self.direct {
                tail.pad_to_align();
            }
            if let Err(e) = self.submit(tail) {
                first_err = Some(e);
            }
        } else {
            give_buf(tail);
        }
        while !self.inflight.is_empty() {
            match self.reap_one().await {
                Ok(b) => give_buf(b),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if self.direct {
            // SAFETY: a valid open fd; cutting to the true length drops the padding of the
            // tail and whatever `create` allocated beyond the bytes that came.
            let rc = unsafe { libc::ftruncate(self.file.as_raw_fd(), self.len as libc::off_t) };
            if rc != 0 {
                return Err(self.err(io::Error::last_os_error()));
            }
        }
        self.file.sync_all().await.map_err(|e| self.err(e))?;
        if let Ok(f) = Rc::try_unwrap(self.file) {
            f.close()
                .await
                .map_err(|e| storage_error(e, &self.path.display().to_string()))?;
        }
        Ok(self.len)
    }
}
