/**
 * The local trace collector (scripts/collector.ts) over real HTTP: OTLP/HTTP in (JSON and
 * protobuf, as the OpenTelemetry JS serializers write them), traces grouped across requests,
 * bad input refused with the right status, traces kept on disk across restarts, and pruned.
 */
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { SpanKind, SpanStatusCode, TraceFlags, context, trace } from "@opentelemetry/api";
import { JsonTraceSerializer, ProtobufTraceSerializer } from "@opentelemetry/otlp-transformer";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { parseJson } from "./helpers.ts";
import { type Collector, MAX_BODY_BYTES, startCollector } from "../../scripts/collector.ts";
import { randomSpanId, randomTraceId, type TraceDetail, type TraceSummary } from "./tracing-helpers.ts";

// ---- OTLP/JSON, written by hand as an exporter would send it --------------------------------------

const T0 = 1_790_000_000_000_000_000n; // ns since the epoch (2026-09-21)
const ms = (n: number): bigint => BigInt(Math.round(n * 1e6));

interface SpanSpec {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  kind?: number;
  startMs: number;
  durationMs: number;
  attributes?: Record<string, unknown>;
  /** Send times as JSON numbers instead of strings (both are valid OTLP/JSON). */
  numericTimes?: boolean;
}

function otlpValue(value: unknown): unknown {
  if (typeof value === "string") return { stringValue: value };
  if (typeof value === "boolean") return { boolValue: value };
  if (typeof value === "number") return Number.isInteger(value) ? { intValue: String(value) } : { doubleValue: value };
  if (Array.isArray(value)) return { arrayValue: { values: value.map(otlpValue) } };
  throw new Error(`no OTLP value for ${String(value)}`);
}

function otlpSpan(spec: SpanSpec): unknown {
  const start = T0 + ms(spec.startMs);
  const end = start + ms(spec.durationMs);
  return {
    traceId: spec.traceId,
    spanId: spec.spanId,
    ...(spec.parentSpanId ? { parentSpanId: spec.parentSpanId } : {}),
    name: spec.name,
    kind: spec.kind ?? 1,
    startTimeUnixNano: spec.numericTimes ? Number(start) : String(start),
    endTimeUnixNano: spec.numericTimes ? Number(end) : String(end),
    attributes: Object.entries(spec.attributes ?? {}).map(([key, value]) => ({ key, value: otlpValue(value) })),
    droppedAttributesCount: 0,
    events: [],
    links: [],
    status: { code: 0 },
  };
}

function exportRequest(batches: { service: string; spans: SpanSpec[] }[]): string {
  return JSON.stringify({
    resourceSpans: batches.map(({ service, spans }) => ({
      resource: { attributes: [{ key: "service.name", value: { stringValue: service } }], droppedAttributesCount: 0 },
      scopeSpans: [{ scope: { name: "collector-test", version: "1" }, spans: spans.map(otlpSpan) }],
    })),
  });
}

// ---- HTTP ----------------------------------------------------------------------------------------

interface Answer {
  status: number;
  text: string;
  body: unknown;
}

async function send(url: string, body: string | Uint8Array, headers: Record<string, string> = { "content-type": "application/json" }): Promise<Answer> {
  const response = await fetch(`${url}/v1/traces`, { method: "POST", headers, body: typeof body === "string" ? body : Buffer.from(body) });
  const text = await response.text();
  return { status: response.status, text, body: parseJson(text) };
}

async function getJson<T>(url: string): Promise<{ status: number; body: T }> {
  const response = await fetch(url);
  return { status: response.status, body: (await response.json()) as T };
}

const traces = async (collector: Collector): Promise<TraceSummary[]> => (await getJson<{ traces: TraceSummary[] }>(`${collector.url}/api/traces`)).body.traces;
const traceOf = async (collector: Collector, traceId: string): Promise<TraceDetail> => {
  const { status, body } = await getJson<TraceDetail>(`${collector.url}/api/traces/${traceId}`);
  expect(status).toBe(200);
  return body;
};

