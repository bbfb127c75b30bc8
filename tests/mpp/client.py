"""The official Payment-scheme (MPP) client, pympp, paying through Envoy and farebox
with its `evm` method (EIP-3009 authorizations), for tests/x402.rs. Prints one JSON line.

  python client.py pay URL KEY TOKEN CHAIN_ID NAME VERSION MAX [HEADER:VALUE ...]
      pays a 402's `WWW-Authenticate: Payment` challenge, as any pympp client
  python client.py replay URL KEY TOKEN CHAIN_ID NAME VERSION MAX
      pays, then sends the same credential again
  python client.py tamper URL KEY TOKEN CHAIN_ID NAME VERSION MAX
      takes a challenge, changes its amount to 1, and pays that

MAX is the client's spend limit per payment, in display units of the token.
"""

import asyncio
import json
import sys

import httpx
from eth_account import Account
from mpp import Challenge, Receipt
from mpp.client import PaymentTransport
from mpp.methods.evm import client as evm
from mpp.runtime import CredentialParams


class Recording(httpx.AsyncBaseTransport):
    """The network transport, noting each Payment credential the client sends."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("payment "):
            self.sent.append(auth)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def summary(resp: httpx.Response) -> dict:
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    receipt = resp.headers.get("payment-receipt")
    decoded = None
    if receipt:
        r = Receipt.from_payment_receipt(receipt)
        decoded = {"status": r.status, "method": r.method, "reference": r.reference,
                   "timestamp": r.timestamp.isoformat()}
    return {
        "status": resp.status_code,
        "receipt": decoded,
        "cache_control": resp.headers.get("cache-control"),
        "www_authenticate": resp.headers.get_list("www-authenticate"),
        "body": body,
    }


async def main() -> None:
    cmd, url, key, token, chain_id, name, version, limit, *headers = sys.argv[1:]
    method = evm.charge(
        currency=token,
        account=Account.from_key(key),
        chain_id=int(chain_id),
        decimals=6,
        authorization={"name": name, "version": version},
        max_amount=limit,
    )
    extra = dict(h.split(":", 1) for h in headers)
    extra = {k.strip(): v.strip() for k, v in extra.items()}
    recording = Recording()
    transport = PaymentTransport(methods=[method], inner=recording)
    async with httpx.AsyncClient(transport=transport, timeout=60) as client:
        if cmd == "pay":
            resp = await client.get(url, headers=extra)
            print(json.dumps({**summary(resp), "paid": len(recording.sent)}))
        elif cmd == "replay":
            first = summary(await client.get(url))
            async with httpx.AsyncClient(timeout=60) as plain:
                again = await plain.get(url, headers={"authorization": recording.sent[0]})
            print(json.dumps({"first": first, "again": summary(again)}))
        elif cmd == "tamper":
            async with httpx.AsyncClient(timeout=60) as plain:
                offer = await plain.get(url)
                header = offer.headers.get_list("www-authenticate")[0]
                challenge = Challenge.from_www_authenticate(header)
                cheap = Challenge.from_www_authenticate(
                    header.replace(challenge.request_b64, _cheaper(challenge.request))
                )
                credential = await method.create_credential(CredentialParams(challenge=cheap))
                again = await plain.get(url, headers={"authorization": credential})
            print(json.dumps({"offer": summary(offer), "again": summary(again)}))
        else:
            raise SystemExit(f"unknown command {cmd}")


def _cheaper(request: dict) -> str:
    import base64

    changed = {**request, "amount": "1"}
    raw = json.dumps(changed, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # one JSON line, whatever happened
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
