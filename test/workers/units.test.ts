import { createExecutionContext, env, runInDurableObject, waitOnExecutionContext } from "cloudflare:test";
import { ROOT_CONTEXT, SpanKind, SpanStatusCode, TraceFlags, createTraceState, trace } from "@opentelemetry/api";
import { ExportResultCode } from "@opentelemetry/core";
import { JsonTraceSerializer } from "@opentelemetry/otlp-transformer";
import { resourceFromAttributes } from "@opentelemetry/resources";
import type { ReadableSpan, SpanExporter } from "@opentelemetry/sdk-trace-base";
import { afterEach, describe, expect, it, vi } from "vitest";
import { authSecret } from "../../src/api/auth.ts";
import { signToken, verifyToken } from "../../src/api/tokens.ts";
import { handleRequest } from "../../src/api/routes.ts";
import { routeTemplate } from "../../src/api/tracing.ts";
import { parseClientFrame } from "../../src/gateway/frames.ts";
import { CloseCode } from "../../src/gateway/protocol.ts";
import type { GuildEvent } from "../../src/guild/events.ts";
import type { Env } from "../../src/env.ts";
import { type RelayStub, deliveryConfig, relayFanoutOptions } from "../../src/guild/delivery.ts";
import { FanoutCheckpoint, MAX_RESEND } from "../../src/guild/checkpoint.ts";
import { DropNotices } from "../../src/guild/drop-notices.ts";
import { Fanout, type Recipient } from "../../src/guild/fanout.ts";
import { Timings } from "../../src/guild/timings.ts";
import { ResumeBuffer } from "../../src/session/resume-buffer.ts";
import type { Session } from "../../src/session/session.ts";
import { EXPORT_WARNING_INTERVAL_MS, SpanExportQueue } from "../../src/telemetry/export.ts";
import { EXPORT_DELAY_MS, type SpanRecord, Telemetry, exportTimeout, parseEndpoint, parseHeaders } from "../../src/telemetry/index.ts";
import { fromSpanRecord, toSpanRecord } from "../../src/telemetry/span-record.ts";
import { SampledTracer } from "../../src/telemetry/tracer.ts";
import type { Incoming } from "../../src/transport/index.ts";

const SECRET = "unit-test-secret-0123456789";

describe("tokens", () => {
  it("round-trips claims and rejects tampering, other secrets and expiry", async () => {
    const exp = Math.floor(Date.now() / 1000) + 60;
    const token = await signToken(SECRET, { sub: "u1", role: "admin", exp });
    expect(await verifyToken(SECRET, token)).toEqual({ sub: "u1", role: "admin", exp });
    expect(await verifyToken("another-secret-0123456789", token)).toBeNull();
    const [payload, signature] = token.split(".");
    const forged = btoa(JSON.stringify({ sub: "u1", role: "admin", exp: exp + 1000 })).replace(/=+$/, "");
    expect(await verifyToken(SECRET, `${forged}.${signature}`)).toBeNull();
    expect(await verifyToken(SECRET, `${payload}.${signature}x`)).toBeNull();
    expect(await verifyToken(SECRET, token, (exp + 1) * 1000)).toBeNull();
    for (const junk of ["", ".", "a.b.c", 42, null, "x".repeat(5000)]) expect(await verifyToken(SECRET, junk)).toBeNull();
  });

  it("refuses signed claims of the wrong shape", async () => {
    const exp = Math.floor(Date.now() / 1000) + 60;
    expect(await verifyToken(SECRET, await signToken(SECRET, { sub: "bad id!", role: "user", exp }))).toBeNull();
    expect(await verifyToken(SECRET, await signToken(SECRET, { sub: "u1", role: "root" as "admin", exp }))).toBeNull();
  });

  it("have no default secret, and the one .dev.vars ships is refused outside development", () => {
    // This project's env is .dev.vars plus ENVIRONMENT=development, so its AUTH_SECRET is the public one.
    const shipped = env.AUTH_SECRET!;
    expect(authSecret({ AUTH_SECRET: shipped, ENVIRONMENT: "development" })).toBe(shipped);
    expect(authSecret({ AUTH_SECRET: shipped, ENVIRONMENT: "production" })).toBeNull();
    expect(authSecret({ AUTH_SECRET: shipped })).toBeNull();
    expect(authSecret({ AUTH_SECRET: SECRET, ENVIRONMENT: "production" })).toBe(SECRET);
    expect(authSecret({ AUTH_SECRET: "too-short", ENVIRONMENT: "development" })).toBeNull();
    expect(authSecret({ ENVIRONMENT: "development" })).toBeNull();
  });
});

describe("routeTemplate (the API's span names)", () => {
  it("names every route by its template, and no made-up path at all", () => {
    expect(routeTemplate("/api/guilds/g1/messages")).toBe("/api/guilds/{guild_id}/messages");
    expect(routeTemplate("/api/guilds/g1/timings/")).toBe("/api/guilds/{guild_id}/timings");
    expect(routeTemplate("/api/guilds/g1/members/u1")).toBe("/api/guilds/{guild_id}/members/{user_id}");
    expect(routeTemplate("/api/dev/token")).toBe("/api/dev/token");
    expect(routeTemplate("/api/dev/bench-room/r1")).toBe("/api/dev/bench-room/{room_id}");
    expect(routeTemplate("/gateway")).toBe("/gateway");
    for (const path of ["/api/anything-at-all-1234", "/api/guilds/g1/x7f3", "/api/guilds/g1/messages/extra", "/api/dev/x", "/api", "/gateway/extra"]) {
      expect(routeTemplate(path), path).toBeUndefined();
    }
  });
});

describe("parseClientFrame", () => {
  it.each([
    ["binary", new ArrayBuffer(4), CloseCode.DECODE_ERROR],
    ["not JSON", "{nope", CloseCode.DECODE_ERROR],
    ["an array", "[1]", CloseCode.DECODE_ERROR],
    ["a number", "3", CloseCode.DECODE_ERROR],
    ["over 16 KiB", JSON.stringify({ op: 1, d: null, pad: "x".repeat(16 * 1024) }), CloseCode.DECODE_ERROR],
    ["over 16 KiB in UTF-8 only", JSON.stringify({ op: 1, d: null, pad: "é".repeat(8200) }), CloseCode.DECODE_ERROR],
    ["unknown opcode", '{"op":42}', CloseCode.UNKNOWN_OPCODE],
    ["missing opcode", '{"d":1}', CloseCode.UNKNOWN_OPCODE],
    ["identify without token", '{"op":2,"d":{}}', CloseCode.DECODE_ERROR],
    ["resume with a negative seq", '{"op":6,"d":{"token":"t","session_id":"s","seq":-1}}', CloseCode.DECODE_ERROR],
    ["heartbeat with a string", '{"op":1,"d":"x"}', CloseCode.DECODE_ERROR],
  ])("rejects %s", (_name, data, code) => {
    const result = parseClientFrame(data);
    expect(result.ok).toBe(false);
    if (!result.ok) expect(result.code).toBe(code);
  });

  it("marks server-only opcodes so the session can answer 4003 before IDENTIFY", () => {
    expect(parseClientFrame('{"op":11}')).toMatchObject({ ok: false, code: CloseCode.UNKNOWN_OPCODE, serverOnly: true });
  });

  it("accepts the client opcodes", () => {
    expect(parseClientFrame('{"op":1,"d":null}')).toEqual({ ok: true, frame: { op: 1, d: null } });
    expect(parseClientFrame('{"op":1,"d":7}')).toEqual({ ok: true, frame: { op: 1, d: 7 } });
    expect(parseClientFrame('{"op":2,"d":{"token":"t","extra":1}}')).toEqual({ ok: true, frame: { op: 2, d: { token: "t" } } });
    expect(parseClientFrame('{"op":6,"d":{"token":"t","session_id":"s","seq":3}}')).toEqual({
      ok: true,
      frame: { op: 6, d: { token: "t", session_id: "s", seq: 3 } },
    });
  });
});

