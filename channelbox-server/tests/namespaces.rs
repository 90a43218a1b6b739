//! Namespaces from the configuration file, at every entry point: `history`,
//! `presence`, `events`, `publish` (members, backend, anyone) and the hook
//! overrides, over WebSocket and HTTP; history limits per namespace on every
//! store; `GET /api/namespaces`; unknown options and bad values refused by
//! name.

mod support;

use serde_json::json;
use support::{get, http, Client, Server};

const CONFIG: &str = r#"
store = "memory"
admin_token = "adm"

[namespaces.quiet]
history = false
presence = false
events = false

[namespaces.news]
publish = "backend"

[namespaces.open]
publish = "anyone"

[namespaces.free]
join_hook = ""

[namespaces.short]
history_messages = 2
"#;

fn start(extra: &[&str]) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("channelbox.toml");
    std::fs::write(&path, CONFIG).expect("write the file");
    let mut args = vec!["--config", path.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    (Server::start(&args), dir)
}

#[tokio::test]
async fn a_namespace_without_history_presence_or_events_refuses_them() {
    let (server, _dir) = start(&[]);
    let (mut c, _) = Client::join(&server.ws_url("/ws/quiet:room")).await;
    let (published, message) = c.publish(json!({"data": "not kept"}), "p").await;
    assert_eq!(published["offset"], json!(null), "{published}");
    assert_eq!(message["data"], "not kept", "still delivered");
    let history = get(&server.addr, "/api/groups/quiet:room/history").await.json();
    assert_eq!(history["messages"], json!([]));
    let (epoch, since) = (history["epoch"].as_str().expect("epoch").to_owned(), 0);
    let url = server.ws_url(&format!("/ws/quiet:room?since={since}&epoch={epoch}"));
    let (mut again, _) = Client::join(&url).await;
    let recovered = again.recv_type("recovered").await;
    assert_eq!(recovered["complete"], false, "nothing is saved to recover: {recovered}");
    let presence = c.request(json!({"type": "presence"}), "pr").await;
    assert_eq!(presence["code"], "forbidden", "{presence}");
    assert_eq!(get(&server.addr, "/api/groups/quiet:room/presence").await.status, 403);
    let events = c
        .request(json!({"type": "join", "group": "quiet:other", "events": true}), "j")
        .await;
    assert_eq!(events["code"], "forbidden", "{events}");
    let r = http(&server.addr, "GET", "/ws/quiet:x?events=1", &support::UPGRADE, b"").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (403, Some("forbidden")));
    // Groups outside the namespace keep the defaults.
    let (mut d, _) = Client::join(&server.ws_url("/ws/plain?events=1")).await;
    let presence = d.request(json!({"type": "presence"}), "pr").await;
    assert_eq!(presence["type"], "presence", "{presence}");
    let (published, _) = d.publish(json!({"data": 1}), "p").await;
    assert_eq!(published["offset"], 1);
}

