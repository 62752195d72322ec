import type { ProbeEnv } from "./worker.ts";
import type { Env as GuildwireEnv } from "../../src/env.ts";

declare global {
  namespace Cloudflare {
    interface Env extends GuildwireEnv, ProbeEnv {}
  }
}
