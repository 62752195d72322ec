/**
 * End to end: the gateway started as `npm start` starts it (`wrangler dev`, local Durable Objects,
 * throwaway storage), driven over real HTTP and real WebSockets from Node. Everything asserted
 * here is something a client of CONTRACT.md would notice.
 */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type DevServer, ROOT, startDevServer } from "../../scripts/lib/dev-server.ts";
import type { GatewayClient } from "../../scripts/lib/gateway-client.ts";
import { CloseCode, type Message, Op, type ReadyData } from "../../src/gateway/protocol.ts";
import {
  Api,
  Clients,
  type Frame,
  devTokens,
  dispatchSeqs,
  expectError,
  messagesOf,
  range,
  signToken,
  signedTokens,
  sleep,
  uid,
  waitForMessages,
} from "./helpers.ts";

const TEST_TIMEOUT = 30_000;
const START_TIMEOUT = 120_000;
/** Long enough for a stray duplicate or late event to show up, short enough to keep the suite fast. */
const SETTLE_MS = 400;

async function expectClose(client: GatewayClient, code: number, timeoutMs = 10_000): Promise<void> {
  const closed = await client.waitForClose(timeoutMs);
  expect(closed.code, `close reason: ${closed.reason}`).toBe(code);
}

/** Frames received before the RESUMED dispatch, in arrival order. */
function framesBefore(client: GatewayClient, resumed: Frame): Frame[] {
  return client.frames.slice(0, client.frames.indexOf(resumed));
}

/** The MESSAGE_CREATE seqs of one guild across several sockets of one session, in arrival order. */
const guildSeqs = (sockets: GatewayClient[], guildId: string): number[] =>
  sockets.flatMap((socket) => messagesOf(socket, guildId).map((m) => m.seq));

/** Dispatch `s` across several sockets of one session, in arrival order. */
const sessionSeqs = (sockets: GatewayClient[]): number[] => sockets.flatMap((socket) => dispatchSeqs(socket.frames));

const heartbeatAcks = (client: GatewayClient): number => client.frames.filter((f) => f.op === Op.HEARTBEAT_ACK).length;

