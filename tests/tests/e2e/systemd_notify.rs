//! The agent under systemd's notify protocol (`Type=notify`, `WatchdogSec=`), with the test as
//! the service manager: a real agent process sends `READY=1` once its HTTP API serves, then
//! `WATCHDOG=1` pings while its writer answers, and `STOPPING=1` on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use larder_shared::domain::Role;
use larder_tests::*;

fn next_message(socket: &UnixDatagram, deadline: Instant) -> anyhow::Result<String> {
    let mut buf = [0u8; 4096];
    socket.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ))?;
    let n = socket
        .recv(&mut buf)
        .context("no notification before the deadline")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn the_agent_notifies_ready_feeds_the_watchdog_and_says_when_it_stops() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path)?;
    let (config, _) = write_agent_config(
        &dir.path().join("agent"),
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        hub_public_key(),
        // No hub: the agent works offline, and the watchdog does not depend on the network.
        "127.0.0.1:9",
    )?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_agent-node"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = next_message(&socket, deadline)?;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving on http://")),
        "{ready:?}"
    );
    // At half the 400 ms interval: several pings within a few seconds.
    let mut pings = 0;
    while pings < 3 {
        if next_message(&socket, deadline)?
            .lines()
            .any(|l| l == "WATCHDOG=1")
        {
            pings += 1;
        }
    }
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    let mut stopping = false;
    while !stopping {
        stopping = next_message(&socket, deadline)?
            .lines()
            .any(|l| l == "STOPPING=1");
    }
    let status = child.wait()?;
    assert!(
        status.success(),
        "the agent exits cleanly on SIGTERM: {status}"
    );
    Ok(())
}
