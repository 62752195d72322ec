import { env, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { GuildEvent } from "../../src/guild/events.ts";
import { TestClient, addMember } from "./gateway-client.ts";

const sessionStub = (id: string) => env.SESSION.get(env.SESSION.idFromString(id));
const holderOf = (userId: string, sessionId: string) =>
  runInDurableObject(env.USER.get(env.USER.idFromName(userId)), (_user, state) =>
    state.storage.sql.exec<{ target: string }>("SELECT target FROM sessions WHERE session_id = ?", sessionId).one().target,
  );
const keptDispatches = (objectId: string) =>
  runInDurableObject(sessionStub(objectId), (_session, state) =>
    state.storage.sql.exec<{ n: number | null }>("SELECT SUM(last_s - first_s + 1) AS n FROM dispatch_runs").one().n ?? 0,
  );

function events(guildId: string, from: number, count: number): GuildEvent[] {
  return Array.from({ length: count }, (_, i) => {
    const seq = from + i;
    const message = { id: `m${seq}`, guild_id: guildId, author_id: "someone", content: `c${seq}`, seq, timestamp: "2026-11-21T00:00:00.000Z" };
    return { type: "MESSAGE_CREATE" as const, seq, data: JSON.stringify(message) };
  });
}

describe("the resume buffer's retention (≥ 1,000 dispatches and ≥ 60 s) survives a RESUME", () => {
  it("a RESUME from an old seq does not make old dispatches young again, so they are still trimmed", async () => {
    const guildId = "rb-age";
    await addMember(guildId, "rb-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("rb-user"); // s = 1
    // A busy guild's traffic: 1,300 messages (s = 2…1301).
    for (let from = 1; from <= 1300; from += 100) await sessionStub(sessionId).deliver({ guildId, events: events(guildId, from, 100) });
    await client.waitFor(() => client.messageSeqs().length === 1300, "1,300 messages");
    // All of it was sent more than a minute ago.
    await runInDurableObject(sessionStub(sessionId), (_session, state) => {
      state.storage.sql.exec("UPDATE dispatch_runs SET at = at - 120000");
    });
    client.ws.close(4000, "network dropped");

    // The client resumes from the oldest dispatch still kept: the whole buffer is handed over.
    const resumed = await TestClient.connect();
    await resumed.resume("rb-user", sessionId, 0);
    const holder = await holderOf("rb-user", sessionId);
    // 300 more messages: a trim is due, and everything more than 1,000 dispatches back was sent
    // more than a minute ago, so only the newest ~1,000 (plus a trim interval) may be kept.
    for (let from = 1301; from <= 1600; from += 100) await sessionStub(holder).deliver({ guildId, events: events(guildId, from, 100) });
    await resumed.waitFor(() => resumed.messageSeqs().filter((seq) => seq > 1300).length === 300, "300 more messages");

    expect(await keptDispatches(holder)).toBeLessThanOrEqual(1000 + 256 + 100);
  });
});
