"""Training-compatible chat templates: the loss must fall on the assistant's tokens only.

TRL masks the loss with ``{% generation %}`` markers in the chat template, which most models' own
templates lack. ``pipeline/templates/`` ships marked copies; we pick the one that renders
*byte-for-byte* like the model's own on probe conversations, so training sees exactly the text
inference will see (the markers are no-ops outside training). With no match the caller decides
(``train.template_fallback``): fail, or TRL's completion-only loss on the last assistant turn.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, NamedTuple

# Probe conversations: with and without a system prompt, single- and multi-turn.
_PROBES = (
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": " Name a colour. "},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red, or green.\nBoth work."},
    ],
)


class TemplateChoice(NamedTuple):
    """The outcome: ``template`` is None when the caller must fall back to completion-only loss."""

    template: str | None
    source: str  # "model" (already marked), a shipped template name, or "none"
    reason: str


def shipped_templates() -> dict[str, str]:
    """Name -> Jinja text of every template in ``pipeline/templates``."""
    folder = resources.files("pipeline") / "templates"
    return {
        entry.name.removesuffix(".jinja"): entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".jinja")
    }


def has_generation_markers(template: str | None) -> bool:
    """True when the template marks assistant spans (whitespace-control variants included)."""
    return {"generation", "endgeneration"} <= set(re.findall(r"{%-?\s*(\w+)\s*-?%}", template or ""))


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]], prompt: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )
    except Exception:  # a template may refuse a probe (e.g. role alternation): not a match
        return None


def renders_identically(tokenizer: Any, candidate: str, reference: str) -> bool:
    """True when ``candidate`` renders exactly like ``reference`` on every probe conversation
    (those ``reference`` accepts), with and without the generation prompt."""
    for probe in _PROBES:
        for prompt in (False, True):
            messages = probe[:-1] if prompt else probe
            want = _render(tokenizer, reference, messages, prompt)
            if want is not None and _render(tokenizer, candidate, messages, prompt) != want:
                return False
    return True


def choose_training_template(tokenizer: Any) -> TemplateChoice:
    """Pick the chat template to train with for this tokenizer (its current template is the
    model's own, or the configured ``model.chat_template`` override)."""
    current = tokenizer.chat_template
    if isinstance(current, dict):  # multi-template tokenizers: the default one is what chat uses
        current = current.get("default")
    if not current:
        return TemplateChoice(None, "none", "the tokenizer has no chat template (set model.chat_template)")
    if has_generation_markers(current):
        return TemplateChoice(current, "model", "the chat template already has generation markers")
    for name, text in shipped_templates().items():
        if renders_identically(tokenizer, text, current):
            return TemplateChoice(text, name, f"shipped template '{name}' renders like the model's own")
    return TemplateChoice(
        None, "none", "no shipped template with generation markers renders like this model's chat template"
    )


def to_prompt_completion(example: dict[str, Any]) -> dict[str, Any]:
    """Completion-only fallback: everything before the last assistant turn is the prompt."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}
