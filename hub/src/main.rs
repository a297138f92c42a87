//! The `larder-hub` binary; everything lives in the library's `cli` module.

/// jemalloc, not the system allocator: the hub's writers allocate and free many small
/// values per row and per envelope, and glibc's allocator was a sixth of their time
/// (`docs/BENCHMARKS.md`).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    larder_hub::cli::main()
}
