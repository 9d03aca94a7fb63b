#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bad DICOM input at the gateway: unknown AE titles, non-storage services, malformed PDUs,
//! associations cut or aborted mid-instance and truncated data sets. Each is refused or
//! ended with a reason in the agent's log, nothing half-received is queued or forwarded,
//! and a well-behaved modality beside it is served as usual. Skipped, with a `SKIPPED`
//! line, when `OUTPOST_PEERS=skip` or dcmtk is not installed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use outpost_testkit::dicom::{
    associate_rq, c_store_rq, dicom_sink, dicom_source, dicom_tool, echoscu, output_text,
    p_data_tf, raw_c_store, read_pdu, route, skip_dicom_tests, storescu, storescu_acknowledged,
    storescu_command, DicomFile, DicomPeer, Storescp, TestData, AGENT_AE, A_ABORT, A_RELEASE_RQ,
    IMPLICIT_LE, MODALITY_AE, PY_MODALITY_AE, VERIFICATION,
};
use outpost_testkit::{describe_output, free_port, wait_until_explained, Agent};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const CT_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";

/// An agent forwarding to a dcmtk storescp.
fn gateway() -> (Agent, Storescp) {
    let pacs = Storescp::start("STORESCP", &[]);
    let agent = Agent::start(
        BIN,
        &(dicom_source("modalities", free_port(), "")
            + &dicom_sink("pacs", pacs.port(), pacs.ae_title(), "")
            + &route("modalities", &["pacs"], "")),
    );
    (agent, pacs)
}

/// Sends `file` with storescu as MODALITY and waits until the PACS holds it unchanged: the
/// gateway still works.
fn assert_gateway_still_forwards(agent: &Agent, pacs: &Storescp, file: &DicomFile) {
    let output = storescu(
        agent.port(),
        AGENT_AE,
        MODALITY_AE,
        &[file.storescu_option()],
        &[&file.path],
    );
    assert!(
        output.status.success() && storescu_acknowledged(&output_text(&output)).len() == 1,
        "a good C-STORE beside the bad input failed\n{}\nagent log tail:\n{}",
        describe_output(&output),
        agent.log_tail(30)
    );
    let expected = file.dataset();
    wait_until_explained(
        Duration::from_secs(30),
        &format!("{} reaches the PACS", file.sop_instance_uid),
        || pacs.received_like(&expected, &file.sop_instance_uid),
        || {
            format!(
                "agent log tail:\n{}\nstorescp log tail:\n{}",
                agent.log_tail(30),
                pacs.log_tail(10)
            )
        },
    );
}

/// The number of items the queue holds (`items stored: N` in `outpost queue status`).
fn items_stored(agent: &Agent) -> u64 {
    let status = agent.queue(&["status"]);
    status
        .lines()
        .find_map(|line| line.strip_prefix("items stored: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no \"items stored: N\" in the queue status:\n{status}"))
}

/// Whether the queue has an item for this SOP Instance UID (the item's control id).
fn queued(agent: &Agent, sop_instance_uid: &str) -> bool {
    let found = agent.search(&["--control-id", sop_instance_uid, "--rejected"]);
    !found.contains("no stored message matches")
}

fn connect(agent: &Agent) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", agent.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Associates by hand (one presentation context, id 1) and returns the socket after the
/// A-ASSOCIATE-AC.
fn associate(agent: &Agent, abstract_syntax: &str, transfer_syntax: &str) -> TcpStream {
    let mut stream = connect(agent);
    stream
        .write_all(&associate_rq(
            AGENT_AE,
            MODALITY_AE,
            abstract_syntax,
            transfer_syntax,
        ))
        .unwrap();
    let (kind, body) = read_pdu(&mut stream).unwrap_or_else(|err| {
        panic!(
            "no answer to the A-ASSOCIATE-RQ: {err}\nagent log tail:\n{}",
            agent.log_tail(20)
        )
    });
    assert_eq!(
        kind, 0x02,
        "expected an A-ASSOCIATE-AC, got PDU type {kind:#04x}: {body:02x?}"
    );
    stream
}

/// Reads until the agent ends the connection; returns the PDU types it sent before.
fn pdus_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut kinds = Vec::new();
    while let Ok((kind, _)) = read_pdu(stream) {
        kinds.push(kind);
    }
    kinds
}

fn local_port(stream: &TcpStream) -> String {
    format!("127.0.0.1:{}", stream.local_addr().unwrap().port())
}

