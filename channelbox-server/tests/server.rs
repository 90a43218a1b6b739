//! End-to-end tests of the server process: persistence across a restart with
//! the sled store, graceful shutdown, authorization, and bad flags.

mod support;

use channelbox_protocol::{now_secs, TokenVerifier};
use serde_json::{json, Value};
use support::{get, http, Client, Server};

#[tokio::test]
async fn sled_history_survives_a_restart_and_clients_recover() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let mut server = Server::start(&["--data", data]);
    let (mut a, welcome) = Client::join(&server.ws_url("/ws/keep")).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for n in 1..=5 {
        let (p, _) = a.publish(json!({"data": n}), &format!("{n}")).await;
        assert_eq!(p["offset"], n);
    }
    assert_eq!(server.terminate(), 0, "SIGTERM exits 0");
    assert_eq!(a.closed().await, Some(1001), "shutdown closes with 1001");

    let server = Server::start(&["--data", data]);
    let (mut b, w) = Client::join(&server.ws_url(&format!("/ws/keep?since=3&epoch={epoch}"))).await;
    assert_eq!(w["epoch"], epoch.as_str(), "same epoch after the restart");
    assert_eq!(w["offset"], 5);
    assert_eq!(b.recv().await["offset"], 4);
    let m5 = b.recv().await;
    assert_eq!((m5["offset"].as_u64(), m5["data"].as_u64()), (Some(5), Some(5)));
    assert_eq!(b.recv().await["complete"], true);
    let (p, _) = b.publish(json!({"data": 6}), "6").await;
    assert_eq!(p["offset"], 6, "offsets continue");
}

#[tokio::test]
async fn a_memory_store_restart_is_a_new_epoch() {
    let mut server = Server::start(&["--store", "memory"]);
    let (mut a, w) = Client::join(&server.ws_url("/ws/m")).await;
    let epoch = w["epoch"].as_str().unwrap().to_owned();
    a.publish(json!({"data": 1}), "1").await;
    assert_eq!(server.terminate(), 0);
    let server = Server::start(&["--store", "memory"]);
    let (mut b, w) = Client::join(&server.ws_url(&format!("/ws/m?since=1&epoch={epoch}"))).await;
    assert_ne!(w["epoch"], epoch.as_str());
    assert_eq!(b.recv().await["complete"], false, "the history was lost");
}

