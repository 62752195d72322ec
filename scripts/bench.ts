/**
 * The fanout benchmark (CONTRACT.md, Performance):
 *
 *   npm run bench -- --sessions N --messages M --concurrency C [--json FILE] [--modes off,tiered,...]
 *
 * For each mode it starts the gateway as `npm start` does (fresh wrangler dev, fresh storage),
 * connects N real WebSocket clients (identified sessions of N members of one guild), posts M
 * messages C at a time, and measures at the clients: deliveries per second and publish→receive
 * latency. Rows run one after another in one invocation, so ratios between them are meaningful.
 *
 * Modes: `off` (no traces start), `tiered` (every message sampled, default fanout tiers),
 * `always` (every message sampled, every session keeps it: FANOUT_SAMPLING=1:1), `naive` (one
 * awaited RPC per session per message, unbounded, no batching), `single-object` (every socket in
 * one Durable Object broadcasting in a loop).
 */
import { readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { cpus, totalmem } from "node:os";
import { parseArgs } from "node:util";
import WebSocket from "ws";
import { startProfiling, summarise } from "./lib/cpu-profile.ts";
import { type DevServer, runtimeUrl, startDevServer } from "./lib/dev-server.ts";

type Mode = "off" | "tiered" | "always" | "naive" | "single-object";
const ALL_MODES: Mode[] = ["off", "tiered", "always", "naive", "single-object"];

const { values } = parseArgs({
  options: {
    sessions: { type: "string", default: "1000" },
    messages: { type: "string", default: "200" },
    concurrency: { type: "string", default: "20" },
    json: { type: "string" },
    modes: { type: "string", default: ALL_MODES.join(",") },
    /** Longest wait for a row's deliveries; a row that runs out reports what arrived by then. */
    "timeout-seconds": { type: "string", default: "180" },
    /**
     * The naive baseline collapses under load; it is measured over this window (deliveries/s of
     * what arrived) rather than waited out, so the default run stays under five minutes.
     */
    "naive-seconds": { type: "string", default: "30" },
    /** Extra `NAME:value` settings for every row, e.g. `--var FANOUT_MAX_IN_FLIGHT:256`. */
    var: { type: "string", multiple: true, default: [] },
    /** Appends wrangler's output to FILE. */
    "wrangler-log": { type: "string" },
    /** Writes a CPU profile summary of the Worker's publish phase per row to FILE-<mode>.txt. */
    profile: { type: "string" },
  },
});
const sessions = Number(values.sessions);
const messages = Number(values.messages);
const concurrency = Number(values.concurrency);
const modes = values.modes.split(",").map((m) => m.trim()) as Mode[];
for (const mode of modes) if (!ALL_MODES.includes(mode)) throw new Error(`unknown mode ${mode}; expected ${ALL_MODES.join(", ")}`);
if (![sessions, messages, concurrency].every((n) => Number.isSafeInteger(n) && n > 0)) {
  throw new Error("--sessions, --messages and --concurrency must be positive integers");
}

export interface Row {
  mode: Mode;
  sessions: number;
  messages: number;
  concurrency: number;
  deliveries: number;
  expectedDeliveries: number;
  deliveriesPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  workerdCpuSeconds: number;
  workerdPeakMemoryMb: number;
  spansExported: number;
  /** RPCs the guild made to sessions (its `fanout_rpc` timing), when it fanned out directly. */
  sessionRpcs: number | null;
  setupSeconds: number;
}

/** Where spans go during the run: an OTLP endpoint that only counts, so export costs are real. */
async function startSpanSink(): Promise<{ url: string; spans: () => number; close: () => void }> {
  let spans = 0;
  const server = createServer((request, response) => {
    let body = "";
    request.on("data", (chunk: Buffer) => (body += chunk.toString()));
    request.on("end", () => {
      spans += (body.match(/"spanId"/g) ?? []).length;
      response.writeHead(200, { "content-type": "application/json" }).end("{}");
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : 0;
  return { url: `http://127.0.0.1:${port}`, spans: () => spans, close: () => server.close() };
}

const extraVars = Object.fromEntries(
  values.var.map((setting) => {
    const colon = setting.indexOf(":");
    if (colon <= 0) throw new Error(`--var ${setting}: expected NAME:value`);
    return [setting.slice(0, colon), setting.slice(colon + 1)];
  }),
);

function varsFor(mode: Mode, sinkUrl: string): Record<string, string> {
  const common = { ...extraVars, OTEL_EXPORTER_OTLP_ENDPOINT: sinkUrl };
  switch (mode) {
    case "off":
      return { ...common, TRACE_SAMPLE_RATE: "0" };
    case "tiered":
      return { ...common, TRACE_SAMPLE_RATE: "1" };
    case "always":
      return { ...common, TRACE_SAMPLE_RATE: "1", FANOUT_SAMPLING: "1:1" };
    case "naive":
      return { ...common, TRACE_SAMPLE_RATE: "0", FANOUT_STRATEGY: "naive" };
    case "single-object":
      return { ...common, TRACE_SAMPLE_RATE: "0" };
  }
}

/** The workerd processes under wrangler (its proxy and the runtime that runs every object). */
function workerdPids(rootPid: number): number[] {
  const found: number[] = [];
  const queue = [rootPid];
  while (queue.length > 0) {
    const pid = queue.shift()!;
    try {
      if (readFileSync(`/proc/${pid}/comm`, "utf8").trim() === "workerd") found.push(pid);
      queue.push(...readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number));
    } catch {
      // exited meanwhile
    }
  }
  return found;
}

/** User + system CPU seconds of these processes so far. */
function cpuSeconds(pids: number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    try {
      const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
      ticks += Number(fields[11]) + Number(fields[12]);
    } catch {
      // It exited: wrangler restarted the runtime (it does when project files change mid-run).
      console.error(`workerd ${pid} is gone: was a project file edited during the run? The row is not valid.`);
    }
  }
  return ticks / 100;
}

/** Sum of the processes' peak resident memory (VmHWM), in MB. */
function peakMemoryMb(pids: number[]): number {
  let kb = 0;
  for (const pid of pids) {
    try {
      kb += Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? NaN);
    } catch {
      kb = NaN;
    }
  }
  return kb / 1024;
}

async function pool<T>(items: T[], limit: number, fn: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) {
        const index = next++;
        await fn(items[index]!, index);
      }
    }),
  );
}

