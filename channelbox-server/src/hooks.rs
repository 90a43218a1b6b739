//! The backend hooks' HTTP client: hyper-util's pooled client, so that the
//! hook calls of every connection reuse a few kept-alive connections to the
//! backend instead of opening one per call. The protocol crate bounds each
//! call by the hook timeout; the client bounds connecting by it as well and
//! reads at most [`MAX_ANSWER_BYTES`] of an answer.

use std::time::Duration;

use bytes::Bytes;
use channelbox_protocol::hooks::{HookFuture, HookTransport};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The largest hook answer read: an answer carries a verdict and perhaps a
/// message's replacement data, which the server limits far below this.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Idle connections kept per backend host, ready for the next calls.
const IDLE_PER_HOST: usize = 64;

/// POSTs hook requests over HTTP/1.1 with connection reuse.
#[derive(Clone, Debug)]
pub struct HttpHooks {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpHooks {
    /// A client whose connection attempts give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(IDLE_PER_HOST)
            .build(connector);
        HttpHooks { client }
    }
}

impl HookTransport for HttpHooks {
    fn post<'a>(&'a self, url: &'a str, body: Vec<u8>) -> HookFuture<'a> {
        Box::pin(async move {
            let request = hyper::Request::post(url)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| format!("bad hook request: {e}"))?;
            let response = self.client.request(request).await.map_err(|e| format!("{e:?}"))?;
            let status = response.status().as_u16();
            let answer = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok((status, answer.to_vec()))
        })
    }
}

/// Checks a hook URL at start-up: `http://host[:port]/path` (the client
/// speaks plain HTTP/1.1; put a TLS proxy in front of a remote backend).
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("{url:?} is not an http:// URL with a host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_urls_are_plain_http_with_a_host() {
        assert!(check_url("http://127.0.0.1:9000/hooks/join").is_ok());
        assert!(check_url("https://backend.example/join").is_err());
        assert!(check_url("/join").is_err());
        assert!(check_url("not a url").is_err());
    }
}