describe("guildwire over wrangler dev (development)", () => {
  let server: DevServer | undefined;
  let api: Api;
  const clients = new Clients(() => server!.url);

  beforeAll(async () => {
    server = await startDevServer();
    api = new Api(server.url, devTokens(server.url));
  }, START_TIMEOUT);

  afterAll(async () => {
    clients.dropAll();
    await server?.stop();
  });

  beforeEach(({ onTestFailed }) => {
    onTestFailed(() => console.error(`wrangler dev output (tail):\n${server?.output().slice(-4000)}`));
  });

  afterEach(() => clients.dropAll());

  // ---- 1. IDENTIFY → READY ---------------------------------------------------------------------

  describe("IDENTIFY", () => {
    it(
      "gets HELLO, then READY with the session id, the user id and every guild of the user; s starts at 1 and goes up by 1",
      async () => {
        const user = uid("ready-user");
        const [g1, g2, notMine] = [uid("ready-g1"), uid("ready-g2"), uid("ready-other")];
        await api.addMembers(g1, user);
        await api.addMembers(g2, user);
        await api.addMembers(notMine, uid("ready-someone-else"));
        const token = await api.token(user);

        const client = await clients.connect();
        const hello = await client.waitFor(() => client.frames[0], 10_000, "HELLO");
        expect(hello.op).toBe(Op.HELLO);
        expect((hello.d as { heartbeat_interval: unknown }).heartbeat_interval).toEqual(expect.any(Number));
        expect((hello.d as { heartbeat_interval: number }).heartbeat_interval).toBeGreaterThan(0);

        const ready = await client.identify(token);
        expect(ready.s).toBe(1);
        const data = ready.d as ReadyData;
        expect(data.session_id).toEqual(expect.any(String));
        expect(data.session_id.length).toBeGreaterThan(0);
        expect(data.user_id).toBe(user);
        expect([...data.guilds].sort()).toEqual([g1, g2].sort());

        const posted = [
          await api.post(g1, user, "one"),
          await api.post(g2, user, "two"),
          await api.post(g1, user, "three"),
          await api.post(g2, user, "four"),
        ];
        await waitForMessages(client, g1, 2);
        await waitForMessages(client, g2, 2);
        await sleep(SETTLE_MS);
        expect(dispatchSeqs(client.frames)).toEqual(range(1, 5));
        // MESSAGE_CREATE carries the message object exactly as the API returned it.
        const received = messagesOf(client);
        expect([...received].sort((a, b) => a.content.localeCompare(b.content))).toEqual(
          [...posted].sort((a, b) => a.content.localeCompare(b.content)),
        );
        for (const message of posted) {
          expect(Object.keys(message).sort()).toEqual(["author_id", "content", "guild_id", "id", "seq", "timestamp"]);
          expect(new Date(message.timestamp).toISOString()).toBe(message.timestamp);
        }

        // A second session of the same user is a session of its own: its own id, its own s from 1.
        const { client: other, ready: otherReady } = await clients.identified(token);
        expect(otherReady.session_id).not.toBe(data.session_id);
        expect(other.dispatches()[0]!.s).toBe(1);
        expect(client.closed).toBeNull();
      },
      TEST_TIMEOUT,
    );
  });

  // ---- 2. ordered fanout ---------------------------------------------------------------------

  describe("fanout", () => {
    it(
      "delivers every MESSAGE_CREATE of a session's guilds exactly once, in seq order, without gaps, and nothing else",
      async () => {
        const [u1, u2, u3] = [uid("fan-u1"), uid("fan-u2"), uid("fan-u3")];
        const [guildA, guildB] = [uid("fan-a"), uid("fan-b")];
        await api.addMembers(guildA, u1, u2, u3);
        await api.addMembers(guildB, u2, u3);
        const members: Record<string, string[]> = { [u1]: [guildA], [u2]: [guildA, guildB], [u3]: [guildA, guildB] };

        const sessions = await Promise.all(
          [u1, u2, u3].map(async (user) => ({ user, ...(await clients.identified(await api.token(user))) })),
        );
        for (const { user, ready } of sessions) expect([...ready.guilds].sort()).toEqual([...members[user]!].sort());

        const PER_GUILD = 30;
        const posts = [
          ...range(1, PER_GUILD).map((i) => ({ guild: guildA, author: [u1, u2, u3][i % 3]!, content: `A${i}` })),
          ...range(1, PER_GUILD).map((i) => ({ guild: guildB, author: [u2, u3][i % 2]!, content: `B${i}` })),
        ];
        const created = await Promise.all(posts.map((p) => api.post(p.guild, p.author, p.content)));

        // Every accepted message got its own seq: 1..30 in each guild.
        const stored = new Map<string, Message[]>();
        for (const guild of [guildA, guildB]) {
          const mine = created.filter((m) => m.guild_id === guild).sort((a, b) => a.seq - b.seq);
          expect(mine.map((m) => m.seq)).toEqual(range(1, PER_GUILD));
          stored.set(guild, mine);
        }

        for (const { user, client } of sessions) {
          for (const guild of members[user]!) await waitForMessages(client, guild, PER_GUILD);
        }
        await sleep(SETTLE_MS);

        for (const { user, client } of sessions) {
          for (const guild of members[user]!) {
            // In seq order, no gaps, no duplicates, and the very messages that were stored.
            expect(messagesOf(client, guild), `${user} in ${guild}`).toEqual(stored.get(guild));
          }
          const foreign = messagesOf(client).filter((m) => !members[user]!.includes(m.guild_id));
          expect(foreign, `${user} got messages of guilds it is not in`).toEqual([]);
          const total = members[user]!.length * PER_GUILD;
          expect(dispatchSeqs(client.frames), `${user}'s dispatch s`).toEqual(range(1, total + 1));
          expect(client.closed).toBeNull();
        }
      },
      TEST_TIMEOUT,
    );
  });

  // ---- 3. history ----------------------------------------------------------------------------

  describe("GET /api/guilds/{g}/messages", () => {
    it(
      "returns the stored messages in seq order and honours after and limit",
      async () => {
        const [guild, member, outsider] = [uid("hist"), uid("hist-member"), uid("hist-outsider")];
        await api.addMembers(guild, member);
        await api.addMembers(uid("hist-elsewhere"), outsider);
        const posted: Message[] = [];
        for (let i = 0; i < 12; i++) posted.push(await api.post(guild, member, `history ${i}`));
        expect(posted.map((m) => m.seq)).toEqual(range(1, 12));

        const all = await api.history(guild, member);
        expect(all.status).toBe(200);
        expect(all.body).toEqual(posted);

        const cases: [string, number[]][] = [
          ["?limit=5", range(1, 5)],
          ["?after=5&limit=4", range(6, 9)],
          ["?after=10", [11, 12]],
          ["?after=0&limit=1", [1]],
          ["?after=12", []],
          ["?after=500&limit=100", []],
          ["?limit=100", range(1, 12)],
        ];
        for (const [query, seqs] of cases) {
          const response = await api.history(guild, member, query);
          expect(response.status, query).toBe(200);
          expect(response.body, query).toEqual(posted.filter((m) => seqs.includes(m.seq)));
        }
      },
      TEST_TIMEOUT,
    );

    it(
      "defaults to at most 50 messages and never returns more than 100",
      async () => {
        const [guild, a, b, c] = [uid("hist-big"), uid("hb-a"), uid("hb-b"), uid("hb-c")];
        await api.addMembers(guild, a, b, c);
        // 120 messages from three authors (each stays within its burst of 50).
        await Promise.all([a, b, c].map(async (author) => {
          for (let i = 0; i < 40; i++) await api.post(guild, author, `${author} ${i}`);
        }));
        const first = await api.history(guild, a);
        expect(first.body.map((m) => m.seq)).toEqual(range(1, 50));
        const max = await api.history(guild, a, "?limit=100&after=10");
        expect(max.body.map((m) => m.seq)).toEqual(range(11, 110));
        const rest = await api.history(guild, a, "?after=110&limit=100");
        expect(rest.body.map((m) => m.seq)).toEqual(range(111, 120));
      },
      TEST_TIMEOUT,
    );

    it(
      "answers 400 to bad after/limit values, 403 to non-members, 404 to unknown guilds",
      async () => {
        const [guild, member, outsider] = [uid("hist-bad"), uid("hb-member"), uid("hb-outsider")];
        await api.addMembers(guild, member);
        await api.addMembers(uid("hist-bad-other"), outsider);
        await api.post(guild, member, "hello");
        for (const query of ["?after=-1", "?after=abc", "?after=1.5", "?after=", "?after=1e3", "?limit=0", "?limit=101", "?limit=-5", "?limit=ten", "?limit=", "?limit=2.5", "?after=99999999999999999999"]) {
          expectError(await api.history(guild, member, query), 400);
        }
        expectError(await api.history(guild, outsider), 403);
        expectError(await api.history(uid("hist-never-created"), member), 404);
      },
      TEST_TIMEOUT,
    );
  });

  // ---- 4. membership -------------------------------------------------------------------------

  describe("membership changes", () => {
    it(
      "PUT member while connected → GUILD_CREATE, then that guild's messages; DELETE → GUILD_DELETE, nothing more from it, and 403",
      async () => {
        const [joiner, host] = [uid("mem-joiner"), uid("mem-host")];
        const [home, side] = [uid("mem-home"), uid("mem-side")];
        await api.addMembers(home, joiner);
        await api.addMembers(side, host);
        await api.post(side, host, "before the joiner joined");

        const { client, ready } = await clients.identified(await api.token(joiner));
        expect(ready.guilds).toEqual([home]);
        const { client: hostClient } = await clients.identified(await api.token(host));

        const added = await api.putMember(side, joiner);
        expect(added.status).toBe(201);
        const created = await client.waitForDispatch("GUILD_CREATE");
        expect(created.d).toEqual({ id: side });

        // Idempotent: a second PUT says 200 and announces nothing new.
        expect((await api.putMember(side, joiner)).status).toBe(200);

        const afterJoin = await api.post(side, host, "after the joiner joined");
        const ownPost = await api.post(side, joiner, "the joiner speaks");
        await waitForMessages(client, side, 2);
        expect(messagesOf(client, side)).toEqual([afterJoin, ownPost]);

        const removed = await api.removeMember(side, joiner);
        expect(removed.status).toBe(204);
        const deleted = await client.waitForDispatch("GUILD_DELETE");
        expect(deleted.d).toEqual({ id: side });

        const afterLeave = [];
        for (let i = 0; i < 3; i++) afterLeave.push(await api.post(side, host, `after leaving ${i}`));
        // The host sees them, so the fanout has run; the joiner must not.
        const lastSeq = afterLeave.at(-1)!.seq;
        await hostClient.waitFor(() => messagesOf(hostClient, side).some((m) => m.seq === lastSeq), 10_000, "the host's copy");
        const marker = await api.post(home, joiner, "still in home");
        await waitForMessages(client, home, 1);
        await sleep(SETTLE_MS);

        const deletedAt = client.frames.indexOf(deleted);
        const lateFromSide = client.frames
          .slice(deletedAt)
          .filter((f) => f.op === Op.DISPATCH && f.t === "MESSAGE_CREATE" && (f.d as Message).guild_id === side);
        expect(lateFromSide).toEqual([]);
        expect(messagesOf(client, home)).toEqual([marker]);
        expect(client.dispatches("GUILD_CREATE")).toHaveLength(1);
        expect(dispatchSeqs(client.frames)).toEqual(range(1, client.dispatches().length));

        expectError(await api.tryPost(side, joiner, "let me back in"), 403);
        expectError(await api.history(side, joiner), 403);

        // A new session lists only the guilds the user is still in.
        const { ready: again } = await clients.identified(await api.token(joiner));
        expect(again.guilds).toEqual([home]);
      },
      TEST_TIMEOUT,
    );
  });

  // ---- 5. resume -----------------------------------------------------------------------------

  describe("RESUME", () => {
    it(
      "after a dropped connection replays every missed dispatch in order, then RESUMED; live messages keep flowing",
      async () => {
        const [guild, user, watcher] = [uid("res-g"), uid("res-user"), uid("res-watcher")];
        await api.addMembers(guild, user, watcher);
        const token = await api.token(user);
        const { client: first, ready } = await clients.identified(token);
        const { client: watching } = await clients.identified(await api.token(watcher));

        const before: Message[] = [];
        for (let i = 0; i < 3; i++) before.push(await api.post(guild, watcher, `before ${i}`));
        await waitForMessages(first, guild, 3);
        const seen = first.seq!;
        expect(seen).toBe(4);

        first.drop();
        const missed: Message[] = [];
        for (let i = 0; i < 5; i++) missed.push(await api.post(guild, watcher, `while away ${i}`));
        // Once the watcher has them, the fanout has reached the dropped session too.
        await waitForMessages(watching, guild, 8);
        await sleep(SETTLE_MS);

        const second = await clients.resume(token, ready.session_id, seen);
        const resumed = await second.waitForDispatch("RESUMED");
        const replay = framesBefore(second, resumed).filter((f) => f.op === Op.DISPATCH);
        expect(replay.map((f) => f.t)).toEqual(missed.map(() => "MESSAGE_CREATE"));
        expect(replay.map((f) => f.d)).toEqual(missed);
        expect(replay.map((f) => f.s)).toEqual(range(seen + 1, seen + missed.length));
        expect(resumed.s).toBe(seen + missed.length + 1);
        expect(second.frames.some((f) => f.op === Op.INVALID_SESSION)).toBe(false);

        const live = [await api.post(guild, watcher, "live 1"), await api.post(guild, user, "live 2")];
        await waitForMessages(second, guild, missed.length + live.length);
        await sleep(SETTLE_MS);
        expect(messagesOf(second, guild)).toEqual([...missed, ...live]);
        expect(guildSeqs([first, second], guild)).toEqual(range(1, 10));
        expect(sessionSeqs([first, second])).toEqual(range(1, 12));
        expect(second.closed).toBeNull();
        expect([...before, ...missed, ...live].map((m) => m.seq)).toEqual(range(1, 10));
      },
      TEST_TIMEOUT,
    );

    it(
      "works again on a session that was itself resumed (three resumes in a row)",
      async () => {
        const [guild, user, author] = [uid("res2-g"), uid("res2-user"), uid("res2-author")];
        await api.addMembers(guild, user, author);
        const token = await api.token(user);
        const { client: first, ready } = await clients.identified(token);
        const { client: watching } = await clients.identified(await api.token(author));
        const sockets = [first];
        let posted = 0;
        const postSome = async (n: number) => {
          for (let i = 0; i < n; i++) await api.post(guild, author, `m${++posted}`);
          await waitForMessages(watching, guild, posted);
        };

        await postSome(2);
        await waitForMessages(first, guild, 2);
        for (let round = 1; round <= 3; round++) {
          const current = sockets.at(-1)!;
          const seen = current.seq!;
          current.drop();
          await postSome(2);
          await sleep(SETTLE_MS);
          const next = await clients.resume(token, ready.session_id, seen);
          const resumed = await next.waitForDispatch("RESUMED", 0, 10_000);
          const replay = framesBefore(next, resumed).filter((f) => f.op === Op.DISPATCH);
          expect(replay.map((f) => (f.d as Message).seq), `round ${round}`).toEqual([posted - 1, posted]);
          sockets.push(next);
        }
        const last = sockets.at(-1)!;
        await postSome(1);
        await waitForMessages(last, guild, 3);
        await sleep(SETTLE_MS);
        expect(guildSeqs(sockets, guild)).toEqual(range(1, posted));
        // s: READY, then 2 messages; then per round 2 replayed + RESUMED; then 1 live.
        expect(sessionSeqs(sockets)).toEqual(range(1, 1 + 2 + 3 * 3 + 1));
        expect(last.closed).toBeNull();
      },
      TEST_TIMEOUT,
    );

    it(
      "misses nothing and repeats nothing when the client drops and resumes while messages keep arriving",
      async () => {
        const [guild, user, a1, a2] = [uid("res-flow-g"), uid("res-flow-user"), uid("res-flow-a1"), uid("res-flow-a2")];
        await api.addMembers(guild, user, a1, a2);
        const token = await api.token(user);
        await api.token(a1);
        await api.token(a2);
        const { client: first, ready } = await clients.identified(token);
        const sockets = [first];
        const received = () => guildSeqs(sockets, guild).length;

        const TOTAL = 60;
        const posting = (async () => {
          const posted: Message[] = [];
          for (let i = 0; i < TOTAL; i++) {
            posted.push(await api.post(guild, i % 2 === 0 ? a1 : a2, `flow ${i}`));
            await sleep(10);
          }
          return posted;
        })();

        // Drop mid-stream, come back a little later.
        await waitForMessages(first, guild, 10);
        first.drop();
        await sleep(150);
        const second = await clients.resume(token, ready.session_id, first.seq!);
        sockets.push(second);
        await second.waitForDispatch("RESUMED");
        await second.waitFor(() => received() >= 35, 15_000, "35 messages across sockets");

        // Drop again and resume at once, while posts are still landing.
        second.drop();
        const third = await clients.resume(token, ready.session_id, second.seq!);
        sockets.push(third);
        await third.waitForDispatch("RESUMED");

        const posted = await posting;
        await third.waitFor(() => received() >= TOTAL, 15_000, `${TOTAL} messages across sockets (have ${received()})`);
        await sleep(SETTLE_MS);
        expect(sockets.flatMap((socket) => messagesOf(socket, guild))).toEqual(posted);
        const seqs = sessionSeqs(sockets);
        expect(seqs).toEqual(range(1, seqs.length));
        // READY, TOTAL messages and two RESUMED: nothing else, nothing twice.
        expect(seqs.length).toBe(1 + TOTAL + 2);
        expect(third.closed).toBeNull();
      },
      TEST_TIMEOUT,
    );

    it(
      "of a session the client closed with 1000 or 1001 gets op 9 with d false",
      async () => {
        for (const code of [1000, 1001]) {
          const [guild, user] = [uid(`end${code}-g`), uid(`end${code}-user`)];
          await api.addMembers(guild, user);
          const token = await api.token(user);
          const { client, ready } = await clients.identified(token);
          await api.post(guild, user, "hello");
          await waitForMessages(client, guild, 1);
          const seen = client.seq!;
          await client.close(code);
          await sleep(200);

          const retry = await clients.resume(token, ready.session_id, seen);
          const invalid = await retry.waitFor(() => retry.frames.find((f) => f.op === Op.INVALID_SESSION), 10_000, "op 9");
          expect(invalid.d, `after close ${code}`).toBe(false);
          expect(retry.dispatches("RESUMED")).toEqual([]);
          expect(retry.dispatches("MESSAGE_CREATE")).toEqual([]);
        }
      },
      TEST_TIMEOUT,
    );

    it(
      "with an unknown or garbage session_id gets op 9 with d false",
      async () => {
        const user = uid("res-unknown");
        await api.addMembers(uid("res-unknown-g"), user);
        const token = await api.token(user);
        const { ready } = await clients.identified(token);
        const unknownIds = ["not-a-session", "", "0".repeat(64), "f".repeat(64), ready.session_id.replace(/.$/, (c) => (c === "0" ? "1" : "0"))];
        const retries = await Promise.all(unknownIds.map((id) => clients.resume(token, id, 0)));
        for (const [i, retry] of retries.entries()) {
          const invalid = await retry.waitFor(() => retry.frames.find((f) => f.op === Op.INVALID_SESSION), 10_000, `op 9 for ${unknownIds[i]}`);
          expect(invalid.d).toBe(false);
          expect(retry.dispatches()).toEqual([]);
        }
      },
      TEST_TIMEOUT,
    );
  });

  // ---- 6. HTTP errors ------------------------------------------------------------------------

  describe("HTTP errors", () => {
    it(
      "400 for bad JSON, bad content and bad ids",
      async () => {
        const [guild, user] = [uid("e400-g"), uid("e400-user")];
        await api.addMembers(guild, user);
        const token = await api.token(user);
        const postRaw = (body: string) => api.request("POST", `/api/guilds/${guild}/messages`, { token, body });

        for (const body of ["{not json", "", "[1,2]", '"text"', "42", "null", "{}", '{"content": 5}', '{"content": ""}', '{"content": null}']) {
          expectError(await postRaw(body), 400);
        }
        expectError(await api.tryPost(guild, user, "x".repeat(4001)), 400);
        expectError(await api.tryPost(guild, user, "🙂".repeat(4001)), 400);
        // An unpaired surrogate would be stored as U+FFFD, unlike what was posted and delivered.
        expectError(await api.tryPost(guild, user, "a\ud800b"), 400);
        // The limits themselves are fine: 4,000 characters, an emoji being one.
        expect((await api.tryPost(guild, user, "x".repeat(4000))).status).toBe(201);
        expect((await api.tryPost(guild, user, "🙂".repeat(4000))).status).toBe(201);
        expect((await api.tryPost(guild, user, "y")).status).toBe(201);
        expect((await api.history(guild, user)).body.map((m) => m.content)).toEqual(["x".repeat(4000), "🙂".repeat(4000), "y"]);

        // Ids: 1–64 characters of [A-Za-z0-9_-].
        const admin = await api.adminToken();
        for (const badGuild of ["bad.id", "bad%20id", "a".repeat(65), "caf%C3%A9"]) {
          expectError(await api.request("PUT", `/api/guilds/${badGuild}/members/${user}`, { token: admin }), 400);
          expectError(await api.request("POST", `/api/guilds/${badGuild}/messages`, { token, json: { content: "hi" } }), 400);
        }
        for (const badUser of ["bad.user", "a".repeat(65), "bad%21"]) {
          expectError(await api.request("PUT", `/api/guilds/${guild}/members/${badUser}`, { token: admin }), 400);
        }
        expect((await api.putMember("g".repeat(64), "u".repeat(64))).status).toBe(201);
        for (const json of [{ user_id: "" }, { user_id: "a b" }, { user_id: 5 }, { user_id: "x".repeat(65) }, {}, { user_id: "ok", admin: "yes" }]) {
          expectError(await api.request("POST", "/api/dev/token", { json }), 400);
        }
        expectError(await api.request("POST", "/api/dev/token", { body: "{oops" }), 400);
        // The benchmark's single-object room (development only) checks its body like any route.
        const room = `/api/dev/bench-room/${uid("e400-room")}`;
        expectError(await api.request("POST", room, { body: "{oops" }), 400);
        expectError(await api.request("POST", room, { json: { content: 5 } }), 400);
        expect((await api.request("POST", room, { json: { content: "hi" } })).status).toBe(201);
      },
      TEST_TIMEOUT,
    );

    it(
      "401 without a token or with a forged one",
      async () => {
        const [guild, user] = [uid("e401-g"), uid("e401-user")];
        await api.addMembers(guild, user);
        const token = await api.token(user);
        const path = `/api/guilds/${guild}/messages`;
        const [payload, signature] = token.split(".") as [string, string];
        const claims = JSON.parse(Buffer.from(payload, "base64url").toString()) as Record<string, unknown>;
        const asAdmin = Buffer.from(JSON.stringify({ ...claims, role: "admin" })).toString("base64url");
        const asOther = Buffer.from(JSON.stringify({ ...claims, sub: uid("e401-victim") })).toString("base64url");
        const otherSecret = signToken("an-entirely-different-secret", { sub: user, role: "admin", exp: Math.floor(Date.now() / 1000) + 3600 });
        const forged = [`${asAdmin}.${signature}`, `${asOther}.${signature}`, otherSecret, `${payload}.`, `${payload}.${signature}x`, "garbage", "a.b.c"];

        expectError(await api.request("POST", path, { json: { content: "hi" } }), 401);
        expectError(await api.request("GET", path), 401);
        expectError(await api.request("POST", path, { json: { content: "hi" }, headers: { Authorization: `Basic ${token}` } }), 401);
        expectError(await api.request("POST", path, { json: { content: "hi" }, headers: { Authorization: "Bearer " } }), 401);
        // The scheme is case-insensitive (RFC 9110): the same token as "bearer" is accepted.
        expect((await api.request("POST", path, { json: { content: "lower-case scheme" }, headers: { Authorization: `bearer ${token}` } })).status).toBe(201);
        for (const bad of forged) {
          expectError(await api.request("POST", path, { token: bad, json: { content: "hi" } }), 401);
          // A forged admin token must not add members.
          expectError(await api.request("PUT", `/api/guilds/${guild}/members/${uid("e401-intruder")}`, { token: bad }), 401);
        }
        // Nothing else was posted by any of that.
        expect((await api.history(guild, user)).body.map((m) => m.content)).toEqual(["lower-case scheme"]);
      },
      TEST_TIMEOUT,
    );

    it(
      "403 for a non-member posting or reading, and a non-admin managing members",
      async () => {
        const [guild, member, outsider] = [uid("e403-g"), uid("e403-member"), uid("e403-outsider")];
        await api.addMembers(guild, member);
        expectError(await api.tryPost(guild, outsider, "let me in"), 403);
        expectError(await api.history(guild, outsider), 403);
        const memberToken = await api.token(member);
        expectError(await api.request("PUT", `/api/guilds/${guild}/members/${outsider}`, { token: memberToken }), 403);
        expectError(await api.request("DELETE", `/api/guilds/${guild}/members/${member}`, { token: memberToken }), 403);
        expectError(await api.request("GET", `/api/guilds/${guild}/timings`, { token: memberToken }), 403);
        // …and none of it took effect.
        expectError(await api.tryPost(guild, outsider, "still out"), 403);
        expect((await api.tryPost(guild, member, "still in")).status).toBe(201);
      },
      TEST_TIMEOUT,
    );

    it(
      "404 for unknown routes and unknown guilds",
      async () => {
        const user = uid("e404-user");
        await api.addMembers(uid("e404-home"), user);
        const token = await api.token(user);
        const admin = await api.adminToken();
        for (const path of ["/", "/nope", "/api", "/api/guilds", "/api/guilds/g", "/api/guilds/g/unknown", "/api/guilds/g/messages/extra", "/api/dev", "/api/dev/other", "/gateway/extra"]) {
          expectError(await api.request("GET", path, { token }), 404);
        }
        const unknown = uid("e404-never-created");
        expectError(await api.request("GET", `/api/guilds/${unknown}/messages`, { token }), 404);
        expectError(await api.request("POST", `/api/guilds/${unknown}/messages`, { token, json: { content: "anyone?" } }), 404);
        expectError(await api.request("DELETE", `/api/guilds/${unknown}/members/${user}`, { token: admin }), 404);
        expectError(await api.request("GET", `/api/guilds/${unknown}/timings`, { token: admin }), 404);
      },
      TEST_TIMEOUT,
    );

    it(
      "405 for a wrong method, with an Allow header",
      async () => {
        const cases: [string, string, string[]][] = [
          ["DELETE", "/api/guilds/g/messages", ["GET", "HEAD", "POST"]],
          ["PUT", "/api/guilds/g/messages", ["GET", "HEAD", "POST"]],
          ["GET", "/api/guilds/g/members/u", ["DELETE", "PUT"]],
          ["POST", "/api/guilds/g/members/u", ["DELETE", "PUT"]],
          ["POST", "/api/guilds/g/timings", ["GET", "HEAD"]],
          ["GET", "/api/dev/token", ["POST"]],
          ["POST", "/gateway", ["GET", "HEAD"]],
        ];
        for (const [method, path, allowed] of cases) {
          const response = await api.request(method, path, { token: await api.adminToken() });
          expectError(response, 405);
          const allow = (response.headers.get("Allow") ?? "").split(",").map((m) => m.trim()).filter(Boolean).sort();
          expect(allow, `${method} ${path}`).toEqual(allowed);
        }
      },
      TEST_TIMEOUT,
    );

    it(
      "HEAD answers as GET would, without a body",
      async () => {
        const [guild, user] = [uid("ehead-g"), uid("ehead-user")];
        await api.addMembers(guild, user);
        const token = await api.token(user);
        await api.post(guild, user, "one");
        const get = await api.request("GET", `/api/guilds/${guild}/messages`, { token });
        const head = await api.request("HEAD", `/api/guilds/${guild}/messages`, { token });
        expect(get.status).toBe(200);
        expect((get.body as unknown[]).length).toBe(1);
        expect({ status: head.status, type: head.headers.get("Content-Type"), text: head.text }).toEqual({ status: 200, type: get.headers.get("Content-Type"), text: "" });

        const unknown = await api.request("HEAD", `/api/guilds/${uid("ehead-never")}/messages`, { token });
        expect({ status: unknown.status, text: unknown.text }).toEqual({ status: 404, text: "" });
        const wrong = await api.request("HEAD", "/api/dev/token", {});
        expect({ status: wrong.status, allow: wrong.headers.get("Allow"), text: wrong.text }).toEqual({ status: 405, allow: "POST", text: "" });
      },
      TEST_TIMEOUT,
    );

    it(
      "413 for a body over 64 KiB, with or without a Content-Length",
      async () => {
        const [guild, user] = [uid("e413-g"), uid("e413-user")];
        await api.addMembers(guild, user);
        const token = await api.token(user);
        const big = JSON.stringify({ content: "x".repeat(64 * 1024) });
        expectError(await api.request("POST", `/api/guilds/${guild}/messages`, { token, body: big }), 413);
        expectError(await api.request("POST", "/api/dev/token", { body: JSON.stringify({ user_id: "x", pad: "y".repeat(70_000) }) }), 413);

        const chunks = [new TextEncoder().encode(big.slice(0, 40_000)), new TextEncoder().encode(big.slice(40_000))];
        const stream = new ReadableStream<Uint8Array>({
          pull(controller) {
            const chunk = chunks.shift();
            if (chunk) controller.enqueue(chunk);
            else controller.close();
          },
        });
        const response = await fetch(`${api.baseUrl}/api/guilds/${guild}/messages`, {
          method: "POST",
          headers: { Authorization: `Bearer ${token}` },
          body: stream,
          duplex: "half",
        } as RequestInit);
        const text = await response.text();
        expectError({ status: response.status, headers: response.headers, text, body: JSON.parse(text) as unknown }, 413);
        expect((await api.history(guild, user)).body).toEqual([]);
      },
      TEST_TIMEOUT,
    );

    it(
      "429 for one author posting rapidly (burst of 50, then 10/s), and only for that author",
      async () => {
        const [guild, spammer, bystander] = [uid("e429-g"), uid("e429-spammer"), uid("e429-bystander")];
        await api.addMembers(guild, spammer, bystander);
        await api.token(spammer);
        const responses = await Promise.all(range(1, 150).map((i) => api.tryPost(guild, spammer, `spam ${i}`)));
        const accepted = responses.filter((r) => r.status === 201);
        const limited = responses.filter((r) => r.status === 429);
        expect(accepted.length + limited.length).toBe(responses.length);
        expect(accepted.length).toBeGreaterThanOrEqual(50);
        expect(limited.length).toBeGreaterThanOrEqual(1);
        for (const response of limited) {
          expectError(response, 429);
          expect(Number(response.headers.get("Retry-After")), "Retry-After").toBeGreaterThanOrEqual(1);
        }

        // Rate limited posts took no seq: the accepted ones are 1..n, all stored.
        const seqs = accepted.map((r) => r.body.seq).sort((a, b) => a - b);
        expect(seqs).toEqual(range(1, accepted.length));
        const stored = await api.history(guild, spammer, "?limit=100");
        expect(stored.body.map((m) => m.seq)).toEqual(seqs.slice(0, 100));

        // Another author in the same guild is not limited; the spammer gets tokens back over time.
        expect((await api.tryPost(guild, bystander, "hi")).status).toBe(201);
        await sleep(1200);
        expect((await api.tryPost(guild, spammer, "a second later")).status).toBe(201);
      },
      TEST_TIMEOUT,
    );

    it(
      "426 for GET /gateway (or the bench room) without a WebSocket upgrade",
      async () => {
        expectError(await api.request("GET", "/gateway"), 426);
        expectError(await api.request("GET", "/api/dev/bench-room/r1"), 426);
      },
      TEST_TIMEOUT,
    );
  });

  // ---- 7. close codes ------------------------------------------------------------------------

  describe("gateway close codes", () => {
    it(
      "4001 for an unknown opcode, and for a server-only opcode after READY",
      async () => {
        const user = uid("c4001");
        await api.addMembers(uid("c4001-g"), user);
        const token = await api.token(user);

        const fresh = await clients.connect();
        fresh.send({ op: 42, d: null });
        const afterReady = await Promise.all([0, 7, 9, 10, 11, 42].map(async (op) => {
          const { client } = await clients.identified(token);
          client.send({ op, d: null });
          return { op, client };
        }));
        await expectClose(fresh, CloseCode.UNKNOWN_OPCODE);
        for (const { op, client } of afterReady) {
          const closed = await client.waitForClose(10_000);
          expect(closed.code, `op ${op} after READY`).toBe(CloseCode.UNKNOWN_OPCODE);
        }
      },
      TEST_TIMEOUT,
    );

    it(
      "4002 for frames that are not JSON objects, too big, binary, or malformed payloads — a frame of exactly 16 KiB is fine",
      async () => {
        const user = uid("c4002");
        await api.addMembers(uid("c4002-g"), user);
        const token = await api.token(user);
        const heartbeatOfSize = (bytes: number) => {
          const base = JSON.stringify({ op: Op.HEARTBEAT, d: null, pad: "" });
          return JSON.stringify({ op: Op.HEARTBEAT, d: null, pad: "a".repeat(bytes - base.length) });
        };
        const cases: { name: string; identified: boolean; send(client: GatewayClient): void }[] = [
          { name: "not JSON", identified: false, send: (c) => c.send("hello?") },
          { name: "not JSON after READY", identified: true, send: (c) => c.send("{\"op\": 1,") },
          { name: "JSON array", identified: false, send: (c) => c.send("[1, 2]") },
          { name: "JSON number", identified: true, send: (c) => c.send("42") },
          { name: "JSON null", identified: false, send: (c) => c.send("null") },
          { name: "JSON string", identified: false, send: (c) => c.send('"op"') },
          { name: "frame > 16 KiB", identified: true, send: (c) => c.send(heartbeatOfSize(16 * 1024 + 1)) },
          { name: "frame > 16 KiB in bytes, not characters", identified: false, send: (c) => c.send(JSON.stringify({ op: 1, d: null, pad: "€".repeat(6000) })) },
          { name: "binary frame", identified: false, send: (c) => c.socket.send(Buffer.from(JSON.stringify({ op: 1, d: null }))) },
          { name: "binary frame after READY", identified: true, send: (c) => c.socket.send(Buffer.from([0, 1, 2, 3])) },
          { name: "IDENTIFY without d", identified: false, send: (c) => c.send({ op: Op.IDENTIFY }) },
          { name: "IDENTIFY d = {}", identified: false, send: (c) => c.send({ op: Op.IDENTIFY, d: {} }) },
          { name: "IDENTIFY d = string", identified: false, send: (c) => c.send({ op: Op.IDENTIFY, d: token }) },
          { name: "IDENTIFY token = number", identified: false, send: (c) => c.send({ op: Op.IDENTIFY, d: { token: 5 } }) },
          { name: "RESUME without seq", identified: false, send: (c) => c.send({ op: Op.RESUME, d: { token, session_id: "x" } }) },
          { name: "RESUME with negative seq", identified: false, send: (c) => c.send({ op: Op.RESUME, d: { token, session_id: "x", seq: -1 } }) },
          { name: "HEARTBEAT d = string", identified: true, send: (c) => c.send({ op: Op.HEARTBEAT, d: "last" }) },
        ];
        const running = await Promise.all(cases.map(async (testCase) => {
          const client = testCase.identified ? (await clients.identified(token)).client : await clients.connect();
          await client.waitFor(() => client.frames.find((f) => f.op === Op.HELLO), 10_000, "HELLO");
          testCase.send(client);
          return { testCase, client };
        }));
        for (const { testCase, client } of running) {
          const closed = await client.waitForClose(10_000);
          expect(closed.code, testCase.name).toBe(CloseCode.DECODE_ERROR);
        }

        // The limit is "over 16 KiB": exactly 16 KiB is a valid heartbeat.
        const { client } = await clients.identified(token);
        client.send(heartbeatOfSize(16 * 1024));
        await client.waitFor(() => heartbeatAcks(client) === 1, 10_000, "ACK of a 16 KiB heartbeat");
        expect(client.closed).toBeNull();
      },
      TEST_TIMEOUT,
    );

    it(
      "4003 for a server-only opcode before IDENTIFY (HEARTBEAT before IDENTIFY is fine)",
      async () => {
        const checks = await Promise.all([0, 7, 9, 10, 11].map(async (op) => {
          const client = await clients.connect();
          client.send({ op: Op.HEARTBEAT, d: null });
          await client.waitFor(() => heartbeatAcks(client) === 1, 10_000, "ACK before IDENTIFY");
          expect(client.frames.find((f) => f.op === Op.HEARTBEAT_ACK)).toEqual({ op: Op.HEARTBEAT_ACK, d: null }); // `d` as in every frame
          client.send({ op, d: op === 0 ? { hello: true } : null, ...(op === 0 ? { s: 1, t: "READY" } : {}) });
          return { op, client };
        }));
        for (const { op, client } of checks) {
          const closed = await client.waitForClose(10_000);
          expect(closed.code, `op ${op} before IDENTIFY`).toBe(CloseCode.NOT_AUTHENTICATED);
          expect(client.dispatches()).toEqual([]);
        }
      },
      TEST_TIMEOUT,
    );

    it(
      "4004 for a bad token in IDENTIFY or RESUME, and for resuming another user's session (which stays resumable by its owner)",
      async () => {
        const [guild, owner, thief] = [uid("c4004-g"), uid("c4004-owner"), uid("c4004-thief")];
        await api.addMembers(guild, owner, thief);
        const ownerToken = await api.token(owner);
        const [payload, signature] = ownerToken.split(".") as [string, string];
        const forged = `${Buffer.from(JSON.stringify({ sub: owner, role: "admin", exp: 4102444800 })).toString("base64url")}.${signature}`;

        const badIdentify = await Promise.all(["nope", forged, `${payload}.AAAA`, ""].map(async (token) => {
          const client = await clients.connect();
          client.send({ op: Op.IDENTIFY, d: { token } });
          return client;
        }));
        for (const client of badIdentify) {
          await expectClose(client, CloseCode.AUTHENTICATION_FAILED);
          expect(client.dispatches()).toEqual([]);
        }

        const { client: original, ready } = await clients.identified(ownerToken);
        await api.post(guild, thief, "one");
        await waitForMessages(original, guild, 1);
        const seen = original.seq!;
        original.drop();
        await api.post(guild, thief, "two");

        const badResume = await clients.resume(forged, ready.session_id, seen);
        await expectClose(badResume, CloseCode.AUTHENTICATION_FAILED);
        const stolen = await clients.resume(await api.token(thief), ready.session_id, seen);
        await expectClose(stolen, CloseCode.AUTHENTICATION_FAILED);
        expect([...badResume.dispatches(), ...stolen.dispatches()]).toEqual([]);

        const rightful = await clients.resume(ownerToken, ready.session_id, seen);
        await rightful.waitForDispatch("RESUMED");
        await waitForMessages(rightful, guild, 1);
        expect(guildSeqs([original, rightful], guild)).toEqual([1, 2]);
      },
      TEST_TIMEOUT,
    );

    it(
      "4005 for a second IDENTIFY, or a RESUME after IDENTIFY",
      async () => {
        const user = uid("c4005");
        await api.addMembers(uid("c4005-g"), user);
        const token = await api.token(user);
        const { client: twice } = await clients.identified(token);
        twice.send({ op: Op.IDENTIFY, d: { token } });
        const { client: resumeAfter, ready } = await clients.identified(token);
        resumeAfter.send({ op: Op.RESUME, d: { token, session_id: ready.session_id, seq: 1 } });
        await expectClose(twice, CloseCode.ALREADY_AUTHENTICATED);
        await expectClose(resumeAfter, CloseCode.ALREADY_AUTHENTICATED);
        expect(twice.dispatches("READY")).toHaveLength(1);
      },
      TEST_TIMEOUT,
    );

    it(
      "4007 for RESUME with a seq ahead of the session; the session is still resumable afterwards",
      async () => {
        const [guild, user, author] = [uid("c4007-g"), uid("c4007-user"), uid("c4007-author")];
        await api.addMembers(guild, user, author);
        const token = await api.token(user);
        const { client: first, ready } = await clients.identified(token);
        const { client: watching } = await clients.identified(await api.token(author));
        await api.post(guild, author, "one");
        await api.post(guild, author, "two");
        await waitForMessages(first, guild, 2);
        const seen = first.seq!;
        first.drop();
        const missed = await api.post(guild, author, "three");
        await waitForMessages(watching, guild, 3);
        await sleep(SETTLE_MS);

        // The session has sent seen + 1 dispatches (one while away): seen + 2 is ahead.
        const ahead = await clients.resume(token, ready.session_id, seen + 2);
        await expectClose(ahead, CloseCode.INVALID_SEQ);
        expect(ahead.dispatches()).toEqual([]);
        const wayAhead = await clients.resume(token, ready.session_id, seen + 1000);
        await expectClose(wayAhead, CloseCode.INVALID_SEQ);

        const good = await clients.resume(token, ready.session_id, seen);
        const resumed = await good.waitForDispatch("RESUMED");
        expect(framesBefore(good, resumed).filter((f) => f.op === Op.DISPATCH).map((f) => f.d)).toEqual([missed]);
        expect(sessionSeqs([first, good])).toEqual(range(1, seen + 2));
      },
      TEST_TIMEOUT,
    );

    it(
      "4008 for more than 120 frames in a minute (110 are fine)",
      async () => {
        const user = uid("c4008");
        await api.addMembers(uid("c4008-g"), user);
        const { client } = await clients.identified(await api.token(user));
        // IDENTIFY was frame 1; 109 heartbeats make 110.
        for (let i = 0; i < 109; i++) client.send({ op: Op.HEARTBEAT, d: 1 });
        await client.waitFor(() => heartbeatAcks(client) === 109, 10_000, "109 ACKs");
        expect(client.closed).toBeNull();
        for (let i = 0; i < 20; i++) client.send({ op: Op.HEARTBEAT, d: 1 });
        await expectClose(client, CloseCode.RATE_LIMITED);
        expect(heartbeatAcks(client)).toBeLessThan(129);
      },
      TEST_TIMEOUT,
    );
  });

  // ---- 8. bad input loses nothing ------------------------------------------------------------

  describe("bad input", () => {
    it(
      "closing misbehaving clients mid-stream loses nothing: history, other sessions and the resumed ones have every message in order",
      async () => {
        const [guild, bad1, bad2, observer, author] = [uid("lossless-g"), uid("ll-bad1"), uid("ll-bad2"), uid("ll-observer"), uid("ll-author")];
        await api.addMembers(guild, bad1, bad2, observer, author);
        const tokens = { bad1: await api.token(bad1), bad2: await api.token(bad2) };
        const s1 = await clients.identified(tokens.bad1);
        const s2 = await clients.identified(tokens.bad2);
        const { client: watching } = await clients.identified(await api.token(observer));

        const TOTAL = 40;
        const posting = (async () => {
          const posted: Message[] = [];
          for (let i = 0; i < TOTAL; i++) {
            posted.push(await api.post(guild, author, `stream ${i}`));
            await sleep(15);
          }
          return posted;
        })();

        await waitForMessages(s1.client, guild, 8);
        s1.client.send("this is not json");
        await waitForMessages(s2.client, guild, 20);
        s2.client.socket.send(Buffer.from([0xde, 0xad]));
        const [closed1, closed2] = [await s1.client.waitForClose(), await s2.client.waitForClose()];
        expect([closed1.code, closed2.code]).toEqual([CloseCode.DECODE_ERROR, CloseCode.DECODE_ERROR]);
        const posted = await posting;
        expect(posted.map((m) => m.seq)).toEqual(range(1, TOTAL));
        // The bad frames really came mid-stream.
        expect(messagesOf(s1.client, guild).length).toBeLessThan(TOTAL);

        const history = await api.history(guild, observer, "?limit=100");
        expect(history.body).toEqual(posted);
        await waitForMessages(watching, guild, TOTAL);

        // A session closed for bad input is resumable (it was not the client closing with 1000).
        const resumed = await Promise.all([
          { session: s1, token: tokens.bad1 },
          { session: s2, token: tokens.bad2 },
        ].map(async ({ session, token }) => {
          const next = await clients.resume(token, session.ready.session_id, session.client.seq!);
          await next.waitForDispatch("RESUMED");
          return [session.client, next];
        }));
        for (const sockets of resumed) await waitForMessages(sockets[1]!, guild, TOTAL - messagesOf(sockets[0]!, guild).length);
        await sleep(SETTLE_MS);

        expect(messagesOf(watching, guild)).toEqual(posted);
        for (const sockets of resumed) {
          expect(sockets.flatMap((socket) => messagesOf(socket, guild))).toEqual(posted);
          const seqs = sessionSeqs(sockets);
          expect(seqs).toEqual(range(1, seqs.length));
        }
      },
      TEST_TIMEOUT,
    );
  });
});

