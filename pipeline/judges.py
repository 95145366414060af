"""Judge backends (``pipeline.eval.judging.JudgeBackend``): an OpenAI-compatible endpoint (the ``openai``
client retries, honouring ``Retry-After``; only it holds the key, from the env variable named), or a local
transformers model that generates verdicts or reads rating probabilities (small judges rarely write them)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

import openai
import torch

from pipeline.errors import StageError
from pipeline.eval.generate import generate_batch
from pipeline.eval.identity import model_identity
from pipeline.models import load_model, load_tokenizer

if TYPE_CHECKING:
    from pipeline.config import JudgeConfig, ModelConfig
    from pipeline.eval.judging import Chat, Completions

# openai error class -> the line a user can act on; the first match wins (a timeout is also a
# connection error, and every HTTP failure an APIStatusError).
_HTTP_ERRORS = (
    ("AuthenticationError", "authentication failed at {url} (HTTP 401): check the key in ${key_env}"),
    ("PermissionDeniedError", "access denied at {url} (HTTP 403) for model {model!r}"),
    ("NotFoundError", "HTTP 404 from {url}: check eval.judge.base_url and eval.judge.model ({model!r})"),
    ("APITimeoutError", "endpoint timed out after {retries} retries: {url}"),
    ("APIConnectionError", "endpoint unreachable after {retries} retries: {url}"),
    ("APIStatusError", "HTTP {status} from {url} after {retries} retries"),
)


class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, *, model: str, api_key_env: str, base_url: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 512, concurrency: int = 4, retries: int = 5, timeout_s: float = 120.0,
                 ) -> None:  # fmt: skip
        if not (api_key := os.environ.get(api_key_env)):
            raise StageError(f"eval.judge.api_key_env: environment variable {api_key_env} is not set (it "
                             "must hold the judge endpoint's API key)")  # fmt: skip
        self.name, self.api_key_env, self.retries = model, api_key_env, retries
        self.temperature, self.max_tokens, self.concurrency = temperature, max_tokens, concurrency
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=retries,
                                     timeout=timeout_s)  # fmt: skip
        self.base_url = str(self._client.base_url).rstrip("/")

    @classmethod
    def from_config(cls, config: JudgeConfig) -> OpenAIJudge:
        names = {"model", "api_key_env", "base_url", "temperature", "concurrency", "retries", "timeout_s"}
        return cls(max_tokens=config.max_new_tokens, **config.model_dump(include=names))

    def identity(self) -> dict[str, Any]:
        return {"backend": "openai", "base_url": self.base_url, "model": self.name,
                "temperature": self.temperature, "max_tokens": self.max_tokens}  # fmt: skip

    def _one(self, chat: Chat) -> str:
        """One completion; the client retries transient failures, we translate the final ones."""
        try:
            response = self._client.chat.completions.create(
                model=self.name, messages=chat, temperature=self.temperature, max_tokens=self.max_tokens
            )
        except openai.APIError as error:
            for name, message in _HTTP_ERRORS:
                if isinstance(error, getattr(openai, name)):
                    status = getattr(error, "status_code", None)
                    raise StageError("judge: " + message.format(url=self.base_url, key_env=self.api_key_env,
                        model=self.name, retries=self.retries, status=status)) from None  # fmt: skip
            raise
        return (response.choices[0].message.content or "") if response.choices else ""

    def complete(self, chats: list[Chat], samples: int, pairwise: bool = False) -> Completions:
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(lambda c=chat: [self._one(c) for _ in range(samples)]): index
                       for index, chat in enumerate(chats)}  # fmt: skip
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()  # re-raises the first failure
            finally:
                pool.shutdown(cancel_futures=True)


class LocalJudge:
    """A judge run in-process with transformers (any chat model ``pipeline.models`` can load)."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, identity: dict[str, Any],
                 scoring: str = "generate", temperature: float = 0.0, max_new_tokens: int = 512,
                 batch_size: int = 4, seed: int = 0, model_config: ModelConfig | None = None) -> None:
        self.model, self.tokenizer, self.name, self._identity = model, tokenizer, name, identity
        self.scoring, self.temperature, self.max_new_tokens = scoring, temperature, max_new_tokens
        self.batch_size, self.seed, self._model_config = batch_size, seed, model_config

    @classmethod
    def from_config(cls, config: JudgeConfig, base_model: ModelConfig, seed: int = 0) -> LocalJudge:
        """``local_model`` or the base model; weights load on first use (a cached run never needs them)."""
        cfg = config.local_model or base_model
        settings = {"scoring": config.local_scoring, "temperature": config.temperature,
                    "max_new_tokens": config.max_new_tokens}  # fmt: skip
        identity = {"backend": "local", "model": model_identity(cfg), **settings, "seed": seed}
        name = cfg.name_or_path + (f"/{cfg.gguf_file}" if cfg.gguf_file else "")
        return cls(None, None, name=name, identity=identity, batch_size=config.batch_size, seed=seed,
                   model_config=cfg, **settings)  # fmt: skip

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def render(self, chat: Chat) -> str:
        """The prompt through the judge's chat template (the system message folded in if it has none)."""
        try:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception:
            merged = [{"role": "user", "content": "\n\n".join(m["content"] for m in chat)}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def complete(self, chats: list[Chat], samples: int, pairwise: bool = False) -> Completions:
        if chats and self.model is None:
            device_map = "auto" if torch.cuda.is_available() else None
            self.model = load_model(self._model_config, device_map=device_map).eval()
            self.tokenizer = load_tokenizer(self._model_config)
        for start in range(0, len(chats), self.batch_size):
            indices = range(start, min(start + self.batch_size, len(chats)))
            prompts = [self.render(chats[i]) for i in indices]
            runs = [self._texts(prompts, pairwise, self.seed + start + sample) for sample in range(samples)]
            yield from zip(indices, map(list, zip(*runs, strict=True)), strict=True)

    def _texts(self, prompts: list[str], pairwise: bool, seed: int) -> list[str]:
        """One sample of the judge's output for each prompt."""
        if self.scoring == "generate":
            model, tokenizer = self.model, self.tokenizer
            return generate_batch(model, tokenizer, prompts, self.temperature, self.max_new_tokens, seed)
        if pairwise:  # whichever of [[A]], [[B]], [[C]] is most likely after "Verdict: [["
            probs = [torch.tensor(self.choice_logprobs(p, "Verdict: [[", ["A]]", "B]]", "C]]"])).softmax(0)
                     for p in prompts]  # fmt: skip
            line = "[[{}]] (p A {:.3f}, B {:.3f}, C {:.3f})"
            return [line.format("ABC"[int(p.argmax())], *p.tolist()) for p in probs]
        scores = [self.rating_logprobs(p) for p in prompts]
        if self.scoring == "logits":  # the most likely rating
            return [f"Rating: [[{max(range(10), key=s.__getitem__) + 1}]]" for s in scores]
        # "expected": the probability-weighted mean rating, as G-Eval scores. Small judges put most mass on
        # one habitual number, so the arg-max barely moves; the expectation follows how their belief shifts.
        means = torch.tensor(scores, dtype=torch.float64).softmax(dim=1) @ torch.arange(1.0, 11.0).double()
        return [f"Rating: [[{mean:.2f}]]" for mean in means.tolist()]

    def rating_logprobs(self, prompt: str) -> list[float]:
        """log p("k]]" | prompt + "Rating: [[") for k = 1..10."""
        return self.choice_logprobs(prompt, "Rating: [[", [f"{k}]]" for k in range(1, 11)])

    def choice_logprobs(self, prompt: str, prefix_text: str, choices: list[str]) -> list[float]:
        """log p(choice | prompt + prefix_text) for each choice: the prompt's KV cache is repeated for
        the candidates, scored in one right-padded batch (padding never precedes a real token)."""
        prefix = self.tokenizer(prompt + prefix_text, add_special_tokens=False)["input_ids"]
        candidates = [self.tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in choices]
        n, width, device = len(candidates), max(len(c) for c in candidates) - 1, self.model.device
        with torch.no_grad():
            first = self.model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
            logprobs = [torch.log_softmax(first.logits[:, -1:].float(), dim=-1).cpu().expand(n, -1, -1)]
            if width > 0:
                ids = torch.full((n, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                mask = torch.ones((n, len(prefix) + width), dtype=torch.long)
                for row, cand in enumerate(candidates):
                    ids[row, : len(cand) - 1] = torch.tensor(cand[:-1])
                    mask[row, len(prefix) + len(cand) - 1 :] = 0
                first.past_key_values.batch_repeat_interleave(n)
                rest = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  past_key_values=first.past_key_values)  # fmt: skip
                logprobs.append(torch.log_softmax(rest.logits.float(), dim=-1).cpu())
        table = torch.cat(logprobs, dim=1)  # [candidate, position, vocab]: position i predicts token i
        return [sum(table[row, i, t].item() for i, t in enumerate(c)) for row, c in enumerate(candidates)]
