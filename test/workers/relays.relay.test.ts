import { SELF, env, evictDurableObject, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import type { ReadableSpan } from "@opentelemetry/sdk-trace-base";
import { beforeEach, describe, expect, it } from "vitest";
import { TestClient, addMember, api, eventually, holdDeliveries, patchMethod, post, token } from "./gateway-client.ts";
import { recordedSpans } from "./tracing.ts";

const guildStub = (guildId: string) => env.GUILD.get(env.GUILD.idFromName(guildId));

async function join(guildId: string, user: string): Promise<TestClient> {
  await addMember(guildId, user);
  const client = await TestClient.connect();
  await client.identify(user);
  return client;
}

/** `count` sessions of users `${prefix}-0`, `${prefix}-1`, …, joined one after another. */
async function joinMany(guildId: string, prefix: string, count: number): Promise<TestClient[]> {
  const clients: TestClient[] = [];
  for (let i = 0; i < count; i++) clients.push(await join(guildId, `${prefix}-${i}`));
  return clients;
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

  it("a member removed right after a message still gets it before GUILD_DELETE, through a relay", async () => {
    const guildId = "relay-removal";
    const clients = await joinMany(guildId, "rmv", 5);
    expect((await guildStub(guildId).fanoutState()).relays).toBeGreaterThan(0);
    for (const n of [1, 2, 3]) await post(guildId, "rmv-0", `m${n}`);
    const response = await SELF.fetch(`http://gateway.test/api/guilds/${guildId}/members/rmv-4`, {
      method: "DELETE",
      headers: { Authorization: `Bearer ${await token("admin", true)}` },
    });
    expect(response.status).toBe(204);
    const removed = clients[4]!;
    await removed.waitFor(() => removed.dispatches("GUILD_DELETE")[0], "GUILD_DELETE");
    expect(removed.dispatches().map((f) => f.t)).toEqual(["READY", "MESSAGE_CREATE", "MESSAGE_CREATE", "MESSAGE_CREATE", "GUILD_DELETE"]);
    expect(removed.messageSeqs()).toEqual([1, 2, 3]);
  });

  it("a removed member's sessions get nothing posted after the removal, however slowly their relay lets them go", async () => {
    const guildId = "relay-leak";
    for (const user of ["lk-a", "lk-b", "lk-c", "lk-gone"]) await addMember(guildId, user);
    const staying: TestClient[] = [];
    for (const user of ["lk-a", "lk-b", "lk-c"]) {
      const client = await TestClient.connect();
      await client.identify(user);
      staying.push(client);
    }
    const gone = [await TestClient.connect(), await TestClient.connect()];
    const ids = [await gone[0]!.identify("lk-gone"), await gone[1]!.identify("lk-gone")];
    expect((await guildStub(guildId).fanoutState()).relays).toBeGreaterThan(0);
    await post(guildId, "lk-a", "before the removal");
    for (const client of gone) await client.waitFor(() => client.messageSeqs().length === 1, "m1");
    // A relay takes the first session off at once but answers the guild slowly.
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    let removing = 0;
    const restore = await patchMethod(relayStub(guildId, 0), "assign", async (_self, original, args) => {
      const result = await original(...args);
      if ((args[2] as string[]).some((id) => ids.includes(id)) && removing++ === 0) await gate;
      return result;
    });
    try {
      const removal = SELF.fetch(`http://gateway.test/api/guilds/${guildId}/members/lk-gone`, {
        method: "DELETE",
        headers: { Authorization: `Bearer ${await token("admin", true)}` },
      });
      await eventually(() => removing > 0, "the guild taking a session off its relay");
      const after = post(guildId, "lk-a", "posted after the removal"); // waits for the relays
      await scheduler.wait(200);
      release();
      expect((await removal).status).toBe(204);
      expect((await after).seq).toBe(2);
      for (const client of gone) await client.waitFor(() => client.dispatches("GUILD_DELETE")[0], "GUILD_DELETE");
    } finally {
      release();
      restore();
    }
    // The message went out to every relay's sessions; anything sent to the removed ones before a
    // heartbeat's answer has arrived by then.
    for (const client of staying) await client.waitFor(() => client.messageSeqs().length === 2, "m2 at a member who stayed");
    for (const client of gone) {
      client.send({ op: 1, d: null });
      await client.waitFor(() => client.frames.some((f) => f.op === 11), "heartbeat ACK");
      expect(client.messageSeqs()).toEqual([1]);
    }
  });

  it("a removal whose relay cannot be told still succeeds, and the relays are resynchronised before the next message", async () => {
    const guildId = "relay-removal-fails";
    const clients = await joinMany(guildId, "rf", 5);
    expect((await guildStub(guildId).fanoutState()).relays).toBeGreaterThan(0);
    const removedId = (clients[4]!.dispatches("READY")[0]!.d as { session_id: string }).session_id;
    const restore = await patchMethod(relayStub(guildId, 0), "assign", async (_self, original, args) => {
      if ((args[2] as string[]).includes(removedId)) throw new Error("relay unreachable");
      return original(...args);
    });
    try {
      const response = await SELF.fetch(`http://gateway.test/api/guilds/${guildId}/members/rf-4`, {
        method: "DELETE",
        headers: { Authorization: `Bearer ${await token("admin", true)}` },
      });
      expect(response.status).toBe(204);
      await clients[4]!.waitFor(() => clients[4]!.dispatches("GUILD_DELETE")[0], "GUILD_DELETE");
      await post(guildId, "rf-0", "after the removal");
      for (const client of clients.slice(0, 4)) await client.waitFor(() => client.messageSeqs().length === 1, "the message");
    } finally {
      restore();
    }
    await scheduler.wait(100);
    expect(clients[4]!.messageSeqs()).toEqual([]);
  });

  it("a guild whose sessions have mostly left stops fanning out through its relays, and its last session misses nothing", async () => {
    const guildId = "relay-shrink";
    const clients = await joinMany(guildId, "shr", 10);
    await post(guildId, "shr-0", "at the peak");
    for (const client of clients) await client.waitFor(() => client.messageSeqs().length === 1, "the first message");
    const peak = (await guildStub(guildId).fanoutState()).relays;
    expect(peak).toBeGreaterThanOrEqual(4);
    // The peak is over (an event ended, a raid left): all but one session end.
    for (const client of clients.slice(1)) client.ws.close(1000, "bye");
    await eventually(async () => (await guildStub(guildId).fanoutState()).sessions === 1, "9 sessions unsubscribed");
    let publishes = 0;
    const restore = await patchMethod(relayStub(guildId, 0), "publish", (_self, original, args) => (publishes++, original(...args)));
    try {
      await post(guildId, "shr-0", "after the peak");
      await clients[0]!.waitFor(() => clients[0]!.messageSeqs().length === 2, "the second message");
    } finally {
      restore();
    }
    // One session does not need 6 relays: one RPC per relay per message, and a checkpoint row
    // and alarm on each relay, for a guild that a single RPC would serve.
    expect({ relays: (await guildStub(guildId).fanoutState()).relays, publishes }).toEqual({ relays: 0, publishes: 0 });
    expect(clients[0]!.messageSeqs()).toEqual([1, 2]);
  });

  it("keep delivering after the guild and a relay are evicted", async () => {
    const guildId = "relay-evict";
    const clients = await joinMany(guildId, "ev", 5);
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
    const clients = await joinMany(guildId, "tr", 6);
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
    let shares = 0;
    for (const relay of byName(spans, "relay.fanout")) {
      expect(relay.resource.attributes["service.name"]).toBe("guildwire-guild");
      expect(relay.parentSpanContext?.spanId).toBe(fanout.spanContext().spanId);
      // Each relay counts its own share (they add up to the fanout); the tier is the whole fanout's.
      expect(relay.attributes["guildwire.fanout.sample_rate"]).toBe(fanout.attributes["guildwire.fanout.sample_rate"]);
      shares += Number(relay.attributes["messaging.batch.message_count"]);
      relayIds.add(relay.spanContext().spanId);
    }
    expect(shares).toBe(6);
    for (const delivery of byName(spans, "session.deliver")) expect(relayIds.has(delivery.parentSpanContext!.spanId)).toBe(true);
  });
});

