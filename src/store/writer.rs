//! The storage thread: a monoio runtime (io_uring, epoll fallback) that writes fetched files
//! into a temp directory and publishes it.
//!
//! A fetch sends a [`WriteJob`]: a bounded channel of [`Msg`]s (`File`, `Data`, ..., `Commit`)
//! and a oneshot for the result. Each file is written by a [`FileWriter`] with O_DIRECT (the
//! page cache is skipped: a 1 GB adapter does not evict the node's hot pages), fsynced and
//! closed. On `Commit` the temp directory is
//! fsynced and renamed into place ([`fsops::publish`]). If the channel closes without
//! `Commit`, or a write fails, the temp directory is removed and the result says why.
//!
//! Where O_DIRECT is refused (EINVAL at open), files are written buffered and fsynced; the
//! mode shows in the store's stats. On the epoll driver monoio runs file operations inline,
//! which is fine on this dedicated thread.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{
    file_writer::{Faults, FileWriter, Shared, storage_error},
    fsops::{self, Published},
    index::StoredFile,
};
use crate::{
    config::Driver,
    error::{Error, ErrorKind},
};

/// Messages buffered between an origin and the writer (each `Data` is at most a few MiB).
pub const CHANNEL: usize = 16;

/// How adapter files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    Direct,
    Buffered,
}

impl WriteMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteMode::Direct => "direct",
            WriteMode::Buffered => "buffered",
        }
    }
}

/// One message of a write job.
pub enum Msg {
    /// Start a file (a path relative to the adapter directory) and the size the origin
    /// announced, if any; ends the previous one.
    File(String, Option<u64>),
    Data(Bytes),
    /// All files sent: make them durable and publish the directory at this path.
    Commit(PathBuf),
}

/// What a committed job did.
#[derive(Debug)]
pub struct Committed {
    /// Every file written, with its length.
    pub files: Vec<StoredFile>,
    pub published: Published,
}

