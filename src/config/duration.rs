//! Durations as operators write them in the config file: `"250ms"`, `"3s"`, `"1.5s"`, `"5m"`, `"1h"`.
//!
//! Owns the text ⇄ [`Duration`] conversion and nothing else: no defaults, no limits on what a
//! field may hold (the validation in `config/mod.rs` decides that).

use std::time::Duration;

/// Units accepted by [`parse_duration`], with their length in nanoseconds.
/// Longest suffix first so that `"ms"` is not read as minutes followed by junk.
const UNITS: [(&str, u128); 4] = [
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
];

const EXPECTED: &str =
    "expected a number and a unit: ms, s, m or h, e.g. \"250ms\", \"1.5s\", \"5m\", \"1h\"";

/// Parses a duration: a non-negative decimal number immediately followed by one unit.
///
/// - Units: `ms` (milliseconds), `s` (seconds), `m` (minutes), `h` (hours).
/// - The number may have a fractional part (`"1.5s"`, `"0.25h"`), with digits on both sides of the
///   dot; the result must be a whole number of nanoseconds.
/// - Rejected: the empty string, a bare number (`"3"`, no unit), a sign (`"-1s"`, `"+1s"`), an
///   unknown unit (`"3x"`), spaces, compound forms (`"1h30m"`, write `"90m"`), and anything longer
///   than `u64::MAX` nanoseconds (about 584 years), so the result always fits a `u64` of nanoseconds.
/// - `"0s"` parses; fields that must be positive check that themselves.
///
/// The error is a complete sentence that starts with the quoted input.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let fail = |why: &str| Err(format!("{s:?} is not a duration: {why} ({EXPECTED})"));
    if s.is_empty() {
        return fail("it is empty");
    }
    let number_len = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(number_len);
    if number.is_empty() {
        return fail("it does not start with a number");
    }
    if unit.is_empty() {
        return fail("the unit is missing");
    }
    let Some(&(_, unit_nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return fail(&format!("unknown unit {unit:?}"));
    };
    let (whole, fraction) = match number.split_once('.') {
        None => (number, ""),
        Some((w, f)) if !w.is_empty() && !f.is_empty() && !f.contains('.') => (w, f),
        Some(_) => return fail(&format!("{number:?} is not a decimal number")),
    };
    let too_large =
        || format!("{s:?} is not a duration: it is too large (at most about 584 years)");
    let mut nanos: u128 = 0;
    for digit in whole.bytes() {
        nanos = nanos
            .checked_mul(10)
            .and_then(|n| n.checked_add(u128::from(digit - b'0')))
            .filter(|n| *n <= u128::from(u64::MAX))
            .ok_or_else(too_large)?;
    }
    nanos *= unit_nanos;
    // The fraction is scaled exactly: f / 10^k of a unit, in nanoseconds. Trailing zeros change
    // nothing; without them, a fraction of k digits is a whole number of nanoseconds only if
    // 10^k divides f × unit, and the largest unit (3.6e12 ns = 2^13 · 3^2 · 5^11) allows k ≤ 13.
    // Checking that first also keeps the arithmetic below far from overflowing.
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > 13 {
        return fail("it is finer than a nanosecond");
    }
    let mut scaled: u128 = 0;
    for digit in fraction.bytes() {
        scaled = scaled * 10 + u128::from(digit - b'0');
    }
    let denominator = 10u128.pow(fraction.len() as u32);
    let fraction_nanos = scaled * unit_nanos;
    if fraction_nanos % denominator != 0 {
        return fail("it is finer than a nanosecond");
    }
    nanos += fraction_nanos / denominator;
    let nanos = u64::try_from(nanos).map_err(|_| too_large())?;
    Ok(Duration::from_nanos(nanos))
}

/// Deserializes a duration field of the raw config: its text as written (parsed later, by
/// [`parse_duration`], where the message can name the listener and field). Exists for the error:
/// serde's own for `idle_timeout = 5` is "invalid type: integer `5`, expected a string", which
/// does not say what to write. A bare number here says it has no unit and suggests the quoted
/// forms (`"5s"`, `"5ms"`); any other type says a duration string is expected.
pub(super) fn deserialize_text<'de, D>(d: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    d.deserialize_any(TextVisitor).map(Some)
}

struct TextVisitor;

