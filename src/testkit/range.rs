//! Byte ranges for the stand-in origin (RFC 9110 §14), the subset nginx serves for one range:
//! `bytes=a-b`, `bytes=a-`, `bytes=-n`, with `If-Range` against the strong ETag.

use super::server::RequestHead;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No (usable) range: 200 with the whole body.
    Whole,
    /// 206 with bytes `start..=end`.
    Partial(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// What to answer for `head`'s `Range` on a body of `total` bytes with ETag `etag`.
pub fn pick_range(head: &RequestHead, etag: &str, total: u64) -> RangeAnswer {
    let Some(range) = head.header("range") else {
        return RangeAnswer::Whole;
    };
    // A stale validator means "send it all": the client's partial copy is of other content.
    if head.header("if-range").is_some_and(|v| v.trim() != etag) {
        return RangeAnswer::Whole;
    }
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Whole;
    };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Whole;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim().is_empty(), last.trim().is_empty()) {
        // -n: the last n bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if total == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial(total.saturating_sub(n), total - 1),
            None => RangeAnswer::Whole,
        },
        // a-
        (false, true) => match parse(first) {
            Some(a) if a < total => RangeAnswer::Partial(a, total - 1),
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Whole,
        },
        // a-b
        (false, false) => match (parse(first), parse(last)) {
            (Some(a), Some(b)) if a > b => RangeAnswer::Whole,
            (Some(a), Some(_)) if a >= total => RangeAnswer::Unsatisfiable,
            (Some(a), Some(b)) => RangeAnswer::Partial(a, b.min(total - 1)),
            _ => RangeAnswer::Whole,
        },
        (true, true) => RangeAnswer::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(range: &str, if_range: Option<&str>) -> RequestHead {
        let mut headers = vec![("range".to_owned(), range.to_owned())];
        if let Some(v) = if_range {
            headers.push(("if-range".to_owned(), v.to_owned()));
        }
        RequestHead {
            method: "GET".into(),
            target: "/x".into(),
            version: 1,
            headers,
        }
    }

    #[test]
    fn ranges() {
        let r = |s: &str| pick_range(&head(s, None), "\"e\"", 100);
        assert_eq!(r("bytes=0-9"), RangeAnswer::Partial(0, 9));
        assert_eq!(r("bytes=90-"), RangeAnswer::Partial(90, 99));
        assert_eq!(r("bytes=90-500"), RangeAnswer::Partial(90, 99));
        assert_eq!(r("bytes=-10"), RangeAnswer::Partial(90, 99));
        assert_eq!(r("bytes=-500"), RangeAnswer::Partial(0, 99));
        assert_eq!(r("bytes=100-"), RangeAnswer::Unsatisfiable);
        assert_eq!(r("bytes=-0"), RangeAnswer::Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-6"), RangeAnswer::Whole);
        assert_eq!(r("bytes=9-1"), RangeAnswer::Whole);
        assert_eq!(r("items=0-1"), RangeAnswer::Whole);
        assert_eq!(r("bytes=x-"), RangeAnswer::Whole);
    }

    #[test]
    fn if_range_needs_the_current_etag() {
        let same = head("bytes=10-", Some("\"e\""));
        let other = head("bytes=10-", Some("\"old\""));
        assert_eq!(
            pick_range(&same, "\"e\"", 100),
            RangeAnswer::Partial(10, 99)
        );
        assert_eq!(pick_range(&other, "\"e\"", 100), RangeAnswer::Whole);
    }
}
