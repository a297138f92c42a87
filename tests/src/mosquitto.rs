//! A real Mosquitto (Debian's `mosquitto`) for the tests of an external broker: started on a
//! given port with the password file and ACL `larder-hub broker-config` wrote, killed when its
//! handle drops, whether the test passed or not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

/// A running Mosquitto.
#[derive(Debug)]
pub struct Mosquitto {
    child: std::process::Child,
    /// Where its files are: `passwords` (hashed), `device-passwords` (in clear, for the
    /// devices' configs), `acl`, `mosquitto.conf`.
    pub dir: PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    /// Starts Mosquitto on `127.0.0.1:port` with these password lines (`user:password`, in
    /// clear; hashed here with `mosquitto_passwd -U`) and ACL, and waits until it listens.
    pub async fn start(dir: &Path, port: u16, passwords: &str, acl: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let hashed = dir.join("passwords");
        std::fs::write(&hashed, passwords)?;
        std::fs::write(dir.join("device-passwords"), passwords)?;
        std::fs::write(dir.join("acl"), acl)?;
        run(
            "mosquitto_passwd",
            &["-U", hashed.to_str().context("path")?],
        )?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nper_listener_settings false\nallow_anonymous false\n\
                 use_username_as_clientid true\npersistence false\npassword_file {}\nacl_file {}\n",
                hashed.display(),
                dir.join("acl").display()
            ),
        )?;
        let child = Command::new("mosquitto")
            .args(["-c", conf.to_str().context("path")?])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting mosquitto (install Debian's mosquitto)")?;
        let broker = Self {
            child,
            dir: dir.to_path_buf(),
        };
        crate::eventually(Duration::from_secs(30), "mosquitto to listen", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await?;
        Ok(broker)
    }

    /// The password `user` has (from `device-passwords`).
    pub fn password(&self, user: &str) -> Result<String> {
        std::fs::read_to_string(self.dir.join("device-passwords"))?
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{user}:")).map(str::to_owned))
            .with_context(|| format!("no password for {user}"))
    }
}

/// Runs `exe args` to its end; fails with what it said unless it succeeded.
pub fn run(exe: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(exe)
        .args(args)
        .output()
        .with_context(|| format!("running {exe}"))?;
    ensure!(
        out.status.success(),
        "{exe} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `config` as a hub config on the external broker at `127.0.0.1:broker_port`, known
/// there as `client_id`, with the tests' hub key and a fresh HTTP port, into `dir/hub.toml`.
pub fn write_external_hub_config(
    dir: &Path,
    config: &larder_hub::config::HubConfig,
    broker_port: u16,
    client_id: &str,
) -> Result<String> {
    let http_port = larder_hub::mqtt::free_port()?;
    std::fs::create_dir_all(dir)?;
    let key_path = dir.join("hub.key");
    larder_runtime::keys::write_key(&key_path, &larder_demo::seeded_key(7, "hub"))?;
    let regions = toml::to_string(&serde_json::json!({"regions": config.regions}))?;
    let text = format!(
        "data_dir = {:?}\nkey_file = {key_path:?}\n\
         [http]\nlisten = \"127.0.0.1:{http_port}\"\n\
         [mqtt]\nmode = \"external\"\nbroker = \"127.0.0.1:{broker_port}\"\nclient_id = \"{client_id}\"\n\
         watch_other_regions = true\n\
         [[tokens]]\nsha256 = \"{}\"\nrole = \"admin\"\nregions = [\"*\"]\n{regions}",
        config.data_dir, config.tokens[0].sha256,
    );
    let path = dir.join("hub.toml");
    std::fs::write(&path, text)?;
    Ok(path.display().to_string())
}

/// `larder-hub device add` (the binary `hub_exe`) of `device` in `region`, with the tests'
/// seeded key, holding `fridge`.
pub fn add_device(
    hub_exe: &str,
    config: &str,
    region: &str,
    (device, role, fridge): (&str, &str, &str),
) -> Result<()> {
    let key = larder_demo::seeded_key(7, device).public().to_string();
    let args = [
        "device",
        "add",
        "--config",
        config,
        "--region",
        region,
        "--id",
        device,
        "--role",
        role,
        "--fridges",
        fridge,
        "--public-key",
        &key,
    ];
    run(hub_exe, &args).map(|_| ())
}
