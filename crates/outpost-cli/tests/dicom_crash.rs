#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The DICOM gateway killed (-9) mid-association and mid-forwarding, and a PACS that is
//! down for a while: every instance a modality saw acknowledged reaches the PACS, unchanged
//! (duplicates are acceptable, losses are not). Skipped, with a `SKIPPED` line, when
//! `OUTPOST_PEERS=skip` or dcmtk is not installed.

use std::path::Path;
use std::time::{Duration, Instant};

use outpost_testkit::dicom::{
    dicom_sink, dicom_source, output_text, route, skip_dicom_tests, storescu,
    storescu_acknowledged, storescu_command, DicomFile, DicomPeer, Storescp, TestData, AGENT_AE,
    MODALITY_AE,
};
use outpost_testkit::{describe_output, free_port, wait_until_explained, Agent};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

fn gateway(pacs: &Storescp) -> Agent {
    Agent::start(
        BIN,
        &(dicom_source("modalities", free_port(), "")
            + &dicom_sink("pacs", pacs.port(), pacs.ae_title(), "")
            + &route("modalities", &["pacs"], "")),
    )
}

/// How many log lines of the agent contain `needle`.
fn log_count(agent: &Agent, needle: &str) -> usize {
    agent.log().lines().filter(|l| l.contains(needle)).count()
}

/// Polls (every 5 ms: instances go by fast) until the agent's log has `count` lines with
/// `needle`; panics after `within`, or if `gave_up()` says waiting is pointless.
fn wait_for_log_count(
    agent: &Agent,
    needle: &str,
    count: usize,
    within: Duration,
    mut gave_up: impl FnMut() -> Option<String>,
) {
    let started = Instant::now();
    loop {
        let seen = log_count(agent, needle);
        if seen >= count {
            return;
        }
        if let Some(why) = gave_up() {
            panic!("{why} before the agent logged {count} \"{needle}\" lines (it logged {seen})\nagent log tail:\n{}", agent.log_tail(30));
        }
        assert!(
            started.elapsed() < within,
            "the agent logged {seen} of {count} \"{needle}\" lines within {within:?}\nagent log tail:\n{}",
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the PACS holds every file's data set, and the queue has nothing pending or
/// dead.
fn wait_all_at_pacs(agent: &Agent, pacs: &Storescp, files: &[DicomFile]) {
    let expected: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|f| (f.sop_instance_uid.clone(), f.dataset()))
        .collect();
    wait_until_explained(
        Duration::from_secs(90),
        &format!("all {} instances are at the PACS, unchanged", files.len()),
        || {
            let missing: Vec<&String> = expected
                .iter()
                .filter(|(uid, dataset)| pacs.received_like(dataset, uid).is_none())
                .map(|(uid, _)| uid)
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} missing, e.g. {:?}",
                    missing.len(),
                    &missing[..missing.len().min(3)]
                ))
            }
        },
        || {
            format!(
                "queue status:\n{}\nagent log tail:\n{}\nstorescp log tail:\n{}",
                agent.queue(&["status"]),
                agent.log_tail(30),
                pacs.log_tail(10)
            )
        },
    );
    wait_until_explained(
        Duration::from_secs(30),
        "the queue has nothing pending or dead for the PACS",
        || match agent.sink_counts("pacs") {
            ((0, 0, delivered), _) if delivered >= files.len() as u64 => Ok(()),
            (counts, status) => Err(format!("(pending, dead, delivered) = {counts:?}\n{status}")),
        },
        || format!("agent log tail:\n{}", agent.log_tail(30)),
    );
}

