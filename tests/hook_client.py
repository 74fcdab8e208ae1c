"""What every hook test asks of ``model: "auto"`` (a helper module, not a test file)."""

from __future__ import annotations

from conftest import load_rows


def auto_routes_and_streams(hook: str):
    """A sports_understanding dev row through the hook with ``model: "auto"``: the router's top
    choice is sports_understanding and the streamed answer is the whole one. Returns the whole
    answer (openai's ChatCompletion) and the messages sent."""
    import openai

    client = openai.OpenAI(base_url=f"{hook}/v1", api_key="unused", max_retries=0)
    row = load_rows("dev", {"sports_understanding"}, limit_per_task=1)[0]
    msgs = [{"role": "user", "content": row["input"]}]
    whole = client.chat.completions.create(model="auto", messages=msgs, temperature=0, max_tokens=8)
    assert whole.model_extra["routing"]["top1"] == "sports_understanding"
    stream = client.chat.completions.create(model="auto", messages=msgs, temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.choices[0].message.content
    return whole, msgs
