"""Chat templates rendered the way Hugging Face renders them.

A tokenizer folder's template is `chat_template.jinja` if present, else the
`chat_template` key of `tokenizer_config.json` (a string, or a list of named
templates of which 'default' is used), as `transformers` loads them. It is
rendered with jinja2 in the environment `apply_chat_template` builds: a
sandbox, `trim_blocks` and `lstrip_blocks`, loop controls, a `tojson` that
does not escape HTML, `raise_exception`, `strftime_now`, and the tokenizer's
named special tokens (`bos_token`, `eos_token`, ...) as variables.

Phi-2 ships no template; `PHI2_TEMPLATE` follows its model card's QA format,
"Instruct: <prompt>\\nOutput: <answer>", with the end-of-text token after each
answer so a fine-tuned model learns to stop.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from phi2_jax.errors import ConfigError, UserInputError

# Phi-2's model card QA format. A system turn is written before the first instruction; an unknown role stops
# rendering with one sentence (Hugging Face templates do the same with raise_exception).
PHI2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Instruct: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Output: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Output:' }}{% endif %}"
)

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@lru_cache(maxsize=32)
def _compile(template: str):
    """The template compiled in transformers' environment (utils/chat_template_utils.py), cached like theirs."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters (<, >, &), which Hugging Face's does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    # `{% generation %}` marks assistant spans for transformers' token masks; we find the spans by rendering
    # prefixes instead (data/formats.py), so the tag renders its body unchanged.
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=dict,
                       namespace=jinja2.utils.Namespace)
    try:
        return env.from_string(_strip_generation_tags(template))
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ConfigError(f"the chat template does not parse as jinja (line {error.lineno}: {error.message}).") from None


def _strip_generation_tags(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


class ChatTemplate:
    """A jinja chat template with the special tokens it may refer to; `render(messages)` -> text."""

    def __init__(self, template: str, special_tokens: dict[str, str] | None = None, source: str = "built-in Phi-2"):
        self.template = template
        self.special_tokens = dict(special_tokens or {})
        self.source = source
        try:
            _compile(template)  # fail on a syntax error now, not at the first example
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The conversation as text, exactly as `tokenizer.apply_chat_template(messages, tokenize=False)` gives it."""
        import jinja2

        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise UserInputError(f"message {index} is {type(message).__name__}; expected a dict with 'role' and 'content'.")
        # transformers drops None-valued keys before rendering (many templates print 'None' otherwise).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return _compile(self.template).render(messages=messages, tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **{**self.special_tokens, **kwargs})
        except (jinja2.exceptions.TemplateError, TypeError) as error:  # TypeError: e.g. a list where text was expected
            raise UserInputError(f"the chat template ({self.source}) failed to render a conversation: {error}.") from None


def save_chat_template(template: ChatTemplate, folder: str | Path) -> Path:
    """Writes the template as `folder/chat_template.jinja`, the file transformers reads over any other, so an
    exported model (or a run folder) renders conversations as training did. Returns the path."""
    path = Path(folder) / "chat_template.jinja"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(template.template, encoding="utf-8")
    tmp.replace(path)  # never a half-written template
    return path


def read_template_text(path: Path) -> str:
    """A template (or tokenizer_config.json) file's text; a file that is not UTF-8 is refused in one sentence."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}); expected a jinja chat template or "
                          f"tokenizer_config.json.") from None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict {'content': ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(folder: str | Path | None, eos_token: str = "<|endoftext|>") -> ChatTemplate:
    """The chat template of a Hugging Face tokenizer folder, or Phi-2's built-in one when the folder has none.

    `eos_token` fills in the end-of-text token when the folder names none (Phi-2's is '<|endoftext|>').
    """
    special: dict[str, str] = {"eos_token": eos_token}
    template, source = None, "built-in Phi-2"
    if folder is not None:
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(read_template_text(config_path))
            except json.JSONDecodeError as error:
                raise ConfigError(f"{config_path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
            for name in SPECIAL_TOKEN_NAMES:
                text = _token_text(config.get(name))
                if text is not None:
                    special[name] = text
            found = config.get("chat_template")
            if isinstance(found, list):  # [{"name": ..., "template": ...}]: the one named 'default'
                found = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}.get("default")
                if found is None:
                    raise ConfigError(f"{config_path} lists named chat templates but none called 'default'.")
            if found is not None and not isinstance(found, str):
                raise ConfigError(f"{config_path}: 'chat_template' is {type(found).__name__}; expected a jinja string.")
            if found:
                template, source = found, str(config_path)
        jinja_path = folder / "chat_template.jinja"
        if jinja_path.is_file():  # transformers reads this file over the config key
            template, source = read_template_text(jinja_path), str(jinja_path)
    return ChatTemplate(template or PHI2_TEMPLATE, special, source)
