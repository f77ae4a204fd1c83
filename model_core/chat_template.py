"""Chat templates: the checkpoint's `chat_template` (tokenizer_config.json or chat_template.jinja), rendered with
jinja2 in a sandbox the way transformers' `apply_chat_template` renders it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What `expertmesh make-model` writes: role markers, the model's bos and eos tokens, a generation prompt.
DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('messages: role ' ~ message['role'] ~ ' is not one of system, user, assistant') }}"
    "{% endif %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template refused the conversation (its raise_exception) or could not be rendered."""


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """One checkpoint's chat template with its bos/eos token texts."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat_template: does not parse ({exc})") from None
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate | None:
        """The checkpoint's template: chat_template.jinja if present, else tokenizer_config.json's `chat_template`
        (a string, or a list of {name, template} where 'default' is used); None when it has none."""
        directory = Path(directory)
        config_file = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except (ValueError, RecursionError) as exc:  # ValueError: JSON or UTF-8
            raise ChatTemplateError(f"{config_file}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ChatTemplateError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        jinja_file = directory / "chat_template.jinja"
        source = jinja_file.read_text() if jinja_file.is_file() else config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (messages: [{role, content}, ...]); ChatTemplateError when the
        template refuses it."""
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat_template: {exc}") from None


def write_default(directory: str | Path, bos_token: str, eos_token: str) -> None:
    """tokenizer_config.json with the special tokens and DEFAULT_TEMPLATE (what `make-model` ships)."""
    config = {"bos_token": bos_token, "eos_token": eos_token, "chat_template": DEFAULT_TEMPLATE}
    Path(directory, "tokenizer_config.json").write_text(json.dumps(config, indent=1))
