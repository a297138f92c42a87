//! The `larder-hub` command line: `run`, `config check`, `device add/list/revoke`,
//! `token create`, `audit verify`, `import`, `broker-config`, `migrate`, `backup [verify]`,
//! `restore` and `litestream-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use larder_shared::domain::Role;
use larder_shared::{DeviceId, FridgeId, PublicKey, RegionId, SiteId};

use larder_runtime::cli::{init_logging, wait_for_signal};

use crate::config::{HubConfig, TokenRole};
use crate::store::{DeviceRecord, RegionBatch, RegionStore};

/// Larder's regional hub.
#[derive(Debug, Parser)]
#[command(name = "larder-hub", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Cmd,
}

pub use larder_runtime::cli::LogFormat;

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Cmd {
    /// Run a hub for the regions in a config file.
    Run {
        /// The hub's TOML config (see hub/hub.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Work with config files.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Enroll, list and revoke devices (directly in the region's store).
    Device {
        #[command(subcommand)]
        command: DeviceCmd,
    },
    /// Create API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Check the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
    },
    /// Bulk-load a CSV file into a region through a running hub's API: valid rows are kept,
    /// every rejected row is reported with its line number and reason, and importing the same
    /// file again changes nothing. Exits 1 if any row was rejected.
    Import {
        /// What the file holds: `catalog` (sku,name,price_minor,allergens,shelf_life_hours),
        /// `units` (unit_id,fridge_id,sku,expires_at[,batch]) or `subscriptions`
        /// (customer_id,fridge_id,sku,quantity,weekdays,start_date[,end_date]).
        #[arg(value_enum)]
        kind: crate::import::Kind,
        /// The CSV file, with a header row naming its columns.
        file: PathBuf,
        /// The region to load it into.
        #[arg(long)]
        region: RegionId,
        /// The hub's HTTP address.
        #[arg(long, env = "LARDER_HUB", default_value = "http://127.0.0.1:8080")]
        hub: String,
        /// An admin token for the region.
        #[arg(long, env = "LARDER_TOKEN", hide_env_values = true)]
        token: String,
        /// Where to write the rejected rows (default: FILE.rejected.csv).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Rows per request (at most 10000; fewer when the rows are long).
        #[arg(long, default_value_t = crate::import::BATCH_ROWS_DEFAULT)]
        batch_rows: usize,
    },
    /// Copy every region store and the hub's key into a new directory, with a manifest (schema
    /// versions, each device's stream positions, checksums), while the hub serves. `backup
    /// verify --dir DIR` checks one.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Backup {
        #[command(subcommand)]
        command: Option<BackupCmd>,
        /// The hub's TOML config: its regions, stores and key.
        #[arg(long, required = true)]
        config: Option<PathBuf>,
        /// A new (or empty) directory to write the backup into.
        #[arg(long, required = true)]
        out: Option<PathBuf>,
    },
    /// Put a backup back into a stopped hub's data directory, once it verifies. Refuses while
    /// the hub runs, and over existing stores unless `--replace`.
    Restore {
        /// The hub's TOML config: where its stores and key go.
        #[arg(long)]
        config: PathBuf,
        /// The backup's directory.
        #[arg(long)]
        from: PathBuf,
        /// Replace region stores that exist.
        #[arg(long)]
        replace: bool,
    },
    /// Bring every region store to this program's version, or with `--check` say what that
    /// would run, changing nothing. The hub does it itself when it starts; this lets an
    /// operator see it, or do it, first. Exits 1 if a store is newer than this program.
    Migrate {
        /// The hub's TOML config: its regions and where their stores are.
        #[arg(long)]
        config: PathBuf,
        /// Only say what would run.
        #[arg(long)]
        check: bool,
    },
    /// Print (or write) Litestream's config replicating every region store continuously to a
    /// file or S3-compatible replica (docs/OPERATIONS.md says how to run it beside the hub).
    LitestreamConfig {
        /// The hub's TOML config: its regions and where their stores are.
        #[arg(long)]
        config: PathBuf,
        /// Where the replicas go: `file:///dir`, `s3://bucket/prefix` (any URL Litestream
        /// takes), or an absolute directory. Each store gets its own path below it.
        #[arg(long)]
        replica: String,
        /// Write it to this file instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Take over the regions of a primary hub that died, on a standby holding its key: restore
    /// every region store from its Litestream replica, check it, make it a new generation (its
    /// devices offer again what the replica lacks). Then start the hub with `run`.
    Promote {
        /// The standby's TOML config: the same regions as the primary's, its own data directory.
        #[arg(long)]
        config: PathBuf,
        /// The replica the primary's `litestream-config` was given (`file:///dir`,
        /// `s3://bucket/prefix`, or an absolute directory).
        #[arg(long)]
        replica: String,
        /// The Litestream program.
        #[arg(long, default_value = "litestream")]
        litestream: PathBuf,
        /// Replace region stores that exist (each is kept beside as `….db.pre-restore`).
        #[arg(long)]
        replace: bool,
    },
    /// Write an external Mosquitto's password file, ACL and config for this hub's regions:
    /// only the hub and enrolled, unrevoked devices get in, each device to its own topics.
    BrokerConfig {
        /// The hub's TOML config: its regions, stores and key.
        #[arg(long)]
        config: PathBuf,
        /// Where to write `passwords`, `device-passwords`, `acl`, `mosquitto.conf` and
        /// `emqx-acl.conf`.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Check a backup: its manifest, every file's checksum, SQLite's integrity check, and that
    /// this program can read its stores. Exit 0, or one line per problem and exit 1.
    Verify {
        /// The backup's directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check every device's hash-chained, signed audit log in a region's store: exit 0 if all
    /// are intact, else one line per gap or tampered entry and exit 1.
    Verify {
        /// The hub's TOML config: where the region's store is.
        #[arg(long)]
        config: PathBuf,
        /// The region, one the config lists.
        #[arg(long)]
        region: RegionId,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate a config: exit 0, or one line per problem and exit 1.
    Check {
        /// The config file to check.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum DeviceCmd {
    /// Enroll a device.
    Add {
        /// The hub's TOML config: where the region's store is.
        #[arg(long)]
        config: PathBuf,
        /// The region, one the config lists.
        #[arg(long)]
        region: RegionId,
        /// The device's id (its `device_id` in its agent config).
        #[arg(long)]
        id: DeviceId,
        /// `fridge` or `pos`.
        #[arg(long)]
        role: Role,
        /// The site it stands at (optional).
        #[arg(long)]
        site: Option<SiteId>,
        /// Fridges the device serves, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        fridges: Vec<FridgeId>,
        /// The device's public key (what `larder-agent keygen` printed).
        #[arg(long)]
        public_key: PublicKey,
    },
    /// List a region's devices.
    List {
        /// The hub's TOML config: where the region's store is.
        #[arg(long)]
        config: PathBuf,
        /// The region, one the config lists.
        #[arg(long)]
        region: RegionId,
    },
    /// Revoke a device: its next envelope is rejected.
    Revoke {
        /// The hub's TOML config: where the region's store is.
        #[arg(long)]
        config: PathBuf,
        /// The region, one the config lists.
        #[arg(long)]
        region: RegionId,
        /// The device's id.
        #[arg(long)]
        id: DeviceId,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Print a new random token and the config entry that admits it.
    Create {
        /// `admin` (everything), `kitchen` (its regions' stock, orders and plans) or `app`
        /// (customers' orders, subscriptions and ratings).
        #[arg(long, value_enum)]
        role: CliTokenRole,
        /// Regions it may touch, comma separated, or `*`.
        #[arg(long, value_delimiter = ',', required = true)]
        regions: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CliTokenRole {
    Admin,
    Kitchen,
    App,
}

impl From<CliTokenRole> for TokenRole {
    fn from(r: CliTokenRole) -> Self {
        match r {
            CliTokenRole::Admin => TokenRole::Admin,
            CliTokenRole::Kitchen => TokenRole::Kitchen,
            CliTokenRole::App => TokenRole::App,
        }
    }
}

fn fail(lines: impl IntoIterator<Item = String>) -> ExitCode {
    for l in lines {
        eprintln!("{l}");
    }
    ExitCode::FAILURE
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Entry point of the `larder-hub` binary.
///
/// One piece: the subcommands, one arm each.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // rumqttd logs every client disconnect as an error; the hub reports connections itself.
    init_logging(cli.log_format, "info,rumqttd::server::broker=off");
    match cli.command {
        Cmd::Run { config } => run_hub(config),
        Cmd::Config {
            command: ConfigCmd::Check { file },
        } => larder_runtime::config::check_report(&file, HubConfig::load(&file)),
        Cmd::Device { command } => device(command),
        Cmd::BrokerConfig { config, out } => broker_config(&config, &out),
        Cmd::Migrate { config, check } => migrate(&config, check),
        Cmd::LitestreamConfig {
            config,
            replica,
            out,
        } => litestream_config(&config, &replica, out.as_deref()),
        Cmd::Promote {
            config,
            replica,
            litestream,
            replace,
        } => promote(&config, &replica, &litestream, replace),
        Cmd::Backup {
            command: Some(BackupCmd::Verify { dir }),
            ..
        } => backup_verify(&dir),
        Cmd::Backup {
            config: Some(config),
            out: Some(out),
            ..
        } => backup(&config, &out),
        Cmd::Backup { .. } => fail(["error: backup needs --config and --out".to_owned()]),
        Cmd::Restore {
            config,
            from,
            replace,
        } => restore(&config, &from, replace),
        Cmd::Import {
            kind,
            file,
            region,
            hub,
            token,
            report,
            batch_rows,
        } => {
            use std::io::IsTerminal;
            let options = crate::import::Options {
                kind,
                file,
                region: region.to_string(),
                hub,
                token,
                report,
                batch_rows,
                progress: std::io::stderr().is_terminal(),
            };
            match runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(crate::import::run(&options)))
            {
                Ok(summary) => {
                    println!("{summary}");
                    if summary.rejected == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail([format!("error: {e:#}")]),
            }
        }
        Cmd::Audit {
            command: AuditCmd::Verify { config, region },
        } => {
            let (_, store) = match open_region(&config, &region) {
                Ok(x) => x,
                Err(e) => return fail(e),
            };
            let report = match crate::audit::verify(&store) {
                Ok(r) => r,
                Err(e) => return fail([format!("error: {e}")]),
            };
            let mut broken = 0;
            for d in &report {
                if d.problems.is_empty() {
                    println!(
                        "{}: {} entries, {} signed heads, chain intact",
                        d.device, d.entries, d.signed_heads
                    );
                } else {
                    broken += 1;
                    for p in &d.problems {
                        println!("{}: {p}", d.device);
                    }
                }
            }
            if broken == 0 {
                println!("region {region}: every audit chain is intact");
                ExitCode::SUCCESS
            } else {
                println!("region {region}: {broken} device(s) with a broken audit chain");
                ExitCode::FAILURE
            }
        }
        Cmd::Token {
            command: TokenCmd::Create { role, regions },
        } => {
            let mut bytes = [0u8; 24];
            if let Err(e) = getrandom::fill(&mut bytes) {
                return fail([format!("error: {e}")]);
            }
            let token = hex::encode(bytes);
            let role: TokenRole = role.into();
            println!("token: {token}");
            println!("add to the hub config:");
            println!("[[tokens]]");
            println!("sha256 = \"{}\"", crate::http::token_sha256(&token));
            println!(
                "role = \"{}\"",
                serde_json::to_value(role)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            );
            println!("regions = {:?}", regions);
            ExitCode::SUCCESS
        }
    }
}

fn restore(path: &std::path::Path, from: &std::path::Path, replace: bool) -> ExitCode {
    said_or_failed(path, |config| crate::backup::restore(config, from, replace))
}

fn promote(
    path: &std::path::Path,
    replica: &str,
    litestream: &std::path::Path,
    replace: bool,
) -> ExitCode {
    said_or_failed(path, |config| {
        crate::backup::promote(config, replica, litestream, replace)
    })
}

/// Runs `f` on the config at `path`, printing the lines it answers, or the error.
fn said_or_failed(
    path: &std::path::Path,
    f: impl FnOnce(&HubConfig) -> Result<Vec<String>, crate::backup::BackupError>,
) -> ExitCode {
    let config = match HubConfig::load(path) {
        Ok(c) => c,
        Err(p) => return fail(p.into_iter().map(|p| p.to_string())),
    };
    match f(&config) {
        Ok(said) => {
            for line in said {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail([format!("error: {e}")]),
    }
}

fn backup_verify(dir: &std::path::Path) -> ExitCode {
    match crate::backup::verify(dir) {
        Ok(m) => {
            let devices: usize = m.regions.iter().map(|r| r.devices.len()).sum();
            println!(
                "{}: {} region store(s), {devices} device(s), taken {} by {}: intact",
                dir.display(),
                m.regions.len(),
                m.taken_at,
                m.program
            );
            ExitCode::SUCCESS
        }
        Err(problems) => fail(problems),
    }
}

fn litestream_config(
    path: &std::path::Path,
    replica: &str,
    out: Option<&std::path::Path>,
) -> ExitCode {
    let config = match HubConfig::load(path) {
        Ok(c) => c,
        Err(p) => return fail(p.into_iter().map(|p| p.to_string())),
    };
    let yaml = match crate::backup::litestream_config(&config, replica) {
        Ok(y) => y,
        Err(e) => return fail([format!("error: {e}")]),
    };
    match out {
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Some(out) => match std::fs::write(out, yaml) {
            Ok(()) => {
                println!("wrote {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail([format!("error: {}: {e}", out.display())]),
        },
    }
}

fn backup(path: &std::path::Path, out: &std::path::Path) -> ExitCode {
    let config = match HubConfig::load(path) {
        Ok(c) => c,
        Err(p) => return fail(p.into_iter().map(|p| p.to_string())),
    };
    let now = larder_runtime::Clock::system().wall_ms();
    match crate::backup::backup(&config, out, now) {
        Ok(m) => {
            for r in &m.regions {
                println!(
                    "region {}: {} ({} bytes, {} devices, schema version {})",
                    r.region,
                    r.file,
                    r.bytes,
                    r.devices.len(),
                    r.schema_version
                );
            }
            if m.hub_key.is_none() {
                println!(
                    "no hub key file at {}: not in the backup",
                    config.key_path().display()
                );
            }
            println!(
                "backup written to {} ({})",
                out.display(),
                crate::backup::MANIFEST
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail([format!("error: {e}")]),
    }
}

fn migrate(path: &std::path::Path, check: bool) -> ExitCode {
    let config = match HubConfig::load(path) {
        Ok(c) => c,
        Err(p) => return fail(p.into_iter().map(|p| p.to_string())),
    };
    let mut ok = true;
    for r in &config.regions {
        ok &= larder_runtime::sqlite::migrate::command(
            &crate::store::REGION_SCHEMA,
            &config.region_db(&r.id),
            check,
            |db| RegionStore::open_migrated(db).map(|(_, ran)| ran),
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_hub(path: PathBuf) -> ExitCode {
    let config = match HubConfig::load(&path) {
        Ok(c) => c,
        Err(p) => return fail(p.into_iter().map(|p| p.to_string())),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail([format!("error: {e}")]),
    };
    rt.block_on(async move {
        let key = match crate::load_or_create_key(&config.key_path()) {
            Ok(k) => k,
            Err(e) => return fail([format!("error: {e}")]),
        };
        let hub = match crate::start(config, key).await {
            Ok(h) => h,
            Err(e) => return fail([format!("error: {e}")]),
        };
        println!(
            "hub http://{}  broker mqtt://{}  public key {}",
            hub.http_addr, hub.broker, hub.public_key
        );
        wait_for_signal().await;
        tracing::info!("shutting down");
        hub.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn broker_config(config: &std::path::Path, out: &std::path::Path) -> ExitCode {
    let c = match HubConfig::load(config) {
        Ok(c) => c,
        Err(p) => return fail(p.into_iter().map(|p| p.to_string())),
    };
    let key = match crate::load_or_create_key(&c.key_path()) {
        Ok(k) => k,
        Err(e) => return fail([format!("error: {e}")]),
    };
    let files = match crate::broker_config::build(&c, &key, out) {
        Ok(f) => f,
        Err(e) => return fail([format!("error: {e}")]),
    };
    if let Err(e) = crate::broker_config::write(&files, out) {
        return fail([format!("error: {}: {e}", out.display())]);
    }
    println!(
        "wrote {}/{{passwords,device-passwords,acl,mosquitto.conf,emqx-acl.conf}}: the hub ({}) and {} device(s)",
        out.display(),
        c.mqtt.client_id,
        files.devices
    );
    println!(
        "next: mosquitto_passwd -U {}/passwords (again after every run); each device's `mqtt.password` is the text after `DEVICE_ID:` on its line of device-passwords",
        out.display()
    );
    ExitCode::SUCCESS
}

fn open_region(
    config: &std::path::Path,
    region: &RegionId,
) -> Result<(HubConfig, RegionStore), Vec<String>> {
    let c = HubConfig::load(config)
        .map_err(|p| p.into_iter().map(|p| p.to_string()).collect::<Vec<_>>())?;
    if c.region(region).is_none() {
        return Err(vec![format!(
            "region {region} is not in {}",
            config.display()
        )]);
    }
    std::fs::create_dir_all(&c.data_dir)
        .map_err(|e| vec![format!("{}: {e}", c.data_dir.display())])?;
    let store = RegionStore::open(&c.region_db(region)).map_err(|e| vec![e.to_string()])?;
    Ok((c, store))
}

/// One piece: the `device` subcommands, one arm each.
fn device(cmd: DeviceCmd) -> ExitCode {
    match cmd {
        DeviceCmd::Add {
            config,
            region,
            id,
            role,
            site,
            fridges,
            public_key,
        } => {
            let (c, mut store) = match open_region(&config, &region) {
                Ok(x) => x,
                Err(e) => return fail(e),
            };
            let rc = c.region(&region).cloned();
            let known: Vec<&FridgeId> = rc
                .iter()
                .flat_map(|r| r.fridges.iter().map(|f| &f.id))
                .collect();
            let unknown: Vec<String> = fridges
                .iter()
                .filter(|f| !known.contains(f))
                .map(|f| format!("fridge {f} is not in region {region}"))
                .collect();
            if !unknown.is_empty() {
                return fail(unknown);
            }
            if role == Role::Fridge && fridges.len() != 1 {
                return fail(["a fridge device serves exactly one fridge".to_owned()]);
            }
            if let Err(e) = id.check_enrollable() {
                return fail([e.to_string()]);
            }
            match store.device(&id) {
                Ok(Some(_)) => return fail([format!("device {id} is already enrolled")]),
                Ok(None) => {}
                Err(e) => return fail([e.to_string()]),
            }
            match store.order_in_namespace(&id) {
                Ok(Some(order)) => return fail([crate::region::namespace_taken(&id, &order)]),
                Ok(None) => {}
                Err(e) => return fail([e.to_string()]),
            }
            let record = DeviceRecord {
                device_id: id.clone(),
                role,
                site,
                fridges,
                public_key,
                enrolled_at_ms: larder_runtime::Clock::system().now_ms(),
                revoked_at_ms: None,
                last_seen_ms: None,
            };
            match store.commit(&RegionBatch {
                enroll: vec![record],
                ..RegionBatch::default()
            }) {
                Ok(()) => {
                    println!("enrolled {id} in {region}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail([e.to_string()]),
            }
        }
        DeviceCmd::List { config, region } => {
            let (_, store) = match open_region(&config, &region) {
                Ok(x) => x,
                Err(e) => return fail(e),
            };
            match store.devices() {
                Ok(list) => {
                    println!(
                        "{:<24} {:<7} {:<10} {:<30} public key",
                        "device", "role", "status", "fridges"
                    );
                    for (d, _) in list {
                        let fridges: Vec<&str> = d.fridges.iter().map(|f| f.as_str()).collect();
                        let status = if d.revoked_at_ms.is_some() {
                            "revoked"
                        } else {
                            "enrolled"
                        };
                        println!(
                            "{:<24} {:<7} {:<10} {:<30} {}",
                            d.device_id,
                            d.role.as_str(),
                            status,
                            fridges.join(","),
                            d.public_key
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail([e.to_string()]),
            }
        }
        DeviceCmd::Revoke { config, region, id } => {
            let (_, mut store) = match open_region(&config, &region) {
                Ok(x) => x,
                Err(e) => return fail(e),
            };
            match store.device(&id) {
                Ok(Some(_)) => {}
                Ok(None) => return fail([format!("device {id} is not enrolled in {region}")]),
                Err(e) => return fail([e.to_string()]),
            }
            let batch = RegionBatch {
                revoke: vec![(id.clone(), larder_runtime::Clock::system().now_ms())],
                ..RegionBatch::default()
            };
            match store.commit(&batch) {
                Ok(()) => {
                    println!("revoked {id}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail([e.to_string()]),
            }
        }
    }
}
