//! Timestamps as the stores and the API write them: RFC 3339 in UTC with a
//! `Z`, and as many fractional digits (none, 3, 6 or 9) as the value needs,
//! exactly as chrono's own `Serialize` writes a `DateTime<Utc>`.
//!
//! chrono writes one through `collect_str` in a dozen small pieces, each
//! passed through serde_json's string escaper; a webhook stores about six
//! timestamps, and that came to a twentieth of a request thread's time.
//! Here the text is built in a buffer on the stack and handed over whole.
//! Reading is chrono's own (`Deserialize` is not replaced).

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Serialize, Serializer};

/// For `#[serde(serialize_with = "...")]` on a `DateTime<Utc>`.
pub fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 30];
    match format(t, &mut buf) {
        Some(text) => s.serialize_str(text),
        // Years outside 0..=9999: chrono's own form (with a sign).
        None => t.serialize(s),
    }
}

/// For `#[serde(serialize_with = "...")]` on an `Option<DateTime<Utc>>`.
pub fn rfc3339_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fff[fff[fff]]]Z`, or `None` for a year that
/// needs more than four digits.
fn format<'a>(t: &DateTime<Utc>, buf: &'a mut [u8; 30]) -> Option<&'a str> {
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return None;
    }
    let (mut sec, mut nano) = (t.second(), t.nanosecond());
    if nano >= 1_000_000_000 {
        // A leap second, written as chrono writes it.
        sec += 1;
        nano -= 1_000_000_000;
    }
    let mut w = Out { buf, n: 0 };
    w.digits(4, year as u32);
    w.byte(b'-');
    w.digits(2, t.month());
    w.byte(b'-');
    w.digits(2, t.day());
    w.byte(b'T');
    w.digits(2, t.hour());
    w.byte(b':');
    w.digits(2, t.minute());
    w.byte(b':');
    w.digits(2, sec);
    if nano != 0 {
        w.byte(b'.');
        if nano % 1_000_000 == 0 {
            w.digits(3, nano / 1_000_000);
        } else if nano % 1_000 == 0 {
            w.digits(6, nano / 1_000);
        } else {
            w.digits(9, nano);
        }
    }
    w.byte(b'Z');
    let n = w.n;
    std::str::from_utf8(&buf[..n]).ok()
}

struct Out<'a> {
    buf: &'a mut [u8; 30],
    n: usize,
}

impl Out<'_> {
    fn byte(&mut self, b: u8) {
        self.buf[self.n] = b;
        self.n += 1;
    }

    /// `value` in exactly `count` digits, zero-padded.
    fn digits(&mut self, count: usize, mut value: u32) {
        for i in (0..count).rev() {
            self.buf[self.n + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.n += count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn ours(t: &DateTime<Utc>) -> String {
        let mut out = vec![];
        rfc3339(t, &mut serde_json::Serializer::new(&mut out)).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let cases = [
            "2026-12-06T18:23:58Z",
            "2026-12-06T18:23:58.388Z",
            "2026-12-06T18:23:58.388553Z",
            "2026-12-06T18:23:58.388553736Z",
            "0000-01-01T00:00:00.000000001Z",
            "9999-12-31T23:59:59.999999999Z",
        ];
        for c in cases {
            let t: DateTime<Utc> = c.parse().unwrap();
            assert_eq!(ours(&t), format!("\"{c}\""));
            assert_eq!(ours(&t), serde_json::to_string(&t).unwrap());
        }
        // Out of four-digit years, chrono's own signed form.
        let far = Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(ours(&far), serde_json::to_string(&far).unwrap());
        assert_eq!(ours(&far), "\"+10000-01-01T00:00:00Z\"");
        // A leap second.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        assert_eq!(ours(&leap), serde_json::to_string(&leap).unwrap());
    }

    proptest! {
        #[test]
        fn any_timestamp_is_written_as_chrono_writes_it(
            secs in -62_167_219_200i64..253_402_300_800i64,
            nanos in prop_oneof![Just(0u32), 0u32..1000, (0u32..1000).prop_map(|m| m * 1_000_000),
                (0u32..1_000_000).prop_map(|u| u * 1000), 0u32..1_000_000_000],
        ) {
            let t = Utc.timestamp_opt(secs, nanos).unwrap();
            prop_assert_eq!(ours(&t), serde_json::to_string(&t).unwrap());
        }
    }
}
