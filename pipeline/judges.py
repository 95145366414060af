"""Judge backends: anything that turns judge chats into judge outputs.

Two backends behind one small interface (``pipeline.eval.judging.JudgeBackend``, what the judging
loop needs):

- :class:`OpenAIJudge` talks to any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM,
  TGI, llama.cpp server) through the ``openai`` client, which already does retries with exponential
  backoff (honouring ``Retry-After``) on 408/409/429/5xx and connection errors. We add a
  concurrency limit and turn the failures a user can act on (bad key, endpoint down, wrong model)
  into one clear line. The API key is read from the environment variable the config names, held
  only by the client, and never put into messages, logs, records or MLflow.
- :class:`LocalJudge` runs a transformers model in-process, either generating a verdict like a
  remote judge, or ("logits") picking the most likely rating after ``Rating: [[`` — a way to get a
  rating out of a small local judge that rarely writes the format unprompted. Pairwise, both
  "logits" and "expected" pick the most likely of ``A``/``B``/``C`` after ``Verdict: [[`` (there
  is no mean of a choice), and write the three probabilities into the judgment text.

Backends know nothing of questions or caching (``pipeline.eval.judging`` does that); their
``identity`` feeds the judgment cache key, so a different judge means fresh judgments.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from pipeline.errors import StageError

if TYPE_CHECKING:
    from pipeline.config import JudgeConfig, ModelConfig
    from pipeline.eval.judging import Chat


# --------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP
# --------------------------------------------------------------------------------------------
class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(
        self,
        *,
        model: str,
        api_key_env: str,
        base_url: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 512,
        concurrency: int = 4,
        retries: int = 5,
        timeout_s: float = 120.0,
    ) -> None:
        import openai

        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise StageError(
                f"eval.judge.api_key_env: environment variable {api_key_env} is not set (it must hold the "
                "judge endpoint's API key)"
            )
        self.name = model
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.retries = retries
        self._client = openai.OpenAI(
            api_key=api_key, base_url=base_url, max_retries=retries, timeout=timeout_s
        )
        self.base_url = str(self._client.base_url).rstrip("/")

    @classmethod
    def from_config(cls, config: JudgeConfig) -> OpenAIJudge:
        assert config.model and config.api_key_env  # guaranteed by JudgeConfig's validator
        return cls(
            model=config.model,
            api_key_env=config.api_key_env,
            base_url=config.base_url,
            temperature=config.temperature,
            max_tokens=config.max_new_tokens,
            concurrency=config.concurrency,
            retries=config.retries,
            timeout_s=config.timeout_s,
        )

    def identity(self) -> dict[str, Any]:
        return {
            "backend": "openai",
            "base_url": self.base_url,
            "model": self.name,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def _one(self, chat: Chat) -> str:
        """One completion; the client retries transient failures, we translate the final ones."""
        import openai

        try:
            response = self._client.chat.completions.create(
                model=self.name, messages=chat, temperature=self.temperature, max_tokens=self.max_tokens
            )
        except openai.AuthenticationError:
            raise StageError(
                f"judge: authentication failed at {self.base_url} (HTTP 401): check the key in "
                f"${self.api_key_env}"
            ) from None
        except openai.PermissionDeniedError:
            raise StageError(
                f"judge: access denied at {self.base_url} (HTTP 403) for model {self.name!r}"
            ) from None
        except openai.NotFoundError:
            raise StageError(
                f"judge: HTTP 404 from {self.base_url}: check eval.judge.base_url and eval.judge.model "
                f"({self.name!r})"
            ) from None
        except openai.APITimeoutError:
            raise StageError(
                f"judge: endpoint timed out after {self.retries} retries: {self.base_url}"
            ) from None
        except openai.APIConnectionError:
            raise StageError(
                f"judge: endpoint unreachable after {self.retries} retries: {self.base_url}"
            ) from None
        except openai.APIStatusError as error:
            raise StageError(
                f"judge: HTTP {error.status_code} from {self.base_url} after {self.retries} retries"
            ) from None
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""

    def complete(
        self, chats: list[Chat], samples: int, pairwise: bool = False
    ) -> Iterator[tuple[int, list[str]]]:
        if not chats:
            return
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(self._samples, chat, samples): index for index, chat in enumerate(chats)}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield futures[future], future.result()  # re-raises the first failure
            finally:
                for future in pending:
                    future.cancel()

    def _samples(self, chat: Chat, samples: int) -> list[str]:
        return [self._one(chat) for _ in range(samples)]


# --------------------------------------------------------------------------------------------
# local transformers model
# --------------------------------------------------------------------------------------------
class LocalJudge:
    """A judge run in-process with transformers (any chat model ``pipeline.models`` can load)."""

    RATING_PREFIX = "Rating: [["
    VERDICT_PREFIX = "Verdict: [["

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        identity: dict[str, Any],
        scoring: str = "generate",
        temperature: float = 0.0,
        max_new_tokens: int = 512,
        batch_size: int = 4,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self._identity = identity
        self.scoring = scoring
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.seed = seed
        self._model_config: ModelConfig | None = None

    @classmethod
    def from_config(cls, config: JudgeConfig, base_model: ModelConfig, seed: int = 0) -> LocalJudge:
        """The configured judge (``local_model``, or the base model when unset); its weights load
        on first use, so a fully cached evaluation never loads them."""
        from pipeline.eval.identity import model_identity

        model_cfg = config.local_model or base_model
        identity = {
            "backend": "local",
            "model": model_identity(model_cfg),
            "scoring": config.local_scoring,
            "temperature": config.temperature,
            "max_new_tokens": config.max_new_tokens,
            "seed": seed,
        }
        judge = cls(
            None,
            None,
            name=model_cfg.name_or_path + (f"/{model_cfg.gguf_file}" if model_cfg.gguf_file else ""),
            identity=identity,
            scoring=config.local_scoring,
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            seed=seed,
        )
        judge._model_config = model_cfg
        return judge

    def _load(self) -> None:
        if self.model is not None:
            return
        import torch

        from pipeline.models import load_model, load_tokenizer

        device_map = "auto" if torch.cuda.is_available() else None
        self.model = load_model(self._model_config, device_map=device_map).eval()
        self.tokenizer = load_tokenizer(self._model_config)

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def render(self, chat: Chat) -> str:
        """The judge's prompt text through its chat template (system message folded in if the
        template has no system role)."""
        try:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception:
            merged = [{"role": "user", "content": "\n\n".join(m["content"] for m in chat)}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def complete(
        self, chats: list[Chat], samples: int, pairwise: bool = False
    ) -> Iterator[tuple[int, list[str]]]:
        from pipeline.eval.generate import generate_batch

        if chats:
            self._load()
        for start in range(0, len(chats), self.batch_size):
            indices = list(range(start, min(start + self.batch_size, len(chats))))
            prompts = [self.render(chats[i]) for i in indices]
            outputs: list[list[str]] = [[] for _ in indices]
            for sample in range(samples):
                if pairwise and self.scoring != "generate":
                    texts = [self.pair_verdict(p) for p in prompts]
                elif self.scoring == "logits":
                    texts = [f"Rating: [[{self.most_likely_rating(p)}]]" for p in prompts]
                elif self.scoring == "expected":
                    texts = [f"Rating: [[{self.expected_rating(p):.2f}]]" for p in prompts]
                else:
                    texts = generate_batch(
                        self.model,
                        self.tokenizer,
                        prompts,
                        self.temperature,
                        self.max_new_tokens,
                        self.seed + start + sample,
                    )
                for row, text in enumerate(texts):
                    outputs[row].append(text)
            yield from zip(indices, outputs, strict=True)

    def rating_logprobs(self, prompt: str) -> list[float]:
        """log p("k]]" | prompt + "Rating: [[") for k = 1..10."""
        return self.choice_logprobs(prompt, self.RATING_PREFIX, [f"{k}]]" for k in range(1, 11)])

    def pair_verdict(self, prompt: str) -> str:
        """``[[A]]``, ``[[B]]`` or ``[[C]]``, whichever is most likely after ``Verdict: [[``."""
        import torch

        probs = torch.tensor(
            self.choice_logprobs(prompt, self.VERDICT_PREFIX, ["A]]", "B]]", "C]]"])
        ).softmax(0)
        p_a, p_b, p_c = probs.tolist()
        return f"[[{'ABC'[int(probs.argmax())]}]] (p A {p_a:.3f}, B {p_b:.3f}, C {p_c:.3f})"

    def choice_logprobs(self, prompt: str, prefix_text: str, choices: list[str]) -> list[float]:
        """log p(choice | prompt + prefix_text) for each choice.

        The prompt is run once; its KV cache is repeated for the candidates, which are then
        scored together in one small batch (right-padded, so padding never precedes a real token).
        """
        import torch

        prefix = self.tokenizer(prompt + prefix_text, add_special_tokens=False)["input_ids"]
        candidates = [self.tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in choices]
        device = self.model.device
        with torch.no_grad():
            first = self.model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
            first_logprobs = torch.log_softmax(first.logits[0, -1].float(), dim=-1).cpu()
            width = max(len(c) for c in candidates) - 1
            rest_logprobs = None
            if width > 0:
                pad = self.tokenizer.pad_token_id or 0
                ids = torch.full((len(candidates), width), pad, dtype=torch.long)
                mask = torch.zeros((len(candidates), len(prefix) + width), dtype=torch.long)
                mask[:, : len(prefix)] = 1
                for row, cand in enumerate(candidates):
                    ids[row, : len(cand) - 1] = torch.tensor(cand[:-1])
                    mask[row, len(prefix) : len(prefix) + len(cand) - 1] = 1
                cache = first.past_key_values
                cache.batch_repeat_interleave(len(candidates))
                rest = self.model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache
                )
                rest_logprobs = torch.log_softmax(rest.logits.float(), dim=-1).cpu()
        scores = []
        for row, cand in enumerate(candidates):
            score = first_logprobs[cand[0]].item()
            for position, token in enumerate(cand[1:]):
                score += rest_logprobs[row, position, token].item()
            scores.append(score)
        return scores

    def most_likely_rating(self, prompt: str) -> int:
        scores = self.rating_logprobs(prompt)
        return max(range(10), key=lambda i: scores[i]) + 1

    def expected_rating(self, prompt: str) -> float:
        """The probability-weighted mean rating over 1..10 (as G-Eval scores): small judges put
        most mass on one habitual number, so the arg-max barely moves, while the expectation still
        follows how the judge's belief shifts between answers."""
        import torch

        probs = torch.tensor(self.rating_logprobs(prompt), dtype=torch.float64).softmax(dim=0)
        return float((probs * torch.arange(1, 11, dtype=torch.float64)).sum())
