#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The DICOM gateway end to end with real peers on loopback: modalities (dcmtk's storescu,
//! pynetdicom's storescu, `outpost dicom send`) C-STORE to `outpost agent`, which forwards
//! each instance by C-STORE to PACSs (dcmtk's storescp in bit-preserving mode, Orthanc),
//! unchanged. Skipped, with a `SKIPPED` line, when `OUTPOST_PEERS=skip` or a peer is not
//! installed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use outpost_testkit::dicom::{
    compare_files, dataset_of, dicom_sink, dicom_source, part10_meta, pynetdicom_storescu,
    pynetdicom_successes, route, same_dataset, skip_dicom_tests, storescu, storescu_acknowledged,
    DicomFile, DicomPeer, Orthanc, Storescp, TestData, AGENT_AE, IMPLICIT_LE, MODALITY_AE,
    PY_MODALITY_AE,
};
use outpost_testkit::{describe_output, free_port, peak_rss_kb, wait_until_explained, Agent};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const J2K: &str = "1.2.840.10008.1.2.4.91";

/// Waits until `sink` has delivered `count` instances (and none is dead).
fn wait_delivered(agent: &Agent, sink: &str, count: u64, within: Duration) {
    wait_until_explained(
        within,
        &format!("sink {sink} has delivered {count} instances"),
        || {
            let ((pending, dead, delivered), status) = agent.sink_counts(sink);
            assert_eq!(
                dead,
                0,
                "dead letters for {sink}:\n{status}\nagent log tail:\n{}",
                agent.log_tail(30)
            );
            if delivered >= count {
                Ok(())
            } else {
                Err(format!("{delivered} delivered, {pending} pending"))
            }
        },
        || {
            format!(
                "queue status:\n{}\nagent log tail:\n{}",
                agent.queue(&["status"]),
                agent.log_tail(30)
            )
        },
    );
}

/// Sends one file with dcmtk's storescu (the option for its transfer syntax) and checks
/// that storescu saw it acknowledged with success.
fn dcmtk_send(agent: &Agent, calling: &str, file: &DicomFile) {
    let output = storescu(
        agent.port(),
        AGENT_AE,
        calling,
        &[file.storescu_option()],
        &[&file.path],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && storescu_acknowledged(&text) == vec![file.path.clone()],
        "storescu {} ({}) to the agent: not acknowledged with success\n{}\nagent log tail:\n{}",
        file.path.display(),
        file.transfer_syntax,
        describe_output(&output),
        agent.log_tail(20)
    );
}

/// The received file at the dcmtk PACS must carry the same instance in the same transfer
/// syntax, with a data set equal to the source's (element by element, pixel data
/// identical), byte-identical where the sender does not re-encode; returns its data set.
fn check_at_storescp(pacs: &Storescp, file: &DicomFile, byte_identical: bool) -> Vec<u8> {
    let received = pacs.received();
    let path = received.get(&file.sop_instance_uid).unwrap_or_else(|| {
        panic!(
            "{} ({}) did not reach storescp; it has {:?}",
            file.path.display(),
            file.sop_instance_uid,
            received.keys().collect::<Vec<_>>()
        )
    });
    let bytes = std::fs::read(path).unwrap();
    let meta = part10_meta(&bytes).unwrap();
    assert_eq!(
        meta.sop_instance_uid,
        file.sop_instance_uid,
        "{}",
        path.display()
    );
    assert_eq!(meta.sop_class_uid, file.sop_class_uid, "{}", path.display());
    assert_eq!(
        meta.transfer_syntax,
        file.transfer_syntax,
        "{} arrived in another transfer syntax",
        file.path.display()
    );
    let dataset = dataset_of(&bytes).unwrap().to_vec();
    if byte_identical {
        assert!(
            same_dataset(&dataset, &file.dataset()),
            "the data set of {} at storescp ({} bytes) differs from the source's ({} bytes)",
            file.path.display(),
            dataset.len(),
            file.dataset().len()
        );
    }
    let comparison = compare_files(&file.path, path);
    assert_eq!(
        comparison["equal"],
        true,
        "{} at storescp differs from the source element by element: {comparison}",
        file.path.display()
    );
    dataset
}

/// Orthanc must hold the instance with the data set storescp got, byte for byte.
fn check_at_orthanc(
    orthanc: &Orthanc,
    ids: &BTreeMap<String, String>,
    file: &DicomFile,
    expected: &[u8],
) {
    let id = ids.get(&file.sop_instance_uid).unwrap_or_else(|| {
        panic!(
            "{} ({}) did not reach Orthanc; it has {:?}",
            file.path.display(),
            file.sop_instance_uid,
            ids.keys().collect::<Vec<_>>()
        )
    });
    let bytes = orthanc.file(id);
    let meta = part10_meta(&bytes).unwrap();
    assert_eq!(meta.sop_instance_uid, file.sop_instance_uid);
    assert_eq!(
        meta.transfer_syntax,
        file.transfer_syntax,
        "{} at Orthanc",
        file.path.display()
    );
    let dataset = dataset_of(&bytes).unwrap();
    assert!(
        dataset == expected,
        "the data set of {} at Orthanc ({} bytes) differs from the one at storescp ({} bytes)",
        file.path.display(),
        dataset.len(),
        expected.len()
    );
}

