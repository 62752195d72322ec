/**
 * `npm run bench` is part of the contract (its rows and `--json` shape), and README's table and
 * chart are made from its output: a tiny run of every mode must finish, deliver everything, and
 * write what the contract says; the chart script must draw it.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";
import { ROOT } from "../../scripts/lib/dev-server.ts";

const run = promisify(execFile);
const MODES = ["off", "tiered", "always", "naive", "single-object"];

describe("npm run bench", () => {
  it("runs every mode against the real gateway and writes the contract's JSON, which the chart script draws", async ({ onTestFinished }) => {
    const dir = mkdtempSync(join(tmpdir(), "guildwire-bench-"));
    onTestFinished(() => rmSync(dir, { recursive: true, force: true }));
    const json = join(dir, "runs", "run.json"); // a folder not made yet: the bench makes it
    const sessions = 3;
    const messages = 4;
    const { stdout } = await run(process.execPath, ["scripts/bench.ts", "--sessions", `${sessions}`, "--messages", `${messages}`, "--concurrency", "2", "--json", json], {
      cwd: ROOT,
      timeout: 150_000,
    });
    expect(stdout).toMatch(/tiered \/ off deliveries\/s: \d/);

    const { rows, machine } = JSON.parse(readFileSync(json, "utf8")) as {
      rows: Record<string, unknown>[];
      machine: Record<string, unknown>;
    };
    expect(rows.map((row) => row.mode)).toEqual(MODES);
    for (const row of rows) {
      expect(row, `${row.mode}`).toMatchObject({ sessions, messages, concurrency: 2 });
      for (const key of ["deliveries", "deliveriesPerSecond", "p50Ms", "p99Ms", "maxMs"]) {
        expect(typeof row[key], `${row.mode}.${key}`).toBe("number");
      }
      // Every message reached every session: naive posts its own count (two waves, here all 4).
      expect(row.deliveries, `${row.mode}`).toBe(sessions * messages);
      expect(row.deliveriesPerSecond as number).toBeGreaterThan(0);
      expect(row.p50Ms as number).toBeLessThanOrEqual(row.p99Ms as number);
      expect(row.p99Ms as number).toBeLessThanOrEqual(row.maxMs as number);
    }
    // Spans only where tracing is on; `always` keeps every session's delivery span.
    const spans = Object.fromEntries(rows.map((row) => [row.mode, row.spansExported]));
    expect(spans.off).toBe(0);
    expect(spans.naive).toBe(0);
    expect(spans.tiered as number).toBeGreaterThan(0);
    expect(spans.always as number).toBeGreaterThanOrEqual(messages * (sessions + 3)); // API, dispatch, fanout, one per session
    expect(machine).toMatchObject({ cpus: expect.any(Number), node: process.version });

    const svg = join(dir, "chart.svg");
    await run(process.execPath, ["scripts/bench-chart.ts", json, svg], { cwd: ROOT, timeout: 30_000 });
    const chart = readFileSync(svg, "utf8");
    expect(chart).toMatch(/^<svg[\s>]/);
    for (const mode of MODES) expect(chart).toContain(mode);
  }, 180_000);

  it("refuses an output it cannot write before measuring anything, naming it", async ({ onTestFinished }) => {
    const dir = mkdtempSync(join(tmpdir(), "guildwire-bench-"));
    onTestFinished(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, "a-file"), "");
    const json = join(dir, "a-file", "run.json");
    const started = Date.now();
    const failure = await run(process.execPath, ["scripts/bench.ts", "--json", json], { cwd: ROOT, timeout: 30_000 }).then(
      () => undefined,
      (error: { code?: number; stderr?: string; stdout?: string }) => error,
    );
    expect(failure?.code).toBe(1);
    expect(failure?.stderr).toContain(`--json ${json} cannot be written`);
    expect(failure?.stdout).toBe(""); // no row was measured
    expect(Date.now() - started).toBeLessThan(10_000);
  });
});