#[test]
fn unknown_calling_and_called_ae_titles_are_rejected_at_association() {
    if skip_dicom_tests(
        "unknown_calling_and_called_ae_titles_are_rejected_at_association",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    let (agent, pacs) = gateway();
    let data = TestData::new();
    let ct = data.ct_batch("ct", 2, 64);

    let echo = echoscu(agent.port(), AGENT_AE, "INTRUDER");
    assert!(
        !echo.status.success(),
        "echoscu -aet INTRUDER was accepted\n{}",
        describe_output(&echo)
    );
    let store = storescu(agent.port(), AGENT_AE, "INTRUDER", &[], &[&ct[0].path]);
    assert!(
        !store.status.success(),
        "storescu -aet INTRUDER was accepted\n{}",
        describe_output(&store)
    );
    let line = agent.wait_for_log_line(
        Duration::from_secs(10),
        &[
            "association refused",
            "calling AE title \"INTRUDER\"",
            "not in allowed_callers",
        ],
    );
    println!("agent: {line}");
    let wrong_called = echoscu(agent.port(), "NOT-OUTPOST", MODALITY_AE);
    assert!(
        !wrong_called.status.success(),
        "echoscu -aec NOT-OUTPOST was accepted\n{}",
        describe_output(&wrong_called)
    );
    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["association refused", "\"NOT-OUTPOST\"", "not ours"],
    );

    assert!(
        !queued(&agent, &ct[0].sop_instance_uid),
        "INTRUDER's instance was queued"
    );
    assert!(
        echoscu(agent.port(), AGENT_AE, MODALITY_AE)
            .status
            .success(),
        "a known modality's C-ECHO failed"
    );
    assert_gateway_still_forwards(&agent, &pacs, &ct[1]);
    assert!(
        !pacs.received().contains_key(&ct[0].sop_instance_uid),
        "INTRUDER's instance reached the PACS"
    );
}

