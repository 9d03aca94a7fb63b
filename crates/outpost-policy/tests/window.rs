//! The maintenance window: inside, outside, across midnight and on DST change days in
//! America/New_York, as seen through `decide` for `update.apply`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{allowed, assert_refused, awaiting, decide_at, example, parse, ts};
use outpost_policy::MaintenanceWindow;
use serde_json::json;

fn update_at(policy: &outpost_policy::Policy, at: &str) -> outpost_policy::Decision {
    decide_at(policy, "update.apply", json!({}), ts(at))
}

fn window(text: &str) -> MaintenanceWindow {
    MaintenanceWindow::parse(text).unwrap()
}

#[test]
fn window_grant_is_allowed_inside_the_window() {
    // Sunday 2025-01-05 02:00 EST.
    let policy = example();
    assert_eq!(
        update_at(&policy, "2025-01-05T07:00:00Z"),
        allowed("allow.\"update.apply\"")
    );
    // Start is inclusive.
    assert_eq!(
        update_at(&policy, "2025-01-05T06:00:00Z"),
        allowed("allow.\"update.apply\"")
    );
}

#[test]
fn window_grant_is_refused_outside_with_the_next_start() {
    let policy = example();
    // Sunday 00:59:59 EST: opens in one second.
    let reason = assert_refused(
        &update_at(&policy, "2025-01-05T05:59:59Z"),
        "maintenance_window",
        "outside the maintenance window (Sun 01:00-04:00 America/New_York)",
    );
    assert!(
        reason.ends_with("next opens at 2025-01-05T01:00:00-05:00[America/New_York]"),
        "{reason}"
    );
    // End is exclusive: Sunday 04:00 EST, next is a week later.
    let reason = assert_refused(
        &update_at(&policy, "2025-01-05T09:00:00Z"),
        "maintenance_window",
        "",
    );
    assert!(
        reason.ends_with("next opens at 2025-01-12T01:00:00-05:00[America/New_York]"),
        "{reason}"
    );
    // A Wednesday.
    let reason = assert_refused(
        &update_at(&policy, "2025-01-08T12:00:00Z"),
        "maintenance_window",
        "",
    );
    assert!(
        reason.ends_with("2025-01-12T01:00:00-05:00[America/New_York]"),
        "{reason}"
    );
}

#[test]
fn window_and_access_approval_wait_only_inside() {
    let policy = parse(
        "access = \"approval\"\nmaintenance_window = \"Sun 01:00-04:00 America/New_York\"\n\
         [allow]\n\"update.apply\" = \"window\"\n",
    );
    assert_eq!(
        update_at(&policy, "2025-01-05T07:00:00Z"),
        awaiting("access")
    );
    assert_refused(
        &update_at(&policy, "2025-01-06T07:00:00Z"),
        "maintenance_window",
        "",
    );
}

#[test]
fn window_across_midnight_covers_the_next_morning() {
    let policy = parse(
        "maintenance_window = \"Sat 23:00-02:00 America/New_York\"\n\
         [allow]\n\"update.apply\" = { window = true }\n",
    );
    // Sat 22:59 EST, Sat 23:00, Sun 01:59, Sun 02:00.
    assert_refused(
        &update_at(&policy, "2025-01-05T03:59:00Z"),
        "maintenance_window",
        "2025-01-04T23:00:00-05:00",
    );
    assert_eq!(
        update_at(&policy, "2025-01-05T04:00:00Z"),
        allowed("allow.\"update.apply\"")
    );
    assert_eq!(
        update_at(&policy, "2025-01-05T06:59:00Z"),
        allowed("allow.\"update.apply\"")
    );
    assert_refused(
        &update_at(&policy, "2025-01-05T07:00:00Z"),
        "maintenance_window",
        "2025-01-11T23:00:00-05:00",
    );
}

#[test]
fn weekday_range_across_midnight_opens_only_on_listed_days() {
    let w = window("Mon-Fri 22:00-02:00 UTC");
    // Saturday 01:00 belongs to Friday's window; Monday 01:00 to Sunday's, which is not listed.
    assert!(w.contains(ts("2025-01-11T01:00:00Z")));
    assert!(!w.contains(ts("2025-01-11T23:00:00Z")));
    assert!(!w.contains(ts("2025-01-13T01:00:00Z")));
    assert!(w.contains(ts("2025-01-13T22:00:00Z")));
    assert_eq!(
        w.next_start(ts("2025-01-11T03:00:00Z"))
            .unwrap()
            .to_string(),
        "2025-01-13T22:00:00+00:00[UTC]"
    );
}

#[test]
fn spring_forward_day_window_follows_the_wall_clock() {
    // 2025-03-09: at 02:00 EST clocks jump to 03:00 EDT. The window is 01:00 EST (06:00Z)
    // to 04:00 EDT (08:00Z): two real hours.
    let w = window("Sun 01:00-04:00 America/New_York");
    assert!(!w.contains(ts("2025-03-09T05:59:59Z")));
    assert!(w.contains(ts("2025-03-09T06:00:00Z")));
    assert!(w.contains(ts("2025-03-09T07:30:00Z")));
    assert!(!w.contains(ts("2025-03-09T08:00:00Z")));
    assert_eq!(
        w.next_start(ts("2025-03-08T12:00:00Z"))
            .unwrap()
            .to_string(),
        "2025-03-09T01:00:00-05:00[America/New_York]"
    );
    // The week after is on daylight time.
    assert_eq!(
        w.next_start(ts("2025-03-09T08:00:00Z"))
            .unwrap()
            .to_string(),
        "2025-03-16T01:00:00-04:00[America/New_York]"
    );
}

#[test]
fn fall_back_day_window_follows_the_wall_clock() {
    // 2025-11-02: at 02:00 EDT clocks fall back to 01:00 EST. The window opens at the first
    // 01:00 (EDT, 05:00Z) and closes at 04:00 EST (09:00Z): four real hours.
    let w = window("Sun 01:00-04:00 America/New_York");
    assert!(!w.contains(ts("2025-11-02T04:59:59Z")));
    assert!(w.contains(ts("2025-11-02T05:00:00Z")));
    assert!(w.contains(ts("2025-11-02T06:30:00Z"))); // the second 01:30
    assert!(w.contains(ts("2025-11-02T08:59:59Z")));
    assert!(!w.contains(ts("2025-11-02T09:00:00Z")));
}

#[test]
fn window_start_skipped_by_the_clock_opens_at_the_next_valid_time() {
    // 02:30 does not exist on 2025-03-09 in New York; the window opens at 03:30 EDT.
    let w = window("Sun 02:30-05:00 America/New_York");
    assert!(!w.contains(ts("2025-03-09T07:00:00Z"))); // 03:00 EDT
    assert!(w.contains(ts("2025-03-09T07:30:00Z"))); // 03:30 EDT
    assert!(w.contains(ts("2025-03-09T08:59:00Z")));
}

#[test]
fn utc_window_and_day_lists() {
    let w = window("Sat,Sun 00:00-06:00 UTC");
    assert!(w.contains(ts("2025-01-04T03:00:00Z")));
    assert!(w.contains(ts("2025-01-05T03:00:00Z")));
    assert!(!w.contains(ts("2025-01-06T03:00:00Z")));
    assert_eq!(w.to_string(), "Sat,Sun 00:00-06:00 UTC");
}
