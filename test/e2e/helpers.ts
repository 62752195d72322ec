/** Small helpers for the end-to-end tests: HTTP calls, tokens, and gateway clients to clean up. */
import { createHmac } from "node:crypto";
import { expect } from "vitest";
import { type Message, Op, type ReadyData } from "../../src/gateway/protocol.ts";
import { type Frame, GatewayClient } from "../../scripts/lib/gateway-client.ts";

export type { Frame };

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

const run = Date.now().toString(36);
let counter = 0;
/** An id no other test (or earlier run against the same storage) uses. */
export const uid = (name: string): string => `${name}-${run}-${++counter}`;

export interface ApiResponse<T = unknown> {
  status: number;
  headers: Headers;
  text: string;
  /** The parsed JSON body (undefined when the body is not JSON). */
  body: T;
}

export interface RequestOptions {
  /** Bearer token; omitted → no Authorization header. */
  token?: string;
  /** JSON-encoded as the body. */
  json?: unknown;
  /** Sent as is. */
  body?: string;
  headers?: Record<string, string>;
}

/** Where tokens come from: the development route, or signed here with a secret we chose. */
export type TokenSource = (userId: string, admin: boolean) => Promise<string>;

export function devTokens(baseUrl: string): TokenSource {
  return async (userId, admin) => {
    const response = await fetch(`${baseUrl}/api/dev/token`, { method: "POST", body: JSON.stringify({ user_id: userId, admin }) });
    const text = await response.text();
    if (response.status !== 200) throw new Error(`POST /api/dev/token → ${response.status} ${text}`);
    return (JSON.parse(text) as { token: string }).token;
  };
}

/**
 * Signs a token the way CONTRACT.md's tokens are made — base64url(JSON claims) "." base64url(HMAC-SHA256) —
 * written here independently of src/ so that the tests check the server, not themselves.
 */
export function signToken(secret: string, claims: { sub: string; role: "user" | "admin"; exp: number }): string {
  const payload = Buffer.from(JSON.stringify(claims)).toString("base64url");
  return `${payload}.${createHmac("sha256", secret).update(payload).digest("base64url")}`;
}

export function signedTokens(secret: string): TokenSource {
  return async (userId, admin) => signToken(secret, { sub: userId, role: admin ? "admin" : "user", exp: Math.floor(Date.now() / 1000) + 3600 });
}

/** JSON of a response body, or undefined when it is not JSON (error pages, empty bodies). */
export function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

export class Api {
  private readonly tokens = new Map<string, Promise<string>>();

  constructor(
    readonly baseUrl: string,
    private readonly tokenSource: TokenSource,
  ) {}

  async request<T = unknown>(method: string, path: string, options: RequestOptions = {}): Promise<ApiResponse<T>> {
    const headers: Record<string, string> = { ...options.headers };
    if (options.token !== undefined) headers.Authorization = `Bearer ${options.token}`;
    const body = options.json !== undefined ? JSON.stringify(options.json) : options.body;
    const response = await fetch(`${this.baseUrl}${path}`, { method, headers, ...(body === undefined ? {} : { body }) });
    const text = await response.text();
    return { status: response.status, headers: response.headers, text, body: parseJson(text) as T };
  }

  /** A token for `userId` (cached per user and role). */
  token(userId: string, admin = false): Promise<string> {
    const key = `${userId}:${admin}`;
    let token = this.tokens.get(key);
    if (!token) {
      token = this.tokenSource(userId, admin);
      this.tokens.set(key, token);
    }
    return token;
  }

  adminToken(): Promise<string> {
    return this.token("e2e-admin", true);
  }

  async putMember(guildId: string, userId: string): Promise<ApiResponse> {
    return this.request("PUT", `/api/guilds/${guildId}/members/${userId}`, { token: await this.adminToken() });
  }

