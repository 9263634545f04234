//! What every remote origin shares about moving bytes: the failure classes an origin reports,
//! and the retry schedule.
//!
//! A failure is classified once, where it happens, so the layers above can decide without
//! parsing messages: `NotFound` sends the chain on to the next origin, `Transient` and
//! `Timeout` are retried (with `Range` when bytes were already received), `Auth`, `Checksum`
//! and `Invalid` reject the adapter at once with a 502 whose message says why.

use std::{fmt, time::Duration};

use crate::{
    config::TransferConfig,
    error::{Error, ErrorKind},
};

/// Why an origin could not deliver an adapter. The `as_str` values are the `reason` label of
/// `loraplex_fetch_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailClass {
    /// The origin does not have this adapter (or this revision): try the next origin.
    NotFound,
    /// The origin refused our credentials (token missing, wrong, or without access).
    Auth,
    /// 5xx, connection reset, truncated body: worth another try.
    Transient,
    /// Connect timeout, or no byte for `idle_timeout` (a stall): worth another try.
    Timeout,
    /// The bytes do not match the checksum the origin announced.
    Checksum,
    /// The origin answered something unusable: a hostile key, a size mismatch, bad JSON,
    /// a repo without adapter weights.
    Invalid,
}

impl FailClass {
    pub const fn as_str(self) -> &'static str {
        match self {
            FailClass::NotFound => "not_found",
            FailClass::Auth => "auth",
            FailClass::Transient => "transient",
            FailClass::Timeout => "timeout",
            FailClass::Checksum => "checksum",
            FailClass::Invalid => "invalid",
        }
    }

    /// Whether the same request may succeed if sent again.
    pub const fn retryable(self) -> bool {
        matches!(self, FailClass::Transient | FailClass::Timeout)
    }
}

/// A classified origin failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError {
    pub class: FailClass,
    pub message: String,
}

impl FetchError {
    pub fn new(class: FailClass, message: impl Into<String>) -> Self {
        FetchError {
            class,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        FetchError::new(FailClass::NotFound, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        FetchError::new(FailClass::Invalid, message)
    }

    pub fn transient(message: impl Into<String>) -> Self {
        FetchError::new(FailClass::Transient, message)
    }

    /// Classify an HTTP status that is not a success. 404/410 are "not here"; 401/403 are
    /// authentication; 408/429/5xx are worth retrying; the rest are unusable answers.
    pub fn from_status(status: u16, what: impl fmt::Display) -> Self {
        match status {
            404 | 410 => FetchError::not_found(format!("{what}: not found ({status})")),
            401 | 403 => FetchError::new(
                FailClass::Auth,
                format!("{what}: authentication failed ({status})"),
            ),
            408 | 429 | 500..=599 => FetchError::transient(format!("{what}: answered {status}")),
            _ => FetchError::invalid(format!("{what}: unexpected status {status}")),
        }
    }

    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.class.as_str())
    }
}

impl std::error::Error for FetchError {}

impl From<FetchError> for Error {
    /// Not found stays a 404 (the chain turns the last one into vLLM's wording); a stall that
    /// outlived its retries is a 504; everything else the origin did wrong is a 502.
    fn from(e: FetchError) -> Self {
        let kind = match e.class {
            FailClass::NotFound => ErrorKind::NotFound,
            FailClass::Timeout => ErrorKind::Timeout,
            FailClass::Auth | FailClass::Transient | FailClass::Checksum | FailClass::Invalid => {
                ErrorKind::BadGateway
            }
        };
        Error::new(kind, e.message)
    }
}

/// Classify a reqwest error: timeouts and connection trouble are retryable; a body that could
/// not be decoded as JSON is an unusable answer.
pub fn classify_reqwest(e: &reqwest::Error, what: impl fmt::Display) -> FetchError {
    let class = if e.is_timeout() {
        FailClass::Timeout
    } else if e.is_decode() {
        FailClass::Invalid
    } else {
        FailClass::Transient
    };
    // `{:#}`-style chains are not available on reqwest errors; walk the sources so the
    // message names the real cause (connection refused, reset, ...).
    let mut message = format!("{what}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    FetchError::new(class, message)
}

/// How many times, and how long apart, a failed request or transfer is tried again.
///
/// Retries count *consecutive* failures without progress: a transfer that received bytes
/// since its last failure starts counting again, so a long download on a flaky link finishes
/// as long as it keeps moving. There is no total-time limit anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub retries: u32,
    /// Delay before the first retry; doubled each time, capped at `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// No byte for this long aborts the attempt (then retried).
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

impl RetryPolicy {
    pub fn from_transfer(t: &TransferConfig) -> Self {
        RetryPolicy {
            retries: t.retries,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            idle_timeout: t.idle_timeout,
            connect_timeout: t.connect_timeout,
        }
    }

    /// Same policy with another first delay (tests use a few milliseconds).
    pub fn with_base_delay(mut self, base: Duration) -> Self {
        self.base_delay = base;
        self.max_delay = self.max_delay.max(base);
        self
    }

    /// The delay before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.min(16);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// Run `op` until it succeeds, fails with a non-retryable class, or runs out of retries.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, FetchError>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if e.class.retryable() && attempt < self.retries => {
                    tracing::debug!(attempt, error = %e, "origin request failed, retrying");
                    tokio::time::sleep(self.delay(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert_eq!(FetchError::from_status(404, "x").class, FailClass::NotFound);
        assert_eq!(FetchError::from_status(403, "x").class, FailClass::Auth);
        assert_eq!(
            FetchError::from_status(503, "x").class,
            FailClass::Transient
        );
        assert_eq!(
            FetchError::from_status(429, "x").class,
            FailClass::Transient
        );
        assert_eq!(FetchError::from_status(418, "x").class, FailClass::Invalid);
        let e: Error = FetchError::from_status(401, "hub").into();
        assert_eq!(e.status(), 502);
        assert!(e.message.contains("authentication"), "{}", e.message);
        let e: Error = FetchError::not_found("gone").into();
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn delays_double_and_cap() {
        let p = RetryPolicy::from_transfer(&TransferConfig::default());
        assert_eq!(p.delay(0), Duration::from_millis(250));
        assert_eq!(p.delay(2), Duration::from_secs(1));
        assert_eq!(p.delay(10), Duration::from_secs(8));
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(8));
    }

    #[tokio::test]
    async fn run_retries_only_retryable_failures() {
        let p = RetryPolicy::from_transfer(&TransferConfig::default())
            .with_base_delay(Duration::from_millis(1));
        let calls = AtomicU32::new(0);
        let out = p
            .run(|| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(FetchError::transient("reset"))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(out, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        calls.store(0, Ordering::SeqCst);
        let out: Result<(), _> = p
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(FetchError::from_status(401, "hub"))
            })
            .await;
        assert_eq!(out.unwrap_err().class, FailClass::Auth);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        calls.store(0, Ordering::SeqCst);
        let out: Result<(), _> = p
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(FetchError::transient("503"))
            })
            .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4, "1 try + 3 retries");
    }
}
