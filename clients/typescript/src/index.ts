// channelbox: a client for the channelbox chat protocol that recovers by itself.
//
// It connects to `ws://host/ws/{group}`, joins more groups on request, and
// when the connection drops (a restart, a slow-consumer close 4000, an
// insufficient-state close 4002, a heartbeat close 4003, shutdown 1001, a
// network fault) reconnects with jittered exponential backoff and recovers
// every group with `since`/`epoch` from the last offset it delivered — or,
// in a group where it received nothing yet, from the position the server named
// in `welcome` or `joined`. The application sees every saved message of its
// groups once, in offset order, across reconnects, and a `recovered` event
// (with `complete: false` when something could not be recovered).
//
// The backoff starts over only once a connection stayed up for `stableMs`, so
// a server that accepts and then closes at once (4002, 4003, a refused rejoin)
// is not hammered. A connection that does not reach `welcome` within
// `connectTimeoutMs`, or from which nothing arrives for `pingIntervalMs` plus
// `pongTimeoutMs` although the client sent a `ping` request, is given up as
// dead (a half-open TCP connection never closes by itself) and replaced.
//
// Requests return promises settled by their `ref`: resolved with the reply,
// rejected with a `ChannelboxError` carrying the protocol's error code.
//
// Where a WebSocket cannot be opened (a proxy that refuses upgrades, a
// handshake that times out), the client falls back to Server-Sent Events
// (`transports`): it listens on `/sse/{group}` and sends through the HTTP API
// (see sse.ts). Every connection tries the transports in order, moving to the
// next one when a connection fails before `welcome`; the positions it recovers
// from are the same whichever transport delivered them.

import { SseSocket } from "./sse.js";

export { sseUrl } from "./sse.js";

