/**
 * Request bodies without Content-Length (chunked): refused with 413 as soon as they pass the
 * limit, not buffered whole first; smaller ones are read as before.
 */
import { SELF } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { MAX_BODY_BYTES } from "../../src/api/http.ts";
import { addMember, token } from "./gateway-client.ts";

const CHUNK_BYTES = 16 * 1024;

/** A body of `total` bytes in CHUNK_BYTES pieces, pulled only as the reader asks; counts what it gave. */
function streamed(total: number, fill: (offset: number, chunk: Uint8Array) => void = () => {}) {
  const counts = { pulled: 0 };
  const body = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (counts.pulled >= total) return controller.close();
      const chunk = new Uint8Array(Math.min(CHUNK_BYTES, total - counts.pulled)).fill(0x20);
      fill(counts.pulled, chunk);
      counts.pulled += chunk.byteLength;
      controller.enqueue(chunk);
    },
  });
  return { body, counts };
}

async function postMessage(guildId: string, userId: string, body: ReadableStream<Uint8Array>): Promise<Response> {
  const request = new Request(`http://gateway.test/api/guilds/${guildId}/messages`, {
    method: "POST",
    headers: { Authorization: `Bearer ${await token(userId)}` },
    body,
  });
  expect(request.headers.get("content-length")).toBeNull();
  return SELF.fetch(request);
}

describe("request bodies without Content-Length", () => {
  it("413 once over the limit, without reading the rest", async () => {
    await addMember("body-limit", "body-user");
    const total = 64 * MAX_BODY_BYTES; // 4 MiB
    const { body, counts } = streamed(total);
    const response = await postMessage("body-limit", "body-user", body);
    expect(response.status).toBe(413);
    expect(await response.json()).toEqual({ error: { code: "payload_too_large", message: expect.stringContaining(String(MAX_BODY_BYTES)) } });
    // Read up to just past the limit, plus what the pipe between the two holds.
    expect(counts.pulled).toBeLessThan(total / 4);
  });

  it("still reads a body under the limit that arrives in many chunks", async () => {
    await addMember("body-limit", "body-user");
    const json = new TextEncoder().encode(JSON.stringify({ content: "chunked hello" }));
    // The JSON at the start, then spaces (valid JSON whitespace) up to just under the limit.
    const { body } = streamed(MAX_BODY_BYTES - 1, (offset, chunk) => {
      if (offset === 0) chunk.set(json);
    });
    const response = await postMessage("body-limit", "body-user", body);
    expect(response.status).toBe(201);
    expect(await response.json()).toMatchObject({ guild_id: "body-limit", author_id: "body-user", content: "chunked hello" });
  });
});