#[tokio::test]
async fn bad_flags_and_unusable_data_dirs_exit_non_zero_with_a_reason() {
    let out = std::process::Command::new(support::chat_binary())
        .args(["--store", "rocks"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rocks"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let out = std::process::Command::new(support::chat_binary())
        .args(["--addr", "127.0.0.1:0", "--data", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(file.to_str().unwrap()), "names the path: {err}");
    for weak in ["", "short-secret"] {
        let out = std::process::Command::new(support::chat_binary())
            .args(["--addr", "127.0.0.1:0", "--store", "memory", "--token-secret", weak])
            .output()
            .unwrap();
        assert!(!out.status.success(), "a {}-byte secret is refused", weak.len());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--token-secret") && err.contains("32 bytes"), "{err}");
    }
}

fn token(v: &TokenVerifier, sub: &str, exp: u64, groups: &[&str]) -> String {
    v.sign(sub, exp, groups)
}

#[tokio::test]
async fn authorization_with_tokens() {
    let secret = "a-secret-of-at-least-32-bytes-xyz";
    let server = Server::start(&["--store", "memory", "--token-secret", secret, "--admin-token", "adm"]);
    let v = TokenVerifier::new(secret.as_bytes());
    let later = now_secs() + 3600;
    let good = token(&v, "alice", later, &["chat_*", "lobby"]);
    let upgrade = support::UPGRADE;
    let refused = |path: String| {
        let addr = server.addr.clone();
        async move { http(&addr, "GET", &path, &upgrade, b"").await }
    };
    let r = refused("/ws/lobby".into()).await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (401, Some("unauthorized")),
        "missing token"
    );
    let r = refused("/ws/lobby?token=garbage".into()).await;
    assert_eq!(r.status, 401, "malformed");
    let expired = token(&v, "alice", now_secs() - 10, &["lobby"]);
    assert_eq!(
        refused(format!("/ws/lobby?token={expired}")).await.status,
        401,
        "expired"
    );
    let forged = token(&TokenVerifier::new(b"other"), "alice", later, &["lobby"]);
    assert_eq!(
        refused(format!("/ws/lobby?token={forged}")).await.status,
        401,
        "wrongly signed"
    );
    assert_eq!(
        refused(format!("/ws/secret?token={good}")).await.status,
        401,
        "out of scope"
    );
    assert_eq!(
        refused(format!("/ws/a%20b?token={good}")).await.status,
        400,
        "the group is checked first"
    );

    let (mut a, _) = Client::join(&server.ws_url(&format!("/ws/chat_?token={good}"))).await;
    let (_, m) = a.publish(json!({"data": "hi"}), "1").await;
    assert_eq!(m["user"], "alice", "messages carry the user");
    let h = a.request(json!({"type": "history"}), "h").await;
    assert_eq!(h["messages"][0]["user"], "alice", "history keeps the user");
    assert_eq!(
        a.request(json!({"type": "join", "group": "lobby"}), "2").await["type"],
        "joined"
    );
    assert_eq!(
        a.request(json!({"type": "join", "group": "secret"}), "3").await["code"],
        "forbidden"
    );
    assert_eq!(
        a.request(json!({"type": "history", "group": "secret"}), "4").await["code"],
        "forbidden"
    );
    assert_eq!(
        a.request(json!({"type": "publish", "group": "secret", "data": 1}), "5")
            .await["code"],
        "forbidden"
    );
    let (mut bob, _) = Client::join(&server.ws_url(&format!(
        "/ws/lobby?token={}",
        token(&v, "bob", later, &["lobby", "hidden"])
    )))
    .await;
    bob.request(json!({"type": "join", "group": "hidden"}), "j").await;
    let groups = a.request(json!({"type": "groups"}), "g").await;
    assert_eq!(
        groups["groups"],
        json!({"chat_": 1, "lobby": 2}),
        "only groups the token allows"
    );
    let r = bob
        .request(json!({"type": "direct", "to": a_id(&mut a).await, "data": 1}), "d")
        .await;
    assert_eq!(r["type"], "sent");

    // The HTTP API with tokens.
    assert_eq!(get(&server.addr, "/api/groups").await.status, 401);
    let bearer = format!("Bearer {good}");
    let r = http(&server.addr, "GET", "/api/groups", &[("Authorization", &bearer)], b"").await;
    assert_eq!(r.json(), json!({"chat_": 1, "lobby": 2}));
    let r = http(
        &server.addr,
        "GET",
        "/api/groups",
        &[("Authorization", "Bearer adm")],
        b"",
    )
    .await;
    assert_eq!(r.json(), json!({"chat_": 1, "lobby": 2, "hidden": 1}));
    let r = http(
        &server.addr,
        "POST",
        "/api/groups/secret/messages",
        &[("Authorization", &bearer)],
        b"1",
    )
    .await;
    assert_eq!(r.status, 403);
    let r = http(
        &server.addr,
        "POST",
        "/api/groups/lobby/messages",
        &[("Authorization", &bearer)],
        b"1",
    )
    .await;
    assert_eq!(r.json()["offset"], 1);
    assert!(r.json()["epoch"].is_string());
    let m = a.recv_type("message").await;
    assert_eq!(
        (m["from"].clone(), m["user"].as_str()),
        (Value::Null, Some("alice")),
        "a publish made with a user token carries its user"
    );
    let r = http(
        &server.addr,
        "POST",
        "/api/groups/lobby/messages",
        &[("Authorization", "Bearer adm")],
        b"2",
    )
    .await;
    assert_eq!(r.json()["offset"], 2);
    let m = a.recv_type("message").await;
    assert_eq!(
        (m["from"].clone(), m.get("user")),
        (Value::Null, None),
        "one made with the admin token carries none"
    );
    let r = http(
        &server.addr,
        "POST",
        "/api/admin/close-all",
        &[("Authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(r.status, 401, "a user token is not the admin token");
}

async fn a_id(a: &mut Client) -> String {
    // The channel id of `a`, read from one of its own messages.
    let (_, m) = a.publish(json!({"data": "id"}), "id").await;
    m["from"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap().to_owned();
    let mut acked: Vec<(u64, String, Value)> = Vec::new();
    for round in 0..2 {
        let mut server = Server::start(&["--data", &data]);
        let url = server.ws_url("/ws/crash");
        let publishers: Vec<_> = (0..4)
            .map(|p| {
                let url = url.clone();
                tokio::spawn(async move {
                    let (mut c, w) = Client::join(&url).await;
                    let epoch = w["epoch"].as_str().unwrap().to_owned();
                    let mut mine = Vec::new();
                    // Publish until the server dies; keep 8 in flight.
                    let mut sent = 0u64;
                    let mut in_flight = 0;
                    loop {
                        while in_flight < 8 {
                            let data = json!({"p": p, "n": sent, "round": round});
                            let frame = json!({"type": "publish", "data": data, "ref": sent});
                            if c.ws_send_raw(frame.to_string()).await.is_err() {
                                return (epoch, mine);
                            }
                            sent += 1;
                            in_flight += 1;
                        }
                        match c.next_event().await {
                            support::Event::Json(v) if v["type"] == "published" => {
                                in_flight -= 1;
                                let n = v["ref"].as_u64().unwrap();
                                mine.push((v["offset"].as_u64().unwrap(), json!({"p": p, "n": n, "round": round})));
                            }
                            support::Event::Json(_) => {}
                            support::Event::Closed(_) => return (epoch, mine),
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        for p in publishers {
            let (epoch, mine) = p.await.unwrap();
            acked.extend(mine.into_iter().map(|(o, d)| (o, epoch.clone(), d)));
        }
        assert!(
            acked.len() > 20,
            "round {round}: publishes were acknowledged before the kill"
        );

        let server = Server::start(&["--data", &data]);
        let mut history = Vec::new();
        let mut since = 0;
        let epoch = loop {
            let page = get(
                &server.addr,
                &format!("/api/groups/crash/history?limit=1000&since={since}"),
            )
            .await
            .json();
            let msgs = page["messages"].as_array().unwrap().clone();
            if msgs.is_empty() {
                break page["epoch"].as_str().unwrap().to_owned();
            }
            since = msgs.last().unwrap()["offset"].as_u64().unwrap();
            history.extend(msgs);
        };
        let offsets: Vec<u64> = history.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
        assert_eq!(
            offsets,
            (1..=offsets.len() as u64).collect::<Vec<_>>(),
            "round {round}: offsets 1..n, no holes"
        );
        for (offset, ack_epoch, data) in &acked {
            assert_eq!(ack_epoch, &epoch, "round {round}: same epoch");
            let m = &history[(*offset - 1) as usize];
            assert_eq!(
                &m["data"], data,
                "round {round}: acknowledged offset {offset} kept its message"
            );
        }
        let last = *offsets.last().unwrap();
        let (mut c, _) = Client::join(&server.ws_url(&format!("/ws/crash?since={}&epoch={epoch}", last - 3))).await;
        for want in last - 2..=last {
            assert_eq!(c.recv().await["offset"], want);
        }
        assert_eq!(
            c.recv().await["complete"],
            true,
            "round {round}: reconnecting clients recover completely"
        );
    }
}

#[tokio::test]
async fn connection_and_group_limits_are_clear_errors() {
    let server = Server::start(&["--store", "memory", "--max-connections", "2", "--max-groups", "2"]);
    let (mut a, _) = Client::join(&server.ws_url("/ws/l")).await;
    let (_b, _) = Client::join(&server.ws_url("/ws/l")).await;
    let upgrade = support::UPGRADE;
    let r = http(&server.addr, "GET", "/ws/l", &upgrade, b"").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (503, Some("unavailable")));
    assert_eq!(
        a.request(json!({"type": "join", "group": "m"}), "1").await["type"],
        "joined"
    );
    let r = a.request(json!({"type": "join", "group": "n"}), "2").await;
    assert_eq!(r["code"], "forbidden", "a third group is over the limit");
    assert!(r["message"].as_str().unwrap().contains("at most 2 groups"));
}

#[tokio::test]
async fn handshakes_with_bad_headers_are_refused_without_harm() {
    let server = Server::start(&["--store", "memory"]);
    let (mut a, _) = Client::join(&server.ws_url("/ws/h")).await;
    let r = http(
        &server.addr,
        "GET",
        "/ws/h",
        &[("Connection", "Upgrade, close"), ("Upgrade", "websocket")],
        b"",
    )
    .await;
    assert!(
        r.status >= 400 && r.status < 500,
        "missing key and version: {}",
        r.status
    );
    let r = http(
        &server.addr,
        "GET",
        "/ws/h",
        &[
            ("Connection", "Upgrade, close"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "7"),
            ("Sec-WebSocket-Key", "x"),
        ],
        b"",
    )
    .await;
    assert!(r.status >= 400 && r.status < 500, "bad version: {}", r.status);
    let r = get(&server.addr, "/ws/h").await;
    assert!(r.status >= 400 && r.status < 500, "no upgrade at all: {}", r.status);
    assert_eq!(
        a.request(json!({"type": "ping"}), "p").await["type"],
        "pong",
        "others are unaffected"
    );
}
