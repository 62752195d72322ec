/**
 * Starts the gateway as `npm start` does (wrangler dev, local Durable Objects) on a free loopback
 * port with its own throwaway storage, for end-to-end tests and benchmarks. Always stop it.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { appendFileSync, existsSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { constants, tmpdir } from "node:os";
import { join, resolve } from "node:path";

export const ROOT = resolve(import.meta.dirname, "../..");

export function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? resolvePort(address.port) : reject(new Error("no port"))));
    });
  });
}

export interface DevServer {
  url: string;
  port: number;
  /** Chrome DevTools protocol of the Worker (CPU profiles): http://127.0.0.1:{inspectorPort}/json */
  inspectorPort: number;
  process: ChildProcess;
  /** Everything wrangler printed, for failure messages. */
  output(): string;
  stop(): Promise<void>;
}

/**
 * Development mode (the `/api/dev/*` routes, the development secret): set by whoever starts the
 * gateway locally (`npm start`, these servers, the workers tests), never by `.dev.vars`, which
 * someone may upload as secrets.
 */
export const DEVELOPMENT_VARS = { ENVIRONMENT: "development" } as const;

export interface DevServerOptions {
  /**
   * Extra `--var NAME:value` settings, over DEVELOPMENT_VARS. OTEL_EXPORTER_OTLP_ENDPOINT defaults
   * to "" (no export), so tests and benchmarks never fill a developer's own collector on :4318.
   */
  vars?: Record<string, string>;
  startTimeoutMs?: number;
  /** Also append everything wrangler prints to this file (benchmarks: to see a runtime restart). */
  logFile?: string;
}

/**
 * Servers started and not yet stopped: process group id → storage dir. wrangler runs in a group of
 * its own (so stop() can kill workerd with it), which also means a Ctrl-C on us never reaches it:
 * on SIGINT/SIGTERM, or any exit, we kill those groups and remove their storage ourselves.
 */
const live = new Map<number, string>();

function killLive(): void {
  for (const [pgid, dir] of live) {
    try {
      // SIGKILL: on "exit" nothing can wait for a graceful stop, and the storage is thrown away.
      process.kill(-pgid, "SIGKILL");
    } catch {
      // already gone
    }
    try {
      rmSync(dir, { recursive: true, force: true });
    } catch {
      // Exiting: nothing better to do than go on with the next server.
    }
  }
  live.clear();
}

let cleanupInstalled = false;

/** Once per process, on the first start (importing this module, as scripts/start.ts does, installs nothing). */
function installCleanup(): void {
  if (cleanupInstalled) return;
  cleanupInstalled = true;
  process.on("exit", killLive);
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    // A listener replaces Node's default of dying by the signal: exit as that would (128 + signo),
    // so a Ctrl-C still stops the run and its caller sees it was interrupted.
    process.on(signal, () => {
      killLive();
      process.exit(128 + constants.signals[signal]);
    });
  }
}

/** Attempts at starting when a port was taken meanwhile (see startDevServer). */
const START_ATTEMPTS = 3;

/**
 * A free port is only free until someone binds it: wrangler also picks ports of its own for the
 * runtime's sockets, and a second server starting at the same time (tests start two at once) can
 * take one of ours, or we one of its. Such a start fails with "Address already in use" at once;
 * it is tried again on fresh ports. Any other failure is reported as it is.
 */
export async function startDevServer(options: DevServerOptions = {}): Promise<DevServer> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(options);
    } catch (error) {
      if (attempt >= START_ATTEMPTS || !(error instanceof PortTakenError)) throw error;
      process.stderr.write(`wrangler dev found a port taken (attempt ${attempt} of ${START_ATTEMPTS}); starting again on fresh ports\n`);
    }
  }
}

class PortTakenError extends Error {}

