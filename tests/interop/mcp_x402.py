"""x402's MCP transport through farebox with the official Python SDK (`mcp`), as
tests/interop.rs asks: a caller without an account is offered x402 in the tool result
and pays with params._meta["x402/payment"]. Prints one JSON object.

usage: mcp_x402.py URL
"""

import asyncio
import json
import sys
from importlib.metadata import version

from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_session import tool_result


def payment(offer: dict, demo: str) -> dict:
    """A PaymentPayload for the offer's first option; the reference service's demo
    verifier accepts it when its payload says {"demo": "paid"}."""
    return {"x402/payment": {"x402Version": 2, "accepted": offer["accepts"][0],
                             "payload": {"demo": demo}}}


async def main(url: str) -> dict:
    out = {"sdk": "mcp", "version": version("mcp")}
    async with Client(streamable_http_client(url)) as c:
        out["tools"] = sorted(t.name for t in (await c.list_tools()).tools)
        out["offer"] = tool_result(await c.call_tool("search", {"query": "x"}))
        offer = out["offer"]["structured"] or {}
        out["bad"] = tool_result(
            await c.call_tool("search", {"query": "x"}, meta=payment(offer, "unpaid")))
        out["paid"] = tool_result(
            await c.call_tool("search", {"query": "x"}, meta=payment(offer, "paid")))
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1])), default=str))
