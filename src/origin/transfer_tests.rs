//! Tests of the transfer: resume with `Range` (honoured or ignored), retries, checksums (the
//! manifest's and an announced one), and the `min_rate` floor on tokio's paused clock.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use futures_util::{FutureExt, future::BoxFuture, stream};

use super::*;
use crate::{config::TransferConfig, origin::FileStream};

/// An origin serving one in-memory file in 7-byte chunks, failing the first `cuts` opens
/// after `cut_at` bytes, honouring offsets only when `ranges`, announcing `announce` as the
/// file's SHA-256, and waiting `pace` before each chunk.
struct Flaky {
    data: Bytes,
    cuts: AtomicU32,
    cut_at: usize,
    ranges: bool,
    opens: AtomicU32,
    announce: Option<[u8; 32]>,
    pace: Option<Duration>,
    cfg: TransferConfig,
    offsets: std::sync::Mutex<Vec<u64>>,
}

impl Origin for Flaky {
    fn kind(&self) -> &'static str {
        "test"
    }
    fn describe(&self) -> String {
        "test flaky".into()
    }
    fn transfer(&self) -> TransferConfig {
        self.cfg.clone()
    }
    fn head<'a>(
        &'a self,
        _: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
        async { Ok(None) }.boxed()
    }
    fn manifest<'a>(&'a self, _: &'a AdapterName) -> BoxFuture<'a, Result<Manifest, OriginError>> {
        unreachable!()
    }
    fn open<'a>(
        &'a self,
        _: &'a AdapterName,
        _: &'a Manifest,
        _: &'a FileSpec,
        offset: u64,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        self.opens.fetch_add(1, Ordering::SeqCst);
        self.offsets.lock().unwrap().push(offset);
        let start = if self.ranges { offset as usize } else { 0 };
        let rest = self.data.slice(start..);
        let cut = self
            .cuts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
            .is_ok();
        let mut items: Vec<Result<Bytes, OriginError>> = rest
            .chunks(7)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        if cut {
            let keep = self.cut_at.div_ceil(7).min(items.len());
            items.truncate(keep);
            items.push(Err(OriginError::transient("connection reset")));
        }
        let pace = self.pace;
        let body = stream::iter(items).then(move |item| async move {
            if let Some(pace) = pace {
                tokio::time::sleep(pace).await;
            }
            item
        });
        async move {
            Ok(FileStream {
                offset: start as u64,
                total: Some(self.data.len() as u64),
                sha256: self.announce,
                body: body.boxed(),
            })
        }
        .boxed()
    }
}

struct Collect(Vec<u8>);
impl ChunkSink for Collect {
    async fn accept(&mut self, chunk: Bytes) -> Result<(), TransferError> {
        self.0.extend_from_slice(&chunk);
        Ok(())
    }
}