/** A fresh stub: one made before an abort stays broken. */
const relayStub = (guildId: string, i: number) => env.RELAY.get(env.RELAY.idFromName(`${guildId}/relay/${i}`));
const range = (n: number) => Array.from({ length: n }, (_, i) => i);
/** Newest seq a relay has accepted for fanout, from its checkpoint. */
const relayAccepted = (guildId: string, i: number) =>
  runInDurableObject(relayStub(guildId, i), (_relay, state) =>
    state.storage.sql.exec<{ accepted: number }>("SELECT accepted FROM fanout_checkpoint").toArray()[0]?.accepted ?? 0,
  );
/** Resets a guild's relays as a deploy or crash would: their memory is gone, their storage and alarms stay. */
async function restartRelays(guildId: string, relays: number): Promise<void> {
  for (const i of range(relays)) {
    await runInDurableObject(relayStub(guildId, i), (_instance, state) => state.abort("restart")).then(
      () => expect.fail("abort returns"),
      (error: unknown) => expect(String(error)).toContain("restart"),
    );
  }
}
/** Runs each relay's alarm now; says which had one. */
async function runRelayAlarms(guildId: string, relays: number): Promise<boolean[]> {
  const ran: boolean[] = [];
  for (const i of range(relays)) ran.push(await runDurableObjectAlarm(relayStub(guildId, i)));
  return ran;
}

