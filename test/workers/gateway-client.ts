/** A WebSocket client inside workerd (SELF.fetch upgrade), recording every frame it receives. */
import { SELF, env, runInDurableObject } from "cloudflare:test";
import { signToken } from "../../src/api/tokens.ts";

export interface Frame {
  op: number;
  d?: unknown;
  s?: number;
  t?: string;
}

export async function token(userId: string, admin = false): Promise<string> {
  return signToken(env.AUTH_SECRET!, { sub: userId, role: admin ? "admin" : "user", exp: Math.floor(Date.now() / 1000) + 3600 });
}

export async function api(method: string, path: string, as: string, body?: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return SELF.fetch(`http://gateway.test${path}`, {
    method,
    headers: { ...headers, Authorization: `Bearer ${await token(as, as === "admin")}` },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
}

export async function addMember(guildId: string, userId: string): Promise<void> {
  const response = await api("PUT", `/api/guilds/${guildId}/members/${userId}`, "admin");
  if (!response.ok) throw new Error(`add member: ${response.status} ${await response.text()}`);
}

export async function post(guildId: string, as: string, content: string): Promise<{ seq: number }> {
  const response = await api("POST", `/api/guilds/${guildId}/messages`, as, { content });
  if (response.status !== 201) throw new Error(`post: ${response.status} ${await response.text()}`);
  return response.json();
}

/** A member's session in `guildId` that has received the guild's first message (`content`, "m1" by default). */
export async function sessionAfterFirstMessage(guildId: string, userId: string, content = "m1"): Promise<{ client: TestClient; sessionId: string }> {
  await addMember(guildId, userId);
  const client = await TestClient.connect();
  const sessionId = await client.identify(userId);
  await post(guildId, userId, content);
  await client.waitFor(() => client.messageSeqs(guildId).length === 1, content);
  return { client, sessionId };
}

export class TestClient {
  readonly frames: Frame[] = [];
  closed: { code: number; reason: string } | null = null;

  private constructor(readonly ws: WebSocket) {
    ws.addEventListener("message", (event) => {
      this.frames.push(JSON.parse(event.data as string) as Frame);
    });
    ws.addEventListener("close", (event) => {
      this.closed = { code: event.code, reason: event.reason };
    });
  }

  static async connect(): Promise<TestClient> {
    const response = await SELF.fetch("http://gateway.test/gateway", { headers: { Upgrade: "websocket" } });
    const ws = response.webSocket;
    if (!ws) throw new Error(`no websocket: ${response.status}`);
    ws.accept();
    return new TestClient(ws);
  }

  dispatches(t?: string): Frame[] {
    return this.frames.filter((f) => f.op === 0 && (t === undefined || f.t === t));
  }

  send(frame: unknown): void {
    this.ws.send(typeof frame === "string" ? frame : JSON.stringify(frame));
  }

  async waitFor<T>(predicate: () => T | undefined | null | false, what: string, timeoutMs = 5000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const value = predicate();
      if (value) return value;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last frames ${JSON.stringify(this.frames.slice(-3))}`);
      await scheduler.wait(5);
    }
  }

  async identify(userId: string): Promise<string> {
    await this.waitFor(() => this.frames.find((f) => f.op === 10), "HELLO");
    this.send({ op: 2, d: { token: await token(userId) } });
    const ready = await this.waitFor(() => this.dispatches("READY")[0], "READY");
    return (ready.d as { session_id: string }).session_id;
  }

  /** RESUMEs `sessionId` on this connection from `seq`; waits for RESUMED. */
  async resume(userId: string, sessionId: string, seq: number): Promise<void> {
    await this.waitFor(() => this.frames.find((f) => f.op === 10), "HELLO");
    this.send({ op: 6, d: { token: await token(userId), session_id: sessionId, seq } });
    await this.waitFor(() => this.dispatches("RESUMED")[0], "RESUMED");
  }

  messageSeqs(guildId?: string): number[] {
    return this.dispatches("MESSAGE_CREATE")
      .map((f) => f.d as { seq: number; guild_id: string })
      .filter((m) => guildId === undefined || m.guild_id === guildId)
      .map((m) => m.seq);
  }
}

/** Polls `check` until it gives something truthy, and returns that; fails naming `what` after `timeoutMs`. */
export async function eventually<T>(check: () => T | Promise<T>, what: string, timeoutMs = 5000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await scheduler.wait(10);
  }
}

/**
 * Replaces an RPC method on the prototype that every object of the stub's class in this isolate
 * shares (RPC finds methods there, not on the instance); returns what puts the original back.
 */
export async function patchMethod<T extends object>(
  stub: DurableObjectStub,
  method: string,
  replacement: (self: T, original: (...args: unknown[]) => unknown, args: unknown[]) => unknown,
): Promise<() => void> {
  const proto = await runInDurableObject(stub, (instance: object) => Object.getPrototypeOf(instance) as Record<string, (...args: unknown[]) => unknown>);
  const original = proto[method]!;
  proto[method] = function (this: T, ...args: unknown[]) {
    return replacement(this, original.bind(this), args);
  };
  return () => {
    proto[method] = original;
  };
}


/**
 * Holds every session delivery that carries a message containing `text` until `release()`;
 * until then, deliveries `refuse` picks (checked first) throw, and their sender retries them
 * after a pause. Patched on the Session class, so it applies to every session; `held()` counts
 * the deliveries held.
 */
export async function holdDeliveries(
  text: string,
  refuse: (events: string) => boolean = () => false,
): Promise<{ held(): number; release(): void; restore(): void }> {
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  let held = 0;
  let refusing = true;
  const anySession = env.SESSION.get(env.SESSION.newUniqueId());
  const restore = await patchMethod(anySession, "deliver", async (_self, original, args) => {
    const events = JSON.stringify((args[0] as { events: unknown[] }).events);
    if (refusing && refuse(events)) throw new Error("session busy");
    if (events.includes(text)) {
      held++;
      await released;
    }
    return original(...args);
  });
  return {
    held: () => held,
    release: () => {
      refusing = false;
      release();
    },
    restore,
  };
}