describe("Timings", () => {
  it("counts per minute and action and keeps only the last 60 minutes", () => {
    const timings = new Timings();
    const t0 = Date.UTC(2026, 0, 1, 12, 0, 5);
    timings.record("message_create", 4, t0);
    timings.record("message_create", 10, t0 + 1000);
    timings.record("subscribe", 1, t0 + 61_000);
    expect(timings.snapshot(t0 + 61_000)).toEqual([
      { minute: "2026-01-01T12:00:00.000Z", actions: { message_create: { count: 2, totalMs: 14, maxMs: 10 } } },
      { minute: "2026-01-01T12:01:00.000Z", actions: { subscribe: { count: 1, totalMs: 1, maxMs: 1 } } },
    ]);
    timings.record("history", 2, t0 + 60 * 60_000);
    expect(timings.snapshot(t0 + 60 * 60_000).map((m) => m.minute)).toEqual(["2026-01-01T12:01:00.000Z", "2026-01-01T13:00:00.000Z"]);
  });
});

const event = (seq: number): GuildEvent => ({
  type: "MESSAGE_CREATE",
  seq,
  data: "{}",
});

describe("Fanout", () => {
  const seqs = (events: Incoming<GuildEvent>[]) => events.map((e) => (e as GuildEvent).seq);

  function harness(maxInFlight: number, fail: (sessionId: string, attempt: number) => boolean = () => false, maxBacklog?: number) {
    const sent: { sessionId: string; seqs: number[] }[] = [];
    const dropped: string[] = [];
    const pending: (() => void)[] = [];
    const attempts = new Map<string, number>();
    let inFlight = 0;
    let maxSeen = 0;
    let idle = 0;
    const fanout = new Fanout<unknown>({
      maxInFlight,
      ...(maxBacklog === undefined ? {} : { maxBacklog }),
      maxAttempts: 3,
      retryDelayMs: () => 1,
      send: (recipient: Recipient<unknown>, events) => {
        inFlight++;
        maxSeen = Math.max(maxSeen, inFlight);
        const attempt = (attempts.get(recipient.id) ?? 0) + 1;
        attempts.set(recipient.id, attempt);
        return new Promise<void>((resolve, reject) => {
          pending.push(() => {
            inFlight--;
            if (fail(recipient.id, attempt)) return reject(new Error("unreachable"));
            sent.push({ sessionId: recipient.id, seqs: seqs(events) });
            resolve();
          });
        });
      },
      drop: (recipient) => dropped.push(recipient.id),
      idle: () => idle++,
    });
    const settle = async () => {
      for (let rounds = 0; rounds < 1000 && (pending.length > 0 || fanout.busy); rounds++) {
        pending.splice(0).forEach((release) => release());
        await new Promise((r) => setTimeout(r, 2));
      }
    };
    const tick = () => new Promise((r) => setTimeout(r, 2));
    return { fanout, sent, dropped, settle, tick, pending, maxInFlight: () => maxSeen, idleCalls: () => idle };
  }

  it("sends events published together in one RPC, and coalesces what queues up while it is in flight", async () => {
    const h = harness(10);
    h.fanout.add("s1", "u1", "t1");
    h.fanout.publish(() => event(1));
    h.fanout.publish(() => event(2));
    await h.tick();
    expect(h.pending).toHaveLength(1); // one RPC in flight, carrying 1 and 2
    for (let seq = 3; seq <= 5; seq++) h.fanout.publish(() => event(seq));
    await h.settle();
    expect(h.sent).toEqual([
      { sessionId: "s1", seqs: [1, 2] },
      { sessionId: "s1", seqs: [3, 4, 5] },
    ]);
  });

  it("never has more RPCs in flight than allowed, and everyone gets everything", async () => {
    const h = harness(3);
    for (let i = 0; i < 20; i++) h.fanout.add(`s${i}`, `u${i}`, `t${i}`);
    for (let seq = 1; seq <= 4; seq++) h.fanout.publish(() => event(seq));
    await h.settle();
    expect(h.maxInFlight()).toBe(3);
    for (let i = 0; i < 20; i++) {
      expect(h.sent.filter((s) => s.sessionId === `s${i}`).flatMap((s) => s.seqs)).toEqual([1, 2, 3, 4]);
    }
  });

  it("says it is idle only once the last RPC has settled and nothing is left to send", async () => {
    const h = harness(1);
    for (const id of ["a", "b"]) h.fanout.add(id, id, id);
    h.fanout.publish(() => event(1));
    await h.tick();
    h.pending.shift()!(); // a's RPC settles; b is still waiting for the slot
    await h.tick();
    expect(h.idleCalls()).toBe(0);
    h.fanout.publish(() => event(2)); // queued for a while b is in flight
    h.pending.shift()!();
    await h.tick();
    expect(h.idleCalls()).toBe(0);
    await h.settle();
    expect(h.idleCalls()).toBe(1);
    expect(h.sent.map((s) => `${s.sessionId}:${s.seqs}`)).toEqual(["a:1", "b:1", "a:2", "b:2"]);
  });

  it("says it is idle when its last RPC settled before the turn that would have sent more came", async () => {
    const h = harness(1);
    h.fanout.add("a", "a", "a");
    h.fanout.publish(() => event(1));
    await h.tick();
    h.fanout.publish(() => event(2)); // queued while 1 is in flight
    h.pending.shift()!(); // 1 settles: 2 starts at once, and a turn to send is scheduled
    await Promise.resolve();
    await Promise.resolve();
    expect(h.pending).toHaveLength(1);
    h.pending.shift()!(); // 2 settles before that turn: still busy, so not idle yet
    await Promise.resolve();
    await Promise.resolve();
    expect(h.idleCalls()).toBe(0);
    await h.tick(); // the turn finds nothing to send
    expect(h.fanout.busy).toBe(false);
    expect(h.idleCalls()).toBe(1);
    expect(h.sent).toEqual([{ sessionId: "a", seqs: [1] }, { sessionId: "a", seqs: [2] }]);
  });

  it("says it is idle while its last recipient waits out a retry's pause, and again once that retry is back", async () => {
    const h = harness(1, (_sessionId, attempt) => attempt === 1);
    h.fanout.add("a", "a", "a");
    h.fanout.publish(() => event(1));
    await h.tick();
    h.pending.shift()!(); // fails: nothing in flight while the retry waits
    await Promise.resolve();
    expect(h.fanout.busy).toBe(false);
    expect(h.idleCalls()).toBe(1);
    await h.tick(); // the pause (1 ms) is over: the retry is in flight
    expect(h.fanout.busy).toBe(true);
    await h.settle();
    expect(h.sent).toEqual([{ sessionId: "a", seqs: [1] }]);
    expect(h.idleCalls()).toBe(2);
  });

  it("retries a failing recipient in order, and drops one that keeps failing without stalling others", async () => {
    const h = harness(2, (sessionId, attempt) => (sessionId === "flaky" && attempt === 1) || sessionId === "dead");
    for (const id of ["ok", "flaky", "dead"]) h.fanout.add(id, id, id);
    h.fanout.publish(() => event(1));
    h.fanout.publish(() => event(2));
    await h.settle();
    expect(h.sent.filter((s) => s.sessionId === "ok").flatMap((s) => s.seqs)).toEqual([1, 2]);
    expect(h.sent.filter((s) => s.sessionId === "flaky").flatMap((s) => s.seqs)).toEqual([1, 2]);
    expect(h.sent.some((s) => s.sessionId === "dead")).toBe(false);
    expect(h.dropped).toEqual(["dead"]);
    expect(h.fanout.get("dead")).toBeUndefined();
  });

  it("frees the slot of a dropped recipient even when the owner's drop hook throws", async () => {
    const sent: string[] = [];
    const fanout = new Fanout<unknown>({
      maxInFlight: 1,
      maxAttempts: 1,
      send: async (recipient) => {
        if (recipient.id === "dead") throw new Error("unreachable");
        sent.push(recipient.id);
      },
      drop: () => {
        throw new Error("storage write failed");
      },
    });
    fanout.add("dead", "dead", "dead");
    fanout.add("ok", "ok", "ok");
    fanout.publish(() => event(1));
    for (let i = 0; i < 50 && fanout.busy; i++) await new Promise((r) => setTimeout(r, 2));
    expect(sent).toEqual(["ok"]);
    expect(fanout.busy).toBe(false);
    expect(fanout.get("dead")).toBeUndefined();
  });

  it("abandons the queue of a replaced recipient", async () => {
    const h = harness(5);
    h.fanout.add("s1", "u1", "old");
    h.fanout.publish(() => event(1));
    await h.tick(); // 1 is in flight to the old target
    h.fanout.publish(() => event(2));
    h.fanout.add("s1", "u1", "new", [event(2)]);
    await h.settle();
    expect(h.sent).toEqual([
      { sessionId: "s1", seqs: [1] },
      { sessionId: "s1", seqs: [2] },
    ]);
  });

  it("admits at once under the backlog bound, then makes senders wait, first come first served", async () => {
    const h = harness(10, () => false, 2);
    h.fanout.add("s1", "u1", "t1");
    h.fanout.add("s2", "u2", "t2");
    // Admitted while at most 2 events per recipient are outstanding: nothing to await.
    for (let seq = 1; seq <= 3; seq++) {
      expect(h.fanout.admit()).toBeUndefined();
      h.fanout.publish(() => event(seq));
    }
    const admitted: string[] = [];
    const first = h.fanout.admit()!.then(() => admitted.push("first"));
    const second = h.fanout.admit()!.then(() => admitted.push("second"));
    await h.tick();
    expect(admitted).toEqual([]);
    await h.settle(); // deliveries free room
    await Promise.all([first, second]);
    expect(admitted).toEqual(["first", "second"]);
    expect(h.fanout.admit()).toBeUndefined();
  });

  it("frees the backlog of recipients that leave, are replaced or are dropped", async () => {
    const h = harness(10, (sessionId) => sessionId === "dead", 1);
    for (const id of ["a", "b", "dead"]) h.fanout.add(id, id, id);
    for (let seq = 1; seq <= 3; seq++) h.fanout.publish(() => event(seq));
    let admitted = false;
    const waiting = h.fanout.admit()!.then(() => (admitted = true));
    h.fanout.remove("a");
    h.fanout.add("b", "b", "b2"); // replaced: its queue is abandoned
    await h.settle(); // "dead" fails three times and is dropped
    await waiting;
    expect(admitted).toBe(true);
    expect(h.dropped).toEqual(["dead"]);
    expect(h.fanout.admit()).toBeUndefined();
    h.fanout.publish(() => event(4));
    await h.settle();
    expect(h.sent.filter((s) => s.sessionId === "b").flatMap((s) => s.seqs)).toEqual([4]);
  });

  it("admits waiters in bursts of at most twice the bound, so memory stays bounded however many wait", async () => {
    const pending: (() => void)[] = [];
    const fanout = new Fanout<unknown>({ maxInFlight: 10, maxBacklog: 2, send: () => new Promise<void>((resolve) => pending.push(resolve)), drop: () => {} });
    fanout.add("s1", "u1", "t1");
    let seq = 0;
    for (let i = 0; i < 3; i++) fanout.publish(() => event(++seq)); // 3 > 2: over the bound
    const outstanding = () => (fanout as unknown as { outstanding: number }).outstanding;
    let mostOutstanding = 0;
    // 100 posters do what a guild's createMessage does: wait to be admitted, then publish.
    const posters = Array.from({ length: 100 }, async () => {
      await fanout.admit();
      fanout.publish(() => event(++seq));
      mostOutstanding = Math.max(mostOutstanding, outstanding());
    });
    while (seq < 103) {
      await new Promise((resolve) => setTimeout(resolve, 1));
      pending.shift()?.(); // one RPC settles at a time
    }
    await Promise.all(posters);
    expect(mostOutstanding).toBeLessThanOrEqual(4); // a burst admitted once under the bound (2) stops at twice it
  });

  it("admits every waiter that fits at once, so their messages share the next RPC", async () => {
    const batches: number[] = [];
    const pending: (() => void)[] = [];
    const fanout = new Fanout<unknown>({
      maxInFlight: 10,
      maxBacklog: 10,
      send: (_recipient, events) => (batches.push(events.length), new Promise<void>((resolve) => pending.push(resolve))),
      drop: () => {},
    });
    fanout.add("s1", "u1", "t1");
    for (let seq = 1; seq <= 11; seq++) fanout.publish(() => event(seq)); // 11 > 10: over the bound
    const posters = [12, 13, 14, 15, 16].map(async (seq) => {
      await fanout.admit();
      fanout.publish(() => event(seq));
    });
    await new Promise((resolve) => setTimeout(resolve, 1)); // events 1–11 go out in one RPC
    pending.shift()!(); // it settles: all five fit
    await Promise.all(posters);
    await new Promise((resolve) => setTimeout(resolve, 1));
    expect(batches).toEqual([11, 5]);
  });

  it("keeps its list of recipients waiting for a slot bounded while it stays saturated", async () => {
    const pending: (() => void)[] = [];
    const fanout = new Fanout<unknown>({ maxInFlight: 2, send: () => new Promise<void>((resolve) => pending.push(resolve)), drop: () => {} });
    for (let i = 0; i < 10; i++) fanout.add(`s${i}`, `u${i}`, `t${i}`);
    const readyLength = () => (fanout as unknown as { ready: unknown[] }).ready.length;
    let seq = 0;
    let longest = 0;
    for (let round = 0; round < 1300; round++) {
      fanout.publish(() => event(++seq)); // a message each round, one RPC back each round
      pending.shift()?.();
      await new Promise((resolve) => setTimeout(resolve, 0));
      longest = Math.max(longest, readyLength());
    }
    expect(longest).toBeLessThan(1100); // 10 recipients; compacted once 1,024 entries are used up (1,300 without)
  });

  it("the naive baseline has no bound", () => {
    const fanout = new Fanout<unknown>({ maxInFlight: 1, maxBacklog: 1, strategy: "naive", send: async () => {}, drop: () => {} });
    fanout.add("s1", "u1", "t1");
    for (let seq = 1; seq <= 5; seq++) fanout.publish(() => event(seq));
    expect(fanout.admit()).toBeUndefined();
  });
});

