//! The `larder-agent` binary; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    larder_agent::cli::main()
}
