//! Sizes (`100GB`, `1.5TB`, `10GiB`, `1048576`) and durations (`5s`, `1h30m`, `500ms`), parsed
//! and printed.
//!
//! Hand-written on purpose: no crate reads exactly what the Go loraplex accepts. Its sizes use
//! binary multiples under decimal names (`GB` = 1<<30, as Go's `ParseSize`), which `bytesize`
//! and friends read as powers of 1000; its durations are Go's `time.ParseDuration` syntax
//! (`1h30m`, `1.5h`, `2m3.5s`, `µs`), which `humantime` only partly shares (it refuses `1.5h`
//! and accepts units Go does not). Both grammars are small; they are written out here, with the
//! printing side kept so that what [`format_size`] / [`format_duration`] print parses back to
//! the same value.

use std::time::Duration;

/// The binary multiples, by unit name. `B` and no unit are bytes.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KB", 1 << 10),
    ("MB", 1 << 20),
    ("GB", 1 << 30),
    ("TB", 1 << 40),
    ("PB", 1 << 50),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("PiB", 1 << 50),
];

/// Why a size or a duration was refused; the caller adds the key and the examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitError {
    /// Not of the grammar at all.
    Invalid,
    Negative,
    Overflow,
}

/// Parse a size in bytes: a whole or decimal number and an optional unit (`B`, `KB`..`PB`,
/// `KiB`..`PiB`, all binary multiples). Spaces around the number and before the unit are
/// allowed. A fraction of a unit is truncated to whole bytes; a fraction of a byte is refused.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(UnitError::Negative);
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..num_end], s[num_end..].trim_start());
    let multiplier = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|&(_, m)| m)
            .ok_or(UnitError::Invalid)?
    };
    let (whole, frac) = match num.split_once('.') {
        Some((w, f)) => (w, f),
        None => (num, ""),
    };
    let valid_digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !valid_digits(whole) || !valid_digits(frac) {
        return Err(UnitError::Invalid);
    }
    if num.ends_with('.') || (multiplier == 1 && frac.bytes().any(|b| b != b'0')) {
        return Err(UnitError::Invalid);
    }
    let whole: u64 = whole.parse().map_err(|_| UnitError::Overflow)?;
    let mut bytes = u128::from(whole) * u128::from(multiplier);
    // Digits past the 18th cannot change the result by a byte at these multipliers.
    let frac = &frac[..frac.len().min(18)];
    if !frac.is_empty() {
        let digits: u128 = frac.parse().map_err(|_| UnitError::Invalid)?;
        bytes += digits * u128::from(multiplier) / 10u128.pow(frac.len() as u32);
    }
    u64::try_from(bytes).map_err(|_| UnitError::Overflow)
}

/// A size in the largest unit that divides it exactly (`100GB`, `64KB`), else plain bytes.
/// Uses the decimal names, which mean binary multiples here (as in the Go project).
pub fn format_size(bytes: u64) -> String {
    for &(name, m) in SIZE_UNITS[1..6].iter().rev() {
        if bytes != 0 && bytes.is_multiple_of(m) {
            return format!("{}{name}", bytes / m);
        }
    }
    bytes.to_string()
}

const NANOS_PER: &[(&str, u64)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
];

/// Go's largest duration: `time.Duration` is an i64 of nanoseconds.
const MAX_NANOS: u64 = i64::MAX as u64;

/// Parse a duration in Go's `time.ParseDuration` syntax: one or more `{number}{unit}` with
/// units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h` and decimal numbers (`1.5h`, `2m3.5s`), or a
/// plain `0`. Negative durations are refused (none of loraplex's settings means anything
/// negative). Fractions are rounded as Go rounds them, so both read a file the same way.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(UnitError::Negative);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(UnitError::Invalid);
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let (nanos, after) = duration_component(rest)?;
        total = total.checked_add(nanos).ok_or(UnitError::Overflow)?;
        if total > MAX_NANOS {
            return Err(UnitError::Overflow);
        }
        rest = after;
    }
    Ok(Duration::from_nanos(total))
}

/// One `{number}{unit}` at the start of `s`: its nanoseconds and what follows it.
fn duration_component(s: &str) -> Result<(u64, &str), UnitError> {
    let whole_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let whole_digits = &s[..whole_end];
    let mut rest = &s[whole_end..];
    let whole = if whole_digits.is_empty() {
        0
    } else {
        whole_digits
            .parse::<u64>()
            .map_err(|_| UnitError::Overflow)?
    };
    // The fraction as an integer and its power of ten; like Go, digits past what an i64 holds
    // are read and dropped.
    let (mut frac, mut scale, mut frac_digits) = (0u64, 1f64, 0usize);
    if let Some(after_dot) = rest.strip_prefix('.') {
        let end = after_dot
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after_dot.len());
        frac_digits = end;
        for d in after_dot[..end].bytes() {
            match frac
                .checked_mul(10)
                .and_then(|f| f.checked_add(u64::from(d - b'0')))
            {
                Some(f) if f <= MAX_NANOS => {
                    frac = f;
                    scale *= 10.0;
                }
                _ => break,
            }
        }
        rest = &after_dot[end..];
    }
    if whole_digits.is_empty() && frac_digits == 0 {
        return Err(UnitError::Invalid);
    }
    let unit_end = rest
        .find(|c: char| c.is_ascii_digit() || c == '.')
        .unwrap_or(rest.len());
    let unit = &rest[..unit_end];
    let per = NANOS_PER
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|&(_, n)| n)
        .ok_or(UnitError::Invalid)?;
    let mut nanos = whole.checked_mul(per).ok_or(UnitError::Overflow)?;
    if nanos > MAX_NANOS {
        return Err(UnitError::Overflow);
    }
    if frac > 0 {
        // Go computes this part in float64; doing the same keeps both readings identical.
        nanos += (frac as f64 * (per as f64 / scale)) as u64;
        if nanos > MAX_NANOS {
            return Err(UnitError::Overflow);
        }
    }
    Ok((nanos, &rest[unit_end..]))
}

