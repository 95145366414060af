"""Training chat templates: chosen only when they render exactly like the model's own."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pipeline.stages.train_worker import (
    choose_training_template,
    has_generation_markers,
    shipped_templates,
    to_prompt_completion,
)

# meta-llama/Llama-2-7b-chat-hf's chat template, verbatim (tokenizer_config.json).
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_every_shipped_template_has_generation_markers():
    templates = shipped_templates()
    assert {"smollm2", "chatml", "llama2"} <= set(templates)
    assert all(has_generation_markers(text) for text in templates.values())


def test_smollm2_gets_its_marked_template_and_assistant_mask(tokenizer):
    original = tokenizer.chat_template
    choice = choose_training_template(tokenizer)
    assert choice.source == "smollm2"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    assert tokenizer.apply_chat_template(messages, chat_template=choice.template, tokenize=False) == (
        tokenizer.apply_chat_template(messages, chat_template=original, tokenize=False)
    )
    out = tokenizer.apply_chat_template(
        messages, chat_template=choice.template, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    # exactly the reply and its end-of-turn token: the model learns to answer and to stop
    assert tokenizer.decode(masked) == "Hello there<|im_end|>"


def test_llama2_chat_template_is_matched(tokenizer):
    tokenizer.chat_template = LLAMA2_CHAT
    choice = choose_training_template(tokenizer)
    assert choice.source == "llama2"


def test_unknown_template_means_fallback(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    choice = choose_training_template(tokenizer)
    assert choice.template is None and "no shipped template" in choice.reason
    tokenizer.chat_template = None
    assert "no chat template" in choose_training_template(tokenizer).reason


def test_already_marked_template_is_kept(tokenizer):
    tokenizer.chat_template = shipped_templates()["chatml"]
    assert choose_training_template(tokenizer).source == "model"


def test_completion_only_fallback_splits_at_last_assistant_turn():
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    row = to_prompt_completion({"messages": messages})
    assert row == {"prompt": messages[:3], "completion": messages[3:]}


def test_the_llama2_configs_template_file_gets_the_marked_llama2_template(tokenizer):
    from pathlib import Path

    config_template = Path(__file__).resolve().parents[2] / "configs" / "templates" / "llama2_chat.jinja"
    tokenizer.chat_template = config_template.read_text()
    assert choose_training_template(tokenizer).source == "llama2"