async function request(url: string, init: RequestInit, expect: number[]): Promise<Response> {
  for (let attempt = 1; ; attempt++) {
    const response = await fetch(url, init);
    if (expect.includes(response.status)) return response;
    const text = await response.text();
    if (attempt >= 5 || response.status < 500) throw new Error(`${init.method ?? "GET"} ${url}: ${response.status} ${text}`);
    await new Promise((r) => setTimeout(r, 100 * attempt));
  }
}

const percentile = (sorted: number[], p: number) => (sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!);

async function runMode(mode: Mode, sinkUrl: string, sinkSpans: () => number): Promise<Row> {
  const setupStarted = Date.now();
  const server: DevServer = await startDevServer({
    vars: varsFor(mode, sinkUrl),
    startTimeoutMs: 90_000,
    ...(values["wrangler-log"] ? { logFile: values["wrangler-log"] } : {}),
  });
  const sockets: WebSocket[] = [];
  try {
    const pid = workerdPids(server.process.pid!);
    // Straight to the runtime, past wrangler's dev proxy (see runtimeUrl): the same Worker and
    // objects, minus a hop that cannot hold 10,000 sockets under this machine's file limit.
    const base = await runtimeUrl(server);
    const guildId = `bench-${mode}`;
    const users = Array.from({ length: sessions }, (_, i) => `user${i}`);
    const tokenFor = async (user: string, admin = false) =>
      ((await (await request(`${base}/api/dev/token`, { method: "POST", body: JSON.stringify({ user_id: user, admin }) }, [200])).json()) as { token: string }).token;
    const admin = await tokenFor("bench-admin", true);
    const tokens = new Array<string>(sessions);
    await pool(users, 64, async (user, i) => {
      tokens[i] = await tokenFor(user);
    });

    const singleObject = mode === "single-object";
    if (!singleObject) {
      await pool(users, 48, async (user) => {
        await request(`${base}/api/guilds/${guildId}/members/${user}`, { method: "PUT", headers: { Authorization: `Bearer ${admin}` } }, [200, 201]);
      });
    }

    // Latency per message index: the clients parse `content` (the index) from MESSAGE_CREATE.
    const sentAt = new Array<number>(messages).fill(0);
    const latencies: number[] = [];
    let delivered = 0;
    let lastDelivery = 0;
    let resolveAll: () => void = () => {};
    const allDelivered = new Promise<void>((resolve) => (resolveAll = resolve));
    const expected = sessions * messages;

    const wsBase = base.replace(/^http/, "ws");
    const url = singleObject ? `${wsBase}/api/dev/bench-room/${guildId}` : `${wsBase}/gateway`;
    const onMessage = (ws: WebSocket, i: number, ready: () => void) => (data: WebSocket.RawData) => {
      const frame = JSON.parse(data.toString()) as { op: number; t?: string; d?: { content?: string; heartbeat_interval?: number } };
      if (frame.op === 10) {
        ws.send(JSON.stringify({ op: 2, d: { token: tokens[i] } }));
        // Heartbeat like a real client, or long set-ups (10,000 sessions) would time out (4009).
        const every = frame.d!.heartbeat_interval!;
        const timer = setInterval(() => ws.readyState === WebSocket.OPEN && ws.send('{"op":1,"d":null}'), every * 0.8);
        ws.once("close", () => clearInterval(timer));
      } else if (frame.t === "READY") ready();
      else if (frame.t === "MESSAGE_CREATE") {
        const now = performance.now();
        latencies.push(now - sentAt[Number(frame.d!.content)]!);
        lastDelivery = now;
        if (++delivered === expected) resolveAll();
      }
    };
    const connect = (i: number) =>
      new Promise<void>((resolve, reject) => {
        const ws = new WebSocket(url);
        ws.on("error", reject); // stays attached: a later error must not crash the bench
        ws.on("message", onMessage(ws, i, resolve));
        ws.once("open", () => {
          sockets.push(ws);
          if (singleObject) resolve();
        });
      });
    await pool(users, 100, async (_user, i) => {
      // Under a connection storm the local proxy sometimes resets one; a client would retry.
      for (let attempt = 1; ; attempt++) {
        try {
          return await connect(i);
        } catch (error) {
          if (attempt >= 5) throw error;
          await new Promise((r) => setTimeout(r, 200 * attempt));
        }
      }
    });
    const setupSeconds = (Date.now() - setupStarted) / 1000;

    const stopProfiling = values.profile ? await startProfiling(server.inspectorPort) : null;
    const cpuBefore = cpuSeconds(pid);
    const spansBefore = sinkSpans();
    const started = performance.now();
    const postUrl = singleObject ? `${base}/api/dev/bench-room/${guildId}` : `${base}/api/guilds/${guildId}/messages`;
    const timeoutMs = Number(mode === "naive" ? values["naive-seconds"] : values["timeout-seconds"]) * 1000;
    const deadline = started + timeoutMs;
    await pool(
      Array.from({ length: messages }, (_, i) => i),
      concurrency,
      async (i) => {
        // Past the row's window nothing more is posted (only the naive baseline gets that far).
        if (performance.now() > deadline) return;
        sentAt[i] = performance.now();
        await request(postUrl, {
          method: "POST",
          headers: { Authorization: `Bearer ${tokens[i % sessions]}` },
          body: JSON.stringify({ content: String(i) }),
        }, [201]);
      },
    );
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([allDelivered, new Promise((r) => (timer = setTimeout(r, Math.max(0, deadline - performance.now()))))]);
    clearTimeout(timer);
    const elapsedSeconds = ((delivered === expected ? lastDelivery : performance.now()) - started) / 1000;
    // The row ends here: what arrives later (the naive baseline's backlog) is not counted.
    const deliveredInWindow = delivered;
    const windowLatencies = latencies.slice().sort((a, b) => a - b);
    if (stopProfiling) writeFileSync(`${values.profile}-${mode}.txt`, `${summarise(await stopProfiling()).join("\n")}\n`);
    // Let span exports land before counting them: until the count holds still for 1 s (at most 15 s).
    for (let waited = 0, last = -1; waited < 15_000 && sinkSpans() !== last; waited += 1000) {
      last = sinkSpans();
      await new Promise((r) => setTimeout(r, 1000));
    }
    let sessionRpcs: number | null = null;
    if (!singleObject) {
      const timings = (await (await request(`${base}/api/guilds/${guildId}/timings`, { headers: { Authorization: `Bearer ${admin}` } }, [200])).json()) as {
        minutes: { actions: Record<string, { count: number }> }[];
      };
      sessionRpcs = timings.minutes.reduce((n, m) => n + (m.actions.fanout_rpc?.count ?? 0), 0) || null;
    }
    return {
      mode,
      sessions,
      messages,
      concurrency,
      deliveries: deliveredInWindow,
      expectedDeliveries: expected,
      deliveriesPerSecond: Math.round(deliveredInWindow / elapsedSeconds),
      p50Ms: round(percentile(windowLatencies, 50)),
      p99Ms: round(percentile(windowLatencies, 99)),
      maxMs: round(windowLatencies[windowLatencies.length - 1] ?? NaN),
      workerdCpuSeconds: round(cpuSeconds(pid) - cpuBefore),
      workerdPeakMemoryMb: Math.round(peakMemoryMb(pid)),
      spansExported: sinkSpans() - spansBefore,
      sessionRpcs,
      setupSeconds: round(setupSeconds),
    };
  } finally {
    for (const ws of sockets) ws.terminate();
    await server.stop();
  }
}