describe("OTEL_EXPORTER_OTLP_TIMEOUT", () => {
  it("defaults to 10 s, takes milliseconds, and refuses anything else", () => {
    expect(exportTimeout({})).toBe(10_000);
    expect(exportTimeout({ OTEL_EXPORTER_OTLP_TIMEOUT: "" })).toBe(10_000);
    expect(exportTimeout({ OTEL_EXPORTER_OTLP_TIMEOUT: "2500" })).toBe(2_500);
    for (const bad of ["0", "-1", "1.5", "10s", "abc"]) {
      expect(() => exportTimeout({ OTEL_EXPORTER_OTLP_TIMEOUT: bad }), bad).toThrow(/OTEL_EXPORTER_OTLP_TIMEOUT/);
    }
  });
});

describe("a bad setting", () => {
  it.each([
    ["TRACE_SAMPLE_RATE", "2"],
    ["OTEL_EXPORTER_OTLP_TIMEOUT", "10s"],
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318"],
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example/otlp/v1/traces"],
    ["AUTH_SECRET", ""],
    ["TRANSPORT_MODE", "wrapped"],
    ["FANOUT_SAMPLING", "100:2"],
    ["FANOUT_STRATEGY", "fast"],
    ["RELAY_THRESHOLD", "0"],
    ["RELAY_SIZE", "lots"],
    ["FANOUT_MAX_IN_FLIGHT", "-1"],
    ["FANOUT_MAX_BACKLOG", "1.5"],
    ["MESSAGE_RETENTION", "forever"],
    ["OTEL_EXPORTER_OTLP_HEADERS", "x-api-key"],
  ])("%s=%s: the API and the gateway answer 500 server_misconfigured, naming the setting", async (name, value) => {
    const requests = [
      new Request("http://gateway.test/api/guilds/g/messages"),
      new Request("http://gateway.test/gateway", { headers: { Upgrade: "websocket" } }),
    ];
    for (const request of requests) {
      const ctx = createExecutionContext();
      const response = await handleRequest(request, { ...env, [name]: value }, ctx);
      await waitOnExecutionContext(ctx);
      expect(response.status, request.url).toBe(500);
      const body = (await response.json()) as { error: { code: string; message: string } };
      expect(body.error.code).toBe("server_misconfigured");
      expect(body.error.message).toContain(name);
    }
  });

  it("never repeats a secret: credentials in the endpoint, or a header's value", () => {
    expect(() => parseEndpoint("https://user:s3cret@collector.example")).toThrow(/OTEL_EXPORTER_OTLP_HEADERS/);
    expect(() => parseEndpoint("https://user:s3cret@collector.example")).not.toThrow(/s3cret/);
    expect(() => parseEndpoint("user:s3cret@collector.example")).not.toThrow(/s3cret/);
    expect(() => parseEndpoint("https://user:p@ssw0rd@collector.example/")).not.toThrow(/ssw0rd/);
    expect(() => parseEndpoint("https://user:pa/ssw0rd@collector.example/")).not.toThrow(/ssw0rd/);
    expect(() => parseEndpoint("collector.example:4318")).toThrow(/OTEL_EXPORTER_OTLP_ENDPOINT is not an http/);
    // Errors reach anonymous clients: a key in the query of a mistyped endpoint is never shown.
    expect(() => parseEndpoint("htps://collector.example/v1?api_key=s3cret")).not.toThrow(/s3cret/);
    expect(() => parseHeaders("authorization=Bearer%20s3cr%E2%82%ACt")).toThrow(/printable ASCII/);
    expect(() => parseHeaders("authorization=Bearer%20s3cr%E2%82%ACt")).not.toThrow(/s3cr/);
    expect(() => parseHeaders("authorization=Bearer%20s3cret,x-bad=%E0%A4%A")).toThrow(/entry "x-bad"/);
    expect(() => parseHeaders("authorization=Bearer%20s3cret,x-bad=%E0%A4%A")).not.toThrow(/s3cret|%E0/);
    expect(() => parseHeaders("bad name=s3cret")).toThrow(/entry number 1/);
  });
});