function expectError(answer: Answer, status: number): void {
  expect({ status: answer.status, text: answer.text }).toMatchObject({ status });
  expect(answer.body).toEqual({ error: { code: expect.stringMatching(/^[a-z_]+$/), message: expect.any(String) } });
}

/** Streams `total` bytes with chunked encoding (no Content-Length), as a client that does not know the size. */
function sendChunked(url: string, total: number): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const request = httpRequest(`${url}/v1/traces`, { method: "POST", headers: { "content-type": "application/json" } }, (response) => {
      let text = "";
      response.on("data", (chunk: Buffer) => (text += chunk.toString()));
      response.on("end", () => resolve({ status: response.statusCode ?? 0, text }));
    });
    request.on("error", reject);
    const chunk = Buffer.alloc(256 * 1024, 0x20);
    let sent = 0;
    const write = (): void => {
      while (sent < total) {
        sent += chunk.length;
        if (!request.write(chunk)) return void request.once("drain", write);
      }
      request.end();
    };
    write();
  });
}

// ---- tests ---------------------------------------------------------------------------------------

describe("local trace collector", () => {
  let dir: string;
  let collector: Collector;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "guildwire-collector-"));
    collector = await startCollector({ port: 0, dir });
  });

  afterAll(async () => {
    await collector?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("listens on loopback and prints a usable base URL", () => {
    expect(collector.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    expect(collector.port).toBeGreaterThan(0);
  });

  it("groups spans by trace across several requests from several services", async () => {
    const a = randomTraceId();
    const b = randomTraceId();
    const [api, dispatch, fanout, s1, s2, other] = Array.from({ length: 6 }, randomSpanId) as [string, string, string, string, string, string];
    const remoteParent = randomSpanId();

    // As the gateway exports: the Worker, then the guild, then each session — separate requests.
    expect(
      await send(
        collector.url,
        exportRequest([
          { service: "guildwire-api", spans: [{ traceId: a, spanId: api, parentSpanId: remoteParent, name: "POST /api/guilds/{guild_id}/messages", kind: 2, startMs: 1000, durationMs: 8 }] },
          { service: "other-service", spans: [{ traceId: b, spanId: other, name: "older trace", startMs: 0, durationMs: 5 }] },
        ]),
      ),
    ).toMatchObject({ status: 200, body: {} });
    const guild = exportRequest([
      {
        service: "guildwire-guild",
        spans: [
          { traceId: a, spanId: dispatch, parentSpanId: api, name: "guild.dispatch", kind: 5, startMs: 1002, durationMs: 5 },
          {
            traceId: a,
            spanId: fanout,
            parentSpanId: dispatch,
            name: "guild.fanout",
            kind: 4,
            startMs: 1003,
            durationMs: 3,
            attributes: { "messaging.batch.message_count": 100, "guildwire.fanout.sampled_recipients": 2, "guildwire.fanout.sample_rate": 0.1 },
          },
        ],
      },
    ]);
    expect((await send(collector.url, guild)).status).toBe(200);
    expect((await send(collector.url, exportRequest([{ service: "guildwire-session", spans: [{ traceId: a, spanId: s1, parentSpanId: fanout, name: "session.deliver", kind: 5, startMs: 1006, durationMs: 1, numericTimes: true }] }]))).status).toBe(200);
    expect((await send(collector.url, exportRequest([{ service: "guildwire-session", spans: [{ traceId: a, spanId: s2, parentSpanId: fanout, name: "session.deliver", kind: 5, startMs: 1007, durationMs: 2 }] }]))).status).toBe(200);
    // An exporter retrying a batch must not duplicate spans.
    expect((await send(collector.url, guild)).status).toBe(200);

    const list = await traces(collector);
    const ids = list.map((t) => t.traceId);
    expect(ids.indexOf(a)).toBeGreaterThanOrEqual(0);
    expect(ids.indexOf(a), "newest start first").toBeLessThan(ids.indexOf(b));
    expect(list.find((t) => t.traceId === a)).toEqual({
      traceId: a,
      rootName: "POST /api/guilds/{guild_id}/messages",
      rootService: "guildwire-api",
      services: ["guildwire-api", "guildwire-guild", "guildwire-session"],
      spanCount: 5,
      errorCount: 0,
      startTime: new Date(Number((T0 + ms(1000)) / 1_000_000n)).toISOString(),
      startTimeUnixNano: String(T0 + ms(1000)),
      durationMs: 9,
      fanout: { recipients: 100, sampled: 2 },
    });

    const detail = await traceOf(collector, a);
    expect(detail.spans.map((s) => s.spanId)).toEqual([api, dispatch, fanout, s1, s2]); // by start time
    const byId = new Map(detail.spans.map((s) => [s.spanId, s]));
    expect(byId.get(api)).toMatchObject({ service: "guildwire-api", parentSpanId: remoteParent, kind: 2, offsetMs: 0, durationMs: 8, resource: { "service.name": "guildwire-api" }, scope: { name: "collector-test", version: "1" } });
    expect(byId.get(dispatch)).toMatchObject({ service: "guildwire-guild", parentSpanId: api, offsetMs: 2, durationMs: 5 });
    expect(byId.get(fanout)).toMatchObject({
      parentSpanId: dispatch,
      attributes: { "messaging.batch.message_count": 100, "guildwire.fanout.sampled_recipients": 2, "guildwire.fanout.sample_rate": 0.1 },
    });
    // Times sent as JSON numbers lose precision past 2^53 ns (the sender's choice), but still land.
    expect(byId.get(s1)).toMatchObject({ service: "guildwire-session", parentSpanId: fanout, durationMs: expect.closeTo(1, 3) });
    expect(Number(BigInt(byId.get(s1)!.startTimeUnixNano) - (T0 + ms(1006)))).toBeLessThan(1000);
    expect(byId.get(s2)).toMatchObject({ service: "guildwire-session", parentSpanId: fanout, offsetMs: 7, durationMs: 2 });

    expect((await getJson(`${collector.url}/api/traces/${randomTraceId()}`)).status).toBe(404);
    expect((await getJson(`${collector.url}/api/traces/..%2F..%2Fetc%2Fpasswd`)).status).toBe(404);
  });

  it("sums a fanout's sampled sessions over its relays", async () => {
    const traceId = randomTraceId();
    const [fanout, relay1, relay2] = [randomSpanId(), randomSpanId(), randomSpanId()];
    const relay = (spanId: string, startMs: number, share: number, sampled: number) => ({
      traceId,
      spanId,
      parentSpanId: fanout,
      name: "relay.fanout",
      kind: 4,
      startMs,
      durationMs: 1,
      attributes: { "messaging.batch.message_count": share, "guildwire.fanout.sampled_recipients": sampled, "guildwire.fanout.sample_rate": 0.01 },
    });
    const spans = [
      { traceId, spanId: fanout, name: "guild.fanout", kind: 4, startMs: 0, durationMs: 1, attributes: { "messaging.batch.message_count": 1000, "guildwire.fanout.relays": 2, "guildwire.fanout.sample_rate": 0.01 } },
      relay(relay1, 1, 600, 5),
      relay(relay2, 2, 400, 3),
    ];
    expect((await send(collector.url, exportRequest([{ service: "guildwire-guild", spans }]))).status).toBe(200);
    expect((await traces(collector)).find((t) => t.traceId === traceId)?.fanout).toEqual({ recipients: 1000, sampled: 8 });
  });

  it("decodes what the OpenTelemetry JS serializers send: JSON, protobuf, and gzip", async () => {
    const exporter = new InMemorySpanExporter();
    const provider = new BasicTracerProvider({
      resource: resourceFromAttributes({ "service.name": "serializer-test" }),
      spanProcessors: [new SimpleSpanProcessor(exporter)],
    });
    const tracer = provider.getTracer("collector-test", "2.0");
    const record = (traceId: string): void => {
      const parent = trace.setSpanContext(context.active(), { traceId, spanId: randomSpanId(), traceFlags: TraceFlags.SAMPLED, isRemote: true });
      const server = tracer.startSpan("GET /things", { kind: SpanKind.SERVER, attributes: { "http.response.status_code": 200, big: 2 ** 40, ok: true, ratio: 0.25, tags: ["a", "b"] } }, parent);
      const child = tracer.startSpan("db.query", { kind: SpanKind.CLIENT }, trace.setSpan(context.active(), server));
      child.addEvent("retry", { attempt: 2 });
      child.setStatus({ code: SpanStatusCode.ERROR, message: "timeout" });
      child.end();
      server.end();
    };
    const viaJson = randomTraceId();
    const viaProtobuf = randomTraceId();
    const viaGzip = randomTraceId();
    record(viaJson);
    record(viaProtobuf);
    record(viaGzip);
    const spans = exporter.getFinishedSpans();
    const of = (traceId: string) => spans.filter((s) => s.spanContext().traceId === traceId);

    const json = JsonTraceSerializer.serializeRequest(of(viaJson))!;
    expect((await send(collector.url, json)).status).toBe(200);
    const protobuf = await send(collector.url, ProtobufTraceSerializer.serializeRequest(of(viaProtobuf))!, { "content-type": "application/x-protobuf" });
    expect(protobuf.status).toBe(200);
    expect(protobuf.text).toBe(""); // an empty ExportTraceServiceResponse
    const gzipped = gzipSync(JsonTraceSerializer.serializeRequest(of(viaGzip))!);
    expect((await send(collector.url, gzipped, { "content-type": "application/json", "content-encoding": "gzip" })).status).toBe(200);

    const strip = (t: TraceDetail) => t.spans.map(({ traceId: _t, spanId: _s, parentSpanId: _p, startTimeUnixNano: _a, endTimeUnixNano: _b, startTime: _c, offsetMs: _d, durationMs: _e, events, ...rest }) => ({
      ...rest,
      events: events.map(({ timeUnixNano: _ignored, ...event }) => event),
    })).sort((x, y) => x.name.localeCompare(y.name));
    const [a, b, c] = [await traceOf(collector, viaJson), await traceOf(collector, viaProtobuf), await traceOf(collector, viaGzip)];
    expect(a.spans).toHaveLength(2);
    a.spans.sort((x, y) => x.name.localeCompare(y.name)).reverse(); // GET /things, db.query
    expect(a.spans[0]).toMatchObject({
      name: "GET /things",
      kind: 2,
      service: "serializer-test",
      attributes: { "http.response.status_code": 200, big: 2 ** 40, ok: true, ratio: 0.25, tags: ["a", "b"] },
    });
    expect(a.spans[1]).toMatchObject({ name: "db.query", kind: 3, parentSpanId: a.spans[0]!.spanId, status: { code: 2, message: "timeout" }, events: [{ name: "retry", attributes: { attempt: 2 } }] });
    expect(a.errorCount).toBe(1);
    // The same spans, whichever way they came.
    expect(strip(b)).toEqual(strip(a));
    expect(strip(c)).toEqual(strip(a));
    // Nanosecond times survive protobuf's fixed64 exactly.
    const nanos = (t: [number, number]): string => String(BigInt(t[0]) * 1_000_000_000n + BigInt(t[1]));
    expect(b.spans.map((s) => `${s.startTimeUnixNano}-${s.endTimeUnixNano}`).sort()).toEqual(of(viaProtobuf).map((s) => `${nanos(s.startTime)}-${nanos(s.endTime)}`).sort());
    await provider.shutdown();
  });

  describe("refuses bad input with the right status, and keeps serving", () => {
    afterEach(async () => {
      // Whatever came before, the collector still answers.
      expect((await getJson(`${collector.url}/api/traces`)).status).toBe(200);
    });

    it("400 for a body that is not JSON, not an object, or has resourceSpans of the wrong type", async () => {
      expectError(await send(collector.url, "{not json"), 400);
      expectError(await send(collector.url, ""), 400);
      expectError(await send(collector.url, "[]"), 400);
      expectError(await send(collector.url, '"resourceSpans"'), 400);
      expectError(await send(collector.url, '{"resourceSpans": 5}'), 400);
      expectError(await send(collector.url, new Uint8Array([0x7b, 0xff, 0xfe, 0x7d])), 400); // not UTF-8
      expectError(await send(collector.url, gzipSync("{}").subarray(0, 8), { "content-type": "application/json", "content-encoding": "gzip" }), 400);
    });

    it("400 for truncated or malformed protobuf", async () => {
      const headers = { "content-type": "application/x-protobuf" };
      expectError(await send(collector.url, new Uint8Array([0x0a, 0x10, 0x0a]), headers), 400); // field longer than the body
      expectError(await send(collector.url, new Uint8Array([0x0a, 0x03, 0x12, 0x05, 0x01]), headers), 400);
      expectError(await send(collector.url, new Uint8Array([0x0b]), headers), 400); // wire type 3 (groups)
      expectError(await send(collector.url, new Uint8Array([0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), headers), 400);
    });

    it("200 with partialSuccess for spans without valid ids or times; the valid ones are kept", async () => {
      const good = randomTraceId();
      const body = {
        resourceSpans: [
          {
            resource: { attributes: "not a list" },
            scopeSpans: [
              {
                spans: [
                  { traceId: "abc", spanId: randomSpanId(), name: "bad trace id", startTimeUnixNano: "1" },
                  { traceId: "0".repeat(32), spanId: randomSpanId(), name: "zero trace id", startTimeUnixNano: "1" },
                  { traceId: randomTraceId(), spanId: 5, name: "bad span id", startTimeUnixNano: "1" },
                  { traceId: randomTraceId(), spanId: randomSpanId(), name: "no start" },
                  "not a span",
                  { traceId: good, spanId: randomSpanId(), name: { nested: true }, kind: "SPAN_KIND_SERVER", startTimeUnixNano: "2000", endTimeUnixNano: "1000", attributes: [{ key: "x", value: { arrayValue: { values: [{ kvlistValue: { values: [{ key: "deep", value: { intValue: "12345678901234567890" } }] } }] } } }, { nokey: 1 }], events: 7, links: [null], status: "weird" },
                ],
              },
            ],
          },
          null,
          { scopeSpans: "nope" },
        ],
      };
      const answer = await send(collector.url, JSON.stringify(body));
      expect(answer.status).toBe(200);
      expect(answer.body).toEqual({ partialSuccess: { rejectedSpans: "5", errorMessage: expect.stringContaining("traceId") } });
      const kept = await traceOf(collector, good);
      expect(kept.spans).toEqual([
        expect.objectContaining({ name: "(unnamed)", kind: 2, service: "unknown_service", startTimeUnixNano: "2000", endTimeUnixNano: "2000", attributes: { x: [{ deep: "12345678901234567890" }] } }),
      ]);
    });

    it("413 for bodies over the cap, declared, streamed or compressed", async () => {
      expect(MAX_BODY_BYTES).toBe(8 * 1024 * 1024);
      expectError(await send(collector.url, new Uint8Array(MAX_BODY_BYTES + 1).fill(0x20)), 413);
      const streamed = await sendChunked(collector.url, MAX_BODY_BYTES + 512 * 1024);
      expect(streamed.status).toBe(413);
      expect(JSON.parse(streamed.text)).toMatchObject({ error: { code: "payload_too_large" } });
      // A small gzip that inflates past the cap: refused without inflating it all.
      const bomb = gzipSync(Buffer.alloc(MAX_BODY_BYTES + 1024, 0x20));
      expect(bomb.length).toBeLessThan(64 * 1024);
      expectError(await send(collector.url, bomb, { "content-type": "application/json", "content-encoding": "gzip" }), 413);
    });

    it("415 for other media types and encodings, saying what is supported", async () => {
      const xml = await send(collector.url, "<spans/>", { "content-type": "application/xml" });
      expectError(xml, 415);
      expect((xml.body as { error: { message: string } }).error.message).toContain("application/json");
      expectError(await send(collector.url, "{}", { "content-type": "text/plain" }), 415);
      expectError(await send(collector.url, "{}", { "content-type": "application/json", "content-encoding": "compress" }), 415);
    });

    it("405 for other methods on /v1/traces, 404 elsewhere, 403 for a foreign Host (DNS rebinding)", async () => {
      const get = await fetch(`${collector.url}/v1/traces`);
      expect(get.status).toBe(405);
      expect(get.headers.get("allow")).toBe("POST");
      await get.body?.cancel();
      const missing = await fetch(`${collector.url}/nope`);
      expect(missing.status).toBe(404);
      await missing.body?.cancel();
      const foreign = await new Promise<number>((resolve, reject) => {
        httpRequest(`${collector.url}/api/traces`, { headers: { host: "attacker.example:4318" } }, (response) => {
          response.resume();
          resolve(response.statusCode ?? 0);
        })
          .on("error", reject)
          .end();
      });
      expect(foreign).toBe(403);
    });

    it("keeps out spans a web page could send: a typeless body (no CORS preflight) → 415, a foreign Host → 403", async () => {
      const traceId = randomTraceId();
      const spans = exportRequest([{ service: "attacker", spans: [{ traceId, spanId: randomSpanId(), name: "injected", startMs: 0, durationMs: 1 }] }]);

      // What fetch(url, {method: "POST", body: new Blob([...])}) sends from any page: no Content-Type.
      const typeless = await fetch(`${collector.url}/v1/traces`, { method: "POST", body: new Blob([spans]) });
      const text = await typeless.text();
      const answer: Answer = { status: typeless.status, text, body: parseJson(text) };
      expectError(answer, 415);
      expect((answer.body as { error: { message: string } }).error.message).toMatch(/content-type is missing.*application\/json/);

      const foreign = await new Promise<Answer>((resolve, reject) => {
        const request = httpRequest(`${collector.url}/v1/traces`, { method: "POST", headers: { host: "attacker.example:4318", "content-type": "application/json" } }, (response) => {
          let text = "";
          response.on("data", (chunk: Buffer) => (text += chunk.toString()));
          response.on("end", () => resolve({ status: response.statusCode ?? 0, text, body: parseJson(text) }));
        });
        request.on("error", reject);
        request.end(spans);
      });
      expectError(foreign, 403);

      expect((await fetch(`${collector.url}/api/traces/${traceId}`)).status).toBe(404);
      // The same spans, sent as an exporter does, are taken.
      expect((await send(collector.url, spans)).status).toBe(200);
      expect((await traceOf(collector, traceId)).spans).toHaveLength(1);
    });
  });

  it("serves the list and waterfall pages with span data escaped", async () => {
    const traceId = randomTraceId();
    const evil = `<img src=x onerror="alert(1)">`;
    expect((await send(collector.url, exportRequest([{ service: `svc${evil}`, spans: [{ traceId, spanId: randomSpanId(), name: evil, startMs: 5000, durationMs: 1, attributes: { [evil]: evil } }] }]))).status).toBe(200);
    for (const path of ["/", `/traces/${traceId}`]) {
      const response = await fetch(`${collector.url}${path}`);
      expect(response.status).toBe(200);
      expect(response.headers.get("content-type")).toContain("text/html");
      expect(response.headers.get("content-security-policy")).toContain("script-src 'nonce-");
      const html = await response.text();
      expect(html).not.toContain("<img");
      expect(html).toContain("&#60;img src=x onerror=&#34;alert(1)&#34;&#62;");
    }
    const unknown = await fetch(`${collector.url}/traces/${randomTraceId()}`);
    expect(unknown.status).toBe(404);
    expect(await unknown.text()).toContain("Not found");
  });
});

describe("local trace collector on disk", () => {
  const dirs: string[] = [];
  const running: Collector[] = [];

  const start = async (dir: string, options: { maxTraces?: number } = {}): Promise<Collector> => {
    const collector = await startCollector({ port: 0, dir, ...options });
    running.push(collector);
    return collector;
  };
  const tempDir = (): string => {
    const dir = mkdtempSync(join(tmpdir(), "guildwire-collector-disk-"));
    dirs.push(dir);
    return dir;
  };
  const traceFiles = (dir: string): string[] => readdirSync(dir).filter((name) => name.endsWith(".json")).sort();

  afterAll(async () => {
    await Promise.all(running.map((c) => c.stop()));
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  it("keeps traces across a restart on the same folder, and merges later spans into them", async () => {
    const dir = tempDir();
    const first = await start(dir);
    const traceId = randomTraceId();
    const root = randomSpanId();
    await send(first.url, exportRequest([{ service: "guildwire-api", spans: [{ traceId, spanId: root, name: "root", startMs: 0, durationMs: 10, attributes: { n: 1 } }] }]));
    await send(first.url, exportRequest([{ service: "guildwire-guild", spans: [{ traceId, spanId: randomSpanId(), parentSpanId: root, name: "child", startMs: 1, durationMs: 2 }] }]));
    const before = await traceOf(first, traceId);
    await first.stop();
    expect(traceFiles(dir)).toEqual([`${traceId}.json`]);

    const second = await start(dir);
    expect(await traceOf(second, traceId)).toEqual(before);
    await send(second.url, exportRequest([{ service: "guildwire-session", spans: [{ traceId, spanId: randomSpanId(), parentSpanId: root, name: "late", startMs: 3, durationMs: 1 }] }]));
    expect((await traceOf(second, traceId)).spans.map((s) => s.name)).toEqual(["root", "child", "late"]);
    await second.stop();

    const third = await start(dir);
    expect((await traceOf(third, traceId)).spanCount).toBe(3);
  });

  it("ignores unreadable files in its folder", async () => {
    const dir = tempDir();
    const { writeFileSync } = await import("node:fs");
    writeFileSync(join(dir, `${randomTraceId()}.json`), "{ half a file");
    writeFileSync(join(dir, `${randomTraceId()}.json`), JSON.stringify({ traceId: "x", spans: [{ spanId: "../../etc" }] }));
    writeFileSync(join(dir, "notes.txt"), "not a trace");
    const collector = await start(dir);
    expect(await traces(collector)).toEqual([]);
  });

  it("keeps the newest 500 traces by default, and prunes older ones from disk too", async () => {
    const dir = tempDir();
    const collector = await start(dir);
    const ids = Array.from({ length: 510 }, randomTraceId);
    // In four requests, oldest first.
    for (let i = 0; i < ids.length; i += 128) {
      const batch = ids.slice(i, i + 128).map((traceId, j) => ({ traceId, spanId: randomSpanId(), name: `t${i + j}`, startMs: i + j, durationMs: 1 }));
      expect((await send(collector.url, exportRequest([{ service: "bulk", spans: batch }]))).status).toBe(200);
    }
    const list = await traces(collector);
    expect(list).toHaveLength(500);
    expect(list[0]!.traceId).toBe(ids[509]);
    expect(new Set(list.map((t) => t.traceId))).toEqual(new Set(ids.slice(10)));
    await collector.flush();
    expect(traceFiles(dir)).toEqual(ids.slice(10).map((id) => `${id}.json`).sort());
  });

  it("prunes by last update: a trace that keeps receiving spans stays", async () => {
    const dir = tempDir();
    const collector = await start(dir, { maxTraces: 3 });
    const ids = Array.from({ length: 5 }, randomTraceId);
    const post = (traceId: string, name: string, startMs: number) => send(collector.url, exportRequest([{ service: "s", spans: [{ traceId, spanId: randomSpanId(), name, startMs, durationMs: 1 }] }]));
    await post(ids[0]!, "a", 0);
    await post(ids[1]!, "b", 1);
    await post(ids[2]!, "c", 2);
    await post(ids[0]!, "a2", 3); // ids[0] is now the most recently updated
    await post(ids[3]!, "d", 4);
    await post(ids[4]!, "e", 5);
    expect(new Set((await traces(collector)).map((t) => t.traceId))).toEqual(new Set([ids[0], ids[3], ids[4]]));
    await collector.stop();
    expect(traceFiles(dir)).toEqual([ids[0], ids[3], ids[4]].map((id) => `${id}.json`).sort());
    const again = await start(dir, { maxTraces: 2 });
    expect(new Set((await traces(again)).map((t) => t.traceId))).toEqual(new Set([ids[3], ids[4]]));
  });
});
