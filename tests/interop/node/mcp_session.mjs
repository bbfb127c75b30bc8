// One MCP session per account through farebox with the official TypeScript SDK, as
// tests/interop.rs asks: prints one JSON object with what the SDK handed the caller.
//
// usage: node mcp_session.mjs URL KEY EMPTY_KEY BAD_KEY DOWN_URL
// (DOWN_URL: the same server behind a farebox whose balance service is down)
import { readFileSync } from "node:fs";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, key, emptyKey, badKey, downUrl] = process.argv.slice(2);
const version = JSON.parse(
  readFileSync(new URL("./node_modules/@modelcontextprotocol/sdk/package.json", import.meta.url)),
).version;

async function connect(apiKey, at = url) {
  const client = new Client({ name: "farebox-interop", version: "1.0.0" });
  const transport = new StreamableHTTPClientTransport(new URL(at), {
    requestInit: { headers: { "x-api-key": apiKey } },
  });
  await client.connect(transport);
  return client;
}

function toolResult(r) {
  return {
    isError: Boolean(r.isError),
    text: r.content.filter((c) => c.type === "text").map((c) => c.text).join(" "),
    structured: r.structuredContent ?? null,
  };
}

async function attempt(f) {
  try {
    return toolResult(await f());
  } catch (e) {
    return { class: e.constructor.name, message: String(e.message), code: e.code ?? null, data: e.data ?? null };
  }
}

const out = { sdk: "@modelcontextprotocol/sdk", version };
// A whole session: initialize, list, ping, a free call, two paid calls, close.
let c = await connect(key);
out.tools = (await c.listTools()).tools.map((t) => t.name).sort();
await c.ping();
out.free = toolResult(await c.callTool({ name: "echo", arguments: { text: "hi" } }));
out.search = toolResult(await c.callTool({ name: "search", arguments: { query: "x" } }));
out.fetch = toolResult(await c.callTool({ name: "fetch", arguments: { id: "1" } }));
await c.close();
// The same on an empty account: the paid call is refused.
c = await connect(emptyKey);
await c.listTools();
out.free_on_empty = toolResult(await c.callTool({ name: "echo", arguments: { text: "hi" } }));
out.unpaid = await attempt(() => c.callTool({ name: "search", arguments: { query: "x" } }));
await c.close();
// An unknown key: 401.
c = await connect(badKey);
out.unauthorized = await attempt(() => c.callTool({ name: "search", arguments: { query: "x" } }));
await c.close();
// The balance service is down: 503 (free plumbing still works).
c = await connect(key, downUrl);
out.unavailable = await attempt(() => c.callTool({ name: "search", arguments: { query: "x" } }));
await c.close();
console.log(JSON.stringify(out));