const round = (n: number) => Math.round(n * 10) / 10;

const sink = await startSpanSink();
const rows: Row[] = [];
const benchStarted = Date.now();
try {
  for (const mode of modes) {
    process.stderr.write(`running ${mode}: ${sessions} sessions, ${messages} messages, concurrency ${concurrency}…\n`);
    const row = await runMode(mode, sink.url, sink.spans);
    rows.push(row);
    process.stderr.write(`  ${row.deliveries}/${row.expectedDeliveries} delivered, ${row.deliveriesPerSecond}/s, p99 ${row.p99Ms} ms\n`);
  }
} finally {
  sink.close();
}

const header = ["mode", "sessions", "messages", "conc", "deliveries", "deliveries/s", "p50 ms", "p99 ms", "max ms", "workerd CPU s", "peak MB", "spans", "guild→session RPCs"];
const table = rows.map((r) => [
  r.mode,
  r.sessions,
  r.messages,
  r.concurrency,
  `${r.deliveries}/${r.expectedDeliveries}`,
  r.deliveriesPerSecond,
  r.p50Ms,
  r.p99Ms,
  r.maxMs,
  r.workerdCpuSeconds,
  r.workerdPeakMemoryMb,
  r.spansExported,
  r.sessionRpcs ?? "-",
].map(String));
console.log(`| ${header.join(" | ")} |`);
console.log(`| ${header.map(() => "---").join(" | ")} |`);
for (const line of table) console.log(`| ${line.join(" | ")} |`);

