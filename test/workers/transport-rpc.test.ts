import { env } from "cloudflare:test";
import { beforeEach, describe, expect, it } from "vitest";
import { ENVELOPE_BRAND } from "../../src/transport/index.ts";
import { recordedSpans } from "./tracing.ts";

const sender = () => env.PROBE_SENDER.get(env.PROBE_SENDER.newUniqueId());
const receiver = () => env.PROBE_RECEIVER.get(env.PROBE_RECEIVER.idFromName("receiver"));

beforeEach(() => recordedSpans.reset());

describe("call between two Durable Objects", () => {
  it("continues a sampled trace in the receiver, parented to the sender's span", async () => {
    const result = await sender().send({ content: "hello" }, true);
    expect(JSON.parse(result.delivery.message)).toEqual({ content: "hello" });
    expect(JSON.parse(result.delivery.raw)).toMatchObject({ [ENVELOPE_BRAND]: 1, carrier: { traceparent: expect.stringMatching(/-01$/) } });
    expect(result.delivery.span).toEqual({
      traceId: result.senderTraceId,
      spanId: expect.any(String),
      parentSpanId: result.senderSpanId,
      name: "probe.receive",
    });
    const names = recordedSpans.getFinishedSpans().map((s) => s.name);
    expect(names).toEqual(expect.arrayContaining(["probe.receive", "probe.send"]));
    const receive = recordedSpans.getFinishedSpans().find((s) => s.name === "probe.receive")!;
    expect(receive.parentSpanContext?.spanId).toBe(result.senderSpanId);
    expect(receive.spanContext().traceId).toBe(result.senderTraceId);
  });

  it("sends the bare message when unsampled, and the receiver creates no span", async () => {
    const result = await sender().send({ content: "quiet" }, false);
    expect(JSON.parse(result.delivery.raw)).toEqual({ content: "quiet" });
    expect(result.delivery.span).toBeNull();
    expect(recordedSpans.getFinishedSpans().filter((s) => s.name === "probe.receive")).toEqual([]);
  });

  it("sends bare in bare mode even when sampled", async () => {
    const result = await sender().send({ content: "bare" }, true, "bare");
    expect(JSON.parse(result.delivery.raw)).toEqual({ content: "bare" });
    expect(result.delivery.span).toBeNull();
  });

  it("handles a bare message from an old sender, and a user object that looks like an envelope", async () => {
    const old = await receiver().receive({ content: "from an old version" });
    expect(JSON.parse(old.message)).toEqual({ content: "from an old version" });
    expect(old.span).toBeNull();
    const lookalike = { message: "m", carrier: { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" } };
    const delivered = await receiver().receive(lookalike);
    expect(JSON.parse(delivered.message)).toEqual(lookalike);
    expect(delivered.span).toBeNull();
  });

  it("never starts a trace from an unsampled or forged carrier", async () => {
    const unsampled = await receiver().receive({
      [ENVELOPE_BRAND]: 1,
      message: "m",
      carrier: { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00" },
    });
    expect(unsampled.span).toBeNull();
    const forged = await receiver().receive({ [ENVELOPE_BRAND]: 1, message: "m", carrier: { traceparent: "garbage-01" } });
    expect(JSON.parse(forged.message)).toBe("m");
    expect(forged.span).toBeNull();
    expect(recordedSpans.getFinishedSpans()).toEqual([]);
  });
});

describe("cast", () => {
  it("contains a failure: onError sees it and the sender's span records it", async () => {
    const result = await sender().castToFailure();
    expect(result.onErrorCalled).toMatch(/receiver exploded/);
    expect(result.senderStatus).toBe(2 /* SpanStatusCode.ERROR */);
    const failed = recordedSpans.getFinishedSpans().find((s) => s.name === "probe.explode");
    expect(failed?.status.code).toBe(2);
  });

  it("never becomes an unhandled rejection", async () => {
    const rejections: unknown[] = [];
    const listener = (event: PromiseRejectionEvent) => rejections.push(event.reason);
    addEventListener("unhandledrejection", listener);
    try {
      expect(await sender().castAndForget()).toBe("still alive");
    } finally {
      removeEventListener("unhandledrejection", listener);
    }
    expect(rejections).toEqual([]);
  });
});
