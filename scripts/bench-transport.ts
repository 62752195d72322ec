/**
 * Transport micro-benchmark: `npm run bench:transport`.
 *
 * ns/op for the traceparent fast path against a full W3C extract (@opentelemetry/core's
 * propagator), and for wrap + normalize sampled vs unsampled against passing the bare message.
 * Each case runs several rounds and reports the fastest, which is the least disturbed by GC and
 * the other core's load.
 */
import { ROOT_CONTEXT, TraceFlags, context, defaultTextMapGetter, trace } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { AsyncLocalStorageContextManager } from "../src/telemetry/context.ts";
import { currentCarrier, isSampledTraceparent, normalize, wrap } from "../src/transport/index.ts";

const ITERATIONS = Number(process.env.BENCH_ITERATIONS ?? 1_000_000);
const ROUNDS = 7;

const SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

let sink = 0;
/**
 * Each case gets a loop compiled for it alone: one shared loop would see many callbacks, turn
 * megamorphic, and make every case after the first look slower than it is.
 */
function measure(run: (i: number) => unknown): number {
  const loop = new Function(
    "run",
    "iterations",
    "let hits = 0; for (let i = 0; i < iterations; i++) if (run(i)) hits++; return hits;",
  ) as (run: (i: number) => unknown, iterations: number) => number;
  let best = Infinity;
  for (let round = 0; round < ROUNDS; round++) {
    const start = process.hrtime.bigint();
    sink += loop(run, ITERATIONS);
    best = Math.min(best, Number(process.hrtime.bigint() - start) / ITERATIONS);
  }
  return best;
}

context.setGlobalContextManager(new AsyncLocalStorageContextManager());
const propagator = new W3CTraceContextPropagator();
const fullExtract = (header: string) =>
  trace.getSpanContext(propagator.extract(ROOT_CONTEXT, { traceparent: header }, defaultTextMapGetter))?.traceFlags;

const spanContext = (flags: TraceFlags) =>
  trace.setSpanContext(ROOT_CONTEXT, { traceId: "4bf92f3577b34da6a3ce929d0e0e4736", spanId: "00f067aa0ba902b7", traceFlags: flags });
const message = { t: "MESSAGE_CREATE", d: { id: "m1", content: "hello" } };
const passBare = (m: typeof message) => m;

// Inside a span, as the guild's fanout runs: the active context is sampled or not.
const inContext = <R>(flags: TraceFlags, fn: () => R): R => context.with(spanContext(flags), fn);

const rows: [string, number][] = [];
rows.push(["isSampledTraceparent, unsampled header", measure(() => isSampledTraceparent(UNSAMPLED))]);
rows.push(["full W3C extract, unsampled header", measure(() => fullExtract(UNSAMPLED))]);
rows.push(["isSampledTraceparent, sampled header", measure(() => isSampledTraceparent(SAMPLED))]);
rows.push(["full W3C extract, sampled header", measure(() => fullExtract(SAMPLED))]);
rows.push(["pass the bare message", inContext(TraceFlags.NONE, () => measure(() => passBare(message).d))]);
rows.push(["wrap + normalize, unsampled", inContext(TraceFlags.NONE, () => measure(() => normalize(wrap(message)).message))]);
// The guild's fanout reads the context once (`currentCarrier()`) and passes the answer to each wrap.
rows.push([
  "wrap + normalize, unsampled, carrier read once per fanout",
  inContext(TraceFlags.NONE, () => {
    const carrier = currentCarrier();
    return measure(() => normalize(wrap(message, { carrier })).message);
  }),
]);
rows.push(["wrap + normalize, sampled", inContext(TraceFlags.SAMPLED, () => measure(() => normalize(wrap(message)).message))]);

const ns = (label: string) => rows.find(([name]) => name === label)![1];
const width = Math.max(...rows.map(([name]) => name.length));
console.log(`\nTransport micro-benchmark (node ${process.version}, ${ITERATIONS.toLocaleString()} ops × best of ${ROUNDS})\n`);
console.log(`| ${"case".padEnd(width)} | ns/op |`);
console.log(`| ${"-".repeat(width)} | ----: |`);
for (const [name, value] of rows) console.log(`| ${name.padEnd(width)} | ${value.toFixed(1).padStart(5)} |`);
const fastPathSpeedup = ns("full W3C extract, unsampled header") / ns("isSampledTraceparent, unsampled header");
const unsampledOverhead = ns("wrap + normalize, unsampled") / ns("pass the bare message");
const fanoutOverhead = ns("wrap + normalize, unsampled, carrier read once per fanout") / ns("pass the bare message");
console.log(`\nfast path vs full extract, unsampled: ${fastPathSpeedup.toFixed(1)}× faster (goal ≥ 20×)`);
console.log(`unsampled wrap + normalize vs bare: ${unsampledOverhead.toFixed(2)}× reading the active context each time`);
console.log(`                                   ${fanoutOverhead.toFixed(2)}× with the carrier read once per fanout (goal ≤ 2×)`);
if (sink < 0) console.log(sink);