#[test]
fn instances_from_dcmtk_and_pynetdicom_reach_storescp_and_orthanc_unchanged() {
    let test = "instances_from_dcmtk_and_pynetdicom_reach_storescp_and_orthanc_unchanged";
    if skip_dicom_tests(test, &[DicomPeer::Dcmtk]) {
        return;
    }
    let orthanc = match DicomPeer::Orthanc.missing() {
        None => Some(Orthanc::start()),
        Some(why) => {
            eprintln!("SKIPPED the Orthanc part of {test}: {why}");
            None
        }
    };
    let pacs = Storescp::start("STORESCP", &[]);
    let mut config = dicom_source("modalities", free_port(), "")
        + &dicom_sink("pacs", pacs.port(), pacs.ae_title(), "");
    let mut sinks = vec!["pacs"];
    if let Some(orthanc) = &orthanc {
        config += &dicom_sink("orthanc", orthanc.dicom_port(), Orthanc::AE, "");
        sinks.push("orthanc");
    }
    config += &route("modalities", &sinks, "");
    let agent = Agent::start(BIN, &config);

    let data = TestData::new();
    let samples = data.pydicom_samples("samples");
    // dcmtk's storescu sends every explicit-LE and compressed sample, one run per transfer
    // syntax option; pynetdicom's storescu sends the implicit-LE one.
    let (from_pynetdicom, from_dcmtk): (Vec<&DicomFile>, Vec<&DicomFile>) = samples
        .iter()
        .partition(|s| s.transfer_syntax == IMPLICIT_LE);
    for file in &from_dcmtk {
        dcmtk_send(&agent, MODALITY_AE, file);
    }
    let paths: Vec<&Path> = from_pynetdicom.iter().map(|f| f.path.as_path()).collect();
    let output = pynetdicom_storescu(agent.port(), AGENT_AE, PY_MODALITY_AE, &paths);
    assert!(
        output.status.success() && pynetdicom_successes(&output) == paths.len(),
        "pynetdicom storescu to the agent\n{}\nagent log tail:\n{}",
        describe_output(&output),
        agent.log_tail(20)
    );

    for sink in &sinks {
        wait_delivered(&agent, sink, samples.len() as u64, Duration::from_secs(60));
    }
    let orthanc_ids = orthanc.as_ref().map(Orthanc::instances);
    for file in &samples {
        // storescu re-encodes undefined-length sequences (JPEG2000.dcm has some) and drops
        // trailing padding; the rest it sends as stored.
        let dataset = check_at_storescp(&pacs, file, file.transfer_syntax != J2K);
        if let (Some(orthanc), Some(ids)) = (&orthanc, &orthanc_ids) {
            check_at_orthanc(orthanc, ids, file, &dataset);
        }
    }
    let log = agent.log();
    for file in &samples {
        assert!(
            log.lines()
                .any(|l| l.contains("instance stored") && l.contains(&file.sop_instance_uid)),
            "no \"instance stored\" line for {}",
            file.sop_instance_uid
        );
    }
}

