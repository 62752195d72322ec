/**
 * The local trace collector: an OTLP/HTTP receiver (JSON and protobuf, gzip or not) on
 * 127.0.0.1:4318 that keeps recent traces under .traces/ and shows them at http://127.0.0.1:4318/
 * — the list of recent traces, and each trace as a waterfall.
 *
 *   npm run collector                      # alone
 *   npm start                              # with wrangler dev (scripts/start.ts)
 *
 * Routes: POST /v1/traces · GET /api/traces[?limit=n] · GET /api/traces/{traceId} · GET / ·
 * GET /traces/{traceId}. Node's http module only; nothing it receives can crash it.
 */
import { randomBytes } from "node:crypto";
import { type IncomingMessage, type Server, type ServerResponse, createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { resolve } from "node:path";
import { brotliDecompress, gunzip, inflate } from "node:zlib";
import { contentSecurityPolicy, renderListPage, renderNotFoundPage, renderTracePage } from "./lib/collector-page.ts";
import { type DecodedRequest, OtlpError, decodeJsonRequest, decodeProtobufRequest, encodeProtobufResponse } from "./lib/otlp.ts";
import { TRACE_ID, TraceStore } from "./lib/trace-store.ts";

/** Largest request body accepted, before and after decompression. */
export const MAX_BODY_BYTES = 8 * 1024 * 1024;
/** Bodies bigger than this are not even drained: the connection is closed. */
const MAX_DRAIN_BYTES = 64 * 1024 * 1024;

export interface CollectorOptions {
  port?: number;
  host?: string;
  /** Where traces are kept (created if missing). */
  dir?: string;
  maxTraces?: number;
  maxSpansPerTrace?: number;
  /** Log each received batch to stdout. */
  verbose?: boolean;
}

export interface Collector {
  /** Base URL, e.g. http://127.0.0.1:4318 — what OTEL_EXPORTER_OTLP_ENDPOINT should be. */
  url: string;
  port: number;
  host: string;
  dir: string;
  store: TraceStore;
  server: Server;
  /** Writes pending traces to disk. */
  flush(): Promise<void>;
  /** Stops listening, closes connections and writes pending traces. */
  stop(): Promise<void>;
}

class HttpError extends Error {
  readonly status: number;
  readonly code: string;

  constructor(status: number, code: string, message: string) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function startCollector(options: CollectorOptions = {}): Promise<Collector> {
  const host = options.host ?? "127.0.0.1";
  const dir = resolve(options.dir ?? ".traces");
  const store = new TraceStore(dir, {
    ...(options.maxTraces !== undefined ? { maxTraces: options.maxTraces } : {}),
    ...(options.maxSpansPerTrace !== undefined ? { maxSpansPerTrace: options.maxSpansPerTrace } : {}),
  });
  store.load();

  let url = "";
  const server = createServer((request, response) => {
    handle(request, response).catch((error: unknown) => {
      // Every route answers its own errors; this is the last line of defence.
      console.error("collector: unexpected error:", error);
      if (!response.headersSent) sendJson(response, 500, { error: { code: "internal_error", message: "the collector failed on this request" } });
      else response.destroy();
    });
  });
  server.on("clientError", (_error, socket) => {
    if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
    else socket.destroy();
  });
  server.requestTimeout = 30_000;
  server.headersTimeout = 10_000;
  server.keepAliveTimeout = 5_000;

  async function handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const path = (request.url ?? "/").split("?")[0]!;
    const query = new URLSearchParams((request.url ?? "").split("?")[1] ?? "");
    const method = request.method ?? "GET";

    // Loopback names only, so a web page can neither read traces nor send spans through DNS
    // rebinding.
    if (isLoopback(host) && !isLoopbackHostHeader(request.headers.host)) {
      request.resume();
      return sendJson(response, 403, { error: { code: "forbidden_host", message: "the collector answers only requests addressed to a loopback host" } });
    }
    if (path === "/v1/traces") {
      if (method !== "POST") return methodNotAllowed(request, response, "POST");
      return receive(request, response);
    }
    if (method !== "GET" && method !== "HEAD") return methodNotAllowed(request, response, "GET");
    request.resume();

    if (path === "/api/traces") {
      const limit = Number(query.get("limit") ?? "");
      return sendJson(response, 200, { traces: store.list(Number.isInteger(limit) && limit > 0 ? limit : Infinity) });
    }
    let match = /^\/api\/traces\/([^/]+)$/.exec(path);
    if (match) {
      const trace = lookup(match[1]!);
      if (!trace) return sendJson(response, 404, { error: { code: "unknown_trace", message: `no trace ${match[1]} here (it may have been pruned)` } });
      return sendJson(response, 200, trace);
    }
    if (path === "/" || path === "/traces" || path === "/traces/") {
      const nonce = randomBytes(16).toString("base64");
      return sendHtml(response, 200, renderListPage(store.list(), { endpoint: url, nonce }), nonce);
    }
    match = /^\/traces\/([^/]+)$/.exec(path);
    if (match) {
      const nonce = randomBytes(16).toString("base64");
      const trace = lookup(match[1]!);
      if (!trace) return sendHtml(response, 404, renderNotFoundPage(`No trace ${safeDecode(match[1]!)} here (it may have been pruned, or not arrived yet).`, nonce), nonce);
      return sendHtml(response, 200, renderTracePage(trace, { nonce }), nonce);
    }
    if (path === "/healthz") return sendJson(response, 200, { ok: true, traces: store.size });
    return sendJson(response, 404, { error: { code: "not_found", message: `no route ${method} ${path}` } });
  }

  function lookup(rawId: string) {
    const traceId = safeDecode(rawId).toLowerCase();
    return TRACE_ID.test(traceId) ? store.get(traceId) : null;
  }

  async function receive(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const contentType = (request.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
    // What OTLP/HTTP exporters send. A missing type is refused too: a web page can POST a typeless
    // Blob cross-origin without a CORS preflight, which must not put spans in the viewer.
    const isProtobuf = contentType === "application/x-protobuf";
    const isJson = contentType === "application/json";
    try {
      if (!isJson && !isProtobuf) {
        const given = contentType ? `content-type "${contentType}" is not supported` : "content-type is missing";
        throw new HttpError(415, "unsupported_media_type", `${given}: send OTLP/HTTP as application/json or application/x-protobuf`);
      }
      const body = await decompress(await readBody(request), request.headers["content-encoding"]);
      let decoded: DecodedRequest;
      try {
        decoded = isProtobuf ? decodeProtobufRequest(body) : decodeJsonRequest(new TextDecoder("utf-8", { fatal: true }).decode(body));
      } catch (error) {
        if (error instanceof OtlpError) throw new HttpError(400, "invalid_otlp", error.message);
        if (error instanceof TypeError) throw new HttpError(400, "invalid_otlp", "body is not valid UTF-8");
        throw error;
      }
      store.add(decoded.spans);
      if (options.verbose && decoded.spans.length) {
        const traces = new Set(decoded.spans.map((span) => span.traceId));
        console.log(`collector: ${decoded.spans.length} spans in ${traces.size} trace(s)${decoded.rejected ? `, ${decoded.rejected} rejected` : ""}`);
      }
      const errorMessage = decoded.errors.join("; ");
      if (isProtobuf) {
        response.writeHead(200, { "content-type": "application/x-protobuf" });
        response.end(encodeProtobufResponse(decoded.rejected, errorMessage));
        return;
      }
      sendJson(response, 200, decoded.rejected ? { partialSuccess: { rejectedSpans: String(decoded.rejected), errorMessage } } : {});
    } catch (error) {
      if (!(error instanceof HttpError)) throw error;
      sendJson(response, error.status, { error: { code: error.code, message: error.message } });
      if (error.status === 413 && !request.complete) drainOrClose(request, response);
    }
  }

  await new Promise<void>((resolveListen, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 4318, host, () => {
      server.off("error", reject);
      resolveListen();
    });
  });
  const port = (server.address() as AddressInfo).port;
  url = `http://${host.includes(":") ? `[${host}]` : host}:${port}`;

  let stopped: Promise<void> | null = null;
  return {
    url,
    port,
    host,
    dir,
    store,
    server,
    flush: () => store.flush(),
    stop() {
      stopped ??= (async () => {
        const closed = new Promise<void>((r) => server.close(() => r()));
        server.closeAllConnections();
        await closed;
        await store.flush();
      })();
      return stopped;
    },
  };
}

// ---- HTTP helpers --------------------------------------------------------------------------------

/**
 * Reads the body up to MAX_BODY_BYTES; larger → 413, and the caller drains the rest (stopping to
 * read, or destroying the stream as `for await` would on an early exit, would lose the answer).
 */
function readBody(request: IncomingMessage): Promise<Buffer> {
  const declared = Number(request.headers["content-length"] ?? "");
  if (Number.isFinite(declared) && declared > MAX_BODY_BYTES) return Promise.reject(tooLarge());
  return new Promise((resolveBody, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let failed = false;
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        failed = true;
        request.off("data", onData);
        reject(tooLarge());
        return;
      }
      chunks.push(chunk);
    };
    request.on("data", onData);
    request.once("end", () => failed || resolveBody(Buffer.concat(chunks)));
    request.once("error", (error) => failed || reject(new HttpError(400, "bad_request", `could not read the body: ${error.message}`)));
  });
}

