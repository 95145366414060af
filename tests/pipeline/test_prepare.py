# ruff: noqa: E501  (expected messages are compared verbatim)
"""The prepare stage: every format and file type, malformed rows, filters, mixing, split, cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig
from pipeline.stages import prepare
from pipeline.stages.base import StageError

pytestmark = pytest.mark.slow  # loads the SmolLM2 tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from pipeline.config import ModelConfig
    from pipeline.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(smollm2_dir)))


def make_config(tmp_path: Path, smollm2_dir: Path, sources: list[dict], **data) -> PipelineConfig:
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return PipelineConfig.model_validate({
        "run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 1},
        "model": {"name_or_path": str(smollm2_dir)},
        "data": {"sources": sources, **data},
    })  # fmt: skip


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def load(out: Path):
    from datasets import load_from_disk

    return load_from_disk(str(out / "dataset"))


USER_ASSISTANT = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_every_format_normalises_to_the_same_messages(tmp_path, smollm2_dir, tokenizer):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}])
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "Say hi"},
                                                                      {"from": "gpt", "value": "hi"}]}])  # fmt: skip
    messages = write_jsonl(tmp_path / "msg.jsonl", [{"messages": USER_ASSISTANT, "answer": "hi"}])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi", "completion": "hi"}])
    for path, fmt in (
        (alpaca, "alpaca"),
        (sharegpt, "sharegpt"),
        (messages, "messages"),
        (pc, "prompt_completion"),
    ):
        for declared in ("auto", fmt):
            config = make_config(tmp_path, smollm2_dir, [{"path": path, "format": declared}], eval_fraction=0.0,
                                 dedupe=False)  # fmt: skip
            out = tmp_path / f"out-{fmt}-{declared}"
            out.mkdir()
            stats = prepare.build(config, tokenizer, out)
            assert stats["formats"] == {Path(path).name: fmt}
            dataset = load(out)
            assert list(dataset) == ["train", "eval"] and len(dataset["eval"]) == 0
            assert dataset["train"][0]["messages"] == USER_ASSISTANT
            assert dataset["train"][0]["source"] == Path(path).name
            assert dataset["train"][0]["answer"] == ("hi" if fmt == "messages" else None)


def test_file_types_and_alpaca_input(tmp_path, smollm2_dir, tokenizer):
    rows = [
        {"instruction": f"Add {i} and 1.", "input": "Show the sum.", "output": str(i + 1)} for i in range(6)
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with (tmp_path / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.json", "a.csv", "a.parquet"):
        config = make_config(tmp_path, smollm2_dir, [{"path": str(tmp_path / name)}], eval_size=2)
        out = tmp_path / f"out-{name}"
        out.mkdir()
        stats = prepare.build(config, tokenizer, out)
        assert stats["rows_out"] | {} == {"total": 6, "train": 4, "eval": 2, f"source:{name}": 6}
        dataset = load(out)
        first = sorted([*dataset["train"]["messages"], *dataset["eval"]["messages"]], key=str)[0]
        assert first[0] == {"role": "user", "content": "Add 0 and 1.\n\nShow the sum."}


BAD_ROWS = [
    {"messages": USER_ASSISTANT},                                                   # 1 fine
    {"messages": [{"role": "user", "content": "x"}]},                               # 2 no assistant
    "{not json",                                                                    # 3
    {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 4
    {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "y"}]},  # 5
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},     # 6
    {"messages": "hello"},                                                          # 7
    {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},   # 8
    {"prompt": "x"},                                                                # 9 missing field
    [1, 2],                                                                         # 10 not an object
    {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},  # 11 fine
]  # fmt: skip
EXPECTED_REPORT = [
    (2, "last turn must be from the assistant"),
    (3, "invalid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    (4, "messages[1] has bad role 'robot'"),
    (5, "empty user turn (turn 1)"),
    (6, "messages[1].content must be a string (got int)"),
    (7, "field 'messages' must be a list of turns (got str)"),
    (8, "turns must alternate user/assistant (turn 1 is assistant)"),
    (9, "missing field 'messages'"),
    (10, "row must be an object (got list)"),
]


def test_malformed_rows_are_reported_with_row_numbers(tmp_path, smollm2_dir, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    config = make_config(tmp_path, smollm2_dir, [{"path": path, "format": "messages"}], eval_fraction=0.0)
    out = tmp_path / "out"
    out.mkdir()
    stats = prepare.build(config, tokenizer, out)
    assert stats["rows_in"]["total"] == 11 and stats["rows_out"]["total"] == 2
    assert stats["dropped"] == {"malformed": 9}
    report = [json.loads(line) for line in (out / "malformed.jsonl").read_text().splitlines()]
    assert [(item["row"], item["reason"]) for item in report] == EXPECTED_REPORT
    assert {item["source"] for item in report} == {"bad.jsonl"}

    strict = make_config(tmp_path, smollm2_dir, [{"path": path, "format": "messages"}], strict=True)
    with pytest.raises(StageError) as info:
        prepare.build(strict, tokenizer, tmp_path)
    assert (
        str(info.value)
        == "data.strict: 9 malformed row(s); first: bad.jsonl row 2: last turn must be from the assistant"
    )


def test_bad_jsonl_line_in_the_middle_is_reported_by_file_and_line(tmp_path, smollm2_dir, tokenizer):
    """datasets cannot load a file with a line that is not JSON: every other row is still used, and
    the reports name file and line (blank lines counted), whether or not the file loads as a table."""
    good = [json.dumps({"prompt": f"p{i}", "completion": "c"}) for i in range(6)]
    lines = [good[0], good[1], "", good[2], '{"prompt": "x", "completion": ', good[3], '{"prompt": "y"}', good[4]]
    path = tmp_path / "mid.jsonl"
    path.write_text("\n".join(lines) + "\n")
    config = make_config(tmp_path, smollm2_dir, [{"path": str(path)}], eval_fraction=0.0)
    out = tmp_path / "out"
    out.mkdir()
    stats = prepare.build(config, tokenizer, out)
    assert stats["rows_in"]["total"] == 7 and stats["rows_out"]["train"] == 5
    report = [json.loads(line) for line in (out / "malformed.jsonl").read_text().splitlines()]
    assert report == [
        {"source": "mid.jsonl", "row": 5, "reason": "invalid JSON (Expecting value: line 2 column 1 (char 31))"},
        {"source": "mid.jsonl", "row": 7, "reason": "missing field 'completion'"},
    ]
    strict = make_config(tmp_path, smollm2_dir, [{"path": str(path)}], strict=True)
    with pytest.raises(StageError) as info:
        prepare.build(strict, tokenizer, tmp_path)
    assert str(info.value) == (
        "data.strict: 2 malformed row(s); first: mid.jsonl row 5: invalid JSON (Expecting value: line 2 column 1 "
        "(char 31))"
    )
    # Without the bad line the file loads as one table; blank lines still count in the line numbers.
    path.write_text("\n".join([good[0], "", "  ", '{"prompt": "y"}', good[5]]) + "\n")
    with pytest.raises(StageError, match=r"^data\.strict: 1 malformed row\(s\); first: mid\.jsonl row 4: missing field 'completion'$"):
        prepare.build(strict, tokenizer, tmp_path)


def test_csv_cells_stay_strings(tmp_path, smollm2_dir, tokenizer):
    """CSV cells are text as written: "007" keeps its zeros, an empty cell is an empty turn (not a
    missing field, as pandas' number and NaN inference would make them)."""
    path = tmp_path / "c.csv"
    path.write_text("instruction,input,output\n007,,1.50\nSay hi,,\n")
    config = make_config(tmp_path, smollm2_dir, [{"path": str(path)}], eval_fraction=0.0)
    out = tmp_path / "out"
    out.mkdir()
    stats = prepare.build(config, tokenizer, out)
    assert stats["malformed_examples"] == [{"source": "c.csv", "row": 2, "reason": "empty assistant turn (turn 2)"}]
    assert load(out)["train"]["messages"] == [[{"role": "user", "content": "007"}, {"role": "assistant", "content": "1.50"}]]


def test_unreadable_file_and_unknown_format(tmp_path, smollm2_dir, tokenizer, shared_data):
    broken = tmp_path / "broken.json"
    broken.write_text("[{]")
    config = make_config(tmp_path, smollm2_dir, [{"path": str(broken)}])
    with pytest.raises(
        StageError, match=r"^data\.sources\.0\.path: cannot read .*broken\.json: JSONDecodeError: "
    ):
        prepare.build(config, tokenizer, tmp_path)
    seeds = (
        shared_data / "instruct" / "self_instruct_seed_tasks.jsonl"
    )  # instruction + instances: not a chat format
    config = make_config(tmp_path, smollm2_dir, [{"path": str(seeds)}])
    with pytest.raises(StageError) as info:
        prepare.build(config, tokenizer, tmp_path)
    assert str(info.value) == (
        "data.sources.0.format: cannot detect the format of self_instruct_seed_tasks.jsonl (row 1 has keys: id, "
        "instances, instruction, is_classification, name); set it to alpaca, sharegpt, messages or prompt_completion"
    )


def test_shared_data_mix_dedupe_length_filter(tmp_path, smollm2_dir, tokenizer, shared_data):
    gsm8k = shared_data / "instruct" / "gsm8k_train_alpaca.json"
    roleplay = shared_data / "instruct" / "gpteacher_roleplay.json"
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"instruction": "Say hi", "output": "hi"}] * 3)
    sources = [{"path": str(gsm8k), "samples": 20, "name": "gsm8k"}, {"path": str(roleplay), "samples": 10},
               {"path": dup}, {"builtin": 30}]  # fmt: skip
    config = make_config(tmp_path, smollm2_dir, sources, max_length=300, eval_size=10)
    out = tmp_path / "out"
    out.mkdir()
    stats = prepare.build(config, tokenizer, out)
    n_gsm8k, n_roleplay = (len(json.loads(path.read_text())) for path in (gsm8k, roleplay))  # 7473, 3146
    assert stats["rows_in"] == {"total": n_gsm8k + n_roleplay + 3 + 30, "source:gsm8k": n_gsm8k,
                                "source:gpteacher_roleplay.json": n_roleplay, "source:dup.jsonl": 3,
                                "source:builtin": 30}  # fmt: skip
    # both files hold rows over 300 tokens (the excerpts too: gsm8k row 10, roleplay rows 14, 20, 32)
    assert stats["dropped"]["duplicate"] >= 2 and stats["dropped"]["too_long"] > 0
    out_counts = stats["rows_out"]
    assert out_counts["source:gsm8k"] == 20 and out_counts["source:gpteacher_roleplay.json"] == 10
    assert out_counts["source:dup.jsonl"] == 1
    assert sum(v for k, v in out_counts.items() if k.startswith("source:builtin:")) == 30
    assert out_counts["total"] == 61 and out_counts["eval"] == 10
    assert stats["token_length"]["max"] <= 300 and stats["token_length"]["p50"] > 0
    assert (out / "token_lengths.png").stat().st_size > 1000
    dataset = load(out)
    built = [
        row for split in ("train", "eval") for row in dataset[split] if row["source"].startswith("builtin:")
    ]
    assert len(built) == 30 and all(row["answer"] for row in built)
    assert all(row["answer"] is None for row in dataset["train"] if row["source"] == "gsm8k")


