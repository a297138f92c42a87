//! The agent's real command line, built inside the test package so end-to-end tests can start
//! and kill it as a separate process.

fn main() -> std::process::ExitCode {
    larder_agent::main()
}
