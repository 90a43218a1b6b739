//! The channelbox chat server as a program: the binary `channelbox` (and the
//! `chat` example of channelbox-warp) call [`main`]; [`Config`] is every flag,
//! environment variable and configuration-file key, and [`run`] serves a
//! configuration until SIGINT or SIGTERM.
//!
//! ```sh
//! cargo run --release -p channelbox-server -- --config examples/channelbox.toml
//! ```
//!
//! The server: a history store (sled in `./channelbox-data` by default,
//! `--store memory` for none on disk, `--store redis` for one server of a
//! cluster), the protocol of docs/protocol.md, and an HTTP adapter
//! (`--http warp`, the default, or `--http axum`) over one hyper accept loop.

pub mod config;
pub mod hooks;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use channelbox_core::HistoryStore;
use channelbox_protocol::{ChatService, ProtocolConfig};
use channelbox_redis::{split_url_list, RedisAddress, RedisConfig, RedisEngine, ShardedEngine};
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use channelbox_store_sled::{SledConfig, SledStore};
use channelbox_warp::ServerConfig;

pub use config::{Compression, Config, ConfigError, Http, StoreKind};

/// How long shutdown waits for the store to flush and sockets to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The whole program: reads the configuration from the process's arguments,
/// environment and `--config` file, then prints it (`--print-config`) or
/// serves it. Errors are printed to stderr; the exit code is non-zero then.
pub fn main() -> ExitCode {
    let config = match Config::load(std::env::args_os()) {
        Ok(config) => config,
        Err(ConfigError::Args(e)) => e.exit(),
        Err(e) => {
            eprintln!("channelbox: error: {e}");
            return ExitCode::from(2);
        }
    };
    if config.print_config {
        print!("{}", config.to_toml_masked());
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("channelbox: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("channelbox: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves `config`: opens the store, listens, prints `listening on
/// http://ADDR` once connections are accepted, and on SIGINT or SIGTERM
/// closes the sockets with 1001 and flushes the store.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let protocol = config.protocol()?;
    let service = open_service(&config, protocol).await?;
    if let Some(hooks) = config.hooks() {
        service.set_hooks(hooks);
    }
    service.set_namespaces(config.namespaces());
    // One descriptor per connection: take all the system allows.
    let open_files = match channelbox_warp::raise_open_file_limit() {
        Ok(limit) => {
            tracing::info!(limit, "open-file limit raised to the hard limit");
            limit
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot raise the open-file limit");
            1024
        }
    };
    let server = ServerConfig::for_open_files(open_files);
    let listener = channelbox_warp::listen(config.addr, server.backlog)
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    let addr = listener.local_addr()?;
    let signals = install_signal_handlers();
    let running = match config.http {
        Http::Warp => tokio::spawn(channelbox_warp::serve(listener, service.clone(), server)),
        Http::Axum => tokio::spawn(channelbox_axum::serve(listener, service.clone(), server)),
    };
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, store = ?config.store, http = ?config.http, "chat server started");

    shutdown_signal(signals).await;
    tracing::info!("shutting down: closing connections with 1001 and flushing history");
    running.abort();
    service.shutdown(SHUTDOWN_GRACE).await;
    Ok(())
}

/// A service on Redis: one URL (single, Sentinel; Cluster is refused), or
/// several shards. A shard that answers only later and records another
/// shard list stops the process (exit code 2), as it would have at start.
/// Every shard gets the same settings (limits, key TTL, total-bytes check,
/// replicas to wait for).
async fn open_redis(
    config: &Config,
    protocol: ProtocolConfig,
    limits: channelbox_core::HistoryLimits,
) -> anyhow::Result<ChatService> {
    let urls = split_url_list(&config.redis_url);
    let redis = RedisConfig {
        limits,
        meta_ttl: Duration::from_secs(config.history_meta_ttl),
        total_bytes: config.history_total_bytes,
        replicas: config.redis_replicas,
        replica_wait: Duration::from_millis(config.redis_wait_ms),
        ..RedisConfig::new(urls.first().cloned().unwrap_or_default())
    };
    if let [url] = urls.as_slice() {
        let engine = RedisEngine::connect(redis)
            .await
            .with_context(|| format!("cannot use redis at {}", shown(url)))?;
        return Ok(ChatService::clustered(
            engine.store(),
            protocol,
            engine.broker(),
            engine.directory(),
        )?);
    }
    let engine = ShardedEngine::connect(&urls, &redis)
        .await
        .with_context(|| format!("cannot use the redis shards [{}]", engine_names(&urls)))?;
    let service = ChatService::clustered(engine.store(), protocol, engine.broker(), engine.directory())?;
    tokio::spawn(async move {
        let err = engine.failed().await;
        tracing::error!(error = %err, "stopping: a redis shard disagrees");
        eprintln!("error: {err}");
        std::process::exit(2);
    });
    Ok(service)
}

/// A URL as errors show it: without its password.
fn shown(url: &str) -> String {
    RedisAddress::parse(url).map_or_else(|_| url.to_owned(), |a| a.to_string())
}

/// The shards' URLs as errors show them.
fn engine_names(urls: &[String]) -> String {
    urls.iter().map(|u| shown(u)).collect::<Vec<_>>().join(", ")
}

/// The service over the chosen store: a single server, or one of a cluster.
async fn open_service(config: &Config, protocol: ProtocolConfig) -> anyhow::Result<ChatService> {
    let limits = config.history_limits();
    let store: Arc<dyn HistoryStore> = match config.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(MemoryConfig { limits })),
        StoreKind::Redis => return open_redis(config, protocol, limits).await,
        StoreKind::Sled => Arc::new(
            SledStore::open(SledConfig {
                limits,
                ..SledConfig::new(&config.data)
            })
            .with_context(|| format!("cannot open the sled store in {}", config.data.display()))?,
        ),
    };
    Ok(ChatService::new(store, protocol))
}

/// Waits for SIGINT or SIGTERM. The handlers are installed by the caller
/// before the server announces itself, so that a signal sent right after the
/// `listening on` line shuts down cleanly instead of killing the process.
async fn shutdown_signal(signals: Vec<tokio::signal::unix::Signal>) {
    if signals.is_empty() {
        return std::future::pending().await;
    }
    let waits = signals.into_iter().map(|mut s| Box::pin(async move { s.recv().await }));
    futures_util::future::select_all(waits).await;
}

/// SIGINT and SIGTERM handlers (those that could be installed).
fn install_signal_handlers() -> Vec<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    [SignalKind::interrupt(), SignalKind::terminate()]
        .into_iter()
        .filter_map(|kind| signal(kind).ok())
        .collect()
}
