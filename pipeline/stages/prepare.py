"""The 'prepare' stage: sources → chat messages → checked, filtered, deduplicated, split dataset; cached
by a digest of all it depends on (data config, source contents, tokenizer and template, seed), so reruns,
other ranks and other nodes reuse it. Malformed rows are reported by file and row (JSONL: line)."""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.digests import digest_of, file_digest, sha256
from pipeline.numbers import canonical, last_number
from pipeline.stages.base import StageContext, StageError, StageResult

if TYPE_CHECKING:
    from pipeline.config import DataSource, PipelineConfig

NAME = "prepare"
INPUTS: tuple[str, ...] = ()
CONFIG_SECTIONS: tuple[str, ...] = ("run.seed", "data", "model.name_or_path", "model.gguf_file",
                                   "model.revision", "model.chat_template")  # fmt: skip

ROLES = {role: role for role in ("system", "user", "assistant")}
SHAREGPT_ROLES = ROLES | {"human": "user"} | dict.fromkeys(("gpt", "chatgpt", "bard", "bing"), "assistant")
# format: the field holding its turns, their role and text keys, its role names → ours
TURNS = {"sharegpt": ("conversations", "from", "value", SHAREGPT_ROLES),
         "messages": ("messages", "role", "content", ROLES)}
# format: the keys that identify it (``format: auto`` takes the first whose keys a row has)
FORMAT_KEYS = {"messages": {"messages"}, "sharegpt": {"conversations"}, "alpaca": {"instruction", "output"},
               "prompt_completion": {"prompt", "completion"}}  # fmt: skip
Row = dict[str, Any]  # one example as saved: {"messages", "source", "answer"}


class Malformed(ValueError):
    """One row cannot be used; the message says why (the caller adds file and row)."""


def read_source(source: DataSource, index: int, seed: int) -> list[tuple[int, Any]]:
    """The numbered raw records of one source (from 1; JSONL: by line); a failure is one StageError line.
    A JSON/JSONL file that is not one Arrow table (a line not JSON, a row not an object) is read by row."""
    import datasets

    from pipeline.builtin_tasks import generate_tasks

    if source.builtin is not None:
        return list(enumerate(generate_tasks(source.builtin, seed), start=1))
    if (hub := source.hub) is not None:
        try:
            rows = datasets.load_dataset(hub, source.config, split=source.split, revision=source.revision)
        except Exception as error:
            raise StageError(f"data.sources.{index}.hub: cannot load {hub!r} (split {source.split!r}): "
                             f"{(str(error).strip() or type(error).__name__).splitlines()[0]}") from None
        return list(enumerate(rows, start=1))
    path, field, rows = Path(source.path or ""), f"data.sources.{index}.path", None
    suffix = path.suffix.lower()
    builder, options = "json", {"parse_agent_traces": False}  # an agent-trace look-alike stays as written
    try:
        if suffix == ".parquet":
            builder, options = "parquet", {}
        elif suffix == ".csv":  # every cell a string, as written (pandas makes "7" 7 and "" NaN)
            with path.open(encoding="utf-8-sig", newline="") as handle:  # pandas drops a BOM too
                strings = dict.fromkeys(next(csv.reader(handle), []), datasets.Value("string"))
            builder, options = "csv", {"features": datasets.Features(strings), "keep_default_na": False}
        with tempfile.TemporaryDirectory() as scratch:  # datasets' Arrow files: not in the user's HF cache
            rows = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=scratch,
                                         **options).to_list()  # fmt: skip
    except Exception as error:  # datasets wraps the reader's error (pandas, pyarrow: no useful base)
        cause = error.__cause__ or error
        if builder != "json":
            raise StageError(f"{field}: cannot read {path}: {type(cause).__name__}: {cause}") from None
    try:
        if suffix == ".jsonl":  # datasets skips blank lines; a report names the line
            with path.open(encoding="utf-8") as handle:
                lines = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
            if rows is not None and len(rows) == len(lines):
                return [(number, row) for (number, _), row in zip(lines, rows, strict=True)]
            records = []
            for number, line in lines:
                try:
                    records.append((number, json.loads(line)))
                except ValueError as error:
                    records.append((number, Malformed(f"invalid JSON ({error})")))
            return records
        if rows is None:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict) and isinstance(rows.get("data"), list):
                rows = rows["data"]
            elif not isinstance(rows, list):
                kind = type(rows).__name__
                raise StageError(f"{field}: {path} must hold a JSON array of rows (got {kind})")
        elif suffix == ".json" and len(rows) == 1 and isinstance(rows[0].get("data"), list):
            rows = rows[0]["data"]  # {"data": [rows]}
    except (OSError, ValueError) as error:
        raise StageError(f"{field}: cannot read {path}: {type(error).__name__}: {error}") from None
    return list(enumerate(rows, start=1))


