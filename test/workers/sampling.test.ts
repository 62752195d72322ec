import { describe, expect, it } from "vitest";
import {
  DEFAULT_FANOUT_SAMPLING,
  DEFAULT_FANOUT_TIERS,
  fanoutSampleRate,
  keepSampled,
  parseFanoutTiers,
} from "../../src/transport/index.ts";

describe("parseFanoutTiers", () => {
  it("parses the contract's default and sorts tiers by recipients", () => {
    expect(parseFanoutTiers(DEFAULT_FANOUT_SAMPLING)).toEqual([
      { recipients: 1, rate: 1 },
      { recipients: 100, rate: 0.1 },
      { recipients: 10000, rate: 0.001 },
    ]);
    expect(parseFanoutTiers(" 100 : 0.5 , 1:1 ")).toEqual([
      { recipients: 1, rate: 1 },
      { recipients: 100, rate: 0.5 },
    ]);
    expect(parseFanoutTiers("1:1e-3")).toEqual([{ recipients: 1, rate: 0.001 }]);
  });

  it.each([
    ["", /empty/],
    ["   ", /empty/],
    ["1:1,,100:0.1", /tier 2 is ""/],
    ["abc", /expected recipients:rate/],
    ["1:x", /expected recipients:rate/],
    ["1:1.5", /between 0 and 1/],
    ["1:-0.1", /expected recipients:rate/],
    ["0:0.5", /at least 1/],
    ["1:1,1:0.5", /twice/],
  ])("rejects %j with a clear error", (spec, message) => {
    expect(() => parseFanoutTiers(spec)).toThrow(message);
  });
});

describe("fanoutSampleRate", () => {
  it("follows the contract's default tiers", () => {
    expect(fanoutSampleRate(1)).toBe(1);
    expect(fanoutSampleRate(100)).toBeCloseTo(0.1, 12);
    expect(fanoutSampleRate(10_000)).toBeCloseTo(0.001, 12);
    expect(fanoutSampleRate(50_000)).toBeCloseTo(0.001, 12);
    expect(fanoutSampleRate(10)).toBeCloseTo(0.316227766, 8);
    expect(fanoutSampleRate(1_000)).toBeCloseTo(0.01, 12);
    expect(fanoutSampleRate(0)).toBe(1);
  });

  it("never increases as the fanout grows", () => {
    let previous = 1;
    for (let n = 1; n <= 20_000; n += 7) {
      const rate = fanoutSampleRate(n, DEFAULT_FANOUT_TIERS);
      expect(rate).toBeLessThanOrEqual(previous + 1e-12);
      previous = rate;
    }
  });

  it("interpolates linearly in log(recipients) next to a zero-rate tier", () => {
    const tiers = parseFanoutTiers("1:1,100:0");
    expect(fanoutSampleRate(10, tiers)).toBeCloseTo(0.5, 12);
    expect(fanoutSampleRate(1000, tiers)).toBe(0);
  });
});

describe("keepSampled", () => {
  const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";

  it("is consistent for the same trace and recipient", () => {
    for (let i = 0; i < 200; i++) {
      const id = `session-${i}`;
      expect(keepSampled(traceId, id, 0.3)).toBe(keepSampled(traceId, id, 0.3));
    }
  });

  it("keeps everyone at rate 1 and no one at rate 0", () => {
    expect(keepSampled(traceId, "a", 1)).toBe(true);
    expect(keepSampled(traceId, "a", 0)).toBe(false);
  });

  it.each([0.5, 0.1, 0.01])("keeps about %d of recipients", (rate) => {
    const n = 20_000;
    let kept = 0;
    for (let i = 0; i < n; i++) if (keepSampled(traceId, `s${i}`, rate)) kept++;
    // Binomial standard deviation; 5 sigma keeps this from ever flaking while still catching bias.
    const sigma = Math.sqrt(n * rate * (1 - rate));
    expect(Math.abs(kept - n * rate)).toBeLessThan(5 * sigma);
  });

  it("chooses different recipients for different traces", () => {
    const chosen = (trace: string) =>
      Array.from({ length: 1000 }, (_, i) => `s${i}`).filter((s) => keepSampled(trace, s, 0.1));
    const a = new Set(chosen(traceId));
    const b = chosen("0af7651916cd43dd8448eb211c80319c");
    const overlap = b.filter((s) => a.has(s)).length;
    expect(overlap).toBeLessThan(b.length / 2);
  });
});
