/**
 * A small command-line gateway client:
 *
 *   npm run client -- --user alice [--join lobby] [--guild lobby] [--url http://127.0.0.1:8787]
 *
 * Gets a development token, connects, identifies, prints every dispatch, and posts each line you
 * type to the current guild (`/guild NAME` switches). `--join` adds you to a guild first (with a
 * development admin token). If the connection drops, it reconnects and RESUMEs.
 */
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { Op } from "../src/gateway/protocol.ts";
import { GatewayClient } from "./lib/gateway-client.ts";

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

const token = await devToken(user);
for (const guild of values.join) {
  const response = await fetch(`${base}/api/guilds/${guild}/members/${user}`, {
    method: "PUT",
    headers: { Authorization: `Bearer ${await devToken("cli-admin", true)}` },
  });
  if (!response.ok) throw new Error(`could not join ${guild}: ${await response.text()}`);
}

let current = values.guild ?? values.join[0];
let sessionId: string | undefined;
let client: GatewayClient;
let printed = 0;

function show(): void {
  for (; printed < client.frames.length; printed++) {
    const frame = client.frames[printed]!;
    if (frame.op !== Op.DISPATCH) continue;
    const d = frame.d as Record<string, unknown>;
    switch (frame.t) {
      case "READY":
        sessionId = d.session_id as string;
        current ??= (d.guilds as string[])[0];
        console.log(`* ready as ${user} in ${(d.guilds as string[]).join(", ") || "no guilds yet"}; typing goes to ${current ?? "(none)"}`);
        break;
      case "MESSAGE_CREATE":
        console.log(`[${d.guild_id} #${d.seq}] ${d.author_id}: ${d.content}`);
        break;
      case "GUILD_CREATE":
      case "GUILD_DELETE":
        console.log(`* ${frame.t === "GUILD_CREATE" ? "joined" : "left"} ${d.id}`);
        break;
      case "RESUMED":
        console.log("* resumed; nothing missed");
        break;
    }
  }
}

async function connect(resume: boolean): Promise<void> {
  const previousSeq = client?.seq ?? 0;
  client = await GatewayClient.connect(base);
  printed = 0;
  client.socket.on("message", show);
  client.socket.on("close", (code: number, reason: Buffer) => {
    if (code === 1000) return process.exit(0);
    console.log(`* disconnected (${code} ${reason.toString()}); resuming…`);
    setTimeout(() => connect(true).catch((e: unknown) => console.error(e)), 1000);
  });
  await client.waitFor(() => client.frames.find((f) => f.op === Op.HELLO), 10_000, "HELLO");
  client.startHeartbeat();
  if (resume && sessionId) client.send({ op: Op.RESUME, d: { token, session_id: sessionId, seq: previousSeq } });
  else client.send({ op: Op.IDENTIFY, d: { token } });
}

await connect(false);

createInterface({ input: process.stdin }).on("line", async (line) => {
  const text = line.trim();
  if (!text) return;
  if (text.startsWith("/guild ")) {
    current = text.slice(7).trim();
    return console.log(`* typing goes to ${current}`);
  }
  if (text === "/quit") return void client.close(1000);
  if (!current) return console.log("* no guild to post to: start with --join GUILD");
  const response = await fetch(`${base}/api/guilds/${current}/messages`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}` },
    body: JSON.stringify({ content: text }),
  });
  if (!response.ok) console.log(`* not sent: ${response.status} ${await response.text()}`);
});
