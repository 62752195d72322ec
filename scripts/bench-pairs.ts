/**
 * Pools the off/tiered round pairs of several benchmark runs, because one run's two pairs say
 * little on a machine whose speed drifts (single-run p99 ratios of an A/A run: 0.93–1.35):
 *
 *   npm run bench:pairs -- RUN.json [RUN.json …]
 *
 * Rounds run off, tiered, tiered, off, …; the n-th off round and the n-th tiered round are
 * neighbours, so each pair saw about the same machine. Prints, over all pairs, the geometric
 * mean of tiered/off (± its standard error) for p99, deliveries/s and workerd CPU.
 */
import { readFileSync } from "node:fs";

interface Round {
  deliveriesPerSecond: number;
  p99Ms: number;
  workerdCpuSeconds: number;
  exportRequests?: number;
}
interface Row {
  mode: string;
  rounds: Round[];
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: npm run bench:pairs -- RUN.json [RUN.json …]");
  process.exit(2);
}

const pairs: { off: Round; tiered: Round }[] = [];
for (const file of files) {
  const { rows } = JSON.parse(readFileSync(file, "utf8")) as { rows: Row[] };
  const off = rows.find((r) => r.mode === "off")?.rounds ?? [];
  const tiered = rows.find((r) => r.mode === "tiered")?.rounds ?? [];
  if (off.length === 0 || off.length !== tiered.length) throw new Error(`${file}: needs as many off as tiered rounds`);
  off.forEach((round, i) => pairs.push({ off: round, tiered: tiered[i]! }));
}

/** Geometric mean of tiered/off and the standard error of its logarithm, as a factor. */
function ratio(figure: (round: Round) => number): string {
  const logs = pairs.map(({ off, tiered }) => Math.log(figure(tiered) / figure(off)));
  const mean = logs.reduce((a, b) => a + b, 0) / logs.length;
  const variance = logs.reduce((a, b) => a + (b - mean) ** 2, 0) / Math.max(1, logs.length - 1);
  const error = Math.sqrt(variance / logs.length);
  return `${Math.exp(mean).toFixed(2)} ±${(Math.exp(mean) * error).toFixed(2)}`;
}

const higher = pairs.filter(({ off, tiered }) => tiered.p99Ms > off.p99Ms).length;
const requests = pairs.map(({ tiered }) => tiered.exportRequests ?? NaN).sort((a, b) => a - b);
console.log(`${files.length} runs, ${pairs.length} pairs of neighbouring off and tiered rounds; tiered / off:`);
console.log(`  p99          ${ratio((r) => r.p99Ms)}  (tiered's the higher in ${higher} of ${pairs.length})`);
console.log(`  deliveries/s ${ratio((r) => r.deliveriesPerSecond)}`);
console.log(`  workerd CPU  ${ratio((r) => r.workerdCpuSeconds)}`);
console.log(`  export requests per tiered round: median ${requests[Math.floor(requests.length / 2)]}`);
