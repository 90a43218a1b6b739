//! The `channelbox` binary: the chat server of docs/protocol.md, configured by
//! flags, environment variables and a TOML file (`channelbox --help`).

/// jemalloc gives freed memory back to the system: its background thread
/// purges pages left free for a second (`.cargo/config.toml` sets the decay),
/// so after a burst of connections the server shrinks again, where glibc's
/// allocator, and mimalloc on idle threads, kept it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    channelbox_server::main()
}
