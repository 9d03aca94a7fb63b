#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Remote support with real processes: an `outpost hub` and `outpost agent`s on loopback,
//! jobs submitted through the hub's API (and `outpost job run`), decisions read back from
//! the hub and from the agent's audit log.
//!
//! - The threat table of `security.md`, one test per row: a job with a bad or missing
//!   signature, an expired job, a replayed job, a capability or a path the policy does not
//!   allow, a request to read or change the policy, a job for another agent. Each must end
//!   `refused` at the hub with the rule that refused it, be recorded in the agent's audit
//!   log (`job.decided`, `refused`, that rule), leave the log verifiable, and leave the
//!   agent serving jobs. A compromised hub (or its database) is played by writing rows
//!   into the hub's `jobs` table: the hub sends every `pending` row of a connected agent
//!   verbatim (signed text, signature, row id as dispatch id) within about a second.
//!   Beyond the table: with the hub's job key taken from its database, forged jobs still
//!   get no further than the policy and the agent's expiry and nonce checks.
//! - Local approval: approve, deny, and let one expire.
//! - Audit tampering: `outpost audit verify` names the damaged line of edited, shortened
//!   and reordered copies; an entry edited on disk is flagged by the hub's mirror on the
//!   agent's next session.
//! - Fan-out: `outpost bench jobs --agents 100`.
//! - Two hub processes on one PostgreSQL database: a job submitted at one runs on an
//!   agent connected to the other.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use outpost_testkit::support::{
    self, assert_audit_verifies, assert_health_job_runs, audit_entries, audit_path, audit_verify,
    last_seq, restart_agent, start_policy_agent, submit_job, wait_job_final, wait_job_state,
};
use outpost_testkit::{
    describe_output, skip_postgres_tests, wait_until_explained, Agent, Hub, HubApi, HubBackend,
};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// Health jobs run unattended; nothing else is allowed.
const HEALTH_ONLY: &str = "access = \"unattended\"\n\n[allow]\nhealth = true\n";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A hub on SQLite, a staff member with an API client, and one agent on a policy.
struct Rig {
    agent: Agent,
    agent_id: String,
    staff: String,
    api: HubApi,
    hub: Hub,
}

impl Rig {
    fn start(policy: impl FnOnce(&Path) -> String) -> Rig {
        let hub = Hub::start(BIN);
        let staff = hub.staff("alice@vendor", "support");
        let api = hub.api(Some(&staff));
        let (agent, agent_id) = start_policy_agent(BIN, &hub, "Smith Pediatrics", policy);
        Rig {
            agent,
            agent_id,
            staff,
            api,
            hub,
        }
    }

    fn context(&self) -> String {
        support::context(&self.hub, &[&self.agent])
    }

    fn audit(&self) -> PathBuf {
        audit_path(&self.agent)
    }

    fn last_seq(&self) -> u64 {
        last_seq(&self.audit())
    }

    fn submit(&self, capability: &str, args: Value) -> String {
        submit_job(&self.api, &self.agent_id, capability, args, None)
    }

    /// Submits a job and waits until it ends `done`.
    fn run_done(&self, capability: &str, args: Value) -> String {
        let id = self.submit(capability, args);
        let job = wait_job_final(&self.api, &id, || self.context());
        assert_eq!(
            job["state"],
            "done",
            "{capability} job {id} should end done: {job}\n{}",
            self.context()
        );
        id
    }