def source_digest(source: DataSource, seed: int) -> str:
    """What identifies a source: file bytes, generator settings or hub coordinates (pin ``revision``)."""
    if source.path is not None:
        return file_digest(source.path)
    spec = source.model_dump(mode="json", include={"hub", "config", "split", "revision", "builtin"})
    return sha256(json.dumps(spec | ({"seed": seed} if source.builtin is not None else {}), sort_keys=True))


def _text(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    if (value := record.get(key)) is None and required:
        raise Malformed(f"missing field '{key}'")
    if not isinstance(value, str | None):
        raise Malformed(f"field '{key}' must be a string (got {type(value).__name__})")
    return (value or "").strip()


def _turns(items: Any, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise Malformed(f"field '{key}' must be a list of turns (got {type(items).__name__})")
    messages = []
    for number, turn in enumerate(items, start=1):
        if not isinstance(turn, dict):
            raise Malformed(f"{key}[{number}] must be an object (got {type(turn).__name__})")
        if turn.get(role_key) not in roles:
            raise Malformed(f"{key}[{number}] has bad role {turn.get(role_key)!r}")
        if not isinstance(content := turn.get(text_key), str):
            raise Malformed(f"{key}[{number}].{text_key} must be a string (got {type(content).__name__})")
        messages.append({"role": roles[turn[role_key]], "content": content.strip()})
    return messages


def normalise(record: Any, fmt: str) -> tuple[list[dict[str, str]], str | None]:
    """``(messages, answer)`` for one row in format ``fmt``; raises Malformed. Turns: an optional
    system turn, then user/assistant alternating, ending with the assistant."""
    if isinstance(record, Malformed):
        raise record
    if not isinstance(record, dict):
        raise Malformed(f"row must be an object (got {type(record).__name__})")
    if fmt == "prompt_completion" and any(isinstance(record.get(k), list) for k in ("prompt", "completion")):
        keys = TURNS["messages"][1:]  # TRL's conversational variant
        messages = [t for part in ("prompt", "completion") for t in _turns(record.get(part), part, *keys)]
    elif fmt in TURNS:
        field, *keys = TURNS[fmt]
        if field not in record:
            raise Malformed(f"missing field '{field}'")
        messages = _turns(record[field], field, *keys)
    else:  # alpaca (its optional input follows the instruction), prompt_completion
        user, extra = _text(record, "instruction" if fmt == "alpaca" else "prompt"), ""
        if fmt == "alpaca" and (extra := _text(record, "input", required=False)):
            user = f"{user}\n\n{extra}"
        reply = _text(record, "output" if fmt == "alpaca" else "completion")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise Malformed("no user/assistant turns")
    for number, message in enumerate(messages, start=1):
        if not message["content"]:
            raise Malformed(f"empty {message['role']} turn (turn {number})")
    for position, message in enumerate(body):
        if message["role"] != ("user", "assistant")[position % 2]:
            raise Malformed(f"turns must alternate user/assistant (turn {position + 1} is {message['role']})")
    if body[-1]["role"] != "assistant":
        raise Malformed("last turn must be from the assistant")
    return messages, record["answer"] if isinstance(record.get("answer"), str) else None


def load_examples(config: PipelineConfig) -> tuple[list[list[Row]], list[dict], dict[str, str], Counter]:
    """The usable rows per source; malformed-row reports; the (detected) format and rows read per label."""
    data, seed = config.data, data_seed(config)
    per_source, malformed, formats, rows_in = [], [], {}, Counter()
    for index, source in enumerate(data.sources):
        label, fmt, rows = source.label, source.format, []
        records = read_source(source, index, seed)
        rows_in[label] += len(records)
        for number, record in records:
            if isinstance(record, dict):  # a table gives every row every column: absent ones are None
                record = {key: value for key, value in record.items() if value is not None}
            try:
                if fmt == "auto" and not isinstance(record, dict):
                    raise Malformed("row must be an object")
                if fmt == "auto":
                    fmt = next((name for name, keys in FORMAT_KEYS.items() if keys <= record.keys()), "auto")
                if fmt == "auto":
                    raise StageError(f"data.sources.{index}.format: cannot detect the format of {label} "
                                     f"(row {number} has keys: {', '.join(sorted(record)[:8])}); set it to "
                                     "alpaca, sharegpt, messages or prompt_completion")  # fmt: skip
                messages, answer = normalise(record, fmt)
            except Malformed as problem:
                malformed.append({"source": label, "row": number, "reason": str(problem)})
                continue
            if data.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": data.system_prompt})
            if source.answer_from == "last_number":
                answer = canonical(last_number(messages[-1]["content"]))
            category = source.builtin is not None and record.get("category")
            rows.append({"messages": messages, "source": f"builtin:{category}" if category else label,
                         "answer": answer})  # fmt: skip
        per_source.append(rows)
        formats[label] = fmt
    if data.strict and malformed:
        raise StageError(f"data.strict: {len(malformed)} malformed row(s); first: "
                         + "{source} row {row}: {reason}".format(**malformed[0]))
    return per_source, malformed, formats, rows_in


def check_template(tokenizer: Any) -> None:
    """The chat template must exist and render every turn's content (else training is wrong)."""
    if not getattr(tokenizer, "chat_template", None):
        raise StageError("model.chat_template: the tokenizer has no chat template; set model.chat_template")
    probe = [{"role": role, "content": f"PROBE-{role.upper()}"} for role in ROLES]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as error:
        raise StageError(f"model.chat_template: the chat template does not render: {error}") from None
    if missing := [m["content"] for m in probe if m["content"] not in text]:
        raise StageError(f"model.chat_template: the rendered template drops message content ({missing[0]})")


def token_lengths(tokenizer: Any, rows: list[Row]) -> list[int | None]:
    """Rendered length in tokens per row (``Dataset.map``, batched); None where the template fails."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    def render(messages: list[dict[str, str]]) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:
            return None

    def measure(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = [render(messages) for messages in batch["messages"]]
        ids = tokenizer([text or "" for text in texts], add_special_tokens=False)["input_ids"]
        bar.update(len(texts))
        return {"length": [len(i) if text is not None else None for text, i in zip(texts, ids, strict=True)]}

    if not rows:
        return []
    with tqdm(total=len(rows), desc="rendering + tokenising", unit="row", leave=False, disable=None) as bar:
        # An in-memory dataset and a given fingerprint: no cache files, no hashing of the tokenizer.
        conversations = Dataset.from_dict({"messages": [row["messages"] for row in rows]})
        return conversations.map(measure, batched=True, batch_size=256, new_fingerprint="lengths")["length"]


def key(row: Row) -> str:
    """A row's conversation, canonical: what dedupe compares and the split hashes."""
    return json.dumps(row["messages"], sort_keys=True, ensure_ascii=False)


def split(per_source: list[list[Row]], config: PipelineConfig, counts: Counter) -> tuple[list[Row], ...]:
    """Train and eval rows. Each source's ``eval_samples`` slice is held out first, fixed when the mixture
    changes; ``samples`` and ``weight`` then sample each source (without replacement, seeded); without
    per-source slices, the first ``eval_size`` / ``eval_fraction`` of the mixture in hash order are eval."""
    data, seed = config.data, data_seed(config)
    rng, held_out, mixed = random.Random(seed), [], []
    per_source = [list(rows) for rows in per_source]  # the caller's lists stay as they are
    for index, (source, rows) in enumerate(zip(data.sources, per_source, strict=True)):
        k = source.eval_samples or 0
        if k and k >= len(rows):
            raise StageError(f"data.sources.{index}.eval_samples: {k} eval rows leave no training rows of "
                             f"{source.label} ({len(rows)} rows after filtering)")  # fmt: skip
        held_out.extend(held := hash_order(rows, seed)[:k])
        taken = set(map(id, held))
        rows[:] = [row for row in rows if id(row) not in taken]  # source order
    weights = {i: float(source.weight) for i, source in enumerate(data.sources) if source.weight is not None}
    shares = {i: weight / sum(weights.values()) for i, weight in weights.items()}
    total = data.max_samples or min((len(per_source[i]) / share for i, share in shares.items()), default=0)
    targets = {i: min(len(per_source[i]), round(share * int(total))) for i, share in shares.items()}
    for index, (source, rows) in enumerate(zip(data.sources, per_source, strict=True)):
        want = source.samples or targets.get(index, len(rows))
        if want > len(rows):
            counts[f"short_of_requested:{source.label}"] += want - len(rows)
        elif want < len(rows):
            counts["sampled_out"] += len(rows) - want
            rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), want))]
        mixed.extend(rows)
    if not mixed:
        raise StageError(f"data: no examples left after filtering (dropped: {dict(counts)})")
    n, fraction = len(mixed), data.eval_fraction
    if held_out:  # the per-source slices are the eval split
        k = 0
    elif data.eval_size is not None:
        k = data.eval_size
    else:  # a fraction > 0 holds out at least one row once there are two
        k = max(round(fraction * n), int(fraction > 0 and n >= 2))
    if k >= n:
        raise StageError(f"data.eval_size: {k} eval rows leave no training rows ({n} rows after filtering)")
    ordered = hash_order(mixed, seed)
    return ordered[k:], ordered[:k] + held_out