#[test]
fn a_64_mib_multiframe_instance_streams_through_in_bounded_memory() {
    const MIB: u64 = 64;
    if skip_dicom_tests(
        "a_64_mib_multiframe_instance_streams_through_in_bounded_memory",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    let pacs = Storescp::start("STORESCP", &[]);
    let agent = Agent::start(
        BIN,
        &(dicom_source("modalities", free_port(), "")
            + &dicom_sink("pacs", pacs.port(), pacs.ae_title(), "")
            + &route("modalities", &["pacs"], "")),
    );
    let data = TestData::new();
    let file = data.multiframe("multiframe.dcm", MIB);
    let size = std::fs::metadata(&file.path).unwrap().len();
    let before_kb = peak_rss_kb(agent.pid()).expect("VmHWM of the agent");

    let started = std::time::Instant::now();
    dcmtk_send(&agent, MODALITY_AE, &file);
    let received_in = started.elapsed();
    wait_delivered(&agent, "pacs", 1, Duration::from_secs(120));
    let forwarded_in = started.elapsed() - received_in;
    let peak_kb = peak_rss_kb(agent.pid()).expect("VmHWM of the agent");

    let expected = file.dataset();
    let received = pacs
        .received_like(&expected, &file.sop_instance_uid)
        .unwrap_or_else(|| {
            panic!(
                "the {MIB} MiB instance is not at storescp byte-identical; it has {:?}\nagent log tail:\n{}",
                pacs.received(),
                agent.log_tail(20)
            )
        });
    assert_eq!(received.len(), expected.len());
    println!(
        "{size} bytes: received in {received_in:?}, forwarded in {forwarded_in:?}; agent peak RSS {before_kb} KiB before, {peak_kb} KiB after"
    );
    // Streaming: the peak grows by far less than the instance (a copy in memory would add
    // at least its 64 MiB).
    let growth_kb = peak_kb.saturating_sub(before_kb);
    assert!(
        growth_kb < MIB * 1024 / 4,
        "the agent's peak RSS grew by {growth_kb} KiB ({before_kb} -> {peak_kb} KiB) for a {size}-byte instance"
    );
}

#[test]
fn routes_pick_sinks_by_modality_sop_class_and_calling_ae() {
    if skip_dicom_tests(
        "routes_pick_sinks_by_modality_sop_class_and_calling_ae",
        &[DicomPeer::Dcmtk],
    ) {
        return;
    }
    const MR_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4";
    let ct_pacs = Storescp::start("CTPACS", &[]);
    let mr_pacs = Storescp::start("MRPACS", &[]);
    let agent = Agent::start(
        BIN,
        &(dicom_source("modalities", free_port(), "")
            + &dicom_sink("ct", ct_pacs.port(), ct_pacs.ae_title(), "")
            + &dicom_sink("mr", mr_pacs.port(), mr_pacs.ae_title(), "")
            + &route("modalities", &["ct"], "modality = [\"CT\"]")
            + &route(
                "modalities",
                &["mr"],
                &format!("sop_class = [\"{MR_STORAGE}\"]"),
            )
            + &route(
                "modalities",
                &["mr"],
                &format!("calling_ae = [\"{PY_MODALITY_AE}\"]"),
            )),
    );
    let data = TestData::new();
    let samples = data.pydicom_samples("samples");
    let by_name = |name: &str| samples.iter().find(|f| f.path.ends_with(name)).unwrap();
    let (ct, mr, sc) = (
        by_name("CT_small.dcm"),
        by_name("MR_small.dcm"),
        by_name("SC_rgb_rle.dcm"),
    );
    dcmtk_send(&agent, MODALITY_AE, ct);
    dcmtk_send(&agent, MODALITY_AE, mr);
    // No route takes a secondary capture from MODALITY: refused with a failure status.
    let refused = storescu(
        agent.port(),
        AGENT_AE,
        MODALITY_AE,
        &[sc.storescu_option()],
        &[&sc.path],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        storescu_acknowledged(&text).is_empty() && text.contains("Received Store Response"),
        "an instance no route takes must get a failure status\n{}",
        describe_output(&refused)
    );
    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["no route takes it", &sc.sop_instance_uid],
    );
    // The same instance from PYMODALITY is routed by calling AE.
    let output = pynetdicom_storescu(agent.port(), AGENT_AE, PY_MODALITY_AE, &[&sc.path]);
    assert_eq!(
        pynetdicom_successes(&output),
        1,
        "{}",
        describe_output(&output)
    );

    wait_delivered(&agent, "ct", 1, Duration::from_secs(30));
    wait_delivered(&agent, "mr", 2, Duration::from_secs(30));
    let at_ct: Vec<String> = ct_pacs.received().into_keys().collect();
    let mut at_mr: Vec<String> = mr_pacs.received().into_keys().collect();
    at_mr.sort();
    let mut expected_mr = vec![mr.sop_instance_uid.clone(), sc.sop_instance_uid.clone()];
    expected_mr.sort();
    assert_eq!(
        at_ct,
        vec![ct.sop_instance_uid.clone()],
        "the CT PACS gets only the CT"
    );
    assert_eq!(
        at_mr, expected_mr,
        "the MR PACS gets the MR (by SOP class) and PYMODALITY's instance"
    );
    let ((_, _, ct_delivered), status) = agent.sink_counts("ct");
    assert_eq!(ct_delivered, 1, "{status}");
}

