/**
 * `npm run deploy` is `wrangler deploy`: its bundle and config are not what `wrangler dev` checks
 * (no size limit, .dev.vars read). A dry run builds exactly what would be uploaded, offline.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { describe, expect, it } from "vitest";
import { ROOT } from "../../scripts/lib/dev-server.ts";

/** Cloudflare's limit on a Worker's compressed size on the Free plan (Paid allows 10 MB). */
const FREE_PLAN_COMPRESSED_LIMIT = 3 * 1024 * 1024;

describe("npm run deploy", () => {
  it("builds a Worker under the Free plan's size limit, set to production, with no secret among its vars", async ({ onTestFinished }) => {
    const outdir = mkdtempSync(join(tmpdir(), "guildwire-deploy-"));
    onTestFinished(() => rmSync(outdir, { recursive: true, force: true }));
    const { stdout } = await deployDryRun(["--outdir", outdir]);

    // Every object class the gateway uses is bound.
    for (const binding of ["GUILD (Guild)", "SESSION (Session)", "USER (User)", "RELAY (Relay)"]) {
      expect(stdout).toMatch(new RegExp(`env\\.${binding.replace(/[()]/g, "\\$&")}\\s+Durable Object`));
    }
    expect(stdout).toMatch(/env\.ENVIRONMENT \("production"\)/);
    // The secret is set with `wrangler secret put`, never shipped as a var.
    expect(stdout).not.toMatch(/AUTH_SECRET/);

    const bundle = readFileSync(join(outdir, "index.js"));
    expect(gzipSync(bundle).length).toBeLessThan(FREE_PLAN_COMPRESSED_LIMIT);
  }, 90_000); // past the command's own 60 s, so a slow build fails with wrangler's output

  it("stays in production with .dev.vars uploaded as secrets, so the development routes and secret stay off", async ({ onTestFinished }) => {
    const outdir = mkdtempSync(join(tmpdir(), "guildwire-deploy-"));
    onTestFinished(() => rmSync(outdir, { recursive: true, force: true }));
    const { stdout } = await deployDryRun(["--outdir", outdir, "--secrets-file", ".dev.vars"]);
    expect(stdout).toMatch(/env\.AUTH_SECRET \("\(hidden\)"\)/); // the file was read
    expect(stdout).toMatch(/env\.ENVIRONMENT \("production"\)/);
  }, 90_000);

  it("keeps Workers Logs on: without an observability block, every deploy turns them off", async () => {
    const { unstable_readConfig } = await import("wrangler");
    expect(unstable_readConfig({ config: join(ROOT, "wrangler.toml") }).observability?.enabled).toBe(true);
  });
});

/** `npm run deploy -- --dry-run ARGS`: builds and lists what would be uploaded, offline. */
function deployDryRun(args: string[]): Promise<{ stdout: string }> {
  return promisify(execFile)("npm", ["run", "deploy", "--", "--dry-run", ...args], {
    cwd: ROOT,
    env: { ...process.env, WRANGLER_SEND_METRICS: "false", CI: "true" },
    timeout: 60_000,
  });
}
