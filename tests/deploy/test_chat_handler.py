"""The chat and completions handlers in process (no Serve): a checkpoint without a chat template gets a 400 that
names it; stop strings finish requests as served ('stop'), not cancelled; echo without logprobs."""

from __future__ import annotations

import asyncio
import json

from gateway import Engine
from gateway.serving.chat import ChatRequest, chat_completions
from gateway.serving.completions import CompletionRequest, completions
from gateway.serving.engine_loop import EngineLoop
from gateway.serving.http_api import GatewayState
from model_core.chat_template import ChatTemplate
from model_core.tokenizer import ByteTokenizer

MESSAGES = [{"role": "user", "content": "Hi"}]


def test_chat_needs_a_template_and_names_it(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v2"]) as engine:
        loop = EngineLoop(engine)
        try:
            state = GatewayState(loop, "tiny-v2", ByteTokenizer.default(), None)
            answer = asyncio.run(chat_completions(state, ChatRequest(messages=MESSAGES, max_tokens=2)))
            assert answer.status_code == 400
            message = json.loads(answer.body)["error"]["message"]
            assert "no chat template (tokenizer_config.json chat_template" in message
            state.chat_template = ChatTemplate.from_dir(model_dirs["tiny-v2"])  # make-model writes one
            answer = asyncio.run(chat_completions(state, ChatRequest(messages=MESSAGES, max_tokens=3, temperature=0)))
            assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 3
        finally:
            loop.close()


def test_stop_strings_count_as_served_and_echo_prepends_the_prompt(model_dirs):
    tok = ByteTokenizer.default()
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        full = tok.decode(engine.generate([tok.encode("Go")], max_new_tokens=16, stop_at_eos=False)[0])
        stop = next(full[i : i + 1] for i in range(2, len(full)) if full[i] != "\ufffd")
        loop = EngineLoop(engine)
        try:
            state = GatewayState(loop, "tiny-v3", tok, None)
            body = CompletionRequest(prompt="Go", max_tokens=16, temperature=0, stop=stop, echo=True)
            answer = asyncio.run(completions(state, body))
            choice = answer["choices"][0]
            assert choice["text"] == "Go" + full[: full.find(stop)] and choice["finish_reason"] == "stop"
            assert choice["logprobs"] is None
            assert loop.stats.requests["ok"] == 1 and loop.stats.requests["cancelled"] == 0
        finally:
            loop.close()
