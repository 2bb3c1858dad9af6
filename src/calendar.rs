//! Billing-anchor arithmetic: which monthly period an instant falls in.
//!
//! Period `k` of an account starts at the anchor moved `k` months forward (backward for negative
//! `k`), on the anchor's day of month — or the last day of that month when it has fewer days —
//! at the anchor's time of day, UTC. So an anchor on Jan 31 renews on Feb 28 (29 in leap years),
//! then Mar 31: the day is clamped per month, never carried over. Everything is whole seconds of
//! Unix time so the Lua scripts (`lua/`) can do the same integer arithmetic.

/// An account's billing anchor, kept as its civil parts so every period start is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    year: i64,
    /// 1..=12
    month: i64,
    /// 1..=31
    day: i64,
    /// Seconds after midnight UTC.
    second_of_day: i64,
}

impl Anchor {
    /// The anchor at Unix time `ts` (seconds, UTC).
    pub fn from_unix(ts: i64) -> Self {
        let days = ts.div_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Anchor { year, month, day, second_of_day: ts.rem_euclid(86_400) }
    }

    /// The anchor's own instant.
    pub fn unix(&self) -> i64 {
        self.period_start(0)
    }

    /// Start of period `k` (Unix seconds).
    pub fn period_start(&self, k: i64) -> i64 {
        let m0 = self.year * 12 + (self.month - 1) + k;
        let (y, m) = (m0.div_euclid(12), m0.rem_euclid(12) + 1);
        let d = self.day.min(days_in_month(y, m));
        days_from_civil(y, m, d) * 86_400 + self.second_of_day
    }

    /// The period index containing `now`: `period_start(k) <= now < period_start(k + 1)`.
    pub fn period_at(&self, now: i64) -> i64 {
        let (y, m, _) = civil_from_days(now.div_euclid(86_400));
        let mut k = (y * 12 + m - 1) - (self.year * 12 + self.month - 1);
        // The month difference is right or one too high; the loops settle it in at most 2 steps.
        while self.period_start(k) > now {
            k -= 1;
        }
        while self.period_start(k + 1) <= now {
            k += 1;
        }
        k
    }
}

/// Days in month `m` (1..=12) of year `y`.
pub fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date `(year, month, day)` of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Now, Unix seconds (the system clock).
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// RFC 3339 text of a Unix time, UTC, whole seconds (`2026-12-15T09:30:00Z`).
pub fn rfc3339(ts: i64) -> String {
    let (y, m, d) = civil_from_days(ts.div_euclid(86_400));
    let s = ts.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// Parses an RFC 3339 timestamp into Unix seconds (fractions dropped).
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp())
}

/// A person-readable date such as `15 Dec 2026`.
pub fn human_date(ts: i64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let (y, m, d) = civil_from_days(ts.div_euclid(86_400));
    format!("{d} {} {y}", MONTHS[(m - 1) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> i64 {
        parse_rfc3339(text).unwrap()
    }

    fn starts(anchor: &str, n: i64) -> Vec<String> {
        let a = Anchor::from_unix(ts(anchor));
        (0..n).map(|k| rfc3339(a.period_start(k))).collect()
    }

    #[test]
    fn jan_31_clamps_per_month_and_never_drifts() {
        assert_eq!(
            starts("2026-01-31T10:00:00Z", 4),
            ["2026-01-31T10:00:00Z", "2026-02-28T10:00:00Z", "2026-03-31T10:00:00Z", "2026-04-30T10:00:00Z"]
        );
    }

    #[test]
    fn leap_years_get_feb_29() {
        assert_eq!(starts("2027-12-31T00:00:00Z", 3)[2], "2028-02-29T00:00:00Z");
        assert_eq!(starts("2099-12-30T00:00:00Z", 3)[2], "2100-02-28T00:00:00Z"); // 2100 is not leap
        assert_eq!(starts("2399-12-29T00:00:00Z", 3)[2], "2400-02-29T00:00:00Z"); // 2400 is
    }

    #[test]
    fn year_boundaries_and_negative_periods() {
        let a = Anchor::from_unix(ts("2026-11-30T23:59:59Z"));
        assert_eq!(rfc3339(a.period_start(1)), "2026-12-30T23:59:59Z");
        assert_eq!(rfc3339(a.period_start(3)), "2027-02-28T23:59:59Z");
        assert_eq!(rfc3339(a.period_start(-1)), "2026-10-30T23:59:59Z");
        assert_eq!(rfc3339(a.period_start(-9)), "2026-02-28T23:59:59Z");
    }

    #[test]
    fn period_at_matches_period_start_for_many_instants() {
        for anchor in ["2024-01-31T12:00:00Z", "2025-02-28T00:00:00Z", "2026-03-15T08:30:00Z", "2026-12-31T23:59:59Z"] {
            let a = Anchor::from_unix(ts(anchor));
            for k in -30..30 {
                let s = a.period_start(k);
                assert!(a.period_start(k + 1) > s, "periods strictly increase");
                assert_eq!(a.period_at(s), k, "{anchor} k={k} at start");
                assert_eq!(a.period_at(s - 1), k - 1, "{anchor} k={k} just before");
                assert_eq!(a.period_at(s + 86_399), k, "{anchor} k={k} a day later");
            }
        }
    }

    #[test]
    fn civil_roundtrip_across_centuries() {
        for z in (-800_000..800_000).step_by(7) {
            let (y, m, d) = civil_from_days(z);
            assert!((1..=days_in_month(y, m)).contains(&d));
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn agrees_with_the_time_crate() {
        for z in (-100_000..100_000).step_by(13) {
            let t = time::OffsetDateTime::from_unix_timestamp(z * 86_400).unwrap();
            assert_eq!(civil_from_days(z), (t.year() as i64, t.month() as i64, t.day() as i64));
        }
    }

    #[test]
    fn formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(human_date(ts("2026-12-15T09:30:00Z")), "15 Dec 2026");
        assert_eq!(parse_rfc3339("2026-12-15T10:30:00+01:00"), Some(ts("2026-12-15T09:30:00Z")));
        assert_eq!(parse_rfc3339("tomorrow"), None);
    }
}
