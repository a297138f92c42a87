//! The `larder-agent` binary; everything lives in the library (its `cli` module).

fn main() -> std::process::ExitCode {
    larder_agent::main()
}
