//! The configuration file and its precedence, through the `channelbox`
//! binary: a flag wins over the environment, which wins over the file, which
//! wins over the default; unknown keys and wrong types are refused by name;
//! `--print-config` masks secrets; the shipped example file loads.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::json;
use support::{chat_binary, Client, Server};

/// Environment variables of the server that the test process may carry
/// (`cargo xtask ci` sets CHANNELBOX_HTTP); each run starts without them.
const SERVER_VARIABLES: [&str; 13] = [
    "CHANNELBOX_ADDR",
    "CHANNELBOX_STORE",
    "CHANNELBOX_DATA",
    "CHANNELBOX_REDIS_URL",
    "CHANNELBOX_REDIS_REPLICAS",
    "CHANNELBOX_REDIS_WAIT_MS",
    "CHANNELBOX_CONFIG",
    "CHANNELBOX_ADMIN_TOKEN",
    "CHANNELBOX_TOKEN_SECRET",
    "CHANNELBOX_ALLOWED_ORIGINS",
    "CHANNEL_BOX_HISTORY_SIZE",
    "CHANNELBOX_HTTP",
    "CHANNELBOX_WRITE_DELAY_MS",
];

/// Runs `channelbox ARGS` with exactly these server variables.
fn channelbox(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(chat_binary());
    for name in SERVER_VARIABLES {
        command.env_remove(name);
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run channelbox")
}

/// The effective configuration, as `--print-config` prints it.
fn effective(args: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let mut all = args.to_vec();
    all.push("--print-config");
    let out = channelbox(&all, env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).parse().expect("TOML output")
}

/// The error a refused configuration exits with.
fn refusal(args: &[&str]) -> String {
    let out = channelbox(args, &[]);
    assert!(
        !out.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("channelbox.toml");
    std::fs::write(&path, text).expect("write the file");
    path
}

#[test]
fn a_flag_wins_over_the_environment_which_wins_over_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = file(
        dir.path(),
        "addr = \"127.0.0.1:1111\"\nqueue = 7\nhistory_bytes = 500\n",
    );
    let path = path.to_str().expect("utf-8 path");
    let from_file = effective(&["--config", path], &[]);
    assert_eq!(from_file["addr"].as_str(), Some("127.0.0.1:1111"));
    assert_eq!(from_file["queue"].as_integer(), Some(7));
    assert_eq!(from_file["history_bytes"].as_integer(), Some(500));
    // Keys the file leaves out keep their defaults.
    assert_eq!(from_file["queue_bytes"].as_integer(), Some(1_048_576));

    let env = [
        ("CHANNELBOX_ADDR", "127.0.0.1:2222"),
        ("CHANNEL_BOX_HISTORY_SIZE", "600"),
    ];
    let from_env = effective(&["--config", path], &env);
    assert_eq!(from_env["addr"].as_str(), Some("127.0.0.1:2222"));
    assert_eq!(from_env["history_bytes"].as_integer(), Some(600));
    assert_eq!(from_env["queue"].as_integer(), Some(7));

    let from_flags = effective(&["--config", path, "--addr", "127.0.0.1:3333", "--queue", "9"], &env);
    assert_eq!(from_flags["addr"].as_str(), Some("127.0.0.1:3333"));
    assert_eq!(from_flags["queue"].as_integer(), Some(9));
    assert_eq!(from_flags["history_bytes"].as_integer(), Some(600));
}

#[test]
fn the_file_may_be_named_by_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = file(
        dir.path(),
        "store = \"memory\"\nallowed_origin = [\"https://a.example\"]\n",
    );
    let config = effective(&[], &[("CHANNELBOX_CONFIG", path.to_str().expect("utf-8"))]);
    assert_eq!(config["store"].as_str(), Some("memory"));
    assert_eq!(config["allowed_origin"].as_array().map(Vec::len), Some(1), "{config}");
}

