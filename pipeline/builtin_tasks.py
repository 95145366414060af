"""A built-in instruction dataset with verifiable answers, generated from a seed.

Why it exists: the CPU default run must work offline with data that ships with the project, and
evaluation needs questions whose answers can be checked exactly (no judge needed). Every task is
``{"category", "instruction", "output", "answer"}``; ``output`` is a short worked solution whose
last line is ``Answer: <answer>``, and ``answer`` is the exact string to match.

Generation is deterministic per seed and prefix-stable: ``generate_tasks(k, s)`` equals the first
``k`` items of ``generate_tasks(n, s)`` for ``k <= n``, so growing the dataset keeps old examples.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
from collections.abc import Callable

ANSWER_PREFIX = "Answer: "

_NAMES = ["Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luis"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]
_WORDS = [
    "river", "planet", "garden", "yellow", "window", "silver", "orange", "dragon", "pocket",
    "forest", "candle", "bridge", "rocket", "violet", "summer", "tunnel", "marble", "puzzle",
    "anchor", "basket", "castle", "desert", "engine", "falcon", "ginger", "harbor", "island",
    "jacket", "kitten", "ladder", "meadow", "needle", "oyster", "pepper", "quartz", "rabbit",
    "saddle", "thunder", "umbrella", "velvet", "walnut", "zephyr", "lantern", "compass", "biscuit",
    "cabinet", "dolphin", "feather", "glacier", "horizon", "journey", "kingdom", "library", "monsoon",
]  # fmt: skip
_CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth"]


def _finish(category: str, instruction: str, steps: str, answer: str) -> dict[str, str]:
    output = f"{steps}\n{ANSWER_PREFIX}{answer}" if steps else f"{ANSWER_PREFIX}{answer}"
    return {"category": category, "instruction": instruction, "output": output, "answer": answer}


def _arithmetic(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        start, bags, per_bag = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
        total = start + bags * per_bag
        question = (
            f"{name} has {start} {item} and buys {bags} packs with {per_bag} {item} in each. "
            f"How many {item} does {name} have now?"
        )
        steps = f"{bags} × {per_bag} = {bags * per_bag}; {start} + {bags * per_bag} = {total}."
    elif kind == 1:
        start, given, friends = rng.randint(30, 120), rng.randint(1, 20), rng.randint(2, 6)
        total = start - given * friends
        while total < 0:
            start += 10
            total = start - given * friends
        question = (
            f"{name} had {start} {item} and gave {given} to each of {friends} friends. "
            f"How many {item} are left?"
        )
        steps = f"{given} × {friends} = {given * friends}; {start} − {given * friends} = {total}."
    else:
        groups, per_group = rng.randint(2, 12), rng.randint(2, 15)
        total_items = groups * per_group
        question = (
            f"{name} shares {total_items} {item} equally among {groups} boxes. "
            f"How many {item} go in each box?"
        )
        total = per_group
        steps = f"{total_items} ÷ {groups} = {per_group}."
    return _finish("arithmetic", question, steps, str(total))


_UNITS = [  # (from, to, factor): integer factors keep answers exact
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
    ("feet", "inches", 12),
    ("weeks", "days", 7),
    ("tonnes", "kilograms", 1000),
    ("yards", "feet", 3),
    ("centimeters", "millimeters", 10),
]


def _unit_conversion(rng: random.Random) -> dict[str, str]:
    source, target, factor = rng.choice(_UNITS)
    if rng.random() < 0.5:
        value = rng.randint(2, 250)
        answer = value * factor
        question = f"Convert {value} {source} to {target}. Reply with the number only."
        steps = f"1 {source[:-1]} = {factor} {target}, so {value} × {factor} = {answer}."
    else:  # the other direction, chosen so the result is a whole number
        answer = rng.randint(2, 250)
        value = answer * factor
        question = f"How many {source} are {value} {target}? Reply with the number only."
        steps = f"1 {source[:-1]} = {factor} {target}, so {value} ÷ {factor} = {answer}."
    return _finish("unit_conversion", question, steps, str(answer))


def _string_manipulation(rng: random.Random) -> dict[str, str]:
    word = " ".join(rng.sample(_WORDS, 2))  # two-word phrases keep the space of questions large
    kind = rng.randrange(5)
    if kind == 0:
        return _finish("string", f"Reverse the characters of the text '{word}'.", "", word[::-1])
    if kind == 1:
        vowels = sum(ch in "aeiou" for ch in word)
        letters = ", ".join(ch for ch in word if ch in "aeiou")
        return _finish(
            "string", f"How many vowels (a, e, i, o, u) are in the text '{word}'?",
            f"The vowels are {letters}.", str(vowels),
        )  # fmt: skip
    if kind == 2:
        words = rng.sample(_WORDS, 3)
        return _finish(
            "string", f"Join these words with hyphens, in upper case: {' '.join(words)}", "",
            "-".join(words).upper(),
        )  # fmt: skip
    if kind == 3:
        without = "".join(ch for ch in word if ch not in "aeiou")
        return _finish("string", f"Remove every vowel (a, e, i, o, u) from the text '{word}'.", "", without)
    letter = rng.choice(sorted(set(word) - {" "}))
    count = word.count(letter)
    return _finish("string", f"How many times does the letter '{letter}' appear in '{word}'?", "", str(count))


def _list_manipulation(rng: random.Random) -> dict[str, str]:
    numbers = [rng.randint(1, 99) for _ in range(rng.randint(4, 7))]
    shown = ", ".join(map(str, numbers))
    kind = rng.randrange(4)
    if kind == 0:
        ordered = ", ".join(map(str, sorted(numbers)))
        return _finish("list", f"Sort these numbers in ascending order: {shown}", "", ordered)
    if kind == 1:
        total = sum(numbers)
        return _finish(
            "list", f"What is the sum of {shown}?", " + ".join(map(str, numbers)) + f" = {total}.",
            str(total),
        )  # fmt: skip
    if kind == 2:
        return _finish("list", f"What is the largest number in this list: {shown}?", "", str(max(numbers)))
    evens = [n for n in numbers if n % 2 == 0]
    answer = ", ".join(map(str, evens)) if evens else "none"
    return _finish(
        "list", f"List the even numbers from {shown}, keeping their order (or 'none').", "", answer
    )


def _date_arithmetic(rng: random.Random) -> dict[str, str]:
    start = _dt.date(2020, 1, 1) + _dt.timedelta(days=rng.randint(0, 2000))
    days = rng.randint(1, 120)
    if rng.random() < 0.5:
        end = start + _dt.timedelta(days=days)
        question = f"What date is {days} days after {start.isoformat()}? Answer as YYYY-MM-DD."
        return _finish("date", question, "", end.isoformat())
    end = start + _dt.timedelta(days=days)
    if rng.random() < 0.5:
        question = f"How many days are there from {start.isoformat()} to {end.isoformat()}?"
        return _finish("date", question, "", str(days))
    question = f"What day of the week was {start.isoformat()}?"
    return _finish("date", question, "", start.strftime("%A"))


def _json_formatting(rng: random.Random) -> dict[str, str]:
    record = {"name": rng.choice(_NAMES), "age": rng.randint(18, 80), "city": rng.choice(_CITIES)}
    keys = list(record)
    rng.shuffle(keys)
    described = ", ".join(f"{key} is {record[key]}" for key in keys)
    if rng.random() < 0.5:
        answer = json.dumps(record, sort_keys=True)
        question = (
            f"Write a JSON object with the keys age, city and name (in that order) for a person whose "
            f"{described}. Use one line and no extra spaces besides those after ':' and ','."
        )
        return _finish("json", question, "", answer)
    items = rng.sample(_WORDS, rng.randint(2, 4))
    answer = json.dumps(items)
    question = f"Format these words as a JSON array of strings, in the given order: {' '.join(items)}"
    return _finish("json", question, "", answer)


GENERATORS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "string": _string_manipulation,
    "list": _list_manipulation,
    "date": _date_arithmetic,
    "json": _json_formatting,
}
CATEGORIES: tuple[str, ...] = tuple(GENERATORS)


def generate_tasks(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` tasks, categories in round-robin order, deterministic and prefix-stable per ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    rng = random.Random(seed)
    generators = list(GENERATORS.values())
    return [generators[i % len(generators)](rng) for i in range(n)]
