//! The `larder-agent` command line: `run`, `keygen`, `rotate-key`, `config check`, `migrate`
//! and `status`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use larder_runtime::cli::{LogFormat, init_logging, wait_for_signal};

use crate::config::AgentConfig;

/// Larder's agent for smart fridges and POS terminals.
#[derive(Debug, Parser)]
#[command(name = "larder-agent", version, about)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
    /// Run a fridge or POS agent.
    Run {
        /// The agent's TOML config (see firmware-config/).
        #[arg(long)]
        config: PathBuf,
    },
    /// Create the device key (file mode 0600) and print its public key.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rotate the device key: creates the next key beside the key file (`KEY_FILE.next`, mode
    /// 0600) and prints its public key. The agent announces it to the hub, signed with the
    /// current key, when it next starts; once the hub confirms, the next key replaces the key
    /// file. The hub accepts the old key for its `sync.key_overlap_seconds` after that.
    RotateKey {
        /// The agent's TOML config (its `key_file`).
        #[arg(long)]
        config: PathBuf,
    },
    /// Work with config files.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Bring the agent's store to this program's version, or with `--check` say what that
    /// would run, changing nothing. The agent does it itself when it starts; this lets an
    /// operator see it, or do it, first. Exits 1 if the store is newer than this program.
    Migrate {
        /// The agent's TOML config (its `data_dir`).
        #[arg(long)]
        config: PathBuf,
        /// Only say what would run.
        #[arg(long)]
        check: bool,
    },
    /// Ask the local agent for its health and print it for a person.
    Status {
        /// The agent's local API.
        #[arg(long, default_value = "http://127.0.0.1:7070")]
        url: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCmd {
    /// Validate a config: exit 0, or one line per problem and exit 1.
    Check { file: PathBuf },
}

/// Entry point of the `larder-agent` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, "info");
    match cli.command {
        Cmd::Config {
            command: ConfigCmd::Check { file },
        } => larder_runtime::config::check_report(&file, AgentConfig::load(&file)),
        Cmd::Keygen { out } => {
            let key = match larder_shared::SecretKey::generate() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match larder_runtime::keys::write_key(&out, &key) {
                Ok(()) => {
                    println!("{}", key.public());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot write {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run { config } => run_agent(config),
        Cmd::RotateKey { config } => rotate_key(&config),
        Cmd::Status { url } => status(&url),
        Cmd::Migrate { config, check } => migrate(&config, check),
    }
}

/// The config at `path`, or `None` once every problem with it is printed.
fn load(path: &std::path::Path) -> Option<AgentConfig> {
    match AgentConfig::load(path) {
        Ok(c) => Some(c),
        Err(problems) => {
            for p in problems {
                eprintln!("{p}");
            }
            None
        }
    }
}

fn migrate(path: &std::path::Path, check: bool) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::FAILURE;
    };
    let ok = larder_runtime::sqlite::migrate::command(
        &crate::store::AGENT_SCHEMA,
        &config.database_path(),
        check,
        |db| crate::store::Store::open_migrated(db).map(|(_, ran)| ran),
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn rotate_key(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::FAILURE;
    };
    let key_path = config.key_path();
    match crate::prepare_rotation(&key_path) {
        Ok((key, created)) => {
            let next = crate::pending_key_path(&key_path);
            if created {
                println!("next key {} written to {}", key.public(), next.display());
            } else {
                println!(
                    "a rotation to {} is already pending ({})",
                    key.public(),
                    next.display()
                );
            }
            println!(
                "restart the agent (systemctl restart larder-agent) to announce it; it replaces \
                 {} once the hub confirms",
                key_path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: cannot prepare the next key beside {}: {e}",
                key_path.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // The agent's work is its writer thread plus light HTTP and MQTT: two workers suffice on
    // any board, and fewer threads mean fewer malloc arenas and stacks.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
}

fn run_agent(path: PathBuf) -> ExitCode {
    let Some(config) = load(&path) else {
        return ExitCode::FAILURE;
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let key = match crate::load_or_create_key(&config.key_path()) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let agent = match crate::start(config, key).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("listening on http://{}", agent.http_addr);
        crate::systemd::notify_ready(agent.http_addr);
        match crate::systemd::watchdog_interval() {
            Some(interval) => {
                tokio::select! {
                    () = wait_for_signal() => {}
                    () = crate::systemd::feed_watchdog(&agent, interval) => {}
                }
            }
            None => wait_for_signal().await,
        }
        crate::systemd::notify_stopping();
        tracing::info!("shutting down");
        agent.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// GETs a JSON document over plain HTTP/1.1 (the agent's own API, on loopback).
async fn get_json(url: &str) -> Result<serde_json::Value, String> {
    use http_body_util::BodyExt;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("the agent's API is plain http://".into());
    }
    let host = uri.host().ok_or("no host in the URL")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = hyper::Request::get(uri.path())
        .header("host", format!("{host}:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

fn status(url: &str) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = format!("{}/v1/health", url.trim_end_matches('/'));
    let result = rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(10), get_json(&url))
            .await
            .unwrap_or_else(|_| Err("no answer within 10 s".into()))
    });
    match result {
        Ok(h) => {
            let field = |k: &str| match &h[k] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "never".into(),
                v => v.to_string(),
            };
            println!(
                "device           {} ({}, region {})",
                field("device_id"),
                field("role"),
                field("region")
            );
            println!("online           {}", field("online"));
            println!("last sync        {}", field("last_sync_at"));
            println!(
                "pending changes  {} of at most {}{}",
                field("pending_changes"),
                field("outbox_limit"),
                if h["outbox_full"] == true {
                    " (outbox full: writes refused until the hub acknowledges)"
                } else {
                    ""
                }
            );
            println!(
                "disk free        {} bytes{}",
                field("disk_free_bytes"),
                if h["storage_low"] == true {
                    " (below the reserve: writes refused until space is freed)"
                } else {
                    ""
                }
            );
            println!("catalog version  {}", field("catalog_version"));
            let offline = &h["offline_payments"];
            match offline["oldest_age_seconds"].as_i64() {
                Some(age) => println!(
                    "offline cards    the oldest waits {} h for its capture (at most {} h)",
                    age / 3600,
                    offline["hours_max"]
                ),
                None => println!("offline cards    none waiting for capture"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot reach the agent at {url}: {e}");
            ExitCode::FAILURE
        }
    }
}
