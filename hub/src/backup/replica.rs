//! Continuous replication with Litestream: the config `larder-hub litestream-config` writes for
//! the region stores, and `larder-hub promote`, a standby hub taking over the regions of a
//! primary that died, from the replica.

use std::path::Path;
use std::process::Command;

use super::{BackupError, io, refuse_if_running, renew_generation, replace_store, sync_dir};
use crate::config::HubConfig;
use crate::store::REGION_SCHEMA;
use larder_runtime::sqlite::integrity_problems;

/// The replica's base URL for `replica`: a URL Litestream takes, or an absolute directory.
fn replica_base(replica: &str) -> Result<String, String> {
    let base = if replica.starts_with('/') {
        format!("file://{replica}")
    } else if replica.contains("://") {
        replica.to_owned()
    } else {
        return Err(format!(
            "--replica {replica:?}: give a URL Litestream takes (file:///dir, s3://bucket/prefix) \
             or an absolute directory"
        ));
    };
    Ok(base.trim_end_matches('/').to_owned())
}

/// The replica URL of a region's store under `base`.
fn region_replica(base: &str, region: &larder_shared::RegionId) -> String {
    format!("{base}/region-{region}")
}

/// Litestream's config (YAML) replicating every region store `config` names to `replica`: a
/// URL Litestream takes (`file:///…`, `s3://bucket/prefix`, …) or an absolute directory, under
/// which each store gets its own path (`region-ID`). Litestream's default sync interval (1 s)
/// is kept: it bounds what a lost disk loses of what no device holds.
pub fn litestream_config(config: &HubConfig, replica: &str) -> Result<String, String> {
    let base = replica_base(replica)?;
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut yaml = String::from(
        "# Litestream's config for larder-hub's region stores (`larder-hub litestream-config`).\n\
         # Run it beside the hub: litestream replicate -config THIS_FILE\n\
         # Restore the stores (a new generation each): larder-hub promote --config HUB_TOML --replica REPLICA [--replace]\n\
         dbs:\n",
    );
    for r in &config.regions {
        let path = config.region_db(&r.id);
        yaml.push_str(&format!(
            "  - path: {}\n    replicas:\n      - url: {}\n",
            quote(&path.to_string_lossy()),
            quote(&region_replica(&base, &r.id))
        ));
    }
    Ok(yaml)
}

/// Takes over the regions of a primary hub that died: restores every region store `config`
/// names from its Litestream replica under `replica` (the same `--replica` the primary's
/// `litestream-config` was given) with `litestream restore`, checks each (integrity, a schema
/// this program reads), makes each a new generation, and puts it in place. The standby holds
/// the primary's hub key; `larder-hub run` then serves, and every device, seeing the new
/// generation, offers again what the replica lacks. Refuses, changing nothing, while a hub
/// runs on this config, when the key file is missing, or when a store exists and `replace`
/// is not set (a replaced store is kept beside it, as `restore` keeps one).
pub fn promote(
    config: &HubConfig,
    replica: &str,
    litestream: &Path,
    replace: bool,
) -> Result<Vec<String>, BackupError> {
    let base = replica_base(replica).map_err(BackupError::Refused)?;
    refuse_if_running(config)?;
    let key_path = config.key_path();
    if !key_path.exists() {
        return Err(BackupError::Refused(format!(
            "no hub key at {}: a standby serves with the primary's key; copy it there first",
            key_path.display()
        )));
    }
    std::fs::create_dir_all(&config.data_dir).map_err(io(&config.data_dir))?;
    let mut staged = Vec::with_capacity(config.regions.len());
    for r in &config.regions {
        let dest = config.region_db(&r.id);
        if dest.exists() && !replace {
            return Err(BackupError::Refused(format!(
                "region {} has a store at {}: promote replaces it only with --replace",
                r.id,
                dest.display()
            )));
        }
        let at = dest.with_extension("db.promoting");
        for leftover in [at.clone(), at.with_extension("promoting-wal")] {
            match std::fs::remove_file(&leftover) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(&leftover)(e));
                }
                _ => {}
            }
        }
        let url = region_replica(&base, &r.id);
        let out = Command::new(litestream)
            .arg("restore")
            .arg("-o")
            .arg(&at)
            .arg(&url)
            .output()
            .map_err(io(litestream))?;
        if !out.status.success() || !at.exists() {
            return Err(BackupError::Refused(format!(
                "region {}: `litestream restore` from {url} failed: {}",
                r.id,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let store = |e| BackupError::Store {
            path: at.clone(),
            source: Box::new(e),
        };
        let problems = integrity_problems(&at).map_err(store)?;
        if !problems.is_empty() {
            return Err(BackupError::Refused(format!(
                "region {}: the store restored from {url} fails SQLite's integrity check: {}",
                r.id,
                problems.join("; ")
            )));
        }
        larder_runtime::sqlite::migrate::check(&REGION_SCHEMA, &at).map_err(store)?;
        let generation = renew_generation(&at)?;
        staged.push((r.id.clone(), url, dest, at, generation));
    }
    sync_dir(&config.data_dir)?;
    let mut said = Vec::with_capacity(staged.len());
    for (region, url, dest, at, generation) in staged {
        if let Err(e) = replace_store(&at, &dest) {
            return Err(BackupError::Incomplete {
                done: said.join("; "),
                source: Box::new(e),
            });
        }
        said.push(format!(
            "region {region}: promoted from {url} to {} (new generation {generation})",
            dest.display()
        ));
    }
    sync_dir(&config.data_dir)?;
    Ok(said)
}
