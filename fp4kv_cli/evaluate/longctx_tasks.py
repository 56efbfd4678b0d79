"""Synthetic long-context retrieval tasks in the style of RULER (Hsieh et al., 2024), offline.

Every sample is built from a seed alone: a haystack of GSM8K train text (the shipped split,
calculator annotations and ``#### N`` lines removed) cut to a token budget, with needles
inserted at seeded depths, then a question and an answer prefix (RULER's templates). Tasks:

- ``niah_single``: one needle "One of the special magic numbers for {key} is: {7 digits}.";
  asked for that key's number.
- ``niah_multikey``: four needles of different keys (the other three are distractors); asked
  for one key's number.
- ``passkey``: "The pass key is {5 digits}. Remember it. {5 digits} is the pass key." once in
  the filler; asked for the pass key.
- ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of four variables
  spread through the text; asked for every variable that holds the value.

Scoring is RULER's ``string_match_all``: the fraction of the references found in the
lower-cased output; a sample is correct when every reference is found.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from itertools import pairwise
from typing import Any

from fp4kv_cli.data import load_gsm8k
from fp4kv_cli.errors import FP4KVError

TASKS = ("niah_single", "niah_multikey", "passkey", "variable_tracking")
#: Default lengths (tokens per sequence, prompt + generation).
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)
#: Needles in ``niah_multikey`` (one asked, the rest distractors) and variables in a tracking chain.
MULTIKEY_NEEDLES = 4
CHAIN_LENGTH = 4
#: A prompt may fall short of its length by this fraction (fewer tokenizer calls at 32K).
SLACK = 0.01

_NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
_VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)


@dataclass(frozen=True)
class TaskSample:
    """One retrieval sample: the user text, the answer prefix the model continues, and the
    strings a correct answer contains."""

    task: str
    length: int
    index: int
    prompt: str
    answer_prefix: str
    references: tuple[str, ...]
    depths: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict without the (long) prompt."""
        record = asdict(self)
        record.pop("prompt")
        record["references"] = list(self.references)
        record["depths"] = list(self.depths)
        return record


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"passkey,niah_single"`` -> known task names (duplicates dropped)."""
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in TASKS]
    if not names or unknown:
        raise FP4KVError(
            f"unknown long-context task {', '.join(unknown) or '(none)'}; use {', '.join(TASKS)}"
        )
    return names


@cache
def filler_sentences() -> tuple[str, ...]:
    """Sentences of the shipped GSM8K train split (questions and worked answers, in order)."""
    sentences: list[str] = []
    for row in load_gsm8k("train"):
        answer = re.sub(r"<<[^>]*>>", "", row["answer"])
        lines = [line.strip() for line in answer.splitlines() if line.strip() and not line.startswith("####")]
        answer = " ".join(line if line[-1] in ".?!" else f"{line}." for line in lines)
        for text in (row["question"], answer):
            sentences += [s.strip() for s in re.split(r"(?<=[.?!])\s+", text.replace("\n", " ")) if s.strip()]
    return tuple(sentences)


@cache
def _key_words() -> tuple[str, ...]:
    """Distinct lower-case words (6+ letters) of the filler, the needle keys are drawn from."""
    words = {w.lower() for s in filler_sentences() for w in re.findall(r"[A-Za-z]{6,}", s)}
    return tuple(sorted(words))


def make_sample(
    task: str, length: int, index: int, seed: int, count_tokens: Callable[[str, str], int]
) -> TaskSample:
    """Sample ``index`` of ``task`` whose prompt with its answer prefix takes at most ``length``
    tokens by ``count_tokens(prompt, prefix)`` (the model's tokenizer on the text as it is fed,
    chat template included), filled close to that; the same for the same arguments everywhere."""
    rng = random.Random(f"fp4kv-longctx/{seed}/{task}/{length}/{index}")
    builders = {"niah_single": _niah_single, "niah_multikey": _niah_multikey, "passkey": _passkey,
                "variable_tracking": _variable_tracking}  # fmt: skip
    intro, needles, question, prefix, references = builders[task](rng)
    depths = tuple(sorted(rng.random() for _ in needles))  # sorted: a variable chain stays in order
    pool = filler_sentences()
    start = rng.randrange(len(pool))

    def build(count: int) -> str:
        haystack = [pool[(start + i) % len(pool)] for i in range(count)]
        for offset, (depth, needle) in enumerate(zip(depths, needles)):
            haystack.insert(min(len(haystack), round(depth * count) + offset), needle)
        return f"{intro}{' '.join(haystack)}\n{question}"

    fixed = count_tokens(build(0), prefix)
    if fixed > length:
        raise FP4KVError(
            f"{task} needs {fixed} tokens without filler, more than the length {length}; use longer --lengths"
        )
    tokens = {0: fixed}

    def measure(count: int) -> int:
        if count not in tokens:
            tokens[count] = count_tokens(build(count), prefix)
        return tokens[count]

    # The most filler sentences that fit, to within SLACK of the length: secant guesses, then bisection.
    per_sentence = max(1.0, (measure(64) - fixed) / 64)
    low, high = 0, None
    guess = int((length - fixed) / per_sentence)
    for _ in range(3):
        if measure(guess) <= length:
            low = max(low, guess)
        else:
            high = guess if high is None else min(high, guess)
        if length - tokens[low] <= SLACK * length:
            break
        per_sentence = max(1.0, (tokens[guess] - fixed) / max(guess, 1))
        guess = max(0, int((length - fixed) / per_sentence) - (1 if tokens[guess] > length else 0))
    if high is None:
        high = max(2 * low, 8)
        while measure(high) <= length:
            low, high = high, 2 * high
    while high - low > 1 and length - tokens[low] > SLACK * length:
        middle = (low + high) // 2
        low, high = (middle, high) if measure(middle) <= length else (low, middle)
    count = low
    return TaskSample(task, length, index, build(count), prefix, references, depths)


def make_samples(
    tasks: Sequence[str], length: int, limit: int, seed: int, count_tokens: Callable[[str, str], int]
) -> list[TaskSample]:
    """``limit`` samples of each task at ``length`` tokens, task by task."""
    return [make_sample(task, length, i, seed, count_tokens) for task in tasks for i in range(limit)]


def score(output: str, references: Sequence[str]) -> float:
    """RULER ``string_match_all``: fraction of ``references`` found in the lower-cased output."""
    text = output.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _niah_single(rng: random.Random) -> tuple[str, list[str], str, str, tuple[str, ...]]:
    key, value = rng.choice(_key_words()), _number(rng, 7)
    needle = f"One of the special magic numbers for {key} is: {value}."
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    prefix = f" The special magic number for {key} mentioned in the provided text is"
    return _NIAH_INTRO, [needle], question, prefix, (value,)


def _niah_multikey(rng: random.Random) -> tuple[str, list[str], str, str, tuple[str, ...]]:
    keys = rng.sample(_key_words(), MULTIKEY_NEEDLES)
    values = [_number(rng, 7) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    asked = rng.randrange(len(keys))
    question = f"What is the special magic number for {keys[asked]} mentioned in the provided text?"
    prefix = f" The special magic number for {keys[asked]} mentioned in the provided text is"
    return _NIAH_INTRO, needles, question, prefix, (values[asked],)


def _passkey(rng: random.Random) -> tuple[str, list[str], str, str, tuple[str, ...]]:
    value = _number(rng, 5)
    needle = f"The pass key is {value}. Remember it. {value} is the pass key."
    return _PASSKEY_INTRO, [needle], "What is the pass key?", " The pass key is", (value,)


def _variable_tracking(rng: random.Random) -> tuple[str, list[str], str, str, tuple[str, ...]]:
    names: list[str] = []
    while len(names) < CHAIN_LENGTH:  # distinct five-letter names
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        names += [] if name in names else [name]
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
    question = f"Question: Find all variables that are assigned the value {value} in the text above."

    prefix = (
        f" Answer: According to the chain(s) of variable assignment in the text above, "
        f"{CHAIN_LENGTH} variables are assigned the value {value}, they are:"
    )
    return _VT_INTRO, needles, question, prefix, tuple(names)
