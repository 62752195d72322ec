/**
 * The collector's HTML: the list of recent traces and one trace as a waterfall. Rendered on the
 * server, self-contained (no CDN, no external fonts), with a little inline script. Span data is
 * untrusted: every value goes through `escape`, and style values are computed numbers only.
 *
 * Stable hooks for tests and tools: list rows `tr.trace[data-trace-id]`; waterfall rows
 * `.span[data-span-id][data-parent-id][data-service][data-depth]` with `.bar` inside;
 * legend entries `.legend [data-service]`; fanout text `.fanout`.
 */
import type { AttributeValue, Attributes } from "./otlp.ts";
import type { SpanView, TraceDetail, TraceSummary } from "./trace-store.ts";

export function escape(value: unknown): string {
  return String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// ---- colours -------------------------------------------------------------------------------------

const KNOWN_COLOURS: Record<string, string> = {
  "guildwire-api": "#3b82f6",
  "guildwire-guild": "#f59e0b",
  "guildwire-session": "#10b981",
};
const PALETTE = ["#8b5cf6", "#ec4899", "#06b6d4", "#84cc16", "#f97316", "#6366f1", "#14b8a6", "#a855f7", "#eab308", "#64748b"];

function hash(value: string): number {
  let h = 2166136261;
  for (let i = 0; i < value.length; i++) h = Math.imul(h ^ value.charCodeAt(i), 16777619);
  return h >>> 0;
}

/** A colour per service: fixed for guildwire's services, stable by name for others, distinct on one page. */
export function serviceColours(services: Iterable<string>): Map<string, string> {
  const colours = new Map<string, string>();
  const used = new Set<string>();
  const others: string[] = [];
  for (const service of [...new Set(services)].sort()) {
    const known = KNOWN_COLOURS[service];
    if (known) {
      colours.set(service, known);
      used.add(known);
    } else others.push(service);
  }
  for (const service of others) {
    const start = hash(service) % PALETTE.length;
    let colour = PALETTE[start]!;
    for (let i = 0; i < PALETTE.length && used.has(colour); i++) colour = PALETTE[(start + i) % PALETTE.length]!;
    if (used.has(colour)) colour = `hsl(${hash(service) % 360} 65% 50%)`; // more services than colours
    colours.set(service, colour);
    used.add(colour);
  }
  return colours;
}

// ---- formatting ----------------------------------------------------------------------------------

export function formatDuration(ms: number): string {
  // Trailing zeros dropped: the Workers runtime's clock ticks in whole milliseconds, and
  // "1.00 ms" would claim a precision the data does not have.
  const fixed = (value: number, digits: number): string => String(Number(value.toFixed(digits)));
  if (!Number.isFinite(ms)) return "?";
  if (ms === 0) return "0 ms";
  if (ms < 1) return `${Math.round(ms * 1000)} µs`;
  if (ms < 10) return `${fixed(ms, 2)} ms`;
  if (ms < 1000) return `${fixed(ms, 1)} ms`;
  if (ms < 60_000) return `${fixed(ms / 1000, 2)} s`;
  return `${fixed(ms / 60_000, 1)} min`;
}

const KIND_NAMES = ["", "internal", "server", "client", "producer", "consumer"];

function formatValue(value: AttributeValue): string {
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** "fanout → 100 recipients, 10 sampled" from a span's messaging attributes, or null. */
export function fanoutText(attributes: Attributes): string | null {
  const recipients = attributes["messaging.batch.message_count"];
  if (typeof recipients !== "number") return null;
  const sampled = attributes["guildwire.fanout.sampled_recipients"];
  const relays = attributes["guildwire.fanout.relays"];
  const noun = recipients === 1 ? "recipient" : "recipients";
  const via = typeof relays === "number" ? ` via ${relays} ${relays === 1 ? "relay" : "relays"}` : "";
  return `fanout → ${recipients} ${noun}${via}${typeof sampled === "number" ? `, ${sampled} sampled` : ""}`;
}

const pct = (value: number): string => `${Math.min(100, Math.max(0, value)).toFixed(3)}%`;

// ---- layout --------------------------------------------------------------------------------------

function page(title: string, body: string, nonce: string, script = ""): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escape(title)}</title>
<style>${STYLE}</style>
</head>
<body>
<header class="top"><a class="brand" href="/">guildwire · traces</a><span class="hint">local OTLP collector</span></header>
<main>
${body}
</main>
${script ? `<script nonce="${escape(nonce)}">${script}</script>` : ""}
</body>
</html>`;
}

export function contentSecurityPolicy(nonce: string): string {
  return `default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-${nonce}'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'`;
}

function legend(colours: Map<string, string>, counts: Map<string, number>): string {
  const items = [...colours].map(
    ([service, colour]) =>
      `<li data-service="${escape(service)}" data-colour="${escape(colour)}"><span class="swatch" style="background:${colour}"></span>${escape(service)}<span class="count">${counts.get(service) ?? 0}</span></li>`,
  );
  return `<ul class="legend" aria-label="services">${items.join("")}</ul>`;
}

// ---- the list of traces --------------------------------------------------------------------------

export function renderListPage(traces: TraceSummary[], options: { endpoint: string; nonce: string }): string {
  const colours = serviceColours(traces.flatMap((t) => t.services));
  const rows = traces.map((trace) => {
    const chips = trace.services
      .map((service) => `<span class="chip" data-service="${escape(service)}"><span class="swatch" style="background:${colours.get(service)}"></span>${escape(service.replace(/^guildwire-/, ""))}</span>`)
      .join("");
    const fanout = trace.fanout ? `${trace.fanout.recipients} → ${trace.fanout.sampled ?? "?"} sampled` : "";
    const search = `${trace.traceId} ${trace.rootName} ${trace.services.join(" ")}`.toLowerCase();
    return `<tr class="trace${trace.errorCount ? " has-error" : ""}" data-trace-id="${trace.traceId}" data-search="${escape(search)}">
<td class="time"><time datetime="${escape(trace.startTime)}">${escape(trace.startTime.replace("T", " ").replace("Z", ""))}</time></td>
<td class="root"><a href="/traces/${trace.traceId}">${escape(trace.rootName)}</a>${trace.errorCount ? ` <span class="tag error">${trace.errorCount} error${trace.errorCount > 1 ? "s" : ""}</span>` : ""}</td>
<td class="services">${chips}</td>
<td class="num">${trace.spanCount}</td>
<td class="num">${escape(formatDuration(trace.durationMs))}</td>
<td class="num fanout-cell">${escape(fanout)}</td>
<td class="id"><a href="/traces/${trace.traceId}">${trace.traceId.slice(0, 12)}…</a></td>
</tr>`;
  });
  const empty = `<div class="empty"><p>No traces yet.</p><p>Send OTLP/HTTP (JSON or protobuf) to <code>${escape(options.endpoint)}/v1/traces</code> —
with <code>npm start</code> the gateway does, as <code>OTEL_EXPORTER_OTLP_ENDPOINT</code> in <code>.dev.vars</code> points here. Post a message to a guild and reload.</p></div>`;
  const body = `<section class="list">
<div class="toolbar"><h1>Recent traces <span class="muted">(${traces.length})</span></h1>
<input id="filter" type="search" placeholder="filter by name, service or trace id" aria-label="filter traces">
<a id="new-traces" class="banner" href="/" hidden>new traces — refresh</a></div>
${
  traces.length
    ? `<table class="traces"><thead><tr><th>started (UTC)</th><th>root span</th><th>services</th><th class="num">spans</th><th class="num">duration</th><th class="num">fanout</th><th>trace id</th></tr></thead>
<tbody>${rows.join("")}</tbody></table>`
    : empty
}
<p class="muted small">Receiving at <code>${escape(options.endpoint)}/v1/traces</code> · JSON API: <a href="/api/traces">/api/traces</a></p>
</section>`;
  return page("guildwire traces", body, options.nonce, LIST_SCRIPT.replace("__NEWEST__", JSON.stringify(traces[0]?.traceId ?? "")));
}

const LIST_SCRIPT = `
(function () {
  var filter = document.getElementById("filter");
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr.trace"));
  filter.addEventListener("input", function () {
    var q = filter.value.trim().toLowerCase();
    rows.forEach(function (row) { row.hidden = q !== "" && row.getAttribute("data-search").indexOf(q) < 0; });
  });
  var newest = __NEWEST__;
  var banner = document.getElementById("new-traces");
  setInterval(function () {
    fetch("/api/traces?limit=1").then(function (r) { return r.json(); }).then(function (body) {
      var first = body.traces && body.traces[0];
      if (first && first.traceId !== newest) banner.hidden = false;
    }).catch(function () {});
  }, 3000);
})();`;

// ---- one trace as a waterfall --------------------------------------------------------------------

interface Row {
  span: SpanView;
  depth: number;
  remoteParent: boolean;
}

/** Spans in tree order (children by start time), each with its depth. Spans whose parent is missing are roots. */
export function treeRows(spans: SpanView[]): Row[] {
  const byId = new Map(spans.map((span) => [span.spanId, span]));
  const children = new Map<string, SpanView[]>();
  const roots: SpanView[] = [];
  for (const span of spans) {
    if (span.parentSpanId && byId.has(span.parentSpanId) && span.parentSpanId !== span.spanId) {
      const list = children.get(span.parentSpanId) ?? [];
      list.push(span);
      children.set(span.parentSpanId, list);
    } else roots.push(span);
  }
  const rows: Row[] = [];
  const seen = new Set<string>();
  // Iterative depth-first walk (a trace may be deep, and a cycle in bad data must not loop).
  const stack: { span: SpanView; depth: number }[] = roots.map((span) => ({ span, depth: 0 })).reverse();
  while (stack.length) {
    const { span, depth } = stack.pop()!;
    if (seen.has(span.spanId)) continue;
    seen.add(span.spanId);
    rows.push({ span, depth, remoteParent: span.parentSpanId !== null && !byId.has(span.parentSpanId) });
    const kids = children.get(span.spanId) ?? [];
    for (let i = kids.length - 1; i >= 0; i--) stack.push({ span: kids[i]!, depth: depth + 1 });
  }
  // Spans only reachable through a cycle: show them flat rather than not at all.
  for (const span of spans) if (!seen.has(span.spanId)) rows.push({ span, depth: 0, remoteParent: false });
  return rows;
}

function attributeTable(attributes: Attributes): string {
  const entries = Object.entries(attributes);
  if (!entries.length) return `<p class="muted">none</p>`;
  return `<table class="attrs">${entries
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([key, value]) => `<tr><th>${escape(key)}</th><td>${escape(formatValue(value))}</td></tr>`)
    .join("")}</table>`;
}

function spanDetail(span: SpanView, remoteParent: boolean): string {
  const status = span.status.code === 2 ? `error${span.status.message ? `: ${span.status.message}` : ""}` : span.status.code === 1 ? "ok" : "unset";
  const events = span.events.length
    ? `<h4>events</h4><ul class="events">${span.events
        .map((event) => `<li><b>${escape(event.name)}</b> ${attributeTable(event.attributes)}</li>`)
        .join("")}</ul>`
    : "";
  const links = span.links.length
    ? `<h4>links</h4><ul class="events">${span.links.map((link) => `<li><code>${escape(link.traceId)}/${escape(link.spanId)}</code></li>`).join("")}</ul>`
    : "";
  return `<div class="detail">
