//! The forms `--redis-url` takes, parsed into a [`RedisAddress`] with a typed
//! [`UrlError`] for anything else:
//!
//! - `redis://HOST:PORT/` (optionally `redis://[user:password@]HOST:PORT/DB`):
//!   one Redis;
//! - `redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER_NAME`: the master that
//!   these sentinels name, followed across failovers;
//! - `redis+cluster://HOST:PORT[,HOST:PORT…]`: a Redis Cluster, reached
//!   through any of these seed nodes.
//!
//! A shard is identified by [`RedisAddress::shard_name`], its address as
//! written (`host:port`, or the Sentinel master name), which is what every
//! server of a sharded cluster compares.

use std::fmt;

/// Where Redis is, as one `--redis-url` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisAddress {
    /// One Redis process.
    Single {
        /// The URL as given (redis-rs parses credentials and the database).
        url: String,
        /// `host:port`, as written.
        host_port: String,
    },
    /// A master found and followed through Sentinel.
    Sentinel {
        /// The sentinels, `(host, port)`, in the order written.
        sentinels: Vec<(String, u16)>,
        /// The master's name as the sentinels know it.
        master: String,
    },
    /// A Redis Cluster, through these seed nodes.
    Cluster {
        /// The seed nodes, `(host, port)`, in the order written.
        nodes: Vec<(String, u16)>,
    },
}

/// Why a `--redis-url` was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UrlError {
    /// The scheme is none of `redis`, `redis+sentinel`, `redis+cluster`.
    Scheme(String),
    /// No `host:port` after the scheme.
    NoHost,
    /// A `host:port` whose host is empty or whose port is not 1..=65535.
    HostPort(String),
    /// A Sentinel URL without `/MASTER_NAME`.
    NoMaster,
    /// A part this form does not take (credentials or a path where none
    /// belongs, several hosts in a plain URL).
    Unexpected(&'static str),
    /// redis-rs refused the plain URL.
    Invalid(String),
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::Scheme(s) => write!(
                f,
                "unknown scheme {s:?}: use redis://, redis+sentinel:// or redis+cluster://"
            ),
            UrlError::NoHost => write!(f, "no HOST:PORT after the scheme"),
            UrlError::HostPort(s) => write!(f, "{s:?} is not HOST:PORT (a port 1-65535)"),
            UrlError::NoMaster => write!(f, "a Sentinel URL ends with /MASTER_NAME"),
            UrlError::Unexpected(what) => write!(f, "{what}"),
            UrlError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UrlError {}

impl RedisAddress {
    /// Parses one `--redis-url`.
    pub fn parse(url: &str) -> Result<RedisAddress, UrlError> {
        let url = url.trim();
        let (scheme, rest) = url.split_once("://").ok_or_else(|| UrlError::Scheme(url.to_owned()))?;
        match scheme {
            "redis" => parse_single(url, rest),
            "redis+sentinel" => {
                let (hosts, master) = rest.split_once('/').ok_or(UrlError::NoMaster)?;
                let master = master.trim_end_matches('/');
                if master.is_empty() {
                    return Err(UrlError::NoMaster);
                }
                if master.contains('/') {
                    return Err(UrlError::Unexpected(
                        "a Sentinel URL has one path part, the master name",
                    ));
                }
                Ok(RedisAddress::Sentinel {
                    sentinels: host_list(hosts)?,
                    master: master.to_owned(),
                })
            }
            "redis+cluster" => {
                let hosts = rest.strip_suffix('/').unwrap_or(rest);
                if hosts.contains('/') {
                    return Err(UrlError::Unexpected("a Cluster URL has no path"));
                }
                Ok(RedisAddress::Cluster {
                    nodes: host_list(hosts)?,
                })
            }
            other => Err(UrlError::Scheme(other.to_owned())),
        }
    }

    /// The shard's name: `host:port` of a single Redis, the master name of a
    /// Sentinel one, the seed list of a Cluster.
    pub fn shard_name(&self) -> String {
        match self {
            RedisAddress::Single { host_port, .. } => host_port.clone(),
            RedisAddress::Sentinel { master, .. } => master.clone(),
            RedisAddress::Cluster { nodes } => join(nodes),
        }
    }
}

impl fmt::Display for RedisAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisAddress::Single { host_port, .. } => write!(f, "redis://{host_port}/"),
            RedisAddress::Sentinel { sentinels, master } => {
                write!(f, "redis+sentinel://{}/{master}", join(sentinels))
            }
            RedisAddress::Cluster { nodes } => write!(f, "redis+cluster://{}", join(nodes)),
        }
    }
}

/// The URLs of `--redis-url` flags, each of which may hold several URLs
/// separated by commas (`CHANNELBOX_REDIS_URL=redis://a:1/,redis://b:2/`).
/// A part without `://` continues the URL before it: the `HOST:PORT` list of
/// a Sentinel or Cluster URL has commas of its own. Empty parts are skipped.
pub fn split_url_list<S: AsRef<str>>(given: &[S]) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for part in given.iter().flat_map(|g| g.as_ref().split(',')) {
        let part = part.trim();
        match urls.last_mut() {
            _ if part.is_empty() => {}
            Some(last) if !part.contains("://") => {
                last.push(',');
                last.push_str(part);
            }
            _ => urls.push(part.to_owned()),
        }
    }
    urls
}