const tooLarge = (): HttpError => new HttpError(413, "payload_too_large", `request body is over ${MAX_BODY_BYTES / (1024 * 1024)} MiB; export smaller batches`);

async function decompress(body: Buffer, encoding: string | undefined): Promise<Buffer> {
  const name = (encoding ?? "identity").trim().toLowerCase();
  if (name === "identity" || name === "") return body;
  const zlibDecoder = name === "gzip" || name === "x-gzip" ? gunzip : name === "deflate" ? inflate : null;
  if (!zlibDecoder && name !== "br") throw new HttpError(415, "unsupported_content_encoding", `content-encoding "${name}" is not supported: use gzip, deflate, br or none`);
  return new Promise((resolveBody, reject) => {
    const done = (error: Error | null, result: Buffer) => {
      if (!error) return resolveBody(result);
      if ((error as NodeJS.ErrnoException).code === "ERR_BUFFER_TOO_LARGE" || error instanceof RangeError) reject(tooLarge());
      else reject(new HttpError(400, "invalid_encoding", `body is not valid ${name}: ${error.message}`));
    };
    if (zlibDecoder) zlibDecoder(body, { maxOutputLength: MAX_BODY_BYTES }, done);
    else brotliDecompress(body, { maxOutputLength: MAX_BODY_BYTES }, done);
  });
}

