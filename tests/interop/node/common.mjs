// What the TypeScript SDK scripts of tests/interop.rs share: a connected client, the
// SDK's version, and what a call handed its caller.
import { readFileSync } from "node:fs";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

export function sdkVersion() {
  return JSON.parse(
    readFileSync(new URL("./node_modules/@modelcontextprotocol/sdk/package.json", import.meta.url)),
  ).version;
}

export async function connect(url, headers) {
  const client = new Client({ name: "farebox-interop", version: "1.0.0" });
  const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
  await client.connect(transport);
  return client;
}

export function toolResult(r) {
  return {
    isError: Boolean(r.isError),
    text: r.content.filter((c) => c.type === "text").map((c) => c.text).join(" "),
    structured: r.structuredContent ?? null,
  };
}

// What the caller gets from a failed call: the exception's class, message, code and data.
export function caught(e) {
  return { class: e.constructor.name, message: String(e.message), code: e.code ?? null, data: e.data ?? null };
}

// A call's tool result, or what it threw.
export async function attempt(f) {
  try {
    return toolResult(await f());
  } catch (e) {
    return caught(e);
  }
}