/** The part of the WebSocket API the client uses (browsers', Node's, `ws`). */
export interface SocketLike {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  /** Drops the connection at once, without the closing handshake (`ws` has it; browsers do not). */
  terminate?(): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

/** A WebSocket constructor. */
export type SocketFactory = new (url: string) => SocketLike;

/** A way to reach the server: a WebSocket, or Server-Sent Events plus the HTTP API. */
export type Transport = "websocket" | "sse";

/** How the client connects and reconnects. */
export interface Options {
  /** The WebSocket implementation; default `globalThis.WebSocket`. */
  WebSocket?: SocketFactory;
  /** The transports to try, in order; default `["websocket", "sse"]`. Over
   * `sse` the client receives every group's frames as a WebSocket would, and
   * publishes (and reads history, presence and groups) through the HTTP API;
   * `join`, `leave` and `direct` are refused with `unsupported`. */
  transports?: Transport[];
  /** The `fetch` implementation for the `sse` transport; default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** While connected over `sse`, how often the client tries whether a
   * WebSocket can be opened again, in ms (the first try follows the stream's
   * `welcome` at once); when one can, it switches back, recovering. */
  websocketRetryMs?: number;
  /** A token for servers that require one (`?token=`). */
  token?: string;
  /** Member events of the URL group (`?events=1`). */
  events?: boolean;
  /** On the first connection, replay the URL group's newest n saved messages. */
  history?: number;
  /** First wait before reconnecting, in ms (doubles up to `maxBackoffMs`). */
  minBackoffMs?: number;
  /** Longest wait before reconnecting, in ms. */
  maxBackoffMs?: number;
  /** How long a request waits for its reply, in ms. */
  requestTimeoutMs?: number;
  /** How long a connection may take to reach `welcome`, in ms, before it is given up. */
  connectTimeoutMs?: number;
  /** How long a connection must stay up before the backoff starts over, in ms. */
  stableMs?: number;
  /** After this long without any frame from the server, in ms, the client sends a
   * `ping` request; 0 turns the liveness check off. A ping counts as activity
   * for the server's `--expiry`. */
  pingIntervalMs?: number;
  /** How long after its `ping` the client waits for any frame, in ms, before it
   * gives the connection up as dead and reconnects. */
  pongTimeoutMs?: number;
}

/** A saved or unsaved message of a group. */
export interface Message {
  group: string;
  /** Null for messages published with `history: false`. */
  offset: number | null;
  epoch: string;
  from: string | null;
  user?: string;
  ts: number;
  data: unknown;
}

/** A member event. */
export interface MemberEvent {
  group: string;
  channel_id: string;
  user?: string;
}

/** The outcome of a group's recovery after a reconnect. */
export interface Recovered {
  group: string;
  from: number;
  to: number;
  complete: boolean;
}

/** A group the client could not rejoin after a reconnect. */
export interface RejoinFailed {
  group: string;
  /** The protocol's error code (`unavailable`, `forbidden`, …). */
  code: string;
  message: string;
  /** True for `unavailable`: the client reconnects (with backoff) and tries
   * again; and for `unsupported`, a connection over Server-Sent Events, which
   * cannot join: the group and its position are kept, and the next WebSocket
   * connection recovers it. Otherwise the group is dropped: join it again to
   * get it back. */
  retrying: boolean;
}

/** The connection's state. */
export type State = "connecting" | "connected" | "reconnecting" | "closed";

/** The events an application can listen to. */
export interface Events {
  message: Message;
  direct: { from: string; user?: string; data: unknown };
  member_joined: MemberEvent;
  member_left: MemberEvent;
  recovered: Recovered;
  rejoin_failed: RejoinFailed;
  /** `code` is the close code from the server, or 1006 when the client gave
   * the connection up itself (`reason`: `connect timeout`, `no pong`). */
  state: { state: State; code?: number; reason?: string };
  welcome: { channel_id: string; group: string; epoch: string; offset: number };
}

/** A request the server refused, or one that could not be answered. */
export class ChannelboxError extends Error {
  /** The protocol's error code (`forbidden`, `unavailable`, …), or
   * `disconnected` / `timeout` / `closed` / `unsupported` (a request a
   * Server-Sent Events connection cannot make) from the client itself. */
  readonly code: string;
  constructor(code: string, message: string) {
    super(`${code}: ${message}`);
    this.name = "ChannelboxError";
    this.code = code;
  }
}

type Reply = Record<string, unknown>;
interface Pending {
  resolve: (reply: Reply) => void;
  reject: (err: ChannelboxError) => void;
  timer: ReturnType<typeof setTimeout>;
  /** The frame, until it is sent; a dropped connection fails only sent ones. */
  text: string | null;
  /** For a `join`: what to record when it is answered. */
  join?: JoinInfo;
}
interface JoinInfo {
  group: string;
  events: boolean;
  /** It carried `since`: its `recovered` completes the position. */
  recovering: boolean;
}
interface Position {
  epoch: string;
  offset: number;
}
type Listener<K extends keyof Events> = (event: Events[K]) => void;

const OPEN = 1;
/** Requests queued while the connection is down before new ones are refused. */
const MAX_QUEUED = 1000;
type Timer = ReturnType<typeof setTimeout>;
type Tuning =
  | "minBackoffMs"
  | "maxBackoffMs"
  | "requestTimeoutMs"
  | "connectTimeoutMs"
  | "stableMs"
  | "pingIntervalMs"
  | "pongTimeoutMs"
  | "websocketRetryMs";

/** Connects to `url` (`ws://host:port/ws/{group}`) and keeps the connection. */
export function connect(url: string, options: Options = {}): Client {
  return new Client(url, options);
}

/** A connection that reconnects and recovers by itself. */
export class Client {
  readonly group: string;
  private readonly base: string;
  private readonly options: Required<Pick<Options, Tuning>> & Options;
  private socket: SocketLike | null = null;
  private state: State = "connecting";
  private attempt = 0;
  private nextRef = 1;
  /** The reconnect wait, or the connect timeout while connecting. */
  private timer: Timer | null = null;
  /** Resets the backoff once the connection has been up for `stableMs`. */
  private stableTimer: Timer | null = null;
  /** The liveness check's tick, and its wait for an answer to a ping. */
  private pingTimer: ReturnType<typeof setInterval> | null = null;
  private pongTimer: Timer | null = null;
  /** When the last frame arrived (ms). */
  private heardAt = 0;
  /** This connection's rejoins, by ref. */
  private readonly rejoins = new Map<string, JoinInfo>();
  /** Where live delivery starts in each group recovering on this connection
   * (from `welcome` / `joined`); the position once its `recovered` came. */
  private readonly starts = new Map<string, Position>();
  private readonly pending = new Map<string, Pending>();
  /** Refs of requests waiting for the connection, in order. */
  private readonly queued: string[] = [];
  /** Other groups joined, with whether they want member events. */
  private readonly joined = new Map<string, boolean>();
  /** The last delivered position of each group. */
  private readonly positions = new Map<string, Position>();
  private readonly listeners = new Map<keyof Events, Set<(e: never) => void>>();
  private first = true;
  /** This connection's URL asked for a replay of the newest messages. */
  private replaying = false;
  /** Which of `transports` the current (or next) connection uses. */
  private transportAt = 0;
  /** The current connection reached `welcome`. */
  private reached = false;
  /** The server answered `/healthz` right before the current connection. */
  private verified = false;
  /** Over `sse`: a WebSocket opened to try whether one can be, and the wait before the next try. */
  private probe: SocketLike | null = null;
  private probeTimer: Timer | null = null;

