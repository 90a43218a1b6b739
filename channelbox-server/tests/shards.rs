//! Two Redis shards for real (`--redis-url` twice, redis-servers of this
//! test's own): groups land on both by the jump hash of their name, delivery
//! across servers is exact on both, a server listing the shards in another
//! order refuses to start naming both lists, a shard that is down at
//! start-up does not stop a server, and one that answers later with another
//! list stops it (exit code 2).

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use channelbox_redis::shard_of;
use channelbox_redis::testkit::RedisServer;
use serde_json::json;
use support::{chat_binary, http, Client, Server};

fn redis_args(urls: &[String]) -> Vec<&str> {
    let mut args = vec!["--store", "redis"];
    for u in urls {
        args.extend(["--redis-url", u.as_str()]);
    }
    args
}

/// Group names: `per` on each of two shards.
fn groups_on_both(per: usize) -> Vec<String> {
    let (mut zero, mut one) = (Vec::new(), Vec::new());
    for i in 0.. {
        let g = format!("g{i}");
        match shard_of(&g, 2) {
            0 if zero.len() < per => zero.push(g),
            1 if one.len() < per => one.push(g),
            _ => {}
        }
        if zero.len() == per && one.len() == per {
            break;
        }
    }
    zero.into_iter().chain(one).collect()
}

fn has_head(redis: &RedisServer, group: &str) -> bool {
    let key = format!("cb:{{{group}}}:h");
    matches!(redis.run(&["EXISTS", &key]), Ok(redis::Value::Int(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_land_on_both_shards_and_delivery_is_exact() {
    let shards = [RedisServer::start(), RedisServer::start()];
    let urls: Vec<String> = shards.iter().map(RedisServer::url).collect();
    let servers = [Server::start(&redis_args(&urls)), Server::start(&redis_args(&urls))];
    let groups = groups_on_both(3);
    const N: u64 = 40;
    let mut members = Vec::new();
    for g in &groups {
        members.push(Client::join(&servers[1].ws_url(&format!("/ws/{g}"))).await.0);
    }
    for g in &groups {
        let (mut publisher, _) = Client::join(&servers[0].ws_url(&format!("/ws/{g}"))).await;
        for n in 0..N {
            publisher
                .send(json!({"type": "publish", "data": n, "echo": false}))
                .await;
        }
        for _ in 0..N {
            publisher.recv_type("published").await;
        }
    }
    for (g, m) in groups.iter().zip(members.iter_mut()) {
        let mut got = Vec::new();
        while got.len() < N as usize {
            let v = m.recv_type("message").await;
            got.push((v["offset"].as_u64().expect("offset"), v["data"].as_u64().expect("data")));
        }
        let want: Vec<(u64, u64)> = (0..N).map(|n| (n + 1, n)).collect();
        assert_eq!(got, want, "group {g}: every message once, in order");
    }
    for g in &groups {
        let on = shard_of(g, 2);
        assert!(has_head(&shards[on], g), "group {g} lives on shard {on}");
        assert!(!has_head(&shards[1 - on], g), "and not on the other");
    }

    // The same shards in another order: refused at start, both lists shown.
    let reversed: Vec<String> = urls.iter().rev().cloned().collect();
    let out = Command::new(chat_binary())
        .args(["--addr", "127.0.0.1:0"])
        .args(redis_args(&reversed))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run the chat server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a server with another shard list must not start");
    let name = |i: usize| format!("127.0.0.1:{}", shards[i].port());
    let mine = format!("[{}, {}]", name(1), name(0));
    let theirs = format!("[{}, {}]", name(0), name(1));
    assert!(
        stderr.contains(&mine) && stderr.contains(&theirs),
        "the error shows both lists: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_down_at_start_up_does_not_stop_the_server() {
    let up = RedisServer::start();
    let mut down = RedisServer::start();
    down.kill();
    // Hold the dead shard's port (never accepting), so that no redis-server
    // of a test running alongside takes it meanwhile.
    let hold = std::net::TcpListener::bind(("127.0.0.1", down.port())).expect("hold the port");
    let urls = vec![up.url(), down.url()];
    let server = Server::start(&redis_args(&urls));
    let groups = groups_on_both(1);
    let publish = |g: &str| {
        let (addr, path) = (server.addr.clone(), format!("/api/groups/{g}/messages"));
        async move { http(&addr, "POST", &path, &[], b"1").await.status }
    };
    assert_eq!(publish(&groups[0]).await, 200, "the shard that is up works");
    assert_eq!(
        publish(&groups[1]).await,
        503,
        "the one that is down answers unavailable"
    );
    drop(hold);
    down.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while publish(&groups[1]).await != 200 {
        assert!(Instant::now() < deadline, "the shard works once it answers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recorded = down.run(&["GET", "cb:shards"]).expect("the list");
    let recorded: String = redis::from_redis_value(recorded).expect("a string");
    assert_eq!(recorded, format!("127.0.0.1:{}\n127.0.0.1:{}", up.port(), down.port()));
}

/// A TCP proxy to `to` that closes every connection until `open` is set.
async fn gate(to: u16, open: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u16 {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            if !open.load(Ordering::Acquire) {
                continue;
            }
            let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                continue;
            };
            tokio::spawn(async move { tokio::io::copy_bidirectional(&mut down, &mut up).await });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_answers_late_with_another_list_stops_the_server() {
    let up = RedisServer::start();
    let late = RedisServer::start();
    late.run(&["SET", "cb:shards", "someone\nelse"]).expect("set");
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate_port = gate(late.port(), open.clone()).await;
    let urls = vec![up.url(), format!("redis://127.0.0.1:{gate_port}/")];
    let mut server = Server::start(&redis_args(&urls));
    open.store(true, std::sync::atomic::Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the server stops once the shard answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(2), "exit code 2: a shard disagrees");
}
