"""A mobile backend's view: the official `openai` client talking to `edgespec serve`, with speculation stats.

    edgespec serve --bundle bundles/default &          # pip install -e ".[serve]"
    python examples/openai_client.py --url http://127.0.0.1:8000/v1

Prints a transcript: the served models, a chat completion, the same chat streamed, and a text completion, each
with the `edgespec` extension field (drafter, tokens per step, acceptance, tokens/s). Needs `pip install openai`.
"""

from __future__ import annotations

import argparse
import json

QUESTION = "Write a Python function that checks whether a string is a palindrome."
CODE = "def fibonacci(n):\n    "


def show(title: str, text: str, stats: dict | None) -> None:
    print(f"--- {title}\n{text}")
    if stats:
        print(f"edgespec: {json.dumps(stats)}")


def main(argv: list[str] | None = None) -> int:
    from openai import OpenAI

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"models: {[m.id for m in client.models.list().data]}")

    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0)
    show(f"chat.completions (non-streaming), finish_reason={reply.choices[0].finish_reason}, usage="
         f"{reply.usage.prompt_tokens}+{reply.usage.completion_tokens}", reply.choices[0].message.content,
         reply.model_extra.get("edgespec"))

    pieces, stats, finish = [], None, None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                            temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        stats = (chunk.model_extra or {}).get("edgespec") or stats
    streamed = "".join(pieces)
    show(f"chat.completions (streaming, {len(pieces)} chunks), finish_reason={finish}, identical to non-streaming: "
         f"{streamed == reply.choices[0].message.content}", streamed, stats)

    done = client.completions.create(model=model, prompt=CODE, max_tokens=args.max_tokens, temperature=0)
    show(f"completions, finish_reason={done.choices[0].finish_reason}", CODE + done.choices[0].text,
         done.model_extra.get("edgespec"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
