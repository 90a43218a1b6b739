//! The Rust client against the faults it cannot see coming: a group where
//! nothing arrived yet is recovered after a reconnect (from the `joined` and
//! `welcome` positions); a half-open connection (a proxy that stops
//! forwarding without closing) and a handshake that never completes are given
//! up and replaced; a server that closes at once (4002) or refuses a rejoin is
//! not reconnected to every few milliseconds; refused rejoins and every
//! publish's outcome are reported by ref; a group left — the URL group too,
//! or one left before its join was answered — is not rejoined after a
//! reconnect, and nothing of it is delivered.

mod faults;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use channelbox_ws::client::{ChatClient, ClientConfig, Event};
use faults::{fake, gaps, Act, Proxy};
use serde_json::{json, Value};
use support::Server;

fn config(addr: &str) -> ClientConfig {
    let mut config = ClientConfig::new(format!("ws://{addr}"), "home");
    config.min_backoff = Duration::from_millis(20);
    config.max_backoff = Duration::from_millis(320);
    config
}

/// Events until one matches `done` (included); panics after 15 s.
async fn events_until(client: &mut ChatClient, mut done: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(15), client.next_event())
            .await
            .unwrap_or_else(|_| panic!("no such event; saw {seen:#?}"))
            .expect("the client runs");
        let last = done(&event);
        seen.push(event);
        if last {
            return seen;
        }
    }
}

async fn post(addr: &str, group: &str, data: Value) {
    let path = format!("/api/groups/{group}/messages");
    let headers = [("Content-Type", "application/json")];
    let r = support::http(addr, "POST", &path, &headers, data.to_string().as_bytes()).await;
    assert_eq!(r.status, 200);
}

async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn every_group_is_recovered_even_where_nothing_arrived() {
    let server = Server::memory();
    let (proxy, addr) = Proxy::start(server.addr.clone()).await;
    let mut client = ChatClient::connect(config(&addr)).await.unwrap();
    let joined = client.join("side").await.unwrap();
    assert_eq!((joined["offset"].as_u64(), joined["ref"].is_u64()), (Some(0), true));
    proxy.cut();
    events_until(&mut client, |e| matches!(e, Event::Disconnected { .. })).await;
    // Published while the client is away: it never saw anything in either group.
    post(&server.addr, "side", json!(1)).await;
    post(&server.addr, "side", json!(2)).await;
    post(&server.addr, "home", json!(3)).await;
    proxy.open();
    let mut recovered = 0;
    let events = events_until(&mut client, |e| {
        recovered += usize::from(matches!(e, Event::Recovered { .. }));
        recovered == 2
    })
    .await;
    let mut got: Vec<(String, Option<u64>)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message {
                group, offset, epoch, ..
            } if epoch.is_some() => Some((group.clone(), *offset)),
            _ => None,
        })
        .collect();
    got.sort();
    let want = [("home", 1), ("side", 1), ("side", 2)].map(|(g, o)| (g.to_owned(), Some(o)));
    assert_eq!(got, want, "{events:#?}");
    for (group, to) in [("home", 1), ("side", 2)] {
        let want = Event::Recovered {
            group: group.into(),
            from: 0,
            to,
            complete: true,
        };
        assert!(events.contains(&want), "{group} recovered: {events:#?}");
    }
}

#[tokio::test]
async fn a_half_open_connection_is_found_dead_and_replaced() {
    let server = Server::memory();
    let (proxy, addr) = Proxy::start(server.addr.clone()).await;
    let mut config = config(&addr);
    config.ping_interval = Duration::from_millis(200);
    config.pong_timeout = Duration::from_millis(300);
    let mut client = ChatClient::connect(config).await.unwrap();
    proxy.freeze();
    post(&server.addr, "home", json!("while frozen")).await;
    events_until(
        &mut client,
        |e| matches!(e, Event::Disconnected { reason, .. } if reason == "no pong"),
    )
    .await;
    let events = events_until(&mut client, |e| matches!(e, Event::Recovered { .. })).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Message { offset: Some(1), .. })),
        "{events:#?}"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Recovered { complete: true, .. })));
}

