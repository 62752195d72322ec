/**
 * The collector's page in a real browser (Debian's Chromium, driven by playwright-core): a real
 * trace — made by `wrangler dev` for a sampled message fanned out to live WebSocket sessions —
 * listed on http://collector/, clicked through, and drawn as a waterfall: one row per span,
 * indented by depth, bars sized by time, coloured by service with a legend, fanout counts shown.
 *
 * Chromium comes from `bash scripts/install-chromium.sh` (which .ci/run calls). Without it the
 * test fails on CI and is skipped elsewhere, saying how to install it.
 */
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Browser, type ConsoleMessage, type Page, chromium } from "playwright-core";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type Collector, startCollector } from "../../scripts/collector.ts";
import { type DevServer, startDevServer } from "../../scripts/lib/dev-server.ts";
import { Api, Clients, devTokens, range, uid, waitForMessages } from "./helpers.ts";
import { SERVICES, type TraceDetail, fanoutSpans, randomSpanId, randomTraceId, traceparent, waitForFanoutTrace } from "./tracing-helpers.ts";

const CHROMIUM = "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const SESSIONS = 4;
const haveChromium = existsSync(CHROMIUM);

if (!haveChromium && !process.env.CI) {
  console.warn(`collector-page.test.ts: skipped — ${CHROMIUM} is missing; install it with \`bash scripts/install-chromium.sh\` (as root) to run the browser test`);
}

