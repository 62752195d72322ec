/**
 * `npm start`: the local trace collector on 127.0.0.1:4318 plus the gateway under `wrangler dev`
 * on 127.0.0.1:8787, in development mode. Arguments after `--` go to `wrangler dev` and win over the defaults
 * (`npm start -- --port 8799`). Ctrl-C or SIGTERM stops both. When port 4318 is taken (a collector
 * already running, e.g. `npm run collector` in another terminal), wrangler starts alone.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { join } from "node:path";
import { type Collector, startCollector } from "./collector.ts";
import { DEVELOPMENT_VARS, ROOT } from "./lib/dev-server.ts";

const COLLECTOR_PORT = 4318;
const BIN = join(ROOT, "node_modules/.bin");

/** `wrangler dev` arguments: our defaults unless the user gave that option (as `--opt v` or `--opt=v`). */
function wranglerArgs(extra: string[]): string[] {
  const given = (name: string): boolean => extra.some((arg) => arg === name || arg.startsWith(`${name}=`));
  const defaults: string[] = [];
  if (!given("--ip")) defaults.push("--ip", "127.0.0.1");
  if (!given("--port")) defaults.push("--port", "8787");
  // Development mode comes from here, not .dev.vars (see DEVELOPMENT_VARS), unless the user set
  // the variable. After the user's arguments: `--var` takes every value that follows it, so a
  // positional argument (an entry point) placed after it would be read as a variable.
  // A value of `--var` is any argument after it up to the next option.
  const ofVar = (i: number): boolean => extra.slice(0, i).findLast((arg) => arg.startsWith("-")) === "--var";
  const givenVar = (name: string): boolean =>
    extra.some((arg, i) => arg.startsWith(`--var=${name}:`) || (arg.startsWith(`${name}:`) && ofVar(i)));
  for (const [name, value] of Object.entries(DEVELOPMENT_VARS)) if (!givenVar(name)) defaults.push(`--var=${name}:${value}`);
  // Options, so before any `--` of the user's (after which everything is positional).
  const end = extra.includes("--") ? extra.indexOf("--") : extra.length;
  return ["dev", ...extra.slice(0, end), ...defaults, ...extra.slice(end)];
}

async function startCollectorIfFree(): Promise<Collector | null> {
  try {
    return await startCollector({ port: COLLECTOR_PORT, dir: join(ROOT, ".traces") });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EADDRINUSE") throw error;
    let running = false;
    try {
      const response = await fetch(`http://127.0.0.1:${COLLECTOR_PORT}/healthz`, { signal: AbortSignal.timeout(1000) });
      running = response.ok && typeof ((await response.json()) as { traces?: unknown }).traces === "number";
    } catch {
      // something else holds the port
    }
    console.warn(
      running
        ? `collector: one is already running on http://127.0.0.1:${COLLECTOR_PORT}/ — using it; starting wrangler only`
        : `collector: port ${COLLECTOR_PORT} is already in use by something else; starting wrangler only (traces go to whatever listens there)`,
    );
    return null;
  }
}

async function main(): Promise<void> {
  const extra = process.argv.slice(2).filter((arg, i) => !(i === 0 && arg === "--"));
  const collector = await startCollectorIfFree();
  if (collector) console.log(`collector: traces at ${collector.url}/ (OTLP/HTTP ${collector.url}/v1/traces, kept in .traces/)`);

  const wrangler: ChildProcess = spawn(join(BIN, "wrangler"), wranglerArgs(extra), {
    cwd: ROOT,
    stdio: "inherit",
    env: { ...process.env, PATH: `${BIN}:${process.env.PATH ?? ""}` },
  });

  let stopping = false;
  const stop = async (signal: NodeJS.Signals): Promise<void> => {
    if (stopping) return;
    stopping = true;
    if (wrangler.exitCode === null && wrangler.signalCode === null) {
      wrangler.kill(signal);
      const exited = new Promise((resolve) => wrangler.once("exit", resolve));
      const timer = setTimeout(() => wrangler.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(timer);
    }
    await collector?.stop();
  };
  process.on("SIGINT", () => void stop("SIGINT").then(() => process.exit(130)));
  process.on("SIGTERM", () => void stop("SIGTERM").then(() => process.exit(143)));

  wrangler.on("error", (error) => {
    console.error(`could not start wrangler: ${error.message}`);
    void collector?.stop().then(() => process.exit(1));
  });
  wrangler.on("exit", (code, signal) => {
    if (stopping) return;
    void collector?.stop().then(() => process.exit(code ?? (signal ? 1 : 0)));
  });
}

await main();
