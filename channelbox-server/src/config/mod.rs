//! The server's configuration: every flag, its environment variable, its key
//! in the TOML file of `--config`, and the order in which they win (a flag on
//! the command line, then the environment, then the file, then the default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use channelbox_protocol::hooks::{Hooks, DEFAULT_TIMEOUT as DEFAULT_HOOK_TIMEOUT};
use channelbox_protocol::namespaces::{Namespace, Namespaces};
use channelbox_protocol::{ProtocolConfig, TokenVerifier};
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use serde::{Deserialize, Serialize};

mod file;

/// The listen address when none is configured.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// Seconds without a saved message after which a group's keys leave Redis
/// (`--history-meta-ttl`): 30 days.
pub const DEFAULT_META_TTL_SECS: u64 = 2_592_000;

/// `--redis-wait-ms` by default, the most it takes.
pub const DEFAULT_REDIS_WAIT_MS: u64 = 1000;

fn default_redis_wait_ms() -> u64 {
    DEFAULT_REDIS_WAIT_MS
}

/// `redis_url` in a file: one string (comma-separated, like the variable)
/// or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// What a masked secret prints as in `--print-config`.
const MASK: &str = "********";

/// The history store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// sled in `--data`: durable on one machine.
    Sled,
    /// Nothing on disk: history lives as long as the process.
    Memory,
    /// A cluster: every server with the same `--redis-url` shares groups.
    Redis,
}

/// Which web framework routes the HTTP requests (the protocol is the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Http {
    /// channelbox-warp.
    Warp,
    /// channelbox-axum.
    Axum,
}

/// Whether WebSocket connections may be compressed (permessage-deflate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Negotiated with every client that offers it.
    On,
    /// Never negotiated: every frame goes out plain.
    Off,
}

/// The protocol's defaults, the one source of the flags' default values.
fn defaults() -> ProtocolConfig {
    ProtocolConfig::default()
}