    /// The hub says job (or crafted row) `job_id` was refused by `rule`, with no output;
    /// the agent's audit log has, after `after_seq`, exactly one `job.decided` entry
    /// refusing `claimed_job_id` (the id inside the signed job) by `rule`.
    fn expect_refused(
        &self,
        job_id: &str,
        claimed_job_id: &str,
        rule: &str,
        after_seq: u64,
        what: &str,
    ) {
        let job = wait_job_final(&self.api, job_id, || self.context());
        assert!(
            job["state"] == "refused" && job["rule"] == rule,
            "{what}: the hub should record job {job_id} as refused by rule {rule:?}, got state {} rule {}: {job}\n{}",
            job["state"],
            job["rule"],
            self.context()
        );
        let output = self
            .api
            .get(&format!("/api/v1/jobs/{job_id}/output?after=0"));
        assert!(
            output.status == 200 && output.json["chunks"].as_array().is_some_and(Vec::is_empty),
            "{what}: a refused job must produce no output: {}",
            output.text
        );
        let entries = audit_entries(&self.audit());
        let refusals: Vec<&Value> = entries
            .iter()
            .filter(|entry| {
                entry["seq"].as_u64().unwrap_or(0) > after_seq
                    && entry["event"] == "job.decided"
                    && entry["decision"] == "refused"
                    && entry["rule"] == rule
                    && entry["job_id"] == claimed_job_id
            })
            .collect();
        assert_eq!(
            refusals.len(),
            1,
            "{what}: the agent's audit log should have one new `job.decided` entry refusing job {claimed_job_id} by rule {rule:?}; entries after seq {after_seq}:\n{}",
            entries
                .iter()
                .filter(|e| e["seq"].as_u64().unwrap_or(0) > after_seq)
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// The audit log still verifies and a health job still runs.
    fn keeps_serving(&self) {
        assert_audit_verifies(BIN, &self.audit());
        assert_health_job_runs(&self.hub, &self.staff, &self.agent, &self.agent_id);
    }
}

/// A row of the hub's `jobs` table, as a compromised hub could send it.
#[derive(Clone, Debug)]
struct JobRow {
    rollout_id: String,
    agent_id: String,
    capability: String,
    staff: String,
    args: String,
    signed_job: String,
    signature: String,
}

/// The hub's SQLite store (`data/hub.db`), written behind its back.
struct HubDb {
    path: PathBuf,
}

impl HubDb {
    fn of(hub: &Hub) -> HubDb {
        let path = hub.data_dir().join("hub.db");
        assert!(
            path.exists(),
            "the hub's store {} is missing",
            path.display()
        );
        HubDb { path }
    }

    fn connect(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&self.path)
            .unwrap_or_else(|err| panic!("open {}: {err}", self.path.display()));
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn
    }

    fn row(&self, id: &str) -> JobRow {
        self.connect()
            .query_row(
                "SELECT rollout_id, agent_id, capability, staff, args, signed_job, signature
                 FROM jobs WHERE id = ?1",
                [id],
                |r| {
                    Ok(JobRow {
                        rollout_id: r.get(0)?,
                        agent_id: r.get(1)?,
                        capability: r.get(2)?,
                        staff: r.get(3)?,
                        args: r.get(4)?,
                        signed_job: r.get(5)?,
                        signature: r.get(6)?,
                    })
                },
            )
            .unwrap_or_else(|err| panic!("job {id} in {}: {err}", self.path.display()))
    }

    /// Inserts `row` as a new `pending` job (valid at the hub for ten minutes, whatever
    /// the signed job says) and returns its id, which is the dispatch id the agent sees.
    fn insert_pending(&self, row: &JobRow, label: &str) -> String {
        let id = format!("job_forged_{label}_{:08x}", rand::random::<u32>());
        let now = now_ms();
        self.connect()
            .execute(
                "INSERT INTO jobs (id, rollout_id, agent_id, capability, staff, args, signed_job,
                     signature, state, created_at, expires_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?10, ?9)",
                rusqlite::params![
                    id,
                    row.rollout_id,
                    row.agent_id,
                    row.capability,
                    row.staff,
                    row.args,
                    row.signed_job,
                    row.signature,
                    now,
                    now + 600_000
                ],
            )
            .unwrap_or_else(|err| panic!("insert a job row into {}: {err}", self.path.display()));
        id
    }
}

/// `text` with the character right after the first `marker` replaced by another one: a
/// digit by the next digit (so numbers stay numbers), anything else by `a` (or `b`).
fn change_char_after(text: &str, marker: &str) -> String {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} not in {text}"))
        + marker.len();
    let old = text[at..].chars().next().unwrap();
    let new = match old.to_digit(10) {
        Some(d) => char::from_digit((d + 1) % 10, 10).unwrap(),
        None if old == 'a' => 'b',
        None => 'a',
    };
    let changed = format!("{}{new}{}", &text[..at], &text[at + old.len_utf8()..]);
    assert_eq!(changed.len(), text.len());
    assert_ne!(changed, text);
    changed
}

// --- The threat table -------------------------------------------------------------------