impl TextVisitor {
    fn bare_number<E: serde::de::Error>(n: impl std::fmt::Display) -> E {
        E::custom(format!(
            "{n} is not a duration: a bare number has no unit (write it as a string with one, \
             e.g. \"{n}s\" for seconds or \"{n}ms\" for milliseconds)"
        ))
    }
}

impl serde::de::Visitor<'_> for TextVisitor {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a duration string such as \"250ms\", \"5s\", \"5m\" or \"1h\"")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Err(Self::bare_number(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Err(Self::bare_number(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Err(Self::bare_number(v))
    }
}

/// Formats a duration so that [`parse_duration`] reads it back unchanged, in the largest unit
/// that divides it: `"1h"`, `"90m"`, `"30s"`, `"250ms"`, otherwise fractional seconds
/// (`"1.0000005s"`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (name, unit_nanos) in UNITS.iter().rev() {
        if nanos % unit_nanos == 0 {
            return format!("{}{name}", nanos / unit_nanos);
        }
    }
    let fraction = format!("{:09}", d.subsec_nanos());
    format!("{}.{}s", d.as_secs(), fraction.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts() {
        let cases = [
            ("250ms", Duration::from_millis(250)),
            ("3s", Duration::from_secs(3)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("0s", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("1.5s", Duration::from_millis(1500)),
            ("0.25h", Duration::from_secs(900)),
            ("1.5ms", Duration::from_micros(1500)),
            ("0.000000001s", Duration::from_nanos(1)),
            ("1.000000000s", Duration::from_secs(1)),
            ("007s", Duration::from_secs(7)),
            (
                "18446744073709ms",
                Duration::from_millis(18_446_744_073_709),
            ),
            ("1.0000000000000000000000000s", Duration::from_secs(1)),
            ("18446744073.709551615s", Duration::from_nanos(u64::MAX)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn rejects() {
        let cases = [
            ("", "empty"),
            ("3", "unit is missing"),
            ("-1s", "does not start with a number"),
            ("+1s", "does not start with a number"),
            ("3x", "unknown unit \"x\""),
            ("3 s", "unknown unit \" s\""),
            (" 3s", "does not start with a number"),
            ("3S", "unknown unit \"S\""),
            ("1h30m", "unknown unit \"h30m\""),
            ("3sec", "unknown unit \"sec\""),
            ("3us", "unknown unit \"us\""),
            ("s", "does not start with a number"),
            (".5s", "not a decimal number"),
            ("1.s", "not a decimal number"),
            ("1.2.3s", "not a decimal number"),
            ("0.0000000001s", "finer than a nanosecond"),
            (
                "1.0000000000000000000000000000001s",
                "finer than a nanosecond",
            ),
            ("18446744073710ms", "too large"),
            ("18446744073709551616ms", "too large"),
            ("5124095576030431.1h", "too large"),
            ("99999999999999999999999999999999999999999h", "too large"),
        ];
        for (text, why) in cases {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(why), "{text:?}: {err}");
            assert!(
                err.starts_with(&format!("{text:?} is not a duration")),
                "{err}"
            );
        }
    }

    #[derive(Debug, serde::Deserialize)]
    struct Field {
        #[serde(default, deserialize_with = "deserialize_text")]
        t: Option<String>,
    }

    #[test]
    fn bare_numbers_suggest_a_unit() {
        let ok: Field = toml::from_str("t = \"5s\"").expect("a string");
        assert_eq!(ok.t.as_deref(), Some("5s"));
        let absent: Field = toml::from_str("").expect("absent");
        assert_eq!(absent.t, None);
        for (text, value) in [("t = 5", "5"), ("t = 1.5", "1.5"), ("t = 0", "0")] {
            let err = toml::from_str::<Field>(text).expect_err(text).to_string();
            assert!(
                err.contains(&format!(
                    "{value} is not a duration: a bare number has no unit"
                )) && err.contains(&format!("\"{value}s\"")),
                "{text}: {err}"
            );
        }
        let err = toml::from_str::<Field>("t = true")
            .expect_err("bool")
            .to_string();
        assert!(err.contains("a duration string such as"), "{err}");
    }

    #[test]
    fn format_round_trips() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(5400), "90m"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_nanos(1_000_000_500), "1.0000005s"),
            (Duration::from_nanos(1), "0.000000001s"),
        ];
        for (d, text) in cases {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
    }
}