describe.skipIf(!haveChromium && !process.env.CI)("the collector page in Chromium", () => {
  let dir: string;
  let collector: Collector | undefined;
  let server: DevServer | undefined;
  let browser: Browser | undefined;
  let page: Page;
  const problems: string[] = [];
  const clients = new Clients(() => server!.url);
  /** The real trace under test, as the collector's API has it. */
  let trace: TraceDetail;

  beforeAll(async () => {
    if (!haveChromium) throw new Error(`${CHROMIUM} is missing: CI must run \`bash scripts/install-chromium.sh\` before the tests (see .ci/run)`);
    dir = mkdtempSync(join(tmpdir(), "guildwire-collector-page-"));
    collector = await startCollector({ port: 0, dir });
    const [started, launched] = await Promise.allSettled([
      startDevServer({ vars: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.url } }),
      chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true }),
    ]);
    // Keep whichever started, so that afterAll stops it even when the other did not.
    server = started.status === "fulfilled" ? started.value : undefined;
    browser = launched.status === "fulfilled" ? launched.value : undefined;
    if (started.status === "rejected") throw started.reason;
    if (launched.status === "rejected") throw launched.reason;
    const gatewayUrl = started.value.url;

    // A guild with live sessions, and a sampled message fanned out to them. Each session is kept
    // in the trace at the tier rate for 4 recipients (50%): post until at least one is.
    const api = new Api(gatewayUrl, devTokens(gatewayUrl));
    const guildId = uid("page-guild");
    const users = range(1, SESSIONS).map((i) => uid(`page-user${i}`));
    await api.addMembers(guildId, ...users);
    const sockets = [];
    for (const user of users) sockets.push((await clients.identified(await api.token(user))).client);
    for (let attempt = 1; attempt <= 8; attempt++) {
      const traceId = randomTraceId();
      const response = await api.request("POST", `/api/guilds/${guildId}/messages`, {
        token: await api.token(users[0]!),
        json: { content: `hello waterfall ${attempt}` },
        headers: { traceparent: traceparent(traceId, randomSpanId(), true) },
      });
      expect(response.status, response.text).toBe(201);
      for (const socket of sockets) await waitForMessages(socket, guildId, attempt);
      trace = await waitForFanoutTrace(collector.url, traceId);
      if (fanoutSpans(trace).deliver.length > 0) break;
    }
    expect(fanoutSpans(trace).deliver.length, "some session sampled").toBeGreaterThan(0);

    page = await launched.value.newPage({ viewport: { width: 1280, height: 760 } });
    page.on("console", (message: ConsoleMessage) => {
      if (message.type() === "error") problems.push(`console: ${message.text()}`);
    });
    page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  }, 120_000);

  afterAll(async () => {
    clients.dropAll();
    await browser?.close();
    await server?.stop();
    await collector?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  beforeEach(({ onTestFailed }) => {
    onTestFailed(() => console.error(`wrangler dev output (tail):\n${server?.output().slice(-3000)}`));
  });

  it("lists the trace and clicks through to its waterfall: a row per span, tree-indented, bars sized by time, coloured by service, fanout counts visible", async () => {
    const { api, dispatch, fanout, deliver } = fanoutSpans(trace);
    const sampled = deliver.length;

    // ---- the list ----
    await page.goto(`${collector!.url}/`);
    const listed = page.locator(`tr.trace[data-trace-id="${trace.traceId}"]`);
    await expect.poll(() => listed.isVisible()).toBe(true);
    expect(await listed.locator("td.root").innerText()).toContain("POST /api/guilds/{guild_id}/messages");
    expect(await listed.locator(".fanout-cell").innerText()).toBe(`${SESSIONS} → ${sampled} sampled`);
    expect(await listed.locator(".chip[data-service]").evaluateAll((chips) => chips.map((c) => c.getAttribute("data-service")))).toEqual([...SERVICES]);
    const listShot = join(tmpdir(), `guildwire-collector-list-${process.pid}.png`);
    await page.screenshot({ path: listShot });

    await listed.locator("td.root a").click();
    await page.waitForURL(`**/traces/${trace.traceId}`);
    await page.locator(".waterfall").waitFor();

    // ---- one row per span, in tree order, indented by depth ----
    const rows = page.locator(".waterfall .span[data-span-id]");
    expect(await rows.count()).toBe(trace.spans.length);
    const rowInfo = await rows.evaluateAll((elements) =>
      elements.map((e) => ({
        id: e.getAttribute("data-span-id")!,
        parent: e.getAttribute("data-parent-id")!,
        service: e.getAttribute("data-service")!,
        depth: Number(e.getAttribute("data-depth")),
        name: e.querySelector(".span-name")!.textContent,
        nameX: e.querySelector(".span-name")!.getBoundingClientRect().left,
      })),
    );
    expect(new Set(rowInfo.map((r) => r.id))).toEqual(new Set(trace.spans.map((s) => s.spanId)));
    expect(rowInfo.slice(0, 3).map((r) => [r.id, r.depth])).toEqual([
      [api[0]!.spanId, 0],
      [dispatch[0]!.spanId, 1],
      [fanout[0]!.spanId, 2],
    ]);
    for (const row of rowInfo.slice(3)) expect(row).toMatchObject({ name: "session.deliver", depth: 3, parent: fanout[0]!.spanId });
    for (let i = 1; i < 4; i++) expect(rowInfo[i]!.nameX, "deeper spans are indented further").toBeGreaterThan(rowInfo[i - 1]!.nameX);

    // ---- bars: inside the track, non-zero width, placed by start time ----
    const bars = await rows.evaluateAll((elements) =>
      elements.map((e) => {
        const bar = e.querySelector(".bar")!.getBoundingClientRect();
        const track = e.querySelector(".track")!.getBoundingClientRect();
        const style = getComputedStyle(e.querySelector(".bar")!);
        return { id: e.getAttribute("data-span-id")!, left: bar.left, right: bar.right, width: bar.width, height: bar.height, trackLeft: track.left, trackRight: track.right, colour: style.backgroundColor };
      }),
    );
    expect(bars).toHaveLength(trace.spans.length);
    for (const bar of bars) {
      expect(bar.width, `bar of ${bar.id}`).toBeGreaterThan(0);
      expect(bar.height).toBeGreaterThan(0);
      expect(bar.left).toBeGreaterThanOrEqual(bar.trackLeft - 0.5);
      expect(bar.right).toBeLessThanOrEqual(bar.trackRight + 3); // a 2px minimum may poke past a 0-length span at the end
    }
    const barOf = (spanId: string) => bars.find((b) => b.id === spanId)!;
    expect(barOf(api[0]!.spanId).left, "the API span starts the trace").toBeCloseTo(barOf(api[0]!.spanId).trackLeft, 0);
    const trackWidth = barOf(api[0]!.spanId).trackRight - barOf(api[0]!.spanId).trackLeft;
    for (const span of trace.spans) {
      const expectedLeft = barOf(span.spanId).trackLeft + (trace.durationMs > 0 ? span.offsetMs / trace.durationMs : 0) * trackWidth;
      expect(Math.abs(barOf(span.spanId).left - expectedLeft), `position of ${span.name}`).toBeLessThan(2);
    }

    // ---- colours: one per service, distinct, with a legend that matches the bars ----
    const legend = await page.locator(".legend [data-service]").evaluateAll((items) =>
      items.map((li) => ({ service: li.getAttribute("data-service")!, colour: getComputedStyle(li.querySelector(".swatch")!).backgroundColor, visible: (li as HTMLElement).offsetWidth > 0 })),
    );
    expect(legend.map((l) => l.service)).toEqual([...SERVICES]);
    expect(legend.every((l) => l.visible)).toBe(true);
    expect(new Set(legend.map((l) => l.colour)).size, "distinct colours").toBe(3);
    expect(new Set(rowInfo.map((r) => r.service))).toEqual(new Set(SERVICES));
    for (const row of rowInfo) expect(barOf(row.id).colour, `colour of ${row.name}`).toBe(legend.find((l) => l.service === row.service)!.colour);

    // ---- fanout counts and durations on the rows ----
    const fanoutRow = page.locator(`.span[data-span-id="${fanout[0]!.spanId}"]`);
    const fanoutText = fanoutRow.locator(".fanout");
    expect(await fanoutText.isVisible()).toBe(true);
    expect(await fanoutText.innerText()).toBe(`fanout → ${SESSIONS} recipients, ${sampled} sampled`);
    expect(await page.locator("dd.fanout").innerText()).toBe(`fanout → ${SESSIONS} recipients, ${sampled} sampled`);
    for (const text of await rows.locator(".dur").allInnerTexts()) expect(text).toMatch(/^\d+(\.\d+)? (µs|ms|s)$/);

    // ---- a row opens to its attributes ----
    await fanoutRow.locator("summary.row").click();
    const attributes = fanoutRow.locator(".detail > table.attrs");
    await attributes.waitFor();
    expect(await attributes.innerText()).toContain("messaging.batch.message_count");

    const traceShot = join(tmpdir(), `guildwire-collector-trace-${process.pid}.png`);
    await page.screenshot({ path: traceShot, fullPage: true });
    console.log(`screenshots: ${listShot} ${traceShot}`);
    expect(problems).toEqual([]);
  });

  it("shows hostile span data as text and runs none of it", async () => {
    const traceId = randomTraceId();
    const evil = `<img src=x onerror="window.__pwned=1">`;
    const response = await fetch(`${collector!.url}/v1/traces`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        resourceSpans: [
          {
            resource: { attributes: [{ key: "service.name", value: { stringValue: `"><script>window.__pwned=2</script>` } }] },
            scopeSpans: [{ spans: [{ traceId, spanId: randomSpanId(), name: evil, startTimeUnixNano: "1790000000000000000", endTimeUnixNano: "1790000000005000000", attributes: [{ key: "k", value: { stringValue: evil } }] }] }],
          },
        ],
      }),
    });
    expect(response.status).toBe(200);
    for (const path of ["/", `/traces/${traceId}`]) {
      await page.goto(`${collector!.url}${path}`);
      expect(await page.evaluate(() => (window as unknown as { __pwned?: number }).__pwned)).toBeUndefined();
      expect(await page.locator("img").count()).toBe(0);
    }
    expect(await page.locator(".span-name").innerText()).toBe(evil);
    expect(problems).toEqual([]);
  });
});
