//! The SCP and SCU against real peers (dcmtk) on loopback. Skipped, with a message, when
//! `OUTPOST_PEERS=skip` or dcmtk is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use dicom_ul::association::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::Pdu;
use outpost_dicom::{
    classify_status, command, echo, read_part10_meta, DicomError, OutgoingInstance, ScuConfig,
    StatusClass, StoreAssociation,
};
use support::*;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(20);

fn storescu_args(scp: &RunningScp, option: &str, files: &[&Sample]) -> Vec<String> {
    let mut args = vec![
        "-v".to_string(),
        option.to_string(),
        "-aet".into(),
        SENDER_AE.into(),
        "-aec".into(),
        SCP_AE.into(),
        "127.0.0.1".into(),
        scp.addr.port().to_string(),
    ];
    args.extend(files.iter().map(|s| s.path.display().to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcmtk_storescu_instances_arrive_byte_identical() {
    if peers_skipped("dcmtk_storescu_instances_arrive_byte_identical") {
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let scp = start_scp(scp_config(), FileStore::new(dir.path())).await;
    // storescu re-encodes what it sends (undefined-length sequences get explicit lengths,
    // trailing padding is dropped), so the reference for "what arrived" is the same send to
    // dcmtk's own storescp in bit-preserving mode.
    let reference = Storescp::start(SCP_AE).await;
    let samples = samples();
    for sample in &samples {
        // storescu proposes only uncompressed syntaxes unless told otherwise, so each file
        // goes in its own run with the option for its transfer syntax.
        for port in [scp.addr.port(), reference.port] {
            let mut args = storescu_args(&scp, sample.storescu_option, &[sample]);
            args[7] = port.to_string();
            let output = dcmtk("storescu", &args).await;
            assert!(
                output.status.success(),
                "storescu {} to port {port}: {}\nlog tail:\n{}",
                sample.path.display(),
                describe(&output),
                log_tail(20)
            );
        }
    }
    for sample in &samples {
        let received = dir
            .path()
            .join(format!("{}.dcm", sample.meta.sop_instance_uid));
        assert!(
            received.exists(),
            "{} not stored; files: {:?}",
            sample.path.display(),
            scp.store.stored_files()
        );
        let check = dcmtk("dcmftest", &[received.display().to_string()]).await;
        assert!(check.status.success(), "dcmftest: {}", describe(&check));
        let meta = read_part10_meta(std::fs::File::open(&received).unwrap()).unwrap();
        assert_eq!(meta.transfer_syntax, sample.meta.transfer_syntax);
        assert_eq!(meta.source_ae.as_deref(), Some(SENDER_AE));
        let ours = dataset_bytes(&received);
        let theirs = reference
            .received()
            .into_iter()
            .find(|p| {
                p.display()
                    .to_string()
                    .ends_with(&format!(".{}.dcm", sample.meta.sop_instance_uid))
            })
            .unwrap_or_else(|| panic!("storescp did not store {}", sample.path.display()));
        assert!(
            ours == dataset_bytes(&theirs),
            "data set of {} differs from what dcmtk storescp received ({})",
            received.display(),
            theirs.display()
        );
        // The other files have no undefined-length sequences, so they arrive exactly as
        // stored at the source (up to trailing padding).
        if !sample.path.ends_with("JPEG2000.dcm") {
            assert!(
                same_dataset(&ours, &sample.dataset()),
                "data set of {} differs from {}",
                received.display(),
                sample.path.display()
            );
        }
    }
    let counts = &scp.store.counts;
    assert_eq!(counts.committed.load(Ordering::SeqCst), samples.len());
    assert_eq!(counts.aborted.load(Ordering::SeqCst), 0);
    let attributes = counts.attributes.lock().unwrap().clone();
    for sample in &samples {
        assert!(
            attributes.iter().any(|a| a.sop_instance_uid.as_deref()
                == Some(&sample.meta.sop_instance_uid)
                && a.sop_class_uid.as_deref() == Some(&sample.meta.sop_class_uid)),
            "no attributes with sop instance {} among {attributes:?}",
            sample.meta.sop_instance_uid
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_calling_and_wrong_called_ae_titles_are_rejected() {
    if peers_skipped("unknown_calling_and_wrong_called_ae_titles_are_rejected") {
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let scp = start_scp(scp_config(), FileStore::new(dir.path())).await;
    let port = scp.addr.port().to_string();

    let wrong_caller = dcmtk(
        "echoscu",
        &["-aet", "WRONG", "-aec", SCP_AE, "127.0.0.1", &port].map(String::from),
    )
    .await;
    assert!(
        !wrong_caller.status.success(),
        "echoscu -aet WRONG was accepted: {}",
        describe(&wrong_caller)
    );
    let needle = "calling AE title \"WRONG\"";
    wait_until(WAIT, "the log line for WRONG", || {
        !log_lines_with(&[needle, "not in allowed_callers", "reason 3"]).is_empty()
    })
    .await;

    let wrong_called = dcmtk(
        "echoscu",
        &["-aet", SENDER_AE, "-aec", "NOTUS", "127.0.0.1", &port].map(String::from),
    )
    .await;
    assert!(
        !wrong_called.status.success(),
        "echoscu -aec NOTUS was accepted: {}",
        describe(&wrong_called)
    );
    wait_until(WAIT, "the log line for NOTUS", || {
        !log_lines_with(&["called AE title \"NOTUS\"", "not ours", "reason 7"]).is_empty()
    })
    .await;

    let good = dcmtk(
        "echoscu",
        &["-aet", SENDER_AE, "-aec", SCP_AE, "127.0.0.1", &port].map(String::from),
    )
    .await;
    assert!(good.status.success(), "echoscu: {}", describe(&good));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_scu_stores_byte_identical_data_sets_at_dcmtk_storescp() {
    if peers_skipped("our_scu_stores_byte_identical_data_sets_at_dcmtk_storescp") {
        return;
    }
    capture_logs();
    let storescp = Storescp::start("STORESCP").await;
    let config = ScuConfig {
        address: format!("127.0.0.1:{}", storescp.port),
        called_ae: "STORESCP".into(),
        calling_ae: "OUTPOST-SCU".into(),
        max_pdu: 16_384,
        timeout: Duration::from_secs(10),
    };
    let samples = samples();
    let contexts: Vec<(String, String)> = samples
        .iter()
        .map(|s| (s.meta.sop_class_uid.clone(), s.meta.transfer_syntax.clone()))
        .collect();
    let mut association = StoreAssociation::open(&config, &contexts).await.unwrap();
    for sample in &samples {
        let mut file = tokio::fs::File::open(&sample.path).await.unwrap();
        let len = file.metadata().await.unwrap().len();
        tokio::io::AsyncSeekExt::seek(
            &mut file,
            std::io::SeekFrom::Start(sample.meta.dataset_offset),
        )
        .await
        .unwrap();
        let instance = OutgoingInstance {
            sop_class_uid: sample.meta.sop_class_uid.clone(),
            sop_instance_uid: sample.meta.sop_instance_uid.clone(),
            transfer_syntax: sample.meta.transfer_syntax.clone(),
            dataset_len: len - sample.meta.dataset_offset,
        };
        let status = association.store(&instance, file).await.unwrap();
        assert_eq!(
            classify_status(status),
            StatusClass::Success,
            "storescp answered {status:#06x} for {}",
            sample.path.display()
        );
    }

    // A class/syntax pair that was not proposed is refused before anything is sent.
    let unproposed = OutgoingInstance {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".into(),
        sop_instance_uid: "1.2.3".into(),
        transfer_syntax: "1.2.840.10008.1.2.4.80".into(),
        dataset_len: 0,
    };
    let err = association
        .store(&unproposed, &b""[..])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1.2.840.10008.5.1.4.1.1.4") && err.contains("1.2.840.10008.1.2.4.80"),
        "{err}"
    );
    association.release().await.unwrap();

    let received = storescp.received();
    assert_eq!(received.len(), samples.len(), "received: {received:?}");
    for sample in &samples {
        let file = received
            .iter()
            .find(|p| {
                read_part10_meta(std::fs::File::open(p).unwrap())
                    .unwrap()
                    .sop_instance_uid
                    == sample.meta.sop_instance_uid
            })
            .unwrap_or_else(|| panic!("storescp did not store {}", sample.path.display()));
        assert!(
            dataset_bytes(file) == sample.dataset(),
            "data set at storescp {} differs from {}",
            file.display(),
            sample.path.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_reaches_dcmtk_storescp() {
    if peers_skipped("echo_reaches_dcmtk_storescp") {
        return;
    }
    let storescp = Storescp::start("STORESCP").await;
    let config = ScuConfig {
        address: format!("127.0.0.1:{}", storescp.port),
        called_ae: "STORESCP".into(),
        calling_ae: "OUTPOST-SCU".into(),
        max_pdu: 65_536,
        timeout: Duration::from_secs(10),
    };
    let rtt = echo(&config).await.unwrap();
    assert!(rtt < config.timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commit_answers_failure_and_keeps_nothing() {
    if peers_skipped("failed_commit_answers_failure_and_keeps_nothing") {
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut store = FileStore::new(dir.path());
    store.fail_commit = true;
    let scp = start_scp(scp_config(), store).await;
    let sample = &samples()[0];
    let output = dcmtk("storescu", &storescu_args(&scp, "-x=", &[sample])).await;
    let text = describe(&output);
    // dcmtk names 0xA700 "Refused: OutOfResources" in its verbose output.
    assert!(
        text.contains("Refused") || text.to_lowercase().contains("0xa700"),
        "storescu did not report the refusal: {text}"
    );
    assert_eq!(scp.store.counts.failed_commits.load(Ordering::SeqCst), 1);
    assert!(
        scp.store.stored_files().is_empty(),
        "files kept: {:?}",
        scp.store.stored_files()
    );
    assert!(!log_lines_with(&[
        &sample.meta.sop_instance_uid,
        "answering 0xa700",
        "test store refuses every commit"
    ])
    .is_empty());
}

/// A-ASSOCIATE + C-STORE-RQ + half of a data set, by hand: returns the association with
/// the data set unfinished and how many data bytes were sent.
async fn half_sent_store(
    addr: std::net::SocketAddr,
    sample: &Sample,
) -> (
    dicom_ul::association::client::AsyncClientAssociation<tokio::net::TcpStream>,
    usize,
) {
    let mut association = ClientAssociationOptions::new()
        .calling_ae_title(SENDER_AE)
        .called_ae_title(SCP_AE)
        .with_presentation_context(
            sample.meta.sop_class_uid.as_str(),
            vec![sample.meta.transfer_syntax.as_str()],
        )
        .establish_async(addr)
        .await
        .unwrap();
    let pc_id = association.presentation_contexts()[0].id;
    let command =
        command::store_rq(1, &sample.meta.sop_class_uid, &sample.meta.sop_instance_uid).unwrap();
    association
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        })
        .await
        .unwrap();
    let dataset = sample.dataset();
    let half = dataset.len() / 2;
    association
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Data,
                is_last: false,
                data: dataset[..half].to_vec(),
            }],
        })
        .await
        .unwrap();
    (association, half)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_mid_instance_aborts_only_that_instance() {
    if peers_skipped("dropped_connection_mid_instance_aborts_only_that_instance") {
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let scp = start_scp(scp_config(), FileStore::new(dir.path())).await;
    let samples = samples();
    let (broken, good) = (&samples[0], &samples[1]);
    let (mut half_open, half) = half_sent_store(scp.addr, broken).await;
    let broken_port = half_open.inner_stream().local_addr().unwrap().port();
    wait_until(WAIT, "the half-sent instance to begin", || {
        scp.store.counts.begun.load(Ordering::SeqCst) == 1
    })
    .await;

    // Another association completes while the first is stuck mid-instance.
    let output = dcmtk("storescu", &storescu_args(&scp, "-x=", &[good])).await;
    assert!(output.status.success(), "storescu: {}", describe(&output));
    assert_eq!(scp.store.counts.committed.load(Ordering::SeqCst), 1);

    drop(half_open);
    wait_until(WAIT, "writer.abort() for the dropped instance", || {
        scp.store.counts.aborted.load(Ordering::SeqCst) == 1
    })
    .await;
    let peer = format!("127.0.0.1:{broken_port}");
    let why = log_lines_with(&[
        &peer,
        SENDER_AE,
        "connection closed by peer",
        &format!(
            "{half} data set bytes of sop instance {}",
            broken.meta.sop_instance_uid
        ),
    ]);
    assert!(
        !why.is_empty(),
        "no log line explains the abort; tail:\n{}",
        log_tail(20)
    );
    let files = scp.store.stored_files();
    assert_eq!(
        files,
        vec![dir
            .path()
            .join(format!("{}.dcm", good.meta.sop_instance_uid))],
        "only the good instance is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_abort_mid_instance_aborts_the_writer() {
    if peers_skipped("peer_abort_mid_instance_aborts_the_writer") {
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let scp = start_scp(scp_config(), FileStore::new(dir.path())).await;
    let sample = &samples()[0];
    let (half_open, half) = half_sent_store(scp.addr, sample).await;
    half_open.abort().await.unwrap();
    wait_until(WAIT, "writer.abort() after A-ABORT", || {
        scp.store.counts.aborted.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(!log_lines_with(&[
        "A-ABORT",
        &format!(
            "{half} data set bytes of sop instance {}",
            sample.meta.sop_instance_uid
        )
    ])
    .is_empty());
    assert!(scp.store.stored_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pdus_end_one_association_and_the_scp_keeps_serving() {
    if peers_skipped("malformed_pdus_end_one_association_and_the_scp_keeps_serving") {
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let scp = start_scp(scp_config(), FileStore::new(dir.path())).await;

    // Garbage instead of an A-ASSOCIATE-RQ.
    let mut raw = tokio::net::TcpStream::connect(scp.addr).await.unwrap();
    let raw_port = raw.local_addr().unwrap().port();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let raw_peer = format!("127.0.0.1:{raw_port}");
    wait_until(WAIT, "a log line for the garbage connection", || {
        !log_lines_with(&[&raw_peer, "not established"]).is_empty()
    })
    .await;

    // Garbage after a good association, in the middle of an instance.
    let sample = &samples()[0];
    let (mut association, _) = half_sent_store(scp.addr, sample).await;
    let port = association.inner_stream().local_addr().unwrap().port();
    association
        .inner_stream()
        .write_all(&[0x04, 0, 0, 0, 0, 3, 0xFF, 0xFF, 0xFF])
        .await
        .unwrap();
    let peer = format!("127.0.0.1:{port}");
    wait_until(WAIT, "a log line for the malformed PDU", || {
        !log_lines_with(&[&peer, "ended", "writer aborted"]).is_empty()
    })
    .await;
    assert_eq!(scp.store.counts.aborted.load(Ordering::SeqCst), 1);

    let good = dcmtk(
        "echoscu",
        &["-aet", SENDER_AE, "-aec", SCP_AE, "127.0.0.1"]
            .map(String::from)
            .into_iter()
            .chain([scp.addr.port().to_string()])
            .collect::<Vec<_>>(),
    )
    .await;
    assert!(
        good.status.success(),
        "echoscu after malformed PDUs: {}",
        describe(&good)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn associations_over_the_limit_are_rejected_transiently() {
    if peers_skipped("associations_over_the_limit_are_rejected_transiently") {
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut config = scp_config();
    config.max_associations = 1;
    let scp = start_scp(config, FileStore::new(dir.path())).await;
    let scu = ScuConfig {
        address: scp.addr.to_string(),
        called_ae: SCP_AE.into(),
        calling_ae: SENDER_AE.into(),
        max_pdu: 65_536,
        timeout: Duration::from_secs(10),
    };
    let held = ClientAssociationOptions::new()
        .calling_ae_title(SENDER_AE)
        .called_ae_title(SCP_AE)
        .with_abstract_syntax(command::VERIFICATION_SOP_CLASS)
        .establish_async(scp.addr)
        .await
        .unwrap();
    let err = echo(&scu).await.unwrap_err();
    assert!(
        matches!(&err, DicomError::Rejected { reason, .. } if reason.contains("local limit exceeded")),
        "{err}"
    );
    assert!(err.retryable(), "a transient rejection is retryable: {err}");
    held.release().await.unwrap();
    // The permit is returned when the held association's task ends.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match echo(&scu).await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("echo after release: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_storage_class_gets_0122_and_shutdown_ends_serve() {
    if peers_skipped("non_storage_class_gets_0122_and_shutdown_ends_serve") {
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let scp = start_scp(scp_config(), FileStore::new(dir.path())).await;
    let scu = ScuConfig {
        address: scp.addr.to_string(),
        called_ae: SCP_AE.into(),
        calling_ae: SENDER_AE.into(),
        max_pdu: 65_536,
        timeout: Duration::from_secs(10),
    };
    // Modality Worklist FIND is not a storage class: negotiated (promiscuous) but refused.
    let worklist = "1.2.840.10008.5.1.4.31";
    let explicit = "1.2.840.10008.1.2.1";
    let mut association =
        StoreAssociation::open(&scu, &[(worklist.to_string(), explicit.to_string())])
            .await
            .unwrap();
    let instance = OutgoingInstance {
        sop_class_uid: worklist.into(),
        sop_instance_uid: "1.2.3.4".into(),
        transfer_syntax: explicit.into(),
        dataset_len: 0,
    };
    let status = association.store(&instance, &b""[..]).await.unwrap();
    assert_eq!(status, outpost_dicom::status::SOP_CLASS_NOT_SUPPORTED);
    assert_eq!(scp.store.counts.begun.load(Ordering::SeqCst), 0);

    // An idle association is aborted on shutdown and serve() returns.
    scp.shutdown.cancel();
    let returned = tokio::time::timeout(WAIT, async {
        loop {
            if scp.task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(returned.is_ok(), "serve() still running after shutdown");
    let err = association.store(&instance, &b""[..]).await.unwrap_err();
    assert!(err.retryable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_over_max_instance_bytes_aborts_the_association() {
    if peers_skipped("instance_over_max_instance_bytes_aborts_the_association") {
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut config = scp_config();
    config.max_instance_bytes = 1_000;
    let scp = start_scp(config, FileStore::new(dir.path())).await;
    let sample = &samples()[0];
    let output = dcmtk("storescu", &storescu_args(&scp, "-x=", &[sample])).await;
    assert!(
        !output.status.success() || describe(&output).contains("Abort"),
        "storescu did not notice the abort: {}",
        describe(&output)
    );
    wait_until(WAIT, "writer.abort() for the oversized instance", || {
        scp.store.counts.aborted.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(!log_lines_with(&[
        &sample.meta.sop_instance_uid,
        "larger than max_instance_bytes (1000); aborting the association"
    ])
    .is_empty());
    assert!(scp.store.stored_files().is_empty());
}