describe("relays that fail or are slow", () => {
  /** Makes one relay object's `publish` behave differently until the returned function is called. */
  function patchPublish(relayName: string, replacement: (original: (...args: unknown[]) => unknown, args: unknown[]) => unknown) {
    const target = env.RELAY.idFromName(relayName).toString();
    return patchMethod<{ ctx: DurableObjectState }>(env.RELAY.get(env.RELAY.idFromName(relayName)), "publish", (self, original, args) =>
      self.ctx.id.toString() === target ? replacement(original, args) : original(...args),
    );
  }

  it("a relay that fails for a while is retried, not dropped: its sessions get every event once it is back", async () => {
    const guildId = "relay-outage";
    const clients = await joinMany(guildId, "out", 5);
    const { relays } = await guildStub(guildId).fanoutState();
    expect(relays).toBeGreaterThan(1);
    await post(guildId, "out-0", "first");
    let failed = 0;
    const restore = await patchPublish(`${guildId}/relay/0`, async () => {
      failed++;
      throw new Error("relay overloaded");
    });
    try {
      await post(guildId, "out-0", "during the outage");
      // As many failures as drop a session (4 attempts): a relay is kept.
      await eventually(() => failed >= 4, "the relay failing a fourth time", 10_000);
    } finally {
      restore();
    }
    await post(guildId, "out-0", "after 1");
    await post(guildId, "out-0", "after 2");
    for (const client of clients) {
      await client.waitFor(() => client.messageSeqs().length === 4, "all four messages", 8000);
      expect(client.messageSeqs()).toEqual([1, 2, 3, 4]);
    }
  });

  it("a relay restarted mid-fanout resends what it had queued, with no later message to reveal the gap", async () => {
    const guildId = "relay-restart";
    const clients = await joinMany(guildId, "rr", 5);
    const { relays } = await guildStub(guildId).fanoutState();
    expect(relays).toBeGreaterThan(0);
    // Hold every session's first delivery, so the second message waits in the relays' memory.
    const hold = await holdDeliveries("in flight");
    try {
      await post(guildId, "rr-0", "in flight");
      await eventually(() => hold.held() === clients.length, "every session's first delivery to be held");
      await post(guildId, "rr-0", "queued");
      // The guild hands the second message to its relays; then they restart (a deploy, a crash).
      await eventually(async () => (await Promise.all(range(relays).map((i) => relayAccepted(guildId, i)))).every((seq) => seq === 2), "relays to take seq 2");
      await restartRelays(guildId, relays);
      hold.release();
      for (const client of clients) await client.waitFor(() => client.messageSeqs().length === 1, "the held message");
      // Nothing else is posted: each relay's alarm wakes it, and it resends what it had not handed over.
      expect(await runRelayAlarms(guildId, relays)).toEqual(range(relays).map(() => true));
      for (const client of clients) {
        await client.waitFor(() => client.messageSeqs().length === 2, "the queued message");
        expect(client.messageSeqs()).toEqual([1, 2]);
      }
    } finally {
      hold.restore();
    }
  });

  it("events moved onto relays are theirs to resend if they restart before handing them over", async () => {
    const guildId = "relay-move-restart";
    const clients = await joinMany(guildId, "mr", 3); // direct: under RELAY_THRESHOLD=4
    expect((await guildStub(guildId).fanoutState()).relays).toBe(0);
    // Hold the sessions' first delivery; the second message waits in the guild's queues. Once
    // moved onto relays, its deliveries fail until the release, so the relays retry it.
    const hold = await holdDeliveries("in flight", (events) => events.includes("queued"));
    try {
      await post(guildId, "mr-0", "in flight");
      await eventually(() => hold.held() === clients.length, "every session's first delivery to be held");
      await post(guildId, "mr-0", "queued");
      clients.push(await join(guildId, "mr-3")); // 4 sessions: they move onto relays with their queued event
      const { relays } = await guildStub(guildId).fanoutState();
      expect(relays).toBeGreaterThan(0);
      await eventually(async () => (await Promise.all(range(relays).map((i) => relayAccepted(guildId, i)))).some((seq) => seq === 2), "a relay to take seq 2");
      await restartRelays(guildId, relays); // while they retry seq 2
      hold.release();
      for (const client of clients.slice(0, 3)) await client.waitFor(() => client.messageSeqs().length === 1, "the held message");
      expect(await runRelayAlarms(guildId, relays)).toContain(true); // the relays that took the moved event
      for (const client of clients.slice(0, 3)) {
        await client.waitFor(() => client.messageSeqs().length === 2, "the moved message");
        expect(client.messageSeqs()).toEqual([1, 2]);
      }
    } finally {
      hold.restore();
    }
  });

  it("when a relay sync fails as relays double, the guild resends what the moving sessions had queued", async () => {
    const guildId = "relay-sync-fails";
    const clients = await joinMany(guildId, "sf", 9);
    expect((await guildStub(guildId).fanoutState()).relays).toBe(3);
    // Sessions hold their first delivery, so the relays queue the next two messages for them.
    const hold = await holdDeliveries("m1");
    let tenth: TestClient | undefined;
    let failures = 0;
    const restoreAssign = await patchMethod<{ ctx: DurableObjectState }>(relayStub(guildId, 1), "assign", (self, original, args) => {
      if (self.ctx.id.equals(env.RELAY.idFromName(`${guildId}/relay/1`)) && args[3] === true && failures++ === 0) throw new Error("relay 1 unreachable");
      return original(...args);
    });
    try {
      await post(guildId, "sf-0", "m1");
      await eventually(() => hold.held() === clients.length, "every session's first delivery to be held");
      for (const n of [2, 3]) await post(guildId, "sf-0", `m${n}`);
      await eventually(async () => (await Promise.all(range(3).map((i) => relayAccepted(guildId, i)))).every((seq) => seq === 3), "the relays to take m2 and m3");
      // A 10th session: relays double, and relay 1 fails its new assignment. The session's
      // subscribe fails with it: READY without the guild, which it is given once it can be.
      tenth = await join(guildId, "sf-9");
      expect((tenth.dispatches("READY")[0]!.d as { guilds: string[] }).guilds).toEqual([]);
      expect(failures).toBeGreaterThan(0);
    } finally {
      restoreAssign();
      hold.release();
      hold.restore();
    }
    // No later message: the guild's alarm resends, after syncing its relays again.
    expect(await runDurableObjectAlarm(guildStub(guildId))).toBe(true);
    for (const client of clients) {
      await client.waitFor(() => client.messageSeqs().length === 3, "all three messages", 5000);
      expect(client.messageSeqs()).toEqual([1, 2, 3]);
    }
    await tenth!.waitFor(() => tenth.dispatches("GUILD_CREATE")[0], "the 10th session given the guild");
    await post(guildId, "sf-9", "m4");
    for (const client of [...clients, tenth!]) await client.waitFor(() => client.messageSeqs().at(-1) === 4, "m4");
    expect(tenth!.messageSeqs()).toEqual([4]);
  });

  /** Sessions of users `${prefix}-0…`, with their ids, and the relay serving the first. */
  async function identifiedMany(guildId: string, prefix: string, count: number) {
    const sessions: { client: TestClient; id: string; user: string }[] = [];
    for (const i of range(count)) {
      const user = `${prefix}-${i}`;
      await addMember(guildId, user);
      const client = await TestClient.connect();
      sessions.push({ client, id: await client.identify(user), user });
    }
    const { relays } = await guildStub(guildId).fanoutState();
    expect(relays).toBeGreaterThan(0);
    let relayOfFirst = -1;
    for (const i of range(relays)) {
      const members = await runInDurableObject(relayStub(guildId, i), (_relay, state) =>
        state.storage.sql.exec<{ session_id: string }>("SELECT session_id FROM members").toArray().map((r) => r.session_id),
      );
      if (members.includes(sessions[0]!.id)) relayOfFirst = i;
    }
    return { sessions, relays, relayOfFirst };
  }
  /** Makes `deliver` to one session object fail (or run `instead`) while the patch is on. */
  const patchDeliverTo = (sessionId: string, instead: (args: unknown[], original: (...args: unknown[]) => unknown) => Promise<unknown>) =>
    patchMethod(env.SESSION.get(env.SESSION.idFromString(sessionId)), "deliver", async (self, original, args) => {
      const id = (self as unknown as { ctx: DurableObjectState }).ctx.id.toString();
      return id === sessionId ? instead(args, original) : original(...args);
    });

  it("a session its relay dropped is told by the relay, even when the guild cannot be told, and misses nothing", async () => {
    const guildId = "relay-drop-notice";
    const { sessions, relays } = await identifiedMany(guildId, "rd", 5);
    const victim = sessions[0]!;
    const served = async () => (await Promise.all(range(relays).map((i) => relayStub(guildId, i).sessionCount()))).reduce((a, b) => a + b, 0);
    const before = await served();
    const restoreDeliver = await patchDeliverTo(victim.id, async () => {
      throw new Error("session overloaded");
    });
    const restoreDrop = await patchMethod(guildStub(guildId), "dropSession", async () => {
      throw new Error("guild overloaded");
    });
    try {
      await post(guildId, "rd-1", "m1");
      await eventually(async () => (await served()) === before - 1, "the relay dropping the victim");
    } finally {
      restoreDeliver();
      restoreDrop();
    }
    await post(guildId, "rd-1", "m2");
    for (const { client } of sessions) {
      await client.waitFor(() => client.messageSeqs().length === 2, "m1 and m2", 8000);
      expect(client.messageSeqs()).toEqual([1, 2]);
    }
    expect(await served()).toBe(before);
  });

  it("a backlog moved onto a relay for a session it is already sending to keeps the RPC in flight, which is retried if it fails", async () => {
    const guildId = "relay-assign-in-flight";
    const { sessions, relayOfFirst } = await identifiedMany(guildId, "ra", 5);
    const victim = sessions[0]!;
    await post(guildId, "ra-1", "m1");
    await victim.client.waitFor(() => victim.client.messageSeqs().length === 1, "m1");
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let held = 0;
    const restore = await patchDeliverTo(victim.id, async (args, original) => {
      if (!JSON.stringify(args[0]).includes("m2")) return original(...args);
      if (held++ > 0) return original(...args);
      await released;
      throw new Error("transient failure"); // the first attempt at m2 fails
    });
    try {
      await post(guildId, "ra-1", "m2");
      await eventually(() => held === 1, "m2 in flight to the victim");
      // As relays doubling does: the guild moves the session here again with an (older) backlog.
      const history = await (await SELF.fetch(`http://gateway.test/api/guilds/${guildId}/messages`, { headers: { Authorization: `Bearer ${await token("ra-1")}` } })).json<object[]>();
      const m1 = { type: "MESSAGE_CREATE" as const, seq: 1, data: JSON.stringify(history[0]) };
      await relayStub(guildId, relayOfFirst).assign(guildId, [{ sessionId: victim.id, userId: victim.user, target: victim.id, backlog: [m1] }], []);
      release();
      await victim.client.waitFor(() => victim.client.messageSeqs().length === 2, "m2, retried", 5000);
    } finally {
      restore();
    }
    expect(victim.client.messageSeqs()).toEqual([1, 2]);
  });

  it("a post that waited for admission while a relay sync failed reaches every session, with no later message", async () => {
    const guildId = "relay-sync-fails-while-waiting";
    const clients = await joinMany(guildId, "sw", 5);
    const { relays } = await guildStub(guildId).fanoutState();
    await post(guildId, "sw-0", "m1");
    for (const client of clients) await client.waitFor(() => client.messageSeqs().length === 1, "m1");
    // The next post waits in admission… (its promise lives in the guild: it is settled from there)
    type Internals = { relaysSynced: boolean; relays: { admit?(): Promise<void> | undefined }; letIn?: () => void };
    await runInDurableObject(guildStub(guildId), (guild) => {
      const internals = guild as unknown as Internals;
      internals.relays.admit = () => new Promise<void>((resolve) => (internals.letIn = resolve));
    });
    const waiting = post(guildId, "sw-0", "m2");
    await eventually(() => runInDurableObject(guildStub(guildId), (guild) => (guild as unknown as Internals).letIn !== undefined), "the post waiting for admission");
    // …while a relay sync fails: relays lost their sessions, and the guild knows it must sync them.
    for (const i of range(relays)) await relayStub(guildId, i).assign(guildId, [], [], true);
    await runInDurableObject(guildStub(guildId), (guild) => {
      const internals = guild as unknown as Internals;
      internals.relaysSynced = false;
      delete internals.relays.admit; // the prototype's again
      internals.letIn!();
    });
    await waiting;
    for (const client of clients) {
      await client.waitFor(() => client.messageSeqs().length === 2, "m2", 5000);
      expect(client.messageSeqs()).toEqual([1, 2]);
    }
  });

  it("when relays double, events still queued for or in flight to the old ones reach every session", async () => {
    const guildId = "relay-doubling";
    const clients = await joinMany(guildId, "dbl", 9);
    expect((await guildStub(guildId).fanoutState()).relays).toBe(3);
    // One relay is slow to take events (as when its own backlog is full).
    const restore = await patchPublish(`${guildId}/relay/0`, async (original, args) => {
      await scheduler.wait(800);
      return original(...args);
    });
    try {
      for (const n of [1, 2, 3]) await post(guildId, "dbl-0", `m${n}`); // in flight to relay 0, then queued for it
      clients.push(await join(guildId, "dbl-9")); // 10 sessions > 3 relays × 3: relays double
    } finally {
      restore();
    }
    expect((await guildStub(guildId).fanoutState()).relays).toBe(6);
    // No later message arrives to reveal a gap: the events themselves must get there.
    for (const client of clients.slice(0, 9)) {
      await client.waitFor(() => client.messageSeqs().length === 3, "all three messages", 5000);
      await scheduler.wait(20);
      expect(client.messageSeqs()).toEqual([1, 2, 3]);
    }
  });

  it("when relays are released, events still queued for or in flight to them, and those posted meanwhile, reach the session left", async () => {
    const guildId = "relay-release";
    const clients = await joinMany(guildId, "rel", 10);
    expect((await guildStub(guildId).fanoutState()).relays).toBeGreaterThanOrEqual(4);
    // Every relay is slow to take events, so the first messages are still with them when the guild lets them go.
    const restore = await patchMethod(relayStub(guildId, 0), "publish", async (_self, original, args) => {
      await scheduler.wait(500);
      return original(...args);
    });
    const [kept, ...leaving] = clients;
    try {
      await Promise.all([1, 2, 3].map((n) => post(guildId, "rel-0", `m${n}`)));
      for (const client of leaving) client.ws.close(1000, "bye");
      // Posted while the sessions leave and the guild goes back to sending directly.
      for (const n of [4, 5, 6]) {
        await post(guildId, "rel-0", `m${n}`);
        await scheduler.wait(100);
      }
      await eventually(async () => (await guildStub(guildId).fanoutState()).relays === 0, "the relays released");
    } finally {
      restore();
    }
    // No later message arrives to reveal a gap: the events themselves must get there, once each, in order.
    await kept!.waitFor(() => kept!.messageSeqs().length >= 6, "all six messages", 5000);
    await scheduler.wait(100);
    expect(kept!.messageSeqs()).toEqual([1, 2, 3, 4, 5, 6]);
  });
});