<dl class="facts">
<dt>span id</dt><dd><code>${escape(span.spanId)}</code></dd>
<dt>parent</dt><dd>${span.parentSpanId ? `<code>${escape(span.parentSpanId)}</code>${remoteParent ? " (remote: not in this trace)" : ""}` : "none (trace root)"}</dd>
<dt>service</dt><dd>${escape(span.service)}</dd>
<dt>kind</dt><dd>${escape(KIND_NAMES[span.kind] || "unspecified")}</dd>
<dt>start</dt><dd>${escape(span.startTime)} (+${escape(formatDuration(span.offsetMs))})</dd>
<dt>duration</dt><dd>${escape(formatDuration(span.durationMs))}</dd>
<dt>status</dt><dd>${escape(status)}</dd>
<dt>scope</dt><dd>${escape(span.scope.name || "—")}${span.scope.version ? ` ${escape(span.scope.version)}` : ""}</dd>
</dl>
<h4>attributes</h4>${attributeTable(span.attributes)}${events}${links}
<details class="resource"><summary>resource</summary>${attributeTable(span.resource)}</details>
</div>`;
}

export function renderTracePage(trace: TraceDetail, options: { nonce: string }): string {
  const colours = serviceColours(trace.spans.map((span) => span.service));
  const counts = new Map<string, number>();
  for (const span of trace.spans) counts.set(span.service, (counts.get(span.service) ?? 0) + 1);
  const total = trace.durationMs > 0 ? trace.durationMs : 1;

  const rows = treeRows(trace.spans).map(({ span, depth, remoteParent }) => {
    const colour = colours.get(span.service)!;
    const left = (span.offsetMs / total) * 100;
    const width = (span.durationMs / total) * 100;
    const end = left + width;
    const label = formatDuration(span.durationMs);
    // The duration sits right of the bar, or left of it when the bar reaches the right edge.
    const labelStyle = end < 78 ? `left:calc(${pct(end)} + 6px)` : `right:calc(${pct(100 - left)} + 6px)`;
    const fanout = fanoutText(span.attributes);
    const error = span.status.code === 2;
    const kind = KIND_NAMES[span.kind];
    const title = `${span.name} · ${span.service} · ${label}`;
    return `<details class="span${error ? " error" : ""}" data-span-id="${escape(span.spanId)}" data-parent-id="${escape(span.parentSpanId ?? "")}" data-service="${escape(span.service)}" data-depth="${depth}" data-duration-ms="${span.durationMs}">