describe("the gateway route", () => {
  it("upgrades only a GET: a HEAD with an Upgrade header gets 426 and no socket", async () => {
    for (const path of ["/gateway", "/api/dev/bench-room/r1"]) {
      const ctx = createExecutionContext();
      const response = await handleRequest(new Request(`http://gateway.test${path}`, { method: "HEAD", headers: { Upgrade: "websocket" } }), env, ctx);
      await waitOnExecutionContext(ctx);
      expect({ path, status: response.status, socket: response.webSocket !== null, body: await response.text() }).toEqual({ path, status: 426, socket: false, body: "" });
    }
  });
});

describe("SampledTracer", () => {
  it("continues a sampled parent with only the flags it knows: unknown ones are not passed on", () => {
    const ended: ReadableSpan[] = [];
    const tracer = new SampledTracer(resourceFromAttributes({ "service.name": "guildwire-guild" }), 0, (span) => ended.push(span));
    const parent = trace.setSpanContext(ROOT_CONTEXT, { traceId: "4bf92f3577b34da6a3ce929d0e0e4736", spanId: "00f067aa0ba902b7", traceFlags: 0xff });
    const span = tracer.startSpan("guild.dispatch", {}, parent);
    expect(span.spanContext().traceFlags).toBe(TraceFlags.SAMPLED);
    expect(span.spanContext().traceId).toBe("4bf92f3577b34da6a3ce929d0e0e4736");
  });
});

describe("OTEL_EXPORTER_OTLP_HEADERS", () => {
  it("reads name=value pairs with percent-encoded values, as OpenTelemetry SDKs do", () => {
    expect(parseHeaders(undefined)).toEqual({});
    expect(parseHeaders("")).toEqual({});
    expect(parseHeaders("x-honeycomb-team=abc123, Authorization=Basic%20dXNlcjpwYXNz ,x-note=cafe%2Cau%20lait,")).toEqual({
      "x-honeycomb-team": "abc123",
      authorization: "Basic dXNlcjpwYXNz",
      "x-note": "cafe,au lait",
    });
    expect(parseHeaders("x-empty=")).toEqual({ "x-empty": "" });
    expect(() => parseHeaders("=value")).toThrow();
    expect(() => parseHeaders("x-newline=a%0D%0Ab")).toThrow();
  });
});

