//! The duration strings of the API (`90s`, `1h30m`, `500ms`).
//!
//! The grammar is deliberately a strict subset of Go's `time.ParseDuration`, so
//! that the API server's CEL `duration()` and this parser read every accepted
//! string the same way.

use std::time::Duration;

use thiserror::Error;

/// A duration string outside the grammar `([0-9]{1,5}(ms|s|m|h))+`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "{input:?} is not a duration: write one or more <number><unit> with units h, m, s or ms (at most 5 digits each), such as 90s or 1h30m"
)]
pub struct ParseDurationError {
    input: String,
}

/// Parses a duration written as one or more `<digits><unit>` groups.
pub fn parse_duration(input: &str) -> Result<Duration, ParseDurationError> {
    let err = || ParseDurationError {
        input: input.to_string(),
    };
    let bytes = input.as_bytes();
    if bytes.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &input[start..i];
        if digits.is_empty() || digits.len() > 5 {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        let rest = &input[i..];
        let (unit_ms, unit_len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return Err(err());
        };
        i += unit_len;
        total += Duration::from_millis(n * unit_ms);
    }
    Ok(total)
}

/// Formats a duration in the API's grammar (`1h30m`, `2s`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{}", ms / size, unit));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_compound_durations() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m1ms"), Ok(Duration::from_millis(60_001)));
    }

    #[test]
    fn refuses_what_the_schema_refuses() {
        for bad in [
            "", "1", "h", "1d", "1.5h", "-1s", "1h 30m", "123456s", "1us", "1hm",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn format_round_trips() {
        for s in ["1h30m", "2s", "250ms", "0s", "168h", "1m1s1ms"] {
            let d = parse_duration(s).unwrap_or_default();
            assert_eq!(format_duration(d), s);
        }
    }
}