<summary class="row" title="${escape(title)}">
<span class="name" style="padding-left:${8 + Math.min(depth, 40) * 18}px"><span class="swatch" style="background:${colour}"></span><span class="span-name">${escape(span.name)}</span>${kind ? `<span class="tag kind">${escape(kind)}</span>` : ""}${remoteParent ? `<span class="tag remote" title="parent ${escape(span.parentSpanId)} is not in this trace">remote parent</span>` : ""}${error ? `<span class="tag error">error</span>` : ""}${fanout ? `<span class="fanout">${escape(fanout)}</span>` : ""}<span class="svc">${escape(span.service)}</span></span>
<span class="track"><span class="bar" style="left:${pct(left)};width:${pct(width)};background:${colour}"></span><span class="dur" style="${labelStyle}">${escape(label)}</span></span>
</summary>
${spanDetail(span, remoteParent)}
</details>`;
  });

  const ticks = [0, 0.25, 0.5, 0.75, 1]
    .map((f) => `<span class="tick" style="left:${pct(f * 100)}"><span>${escape(formatDuration(f * trace.durationMs))}</span></span>`)
    .join("");
  const fanout = trace.fanout ? fanoutText({ "messaging.batch.message_count": trace.fanout.recipients, ...(trace.fanout.sampled !== null ? { "guildwire.fanout.sampled_recipients": trace.fanout.sampled } : {}) }) : null;

  const body = `<section class="trace" data-trace-id="${trace.traceId}">