#[tokio::test]
async fn a_handshake_that_never_completes_times_out() {
    let server = Server::memory();
    let (proxy, addr) = Proxy::start(server.addr.clone()).await;
    proxy.blackhole();
    let mut config = config(&addr);
    config.connect_timeout = Duration::from_millis(300);
    let connecting = tokio::spawn(ChatClient::connect(config));
    let p = proxy.clone();
    wait_until("a second attempt", move || p.accepted() >= 2).await;
    proxy.open();
    let client = tokio::time::timeout(Duration::from_secs(15), connecting).await;
    assert!(matches!(client, Ok(Ok(Ok(_)))), "connected once the proxy forwards");
}

#[tokio::test]
async fn a_server_closing_every_connection_at_once_is_not_hammered() {
    let (addr, conns) = fake(|_| vec![Act::Close(4002)], |_, _| Vec::new()).await;
    let mut client = ChatClient::connect(config(&addr)).await.unwrap();
    let events = events_until(&mut client, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(events.contains(&Event::Disconnected {
        code: Some(4002),
        reason: "scripted".into()
    }));
    let c = conns.clone();
    wait_until("eight connections", move || c.lock().unwrap().len() >= 8).await;
    // The ceiling doubles from 20 ms to 320 ms; each wait is at least three
    // quarters of it.
    let g = gaps(&conns);
    assert!(
        g[5..].iter().all(|g| *g >= Duration::from_millis(200)),
        "the backoff keeps growing: {g:?}"
    );
}

#[tokio::test]
async fn refused_rejoins_are_reported_and_back_off() {
    let refusals = ["unavailable", "unavailable", "unavailable", "unavailable", "forbidden"];
    let (addr, conns) = fake(
        |_| Vec::new(),
        move |n, f| {
            if f["type"] != "join" {
                return Vec::new();
            }
            let reference = f["ref"].clone();
            match n {
                // The first connection drops once the join is answered.
                1 => vec![
                    Act::Send(
                        json!({"type": "joined", "group": f["group"], "epoch": "s1", "offset": 7, "ref": reference}),
                    ),
                    Act::Close(1001),
                ],
                _ => vec![Act::Send(
                    json!({"type": "error", "code": refusals[n - 2], "message": "no", "ref": reference}),
                )],
            }
        },
    )
    .await;
    let mut client = ChatClient::connect(config(&addr)).await.unwrap();
    client.join("side").await.unwrap();
    let mut failed = Vec::new();
    events_until(&mut client, |e| {
        if let Event::RejoinFailed {
            group, code, retrying, ..
        } = e
        {
            failed.push((group.clone(), code.clone(), *retrying));
        }
        failed.len() == refusals.len()
    })
    .await;
    let want: Vec<_> = refusals
        .iter()
        .map(|c| ("side".to_owned(), (*c).to_owned(), *c == "unavailable"))
        .collect();
    assert_eq!(failed, want);
    for conn in conns.lock().unwrap().iter().skip(1) {
        let rejoin = conn.frames.iter().find(|f| f["type"] == "join").expect("a rejoin");
        assert!(rejoin["ref"].is_u64(), "a rejoin carries a ref: {rejoin}");
        assert_eq!(
            (&rejoin["since"], &rejoin["epoch"]),
            (&json!(7), &json!("s1")),
            "from the joined position"
        );
    }
    // Waits of 20, 40, 80, 160 ms (±25%) between the connections: the
    // backoff did not start over on each welcome.
    let g = gaps(&conns);
    assert!(
        g[3] >= Duration::from_millis(110),
        "an unavailable rejoin backs off more each time: {g:?}"
    );
    // Forbidden dropped the group and kept the connection.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(conns.lock().unwrap().len(), refusals.len() + 1);
    let events = events_until(&mut client, |_| true);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), events).await.is_err(),
        "nothing more happened"
    );
}