  async addMembers(guildId: string, ...userIds: string[]): Promise<void> {
    for (const userId of userIds) {
      const response = await this.putMember(guildId, userId);
      if (response.status !== 201 && response.status !== 200) throw new Error(`PUT member ${guildId}/${userId} → ${response.status} ${response.text}`);
    }
  }

  async removeMember(guildId: string, userId: string): Promise<ApiResponse> {
    return this.request("DELETE", `/api/guilds/${guildId}/members/${userId}`, { token: await this.adminToken() });
  }

  async tryPost(guildId: string, userId: string, content: string): Promise<ApiResponse<Message>> {
    return this.request<Message>("POST", `/api/guilds/${guildId}/messages`, { token: await this.token(userId), json: { content } });
  }

  /** Posts and expects 201; returns the message object. */
  async post(guildId: string, userId: string, content: string): Promise<Message> {
    const response = await this.tryPost(guildId, userId, content);
    if (response.status !== 201) throw new Error(`POST message to ${guildId} as ${userId} → ${response.status} ${response.text}`);
    return response.body;
  }

  async history(guildId: string, userId: string, query = ""): Promise<ApiResponse<Message[]>> {
    return this.request<Message[]>("GET", `/api/guilds/${guildId}/messages${query}`, { token: await this.token(userId) });
  }
}

/** The contract's error shape, with the expected status and code. */
export function expectError(response: ApiResponse, status: number, code?: string): void {
  expect({ status: response.status, text: response.text }).toMatchObject({ status });
  const body = response.body as { error?: { code?: unknown; message?: unknown } } | undefined;
  expect(body, `error body of a ${status}: ${response.text}`).toEqual({ error: { code: expect.any(String), message: expect.any(String) } });
  expect(body!.error!.code).toMatch(/^[a-z][a-z0-9_]*$/);
  expect((body!.error!.message as string).length).toBeGreaterThan(0);
  if (code !== undefined) expect(body!.error!.code).toBe(code);
}

/** Every gateway client a test opened, so none outlives it. */
export class Clients {
  private readonly open: GatewayClient[] = [];

  constructor(private readonly baseUrl: () => string) {}

  async connect(): Promise<GatewayClient> {
    const client = await GatewayClient.connect(this.baseUrl());
    this.open.push(client);
    return client;
  }

  /** Connects and identifies; returns the client and its READY payload. */
  async identified(token: string): Promise<{ client: GatewayClient; ready: ReadyData }> {
    const client = await this.connect();
    const ready = await client.identify(token);
    return { client, ready: ready.d as ReadyData };
  }

  /** Connects a new socket and sends RESUME (does not wait for the answer). */
  async resume(token: string, sessionId: string, seq: number): Promise<GatewayClient> {
    const client = await this.connect();
    client.send({ op: Op.RESUME, d: { token, session_id: sessionId, seq } });
    return client;
  }

  dropAll(): void {
    for (const client of this.open.splice(0)) if (!client.closed) client.drop();
  }
}

/** The messages of MESSAGE_CREATE dispatches a client received, optionally of one guild. */
export function messagesOf(client: GatewayClient, guildId?: string): Message[] {
  return client
    .dispatches("MESSAGE_CREATE")
    .map((frame) => frame.d as Message)
    .filter((message) => guildId === undefined || message.guild_id === guildId);
}

/** Waits until `client` has received `count` MESSAGE_CREATEs of `guildId`. */
export function waitForMessages(client: GatewayClient, guildId: string, count: number, timeoutMs = 15_000): Promise<Message[]> {
  return client.waitFor(
    () => {
      const messages = messagesOf(client, guildId);
      return messages.length >= count ? messages : undefined;
    },
    timeoutMs,
    `${count} MESSAGE_CREATE of ${guildId} (have ${messagesOf(client, guildId).length})`,
  );
}

export const range = (from: number, to: number): number[] => Array.from({ length: to - from + 1 }, (_, i) => from + i);

export const dispatchSeqs = (frames: Frame[]): number[] => frames.filter((f) => f.op === Op.DISPATCH).map((f) => f.s!);