/// The configuration of the channelbox server. Each field is a flag
/// (`--history-bytes`), a key of the configuration file (`history_bytes`),
/// and for some an environment variable (named on the field's flag).
#[derive(Clone, Debug, Parser, Serialize, Deserialize)]
#[command(name = "channelbox", version, about = "The channelbox chat server.")]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A TOML configuration file: every flag is a key, named without the
    /// dashes and with `_` for `-`.
    #[arg(long, env = "CHANNELBOX_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Prints the effective configuration (secrets masked) and exits.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Listen address.
    #[arg(long, env = "CHANNELBOX_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// The web framework of the HTTP routes: channelbox-warp or channelbox-axum.
    #[arg(long, env = "CHANNELBOX_HTTP", value_enum, default_value = "warp")]
    pub http: Http,
    /// History store.
    #[arg(long, env = "CHANNELBOX_STORE", value_enum, default_value = "sled")]
    pub store: StoreKind,
    /// sled directory.
    #[arg(long, env = "CHANNELBOX_DATA", default_value = "./channelbox-data")]
    pub data: PathBuf,
    /// The Redis of a cluster (with `--store redis`): `redis://HOST:PORT/`,
    /// `redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER` or
    /// `redis+cluster://…` (refused). Repeated: shards; the variable (or a
    /// file's string) is comma-separated, a part without `://` continuing.
    #[arg(
        long,
        env = "CHANNELBOX_REDIS_URL",
        value_delimiter = ',',
        default_value = "redis://127.0.0.1:6379/"
    )]
    #[serde(default, deserialize_with = "one_or_many")]
    pub redis_url: Vec<String>,
    /// With `--store redis`: replicas that must have a saved message before
    /// it is acknowledged (Redis `WAIT`); 0 waits for none.
    #[arg(long, env = "CHANNELBOX_REDIS_REPLICAS", default_value_t = 0)]
    #[serde(default)]
    pub redis_replicas: u32,
    /// How long to wait for those replicas, in milliseconds (1-1000).
    #[arg(long, env = "CHANNELBOX_REDIS_WAIT_MS", default_value_t = DEFAULT_REDIS_WAIT_MS,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    #[serde(default = "default_redis_wait_ms")]
    pub redis_wait_ms: u64,
    /// Per-group history limit in payload bytes.
    #[arg(long, env = channelbox_core::HISTORY_SIZE_ENV, default_value_t = channelbox_core::DEFAULT_HISTORY_BYTES)]
    pub history_bytes: u64,
    /// All groups' history together, counted as payload bytes plus the
    /// store's fixed overhead per message; the groups written least recently
    /// are trimmed first [default: 268435456]. With `--store redis`, Redis
    /// applies it: given explicitly, the server refuses to start unless
    /// Redis's `maxmemory` is set and its `maxmemory-policy` evicts
    /// (`allkeys-lru`, `allkeys-lfu`, `volatile-lru`, `volatile-lfu`).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_total_bytes: Option<u64>,
    /// With `--store redis`: seconds without a saved message after which a
    /// group's history and epoch are removed from Redis.
    #[arg(long, default_value_t = DEFAULT_META_TTL_SECS, value_parser = clap::value_parser!(u64).range(1..))]
    pub history_meta_ttl: u64,
    /// Per-group history limit in messages, at least 1 (default: unlimited).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_messages: Option<u64>,
    /// Seconds a saved message is kept (default: unlimited).
    #[arg(long, value_parser = positive_seconds)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_ttl: Option<f64>,
    /// Frames a channel may have queued before it counts as a slow consumer.
    #[arg(long, default_value_t = defaults().queue_frames as u64)]
    pub queue: u64,
    /// Bytes a channel may have queued before it counts as a slow consumer.
    #[arg(long, default_value_t = defaults().queue_bytes as u64)]
    pub queue_bytes: u64,
    /// Largest accepted client message.
    #[arg(long, default_value_t = defaults().max_message_bytes as u64)]
    pub max_message_bytes: u64,
    /// Seconds of inactivity after which a channel is closed (default: never).
    #[arg(long, value_parser = positive_seconds)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<f64>,
    /// Frames per second a connection may send (0: unlimited).
    #[arg(long, default_value_t = defaults().rate_limit)]
    pub rate_limit: u32,
    /// Groups one connection may be in at once.
    #[arg(long, default_value_t = defaults().max_groups_per_connection)]
    pub max_groups: usize,
    /// Open connections (WebSockets and event streams) the server accepts.
    #[arg(long, default_value_t = defaults().max_connections)]
    pub max_connections: usize,
    /// Enables the admin API (and the admin page) with this bearer token.
    #[arg(long, env = "CHANNELBOX_ADMIN_TOKEN")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Requires HS256 tokens signed with this secret (at least 32 bytes).
    #[arg(long, env = "CHANNELBOX_TOKEN_SECRET")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
    /// Origins allowed to open WebSockets and event streams, matched exactly (repeatable; the
    /// variable is comma-separated). Default: any.
    #[arg(long, env = "CHANNELBOX_ALLOWED_ORIGINS", value_delimiter = ',')]
    #[serde(default)]
    pub allowed_origin: Vec<String>,
    /// Seconds between heartbeat pings; 0 turns heartbeats off.
    #[arg(long, default_value_t = defaults().ping_interval.map_or(0, |d| d.as_secs()))]
    pub ping_interval: u64,
    /// A connection silent for --ping-interval plus this many seconds is
    /// closed with 4003 `no pong`.
    #[arg(long, default_value_t = defaults().pong_timeout.as_secs())]
    pub pong_timeout: u64,
    /// The backend's connect hook: POSTed before a WebSocket upgrade is
    /// answered (an http:// URL; default: none).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_hook: Option<String>,
    /// The backend's join hook: POSTed before a `join` is answered
    /// (an http:// URL; default: none).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_hook: Option<String>,
    /// The backend's publish hook: POSTed before a publish is accepted
    /// (an http:// URL; default: none).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_hook: Option<String>,
    /// `[namespaces.NAME]` tables of the configuration file: the options of
    /// groups named `NAME:…` (file only, no flag).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, Namespace>,
    /// Seconds a backend hook may take; then it fails closed.
    #[arg(long, value_parser = positive_seconds, default_value_t = DEFAULT_HOOK_TIMEOUT.as_secs_f64())]
    pub hook_timeout: f64,
    /// permessage-deflate for the WebSocket clients that offer it: each
    /// message compressed once for all its receivers (`on` or `off`).
    #[arg(long, env = "CHANNELBOX_COMPRESSION", value_enum, default_value = "on")]
    #[serde(default = "compression_on")]
    pub compression: Compression,
}

