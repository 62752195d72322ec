export default {
  async fetch(): Promise<Response> {
    return Response.json({ error: { code: "not_found", message: "no such route" } }, { status: 404 });
  },
} satisfies ExportedHandler;
