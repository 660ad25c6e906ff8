//! The one duration syntax of every flag and env variable: `500ms`, `2s`, `1m`, `2h`, `7d`,
//! or a plain number of seconds.

use std::time::Duration;

/// Parses `500ms`, `2s`, `1m`, `2h`, `7d` or a plain number of seconds (a clap
/// `value_parser`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 2s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    if secs > MAX_SECONDS {
        return Err(format!("{s:?} is longer than 100 years"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// The longest duration a flag takes: `Instant::now() + d` must not overflow (that panics),
/// and no timeout or period here means anything near it.
const MAX_SECONDS: f64 = 100.0 * 365.0 * 86400.0;

/// Formats a duration the way [`parse_duration`] reads it back: the largest unit that
/// divides it (`90s`, `5m`, `7d`, `1500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_millis() != 0 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match s {
        0 => "0s".to_owned(),
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_hours_and_days() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("40").unwrap(), Duration::from_secs(40));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e400s").is_err());
        assert!(
            parse_duration("200000000000000d")
                .unwrap_err()
                .contains("100 years")
        );
        assert!(parse_duration("36500d").is_ok());
    }

    #[test]
    fn format_reads_back() {
        for d in [0, 1, 59, 60, 90, 3600, 86400, 7 * 86400] {
            let d = Duration::from_secs(d);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
