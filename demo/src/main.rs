//! The `larder-demo` binary: a hub with its embedded broker and a simulated fleet of fridges
//! and POS agents, in one process.

use std::process::ExitCode;

use clap::Parser;
use larder_demo::fleet::DemoOptions;
use larder_runtime::cli::{LogFormat, init_logging};

/// The same allocator as the hub's binary: the demo's hub runs as the production one does.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Larder's demo: a hub and a simulated fleet that sells, refills, goes offline and comes
/// back, then checks that every replica converged.
#[derive(Debug, Parser)]
#[command(name = "larder-demo", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    options: DemoOptions,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // rumqttd logs every client disconnect as an error; the hub reports connections itself.
    init_logging(cli.log_format, "warn,rumqttd=off");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(larder_demo::fleet::run(cli.options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