#[test]
fn non_storage_services_are_refused_and_the_association_stays_usable() {
    if skip_dicom_tests(
        "non_storage_services_are_refused_and_the_association_stays_usable",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    let (agent, _pacs) = gateway();
    let out = dicom_tool(&["probe", &agent.port().to_string(), AGENT_AE, PY_MODALITY_AE]);
    let probe: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    println!("probe: {probe}");
    assert_eq!(
        probe["established"],
        true,
        "{probe}\nagent log tail:\n{}",
        agent.log_tail(20)
    );
    const FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";
    const MPPS: &str = "1.2.840.10008.3.1.2.3.3";
    // Either the context is rejected at negotiation, or the command on it gets a failure
    // status: never success (0x0000) or pending (0xFF00/0xFF01).
    let refused = |status: &serde_json::Value| {
        status
            .as_u64()
            .is_some_and(|code| code != 0 && code != 0xFF00 && code != 0xFF01)
    };
    match probe["contexts"][FIND].as_str() {
        Some("rejected") => {}
        _ => {
            let statuses = probe["find"].as_array().cloned().unwrap_or_default();
            assert!(
                !statuses.is_empty() && statuses.iter().all(refused),
                "C-FIND must be refused, got {probe}"
            );
        }
    }
    match probe["contexts"][MPPS].as_str() {
        Some("rejected") => {}
        _ => assert!(
            refused(&probe["store"]),
            "a C-STORE of a non-storage SOP class must be refused, got {probe}"
        ),
    }
    assert_eq!(
        probe["echo"], 0,
        "C-ECHO on the same association afterwards: {probe}"
    );
    agent.wait_for_log_line(Duration::from_secs(10), &["not a storage class"]);
    assert_eq!(items_stored(&agent), 0, "nothing may be queued");
}

#[test]
fn malformed_pdus_end_their_own_association_with_a_reason_only() {
    if skip_dicom_tests(
        "malformed_pdus_end_their_own_association_with_a_reason_only",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    let (agent, pacs) = gateway();
    let data = TestData::new();
    let ct = data.ct_batch("ct", 2, 64);

    // 1. Not DICOM at all.
    let mut http = connect(&agent);
    let http_port = local_port(&http);
    http.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let answered = pdus_until_closed(&mut http);
    let line = agent.wait_for_log_line(Duration::from_secs(10), &[&http_port, "not established"]);
    println!("HTTP request: agent sent PDU types {answered:?}; log: {line}");

    // 2. A good association, a healthy modality beside it, then a P-DATA-TF whose PDV item
    //    claims more bytes than the PDU holds.
    let mut bad_item = associate(&agent, VERIFICATION, IMPLICIT_LE);
    let bad_item_port = local_port(&bad_item);
    // 3. Another good association, then a PDU announcing 2 GiB (over max_pdu).
    let mut huge = associate(&agent, VERIFICATION, IMPLICIT_LE);
    let huge_port = local_port(&huge);
    // 4. Another, then an unknown PDU type.
    let mut unknown = associate(&agent, VERIFICATION, IMPLICIT_LE);
    let unknown_port = local_port(&unknown);

    assert_gateway_still_forwards(&agent, &pacs, &ct[0]);

    bad_item
        .write_all(&[0x04, 0, 0, 0, 0, 6, 0, 0, 0x10, 0, 1, 0x03])
        .unwrap();
    huge.write_all(&[0x04, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0])
        .unwrap();
    unknown
        .write_all(&[0x0f, 0, 0, 0, 0, 4, 1, 2, 3, 4])
        .unwrap();
    for (what, stream, port) in [
        ("an inconsistent PDV item", &mut bad_item, &bad_item_port),
        ("a 2 GiB PDU", &mut huge, &huge_port),
        ("an unknown PDU type", &mut unknown, &unknown_port),
    ] {
        let answered = pdus_until_closed(stream);
        let line = agent.wait_for_log_line(
            Duration::from_secs(10),
            &[
                &format!("association from {MODALITY_AE} at {port}"),
                "ended:",
            ],
        );
        println!("{what}: agent sent PDU types {answered:?}; log: {line}");
    }
    assert_gateway_still_forwards(&agent, &pacs, &ct[1]);
    assert_eq!(
        items_stored(&agent),
        2,
        "only the two good instances are queued"
    );
}

#[test]
fn an_instance_cut_off_mid_transfer_is_neither_queued_nor_forwarded() {
    if skip_dicom_tests(
        "an_instance_cut_off_mid_transfer_is_neither_queued_nor_forwarded",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    let (agent, pacs) = gateway();
    let data = TestData::new();
    let big = data.multiframe("big.dcm", 48);
    let ct = data.ct_batch("ct", 3, 64);
    // Blobs are written under their own names in data/blobs from the first byte.
    let blobs = agent.data_dir().join("blobs");
    let blob_bytes = |dir: &std::path::Path| -> Vec<u64> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.metadata().ok().map(|m| m.len()))
            .collect()
    };

    // 1. storescu killed (SIGKILL: no A-ABORT, the connection just closes) while sending.
    let mut sender = storescu_command(agent.port(), AGENT_AE, MODALITY_AE, &[], &[&big.path])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Polled tightly: a fast build receives the whole instance in well under a second.
    let started = std::time::Instant::now();
    while !blob_bytes(&blobs).into_iter().any(|len| len > 4 << 20) {
        if let Ok(Some(status)) = sender.try_wait() {
            panic!(
                "storescu finished ({status}) before the agent had 4 MiB of the instance\nagent log tail:\n{}",
                agent.log_tail(20)
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the agent did not write 4 MiB of the instance within 30 s\nagent log tail:\n{}",
            agent.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    sender.kill().unwrap();
    sender.wait().unwrap();
    let line = agent.wait_for_log_line(
        Duration::from_secs(20),
        &["ended:", &big.sop_instance_uid, "writer aborted"],
    );
    println!("storescu killed: {line}");

    // 2. By hand: C-STORE-RQ, half the data set, then A-ABORT.
    let mut raw = associate(&agent, CT_STORAGE, EXPLICIT_LE);
    let dataset = ct[0].dataset();
    raw.write_all(&p_data_tf(
        1,
        true,
        true,
        &c_store_rq(CT_STORAGE, &ct[0].sop_instance_uid, 1),
    ))
    .unwrap();
    let half = dataset.len() / 2;
    raw.write_all(&p_data_tf(1, false, false, &dataset[..half]))
        .unwrap();
    raw.write_all(&A_ABORT).unwrap();
    let line = agent.wait_for_log_line(
        Duration::from_secs(20),
        &[
            "aborted by the peer",
            &ct[0].sop_instance_uid,
            "writer aborted",
        ],
    );
    println!("A-ABORT mid-instance: {line}");

    // 3. By hand again: half the data set, then A-RELEASE-RQ.
    let mut raw = associate(&agent, CT_STORAGE, EXPLICIT_LE);
    raw.write_all(&p_data_tf(
        1,
        true,
        true,
        &c_store_rq(CT_STORAGE, &ct[1].sop_instance_uid, 1),
    ))
    .unwrap();
    let dataset = ct[1].dataset();
    raw.write_all(&p_data_tf(1, false, false, &dataset[..dataset.len() / 2]))
        .unwrap();
    raw.write_all(&A_RELEASE_RQ).unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    let line = agent.wait_for_log_line(
        Duration::from_secs(20),
        &[&ct[1].sop_instance_uid, "writer aborted"],
    );
    println!("A-RELEASE-RQ mid-instance: {line}");

    assert_gateway_still_forwards(&agent, &pacs, &ct[2]);
    wait_until_explained(
        Duration::from_secs(10),
        "no unfinished blob is left in data/blobs: only the good instance has one",
        || Some(()).filter(|()| blob_bytes(&blobs).len() == 1),
        || {
            format!(
                "blobs: {:?}\nagent log tail:\n{}",
                blob_bytes(&blobs),
                agent.log_tail(20)
            )
        },
    );
    assert_eq!(items_stored(&agent), 1);
    for cut in [&big, &ct[0], &ct[1]] {
        assert!(
            !queued(&agent, &cut.sop_instance_uid),
            "{} was queued",
            cut.path.display()
        );
        assert!(
            !pacs.received().contains_key(&cut.sop_instance_uid),
            "{} reached the PACS",
            cut.path.display()
        );
    }
}

/// Associates by hand and C-STOREs `dataset` as it is; returns the status.
fn store_by_hand(agent: &Agent, file: &DicomFile, dataset: &[u8]) -> u16 {
    let mut stream = associate(agent, CT_STORAGE, EXPLICIT_LE);
    let status = raw_c_store(&mut stream, CT_STORAGE, &file.sop_instance_uid, dataset)
        .unwrap_or_else(|err| {
            panic!(
                "no C-STORE-RSP for {}: {err}\nagent log tail:\n{}",
                file.path.display(),
                agent.log_tail(20)
            )
        });
    let _ = stream.write_all(&A_RELEASE_RQ);
    let _ = stream.read_to_end(&mut Vec::new());
    status
}

#[test]
fn a_data_set_cut_inside_its_pixel_data_is_refused_or_forwarded_exactly_as_sent() {
    if skip_dicom_tests(
        "a_data_set_cut_inside_its_pixel_data_is_refused_or_forwarded_exactly_as_sent",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    let (agent, pacs) = gateway();
    let data = TestData::new();
    let samples = data.pydicom_samples("samples");
    let ct = samples
        .iter()
        .find(|f| f.path.ends_with("CT_small.dcm"))
        .unwrap();
    let cut = data.truncated(&ct.path, "cut-in-pixels.dcm", 20_000);

    // dcmtk's storescu will not send a file it cannot parse (and pynetdicom parses and
    // re-encodes it, mending the lengths), so the cut data set is sent by hand.
    let output = storescu(agent.port(), AGENT_AE, MODALITY_AE, &[], &[&cut.path]);
    assert!(
        !output.status.success() && output_text(&output).contains("Bad DICOM file"),
        "storescu sent a truncated file?\n{}",
        describe_output(&output)
    );
    let dataset = cut.dataset();
    let status = store_by_hand(&agent, &cut, &dataset);
    println!(
        "{} data set bytes, (7FE0,0010) cut short: status {status:#06x}",
        dataset.len()
    );
    if status == 0 {
        // Accepted: the gateway passes data sets through without parsing them, so the PACS
        // must get exactly what was sent.
        wait_until_explained(
            Duration::from_secs(30),
            "the accepted truncated instance reaches the PACS as sent",
            || pacs.received_like(&dataset, &cut.sop_instance_uid),
            || {
                format!(
                    "agent log tail:\n{}\nstorescp log tail:\n{}",
                    agent.log_tail(20),
                    pacs.log_tail(10)
                )
            },
        );
    } else {
        assert!(
            !queued(&agent, &cut.sop_instance_uid),
            "refused with {status:#06x} but queued"
        );
    }
    let good = samples
        .iter()
        .find(|f| f.path.ends_with("MR_small.dcm"))
        .unwrap();
    assert_gateway_still_forwards(&agent, &pacs, good);
}

/// A data set cut after 301 bytes (mid-value, odd length) is refused, never queued, and
/// the gateway goes on forwarding what comes after it. (Accepted, it would make storescp
/// abort every forward of it.)
#[test]
fn an_odd_length_truncated_data_set_never_blocks_the_instances_behind_it() {
    if skip_dicom_tests(
        "an_odd_length_truncated_data_set_never_blocks_the_instances_behind_it",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    let pacs = Storescp::start("STORESCP", &[]);
    let agent = Agent::start(
        BIN,
        &(dicom_source("modalities", free_port(), "")
            + &dicom_sink("pacs", pacs.port(), pacs.ae_title(), "max_attempts = 2")
            + &route("modalities", &["pacs"], "")),
    );
    let data = TestData::new();
    let samples = data.pydicom_samples("samples");
    let ct = samples
        .iter()
        .find(|f| f.path.ends_with("CT_small.dcm"))
        .unwrap();
    let cut = data.truncated(&ct.path, "cut-in-header.dcm", 301);
    let status = store_by_hand(&agent, &cut, &cut.dataset());
    assert_ne!(
        status, 0,
        "an odd-length (truncated) data set must not be acknowledged"
    );
    assert!(
        !queued(&agent, &cut.sop_instance_uid),
        "refused with {status:#06x} but queued"
    );
    let good = samples
        .iter()
        .find(|f| f.path.ends_with("MR_small.dcm"))
        .unwrap();
    assert_gateway_still_forwards(&agent, &pacs, good);
}
