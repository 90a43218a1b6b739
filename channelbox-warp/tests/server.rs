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
}

fn token(v: &TokenVerifier, sub: &str, exp: u64, groups: &[&str]) -> String {
    v.sign(sub, exp, groups)
}

#[tokio::test]
async fn authorization_with_tokens() {
    let secret = "s3cret";
    let server = Server::start(&["--store", "memory", "--token-secret", secret, "--admin-token", "adm"]);
    let v = TokenVerifier::new(secret.as_bytes());
    let later = now_secs() + 3600;
    let good = token(&v, "alice", later, &["chat_*", "lobby"]);
    let upgrade = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
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
    assert_eq!(r.json(), json!({"offset": 1}));
    let m = a.recv_type("message").await;
    assert_eq!(
        (m["from"].clone(), m.get("user")),
        (Value::Null, None),
        "backend publishes carry no user"
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
