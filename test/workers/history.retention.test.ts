import { env, evictDurableObject, runDurableObjectAlarm } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { TestClient, addMember, api, eventually, patchMethod, post } from "./gateway-client.ts";

// This project keeps MESSAGE_RETENTION=20 messages per guild, so pruning runs every 20 posts.
const guildStub = (guildId: string) => env.GUILD.get(env.GUILD.idFromName(guildId));
const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

async function postMany(guildId: string, as: string, count: number): Promise<number[]> {
  const seqs: number[] = [];
  for (let i = 1; i <= count; i++) seqs.push((await post(guildId, as, `m${i}`)).seq);
  return seqs;
}

async function history(guildId: string, as: string): Promise<number[]> {
  const response = await api("GET", `/api/guilds/${guildId}/messages?after=0&limit=100`, as);
  expect(response.status).toBe(200);
  return ((await response.json()) as { seq: number }[]).map((m) => m.seq);
}

describe("message retention (MESSAGE_RETENTION=20 in this project)", () => {
  it("a guild keeps its newest messages, and numbering goes on after it is evicted", async () => {
    const guildId = "retained";
    await addMember(guildId, "ret-author");
    expect(await postMany(guildId, "ret-author", 45)).toEqual(range(1, 45));
    // Pruned at the 40th post (the newest 20 kept then), not yet again at the 45th.
    expect(await history(guildId, "ret-author")).toEqual(range(21, 45));
    await evictDurableObject(guildStub(guildId)); // it reads its last seq back from what it kept
    expect((await post(guildId, "ret-author", "after eviction")).seq).toBe(46);
  });

  it("a session that fell behind what the guild keeps goes on after the pruned messages instead of waiting for them", async () => {
    const guildId = "retained-behind";
    for (const user of ["rb-author", "rb-victim"]) await addMember(guildId, user);
    const victim = await TestClient.connect();
    const victimId = await victim.identify("rb-victim");
    // Its deliveries fail until the guild drops it, and it cannot be told of the drop until every message is posted.
    const restoreDeliver = await patchMethod<{ ctx: DurableObjectState }>(
      env.SESSION.get(env.SESSION.idFromString(victimId)),
      "deliver",
      (self, original, args) => {
        if (self.ctx.id.toString() === victimId) throw new Error("session overloaded");
        return original(...args);
      },
    );
    const restoreNotice = await patchMethod(env.SESSION.get(env.SESSION.idFromString(victimId)), "guildDropped", () => {
      throw new Error("not now");
    });
    try {
      await postMany(guildId, "rb-author", 45);
      await eventually(async () => (await guildStub(guildId).fanoutState()).sessions === 0, "the victim dropped");
    } finally {
      restoreDeliver();
      restoreNotice();
    }
    // Told now (the guild's alarm tries owed notices again), it subscribes again from seq 0: 1..20 are gone.
    await runDurableObjectAlarm(guildStub(guildId));
    await victim.waitFor(() => victim.messageSeqs().includes(45), "the messages the guild still keeps", 5000);
    expect(victim.messageSeqs()).toEqual(range(21, 45));
    await post(guildId, "rb-author", "and then");
    await victim.waitFor(() => victim.messageSeqs().includes(46), "the next message");
    expect(victim.messageSeqs()).toEqual(range(21, 46));
  });

  it("a removed member reads nothing posted after the removal, even where pruned messages leave a hole", async () => {
    const guildId = "retained-departed";
    for (const user of ["rd-author", "rd-left"]) await addMember(guildId, user);
    await postMany(guildId, "rd-author", 10);
    expect((await api("DELETE", `/api/guilds/${guildId}/members/rd-left`, "admin")).status).toBe(204);
    await postMany(guildId, "rd-author", 35); // 11..45: pruned at 20 and 40, so 1..20 are gone
    // A session of the removed member pulls from seq 5: before the removal, but no longer kept.
    const pulled = await guildStub(guildId).eventsAfter("a-session-of-rd-left", 5, 100, "rd-left");
    expect(pulled.map((e) => e.seq)).toEqual([]);
  });
});
