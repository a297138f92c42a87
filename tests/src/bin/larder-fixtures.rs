//! Writes a fixture of this build's store formats (`larder_tests::fixtures`): a hub region and
//! two agents with what a chain's stores hold, and a manifest of it. The fixtures kept in
//! `tests/fixtures/` were written with the release they are named after; later releases are
//! tested against them.
//!
//! `cargo run -p larder-tests --bin larder-fixtures -- --out tests/fixtures/stores-v0`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Write stores of this build's format, with a manifest of what they hold")]
struct Args {
    /// The directory to write them into.
    #[arg(long)]
    out: PathBuf,
    /// Who wrote them, for the manifest (say the release and its commit).
    #[arg(long, default_value = concat!("larder ", env!("CARGO_PKG_VERSION")))]
    written_by: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let written = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(larder_tests::fixtures::write(&args.out, &args.written_by)));
    match written {
        Ok(manifest) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&manifest).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
