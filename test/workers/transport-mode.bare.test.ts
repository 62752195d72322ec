import { SELF, env, runInDurableObject } from "cloudflare:test";
import type { ReadableSpan } from "@opentelemetry/sdk-trace-base";
import { beforeEach, describe, expect, it } from "vitest";
import type { Relay } from "../../src/guild/relay.ts";
import { ENVELOPE_BRAND, wrap } from "../../src/transport/index.ts";
import { TestClient, addMember, eventually, token } from "./gateway-client.ts";
import { recordedSpans } from "./tracing.ts";

const service = (span: ReadableSpan) => String(span.resource.attributes["service.name"]);

beforeEach(() => recordedSpans.reset());

describe("TRANSPORT_MODE=bare", () => {
  it("is what this project runs with", () => {
    expect(env.TRANSPORT_MODE).toBe("bare");
  });

  it("sends every message bare: no guild or session spans, everything delivered", async () => {
    await addMember("bare", "bare-a");
    await addMember("bare", "bare-b");
    const clients = [await TestClient.connect(), await TestClient.connect()];
    await clients[0]!.identify("bare-a");
    await clients[1]!.identify("bare-b");
    recordedSpans.reset();
    for (let i = 0; i < 5; i++) {
      const response = await SELF.fetch("http://gateway.test/api/guilds/bare/messages", {
        method: "POST",
        headers: {
          Authorization: `Bearer ${await token("bare-a")}`,
          traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        body: JSON.stringify({ content: `m${i}` }),
      });
      expect(response.status).toBe(201);
    }
    for (const client of clients) {
      await client.waitFor(() => client.messageSeqs().length === 5, "all five");
      expect(client.messageSeqs()).toEqual([1, 2, 3, 4, 5]);
    }
    // Tracing is on: the API's five server spans arrive (the guild had exported by then what it would).
    await eventually(() => recordedSpans.getFinishedSpans().filter((s) => service(s) === "guildwire-api").length >= 5, "the API's spans");
    await scheduler.wait(100);
    const spans = recordedSpans.getFinishedSpans();
    expect(spans.filter((s) => service(s) === "guildwire-api")).toHaveLength(5);
    // The Worker's own server span is not the Transport's to suppress; nothing crosses an object boundary.
    expect(spans.map(service).filter((s) => s !== "guildwire-api")).toEqual([]);
  });

  it("a relay sends bare too, and records no span, when an event reaches it in an envelope", async () => {
    await addMember("bare-relay", "br-a");
    const client = await TestClient.connect();
    const sessionId = await client.identify("br-a");
    const relay = env.RELAY.get(env.RELAY.idFromName("bare-relay/relay/0"));
    await relay.assign("bare-relay", [{ sessionId, userId: "br-a", target: sessionId, backlog: [] }], []);
    recordedSpans.reset();
    const message = { id: "m1", guild_id: "bare-relay", author_id: "br-a", content: "c1", seq: 1, timestamp: "2026-11-22T00:00:00.000Z" };
    const event = { type: "MESSAGE_CREATE" as const, seq: 1, data: JSON.stringify(message) };
    await relay.publish([wrap(event, { carrier: { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" }, recipients: 1 })]);
    await client.waitFor(() => client.messageSeqs().length === 1, "the relayed event");
    // A relay's span would end within publish and a session's within its delivery RPC: once the
    // relay has nothing queued or in flight, any span either made is recorded.
    await eventually(
      () => runInDurableObject(relay, (instance: Relay) => (instance as unknown as { fanout: { drained: boolean } }).fanout.drained),
      "the relay's fanout to have nothing queued or in flight",
    );
    expect(recordedSpans.getFinishedSpans().map((span) => `${service(span)}:${span.name}`)).toEqual([]);
  });

  it("still accepts envelopes from senders in envelope mode (a rollout in progress)", async () => {
    await addMember("mixed", "mixed-a");
    const client = await TestClient.connect();
    const sessionId = await client.identify("mixed-a");
    const session = env.SESSION.get(env.SESSION.idFromString(sessionId));
    const message = (seq: number) => ({ id: `m${seq}`, guild_id: "mixed", author_id: "mixed-a", content: `c${seq}`, seq, timestamp: "2026-11-21T00:00:00.000Z" });
    await session.deliver({
      guildId: "mixed",
      events: [
        { type: "MESSAGE_CREATE", seq: 1, data: JSON.stringify(message(1)) },
        {
          [ENVELOPE_BRAND]: 1,
          message: { type: "MESSAGE_CREATE", seq: 2, data: JSON.stringify(message(2)) },
          carrier: { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" },
        },
      ],
    });
    await client.waitFor(() => client.messageSeqs().length === 2, "both events");
    expect(client.messageSeqs()).toEqual([1, 2]);
    await scheduler.wait(50);
    const deliveries = recordedSpans.getFinishedSpans().filter((s) => s.name === "session.deliver");
    expect(deliveries).toHaveLength(1);
    expect(deliveries[0]!.spanContext().traceId).toBe("0af7651916cd43dd8448eb211c80319c");
  });
});
