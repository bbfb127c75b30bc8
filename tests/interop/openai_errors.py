"""What the official OpenAI Python client shows for farebox's answers on a usage-priced
chat route, as tests/interop.rs asks: prints one JSON object.

usage: openai_errors.py BASE_URL KEY EMPTY_KEY BAD_KEY [DOWN_BASE_URL]
"""

import json
import sys

import openai
from openai import OpenAI

MESSAGES = [{"role": "user", "content": "one two three"}]


def ask(base_url: str, key: str) -> dict:
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
    try:
        r = client.chat.completions.with_raw_response.create(model="mock", messages=MESSAGES)
        done = r.parse()
        return {"ok": True, "request_id": r.headers.get("x-request-id"),
                "total_tokens": done.usage.total_tokens if done.usage else None}
    except openai.APIStatusError as e:
        return {"class": type(e).__name__, "message": str(e), "status": e.status_code,
                "code": e.code, "type": e.type, "request_id": e.request_id,
                # The problem document's own detail, which the message must carry.
                "detail": e.response.json().get("detail")}


if __name__ == "__main__":
    base, key, empty_key, bad_key = sys.argv[1:5]
    out = {"sdk": "openai", "version": openai.__version__,
           "served": ask(base, key), "unpaid": ask(base, empty_key),
           "unauthorized": ask(base, bad_key)}
    if len(sys.argv) > 5:
        out["unavailable"] = ask(sys.argv[5], key)
    print(json.dumps(out))