#[tokio::test]
async fn every_publish_outcome_is_reported_by_its_ref() {
    let publishes = Arc::new(AtomicUsize::new(0));
    let (addr, _conns) = fake(
        |_| Vec::new(),
        move |_, f| {
            if f["type"] != "publish" {
                return Vec::new();
            }
            let reference = f["ref"].clone();
            match publishes.fetch_add(1, Ordering::SeqCst) {
                0 => vec![Act::Send(
                    json!({"type": "published", "group": "home", "offset": 1, "epoch": "e1", "ref": reference}),
                )],
                1 => vec![Act::Send(
                    json!({"type": "error", "code": "unavailable", "message": "disk full", "ref": reference}),
                )],
                _ => vec![Act::Close(1011)],
            }
        },
    )
    .await;
    let mut client = ChatClient::connect(config(&addr)).await.unwrap();
    let refs = [
        client.start_publish("home", json!(1)).await.unwrap(),
        client.start_publish("home", json!(2)).await.unwrap(),
        client.start_publish("home", json!(3)).await.unwrap(),
    ];
    assert!(refs[0] < refs[1] && refs[1] < refs[2], "{refs:?}");
    let events = events_until(&mut client, |e| matches!(e, Event::Disconnected { .. })).await;
    let outcomes: Vec<&Event> = events
        .iter()
        .filter(|e| !matches!(e, Event::Connected { .. }))
        .collect();
    let want = [
        Event::Published {
            reference: refs[0],
            group: "home".into(),
            offset: Some(1),
            epoch: Some("e1".into()),
        },
        Event::PublishRefused {
            reference: refs[1],
            group: "home".into(),
            code: "unavailable".into(),
            message: "disk full".into(),
        },
        Event::PublishUnanswered {
            reference: refs[2],
            group: "home".into(),
        },
        Event::Disconnected {
            code: Some(1011),
            reason: "scripted".into(),
        },
    ];
    assert_eq!(outcomes, want.iter().collect::<Vec<_>>());
}

#[tokio::test]
async fn the_backoff_starts_over_once_a_connection_stayed_up() {
    let (addr, conns) = fake(
        |n| match n {
            // The sixth connection stays up 400 ms, the others close at once.
            6 => vec![Act::Wait(Duration::from_millis(400)), Act::Close(4003)],
            _ => vec![Act::Close(4003)],
        },
        |_, _| Vec::new(),
    )
    .await;
    let mut config = config(&addr);
    config.max_backoff = Duration::from_secs(5);
    config.stable_after = Duration::from_millis(200);
    let _client = ChatClient::connect(config).await.unwrap();
    let c = conns.clone();
    wait_until("seven connections", move || c.lock().unwrap().len() >= 7).await;
    let g = gaps(&conns);
    // The waits grew to 20·2⁴ = 320 ms (±25%) before the sixth connection;
    // after it, which stayed up, the wait is the first again (20 ms) instead
    // of 640 ms: the seventh comes less than 400 ms after the sixth closed.
    assert!(g[4] >= Duration::from_millis(240), "{g:?}");
    assert!(
        g[5] < Duration::from_millis(800),
        "reset after a stable connection: {g:?}"
    );
}

#[tokio::test]
async fn groups_left_are_neither_rejoined_nor_delivered_after_a_reconnect() {
    let server = Server::memory();
    let (proxy, addr) = Proxy::start(server.addr.clone()).await;
    let mut client = ChatClient::connect(config(&addr)).await.unwrap();
    client.join("stay").await.unwrap();
    client.join("side").await.unwrap();
    client.leave("side").await.unwrap();
    // Left before its `joined` came back: both requests are queued before
    // the server answers the first.
    let (joined, left) = tokio::join!(client.join("race"), client.leave("race"));
    joined.unwrap();
    left.unwrap();
    // The URL group, which every new connection joins by its URL.
    client.leave("home").await.unwrap();
    proxy.cut();
    events_until(&mut client, |e| matches!(e, Event::Disconnected { .. })).await;
    proxy.open();
    // The client's frames after `welcome` are read in order: once `stay` is
    // recovered, anything it sent before that rejoin was read too.
    let mut events = events_until(
        &mut client,
        |e| matches!(e, Event::Recovered { group, .. } if group == "stay"),
    )
    .await;
    for group in ["home", "side", "race", "stay"] {
        post(&server.addr, group, json!(group)).await;
    }
    events.extend(
        events_until(
            &mut client,
            |e| matches!(e, Event::Message { group, .. } if group == "stay"),
        )
        .await,
    );
    let left = |g: &str| ["home", "side", "race"].contains(&g);
    let wrong: Vec<&Event> = events
        .iter()
        .filter(|e| match e {
            Event::Message { group, .. } | Event::Joined { group, .. } | Event::Recovered { group, .. } => left(group),
            _ => false,
        })
        .collect();
    assert!(wrong.is_empty(), "a group left came back: {wrong:#?}");
}
