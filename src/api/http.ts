/** JSON responses and errors of the HTTP API: `{"error": {"code", "message"}}`. */

export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

export function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return Response.json(body, { status, headers });
}

export function errorResponse(error: HttpError): Response {
  return json({ error: { code: error.code, message: error.message } }, error.status, error.headers);
}

/** Largest request body we read; anything bigger is 413 before it is parsed. */
export const MAX_BODY_BYTES = 64 * 1024;

const tooLarge = (): HttpError => new HttpError(413, "payload_too_large", `request body exceeds ${MAX_BODY_BYTES} bytes`);

export async function readJsonObject(request: Request): Promise<Record<string, unknown>> {
  const text = await readText(request);
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw new HttpError(400, "invalid_json", "request body is not valid JSON");
  }
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new HttpError(400, "invalid_body", "request body must be a JSON object");
  }
  return body as Record<string, unknown>;
}

/**
 * The body as UTF-8 text (invalid bytes replaced, as `request.text()` does), read chunk by chunk
 * so that a body without Content-Length (chunked) is refused as soon as it passes MAX_BODY_BYTES
 * rather than buffered whole first.
 */
async function readText(request: Request): Promise<string> {
  const declared = request.headers.get("content-length");
  if (declared !== null) {
    if (Number(declared) > MAX_BODY_BYTES) throw tooLarge();
    return request.text(); // the runtime holds a body to its declared length
  }
  if (!request.body) return "";
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > MAX_BODY_BYTES) {
      // Not awaited: the answer should not wait on the client.
      reader.cancel().catch(() => {});
      throw tooLarge();
    }
    chunks.push(value);
  }
  return new Blob(chunks).text();
}