def hash_order(rows: list[Row], seed: int) -> list[Row]:
    """Rows ordered by a seeded hash of their content: unlike shuffled positions (``train_test_split``),
    a row's side of a split stays when other rows are added or removed."""
    return sorted(rows, key=lambda row: sha256(f"{seed}\x00{key(row)}"))


def data_seed(config: PipelineConfig) -> int:
    """The seed of everything data-related: ``data.seed``, else ``run.seed``."""
    return config.data.seed if config.data.seed is not None else config.run.seed


def build(config: PipelineConfig, tokenizer: Any, out_dir: Path) -> dict[str, Any]:
    """Build ``out_dir/dataset`` + ``stats.json`` (+ ``malformed.jsonl``, ``token_lengths.png``)."""
    import datasets
    from datasets import Dataset, DatasetDict, Features, List, Value

    check_template(tokenizer)
    bars, seed = datasets.is_progress_bar_enabled(), data_seed(config)
    datasets.disable_progress_bars()  # a bar per file read, map and shard written: noise next to ours
    try:
        per_source, malformed, formats, rows_in = load_examples(config)
        counts: Counter = Counter(malformed=len(malformed))
        flat = [row for rows in per_source for row in rows]
        lengths = dict(zip(map(id, flat), token_lengths(tokenizer, flat), strict=True))
        first = {key(row): id(row) for row in reversed(flat)}  # each conversation's first row
        for rows in per_source:
            reasons = [("duplicate" if config.data.dedupe and first[key(row)] != id(row) else
                        "template_error" if lengths[id(row)] is None else
                        "too_long" if lengths[id(row)] > config.data.max_length else "") for row in rows]
            counts.update(filter(None, reasons))
            rows[:] = [row for row, reason in zip(rows, reasons, strict=True) if not reason]
        train, held_out = split(per_source, config, counts)
        features = Features({"messages": List({"role": Value("string"), "content": Value("string")}),
                             "source": Value("string"), "answer": Value("string")})  # fmt: skip
        # One shard per split: an empty eval split (eval_fraction 0) must still load back.
        splits = {"train": train, "eval": held_out}
        DatasetDict({name: Dataset.from_dict({column: [row[column] for row in rows] for column in features},
                                             features=features) for name, rows in splits.items()}
                    ).save_to_disk(str(out_dir / "dataset"), num_shards={"train": 1, "eval": 1})  # fmt: skip
    finally:
        if bars:
            datasets.enable_progress_bars()
    ordered, n = sorted(lengths[id(row)] for row in train + held_out), len(train) + len(held_out)  # n ≥ 1
    token_length = {f"p{p}": float(ordered[min(n - 1, int(p / 100 * n))]) for p in (50, 90, 95, 99)}
    out_per_source = sorted(Counter(row["source"] for row in train + held_out).items())
    digests = {name: sha256(*(json.dumps([row[column] for column in features], sort_keys=True)
                                  for row in rows)) for name, rows in splits.items()}
    stats = {
        "rows_in": {"total": sum(rows_in.values()), **{f"source:{k}": v for k, v in rows_in.items()}},
        "rows_out": {"total": n, "train": len(train), "eval": len(held_out),
                     **{f"source:{k}": v for k, v in out_per_source}},
        "dropped": {name: counts[name] for name in sorted(counts) if counts[name]},
        "token_length": token_length | {"min": float(ordered[0]), "max": float(ordered[-1]),
                                        "mean": round(sum(ordered) / n, 2)},
        "formats": formats,
        "digests": digests | {"sources": {s.label: source_digest(s, seed) for s in config.data.sources}},
        "malformed_examples": malformed[:20],
    }  # fmt: skip
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    if malformed:
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in malformed)
        (out_dir / "malformed.jsonl").write_text(text, encoding="utf-8")
    plot_lengths(ordered, config.data.max_length, out_dir / "token_lengths.png")
    return stats


