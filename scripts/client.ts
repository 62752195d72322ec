/**
 * A small command-line gateway client:
 *
 *   npm run client -- --user alice [--join lobby] [--guild lobby] [--url http://127.0.0.1:8787]
 *
 * Gets a development token, connects, identifies, prints every dispatch, and posts each line you
 * type to the current guild (`/guild NAME` switches), one after another in the order typed, once
 * the session is ready. `--join` adds you to a guild first (with a
 * development admin token). If the connection drops, it reconnects (1 s, doubling up to 30 s) and
 * RESUMEs, or IDENTIFYs afresh once the session has expired; a refused token is renewed once.
 * A post that fails on the way (a lost connection, a 5xx, a 429) is tried again up to twice with
 * the same Idempotency-Key, so it is never stored twice.
 */
import { randomUUID } from "node:crypto";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { CloseCode, Op } from "../src/gateway/protocol.ts";
import { GatewayClient } from "./lib/gateway-client.ts";
import { printable } from "./lib/terminal.ts";

const { values } = parseArgs({
  options: {
    user: { type: "string" },
    url: { type: "string", default: "http://127.0.0.1:8787" },
    join: { type: "string", multiple: true, default: [] },
    guild: { type: "string" },
  },
});
if (!values.user) {
  console.error("usage: npm run client -- --user NAME [--join GUILD] [--guild GUILD] [--url URL]");
  process.exit(2);
}
const base = values.url.replace(/\/$/, "");
const user = values.user;

async function devToken(userId: string, admin = false): Promise<string> {
  const response = await fetch(`${base}/api/dev/token`, { method: "POST", body: JSON.stringify({ user_id: userId, admin }) });
  if (!response.ok) throw new Error(`could not get a development token (${response.status}): ${await response.text()}`);
  return ((await response.json()) as { token: string }).token;
}

let token = await devToken(user);
for (const guild of values.join) {
  const response = await fetch(`${base}/api/guilds/${guild}/members/${user}`, {
    method: "PUT",
    headers: { Authorization: `Bearer ${await devToken("cli-admin", true)}` },
  });
  if (!response.ok) throw new Error(`could not join ${guild}: ${await response.text()}`);
}

const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 30_000;

let current = values.guild ?? values.join[0];
let client: GatewayClient | undefined;
let handled = 0;
/** The session to RESUME; undefined → IDENTIFY. */
let sessionId: string | undefined;
/**
 * Last dispatch `s` seen on any connection: a resumed socket that drops before its first
 * dispatch must still resume from here (0 would be too old for the server's buffer → op 9).
 */
let lastSeq = 0;
/** Wait before the next reconnect: doubles per failed attempt, back to the minimum on READY/RESUMED. */
let retryMs = RETRY_MIN_MS;
/** A new token was fetched after a 4004 and no session has started since: another 4004 is final. */
let tokenRenewed = false;
/**
 * READY (or RESUMED) came and no IDENTIFY has been sent since. Until then a typed message waits:
 * posted earlier, it would reach the others but not this session, which subscribes as it
 * identifies. (While a RESUME is under way the session is still subscribed, so nothing waits.)
 */
let sessionReady = false;
let readyWaiters: (() => void)[] = [];

function setReady(ready: boolean): void {
  sessionReady = ready;
  if (!ready) return;
  for (const resume of readyWaiters) resume();
  readyWaiters = [];
}

async function untilReady(): Promise<void> {
  if (sessionReady) return;
  if (readyWaiters.length === 0) console.log("* waiting for the session to be ready; what you type is sent then");
  await new Promise<void>((resolve) => readyWaiters.push(resolve));
}

function handshake(gateway: GatewayClient): void {
  if (sessionId) return gateway.send({ op: Op.RESUME, d: { token, session_id: sessionId, seq: lastSeq } });
  setReady(false);
  gateway.send({ op: Op.IDENTIFY, d: { token } });
}

/** READY or RESUMED: the connection works, so the next drop starts the backoff and token renewal anew. */
function sessionStarted(): void {
  retryMs = RETRY_MIN_MS;
  tokenRenewed = false;
  setReady(true);
}