impl Committed {
    /// Bytes of all files written.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// The sending side of a write job, and its result.
pub type JobHandle = (
    mpsc::Sender<Msg>,
    oneshot::Receiver<Result<Committed, Error>>,
);

struct WriteJob {
    root: PathBuf,
    dir: PathBuf,
    rx: mpsc::Receiver<Msg>,
    done: oneshot::Sender<Result<Committed, Error>>,
}

/// Handle to the storage thread.
pub struct Writer {
    jobs: Mutex<Option<mpsc::UnboundedSender<WriteJob>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    driver: &'static str,
}

impl Writer {
    /// Start the storage thread on `driver`, writing `direct` (O_DIRECT) when allowed.
    pub fn start(driver: Driver, direct: bool, faults: Arc<Faults>) -> io::Result<Writer> {
        let shared = Arc::new(Shared {
            direct: AtomicBool::new(direct),
            faults,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("loraplex-storage".into())
            .spawn(move || run_thread(driver, rx, sh, ready_tx))?;
        let driver = ready_rx
            .recv()
            .map_err(|_| io::Error::other("storage thread died at start"))??;
        Ok(Writer {
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            shared,
            driver,
        })
    }

    pub fn mode(&self) -> WriteMode {
        if self.shared.direct.load(Ordering::Relaxed) {
            WriteMode::Direct
        } else {
            WriteMode::Buffered
        }
    }

    /// `io_uring` or `epoll`.
    pub fn driver(&self) -> &'static str {
        self.driver
    }

    /// Start writing a new temp directory `dir` (inside `root`). Send the files on the
    /// returned channel, then `Commit`; drop the sender to abort. The oneshot gives the result.
    pub fn begin(&self, root: &Path, dir: PathBuf) -> Result<JobHandle, Error> {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let (done, done_rx) = oneshot::channel();
        let job = WriteJob {
            root: root.to_owned(),
            dir,
            rx,
            done,
        };
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        match jobs.as_ref().map(|j| j.send(job)) {
            Some(Ok(())) => Ok((tx, done_rx)),
            _ => Err(Error::new(
                ErrorKind::Unavailable,
                "the storage thread is stopped",
            )),
        }
    }

    /// Stop the storage thread (jobs in flight are abandoned; their temp dirs are removed
    /// at the next start).
    pub fn shutdown(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn run_thread(
    driver: Driver,
    rx: mpsc::UnboundedReceiver<WriteJob>,
    shared: Arc<Shared>,
    ready: std::sync::mpsc::Sender<io::Result<&'static str>>,
) {
    let uring = || {
        if monoio::utils::detect_uring() {
            "io_uring"
        } else {
            "epoll"
        }
    };
    match driver {
        Driver::Auto => match monoio::RuntimeBuilder::<monoio::FusionDriver>::new().build() {
            Ok(mut rt) => {
                let _ = ready.send(Ok(uring()));
                rt.block_on(serve(rx, shared));
            }
            Err(e) => drop(ready.send(Err(e))),
        },
        Driver::IoUring => match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().build() {
            Ok(mut rt) => {
                let _ = ready.send(Ok("io_uring"));
                rt.block_on(serve(rx, shared));
            }
            Err(e) => drop(ready.send(Err(e))),
        },
        Driver::Epoll => match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build() {
            Ok(mut rt) => {
                let _ = ready.send(Ok("epoll"));
                rt.block_on(serve(rx, shared));
            }
            Err(e) => drop(ready.send(Err(e))),
        },
    }
}

async fn serve(mut rx: mpsc::UnboundedReceiver<WriteJob>, shared: Arc<Shared>) {
    while let Some(job) = rx.recv().await {
        monoio::spawn(run_job(job, shared.clone()));
    }
}

async fn run_job(job: WriteJob, shared: Arc<Shared>) {
    let WriteJob {
        root,
        dir,
        mut rx,
        done,
    } = job;
    let res = write_dir(&root, &dir, &mut rx, &shared).await;
    // Close the channel first so a sender blocked on a full channel learns at once.
    drop(rx);
    if res.is_err()
        && let Err(e) = fsops::remove_tree(&dir)
    {
        tracing::error!(dir = %dir.display(), error = %e, "removing a failed fetch's temp dir");
    }
    let _ = done.send(res);
}

async fn write_dir(
    root: &Path,
    dir: &Path,
    rx: &mut mpsc::Receiver<Msg>,
    shared: &Shared,
) -> Result<Committed, Error> {
    std::fs::create_dir(dir).map_err(|e| storage_error(e, "creating the temp dir"))?;
    let mut dirs = vec![dir.to_owned()];
    let mut current: Option<(FileWriter, String)> = None;
    let mut files = Vec::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::File(rel, size) => {
                if let Some((f, path)) = current.take() {
                    files.push(StoredFile {
                        size: f.finish().await?,
                        path,
                    });
                }
                let path = dir.join(&rel);
                let parent = path.parent().unwrap_or(dir).to_owned();
                if !dirs.contains(&parent) {
                    std::fs::create_dir_all(&parent).map_err(|e| storage_error(e, &rel))?;
                    dirs.push(parent);
                }
                current = Some((FileWriter::create(path, size, shared).await?, rel));
            }
            Msg::Data(b) => match current.as_mut() {
                Some((f, _)) => f.write(&b).await?,
                None => return Err(Error::internal("writer: data before any file")),
            },
            Msg::Commit(target) => {
                if let Some((f, path)) = current.take() {
                    files.push(StoredFile {
                        size: f.finish().await?,
                        path,
                    });
                }
                // Deepest first: a subdirectory's entry lives in its parent.
                for d in dirs.iter().rev() {
                    fsops::fsync_dir(d).map_err(|e| storage_error(e, "fsync of the temp dir"))?;
                }
                let published = fsops::publish(root, dir, &target)
                    .map_err(|e| storage_error(e, "publishing the adapter"))?;
                return Ok(Committed { files, published });
            }
        }
    }
    Err(Error::internal("fetch aborted before commit"))
}
