//! The chat server of the protocol in docs/protocol.md: the flags, a history
//! store (sled in ./channelbox-data by default, `--store memory` for none on
//! disk, `--store redis` for one server of a cluster), and `channelbox_warp::serve` — hyper for every connection, warp for
//! the HTTP routes, tokio-tungstenite for the WebSocket connections.
//!
//! ```sh
//! cargo run --release -p channelbox-warp --example chat -- --addr 127.0.0.1:8080
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use channelbox_core::{HistoryLimits, HistoryStore};
use channelbox_protocol::{ChatService, ProtocolConfig, TokenVerifier};
use channelbox_redis::{split_url_list, RedisConfig, RedisEngine, ShardedEngine};
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use channelbox_store_sled::{SledConfig, SledStore};
use channelbox_warp::ServerConfig;
use clap::{Parser, ValueEnum};
use std::io::Write;

/// mimalloc gives freed memory back to the system: after a burst of 10,000
/// connections the server shrinks again, where glibc's allocator kept it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    Sled,
    Memory,
    /// A cluster: every server with the same `--redis-url` shares groups.
    Redis,
}

/// Which web framework routes the HTTP requests (the protocol is the same).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Http {
    Warp,
    Axum,
}

/// The channelbox chat server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Listen address.
    #[arg(long, env = "CHANNELBOX_ADDR", default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// The web framework of the HTTP routes: channelbox-warp or channelbox-axum.
    #[arg(long, env = "CHANNELBOX_HTTP", value_enum, default_value = "warp")]
    http: Http,
    /// History store.
    #[arg(long, env = "CHANNELBOX_STORE", value_enum, default_value = "sled")]
    store: StoreKind,
    /// sled directory.
    #[arg(long, env = "CHANNELBOX_DATA", default_value = "./channelbox-data")]
    data: PathBuf,
    /// The Redis of a cluster (with `--store redis`): `redis://HOST:PORT/`,
    /// `redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER` or
    /// `redis+cluster://HOST:PORT[,…]`; repeated (the variable is
    /// comma-separated), independent shards.
    #[arg(
        long = "redis-url",
        env = "CHANNELBOX_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    redis_url: Vec<String>,
    /// Replicas that must have a saved message before it is acknowledged
    /// (Redis `WAIT`).
    #[arg(long, env = "CHANNELBOX_REDIS_REPLICAS", default_value_t = 0)]
    redis_replicas: u32,
    /// How long to wait for those replicas, in milliseconds (1-1000).
    #[arg(long, env = "CHANNELBOX_REDIS_WAIT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    redis_wait_ms: u64,
    /// Per-group history limit in payload bytes.
    #[arg(long, env = "CHANNEL_BOX_HISTORY_SIZE", default_value_t = 1_048_576)]
    history_bytes: u64,
    /// All groups' history together, counted as payload bytes plus the
    /// store's fixed overhead per message; the groups written least recently
    /// are trimmed first.
    #[arg(long, default_value_t = channelbox_core::DEFAULT_TOTAL_BYTES)]
    history_total_bytes: u64,
    /// Per-group history limit in messages (default: unlimited).
    #[arg(long)]
    history_messages: Option<u64>,
    /// Seconds a saved message is kept (default: unlimited).
    #[arg(long, value_parser = positive_seconds)]
    history_ttl: Option<Duration>,
    /// Frames a channel may have queued before it counts as a slow consumer.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    queue: u64,
    /// Bytes a channel may have queued before it counts as a slow consumer.
    #[arg(long, default_value_t = 1_048_576, value_parser = clap::value_parser!(u64).range(1..))]
    queue_bytes: u64,
    /// Largest accepted client message.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
    max_message_bytes: u64,
    /// Seconds of inactivity after which a channel is closed (default: never).
    #[arg(long, value_parser = positive_seconds)]
    expiry: Option<Duration>,
    /// Frames per second a connection may send (0: unlimited).
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// Groups one connection may be in at once.
    #[arg(long, default_value_t = 256)]
    max_groups: usize,
    /// Open WebSocket connections the server accepts.
    #[arg(long, default_value_t = 100_000)]
    max_connections: usize,
    /// Enables the admin API with this bearer token.
    #[arg(long, env = "CHANNELBOX_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Requires HS256 tokens signed with this secret (at least 32 bytes).
    #[arg(long, env = "CHANNELBOX_TOKEN_SECRET")]
    token_secret: Option<String>,
    /// Origins allowed to open WebSockets, matched exactly (repeatable; the
    /// variable is comma-separated). Default: any.
    #[arg(long = "allowed-origin", env = "CHANNELBOX_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Seconds between heartbeat pings; 0 turns heartbeats off.
    #[arg(long, default_value_t = 25)]
    ping_interval: u64,
    /// A connection silent for --ping-interval plus this many seconds is
    /// closed with 4003 `no pong`.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pong_timeout: u64,
}