def test_weights_share_the_mixture(tmp_path, smollm2_dir, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(100)])
    config = make_config(tmp_path, smollm2_dir, [{"path": a, "weight": 1}, {"path": b, "weight": 3}],
                         eval_fraction=0.0)  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    stats = prepare.build(config, tokenizer, out)
    # b limits the mixture: its 100 rows are 3/4 of 133, so a contributes round(133 / 4) = 33
    assert stats["rows_out"]["source:a.jsonl"] == 33 and stats["rows_out"]["source:b.jsonl"] == 100
    config = make_config(tmp_path, smollm2_dir, [{"path": a, "weight": 1}, {"path": b, "weight": 1}],
                         max_samples=60, eval_fraction=0.0)  # fmt: skip
    out = tmp_path / "out2"
    out.mkdir()
    stats = prepare.build(config, tokenizer, out)
    assert stats["rows_out"]["source:a.jsonl"] == 30 and stats["rows_out"]["source:b.jsonl"] == 30
    assert stats["dropped"]["sampled_out"] == 80


def test_split_is_deterministic_and_cache_is_reused(tmp_path, smollm2_dir, tokenizer, monkeypatch):
    sources = [{"builtin": 200}]
    first, hit = prepare.prepare_cached(make_config(tmp_path, smollm2_dir, sources), tokenizer)
    assert not hit
    again, hit = prepare.prepare_cached(make_config(tmp_path, smollm2_dir, sources), tokenizer)
    assert hit and again == first
    other, hit = prepare.prepare_cached(
        make_config(tmp_path, smollm2_dir, sources, cache_dir=str(tmp_path / "cache2")), tokenizer
    )
    assert not hit
    digests = [json.loads((folder / "stats.json").read_text())["digests"] for folder in (first, other)]
    assert digests[0] == digests[1]  # rebuilt from scratch elsewhere: identical split
    assert load(first)["eval"]["messages"] == load(other)["eval"]["messages"]
    reseeded = make_config(tmp_path, smollm2_dir, sources).model_copy(update={"run": make_config(
        tmp_path, smollm2_dir, sources).run.model_copy(update={"seed": 2})})  # fmt: skip
    third, hit = prepare.prepare_cached(reseeded, tokenizer)
    assert not hit and json.loads((third / "stats.json").read_text())["digests"]["eval"] != digests[0]["eval"]

    def boom(*args, **kwargs):
        raise AssertionError("a cache hit must not rebuild")

    monkeypatch.setattr(prepare, "build", boom)
    assert prepare.prepare_cached(make_config(tmp_path, smollm2_dir, sources), tokenizer) == (first, True)


