import { SELF, env, evictDurableObject } from "cloudflare:test";
import type { ReadableSpan } from "@opentelemetry/sdk-trace-base";
import { beforeEach, describe, expect, it } from "vitest";
import { TestClient, addMember, post, token } from "./gateway-client.ts";
import { recordedSpans } from "./tracing.ts";

const guildStub = (guildId: string) => env.GUILD.get(env.GUILD.idFromName(guildId));

async function join(guildId: string, user: string): Promise<TestClient> {
  await addMember(guildId, user);
  const client = await TestClient.connect();
  await client.identify(user);
  return client;
}

beforeEach(() => recordedSpans.reset());

describe("relays (RELAY_THRESHOLD=4, RELAY_SIZE=3 in this project)", () => {
  it("take over as the guild grows, and every session still gets every event once, in order", async () => {
    const guildId = "growing";
    const clients: { client: TestClient; firstSeq: number }[] = [];
    let seq = 0;
    for (let i = 0; i < 10; i++) {
      // Sessions join between bursts of messages: the guild goes direct → 3 relays → 6 relays.
      clients.push({ client: await join(guildId, `grow-${i}`), firstSeq: seq + 1 });
      const burst = await Promise.all([1, 2, 3].map((n) => post(guildId, `grow-${i}`, `m${i}.${n}`)));
      seq = Math.max(seq, ...burst.map((m) => m.seq));
    }
    expect(seq).toBe(30);
    const state = await guildStub(guildId).fanoutState();
    expect(state.sessions).toBe(10);
    expect(state.relays).toBeGreaterThanOrEqual(4);
    for (const { client, firstSeq } of clients) {
      const expected = Array.from({ length: seq - firstSeq + 1 }, (_, k) => firstSeq + k);
      await client.waitFor(() => client.messageSeqs().length >= expected.length, `seqs ${firstSeq}..${seq}`);
      await scheduler.wait(20);
      expect(client.messageSeqs()).toEqual(expected);
    }
  });

  it("keep delivering after the guild and a relay are evicted", async () => {
    const guildId = "relay-evict";
    const clients = [];
    for (let i = 0; i < 5; i++) clients.push(await join(guildId, `ev-${i}`));
    expect((await guildStub(guildId).fanoutState()).relays).toBeGreaterThan(0);
    await post(guildId, "ev-0", "before");
    await evictDurableObject(guildStub(guildId));
    await evictDurableObject(env.RELAY.get(env.RELAY.idFromName(`${guildId}/relay/0`)));
    await post(guildId, "ev-0", "after");
    for (const client of clients) {
      await client.waitFor(() => client.messageSeqs().length === 2, "both messages");
      expect(client.messageSeqs()).toEqual([1, 2]);
    }
  });

  it("appear in traces: guild.fanout → relay.fanout → session.deliver, with tiered sampling", async () => {
    const guildId = "relay-traced";
    const clients = [];
    for (let i = 0; i < 6; i++) clients.push(await join(guildId, `tr-${i}`));
    await scheduler.wait(20);
    recordedSpans.reset();
    const traceId = "5bf92f3577b34da6a3ce929d0e0e4736";
    const response = await SELF.fetch(`http://gateway.test/api/guilds/${guildId}/messages`, {
      method: "POST",
      headers: { Authorization: `Bearer ${await token("tr-0")}`, traceparent: `00-${traceId}-b7ad6b7169203331-01` },
      body: JSON.stringify({ content: "through relays" }),
    });
    expect(response.status).toBe(201);
    for (const client of clients) await client.waitFor(() => client.messageSeqs().length === 1, "the message");
    const byName = (spans: ReadableSpan[], name: string) => spans.filter((s) => s.name === name);
    const deadline = Date.now() + 5000;
    let spans: ReadableSpan[] = [];
    for (;;) {
      spans = recordedSpans.getFinishedSpans().filter((s) => s.spanContext().traceId === traceId);
      const relays = byName(spans, "relay.fanout");
      const expected = relays.reduce((n, r) => n + Number(r.attributes["guildwire.fanout.sampled_recipients"]), 0);
      if (relays.length > 0 && byName(spans, "session.deliver").length === expected) break;
      if (Date.now() > deadline) throw new Error(`spans: ${spans.map((s) => s.name).join(", ")}`);
      await scheduler.wait(20);
    }
    const fanout = byName(spans, "guild.fanout")[0]!;
    expect(fanout.attributes["messaging.batch.message_count"]).toBe(6);
    expect(Number(fanout.attributes["guildwire.fanout.relays"])).toBeGreaterThan(0);
    const relayIds = new Set<string>();
    for (const relay of byName(spans, "relay.fanout")) {
      expect(relay.resource.attributes["service.name"]).toBe("guildwire-guild");
      expect(relay.parentSpanContext?.spanId).toBe(fanout.spanContext().spanId);
      expect(relay.attributes["messaging.batch.message_count"]).toBe(6);
      relayIds.add(relay.spanContext().spanId);
    }
    for (const delivery of byName(spans, "session.deliver")) expect(relayIds.has(delivery.parentSpanContext!.spanId)).toBe(true);
  });
});
