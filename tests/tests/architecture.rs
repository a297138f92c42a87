//! The crate rules of ARCHITECTURE.md ("Architecture invariants"), proved from `cargo metadata`:
//! the pure core depends on no IO crate, and the production hub on no agent code.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// The resolved dependency graph for this machine's platform: each package's normal (not dev,
/// not build) dependencies, by name.
fn normal_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    let host = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc names its host");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--manifest-path", manifest, "--filter-platform", &host])
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON");
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let mut graph = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve") {
        let name = name_of[node["id"].as_str().expect("id")].to_owned();
        let deps = node["deps"]
            .as_array()
            .expect("deps")
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k["kind"].is_null()))
            })
            .map(|d| name_of[d["pkg"].as_str().expect("pkg")].to_owned())
            .collect();
        graph.insert(name, deps);
    }
    graph
}

/// Every package `root` depends on, directly or not, through normal dependencies.
fn closure(graph: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_owned()];
    while let Some(p) = todo.pop() {
        for d in graph.get(&p).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn the_crate_rules_hold() {
    let graph = normal_dependencies();
    let forbidden = |root: &str, names: &[&str]| {
        let deps = closure(&graph, root);
        assert!(
            !deps.is_empty() || graph.contains_key(root),
            "{root} is not in the graph"
        );
        let found: Vec<&&str> = names.iter().filter(|n| deps.contains(**n)).collect();
        assert!(found.is_empty(), "{root} depends on {found:?}");
    };
    // The pure core: no runtime, no SQLite, no MQTT, no HTTP.
    forbidden(
        "larder-shared",
        &[
            "tokio",
            "rusqlite",
            "libsqlite3-sys",
            "rumqttc",
            "rumqttd",
            "axum",
            "hyper",
            "reqwest",
            "larder-runtime",
        ],
    );
    // The plumbing knows neither deployable.
    forbidden(
        "larder-runtime",
        &["larder-agent", "larder-hub", "larder-demo"],
    );
    // The production hub links no agent code and no demo; the agent no hub code and no broker.
    forbidden(
        "larder-hub",
        &["larder-agent", "larder-demo", "larder-tests"],
    );
    forbidden(
        "larder-agent",
        &["larder-hub", "larder-demo", "larder-tests", "rumqttd"],
    );
    // The layers as ARCHITECTURE.md draws them: shared <- runtime <- agent, hub.
    for (above, below) in [
        ("larder-runtime", "larder-shared"),
        ("larder-agent", "larder-runtime"),
        ("larder-hub", "larder-runtime"),
    ] {
        assert!(
            graph[above].contains(below),
            "{above} builds on {below}: {:?}",
            graph[above]
        );
    }
}
