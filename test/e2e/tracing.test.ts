/**
 * Tracing through the fanout, as a real OTLP backend sees it: the local collector receives what
 * `wrangler dev` exports while real WebSocket clients are connected. A sampled `traceparent` on
 * POST …/messages is one trace spanning all three services, parent-linked API → guild.dispatch →
 * guild.fanout → session.deliver; an unsampled one leaves no trace; and a guild sending bare
 * messages (TRANSPORT_MODE=bare, as during a rollout) still delivers everything, in order.
 *
 * Every API request without a traceparent starts a trace of its own (TRACE_SAMPLE_RATE=1), so
 * the collector holds many traces: assertions always pick traces by id.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type Collector, startCollector } from "../../scripts/collector.ts";
import { type DevServer, startDevServer } from "../../scripts/lib/dev-server.ts";
import type { GatewayClient } from "../../scripts/lib/gateway-client.ts";
import type { Message } from "../../src/gateway/protocol.ts";
import { Api, Clients, devTokens, messagesOf, range, sleep, uid, waitForMessages } from "./helpers.ts";
import {
  type TraceDetail,
  fanoutSpans,
  fanoutTracesOfGuild,
  getTrace,
  randomSpanId,
  randomTraceId,
  traceparent,
  waitForFanoutTrace,
} from "./tracing-helpers.ts";

const START_TIMEOUT = 90_000;
/** How long an export that should not happen gets to show up anyway. */
const ABSENCE_WAIT_MS = 1_500;
const SESSIONS = 3;
/**
 * Not the default (1:1,100:0.1,…, which keeps ≈58% of 3 recipients): every session of a fanout
 * to at most 10 keeps the sample. The traces below are then exact, and show that the setting
 * reaches the guild rather than the defaults.
 */
const FANOUT_SAMPLING = "1:1,10:1,100:0.1,10000:0.001";

interface Gateway {
  server: DevServer;
  api: Api;
  clients: Clients;
}

async function startGateway(collector: Collector, vars: Record<string, string> = {}): Promise<Gateway> {
  const server = await startDevServer({ vars: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.url, ...vars } });
  return { server, api: new Api(server.url, devTokens(server.url)), clients: new Clients(() => server.url) };
}

/** A guild with `count` members, each with one identified, heartbeating session. */
async function guildWithSessions(gateway: Gateway, count: number): Promise<{ guildId: string; users: string[]; clients: GatewayClient[] }> {
  const guildId = uid("trace-guild");
  const users = range(1, count).map((i) => uid(`trace-user${i}`));
  await gateway.api.addMembers(guildId, ...users);
  const clients: GatewayClient[] = [];
  for (const user of users) {
    const { client, ready } = await gateway.clients.identified(await gateway.api.token(user));
    expect(ready.guilds).toContain(guildId);
    client.startHeartbeat();
    clients.push(client);
  }
  return { guildId, users, clients };
}

async function postWith(gateway: Gateway, guildId: string, userId: string, content: string, headers: Record<string, string>): Promise<Message> {
  const response = await gateway.api.request<Message>("POST", `/api/guilds/${guildId}/messages`, { token: await gateway.api.token(userId), json: { content }, headers });
  expect(response.status, response.text).toBe(201);
  return response.body;
}

/** The contract's shape of one sampled message's trace. Returns how many sessions it sampled. */
function expectFanoutTrace(trace: TraceDetail, traceId: string, parentSpanId: string, recipients: number): number {
  const { api, dispatch, fanout, deliver } = fanoutSpans(trace);
  expect(trace.traceId).toBe(traceId);
  for (const span of trace.spans) expect(span.traceId).toBe(traceId);

  expect(api.map((s) => s.name)).toEqual(["POST /api/guilds/{guild_id}/messages"]);
  expect(api[0]!.kind, "the API span is a SERVER span").toBe(2);
  expect(api[0]!.parentSpanId, "the API span continues the caller's traceparent").toBe(parentSpanId);

  expect(dispatch).toHaveLength(1);
  expect(dispatch[0]!.service).toBe("guildwire-guild");
  expect(dispatch[0]!.parentSpanId, "guild.dispatch → API span").toBe(api[0]!.spanId);

  expect(fanout).toHaveLength(1);
  expect(fanout[0]!.service).toBe("guildwire-guild");
  expect(fanout[0]!.parentSpanId, "guild.fanout → guild.dispatch").toBe(dispatch[0]!.spanId);
  expect(fanout[0]!.attributes["messaging.batch.message_count"]).toBe(recipients);
  const sampled = fanout[0]!.attributes["guildwire.fanout.sampled_recipients"];
  expect(sampled).toEqual(expect.any(Number));

  expect(deliver, "one session.deliver span per sampled recipient").toHaveLength(sampled as number);
  for (const span of deliver) {
    expect(span.service).toBe("guildwire-session");
    expect(span.parentSpanId, "session.deliver → guild.fanout").toBe(fanout[0]!.spanId);
  }
  expect(new Set(trace.spans.map((s) => s.spanId)).size).toBe(trace.spans.length);
  expect(trace.spans, "nothing else in the trace").toHaveLength(3 + (sampled as number));
  return sampled as number;
}