describe("span export batching", () => {
  /** Ended spans of the session service, and an exporter that records each request's size. */
  function setup() {
    const requests: number[] = [];
    const exporter: SpanExporter = {
      export: (spans, done) => {
        requests.push(spans.length);
        done({ code: ExportResultCode.SUCCESS });
      },
      shutdown: async () => {},
    };
    const ended: ReadableSpan[] = [];
    const tracer = new SampledTracer(resourceFromAttributes({ "service.name": "guildwire-session" }), 0, (span) => ended.push(span));
    const parent = trace.setSpanContext(ROOT_CONTEXT, { traceId: "4bf92f3577b34da6a3ce929d0e0e4736", spanId: "00f067aa0ba902b7", traceFlags: TraceFlags.SAMPLED });
    const spans = (count: number) => {
      ended.length = 0;
      for (let i = 0; i < count; i++) tracer.startSpan("session.deliver", {}, parent).end();
      return ended.slice();
    };
    /** A guild's telemetry on its own queue, and the exports it hands to `waitUntil`. */
    const guildTelemetry = () => {
      const queue = new SpanExportQueue(exporter);
      const exports: Promise<unknown>[] = [];
      const ctx = { waitUntil: (promise: Promise<unknown>) => void exports.push(promise) };
      return { queue, telemetry: new Telemetry("guildwire-guild", queue, 0), exports, ctx };
    };
    return { requests, exporter, spans, guildTelemetry };
  }

  /** `Date.now()` reads `clock.now` until the test ends (timers still run in real time). */
  function frozenClock(start: number) {
    const clock = { now: start };
    vi.spyOn(Date, "now").mockImplementation(() => clock.now);
    return clock;
  }
  afterEach(() => vi.restoreAllMocks());

  it("sends at most 128 spans per request, and drops the oldest (counted) beyond 5,000 waiting", async () => {
    const { requests, exporter, spans } = setup();
    const queue = new SpanExportQueue(exporter);
    for (const span of spans(300)) queue.push(span);
    await queue.flush();
    expect(requests).toEqual([128, 128, 44]);

    const many = spans(5_001);
    for (const span of many) queue.push(span);
    expect(queue.pendingCount).toBe(4_501);
    expect(queue.take()[0]).toBe(many[500]); // the oldest 500 went
  });

  it("a backed-up queue goes out 4 requests at a time, each started only when one before it ends", async () => {
    const { spans } = setup();
    let open = 0;
    let mostOpen = 0;
    const sizes: number[] = [];
    const exporter: SpanExporter = {
      export: (batch, done) => {
        open++;
        mostOpen = Math.max(mostOpen, open);
        sizes.push(batch.length);
        // The collector answers a little later, as a real one does.
        void Promise.resolve().then(() => Promise.resolve()).then(() => {
          open--;
          done({ code: ExportResultCode.SUCCESS });
        });
      },
      shutdown: async () => {},
    };
    const queue = new SpanExportQueue(exporter);
    const all = spans(5_000);
    for (const span of all) queue.push(span);
    await queue.flush();
    expect(mostOpen).toBe(4);
    expect(sizes).toHaveLength(40);
    expect(sizes.reduce((a, b) => a + b)).toBe(5_000);
    expect(queue.pendingCount).toBe(0);
  });

  it("a flush starts no request after its timeout (the rest are dropped and counted), and an exporter that throws does not break it", async () => {
    const { spans } = setup();
    const clock = frozenClock(5_000_000);
    let requests = 0;
    // A collector that answers each request only as its timeout (10 s) runs out.
    const slow: SpanExporter = {
      export: (_batch, done) => {
        requests++;
        void Promise.resolve().then(() => {
          clock.now += 10_000;
          done({ code: ExportResultCode.FAILED, error: new Error("no answer within 10000 ms") });
        });
      },
      shutdown: async () => {},
    };
    const queue = new SpanExportQueue(slow, 10_000);
    for (const span of spans(5_000)) queue.push(span);
    await queue.flush();
    expect(requests, "the first 4 started; none after the flush's 10 s").toBe(4);
    expect(queue.droppedCount).toBe(5_000 - 4 * 128);

    const throwing = new SpanExportQueue({
      export: () => {
        throw new Error("cannot encode");
      },
      shutdown: async () => {},
    });
    for (const span of spans(300)) throwing.push(span);
    await expect(throwing.flush()).resolves.toBeUndefined();
  });

  it("while exports go wrong, warns of each kind at once, then once per 30 s with how many it held back; works again only after 30 s without a failure", async () => {
    const { spans } = setup();
    const clock = frozenClock(7_000_000);
    const warnings: string[] = [];
    vi.spyOn(console, "warn").mockImplementation((message: string) => void warnings.push(message));
    let answer: Error | undefined = new Error("collector answered 503");
    const queue = new SpanExportQueue({
      export: (_batch, done) => done(answer ? { code: ExportResultCode.FAILED, error: answer } : { code: ExportResultCode.SUCCESS }),
      shutdown: async () => {},
    });
    const exportOne = async () => {
      for (const span of spans(1)) queue.push(span);
      await queue.flush();
    };
    for (let i = 0; i < 10; i++) await exportOne();
    expect(warnings).toEqual([expect.stringMatching(/^trace export of 1 spans failed \(0 dropped so far\):$/)]);
    // A collector failing every other request: still held back, and not "working again".
    for (let i = 0; i < 10; i++) {
      answer = i % 2 ? new Error("collector answered 503") : undefined;
      clock.now += 1_000;
      await exportOne();
    }
    expect(warnings).toHaveLength(1);
    // A new kind of failure is news: at once, with the count held back so far (9 + 5).
    answer = new Error("no answer within 10000 ms");
    await exportOne();
    expect(warnings[1]).toMatch(/^trace export of 1 spans failed .*\[14 more trace export warnings held back since the last\]$/);
    // The first kind again, 30 s after it was logged.
    answer = new Error("collector answered 503");
    clock.now += EXPORT_WARNING_INTERVAL_MS - 10_000;
    await exportOne();
    expect(warnings).toHaveLength(3);
    // Through again: said once a whole interval has gone by without a failure, then at once again.
    answer = undefined;
    await exportOne();
    clock.now += EXPORT_WARNING_INTERVAL_MS - 1;
    await exportOne();
    expect(warnings).toHaveLength(3);
    clock.now += 1;
    await exportOne();
    await exportOne();
    expect(warnings.slice(3)).toEqual(["trace export works again"]);
    answer = new Error("collector answered 503");
    await exportOne();
    expect(warnings).toHaveLength(5);
    // Errors worded differently every time are one kind, not news each time.
    for (let i = 0; i < 5; i++) {
      answer = new Error(`internal error; reference = ${i}f3a9`);
      await exportOne();
    }
    expect(warnings).toHaveLength(6);
  });

  it("a guild whose fanout is sending leaves its spans for the idle hook, unless a request's worth waits or the oldest waited a second", async () => {
    const { requests, spans, guildTelemetry } = setup();
    const { queue, telemetry, exports, ctx } = guildTelemetry();
    const clock = frozenClock(1_000_000);
    for (const span of spans(2)) queue.push(span);
    telemetry.exportWhenDue(ctx, true);
    expect(exports, "busy, 2 spans, fresh: left for the idle hook").toHaveLength(0);
    clock.now += EXPORT_DELAY_MS - 1;
    telemetry.exportWhenDue(ctx, true);
    expect(exports).toHaveLength(0);
    clock.now += 1;
    telemetry.exportWhenDue(ctx, true);
    expect(exports, "the oldest waited a second").toHaveLength(1);

    for (const span of spans(128)) queue.push(span);
    telemetry.exportWhenDue(ctx, true);
    expect(exports, "a full request's worth").toHaveLength(2);

    for (const span of spans(1)) queue.push(span);
    telemetry.exportWhenDue(ctx, false);
    expect(exports, "nothing under way: at once").toHaveLength(3);
    telemetry.exportWhenDue(ctx, false);
    expect(exports, "nothing waiting: nothing sent").toHaveLength(3);
    await Promise.all(exports);
    expect(requests).toEqual([2, 128, 1]);
  });

  it("a guild's spans wait for its relays' RPCs: exported once they all settle, or as one settles after a second", async () => {
    const { requests, spans, guildTelemetry } = setup();
    const { queue, telemetry, exports, ctx } = guildTelemetry();
    const answers: (() => void)[] = [];
    const relayStub = { publish: () => new Promise<void>((resolve) => answers.push(resolve)) } as unknown as RelayStub;
    const RELAY = { idFromName: (name: string) => name, get: () => relayStub } as unknown as Env["RELAY"];
    const fanout = new Fanout<RelayStub>(relayFanoutOptions({ env: { RELAY }, ctx, config: deliveryConfig(env), telemetry }));
    fanout.add("g/relay/0", "", "g/relay/0");
    const tick = () => new Promise((r) => setTimeout(r, 2));
    const clock = frozenClock(9_000_000);
    fanout.publish(() => event(1));
    for (const span of spans(2)) queue.push(span); // guild.dispatch and guild.fanout
    telemetry.exportWhenDue(ctx, fanout.busy);
    await tick();
    expect(answers, "the relay's RPC is in flight").toHaveLength(1);
    expect(exports, "left for the idle hook").toHaveLength(0);
    answers.shift()!();
    await tick();
    expect(exports, "the relays settled: exported").toHaveLength(1);

    fanout.publish(() => event(2));
    await tick();
    for (const span of spans(1)) queue.push(span);
    fanout.publish(() => event(3)); // queued behind 2: the fanout stays busy
    clock.now += EXPORT_DELAY_MS;
    answers.shift()!();
    await tick();
    expect(exports, "still sending, but the span waited a second").toHaveLength(2);
    answers.shift()!();
    await tick();
    await Promise.all(exports);
    expect(requests).toEqual([2, 1]);
  });

  it("a fanout exports the spans sessions hand back once a request's worth waits, and skips records it cannot read", async () => {
    const { requests, spans, guildTelemetry } = setup();
    const { telemetry, exports, ctx } = guildTelemetry();
    const records = spans(100).map(toSpanRecord);
    telemetry.adoptSpans(structuredClone(records), ctx);
    expect(exports, "100 waiting: not yet").toHaveLength(0);
    telemetry.adoptSpans([...structuredClone(records), { name: "not a record" } as unknown as SpanRecord], ctx);
    expect(exports, "200 waiting: exported").toHaveLength(1);
    await Promise.all(exports);
    expect(requests).toEqual([128, 72]);
  });
});

