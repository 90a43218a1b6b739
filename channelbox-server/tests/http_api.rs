//! The HTTP side of the protocol over real sockets: upgrade refusals for bad
//! URL groups, the `/api/…` endpoints and the admin API.

mod support;

use serde_json::{json, Value};
use support::{get, http, Client, Server};

#[tokio::test]
async fn url_group_rules() {
    let server = Server::memory();
    let upgrade = support::UPGRADE;
    let r = http(&server.addr, "GET", "/ws/a%20b", &upgrade, b"").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "invalid_group");
    let r = http(&server.addr, "GET", "/ws/a%zz", &upgrade, b"").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("invalid_group")));
    let long = "x".repeat(129);
    let r = http(&server.addr, "GET", &format!("/ws/{long}"), &upgrade, b"").await;
    assert_eq!(r.status, 400);
    let r = http(&server.addr, "GET", "/ws/", &upgrade, b"").await;
    assert_eq!(r.status, 404);
    let (_c, w) = Client::join(&server.ws_url("/ws/caf%C3%A9")).await;
    assert_eq!(w["group"], "café", "the group is the percent-decoded segment");
}

/// The site's fixed answers are alike on every adapter: status, content
/// type and body.
#[tokio::test]
async fn fixed_answers_carry_their_content_types() {
    let server = Server::memory();
    let health = get(&server.addr, "/healthz").await;
    assert_eq!(
        (health.status, health.content_type.as_deref()),
        (200, Some("text/plain"))
    );
    let metrics = get(&server.addr, "/metrics").await;
    let prometheus = "text/plain; version=0.0.4; charset=utf-8";
    assert_eq!(
        (metrics.status, metrics.content_type.as_deref()),
        (200, Some(prometheus))
    );
    let missing = get(&server.addr, "/nowhere").await;
    assert_eq!(missing.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        (missing.status, missing.body.as_str()),
        (404, r#"{"code":"not_found","message":"no such endpoint"}"#)
    );
    let method = http(&server.addr, "PUT", "/healthz", &[], b"").await;
    assert_eq!(method.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        (method.status, method.body.as_str()),
        (
            405,
            r#"{"code":"method_not_allowed","message":"this endpoint does not take that method"}"#
        )
    );
}

#[tokio::test]
async fn http_api() {
    let server = Server::memory();
    let (mut a, welcome) = Client::join(&server.ws_url("/ws/api")).await;
    assert_eq!(get(&server.addr, "/healthz").await.body, "ok");
    assert_eq!(get(&server.addr, "/api/groups").await.json(), json!({"api": 1}));
    let r = http(
        &server.addr,
        "POST",
        "/api/groups/api/messages",
        &[],
        br#"{"from":"backend"}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"offset": 1, "epoch": welcome["epoch"]}))
    );
    let m = a.recv().await;
    assert_eq!(m["from"], Value::Null);
    assert_eq!(m["data"], json!({"from": "backend"}));
    let r = http(&server.addr, "POST", "/api/groups/api/messages", &[], b"not json").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("bad_request")));
    let h = get(&server.addr, "/api/groups/api/history?limit=10").await.json();
    assert_eq!(h["group"], "api");
    assert_eq!(h["messages"][0]["offset"], 1);
    let empty = get(&server.addr, "/api/groups/nothing/history").await.json();
    assert_eq!(empty["messages"], json!([]));
    assert!(empty["epoch"].is_string());
    assert_eq!(get(&server.addr, "/api/groups/api/history?limit=0").await.status, 400);
    assert_eq!(get(&server.addr, "/api/groups/a%20b/history").await.status, 400);
    let r = http(&server.addr, "POST", "/api/admin/close-all", &[], b"").await;
    assert_eq!(r.status, 404, "admin API disabled without a token");
    let page = get(&server.addr, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<html") || page.body.contains("<!doctype html"));
    let metrics = get(&server.addr, "/metrics").await.body;
    for series in [
        "channelbox_connections",
        "channelbox_groups",
        "channelbox_messages_published_total",
        "channelbox_messages_delivered_total",
        "channelbox_queue_overflows_total",
        "channelbox_slow_consumer_closes_total",
        "channelbox_history_messages",
        "channelbox_history_bytes",
        "channelbox_publish_durable_seconds_bucket",
    ] {
        assert!(metrics.contains(series), "{series} in /metrics:\n{metrics}");
    }
    assert!(metrics.contains("channelbox_connections 1"), "{metrics}");
    assert!(metrics.contains("channelbox_messages_published_total 1"), "{metrics}");
    assert_eq!(get(&server.addr, "/nowhere").await.status, 404);
}

#[tokio::test]
async fn admin_api() {
    let server = Server::start(&["--store", "memory", "--admin-token", "sesame"]);
    let (mut a, _) = Client::join(&server.ws_url("/ws/adm")).await;
    a.request(json!({"type": "publish", "data": 1}), "1").await;
    let r = http(&server.addr, "DELETE", "/api/admin/history", &[], b"").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (401, Some("unauthorized")));
    let r = http(
        &server.addr,
        "DELETE",
        "/api/admin/history",
        &[("Authorization", "Bearer wrong")],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    let epoch_before = get(&server.addr, "/api/groups/adm/history").await.json()["epoch"].clone();
    let r = http(
        &server.addr,
        "DELETE",
        "/api/admin/history?group=adm",
        &[("Authorization", "Bearer sesame")],
        b"",
    )
    .await;
    assert_eq!((r.status, r.json()), (200, json!({"flushed": true})));
    let h = get(&server.addr, "/api/groups/adm/history").await.json();
    assert_ne!(h["epoch"], epoch_before, "a flushed group gets a new epoch");
    assert_eq!(h["messages"], json!([]));
    assert_eq!(
        a.request(json!({"type": "publish", "data": 2}), "2").await["offset"],
        1,
        "offsets restart at 1"
    );
    let r = http(
        &server.addr,
        "POST",
        "/api/admin/close-all",
        &[("Authorization", "Bearer sesame")],
        b"",
    )
    .await;
    assert_eq!((r.status, r.json()), (200, json!({"closed": 1})));
    assert_eq!(a.closed().await, Some(1001));
}

/// `/admin` is the admin page only when the server has an admin token, and
/// the login check the page makes (a flush of a group name too long to
/// exist) tells a wrong token from the right one without flushing anything.
#[tokio::test]
async fn the_admin_page_exists_only_with_an_admin_token() {
    let without = Server::memory();
    let r = get(&without.addr, "/admin").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (404, Some("not_found")));

    let server = Server::start(&["--store", "memory", "--admin-token", "adm"]);
    let page = get(&server.addr, "/admin").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("channelbox admin"), "{}", page.body);
    let (mut c, _) = Client::join(&server.ws_url("/ws/kept")).await;
    c.publish(json!({"data": 1}), "1").await;
    let probe = format!("/api/admin/history?group={}", "x".repeat(200));
    let wrong = http(&server.addr, "DELETE", &probe, &[("Authorization", "Bearer nope")], b"").await;
    assert_eq!(wrong.status, 401);
    let right = http(&server.addr, "DELETE", &probe, &[("Authorization", "Bearer adm")], b"").await;
    assert_eq!(right.status, 400);
    let history = get(&server.addr, "/api/groups/kept/history").await.json();
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1), "nothing flushed");
}
