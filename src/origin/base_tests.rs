use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::{FutureExt, future::BoxFuture, stream};

use super::*;
use crate::origin::{FileSpec, FileStream, Manifest, Origin, OriginError};

/// An origin of adapter configs in memory: counts config reads, answers after `delay`
/// (`None`: never).
struct Configs {
    files: HashMap<&'static str, Result<Vec<u8>, OriginErrorKind>>,
    reads: AtomicUsize,
    delay: Option<Duration>,
}

impl Configs {
    fn new(files: &[(&'static str, Result<&str, OriginErrorKind>)]) -> Arc<Configs> {
        Arc::new(Configs {
            files: files
                .iter()
                .map(|(n, r)| (*n, r.map(|s| s.as_bytes().to_vec())))
                .collect(),
            reads: AtomicUsize::new(0),
            delay: Some(Duration::ZERO),
        })
    }

    fn slow(
        files: &[(&'static str, Result<&str, OriginErrorKind>)],
        delay: Option<Duration>,
    ) -> Arc<Configs> {
        let mut c = Arc::into_inner(Configs::new(files)).unwrap();
        c.delay = delay;
        Arc::new(c)
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    fn get(&self, name: &AdapterName) -> Result<Vec<u8>, OriginError> {
        match self.files.get(name.as_str()) {
            None => Err(OriginError::not_found(name.as_str())),
            Some(Ok(b)) => Ok(b.clone()),
            Some(Err(kind)) => Err(OriginError::new(*kind, "refused")),
        }
    }
}

impl Origin for Configs {
    fn kind(&self) -> &'static str {
        "http"
    }
    fn describe(&self) -> String {
        "memory".into()
    }
    fn head<'a>(
        &'a self,
        _: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
        async { Ok(None) }.boxed()
    }
    fn manifest<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Manifest, OriginError>> {
        async move {
            self.get(name)?;
            Ok(Manifest {
                files: vec![FileSpec::new(CONFIG_FILE, None)],
                etag: None,
                ..Default::default()
            })
        }
        .boxed()
    }
    fn open<'a>(
        &'a self,
        name: &'a AdapterName,
        _: &'a Manifest,
        _: &'a FileSpec,
        _: u64,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            match self.delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending::<()>().await,
            }
            let bytes = Bytes::from(self.get(name)?);
            Ok(FileStream {
                offset: 0,
                total: Some(bytes.len() as u64),
                sha256: None,
                body: stream::iter([Ok(bytes)]).boxed(),
            })
        }
        .boxed()
    }
}

fn name(s: &str) -> AdapterName {
    AdapterName::parse(s).unwrap()
}

fn bases(
    rules: &[(&str, &str)],
    origin: Option<Arc<Configs>>,
    dir: &std::path::Path,
    limits: Limits,
) -> Arc<BaseModels> {
    let rules: Vec<(String, String)> = rules
        .iter()
        .map(|(p, b)| (p.to_string(), b.to_string()))
        .collect();
    let chain = OriginChain::new(origin.into_iter().map(|o| o as Arc<dyn Origin>).collect());
    BaseModels::new(&rules, chain, dir.to_owned(), None, Control::current()).with_limits(limits)
}

async fn base_of(b: &Arc<BaseModels>, n: &str) -> Base {
    match b.lookup(&name(n), true) {
        Ok(base) => base,
        Err(waiter) => waiter.wait().await,
    }
}

fn known(s: &str) -> Base {
    Base::Known(Arc::from(s))
}

const M1: &str = r#"{"base_model_name_or_path": "org/m1", "r": 8, "peft_type": "LORA"}"#;

