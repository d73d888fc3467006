"""Chat templates: our rendering equals transformers' apply_chat_template(tokenize=False), template by template."""

import json

import pytest

from phi2_jax.data.chat import PHI2_TEMPLATE, ChatTemplate, load_chat_template, save_chat_template
from phi2_jax.errors import ConfigError, UserInputError
from tests import hf_reference

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2's template as published (shortened system handling kept), with raise_exception on a bad order.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('Unknown role ' + message['role']) }}{% endif %}{% endfor %}"
)
# Whitespace control, loop controls, tojson with HTML characters and a namespace: what Hub templates use.
FANCY = (
    "{%- set ns = namespace(n=0) -%}\n"
    "{% for m in messages %}\n"
    "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
    "  {% set ns.n = ns.n + 1 %}\n"
    "  [{{ ns.n }}] {{ m | tojson }}\n"
    "  {% if loop.index > 4 %}{% break %}{% endif %}\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}<gen>{% endif -%}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}],
    [{"role": "user", "content": "Hi <b>&</b> é"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "  And again?  "}, {"role": "assistant", "content": "Again."}],
]


def hf_tokenizer(tmp_path, template: str, name: str):
    folder = tmp_path / name
    hf_reference.train_bpe_tokenizer(["hello world " * 20, "what is two plus two"], 300, folder)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "bos_token": "<|endoftext|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name,template", [("phi2", PHI2_TEMPLATE), ("chatml", CHATML), ("llama2", LLAMA2),
                                           ("fancy", FANCY)])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_rendering_equals_transformers(tmp_path, name, template, generation_prompt):
    folder, hf = hf_tokenizer(tmp_path, template, name)
    ours = load_chat_template(folder)
    assert ours.template == template
    for conversation in CONVERSATIONS:
        expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.render(conversation, add_generation_prompt=generation_prompt) == expected


def test_jinja_file_wins_over_config_key_and_phi2_default(tmp_path):
    folder, _ = hf_tokenizer(tmp_path, CHATML, "both")
    (folder / "chat_template.jinja").write_text(LLAMA2)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    conversation = CONVERSATIONS[1]
    assert load_chat_template(folder).render(conversation) == hf.apply_chat_template(conversation, tokenize=False)
    # No template anywhere (the base model): the model card's QA format.
    assert load_chat_template(None).render(CONVERSATIONS[1], add_generation_prompt=False) == (
        "You are terse.\nInstruct: Name a prime.\nOutput: 7<|endoftext|>\n")
    assert load_chat_template(None).render(CONVERSATIONS[0], add_generation_prompt=True) == (
        "Instruct: What is 2 + 2?\nOutput:")


def test_unknown_role_and_bad_templates_are_one_sentence(tmp_path):
    folder, hf = hf_tokenizer(tmp_path, LLAMA2, "llama")
    bad = [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]
    with pytest.raises(Exception, match="Unknown role robot"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(UserInputError, match=r"failed to render a conversation: Unknown role robot\.$"):
        load_chat_template(folder).render(bad)
    with pytest.raises(UserInputError, match="unknown role robot"):
        ChatTemplate(PHI2_TEMPLATE, {"eos_token": "<|endoftext|>"}).render(bad)
    with pytest.raises(ConfigError, match="does not parse as jinja"):
        ChatTemplate("{% for m in messages %}")


def test_saved_template_is_what_transformers_renders_in_an_exported_folder(tmp_path):
    folder, _ = hf_tokenizer(tmp_path, CHATML, "export")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]  # an exported base model: no template of its own
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    save_chat_template(load_chat_template(None), folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for conversation in CONVERSATIONS:
        assert hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
            load_chat_template(None).render(conversation, add_generation_prompt=True))
    assert load_chat_template(folder).template == PHI2_TEMPLATE
