// x402's MCP transport through farebox with the official TypeScript SDK, as
// tests/interop.rs asks: a caller without an account is offered x402 in the tool result
// and pays with params._meta["x402/payment"]. Prints one JSON object.
//
// usage: node mcp_x402.mjs URL
import { connect, sdkVersion, toolResult } from "./common.mjs";

const [url] = process.argv.slice(2);

// A PaymentPayload for the offer's first option; the reference service's demo verifier
// accepts it when its payload says {"demo": "paid"}.
function payment(offer, demo) {
  return { "x402/payment": { x402Version: 2, accepted: offer.accepts?.[0], payload: { demo } } };
}

const out = { sdk: "@modelcontextprotocol/sdk", version: sdkVersion() };
const c = await connect(url, {});
out.tools = (await c.listTools()).tools.map((t) => t.name).sort();
const search = (meta) => c.callTool({ name: "search", arguments: { query: "x" }, ...(meta && { _meta: meta }) });
out.offer = toolResult(await search());
const offer = out.offer.structured ?? {};
out.bad = toolResult(await search(payment(offer, "unpaid")));
out.paid = toolResult(await search(payment(offer, "paid")));
await c.close();
console.log(JSON.stringify(out));