#[test]
fn parses_the_base_of_a_config() {
    let n = name("acme/a");
    assert_eq!(parse(&n, M1.as_bytes()), known("org/m1"));
    assert_eq!(
        parse(&n, br#"{"base_model_name_or_path": "  /models/m2 "}"#),
        known("/models/m2")
    );
    assert_eq!(parse(&n, br#"{"r": 8}"#), Base::Unknown);
    assert_eq!(
        parse(&n, br#"{"base_model_name_or_path": ""}"#),
        Base::Unknown
    );
    assert_eq!(
        parse(&n, br#"{"base_model_name_or_path": 3}"#),
        Base::Unknown
    );
    assert_eq!(parse(&n, b"not json"), Base::Unknown);
}

#[tokio::test]
async fn the_longest_prefix_wins_and_no_origin_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Configs::new(&[("acme/qwen-x", Ok(M1))]);
    let b = bases(
        &[
            ("acme/", "org/m1"),
            ("acme/qwen-", "org/m2"),
            ("", "org/default"),
        ],
        Some(origin.clone()),
        dir.path(),
        Limits::default(),
    );
    assert_eq!(base_of(&b, "acme/qwen-x").await, known("org/m2"));
    assert_eq!(base_of(&b, "acme/llama").await, known("org/m1"));
    assert_eq!(base_of(&b, "other/z").await, known("org/default"));
    // A rule wins over the adapter's own config (it may name its base otherwise).
    assert_eq!(origin.reads(), 0);
    let order: Vec<&str> = b.rules().map(|(p, _)| p).collect();
    assert_eq!(order, ["acme/qwen-", "acme/", ""]);
}

#[tokio::test]
async fn learnt_once_then_cached_until_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Configs::new(&[("acme/a", Ok(M1))]);
    let limits = Limits {
        ttl: Duration::from_millis(300),
        ..Limits::default()
    };
    let b = bases(&[], Some(origin.clone()), dir.path(), limits);
    assert_eq!(b.known("acme/a"), None);
    assert_eq!(base_of(&b, "acme/a").await, known("org/m1"));
    assert_eq!(b.known("acme/a"), Some(known("org/m1")));
    for _ in 0..5 {
        assert_eq!(base_of(&b, "acme/a").await, known("org/m1"));
    }
    assert_eq!(origin.reads(), 1, "cached");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.known("acme/a"), None, "expired");
    assert_eq!(base_of(&b, "acme/a").await, known("org/m1"));
    assert_eq!(origin.reads(), 2, "learnt again after the TTL");
}

#[tokio::test]
async fn one_learning_for_many_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Configs::slow(&[("acme/a", Ok(M1))], Some(Duration::from_millis(200)));
    let b = bases(&[], Some(origin.clone()), dir.path(), Limits::default());
    let all = futures_util::future::join_all((0..32).map(|_| base_of(&b, "acme/a"))).await;
    assert!(all.iter().all(|x| *x == known("org/m1")), "{all:?}");
    assert_eq!(origin.reads(), 1, "single flight");
}

#[tokio::test]
async fn a_silent_origin_bounds_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Configs::slow(&[("acme/a", Ok(M1))], None);
    let limits = Limits {
        learn_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let b = bases(&[], Some(origin.clone()), dir.path(), limits);
    let started = Instant::now();
    assert_eq!(base_of(&b, "acme/a").await, Base::Unknown);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The failure is kept briefly: the next request does not wait again.
    assert_eq!(b.known("acme/a"), Some(Base::Unknown));
}

#[tokio::test]
async fn missing_unknown_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Configs::new(&[
        ("acme/nobase", Ok(r#"{"r": 4}"#)),
        ("acme/denied", Err(OriginErrorKind::Auth)),
    ]);
    let b = bases(&[], Some(origin), dir.path(), Limits::default());
    assert_eq!(base_of(&b, "acme/none").await, Base::Missing);
    assert_eq!(base_of(&b, "acme/nobase").await, Base::Unknown);
    assert_eq!(base_of(&b, "acme/denied").await, Base::Unknown);
    // Without any origin nothing is known to be missing.
    let bare = bases(&[], None, dir.path(), Limits::default());
    assert_eq!(base_of(&bare, "acme/none").await, Base::Unknown);
}

#[tokio::test]
async fn a_stored_adapter_is_read_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let stored = dir.path().join("acme/a");
    std::fs::create_dir_all(&stored).unwrap();
    std::fs::write(
        stored.join(CONFIG_FILE),
        r#"{"base_model_name_or_path": "/models/m1"}"#,
    )
    .unwrap();
    let origin = Configs::new(&[("acme/a", Ok(M1))]);
    let b = bases(&[], Some(origin.clone()), dir.path(), Limits::default());
    assert_eq!(base_of(&b, "acme/a").await, known("/models/m1"));
    assert_eq!(origin.reads(), 0);
    // Too large a config is not read.
    let big = dir.path().join("acme/big");
    std::fs::create_dir_all(&big).unwrap();
    std::fs::write(big.join(CONFIG_FILE), vec![b' '; MAX_CONFIG + 1]).unwrap();
    assert_eq!(base_of(&b, "acme/big").await, Base::Unknown);
}

#[tokio::test]
async fn the_cache_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Configs::new(&[]);
    let limits = Limits {
        capacity: 40,
        ..Limits::default()
    };
    let b = bases(&[], Some(origin), dir.path(), limits);
    for i in 0..200 {
        base_of(&b, &format!("acme/a{i}")).await;
        assert!(b.cached_len() <= 40, "{}", b.cached_len());
    }
    // The newest answer is always kept.
    assert_eq!(b.known("acme/a199"), Some(Base::Missing));
}
