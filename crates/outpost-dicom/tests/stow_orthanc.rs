//! STOW-RS against Orthanc with its DICOMweb plugin, on loopback. Orthanc 1.10 has no bind
//! address option, so it runs with `tests/bindlo.c` preloaded, which turns its wildcard
//! binds into loopback ones. Skipped, with a message, when `OUTPOST_PEERS=skip` or Orthanc
//! is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use outpost_dicom::{StowClient, StowPart};
use support::{free_port, samples};

const ORTHANC: &str = "/usr/sbin/Orthanc";
const DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";

/// An Orthanc on free loopback ports with a private database; killed on drop.
struct Orthanc {
    http_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
    child: tokio::process::Child,
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn orthanc_skipped(test: &str) -> bool {
    if std::env::var("OUTPOST_PEERS").as_deref() == Ok("skip") {
        println!("skipping {test}: OUTPOST_PEERS=skip");
        return true;
    }
    if !Path::new(ORTHANC).exists() || !Path::new(DICOMWEB_PLUGIN).exists() {
        println!("skipping {test}: {ORTHANC} or its DICOMweb plugin is missing (apt-get install orthanc orthanc-dicomweb)");
        return true;
    }
    false
}

impl Orthanc {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (http_port, dicom_port) = (free_port(), free_port());
        let db = dir.path().join("db");
        let config = format!(
            r#"{{ "Name": "outpost-test", "StorageDirectory": {db:?}, "IndexDirectory": {db:?},
              "HttpPort": {http_port}, "DicomPort": {dicom_port}, "DicomAet": "ORTHANC",
              "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
              "Plugins": [{DICOMWEB_PLUGIN:?}],
              "DicomWeb": {{ "Enable": true, "Root": "/dicom-web/" }} }}"#,
            db = db.display().to_string(),
        );
        let config_path = dir.path().join("orthanc.json");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("orthanc.log");
        let child = tokio::process::Command::new(ORTHANC)
            .arg(&config_path)
            .env("LD_PRELOAD", support::bindlo_shim())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("orthanc.err")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect(ORTHANC);
        let orthanc = Self {
            http_port,
            log,
            _dir: dir,
            child,
        };
        let url = format!("http://127.0.0.1:{http_port}/system");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Orthanc did not answer {url} within 30 s; log:\n{}",
                orthanc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        orthanc
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn part(path: &Path) -> StowPart {
    let file = tokio::fs::File::open(path).await.unwrap();
    StowPart {
        len: file.metadata().await.unwrap().len(),
        reader: Box::new(file),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stow_stores_instances_at_orthanc_and_reports_conflicts() {
    if orthanc_skipped("stow_stores_instances_at_orthanc_and_reports_conflicts") {
        return;
    }
    let orthanc = Orthanc::start().await;
    let base = format!("http://127.0.0.1:{}/dicom-web/studies", orthanc.http_port);
    let client = StowClient::new(&base, None, Duration::from_secs(30)).unwrap();
    let samples = samples();
    let (ct, rle) = (&samples[0], &samples[4]);
    let outcome = client
        .store(vec![part(&ct.path).await, part(&rle.path).await])
        .await
        .unwrap();
    for sample in [ct, rle] {
        assert!(
            outcome.is_stored(&sample.meta.sop_instance_uid),
            "{} not stored: {outcome:?}; orthanc log:\n{}",
            sample.path.display(),
            orthanc.log_text()
        );
    }
    assert!(outcome.failed.is_empty(), "{outcome:?}");

    // Posting to another study's URL is a conflict: reported, not retryable.
    let other_study = StowClient::new(
        format!("{base}/1.2.826.0.1.3680043.8.498.1"),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    let conflict = other_study.store(vec![part(&ct.path).await]).await.unwrap();
    assert_eq!(conflict.http_status, 409, "{conflict:?}");
    assert!(!conflict.is_stored(&ct.meta.sop_instance_uid));
    assert!(!conflict.failed.is_empty(), "{conflict:?}");
    assert!(!conflict.retryable());
}

#[tokio::test]
async fn stow_to_a_closed_port_is_a_retryable_error() {
    let url = format!("http://127.0.0.1:{}/dicom-web/studies", free_port());
    let client = StowClient::new(&url, None, Duration::from_secs(5)).unwrap();
    let err = client
        .store(vec![StowPart {
            len: 4,
            reader: Box::new(&b"DICM"[..]),
        }])
        .await
        .unwrap_err();
    assert!(err.retryable(), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
}
