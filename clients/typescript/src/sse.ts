// The fallback transport: a stream of Server-Sent Events from `/sse/{group}`
// read with `fetch`, plus the HTTP API for what the client sends, behind the
// same small socket interface the client uses for a WebSocket. Every event's
// data is the frame a WebSocket would carry; `: ping` comments count as
// something heard (the client's liveness check); the `close` event's code
// and reason become the close the client sees.
//
// What a stream cannot do is answered here: a `publish` is a POST to
// `/api/groups/{g}/messages` (its reply shaped as `published`), `history`,
// `presence` and `groups` are GETs of the HTTP API, a `ping` needs no
// answer (the stream's comments are its heartbeat), and `join`, `leave` and
// `direct` — and a publish with `history: false` or `echo: false`, which the
// HTTP API does not take — are refused with the client's own code
// `unsupported`.

type Frame = Record<string, unknown>;

/** What the SSE transport needs from its environment. */
export interface SseOptions {
  /** The `fetch` implementation (browsers', Node 18+'s). */
  fetch: typeof fetch;
  /** A token for the HTTP API (`Authorization: Bearer`), when the server requires one. */
  token?: string;
}

/** `ws://host/ws/{group}?q` as `http://host/sse/{group}?q` (wss → https). */
export function sseUrl(wsUrl: string): string {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  u.pathname = u.pathname.replace(/^\/ws\//, "/sse/");
  return u.toString();
}

/** A stream of events that looks like a WebSocket to the client. */
export class SseSocket {
  readyState = 0;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  private readonly abort = new AbortController();
  private readonly origin: string;
  private readonly group: string;
  /** The `close` event the server sent, if any. */
  private closing: { code: number; reason: string } | null = null;
  private finished = false;

  constructor(
    url: string,
    private readonly options: SseOptions,
  ) {
    const u = new URL(sseUrl(url));
    this.origin = `${u.protocol}//${u.host}`;
    this.group = decodeURIComponent(u.pathname.replace(/^\/sse\//, ""));
    void this.run(u.toString());
  }

  send(text: string): void {
    let frame: Frame;
    try {
      frame = JSON.parse(text) as Frame;
    } catch {
      return;
    }
    void this.answer(frame).then((reply) => {
      if (reply && !this.finished) this.onmessage?.({ data: JSON.stringify(reply) });
    });
  }

  close(code = 1000, reason = ""): void {
    this.finish(code, reason);
  }

  terminate(): void {
    this.finish(1006, "terminated");
  }

  private async run(url: string): Promise<void> {
    let res: Response;
    try {
      res = await this.options.fetch(url, { headers: { accept: "text/event-stream" }, signal: this.abort.signal });
    } catch (err) {
      return this.finish(1006, String(err));
    }
    if (res.status !== 200 || !res.body) {
      const body = await res.text().catch(() => "");
      return this.finish(1006, `refused with ${res.status}: ${body}`);
    }
    this.readyState = 1;
    this.onopen?.({});
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let at: number;
        while ((at = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, at);
          buffer = buffer.slice(at + 2);
          this.event(block);
        }
      }
    } catch (err) {
      return this.finish(1006, String(err));
    }
    this.finish(this.closing?.code ?? 1006, this.closing?.reason ?? "the stream ended");
  }

  /** One event block: its data to the client, a comment as a sign of life. */
  private event(block: string): void {
    let event = "message";
    const data: string[] = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (data.length === 0) {
      // A heartbeat comment: not JSON, so the client only notes it heard something.
      this.onmessage?.({ data: "" });
      return;
    }
    const text = data.join("\n");
    if (event === "close") {
      try {
        const c = JSON.parse(text) as Frame;
        this.closing = { code: Number(c.code), reason: String(c.reason ?? "") };
      } catch {
        // A close without a readable reason: the stream's end says enough.
      }
      return;
    }
    this.onmessage?.({ data: text });
  }

  private finish(code: number, reason: string): void {
    if (this.finished) return;
    this.finished = true;
    this.readyState = 3;
    this.abort.abort();
    // As a socket's close event would: after the caller's code has run.
    setTimeout(() => this.onclose?.({ code, reason }), 0);
  }

  /** The reply a WebSocket's server would have sent to this request. */
  private async answer(frame: Frame): Promise<Frame | null> {
    const ref = frame.ref;
    const group = typeof frame.group === "string" ? frame.group : this.group;
    const path = `/api/groups/${encodeURIComponent(group)}`;
    const refused = (code: string, message: string): Frame => ({ type: "error", code, message, ref });
    try {
      switch (frame.type) {
        case "publish": {
          if (frame.history === false || frame.echo === false) {
            return refused("unsupported", "history:false and echo:false are not available over Server-Sent Events");
          }
          const r = await this.http("POST", `${path}/messages`, JSON.stringify(frame.data ?? null));
          if (!r.ok) return refused(String(r.body.code), String(r.body.message));
          return { type: "published", group, offset: r.body.offset, epoch: r.body.epoch, ref };
        }
        case "history": {
          const q = new URLSearchParams();
          if (frame.limit !== undefined) q.set("limit", String(frame.limit));
          if (frame.since !== undefined) q.set("since", String(frame.since));
          const r = await this.http("GET", `${path}/history?${q}`);
          return r.ok ? { ...r.body, type: "history", ref } : refused(String(r.body.code), String(r.body.message));
        }
        case "presence": {
          const r = await this.http("GET", `${path}/presence`);
          return r.ok ? { ...r.body, type: "presence", ref } : refused(String(r.body.code), String(r.body.message));
        }
        case "groups": {
          const r = await this.http("GET", "/api/groups");
          return r.ok ? { type: "groups", groups: r.body, ref } : refused(String(r.body.code), String(r.body.message));
        }
        case "ping":
          return null;
        default:
          return refused("unsupported", `${String(frame.type)} is not available over Server-Sent Events`);
      }
    } catch (err) {
      return refused("unavailable", String(err));
    }
  }

  private async http(method: string, path: string, body?: string): Promise<{ ok: boolean; body: Frame }> {
    const headers: Record<string, string> = {};
    if (body !== undefined) headers["content-type"] = "application/json";
    if (this.options.token) headers.authorization = `Bearer ${this.options.token}`;
    const res = await this.options.fetch(`${this.origin}${path}`, { method, headers, body });
    const json = (await res.json().catch(() => ({}))) as Frame;
    return { ok: res.status === 200, body: json };
  }
}
