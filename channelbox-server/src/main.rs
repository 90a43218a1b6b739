//! The `channelbox` binary: the chat server of docs/protocol.md, configured by
//! flags, environment variables and a TOML file (`channelbox --help`).

/// mimalloc gives freed memory back to the system: after a burst of 10,000
/// connections the server shrinks again, where glibc's allocator kept it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    channelbox_server::main()
}
