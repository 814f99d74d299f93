//! The `lifeboat` binary: parse, call the library, print, map errors to exit codes.
//!
//! jemalloc is the allocator (tuned in .cargo/config.toml): every stream allocates and frees
//! multi-MiB part buffers and zstd windows on several threads, and glibc's malloc kept those
//! freed chunks resident in per-thread arenas (a WAL streamer measured 77 MiB peak RSS with it,
//! 37 MiB with jemalloc).

mod cli;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    std::process::exit(cli::main());
}