def test_changed_file_content_misses_the_cache(tmp_path, smollm2_dir, tokenizer):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}])
    config = make_config(tmp_path, smollm2_dir, [{"path": str(path)}])
    before, _ = prepare.prepare_cached(config, tokenizer)
    write_jsonl(path, [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "changed"}])
    after, hit = prepare.prepare_cached(config, tokenizer)
    assert not hit and after != before


def test_hub_source_via_load_dataset(tmp_path, smollm2_dir, tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split, revision))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub or cannot be accessed.")
        return datasets.Dataset.from_list(
            [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = make_config(tmp_path, smollm2_dir, [{"hub": "yahma/alpaca-cleaned", "split": "train", "revision": "r1",
                                                  "samples": 4}], eval_size=1)  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    stats = prepare.build(config, tokenizer, out)
    assert calls == [("yahma/alpaca-cleaned", None, "train", "r1")]
    assert stats["rows_out"] == {"total": 4, "train": 3, "eval": 1, "source:yahma/alpaca-cleaned": 4}
    config = make_config(tmp_path, smollm2_dir, [{"hub": "missing/set"}])
    with pytest.raises(StageError) as info:
        prepare.build(config, tokenizer, tmp_path)
    assert str(info.value) == ("data.sources.0.hub: cannot load 'missing/set' (split 'train'): Dataset 'missing/set' "
                               "doesn't exist on the Hub or cannot be accessed.")  # fmt: skip


def test_chat_template_is_checked(tmp_path, smollm2_dir, tokenizer):
    config = make_config(tmp_path, smollm2_dir, [{"builtin": 10}])
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}\n{% endfor %}"  # drops the content
        with pytest.raises(
            StageError, match=r"^model\.chat_template: the rendered template drops message content"
        ):
            prepare.build(config, tokenizer, tmp_path)
        tokenizer.chat_template = None
        with pytest.raises(StageError, match=r"^model\.chat_template: the tokenizer has no chat template"):
            prepare.build(config, tokenizer, tmp_path)
    finally:
        tokenizer.chat_template = original


def test_nothing_left_and_eval_too_big(tmp_path, smollm2_dir, tokenizer):
    config = make_config(tmp_path, smollm2_dir, [{"builtin": 10}], max_length=5)
    with pytest.raises(
        StageError,
        match=r"^data: no examples left after filtering \(dropped: \{'malformed': 0, 'too_long': 10\}\)",
    ):
        prepare.build(config, tokenizer, tmp_path)
    config = make_config(tmp_path, smollm2_dir, [{"builtin": 10}], eval_size=10)
    with pytest.raises(StageError, match=r"^data\.eval_size: 10 eval rows leave no training rows \(10 rows"):
        prepare.build(config, tokenizer, tmp_path)


def test_llama2_chat_template_file(smollm2_dir):
    """The production configs' template file renders the Llama-2 chat format (loaded through
    model.chat_template as a path, the way the configs use it)."""
    from pipeline.config import ModelConfig
    from pipeline.models import load_tokenizer

    repo = Path(__file__).resolve().parents[2]
    template = repo / "configs" / "templates" / "llama2_chat.jinja"
    tok = load_tokenizer(ModelConfig(name_or_path=str(smollm2_dir), chat_template=str(template)))
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                {"role": "assistant", "content": "A2"}]  # fmt: skip
    bos, eos = tok.bos_token, tok.eos_token
    assert tok.apply_chat_template(messages, tokenize=False) == (
        f"{bos}[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 {eos}{bos}[INST] U2 [/INST] A2 {eos}"
    )
    prepare.check_template(tok)


