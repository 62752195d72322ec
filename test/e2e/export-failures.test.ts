/**
 * Span export when the collector misbehaves, as `wrangler dev` meets it: a collector that takes a
 * request and never answers, one that answers 503, one that answers 400. An export has
 * OTEL_EXPORTER_OTLP_TIMEOUT in all; within it a 502/503/504 (or a lost connection) is tried once
 * more, and nothing else is.
 *
 * A proxy on 127.0.0.1 stands in front of the real local collector and decides what each
 * request body's first attempt gets; a repeat of the same body (a retry) is passed through.
 */
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { type IncomingMessage, type ServerResponse, createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type Collector, startCollector } from "../../scripts/collector.ts";
import { type DevServer, startDevServer } from "../../scripts/lib/dev-server.ts";
import { Api, Clients, devTokens, range, sleep, uid, waitForMessages } from "./helpers.ts";
import { randomSpanId, randomTraceId, traceparent, waitForFanoutTrace } from "./tracing-helpers.ts";

type FirstAttempt = "pass" | "hang" | "503" | "400";

interface FlakyCollector {
  url: string;
  /** Every request's path and query, and its x-api-key header. */
  requests: { url: string; apiKey: string | undefined }[];
  firstAttempt: FirstAttempt;
  /** Per distinct request body: what its first attempt got, and how many attempts came. */
  bodies: Map<string, { first: FirstAttempt; attempts: number }>;
  close(): Promise<void>;
}

