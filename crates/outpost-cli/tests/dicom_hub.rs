//! DICOM instances through the hub sink: the agent uploads each instance's file in parts
//! that resume after a lost session, the hub stores it, and an app reads it back
//! byte-identical through `GET /api/v1/messages/{cursor}/content`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_testkit::{free_port, python, skip_peer_tests, wait_until_explained, Agent, Hub};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// A Part-10 file with random 16-bit pixel data of about `megabytes` MiB, made by pydicom.
fn make_instance(dir: &Path, name: &str, megabytes: usize) -> PathBuf {
    let path = dir.join(name);
    let frames = megabytes.max(1) / 2;
    let script = format!(
        "import os, pydicom\n\
         from pydicom.data import get_testdata_file\n\
         ds = pydicom.dcmread(get_testdata_file('CT_small.dcm'))\n\
         ds.Rows = ds.Columns = 1024\n\
         ds.NumberOfFrames = {frames}\n\
         ds.PixelData = os.urandom({frames} * 1024 * 1024 * 2)\n\
         ds.SOPInstanceUID = pydicom.uid.generate_uid()\n\
         ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID\n\
         ds.save_as({path:?}, enforce_file_format=True)\n",
        path = path.display().to_string()
    );
    let made = Command::new(python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "pydicom could not make {name}: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    path
}

/// The data set bytes of a Part-10 file: everything after the preamble and file meta.
fn dataset(file: &[u8]) -> &[u8] {
    assert_eq!(&file[128..132], b"DICM", "not a Part-10 file");
    assert_eq!(
        &file[132..138],
        &[2, 0, 0, 0, b'U', b'L'],
        "no meta group length"
    );
    let length = u32::from_le_bytes(file[140..144].try_into().unwrap()) as usize;
    &file[144 + length..]
}

fn agent_config(hub: &Hub, token: &str, port: u16) -> String {
    format!(
        "[hub]\nurl = \"{url}\"\ntoken = \"{token}\"\nca_file = {ca:?}\n\n\
         [[source]]\nname = \"modalities\"\nkind = \"dicom\"\nlisten = \"127.0.0.1:{port}\"\nae_title = \"OUTPOST\"\n\n\
         [[sink]]\nname = \"vendor\"\nkind = \"hub\"\n\n\
         [[route]]\nfrom = \"modalities\"\nto = [\"vendor\"]\n",
        url = hub.url(),
        ca = hub.ca_path().display().to_string()
    )
}

fn send(port: u16, files: &[&Path]) {
    let sent = Command::new(BIN)
        .args([
            "dicom",
            "send",
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--ae-title",
            "OUTPOST",
        ])
        .args(files)
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "outpost dicom send: {}{}",
        String::from_utf8_lossy(&sent.stdout),
        String::from_utf8_lossy(&sent.stderr)
    );
}

/// The hub's (held, total) for the upload in progress, read from its SQLite store.
fn upload_progress(hub: &Hub) -> Option<(i64, i64)> {
    let db = hub.data_dir().join("hub.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(
        "SELECT held, total FROM uploads ORDER BY updated_at DESC LIMIT 1",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .ok()
}

#[test]
fn instances_reach_the_hub_byte_identical_and_an_upload_resumes_after_the_hub_restarts() {
    if skip_peer_tests(
        "instances_reach_the_hub_byte_identical_and_an_upload_resumes_after_the_hub_restarts",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let small = make_instance(work.path(), "small.dcm", 2);
    let big = make_instance(work.path(), "big.dcm", 64);
    let mut hub = Hub::start(BIN);
    let api = hub.api(Some(&hub.apikey("imaging-app")));
    let token = hub.token("Imaging Center", "1h");
    let port = free_port();
    let agent = Agent::start(BIN, &agent_config(&hub, &token, port));
    agent.wait_for_log_line(Duration::from_secs(30), &["connected to the hub"]);

    send(port, &[&small]);
    // The big one: the hub is killed while it holds part of the file.
    let sender = {
        let big = big.clone();
        std::thread::spawn(move || send(port, &[&big]))
    };
    let context = |agent: &Agent, hub: &Hub| {
        format!(
            "agent log tail:\n{}\nhub log tail:\n{}",
            agent.log_tail(20),
            hub.log_tail(20)
        )
    };
    wait_until_explained(
        Duration::from_secs(120),
        "the hub holds part of the big instance",
        || {
            upload_progress(&hub)
                .filter(|(held, total)| *held > 0 && held < total && *total > 30_000_000)
        },
        || context(&agent, &hub),
    );
    hub.kill9();
    sender.join().unwrap();
    let (held, total) = upload_progress(&hub).unwrap();
    assert!(held < total, "the hub was killed with the file incomplete");
    hub.restart();
    // The upload goes on from what the hub holds: either the parts still queued on the
    // agent continue it exactly where the hub stopped, or the agent offers the file again
    // and resumes from the hub's answer. Either way the file read back below is whole.
    let messages = wait_until_explained(
        Duration::from_secs(180),
        "the hub has stored both instances",
        || {
            api.all_messages()
                .ok()
                .filter(|messages| messages.len() == 2)
        },
        || context(&agent, &hub),
    );
    for (message, source) in messages.iter().zip([&small, &big]) {
        assert_eq!(message["kind"], "dicom", "{message}");
        let cursor = message["cursor"].as_i64().unwrap();
        let content = api.get_bytes(&format!("/api/v1/messages/{cursor}/content"));
        let original = std::fs::read(source).unwrap();
        assert!(
            dataset(&content) == dataset(&original),
            "the data set read back from the hub ({} bytes) differs from {} ({} bytes)",
            dataset(&content).len(),
            source.display(),
            dataset(&original).len()
        );
    }
    let (held, total) = upload_progress(&hub).unwrap();
    assert_eq!(held, total, "the last upload is complete");
}