fn data() -> Bytes {
    (0..1000u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

async fn run(o: &Flaky, sha: Option<[u8; 32]>) -> (Result<Transferred, TransferError>, Vec<u8>) {
    let name = AdapterName::parse("a").unwrap();
    let m = Manifest {
        files: vec![],
        etag: None,
        ..Default::default()
    };
    let spec = FileSpec {
        path: "w".into(),
        size: Some(1000),
        sha256: sha,
        crc: None,
        validator: None,
    };
    let mut sink = Collect(Vec::new());
    let r = pull_file(o, &name, &m, &spec, &mut sink).await;
    (r, sink.0)
}

fn flaky(cuts: u32, ranges: bool) -> Arc<Flaky> {
    Arc::new(Flaky {
        data: data(),
        cuts: AtomicU32::new(cuts),
        cut_at: 400,
        ranges,
        opens: AtomicU32::new(0),
        announce: None,
        pace: None,
        cfg: TransferConfig::default(),
        offsets: Default::default(),
    })
}

/// An origin that sends 7 bytes every second (7 B/s), checked against `min_rate`.
fn crawling(min_rate: Option<u64>) -> Flaky {
    let mut o = Arc::into_inner(flaky(0, true)).unwrap();
    o.pace = Some(Duration::from_secs(1));
    o.cfg.min_rate = min_rate;
    o
}

#[tokio::test]
async fn resumes_with_range_and_verifies() {
    let o = flaky(2, true);
    let want: [u8; 32] = Sha256::digest(data()).into();
    let (r, got) = run(&o, Some(want)).await;
    let t = r.unwrap();
    assert_eq!(got, data().to_vec());
    assert_eq!((t.bytes, t.retries, t.sha256), (1000, 2, Some(want)));
    assert_eq!(o.opens.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn restarts_when_range_is_ignored() {
    let o = flaky(1, false);
    let (r, got) = run(&o, None).await;
    assert_eq!(r.unwrap().retries, 1);
    assert_eq!(got, data().to_vec());
}

#[tokio::test]
async fn gives_up_after_retries() {
    let o = flaky(10, true);
    let (r, _) = run(&o, None).await;
    match r {
        Err(TransferError::Origin(e)) => assert_eq!(e.kind, OriginErrorKind::Transient),
        other => panic!("{other:?}"),
    }
    assert_eq!(o.opens.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn sha_mismatch_is_invalid() {
    let o = flaky(0, true);
    let (r, _) = run(&o, Some([7; 32])).await;
    match r {
        Err(TransferError::Origin(e)) => {
            assert_eq!(e.kind, OriginErrorKind::Invalid);
            assert!(e.message.contains("sha256 mismatch"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_announced_sha256_is_checked_when_the_manifest_has_none() {
    let want: [u8; 32] = Sha256::digest(data()).into();
    let mut o = Arc::into_inner(flaky(1, true)).unwrap();
    o.announce = Some(want);
    let (r, got) = run(&o, None).await;
    let t = r.unwrap();
    assert_eq!(got, data().to_vec());
    assert_eq!(
        (t.retries, t.sha256),
        (1, Some(want)),
        "hashed across the resume"
    );

    let mut lying = Arc::into_inner(flaky(0, true)).unwrap();
    lying.announce = Some([7; 32]);
    match run(&lying, None).await.0 {
        Err(TransferError::Origin(e)) => {
            assert_eq!(e.kind, OriginErrorKind::Invalid);
            assert!(e.message.contains("sha256 mismatch"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // An announcement that contradicts the manifest is refused before any byte is used.
    let mut other = Arc::into_inner(flaky(0, true)).unwrap();
    other.announce = Some([7; 32]);
    match run(&other, Some(want)).await {
        (Err(TransferError::Origin(e)), got) => {
            assert_eq!(e.kind, OriginErrorKind::Invalid);
            assert!(e.message.contains("announces sha256"), "{e}");
            assert!(got.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_crawl_below_min_rate_is_a_stall_retried_with_range() {
    // 7 B/s against a floor of 100 B/s over the real 30 s window (on tokio's paused clock).
    let o = crawling(Some(100));
    let started = Instant::now();
    let (r, got) = run(&o, None).await;
    match r {
        Err(TransferError::Origin(e)) => {
            assert_eq!(e.kind, OriginErrorKind::Transient, "{e}");
            assert!(e.message.contains("slower than min_rate"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // 1 try + 3 retries, each cut when its first 30 s held 30 chunks (210 bytes) of the
    // 3000 needed, each resuming where the previous one stopped.
    let offsets = o.offsets.lock().unwrap().clone();
    assert_eq!(offsets, [0, 210, 420, 630]);
    assert_eq!(got, data()[..840].to_vec());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(120) && took < Duration::from_secs(140),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_transfer_above_min_rate_or_without_one_finishes() {
    for floor in [Some(5), None] {
        let o = crawling(floor);
        let (r, got) = run(&o, None).await;
        assert_eq!(r.unwrap().retries, 0, "{floor:?}");
        assert_eq!(got, data().to_vec());
    }
}

#[test]
fn sha_hex_roundtrip() {
    let d: [u8; 32] = Sha256::digest(b"x").into();
    assert_eq!(parse_sha256(&format!("\"{}\"", hex(&d))), Some(d));
    assert_eq!(parse_sha256("abc"), None);
}
