//! Instants as Oakestra's documents spell them: Unix milliseconds to ISO 8601 UTC text (no calendar crate needed).

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ`: the spelling of Python's `datetime.isoformat()`
/// that the reference writes into `cpu_history` and `memory_history` (microseconds), with the `Z` the reference
/// leaves out, so a browser reads the instant as UTC rather than as its local time. Instants before 1970 are
/// clamped to the epoch.
pub fn iso8601_utc(ms: i64) -> String {
    let ms = ms.max(0);
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (year, month, day) = civil_from_days(days);
    let secs = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms_of_day % 1000 * 1000
    )
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso8601_utc(-5), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day of a century leap year), 12:34:56.789.
        assert_eq!(iso8601_utc(951_827_696_789), "2000-02-29T12:34:56.789000Z");
        // 2026-12-04T15:00:00Z.
        assert_eq!(iso8601_utc(1_796_396_400_000), "2026-12-04T15:00:00.000000Z");
        // The last millisecond of 1999.
        assert_eq!(iso8601_utc(946_684_799_999), "1999-12-31T23:59:59.999000Z");
    }

    proptest::proptest! {
        /// Consecutive days differ by one calendar day and months stay in range.
        #[test]
        fn days_advance(days in 0_i64..200_000) {
            let (y, m, d) = civil_from_days(days);
            proptest::prop_assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            let (y2, m2, d2) = civil_from_days(days + 1);
            let next_ok = (y2, m2, d2) == (y, m, d + 1)
                || (d2 == 1 && ((y2, m2) == (y, m + 1) || (y2, m2, m) == (y + 1, 1, 12)));
            proptest::prop_assert!(next_ok, "{days}: {y}-{m}-{d} then {y2}-{m2}-{d2}");
        }
    }
}
