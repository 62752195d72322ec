/**
 * Draws the benchmark's JSON as an SVG bar chart: deliveries/s and p99 latency per mode.
 *
 *   npm run bench:chart -- bench.json docs/bench.svg
 */
import { readFileSync, writeFileSync } from "node:fs";

interface Row {
  mode: string;
  sessions: number;
  messages: number;
  concurrency: number;
  deliveriesPerSecond: number;
  p99Ms: number;
}

const [input, output = "docs/bench.svg"] = process.argv.slice(2);
if (!input) {
  console.error("usage: npm run bench:chart -- BENCH.json [OUT.svg]");
  process.exit(2);
}
const { rows } = JSON.parse(readFileSync(input, "utf8")) as { rows: Row[] };
if (rows.length === 0) throw new Error(`${input} has no rows`);

const COLORS: Record<string, string> = { off: "#64748b", tiered: "#2563eb", always: "#d97706", naive: "#dc2626", "single-object": "#16a34a" };
const escape = (text: string) => text.replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);

function panel(title: string, unit: string, value: (row: Row) => number, x0: number): string {
  const width = 380;
  const height = 220;
  const max = Math.max(...rows.map(value)) * 1.15 || 1;
  const band = width / rows.length;
  const bars = rows
    .map((row, i) => {
      const v = value(row);
      const h = (v / max) * height;
      const x = x0 + i * band + band * 0.15;
      const y = 40 + height - h;
      return [
        `<rect x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${(band * 0.7).toFixed(1)}" height="${h.toFixed(1)}" fill="${COLORS[row.mode] ?? "#6b7280"}"/>`,
        `<text x="${(x + band * 0.35).toFixed(1)}" y="${(y - 5).toFixed(1)}" text-anchor="middle" font-size="11">${escape(Math.round(v).toLocaleString("en-US"))}</text>`,
        `<text x="${(x + band * 0.35).toFixed(1)}" y="${40 + height + 16}" text-anchor="middle" font-size="11">${escape(row.mode)}</text>`,
      ].join("");
    })
    .join("");
  return `<text x="${x0}" y="24" font-size="14" font-weight="bold">${escape(title)} <tspan font-weight="normal" fill="#6b7280">(${escape(unit)})</tspan></text>
<line x1="${x0}" y1="${40 + height}" x2="${x0 + width}" y2="${40 + height}" stroke="#9ca3af"/>${bars}`;
}

const first = rows[0]!;
// The naive baseline posts fewer messages than the rest (see scripts/bench.ts).
const fewer = rows.filter((r) => r.messages !== first.messages).map((r) => `${r.mode}: ${r.messages} messages`);
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="820" height="310" font-family="system-ui, sans-serif" fill="#111827">
<rect width="820" height="310" fill="#ffffff"/>
${panel("Deliveries per second", "higher is better", (r) => r.deliveriesPerSecond, 20)}
${panel("p99 publish → receive", "ms, lower is better", (r) => r.p99Ms, 420)}
<text x="20" y="300" font-size="11" fill="#6b7280">${escape(`npm run bench -- --sessions ${first.sessions} --messages ${first.messages} --concurrency ${first.concurrency}${fewer.length > 0 ? ` (${fewer.join(", ")})` : ""}: one run; off and tiered are medians of alternating rounds`)}</text>
</svg>
`;
writeFileSync(output, svg);
console.log(`wrote ${output}`);
