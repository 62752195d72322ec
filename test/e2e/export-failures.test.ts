/**
 * Span export when the collector misbehaves, as `wrangler dev` meets it: a collector that takes a
 * request and never answers, one that answers 503, and one that answers nothing at all. Each
 * export request is cut off after OTEL_EXPORTER_OTLP_TIMEOUT and tried once more, and none of
 * it slows deliveries down.
 *
 * A proxy on 127.0.0.1 stands in front of the real local collector and decides, per request body,
 * what the first attempt gets; a repeat of the same body (the retry) is passed through.
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
import { fanoutSpans, randomSpanId, randomTraceId, traceparent, waitForFanoutTrace } from "./tracing-helpers.ts";

type FirstAttempt = "hang" | "503" | "pass" | "blackhole";

interface FlakyCollector {
  url: string;
  firstAttempt: FirstAttempt;
  /** Requests held without an answer, and requests answered 503. */
  hung: number;
  refused: number;
  close(): Promise<void>;
}

async function startFlakyCollector(upstream: string): Promise<FlakyCollector> {
  const seen = new Set<string>();
  const held: ServerResponse[] = [];
  const proxy: FlakyCollector = { url: "", firstAttempt: "pass", hung: 0, refused: 0, close: async () => {} };
  const readBody = async (request: IncomingMessage): Promise<Buffer> => {
    const chunks: Buffer[] = [];
    for await (const chunk of request) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  };
  const server = createServer(async (request, response) => {
    const body = await readBody(request);
    const key = createHash("sha256").update(body).digest("hex");
    const first = !seen.has(key);
    seen.add(key);
    if (proxy.firstAttempt === "blackhole" || (first && proxy.firstAttempt === "hang")) {
      proxy.hung++;
      held.push(response); // never answered; the socket stays open until the proxy closes
      return;
    }
    if (first && proxy.firstAttempt === "503") {
      proxy.refused++;
      response.writeHead(503).end("busy");
      return;
    }
    const answer = await fetch(`${upstream}${request.url}`, {
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

const TIMEOUT_MS = 500;

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
    server = await startDevServer({ vars: { OTEL_EXPORTER_OTLP_ENDPOINT: proxy.url, OTEL_EXPORTER_OTLP_TIMEOUT: String(TIMEOUT_MS) } });
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

  /** A guild of `count` members with a session each; one sampled message; its delivery at every client. */
  async function sampledMessage(count: number): Promise<{ traceId: string; deliveredMs: number }> {
    const guildId = uid("export-guild");
    const users = range(1, count).map((i) => uid(`export-user${i}`));
    await api.addMembers(guildId, ...users);
    const sessions = [];
    for (const user of users) sessions.push((await clients.identified(await api.token(user))).client);
    const traceId = randomTraceId();
    const started = Date.now();
    const response = await api.request("POST", `/api/guilds/${guildId}/messages`, {
      token: await api.token(users[0]!),
      json: { content: "traced" },
      headers: { traceparent: traceparent(traceId, randomSpanId(), true) },
    });
    expect(response.status, response.text).toBe(201);
    for (const session of sessions) await waitForMessages(session, guildId, 1);
    return { traceId, deliveredMs: Date.now() - started };
  }

  it("cuts off an export the collector never answers and tries again: the whole trace arrives", async () => {
    proxy!.firstAttempt = "hang";
    const hungBefore = proxy!.hung;
    const { traceId } = await sampledMessage(3);
    const trace = await waitForFanoutTrace(collector!.url, traceId);
    expect(trace.services).toEqual(["guildwire-api", "guildwire-guild", "guildwire-session"]);
    expect(fanoutSpans(trace).deliver.length).toBeGreaterThan(0);
    expect(proxy!.hung - hungBefore, "first attempts were held unanswered").toBeGreaterThanOrEqual(3);
  });

  it("tries an export answered 503 once more: the whole trace arrives", async () => {
    proxy!.firstAttempt = "503";
    const refusedBefore = proxy!.refused;
    const { traceId } = await sampledMessage(3);
    const trace = await waitForFanoutTrace(collector!.url, traceId);
    expect(trace.services).toEqual(["guildwire-api", "guildwire-guild", "guildwire-session"]);
    expect(proxy!.refused - refusedBefore, "first attempts were refused").toBeGreaterThanOrEqual(3);
  });

  it("a collector that never answers does not hold up deliveries", async () => {
    proxy!.firstAttempt = "blackhole";
    const hungBefore = proxy!.hung;
    const { deliveredMs } = await sampledMessage(3);
    await sleep(TIMEOUT_MS);
    expect(proxy!.hung - hungBefore, "exports were attempted and held").toBeGreaterThan(0);
    // Had delivery waited for its export, it would have taken two cut-off attempts (2 × 500 ms).
    expect(deliveredMs).toBeLessThan(2 * TIMEOUT_MS);
  });
});