describe("relay release racing relays being taken on again", () => {
  it("sessions that arrive while the relays are being released (and take the guild back over the threshold) still get every message", async () => {
    const guildId = "release-regrow";
    const clients: TestClient[] = [];
    for (let i = 0; i < 10; i++) clients.push(await join(guildId, `rg-${i}`));
    const peak = (await guildStub(guildId).fanoutState()).relays;
    expect(peak).toBe(6);

    // The relays are slow to answer the release (busy, or one far away): hold the release's
    // `assign(guild, [], [], true)` on each of the `peak` relays until the gate opens.
    let releases = 0;
    let released = 0;
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    const restore = await patchMethod(relayStub(guildId, 0), "assign", async (_self, original, args) => {
      const [, add, remove, replace] = args as [string, unknown[], string[], boolean];
      if (replace === true && add.length === 0 && remove.length === 0 && releases < peak) {
        releases++;
        await gate;
        try {
          return await original(...args);
        } finally {
          released++;
        }
      }
      return original(...args);
    });
    let newcomers: TestClient[] = [];
    try {
      const [kept, ...leaving] = clients;
      for (const client of leaving) client.ws.close(1000, "bye");
      await eventually(() => releases === peak, "the guild releasing its relays");
      // Meanwhile a crowd arrives: 1 + 3 = 4 sessions, back at the threshold, so relays are used again.
      for (let i = 10; i < 13; i++) newcomers.push(await join(guildId, `rg-${i}`));
      expect((await guildStub(guildId).fanoutState())).toEqual({ sessions: 4, relays: 3 });
      newcomers = [kept!, ...newcomers];
    } finally {
      open(); // the release's assignments now reach the relays
      restore();
    }
    await eventually(() => released === peak, "the late releases to reach the relays");
    await post(guildId, "rg-0", "after the crowd arrived");
    // Without a fix the late releases emptied the relays just assigned: they serve no one, and
    // every session of the guild stays silent (no gap shows, since nothing arrives at all).
    for (const client of newcomers) {
      await client.waitFor(() => client.messageSeqs().length >= 1, "the message", 3000);
      expect(client.messageSeqs()).toEqual([1]);
    }
    const served = await Promise.all([0, 1, 2].map((i) => relayStub(guildId, i).sessionCount()));
    expect(served.reduce((a, b) => a + b, 0)).toBe(4);
  });
});

