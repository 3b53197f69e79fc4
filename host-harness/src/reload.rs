//! What asks a host to reload its module and rules: SIGHUP, and optionally a change of either
//! file. Each request is a reason, sent on a channel; the owner of the host does the reload
//! ([`crate::Host::reload`]), so that a burst of requests is handled one at a time.

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::host::Sources;

/// Each SIGHUP asks for a reload.
pub fn forward_sighup(reload: mpsc::UnboundedSender<String>) -> anyhow::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move { while hangups.recv().await.is_some() && reload.send("SIGHUP".into()).is_ok() {} });
    Ok(())
}

/// Asks for a reload whenever a file of `sources` changes (checked twice a second).
pub fn watch_files(sources: &[Sources], reload: mpsc::UnboundedSender<String>) {
    let files: Vec<_> = sources.iter().flat_map(|s| [s.module.clone(), s.rules.clone()]).collect();
    let modified = move || -> Vec<Option<SystemTime>> {
        files.iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect()
    };
    tokio::spawn(async move {
        let mut last = modified();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = modified();
            if now != last {
                last = now;
                if reload.send("file changed".into()).is_err() {
                    return;
                }
            }
        }
    });
}
