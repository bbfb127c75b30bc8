"""Drives the official `anthropic` and `openai` Python clients through farebox.

usage: clients.py BASE_URL API_KEY CALLS_JSON

CALLS_JSON is a list of {"api": "anthropic" | "responses" | "embeddings" | "chat",
"stream": bool, "params": {...}}; the extra_body of each call carries the mock's
knobs. Prints one JSON list: per call, the usage the client saw (as the API's own
field names), or {"status": N, "error": ...} for an HTTP error, or
{"interrupted": "..."} when the stream broke off.
"""

import json
import sys

import anthropic
import openai

KNOWN = {"model", "max_tokens", "messages", "system", "input", "instructions",
         "max_output_tokens", "encoding_format", "stream_options"}


def split(params):
    known = {k: v for k, v in params.items() if k in KNOWN}
    extra = {k: v for k, v in params.items() if k not in KNOWN}
    return known, extra


def dump(usage):
    if usage is None:
        return None
    return usage.model_dump() if hasattr(usage, "model_dump") else dict(usage)


def run_anthropic(client, stream, params):
    known, extra = split(params)
    if not stream:
        msg = client.messages.create(extra_body=extra, **known)
        return {"usage": dump(msg.usage), "text_len": len(msg.content[0].text), "model": msg.model}
    usage, text_len = {}, 0
    events = client.messages.create(stream=True, extra_body=extra, **known)
    for ev in events:
        if ev.type == "message_start":
            usage.update({k: v for k, v in dump(ev.message.usage).items() if v is not None})
        elif ev.type == "message_delta":
            usage.update({k: v for k, v in dump(ev.usage).items() if v is not None})
        elif ev.type == "content_block_delta":
            text_len += len(ev.delta.text)
    return {"usage": usage, "text_len": text_len}


def run_responses(client, stream, params):
    known, extra = split(params)
    if not stream:
        r = client.responses.create(extra_body=extra, **known)
        return {"usage": dump(r.usage), "text_len": len(r.output_text), "status": r.status}
    out = {"usage": None, "text_len": 0, "events": []}
    for ev in client.responses.create(stream=True, extra_body=extra, **known):
        out["events"].append(ev.type)
        if ev.type == "response.output_text.delta":
            out["text_len"] += len(ev.delta)
        elif ev.type in ("response.completed", "response.incomplete", "response.failed"):
            out["usage"] = dump(ev.response.usage)
            out["status"] = ev.response.status
    out["events"] = sorted(set(out["events"]))
    return out


def run_chat(client, stream, params):
    known, extra = split(params)
    if not stream:
        r = client.chat.completions.create(extra_body=extra, **known)
        return {"usage": dump(r.usage), "text_len": len(r.choices[0].message.content)}
    out = {"usage": None, "text_len": 0}
    for chunk in client.chat.completions.create(stream=True, extra_body=extra, **known):
        if chunk.choices:
            out["text_len"] += len(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            out["usage"] = dump(chunk.usage)
    return out


def run_embeddings(client, _stream, params):
    known, extra = split(params)
    r = client.embeddings.create(extra_body=extra, **known)
    return {"usage": dump(r.usage), "vectors": len(r.data), "dims": len(r.data[0].embedding)}


def main():
    base, key, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    # Both clients send the key in x-api-key (through default_headers: recent anthropic
    # clients send the api_key as a bearer token), which is where farebox reads it.
    a = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=30,
                            default_headers={"x-api-key": key})
    o = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30,
                      default_headers={"x-api-key": key})
    results = []
    for call in calls:
        api, stream, params = call["api"], call.get("stream", False), call.get("params", {})
        try:
            if api == "anthropic":
                results.append(run_anthropic(a, stream, params))
            elif api == "responses":
                results.append(run_responses(o, stream, params))
            elif api == "chat":
                results.append(run_chat(o, stream, params))
            else:
                results.append(run_embeddings(o, stream, params))
        except (anthropic.APIStatusError, openai.APIStatusError) as e:
            results.append({"status": e.status_code, "error": e.body})
        except Exception as e:  # a stream cut short surfaces as a transport error
            results.append({"interrupted": f"{type(e).__name__}: {e}"})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