async function startOnce(options: DevServerOptions): Promise<DevServer> {
  const port = await freePort();
  const inspectorPort = await freePort();
  // Throwaway storage; in memory (tmpfs) where the machine has it, as the storage is thrown away anyway.
  const persist = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "guildwire-dev-"));
  const args = [
    "dev",
    "--ip", "127.0.0.1",
    "--port", String(port),
    "--inspector-port", String(inspectorPort),
    "--persist-to", persist,
    "--show-interactive-dev-session=false",
    "--log-level", "warn",
  ];
  for (const [name, value] of Object.entries({ ...DEVELOPMENT_VARS, OTEL_EXPORTER_OTLP_ENDPOINT: "", ...options.vars })) args.push("--var", `${name}:${value}`);
  // Every client socket costs workerd two descriptors (wrangler's proxy and the runtime): raise
  // the open-file limit as far as this user may, for 10,000-session benchmarks.
  const raiseFileLimit = 'ulimit -Hn 1048576 2>/dev/null; ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$0" "$@"';
  const child = spawn("/bin/sh", ["-c", raiseFileLimit, join(ROOT, "node_modules/.bin/wrangler"), ...args], {
    cwd: ROOT,
    env: { ...process.env, PATH: `${join(ROOT, "node_modules/.bin")}:${process.env.PATH}`, WRANGLER_SEND_METRICS: "false", CI: "true" },
    stdio: ["ignore", "pipe", "pipe"],
    detached: true,
  });
  if (child.pid) {
    installCleanup();
    live.set(child.pid, persist);
  }
  let output = "";
  const record = (chunk: Buffer) => {
    output += chunk.toString();
    if (options.logFile) appendFileSync(options.logFile, chunk);
  };
  child.stdout!.on("data", record);
  child.stderr!.on("data", record);

  const url = `http://127.0.0.1:${port}`;
  // Killed by a signal, a child has no exit code, only a signal code.
  const running = () => child.exitCode === null && child.signalCode === null;
  const stop = async (): Promise<void> => {
    if (child.pid) {
      // The whole group: wrangler may have died and left its runtime behind.
      const exited = running() ? new Promise((r) => child.once("exit", r)) : Promise.resolve();
      try {
        process.kill(-child.pid, "SIGTERM");
      } catch {
        // already gone
      }
      const timer = setTimeout(() => {
        try {
          process.kill(-child.pid!, "SIGKILL");
        } catch {
          // already gone
        }
      }, 5000);
      await exited;
      clearTimeout(timer);
      live.delete(child.pid);
    }
    rmSync(persist, { recursive: true, force: true });
  };

  const deadline = Date.now() + (options.startTimeoutMs ?? 60_000);
  while (Date.now() < deadline) {
    // wrangler keeps running (watching for edits) after a failed build: no point waiting it out.
    // Nor after it could not bind a socket (it may keep running after that too).
    if (!running() || /Build failed|Address already in use/i.test(output)) break;
    try {
      // Ready when the Worker itself answers (its JSON 404, or a 500 naming a setting it lacks),
      // not merely wrangler's proxy.
      const response = await fetch(`${url}/__ready`, { signal: AbortSignal.timeout(2000) });
      const body = (await response.json().catch(() => null)) as { error?: { code?: string } } | null;
      if ((response.status === 404 && body?.error?.code === "not_found") || (response.status === 500 && body?.error?.code === "server_misconfigured")) {
        return { url, port, inspectorPort, process: child, output: () => output, stop };
      }
      await new Promise((r) => setTimeout(r, 250));
    } catch {
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  await stop();
  const message = `wrangler dev did not start on port ${port}:\n${output}`;
  throw /Address already in use/i.test(output) ? new PortTakenError(message) : new Error(message);
}

/**
 * The runtime's own HTTP address under `wrangler dev`, behind wrangler's proxy. The proxy holds
 * two descriptors per connection (client and upstream), so 10,000 WebSockets through it exceed a
 * 20,000 open-file limit; benchmarks connect here instead. Found from /proc (Linux): the
 * listening sockets of the workerd that runs the Worker, checked by asking one for a 404 of ours.
 */
export async function runtimeUrl(server: DevServer): Promise<string> {
  const inodes = new Map<string, number>();
  for (const line of readFileSync("/proc/net/tcp", "utf8").split("\n").slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields[3] === "0A" && fields[1]?.startsWith("0100007F:")) inodes.set(fields[9]!, parseInt(fields[1].split(":")[1]!, 16));
  }
  const ports: number[] = [];
  const visit = (pid: number): void => {
    try {
      if (readFileSync(`/proc/${pid}/comm`, "utf8").trim() === "workerd") {
        for (const fd of readdirSync(`/proc/${pid}/fd`)) {
          const inode = /^socket:\[(\d+)\]$/.exec(readlinkSafe(`/proc/${pid}/fd/${fd}`))?.[1];
          const port = inode ? inodes.get(inode) : undefined;
          if (port && port !== server.port && port !== server.inspectorPort) ports.push(port);
        }
      }
      for (const child of readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean)) visit(Number(child));
    } catch {
      // exited meanwhile
    }
  };
  visit(server.process.pid!);
  for (const port of ports) {
    try {
      const response = await fetch(`http://127.0.0.1:${port}/api/no-such-route`, { signal: AbortSignal.timeout(2000) });
      const body = (await response.json()) as { error?: { code?: string } };
      if (response.status === 404 && body.error?.code === "not_found") return `http://127.0.0.1:${port}`;
    } catch {
      // not the Worker's socket
    }
  }
  return server.url;
}

function readlinkSafe(path: string): string {
  try {
    return readlinkSync(path);
  } catch {
    return "";
  }
}
