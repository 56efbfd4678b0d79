"""GSM8K prompts and answer scoring, exactly as lm-evaluation-harness's ``gsm8k`` task (v3.0).

Prompt (``num_fewshot`` examples, then the question)::

    Question: {shot_1 question}\\nAnswer: {shot_1 answer}\\n\\n ... Question: {question}\\nAnswer:

Few-shot examples come from the train split, drawn as lm-eval's default sampler does: one
``random.Random(1234)`` shared by the whole run, ``rnd.sample(train, num_fewshot)`` once per
test question in test order (so question ``i`` gets the ``i``-th draw).

Scoring: the continuation is cut at the first ``until`` string, then two filters extract an
answer: ``strict-match`` (first match of ``#### (\\-?[0-9\\.\\,]+)``) and ``flexible-extract``
(last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``), ``"[invalid]"`` when nothing matches. An
answer is correct when, after deleting ``,``, ``$``, everything up to the last ``#### `` and a
trailing ``.`` (in that order) and lower-casing, it equals the gold answer treated the same way.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

#: lm-eval ``generation_kwargs.until`` of the gsm8k task (the tokenizer's EOS is added at run time).
STOP_SEQUENCES: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")
#: lm-eval's few-shot seed (``fewshot_random_seed`` default).
FEWSHOT_SEED = 1234
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
#: ``exact_match`` ``regexes_to_ignore``, applied in order to prediction and reference.
IGNORE_REGEXES: tuple[str, ...] = (",", "\\$", "(?s).*#### ", "\\.$")
FALLBACK = "[invalid]"
#: Zero-shot chain-of-thought instruction used with ``--chat`` (asks for the ``#### N`` format).
CHAT_INSTRUCTION = (
    "Solve the following math problem step by step. "
    'Write the final numeric answer on the last line in the form "#### <number>".'
)


def fewshot_draws(
    num_questions: int, train_size: int, num_fewshot: int, seed: int = FEWSHOT_SEED
) -> list[list[int]]:
    """Train indices of the few-shot examples of each of the first ``num_questions`` questions.

    Same draws as lm-eval's ``ContextSampler``: ``random.sample`` only looks at the population's
    length, so sampling ``range(train_size)`` picks the indices it picks from the train docs.
    """
    if num_fewshot <= 0:
        return [[] for _ in range(num_questions)]
    rnd = random.Random(seed)
    return [rnd.sample(range(train_size), num_fewshot) for _ in range(num_questions)]


def fewshot_prompt(question: str, shots: Sequence[dict[str, str]]) -> str:
    """lm-eval's gsm8k context: ``"Question: q\\nAnswer: a\\n\\n"`` per shot, then ``"Question: q\\nAnswer:"``."""
    context = "".join(f"Question: {shot['question']}\nAnswer: {shot['answer']}\n\n" for shot in shots)
    return f"{context}Question: {question}\nAnswer:"


def fewshot_prompts(
    questions: Sequence[dict[str, str]], train: Sequence[dict[str, str]], num_fewshot: int
) -> list[str]:
    """lm-eval's few-shot prompt of each of ``questions`` (the first N of the test split, in
    order), with the train examples lm-eval draws for question i."""
    draws = fewshot_draws(len(questions), len(train), num_fewshot)
    return [fewshot_prompt(q["question"], [train[i] for i in shots]) for q, shots in zip(questions, draws)]


def chat_messages(question: str) -> list[dict[str, str]]:
    """The ``--chat`` conversation: one user turn with the CoT instruction and the question."""
    return [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n\nQuestion: {question}"}]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """lm-eval's post-processing: keep the text before the first occurrence of each stop string."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def _regex_filter(pattern: re.Pattern[str], text: str, group_select: int) -> str:
    """lm-eval ``RegexFilter``: ``findall``, pick one match, first non-empty group, strip."""
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [group for group in match if group]
        match = groups[0] if groups else FALLBACK
    return match.strip()


def extract_strict(text: str) -> str:
    """``strict-match``: the number after the first ``#### `` (``[invalid]`` if none)."""
    return _regex_filter(STRICT_PATTERN, text, 0)


def extract_flexible(text: str) -> str:
    """``flexible-extract``: the last number-like span in the text (``[invalid]`` if none)."""
    return _regex_filter(FLEXIBLE_PATTERN, text, -1)


def normalize(text: str) -> str:
    """``exact_match`` normalisation: delete :data:`IGNORE_REGEXES` matches in order, lower-case."""
    for pattern in IGNORE_REGEXES:
        text = re.sub(pattern, "", text)
    return text.lower()


def gold_answer(answer: str) -> str:
    """The normalised reference of a GSM8K ``answer`` field (the number after ``#### ``)."""
    return normalize(answer)


def is_correct(extracted: str, answer: str) -> bool:
    """Whether an extracted answer matches the GSM8K ``answer`` field under ``exact_match``."""
    return normalize(extracted) == gold_answer(answer)
