import { env, evictDurableObject } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import { TestClient, addMember, eventually, post, token } from "./gateway-client.ts";

/** The bound the fix introduces (MAX_SESSIONS_PER_USER in src/guild/user.ts). */
const MAX_SESSIONS_PER_USER = 32;
/** New sessions one user may start at once, then one a second (IDENTIFY_BURST, IDENTIFIES_PER_SECOND in src/guild/user.ts). */
const IDENTIFY_BURST = 60;

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

  it("a user identifying over and over is refused 4008 once its allowance is spent, and may start another a second later", async () => {
    const guildId = "identify-loop";
    await addMember(guildId, "looper");
    // Time stands still while it loops, so no allowance comes back meanwhile.
    const frozen = Date.now();
    vi.spyOn(Date, "now").mockReturnValue(frozen);
    let started = 0;
    let refused: TestClient | undefined;
    while (!refused && started <= IDENTIFY_BURST) {
      const client = await TestClient.connect();
      await client.waitFor(() => client.frames.find((f) => f.op === 10), "HELLO");
      client.send({ op: 2, d: { token: await token("looper") } });
      await client.waitFor(() => client.dispatches("READY")[0] ?? client.closed, "READY or a close");
      if (client.closed) {
        refused = client;
        break;
      }
      started++;
      client.ws.close(1000, "bye"); // ends the session: the cap on live sessions never comes into it
      await eventually(async () => (await guildStub(guildId).fanoutState()).sessions === 0, "the session to end");
    }
    expect(started).toBe(IDENTIFY_BURST);
    expect(refused?.closed?.code).toBe(4008);
    expect(refused!.dispatches("READY")).toEqual([]);
    // The allowance is stored: the user directory evicted from memory has not refilled it.
    await evictDurableObject(env.USER.get(env.USER.idFromName("looper")));
    const again = await TestClient.connect();
    await again.waitFor(() => again.frames.find((f) => f.op === 10), "HELLO");
    again.send({ op: 2, d: { token: await token("looper") } });
    expect((await again.waitFor(() => again.closed, "a close")).code).toBe(4008);

    vi.spyOn(Date, "now").mockReturnValue(frozen + 1000);
    const later = await TestClient.connect();
    await later.identify("looper");
    expect(later.closed).toBeNull();
  });
});