fn join(hosts: &[(String, u16)]) -> String {
    hosts
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_single(url: &str, rest: &str) -> Result<RedisAddress, UrlError> {
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    if host_port.is_empty() {
        return Err(UrlError::NoHost);
    }
    if host_port.contains(',') {
        return Err(UrlError::Unexpected(
            "several hosts need redis+sentinel:// or redis+cluster://, or --redis-url once per shard",
        ));
    }
    let (host, port) = host_port_of(host_port)?;
    redis::Client::open(url).map_err(|e| UrlError::Invalid(e.to_string()))?;
    Ok(RedisAddress::Single {
        url: url.to_owned(),
        host_port: format!("{host}:{port}"),
    })
}

fn host_list(hosts: &str) -> Result<Vec<(String, u16)>, UrlError> {
    if hosts.contains('@') {
        return Err(UrlError::Unexpected("credentials are not taken in this URL form"));
    }
    if hosts.is_empty() {
        return Err(UrlError::NoHost);
    }
    hosts.split(',').map(host_port_of).collect()
}

/// `host:port`; the port is required, a bracketed IPv6 host is allowed.
fn host_port_of(s: &str) -> Result<(String, u16), UrlError> {
    let bad = || UrlError::HostPort(s.to_owned());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_owned(), p)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[(&str, u16)]) -> Vec<(String, u16)> {
        list.iter().map(|(h, p)| ((*h).to_owned(), *p)).collect()
    }

    #[test]
    fn the_three_forms_parse() {
        assert_eq!(
            RedisAddress::parse("redis://127.0.0.1:6379/"),
            Ok(RedisAddress::Single {
                url: "redis://127.0.0.1:6379/".into(),
                host_port: "127.0.0.1:6379".into()
            })
        );
        assert_eq!(
            RedisAddress::parse("redis+sentinel://a:26379,b:26380/mymaster"),
            Ok(RedisAddress::Sentinel {
                sentinels: hosts(&[("a", 26379), ("b", 26380)]),
                master: "mymaster".into()
            })
        );
        assert_eq!(
            RedisAddress::parse("redis+cluster://n1:7000,n2:7001"),
            Ok(RedisAddress::Cluster {
                nodes: hosts(&[("n1", 7000), ("n2", 7001)])
            })
        );
    }

    #[test]
    fn shard_names_are_the_addresses_as_written() {
        let single = RedisAddress::parse("redis://:pw@h:7/2").expect("single");
        assert_eq!(single.shard_name(), "h:7");
        let sentinel = RedisAddress::parse("redis+sentinel://a:1/m1").expect("sentinel");
        assert_eq!(sentinel.shard_name(), "m1");
        assert_eq!(sentinel.to_string(), "redis+sentinel://a:1/m1");
    }

    #[test]
    fn url_lists_split_between_urls_only() {
        assert_eq!(
            split_url_list(&["redis://a:1/,redis+sentinel://s:1,s:2/m, redis://b:2/"]),
            vec!["redis://a:1/", "redis+sentinel://s:1,s:2/m", "redis://b:2/"]
        );
        assert_eq!(
            split_url_list(&["redis+cluster://n:1,n:2", "redis://c:3/"]),
            vec!["redis+cluster://n:1,n:2", "redis://c:3/"]
        );
        assert_eq!(split_url_list(&[",,"]), Vec::<String>::new());
    }

    #[test]
    fn bad_urls_get_typed_errors() {
        let cases: &[(&str, UrlError)] = &[
            ("http://h:1/", UrlError::Scheme("http".into())),
            ("h:1", UrlError::Scheme("h:1".into())),
            ("redis:///", UrlError::NoHost),
            ("redis://h/", UrlError::HostPort("h".into())),
            ("redis://h:0/", UrlError::HostPort("h:0".into())),
            ("redis://h:99999/", UrlError::HostPort("h:99999".into())),
            ("redis+sentinel://a:1", UrlError::NoMaster),
            ("redis+sentinel://a:1/", UrlError::NoMaster),
            ("redis+sentinel:///m", UrlError::NoHost),
            ("redis+sentinel://a:1,b/m", UrlError::HostPort("b".into())),
            ("redis+cluster://", UrlError::NoHost),
            ("redis+cluster://a:1,:2", UrlError::HostPort(":2".into())),
        ];
        for (url, want) in cases {
            assert_eq!(RedisAddress::parse(url).as_ref(), Err(want), "{url}");
        }
        assert!(matches!(
            RedisAddress::parse("redis://a:1,b:2/"),
            Err(UrlError::Unexpected(_))
        ));
        assert!(matches!(
            RedisAddress::parse("redis+cluster://a:1/x"),
            Err(UrlError::Unexpected(_))
        ));
        assert!(matches!(
            RedisAddress::parse("redis+sentinel://u:p@a:1/m"),
            Err(UrlError::Unexpected(_))
        ));
    }
}