/** Acts on the frames not handled yet: the handshake, an invalid session, and printing dispatches. */
function handle(gateway: GatewayClient): void {
  for (; handled < gateway.frames.length; handled++) {
    const frame = gateway.frames[handled]!;
    if (frame.op === Op.HELLO) {
      gateway.startHeartbeat();
      handshake(gateway);
    } else if (frame.op === Op.INVALID_SESSION) {
      // The session is gone (away longer than the resume window): start a new one on this socket.
      console.log("* session expired; identifying afresh (messages sent meanwhile are not shown)");
      sessionId = undefined;
      handshake(gateway);
    } else if (frame.op === Op.RECONNECT) {
      gateway.socket.close(4000, "reconnect requested"); // not 1000, which would end the session
    }
    if (frame.op !== Op.DISPATCH) continue;
    lastSeq = frame.s!;
    const d = frame.d as Record<string, unknown>;
    switch (frame.t) {
      case "READY":
        sessionId = d.session_id as string;
        current ??= (d.guilds as string[])[0];
        sessionStarted();
        console.log(`* ready as ${user} in ${(d.guilds as string[]).join(", ") || "no guilds yet"}; typing goes to ${current ?? "(none)"}`);
        break;
      case "MESSAGE_CREATE":
        console.log(`[${printable(d.guild_id)} #${printable(d.seq)}] ${printable(d.author_id)}: ${printable(d.content)}`);
        break;
      case "GUILD_CREATE":
      case "GUILD_DELETE":
        console.log(`* ${frame.t === "GUILD_CREATE" ? "joined" : "left"} ${printable(d.id)}`);
        break;
      case "RESUMED":
        sessionStarted();
        console.log("* resumed; nothing missed");
        break;
    }
  }
}

function giveUp(message: string): never {
  console.error(`* ${message}`);
  process.exit(1);
}

async function onClose(code: number, reason: string): Promise<void> {
  if (code === CloseCode.NORMAL) process.exit(0);
  if (code === CloseCode.AUTHENTICATION_FAILED) {
    if (tokenRenewed) giveUp(`the gateway refused a fresh token too (${reason}); giving up`);
    console.log(`* token refused (${reason}); getting a new one`);
    tokenRenewed = true;
    try {
      token = await devToken(user);
    } catch (error) {
      giveUp(`${(error as Error).message}; giving up`);
    }
    return connect();
  }
  if (code === CloseCode.INVALID_SEQ) sessionId = undefined; // our seq is not the session's: start over
  reconnectLater(`disconnected (${code} ${reason})`);
}

/** Connects and, once HELLO arrives, RESUMEs or IDENTIFYs; a failure is retried with backoff. */
async function connect(): Promise<void> {
  let gateway: GatewayClient;
  try {
    gateway = await GatewayClient.connect(base);
  } catch (error) {
    return reconnectLater(`could not connect (${(error as Error).message})`);
  }
  client = gateway;
  handled = 0;
  gateway.socket.on("message", () => handle(gateway));
  gateway.socket.on("close", (code: number, reason: Buffer) => void onClose(code, reason.toString()));
  handle(gateway); // HELLO may have come with the upgrade, before these listeners
}

function reconnectLater(why: string): void {
  console.log(`* ${why}; ${sessionId ? "resuming" : "reconnecting"} in ${retryMs / 1000} s…`);
  setTimeout(() => void connect(), retryMs);
  retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
}

await connect();

/** Typed lines, handled one after another in the order typed: posts go out in that order, and a `/guild` or `/quit` takes effect after the lines before it. */
let typed = Promise.resolve();
createInterface({ input: process.stdin }).on("line", (line) => {
  typed = typed.then(() => handleLine(line.trim())).catch((error: unknown) => console.log(`* ${(error as Error).message}`));
});

async function handleLine(text: string): Promise<void> {
  if (!text) return;
  if (text.startsWith("/guild ")) {
    current = text.slice(7).trim();
    return console.log(`* typing goes to ${current}`);
  }
  if (text === "/quit") {
    if (!client || client.closed) process.exit(0); // between connections
    return void client.close(CloseCode.NORMAL); // ends the session; its close exits
  }
  await untilReady();
  if (!current) return console.log("* no guild to post to: start with --join GUILD");
  await postLine(current, text);
}

const POST_ATTEMPTS = 3;

async function postLine(guild: string, content: string): Promise<void> {
  const key = randomUUID();
  for (let attempt = 1; ; attempt++) {
    let failure: string;
    let waitMs = 1000 * attempt;
    try {
      const response = await fetch(`${base}/api/guilds/${guild}/messages`, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}`, "Idempotency-Key": key },
        body: JSON.stringify({ content }),
      });
      if (response.ok) return;
      failure = `${response.status} ${printable(await response.text())}`;
      if (response.status !== 429 && response.status < 500) return console.log(`* not sent: ${failure}`);
      waitMs = Math.max(waitMs, Number(response.headers.get("Retry-After") ?? 0) * 1000);
    } catch (error) {
      failure = (error as Error).message;
    }
    if (attempt === POST_ATTEMPTS) return console.log(`* not sent: ${failure}`);
    await new Promise((resolve) => setTimeout(resolve, waitMs));
  }
}