#[test]
fn a_job_whose_signed_text_was_altered_is_refused_for_its_signature() {
    let rig = Rig::start(|_| HEALTH_ONLY.to_owned());
    let original = rig.run_done("health", json!({}));
    let db = HubDb::of(&rig.hub);
    let row = db.row(&original);
    let altered = [
        (
            "capability",
            row.signed_job
                .replacen("\"capability\":\"health\"", "\"capability\":\"hEalth\"", 1),
        ),
        ("nonce", change_char_after(&row.signed_job, "\"nonce\":\"")),
        (
            "expiry",
            change_char_after(&row.signed_job, "\"expires_at_ms\":"),
        ),
    ];
    for (what, signed_job) in altered {
        assert_ne!(signed_job, row.signed_job);
        assert_eq!(
            signed_job.len(),
            row.signed_job.len(),
            "one character changed"
        );
        let before = rig.last_seq();
        let forged = db.insert_pending(
            &JobRow {
                signed_job,
                ..row.clone()
            },
            what,
        );
        rig.expect_refused(
            &forged,
            &original,
            "signature",
            before,
            &format!("a signed job with one character of its {what} changed"),
        );
    }
    rig.keeps_serving();
}

#[test]
fn a_job_without_a_signature_is_refused() {
    let rig = Rig::start(|_| HEALTH_ONLY.to_owned());
    let original = rig.run_done("health", json!({}));
    let db = HubDb::of(&rig.hub);
    let row = db.row(&original);

    // The hub's own job text, its signature removed.
    let before = rig.last_seq();
    let unsigned = db.insert_pending(
        &JobRow {
            signature: String::new(),
            ..row.clone()
        },
        "nosig",
    );
    rig.expect_refused(
        &unsigned,
        &original,
        "signature",
        before,
        "a real job with an empty signature",
    );

    // A job the hub never signed: well-formed, fresh nonce, valid times, no signature.
    let now = now_ms();
    let invented = json!({
        "job_id": "job_never_signed_0001",
        "agent_id": rig.agent_id,
        "capability": "health",
        "args": {},
        "staff": "mallory@vendor",
        "issued_at_ms": now,
        "expires_at_ms": now + 600_000,
        "nonce": "00112233445566778899aabbccddeeff",
    });
    let before = rig.last_seq();
    let forged = db.insert_pending(
        &JobRow {
            signed_job: invented.to_string(),
            signature: String::new(),
            staff: "mallory@vendor".into(),
            ..row
        },
        "invented",
    );
    rig.expect_refused(
        &forged,
        "job_never_signed_0001",
        "signature",
        before,
        "a job the hub never signed, without a signature",
    );
    rig.keeps_serving();
}

#[test]
fn expired_jobs_are_expired_by_the_hub_and_refused_by_the_agent() {
    let mut rig = Rig::start(|_| HEALTH_ONLY.to_owned());
    assert_health_job_runs(&rig.hub, &rig.staff, &rig.agent, &rig.agent_id);

    // The agent is away while the job lives: the hub expires it without sending it.
    rig.agent.terminate();
    rig.agent.wait_exit(Duration::from_secs(20));
    let lapsed = submit_job(&rig.api, &rig.agent_id, "health", json!({}), Some(2));
    let job = wait_job_final(&rig.api, &lapsed, || rig.context());
    assert!(
        job["state"] == "expired" && job["rule"] == "expiry",
        "a job whose agent is away past its expiry should end expired (rule expiry) at the hub: {job}"
    );
    support::start_again(&mut rig.agent, &rig.hub);
    // The agent never saw it: nothing was sent on the new session either.
    assert_health_job_runs(&rig.hub, &rig.staff, &rig.agent, &rig.agent_id);
    assert_eq!(
        job_state(&rig.api, &lapsed),
        "expired",
        "the expired job must stay expired once the agent is back"
    );
    let mentions: Vec<Value> = audit_entries(&rig.audit())
        .into_iter()
        .filter(|entry| entry["job_id"] == lapsed.as_str())
        .collect();
    assert!(
        mentions.is_empty(),
        "the agent should never have received the expired job {lapsed}; its audit log has {mentions:?}"
    );

    // A compromised hub sends the validly signed but expired job anyway (its row says it
    // is still valid at the hub): the agent refuses it for its expiry.
    let db = HubDb::of(&rig.hub);
    let row = db.row(&lapsed);
    let after = rig.last_seq();
    let forged = db.insert_pending(&row, "expired");
    rig.expect_refused(
        &forged,
        &lapsed,
        "expiry",
        after,
        "a validly signed job past its expiry",
    );
    rig.keeps_serving();
}

