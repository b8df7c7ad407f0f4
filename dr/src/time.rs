//! Calendar arithmetic on unix seconds, in UTC, without a time zone
//! database: the periods retention counts in, and ISO 8601 for people.

/// Days since 1970-01-01 of unix time `t`.
pub fn days(t: i64) -> i64 {
    t.div_euclid(86_400)
}

/// (year, month 1-12, day 1-31) of day `z` since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
pub fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The ISO week of day `z`, numbered from the week of 1970-01-01 (weeks
/// start on Monday; 1970-01-01 was a Thursday).
pub fn week(z: i64) -> i64 {
    (z + 3).div_euclid(7)
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso8601(t: i64) -> String {
    let (y, m, d) = civil(days(t));
    let s = t.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59Z");
        // Monday 2024-01-01 starts a week; Sunday 2023-12-31 ends one.
        let mon = days(1_704_067_200);
        assert_eq!(civil(mon), (2024, 1, 1));
        assert_eq!(week(mon), week(mon + 6));
        assert_eq!(week(mon - 1) + 1, week(mon));
        assert_eq!(week(0), week(-3), "1969-12-29 (Monday) to 1970-01-04");
        assert_ne!(week(-4), week(-3));
    }
}
