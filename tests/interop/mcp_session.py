"""One MCP session per account through farebox with the official Python SDK (`mcp`),
as tests/interop.rs asks: prints one JSON object with what the SDK handed the caller.

usage: mcp_session.py URL KEY EMPTY_KEY BAD_KEY DOWN_URL
(DOWN_URL: the same server behind a farebox whose balance service is down)
"""

import asyncio
import json
import sys
from importlib.metadata import version

from mcp import Client
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client


def caught(e: BaseException) -> dict:
    """What the caller gets from a failed call: the exception's class and text."""
    out = {"class": type(e).__name__, "message": str(e)}
    error = getattr(e, "error", None)
    if error is not None:
        out["code"] = error.code
        out["data"] = error.data
    return out


def tool_result(r) -> dict:
    return {
        "isError": bool(r.is_error if hasattr(r, "is_error") else r.isError),
        "text": " ".join(c.text for c in r.content if getattr(c, "type", "") == "text"),
        "structured": getattr(r, "structured_content", None) or getattr(r, "structuredContent", None),
    }


def client(url: str, key: str) -> Client:
    http = create_mcp_http_client(headers={"x-api-key": key})
    return Client(streamable_http_client(url, http_client=http))


async def main(url: str, key: str, empty_key: str, bad_key: str, down_url: str) -> dict:
    out = {"sdk": "mcp", "version": version("mcp")}
    # A whole session: server/discover (MCP 2026-07-28, whose requests carry Mcp-Method
    # and Mcp-Name; an older server gets initialize instead), list, ping,
    # a free call, two paid calls, close.
    async with client(url, key) as c:
        out["tools"] = sorted(t.name for t in (await c.list_tools()).tools)
        await c.send_ping()
        out["free"] = tool_result(await c.call_tool("echo", {"text": "hi"}))
        out["search"] = tool_result(await c.call_tool("search", {"query": "x"}))
        out["fetch"] = tool_result(await c.call_tool("fetch", {"id": "1"}))
    # The same on an empty account: the paid call is refused.
    async with client(url, empty_key) as c:
        await c.list_tools()
        out["free_on_empty"] = tool_result(await c.call_tool("echo", {"text": "hi"}))
        try:
            out["unpaid"] = tool_result(await c.call_tool("search", {"query": "x"}))
        except Exception as e:  # the test asserts which, if any, was raised
            out["unpaid"] = caught(e)
        # A priced method that is not a tool call: refused with a JSON-RPC error.
        try:
            out["unpaid_read"] = {"served": str(await c.read_resource("mock://doc"))}
        except Exception as e:
            out["unpaid_read"] = caught(e)
    # An unknown key: 401.
    async with client(url, bad_key) as c:
        try:
            out["unauthorized"] = tool_result(await c.call_tool("search", {"query": "x"}))
        except Exception as e:
            out["unauthorized"] = caught(e)
    # The balance service is down: 503 (free plumbing still works).
    async with client(down_url, key) as c:
        try:
            out["unavailable"] = tool_result(await c.call_tool("search", {"query": "x"}))
        except Exception as e:
            out["unavailable"] = caught(e)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:6])), default=str))
