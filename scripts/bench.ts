/**
 * The fanout benchmark (CONTRACT.md, Performance):
 *
 *   npm run bench -- --sessions N --messages M --concurrency C [--json FILE] [--modes off,tiered,...]
 *
 * For each mode it starts the gateway as `npm start` does (fresh wrangler dev, fresh storage),
 * connects N real WebSocket clients (identified sessions of N members of one guild), posts M
 * messages C at a time, and measures at the clients: deliveries per second and publish→receive
 * latency. `off` and `tiered` share one server (tracing configured as `tiered`; an `off` round's
 * requests carry an unsampled traceparent, so nothing in it is traced) and run `--rounds` measured
 * rounds alternately (off, tiered, tiered, off, …), each after a warm-up, so drift on a shared
 * machine hits both alike; their rows are the medians. The other modes run one round each. All rows come from one
 * invocation, so ratios between them are meaningful. Spans go to a sink in its own process.
 *
 * Modes: `off` (no traces start: every request carries `traceparent: …-00`), `tiered` (every message sampled, default fanout tiers),
 * `always` (every message sampled, every session keeps it: FANOUT_SAMPLING=1:1), `naive` (one
 * awaited RPC per session per message, unbounded, no batching), `single-object` (every socket in
 * one Durable Object broadcasting in a loop).
 *
 * `naive` would take minutes over M messages, so it posts fewer (`--naive-messages`, by default
 * two waves of C) and is waited out like the others: its C concurrent messages finish together,
 * ~C × N deliveries at once, so a fixed window would count only whole waves and miss the time
 * of the last one.
 */
