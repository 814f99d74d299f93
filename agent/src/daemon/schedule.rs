//! When a source runs next: cron in the policy's time zone, plus a stable per-pod jitter.
//!
//! The next time is computed afresh from the current time at every step, in the time zone itself,
//! so daylight-saving changes are followed and nothing is captured once and kept. A run that
//! outlasts its next tick skips that tick (counted), never overlaps itself.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::error::{Error, Result};

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Cron {
    cron: croner::Cron,
    expression: String,
}

impl Cron {
    /// Parses a 5- or 6-field expression (already validated by the policy).
    pub fn parse(expression: &str) -> Result<Cron> {
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build();
        let cron = parser
            .parse(expression)
            .map_err(|e| Error::failed(format!("schedule `{expression}`: {e}")))?;
        Ok(Cron {
            cron,
            expression: expression.to_string(),
        })
    }

    /// The expression.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The first fire time strictly after `after`, evaluated in `tz`.
    pub fn next_after<Tz: TimeZone>(&self, tz: &Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The gap between the two fire times after `after`: the schedule's interval there.
    pub fn interval<Tz: TimeZone>(&self, tz: &Tz, after: DateTime<Utc>) -> Option<Duration> {
        let a = self.next_after(tz, after)?;
        let b = self.next_after(tz, a)?;
        (b - a).to_std().ok()
    }

    /// Fire times in (`from`, `to`]: the ticks a run that lasted from `from` to `to` skipped.
    pub fn ticks_between<Tz: TimeZone>(
        &self,
        tz: &Tz,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> u64 {
        let mut n = 0;
        let mut t = from;
        while let Some(next) = self.next_after(tz, t) {
            if next > to || n > 100_000 {
                break;
            }
            n += 1;
            t = next;
        }
        n
    }
}

/// A stable offset in [0, `max`) for this pod and source, so a fleet spreads out but each pod
/// keeps its own slot.
pub fn jitter(max: Option<Duration>, pod: &str, source: &str) -> Duration {
    let Some(max) = max.filter(|m| !m.is_zero()) else {
        return Duration::ZERO;
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (pod, source).hash(&mut h);
    Duration::from_millis(h.finish() % max.as_millis().max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_and_six_field_schedules() {
        let c = Cron::parse("0 */6 * * *").unwrap();
        assert_eq!(
            c.next_after(&Utc, at("2026-11-27T03:15:00Z")),
            Some(at("2026-11-27T06:00:00Z"))
        );
        assert_eq!(
            c.next_after(&Utc, at("2026-11-27T06:00:00Z")),
            Some(at("2026-11-27T12:00:00Z")),
            "strictly after"
        );
        let s = Cron::parse("*/10 * * * * *").unwrap();
        assert_eq!(
            s.next_after(&Utc, at("2026-11-27T03:15:01Z")),
            Some(at("2026-11-27T03:15:10Z"))
        );
        assert_eq!(
            s.interval(&Utc, at("2026-11-27T03:15:01Z")),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn the_time_zone_and_daylight_saving_are_followed() {
        let c = Cron::parse("30 2 * * *").unwrap();
        let berlin = chrono_tz::Europe::Berlin;
        // Winter: 02:30 in Berlin is 01:30 UTC.
        assert_eq!(
            c.next_after(&berlin, at("2026-11-27T00:00:00Z")),
            Some(at("2026-11-27T01:30:00Z"))
        );
        // Summer: 00:30 UTC.
        assert_eq!(
            c.next_after(&berlin, at("2026-07-01T00:00:00Z")),
            Some(at("2026-07-01T00:30:00Z"))
        );
        // Daily at 04:00 Berlin across the end of summer time: the UTC hour moves by one.
        let d = Cron::parse("0 4 * * *").unwrap();
        assert_eq!(
            d.next_after(&berlin, at("2026-10-24T12:00:00Z")),
            Some(at("2026-10-25T03:00:00Z"))
        );
        assert_eq!(
            d.next_after(&berlin, at("2026-10-25T12:00:00Z")),
            Some(at("2026-10-26T03:00:00Z"))
        );
        assert_eq!(
            d.next_after(&berlin, at("2026-10-23T12:00:00Z")),
            Some(at("2026-10-24T02:00:00Z"))
        );
    }

    #[test]
    fn a_long_run_skips_the_ticks_it_covered() {
        let c = Cron::parse("*/15 * * * *").unwrap();
        assert_eq!(
            c.ticks_between(&Utc, at("2026-11-27T03:00:00Z"), at("2026-11-27T03:40:00Z")),
            2
        );
        assert_eq!(
            c.ticks_between(&Utc, at("2026-11-27T03:00:00Z"), at("2026-11-27T03:10:00Z")),
            0
        );
    }

    #[test]
    fn jitter_is_stable_per_pod_and_source_and_bounded() {
        let max = Some(Duration::from_secs(300));
        let a = jitter(max, "pod-a", "db");
        assert_eq!(a, jitter(max, "pod-a", "db"));
        assert!(a < Duration::from_secs(300));
        let spread: std::collections::BTreeSet<_> = (0..20)
            .map(|i| jitter(max, &format!("pod-{i}"), "db"))
            .collect();
        assert!(spread.len() > 15, "pods spread out: {spread:?}");
        assert_eq!(jitter(None, "pod-a", "db"), Duration::ZERO);
    }
}