  constructor(url: string, options: Options) {
    const parsed = new URL(url);
    const match = /^\/ws\/([^/]+)$/.exec(parsed.pathname);
    if (!match) throw new ChannelboxError("bad_request", `${url} is not ws://host/ws/{group}`);
    this.group = decodeURIComponent(match[1]);
    this.base = `${parsed.protocol}//${parsed.host}${parsed.pathname}`;
    this.options = {
      minBackoffMs: 100,
      maxBackoffMs: 10_000,
      requestTimeoutMs: 10_000,
      connectTimeoutMs: 10_000,
      stableMs: 10_000,
      pingIntervalMs: 20_000,
      pongTimeoutMs: 10_000,
      websocketRetryMs: 30_000,
      ...options,
    };
    this.open();
  }

  /** Listens to an event; returns a function that stops listening. */
  on<K extends keyof Events>(event: K, listener: Listener<K>): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(listener as (e: never) => void);
    return () => set?.delete(listener as (e: never) => void);
  }

  /** The connection's state now. */
  get currentState(): State {
    return this.state;
  }

  /** The transport of the current (or next) connection. */
  get currentTransport(): Transport {
    return this.transports()[this.transportAt] ?? "websocket";
  }

  private transports(): Transport[] {
    const t = this.options.transports ?? ["websocket", "sse"];
    return t.length > 0 ? t : ["websocket"];
  }

  /** Publishes to a group (default: the URL group); resolves once saved. */
  publish(
    data: unknown,
    opts: { group?: string; history?: boolean; echo?: boolean } = {},
  ): Promise<{ group: string; offset: number | null; epoch: string | null }> {
    return this.request({ type: "publish", data, ...opts }) as never;
  }

  /** Joins another group; the client rejoins (and recovers) it after every
   * reconnect, from the position the server named in `joined` if nothing
   * arrived in it yet. */
  async join(group: string, opts: { events?: boolean } = {}): Promise<void> {
    const events = opts.events ?? false;
    const since = this.since(group);
    await this.request({ type: "join", group, events, ...since }, { group, events, recovering: "since" in since });
  }

  /** Leaves a group joined with `join`. */
  async leave(group: string): Promise<void> {
    this.joined.delete(group);
    this.positions.delete(group);
    await this.request({ type: "leave", group });
  }

  /** Sends `data` to one channel. */
  direct(to: string, data: unknown): Promise<Reply> {
    return this.request({ type: "direct", to, data });
  }