import { accessSync, constants, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { fork } from "node:child_process";
import { cpus, totalmem } from "node:os";
import { dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import WebSocket from "ws";
import { startProfiling, summarise } from "./lib/cpu-profile.ts";
import { type DevServer, runtimeUrl, startDevServer } from "./lib/dev-server.ts";
import { DEFAULT_FANOUT_SAMPLING, fanoutSampleRate, keepSampled, parseFanoutTiers } from "../src/transport/sampling.ts";

type Mode = "off" | "tiered" | "always" | "naive" | "single-object";
const ALL_MODES: Mode[] = ["off", "tiered", "always", "naive", "single-object"];

const { values } = parseArgs({
  options: {
    sessions: { type: "string", default: "1000" },
    messages: { type: "string", default: "200" },
    concurrency: { type: "string", default: "20" },
    json: { type: "string" },
    modes: { type: "string", default: ALL_MODES.join(",") },
    /**
     * Alternating measured rounds of off and tiered (the other modes run one). An even count
     * balances their positions (off, tiered, tiered, off), so drift in either direction hits both
     * alike; with 3 rounds tiered always had the last slot.
     */
    rounds: { type: "string", default: "2" },
    /** Longest wait for a row's deliveries; a row that runs out fails the run (it says what arrived). */
    "timeout-seconds": { type: "string", default: "180" },
    /** Messages the naive baseline posts; by default two waves of `--concurrency`, or M if fewer. */
    "naive-messages": { type: "string" },
    /** Longest wait for the naive baseline's deliveries; running out fails the run, as above. */
    "naive-seconds": { type: "string", default: "90" },
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
const rounds = Number(values.rounds);
const naiveMessages = values["naive-messages"] === undefined ? Math.min(messages, 2 * concurrency) : Number(values["naive-messages"]);
const modes = values.modes.split(",").map((m) => m.trim()) as Mode[];
for (const mode of modes) if (!ALL_MODES.includes(mode)) throw new Error(`unknown mode ${mode}; expected ${ALL_MODES.join(", ")}`);
if (![sessions, messages, concurrency, rounds, naiveMessages].every((n) => Number.isSafeInteger(n) && n > 0)) {
  throw new Error("--sessions, --messages, --concurrency, --rounds and --naive-messages must be positive integers");
}
if (![values["timeout-seconds"], values["naive-seconds"]].every((v) => Number(v) > 0)) {
  throw new Error("--timeout-seconds and --naive-seconds must be positive numbers");
}
// An output that cannot be written fails the run now, not after minutes of measuring; its folder is made.
for (const option of ["json", "profile", "wrangler-log"] as const) {
  const file = values[option];
  if (file === undefined) continue;
  try {
    mkdirSync(dirname(resolve(file)), { recursive: true });
    accessSync(dirname(resolve(file)), constants.W_OK);
  } catch (error) {
    throw new Error(`--${option} ${file} cannot be written: ${(error as Error).message}`);
  }
}

/** A mode's result: the median of its rounds, figure by figure, and the rounds themselves. */
export interface Row extends Round {
  mode: Mode;
  sessions: number;
  messages: number;
  concurrency: number;
  workerdPeakMemoryMb: number;
  setupSeconds: number;
  rounds: Round[];
}

/** Where spans go during the run: an OTLP endpoint that only counts, so export costs are real. */
interface SinkCounts {
  spans: number;
  requests: number;
}

async function startSpanSink(): Promise<{ url: string; counts: () => SinkCounts; close: () => void }> {
  const counts: SinkCounts = { spans: 0, requests: 0 };
  const child = fork(join(import.meta.dirname, "lib/span-sink.ts"), { stdio: "inherit" });
  const port = await new Promise<number>((resolve, reject) => {
    child.once("error", reject);
    child.on("message", (message: { port?: number; spans?: number }) => {
      if (message.port !== undefined) resolve(message.port);
      if (message.spans !== undefined) {
        counts.spans += message.spans;
        counts.requests++;
      }
    });
  });
  return { url: `http://127.0.0.1:${port}`, counts: () => ({ ...counts }), close: () => child.kill() };
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
    case "off": // its rounds run on the tiered server, with unsampled requests
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

/**
 * A request that retries 5xx answers, and — for GETs, which are safe to repeat — a connection
 * the server closed (a kept-alive socket that went idle during a long round).
 */
async function request(url: string, init: RequestInit, expect: number[]): Promise<Response> {
  const idempotent = (init.method ?? "GET") === "GET";
  for (let attempt = 1; ; attempt++) {
    let response: Response;
    try {
      response = await fetch(url, init);
    } catch (error) {
      if (!idempotent || attempt >= 5) throw error;
      await new Promise((r) => setTimeout(r, 100 * attempt));
      continue;
    }
    if (expect.includes(response.status)) return response;
    const text = await response.text();
    if (attempt >= 5 || response.status < 500) throw new Error(`${init.method ?? "GET"} ${url}: ${response.status} ${text}`);
    await new Promise((r) => setTimeout(r, 100 * attempt));
  }
}

const hex = (bytes: number) => Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");

/**
 * A request's trace. An off round's are `unsampled`: no span is made anywhere for them. Tiered
 * and always rounds' posts are `sampled`, as the API would sample them itself there
 * (TRACE_SAMPLE_RATE=1), with a trace id the clients know, so each can tell whether its session
 * kept the sample. Other requests carry `none` and the API decides.
 */
function newTrace(kind: "unsampled" | "sampled" | "none"): { traceId?: string; headers: Record<string, string> } {
  if (kind === "none") return { headers: {} };
  const traceId = hex(16);
  const traceparent = `00-${traceId}-${hex(8)}-${kind === "sampled" ? "01" : "00"}`;
  return kind === "sampled" ? { traceId, headers: { traceparent } } : { headers: { traceparent } };
}

/** `all` less one occurrence of each of `some` (both sorted). */
function withoutSampled(all: number[], some: number[]): number[] {
  const rest: number[] = [];
  let j = 0;
  for (const value of all) {
    if (j < some.length && some[j] === value) j++;
    else rest.push(value);
  }
  return rest;
}

const percentile = (sorted: number[], p: number) => (sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!);
const median = (values: number[]) => {
  const sorted = values.slice().sort((a, b) => a - b);
  const mid = sorted.length / 2;
  return sorted.length % 2 === 1 ? sorted[Math.floor(mid)]! : tenths((sorted[mid - 1]! + sorted[mid]!) / 2);
};
const tenths = (n: number) => Math.round(n * 10) / 10;

/** One measured batch of messages: what the clients saw, and what workerd spent on it. */
export interface Round {
  deliveries: number;
  expectedDeliveries: number;
  deliveriesPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  workerdCpuSeconds: number;
  spansExported: number;
  /** OTLP requests that carried them. */
  exportRequests: number;
  /** RPCs the guild made to sessions in the round (its `fanout_rpc` timing), when it fanned out directly. */
  sessionRpcs: number | null;
  /**
   * Traced rounds: deliveries of messages whose sample the receiving session kept (the tier's
   * share) and the p99 of those and of the others, so a slower sampled path would show.
   */
  sampled: { deliveries: number; p99Ms: number; othersP99Ms: number } | null;
}

/** A mode's gateway with its clients connected, ready to measure rounds. */
interface Harness {
  setupSeconds: number;
  /**
   * Posts `count` messages `concurrency` at a time and waits for every delivery (or `timeoutMs`).
   * `as` names the row it is for (the harness's own mode by default); as `off`, every request
   * carries an unsampled traceparent, so nothing of the round is traced.
   */
  round(count: number, timeoutMs: number, as?: Mode): Promise<Round>;
  peakMemoryMb(): number;
  close(): Promise<void>;
}

async function startHarness(mode: Mode, sinkUrl: string, sinkCounts: () => SinkCounts): Promise<Harness> {
  const setupStarted = Date.now();
  const server: DevServer = await startDevServer({
    vars: varsFor(mode, sinkUrl),
    startTimeoutMs: 90_000,
    ...(values["wrangler-log"] ? { logFile: values["wrangler-log"] } : {}),
  });
  const sockets: WebSocket[] = [];
  const close = async () => {
    for (const ws of sockets) ws.terminate();
    await server.stop();
  };
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

    // Messages are numbered across rounds; the clients parse `content` (the number) from
    // MESSAGE_CREATE to find when it was posted. A round counts only its own messages.
    const sentAt: number[] = [];
    /** Traced rounds: each message's trace id, and whether each session keeps its sample. */
    const traceIds: (string | undefined)[] = [];
    const sessionIds: string[] = [];
    const sampleRate = fanoutSampleRate(sessions, parseFanoutTiers(varsFor(mode, sinkUrl).FANOUT_SAMPLING ?? DEFAULT_FANOUT_SAMPLING));
    let current = { first: 0, latencies: [] as number[], sampledLatencies: [] as number[], delivered: 0, expected: 0, last: 0, done: () => {} };

    const wsBase = base.replace(/^http/, "ws");
    const url = singleObject ? `${wsBase}/api/dev/bench-room/${guildId}` : `${wsBase}/gateway`;
    const onMessage = (ws: WebSocket, i: number, ready: () => void) => (data: WebSocket.RawData) => {
      const frame = JSON.parse(data.toString()) as { op: number; t?: string; d?: { content?: string; heartbeat_interval?: number; session_id?: string } };
      if (frame.op === 10) {
        ws.send(JSON.stringify({ op: 2, d: { token: tokens[i] } }));
        // Heartbeat like a real client, or long set-ups (10,000 sessions) would time out (4009).
        const every = frame.d!.heartbeat_interval!;
        const timer = setInterval(() => ws.readyState === WebSocket.OPEN && ws.send('{"op":1,"d":null}'), every * 0.8);
        ws.once("close", () => clearInterval(timer));
      } else if (frame.t === "READY") {
        sessionIds[i] = frame.d!.session_id!;
        ready();
      } else if (frame.t === "MESSAGE_CREATE") {
        const index = Number(frame.d!.content);
        if (index < current.first) return; // an earlier round's straggler
        const now = performance.now();
        current.latencies.push(now - sentAt[index]!);
        const traceId = traceIds[index];
        if (traceId && keepSampled(traceId, sessionIds[i]!, sampleRate)) current.sampledLatencies.push(now - sentAt[index]!);
        current.last = now;
        if (++current.delivered === current.expected) current.done();
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
    const postUrl = singleObject ? `${base}/api/dev/bench-room/${guildId}` : `${base}/api/guilds/${guildId}/messages`;

    // The guild's timings live in its memory: read them just before and after a round (an idle
    // guild may be evicted between rounds, and its counts start again).
    const sessionRpcs = async (traced: boolean): Promise<number> => {
      if (singleObject) return 0;
      const headers = { Authorization: `Bearer ${admin}`, ...newTrace(traced ? "none" : "unsampled").headers };
      const timings = (await (await request(`${base}/api/guilds/${guildId}/timings`, { headers }, [200])).json()) as {
        minutes: { actions: Record<string, { count: number }> }[];
      };
      return timings.minutes.reduce((n, m) => n + (m.actions.fanout_rpc?.count ?? 0), 0);
    };

    const measure = async (count: number, timeoutMs: number, as: Mode = mode): Promise<Round> => {
      const traced = as !== "off";
      const rpcsBefore = await sessionRpcs(traced);
      const first = sentAt.length;
      const expected = sessions * count;
      const allDelivered = new Promise<void>((resolve) => {
        current = { first, latencies: [], sampledLatencies: [], delivered: 0, expected, last: 0, done: resolve };
      });
      const stopProfiling = values.profile ? await startProfiling(server.inspectorPort) : null;
      const cpuBefore = cpuSeconds(pid);
      const sinkBefore = sinkCounts();
      const started = performance.now();
      const deadline = started + timeoutMs;
      sentAt.length = first + count;
      const posting = pool(
        Array.from({ length: count }, (_, i) => first + i),
        concurrency,
        async (index) => {
          // Past the round's time limit nothing more is posted.
          if (performance.now() > deadline) return;
          const trace = newTrace(as === "off" ? "unsampled" : as === "tiered" || as === "always" ? "sampled" : "none");
          traceIds[index] = trace.traceId;
          sentAt[index] = performance.now();
          await request(postUrl, {
            method: "POST",
            headers: { Authorization: `Bearer ${tokens[index % sessions]}`, ...trace.headers },
            body: JSON.stringify({ content: String(index) }),
          }, [201]);
        },
      );
      posting.catch(() => undefined); // a failure after the time limit no longer matters
      // The round ends when every delivery has arrived or at its time limit, whichever comes
      // first; posts still waiting for an answer then are not waited for (the run then fails).
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([posting.then(() => allDelivered), new Promise((r) => (timer = setTimeout(r, timeoutMs)))]);
      clearTimeout(timer);
      const { delivered, last } = current;
      const elapsedSeconds = ((delivered === expected ? last : performance.now()) - started) / 1000;
      // The round ends here: what arrives later is not counted.
      const latencies = current.latencies.slice().sort((a, b) => a - b);
      const sampledLatencies = current.sampledLatencies.slice().sort((a, b) => a - b);
      const workerdCpuSeconds = cpuSeconds(pid) - cpuBefore;
      const rpcs = (await sessionRpcs(traced)) - rpcsBefore;
      if (stopProfiling) writeFileSync(`${values.profile}-${as}.txt`, `${summarise(await stopProfiling()).join("\n")}\n`);
      // Let span exports land before counting them: until the count has held still for 3 s (at
      // most 30 s). With a 1 s wait an `always` round came up to 0.9% short (199,228 of 201,001).
      const exporting = as === "tiered" || as === "always";
      for (let waited = 0, still = 0, seen = sinkCounts().spans; exporting && still < 3 && waited < 30_000; waited += 1000) {
        await new Promise((r) => setTimeout(r, 1000));
        const now = sinkCounts().spans;
        still = now === seen ? still + 1 : 0;
        seen = now;
      }
      return {
        deliveries: delivered,
        expectedDeliveries: expected,
        deliveriesPerSecond: Math.round(delivered / elapsedSeconds),
        p50Ms: tenths(percentile(latencies, 50)),
        p99Ms: tenths(percentile(latencies, 99)),
        maxMs: tenths(latencies[latencies.length - 1] ?? NaN),
        workerdCpuSeconds: tenths(workerdCpuSeconds),
        spansExported: sinkCounts().spans - sinkBefore.spans,
        exportRequests: sinkCounts().requests - sinkBefore.requests,
        sessionRpcs: rpcs > 0 ? rpcs : null,
        sampled: traceIds[first] === undefined ? null : { deliveries: sampledLatencies.length, p99Ms: tenths(percentile(sampledLatencies, 99)), othersP99Ms: tenths(percentile(withoutSampled(latencies, sampledLatencies), 99)) },
      };
    };

    return {
      setupSeconds: tenths(setupSeconds),
      round: measure,
      peakMemoryMb: () => Math.round(peakMemoryMb(pid)),
      close,
    };
  } catch (error) {
    await close();
    throw error;
  }
}

/** A row: the median of its rounds, metric by metric (one round: that round). */
function rowOf(mode: Mode, rounds: Round[], harness: Harness): Row {
  const mid = (key: Exclude<keyof Round, "sessionRpcs" | "sampled">) => median(rounds.map((r) => r[key]));
  const rpcs = rounds.map((r) => r.sessionRpcs).filter((n) => n !== null);
  const sampled = rounds.map((r) => r.sampled).filter((s) => s !== null);
  return {
    mode,
    sessions,
    messages: messagesOf(mode),
    concurrency,
    deliveries: Math.min(...rounds.map((r) => r.deliveries)),
    expectedDeliveries: rounds[0]!.expectedDeliveries,
    deliveriesPerSecond: mid("deliveriesPerSecond"),
    p50Ms: mid("p50Ms"),
    p99Ms: mid("p99Ms"),
    maxMs: mid("maxMs"),
    workerdCpuSeconds: mid("workerdCpuSeconds"),
    workerdPeakMemoryMb: harness.peakMemoryMb(),
    spansExported: mid("spansExported"),
    exportRequests: mid("exportRequests"),
    sessionRpcs: rpcs.length > 0 ? median(rpcs) : null,
    sampled:
      sampled.length > 0
        ? { deliveries: median(sampled.map((s) => s.deliveries)), p99Ms: median(sampled.map((s) => s.p99Ms)), othersP99Ms: median(sampled.map((s) => s.othersP99Ms)) }
        : null,
    setupSeconds: harness.setupSeconds,
    rounds,
  };
}

const WARM_UP = "  warm-up";
/**
 * Before each measured round, its gateway delivers `concurrency` messages unmeasured (for the
 * naive baseline: one wave), so first-call costs (compiling, objects starting or waking, tables
 * created) fall outside the rows.
 */
async function warmUp(mode: Mode, harness: Harness): Promise<void> {
  const warm = await harness.round(concurrency, 120_000, mode);
  process.stderr.write(`${WARM_UP} ${mode}: ${warm.deliveries}/${warm.expectedDeliveries} delivered, ${warm.deliveriesPerSecond}/s\n`);
}

const messagesOf = (mode: Mode) => (mode === "naive" ? naiveMessages : messages);
const timeoutMs = (mode: Mode) => Number(mode === "naive" ? values["naive-seconds"] : values["timeout-seconds"]) * 1000;
const report = (mode: Mode, r: Round, label = "") =>
  process.stderr.write(
    `  ${mode}${label}: ${r.deliveries}/${r.expectedDeliveries} delivered, ${r.deliveriesPerSecond}/s, p99 ${r.p99Ms} ms, workerd CPU ${r.workerdCpuSeconds} s${r.spansExported ? `, ${r.spansExported} spans in ${r.exportRequests} requests` : ""}${r.sessionRpcs ? `, ${r.sessionRpcs} guild→session RPCs` : ""}${r.sampled ? `; sampled deliveries ${r.sampled.deliveries}, p99 ${r.sampled.p99Ms} ms (others ${r.sampled.othersP99Ms} ms)` : ""}\n`,
  );

const sink = await startSpanSink();
const rows: Row[] = [];
const benchStarted = Date.now();
try {
  // off and tiered, the pair the targets compare, run on one server in alternating rounds (an
  // off round's requests are unsampled); each row is the median of its rounds, so drift and one
  // slow round move both rows alike. Two servers, one per mode, were tried first: an A/A run (both
  // untraced) then differed by 1.35× in p99 depending on which server started first.
  const paired: Mode[] = modes.filter((m) => m === "off" || m === "tiered");
  if (paired.length > 0) {
    process.stderr.write(`running ${paired.join(" + ")}: ${sessions} sessions, ${rounds} alternating rounds of ${messages} messages, concurrency ${concurrency}…\n`);
    let shared: Harness | undefined;
    try {
      shared = await startHarness("tiered", sink.url, sink.counts);
      const harness = shared;
      const results = new Map<Mode, Round[]>(paired.map((m) => [m, []]));
      for (let r = 0; r < rounds; r++) {
        // Alternate which goes first, so neither always follows the other.
        for (const mode of r % 2 === 0 ? paired : paired.slice().reverse()) {
          await warmUp(mode, harness);
          const result = await harness.round(messages, timeoutMs(mode), mode);
          results.get(mode)!.push(result);
          report(mode, result, ` round ${r + 1}`);
        }
      }
      for (const mode of paired) rows.push(rowOf(mode, results.get(mode)!, harness));
    } finally {
      await shared?.close();
    }
  }
  // The rest differ from these by multiples, not per cent: one round each.
  for (const mode of modes.filter((m) => !paired.includes(m))) {
    process.stderr.write(`running ${mode}: ${sessions} sessions, ${messagesOf(mode)} messages, concurrency ${concurrency}…\n`);
    const harness = await startHarness(mode, sink.url, sink.counts);
    try {
      await warmUp(mode, harness);
      const result = await harness.round(messagesOf(mode), timeoutMs(mode));
      report(mode, result);
      rows.push(rowOf(mode, [result], harness));
    } finally {
      await harness.close();
    }
  }
} finally {
  sink.close();
}
rows.sort((a, b) => ALL_MODES.indexOf(a.mode) - ALL_MODES.indexOf(b.mode));

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
// A row cut off by its time limit has no rate to compare (what arrived over a fixed time favours
// whoever delivers in waves): the run fails, naming it.
const incomplete = rows.filter((r) => r.deliveries !== r.expectedDeliveries);
for (const row of incomplete) {
  const option = row.mode === "naive" ? "--naive-seconds" : "--timeout-seconds";
  console.error(`${row.mode}: only ${row.deliveries} of ${row.expectedDeliveries} deliveries arrived in the time allowed (${option})`);
}
if (incomplete.length > 0) process.exitCode = 1;
