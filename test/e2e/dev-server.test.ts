/**
 * scripts/lib/dev-server.ts runs wrangler in a process group of its own, which a Ctrl-C on the
 * script that started it does not reach: a script that is interrupted, or exits without stop(),
 * must still leave no wrangler or workerd running and no storage dir behind.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { type TestContext, describe, expect, it } from "vitest";
import { ROOT } from "../../scripts/lib/dev-server.ts";
import { sleep } from "./helpers.ts";

interface Started {
  child: ChildProcess;
  /** wrangler's pid, which is also its process group id. */
  pgid: number;
  port: number;
  dir: string;
}

/** Live processes (not zombies) of a process group, by name. */
function groupMembers(pgid: number): string[] {
  const members: string[] = [];
  for (const pid of readdirSync("/proc").filter((name) => /^\d+$/.test(name))) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      // "pid (comm) state ppid pgrp …"; comm may itself hold spaces and parentheses.
      const [state, , pgrp] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(pgrp) === pgid && state !== "Z") members.push(stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")")));
    } catch {
      // exited meanwhile
    }
  }
  return members;
}

async function accepts(port: number): Promise<boolean> {
  try {
    await fetch(`http://127.0.0.1:${port}/`, { signal: AbortSignal.timeout(2000) });
    return true;
  } catch {
    return false;
  }
}

/**
 * A node process that starts a dev server, prints where, and exits with 3 on a line of input.
 * Whatever a failed test leaves behind is killed when it finishes.
 */
async function startScript({ onTestFinished }: TestContext): Promise<Started> {
  const module = pathToFileURL(join(ROOT, "scripts/lib/dev-server.ts")).href;
  const script = `
    import { createInterface } from "node:readline";
    import { startDevServer } from ${JSON.stringify(module)};
    const server = await startDevServer();
    console.log(JSON.stringify({ pid: server.process.pid, port: server.port }));
    createInterface({ input: process.stdin }).once("line", () => process.exit(3));
  `;
  const child = spawn(process.execPath, ["--input-type=module", "-e", script], { cwd: ROOT, stdio: ["pipe", "pipe", "inherit"] });
  const line = await new Promise<string>((resolve, reject) => {
    let output = "";
    child.stdout!.on("data", (chunk: Buffer) => {
      output += chunk.toString();
      if (output.includes("\n")) resolve(output.split("\n")[0]!);
    });
    child.once("exit", (code, signal) => reject(new Error(`script exited (${code ?? signal}) before the server started: ${output}`)));
  });
  const { pid, port } = JSON.parse(line) as { pid: number; port: number };
  const args = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
  const server: Started = { child, pgid: pid, port, dir: args[args.indexOf("--persist-to") + 1]! };
  onTestFinished(() => {
    child.kill("SIGKILL");
    try {
      process.kill(-pid, "SIGKILL");
    } catch {
      // gone
    }
    rmSync(server.dir, { recursive: true, force: true });
  });
  // What there is to clean up.
  expect(groupMembers(pid)).toContain("workerd");
  expect(existsSync(server.dir)).toBe(true);
  expect(await accepts(port)).toBe(true);
  return server;
}

function exited(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
}

async function expectNothingLeft(server: Started): Promise<void> {
  // SIGKILL is sent before the script exits, but takes a moment to land.
  for (let i = 0; i < 50 && groupMembers(server.pgid).length > 0; i++) await sleep(100);
  expect(groupMembers(server.pgid)).toEqual([]);
  expect(existsSync(server.dir)).toBe(false);
  expect(await accepts(server.port)).toBe(false);
}

describe.concurrent("dev servers of a script that does not stop them", () => {
  it("are killed, and their storage removed, on SIGINT; the script still exits as interrupted (130)", async (context) => {
    const server = await startScript(context);
    server.child.kill("SIGINT");
    expect(await exited(server.child)).toEqual({ code: 130, signal: null });
    await expectNothingLeft(server);
  });

  it("are killed, and their storage removed, when the script exits", async (context) => {
    const server = await startScript(context);
    server.child.stdin!.write("exit\n");
    expect(await exited(server.child)).toEqual({ code: 3, signal: null });
    await expectNothingLeft(server);
  });
});
