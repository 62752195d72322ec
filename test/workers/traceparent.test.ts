import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { formatTraceparent, isSampledTraceparent, isValidTraceparent, parseTraceparent } from "../../src/transport/index.ts";

const TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN = "00f067aa0ba902b7";
const valid = (flags = "01", version = "00") => `${version}-${TRACE}-${SPAN}-${flags}`;

describe("parseTraceparent", () => {
  it("parses a valid sampled header", () => {
    expect(parseTraceparent(valid())).toEqual({ version: "00", traceId: TRACE, spanId: SPAN, flags: 1, sampled: true });
  });

  it("reads sampled from bit 0 of the flags only", () => {
    expect(parseTraceparent(valid("00"))?.sampled).toBe(false);
    expect(parseTraceparent(valid("03"))?.sampled).toBe(true);
    expect(parseTraceparent(valid("02"))?.sampled).toBe(false);
    expect(parseTraceparent(valid("ff"))).toMatchObject({ flags: 255, sampled: true });
  });

  it("tolerates leading and trailing spaces and tabs, but nothing else", () => {
    expect(parseTraceparent(` \t${valid()}\t `)?.traceId).toBe(TRACE);
    expect(parseTraceparent(`\n${valid()}`)).toBeNull();
    expect(parseTraceparent(`${valid()}\n`)).toBeNull();
  });

  it.each([
    ["empty", ""],
    ["uppercase trace id", valid().toUpperCase()],
    ["uppercase flags", valid("0A")],
    ["version ff", valid("01", "ff")],
    ["non-hex version", valid("01", "0g")],
    ["all-zero trace id", `00-${"0".repeat(32)}-${SPAN}-01`],
    ["all-zero span id", `00-${TRACE}-${"0".repeat(16)}-01`],
    ["short trace id", `00-${TRACE.slice(1)}-${SPAN}-01`],
    ["long span id", `00-${TRACE}-${SPAN}0-01`],
    ["version 00 with extra field", `${valid()}-extra`],
    ["version 00 with trailing char", `${valid()}x`],
    ["wrong separators", valid().replaceAll("-", "_")],
    ["one-digit flags", `00-${TRACE}-${SPAN}-1`],
    ["non-hex flags", valid("0z")],
    ["future version glued field", `cc-${TRACE}-${SPAN}-01x`],
    ["internal space", `00-${TRACE} -${SPAN}-01`],
  ])("rejects %s", (_name, header) => {
    expect(parseTraceparent(header)).toBeNull();
    expect(isValidTraceparent(header)).toBe(false);
    expect(isSampledTraceparent(header)).toBe(false);
  });

  it("keeps the first four fields of a future version", () => {
    expect(parseTraceparent(`cc-${TRACE}-${SPAN}-01-what-the-future-holds`)).toEqual({
      version: "cc",
      traceId: TRACE,
      spanId: SPAN,
      flags: 1,
      sampled: true,
    });
    expect(parseTraceparent(valid("01", "01"))?.version).toBe("01");
  });

  it("round-trips through formatTraceparent", () => {
    expect(formatTraceparent(TRACE, SPAN, 1)).toBe(valid("01"));
    expect(formatTraceparent(TRACE, SPAN, 0xab)).toBe(valid("ab"));
  });
});

describe("isSampledTraceparent (fast path)", () => {
  it("answers for sampled, unsampled and missing headers", () => {
    expect(isSampledTraceparent(valid("01"))).toBe(true);
    expect(isSampledTraceparent(valid("03"))).toBe(true);
    expect(isSampledTraceparent(valid("00"))).toBe(false);
    expect(isSampledTraceparent(null)).toBe(false);
    expect(isSampledTraceparent(undefined)).toBe(false);
    expect(isSampledTraceparent(` ${valid("01")}\t`)).toBe(true);
  });

  // Headers built from the grammar's own alphabet, then mutated, so that both valid and
  // near-valid headers are common — random strings alone would almost never parse.
  const hex = (n: number, chars = "0123456789abcdef") =>
    fc.string({ unit: fc.constantFrom(...chars.split("")), minLength: n, maxLength: n });
  const mostly = <T,>(good: fc.Arbitrary<T>, ...bad: fc.Arbitrary<T>[]) =>
    fc.oneof({ arbitrary: good, weight: 3 * bad.length }, ...bad.map((arbitrary) => ({ arbitrary, weight: 1 })));
  const nearHex = (n: number) =>
    mostly(hex(n), hex(n, "0f9aA-g 0"), hex(n - 1), hex(n + 1), fc.constant("0".repeat(n)));
  const pad = mostly(fc.constant(""), fc.constantFrom(" ", "\t", " \t", "\n"));
  const header = fc
    .tuple(
      pad,
      mostly(fc.constantFrom("00", "00", "01", "cc"), fc.constantFrom("ff", "FF", "0", "0g"), hex(2)),
      mostly(fc.constant("-"), fc.constant("_")),
      nearHex(32),
      mostly(fc.constant("-"), fc.constant("+")),
      nearHex(16),
      mostly(fc.constant("-"), fc.constant("")),
      nearHex(2),
      mostly(fc.constant(""), fc.constantFrom("-x", "x", "-", "-00-ab")),
      pad,
    )
    .map((parts) => parts.join(""));

  it("agrees with the strict parser on every input (property)", () => {
    fc.assert(
      fc.property(fc.oneof(header, fc.string(), fc.string({ unit: "binary" })), (h) => {
        expect(isSampledTraceparent(h)).toBe(parseTraceparent(h)?.sampled ?? false);
        expect(isValidTraceparent(h)).toBe(parseTraceparent(h) !== null);
      }),
      { numRuns: 20_000 },
    );
  });

  it("generates enough valid headers for the property to mean something", () => {
    const samples = fc.sample(header, 2000);
    const parsed = samples.filter((h) => parseTraceparent(h) !== null);
    expect(parsed.length).toBeGreaterThan(100);
    expect(parsed.filter((h) => parseTraceparent(h)!.sampled).length).toBeGreaterThan(30);
  });
});