const find = (mode: Mode) => rows.find((r) => r.mode === mode);
const ratio = (a: Mode, b: Mode, key: "deliveriesPerSecond" | "p99Ms") => {
  const x = find(a)?.[key];
  const y = find(b)?.[key];
  return x !== undefined && y !== undefined ? (x / y).toFixed(2) : "n/a";
};
console.log("");
console.log(`tiered / off deliveries/s: ${ratio("tiered", "off", "deliveriesPerSecond")}   p99 tiered / off: ${ratio("tiered", "off", "p99Ms")}`);
console.log(`always / off deliveries/s: ${ratio("always", "off", "deliveriesPerSecond")}   p99 always / off: ${ratio("always", "off", "p99Ms")}`);
console.log(`tiered / naive deliveries/s: ${ratio("tiered", "naive", "deliveriesPerSecond")}`);
console.log(`tiered / single-object deliveries/s: ${ratio("tiered", "single-object", "deliveriesPerSecond")}`);
console.log(`total bench time: ${((Date.now() - benchStarted) / 1000).toFixed(0)} s`);

if (values.json) {
  const machine = { cpus: cpus().length, cpuModel: cpus()[0]?.model ?? "", memoryGb: Math.round(totalmem() / 2 ** 30), node: process.version, platform: process.platform };
  writeFileSync(values.json, `${JSON.stringify({ rows, machine }, null, 2)}\n`);
  console.log(`wrote ${values.json}`);
}
// The naive baseline is allowed to fall behind (that is its point); guildwire's rows are not.
const incomplete = rows.filter((r) => r.deliveries !== r.expectedDeliveries);
for (const row of incomplete) console.error(`${row.mode}: ${row.deliveries} of ${row.expectedDeliveries} deliveries arrived in the time allowed`);
if (incomplete.some((r) => r.mode !== "naive")) process.exitCode = 1;