  /** A page of a group's history, oldest first. */
  history(opts: { group?: string; limit?: number; since?: number } = {}): Promise<{ group: string; epoch: string; messages: Omit<Message, "group">[] }> {
    return this.request({ type: "history", ...opts }) as never;
  }

  /** Member counts of every group. */
  async groups(): Promise<Record<string, number>> {
    return (await this.request({ type: "groups" })).groups as Record<string, number>;
  }

  /** Who is in a group (default: the URL group). */
  presence(group?: string): Promise<{ group: string; members: { channel_id: string; user?: string }[]; truncated?: boolean }> {
    return this.request({ type: "presence", ...(group === undefined ? {} : { group }) }) as never;
  }

  /** Closes for good: no reconnect; pending requests are rejected. */
  close(): void {
    this.setState("closed");
    this.stopTimers();
    if (this.timer) clearTimeout(this.timer);
    this.socket?.close(1000, "");
    this.socket = null;
    this.failPending("closed", "the client was closed", true);
    this.queued.length = 0;
  }

  private sendPending(ref: string): void {
    const p = this.pending.get(ref);
    if (!p || p.text === null) return;
    this.socket?.send(p.text);
    p.text = null;
  }

  private request(frame: Reply, join?: JoinInfo): Promise<Reply> {
    if (this.state === "closed") return Promise.reject(new ChannelboxError("closed", "the client was closed"));
    const ref = `r${this.nextRef++}`;
    const text = JSON.stringify({ ...frame, ref });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new ChannelboxError("timeout", `no reply to ${String(frame.type)} in time`));
      }, this.options.requestTimeoutMs);
      this.pending.set(ref, { resolve, reject, timer, text, join });
      if (this.socket && this.socket.readyState === OPEN && this.state === "connected") {
        this.sendPending(ref);
      } else if (this.queued.length < MAX_QUEUED) {
        this.queued.push(ref);
      } else {
        this.settle(ref, new ChannelboxError("unavailable", "too many requests wait for the connection"));
      }
    });
  }

  private since(group: string): Reply {
    const at = this.positions.get(group);
    return at ? { since: at.offset, epoch: at.epoch } : {};
  }

  private url(): string {
    const q = new URLSearchParams();
    const at = this.positions.get(this.group);
    this.replaying = false;
    if (at) {
      q.set("since", String(at.offset));
      q.set("epoch", at.epoch);
    } else if (this.first && this.options.history) {
      q.set("history", String(this.options.history));
      this.replaying = true;
    }
    if (this.options.events) q.set("events", "1");
    if (this.options.token) q.set("token", this.options.token);
    const query = q.toString();
    return query ? `${this.base}?${query}` : this.base;
  }

  /** A connection on the current transport. */
  private socketFor(url: string): SocketLike {
    if (this.currentTransport === "sse") {
      const fetchImpl = this.options.fetch ?? globalThis.fetch;
      if (!fetchImpl) throw new ChannelboxError("bad_request", "no fetch implementation: pass options.fetch");
      return new SseSocket(url, { fetch: fetchImpl.bind(globalThis), token: this.options.token });
    }
    const Socket = this.options.WebSocket ?? (globalThis as { WebSocket?: SocketFactory }).WebSocket;
    if (!Socket) throw new ChannelboxError("bad_request", "no WebSocket implementation: pass options.WebSocket");
    return new Socket(url);
  }

  private open(): void {
    this.timer = null;
    this.reached = false;
    let socket: SocketLike;
    try {
      socket = this.socketFor(this.url());
    } catch (err) {
      // A socket that cannot even be made (a browser offline, a bad URL)
      // is a failed attempt like any other: back off and try again.
      this.dropped(1006, String(err));
      return;
    }
    this.socket = socket;
    socket.onmessage = (ev) => {
      if (socket !== this.socket) return;
      this.heardAt = Date.now();
      let frame: Reply;
      try {
        frame = JSON.parse(String(ev.data)) as Reply;
      } catch {
        return; // Not JSON: nothing of the protocol's, so nothing to act on.
      }
      this.receive(frame);
    };
    socket.onclose = (ev) => {
      if (socket === this.socket) this.dropped(ev.code, ev.reason);
    };
    socket.onerror = () => {
      /* onclose follows */
    };
    // Until `welcome`, `timer` is the connect (and handshake) timeout.
    this.timer = setTimeout(() => this.abandon(socket, "connect timeout"), this.options.connectTimeoutMs);
  }

  /** Gives a connection up without waiting for its closing handshake, which a
   * dead peer never answers. */
  private abandon(socket: SocketLike, reason: string): void {
    if (socket !== this.socket) return;
    this.socket = null;
    try {
      if (socket.terminate) socket.terminate();
      else socket.close();
    } catch {
      // Already closing: nothing more to do with it.
    }
    this.dropped(1006, reason);
  }

  /** Over `sse`, tries a WebSocket after `delay` ms: a server that takes one
   * again (the connection failed while the server was down, say, and the
   * stream got there first) gets the connection back on a WebSocket. */
  private probeLater(current: SocketLike, delay: number): void {
    if (this.currentTransport !== "sse" || !this.transports().includes("websocket")) return;
    this.probeTimer = setTimeout(() => this.probeNow(current), delay);
  }

  private probeNow(current: SocketLike): void {
    this.probeTimer = null;
    const Socket = this.options.WebSocket ?? (globalThis as { WebSocket?: SocketFactory }).WebSocket;
    if (current !== this.socket || !Socket) return;
    const q = new URLSearchParams();
    if (this.options.token) q.set("token", this.options.token);
    let probe: SocketLike;
    try {
      const query = q.toString();
      probe = new Socket(query ? `${this.base}?${query}` : this.base);
    } catch {
      this.probeLater(current, this.options.websocketRetryMs);
      return;
    }
    this.probe = probe;
    const giveUp = setTimeout(() => done(false), this.options.connectTimeoutMs);
    const done = (opened: boolean): void => {
      clearTimeout(giveUp);
      if (this.probe !== probe) return;
      this.probe = null;
      probe.onmessage = probe.onclose = null;
      try {
        probe.close(1000, "");
      } catch {
        // Not open yet: dropping it is enough.
      }
      if (current !== this.socket) return;
      if (opened) this.abandon(current, "a WebSocket can be opened again");
      else this.probeLater(current, this.options.websocketRetryMs);
    };
    probe.onmessage = (ev) => {
      if (String(ev.data).includes('"welcome"')) done(true);
    };
    probe.onclose = () => done(false);
    probe.onerror = () => {
      /* onclose follows */
    };
  }

  private stopTimers(): void {
    if (this.probeTimer) clearTimeout(this.probeTimer);
    this.probeTimer = null;
    const probe = this.probe;
    this.probe = null;
    if (probe) {
      probe.onmessage = probe.onclose = null;
      try {
        probe.close(1000, "");
      } catch {
        // Not open yet: dropping it is enough.
      }
    }
    for (const t of [this.stableTimer, this.pongTimer]) if (t) clearTimeout(t);
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.stableTimer = this.pongTimer = this.pingTimer = null;
  }

  private dropped(code: number, reason: string): void {
    this.socket = null;
    // After a connection that reached `welcome`, the first transport is
    // tried again; after one that did not, the next one may be.
    const failed = !this.reached;
    if (!failed) this.transportAt = 0;
    this.stopTimers();
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.rejoins.clear();
    this.starts.clear();
    this.failPending("disconnected", "the connection dropped before the reply", false);
    if (this.state === "closed") return;
    this.setState("reconnecting", code, reason);
    // `attempt` starts over only once a connection stayed up (`stableMs`):
    // one that the server closes right away waits longer each time.
    const ceiling = Math.min(this.options.maxBackoffMs, this.options.minBackoffMs * 2 ** Math.min(this.attempt++, 30));
    // Jitter: between half and all of the ceiling, so clients spread out.
    const wait = ceiling / 2 + Math.random() * (ceiling / 2);
    this.timer = setTimeout(() => (failed ? this.openNext() : this.open()), wait);
  }

  /** Opens a connection after one failed before `welcome`: on the next
   * transport, except that falling back to `sse` needs a WebSocket that
   * failed although the server answered plain HTTP (`/healthz`) just before
   * it. A server that does not answer is down or unreachable, not blocking
   * WebSockets, and one that just came back takes the WebSocket again. */
  private openNext(): void {
    this.timer = null;
    const list = this.transports();
    const next = (this.transportAt + 1) % list.length;
    const fetchImpl = this.options.fetch ?? globalThis.fetch;
    const verified = this.verified;
    this.verified = false;
    if (list[next] !== "sse" || !fetchImpl || verified) {
      this.transportAt = next;
      this.open();
      return;
    }
    const health = new URL(this.base);
    health.protocol = health.protocol === "wss:" ? "https:" : "http:";
    health.pathname = "/healthz";
    const abort = new AbortController();
    const giveUp = setTimeout(() => abort.abort(), this.options.connectTimeoutMs);
    fetchImpl
      .call(globalThis, health.toString(), { signal: abort.signal })
      .then((r) => r.status === 200, () => false)
      .then((up) => {
        clearTimeout(giveUp);
        if (this.state === "closed" || this.socket || this.timer) return;
        this.verified = up;
        this.open();
      });
  }

  /** Pings when the server has been silent for `pingIntervalMs`; gives the
   * connection up when nothing at all answers within `pongTimeoutMs`. */
  private startLiveness(socket: SocketLike): void {
    const every = this.options.pingIntervalMs;
    if (every <= 0) return;
    this.heardAt = Date.now();
    this.pingTimer = setInterval(() => {
      if (socket !== this.socket || this.pongTimer || Date.now() - this.heardAt < every) return;
      const sentAt = Date.now();
      socket.send(JSON.stringify({ type: "ping", ref: `ping:${this.nextRef++}` }));
      this.pongTimer = setTimeout(() => {
        this.pongTimer = null;
        if (this.heardAt < sentAt) this.abandon(socket, "no pong");
      }, this.options.pongTimeoutMs);
    }, Math.max(10, every / 2));
  }

  private receive(m: Reply): void {
    const ref = typeof m.ref === "string" ? m.ref : undefined;
    switch (m.type) {
      case "welcome":
        this.welcomed(m);
        return;
      case "joined":
        this.joinedGroup(m, ref);
        break;
      case "message":
        this.deliver(m as unknown as Message);
        return;
      case "recovered":
        this.recovered(m);
        break;
      case "direct":
        this.emit("direct", m as never);
        return;
      case "member_joined":
      case "member_left":
        this.emit(m.type, m as never);
        return;
      case "error":
        if (ref && this.rejoins.has(ref)) this.rejoinRefused(ref, m);
        else if (ref) this.settle(ref, new ChannelboxError(String(m.code), String(m.message)));
        return;
    }
    if (ref) this.settle(ref, m);
  }

  /** A position named by the server, if the frame carries one. */
  private static position(m: Reply): Position | null {
    return typeof m.epoch === "string" && typeof m.offset === "number" ? { epoch: m.epoch, offset: m.offset } : null;
  }

  /** Moves a group's position forward (or to a new epoch); never back. */
  private advance(group: string, to: Position): void {
    const at = this.positions.get(group);
    if (!at || at.epoch !== to.epoch || at.offset < to.offset) this.positions.set(group, to);
  }

  private welcomed(m: Reply): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const socket = this.socket;
    if (!socket) return;
    this.first = false;
    this.reached = true;
    this.stableTimer = setTimeout(() => {
      this.stableTimer = null;
      this.attempt = 0;
    }, this.options.stableMs);
    this.startLiveness(socket);
    this.probeLater(socket, this.options.minBackoffMs);
    this.emit("welcome", m as never);
    const start = Client.position(m);
    if (start) {
      if (this.positions.has(this.group)) {
        // Recovering: the position moves to `start` once `recovered` came.
        this.starts.set(this.group, start);
      } else {
        // A fresh start: what comes is the replay asked for (from offset
        // 0), then live messages after the welcome's offset.
        this.positions.set(this.group, this.replaying ? { epoch: start.epoch, offset: 0 } : start);
      }
    }
    this.setState("connected");
    // Rejoin (and recover) every other group first, then what waited.
    for (const [group, events] of this.joined) {
      if (this.currentTransport === "sse") {
        // A stream cannot join: the group and its position are kept for the
        // next WebSocket connection, which recovers it.
        const message = "joining is not available over Server-Sent Events";
        this.emit("rejoin_failed", { group, code: "unsupported", message, retrying: true });
        continue;
      }
      const since = this.since(group);
      const ref = `rejoin:${this.nextRef++}`;
      this.rejoins.set(ref, { group, events, recovering: "since" in since });
      socket.send(JSON.stringify({ type: "join", group, events, ...since, ref }));
    }
    for (const ref of this.queued.splice(0)) this.sendPending(ref);
  }

  /** Records a join's position: at once when it did not recover, once its
   * `recovered` came when it did. */
  private joinedGroup(m: Reply, ref: string | undefined): void {
    if (ref === undefined) return;
    const rejoin = this.rejoins.get(ref);
    this.rejoins.delete(ref);
    // A rejoin of a group the application left meanwhile is not kept.
    if (rejoin && !this.joined.has(rejoin.group)) return;
    const info = rejoin ?? this.pending.get(ref)?.join;
    if (!info) return;
    this.joined.set(info.group, info.events);
    const start = Client.position(m);
    if (!start) return;
    if (info.recovering) this.starts.set(info.group, start);
    else this.advance(info.group, start);
  }

  private recovered(m: Reply): void {
    const group = String(m.group);
    // Every saved message up to where live delivery starts was replayed or
    // reported lost: live ones follow the start.
    const start = this.starts.get(group);
    if (start) this.advance(group, start);
    this.starts.delete(group);
    this.emit("recovered", { group, from: Number(m.from), to: Number(m.to), complete: m.complete === true });
  }

  private rejoinRefused(ref: string, m: Reply): void {
    const info = this.rejoins.get(ref);
    this.rejoins.delete(ref);
    if (!info) return;
    const code = String(m.code);
    const retrying = code === "unavailable";
    if (!retrying) {
      // Refused for good (forbidden, invalid): the application decides.
      this.joined.delete(info.group);
      this.positions.delete(info.group);
    }
    this.emit("rejoin_failed", { group: info.group, code, message: String(m.message), retrying });
    // The store cannot take the join now: start over, after a backoff that
    // keeps growing until a connection stays up.
    if (retrying && this.socket) this.abandon(this.socket, "rejoin failed");
  }

  private deliver(m: Message): void {
    if (m.offset !== null && m.offset !== undefined) {
      const at = this.positions.get(m.group);
      if (at && at.epoch === m.epoch && m.offset <= at.offset) return; // seen already
      this.positions.set(m.group, { epoch: m.epoch, offset: m.offset });
    }
    this.emit("message", m);
  }

  private settle(ref: string, outcome: Reply | ChannelboxError): void {
    const p = this.pending.get(ref);
    if (!p) return;
    this.pending.delete(ref);
    clearTimeout(p.timer);
    if (outcome instanceof ChannelboxError) p.reject(outcome);
    else p.resolve(outcome);
  }

  /** Rejects the requests sent (and, with `all`, those still waiting). */
  private failPending(code: string, message: string, all: boolean): void {
    for (const [ref, p] of [...this.pending]) {
      if (all || p.text === null) this.settle(ref, new ChannelboxError(code, message));
    }
  }

  private setState(state: State, code?: number, reason?: string): void {
    if (this.state === state && code === undefined) return;
    this.state = state;
    this.emit("state", { state, code, reason });
  }

  private emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const listener of this.listeners.get(event) ?? []) (listener as Listener<K>)(value);
  }
}
