import { SELF, env, runInDurableObject } from "cloudflare:test";
import { SpanStatusCode } from "@opentelemetry/api";
import type { ReadableSpan } from "@opentelemetry/sdk-trace-base";
import { beforeEach, describe, expect, it } from "vitest";
import type { GuildEvent } from "../../src/guild/events.ts";
import { fanoutSampleRate, keepSampled, wrap } from "../../src/transport/index.ts";
import { TestClient, addMember, patchMethod, token } from "./gateway-client.ts";
import { recordedSpans } from "./tracing.ts";

const service = (span: ReadableSpan) => span.resource.attributes["service.name"];
const ours = () => recordedSpans.getFinishedSpans().filter((s) => String(service(s)).startsWith("guildwire-"));

function traceparent(traceId: string, sampled: boolean): string {
  return `00-${traceId}-b7ad6b7169203331-${sampled ? "01" : "00"}`;
}

function randomTraceId(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function postWithHeaders(guildId: string, as: string, headers: Record<string, string>): Promise<Response> {
  return SELF.fetch(`http://gateway.test/api/guilds/${guildId}/messages`, {
    method: "POST",
    headers: { Authorization: `Bearer ${await token(as)}`, ...headers },
    body: JSON.stringify({ content: "traced" }),
  });
}

/** Connects `count` identified sessions of distinct members of `guildId`. */
async function sessions(guildId: string, count: number): Promise<{ clients: TestClient[]; ids: string[] }> {
  const users = Array.from({ length: count }, (_, i) => `${guildId}-u${i}`);
  for (const user of users) await addMember(guildId, user);
  const clients = await Promise.all(users.map(() => TestClient.connect()));
  const ids = await Promise.all(clients.map((client, i) => client.identify(users[i]!)));
  // Setting up members went through the API, which traces too: start each test from nothing.
  await scheduler.wait(20);
  recordedSpans.reset();
  return { clients, ids };
}

async function waitForSpans(predicate: (spans: ReadableSpan[]) => boolean, what: string): Promise<ReadableSpan[]> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const spans = ours();
    if (predicate(spans)) return spans;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; have ${spans.map((s) => `${service(s)}:${s.name}`).join(", ")}`);
    await scheduler.wait(20);
  }
}

beforeEach(() => recordedSpans.reset());

describe("a sampled message is one trace: API → guild dispatch → fanout → sampled sessions", () => {
  it.each([1, 5, 100])("to %i sessions", async (count) => {
    const guildId = `traced-${count}`;
    const { clients, ids } = await sessions(guildId, count);
    const traceId = randomTraceId();
    const response = await postWithHeaders(guildId, `${guildId}-u0`, { traceparent: traceparent(traceId, true) });
    expect(response.status).toBe(201);
    for (const client of clients) await client.waitFor(() => client.messageSeqs().length === 1, "the message");

    const rate = fanoutSampleRate(count);
    const chosen = ids.filter((id) => keepSampled(traceId, id, rate));
    const spans = await waitForSpans(
      (s) =>
        s.filter((x) => x.name === "session.deliver").length === chosen.length &&
        s.some((x) => x.name === "guild.fanout") &&
        s.some((x) => service(x) === "guildwire-api"),
      "delivery spans",
    );
    expect(spans.every((s) => s.spanContext().traceId === traceId)).toBe(true);

    const api = spans.find((s) => service(s) === "guildwire-api")!;
    expect(api.name).toBe("POST /api/guilds/{guild_id}/messages");
    expect(api.parentSpanContext?.spanId).toBe("b7ad6b7169203331");
    const dispatch = spans.find((s) => s.name === "guild.dispatch")!;
    expect(service(dispatch)).toBe("guildwire-guild");
    expect(dispatch.parentSpanContext?.spanId).toBe(api.spanContext().spanId);
    const fanout = spans.find((s) => s.name === "guild.fanout")!;
    expect(service(fanout)).toBe("guildwire-guild");
    expect(fanout.parentSpanContext?.spanId).toBe(dispatch.spanContext().spanId);
    expect(fanout.attributes["messaging.batch.message_count"]).toBe(count);
    expect(fanout.attributes["guildwire.fanout.sampled_recipients"]).toBe(chosen.length);

    const deliveries = spans.filter((s) => s.name === "session.deliver");
    for (const delivery of deliveries) {
      expect(service(delivery)).toBe("guildwire-session");
      expect(delivery.parentSpanContext?.spanId).toBe(fanout.spanContext().spanId);
    }
    if (count === 1) expect(deliveries).toHaveLength(1);
  });

  it("keeps the tier's share of recipients across many traces (100 sessions → 10%)", async () => {
    const guildId = "tier-stats";
    const { clients } = await sessions(guildId, 100);
    const messages = 10;
    for (let i = 0; i < messages; i++) {
      expect((await postWithHeaders(guildId, `${guildId}-u${i}`, { traceparent: traceparent(randomTraceId(), true) })).status).toBe(201);
    }
    for (const client of clients) await client.waitFor(() => client.messageSeqs().length === messages, "all messages");
    const isFanout = (x: ReadableSpan) => x.name === "guild.fanout";
    const fanouts = (await waitForSpans((s) => s.filter(isFanout).length === messages, "fanout spans")).filter(isFanout);
    const expected = fanouts.reduce((n, f) => n + Number(f.attributes["guildwire.fanout.sampled_recipients"]), 0);
    const spans = await waitForSpans((s) => s.filter((x) => x.name === "session.deliver").length === expected, `${expected} delivery spans`);
    const sampled = spans.filter((x) => x.name === "session.deliver").length;
    // 1,000 recipient decisions at 10%: mean 100, sigma 9.5; 4 sigma never flakes and still catches a wrong tier.
    expect(sampled).toBeGreaterThan(62);
    expect(sampled).toBeLessThan(138);
  });
});

describe("sessions hand their delivery spans back to the fanout", () => {
  it("returns the span to a caller that exports for it, and exports it itself for a caller that does not ask", async () => {
    const guildId = "hand-back";
    const { clients, ids } = await sessions(guildId, 1);
    const session = env.SESSION.get(env.SESSION.idFromString(ids[0]!));
    const traceId = randomTraceId();
    const carrier = { traceparent: traceparent(traceId, true) };
    const event = (seq: number): GuildEvent => ({
      type: "MESSAGE_CREATE",
      seq,
      data: JSON.stringify({ id: `m${seq}`, guild_id: guildId, author_id: "someone", content: "hi", seq, timestamp: new Date().toISOString() }),
    });

    const asked = await session.deliver({ guildId, events: [event(1), wrap(event(2), { carrier })], returnSpans: true });
    expect(asked?.spans?.map((span) => span.name)).toEqual(["session.deliver"]);
    const record = asked!.spans![0]!;
    expect(record.context.traceId).toBe(traceId);
    expect(record.parent?.spanId).toBe("b7ad6b7169203331");
    expect(record.resource["service.name"]).toBe("guildwire-session");
    await scheduler.wait(100);
    expect(ours(), "the session exported nothing itself").toEqual([]);

    // An older guild or relay does not ask: the session exports its span, and returns nothing.
    expect(await session.deliver({ guildId, events: [wrap(event(3), { carrier })] })).toBeUndefined();
    const exported = await waitForSpans((spans) => spans.some((x) => x.name === "session.deliver"), "the exported delivery span");
    // Exactly one: the span handed back above was not exported by the session as well.
    expect(exported.map((span) => span.spanContext().traceId)).toEqual([traceId]);
    // Unsampled, nothing comes back.
    expect(await session.deliver({ guildId, events: [event(4)], returnSpans: true })).toBeUndefined();
    // A repeat (a retried RPC) delivers nothing, so it records no span either.
    expect(await session.deliver({ guildId, events: [wrap(event(2), { carrier })], returnSpans: true })).toBeUndefined();
    await clients[0]!.waitFor(() => clients[0]!.messageSeqs(guildId).length === 4, "all four events");
    expect(clients[0]!.messageSeqs(guildId)).toEqual([1, 2, 3, 4]);
  });
});

describe("a sampled event in a delivery", () => {
  it("costs no write of its own: the delivery is one row in the resume buffer, sampled or not", async () => {
    const guildId = "one-row";
    const { clients, ids } = await sessions(guildId, 1);
    const session = env.SESSION.get(env.SESSION.idFromString(ids[0]!));
    const rows = () => runInDurableObject(session, (_: unknown, state: DurableObjectState) => state.storage.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM dispatch_runs").one().n);
    const event = (seq: number): GuildEvent => ({ type: "MESSAGE_CREATE", seq, data: JSON.stringify({ id: `m${seq}`, guild_id: guildId, author_id: "someone", content: "hi", seq, timestamp: new Date().toISOString() }) });
    const carrier = { traceparent: traceparent(randomTraceId(), true) };
    const before = await rows();

    // Sampled events first, in the middle and last, among unsampled ones.
    const events = [wrap(event(1), { carrier }), event(2), wrap(event(3), { carrier }), event(4), wrap(event(5), { carrier })];
    const result = await session.deliver({ guildId, events, returnSpans: true });
    expect(await rows()).toBe(before + 1);
    expect(result?.spans?.map((span) => span.name)).toEqual(["session.deliver", "session.deliver", "session.deliver"]);
    await clients[0]!.waitFor(() => clients[0]!.messageSeqs(guildId).length === 5, "all five events");
    expect(clients[0]!.messageSeqs(guildId)).toEqual([1, 2, 3, 4, 5]);

    // After a gap, a sampled event still gets its span, ended once the gap fill and the delivery
    // are done. (The guild's log has nothing to fill this one with, so the event is left out
    // rather than shown past the gap.)
    const afterGap = await session.deliver({ guildId, events: [wrap(event(8), { carrier })], returnSpans: true });
    expect(afterGap?.spans?.map((span) => span.name)).toEqual(["session.deliver"]);
    expect(clients[0]!.messageSeqs(guildId)).toEqual([1, 2, 3, 4, 5]);
  });

  it("exports a failed dispatch's span at once, with its error", async () => {
    const guildId = "dispatch-fails";
    await sessions(guildId, 1);
    const restore = await patchMethod<{ guildId: string }>(env.GUILD.get(env.GUILD.idFromName(guildId)), "publish", function (self, original, args) {
      if (self.guildId === guildId) throw new Error("fanout broke");
      return original(...args);
    });
    try {
      const response = await postWithHeaders(guildId, `${guildId}-u0`, { traceparent: traceparent(randomTraceId(), true) });
      expect(response.status).toBe(500);
      const spans = await waitForSpans((s) => s.some((x) => x.name === "guild.dispatch"), "the failed dispatch's span");
      expect(spans.find((x) => x.name === "guild.dispatch")!.status.code).toBe(SpanStatusCode.ERROR);
    } finally {
      restore();
    }
  });

  it("ends with the delivery's failure when a later event's gap cannot be filled", async () => {
    const guildId = "fill-fails";
    const { ids } = await sessions(guildId, 1);
    const session = env.SESSION.get(env.SESSION.idFromString(ids[0]!));
    const event = (seq: number): GuildEvent => ({ type: "MESSAGE_CREATE", seq, data: JSON.stringify({ id: `m${seq}`, guild_id: guildId, author_id: "someone", content: "hi", seq, timestamp: new Date().toISOString() }) });
    const carrier = { traceparent: traceparent(randomTraceId(), true) };
    // The guild's log becomes unreachable (put back below: every guild in this isolate shares the method).
    const restore = await patchMethod(env.GUILD.get(env.GUILD.idFromName(guildId)), "eventsAfter", async () => {
      throw new Error("guild log unreachable");
    });
    try {
      // Event 1 goes out fine; event 3 needs event 2 from the guild, which fails the delivery.
      const failed = await session.deliver({ guildId, events: [wrap(event(1), { carrier }), wrap(event(3), { carrier })], returnSpans: true }).then(
        () => "delivered",
        (error: Error) => error.message,
      );
      expect(failed).toMatch(/guild log unreachable/);
    } finally {
      restore();
    }
    // Both spans failed (event 1's too, though its frame was stored and sent: the delivery failed
    // and will be retried). No result carries them back, so the session exports them itself, at
    // once: no later delivery need come.
    const failedSpans = await waitForSpans((s) => s.filter((x) => x.name === "session.deliver").length === 2, "the failed delivery's spans");
    expect(failedSpans.filter((x) => x.name === "session.deliver").map((span) => span.status.code)).toEqual([SpanStatusCode.ERROR, SpanStatusCode.ERROR]);
    const next = await session.deliver({ guildId, events: [event(2)], returnSpans: true });
    expect(next?.spans).toBeUndefined();
  });
});

describe("unsampled traffic costs nothing", () => {
  it("creates no span anywhere for a valid unsampled traceparent, and still delivers", async () => {
    const { clients } = await sessions("unsampled", 3);
    const response = await postWithHeaders("unsampled", "unsampled-u0", { traceparent: traceparent(randomTraceId(), false) });
    expect(response.status).toBe(201);
    for (const client of clients) await client.waitFor(() => client.messageSeqs().length === 1, "the message");
    await scheduler.wait(100);
    expect(ours()).toEqual([]);
    // A sampled message after it is traced by the same objects: once its fanout span is in,
    // anything the first had made would be too, and every span there is is the second's.
    const sampled = randomTraceId();
    expect((await postWithHeaders("unsampled", "unsampled-u0", { traceparent: traceparent(sampled, true) })).status).toBe(201);
    await waitForSpans((spans) => spans.some((s) => s.name === "guild.fanout"), "the sampled message's fanout span");
    for (const client of clients) await client.waitFor(() => client.messageSeqs().length === 2, "the sampled message");
    expect(new Set(ours().map((s) => s.spanContext().traceId))).toEqual(new Set([sampled]));
  });

  it("ignores an invalid traceparent: the request succeeds and starts its own trace", async () => {
    const { clients } = await sessions("invalid-parent", 1);
    const response = await postWithHeaders("invalid-parent", "invalid-parent-u0", { traceparent: "00-NOT-A-TRACEPARENT-01" });
    expect(response.status).toBe(201);
    await clients[0]!.waitFor(() => clients[0]!.messageSeqs().length === 1, "the message");
    const spans = await waitForSpans(
      (s) => s.some((x) => x.name === "guild.fanout") && s.some((x) => service(x) === "guildwire-api"),
      "fanout and API spans",
    );
    const api = spans.find((s) => service(s) === "guildwire-api")!;
    expect(api.parentSpanContext).toBeUndefined();
  });
});

describe("sessions never start traces, and carriers from outside are capped", () => {
  it("records no root span in guild or session services", async () => {
    const { clients } = await sessions("roots", 2);
    await postWithHeaders("roots", "roots-u0", { traceparent: traceparent(randomTraceId(), true) });
    await postWithHeaders("roots", "roots-u1", {});
    for (const client of clients) await client.waitFor(() => client.messageSeqs().length === 2, "both messages");
    // Each fanout keeps ~79% of 2 recipients: wait for exactly the deliveries it chose.
    const chosen = (s: ReadableSpan[]) =>
      s.filter((x) => x.name === "guild.fanout").reduce((n, f) => n + Number(f.attributes["guildwire.fanout.sampled_recipients"]), 0);
    const spans = await waitForSpans(
      (s) => s.filter((x) => x.name === "guild.fanout").length === 2 && s.filter((x) => x.name === "session.deliver").length === chosen(s),
      "deliveries",
    );
    for (const span of spans.filter((s) => service(s) !== "guildwire-api")) {
      expect(span.parentSpanContext, `${span.name} must have a parent`).toBeDefined();
    }
  });

  it("caps an oversize tracestate before it is forwarded to sessions", async () => {
    const { clients } = await sessions("capped", 1);
    const tracestate = Array.from({ length: 40 }, (_, i) => `k${i}=${"v".repeat(20)}`).join(",");
    const response = await postWithHeaders("capped", "capped-u0", { traceparent: traceparent(randomTraceId(), true), tracestate });
    expect(response.status).toBe(201);
    await clients[0]!.waitFor(() => clients[0]!.messageSeqs().length === 1, "the message");
    const spans = await waitForSpans((s) => s.some((x) => x.name === "session.deliver"), "delivery span");
    const delivered = spans.find((s) => s.name === "session.deliver")!.spanContext().traceState!.serialize();
    expect(delivered.length).toBeLessThanOrEqual(512);
    expect(delivered.split(",").length).toBeLessThanOrEqual(32);
    expect(delivered.split(",")[0]).toBe(`k0=${"v".repeat(20)}`);
  });
});
