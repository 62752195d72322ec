import { env, evictDurableObject } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import { TestClient, addMember, eventually, post, token } from "./gateway-client.ts";

/** The bound the fix introduces (MAX_SESSIONS_PER_USER in src/guild/user.ts). */
const MAX_SESSIONS_PER_USER = 32;
/** IDENTIFYs and RESUMEs one user may make in quick succession, then one a second (SESSION_START_BURST, SESSION_STARTS_PER_SECOND in src/guild/user.ts). */
const SESSION_START_BURST = 60;

afterEach(() => vi.restoreAllMocks());

const guildStub = (guildId: string) => env.GUILD.get(env.GUILD.idFromName(guildId));

describe("one user's live sessions are bounded", () => {
  it("a user cannot multiply a guild's fanout by identifying over and over: past the cap, IDENTIFY closes 4008", async () => {
    const guildId = "many-sessions";
    await addMember(guildId, "victim");
    await addMember(guildId, "greedy");
    // Each connection identifies, then drops with a code that leaves its session resumable (and
    // subscribed, buffering every message) for 60 s: one client can do this many times a second.
    for (let i = 0; i < MAX_SESSIONS_PER_USER; i++) {
      const ghost = await TestClient.connect();
      await ghost.identify("greedy");
      ghost.ws.close(4000, "dropped on purpose");
    }
    const oneMore = await TestClient.connect();
    await oneMore.waitFor(() => oneMore.frames.find((f) => f.op === 10), "HELLO");
    oneMore.send({ op: 2, d: { token: await token("greedy") } });
    await oneMore.waitFor(() => oneMore.closed, "close");
    expect(oneMore.closed!.code).toBe(4008);
    expect(oneMore.dispatches("READY")).toEqual([]);

    // Every message of the guild costs at most the cap in deliveries for this user.
    const { sessions } = await guildStub(guildId).fanoutState();
    expect(sessions).toBeLessThanOrEqual(MAX_SESSIONS_PER_USER);

    // Other users are not affected.
    const victim = await TestClient.connect();
    await victim.identify("victim");
    await post(guildId, "victim", "still here");
    await victim.waitFor(() => victim.messageSeqs(guildId).length === 1, "the victim's message");
  });

  it("a session that ends frees its place", async () => {
    const guildId = "sessions-freed";
    await addMember(guildId, "cycler");
    for (let i = 0; i < MAX_SESSIONS_PER_USER + 5; i++) {
      const client = await TestClient.connect();
      await client.identify("cycler");
      client.ws.close(1000, "bye"); // ends the session
      await eventually(async () => (await guildStub(guildId).fanoutState()).sessions === 0, "the session to end");
    }
  });

  it("a user's session starts (IDENTIFY and RESUME) are limited: 60 in quick succession, then one a second, stored, and a refused RESUME leaves its session resumable", async () => {
    const guildId = "identify-loop";
    await addMember(guildId, "looper");
    // Time stands still while it loops, so no allowance comes back meanwhile.
    const frozen = Date.now();
    const clockAt = (time: number) => vi.spyOn(Date, "now").mockReturnValue(time);
    clockAt(frozen);
    // One session to resume later: dropped, not ended. It took the first start.
    const keeper = await TestClient.connect();
    const keptId = await keeper.identify("looper");
    const keptSeq = keeper.dispatches().at(-1)!.s!;
    keeper.ws.close(4000, "dropped");
    /** IDENTIFY and end the session, until one is refused: how many got READY, and the refusal. */
    const identifyUntilRefused = async (limit: number) => {
      let started = 0;
      for (;;) {
        const client = await TestClient.connect();
        await client.waitFor(() => client.frames.find((f) => f.op === 10), "HELLO");
        client.send({ op: 2, d: { token: await token("looper") } });
        await client.waitFor(() => client.dispatches("READY")[0] ?? client.closed, "READY or a close");
        if (client.closed) return { started, refusal: client };
        if (++started > limit) return { started, refusal: undefined };
        client.ws.close(1000, "bye"); // ends the session: the cap on live sessions never comes into it
        await eventually(async () => (await guildStub(guildId).fanoutState()).sessions === 1, "the session to end (the keeper stays)");
      }
    };
    const first = await identifyUntilRefused(SESSION_START_BURST);
    expect(first.started).toBe(SESSION_START_BURST - 1);
    expect(first.refusal?.closed?.code).toBe(4008);
    expect(first.refusal!.dispatches("READY")).toEqual([]);

    const resume = async () => {
      const client = await TestClient.connect();
      await client.waitFor(() => client.frames.find((f) => f.op === 10), "HELLO");
      client.send({ op: 6, d: { token: await token("looper"), session_id: keptId, seq: keptSeq } });
      await client.waitFor(() => client.dispatches("RESUMED")[0] ?? client.closed, "RESUMED or a close");
      return client;
    };
    // A RESUME takes a start too: refused, and the session it asked for stays as it was.
    expect((await resume()).closed?.code).toBe(4008);
    // The allowance is stored: the user directory evicted from memory has not refilled it.
    await evictDurableObject(env.USER.get(env.USER.idFromName("looper")));
    expect((await identifyUntilRefused(0)).started).toBe(0);
    // Half a second gives half a start: still refused. A second gives one: the RESUME goes through.
    clockAt(frozen + 500);
    expect((await identifyUntilRefused(0)).started).toBe(0);
    clockAt(frozen + 1000);
    const resumed = await resume();
    expect(resumed.closed).toBeNull();
    expect(resumed.dispatches("RESUMED")).toHaveLength(1);
    // Long idle refills up to the burst, no further.
    clockAt(frozen + 3_600_000);
    expect((await identifyUntilRefused(SESSION_START_BURST)).started).toBe(SESSION_START_BURST);
  }, 60_000);
});
