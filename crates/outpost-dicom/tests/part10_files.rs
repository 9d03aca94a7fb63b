//! Part-10 reading and attribute extraction on real files (pydicom's bundled test data),
//! checked against what pydicom itself reads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use outpost_dicom::{attributes_from_dataset_prefix, part10_header, read_part10_meta};
use support::samples;

/// pydicom's view of each sample's identifying attributes, in `samples()` order.
fn pydicom_attributes() -> Vec<Vec<Option<String>>> {
    let paths: Vec<String> = samples()
        .iter()
        .map(|s| s.path.display().to_string())
        .collect();
    let script = format!(
        "import json, pydicom\n\
         for p in {paths:?}:\n\
         \x20   d = pydicom.dcmread(p, stop_before_pixels=True)\n\
         \x20   print(json.dumps([str(d[k].value) if k in d and d[k].value else None for k in \
         ('SOPClassUID','SOPInstanceUID','Modality','StudyInstanceUID','SeriesInstanceUID')]))"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 with pydicom");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(parse_json_list)
        .collect()
}

/// `["a", null, ...]` without a JSON dependency: the values are UIDs and codes.
fn parse_json_list(line: &str) -> Vec<Option<String>> {
    line.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(", ")
        .map(|v| (v != "null").then(|| v.trim_matches('"').to_string()))
        .collect()
}

#[test]
fn attributes_from_real_data_set_prefixes_match_pydicom() {
    if std::env::var("OUTPOST_PEERS").as_deref() == Ok("skip") {
        println!("skipping: OUTPOST_PEERS=skip (needs python3 with pydicom)");
        return;
    }
    for (sample, expected) in samples().iter().zip(pydicom_attributes()) {
        let dataset = sample.dataset();
        let prefix = &dataset[..dataset.len().min(64 * 1024)];
        let a = attributes_from_dataset_prefix(prefix, &sample.meta.transfer_syntax);
        let got = vec![
            a.sop_class_uid,
            a.sop_instance_uid,
            a.modality,
            a.study_instance_uid,
            a.series_instance_uid,
        ];
        assert_eq!(got, expected, "{}", sample.path.display());
        // A prefix cut anywhere never fails, and finds a subset of the attributes.
        for cut in [0, 1, 7, 100, 333] {
            let partial = attributes_from_dataset_prefix(
                &dataset[..cut.min(dataset.len())],
                &sample.meta.transfer_syntax,
            );
            if let Some(uid) = partial.sop_instance_uid {
                assert_eq!(Some(uid), expected[1]);
            }
        }
    }
}

#[test]
fn our_header_in_front_of_a_real_data_set_reads_back() {
    if std::env::var("OUTPOST_PEERS").as_deref() == Ok("skip") {
        println!("skipping: OUTPOST_PEERS=skip (needs python3 with pydicom)");
        return;
    }
    for sample in samples() {
        let m = &sample.meta;
        let mut file = part10_header(
            &m.sop_class_uid,
            &m.sop_instance_uid,
            &m.transfer_syntax,
            "AE1",
        )
        .unwrap();
        let header_len = file.len() as u64;
        file.extend_from_slice(&sample.dataset());
        let read = read_part10_meta(&file[..]).unwrap();
        assert_eq!(read.sop_instance_uid, m.sop_instance_uid);
        assert_eq!(read.transfer_syntax, m.transfer_syntax);
        assert_eq!(read.dataset_offset, header_len);
    }
}