describe("SpanRecord", () => {
  it("carries an ended span through structured clone and serializes to the same OTLP as the span itself", () => {
    const ended: ReadableSpan[] = [];
    const tracer = new SampledTracer(resourceFromAttributes({ "service.name": "guildwire-session" }), 0, (span) => ended.push(span));
    const parent = trace.setSpanContext(ROOT_CONTEXT, {
      traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
      spanId: "00f067aa0ba902b7",
      traceFlags: TraceFlags.SAMPLED,
      traceState: createTraceState("vendor=a,other=b"),
    });
    const span = tracer.startSpan("session.deliver", { kind: SpanKind.CONSUMER, attributes: { "guildwire.seq": 7 } }, parent);
    span.addEvent("dispatched", { frames: 2 });
    span.setStatus({ code: SpanStatusCode.ERROR, message: "socket closed" });
    span.end();

    const revived = fromSpanRecord(structuredClone(toSpanRecord(ended[0]!)));
    const decode = (spans: ReadableSpan[]) => JSON.parse(new TextDecoder().decode(JsonTraceSerializer.serializeRequest(spans)));
    expect(decode([revived])).toEqual(decode(ended));
    expect(revived.spanContext().traceState?.get("vendor")).toBe("a");
    expect(revived.parentSpanContext?.spanId).toBe("00f067aa0ba902b7");
    // Spans of one service share a resource, so a batch names it once.
    const twice = decode([revived, fromSpanRecord(structuredClone(toSpanRecord(ended[0]!)))]);
    expect(twice.resourceSpans).toHaveLength(1);
    expect(twice.resourceSpans[0].scopeSpans[0].spans).toHaveLength(2);
  });
});

describe("FanoutCheckpoint", () => {
  /** A fresh object's SQLite storage, and how many alarms the checkpoint sets (the runtime's alarms are exercised by the gateway tests). */
  const withCheckpoints = <R>(fn: (open: () => FanoutCheckpoint, alarms: { set: number }) => R | Promise<R>) =>
    runInDurableObject(env.SESSION.get(env.SESSION.newUniqueId()), (_instance, state) => {
      const alarms = { set: 0 };
      const storage = { setAlarm: async () => void alarms.set++ };
      return fn(() => new FanoutCheckpoint(state.storage.sql, storage), alarms);
    });
  /** What a new instance (after a restart) resends: the range of the newest events it owes, if any. */
  const resentAfterRestart = async (open: () => FanoutCheckpoint) => {
    const resent: [number, number][] = [];
    await open().recover(async (first, last) => void resent.push([first, last]));
    return resent;
  };

  it("after a restart resends what was owed (its newest MAX_RESEND events), and nothing once everything was handed over", async () => {
    await withCheckpoints(async (open, alarms) => {
      const checkpoint = open();
      for (const seq of [1, 2, 3, 4, 5]) checkpoint.accept(seq);
      expect(alarms.set).toBe(1); // one alarm while one is pending, not one per event
      expect(await resentAfterRestart(open)).toEqual([[1, 5]]);
      checkpoint.progress(4); // 4 is the oldest still queued somewhere
      expect(await resentAfterRestart(open)).toEqual([[4, 5]]);
      checkpoint.progress(null); // cannot tell (events in transit): no progress
      expect(await resentAfterRestart(open)).toEqual([[4, 5]]);
      checkpoint.progress(undefined); // drained
      expect(await resentAfterRestart(open)).toEqual([]);
      checkpoint.accept(6);
      checkpoint.accept(7);
      expect(await resentAfterRestart(open)).toEqual([[6, 7]]);
      const before = alarms.set; // (counted across instances: each restarted one sets one after resending)
      checkpoint.accept(8);
      expect(alarms.set).toBe(before); // this instance's first alarm is still pending: it will look in
      await checkpoint.alarm(async () => expect.fail("nothing was lost"), () => 7);
      expect(alarms.set).toBe(before + 1); // still busy: look in again later
      checkpoint.accept(9);
      expect(alarms.set).toBe(before + 1);
      await checkpoint.alarm(async () => expect.fail("nothing was lost"), () => undefined);
      expect(alarms.set).toBe(before + 1); // drained: no alarm until it is busy again
      expect(await resentAfterRestart(open)).toEqual([]);
      for (let seq = 10; seq <= 100; seq++) checkpoint.accept(seq);
      expect(await resentAfterRestart(open)).toEqual([[100 - MAX_RESEND + 1, 100]]); // sessions pull anything older
    });
  });

  it("owes an older event queued again after progress passed it (a backlog moved here)", async () => {
    await withCheckpoints(async (open) => {
      const checkpoint = open();
      for (const seq of [1, 2, 3]) checkpoint.accept(seq);
      checkpoint.progress(undefined);
      expect(await resentAfterRestart(open)).toEqual([]);
      checkpoint.accept(2, 3);
      expect(await resentAfterRestart(open)).toEqual([[2, 3]]);
      checkpoint.progress(3); // 2 is out, 3 still queued
      expect(await resentAfterRestart(open)).toEqual([[3, 3]]);
    });
  });

  it("owes the newest MAX_RESEND events again when told backlogs may be gone, even across a restart or a resend under way", async () => {
    await withCheckpoints(async (open) => {
      const checkpoint = open();
      for (let seq = 1; seq <= 50; seq++) checkpoint.accept(seq);
      checkpoint.progress(undefined);
      checkpoint.resendRecent(); // a relay sync failed
      checkpoint.progress(undefined); // the fanout drains meanwhile: still owed
      expect(await resentAfterRestart(open)).toEqual([[50 - MAX_RESEND + 1, 50]]);
      let finish!: () => void;
      const resent: [number, number][] = [];
      const first = checkpoint.recover(async (from, to) => {
        resent.push([from, to]);
        await new Promise<void>((resolve) => (finish = resolve));
      });
      checkpoint.accept(51);
      checkpoint.resendRecent(); // fails again while the first resend is under way
      finish();
      await first;
      await checkpoint.recover(async (from, to) => void resent.push([from, to]));
      expect(resent).toEqual([[19, 50], [19, 51]]);
      expect(checkpoint.recover(async () => expect.fail("resent three times"))).toBeUndefined();
    });
  });

  it("owes nothing from before it began (a guild with history, upgraded)", async () => {
    await withCheckpoints(async (open) => {
      const checkpoint = open();
      checkpoint.accept(501);
      checkpoint.progress(undefined);
      expect(await resentAfterRestart(open)).toEqual([]);
    });
  });

  it("keeps what a restart lost until a resend succeeds, shares one resend among callers, and makes no progress meanwhile", async () => {
    await withCheckpoints(async (open) => {
      open().accept(1);
      open().accept(2); // the first instance restarted before handing 1 over; this one is cut short too
      const restarted = open();
      restarted.progress(undefined); // its own fanout is idle, but what the last instance lost is still owed
      const attempts: [number, number][] = [];
      await restarted
        .recover(async (first, last) => {
          attempts.push([first, last]);
          throw new Error("guild unreachable");
        })
        ?.then(() => expect.fail("resolved"), (error: unknown) => expect(String(error)).toContain("unreachable"));
      let finish!: () => void;
      const slow = restarted.recover(async (first, last) => {
        attempts.push([first, last]);
        await new Promise<void>((resolve) => (finish = resolve));
      });
      const second = restarted.recover(async () => expect.fail("a second resend while one is under way"));
      restarted.accept(3);
      restarted.progress(undefined); // a new message went out meanwhile: the lost one is still owed
      expect(await resentAfterRestart(open)).toEqual([[1, 3]]);
      finish();
      await Promise.all([slow, second]);
      expect(attempts).toEqual([[1, 2], [1, 2]]);
      expect(restarted.recover(async () => expect.fail("resent twice"))).toBeUndefined();
    });
  });
});