#[test]
fn kill_9_mid_association_loses_no_acknowledged_instance() {
    if skip_dicom_tests(
        "kill_9_mid_association_loses_no_acknowledged_instance",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    const COUNT: usize = 50;
    const KILL_AFTER: usize = 12;
    let pacs = Storescp::start("STORESCP", &[]);
    let mut agent = gateway(&pacs);
    let data = TestData::new();
    let files = data.ct_batch("batch", COUNT, 512);
    let paths: Vec<&Path> = files.iter().map(|f| f.path.as_path()).collect();

    // One association for all 50; the agent is killed once some are stored.
    let log_path = data.dir().join("storescu.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut sender = storescu_command(agent.port(), AGENT_AE, MODALITY_AE, &[], &paths)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for_log_count(
        &agent,
        "instance stored",
        KILL_AFTER,
        Duration::from_secs(60),
        || {
            sender
                .try_wait()
                .ok()
                .flatten()
                .map(|status| format!("storescu finished ({status})"))
        },
    );
    agent.kill9();
    let stored_at_kill = log_count(&agent, "instance stored");
    let sender_status = sender.wait().unwrap();
    let text = std::fs::read_to_string(&log_path).unwrap();
    let acked = storescu_acknowledged(&text);
    println!(
        "killed with {stored_at_kill} stored; storescu ({sender_status}) saw {} acknowledged",
        acked.len()
    );
    assert!(
        !sender_status.success() && acked.len() >= KILL_AFTER - 1 && acked.len() < COUNT,
        "the kill should cut the association after about {KILL_AFTER} instances; storescu ({sender_status}) saw {} acknowledged\n{}",
        acked.len(),
        outpost_testkit::tail(&text, 20)
    );

    agent.restart();
    // The modality sends again what it did not see acknowledged.
    let rest: Vec<&Path> = paths
        .iter()
        .copied()
        .filter(|p| !acked.iter().any(|a| a == p))
        .collect();
    let output = storescu(agent.port(), AGENT_AE, MODALITY_AE, &[], &rest);
    assert!(
        output.status.success() && storescu_acknowledged(&output_text(&output)).len() == rest.len(),
        "resending the {} unacknowledged instances after the restart\n{}\nagent log tail:\n{}",
        rest.len(),
        describe_output(&output),
        agent.log_tail(20)
    );
    wait_all_at_pacs(&agent, &pacs, &files);
}

#[test]
fn kill_9_mid_forwarding_loses_no_acknowledged_instance() {
    if skip_dicom_tests(
        "kill_9_mid_forwarding_loses_no_acknowledged_instance",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    const COUNT: usize = 30;
    const KILL_AFTER: usize = 5;
    // The PACS starts down so that the whole batch is queued first, then forwarded in one
    // association, which the kill cuts.
    let mut pacs = Storescp::prepare("STORESCP", &[]);
    let mut agent = gateway(&pacs);
    let data = TestData::new();
    let files = data.ct_batch("batch", COUNT, 384);
    let paths: Vec<&Path> = files.iter().map(|f| f.path.as_path()).collect();
    let output = storescu(agent.port(), AGENT_AE, MODALITY_AE, &[], &paths);
    assert_eq!(
        storescu_acknowledged(&output_text(&output)).len(),
        COUNT,
        "every instance is acknowledged while the PACS is down\n{}\nagent log tail:\n{}",
        describe_output(&output),
        agent.log_tail(20)
    );

    pacs.launch();
    wait_for_log_count(
        &agent,
        "instance delivered",
        KILL_AFTER,
        Duration::from_secs(60),
        || None,
    );
    agent.kill9();
    let delivered_at_kill = log_count(&agent, "instance delivered");
    println!("killed with {delivered_at_kill} of {COUNT} delivered");
    assert!(
        delivered_at_kill < COUNT,
        "the kill should cut the forwarding short; all {COUNT} were delivered first"
    );

    agent.restart();
    wait_all_at_pacs(&agent, &pacs, &files);
    let delivered = log_count(&agent, "instance delivered");
    println!(
        "{delivered} deliveries for {COUNT} instances (duplicates: {})",
        delivered.saturating_sub(COUNT)
    );
}

#[test]
fn with_the_pacs_down_modalities_still_succeed_and_the_backlog_drains_later() {
    if skip_dicom_tests(
        "with_the_pacs_down_modalities_still_succeed_and_the_backlog_drains_later",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    const COUNT: usize = 20;
    let mut pacs = Storescp::prepare("STORESCP", &[]);
    let agent = gateway(&pacs);
    let data = TestData::new();
    let files = data.ct_batch("batch", COUNT, 64);
    let paths: Vec<&Path> = files.iter().map(|f| f.path.as_path()).collect();
    // Two associations, as two modalities would.
    for half in paths.chunks(COUNT / 2) {
        let output = storescu(agent.port(), AGENT_AE, MODALITY_AE, &[], half);
        assert!(
            output.status.success()
                && storescu_acknowledged(&output_text(&output)).len() == half.len(),
            "the modality must get success while the PACS is down\n{}\nagent log tail:\n{}",
            describe_output(&output),
            agent.log_tail(20)
        );
    }
    let ((pending, dead, delivered), status) = agent.sink_counts("pacs");
    println!("PACS down:\n{status}");
    assert_eq!((pending, dead, delivered), (COUNT as u64, 0, 0), "{status}");
    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["cannot deliver to the PACS", "will retry"],
    );
    assert!(pacs.received().is_empty());

    pacs.launch();
    wait_all_at_pacs(&agent, &pacs, &files);
    println!("PACS up:\n{}", agent.queue(&["status"]));
    // Instances are forwarded in the order they were acknowledged.
    let order: Vec<String> = agent
        .log()
        .lines()
        .filter(|l| l.contains("instance delivered"))
        .filter_map(|l| l.split("sop_instance_uid=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_owned))
        .collect();
    let expected: Vec<String> = files.iter().map(|f| f.sop_instance_uid.clone()).collect();
    assert_eq!(
        order, expected,
        "delivery order differs from acknowledgement order"
    );
}
