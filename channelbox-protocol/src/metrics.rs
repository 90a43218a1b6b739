//! `GET /metrics`: the Prometheus series of docs/protocol.md, through prometheus-client.
//!
//! Counters that the `ChannelBox` already keeps (published, delivered,
//! overflows, slow-consumer closes) are read from it at scrape time by a
//! collector, so they are never counted twice.

use std::sync::atomic::AtomicI64;

use channelbox_core::ChannelBox;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open connections: WebSockets and event streams.
    pub connections: Gauge<i64, AtomicI64>,
    groups: Gauge<i64, AtomicI64>,
    history_messages: Gauge<i64, AtomicI64>,
    history_bytes: Gauge<i64, AtomicI64>,
    history_cost: Gauge<i64, AtomicI64>,
    store_failing: Gauge<i64, AtomicI64>,
    /// Seconds from a publish to its durable append.
    pub publish_durable_seconds: Histogram,
    /// Writes to WebSocket connections' sockets that took bytes (one `send`
    /// each): with `channelbox_messages_delivered_total` it tells how many
    /// frames a `send` carries.
    pub socket_writes: Counter,
    /// Calls, failures and latency of each backend hook.
    pub hooks: HookMetrics,
}

/// A hook's label set: `{hook="join"}`.
type HookLabel = Vec<(&'static str, &'static str)>;

/// The series of the backend hooks, each labelled with the hook's name.
#[derive(Debug)]
pub struct HookMetrics {
    calls: Family<HookLabel, Counter>,
    failures: Family<HookLabel, Counter>,
    seconds: Family<HookLabel, Histogram, fn() -> Histogram>,
}

impl HookMetrics {
    fn register(registry: &mut Registry) -> Self {
        let calls = Family::<HookLabel, Counter>::default();
        let failures = Family::<HookLabel, Counter>::default();
        // 1 ms to about 16 s: past the longest hook timeout anyone sets.
        let seconds: Family<HookLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 15)));
        registry.register("channelbox_hook_calls", "Backend hook calls.", calls.clone());
        registry.register(
            "channelbox_hook_failures",
            "Backend hook calls that failed closed: no answer in time, or not 200 with `allow`.",
            failures.clone(),
        );
        registry.register(
            "channelbox_hook_seconds",
            "Time a backend hook took to answer or fail.",
            seconds.clone(),
        );
        HookMetrics {
            calls,
            failures,
            seconds,
        }
    }

    /// Counts one call of `hook` that took `seconds` and `failed` or not.
    pub fn observe(&self, hook: &'static str, seconds: f64, failed: bool) {
        let label = vec![("hook", hook)];
        self.calls.get_or_create(&label).inc();
        if failed {
            self.failures.get_or_create(&label).inc();
        }
        self.seconds.get_or_create(&label).observe(seconds);
    }
}

/// Counts socket writes into `channelbox_socket_writes_total`; cheap to clone.
#[derive(Clone, Debug)]
pub struct WriteCounter(pub(crate) Counter);

impl WriteCounter {
    /// One more write that took bytes.
    pub fn count(&self) {
        self.0.inc();
    }
}

#[derive(Debug)]
struct BoxCounters(ChannelBox);

impl Collector for BoxCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        let series: [(&str, &str, u64); 4] = [
            ("channelbox_messages_published", "Messages published.", s.published),
            (
                "channelbox_messages_delivered",
                "Message frames handed to members' queues (not replays, not direct).",
                s.delivered,
            ),
            (
                "channelbox_queue_overflows",
                "Frames refused or dropped by full queues.",
                s.overflows,
            ),
            (
                "channelbox_slow_consumer_closes",
                "Connections closed as slow consumers.",
                s.slow_consumer_closes,
            ),
        ];
        for (name, help, value) in series {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Metrics for this box.
    pub fn new(channels: &ChannelBox) -> Self {
        let mut registry = Registry::default();
        let connections = Gauge::<i64, AtomicI64>::default();
        let groups = Gauge::<i64, AtomicI64>::default();
        let history_messages = Gauge::<i64, AtomicI64>::default();
        let history_bytes = Gauge::<i64, AtomicI64>::default();
        let history_cost = Gauge::<i64, AtomicI64>::default();
        let store_failing = Gauge::<i64, AtomicI64>::default();
        // 100 µs to about 6.5 s.
        let publish_durable_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        registry.register(
            "channelbox_connections",
            "Open connections (WebSockets and event streams).",
            connections.clone(),
        );
        registry.register("channelbox_groups", "Groups with at least one member.", groups.clone());
        registry.register(
            "channelbox_history_messages",
            "Messages kept in history, all groups.",
            history_messages.clone(),
        );
        registry.register(
            "channelbox_history_bytes",
            "Payload bytes kept in history, all groups.",
            history_bytes.clone(),
        );
        registry.register(
            "channelbox_history_cost_bytes",
            "What all groups' history costs against --history-total-bytes.",
            history_cost.clone(),
        );
        registry.register(
            "channelbox_store_failing",
            "1 while the history store refuses writes (a full or failing disk), else 0.",
            store_failing.clone(),
        );
        registry.register(
            "channelbox_publish_durable_seconds",
            "Time from a publish to its durable append.",
            publish_durable_seconds.clone(),
        );
        let socket_writes = Counter::default();
        registry.register(
            "channelbox_socket_writes",
            "Writes to WebSocket sockets that took bytes (one send each).",
            socket_writes.clone(),
        );
        registry.register_collector(Box::new(BoxCounters(channels.clone())));
        let hooks = HookMetrics::register(&mut registry);
        Metrics {
            registry,
            connections,
            groups,
            history_messages,
            history_bytes,
            history_cost,
            store_failing,
            publish_durable_seconds,
            socket_writes,
            hooks,
        }
    }

    /// The text exposition, after refreshing the gauges read at scrape time.
    pub async fn render(&self, channels: &ChannelBox) -> String {
        let stats = channels.stats();
        self.groups.set(stats.groups as i64);
        self.store_failing.set(i64::from(!channels.store().healthy()));
        if let Ok(h) = channels.store().stats().await {
            self.history_messages.set(h.messages as i64);
            self.history_bytes.set(h.bytes as i64);
            self.history_cost.set(h.cost as i64);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