describe("DropNotices", () => {
  it("keeps a notice until the session answers, owes another for a drop while one is on its way, and gives up on one unreachable for long", async () => {
    await runInDurableObject(env.SESSION.get(env.SESSION.newUniqueId()), async (_instance, state) => {
      const told: string[] = [];
      let answer: (target: string) => Promise<void> = async () => {};
      const sessions = { idFromString: (id: string) => id, get: (id: string) => ({ guildDropped: () => answer(id).then(() => void told.push(id)) }) };
      let alarms = 0;
      const ctx = { waitUntil: () => {} } as unknown as DurableObjectState; // first attempts left to the alarm here
      const notices = new DropNotices(state.storage.sql, ctx, sessions as unknown as DurableObjectNamespace<Session>, () => "g", () => void alarms++);
      const owed = () => state.storage.sql.exec<{ target: string }>("SELECT target FROM drop_notices ORDER BY target").toArray().map((r) => r.target);

      // Unreachable: kept, with an alarm to try again.
      answer = async () => {
        throw new Error("unreachable");
      };
      notices.owe("s1");
      expect(alarms).toBe(1);
      await notices.alarm();
      expect(owed()).toEqual(["s1"]);
      expect(alarms).toBe(2);

      // Dropped again while the notice is on its way: told again after it answers.
      let release!: () => void;
      answer = () => new Promise<void>((resolve) => (release = resolve));
      const first = notices.alarm();
      await new Promise((r) => setTimeout(r, 10));
      notices.owe("s1");
      release();
      await first;
      expect(told).toEqual(["s1"]);
      expect(owed()).toEqual(["s1"]);
      answer = async () => {};
      await notices.alarm();
      expect(told).toEqual(["s1", "s1"]);
      expect(owed()).toEqual([]);

      // Unreachable past the give-up time: dropped from the list.
      answer = async () => {
        throw new Error("unreachable");
      };
      notices.owe("s2");
      state.storage.sql.exec("UPDATE drop_notices SET owed_since = 0");
      await notices.alarm();
      expect(owed()).toEqual([]);
    });
  });
});

