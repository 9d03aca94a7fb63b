//! `outpost dicom echo|send`: test a DICOM path the way practice IT would with dcmtk's
//! echoscu and storescu, from the same binary as the gateway.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use outpost_dicom::part10::{read_part10_meta, Part10Meta};
use outpost_dicom::scu::{
    classify_status, OutgoingInstance, ScuConfig, StatusClass, StoreAssociation,
};
use tokio::io::AsyncSeekExt;

/// `outpost dicom` actions.
#[derive(Subcommand)]
pub enum DicomAction {
    /// C-ECHO a DICOM node (like dcmtk's echoscu).
    Echo {
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// C-STORE Part-10 files (folders are searched) to a DICOM node, each in its own
    /// transfer syntax (like storescu).
    Send {
        #[command(flatten)]
        peer: PeerArgs,
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Where to connect.
#[derive(Args)]
pub struct PeerArgs {
    /// The node's `host:port`, e.g. `127.0.0.1:11112`.
    #[arg(long)]
    connect: String,
    /// The node's (called) AE title.
    #[arg(long, default_value = "ANY-SCP")]
    ae_title: String,
    /// Our (calling) AE title.
    #[arg(long, default_value = "OUTPOST")]
    calling_ae_title: String,
    /// Network timeout.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl PeerArgs {
    fn scu(&self) -> ScuConfig {
        ScuConfig {
            address: self.connect.clone(),
            called_ae: self.ae_title.clone(),
            calling_ae: self.calling_ae_title.clone(),
            max_pdu: 64 * 1024,
            timeout: self.timeout,
        }
    }
}

/// Instances per association.
const BATCH: usize = 100;

/// Runs a `dicom` action.
pub async fn run(action: DicomAction) -> anyhow::Result<()> {
    match action {
        DicomAction::Echo { peer } => {
            let took = outpost_dicom::scu::echo(&peer.scu()).await?;
            println!(
                "C-ECHO {} at {}: success in {:.1} ms",
                peer.ae_title,
                peer.connect,
                took.as_secs_f64() * 1000.0
            );
            Ok(())
        }
        DicomAction::Send { peer, paths } => send(&peer, &paths).await,
    }
}

async fn send(peer: &PeerArgs, paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files)?;
    }
    let mut instances: Vec<(PathBuf, Part10Meta, u64)> = Vec::new();
    for file in files {
        let opened = std::fs::File::open(&file).with_context(|| format!("{}", file.display()))?;
        let len = opened.metadata()?.len();
        match read_part10_meta(std::io::BufReader::new(opened)) {
            Ok(meta) => instances.push((file, meta, len)),
            Err(err) => eprintln!("skipping {}: {err}", file.display()),
        }
    }
    if instances.is_empty() {
        bail!("no DICOM Part-10 files to send");
    }
    let bar = ProgressBar::new(instances.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} sent {pos}/{len} [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let (mut stored, mut failed, mut bytes) = (0usize, 0usize, 0u64);
    for batch in instances.chunks(BATCH) {
        let mut contexts: Vec<(String, String)> = Vec::new();
        for (_, meta, _) in batch {
            let pair = (meta.sop_class_uid.clone(), meta.transfer_syntax.clone());
            if !contexts.contains(&pair) {
                contexts.push(pair);
            }
        }
        let mut association = StoreAssociation::open(&peer.scu(), &contexts).await?;
        let accepted = association.accepted_contexts();
        for (path, meta, len) in batch {
            let pair = (meta.sop_class_uid.clone(), meta.transfer_syntax.clone());
            if !accepted.contains(&pair) {
                bar.println(format!(
                    "{}: {} does not accept SOP class {} in transfer syntax {}",
                    path.display(),
                    peer.ae_title,
                    meta.sop_class_uid,
                    meta.transfer_syntax
                ));
                failed += 1;
                bar.inc(1);
                continue;
            }
            let mut file = tokio::fs::File::open(path).await?;
            file.seek(std::io::SeekFrom::Start(meta.dataset_offset))
                .await?;
            let instance = OutgoingInstance {
                sop_class_uid: meta.sop_class_uid.clone(),
                sop_instance_uid: meta.sop_instance_uid.clone(),
                transfer_syntax: meta.transfer_syntax.clone(),
                dataset_len: len.saturating_sub(meta.dataset_offset),
            };
            let status = association
                .store(&instance, file)
                .await
                .with_context(|| format!("sending {}", path.display()))?;
            match classify_status(status) {
                StatusClass::Success | StatusClass::Warning => {
                    stored += 1;
                    bytes += len;
                }
                _ => {
                    failed += 1;
                    bar.println(format!("{}: status {status:#06x}", path.display()));
                }
            }
            bar.inc(1);
        }
        let _ = association.release().await;
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    println!(
        "sent {stored} of {} instances to {} ({:.1} instances/s, {:.1} MB/s)",
        instances.len(),
        peer.ae_title,
        stored as f64 / secs,
        bytes as f64 / 1e6 / secs
    );
    if failed > 0 {
        bail!("{failed} instances were not stored");
    }
    Ok(())
}

fn collect(path: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}", path.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            collect(&entry, files)?;
        }
    } else {
        files.push(path.to_owned());
    }
    Ok(())
}
