//! The maintenance window: `Sun 01:00-04:00 America/New_York`, checked against a timestamp.

use std::fmt;

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// A weekly window in a named time zone, e.g. `Sun 01:00-04:00 America/New_York` or
/// `Mon-Fri 22:00-02:00 UTC`.
///
/// Days name the day the window *opens*; an end time at or before the start time means the
/// window runs past midnight into the next day. Times are wall-clock times in the zone, so
/// on a daylight-saving change the window is shorter or longer in real time, and a wall-clock
/// time the clock skips is moved forward by the length of the gap (02:30 on a spring-forward
/// night in New York becomes 03:30 EDT).
#[derive(Debug, Clone)]
pub struct MaintenanceWindow {
    /// The text as the policy wrote it, for messages.
    text: String,
    /// Opening days, indexed from Monday = 0.
    days: [bool; 7],
    /// Local opening time.
    start: Time,
    /// Local closing time, on the opening day or the day after.
    end: Time,
    /// Whether the window closes on the day after it opens.
    crosses_midnight: bool,
    /// The zone the times are in; from jiff's bundled database, so every platform agrees.
    tz: TimeZone,
}

impl MaintenanceWindow {
    /// Parses `DAYS HH:MM-HH:MM ZONE`. `DAYS` is `Mon`..`Sun`, a range such as `Mon-Fri`
    /// (which may wrap, as `Fri-Mon`), or a comma-separated list of either. `ZONE` is an IANA
    /// name or `UTC`. The error says what is wrong, without the expected-format preamble.
    pub fn parse(text: &str) -> Result<MaintenanceWindow, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [days, times, zone] = parts.as_slice() else {
            return Err(format!(
                "three parts separated by spaces, found {}",
                parts.len()
            ));
        };
        let days = parse_days(days)?;
        let (start, end) = times
            .split_once('-')
            .ok_or_else(|| format!("a time range HH:MM-HH:MM, found `{times}`"))?;
        let start_time = parse_time(start, false)?;
        let end_time = parse_time(end, true)?;
        if start_time == end_time {
            return Err("a window whose start and end differ".to_owned());
        }
        let tz = if zone.eq_ignore_ascii_case("UTC") {
            TimeZone::UTC
        } else {
            TimeZone::get(zone).map_err(|_| format!("a known time zone, found `{zone}`"))?
        };
        Ok(MaintenanceWindow {
            text: text.to_owned(),
            days,
            start: start_time,
            end: end_time,
            crosses_midnight: end_time <= start_time,
            tz,
        })
    }

    /// Whether `now` falls inside an occurrence of the window (start inclusive, end
    /// exclusive).
    pub fn contains(&self, now: Timestamp) -> bool {
        let today = now.to_zoned(self.tz.clone()).date();
        // Only a window that opened yesterday can still be open today.
        [today.yesterday().ok(), Some(today)]
            .into_iter()
            .flatten()
            .filter(|date| self.opens_on(*date))
            .filter_map(|date| self.bounds(date))
            .any(|(start, end)| start <= now && now < end)
    }

    /// The next time the window opens strictly after `now`, in the window's zone.
    pub fn next_start(&self, now: Timestamp) -> Option<Zoned> {
        let today = now.to_zoned(self.tz.clone()).date();
        (0..=8)
            .filter_map(|days| today.checked_add(jiff::Span::new().days(days)).ok())
            .filter(|date| self.opens_on(*date))
            .filter_map(|date| date.to_datetime(self.start).to_zoned(self.tz.clone()).ok())
            .find(|start| start.timestamp() > now)
    }

    /// The window as the policy wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn opens_on(&self, date: Date) -> bool {
        self.days[weekday_index(date.weekday())]
    }

    /// The real-time bounds of the occurrence opening on `date`.
    fn bounds(&self, date: Date) -> Option<(Timestamp, Timestamp)> {
        let start = date
            .to_datetime(self.start)
            .to_zoned(self.tz.clone())
            .ok()?;
        let end_date = if self.crosses_midnight {
            date.tomorrow().ok()?
        } else {
            date
        };
        let end = end_date
            .to_datetime(self.end)
            .to_zoned(self.tz.clone())
            .ok()?;
        Some((start.timestamp(), end.timestamp()))
    }
}

impl fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

fn weekday_index(day: Weekday) -> usize {
    usize::from(day.to_monday_zero_offset().unsigned_abs())
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    for item in text.split(',') {
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (parse_day(from)?, parse_day(to)?);
                let mut day = from;
                loop {
                    days[day] = true;
                    if day == to {
                        break;
                    }
                    day = (day + 1) % 7;
                }
            }
            None => days[parse_day(item)?] = true,
        }
    }
    Ok(days)
}

fn parse_day(text: &str) -> Result<usize, String> {
    DAY_NAMES
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text))
        .ok_or_else(|| format!("a day Mon, Tue, Wed, Thu, Fri, Sat or Sun, found `{text}`"))
}

/// `HH:MM`; `24:00` is accepted as an end time and means midnight at the end of the day.
fn parse_time(text: &str, is_end: bool) -> Result<Time, String> {
    let bad = || format!("a time HH:MM, found `{text}`");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let hour: i8 = h.parse().map_err(|_| bad())?;
    let minute: i8 = m.parse().map_err(|_| bad())?;
    if is_end && hour == 24 && minute == 0 {
        return Ok(Time::midnight());
    }
    Time::new(hour, minute, 0, 0).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_ranges_wrap_and_lists_combine() {
        assert_eq!(
            parse_days("Mon-Fri").unwrap(),
            [true, true, true, true, true, false, false]
        );
        assert_eq!(
            parse_days("Fri-Mon").unwrap(),
            [true, false, false, false, true, true, true]
        );
        assert_eq!(
            parse_days("Tue,Sat-Sun").unwrap(),
            [false, true, false, false, false, true, true]
        );
    }

    #[test]
    fn malformed_windows_say_what_was_expected() {
        for (text, needle) in [
            ("Sun 01:00-04:00", "three parts"),
            ("Sunday 01:00-04:00 UTC", "a day"),
            ("Sun 1:00-04:00 UTC", "a time HH:MM"),
            ("Sun 01:00-25:00 UTC", "a time HH:MM"),
            ("Sun 01:00 UTC", "a time range"),
            ("Sun 01:00-01:00 UTC", "differ"),
            ("Sun 01:00-04:00 Mars/Olympus", "time zone"),
        ] {
            let err = MaintenanceWindow::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn end_of_day_may_be_written_as_24_00() {
        let w = MaintenanceWindow::parse("Sat 22:00-24:00 UTC").unwrap();
        assert!(w.contains("2025-01-04T23:59:00Z".parse().unwrap()));
        assert!(!w.contains("2025-01-05T00:00:00Z".parse().unwrap()));
    }
}
