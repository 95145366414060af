"""Built-in tasks with verifiable answers from a seed, deterministic and prefix-stable: the CPU default
runs offline on data that ships with the project, and evaluation checks answers exactly (no judge)."""

from __future__ import annotations

import datetime as _dt
import json
import random
from itertools import cycle, islice
from pathlib import Path

# names, items, words, cities; units as (from, to, factor): integer factors keep answers exact
_VOCABULARY = json.loads((Path(__file__).parent / "builtin" / "task_vocabulary.json").read_text("utf-8"))
_NAMES, _ITEMS, _WORDS, _CITIES, _UNITS = map(_VOCABULARY.get, ("names", "items", "words", "cities", "units"))
Task = tuple[str, str, str]  # instruction, worked steps ("" for none), answer


def _arithmetic(rng: random.Random) -> Task:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        start, bags, per_bag = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
        bought = bags * per_bag
        return (f"{name} has {start} {item} and buys {bags} packs with {per_bag} {item} in each. "
                f"How many {item} does {name} have now?",
                f"{bags} × {per_bag} = {bought}; {start} + {bought} = {start + bought}.",
                str(start + bought))
    if kind == 1:
        start, given, friends = rng.randint(30, 120), rng.randint(1, 20), rng.randint(2, 6)
        gone = given * friends
        start += max(0, gone - start + 9) // 10 * 10  # in steps of 10, up to the first that covers the gifts
        return (f"{name} had {start} {item} and gave {given} to each of {friends} friends. "
                f"How many {item} are left?",
                f"{given} × {friends} = {gone}; {start} − {gone} = {start - gone}.", str(start - gone))
    groups, per_group = rng.randint(2, 12), rng.randint(2, 15)
    return (f"{name} shares {groups * per_group} {item} equally among {groups} boxes. "
            f"How many {item} go in each box?", f"{groups * per_group} ÷ {groups} = {per_group}.",
            str(per_group))


def _unit_conversion(rng: random.Random) -> Task:
    source, target, factor = rng.choice(_UNITS)
    forward, number = rng.random() < 0.5, rng.randint(2, 250)  # backward: chosen so the result is whole
    value, answer = (number, number * factor) if forward else (number * factor, number)
    question = (f"Convert {value} {source} to {target}." if forward
                else f"How many {source} are {value} {target}?")  # fmt: skip
    steps = f"1 {source[:-1]} = {factor} {target}, so {value} {'×' if forward else '÷'} {factor} = {answer}."
    return f"{question} Reply with the number only.", steps, str(answer)


def _string_manipulation(rng: random.Random) -> Task:
    word = " ".join(rng.sample(_WORDS, 2))  # two-word phrases keep the space of questions large
    kind = rng.randrange(5)
    if kind == 0:
        return f"Reverse the characters of the text '{word}'.", "", word[::-1]
    if kind == 1:
        vowels = [ch for ch in word if ch in "aeiou"]
        return (f"How many vowels (a, e, i, o, u) are in the text '{word}'?",
                f"The vowels are {', '.join(vowels)}.", str(len(vowels)))
    if kind == 2:
        words = rng.sample(_WORDS, 3)
        return f"Join these words with hyphens, in upper case: {' '.join(words)}", "", "-".join(words).upper()
    if kind == 3:
        without = "".join(ch for ch in word if ch not in "aeiou")
        return f"Remove every vowel (a, e, i, o, u) from the text '{word}'.", "", without
    letter = rng.choice(sorted(set(word) - {" "}))
    return f"How many times does the letter '{letter}' appear in '{word}'?", "", str(word.count(letter))


def _list_manipulation(rng: random.Random) -> Task:
    numbers = [rng.randint(1, 99) for _ in range(rng.randint(4, 7))]
    shown, total = ", ".join(map(str, numbers)), sum(numbers)
    evens = ", ".join(str(n) for n in numbers if n % 2 == 0)
    return [(f"Sort these numbers in ascending order: {shown}", "", ", ".join(map(str, sorted(numbers)))),
            (f"What is the sum of {shown}?", " + ".join(map(str, numbers)) + f" = {total}.", str(total)),
            (f"What is the largest number in this list: {shown}?", "", str(max(numbers))),
            (f"List the even numbers from {shown}, keeping their order (or 'none').", "", evens or "none"),
            ][rng.randrange(4)]  # fmt: skip


def _date_arithmetic(rng: random.Random) -> Task:
    start, days = _dt.date(2020, 1, 1) + _dt.timedelta(days=rng.randint(0, 2000)), rng.randint(1, 120)
    end = (start + _dt.timedelta(days=days)).isoformat()
    if rng.random() < 0.5:
        return f"What date is {days} days after {start.isoformat()}? Answer as YYYY-MM-DD.", "", end
    if rng.random() < 0.5:
        return f"How many days are there from {start.isoformat()} to {end}?", "", str(days)
    return f"What day of the week was {start.isoformat()}?", "", start.strftime("%A")


def _json_formatting(rng: random.Random) -> Task:
    record = {"name": rng.choice(_NAMES), "age": rng.randint(18, 80), "city": rng.choice(_CITIES)}
    keys = list(record)
    rng.shuffle(keys)
    described = ", ".join(f"{key} is {record[key]}" for key in keys)
    if rng.random() < 0.5:
        return (f"Write a JSON object with the keys age, city and name (in that order) for a person whose "
                f"{described}. Use one line and no extra spaces besides those after ':' and ','.", "",
                json.dumps(record, sort_keys=True))
    items = rng.sample(_WORDS, rng.randint(2, 4))
    question = f"Format these words as a JSON array of strings, in the given order: {' '.join(items)}"
    return question, "", json.dumps(items)


GENERATORS = {"arithmetic": _arithmetic, "unit_conversion": _unit_conversion, "string": _string_manipulation,
              "list": _list_manipulation, "date": _date_arithmetic, "json": _json_formatting}  # fmt: skip
CATEGORIES: tuple[str, ...] = tuple(GENERATORS)


def generate_tasks(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` tasks ``{"category", "instruction", "output", "answer"}``, categories in round-robin order;
    ``output`` is a short worked solution ending in ``Answer: <answer>``."""
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    rng = random.Random(seed)
    tasks = [(name, *GENERATORS[name](rng)) for name in islice(cycle(CATEGORIES), n)]
    return [{"category": name, "instruction": text, "output": (steps and f"{steps}\n") + f"Answer: {answer}",
             "answer": answer} for name, text, steps, answer in tasks]
