//! The hub's real command line, built inside the test package so end-to-end tests can start and
//! kill it as a separate process.

/// jemalloc, not the system allocator: the hub's writers allocate and free many small
/// values per row and per envelope, and glibc's allocator took about a quarter of the region
/// writer's thread during an import (`docs/BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    larder_hub::cli::main()
}
