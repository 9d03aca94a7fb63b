//! A config the agent cannot use: it refuses to start and says which file and which key.

use std::process::Command;

use outpost_testkit::{describe_output, free_port, one_route_config, run};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

#[test]
fn config_errors_name_the_file_and_key() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let good = one_route_config(free_port(), free_port(), "", "", "");
    // (file name, config text, what stderr must contain besides the path)
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "misspelt-top-level.toml",
            format!("dat_dir = \"data\"\n{good}"),
            vec!["dat_dir"],
        ),
        (
            "misspelt-sink-key.toml",
            good.replace("[[route]]", "max_attemps = 3\n\n[[route]]"),
            vec!["sink[0]", "max_attemps"],
        ),
        (
            "missing-listen.toml",
            good.lines()
                .filter(|l| !l.starts_with("listen"))
                .collect::<Vec<_>>()
                .join("\n"),
            vec!["source[0]", "listen"],
        ),
        (
            "route-to-unknown-sink.toml",
            good.replace("to = [\"out\"]", "to = [\"nowhere\"]"),
            vec!["route[0].to[0]", "nowhere"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, text, wanted) in &cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write the config");
        let output = run(Command::new(BIN)
            .arg("agent")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let path_text = path.display().to_string();
        let missing: Vec<&str> = std::iter::once(path_text.as_str())
            .chain(wanted.iter().copied())
            .filter(|w| !stderr.contains(w))
            .collect();
        if output.status.success() || !missing.is_empty() {
            failures.push(format!(
                "{name}: expected a non-zero exit and stderr naming {missing:?}\n{}\nconfig:\n{text}",
                describe_output(&output)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
