import { env, runDurableObjectAlarm } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import { DEFAULT_HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_FACTOR } from "../../src/gateway/protocol.ts";
import { TestClient, patchMethod } from "./gateway-client.ts";

afterEach(() => vi.restoreAllMocks());

describe("a connection that never identifies", () => {
  it("is closed 4003 once its first heartbeat deadline has passed, however often it heartbeats", async () => {
    // The Worker makes a new object per connection and never says which: note it as it is made.
    const opened: string[] = [];
    const restore = await patchMethod(env.SESSION.get(env.SESSION.newUniqueId()), "fetch", (self, original, args) => {
      opened.push((self as unknown as { ctx: DurableObjectState }).ctx.id.toString());
      return original(...args);
    });
    let client: TestClient;
    try {
      client = await TestClient.connect();
    } finally {
      restore();
    }
    await client.waitFor(() => client.frames.find((f) => f.op === 10), "HELLO");
    const stub = env.SESSION.get(env.SESSION.idFromString(opened[0]!));
    const start = Date.now();
    // An anonymous client heartbeats on time, forever; it never sends IDENTIFY or RESUME.
    const realNow = Date.now.bind(Date);
    let later = 0;
    vi.spyOn(Date, "now").mockImplementation(() => realNow() + later);
    for (const step of [1, 2, 3]) {
      later = step * DEFAULT_HEARTBEAT_INTERVAL_MS * 0.9;
      client.send({ op: 1, d: null });
      await client.waitFor(() => client.frames.filter((f) => f.op === 11).length === step, "heartbeat ACK");
      await runDurableObjectAlarm(stub);
      if (client.closed) break;
    }
    expect(Date.now() - start).toBeGreaterThan(DEFAULT_HEARTBEAT_INTERVAL_MS * HEARTBEAT_TIMEOUT_FACTOR);
    const closed = await client.waitFor(() => client.closed, "close", 2000);
    expect(closed.code).toBe(4003);
  });
});
