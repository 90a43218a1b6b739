//! The chat server, kept as an example so that `cargo run --release -p
//! channelbox-warp --example chat` and `target/release/examples/chat` keep
//! working: the same program as the `channelbox` binary of channelbox-server,
//! with the same flags and output.
//!
//! ```sh
//! cargo run --release -p channelbox-warp --example chat -- --addr 127.0.0.1:8080
//! ```

/// jemalloc gives freed memory back to the system, as in the `channelbox`
/// binary.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    channelbox_server::main()
}