#[test]
fn outpost_dicom_echo_and_send_reach_the_agent_and_orthanc() {
    let test = "outpost_dicom_echo_and_send_reach_the_agent_and_orthanc";
    if skip_dicom_tests(test, &[DicomPeer::Dcmtk]) {
        return;
    }
    let pacs = Storescp::start("STORESCP", &[]);
    let agent = Agent::start(
        BIN,
        &(dicom_source("modalities", free_port(), "")
            + &dicom_sink("pacs", pacs.port(), pacs.ae_title(), "")
            + &route("modalities", &["pacs"], "")),
    );
    let connect = format!("127.0.0.1:{}", agent.port());
    let peer = [
        "--connect",
        connect.as_str(),
        "--ae-title",
        AGENT_AE,
        "--calling-ae-title",
        MODALITY_AE,
    ];

    let echo = agent.run_cli(&[&["dicom", "echo"][..], &peer].concat());
    assert!(
        echo.status.success() && String::from_utf8_lossy(&echo.stdout).contains("success"),
        "outpost dicom echo to the agent\n{}",
        describe_output(&echo)
    );

    let data = TestData::new();
    let samples = data.pydicom_samples("samples");
    let folder = data.dir().join("samples").to_string_lossy().into_owned();
    let send = agent.run_cli(&[&["dicom", "send"][..], &peer, &[folder.as_str()]].concat());
    assert!(
        send.status.success()
            && String::from_utf8_lossy(&send.stdout)
                .contains(&format!("sent {0} of {0} instances", samples.len())),
        "outpost dicom send to the agent\n{}\nagent log tail:\n{}",
        describe_output(&send),
        agent.log_tail(20)
    );
    wait_delivered(
        &agent,
        "pacs",
        samples.len() as u64,
        Duration::from_secs(60),
    );
    // `outpost dicom send` sends each data set as stored, so every one arrives byte for byte.
    for file in &samples {
        check_at_storescp(&pacs, file, true);
    }

    if let Some(why) = DicomPeer::Orthanc.missing() {
        eprintln!("SKIPPED the Orthanc part of {test}: {why}");
        return;
    }
    let orthanc = Orthanc::start();
    let connect = format!("127.0.0.1:{}", orthanc.dicom_port());
    let peer = ["--connect", connect.as_str(), "--ae-title", Orthanc::AE];
    let echo = agent.run_cli(&[&["dicom", "echo"][..], &peer].concat());
    assert!(
        echo.status.success(),
        "outpost dicom echo to Orthanc\n{}",
        describe_output(&echo)
    );
    let send = agent.run_cli(&[&["dicom", "send"][..], &peer, &[folder.as_str()]].concat());
    assert!(
        send.status.success(),
        "outpost dicom send to Orthanc\n{}\nOrthanc log tail:\n{}",
        describe_output(&send),
        orthanc.log_tail(20)
    );
    let ids = orthanc.instances();
    for file in &samples {
        let id = ids
            .get(&file.sop_instance_uid)
            .unwrap_or_else(|| panic!("{} is not in Orthanc: {ids:?}", file.path.display()));
        let bytes = orthanc.file(id);
        let copy = data.dir().join(format!("orthanc-{id}.dcm"));
        std::fs::write(&copy, &bytes).unwrap();
        let comparison = compare_files(&file.path, &copy);
        assert_eq!(
            comparison["equal"],
            true,
            "{} in Orthanc differs from the source: {comparison}",
            file.path.display()
        );
    }
}

#[test]
fn instances_forwarded_by_stow_rs_arrive_at_orthanc_unchanged() {
    let test = "instances_forwarded_by_stow_rs_arrive_at_orthanc_unchanged";
    if skip_dicom_tests(test, &[DicomPeer::Dcmtk, DicomPeer::Orthanc]) {
        return;
    }
    let orthanc = Orthanc::start();
    let pacs = Storescp::start("STORESCP", &[]);
    let stow = format!(
        "[[sink]]\nname = \"stow\"\nkind = \"stow\"\nurl = \"http://127.0.0.1:{}/dicom-web/studies\"\n\
         timeout_secs = 30\nretry_initial_ms = 100\nretry_max_secs = 2\n\n",
        orthanc.http_port()
    );
    let agent = Agent::start(
        BIN,
        &(dicom_source("modalities", free_port(), "")
            + &dicom_sink("pacs", pacs.port(), pacs.ae_title(), "")
            + &stow
            + &route("modalities", &["pacs", "stow"], "")),
    );
    let data = TestData::new();
    let samples = data.pydicom_samples("samples");
    for file in &samples {
        dcmtk_send(&agent, MODALITY_AE, file);
    }
    wait_delivered(
        &agent,
        "pacs",
        samples.len() as u64,
        Duration::from_secs(60),
    );
    wait_delivered(
        &agent,
        "stow",
        samples.len() as u64,
        Duration::from_secs(60),
    );
    let ids = orthanc.instances();
    for file in &samples {
        // What storescp got by C-STORE is what the agent stored; Orthanc must have the
        // same data set from the STOW-RS request.
        let dataset = check_at_storescp(&pacs, file, file.transfer_syntax != J2K);
        check_at_orthanc(&orthanc, &ids, file, &dataset);
    }
}