fn job_state(api: &HubApi, id: &str) -> String {
    support::job(api, id)["state"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn a_replayed_job_is_refused_even_after_the_agent_restarts() {
    let mut rig = Rig::start(|_| HEALTH_ONLY.to_owned());
    let original = rig.run_done("health", json!({}));
    let db = HubDb::of(&rig.hub);
    let row = db.row(&original);

    let before = rig.last_seq();
    let replay = db.insert_pending(&row, "replay");
    rig.expect_refused(
        &replay,
        &original,
        "replay",
        before,
        "a job that already ran, sent again",
    );

    // The nonces the agent has seen are recovered from its audit log on start.
    restart_agent(&mut rig.agent, &rig.hub);
    let before = rig.last_seq();
    let replay = db.insert_pending(&row, "replay_after_restart");
    rig.expect_refused(
        &replay,
        &original,
        "replay",
        before,
        "a job that already ran, sent again after the agent restarted",
    );
    rig.keeps_serving();
}

#[test]
fn a_capability_the_policy_does_not_allow_is_refused() {
    let rig = Rig::start(|_| HEALTH_ONLY.to_owned());
    let before = rig.last_seq();
    let write = rig.submit(
        "files.write",
        json!({"path": "notes.txt", "base64": "aGVsbG8="}),
    );
    rig.expect_refused(
        &write,
        &write,
        "default-deny",
        before,
        "files.write, which the policy does not name",
    );

    // Through the staff CLI: it exits non-zero and says why.
    let before = rig.last_seq();
    let output = rig.hub.job_cli(
        &rig.staff,
        &[
            "run",
            "--agent",
            &rig.agent_id,
            "shell",
            "--arg",
            "command=id",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("refused") && stderr.contains("default-deny"),
        "`outpost job run … shell` should exit non-zero saying the job was refused by default-deny\n{}",
        describe_output(&output)
    );
    let shell = stderr
        .split_whitespace()
        .find(|word| word.starts_with("job_"))
        .unwrap_or_else(|| panic!("no job id in: {stderr}"))
        .to_owned();
    rig.expect_refused(
        &shell,
        &shell,
        "default-deny",
        before,
        "shell, which the policy does not enable",
    );
    rig.keeps_serving();
}

#[test]
fn file_paths_that_leave_the_policy_roots_are_refused() {
    let rig = Rig::start(|dir| {
        let exports = dir.join("exports");
        std::fs::create_dir_all(&exports).unwrap();
        std::fs::write(exports.join("report.csv"), "PatNum,LName\n1,RIVERA\n").unwrap();
        // A link to a file outside the root, and one to a folder outside it.
        std::os::unix::fs::symlink(dir.join("outpost.toml"), exports.join("config.toml")).unwrap();
        std::os::unix::fs::symlink(dir, exports.join("up")).unwrap();
        format!(
            "access = \"unattended\"\n\n[allow]\nhealth = true\n\"files.read\" = {{ roots = [{:?}] }}\n",
            exports.display().to_string()
        )
    });
    let rule = "allow.\"files.read\".roots";

    // Inside the root it works, so the refusals below are the roots' doing.
    let read = rig.run_done("files.read", json!({"path": "report.csv"}));
    let output = rig.api.get(&format!("/api/v1/jobs/{read}/output?after=0"));
    let data: String = output.json["chunks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|chunk| chunk["data"].as_str())
        .collect();
    let expected = base64::engine::general_purpose::STANDARD.encode("PatNum,LName\n1,RIVERA\n");
    assert!(
        data.contains(&expected),
        "files.read report.csv should return the file (base64 {expected}): {data}"
    );

    let outside = rig.agent.dir().join("outpost.toml");
    for (what, path) in [
        ("a `../` escape", "../outpost.toml".to_owned()),
        (
            "an absolute path outside the root",
            outside.display().to_string(),
        ),
        (
            "a symlink inside the root to a file outside it",
            "config.toml".to_owned(),
        ),
        (
            "a path through a symlinked folder leading outside the root",
            "up/policy.toml".to_owned(),
        ),
    ] {
        let before = rig.last_seq();
        let job = rig.submit("files.read", json!({ "path": path }));
        rig.expect_refused(
            &job,
            &job,
            rule,
            before,
            &format!("files.read of {what} ({path})"),
        );
    }
    rig.keeps_serving();
}

#[test]
fn the_hub_cannot_read_or_change_the_policy() {
    let rig = Rig::start(|_| HEALTH_ONLY.to_owned());
    let policy_path = rig.agent.dir().join("policy.toml");
    let policy_before = std::fs::read(&policy_path).unwrap();
    for (capability, args) in [
        (
            "policy.write",
            json!({"text": "access = \"unattended\"\n[allow]\nshell = true\n"}),
        ),
        ("policy.read", json!({})),
    ] {
        let before = rig.last_seq();
        let job = rig.submit(capability, args);
        rig.expect_refused(
            &job,
            &job,
            "unknown-capability",
            before,
            &format!("a `{capability}` job"),
        );
    }
    assert_eq!(
        std::fs::read(&policy_path).unwrap(),
        policy_before,
        "the policy file must be unchanged"
    );
    rig.keeps_serving();
}

#[test]
fn a_job_signed_for_another_agent_is_refused() {
    let rig = Rig::start(|_| HEALTH_ONLY.to_owned());
    let (other, other_id) =
        start_policy_agent(BIN, &rig.hub, "Jones Dental", |_| HEALTH_ONLY.to_owned());
    let theirs = submit_job(&rig.api, &other_id, "health", json!({}), None);
    let job = wait_job_final(&rig.api, &theirs, || {
        support::context(&rig.hub, &[&rig.agent, &other])
    });
    assert_eq!(job["state"], "done", "agent B's own job: {job}");

    let db = HubDb::of(&rig.hub);
    let before = rig.last_seq();
    let forged = db.insert_pending(
        &JobRow {
            agent_id: rig.agent_id.clone(),
            ..db.row(&theirs)
        },
        "other_agent",
    );
    rig.expect_refused(
        &forged,
        &theirs,
        "agent-id",
        before,
        "a job signed for another agent, sent to this one",
    );
    rig.keeps_serving();
}

/// Beyond the table: the hub's job key is in its database (`hub_keys`), so whoever owns
/// the database can sign jobs. The agent's other checks and its policy still hold.
#[test]
fn a_hub_whose_job_key_is_stolen_can_do_no_more_than_the_policy_allows() {
    let rig = Rig::start(|_| HEALTH_ONLY.to_owned());
    let db = HubDb::of(&rig.hub);
    let seed: [u8; 32] = db
        .connect()
        .query_row("SELECT seed FROM hub_keys WHERE name = 'job'", [], |r| {
            r.get(0)
        })
        .expect("the hub's job key seed");
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let forge = |label: &str, capability: &str, args: Value, lifetime_ms: i64, nonce: String| {
        let now = now_ms();
        let spec = outpost_proto::JobSpec {
            job_id: format!("job_stolen_key_{label}"),
            agent_id: rig.agent_id.clone(),
            capability: capability.to_owned(),
            args: args.clone(),
            staff: "mallory@vendor".into(),
            issued_at_ms: now,
            expires_at_ms: now + lifetime_ms,
            nonce,
        };
        let signed = outpost_proto::sign_job(&spec, &key);
        let row = JobRow {
            rollout_id: "rol_forged".into(),
            agent_id: rig.agent_id.clone(),
            capability: capability.to_owned(),
            staff: "mallory@vendor".into(),
            args: args.to_string(),
            signed_job: signed.job,
            signature: signed.signature,
        };
        (db.insert_pending(&row, label), spec.job_id)
    };
    let fresh_nonce = || format!("{:032x}", rand::random::<u128>());

    // The stolen key signs jobs the agent accepts: within the policy.
    let (health, _) = forge("health", "health", json!({}), 600_000, fresh_nonce());
    let job = wait_job_final(&rig.api, &health, || rig.context());
    assert_eq!(
        job["state"], "done",
        "a health job signed with the stolen key should run (the policy allows health): {job}"
    );

    let week = 7 * 24 * 3600 * 1000;
    for (label, capability, args, lifetime, nonce, rule, what) in [
        (
            "write",
            "files.write",
            json!({"path": "x.txt", "base64": "aGk="}),
            600_000,
            fresh_nonce(),
            "default-deny",
            "files.write signed with the stolen key",
        ),
        (
            "policy",
            "policy.write",
            json!({"text": "[allow]\nshell = true\n"}),
            600_000,
            fresh_nonce(),
            "unknown-capability",
            "policy.write signed with the stolen key",
        ),
        (
            "week",
            "health",
            json!({}),
            week,
            fresh_nonce(),
            "expiry",
            "a job signed to live for a week",
        ),
        (
            "nonce",
            "health",
            json!({}),
            600_000,
            "short".to_owned(),
            "replay",
            "a job with a 5-character nonce",
        ),
    ] {
        let before = rig.last_seq();
        let (row, job_id) = forge(label, capability, args, lifetime, nonce);
        rig.expect_refused(&row, &job_id, rule, before, what);
    }
    rig.keeps_serving();
}

// --- Local approval ---------------------------------------------------------------------

#[test]
fn jobs_wait_for_a_local_approval_and_are_approved_denied_or_expire() {
    let rig = Rig::start(|_| "access = \"approval\"\n\n[allow]\nhealth = true\n".to_owned());
    let config = rig.agent.config_path().display().to_string();
    let approvals = |args: &[&str]| {
        let mut all = vec!["approvals", "--config", config.as_str()];
        all.extend_from_slice(args);
        let output = rig.agent.run_cli(&all);
        assert!(
            output.status.success(),
            "`outpost {}` failed\n{}",
            all.join(" "),
            describe_output(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    let approved = rig.submit("health", json!({}));
    let denied = rig.submit("health", json!({}));
    let lapsed = submit_job(&rig.api, &rig.agent_id, "health", json!({}), Some(5));
    for id in [&approved, &denied, &lapsed] {
        let job = wait_job_state(&rig.api, id, "awaiting_approval", || rig.context());
        assert_eq!(job["rule"], "access", "waiting because of `access`: {job}");
    }
    let listed = approvals(&["list"]);
    for id in [&approved, &denied, &lapsed] {
        assert!(
            listed.contains(id.as_str()),
            "`outpost approvals list` should show {id}:\n{listed}"
        );
    }

    approvals(&["approve", approved.as_str(), "--by", "Pat IT"]);
    let job = wait_job_final(&rig.api, &approved, || rig.context());
    assert!(
        job["state"] == "done" && job["approver"] == "Pat IT" && job["summary"].is_string(),
        "the approved job should run (done, approver Pat IT, a summary): {job}"
    );

    approvals(&[
        "deny",
        denied.as_str(),
        "--by",
        "Pat IT",
        "--reason",
        "not during clinic hours",
    ]);
    let job = wait_job_final(&rig.api, &denied, || rig.context());
    assert!(
        job["state"] == "denied"
            && job["approver"] == "Pat IT"
            && job["reason"]
                .as_str()
                .is_some_and(|r| r.contains("not during clinic hours")),
        "the denied job should end denied with the approver and the reason: {job}"
    );

    let job = wait_job_final(&rig.api, &lapsed, || rig.context());
    assert!(
        job["state"] == "expired" && job["rule"] == "expiry",
        "the job nobody decided on should end expired: {job}"
    );
    assert!(
        approvals(&["list"]).contains("no job is waiting"),
        "nothing should be waiting any more"
    );

    let entries = audit_entries(&rig.audit());
    let position = |event: &str, job: &str| {
        entries
            .iter()
            .position(|e| e["event"] == event && e["job_id"] == job)
            .unwrap_or_else(|| {
                panic!(
                    "the audit log has no {event} entry for {job}:\n{}",
                    entries
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
    };
    for id in [&approved, &denied, &lapsed] {
        let decided = &entries[position("job.decided", id)];
        assert!(
            decided["decision"] == "awaiting_approval" && decided["rule"] == "access",
            "{id} decided as awaiting approval: {decided}"
        );
    }
    let (decided, ok, finished) = (
        position("job.decided", &approved),
        position("job.approved", &approved),
        position("job.finished", &approved),
    );
    assert!(
        decided < ok && ok < finished,
        "decided, approved, finished in that order"
    );
    assert_eq!(entries[ok]["approver"], "Pat IT", "{}", entries[ok]);
    assert!(
        entries[finished]["result_summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("done")),
        "{}",
        entries[finished]
    );
    let no = &entries[position("job.denied", &denied)];
    assert!(
        no["approver"] == "Pat IT" && no["detail"] == "not during clinic hours",
        "job.denied with approver and reason: {no}"
    );
    assert!(
        !entries
            .iter()
            .any(|e| e["event"] == "job.finished" && e["job_id"] == denied.as_str()),
        "the denied job must not run"
    );
    position("job.expired", &lapsed);
    assert!(
        !entries
            .iter()
            .any(|e| e["event"] == "job.finished" && e["job_id"] == lapsed.as_str()),
        "the expired job must not run"
    );
    assert_audit_verifies(BIN, &rig.audit());
}

// --- Audit tampering --------------------------------------------------------------------

#[test]
fn audit_log_tampering_is_found_by_verify_and_by_the_hub_mirror() {
    let mut rig = Rig::start(|_| HEALTH_ONLY.to_owned());
    for _ in 0..3 {
        rig.run_done("health", json!({}));
    }
    let refused = rig.submit("files.write", json!({"path": "x"}));
    wait_job_final(&rig.api, &refused, || rig.context());
    let path = rig.audit();
    let last = rig.last_seq();
    assert!(
        last >= 8,
        "the log should have at least 8 entries, has {last}"
    );
    let audit_api = format!("/api/v1/agents/{}/audit?limit=1000", rig.agent_id);
    wait_until_explained(
        Duration::from_secs(20),
        &format!("the hub's mirror holds all {last} entries"),
        || {
            let trail = rig.api.get(&audit_api);
            if trail.json["mirror"]["last_seq"] == last {
                Ok(())
            } else {
                Err(trail.json["mirror"].to_string())
            }
        },
        || rig.context(),
    );

    // Damaged copies: verify names the first bad line.
    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert_eq!(lines.len() as u64, last);
    let work = tempfile::tempdir().unwrap();
    let join = |lines: &[&str]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let edited_line = change_char_after(lines[4], "\"time_ms\":");
    let mut edited = lines.clone();
    edited[4] = &edited_line;
    let mut deleted = lines.clone();
    deleted.remove(4);
    let mut swapped = lines.clone();
    swapped.swap(4, 5);
    let cut: Vec<&str> = lines[..3].iter().chain(&lines[7..]).copied().collect();
    let cases = [
        (
            "one byte edited in entry 5",
            join(&edited),
            vec!["line 5 (seq 5)", "signature does not verify"],
        ),
        (
            "entry 5 deleted",
            join(&deleted),
            vec!["line 5 (seq 6)", "entry 5 is missing"],
        ),
        (
            "entries 5 and 6 swapped",
            join(&swapped),
            vec!["line 5 (seq 6)", "expected seq 5", "line 6", "reordered"],
        ),
        (
            "entries 4 to 7 cut out",
            join(&cut),
            vec!["line 4 (seq 8)", "entries 4 to 7 are missing"],
        ),
    ];
    let copy = work.path().join("intact.jsonl");
    std::fs::write(&copy, &original).unwrap();
    assert_audit_verifies(BIN, &copy);
    for (i, (what, text, expected)) in cases.iter().enumerate() {
        let copy = work.path().join(format!("damaged-{i}.jsonl"));
        std::fs::write(&copy, text).unwrap();
        let output = audit_verify(BIN, &copy);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !output.status.success() && expected.iter().all(|part| said.contains(part)),
            "`outpost audit verify` of a copy with {what} should fail naming {expected:?}\n{}",
            describe_output(&output)
        );
    }

    // The real file, edited while the agent is stopped: the hub notices on the next session.
    rig.agent.terminate();
    rig.agent.wait_exit(Duration::from_secs(20));
    let mut lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let target = lines
        .iter()
        .position(|line| line.contains("\"staff\":\"alice@vendor\"") && line.contains("\"seq\":"))
        .filter(|&i| i > 0 && i + 1 < lines.len())
        .expect("a middle entry naming the staff member");
    let edited_seq = target + 1;
    lines[target] = lines[target].replacen(
        "\"staff\":\"alice@vendor\"",
        "\"staff\":\"alicf@vendor\"",
        1,
    );
    std::fs::write(
        &path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    support::start_again(&mut rig.agent, &rig.hub);
    let problem = wait_until_explained(
        Duration::from_secs(20),
        "the hub's mirror reports a problem with the agent's log",
        || {
            let trail = rig.api.get(&audit_api);
            trail.json["mirror"]["problem"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| trail.json["mirror"].to_string())
        },
        || rig.context(),
    );
    assert!(
        problem.contains(&format!("entry {edited_seq} ")),
        "the hub's problem should name entry {edited_seq}: {problem}"
    );
    let output = audit_verify(BIN, &path);
    assert!(
        !output.status.success()
            && String::from_utf8_lossy(&output.stderr)
                .contains(&format!("line {edited_seq} (seq {edited_seq})")),
        "verify of the edited real log should name line {edited_seq}\n{}",
        describe_output(&output)
    );
}

// --- Fan-out ----------------------------------------------------------------------------

#[test]
fn bench_jobs_fans_a_health_job_out_to_100_agents() {
    let work = tempfile::tempdir().unwrap();
    let stdout_path = work.path().join("stdout");
    let stderr_path = work.path().join("stderr");
    let mut child = Command::new(BIN)
        .args(["bench", "jobs", "--agents", "100"])
        .current_dir(work.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`outpost bench jobs --agents 100` did not finish within 120 s\nstdout:\n{}\nstderr:\n{}",
                read(&stdout_path),
                outpost_testkit::tail(&read(&stderr_path), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = read(&stdout_path);
    assert!(
        status.success() && stdout.contains("jobs: 100 agents in"),
        "`outpost bench jobs --agents 100` should succeed and report `jobs: 100 agents in …` (exit {status})\nstdout:\n{stdout}\nstderr:\n{}",
        outpost_testkit::tail(&read(&stderr_path), 30)
    );
}

// --- Two hubs on PostgreSQL -------------------------------------------------------------

#[test]
fn a_job_submitted_at_one_hub_runs_on_an_agent_connected_to_another() {
    if skip_postgres_tests("a_job_submitted_at_one_hub_runs_on_an_agent_connected_to_another") {
        return;
    }
    let hub1 = Hub::start_on(BIN, HubBackend::Postgres);
    let url = hub1
        .database()
        .expect("a PostgreSQL hub has a database")
        .url();
    let hub2 = support::start_hub_on_database(BIN, &url);
    // Made at hub 1, used at hub 2; and the other way round for the staff member.
    let token = hub1.token("Smith Pediatrics", "1h");
    let staff = hub2.staff("alice@vendor", "support");
    let (agent, agent_id) =
        support::start_policy_agent_with_token(BIN, &hub2, &token, |_| HEALTH_ONLY.to_owned());
    let context = || {
        format!(
            "hub 1 log tail:\n{}\n{}",
            hub1.log_tail(25),
            support::context(&hub2, &[&agent])
        )
    };
    hub2.wait_for_log_line(Duration::from_secs(10), &["agent connected", &agent_id]);

    let api1 = hub1.api(Some(&staff));
    let id = submit_job(&api1, &agent_id, "health", json!({}), None);
    let job = wait_job_final(&api1, &id, context);
    assert!(
        job["state"] == "done"
            && job["summary"].as_str().is_some_and(|s| !s.is_empty())
            && job["agent_id"] == agent_id.as_str(),
        "the job submitted at hub 1 should end done with a summary, read back at hub 1: {job}\n{}",
        context()
    );
    let output = api1.get(&format!("/api/v1/jobs/{id}/output?after=0"));
    let data: String = output.json["chunks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|chunk| chunk["data"].as_str())
        .collect();
    assert!(
        output.status == 200 && data.contains(&agent_id),
        "hub 1 should serve the job's output (the health report naming {agent_id}): {}",
        output.text
    );
    assert!(
        !hub1.log().contains("agent connected"),
        "the agent was never connected to hub 1, so hub 2 ran the job\n{}",
        context()
    );
    drop(agent);
    drop(hub2);
}
