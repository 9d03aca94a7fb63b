//! Waiting for the operating system to ask us to stop: SIGTERM or SIGINT on Unix, Ctrl-C
//! (and service stop, later) on Windows.

/// Resolves when a stop is requested.
#[cfg(unix)]
pub async fn shutdown_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves when a stop is requested.
#[cfg(not(unix))]
pub async fn shutdown_requested() {
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("Ctrl-C received");
}
