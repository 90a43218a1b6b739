//! Backend hooks against a tiny hook server run by the test (hyper, on
//! 127.0.0.1:0): a hook allows, refuses, transforms; one that does not answer
//! in time or cannot be reached fails closed; a slow hook stalls no other
//! connection; one connection's publishes keep their send order while their
//! hook calls wait.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::{get, http, Client, Server};

/// What the hook server answers to one request: status and body.
type Answer = Pin<Box<dyn Future<Output = (u16, Value)> + Send>>;
type Decide = Arc<dyn Fn(&str, Value) -> Answer + Send + Sync>;

/// A hook server: every request's path and JSON body, in arrival order.
struct Backend {
    url: String,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Backend {
    fn start(decide: impl Fn(&str, Value) -> Answer + Send + Sync + 'static) -> Backend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let decide: Decide = Arc::new(decide);
        let log = seen.clone();
        tokio::spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            while let Ok((stream, _)) = listener.accept().await {
                let (decide, log) = (decide.clone(), log.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (decide, log) = (decide.clone(), log.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        log.lock().expect("log").push((path.clone(), body.clone()));
                        let (status, answer) = decide(&path, body).await;
                        let mut response = hyper::Response::new(Full::new(Bytes::from(answer.to_string())));
                        *response.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Backend { url, seen }
    }

    fn requests(&self, path: &str) -> Vec<Value> {
        let seen = self.seen.lock().expect("log");
        seen.iter().filter(|(p, _)| p == path).map(|(_, b)| b.clone()).collect()
    }
}

fn answer(status: u16, body: Value) -> Answer {
    Box::pin(async move { (status, body) })
}

/// The status and JSON body of a refused upgrade.
async fn refused_upgrade(server: &Server, path: &str) -> (u16, Value) {
    let r = http(&server.addr, "GET", path, &support::UPGRADE, b"").await;
    (r.status, r.json())
}

fn start_with(backend: &Backend, extra: &[&str]) -> Server {
    let join = format!("{}/join", backend.url);
    let publish = format!("{}/publish", backend.url);
    let mut args = vec!["--store", "memory", "--join-hook", &join, "--publish-hook", &publish];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[tokio::test]
async fn the_join_hook_allows_and_refuses_with_its_code_and_message() {
    let backend = Backend::start(|_, body| match body["group"].as_str() {
        Some("secret") => answer(
            200,
            json!({"allow": false, "code": "not_found", "message": "no such room"}),
        ),
        Some("odd") => answer(200, json!({"allow": false, "code": "no-such-code"})),
        _ => answer(200, json!({"allow": true})),
    });
    let server = start_with(&backend, &[]);
    let (mut c, welcome) = Client::join(&server.ws_url("/ws/home")).await;
    let joined = c.request(json!({"type": "join", "group": "open"}), "j1").await;
    assert_eq!(joined["type"], "joined", "{joined}");
    let refused = c.request(json!({"type": "join", "group": "secret"}), "j2").await;
    assert_eq!(
        (refused["code"].as_str(), refused["message"].as_str()),
        (Some("not_found"), Some("no such room"))
    );
    let odd = c.request(json!({"type": "join", "group": "odd"}), "j3").await;
    assert_eq!(odd["code"], "forbidden", "a code the protocol lacks becomes forbidden");
    let asked = backend.requests("/join");
    assert_eq!(asked.len(), 3, "{asked:?}");
    assert_eq!(asked[0], json!({"channel_id": welcome["channel_id"], "group": "open"}));
    assert_eq!(server.metric("channelbox_hook_calls_total{hook=\"join\"}").await, 3.0);
    let groups = get(&server.addr, "/api/groups").await.json();
    assert!(groups.get("secret").is_none(), "a refused join joins nothing: {groups}");
}

#[tokio::test]
async fn the_publish_hook_replaces_data_and_refuses() {
    let backend = Backend::start(|_, body| match body["data"].as_str() {
        Some("no") => answer(200, json!({"allow": false, "message": "not that"})),
        Some(text) if text.contains("darn") => answer(200, json!({"allow": true, "data": "****"})),
        _ => answer(200, json!({"allow": true})),
    });
    let server = start_with(&backend, &[]);
    let (mut c, welcome) = Client::join(&server.ws_url("/ws/room")).await;
    let (_, message) = c.publish(json!({"data": "oh darn"}), "p1").await;
    assert_eq!(message["data"], "****", "the hook's data replaces the published data");
    let (_, message) = c.publish(json!({"data": {"kept": true}}), "p2").await;
    assert_eq!(message["data"], json!({"kept": true}));
    let refused = c.request(json!({"type": "publish", "data": "no"}), "p3").await;
    assert_eq!(
        (refused["code"].as_str(), refused["message"].as_str()),
        (Some("forbidden"), Some("not that"))
    );
    let asked = backend.requests("/publish");
    assert_eq!(
        asked[0],
        json!({"channel_id": welcome["channel_id"], "group": "room", "data": "oh darn"})
    );
    let history = get(&server.addr, "/api/groups/room/history").await.json();
    assert_eq!(
        history["messages"].as_array().map(Vec::len),
        Some(2),
        "the refused one is not saved"
    );
    // A publish from the backend itself (no user token) asks no hook.
    let r = http(&server.addr, "POST", "/api/groups/room/messages", &[], b"\"no\"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(backend.requests("/publish").len(), 3);
}

#[tokio::test]
async fn a_hook_that_does_not_answer_in_time_or_at_all_fails_closed() {
    let backend = Backend::start(|path, _| {
        let answer_later = path == "/join";
        Box::pin(async move {
            if answer_later {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
            // Not 200: a publish hook that answers 500 fails closed too.
            (500, json!({"allow": true}))
        })
    });
    let server = start_with(&backend, &["--hook-timeout", "0.3"]);
    let (mut c, _) = Client::join(&server.ws_url("/ws/room")).await;
    let late = c.request(json!({"type": "join", "group": "other"}), "j").await;
    assert_eq!(late["code"], "unavailable", "{late}");
    let failed = c.request(json!({"type": "publish", "data": 1}), "p").await;
    assert_eq!(failed["code"], "unavailable", "{failed}");
    assert_eq!(
        server.metric("channelbox_hook_failures_total{hook=\"join\"}").await,
        1.0
    );
    assert_eq!(
        server.metric("channelbox_hook_failures_total{hook=\"publish\"}").await,
        1.0
    );

    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let gone = format!("http://127.0.0.1:{port}/join");
    let server = Server::start(&["--store", "memory", "--join-hook", &gone]);
    let (mut c, _) = Client::join(&server.ws_url("/ws/room")).await;
    let unreachable = c.request(json!({"type": "join", "group": "other"}), "j").await;
    assert_eq!(unreachable["code"], "unavailable", "{unreachable}");
}

#[tokio::test]
async fn a_slow_hook_stalls_no_other_connection() {
    // The hook holds the join of `slow` until it has answered the join of
    // `fast`: `slow` is only ever allowed if the other connection's hook call
    // went ahead while this one waited.
    let fast_answered = Arc::new(tokio::sync::Notify::new());
    let signal = fast_answered.clone();
    let backend = Backend::start(move |_, body| {
        let signal = signal.clone();
        Box::pin(async move {
            if body["group"] == "slow" {
                signal.notified().await;
            } else {
                signal.notify_one();
            }
            (200, json!({"allow": true}))
        })
    });
    let server = start_with(&backend, &["--hook-timeout", "30"]);
    let (mut a, _) = Client::join(&server.ws_url("/ws/a")).await;
    let (mut b, _) = Client::join(&server.ws_url("/ws/b")).await;
    a.send(json!({"type": "join", "group": "slow", "ref": "s"})).await;
    while backend.requests("/join").is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let fast = b.request(json!({"type": "join", "group": "fast"}), "f").await;
    assert_eq!(fast["type"], "joined", "{fast}");
    let slow = a.recv_type("joined").await;
    assert_eq!(slow["group"], "slow");
}

#[tokio::test]
async fn publishes_waiting_for_their_hook_keep_their_send_order() {
    // The first publish's hook answers last; the offsets still follow the
    // order the client sent them in.
    let backend = Backend::start(|_, body| {
        let first = body["data"] == 1;
        Box::pin(async move {
            if first {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            (200, json!({"allow": true}))
        })
    });
    let server = start_with(&backend, &[]);
    let (mut c, _) = Client::join(&server.ws_url("/ws/order")).await;
    for n in 1..=3 {
        c.send(json!({"type": "publish", "data": n, "ref": n})).await;
    }
    for n in 1..=3u64 {
        let message = c.recv_type("message").await;
        assert_eq!(
            (message["data"].as_u64(), message["offset"].as_u64()),
            (Some(n), Some(n))
        );
    }
}

#[tokio::test]
async fn the_connect_hook_names_the_user_joins_groups_and_sends_data() {
    let backend = Backend::start(|_, body| match body["group"].as_str() {
        Some("banned") => answer(200, json!({"allow": false, "code": "not_found", "message": "go away"})),
        Some("broken") => answer(502, json!({})),
        _ => answer(
            200,
            json!({"allow": true, "user": "u-42", "groups": ["extra-1", "extra-2"], "data": {"plan": "gold"}}),
        ),
    });
    let hook = format!("{}/connect", backend.url);
    let server = Server::start(&["--store", "memory", "--connect-hook", &hook]);
    let (mut c, welcome) = Client::join(&server.ws_url("/ws/lobby?history=5&x=a%20b&token=hidden")).await;
    assert_eq!(welcome["hook_data"], json!({"plan": "gold"}), "{welcome}");
    let asked = backend.requests("/connect");
    assert_eq!(
        asked[0]["channel_id"], welcome["channel_id"],
        "the hook names the channel it gets"
    );
    assert_eq!(asked[0]["group"], "lobby");
    assert_eq!(
        asked[0]["query"],
        json!({"history": "5", "x": "a b"}),
        "every parameter but the token"
    );
    assert!(
        asked[0]["remote_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{}",
        asked[0]
    );
    let groups = get(&server.addr, "/api/groups").await.json();
    assert_eq!(
        groups,
        json!({"lobby": 1, "extra-1": 1, "extra-2": 1}),
        "joined before welcome"
    );
    let (_, message) = c.publish(json!({"group": "extra-1", "data": "hi"}), "p").await;
    assert_eq!(
        message["user"], "u-42",
        "the hook's user is the channel's user: {message}"
    );

    let (status, body) = refused_upgrade(&server, "/ws/banned").await;
    assert_eq!(
        (status, body["code"].as_str(), body["message"].as_str()),
        (403, Some("not_found"), Some("go away"))
    );
    let (status, body) = refused_upgrade(&server, "/ws/broken").await;
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));
    assert_eq!(
        server.metric("channelbox_hook_failures_total{hook=\"connect\"}").await,
        1.0
    );
}

#[tokio::test]
async fn the_connect_hook_judges_event_streams_as_it_judges_upgrades() {
    let backend = Backend::start(|_, body| match body["group"].as_str() {
        Some("banned") => answer(200, json!({"allow": false, "code": "not_found", "message": "go away"})),
        Some("broken") => answer(502, json!({})),
        _ => answer(
            200,
            json!({"allow": true, "groups": ["extra"], "data": {"plan": "gold"}}),
        ),
    });
    let hook = format!("{}/connect", backend.url);
    let server = Server::start(&["--store", "memory", "--connect-hook", &hook]);
    let mut sse = support::sse::Sse::open(&server.addr, "/sse/lobby?x=1", &[]).await;
    let welcome = sse.event().await.json();
    assert_eq!(welcome["hook_data"], json!({"plan": "gold"}), "{welcome}");
    let asked = backend.requests("/connect");
    assert_eq!(asked[0]["channel_id"], welcome["channel_id"]);
    assert_eq!(
        (asked[0]["group"].as_str(), &asked[0]["query"]),
        (Some("lobby"), &json!({"x": "1"}))
    );
    assert!(
        asked[0]["remote_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{}",
        asked[0]
    );
    let groups = get(&server.addr, "/api/groups").await.json();
    assert_eq!(groups, json!({"lobby": 1, "extra": 1}), "joined before welcome");
    for (path, status, code) in [("/sse/banned", 403, "not_found"), ("/sse/broken", 503, "unavailable")] {
        let r = http(&server.addr, "GET", path, &[], b"").await;
        assert_eq!((r.status, r.json()["code"].as_str()), (status, Some(code)), "{path}");
    }
}