describe("tracing through the fanout, seen by the local collector", () => {
  let dir: string;
  let collector: Collector | undefined;
  let envelope: Gateway | undefined;
  let bare: Gateway | undefined;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "guildwire-tracing-"));
    collector = await startCollector({ port: 0, dir });
    // Both gateways export to this collector only (never to a collector someone runs on 4318).
    const [first, second] = await Promise.allSettled([startGateway(collector, { FANOUT_SAMPLING }), startGateway(collector, { TRANSPORT_MODE: "bare" })]);
    // Keep whichever started, so that afterAll stops it even when the other did not.
    if (first.status === "fulfilled") envelope = first.value;
    if (second.status === "fulfilled") bare = second.value;
    if (first.status === "rejected") throw first.reason;
    if (second.status === "rejected") throw second.reason;
  }, START_TIMEOUT);

  afterAll(async () => {
    envelope?.clients.dropAll();
    bare?.clients.dropAll();
    await Promise.all([envelope?.server.stop(), bare?.server.stop()]);
    await collector?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  beforeEach(({ onTestFailed }) => {
    onTestFailed(() => {
      console.error(`wrangler dev (envelope) output (tail):\n${envelope?.server.output().slice(-3000)}`);
      console.error(`wrangler dev (bare) output (tail):\n${bare?.server.output().slice(-3000)}`);
    });
  });

  afterEach(() => {
    envelope?.clients.dropAll();
    bare?.clients.dropAll();
  });

  it("a sampled traceparent: one trace with spans of all three services, parent-linked API → dispatch → fanout → each sampled delivery", async () => {
    const gateway = envelope!;
    const { guildId, users, clients } = await guildWithSessions(gateway, SESSIONS);
    const sent: string[] = [];
    for (let n = 1; n <= 3; n++) {
      const traceId = randomTraceId();
      const parent = randomSpanId();
      sent.push(traceId);
      const message = await postWith(gateway, guildId, users[0]!, `sampled ${n}`, { traceparent: traceparent(traceId, parent, true) });
      for (const client of clients) expect((await waitForMessages(client, guildId, n)).at(-1)!.id).toBe(message.id);

      const trace = await waitForFanoutTrace(collector!.url, traceId);
      // FANOUT_SAMPLING keeps every one of 3 recipients; the defaults would keep each with ≈58%.
      expect(expectFanoutTrace(trace, traceId, parent, SESSIONS), `message ${n}`).toBe(SESSIONS);
      expect(trace.services).toEqual(["guildwire-api", "guildwire-guild", "guildwire-session"]);
    }
    // One message, one trace: no other trace holds a fanout of this guild.
    expect((await fanoutTracesOfGuild(collector!.url, guildId)).sort()).toEqual([...sent].sort());
  });

  it("an unsampled traceparent: the message is delivered and no span of it reaches the collector", async () => {
    const gateway = envelope!;
    const { guildId, users, clients } = await guildWithSessions(gateway, SESSIONS);
    const traceId = randomTraceId();
    const message = await postWith(gateway, guildId, users[1]!, "not sampled", { traceparent: traceparent(traceId, randomSpanId(), false) });
    for (const client of clients) expect((await waitForMessages(client, guildId, 1))[0]!.id).toBe(message.id);

    // A sampled message after it: once its trace is complete, anything the first one exported
    // (it would have been flushed earlier) has arrived too.
    const barrier = randomTraceId();
    const barrierParent = randomSpanId();
    await postWith(gateway, guildId, users[2]!, "sampled barrier", { traceparent: traceparent(barrier, barrierParent, true) });
    for (const client of clients) await waitForMessages(client, guildId, 2);
    expectFanoutTrace(await waitForFanoutTrace(collector!.url, barrier), barrier, barrierParent, SESSIONS);
    await sleep(ABSENCE_WAIT_MS);

    expect(await getTrace(collector!.url, traceId)).toBeNull();
    expect(await fanoutTracesOfGuild(collector!.url, guildId), "only the barrier's fanout was traced").toEqual([barrier]);
    for (const client of clients) expect(messagesOf(client, guildId).map((m) => m.content)).toEqual(["not sampled", "sampled barrier"]);
  });

  it("an invalid traceparent is ignored: the request succeeds and the API starts a trace of its own", async () => {
    const gateway = envelope!;
    const { guildId, users, clients } = await guildWithSessions(gateway, 1);
    const bogusTraceId = randomTraceId();
    await postWith(gateway, guildId, users[0]!, "bad header", { traceparent: `00-${bogusTraceId}-zzzz-01` });
    await waitForMessages(clients[0]!, guildId, 1);
    let traces: string[] = [];
    for (let i = 0; i < 50 && traces.length === 0; i++) {
      traces = await fanoutTracesOfGuild(collector!.url, guildId);
      if (!traces.length) await sleep(100);
    }
    expect(traces).toHaveLength(1);
    expect(traces[0]).not.toBe(bogusTraceId);
    const trace = await waitForFanoutTrace(collector!.url, traces[0]!);
    const { api } = fanoutSpans(trace);
    expect(api[0]!.parentSpanId, "a new root, not a child of the invalid header").toBeNull();
    // One recipient: the tier rate is 100%.
    expect(fanoutSpans(trace).deliver).toHaveLength(1);
  });

  it("mixed versions: envelopes and bare messages interleaved to the same sessions arrive in order, without gaps", async () => {
    const gateway = envelope!;
    const { guildId, users, clients } = await guildWithSessions(gateway, SESSIONS);
    const headers = (i: number): Record<string, string> =>
      i % 3 === 0 ? {} : { traceparent: traceparent(randomTraceId(), randomSpanId(), i % 3 === 1) };
    const posted = await Promise.all(range(1, 9).map((i) => postWith(gateway, guildId, users[i % SESSIONS]!, `mixed ${i}`, headers(i))));
    const bySeq = [...posted].sort((a, b) => a.seq - b.seq);
    expect(bySeq.map((m) => m.seq)).toEqual(range(1, 9));
    for (const client of clients) {
      const received = await waitForMessages(client, guildId, 9);
      await sleep(200);
      expect(messagesOf(client, guildId).map((m) => m.id), "every message once, in seq order").toEqual(bySeq.map((m) => m.id));
      expect(received.map((m) => m.seq)).toEqual(range(1, 9));
    }
  });

  it("mixed versions: a guild sending bare messages (TRANSPORT_MODE=bare) delivers every message to every session, in order, and carries no trace downstream", async () => {
    const gateway = bare!;
    const { guildId, users, clients } = await guildWithSessions(gateway, SESSIONS);
    const sampledTraceId = randomTraceId();
    const posted: Message[] = [];
    // One at a time, then a burst.
    posted.push(await postWith(gateway, guildId, users[0]!, "bare 1", { traceparent: traceparent(sampledTraceId, randomSpanId(), true) }));
    posted.push(await postWith(gateway, guildId, users[1]!, "bare 2", { traceparent: traceparent(randomTraceId(), randomSpanId(), false) }));
    posted.push(await postWith(gateway, guildId, users[2]!, "bare 3", {}));
    posted.push(...(await Promise.all(range(4, 10).map((i) => postWith(gateway, guildId, users[i % SESSIONS]!, `bare ${i}`, {})))));
    const bySeq = [...posted].sort((a, b) => a.seq - b.seq);
    expect(bySeq.map((m) => m.seq)).toEqual(range(1, 10));
    for (const client of clients) await waitForMessages(client, guildId, 10);
    await sleep(ABSENCE_WAIT_MS);
    for (const client of clients) {
      expect(messagesOf(client, guildId).map((m) => m.id), "every message once, in seq order").toEqual(bySeq.map((m) => m.id));
    }

    // Bare means no carrier crosses a Durable Object boundary: the sampled request's trace has
    // the API's span (it arrives: tracing is on) and nothing from the guild or the sessions,
    // which have had ABSENCE_WAIT_MS to export anything of theirs since the deliveries.
    let trace: TraceDetail | null = null;
    for (let i = 0; i < 100 && !trace; i++) {
      trace = await getTrace(collector!.url, sampledTraceId);
      if (!trace) await sleep(100);
    }
    expect(trace, "the API's span of the sampled post").not.toBeNull();
    expect(trace!.services).toEqual(["guildwire-api"]);
    expect(await fanoutTracesOfGuild(collector!.url, guildId)).toEqual([]);
  });
});
