//! `config check` through the real binaries: every example config passes, and a file with
//! unknown keys or bad values fails with one line per problem, naming its key.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check(exe: &str, file: &Path) -> (bool, String) {
    let out = Command::new(exe)
        .args(["config", "check"])
        .arg(file)
        .output()
        .expect("run config check");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn every_firmware_config_passes() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("firmware-config")).expect("firmware-config") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, out) = check(env!("CARGO_BIN_EXE_agent-node"), &path);
            assert!(ok, "{}: {out}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 2, "the fridge and POS examples are there");
    let (ok, out) = check(
        env!("CARGO_BIN_EXE_hub-node"),
        &root().join("hub/hub.example.toml"),
    );
    assert!(ok, "hub example: {out}");
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = std::fs::read_to_string(root().join("firmware-config/fridge.example.toml"))
        .expect("example");
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        example.replace("[mqtt]", "[mqtt]\nbroker_colour = \"blue\""),
    )
    .expect("write");
    let (ok, out) = check(env!("CARGO_BIN_EXE_agent-node"), &unknown);
    assert!(!ok);
    assert!(out.contains("broker_colour"), "{out}");

    let bad = dir.path().join("bad.toml");
    let text = example
        .replace("keepalive_seconds = 15", "keepalive_seconds = 1")
        .replace("group_commit_max = 256", "group_commit_max = 0")
        .replace("fridges = [\"fridge-lobby-1\"]", "fridges = []")
        .replace(
            "header_read_timeout_ms = 30000",
            "header_read_timeout_ms = 10",
        );
    std::fs::write(&bad, text).expect("write");
    let (ok, out) = check(env!("CARGO_BIN_EXE_agent-node"), &bad);
    assert!(!ok);
    assert_eq!(out.lines().count(), 4, "one line per problem: {out}");
    for key in [
        "keepalive_seconds",
        "group_commit_max",
        "fridges",
        "header_read_timeout_ms",
    ] {
        assert!(out.contains(key), "{key} named: {out}");
    }

    // The hub's example with two unknown keys and three values it could not run with: all
    // five named, each on its own line.
    let hub_example =
        std::fs::read_to_string(root().join("hub/hub.example.toml")).expect("hub example");
    let hub_bad = dir.path().join("hub-bad.toml");
    let bad_values = |text: &str| {
        text.replace("queue_depth_max = 4096", "queue_depth_max = 0")
            .replace(
                "time_beacon_interval_seconds = 60",
                "time_beacon_interval_seconds = 0",
            )
            .replace("client_id = \"larder-hub\"", "client_id = \"hub north/1\"")
    };
    let text = bad_values(&hub_example)
        .replace("[mqtt]", "[mqtt]\nbroker_colour = \"blue\"")
        .replace("[sync]", "[sync]\nretransmit_every = 3");
    std::fs::write(&hub_bad, text).expect("write");
    let (ok, out) = check(env!("CARGO_BIN_EXE_hub-node"), &hub_bad);
    assert!(!ok);
    assert_eq!(out.lines().count(), 2, "the unknown keys first: {out}");
    for key in ["broker_colour", "retransmit_every"] {
        assert!(out.contains(key), "{key} named: {out}");
    }
    std::fs::write(&hub_bad, bad_values(&hub_example)).expect("write");
    let (ok, out) = check(env!("CARGO_BIN_EXE_hub-node"), &hub_bad);
    assert!(!ok);
    assert_eq!(out.lines().count(), 3, "one line per problem: {out}");
    for key in [
        "sync.queue_depth_max",
        "sync.time_beacon_interval_seconds",
        "mqtt.client_id",
    ] {
        assert!(out.contains(key), "{key} named: {out}");
    }

    let missing = dir.path().join("missing.toml");
    let (ok, out) = check(env!("CARGO_BIN_EXE_hub-node"), &missing);
    assert!(!ok);
    assert!(out.contains("missing.toml"), "{out}");
}

/// The example configs of the release before stores had versions (`tests/fixtures/configs-v0/`,
/// kept as that release shipped them) still pass: a config that started the release before
/// starts this one.
#[test]
fn configs_of_the_release_before_still_pass() {
    let dir = root().join("tests/fixtures/configs-v0");
    for (exe, file) in [
        (env!("CARGO_BIN_EXE_agent-node"), "fridge.example.toml"),
        (env!("CARGO_BIN_EXE_agent-node"), "pos.example.toml"),
        (env!("CARGO_BIN_EXE_hub-node"), "hub.example.toml"),
    ] {
        let (ok, out) = check(exe, &dir.join(file));
        assert!(ok, "{file}: {out}");
    }
}