describe("ResumeBuffer", () => {
  /** A fresh object's SQLite storage (a Session's, which has no tables until it holds a session). */
  const inFreshStorage = <R>(fn: (sql: SqlStorage) => R) =>
    runInDurableObject(env.SESSION.get(env.SESSION.newUniqueId()), (_instance, state) => fn(state.storage.sql));
  const dispatch = (s: number, guildId?: string, guildSeq?: number) => ({ s, frame: `{"s":${s}}`, guildId, guildSeq });

  it("keeps each guild's position in its runs, and saves it before trimming them", async () => {
    const result = await inFreshStorage((sql) => {
      const buffer = new ResumeBuffer(sql);
      const start = Date.now() - 10 * 60_000;
      buffer.setPosition("a", 0);
      buffer.setPosition("b", 40);
      buffer.append([dispatch(1, "a", 1), dispatch(2, "a", 2), dispatch(3, "b", 41), dispatch(4)], start);
      const beforeTrim = Object.fromEntries(new ResumeBuffer(sql).positions()); // as after eviction
      // 1,100 newer dispatches from guild b, old enough that guild a's rows are trimmed.
      for (let s = 5; s < 1105; s += 20) {
        buffer.append(Array.from({ length: 20 }, (_, i) => dispatch(s + i, "b", 37 + s + i)), start + 1);
      }
      // 256 dispatches now: a trim is due, and it drops every run older than a minute but the last 1,000.
      buffer.append(Array.from({ length: 256 }, (_, i) => dispatch(1105 + i, "b", 1142 + i)));
      return {
        beforeTrim,
        afterTrim: Object.fromEntries(new ResumeBuffer(sql).positions()),
        oldest: buffer.oldestSeq(),
        unsubscribed: (buffer.deletePosition("a"), Object.fromEntries(buffer.positions())),
      };
    });
    expect(result.beforeTrim).toEqual({ a: 2, b: 41 });
    expect(result.oldest).toBe(345); // guild a's runs are gone; the run holding seq 361 (345–364) is whole…
    expect(result.afterTrim).toEqual({ a: 2, b: 1397 }); // …its position is not
    expect(result.unsubscribed).toEqual({ b: 1397 });
  });

  it("stores a delivery in one row, and starts a new row at a gap, at another guild, or when the row is full", async () => {
    const big = "x".repeat(100 * 1024); // two of these exceed a row's 128 Ki units
    const result = await inFreshStorage((sql) => {
      const buffer = new ResumeBuffer(sql);
      buffer.setPosition("a", 0);
      buffer.setPosition("b", 0);
      buffer.append([dispatch(1), dispatch(2, "a", 1), dispatch(3, "a", 2), dispatch(4)]);
      buffer.append([dispatch(5, "b", 1), dispatch(6, "a", 3), dispatch(8, "a", 4)]);
      buffer.append([{ s: 9, frame: big }, { s: 10, frame: big }]);
      const rows = sql.exec("SELECT first_s, last_s, guild_id, guild_seq FROM dispatch_runs ORDER BY first_s").toArray();
      return {
        rows: rows.map((row) => [row.first_s, row.last_s, row.guild_id, row.guild_seq]),
        after2: buffer.framesAfter(2).map(({ s, frame }) => [s, frame.length < 20 ? frame : frame.length]),
        positions: Object.fromEntries(new ResumeBuffer(sql).positions()),
        lastSeq: new ResumeBuffer(sql).lastSeq(),
      };
    });
    expect(result.rows).toEqual([
      [1, 4, "a", 2],
      [5, 5, "b", 1],
      [6, 6, "a", 3],
      [8, 8, "a", 4],
      [9, 9, null, null],
      [10, 10, null, null],
    ]);
    // Read back from the middle of a run, frame for frame.
    expect(result.after2).toEqual([
      [3, '{"s":3}'],
      [4, '{"s":4}'],
      [5, '{"s":5}'],
      [6, '{"s":6}'],
      [8, '{"s":8}'],
      [9, 100 * 1024],
      [10, 100 * 1024],
    ]);
    expect(result.positions).toEqual({ a: 4, b: 1 });
    expect(result.lastSeq).toBe(10);
  });

  it("writes more runs than one statement binds (alternating guilds: a run each)", async () => {
    const frames = await inFreshStorage((sql) => {
      const buffer = new ResumeBuffer(sql);
      buffer.append(Array.from({ length: 40 }, (_, i) => dispatch(i + 1, i % 2 ? "a" : "b", i + 1)));
      return { rows: sql.exec("SELECT COUNT(*) AS n FROM dispatch_runs").one().n, seqs: buffer.framesAfter(0).map((f) => f.s) };
    });
    expect(frames.rows).toBe(40);
    expect(frames.seqs).toEqual(Array.from({ length: 40 }, (_, i) => i + 1));
  });

  it("keeps frames byte for byte, and takes frames handed over after a clear", async () => {
    const awkward = '{"d":{"content":"line\\nbreak \\"quoted\\" \\u2028 é 🎉 \\\\"}} raw: \u2028 \ud800 \u0000';
    const result = await inFreshStorage((sql) => {
      const buffer = new ResumeBuffer(sql);
      buffer.append([dispatch(1), { s: 2, frame: awkward }, dispatch(3), dispatch(4)]);
      const kept = buffer.framesAfter(0);
      buffer.clear();
      buffer.takeHandedOver([{ s: 3, frame: "three" }]);
      buffer.takeHandedOver([
        { s: 4, frame: "four" },
        { s: 5, frame: "five" },
      ]);
      return { kept, restored: buffer.framesAfter(0), lastSeq: buffer.lastSeq() };
    });
    expect(result.kept[1]).toEqual({ s: 2, frame: awkward });
    expect(result.restored).toEqual([
      { s: 3, frame: "three" },
      { s: 4, frame: "four" },
      { s: 5, frame: "five" },
    ]);
    expect(result.lastSeq).toBe(5);
  });

  it("reads frames in pages of a given size, from the middle of a run, one frame at least", async () => {
    const pages = await inFreshStorage((sql) => {
      const buffer = new ResumeBuffer(sql);
      buffer.append(Array.from({ length: 10 }, (_, i) => ({ s: i + 1, frame: "x".repeat(100) })));
      const seqs = (page: { frames: { s: number }[]; more: boolean }) => ({ seqs: page.frames.map((f) => f.s), more: page.more });
      return {
        fromMiddle: seqs(buffer.agedFramesAfter(2, 250)),
        last: seqs(buffer.agedFramesAfter(8, 250)),
        tooSmall: seqs(buffer.agedFramesAfter(0, 1)),
        whole: seqs(buffer.agedFramesAfter(0)),
      };
    });
    expect(pages.fromMiddle).toEqual({ seqs: [3, 4, 5], more: true });
    expect(pages.last).toEqual({ seqs: [9, 10], more: false });
    expect(pages.tooSmall).toEqual({ seqs: [1], more: true });
    expect(pages.whole).toEqual({ seqs: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], more: false });
  });

  it("stays bounded in a session that hibernates between deliveries (a new buffer object per wake-up)", async () => {
    // A session in a quiet guild is evicted (hibernation) between deliveries, so every delivery
    // is appended by a freshly constructed ResumeBuffer (Session's constructor makes one). 2,000
    // such wake-ups a second apart (33 minutes): the buffer must keep about 1,000 dispatches
    // (plus a trim interval), not all of them.
    const rows = await inFreshStorage((sql) => {
      const start = Date.now() - 2000 * 1000;
      for (let s = 1; s <= 2000; s++) new ResumeBuffer(sql).append([dispatch(s, "quiet", s)], start + s * 1000);
      return sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM dispatch_runs").one().n;
    });
    expect(rows).toBeLessThanOrEqual(1000 + 256);
  });

  it("upgrades buffers that kept a row per dispatch, with or without positions, keeping frames and positions", async () => {
    const result = await inFreshStorage((sql) => {
      const upgrade = (table: string, rows: string) => {
        sql.exec(`DROP TABLE IF EXISTS dispatch_runs; DROP TABLE IF EXISTS guilds; CREATE TABLE guilds (guild_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL); CREATE TABLE dispatches (${table}); INSERT INTO dispatches VALUES ${rows}`);
        sql.exec("INSERT INTO guilds VALUES ('g', 7)");
        const buffer = new ResumeBuffer(sql);
        const positions = Object.fromEntries(buffer.positions());
        buffer.append([dispatch(3, "g", 9)]);
        const tables = sql.exec("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'dispatches'").toArray();
        return { frames: buffer.framesAfter(0), positions, oldTable: tables.length };
      };
      return {
        withoutPositions: upgrade("s INTEGER PRIMARY KEY, frame TEXT NOT NULL, at INTEGER NOT NULL", "(1, 'one', 0), (2, 'two', 0)"),
        withPositions: upgrade(
          "s INTEGER PRIMARY KEY, frame TEXT NOT NULL, at INTEGER NOT NULL, guild_id TEXT, guild_seq INTEGER",
          "(1, 'one', 0, 'g', 8), (2, 'two', 0, NULL, NULL)",
        ),
      };
    });
    const frames = [
      { s: 1, frame: "one" },
      { s: 2, frame: "two" },
      { s: 3, frame: '{"s":3}' },
    ];
    expect(result.withoutPositions).toEqual({ frames, positions: { g: 7 }, oldTable: 0 });
    expect(result.withPositions).toEqual({ frames, positions: { g: 8 }, oldTable: 0 }); // the row's position outranks the table's
  });
});