fn positive_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// A service on Redis: one URL (single, Sentinel or Cluster), or several
/// shards. A shard that answers only later and records another shard list
/// stops the process (exit code 2), as it would have at start.
async fn open_redis(args: &Args, config: ProtocolConfig, limits: HistoryLimits) -> anyhow::Result<ChatService> {
    let urls = split_url_list(&args.redis_url);
    let redis = RedisConfig {
        limits,
        replicas: args.redis_replicas,
        replica_wait: Duration::from_millis(args.redis_wait_ms),
        ..RedisConfig::new(urls.first().cloned().unwrap_or_default())
    };
    if urls.len() == 1 {
        let engine = RedisEngine::connect(redis)
            .await
            .with_context(|| format!("cannot use redis at {}", urls[0]))?;
        return Ok(ChatService::clustered(
            engine.store(),
            config,
            engine.broker(),
            engine.directory(),
        )?);
    }
    let engine = ShardedEngine::connect(&urls, &redis)
        .await
        .with_context(|| format!("cannot use the redis shards {urls:?}"))?;
    let service = ChatService::clustered(engine.store(), config, engine.broker(), engine.directory())?;
    tokio::spawn(async move {
        let err = engine.failed().await;
        tracing::error!(error = %err, "stopping: a redis shard disagrees");
        eprintln!("error: {err}");
        std::process::exit(2);
    });
    Ok(service)
}

/// The service over the chosen store: a single server, or one of a cluster.
async fn open_service(args: &Args, config: ProtocolConfig) -> anyhow::Result<ChatService> {
    let limits = HistoryLimits {
        max_bytes: args.history_bytes,
        max_messages: args.history_messages,
        max_age: args.history_ttl,
        max_total_bytes: Some(args.history_total_bytes),
    };
    let store: Arc<dyn HistoryStore> = match args.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(MemoryConfig { limits })),
        StoreKind::Redis => return open_redis(args, config, limits).await,
        StoreKind::Sled => Arc::new(
            SledStore::open(SledConfig {
                limits,
                ..SledConfig::new(&args.data)
            })
            .with_context(|| format!("cannot open the sled store in {}", args.data.display()))?,
        ),
    };
    Ok(ChatService::new(store, config))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tokens = match args.token_secret.as_deref() {
        None => None,
        Some(secret) => Some(TokenVerifier::checked(secret.as_bytes()).context("--token-secret")?),
    };
    let config = ProtocolConfig {
        max_message_bytes: args.max_message_bytes as usize,
        rate_limit: args.rate_limit,
        queue_frames: args.queue as usize,
        queue_bytes: args.queue_bytes as usize,
        expiry: args.expiry,
        max_groups_per_connection: args.max_groups,
        max_connections: args.max_connections,
        tokens,
        admin_token: args.admin_token.clone(),
        allowed_origins: args.allowed_origins.clone(),
        ping_interval: (args.ping_interval > 0).then(|| Duration::from_secs(args.ping_interval)),
        pong_timeout: Duration::from_secs(args.pong_timeout),
    };
    let service = open_service(&args, config).await?;
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
    let listener = channelbox_warp::listen(args.addr, server.backlog)
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let addr = listener.local_addr()?;
    let running = match args.http {
        Http::Warp => tokio::spawn(channelbox_warp::serve(listener, service.clone(), server)),
        Http::Axum => tokio::spawn(channelbox_axum::serve(listener, service.clone(), server)),
    };
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, store = ?args.store, http = ?args.http, "chat server started");

    shutdown_signal().await;
    tracing::info!("shutting down: closing connections with 1001 and flushing history");
    running.abort();
    service.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
