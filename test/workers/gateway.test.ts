import { env, evictDurableObject, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { Guild } from "../../src/guild/guild.ts";
import type { Session } from "../../src/session/session.ts";
import { TestClient, addMember, api, eventually, holdDeliveries, patchMethod, post, sessionAfterFirstMessage, token } from "./gateway-client.ts";

const guildStub = (guildId: string) => env.GUILD.get(env.GUILD.idFromName(guildId));
const sessionStub = (sessionId: string) => env.SESSION.get(env.SESSION.idFromString(sessionId));
const userSessions = (userId: string) =>
  runInDurableObject(env.USER.get(env.USER.idFromName(userId)), (_user, state) =>
    state.storage.sql.exec<{ session_id: string }>("SELECT session_id FROM sessions").toArray().map((r) => r.session_id),
  );
const sessionStatus = (sessionId: string) =>
  runInDurableObject(sessionStub(sessionId), (session: Session) => (session as unknown as { state: { status: string } }).state.status);

/** A session (READY, one message) whose client dropped: disconnected, resumable from seq 2. */
async function droppedSession(guildId: string, userId: string): Promise<string> {
  const { client, sessionId } = await sessionAfterFirstMessage(guildId, userId);
  client.ws.close(4000, "network dropped");
  await eventually(async () => (await sessionStatus(sessionId)) === "disconnected", "the session disconnected");
  return sessionId;
}

/** A RESUME on a new connection, up to the close the server is expected to answer it with. */
async function closedResume(userId: string, sessionId: string, seq: number): Promise<TestClient> {
  const client = await TestClient.connect();
  await client.waitFor(() => client.frames.find((f) => f.op === 10), "HELLO");
  client.send({ op: 6, d: { token: await token(userId), session_id: sessionId, seq } });
  await client.waitFor(() => client.closed, "the close");
  return client;
}

/** Sends a HEARTBEAT and waits for its ACK: anything the session sent this socket before has arrived. */
async function heartbeatAnswered(client: TestClient): Promise<void> {
  const acks = client.frames.filter((f) => f.op === 11).length;
  client.send({ op: 1, d: null });
  await client.waitFor(() => client.frames.filter((f) => f.op === 11).length > acks, "heartbeat ACK");
}

describe("sessions over real WebSockets in workerd", () => {
  it("keep working across hibernation: the socket stays open and state survives", async () => {
    await addMember("hib", "hib-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("hib-user");
    await post("hib", "hib-user", "before");
    await client.waitFor(() => client.messageSeqs().length === 1, "first message");

    await evictDurableObject(sessionStub(sessionId), { webSockets: "hibernate" });
    await post("hib", "hib-user", "after hibernation");
    await client.waitFor(() => client.messageSeqs().length === 2, "message after hibernation");
    expect(client.dispatches().map((f) => f.s)).toEqual([1, 2, 3]);

    client.send({ op: 1, d: 3 });
    await client.waitFor(() => client.frames.some((f) => f.op === 11), "heartbeat ACK after hibernation");
    expect(client.closed).toBeNull();
  });

  it("heartbeats write no storage and move no alarm, yet one kept across hibernation still counts when the alarm comes", async () => {
    await addMember("hb-cheap", "hbc-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("hbc-user");
    const stored = () =>
      runInDurableObject(sessionStub(sessionId), async (_session, state) => ({
        row: state.storage.sql.exec<{ data: string }>("SELECT data FROM state").one().data,
        alarm: await state.storage.getAlarm(),
      }));
    const before = await stored();
    for (let i = 1; i <= 3; i++) {
      client.send({ op: 1, d: 2 });
      await client.waitFor(() => client.frames.filter((f) => f.op === 11).length === i, `ACK ${i}`);
    }
    expect(await stored()).toEqual(before);
    // Hibernated, then the alarm comes at the stored deadline: the socket's later one holds, and the alarm moves to it.
    await evictDurableObject(sessionStub(sessionId), { webSockets: "hibernate" });
    await runInDurableObject(sessionStub(sessionId), async (session: Session, state) => {
      const internals = session as unknown as { state: { heartbeatDeadline: number; status: string } };
      internals.state.heartbeatDeadline = Date.now() - 1;
      await session.alarm();
      expect(internals.state.status).toBe("ready");
      expect(await state.storage.getAlarm()).toBeGreaterThan(Date.now() + 30_000);
    });
    // The socket is still served: a heartbeat sent after the alarm is answered, and nothing closed it.
    client.send({ op: 1, d: 2 });
    await client.waitFor(() => client.frames.filter((f) => f.op === 11).length === 4, "ACK after the alarm");
    expect(client.closed).toBeNull();
  });

  it("remember how far they got in a guild across hibernation, so repeated events are dropped", async () => {
    await addMember("repeat", "rep-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("rep-user");
    await post("repeat", "rep-user", "one");
    await post("repeat", "rep-user", "two");
    await client.waitFor(() => client.messageSeqs().length === 2, "two messages");

    await evictDurableObject(sessionStub(sessionId), { webSockets: "hibernate" });
    // A guild retrying a batch whose answer it never saw sends both events again.
    const again = [1, 2].map((seq) => ({ type: "MESSAGE_CREATE" as const, seq, data: JSON.stringify({ seq, content: "again" }) }));
    await sessionStub(sessionId).deliver({ guildId: "repeat", events: again });
    await post("repeat", "rep-user", "three");
    await client.waitFor(() => client.messageSeqs().length >= 3, "third message");
    expect(client.messageSeqs()).toEqual([1, 2, 3]);
    expect(client.dispatches().map((f) => f.s)).toEqual([1, 2, 3, 4]);
  });

  it("keep receiving after the guild object is evicted (subscriptions are persisted)", async () => {
    await addMember("evict", "ev-user");
    const client = await TestClient.connect();
    await client.identify("ev-user");
    await post("evict", "ev-user", "one");
    await client.waitFor(() => client.messageSeqs().length === 1, "first");
    await evictDurableObject(guildStub("evict"));
    await post("evict", "ev-user", "two");
    await client.waitFor(() => client.messageSeqs().length === 2, "second after guild eviction");
    expect(client.messageSeqs()).toEqual([1, 2]);
  });

  it("get what a guild had queued when it restarted mid-fanout, with no later message to reveal the gap", async () => {
    await addMember("restart", "rs-user");
    const client = await TestClient.connect();
    await client.identify("rs-user");
    // Hold the session's first delivery, so the next messages wait in the guild's memory.
    const hold = await holdDeliveries("in flight");
    try {
      await post("restart", "rs-user", "in flight");
      await eventually(() => hold.held() === 1, "the first delivery to be held");
      for (let n = 2; n <= 20; n++) await post("restart", "rs-user", `queued ${n}`);
      // A deploy or crash: the guild's memory is gone (eviction would wait for the held RPC).
      await runInDurableObject(guildStub("restart"), (_guild, state) => state.abort("restart")).then(
        () => expect.fail("abort returns"),
        (error: unknown) => expect(String(error)).toContain("restart"),
      );
      hold.release();
      await client.waitFor(() => client.messageSeqs().length === 1, "the held message");
      // Nothing else is posted: the guild's alarm wakes it, and it resends what it had not handed over.
      expect(await runDurableObjectAlarm(guildStub("restart"))).toBe(true);
      await client.waitFor(() => client.messageSeqs().length === 20, "the queued messages");
      expect(client.messageSeqs()).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    } finally {
      hold.restore();
    }
  });

  it("refuse a non-member or an author over their rate at once while the guild makes posters wait, and deliver every post it took", async () => {
    for (const user of ["busy-a", "busy-b", "busy-c"]) await addMember("busy", user);
    const client = await TestClient.connect();
    await client.identify("busy-a");
    const hold = await holdDeliveries("in flight");
    try {
      await post("busy", "busy-a", "in flight");
      await eventually(() => hold.held() === 1, "the first delivery to be held");
      // More than admission lets queue for one session (twice FANOUT_MAX_BACKLOG, 64), from two
      // authors so neither reaches their rate: the later posts wait.
      const statuses: number[] = [];
      const posting = (as: string, count: number) =>
        Array.from({ length: count }, (_, i) => api("POST", "/api/guilds/busy/messages", as, { content: `${as} ${i}` }).then((r) => statuses.push(r.status)));
      const waiting = [...posting("busy-a", 39), ...posting("busy-b", 40)];
      await scheduler.wait(300);
      expect(statuses.length).toBeLessThan(79); // some are waiting for admission

      const outsider = await api("POST", "/api/guilds/busy/messages", "busy-outsider", { content: "let me in" });
      expect(outsider.status).toBe(403);
      // Past the burst of 50, busy-c is told at once, with when to try again.
      const burst = posting("busy-c", 100);
      await eventually(() => statuses.includes(429), "a 429 while the guild is still full");
      const limited = await api("POST", "/api/guilds/busy/messages", "busy-c", { content: "too fast" });
      expect(limited.status).toBe(429);
      expect(Number(limited.headers.get("Retry-After"))).toBeGreaterThanOrEqual(1);
      expect(hold.held()).toBe(1); // all of that while the fanout was still full

      hold.release();
      await Promise.all([...waiting, ...burst]);
      const accepted = 1 + statuses.filter((status) => status === 201).length;
      expect(statuses.filter((status) => status !== 201 && status !== 429)).toEqual([]);
      await client.waitFor(() => client.messageSeqs().length === accepted, "every accepted post");
      expect(client.messageSeqs()).toEqual(Array.from({ length: accepted }, (_, i) => i + 1));
    } finally {
      hold.restore();
    }
  });

  it("refuse posts past 1,000 waiting for admission with 429, and deliver every post they took", async () => {
    const authors = Array.from({ length: 24 }, (_, i) => `crowd-${i}`);
    for (const user of authors) await addMember("crowd", user);
    const client = await TestClient.connect();
    await client.identify("crowd-0");
    const hold = await holdDeliveries("crowd-0 first");
    try {
      await post("crowd", "crowd-0", "crowd-0 first");
      await eventually(() => hold.held() === 1, "the first delivery to be held");
      // 1,080 posts (45 from each author: within everyone's rate) while the fanout is stuck: about
      // 64 are admitted, 1,000 wait, and the rest are refused rather than held in memory too.
      const settled: Response[] = [];
      const all = authors.flatMap((as) =>
        Array.from({ length: 45 }, (_, i) => api("POST", "/api/guilds/crowd/messages", as, { content: `${as} ${i}` }).then((r) => (settled.push(r), r))),
      );
      await eventually(async () => settled.some((r) => r.status === 429), "a refusal while posts wait", 20_000);
      expect(hold.held()).toBe(1); // refused while the fanout was still stuck
      const refused = settled.find((r) => r.status === 429)!;
      expect(((await refused.json()) as { error: { code: string } }).error.code).toBe("rate_limited");
      expect(Number(refused.headers.get("Retry-After"))).toBeGreaterThanOrEqual(1);
      hold.release();
      const answers = await Promise.all(all);
      expect(answers.filter((r) => r.status !== 201 && r.status !== 429)).toEqual([]);
      const accepted = 1 + answers.filter((r) => r.status === 201).length;
      expect(accepted).toBeLessThanOrEqual(1 + 64 + 1000); // the first, at most twice the bound admitted, 1,000 waiting
      expect(accepted).toBeGreaterThanOrEqual(1 + 1000); // and no fewer than 1,000 may wait
      await client.waitFor(() => client.messageSeqs().length === accepted, "every accepted post", 30_000);
      expect(client.messageSeqs()).toEqual(Array.from({ length: accepted }, (_, i) => i + 1));
    } finally {
      hold.restore();
    }
  }, 60_000);

  it("take a retried post with the same Idempotency-Key once: the retry gets the first post's message, stored or still waiting", async () => {
    for (const user of ["idem-a", "idem-b"]) await addMember("idem", user);
    const client = await TestClient.connect();
    await client.identify("idem-a");
    const postWithKey = (as: string, content: string, key: string) => api("POST", "/api/guilds/idem/messages", as, { content }, { "Idempotency-Key": key });
    const first = await postWithKey("idem-a", "hello", "key-1");
    expect(first.status).toBe(201);
    const message = (await first.json()) as { seq: number; id: string };
    const retry = await postWithKey("idem-a", "hello", "key-1");
    expect(retry.status).toBe(201);
    expect(await retry.json()).toEqual(message);
    // Keys are per author; the same key with other content is refused; a bad key is named.
    expect(((await (await postWithKey("idem-b", "hello", "key-1")).json()) as { seq: number }).seq).toBe(message.seq + 1);
    const reused = await postWithKey("idem-a", "something else", "key-1");
    expect(reused.status).toBe(422);
    expect(((await reused.json()) as { error: { code: string } }).error.code).toBe("idempotency_key_reused");
    const bad = await postWithKey("idem-a", "hello", "not a key!");
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { code: string } }).error.code).toBe("invalid_idempotency_key");

    // A retry that arrives while the first post still waits for admission waits for the same answer.
    const hold = await holdDeliveries("idem-a filler");
    try {
      await post("idem", "idem-a", "idem-a filler 0");
      await eventually(() => hold.held() === 1, "a delivery held");
      // Fill the backlog (twice FANOUT_MAX_BACKLOG for one session) so the next post waits.
      let fillersTaken = 0;
      const fillers = Array.from({ length: 40 }, (_, i) =>
        api("POST", "/api/guilds/idem/messages", "idem-b", { content: `idem-a filler ${i + 1}` }).then((r) => (fillersTaken++, r)),
      );
      await eventually(() => fillersTaken >= 30, "the fillers taken up to the bound (the rest wait)");
      let firstAnswered = false;
      let arrived = 0;
      const restoreCreate = await patchMethod(guildStub("idem"), "createMessage", (_self, original, args) => {
        if (JSON.stringify(args[0]).includes('"key-2"')) arrived++;
        return original(...args);
      });
      let waiting: Promise<Response>;
      let retried: Promise<Response>;
      try {
        waiting = postWithKey("idem-a", "said once", "key-2").then((r) => ((firstAnswered = true), r));
        await eventually(() => arrived === 1, "the first post at the guild");
        retried = postWithKey("idem-a", "said once", "key-2");
        await eventually(() => arrived === 2, "its retry at the guild");
      } finally {
        restoreCreate();
      }
      expect(firstAnswered, "the first post still waits when its retry arrives").toBe(false);
      hold.release();
      const [a, b] = await Promise.all([waiting, retried]);
      await Promise.all(fillers);
      expect([a.status, b.status]).toEqual([201, 201]);
      expect(await b.json()).toEqual(await a.json());
    } finally {
      hold.restore();
    }
    const history = (await (await api("GET", "/api/guilds/idem/messages?after=0&limit=100", "idem-a")).json()) as { content: string }[];
    expect(history.filter((m) => m.content === "hello")).toHaveLength(2); // idem-a's and idem-b's
    expect(history.filter((m) => m.content === "said once")).toHaveLength(1);
    await client.waitFor(() => client.messageSeqs().length === history.length, "every message once");
    expect(client.messageSeqs()).toEqual(history.map((_, i) => i + 1));
  });

  it("fill a gap in a guild's seq by pulling the missing events, in order", async () => {
    await addMember("gap", "gap-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("gap-user");
    // Lose the session's subscription in the guild's memory only, as a guild restart would lose
    // what was queued; the messages are still in the log.
    const target = await runInDurableObject(guildStub("gap"), (guild: Guild) => {
      const fanout = (guild as unknown as { sessions: { remove(id: string): { target: string } | undefined } }).sessions;
      return fanout.remove(sessionId)!.target;
    });
    await post("gap", "gap-user", "missed 1");
    await post("gap", "gap-user", "missed 2");
    await runInDurableObject(guildStub("gap"), (guild: Guild) => {
      (guild as unknown as { sessions: { add(s: string, u: string, t: string): void } }).sessions.add(sessionId, "gap-user", target);
    });
    await post("gap", "gap-user", "delivered");
    await client.waitFor(() => client.messageSeqs().length === 3, "all three messages");
    expect(client.messageSeqs()).toEqual([1, 2, 3]);
    expect(client.dispatches().map((f) => f.s)).toEqual([1, 2, 3, 4]);
  });
});

describe("gap fills that fail or come back short", () => {
  /** Takes the session out of the guild's fanout while `messages` are posted, then puts it back: the guild's log has them, the session does not. */
  const missMessages = async (guildId: string, sessionId: string, userId: string, messages: string[]) => {
    const target = await runInDurableObject(guildStub(guildId), (guild: Guild) =>
      (guild as unknown as { sessions: { remove(id: string): { target: string } } }).sessions.remove(sessionId).target,
    );
    for (const content of messages) await post(guildId, userId, content);
    return () =>
      runInDurableObject(guildStub(guildId), (guild: Guild) => {
        (guild as unknown as { sessions: { add(s: string, u: string, t: string): void } }).sessions.add(sessionId, userId, target);
      });
  };
  const eventsOf = async (guildId: string, userId: string) => {
    const history = await (await api("GET", `/api/guilds/${guildId}/messages`, userId)).json<{ seq: number }[]>();
    return (seq: number) => ({ type: "MESSAGE_CREATE" as const, seq, data: JSON.stringify(history.find((m) => m.seq === seq)) });
  };

  it("a RESUME after a delivery whose gap fill failed part-way still has the event dispatched before the gap", async () => {
    const guildId = "gap-fails";
    const { client, sessionId } = await sessionAfterFirstMessage(guildId, "gf-user");
    const putBack = await missMessages(guildId, sessionId, "gf-user", ["m2", "m3", "m4"]);
    await putBack();
    const event = await eventsOf(guildId, "gf-user");
    // [2, 4] with 3 missing: 2 is dispatched, then pulling 3 fails (the guild restarting, say).
    const restore = await patchMethod(guildStub(guildId), "eventsAfter", async () => {
      throw new Error("guild restarting");
    });
    try {
      const outcome = await sessionStub(sessionId)
        .deliver({ guildId, events: [event(2), event(4)] })
        .then(() => "delivered", (error: unknown) => `failed: ${String(error)}`);
      expect(outcome).toContain("guild restarting");
    } finally {
      restore();
    }
    // The client drops before the guild retries; it RESUMEs from the last dispatch it saw.
    await client.waitFor(() => client.messageSeqs().length === 2, "m2, sent despite the failure");
    const lastS = client.dispatches().at(-1)!.s!;
    client.ws.close(4000, "network dropped");
    const resumed = await TestClient.connect();
    await resumed.resume("gf-user", sessionId, lastS);
    await resumed.waitFor(() => resumed.messageSeqs().length === 2, "m3 and m4 after the RESUME");
    expect([...client.messageSeqs(), ...resumed.messageSeqs()]).toEqual([1, 2, 3, 4]);
    const s = [...client.dispatches(), ...resumed.dispatches()].map((f) => f.s);
    expect(s).toEqual(Array.from({ length: s.length }, (_, i) => i + 1));
  });

  it("an event after a gap the guild will not fill (it no longer lists the session) is left out, not dispatched past the gap", async () => {
    const guildId = "gap-short";
    const { client, sessionId } = await sessionAfterFirstMessage(guildId, "gs-user");
    await missMessages(guildId, sessionId, "gs-user", ["m2", "m3"]);
    const event = await eventsOf(guildId, "gs-user");
    await guildStub(guildId).unsubscribe(sessionId);
    // A late delivery of 3 alone, from a fanout that had not heard.
    await sessionStub(sessionId).deliver({ guildId, events: [event(3)] });
    await post(guildId, "gs-user", "m4"); // reaches no one: the session is unsubscribed
    await eventually(
      () => runInDurableObject(guildStub(guildId), (guild: Guild) => (guild as unknown as { sessions: { drained: boolean } }).sessions.drained),
      "the guild's fanout to have nothing queued or in flight",
    );
    await heartbeatAnswered(client); // whatever the session sent before now has arrived
    expect(client.messageSeqs()).toEqual([1]);
  });
});

describe("a large coalesced delivery", () => {
  it("dispatches every event of a 150-event batch, in order (more rows than one SQL statement binds)", async () => {
    await addMember("big-batch", "bb-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("bb-user");
    const message = (seq: number) => ({ id: `m${seq}`, guild_id: "big-batch", author_id: "bb-user", content: `c${seq}`, seq, timestamp: "2026-11-21T00:00:00.000Z" });
    const events = Array.from({ length: 150 }, (_, i) => ({ type: "MESSAGE_CREATE" as const, seq: i + 1, data: JSON.stringify(message(i + 1)) }));
    await sessionStub(sessionId).deliver({ guildId: "big-batch", events });
    await client.waitFor(() => client.messageSeqs().length === 150, "150 messages");
    expect(client.messageSeqs()).toEqual(events.map((e) => e.seq));
    expect(client.dispatches().map((f) => f.s)).toEqual(Array.from({ length: 151 }, (_, i) => i + 1));
  });
});

describe("a resume buffer larger than one RPC may carry (workerd: 32 MiB)", () => {
  it("is handed over in pages: a RESUME replays all of it in order, and so does one through the pointer where the session started", async () => {
    const guildId = "big-resume";
    const AUTHORS = 40;
    const EACH = 38; // 1,520 posts, each author inside its burst allowance
    for (let a = 0; a < AUTHORS; a++) await addMember(guildId, `br-w${a}`);
    const sessionId = await droppedSession(guildId, "br-reader"); // READY, then m1: resumable from seq 2
    const content = "\u0001".repeat(4000); // the longest content there is: 24,000 characters once JSON-escaped
    for (let round = 0; round < EACH; round++) {
      const posted = await Promise.all(Array.from({ length: AUTHORS }, (_, a) => api("POST", `/api/guilds/${guildId}/messages`, `br-w${a}`, { content })));
      expect(posted.map((r) => r.status)).toEqual(posted.map(() => 201));
    }
    const total = AUTHORS * EACH;
    const resumed = async () => {
      const client = await TestClient.connect();
      await client.waitFor(() => client.frames.find((f) => f.op === 10), "HELLO");
      client.send({ op: 6, d: { token: await token("br-reader"), session_id: sessionId, seq: 2 } });
      await client.waitFor(() => client.dispatches("RESUMED")[0] ?? client.closed, "RESUMED", 30_000);
      return client;
    };

    const first = await resumed();
    const replayed = first.dispatches();
    expect(replayed.reduce((bytes, f) => bytes + JSON.stringify(f).length, 0)).toBeGreaterThan(32 * 1024 * 1024);
    expect(replayed.map((f) => f.s)).toEqual(Array.from({ length: total + 1 }, (_, i) => i + 3));
    expect(first.messageSeqs(guildId)).toEqual(Array.from({ length: total }, (_, i) => i + 2));
    expect(replayed.at(-1)?.t).toBe("RESUMED");

    // From seq 2 again, on another connection: through the pointer, from the object that holds it now.
    const second = await resumed();
    await first.waitFor(() => first.closed, "the first connection closed");
    expect(first.closed?.code).toBe(4000);
    expect(second.dispatches().slice(0, -1)).toEqual(replayed);
    expect(second.dispatches().at(-1)).toMatchObject({ t: "RESUMED", s: total + 4 });
  }, 60_000);
});

describe("fanout", () => {
  it("is not stalled or failed by a session object that throws; the broken one is dropped", async () => {
    const guildId = "throwing";
    const users = ["t1", "t2", "t3"];
    for (const user of users) await addMember(guildId, user);
    const clients = await Promise.all(users.map(() => TestClient.connect()));
    const sessionIds = await Promise.all(clients.map((client, i) => client.identify(users[i]!)));

    // Make the second session's object fail every delivery RPC.
    await runInDurableObject(sessionStub(sessionIds[1]!), (session: Session) => {
      (session as unknown as { deliver: () => Promise<void> }).deliver = async () => {
        throw new Error("session exploded during fanout");
      };
    });

    for (let i = 0; i < 5; i++) {
      const response = await api("POST", `/api/guilds/${guildId}/messages`, "t1", { content: `m${i}` });
      expect(response.status).toBe(201);
    }
    for (const i of [0, 2]) {
      await clients[i]!.waitFor(() => clients[i]!.messageSeqs().length === 5, `client ${i} gets all five`);
      expect(clients[i]!.messageSeqs()).toEqual([1, 2, 3, 4, 5]);
    }
    // Retries back off (50, 200, 800 ms) and then the subscription is dropped.
    const subscribed = async () =>
      runInDurableObject(guildStub(guildId), (guild: Guild) =>
        (guild as unknown as { ctx: DurableObjectState }).ctx.storage.sql
          .exec<{ session_id: string }>("SELECT session_id FROM subscriptions")
          .toArray()
          .map((r) => r.session_id),
      );
    const deadline = Date.now() + 5000;
    while ((await subscribed()).includes(sessionIds[1]!) && Date.now() < deadline) await scheduler.wait(50);
    expect((await subscribed()).sort()).toEqual([sessionIds[0]!, sessionIds[2]!].sort());
    expect(clients[1]!.messageSeqs()).toEqual([]);

    const timings = await (await api("GET", `/api/guilds/${guildId}/timings`, "admin")).json<{ minutes: { actions: Record<string, { count: number }> }[] }>();
    const created = timings.minutes.reduce((n, m) => n + (m.actions.message_create?.count ?? 0), 0);
    expect(created).toBe(5);
  });
});

describe("fanout to sessions that fail or have ended", () => {
  const fanoutSessions = async (guildId: string) => (await guildStub(guildId).fanoutState()).sessions;

  it("a session dropped after its deliveries kept failing is told, subscribes again and misses nothing", async () => {
    const guildId = "flaky-session";
    for (const user of ["fl-ok", "fl-victim"]) await addMember(guildId, user);
    const ok = await TestClient.connect();
    await ok.identify("fl-ok");
    const victim = await TestClient.connect();
    const victimId = await victim.identify("fl-victim");
    let failures = 0;
    const restore = await patchMethod<{ ctx: DurableObjectState }>(sessionStub(victimId), "deliver", (self, original, args) => {
      // Its first 4 delivery attempts fail: the guild's retries (50, 200, 800 ms) run out.
      if (self.ctx.id.toString() === victimId && failures < 4) throw new Error(`session overloaded (${++failures})`);
      return original(...args);
    });
    try {
      await post(guildId, "fl-ok", "while it fails");
      await ok.waitFor(() => ok.messageSeqs().length === 1, "first message");
      await eventually(async () => (await fanoutSessions(guildId)) === 1, "the victim dropped");
      // Told a second later (and again later if that fails), it subscribes again and pulls what it missed.
      await victim.waitFor(() => victim.messageSeqs().length === 1, "the missed message", 12_000);
    } finally {
      restore();
    }
    expect(await fanoutSessions(guildId)).toBe(2);
    await post(guildId, "fl-ok", "after");
    await victim.waitFor(() => victim.messageSeqs().length === 2, "the next message");
    expect(victim.messageSeqs()).toEqual([1, 2]);
    expect(victim.closed).toBeNull();
  }, 20_000);

  it("a session dropped just before its guild restarts is still told, once the guild is back", async () => {
    const guildId = "drop-then-restart";
    const { client, sessionId } = await sessionAfterFirstMessage(guildId, "dr-user");
    const restore = await patchMethod(sessionStub(sessionId), "deliver", async () => {
      throw new Error("session overloaded");
    });
    try {
      await post(guildId, "dr-user", "m2");
      await eventually(async () => (await fanoutSessions(guildId)) === 0, "the guild dropping the session");
    } finally {
      restore();
    }
    // A deploy or crash before the notice went out (it waits a second first).
    await runInDurableObject(guildStub(guildId), (_guild, state) => state.abort("restart")).catch(() => undefined);
    await post(guildId, "dr-user", "m3"); // wakes the guild, which still owes the notice
    await client.waitFor(() => client.messageSeqs().length === 3, "m2 and m3, once told", 8000);
    expect(client.messageSeqs()).toEqual([1, 2, 3]);
  });

  it("a session that cannot be told of a guild joined at first is told again, and still hears of later changes", async () => {
    await addMember("notify-home", "nt-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("nt-user");
    let failures = 0;
    const restore = await patchMethod(sessionStub(sessionId), "guildAdded", (_self, original, args) => {
      if (failures++ === 0) throw new Error("session overloaded");
      return original(...args);
    });
    try {
      await addMember("notify-b", "nt-user"); // the first GUILD_CREATE attempt fails
      expect(failures).toBe(1);
      await client.waitFor(() => client.dispatches("GUILD_CREATE").length === 1, "GUILD_CREATE, on a retry", 5000);
    } finally {
      restore();
    }
    await addMember("notify-c", "nt-user");
    await client.waitFor(() => client.dispatches("GUILD_CREATE").length === 2, "the next GUILD_CREATE");
    expect(client.dispatches("GUILD_CREATE").map((f) => (f.d as { id: string }).id)).toEqual(["notify-b", "notify-c"]);
    expect(await userSessions("nt-user")).toEqual([sessionId]);
    await post("notify-b", "nt-user", "in b");
    await client.waitFor(() => client.messageSeqs("notify-b").length === 1, "a message in the guild joined");
  });

  it("a membership change that could not reach a session survives the user directory restarting, and one unreachable for long is forgotten", async () => {
    const userStub = env.USER.get(env.USER.idFromName("pn-user"));
    const { client, sessionId } = await sessionAfterFirstMessage("pending-home", "pn-user");
    let reachable = false;
    const restore = await patchMethod(sessionStub(sessionId), "guildAdded", (_self, original, args) => {
      if (!reachable) throw new Error("session overloaded");
      return original(...args);
    });
    try {
      await addMember("pending-a", "pn-user");
      await runInDurableObject(userStub, (_user, state) => state.abort("restart")).catch(() => undefined);
      reachable = true;
      await client.waitFor(() => client.dispatches("GUILD_CREATE").length === 1, "GUILD_CREATE from the restarted directory's alarm", 8000);

      reachable = false;
      await addMember("pending-b", "pn-user");
      // Unreachable past the time it is given: forgotten by the directory (it most likely ended).
      await runInDurableObject(env.USER.get(env.USER.idFromName("pn-user")), (_user, state) => void state.storage.sql.exec("UPDATE pending_notices SET owed_since = 0"));
      await runDurableObjectAlarm(env.USER.get(env.USER.idFromName("pn-user")));
      expect(await userSessions("pn-user")).toEqual([]);
    } finally {
      restore();
    }
  });

  it("a change owed to an unreachable session keeps its retry when more changes come, and one everyone heard leaves no alarm", async () => {
    const directory = () => env.USER.get(env.USER.idFromName("ar-user"));
    const alarm = () => runInDurableObject(directory(), (_user, state) => state.storage.getAlarm());
    const { client, sessionId } = await sessionAfterFirstMessage("alarm-home", "ar-user");
    await addMember("alarm-told", "ar-user");
    await client.waitFor(() => client.dispatches("GUILD_CREATE")[0], "GUILD_CREATE");
    expect(await alarm()).toBeNull(); // every session told: no wake-up
    const restore = await patchMethod(sessionStub(sessionId), "guildAdded", () => Promise.reject(new Error("session overloaded")));
    try {
      await addMember("alarm-a", "ar-user");
      const retry = await alarm();
      expect(retry).not.toBeNull();
      await scheduler.wait(20);
      await addMember("alarm-b", "ar-user"); // a later change must not push the owed one's retry back
      expect(await alarm()).toBe(retry);
    } finally {
      restore();
    }
    expect(await runDurableObjectAlarm(directory())).toBe(true);
    await client.waitFor(() => client.dispatches("GUILD_CREATE").length === 3, "both owed GUILD_CREATEs");
  });

  it("a session that never heard of its removal gets the guild back when re-added, and the removal's late retry does not undo it", async () => {
    const guildId = "readded";
    const { client, sessionId } = await sessionAfterFirstMessage(guildId, "rd-user");
    const restore = await patchMethod(sessionStub(sessionId), "guildRemoved", async () => {
      throw new Error("session overloaded");
    });
    try {
      await api("DELETE", `/api/guilds/${guildId}/members/rd-user`, "admin"); // the guild stops delivering; the session is not told
      await addMember(guildId, "rd-user");
    } finally {
      restore();
    }
    await post(guildId, "rd-user", "m2");
    await client.waitFor(() => client.messageSeqs().length === 2, "m2, once re-added");
    // The user directory's retries, now: the addition superseded the removal's notice, so none is sent.
    await runDurableObjectAlarm(env.USER.get(env.USER.idFromName("rd-user")));
    await heartbeatAnswered(client);
    expect(client.dispatches("GUILD_DELETE")).toEqual([]);
    await post(guildId, "rd-user", "m3");
    await client.waitFor(() => client.messageSeqs().length === 3, "m3");
    expect(client.messageSeqs()).toEqual([1, 2, 3]);
  });

  it("a session that ended but could not unsubscribe is forgotten by the guild and the user directory when it answers that it has ended", async () => {
    const guildId = "ended-session";
    await addMember(guildId, "end-user");
    const client = await TestClient.connect();
    await client.identify("end-user");
    const failed: string[] = [];
    const restoreGuild = await patchMethod(guildStub(guildId), "unsubscribe", () => (failed.push("unsubscribe"), Promise.reject(new Error("guild unreachable"))));
    const user = env.USER.get(env.USER.idFromName("end-user"));
    const restoreUser = await patchMethod(user, "detachSession", () => (failed.push("detach"), Promise.reject(new Error("directory unreachable"))));
    try {
      client.ws.close(1000, "bye");
      await eventually(() => failed.length === 2, "the session's unsubscribe and detach");
    } finally {
      restoreGuild();
      restoreUser();
    }
    expect(await fanoutSessions(guildId)).toBe(1); // still subscribed: the unsubscribe failed
    await post(guildId, "end-user", "to nobody");
    await eventually(async () => (await fanoutSessions(guildId)) === 0, "the guild forgetting the ended session");
    await addMember("ended-session-2", "end-user"); // the directory tells its sessions, and hears back
    expect(await userSessions("end-user")).toEqual([]);
  });

  it("a session handed over to an object that never took it over (its answer lost) is forgotten, not delivered to for ever", async () => {
    const guildId = "zombie-origin";
    await addMember(guildId, "zombie-user");
    const first = await TestClient.connect();
    const sessionId = await first.identify("zombie-user");
    // The origin hands the session over, but the answer never reaches the object the client
    // resumed on (the RPC's connection is lost, or a deploy resets that object): it closes 4000.
    const restore = await patchMethod(sessionStub(sessionId), "takeOver", async (_self, original, args) => {
      await original(...args);
      throw new Error("Network connection lost.");
    });
    const second = await closedResume("zombie-user", sessionId, 1).finally(restore);
    expect(second.closed!.code).toBe(4000);
    expect(second.frames.map((f) => f.op)).toEqual([10, 7]); // RECONNECT: resume again
    expect(await sessionStatus(sessionId)).toBe("moved"); // to an object that holds nothing
    // Resumed again, as 4000 tells the client to: the session is nowhere now, so op 9.
    const again = await TestClient.connect();
    await again.waitFor(() => again.frames.find((f) => f.op === 10), "HELLO");
    again.send({ op: 6, d: { token: await token("zombie-user"), session_id: sessionId, seq: 1 } });
    await again.waitFor(() => again.frames.find((f) => f.op === 9), "INVALID_SESSION");
    // The client starts over, as op 9 tells it to, and later leaves for good.
    const third = await TestClient.connect();
    await third.identify("zombie-user");
    third.ws.close(1000, "bye");
    // No one holds the first session any more: the guild must stop delivering to it.
    await post(guildId, "zombie-user", "to whom?");
    await eventually(async () => (await fanoutSessions(guildId)) === 0, "the guild forgetting the session no one holds");
    await addMember("zombie-origin-2", "zombie-user"); // the directory tells its sessions, and hears back
    expect(await userSessions("zombie-user")).toEqual([]);
  });

  it("a membership change reaches a session of an older version (guildAdded answered nothing, as before 9a5867e) without failing", async () => {
    await addMember("old-version-a", "old-version-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("old-version-user");
    // During a gradual deployment this session object still runs the first release's code.
    const restore = await patchMethod(sessionStub(sessionId), "guildAdded", async (_self, original, args) => {
      await original(...args);
      return undefined;
    });
    let status: number;
    try {
      status = (await api("PUT", "/api/guilds/old-version-b/members/old-version-user", "admin")).status;
    } finally {
      restore();
    }
    expect(status).toBe(201);
    await client.waitFor(() => client.dispatches("GUILD_CREATE")[0], "GUILD_CREATE");
    expect(await userSessions("old-version-user")).toEqual([sessionId]);
  });
});

describe("an ended session's storage", () => {
  /** What the session's object has stored: its tables, and whether an alarm is set. */
  const storedBy = (sessionId: string) =>
    runInDurableObject(sessionStub(sessionId), async (_session, state) => ({
      tables: state.storage.sql.exec<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_%' ESCAPE '\\'").toArray().map((row) => row.name),
      alarm: await state.storage.getAlarm(),
    }));

  it("is gone even if the object is reset while the session leaves its guilds", async () => {
    const { client, sessionId } = await sessionAfterFirstMessage("end-reset", "er-user");
    expect((await storedBy(sessionId)).tables.sort()).toEqual(["dispatch_runs", "guilds", "state"]);
    let unsubscribing = 0;
    const restore = await patchMethod(guildStub("end-reset"), "unsubscribe", () => (unsubscribing++, new Promise(() => undefined))); // a slow guild
    try {
      client.ws.close(1000, "bye");
      await eventually(() => unsubscribing === 1, "the session to be leaving its guild");
      await runInDurableObject(sessionStub(sessionId), (_session, state) => state.abort("deploy")).catch(() => undefined);
    } finally {
      restore();
    }
    expect(await storedBy(sessionId)).toEqual({ tables: [], alarm: null });
  });

  /** A session (READY, one message) dropped and resumed on a new connection, its holder now. */
  async function resumedElsewhere(guildId: string, userId: string): Promise<{ sessionId: string; holder: TestClient }> {
    const sessionId = await droppedSession(guildId, userId);
    const holder = await TestClient.connect();
    await holder.resume(userId, sessionId, 2);
    expect(await sessionStatus(sessionId)).toBe("moved");
    return { sessionId, holder };
  }

  it("is gone where the session started too, once it was resumed elsewhere and its last holder's word was lost", async () => {
    const { sessionId, holder } = await resumedElsewhere("end-moved", "em-user");
    // While the holder holds it, the pointer stays (later resumes find the session through it) and asks again later.
    expect(await runDurableObjectAlarm(sessionStub(sessionId))).toBe(true);
    expect(await sessionStatus(sessionId)).toBe("moved");
    expect((await storedBy(sessionId)).alarm).toBeGreaterThan(Date.now() + 30 * 60_000);
    // The holder ends the session, and the "release" to the first object is lost (a reset, say).
    let releasing = 0;
    const lost = await patchMethod(sessionStub(sessionId), "release", () => (releasing++, Promise.reject(new Error("Network connection lost."))));
    try {
      holder.ws.close(1000, "bye");
      await eventually(() => releasing === 1, "the holder to tell the first object");
    } finally {
      lost();
    }
    expect(await sessionStatus(sessionId)).toBe("moved");
    // Its alarm asks the holder, which holds nothing: the pointer and its storage go.
    expect(await runDurableObjectAlarm(sessionStub(sessionId))).toBe(true);
    expect(await storedBy(sessionId)).toEqual({ tables: [], alarm: null });
  });

  it("where a session started, stays while the session is held, through two RESUMEs at once of a session resumed before", async () => {
    const { sessionId, holder } = await resumedElsewhere("moved-race", "mr-user");
    holder.ws.close(4000, "network dropped again");
    // The client retries on two connections at once; they race through the first object. The
    // holder's hand-off to the first is slow to come back: the second arrives meanwhile (if it may).
    let handOffs = 0;
    let secondCame!: () => void;
    const second = new Promise<void>((resolve) => (secondCame = resolve));
    const slow = await patchMethod(sessionStub(sessionId), "handOff", async (_self, original, args) => {
      const n = ++handOffs;
      if (n === 2) secondCame();
      const answer = await original(...args);
      if (n === 1) await Promise.race([second, scheduler.wait(500)]);
      return answer;
    });
    const racers = [await TestClient.connect(), await TestClient.connect()];
    const outcome = (racer: TestClient) => (racer.dispatches("RESUMED").length > 0 ? "resumed" : racer.frames.some((f) => f.op === 9) ? "op 9" : racer.closed ? `closed ${racer.closed.code}` : undefined);
    try {
      for (const racer of racers) await racer.waitFor(() => racer.frames.find((f) => f.op === 10), "HELLO");
      const resumeToken = await token("mr-user");
      for (const racer of racers) {
        racer.send({ op: 6, d: { token: resumeToken, session_id: sessionId, seq: 3 } });
        await eventually(() => handOffs > 0, "the first hand-off");
      }
      await eventually(() => racers.every((racer) => outcome(racer)), "both answers");
    } finally {
      slow();
    }
    expect(racers.map(outcome)).toContain("resumed");
    // However it went, the session is still where the pointer says: the next RESUME finds it.
    for (const racer of racers) racer.ws.close(4000, "dropped");
    await eventually(async () => (await sessionStatus(sessionId)) === "moved", "the pointer");
    const last = await TestClient.connect();
    await last.resume("mr-user", sessionId, 3);
    expect(last.closed).toBeNull();
  });

  it("is not made again by late calls to the object: an expired RESUME, a delivery, the user directory asking", async () => {
    const { client, sessionId } = await sessionAfterFirstMessage("end-late", "el-user");
    client.ws.close(1000, "bye");
    await eventually(async () => (await storedBy(sessionId)).tables.length === 0, "the session's storage to be deleted");
    await evictDurableObject(sessionStub(sessionId));
    const late = await TestClient.connect();
    await late.waitFor(() => late.frames.find((f) => f.op === 10), "HELLO");
    late.send({ op: 6, d: { token: await token("el-user"), session_id: sessionId, seq: 2 } });
    await late.waitFor(() => late.frames.find((f) => f.op === 9), "op 9");
    const event = { type: "MESSAGE_CREATE" as const, seq: 2, data: "{}" };
    expect(await sessionStub(sessionId).deliver({ guildId: "end-late", events: [event] })).toEqual({ gone: true });
    expect(await sessionStub(sessionId).isHeld()).toBe(false);
    expect(await storedBy(sessionId)).toEqual({ tables: [], alarm: null });
  });
});

describe("a reset between numbering a dispatch and storing it", () => {
  it("leaves no hole in s: the state row never records a number the resume buffer does not hold", async () => {
    const { client, sessionId } = await sessionAfterFirstMessage("s-hole", "sh-user"); // READY 1, MESSAGE_CREATE 2
    await runInDurableObject(sessionStub(sessionId), (session: Session) => {
      const internals = session as unknown as { queueDispatch(t: string, data: string): void; setState(patch: object): void };
      internals.queueDispatch("MESSAGE_CREATE", "{}"); // numbered 3, not yet stored (as a delivery waiting on a gap fill)
      internals.setState({}); // the state row written meanwhile (the alarm retrying an owed guild)
    });
    await evictDurableObject(sessionStub(sessionId), { webSockets: "hibernate" }); // number 3 is lost with the memory
    await post("s-hole", "sh-user", "m2");
    await client.waitFor(() => client.messageSeqs().length === 2, "m2");
    expect(client.dispatches().map((f) => f.s)).toEqual([1, 2, 3]);
  });
});

describe("a membership change whose telling was cut off", () => {
  it("reaches the user's live sessions from the user directory's alarm after a reset while telling them; the guild's retry tells no one again", async () => {
    await addMember("cut-off-home", "co-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("co-user");
    const userDirectory = () => env.USER.get(env.USER.idFromName("co-user")); // a stub is broken once its object was reset
    let told = 0;
    const hang = await patchMethod(sessionStub(sessionId), "guildAdded", () => (told++, new Promise(() => undefined)));
    try {
      const first = api("PUT", "/api/guilds/cut-off/members/co-user", "admin");
      await eventually(() => told === 1, "the user directory to be telling the session");
      await runInDurableObject(userDirectory(), (_user, state) => state.abort("deploy")).catch(() => undefined);
      expect((await first).status).toBe(500); // the guild's call failed with the reset
    } finally {
      hang();
    }
    expect(client.dispatches("GUILD_CREATE")).toEqual([]);
    // What the reset cut off was owed, with an alarm, before anyone was told.
    expect(await runDurableObjectAlarm(userDirectory())).toBe(true);
    await client.waitFor(() => client.dispatches("GUILD_CREATE")[0], "GUILD_CREATE");
    // The admin's (or the guild's) retry finds the change made: no session is told again.
    const count = await patchMethod(sessionStub(sessionId), "guildAdded", (_self, original, args) => (told++, original(...args)));
    try {
      expect((await api("PUT", "/api/guilds/cut-off/members/co-user", "admin")).status).toBe(200);
    } finally {
      count();
    }
    expect(told).toBe(1);
    await post("cut-off", "co-user", "m1");
    await client.waitFor(() => client.messageSeqs("cut-off").length === 1, "m1");
    expect(client.dispatches().map((f) => f.t)).toEqual(["READY", "GUILD_CREATE", "MESSAGE_CREATE"]);
  });
});

describe("made-up guild ids", () => {
  it("are answered 404 and leave no storage behind, until a first member creates the guild", async () => {
    const tables = (guildId: string) =>
      runInDurableObject(guildStub(guildId), (_guild, state) =>
        state.storage.sql.exec<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'table'").toArray().map((r) => r.name),
      );
    await addMember("made-up-home", "mu-user"); // a real user, with a valid token
    expect((await api("GET", "/api/guilds/made-up-1/messages", "mu-user")).status).toBe(404);
    expect((await api("POST", "/api/guilds/made-up-1/messages", "mu-user", { content: "anyone?" })).status).toBe(404);
    expect((await api("GET", "/api/guilds/made-up-1/timings", "admin")).status).toBe(404);
    expect((await api("DELETE", "/api/guilds/made-up-1/members/mu-user", "admin")).status).toBe(404);
    expect(await tables("made-up-1")).toEqual([]);
    await addMember("made-up-1", "mu-user");
    expect(await tables("made-up-1")).toEqual(expect.arrayContaining(["meta", "members", "messages", "subscriptions"]));
    expect((await api("POST", "/api/guilds/made-up-1/messages", "mu-user", { content: "now it exists" })).status).toBe(201);
  });
});

describe("a guild made by an earlier version", () => {
  it("gets the idempotency key column in place, keeps its messages, and takes keyed posts", async () => {
    const guildId = "before-idempotency";
    await addMember(guildId, "old-author");
    await post(guildId, "old-author", "from before");
    // Its messages table as the first release made it, with the message in it.
    await runInDurableObject(guildStub(guildId), (_guild, state) => {
      state.storage.sql.exec(`
        DROP INDEX messages_by_idempotency_key;
        CREATE TABLE old_messages (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, author_id TEXT NOT NULL, content TEXT NOT NULL, timestamp TEXT NOT NULL);
        INSERT INTO old_messages SELECT seq, id, author_id, content, timestamp FROM messages;
        DROP TABLE messages;
        ALTER TABLE old_messages RENAME TO messages;
      `);
    });
    await evictDurableObject(guildStub(guildId));
    const keyed = () => api("POST", `/api/guilds/${guildId}/messages`, "old-author", { content: "after" }, { "Idempotency-Key": "k" });
    const first = await keyed();
    expect(first.status).toBe(201);
    expect(await (await keyed()).json()).toEqual(await first.json());
    const history = (await (await api("GET", `/api/guilds/${guildId}/messages?after=0`, "old-author")).json()) as { seq: number; content: string }[];
    expect(history.map((m) => [m.seq, m.content])).toEqual([
      [1, "from before"],
      [2, "after"],
    ]);
  });
});

describe("bad input", () => {
  // A close reason holds 123 bytes: one naming a long opcode must still close, with its code.
  it.each([
    ["not JSON", "{not json", 4002],
    ["a long string opcode", { op: "x".repeat(200) }, 4001],
    ["an object opcode of multi-byte text", { op: { a: "é".repeat(100) } }, 4001],
  ])("%s: closes with the contract's code and leaves the session resumable with nothing lost", async (name, frame, code) => {
    const guildId = `bad-${name.replaceAll(" ", "-")}`;
    await addMember(guildId, "bad-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("bad-user");
    await post(guildId, "bad-user", "kept 1");
    await client.waitFor(() => client.messageSeqs(guildId).length === 1, "first");
    const sent = client.dispatches().at(-1)!.s!;
    client.send(frame);
    await client.waitFor(() => client.closed, "close");
    expect(client.closed!.code).toBe(code);
    await post(guildId, "bad-user", "kept 2");

    const resumed = await TestClient.connect();
    await resumed.resume("bad-user", sessionId, sent);
    expect(resumed.messageSeqs(guildId)).toEqual([2]);
    const history = await (await api("GET", `/api/guilds/${guildId}/messages`, "bad-user")).json<{ content: string }[]>();
    expect(history.map((m) => m.content)).toEqual(["kept 1", "kept 2"]);
  });

  it("counts frames across hibernation: the 121st in a minute closes with 4008", async () => {
    await addMember("rate-hibernate", "rh-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("rh-user"); // frame 1
    const acks = () => client.frames.filter((f) => f.op === 11).length;
    for (const round of [1, 2]) {
      for (let i = 0; i < 59; i++) client.send({ op: 1, d: null });
      await client.waitFor(() => acks() === 59 * round, "heartbeat ACKs");
      await evictDurableObject(sessionStub(sessionId), { webSockets: "hibernate" });
    }
    client.send({ op: 1, d: null }); // frame 120: still fine
    await client.waitFor(() => acks() === 119, "the 120th frame's ACK");
    client.send({ op: 1, d: null });
    await client.waitFor(() => client.closed, "close");
    expect(client.closed!.code).toBe(4008);
  });

  it("discards frames already on their way when it closed the socket: a RESUME behind a refused frame takes nothing", async () => {
    const { client: first, sessionId } = await sessionAfterFirstMessage("late-frame", "late-user");
    first.ws.close(4000, "network dropped");
    const resume = { op: 6, d: { token: await token("late-user"), session_id: sessionId, seq: 2 } };

    const refused = await TestClient.connect();
    await refused.waitFor(() => refused.frames.find((f) => f.op === 10), "HELLO");
    refused.send({ op: 11 }); // server-only, before IDENTIFY: 4003, and this object is wiped
    refused.send(resume); // already sent when the server closes
    await refused.waitFor(() => refused.closed, "close");
    expect(refused.closed!.code).toBe(4003);
    expect(refused.dispatches()).toEqual([]);

    await post("late-frame", "late-user", "two");
    const resumed = await TestClient.connect();
    await resumed.resume("late-user", sessionId, 2);
    expect(resumed.messageSeqs()).toEqual([2]);
  });
});

describe("a connection that ends or fails while IDENTIFY or RESUME is under way", () => {
  const subscriptions = (guildId: string) =>
    runInDurableObject(guildStub(guildId), (guild: Guild) =>
      (guild as unknown as { ctx: DurableObjectState }).ctx.storage.sql.exec<{ session_id: string }>("SELECT session_id FROM subscriptions").toArray().map((r) => r.session_id),
    );
  /** How often the guild's timings saw an action (e.g. `subscribe`). */
  const actionCount = async (guildId: string, action: string) => {
    const timings = await (await api("GET", `/api/guilds/${guildId}/timings`, "admin")).json<{ minutes: { actions: Record<string, { count: number }> }[] }>();
    return timings.minutes.reduce((n, m) => n + (m.actions[action]?.count ?? 0), 0);
  };

  // Whatever the code: a client that closed before READY has no session id to resume with.
  it.each([1001, 4000])("a close (%i) right after IDENTIFY ends the session: no guild or user directory keeps it", async (code) => {
    const guildId = `early-close-${code}`;
    const userId = `early-user-${code}`;
    await addMember(guildId, userId);
    const client = await TestClient.connect();
    await client.waitFor(() => client.frames.find((f) => f.op === 10), "HELLO");
    client.send({ op: 2, d: { token: await token(userId) } });
    client.ws.close(code, "gone before READY");
    // IDENTIFY runs its course (the guild sees a subscribe); then the session ends (an unsubscribe).
    await eventually(async () => (await actionCount(guildId, "unsubscribe")) === 1, "the session unsubscribing");
    expect(await actionCount(guildId, "subscribe")).toBe(1);
    expect(await subscriptions(guildId)).toEqual([]);
    expect(await userSessions(userId)).toEqual([]);
  });

  /** Makes `guildId`'s subscribe throw, as a guild that cannot be reached; returns what undoes it and a count of the tries. */
  async function unreachableSubscribe(guildId: string): Promise<{ tries(): number; restore(): void }> {
    let tries = 0;
    const restore = await patchMethod<{ guildId: string }>(guildStub(guildId), "subscribe", (self, original, args) => {
      if (self.guildId !== guildId) return original(...args);
      tries++;
      throw new Error("guild unreachable");
    });
    return { tries: () => tries, restore };
  }

  it("an IDENTIFY with a guild that cannot be reached is READY without it, and gets it with GUILD_CREATE once it can be", async () => {
    await addMember("identify-fails", "if-user");
    await addMember("identify-ok", "if-user");
    const broken = await unreachableSubscribe("identify-fails");
    const client = await TestClient.connect();
    try {
      await client.identify("if-user");
      expect((client.dispatches("READY")[0]!.d as { guilds: string[] }).guilds).toEqual(["identify-ok"]);
      await post("identify-ok", "if-user", "the other guild works");
      await client.waitFor(() => client.messageSeqs("identify-ok").length === 1, "the other guild's message");
    } finally {
      broken.restore();
    }
    expect(broken.tries()).toBe(1);
    // Tried again from the session's alarm, a second later.
    await client.waitFor(() => client.dispatches("GUILD_CREATE")[0], "GUILD_CREATE once the guild is back");
    await post("identify-fails", "if-user", "back");
    await client.waitFor(() => client.messageSeqs("identify-fails").length === 1, "the recovered guild's message");
    expect(client.dispatches().map((f) => [f.t, f.s])).toEqual([["READY", 1], ["MESSAGE_CREATE", 2], ["GUILD_CREATE", 3], ["MESSAGE_CREATE", 4]]);
    expect(client.closed).toBeNull();
  });

  it("an IDENTIFY whose user directory cannot be reached closes 4000, and identifying again works", async () => {
    await addMember("identify-dir", "dir-user");
    const user = env.USER.get(env.USER.idFromName("dir-user"));
    const restore = await patchMethod(user, "attachSession", () => Promise.reject(new Error("directory unreachable")));
    try {
      const client = await TestClient.connect();
      await client.waitFor(() => client.frames.find((f) => f.op === 10), "HELLO");
      client.send({ op: 2, d: { token: await token("dir-user") } });
      expect((await client.waitFor(() => client.closed, "close")).code).toBe(4000);
      expect(client.dispatches()).toEqual([]);
    } finally {
      restore();
    }
    const again = await TestClient.connect();
    await again.identify("dir-user");
    expect((again.dispatches("READY")[0]!.d as { guilds: string[] }).guilds).toEqual(["identify-dir"]);
  });

  it("a guild joined while it cannot be reached is announced once it can be, and the user directory keeps the session", async () => {
    await addMember("join-home", "join-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("join-user");
    const broken = await unreachableSubscribe("join-later");
    try {
      await addMember("join-later", "join-user");
      await eventually(() => broken.tries() >= 1, "the session trying to subscribe");
      // The session took the change and keeps trying itself: nothing is owed to it, so the
      // directory will not forget a live session however long the guild stays away.
      const pending = await runInDurableObject(env.USER.get(env.USER.idFromName("join-user")), (_user, state) =>
        state.storage.sql.exec("SELECT * FROM pending_notices").toArray(),
      );
      expect(pending).toEqual([]);
      expect(await userSessions("join-user")).toEqual([sessionId]);
      // Still failing a second later: tried again, backing off.
      await eventually(() => broken.tries() >= 2, "a second try", 4000);
      expect(client.dispatches("GUILD_CREATE")).toEqual([]);
    } finally {
      broken.restore();
    }
    await client.waitFor(() => client.dispatches("GUILD_CREATE")[0], "GUILD_CREATE once the guild is back", 8000);
    await post("join-later", "join-user", "welcome");
    await client.waitFor(() => client.messageSeqs("join-later").length === 1, "the joined guild's message");
  });

  it("a RESUME whose session object cannot be reached for a moment closes 4000, and the next RESUME gets what was posted meanwhile", async () => {
    const sessionId = await droppedSession("resume-origin-down", "rod-user");
    await post("resume-origin-down", "rod-user", "m2"); // kept by the disconnected session
    // The session's object is being reset (a deploy) as the client resumes: the call fails unrun.
    const restore = await patchMethod(sessionStub(sessionId), "takeOver", () => Promise.reject(new Error("Durable Object reset because its code was updated.")));
    const first = await closedResume("rod-user", sessionId, 2).finally(restore);
    expect(first.closed!.code).toBe(4000);
    expect(first.frames).toEqual([expect.objectContaining({ op: 10 }), { op: 7, d: null }]); // RECONNECT, not op 9
    expect(await sessionStatus(sessionId)).toBe("disconnected");
    const second = await TestClient.connect();
    await second.resume("rod-user", sessionId, 2);
    expect(second.dispatches().map((f) => [f.t, f.s])).toEqual([["MESSAGE_CREATE", 3], ["RESUMED", 4]]);
    expect(second.messageSeqs()).toEqual([2]);
  });

  it("a RESUME that fails after the hand-off asks the client to reconnect (op 7, 4000), and resuming again replays everything", async () => {
    const sessionId = await droppedSession("resume-fails-late", "rfl-user");
    await post("resume-fails-late", "rfl-user", "m2"); // kept by the disconnected session
    // The session is handed over, then its user directory cannot be reached from the new object.
    const user = env.USER.get(env.USER.idFromName("rfl-user"));
    const restore = await patchMethod(user, "attachSession", () => Promise.reject(new Error("directory unreachable")));
    const first = await closedResume("rfl-user", sessionId, 2).finally(restore);
    expect(first.closed!.code).toBe(4000);
    // The replay went out before the failure; then RECONNECT, never RESUMED nor op 9.
    expect(first.frames.map((f) => [f.op, f.t ?? null])).toEqual([[10, null], [0, "MESSAGE_CREATE"], [7, null]]);
    const second = await TestClient.connect();
    await second.resume("rfl-user", sessionId, 2);
    expect(second.dispatches().map((f) => [f.t, f.s])).toEqual([["MESSAGE_CREATE", 3], ["RESUMED", 4]]);
    await post("resume-fails-late", "rfl-user", "m3");
    await second.waitFor(() => second.messageSeqs().length === 2, "the next message on the resumed connection");
    expect(second.messageSeqs()).toEqual([2, 3]);
  });

  it("a RESUME whose guild cannot be reached still resumes, and misses nothing of it once the guild is back", async () => {
    const sessionId = await droppedSession("resume-broken", "rb-user");
    await post("resume-broken", "rb-user", "m2"); // kept by the disconnected session
    const broken = await unreachableSubscribe("resume-broken");
    const resumed = await TestClient.connect();
    try {
      await resumed.resume("rb-user", sessionId, 2);
      // Sent while the guild still delivers to the session's old object.
      await post("resume-broken", "rb-user", "m3");
    } finally {
      broken.restore();
    }
    expect(resumed.closed).toBeNull();
    await resumed.waitFor(() => resumed.messageSeqs().length === 2, "m2 and m3 (m3 pulled once the guild is back)", 8000);
    await post("resume-broken", "rb-user", "m4");
    await resumed.waitFor(() => resumed.messageSeqs().length === 3, "m4");
    expect(resumed.messageSeqs()).toEqual([2, 3, 4]);
    expect(resumed.dispatches().map((f) => f.s)).toEqual([3, 4, 5, 6]);
    expect(resumed.dispatches().map((f) => f.t)).toEqual(["MESSAGE_CREATE", "RESUMED", "MESSAGE_CREATE", "MESSAGE_CREATE"]);
  });

  it("a member removed right after posting still gets what was posted while a member, then GUILD_DELETE", async () => {
    for (const i of [1, 2, 3]) {
      const [guildId, userId] = [`removed-${i}`, `removed-user-${i}`];
      await addMember(guildId, userId);
      const client = await TestClient.connect();
      await client.identify(userId);
      await post(guildId, userId, "my own message"); // 201: accepted while a member
      expect((await api("DELETE", `/api/guilds/${guildId}/members/${userId}`, "admin")).status).toBe(204);
      await client.waitFor(() => client.dispatches("GUILD_DELETE")[0], "GUILD_DELETE");
      expect(client.dispatches().map((f) => f.t)).toEqual(["READY", "MESSAGE_CREATE", "GUILD_DELETE"]);
    }
  });

  it("what was posted before a removal stays readable by the member's sessions for 5 minutes, then not", async () => {
    const guildId = "departure-age";
    const { sessionId } = await sessionAfterFirstMessage(guildId, "da-user");
    expect((await api("DELETE", `/api/guilds/${guildId}/members/da-user`, "admin")).status).toBe(204);
    const pull = () => guildStub(guildId).eventsAfter(sessionId, 0, 10, "da-user");
    expect((await pull()).map((event) => event.seq)).toEqual([1]);
    expect(await guildStub(guildId).eventsAfter(sessionId, 0, 10, "someone-else")).toEqual([]);
    await runInDurableObject(guildStub(guildId), (_guild, state) => void state.storage.sql.exec("UPDATE departures SET at = at - 5 * 60000 - 1"));
    expect(await pull()).toEqual([]);
  });

  it("a removal while deliveries are held: everything before it arrives in order, nothing after it", async () => {
    const guildId = "removed-busy";
    await addMember(guildId, "rb-stays");
    const stays = await TestClient.connect();
    await stays.identify("rb-stays");
    const { client } = await sessionAfterFirstMessage(guildId, "rb-goes");
    const hold = await holdDeliveries("second");
    try {
      for (const content of ["second", "third", "fourth"]) await post(guildId, "rb-stays", content);
      await eventually(() => hold.held() > 0, "a held delivery");
      expect((await api("DELETE", `/api/guilds/${guildId}/members/rb-goes`, "admin")).status).toBe(204);
      await client.waitFor(() => client.dispatches("GUILD_DELETE")[0], "GUILD_DELETE");
      await post(guildId, "rb-stays", "after the removal");
    } finally {
      hold.release();
      hold.restore();
    }
    await stays.waitFor(() => stays.messageSeqs(guildId).length === 5, "the post after the removal, at the member who stayed");
    await heartbeatAnswered(client);
    expect(client.messageSeqs(guildId)).toEqual([1, 2, 3, 4]);
    expect(client.dispatches().map((f) => f.t)).toEqual(["READY", "MESSAGE_CREATE", "MESSAGE_CREATE", "MESSAGE_CREATE", "MESSAGE_CREATE", "GUILD_DELETE"]);
  });

  it("a removal notice that arrives after a re-add's leaves the member in the guild: the guild has the last word", async () => {
    await addMember("flip", "flip-user");
    const client = await TestClient.connect();
    await client.identify("flip-user");
    let removals = 0;
    const restore = await patchMethod(env.SESSION.get(env.SESSION.newUniqueId()), "guildRemoved", async (_self, original, args) => {
      if (removals++ === 0) await scheduler.wait(300); // this notice is slow on the wire
      return original(...args);
    });
    try {
      const removal = api("DELETE", "/api/guilds/flip/members/flip-user", "admin");
      await eventually(() => removals > 0, "the removal notice on its way");
      expect((await api("PUT", "/api/guilds/flip/members/flip-user", "admin")).status).toBe(201);
      expect((await removal).status).toBe(204);
      await scheduler.wait(400); // the late removal notice has arrived
    } finally {
      restore();
    }
    await post("flip", "flip-user", "still here");
    await client.waitFor(() => client.messageSeqs("flip").length === 1, "the message after the re-add");
    expect(client.dispatches("GUILD_DELETE")).toEqual([]);
  });

  it("a removal caught up on only after a quick re-add still delivers what was posted before it", async () => {
    const guildId = "readd";
    await addMember(guildId, "readd-stays");
    const { client } = await sessionAfterFirstMessage(guildId, "readd-user");
    const hold = await holdDeliveries("m2");
    let releasePull!: () => void;
    const pullGate = new Promise<void>((resolve) => (releasePull = resolve));
    let pulls = 0;
    const restorePull = await patchMethod<{ guildId: string }>(guildStub(guildId), "eventsAfter", async (self, original, args) => {
      if (self.guildId === guildId && args[3] === "readd-user" && pulls++ === 0) await pullGate; // the removed member's pull, late
      return original(...args);
    });
    try {
      for (const content of ["m2", "m3", "m4"]) await post(guildId, "readd-stays", content);
      await eventually(() => hold.held() > 0, "a held delivery");
      const removal = api("DELETE", `/api/guilds/${guildId}/members/readd-user`, "admin");
      await eventually(() => pulls > 0, "the session pulling before GUILD_DELETE");
      // Re-added (the directory's notice then waits behind the removal in the session's queue).
      const readd = api("PUT", `/api/guilds/${guildId}/members/readd-user`, "admin");
      await eventually(async () => (await api("GET", `/api/guilds/${guildId}/messages`, "readd-user")).status === 200, "the re-add");
      releasePull();
      expect((await removal).status).toBe(204);
      expect((await readd).status).toBe(201);
      await client.waitFor(() => client.dispatches("GUILD_CREATE")[0], "GUILD_CREATE");
    } finally {
      releasePull();
      restorePull();
      hold.release();
      hold.restore();
    }
    expect(client.messageSeqs(guildId)).toEqual([1, 2, 3, 4]);
  });

  it("a subscribe that took effect but whose answer was lost is undone when the session ends", async () => {
    await addMember("lost-answer", "la-user");
    const restore = await patchMethod<{ guildId: string }>(guildStub("lost-answer"), "subscribe", async (self, original, args) => {
      if (self.guildId !== "lost-answer") return original(...args);
      await original(...args); // the guild subscribes the session…
      throw new Error("connection reset"); // …and the answer never arrives
    });
    const client = await TestClient.connect();
    try {
      await client.identify("la-user");
      expect(await subscriptions("lost-answer")).toHaveLength(1);
      client.ws.close(1000, "bye");
      await eventually(async () => (await subscriptions("lost-answer")).length === 0, "the owed guild unsubscribed");
    } finally {
      restore();
    }
  });

  /**
   * Makes `guildId`'s subscribe fail the first time and wait for `release()` the second: an owed
   * guild whose retry is slow to arrive (or, with `answerLate`, takes effect and is slow to answer).
   */
  async function slowRetry(guildId: string, answerLate = false) {
    let calls = 0;
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const restore = await patchMethod<{ guildId: string }>(guildStub(guildId), "subscribe", async (self, original, args) => {
      if (self.guildId !== guildId) return original(...args);
      const call = ++calls;
      if (call === 1) throw new Error("guild unreachable");
      if (call !== 2) return original(...args);
      if (answerLate) {
        const answer = await original(...args);
        await gate;
        return answer;
      }
      await gate;
      return original(...args);
    });
    return {
      calls: () => calls,
      retrying: () => eventually(() => calls >= 2, "the alarm's retry under way", 4000),
      release,
      restore: () => (release(), restore()),
    };
  }

  it("an owed guild's slow retry does not hold up the heartbeat timeout", async () => {
    await addMember("hb-slow", "hb-user");
    const slow = await slowRetry("hb-slow");
    const client = await TestClient.connect();
    try {
      const sessionId = await client.identify("hb-user");
      await slow.retrying();
      // The client stops heartbeating; the runtime runs the alarm (one at a time) when it is due.
      await runInDurableObject(sessionStub(sessionId), (session: Session) => {
        const internals = session as unknown as { state: { heartbeatDeadline: number }; scheduleAlarm(): void };
        internals.state.heartbeatDeadline = Date.now() + 100;
        internals.scheduleAlarm();
      });
      expect((await client.waitFor(() => client.closed, "4009", 3000)).code).toBe(4009);
    } finally {
      slow.restore();
    }
  });

  it("an owed guild's retry under way when the client RESUMEs elsewhere does not take the guild's deliveries back to the old object", async () => {
    await addMember("retry-resume", "rr-user");
    const slow = await slowRetry("retry-resume");
    const client = await TestClient.connect();
    const sessionId = await client.identify("rr-user");
    let resumed: TestClient;
    try {
      await slow.retrying();
      client.ws.close(4000, "network dropped"); // handled once the retry is done
      resumed = await TestClient.connect();
      resumed.send({ op: 6, d: { token: await token("rr-user"), session_id: sessionId, seq: 1 } });
      // The hand-off waits for the retry: were the new holder to subscribe first, the retry's
      // late subscribe would re-target the guild to the old object.
      await scheduler.wait(300);
      expect(resumed.dispatches("RESUMED")).toEqual([]);
      expect(slow.calls()).toBe(2);
      slow.release();
      await resumed.waitFor(() => resumed.dispatches("RESUMED")[0], "RESUMED");
    } finally {
      slow.restore();
    }
    await post("retry-resume", "rr-user", "after the resume");
    await resumed.waitFor(() => resumed.messageSeqs("retry-resume").length === 1, "the message on the resumed connection");
  });

  it("an owed guild's retry answered only after a removal leaves the guild out in the end", async () => {
    await addMember("retry-removed", "rx-user");
    const slow = await slowRetry("retry-removed", true);
    const client = await TestClient.connect();
    await client.identify("rx-user");
    try {
      await slow.retrying();
      const removal = api("DELETE", "/api/guilds/retry-removed/members/rx-user", "admin"); // its notice waits for the retry
      await scheduler.wait(100);
      slow.release();
      expect((await removal).status).toBe(204);
      // The retry's subscribe took effect before the removal; its answer comes after. The
      // removal's notice, queued behind it, then takes the guild back out.
      await client.waitFor(() => client.dispatches("GUILD_DELETE")[0], "GUILD_DELETE after the retry's GUILD_CREATE");
      expect(client.dispatches().map((f) => f.t)).toEqual(["READY", "GUILD_CREATE", "GUILD_DELETE"]);
    } finally {
      slow.restore();
    }
  });

  it("an owed guild's retry under way when the session ends leaves no subscription behind", async () => {
    await addMember("retry-ended", "ry-user");
    const slow = await slowRetry("retry-ended");
    const client = await TestClient.connect();
    const sessionId = await client.identify("ry-user");
    try {
      await slow.retrying();
      client.ws.close(1000, "bye"); // handled once the retry is done
      await scheduler.wait(100);
      slow.release();
      await eventually(async () => (await sessionStatus(sessionId)) === "ended", "the session ended");
    } finally {
      slow.restore();
    }
    await eventually(async () => (await subscriptions("retry-ended")).length === 0, "no subscription left");
  });

  it("a RESUME catches up on a guild joined and a guild left while the session was being handed over", async () => {
    for (const guildId of ["handoff-kept", "handoff-left"]) await addMember(guildId, "ho-user");
    const client = await TestClient.connect();
    const sessionId = await client.identify("ho-user");
    await post("handoff-kept", "ho-user", "before");
    await client.waitFor(() => client.messageSeqs().length === 1, "first message");
    client.ws.close(4000, "network dropped");
    await eventually(async () => (await sessionStatus(sessionId)) === "disconnected", "the session disconnected");
    // The user directory's notifications reach the old holder, as they would mid-hand-off, and
    // find no session there: it has moved (here: to an object standing in for the new holder).
    await runInDurableObject(sessionStub(sessionId), (session: Session) => {
      const internals = session as unknown as { state: { status: string } };
      internals.state.status = "moved";
    });
    await addMember("handoff-joined", "ho-user");
    await api("DELETE", "/api/guilds/handoff-left/members/ho-user", "admin");
    await runInDurableObject(sessionStub(sessionId), (session: Session) => {
      (session as unknown as { state: { status: string } }).state.status = "disconnected";
    });

    const resumed = await TestClient.connect();
    await resumed.resume("ho-user", sessionId, 2);
    expect(resumed.dispatches().map((f) => [f.t, (f.d as { id?: string } | null)?.id])).toEqual([
      ["GUILD_DELETE", "handoff-left"],
      ["GUILD_CREATE", "handoff-joined"],
      ["RESUMED", undefined],
    ]);
    await post("handoff-joined", "ho-user", "in the new guild");
    await resumed.waitFor(() => resumed.messageSeqs("handoff-joined").length === 1, "message in the joined guild");
  });
});