// ---- 7 (4009) and 9: servers started with other settings ------------------------------------

describe("guildwire with other settings", () => {
  const SECRET = `e2e-production-secret-${Date.now()}`;
  let production: DevServer | undefined;
  let noSecret: DevServer | undefined;
  let api: Api;
  const clients = new Clients(() => production!.url);
  const noSecretClients = new Clients(() => noSecret!.url);

  beforeAll(async () => {
    const started = await Promise.allSettled([
      startDevServer({ vars: { ENVIRONMENT: "production", AUTH_SECRET: SECRET, HEARTBEAT_INTERVAL_MS: "1000" } }),
      startDevServer({ vars: { AUTH_SECRET: "" } }),
    ]);
    if (started[0].status === "fulfilled") production = started[0].value;
    if (started[1].status === "fulfilled") noSecret = started[1].value;
    const failed = started.find((result) => result.status === "rejected");
    if (failed) {
      // Never leave the one that did start running.
      await Promise.allSettled([production?.stop(), noSecret?.stop()]);
      production = noSecret = undefined;
      throw failed.reason;
    }
    // Outside development there is no token route: sign tokens with the secret we configured.
    api = new Api(production!.url, signedTokens(SECRET));
  }, START_TIMEOUT);

  afterAll(async () => {
    clients.dropAll();
    noSecretClients.dropAll();
    await Promise.allSettled([production?.stop(), noSecret?.stop()]);
  });

  beforeEach(({ onTestFailed }) => {
    onTestFailed(() => {
      console.error(`production wrangler dev output (tail):\n${production?.output().slice(-3000)}`);
      console.error(`no-secret wrangler dev output (tail):\n${noSecret?.output().slice(-3000)}`);
    });
  });

  afterEach(() => {
    clients.dropAll();
    noSecretClients.dropAll();
  });

  it(
    "outside development, /api/dev/* is 404 while the rest of the API works with real tokens",
    async () => {
      expectError(await api.request("POST", "/api/dev/token", { json: { user_id: "someone", admin: true } }), 404);
      expectError(await api.request("POST", "/api/dev/token", { json: { user_id: "someone" } }), 404);
      expectError(await api.request("GET", "/api/dev/token"), 404);

      const [guild, user] = [uid("prod-g"), uid("prod-user")];
      expect((await api.putMember(guild, user)).status).toBe(201);
      expect((await api.tryPost(guild, user, "hello from production")).status).toBe(201);
      const expired = signToken(SECRET, { sub: user, role: "user", exp: Math.floor(Date.now() / 1000) - 60 });
      expectError(await api.request("GET", `/api/guilds/${guild}/messages`, { token: expired }), 401);
    },
    TEST_TIMEOUT,
  );

  it(
    "npm run token signs, with AUTH_SECRET from the environment, tokens the production gateway accepts",
    async () => {
      const run = (args: string[], secret?: string) =>
        promisify(execFile)("npm", ["run", "-s", "token", "--", ...args], { cwd: ROOT, env: { ...process.env, AUTH_SECRET: secret ?? "" } });
      const [guild, user] = [uid("token-g"), uid("token-user")];
      const admin = (await run(["--user", "ops", "--admin"], SECRET)).stdout.trim();
      const member = await api.request("PUT", `/api/guilds/${guild}/members/${user}`, { token: admin });
      expect(member.status, member.text).toBe(201);
      const userToken = (await run(["--user", user, "--ttl", "600"], SECRET)).stdout.trim();
      const { ready } = await clients.identified(userToken);
      expect(ready.user_id).toBe(user);
      expect(ready.guilds).toEqual([guild]);
      // A user's token is not an admin's; without the secret there is no token at all.
      expectError(await api.request("PUT", `/api/guilds/${guild}/members/other`, { token: userToken }), 403, "forbidden");
      await expect(run(["--user", user])).rejects.toMatchObject({ code: 2, stderr: expect.stringMatching(/AUTH_SECRET must be set/) });
    },
    TEST_TIMEOUT,
  );

  it(
    "with AUTH_SECRET empty, the API and the gateway refuse with 500 server_misconfigured",
    async () => {
      const bare = new Api(noSecret!.url, async () => "no-token-can-be-valid");
      expectError(await bare.request("POST", "/api/dev/token", { json: { user_id: "someone" } }), 500, "server_misconfigured");
      expectError(await bare.request("GET", "/api/guilds/g/messages", { token: "x.y" }), 500, "server_misconfigured");
      expectError(await bare.request("POST", "/api/guilds/g/messages", { token: "x.y", json: { content: "hi" } }), 500, "server_misconfigured");
      expectError(await bare.request("PUT", "/api/guilds/g/members/u", { token: "x.y" }), 500, "server_misconfigured");
      // No socket to be told "bad token" on later: a health check on /gateway sees the fault.
      await expect(noSecretClients.connect()).rejects.toThrow(/gateway answered 500/);
    },
    TEST_TIMEOUT,
  );

  it(
    "4009 when no heartbeat arrives within 1.5 × the interval; the session stays resumable",
    async () => {
      const [guild, user] = [uid("hb-g"), uid("hb-user")];
      await api.addMembers(guild, user);
      const token = await api.token(user);
      const silent = await clients.connect();
      const connectedAt = Date.now();
      const hello = await silent.waitFor(() => silent.frames.find((f) => f.op === Op.HELLO), 10_000, "HELLO");
      expect(hello.d).toEqual({ heartbeat_interval: 1000 });

      silent.send({ op: Op.IDENTIFY, d: { token } });
      const ready = (await silent.waitForDispatch("READY")).d as ReadyData;
      await expectClose(silent, CloseCode.SESSION_TIMED_OUT, 10_000);
      const elapsed = Date.now() - connectedAt;
      expect(elapsed).toBeGreaterThanOrEqual(1400);
      expect(elapsed).toBeLessThan(8000);

      // 4009 is not the client ending the session: RESUME picks it up with what it missed.
      const missed = await api.post(guild, user, "while timed out");
      await sleep(SETTLE_MS);
      const resumedSocket = await clients.resume(token, ready.session_id, silent.seq!);
      const resumed = await resumedSocket.waitForDispatch("RESUMED");
      expect(framesBefore(resumedSocket, resumed).filter((f) => f.op === Op.DISPATCH).map((f) => f.d)).toEqual([missed]);
    },
    TEST_TIMEOUT,
  );

  it(
    "HEARTBEAT gets op 11 and keeps the session alive well past the timeout; stopping it times out",
    async () => {
      const [guild, user] = [uid("hb-alive-g"), uid("hb-alive-user")];
      await api.addMembers(guild, user);
      const { client } = await clients.identified(await api.token(user));
      let sent = 0;
      const timer = setInterval(() => {
        if (!client.closed) {
          client.send({ op: Op.HEARTBEAT, d: client.seq });
          sent++;
        }
      }, 250);
      try {
        await sleep(2000);
        const message = await api.post(guild, user, "still here");
        await waitForMessages(client, guild, 1);
        expect(messagesOf(client, guild)).toEqual([message]);
        await sleep(2000);
      } finally {
        clearInterval(timer);
      }
      expect(client.closed).toBeNull();
      await client.waitFor(() => heartbeatAcks(client) >= sent - 1, 5000, "ACKs");
      expect(sent).toBeGreaterThanOrEqual(6);
      expect(heartbeatAcks(client)).toBeGreaterThanOrEqual(sent - 1);
      expect(heartbeatAcks(client)).toBeLessThanOrEqual(sent);

      const stoppedAt = Date.now();
      await expectClose(client, CloseCode.SESSION_TIMED_OUT, 10_000);
      expect(Date.now() - stoppedAt).toBeGreaterThanOrEqual(800);
    },
    TEST_TIMEOUT,
  );
});