#[test]
fn unknown_keys_wrong_types_and_bad_values_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, named) in [
        ("qeue = 10\n", "`qeue`"),
        ("queue = \"many\"\n", "`queue`"),
        ("store = \"floppy\"\n", "`store`"),
        ("allowed_origin = \"https://a.example\"\n", "`allowed_origin`"),
        ("queue = 0\n", "`queue`"),
        ("history_messages = 0\n", "`history_messages`"),
        ("history_ttl = -5\n", "`history_ttl`"),
        ("config = \"other.toml\"\n", "`config`"),
        (
            "[namespaces.chat]\nhistory_messages = 0\n",
            "`namespaces.chat.history_messages`",
        ),
        (
            "[namespaces.chat]\nhistory_messages = \"2\"\n",
            "`namespaces.chat.history_messages`",
        ),
        ("[namespaces.chat]\nhistory_ttl = 0\n", "`namespaces.chat.history_ttl`"),
        ("[namespaces]\nchat = 5\n", "`namespaces.chat`"),
    ] {
        let path = file(dir.path(), text);
        let error = refusal(&["--config", path.to_str().expect("utf-8")]);
        assert!(
            error.contains(named),
            "{text:?} refused without naming {named}: {error}"
        );
    }
    let broken = file(dir.path(), "queue = [\n");
    assert!(refusal(&["--config", broken.to_str().expect("utf-8")]).contains("channelbox.toml"));
    let missing = dir.path().join("missing.toml");
    assert!(refusal(&["--config", missing.to_str().expect("utf-8")]).contains("missing.toml"));
}