def plot_lengths(lengths: list[int], limit: int, path: Path) -> None:
    """Histogram of kept examples' token lengths, with the filter limit marked."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    axes.hist(lengths, bins=40, color="#4C72B0")
    axes.axvline(limit, color="#C44E52", linestyle="--", label=f"max_length={limit}")
    axes.set(xlabel="tokens per example (rendered with the chat template)", ylabel="examples")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def cache_key(config: PipelineConfig, tokenizer: Any) -> str:
    """Everything the prepared dataset depends on but where it is cached; of the tokenizer, what decides
    rendering and lengths: template, vocabulary and merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else str(sorted(tokenizer.get_vocab().items()))
    identity = sha256("\x00".join([type(tokenizer).__name__, tokenizer.chat_template or "", vocabulary]))
    data, seed = config.data.model_dump(mode="json", exclude={"cache_dir"}), data_seed(config)
    sources = [source_digest(source, seed) for source in config.data.sources]
    return digest_of({"data": data, "sources": sources, "seed": seed, "tokenizer": identity, "version": 1})


def prepare_cached(config: PipelineConfig, tokenizer: Any) -> tuple[Path, bool]:
    """The cached build folder for this config, building it once (file-locked, atomic rename)."""
    from filelock import FileLock

    from pipeline.models import cache_root

    root = Path(config.data.cache_dir) if config.data.cache_dir else cache_root() / "prepared"
    root.mkdir(parents=True, exist_ok=True)
    target = root / cache_key(config, tokenizer)[:24]
    if (target / "stats.json").is_file():
        return target, True
    with FileLock(str(target) + ".lock"):
        if (target / "stats.json").is_file():
            return target, True
        staging = tempfile.TemporaryDirectory(dir=root, prefix=f"{target.name}.", ignore_cleanup_errors=True)
        with staging as tmp:  # removed unless renamed
            build(config, tokenizer, Path(tmp))
            Path(tmp).rename(target)  # the rest of the cache sees the folder complete or not at all
    return target, False


