// channelbox: a client for the channelbox chat protocol that recovers by itself.
//
// It connects to `ws://host/ws/{group}`, joins more groups on request, and
// when the connection drops (a restart, a slow-consumer close 4000, an
// insufficient-state close 4002, a heartbeat close 4003, shutdown 1001, a
// network fault) reconnects with jittered exponential backoff and recovers
// every group with `since`/`epoch` from the last offset it delivered. The
// application sees every saved message of its groups once, in offset order,
// across reconnects, and a `recovered` event with `complete: false` when
// something could not be recovered.
//
// Requests return promises settled by their `ref`: resolved with the reply,
// rejected with a `ChannelboxError` carrying the protocol's error code.

/** The part of the WebSocket API the client uses (browsers', Node's, `ws`). */
export interface SocketLike {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

/** A WebSocket constructor. */
export type SocketFactory = new (url: string) => SocketLike;

/** How the client connects and reconnects. */
export interface Options {
  /** The WebSocket implementation; default `globalThis.WebSocket`. */
  WebSocket?: SocketFactory;
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

/** The connection's state. */
export type State = "connecting" | "connected" | "reconnecting" | "closed";

/** The events an application can listen to. */
export interface Events {
  message: Message;
  direct: { from: string; user?: string; data: unknown };
  member_joined: MemberEvent;
  member_left: MemberEvent;
  recovered: Recovered;
  state: { state: State; code?: number; reason?: string };
  welcome: { channel_id: string; group: string; epoch: string; offset: number };
}

/** A request the server refused, or one that could not be answered. */
export class ChannelboxError extends Error {
  /** The protocol's error code (`forbidden`, `unavailable`, …), or
   * `disconnected` / `timeout` / `closed` from the client itself. */
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
}
interface Position {
  epoch: string;
  offset: number;
}
type Listener<K extends keyof Events> = (event: Events[K]) => void;

const OPEN = 1;
/** Requests queued while the connection is down before new ones are refused. */
const MAX_QUEUED = 1000;

/** Connects to `url` (`ws://host:port/ws/{group}`) and keeps the connection. */
export function connect(url: string, options: Options = {}): Client {
  return new Client(url, options);
}

/** A connection that reconnects and recovers by itself. */
export class Client {
  readonly group: string;
  private readonly base: string;
  private readonly options: Required<Pick<Options, "minBackoffMs" | "maxBackoffMs" | "requestTimeoutMs">> & Options;
  private socket: SocketLike | null = null;
  private state: State = "connecting";
  private attempt = 0;
  private nextRef = 1;
  private timer: ReturnType<typeof setTimeout> | null = null;
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

  constructor(url: string, options: Options) {
    const parsed = new URL(url);
    const match = /^\/ws\/([^/]+)$/.exec(parsed.pathname);
    if (!match) throw new ChannelboxError("bad_request", `${url} is not ws://host/ws/{group}`);
    this.group = decodeURIComponent(match[1]);
    this.base = `${parsed.protocol}//${parsed.host}${parsed.pathname}`;
    this.options = { minBackoffMs: 100, maxBackoffMs: 10_000, requestTimeoutMs: 10_000, ...options };
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

  /** Publishes to a group (default: the URL group); resolves once saved. */
  publish(
    data: unknown,
    opts: { group?: string; history?: boolean; echo?: boolean } = {},
  ): Promise<{ group: string; offset: number | null; epoch: string | null }> {
    return this.request({ type: "publish", data, ...opts }) as never;
  }

  /** Joins another group; the client rejoins (and recovers) it after every reconnect. */
  async join(group: string, opts: { events?: boolean } = {}): Promise<void> {
    const events = opts.events ?? false;
    await this.request({ type: "join", group, events, ...this.since(group) });
    this.joined.set(group, events);
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

  private request(frame: Reply): Promise<Reply> {
    if (this.state === "closed") return Promise.reject(new ChannelboxError("closed", "the client was closed"));
    const ref = `r${this.nextRef++}`;
    const text = JSON.stringify({ ...frame, ref });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new ChannelboxError("timeout", `no reply to ${String(frame.type)} in time`));
      }, this.options.requestTimeoutMs);
      this.pending.set(ref, { resolve, reject, timer, text });
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

  private open(): void {
    const Socket = this.options.WebSocket ?? (globalThis as { WebSocket?: SocketFactory }).WebSocket;
    if (!Socket) throw new ChannelboxError("bad_request", "no WebSocket implementation: pass options.WebSocket");
    const socket = new Socket(this.url());
    this.socket = socket;
    socket.onmessage = (ev) => {
      if (socket === this.socket) this.receive(JSON.parse(String(ev.data)) as Reply);
    };
    socket.onclose = (ev) => {
      if (socket === this.socket) this.dropped(ev.code, ev.reason);
    };
    socket.onerror = () => {
      /* onclose follows */
    };
  }

  private dropped(code: number, reason: string): void {
    this.socket = null;
    this.failPending("disconnected", "the connection dropped before the reply", false);
    if (this.state === "closed") return;
    this.setState("reconnecting", code, reason);
    const ceiling = Math.min(this.options.maxBackoffMs, this.options.minBackoffMs * 2 ** this.attempt++);
    // Jitter: between half and all of the ceiling, so clients spread out.
    this.timer = setTimeout(() => this.open(), ceiling / 2 + Math.random() * (ceiling / 2));
  }

  private receive(m: Reply): void {
    const ref = typeof m.ref === "string" ? m.ref : undefined;
    switch (m.type) {
      case "welcome":
        this.welcomed(m);
        return;
      case "message":
        this.deliver(m as unknown as Message);
        return;
      case "recovered":
        this.emit("recovered", { group: String(m.group), from: Number(m.from), to: Number(m.to), complete: m.complete === true });
        break;
      case "direct":
        this.emit("direct", m as never);
        return;
      case "member_joined":
      case "member_left":
        this.emit(m.type, m as never);
        return;
      case "error":
        if (ref?.startsWith("rejoin:")) {
          // A group could not be rejoined (the server is busy): start over.
          this.socket?.close(1000, "rejoin failed");
        } else if (ref) {
          this.settle(ref, new ChannelboxError(String(m.code), String(m.message)));
        }
        return;
    }
    if (ref) this.settle(ref, m);
  }

  private welcomed(m: Reply): void {
    this.first = false;
    this.attempt = 0;
    this.emit("welcome", m as never);
    const known = this.positions.get(this.group);
    if (!known || known.epoch !== m.epoch) {
      // A fresh start (or a new epoch): what comes is the replay asked for,
      // then live messages after the welcome's offset.
      const offset = this.replaying ? 0 : Number(m.offset);
      this.positions.set(this.group, { epoch: String(m.epoch), offset });
    }
    this.setState("connected");
    // Rejoin (and recover) every other group first, then what waited.
    for (const [group, events] of this.joined) {
      const ref = `rejoin:${group}`;
      this.socket?.send(JSON.stringify({ type: "join", group, events, ...this.since(group), ref }));
    }
    for (const ref of this.queued.splice(0)) this.sendPending(ref);
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