#[test]
fn print_config_masks_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "a-token-secret-of-at-least-thirty-two-bytes";
    let path = file(
        dir.path(),
        &format!("token_secret = \"{secret}\"\nredis_url = \"redis://app:hunter2@127.0.0.1:6379/\"\n"),
    );
    let out = channelbox(
        &[
            "--config",
            path.to_str().expect("utf-8"),
            "--admin-token",
            "admin-secret",
            "--print-config",
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for hidden in [secret, "admin-secret", "hunter2"] {
        assert!(!text.contains(hidden), "{hidden} printed: {text}");
    }
    assert!(text.contains("token_secret = \"********\""), "{text}");
    assert!(text.contains("admin_token = \"********\""), "{text}");
}

/// `redis_url` is a list: the variable is comma-separated (a Sentinel
/// host list stays one URL), a file may give one string holding several,
/// and every URL's password is masked.
#[test]
fn redis_urls_split_into_shards_and_each_password_is_masked() {
    let urls = |config: &toml::Table| -> Vec<String> {
        let list = config["redis_url"].as_array().expect("a list");
        list.iter().map(|u| u.as_str().expect("a string").to_owned()).collect()
    };
    let from_env = effective(
        &[],
        &[("CHANNELBOX_REDIS_URL", "redis://:pw1@a:1/,redis+sentinel://s1:1,s2:2/m")],
    );
    assert_eq!(
        urls(&from_env),
        ["redis://:********@a:1/", "redis+sentinel://s1:1,s2:2/m"]
    );
    assert_eq!(from_env["redis_replicas"].as_integer(), Some(0));
    assert_eq!(from_env["redis_wait_ms"].as_integer(), Some(1000));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = file(
        dir.path(),
        "redis_url = \"redis://u:pw2@b:2/,redis://u:pw3@c:3/\"\nredis_replicas = 1\n",
    );
    let from_file = effective(&["--config", path.to_str().expect("utf-8")], &[]);
    assert_eq!(urls(&from_file), ["redis://u:********@b:2/", "redis://u:********@c:3/"]);
    assert_eq!(from_file["redis_replicas"].as_integer(), Some(1));
    let zero = file(dir.path(), "redis_wait_ms = 0\n");
    assert!(refusal(&["--config", zero.to_str().expect("utf-8")]).contains("redis_wait_ms"));
    assert!(refusal(&["--redis-wait-ms", "1001"]).contains("--redis-wait-ms"));
}

/// `--write-delay-ms`: 18 by default, read from a flag, the environment or
/// the file, 0 to 100 accepted and anything else refused by name.
#[test]
fn the_write_delay_is_read_from_every_source_and_refused_out_of_range() {
    let delay = |config: &toml::Table| config["write_delay_ms"].as_integer();
    assert_eq!(delay(&effective(&[], &[])), Some(18));
    assert_eq!(delay(&effective(&["--write-delay-ms", "0"], &[])), Some(0));
    assert_eq!(delay(&effective(&[], &[("CHANNELBOX_WRITE_DELAY_MS", "5")])), Some(5));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = file(dir.path(), "write_delay_ms = 100\n");
    let config = path.to_str().expect("utf-8");
    assert_eq!(delay(&effective(&["--config", config], &[])), Some(100));
    assert_eq!(
        delay(&effective(&["--config", config, "--write-delay-ms", "7"], &[])),
        Some(7)
    );
    for bad in ["101", "-1", "1.5", "soon"] {
        let error = refusal(&[&format!("--write-delay-ms={bad}"), "--print-config"]);
        assert!(
            error.contains("--write-delay-ms"),
            "{bad:?} refused without naming the flag: {error}"
        );
    }
    for text in [
        "write_delay_ms = 101\n",
        "write_delay_ms = -1\n",
        "write_delay_ms = \"soon\"\n",
    ] {
        let path = file(dir.path(), text);
        let error = refusal(&["--config", path.to_str().expect("utf-8"), "--print-config"]);
        assert!(
            error.contains("`write_delay_ms`"),
            "{text:?} refused without naming the key: {error}"
        );
    }
}

#[test]
fn a_history_of_no_message_is_refused_as_in_a_namespace() {
    assert!(refusal(&["--history-messages", "0", "--print-config"]).contains("--history-messages"));
    assert_eq!(
        effective(&["--history-messages", "1"], &[])["history_messages"].as_integer(),
        Some(1)
    );
}

#[test]
fn seconds_beyond_a_duration_are_refused_by_name() {
    // Positive and finite, yet more seconds than a Duration holds: the server
    // used to accept them and panic turning them into Durations at start.
    let dir = tempfile::tempdir().expect("tempdir");
    for key in ["history_ttl", "hook_timeout", "expiry"] {
        let path = file(dir.path(), &format!("{key} = 1e300\n"));
        let error = refusal(&["--config", path.to_str().expect("utf-8"), "--print-config"]);
        assert!(
            error.contains(&format!("`{key}`")),
            "{key} refused without naming it: {error}"
        );
        let flag = format!("--{}", key.replace('_', "-"));
        let error = refusal(&[&flag, "1e300", "--print-config"]);
        assert!(error.contains(&flag), "{flag} refused without naming it: {error}");
    }
}

#[test]
fn namespace_names_no_group_can_have_are_refused_by_name() {
    // Groups take the part before their first `:`: these would never apply.
    let dir = tempfile::tempdir().expect("tempdir");
    let long = "n".repeat(128);
    for name in ["chat:private", "chat room", long.as_str()] {
        let path = file(dir.path(), &format!("[namespaces.\"{name}\"]\nhistory_messages = 2\n"));
        let error = refusal(&["--config", path.to_str().expect("utf-8"), "--print-config"]);
        assert!(
            error.contains(&format!("`namespaces.{name}`")),
            "{name:?} refused without naming it: {error}"
        );
    }
    let path = file(
        dir.path(),
        "[namespaces.\"\"]\nhistory_messages = 2\n[namespaces.\"café\"]\n",
    );
    effective(&["--config", path.to_str().expect("utf-8")], &[]);
}

#[test]
fn the_shipped_example_file_loads() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/channelbox.toml");
    let config = effective(&["--config", example.to_str().expect("utf-8")], &[]);
    assert_eq!(config["addr"].as_str(), Some("127.0.0.1:8080"));
    assert_eq!(config["admin_token"].as_str(), Some("********"));
}

#[tokio::test]
async fn the_server_runs_with_the_files_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = file(dir.path(), "store = \"memory\"\nmax_message_bytes = 200\n");
    let server = Server::start(&["--config", path.to_str().expect("utf-8")]);
    let (mut c, _) = Client::join(&server.ws_url("/ws/config")).await;
    c.send(json!({"type": "publish", "data": "x".repeat(400)})).await;
    assert_eq!(c.recv().await["code"], "too_large");
}
