// The chain side of tests/x402.rs and `make run-x402`, on a fresh anvil (no fork,
// started by the caller, which stops it by PID): the project's EIP-3009 test token
// compiled with solc and deployed, the payer funded, and an x402 facilitator
// (@x402/core + @x402/evm) serving GET /supported, POST /verify and POST /settle
// against that chain.
//
//   node stack.mjs --rpc http://127.0.0.1:PORT [--facilitator-port N] [--fund UNITS]
//
// Prints one JSON line with what the test needs, then serves until killed.
// SIGUSR1 stops the facilitator alone (the "facilitator down" case). SIGUSR2 makes
// the next /settle answer late: it settles on chain, then answers after
// --late-settle-ms (the "settle timed out, outcome unknown" case).
import { createServer } from "node:http";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import solc from "solc";
import { createWalletClient, createPublicClient, http, publicActions, defineChain } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { x402Facilitator } from "@x402/core/facilitator";
import { registerExactEvmScheme } from "@x402/evm/exact/facilitator";
import { toFacilitatorEvmSigner } from "@x402/evm";

const here = dirname(fileURLToPath(import.meta.url));
const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const facilitatorPort = Number(arg("facilitator-port", "0"));
const lateSettleMs = Number(arg("late-settle-ms", "0"));
let lateSettles = 0;
const tokenName = arg("token-name", "Farebox Test Dollar");
const tokenVersion = arg("token-version", "1");
const CHAIN_ID = 31337;

// anvil's well-known development keys (its default mnemonic): test-only accounts.
const KEYS = {
  deployer: "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
  facilitator: "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
  payer: "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
  poor: "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
  payee: "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
};
const address = (k) => privateKeyToAccount(KEYS[k]).address;

process.on("uncaughtException", (e) => {
  console.error(`x402 stack: ${e.stack || e}`);
  process.exit(1);
});

const rpc = arg("rpc", "http://127.0.0.1:8545");
const chain = defineChain({
  id: CHAIN_ID, name: "anvil", nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
  rpcUrls: { default: { http: [rpc] } },
});
const publicClient = createPublicClient({ chain, transport: http(rpc) });
const wallet = (k) =>
  createWalletClient({ account: privateKeyToAccount(KEYS[k]), chain, transport: http(rpc) }).extend(publicActions);

async function waitForChain() {
  for (let i = 0; i < 200; i++) {
    try {
      return await publicClient.getChainId();
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`anvil did not answer on ${rpc}`);
}

function compile() {
  const input = {
    language: "Solidity",
    sources: { "TestToken.sol": { content: readFileSync(join(here, "TestToken.sol"), "utf8") } },
    settings: { outputSelection: { "*": { TestToken: ["abi", "evm.bytecode.object"] } } },
  };
  const out = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (out.errors || []).filter((e) => e.severity === "error");
  if (errors.length) throw new Error(errors.map((e) => e.formattedMessage).join("\n"));
  const c = out.contracts["TestToken.sol"].TestToken;
  return { abi: c.abi, bytecode: `0x${c.evm.bytecode.object}` };
}

await waitForChain();
const { abi, bytecode } = compile();
const deployer = wallet("deployer");
const deployTx = await deployer.deployContract({ abi, bytecode, args: [tokenName, tokenVersion] });
const token = (await publicClient.waitForTransactionReceipt({ hash: deployTx })).contractAddress;
const funded = BigInt(arg("fund", "1000000"));
const mintTx = await deployer.writeContract({ address: token, abi, functionName: "mint", args: [address("payer"), funded] });
await publicClient.waitForTransactionReceipt({ hash: mintTx });

const facilitator = new x402Facilitator();
registerExactEvmScheme(facilitator, {
  signer: toFacilitatorEvmSigner(wallet("facilitator"), { confirmationTimeoutMs: 20000 }),
  networks: `eip155:${CHAIN_ID}`,
});

const answer = (res, status, body) => {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
};
const server = createServer(async (req, res) => {
  try {
    if (req.method === "GET" && req.url === "/supported") {
      return answer(res, 200, facilitator.getSupported());
    }
    if (req.method === "POST" && (req.url === "/verify" || req.url === "/settle")) {
      let body = "";
      for await (const chunk of req) body += chunk;
      const { paymentPayload, paymentRequirements } = JSON.parse(body);
      const late = req.url === "/settle" && lateSettles > 0;
      if (late) lateSettles -= 1;
      const result = req.url === "/verify"
        ? await facilitator.verify(paymentPayload, paymentRequirements)
        : await facilitator.settle(paymentPayload, paymentRequirements);
      if (late) {
        console.error(`x402 stack: settled (${result.success}), answering in ${lateSettleMs} ms`);
        await new Promise((r) => setTimeout(r, lateSettleMs));
      }
      return answer(res, 200, result);
    }
    answer(res, 404, { error: "not found" });
  } catch (e) {
    // The x402 errors carry the answer's shape (isValid/invalidReason, success/errorReason).
    const reason = e?.invalidReason || e?.errorReason || "unexpected_error";
    const isVerify = req.url === "/verify";
    answer(res, 400, isVerify
      ? { isValid: false, invalidReason: reason, invalidMessage: e?.invalidMessage || e?.message, payer: e?.payer }
      : { success: false, errorReason: reason, errorMessage: e?.errorMessage || e?.message, payer: e?.payer, transaction: "", network: `eip155:${CHAIN_ID}` });
  }
});
process.on("SIGUSR2", () => {
  lateSettles += 1;
  console.error("x402 stack: the next settle answers late");
});
process.on("SIGUSR1", () => {
  server.close();
  server.closeAllConnections();
  console.error("x402 stack: the facilitator is stopped");
});
server.listen(facilitatorPort, "127.0.0.1", () => {
  console.log(JSON.stringify({
    rpc,
    chain_id: CHAIN_ID,
    network: `eip155:${CHAIN_ID}`,
    facilitator_url: `http://127.0.0.1:${server.address().port}`,
    token,
    token_name: tokenName,
    token_version: tokenVersion,
    funded: String(funded),
    payer: address("payer"),
    payer_key: KEYS.payer,
    poor: address("poor"),
    poor_key: KEYS.poor,
    payee: address("payee"),
  }));
});
