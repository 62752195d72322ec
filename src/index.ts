/** The Worker entry: HTTP routes, and the Durable Object classes wrangler.toml binds. */
import { handleRequest } from "./api/routes.ts";
import type { Env } from "./env.ts";

export { BroadcastRoom } from "./bench/broadcast-room.ts";
export { Guild } from "./guild/guild.ts";
export { Relay } from "./guild/relay.ts";
export { User } from "./guild/user.ts";
export { Session } from "./session/session.ts";

export default {
  fetch(request, env, ctx) {
    return handleRequest(request, env, ctx);
  },
} satisfies ExportedHandler<Env>;
