// One MCP session per account through farebox with the official TypeScript SDK, as
// tests/interop.rs asks: prints one JSON object with what the SDK handed the caller.
//
// usage: node mcp_session.mjs URL KEY EMPTY_KEY BAD_KEY DOWN_URL
// (DOWN_URL: the same server behind a farebox whose balance service is down)
import { attempt, caught, connect as connectAt, sdkVersion, toolResult } from "./common.mjs";

const [url, key, emptyKey, badKey, downUrl] = process.argv.slice(2);
const version = sdkVersion();
const connect = (apiKey, at = url) => connectAt(at, { "x-api-key": apiKey });

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
// A priced method that is not a tool call: refused with a JSON-RPC error.
try {
  out.unpaid_read = { served: JSON.stringify(await c.readResource({ uri: "mock://doc" })) };
} catch (e) {
  out.unpaid_read = caught(e);
}
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
