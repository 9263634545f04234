//! Faults the stand-in origin can inject, and how they shape an answer's body: an error status,
//! a connection cut after K body bytes, a stall after K bytes, a throttled rate.

use std::time::Duration;

use bytes::Bytes;

use super::server::{Framing, Piece, Response};

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Answer this status (with a short text body) instead of the file.
    Status(u16),
    /// Send the head (full length) and this many body bytes, then close the connection.
    CutAfter(u64),
    /// Pause this long after this many body bytes, then send the rest.
    StallAfter { bytes: u64, pause: Duration },
    /// Send the body at this many bytes per second.
    Throttle(u64),
}

/// A fault and which requests it hits: those for `path` (or any), after letting `skip` of them
/// through, `times` times (`None`: forever).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// `{name}/{file}` (no prefix); `None` matches every path.
    pub path: Option<String>,
    pub skip: u64,
    pub times: Option<u64>,
}

impl Fault {
    /// Hits the next matching request, once.
    pub fn new(kind: FaultKind) -> Fault {
        Fault {
            kind,
            path: None,
            skip: 0,
            times: Some(1),
        }
    }

    /// Only requests for `{name}/{file}`.
    pub fn on(mut self, rel_path: impl Into<String>) -> Fault {
        self.path = Some(rel_path.into());
        self
    }

    /// Hit the `n`-th matching request (1-based) rather than the next one.
    pub fn nth(mut self, n: u64) -> Fault {
        self.skip = n.saturating_sub(1);
        self
    }

    pub fn times(mut self, n: u64) -> Fault {
        self.times = Some(n);
        self
    }

    pub fn always(mut self) -> Fault {
        self.times = None;
        self
    }

    fn is_body_fault(&self) -> bool {
        !matches!(self.kind, FaultKind::Status(_))
    }
}

/// Take the fault that hits this request, if any, updating the skip and times counts.
pub(super) fn take_fault(faults: &mut Vec<Fault>, rel: &str, is_get: bool) -> Option<FaultKind> {
    let mut hit = None;
    for (i, fault) in faults.iter_mut().enumerate() {
        let matches =
            fault.path.as_deref().is_none_or(|p| p == rel) && (is_get || !fault.is_body_fault());
        if !matches {
            continue;
        }
        if fault.skip > 0 {
            fault.skip -= 1;
            continue;
        }
        hit = Some((i, fault.kind));
        break;
    }
    let (i, kind) = hit?;
    if let Some(times) = faults[i].times.as_mut() {
        *times -= 1;
        if *times == 0 {
            faults.remove(i);
        }
    }
    Some(kind)
}

/// Lay out `body` as pieces carrying the throttle, stall or cut.
pub(super) fn body_with_faults(
    resp: Response,
    body: Bytes,
    fault: Option<FaultKind>,
    throttle: Option<u64>,
) -> Response {
    let len = body.len() as u64;
    let (body, cut) = match fault {
        Some(FaultKind::CutAfter(k)) => (body.slice(..k.min(len) as usize), true),
        _ => (body, false),
    };
    let mut pieces = match throttle {
        // 20 pieces a second, each worth 50 ms at the rate.
        Some(rate) if rate > 0 => {
            let step = (rate / 20).max(1) as usize;
            let delay = Duration::from_secs_f64(step as f64 / rate as f64);
            (0..body.len())
                .step_by(step)
                .map(|at| {
                    let d = if at == 0 { Duration::ZERO } else { delay };
                    Piece::new(d, body.slice(at..(at + step).min(body.len())))
                })
                .collect()
        }
        _ => vec![Piece::new(Duration::ZERO, body)],
    };
    if let Some(FaultKind::StallAfter { bytes, pause }) = fault {
        pieces = stall_at(pieces, bytes, pause);
    }
    let resp = resp.pieces(Framing::Length, pieces).announce_len(len);
    if cut { resp.abort_after_pieces() } else { resp }
}

/// Split the pieces at body offset `at` and add `pause` before the part after it.
fn stall_at(pieces: Vec<Piece>, at: u64, pause: Duration) -> Vec<Piece> {
    let mut out = Vec::with_capacity(pieces.len() + 1);
    let mut offset = 0u64;
    let mut stalled = false;
    for piece in pieces {
        let len = piece.data.len() as u64;
        if !stalled && at < offset + len {
            let split = (at - offset) as usize;
            if split > 0 {
                out.push(Piece::new(piece.delay, piece.data.slice(..split)));
                out.push(Piece::new(pause, piece.data.slice(split..)));
            } else {
                out.push(Piece::new(piece.delay + pause, piece.data));
            }
            stalled = true;
        } else {
            out.push(piece);
        }
        offset += len;
    }
    out
}