describe("relays released across restarts", () => {
  const PEAK = 6; // relays for 10 sessions here

  /**
   * 10 sessions on 6 relays, every session's delivery of m1 held, so each relay has taken m2 and
   * keeps it queued. Returns the hold, to be released by the caller.
   */
  async function m2QueuedOnRelays(guildId: string, prefix: string) {
    const clients = await joinMany(guildId, prefix, 10);
    expect((await guildStub(guildId).fanoutState()).relays).toBe(PEAK);
    const hold = await holdDeliveries("m1");
    try {
      await post(guildId, `${prefix}-0`, "m1");
      await eventually(() => hold.held() === clients.length, "m1 in flight to every session");
      await post(guildId, `${prefix}-0`, "m2");
      await eventually(async () => (await Promise.all(range(PEAK).map((i) => relayAccepted(guildId, i)))).every((seq) => seq === 2), "the relays taking m2");
    } catch (error) {
      hold.restore();
      throw error;
    }
    return { kept: clients[0]!, leaving: clients.slice(1), hold };
  }

  /** With nothing else posted, the objects' alarms (the guild's and the relays') must bring the session left m2. */
  async function expectBothMessagesAfterAlarms(guildId: string, kept: TestClient): Promise<void> {
    await kept.waitFor(() => kept.messageSeqs().length >= 1, "m1");
    await runDurableObjectAlarm(guildStub(guildId));
    for (const i of range(PEAK)) await runDurableObjectAlarm(relayStub(guildId, i));
    await kept.waitFor(() => kept.messageSeqs().length >= 2, "m2", 3000);
    expect(kept.messageSeqs()).toEqual([1, 2]);
  }

  it("a guild restarted while it releases its relays still gets the events they handed back to the session left, with no later message", async () => {
    const guildId = "release-restart";
    const { kept, leaving, hold } = await m2QueuedOnRelays(guildId, "rs");
    let released = 0;
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    let restoreAssign: (() => void) | undefined;
    try {
      // The relays let their sessions go (handing back m2), and then the guild restarts (a deploy,
      // a crash) before their answers reach it.
      restoreAssign = await patchMethod(relayStub(guildId, 0), "assign", async (_self, original, args) => {
        const [, add, remove, replace] = args as [string, unknown[], string[], boolean];
        const result = await original(...args);
        if (replace === true && add.length === 0 && remove.length === 0) {
          released++;
          await gate;
        }
        return result;
      });
      for (const client of leaving) client.ws.close(1000, "bye");
      await eventually(() => released === PEAK, "every relay releasing its sessions");
      await runInDurableObject(guildStub(guildId), (_guild, state) => state.abort("restart")).then(
        () => expect.fail("abort returns"),
        (error: unknown) => expect(String(error)).toContain("restart"),
      );
    } finally {
      open();
      restoreAssign?.();
      hold.release();
      hold.restore();
    }
    await expectBothMessagesAfterAlarms(guildId, kept);
  });

  it("relays restarted just before they are released: the session left still gets what they had not handed over, with no later message", async () => {
    const guildId = "release-relay-restart";
    const { kept, leaving, hold } = await m2QueuedOnRelays(guildId, "rx");
    try {
      // The relays restart (a deploy, a crash) with m2 not handed over: each owes it from its
      // checkpoint, to be resent from its alarm. Before that alarm, sessions leave and the guild
      // releases its relays, which now have nothing queued to hand back.
      for (const i of range(PEAK)) {
        await runInDurableObject(relayStub(guildId, i), (_relay, state) => state.abort("restart")).catch(() => undefined);
      }
      for (const client of leaving) client.ws.close(1000, "bye");
      await eventually(async () => (await guildStub(guildId).fanoutState()).relays === 0, "the relays released");
    } finally {
      hold.release();
      hold.restore();
    }
    await expectBothMessagesAfterAlarms(guildId, kept); // the relays' alarms resend to no one
  });
});

