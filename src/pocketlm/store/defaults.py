"""A Modelfile's defaults on an OpenAI-style request body (what `pocketlm serve NAME` applies per request)."""

from __future__ import annotations

from typing import Any

# Modelfile parameter -> request body field
BODY_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repeat_penalty": "repetition_penalty", "seed": "seed", "stop": "stop", "num_predict": "max_tokens"}


def apply_to_request(body: Any, kind: str, modelfile: dict | None) -> Any:
    """`body` with the Modelfile's parameters where the request leaves them out, and (chat) its SYSTEM message
    first when the request has no system message. The request always wins; a body that is not a JSON object is
    returned as it is, for the request validation to reject."""
    if not modelfile or not isinstance(body, dict):
        return body
    out = dict(body)
    for key, value in (modelfile.get("parameters") or {}).items():
        field = BODY_KEYS.get(key)
        if field is None or out.get(field) is not None:
            continue
        if field == "max_tokens" and out.get("max_completion_tokens") is not None:
            continue
        out[field] = list(value) if isinstance(value, list) else value
    system = modelfile.get("system")
    messages = out.get("messages")
    if kind == "chat" and system and isinstance(messages, list) and not any(
            isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
        out["messages"] = [{"role": "system", "content": system}] + messages
    return out