async function startFlakyCollector(upstream: string): Promise<FlakyCollector> {
  const held: ServerResponse[] = [];
  const proxy: FlakyCollector = { url: "", requests: [], firstAttempt: "pass", bodies: new Map(), close: async () => {} };
  const readBody = async (request: IncomingMessage): Promise<Buffer> => {
    const chunks: Buffer[] = [];
    for await (const chunk of request) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  };
  const server = createServer(async (request, response) => {
    const body = await readBody(request);
    proxy.requests.push({ url: request.url!, apiKey: request.headers["x-api-key"] as string | undefined });
    const key = createHash("sha256").update(body).digest("hex");
    let seen = proxy.bodies.get(key);
    if (!seen) proxy.bodies.set(key, (seen = { first: proxy.firstAttempt, attempts: 0 }));
    if (++seen.attempts === 1 && seen.first !== "pass") {
      if (seen.first === "hang") held.push(response); // never answered; the socket stays open
      else response.writeHead(Number(seen.first)).end("no");
      return;
    }
    const answer = await fetch(`${upstream}/v1/traces`, {
      method: request.method!,
      headers: { "content-type": request.headers["content-type"] ?? "application/json" },
      body: new Uint8Array(body),
    });
    response.writeHead(answer.status, { "content-type": answer.headers.get("content-type") ?? "application/json" }).end(Buffer.from(await answer.arrayBuffer()));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  proxy.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  proxy.close = () =>
    new Promise<void>((resolve) => {
      for (const response of held) response.destroy();
      server.closeAllConnections();
      server.close(() => resolve());
    });
  return proxy;
}

/** Attempts per body whose first attempt got `first`. */
const attemptsOf = (proxy: FlakyCollector, first: FirstAttempt): number[] =>
  [...proxy.bodies.values()].filter((b) => b.first === first).map((b) => b.attempts);

const TIMEOUT_MS = 500;
const API_KEY = "s3cret, with a comma";

describe("span export to a collector that misbehaves", () => {
  let dir: string;
  let collector: Collector | undefined;
  let proxy: FlakyCollector | undefined;
  let server: DevServer | undefined;
  let api: Api;
  let clients: Clients;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "guildwire-export-"));
    collector = await startCollector({ port: 0, dir });
    proxy = await startFlakyCollector(collector.url);
    // An endpoint with a path and a query, and an API key, as hosted backends have them.
    server = await startDevServer({
      vars: {
        OTEL_EXPORTER_OTLP_ENDPOINT: `${proxy.url}/otlp/?tenant=t1`,
        OTEL_EXPORTER_OTLP_HEADERS: `x-api-key=${encodeURIComponent(API_KEY)}`,
        OTEL_EXPORTER_OTLP_TIMEOUT: String(TIMEOUT_MS),
      },
    });
    api = new Api(server.url, devTokens(server.url));
    clients = new Clients(() => server!.url);
  }, 90_000);

  afterAll(async () => {
    clients?.dropAll();
    await server?.stop();
    await proxy?.close();
    await collector?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  beforeEach(({ onTestFailed }) => {
    onTestFailed(() => console.error(`wrangler dev output (tail):\n${server?.output().slice(-3000)}`));
  });

  afterEach(() => {
    clients.dropAll();
    proxy!.firstAttempt = "pass";
  });

  /**
   * A guild of `count` members with a session each; one sampled message; its delivery at every
   * client. With one session the tier keeps 100%, so the trace always has a session span.
   */
  async function sampledMessage(count: number): Promise<{ traceId: string }> {
    const guildId = uid("export-guild");
    const users = range(1, count).map((i) => uid(`export-user${i}`));
    await api.addMembers(guildId, ...users);
    const sessions = [];
    for (const user of users) sessions.push((await clients.identified(await api.token(user))).client);
    const traceId = randomTraceId();
    const response = await api.request("POST", `/api/guilds/${guildId}/messages`, {
      token: await api.token(users[0]!),
      json: { content: "traced" },
      headers: { traceparent: traceparent(traceId, randomSpanId(), true) },
    });
    expect(response.status, response.text).toBe(201);
    for (const session of sessions) await waitForMessages(session, guildId, 1);
    return { traceId };
  }

  /** wrangler's output reaches us a little later than it happens, more so under load. */
  async function waitForOutput(text: string, timeoutMs = 15_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!server!.output().includes(text)) {
      if (Date.now() > deadline) throw new Error(`wrangler never printed "${text}"`);
      await sleep(100);
    }
  }

  it("sends every export to {endpoint}/v1/traces with OTEL_EXPORTER_OTLP_HEADERS", async () => {
    const { traceId } = await sampledMessage(1);
    await waitForFanoutTrace(collector!.url, traceId);
    expect(proxy!.requests.length).toBeGreaterThan(0);
    expect(new Set(proxy!.requests.map((r) => JSON.stringify(r)))).toEqual(new Set([JSON.stringify({ url: "/otlp/v1/traces?tenant=t1", apiKey: API_KEY })]));
  });

  it("gives up on an export the collector never answers after the timeout, and says so; later exports go through", async () => {
    proxy!.firstAttempt = "hang";
    await sampledMessage(1);
    await waitForOutput(`no answer within ${TIMEOUT_MS} ms`);
    await sleep(2 * TIMEOUT_MS); // time enough for a wrong retry to show up
    const hung = attemptsOf(proxy!, "hang");
    expect(hung.length, "exports were held unanswered").toBeGreaterThan(0);
    expect(hung.every((n) => n === 1), "a timed-out export is not sent again").toBe(true);

    proxy!.firstAttempt = "pass";
    const { traceId } = await sampledMessage(1);
    const trace = await waitForFanoutTrace(collector!.url, traceId);
    expect(trace.services).toEqual(["guildwire-api", "guildwire-guild", "guildwire-session"]);
  });

  it("tries an export answered 503 once more: the whole trace arrives", async () => {
    proxy!.firstAttempt = "503";
    const { traceId } = await sampledMessage(1);
    const trace = await waitForFanoutTrace(collector!.url, traceId);
    expect(trace.services).toEqual(["guildwire-api", "guildwire-guild", "guildwire-session"]);
    // Other exports (the set-up requests') may still be on their retry: wait for those to land.
    for (const deadline = Date.now() + 10_000; attemptsOf(proxy!, "503").some((n) => n < 2) && Date.now() < deadline; ) await sleep(100);
    await sleep(2 * TIMEOUT_MS); // time enough for a third attempt, which must not come
    const refused = attemptsOf(proxy!, "503");
    expect(refused.length, "first attempts were refused").toBeGreaterThan(0);
    expect(refused, "each refused export was sent exactly twice").toEqual(refused.map(() => 2));
  });

  it("does not retry an export the collector rejects (400), and says so", async () => {
    proxy!.firstAttempt = "400";
    await sampledMessage(1);
    await waitForOutput("collector answered 400");
    await sleep(2 * TIMEOUT_MS);
    const rejected = attemptsOf(proxy!, "400");
    expect(rejected.length).toBeGreaterThan(0);
    expect(rejected.every((n) => n === 1)).toBe(true);
  });
});
