import { DurableObject } from "cloudflare:workers";
import type { Env } from "../env.ts";

/**
 * The benchmark's `single-object` reference: every socket in one Durable Object, each message
 * broadcast in a loop. No protocol, no persistence, no tracing — what one object can do on this
 * runtime, to compare the guild/session design against. Reachable only in development.
 */
export class BroadcastRoom extends DurableObject<Env> {
  private seq = 0;

  override async fetch(request: Request): Promise<Response> {
    if (request.headers.get("Upgrade")?.toLowerCase() === "websocket") {
      const { 0: client, 1: server } = new WebSocketPair();
      this.ctx.acceptWebSocket(server);
      return new Response(null, { status: 101, webSocket: client });
    }
    const { content } = await request.json<{ content: string }>();
    const s = ++this.seq;
    const frame = JSON.stringify({ op: 0, t: "MESSAGE_CREATE", s, d: { content, seq: s } });
    for (const ws of this.ctx.getWebSockets()) ws.send(frame);
    return Response.json({ seq: s }, { status: 201 });
  }
}