/// A duration in Go syntax that [`parse_duration`] reads back exactly: `0s`, `500ms`, `1h30m`,
/// `2m3.5s`.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        return match nanos {
            n if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
            n if n % 1_000 == 0 => format!("{}us", n / 1_000),
            n => format!("{n}ns"),
        };
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    let sub = d.subsec_nanos();
    if sub > 0 {
        let frac = format!("{sub:09}");
        out.push_str(&format!("{s}.{}s", frac.trim_end_matches('0')));
    } else if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (s, want) in [
            ("500MB", 500 << 20),
            ("100GB", 100 << 30),
            ("1.5TB", 3 << 39),
            ("512KB", 512 << 10),
            ("10GiB", 10 << 30),
            ("1048576", 1 << 20),
            ("1024B", 1024),
            ("0", 0),
            ("1TB", 1 << 40),
            ("10MB", 10 << 20),
            (" 2 GB ", 2 << 30),
            ("0.5KB", 512),
            ("1.1KB", 1126),
            ("+7MB", 7 << 20),
            ("18446744073709551615", u64::MAX),
            ("15PiB", 15 << 50),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bad_sizes() {
        use UnitError::*;
        for (s, want) in [
            ("", Invalid),
            ("x", Invalid),
            ("10XB", Invalid),
            ("abcMB", Invalid),
            ("MB", Invalid),
            ("1.5", Invalid),
            ("1.5B", Invalid),
            ("1.GB", Invalid),
            (".5GB", Invalid),
            ("1..5GB", Invalid),
            ("10gb", Invalid),
            ("10 G B", Invalid),
            ("-1GB", Negative),
            ("-0", Negative),
            ("18446744073709551616", Overflow),
            ("16384PB", Overflow),
            ("99999999999999999999999TB", Overflow),
        ] {
            assert_eq!(parse_size(s), Err(want), "{s:?}");
        }
    }

    #[test]
    fn size_roundtrip() {
        for n in [
            0,
            1,
            1023,
            1024,
            1536,
            32 << 20,
            100 << 30,
            3 << 39,
            u64::MAX,
        ] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{n}");
        }
        assert_eq!(format_size(100 << 30), "100GB");
        assert_eq!(format_size(64 << 10), "64KB");
        assert_eq!(format_size(1000), "1000");
    }

    fn d(s: &str) -> Result<Duration, UnitError> {
        parse_duration(s)
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        for (s, want) in [
            ("5s", Duration::from_secs(5)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("500ms", ms(500)),
            ("1.5h", Duration::from_secs(5400)),
            ("2m3.5s", ms(123_500)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("10μs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("+5s", Duration::from_secs(5)),
            (".5s", ms(500)),
            ("5.s", Duration::from_secs(5)),
            ("1h1h", Duration::from_secs(7200)),
            ("0.000000001s", Duration::from_nanos(1)),
            ("1.0000000001s", Duration::from_secs(1)),
            (
                "2562047h47m16.854775807s",
                Duration::from_nanos(i64::MAX as u64),
            ),
        ] {
            assert_eq!(d(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bad_durations() {
        use UnitError::*;
        for (s, want) in [
            ("", Invalid),
            ("5", Invalid),
            ("s", Invalid),
            (".s", Invalid),
            ("5 s", Invalid),
            ("5S", Invalid),
            ("5sec", Invalid),
            ("1d", Invalid),
            ("1h30", Invalid),
            ("abc", Invalid),
            ("-5s", Negative),
            ("-0", Negative),
            ("2562047h47m16.854775808s", Overflow),
            ("9223372036854775808ns", Overflow),
            ("99999999999999999999h", Overflow),
            ("3000000h", Overflow),
        ] {
            assert_eq!(d(s), Err(want), "{s:?}");
        }
    }

    #[test]
    fn duration_roundtrip() {
        for nanos in [
            0,
            1,
            999,
            1_000,
            500_000_000,
            1_000_000_000,
            1_500_000_000,
            123_500_000_000,
            5_400_000_000_000,
            3_600_000_000_001,
            i64::MAX as u64,
        ] {
            let dur = Duration::from_nanos(nanos);
            assert_eq!(
                d(&format_duration(dur)),
                Ok(dur),
                "{}",
                format_duration(dur)
            );
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(123_500)), "2m3.5s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }
}