#[tokio::test]
async fn publish_rules_backend_and_anyone() {
    let (server, _dir) = start(&[]);
    let (mut member, _) = Client::join(&server.ws_url("/ws/news:today")).await;
    let refused = member.request(json!({"type": "publish", "data": "x"}), "p").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let r = http(
        &server.addr,
        "POST",
        "/api/groups/news:today/messages",
        &[],
        b"\"from the backend\"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(member.recv_type("message").await["data"], "from the backend");

    let (mut listener, _) = Client::join(&server.ws_url("/ws/open:hall")).await;
    let (mut outsider, _) = Client::join(&server.ws_url("/ws/elsewhere")).await;
    let published = outsider
        .request(json!({"type": "publish", "group": "open:hall", "data": "knock"}), "p")
        .await;
    assert_eq!(published["type"], "published", "{published}");
    assert_eq!(listener.recv_type("message").await["data"], "knock");
    let refused = outsider
        .request(json!({"type": "publish", "group": "members-only", "data": "x"}), "q")
        .await;
    assert_eq!(refused["code"], "forbidden", "the default still needs membership");
}

#[tokio::test]
async fn a_namespace_may_turn_the_servers_hook_off() {
    // Nothing listens on a port just released: the server's join hook fails.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let hook = format!("http://127.0.0.1:{port}/join");
    let (server, _dir) = start(&["--join-hook", &hook]);
    let (mut c, _) = Client::join(&server.ws_url("/ws/lobby")).await;
    let failed = c.request(json!({"type": "join", "group": "guarded"}), "a").await;
    assert_eq!(failed["code"], "unavailable", "{failed}");
    let free = c.request(json!({"type": "join", "group": "free:room"}), "b").await;
    assert_eq!(free["type"], "joined", "{free}");
}

#[tokio::test]
async fn api_namespaces_lists_every_option_in_effect() {
    let (server, _dir) = start(&[]);
    assert_eq!(get(&server.addr, "/api/namespaces").await.status, 401);
    let r = http(
        &server.addr,
        "GET",
        "/api/namespaces",
        &[("Authorization", "Bearer adm")],
        b"",
    )
    .await;
    let all = r.json();
    assert_eq!(
        all["quiet"],
        json!({"history": false, "presence": false, "events": false, "publish": "members",
               "history_bytes": 1_048_576, "history_messages": null, "history_ttl": null})
    );
    assert_eq!(all["news"]["publish"], "backend");
    assert_eq!(all["free"]["join_hook"], "");
}

/// Six messages to `short:x` (namespace `short`: 2 kept), `long:x` (no
/// such namespace) and `plain`; both of those keep the server's 4.
async fn namespace_limits_apply(store: &[&str]) {
    let mut args = vec!["--history-messages", "4"];
    args.extend_from_slice(store);
    let (server, _dir) = start(&args);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let kept = |group: String| {
        let addr = server.addr.clone();
        async move {
            for i in 0..6 {
                let path = format!("/api/groups/{group}/messages");
                let r = http(&addr, "POST", &path, &[], i.to_string().as_bytes()).await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
            let history = get(&addr, &format!("/api/groups/{group}/history?limit=100"))
                .await
                .json();
            let messages = history["messages"].as_array().expect("messages").clone();
            messages
                .iter()
                .map(|m| m["offset"].as_u64().expect("offset"))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        kept(format!("short:{run}")).await,
        [5, 6],
        "{store:?}: namespace short keeps 2"
    );
    assert_eq!(
        kept(format!("long:{run}")).await,
        [3, 4, 5, 6],
        "{store:?}: the default 4"
    );
    assert_eq!(
        kept(format!("plain{run}")).await,
        [3, 4, 5, 6],
        "{store:?}: the default 4"
    );
    let r = http(
        &server.addr,
        "GET",
        "/api/namespaces",
        &[("Authorization", "Bearer adm")],
        b"",
    )
    .await;
    let all = r.json();
    assert_eq!(all["short"]["history_messages"], 2, "{all}");
    assert_eq!(all["short"]["history_bytes"], 1_048_576, "the server's, inherited");
    assert_eq!(all["quiet"]["history_messages"], 4, "the server's, inherited");
}

#[tokio::test]
async fn a_namespace_keeps_its_own_history_limit_in_memory() {
    namespace_limits_apply(&[]).await;
}

#[tokio::test]
async fn a_namespace_keeps_its_own_history_limit_in_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("history");
    namespace_limits_apply(&["--store", "sled", "--data", data.to_str().expect("utf-8")]).await;
}

#[tokio::test]
async fn a_namespace_keeps_its_own_history_limit_in_redis() {
    let redis = channelbox_redis::testkit::RedisServer::start();
    namespace_limits_apply(&["--store", "redis", "--redis-url", &redis.url()]).await;
}

#[test]
fn print_config_shows_each_namespaces_history_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("channelbox.toml");
    std::fs::write(&path, CONFIG).expect("write the file");
    let out = std::process::Command::new(support::chat_binary())
        .args([
            "--config",
            path.to_str().expect("utf-8"),
            "--history-ttl",
            "60",
            "--print-config",
        ])
        .env_remove("CHANNELBOX_CONFIG")
        .output()
        .expect("run channelbox");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: toml::Table = String::from_utf8_lossy(&out.stdout).parse().expect("TOML");
    let short = &config["namespaces"]["short"];
    assert_eq!(short["history_messages"].as_integer(), Some(2), "{config}");
    assert_eq!(short["history_bytes"].as_integer(), Some(1_048_576), "{config}");
    assert_eq!(short["history_ttl"].as_float(), Some(60.0), "{config}");
    assert_eq!(config["namespaces"]["quiet"].get("history_messages"), None, "unlimited");
}

#[test]
fn bad_namespace_history_limits_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    for (option, value) in [
        ("history_messages", "0"),
        ("history_messages", "\"two\""),
        ("history_messages", "-1"),
        ("history_bytes", "0"),
        ("history_bytes", "1.5"),
        ("history_ttl", "0"),
        ("history_ttl", "-2.5"),
        ("history_ttl", "\"1m\""),
    ] {
        std::fs::write(&path, format!("[namespaces.short]\n{option} = {value}\n")).expect("write");
        let out = std::process::Command::new(support::chat_binary())
            .args(["--config", path.to_str().expect("utf-8"), "--print-config"])
            .env_remove("CHANNELBOX_CONFIG")
            .output()
            .expect("run channelbox");
        assert!(!out.status.success(), "{option} = {value} accepted");
        let error = String::from_utf8_lossy(&out.stderr);
        let key = format!("`namespaces.short.{option}`");
        assert!(
            error.contains(&key),
            "{option} = {value} refused without naming {key}: {error}"
        );
    }
}

#[test]
fn an_unknown_namespace_option_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[namespaces.chat]\nhistroy = false\n").expect("write");
    let out = std::process::Command::new(support::chat_binary())
        .args(["--config", path.to_str().expect("utf-8"), "--print-config"])
        .env_remove("CHANNELBOX_CONFIG")
        .output()
        .expect("run channelbox");
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("histroy"), "{error}");
    std::fs::write(&path, "[namespaces.chat]\npublish = \"everyone\"\n").expect("write");
    let out = std::process::Command::new(support::chat_binary())
        .args(["--config", path.to_str().expect("utf-8"), "--print-config"])
        .output()
        .expect("run channelbox");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("everyone"));
}
