// The official x402 client (@x402/fetch with @x402/evm's exact scheme) for tests/x402.rs
// and `make run-x402`. Prints one JSON line.
//
//   node client.mjs pay URL PRIVATE_KEY [HEADER:VALUE ...]   pays on a 402, as any x402 client
//   node client.mjs replay URL PRIVATE_KEY                    pays, then sends the same payment again
//   node client.mjs balance RPC TOKEN ADDRESS...              token balances on chain
//
// The client pays only in tokens it is told of (x402's spend controls): the test token
// comes in X402_ALLOWED_ASSET as NETWORK,ADDRESS,MAX_ATOMIC_UNITS_PER_PAYMENT.
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from "@x402/fetch";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { privateKeyToAccount } from "viem/accounts";
import { createPublicClient, http, parseAbi } from "viem";

const [cmd, ...args] = process.argv.slice(2);
const decode = (h) => (h ? JSON.parse(Buffer.from(h, "base64").toString("utf8")) : null);

async function summary(res) {
  const text = await res.text();
  let body;
  try { body = JSON.parse(text); } catch { body = text; }
  const pr = res.headers.get("payment-response");
  return {
    status: res.status,
    payment_response: pr ? decodePaymentResponseHeader(pr) : null,
    payment_required: decode(res.headers.get("payment-required")),
    body,
  };
}

function payingFetch(key, sent) {
  // The inner fetch records the payment the client attaches, for the replay case.
  const recording = async (input, init) => {
    const req = new Request(input, init);
    const p = req.headers.get("payment-signature");
    if (p) sent.push(p);
    return fetch(req);
  };
  const [network, asset, maxAmountPerPayment] = (process.env.X402_ALLOWED_ASSET || "").split(",");
  return wrapFetchWithPaymentFromConfig(recording, {
    schemes: [{ network: "eip155:*", client: new ExactEvmScheme(privateKeyToAccount(key)) }],
    spendControls: { allowedAssets: asset ? [{ network, asset, maxAmountPerPayment }] : [] },
  });
}

const headersOf = (list) => Object.fromEntries(list.map((h) => {
  const i = h.indexOf(":");
  return [h.slice(0, i).trim(), h.slice(i + 1).trim()];
}));

try {
  if (cmd === "pay") {
    const [url, key, ...hs] = args;
    const sent = [];
    const res = await payingFetch(key, sent)(url, { headers: headersOf(hs) });
    console.log(JSON.stringify({ ...(await summary(res)), paid: sent.length }));
  } else if (cmd === "replay") {
    const [url, key] = args;
    const sent = [];
    const first = await summary(await payingFetch(key, sent)(url));
    const again = await summary(await fetch(url, { headers: { "payment-signature": sent[0] ?? "" } }));
    console.log(JSON.stringify({ first, again }));
  } else if (cmd === "balance") {
    const [rpc, token, ...who] = args;
    const client = createPublicClient({ transport: http(rpc) });
    const abi = parseAbi(["function balanceOf(address) view returns (uint256)"]);
    const out = {};
    for (const a of who) {
      out[a] = String(await client.readContract({ address: token, abi, functionName: "balanceOf", args: [a] }));
    }
    console.log(JSON.stringify(out));
  } else {
    throw new Error(`unknown command ${cmd}`);
  }
} catch (e) {
  console.log(JSON.stringify({ error: String(e?.message || e) }));
  process.exit(1);
}