def run(ctx: StageContext) -> StageResult:
    """Prepare the dataset (or reuse the cached one); say what came in, went out, was dropped and why;
    log stats.json, the length plot and the datasets (with digests) on the active child run."""
    from datasets import load_from_disk

    from pipeline.models import load_tokenizer
    from pipeline.tracking import active_mlflow, log_dataset

    try:
        tokenizer = load_tokenizer(ctx.config.model)
    except (OSError, ValueError) as error:
        raise StageError(f"model.name_or_path: cannot load the tokenizer: {error}") from None
    built, hit = prepare_cached(ctx.config, tokenizer)
    for item in built.iterdir():  # an earlier attempt's folder is replaced, never merged into
        shutil.rmtree(ctx.work_dir / item.name, ignore_errors=True)
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, ctx.work_dir / item.name)
    stats = json.loads((ctx.work_dir / "stats.json").read_text(encoding="utf-8"))
    dropped = ", ".join(f"{k}={v}" for k, v in stats["dropped"].items()) or "nothing"
    print(f"prepare: {stats['rows_in']['total']} rows in → {stats['rows_out']['train']} train + "
          f"{stats['rows_out']['eval']} eval; dropped {dropped}{' (cached)' if hit else ''}")  # fmt: skip
    for item in stats.get("malformed_examples", [])[:5]:
        print(f"  malformed: {item['source']} row {item['row']}: {item['reason']}")
    if stats["dropped"].get("malformed", 0) > 5:
        print(f"  ... all malformed rows: {ctx.run_dir / NAME / 'malformed.jsonl'}")
    if (mlflow := active_mlflow()) is not None:
        for name in ("stats.json", "token_lengths.png", "malformed.jsonl"):
            if (ctx.work_dir / name).is_file():
                mlflow.log_artifact(str(ctx.work_dir / name))
        dataset = load_from_disk(str(ctx.work_dir / "dataset"))
        for split_name, context in (("train", "training"), ("eval", "evaluation")):
            log_dataset(dataset[split_name], name=f"{ctx.config.run.name}-{split_name}", context=context,
                        digest=stats["digests"][split_name][:16], source=str(ctx.run_dir / NAME / "dataset"))
        mlflow.set_tags({"data.digest." + re.sub(r"[^\w./ -]", "_", k): v[:16]
                         for k, v in stats["digests"]["sources"].items()})  # fmt: skip
    metrics = {"rows_in": stats["rows_in"]["total"], "rows_train": stats["rows_out"]["train"],
               "rows_eval": stats["rows_out"]["eval"], "cache_hit": float(hit),
               **{f"dropped.{k}": v for k, v in stats["dropped"].items() if ":" not in k},
               **{f"token_length.{k}": v for k, v in stats["token_length"].items()}}  # fmt: skip
    return StageResult(metrics=metrics, outputs={"dataset": "dataset", "stats": "stats.json"},
                       extra={"cache": str(built), "digests": stats["digests"]})  # fmt: skip
