//! systemd integration: tells the service manager when the agent is ready and keeps its
//! watchdog fed while the writer thread answers (`Type=notify`, `WatchdogSec=`; see
//! `firmware-config/larder-agent.service`). Outside systemd (no `NOTIFY_SOCKET`) it does nothing.

use std::time::Duration;

use tracing::{debug, warn};

use crate::AgentHandle;

/// Tells systemd the agent is serving (`READY=1`), with a status line.
pub(crate) fn notify_ready(http: std::net::SocketAddr) {
    let status = format!("serving on http://{http}");
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]) {
        warn!(error = %e, "could not notify systemd");
    }
}

/// Tells systemd the agent is stopping.
pub(crate) fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// The watchdog interval systemd asked for, if any.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Feeds the watchdog at half its interval, but only while the writer answers within a quarter
/// of it: a stuck writer stops the pings and systemd restarts the agent (`Restart=always`).
pub(crate) async fn feed_watchdog(agent: &AgentHandle, interval: Duration) {
    let period = interval / 2;
    loop {
        if agent.writer_alive(interval / 4).await {
            if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
                warn!(error = %e, "could not feed the systemd watchdog");
            }
        } else {
            warn!("the writer did not answer in time; not feeding the systemd watchdog");
        }
        debug!("watchdog checked");
        // The ping period systemd asked for (half of WatchdogSec), not a wait for an event.
        tokio::time::sleep(period).await;
    }
}
