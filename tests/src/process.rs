//! Real processes of the tests: started, their announced address read from stdout, killed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// A real process whose stdout announces its address.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub url: String,
}

impl Process {
    /// Spawns `exe args`, and waits for a stdout line containing `marker` followed by an URL.
    pub fn spawn(exe: &str, args: &[&str], marker: &str) -> Result<Self> {
        Self::spawn_with_env(exe, args, marker, &[])
    }

    /// [`Process::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        exe: &str,
        args: &[&str],
        marker: &str,
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let child = Command::new(exe)
            .args(args)
            .env("RUST_LOG", "warn,rumqttd=off")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {exe}"))?;
        Self::announced(child, exe, marker)
    }

    /// Waits for `child`'s stdout line containing `marker` followed by an URL.
    fn announced(mut child: Child, exe: &str, marker: &str) -> Result<Self> {
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = marker.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split(&marker).nth(1) {
                    let url = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(url);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => Ok(Self { child, url }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{exe} did not announce its address")
            }
        }
    }

    /// [`Process::spawn`] of a process that may not grow any file past `file_bytes_max`
    /// (`RLIMIT_FSIZE`, set by util-linux's `prlimit`): a write past it fails with `EFBIG`,
    /// the way a full disk fails a write, and its `SIGXFSZ` is ignored (the shell's `trap`,
    /// which `exec` keeps). Its stderr goes to `log`.
    pub fn spawn_with_file_limit(
        exe: &str,
        args: &[&str],
        marker: &str,
        file_bytes_max: u64,
        log: &Path,
    ) -> Result<Self> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"trap '' XFSZ; exec prlimit --fsize="$0" -- "$@""#)
            .arg(file_bytes_max.to_string())
            .arg(exe)
            .args(args)
            .env("RUST_LOG", "warn,rumqttd=off")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("spawning {exe} under prlimit"))?;
        Self::announced(child, exe, marker).map_err(|e| {
            anyhow!(
                "{e}; its stderr: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