describe("posts waiting in a guild are bounded wherever they wait", () => {
  it("posts held back behind a removal whose relay does not answer are refused past 1,000, as posts waiting for admission are", async () => {
    const guildId = "waiting-behind-removal";
    const authors = Array.from({ length: 24 }, (_, i) => `wr-${i}`);
    for (const user of [...authors, "wr-gone"]) await addMember(guildId, user);
    const clients: TestClient[] = [];
    for (const user of ["wr-0", "wr-1", "wr-2", "wr-gone"]) {
      const client = await TestClient.connect();
      await client.identify(user);
      clients.push(client);
    }
    expect((await guildStub(guildId).fanoutState()).relays).toBeGreaterThan(0);
    const goneId = (clients[3]!.dispatches("READY")[0]!.d as { session_id: string }).session_id;
    // The relay serving the removed member's session is stuck: it does not answer the removal.
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    let stuck = 0;
    const restore = await patchMethod(relayStub(guildId, 0), "assign", async (_self, original, args) => {
      if ((args[2] as string[]).includes(goneId)) {
        stuck++;
        await gate;
      }
      return original(...args);
    });
    const settled: Response[] = [];
    let all: Promise<Response>[] = [];
    try {
      const removal = api("DELETE", `/api/guilds/${guildId}/members/wr-gone`, "admin");
      await eventually(() => stuck === 1, "the removal waiting for its relay");
      // 1,080 posts (45 from each of 24 authors: within everyone's rate) while publishing is held back.
      all = authors.flatMap((as) =>
        Array.from({ length: 45 }, (_, i) => api("POST", `/api/guilds/${guildId}/messages`, as, { content: `${as} ${i}` }).then((r) => (settled.push(r), r))),
      );
      await eventually(() => settled.some((r) => r.status === 429), "a refusal once 1,000 posts wait", 20_000);
      const refused = settled.find((r) => r.status === 429)!;
      expect(((await refused.json()) as { error: { code: string } }).error.code).toBe("rate_limited");
      expect(Number(refused.headers.get("Retry-After"))).toBeGreaterThanOrEqual(1);
      open();
      expect((await removal).status).toBe(204);
    } finally {
      open();
      restore();
      await Promise.all(all);
    }
    const answers = await Promise.all(all);
    expect(answers.filter((r) => r.status !== 201 && r.status !== 429)).toEqual([]);
    const accepted = answers.filter((r) => r.status === 201).length;
    expect(accepted).toBeGreaterThanOrEqual(1000); // no fewer than 1,000 may wait
    // Every post taken reaches every member who stayed, once, in order, with no seq skipped.
    for (const member of clients.slice(0, 3)) {
      await member.waitFor(() => member.messageSeqs(guildId).length === accepted, "every accepted post", 30_000);
      expect(member.messageSeqs(guildId)).toEqual(Array.from({ length: accepted }, (_, i) => i + 1));
    }
  }, 60_000);
});