/** After an early 413: read and discard the rest so the client sees the answer, unless it is huge. */
function drainOrClose(request: IncomingMessage, response: ServerResponse): void {
  let drained = 0;
  request.on("data", (chunk: Buffer) => {
    drained += chunk.length;
    if (drained > MAX_DRAIN_BYTES) {
      request.destroy();
      response.destroy();
    }
  });
  request.on("error", () => {});
  request.resume();
}

function methodNotAllowed(request: IncomingMessage, response: ServerResponse, allow: string): void {
  request.resume();
  response.setHeader("allow", allow);
  sendJson(response, 405, { error: { code: "method_not_allowed", message: `use ${allow}` } });
}

function sendJson(response: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  response.writeHead(status, { "content-type": "application/json; charset=utf-8", "content-length": Buffer.byteLength(text), "cache-control": "no-store" });
  response.end(text);
}

function sendHtml(response: ServerResponse, status: number, html: string, nonce: string): void {
  response.writeHead(status, {
    "content-type": "text/html; charset=utf-8",
    "content-length": Buffer.byteLength(html),
    "cache-control": "no-store",
    "content-security-policy": contentSecurityPolicy(nonce),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
  });
  response.end(html);
}

function safeDecode(value: string): string {
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

const isLoopback = (host: string): boolean => host === "127.0.0.1" || host === "::1" || host === "localhost" || host.startsWith("127.");

function isLoopbackHostHeader(header: string | undefined): boolean {
  if (!header) return true; // HTTP/1.0 clients, curl --http1.0: not a browser
  const name = header.startsWith("[") ? header.slice(0, header.indexOf("]") + 1) : header.split(":")[0]!;
  return name === "localhost" || name === "[::1]" || /^127\.\d+\.\d+\.\d+$/.test(name);
}

// ---- CLI -----------------------------------------------------------------------------------------

/** Parses `--port N`, `--host H`, `--dir D`, `--verbose`. */
export function parseArgs(argv: string[]): CollectorOptions {
  const options: CollectorOptions = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const [flag, inline] = arg.includes("=") ? [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)] : [arg, undefined];
    const value = (): string => {
      const next = inline ?? argv[++i];
      if (next === undefined) throw new Error(`${flag} needs a value`);
      return next;
    };
    if (flag === "--port") options.port = Number(value());
    else if (flag === "--host") options.host = value();
    else if (flag === "--dir") options.dir = value();
    else if (flag === "--verbose" || flag === "-v") options.verbose = true;
    else throw new Error(`unknown argument ${arg} (use --port, --host, --dir, --verbose)`);
  }
  return options;
}

if (import.meta.filename === resolve(process.argv[1] ?? "")) {
  let collector: Collector;
  try {
    collector = await startCollector(parseArgs(process.argv.slice(2)));
  } catch (error) {
    const err = error as NodeJS.ErrnoException;
    console.error(err.code === "EADDRINUSE" ? `collector: port ${err.message.split(":").pop()} is already in use (is a collector already running?)` : `collector: ${err.message}`);
    process.exit(1);
  }
  console.log(`guildwire trace collector on ${collector.url} — traces at ${collector.url}/ (OTLP/HTTP: POST ${collector.url}/v1/traces; kept in ${collector.dir})`);
  const shutdown = () => {
    void collector.stop().then(() => process.exit(0));
  };
  process.once("SIGINT", shutdown);
  process.once("SIGTERM", shutdown);
}
