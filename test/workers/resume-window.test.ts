/**
 * The contract's resume window: a session whose socket dropped stays resumable for 60 s, missing
 * nothing posted meanwhile; after that, RESUME gets op 9 and the session is gone everywhere.
 * The clock is moved forward (as the runtime's alarms would see it) instead of waiting a minute.
 */
import { env, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import type { Session } from "../../src/session/session.ts";
import { TestClient, eventually, post, sessionAfterFirstMessage, token } from "./gateway-client.ts";

afterEach(() => vi.restoreAllMocks());

/** CONTRACT.md: a dropped session is resumable for at least 60 s (not the source's constant: this checks it). */
const CONTRACT_RESUME_WINDOW_MS = 60_000;

const sessionStub = (sessionId: string) => env.SESSION.get(env.SESSION.idFromString(sessionId));
const sessionStatus = (sessionId: string) =>
  runInDurableObject(sessionStub(sessionId), (session: Session) => (session as unknown as { state: { status: string } }).state.status);
const sqlColumn = (stub: DurableObjectStub, query: string) =>
  runInDurableObject(stub, (_object, state) => state.storage.sql.exec<{ session_id: string }>(query).toArray().map((r) => r.session_id));

/** Sets every clock reading in this isolate (tests and objects alike) to run on from `time`, now. */
function clockAt(time: number): void {
  const realNow = Date.now.bind(Date);
  const ahead = time - realNow();
  vi.spyOn(Date, "now").mockImplementation(() => realNow() + ahead);
}

/**
 * A member's session that saw the guild's first message, then lost its connection (not a
 * 1000/1001 close); `droppedAt` is just before the drop.
 */
async function droppedSession(guildId: string, userId: string): Promise<{ sessionId: string; seq: number; droppedAt: number }> {
  const { client, sessionId } = await sessionAfterFirstMessage(guildId, userId, "before the drop");
  const seq = client.dispatches().at(-1)!.s!;
  const droppedAt = Date.now();
  client.ws.close(4000, "network dropped");
  await eventually(async () => (await sessionStatus(sessionId)) === "disconnected", "the session disconnected");
  return { sessionId, seq, droppedAt };
}

describe("the resume window", () => {
  it("a session resumed just inside 60 s gets everything posted while it was away", async () => {
    const { sessionId, seq, droppedAt } = await droppedSession("rw-inside", "rw-inside-user");
    await post("rw-inside", "rw-inside-user", "while away");
    clockAt(droppedAt + CONTRACT_RESUME_WINDOW_MS - 500);
    await runDurableObjectAlarm(sessionStub(sessionId));
    expect(await sessionStatus(sessionId)).toBe("disconnected");

    const resumed = await TestClient.connect();
    await resumed.resume("rw-inside-user", sessionId, seq);
    const away = await resumed.waitFor(() => resumed.dispatches("MESSAGE_CREATE")[0], "the message posted while away");
    expect((away.d as { content: string }).content).toBe("while away");
    expect(resumed.dispatches("RESUMED")).toHaveLength(1);
  });

  it("past 60 s a RESUME gets op 9, and neither the guild nor the user directory keeps the session", async () => {
    const { sessionId, seq, droppedAt } = await droppedSession("rw-expired", "rw-expired-user");
    const guild = env.GUILD.get(env.GUILD.idFromName("rw-expired"));
    const directory = env.USER.get(env.USER.idFromName("rw-expired-user"));
    expect(await sqlColumn(guild, "SELECT session_id FROM subscriptions")).toContain(sessionId);
    expect(await sqlColumn(directory, "SELECT session_id FROM sessions")).toContain(sessionId);

    const deadline = await runInDurableObject(sessionStub(sessionId), (session: Session) => (session as unknown as { state: { resumeDeadline: number } }).state.resumeDeadline);
    expect(deadline - droppedAt).toBeGreaterThanOrEqual(CONTRACT_RESUME_WINDOW_MS);
    clockAt(deadline + 1);
    await runDurableObjectAlarm(sessionStub(sessionId));
    await eventually(async () => (await sessionStatus(sessionId)) === "ended", "the session ended");
    expect(await sqlColumn(guild, "SELECT session_id FROM subscriptions")).not.toContain(sessionId);
    expect(await sqlColumn(directory, "SELECT session_id FROM sessions")).not.toContain(sessionId);

    const late = await TestClient.connect();
    await late.waitFor(() => late.frames.find((f) => f.op === 10), "HELLO");
    late.send({ op: 6, d: { token: await token("rw-expired-user"), session_id: sessionId, seq } });
    const invalid = await late.waitFor(() => late.frames.find((f) => f.op === 9), "INVALID_SESSION");
    expect(invalid.d).toBe(false);
    expect(late.dispatches("RESUMED")).toEqual([]);
  });
});