fn compression_on() -> Compression {
    Compression::On
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        // Finite is not enough: each value becomes a `Duration`, which
        // panics on more seconds than it holds.
        Ok(v) if v > 0.0 && Duration::try_from_secs_f64(v).is_ok() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad flag or environment variable (clap prints it with the usage).
    #[error(transparent)]
    Args(#[from] clap::Error),
    /// The configuration file cannot be read or is not TOML.
    #[error("configuration file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A key of the file that is no option.
    #[error("configuration file {path}: unknown key `{key}`")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A key whose value has the wrong type or is out of range.
    #[error("configuration key `{key}`: {message}")]
    Value {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads the configuration from these arguments (the program name
    /// first), the environment and the file named by `--config`.
    pub fn load<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Config::command().try_get_matches_from(args)?;
        let given = Config::from_arg_matches(&matches)?;
        let config = match given.config.clone() {
            None => given,
            Some(path) => given.with_file(&matches, &path)?,
        };
        config.check()?;
        Ok(config)
    }

    /// The range checks the flags' parsers make, again for values read
    /// from the file.
    fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            ("queue", self.queue),
            ("queue_bytes", self.queue_bytes),
            ("max_message_bytes", self.max_message_bytes),
            ("pong_timeout", self.pong_timeout),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(value_error(key, "must be at least 1"));
        }
        // As in a namespace: a limit of no message would be no history.
        if self.history_messages == Some(0) {
            return Err(value_error("history_messages", "must be at least 1"));
        }
        if !(1..=DEFAULT_REDIS_WAIT_MS).contains(&self.redis_wait_ms) {
            return Err(value_error("redis_wait_ms", "must be 1 to 1000"));
        }
        let hooks = [
            ("connect_hook", &self.connect_hook),
            ("join_hook", &self.join_hook),
            ("publish_hook", &self.publish_hook),
        ];
        for (key, url) in hooks {
            if let Some(url) = url {
                crate::hooks::check_url(url).map_err(|e| value_error(key, &e))?;
            }
        }
        for (name, namespace) in &self.namespaces {
            for (option, url) in [
                ("join_hook", &namespace.join_hook),
                ("publish_hook", &namespace.publish_hook),
            ] {
                if let Some(url) = url.as_deref().filter(|u| !u.is_empty()) {
                    let key = format!("namespaces.{name}.{option}");
                    crate::hooks::check_url(url).map_err(|e| value_error(&key, &e))?;
                }
            }
        }
        let seconds = [
            ("history_ttl", self.history_ttl),
            ("expiry", self.expiry),
            ("hook_timeout", Some(self.hook_timeout)),
        ];
        for (key, seconds) in seconds {
            if let Some(s) = seconds {
                positive_seconds(&s.to_string()).map_err(|e| value_error(key, &e))?;
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, with the secrets masked: what
    /// `--print-config` prints.
    pub fn to_toml_masked(&self) -> String {
        let mut shown = self.clone();
        for secret in [&mut shown.admin_token, &mut shown.token_secret] {
            if secret.is_some() {
                *secret = Some(MASK.to_owned());
            }
        }
        // Each namespace's history limits in effect: what it leaves unset
        // is the top-level's.
        for ns in shown.namespaces.values_mut() {
            ns.history_bytes = ns.history_bytes.or(Some(self.history_bytes));
            ns.history_messages = ns.history_messages.or(self.history_messages);
            ns.history_ttl = ns.history_ttl.or(self.history_ttl);
        }
        shown.redis_url = channelbox_redis::split_url_list(&shown.redis_url)
            .iter()
            .map(|u| mask_url_password(u))
            .collect();
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    /// The protocol's part of the configuration.
    pub fn protocol(&self) -> anyhow::Result<ProtocolConfig> {
        use anyhow::Context;
        let tokens = match self.token_secret.as_deref() {
            None => None,
            Some(secret) => Some(TokenVerifier::checked(secret.as_bytes()).context("--token-secret")?),
        };
        Ok(ProtocolConfig {
            max_message_bytes: usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX),
            rate_limit: self.rate_limit,
            queue_frames: usize::try_from(self.queue).unwrap_or(usize::MAX),
            queue_bytes: usize::try_from(self.queue_bytes).unwrap_or(usize::MAX),
            expiry: self.expiry.map(Duration::from_secs_f64),
            max_groups_per_connection: self.max_groups,
            max_connections: self.max_connections,
            tokens,
            admin_token: self.admin_token.clone(),
            allowed_origins: self.allowed_origin.clone(),
            ping_interval: (self.ping_interval > 0).then(|| Duration::from_secs(self.ping_interval)),
            pong_timeout: Duration::from_secs(self.pong_timeout),
            compression: self.compression == Compression::On,
        })
    }

    /// The backend hooks over HTTP, when any is configured (at the top
    /// level or in a namespace).
    pub fn hooks(&self) -> Option<Hooks> {
        let in_namespaces = self
            .namespaces
            .values()
            .any(|n| n.join_hook.is_some() || n.publish_hook.is_some());
        let top = self.connect_hook.is_some() || self.join_hook.is_some() || self.publish_hook.is_some();
        if !top && !in_namespaces {
            return None;
        }
        let timeout = Duration::from_secs_f64(self.hook_timeout);
        let mut hooks = Hooks::new(std::sync::Arc::new(crate::hooks::HttpHooks::new(timeout)));
        hooks.connect = self.connect_hook.clone();
        hooks.join = self.join_hook.clone();
        hooks.publish = self.publish_hook.clone();
        hooks.timeout = timeout;
        Some(hooks)
    }

    /// The history limits of every group: the top-level ones, and those of
    /// each namespace that sets any (what it leaves unset is the top-level's).
    pub fn history_limits(&self) -> channelbox_core::HistoryLimits {
        let top = channelbox_core::HistoryLimits {
            max_bytes: self.history_bytes,
            max_messages: self.history_messages,
            max_age: self.history_ttl.map(Duration::from_secs_f64),
            max_total_bytes: Some(self.history_total_bytes.unwrap_or(channelbox_core::DEFAULT_TOTAL_BYTES)),
            namespaces: BTreeMap::new(),
        };
        self.namespaces().with_history_limits(top)
    }

    /// The configured namespaces.
    pub fn namespaces(&self) -> Namespaces {
        Namespaces::new(self.namespaces.clone())
    }
}

fn value_error(key: &str, message: &str) -> ConfigError {
    ConfigError::Value {
        key: key.to_owned(),
        message: message.to_owned(),
    }
}

/// `redis://user:secret@host/` → `redis://user:********@host/`.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{MASK}@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_protocols() {
        let config = Config::try_parse_from(["channelbox"]).expect("defaults parse");
        let protocol = config.protocol().expect("defaults are valid");
        let expected = ProtocolConfig::default();
        assert_eq!(protocol.queue_frames, expected.queue_frames);
        assert_eq!(protocol.queue_bytes, expected.queue_bytes);
        assert_eq!(protocol.max_message_bytes, expected.max_message_bytes);
        assert_eq!(protocol.ping_interval, expected.ping_interval);
        assert_eq!(protocol.pong_timeout, expected.pong_timeout);
        assert_eq!(protocol.compression, expected.compression);
        let off = Config::try_parse_from(["channelbox", "--compression", "off"]).expect("parses");
        assert!(!off.protocol().expect("valid").compression);
    }

    #[test]
    fn passwords_in_urls_are_masked() {
        assert_eq!(
            mask_url_password("redis://u:hunter2@h:6379/"),
            "redis://u:********@h:6379/"
        );
        assert_eq!(mask_url_password("redis://h:6379/"), "redis://h:6379/");
    }
}
