//! The `larder-hub` binary; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    larder_hub::cli::main()
}