<p class="crumbs"><a href="/">← all traces</a></p>
<h1><span class="root-name">${escape(trace.rootName)}</span> <span class="muted">${escape(formatDuration(trace.durationMs))}</span></h1>
<dl class="summary">
<dt>trace id</dt><dd><code>${trace.traceId}</code></dd>
<dt>started</dt><dd><time datetime="${escape(trace.startTime)}">${escape(trace.startTime)}</time></dd>
<dt>spans</dt><dd>${trace.spanCount}${trace.errorCount ? ` · <span class="tag error">${trace.errorCount} error${trace.errorCount > 1 ? "s" : ""}</span>` : ""}</dd>
${fanout ? `<dt>fanout</dt><dd class="fanout">${escape(fanout)}</dd>` : ""}
</dl>
${legend(colours, counts)}
<div class="waterfall">
<div class="axis"><span class="name">span <button type="button" id="expand">expand all</button><button type="button" id="collapse">collapse all</button></span><span class="track">${ticks}</span></div>
${rows.join("\n")}
</div>
<p class="muted small">Click a row for its attributes. JSON: <a href="/api/traces/${trace.traceId}">/api/traces/${trace.traceId}</a></p>
</section>`;
  return page(`${trace.rootName} · ${trace.traceId.slice(0, 8)} · guildwire traces`, body, options.nonce, TRACE_SCRIPT);
}

const TRACE_SCRIPT = `
(function () {
  function all(open) {
    document.querySelectorAll("details.span").forEach(function (d) { d.open = open; });
  }
  document.getElementById("expand").addEventListener("click", function () { all(true); });
  document.getElementById("collapse").addEventListener("click", function () { all(false); });
})();`;

export function renderNotFoundPage(message: string, nonce: string): string {
  return page("not found · guildwire traces", `<section class="empty"><h1>Not found</h1><p>${escape(message)}</p><p><a href="/">← all traces</a></p></section>`, nonce);
}

// ---- style ---------------------------------------------------------------------------------------

const STYLE = `
:root { color-scheme: light dark; --bg: #f8fafc; --fg: #0f172a; --muted: #64748b; --line: #e2e8f0; --panel: #ffffff; --hover: #f1f5f9; --track: #f1f5f9; --link: #2563eb; --err: #dc2626; }
@media (prefers-color-scheme: dark) { :root { --bg: #0b1120; --fg: #e2e8f0; --muted: #94a3b8; --line: #1e293b; --panel: #0f172a; --hover: #1e293b; --track: #111c31; --link: #60a5fa; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
a { color: var(--link); text-decoration: none; } a:hover { text-decoration: underline; }
code, .id, .dur, .tick, .num, time { font-family: ui-monospace, "SFMono-Regular", Menlo, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
.top { display: flex; gap: 12px; align-items: baseline; padding: 10px 20px; border-bottom: 1px solid var(--line); background: var(--panel); }
.brand { font-weight: 700; color: var(--fg); } .hint, .muted { color: var(--muted); } .small { font-size: 12px; }
main { padding: 16px 20px 40px; }
h1 { font-size: 20px; margin: 0 0 10px; } h4 { margin: 10px 0 4px; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.toolbar { display: flex; gap: 14px; align-items: center; flex-wrap: wrap; margin-bottom: 10px; } .toolbar h1 { margin: 0; }
#filter { padding: 6px 10px; min-width: 280px; border: 1px solid var(--line); border-radius: 6px; background: var(--panel); color: var(--fg); }
.banner { padding: 4px 10px; border-radius: 999px; background: #fef3c7; color: #92400e; font-weight: 600; }
table.traces { width: 100%; border-collapse: collapse; background: var(--panel); border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
table.traces th, table.traces td { padding: 7px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: middle; }
table.traces th { font-size: 12px; color: var(--muted); font-weight: 600; background: var(--hover); }
table.traces tr.trace:hover { background: var(--hover); }
.num { text-align: right !important; white-space: nowrap; } .time, .id { white-space: nowrap; }
.root a { font-weight: 600; }
.chip { display: inline-flex; align-items: center; gap: 4px; margin-right: 8px; font-size: 12px; white-space: nowrap; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 3px; flex: none; }
.tag { display: inline-block; margin-left: 6px; padding: 0 6px; border-radius: 4px; font-size: 11px; line-height: 17px; background: var(--hover); color: var(--muted); border: 1px solid var(--line); }
.tag.error { background: #fee2e2; color: var(--err); border-color: #fecaca; }
.tag.remote { border-style: dashed; }
.empty { padding: 30px; background: var(--panel); border: 1px dashed var(--line); border-radius: 8px; }
dl.summary, dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0 0 12px; }
dl dt { color: var(--muted); } dl dd { margin: 0; }
dd.fanout { font-weight: 600; }
.legend { display: flex; flex-wrap: wrap; gap: 16px; list-style: none; padding: 8px 12px; margin: 0 0 10px; background: var(--panel); border: 1px solid var(--line); border-radius: 8px; }
.legend li { display: flex; align-items: center; gap: 6px; font-weight: 600; }
.legend .count { color: var(--muted); font-weight: 400; font-size: 12px; }
.legend .count::before { content: "× "; }
.waterfall { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
.axis, .row { display: grid; grid-template-columns: minmax(360px, 46%) 1fr; align-items: center; }
.axis { position: sticky; top: 0; z-index: 1; background: var(--hover); border-bottom: 1px solid var(--line); height: 30px; font-size: 12px; color: var(--muted); }
.axis .name { padding-left: 8px; display: flex; gap: 6px; align-items: center; }
.axis button { font-size: 11px; padding: 1px 6px; border: 1px solid var(--line); border-radius: 4px; background: var(--panel); color: var(--muted); cursor: pointer; }
.axis .track { height: 100%; }
.tick { position: absolute; top: 0; bottom: 0; border-left: 1px solid var(--line); }
.tick span { position: absolute; top: 7px; left: 4px; white-space: nowrap; }
.tick:last-child span { left: auto; right: 4px; }
.track { position: relative; height: 26px; margin-right: 70px; }
details.span { border-bottom: 1px solid var(--line); }
details.span > summary { list-style: none; cursor: pointer; } details.span > summary::-webkit-details-marker { display: none; }
.row:hover { background: var(--hover); }
details.span[open] > .row { background: var(--hover); }
.row .name { display: flex; align-items: center; gap: 6px; min-width: 0; white-space: nowrap; overflow: hidden; padding-top: 3px; padding-bottom: 3px; border-right: 1px solid var(--line); }
/* When the row is short of room, the service label gives way first, then the fanout text, the name last. */
.span-name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; flex: 0 1 auto; min-width: 4em; }
.row .tag { flex: none; }
.svc { color: var(--muted); font-size: 11.5px; margin-left: auto; padding-right: 8px; flex: 0 100 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis; }
.fanout { color: #b45309; font-weight: 600; font-size: 12px; }
.row .fanout { flex: 0 10 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis; }
@media (prefers-color-scheme: dark) { .fanout { color: #fbbf24; } }
.row .track { background: repeating-linear-gradient(90deg, transparent 0, transparent calc(25% - 1px), var(--line) calc(25% - 1px), var(--line) 25%); }
.bar { position: absolute; top: 6px; height: 14px; min-width: 2px; border-radius: 3px; opacity: .92; }
details.span.error .bar { outline: 2px solid var(--err); outline-offset: 1px; }
.dur { position: absolute; top: 4px; font-size: 11.5px; color: var(--muted); white-space: nowrap; }
.detail { padding: 8px 16px 12px 26px; background: var(--bg); border-top: 1px dashed var(--line); }
table.attrs { border-collapse: collapse; font-size: 12.5px; }
table.attrs th { text-align: left; font-weight: 500; color: var(--muted); padding: 1px 14px 1px 0; vertical-align: top; white-space: nowrap; }
table.attrs td { font-family: ui-monospace, Menlo, "DejaVu Sans Mono", monospace; word-break: break-all; }
ul.events { margin: 0; padding-left: 18px; }
details.resource > summary { cursor: pointer; color: var(--muted); font-size: 12px; margin-top: 8px; }
`;