def test_per_source_held_out_slices_are_fixed_and_never_trained_on(
    tmp_path, smollm2_dir, tokenizer, shared_data
):
    gsm8k = str(shared_data / "instruct" / "gsm8k_train_alpaca.json")
    roleplay = str(shared_data / "instruct" / "gpteacher_roleplay.json")

    def build(name: str, run_seed: int, gsm8k_samples: int) -> tuple[dict, object]:
        sources = [{"path": gsm8k, "name": "gsm8k", "samples": gsm8k_samples, "eval_samples": 5,
                    "answer_from": "last_number"},
                   {"path": roleplay, "name": "roleplay", "samples": 20, "eval_samples": 3}]  # fmt: skip
        config = make_config(tmp_path, smollm2_dir, sources, max_length=400, seed=7)
        config = config.model_copy(update={"run": config.run.model_copy(update={"seed": run_seed})})
        out = tmp_path / name
        out.mkdir()
        return prepare.build(config, tokenizer, out), load(out)

    stats, data = build("a", run_seed=1, gsm8k_samples=20)
    assert stats["rows_out"]["eval"] == 8 and stats["rows_out"]["train"] == 40
    assert sorted(data["eval"]["source"]) == ["gsm8k"] * 5 + ["roleplay"] * 3
    key = lambda row: json.dumps(row["messages"])  # noqa: E731
    assert not {key(r) for r in data["eval"]} & {key(r) for r in data["train"]}
    # GSM8K solutions end with their result: the checkable answer is that number, canonical.
    rows = [r for split in ("train", "eval") for r in data[split] if r["source"] == "gsm8k"]
    assert all(r["answer"] == str(int(r["answer"])) for r in rows)
    import re

    for row in rows:  # e.g. "... the river was 15-10=5 feet deep." -> "5"
        assert re.findall(r"\d[\d,]*", row["messages"][-1]["content"])[-1].replace(",", "") == row["answer"]
    assert all(r["answer"] is None for r in data["train"] if r["source"] == "roleplay")
    # Another training seed (data.seed fixed) or another mixture: the same held-out rows.
    _, reseeded = build("b", run_seed=2, gsm8k_samples=20)
    _, remixed = build("c", run_seed=1, gsm8k_samples=40)
    assert reseeded["eval"]["messages"] == data["eval"]["messages"]
    assert reseeded["train"]["messages"] == data["train"]["messages"]
    assert remixed["eval"]["messages"] == data["eval"]["messages"]


def test_per_source_eval_errors(tmp_path, smollm2_dir, tokenizer):
    from pipeline.config import ConfigError, load_config

    rows = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(4)])
    config = make_config(tmp_path, smollm2_dir, [{"path": rows, "eval_samples": 4}])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError) as error:
        prepare.build(config, tokenizer, out)
    assert (
        str(error.value)
        == "data.sources.0.eval_samples: 4 eval rows leave no training rows of d.jsonl (4 rows after filtering)"
    )
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {{name: t}}\nmodel: {{name_or_path: {smollm2_dir}}}\n"
                    f"data: {{eval_fraction: 0.1, sources: [{{path: {rows}, eval_samples: 1}}]}}\n")  # fmt: skip
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    assert bad.value.lines == [
        "data.eval_fraction: sources set eval_samples: hold out rows per source or by eval_fraction, not both (got 0.1)"
    ]
