"""The checkable task the demo checkpoint (`checkpoints/demo`) was trained on, and how its answers are judged.

recall  key-value recall over a few hundred tokens:
            prompt  "k37=912,k45=113,...,k81=457;k37?"      answer "912"
        20-40 pairs of 8 tokens (160-320 tokens, 1 + 8n + 4 tokens with BOS and the question); keys are two
        digits, values three digits (digits 1-9; keys distinct within a prompt). The queried pair is never among
        the last `WINDOW_PAIRS` pairs, so it lies outside the 64-token sliding window of the query: its value can
        only arrive through the compressed attention (the CSA entries the indexer picks, or the HCA entries).

Every character is one token of our byte-level BPE tokenizer (digits 1-9, `k`, `=`, `,`, `;`, `?`; "0" is avoided
because the tokenizer merges "00"), so the text a client sends and the ids the model was trained on agree.

A prompt ends where the model must answer; the answer is followed by EOS. Greedy decoding is correct when the
generated text, cut at EOS (the engine stops there), equals the answer exactly (`check`).

Training sequences (`training_sequence`) pack several questions per context to give more supervised tokens per
forward: the first question is exactly the prompt format above (after BOS); the next ones follow the previous
answer's EOS ("...;k37?912<EOS>k81?457<EOS>..."). Loss is taken on the answer tokens and their EOS only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("recall",)
DIGITS = "123456789"             # recall keys/values avoid "0": the tokenizer merges "00" into one token
PAIR_TOKENS = 8                  # "k37=912," is 8 tokens
WINDOW_PAIRS = 8                 # 8 pairs = 64 tokens = the demo model's sliding window
EVAL_PAIRS = (20, 40)            # pairs per recall prompt at evaluation time (inclusive range)
MAX_PAIRS = len(DIGITS) ** 2     # distinct two-digit keys


@dataclass(frozen=True)
class Instance:
    task: str
    prompt: str
    answer: str


def _key(rng: random.Random) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(2))


def _value(rng: random.Random) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(3))


def recall_context(rng: random.Random, n_pairs: int) -> list[tuple[str, str]]:
    if n_pairs > MAX_PAIRS:
        raise ValueError(f"at most {MAX_PAIRS} distinct keys exist, asked for {n_pairs} pairs")
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < n_pairs:
        k = _key(rng)
        if k not in seen:
            seen.add(k)
            keys.append(k)
    return [(k, _value(rng)) for k in keys]


def recall_text(pairs: list[tuple[str, str]]) -> str:
    return ",".join(f"k{k}={v}" for k, v in pairs) + ";"


def make_recall(rng: random.Random, n_pairs: int | None = None, pairs: tuple[int, int] = EVAL_PAIRS) -> Instance:
    """One recall prompt of `n_pairs` pairs (default: uniform in the range `pairs`)."""
    n = n_pairs if n_pairs is not None else rng.randint(*pairs)
    if not WINDOW_PAIRS < n <= MAX_PAIRS:
        raise ValueError(f"a recall prompt holds {WINDOW_PAIRS + 1}-{MAX_PAIRS} pairs, got {n}")
    pairs = recall_context(rng, n)
    k, v = pairs[rng.randrange(n - WINDOW_PAIRS)]     # outside the sliding window of the query
    return Instance("recall", recall_text(pairs) + f"k{k}?", v)


def make_instance(rng: random.Random, task: str | None = None, pairs: tuple[int, int] = EVAL_PAIRS) -> Instance:
    task = task or rng.choice(TASKS)
    if task == "recall":
        return make_recall(rng, pairs=pairs)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def make_instances(n: int, seed: int, task: str | None = None,
                   pairs: tuple[int, int] = EVAL_PAIRS) -> list[Instance]:
    """n fresh instances from `seed` (with task None the tasks alternate; recall prompts hold `pairs` pairs)."""
    rng = random.Random(seed)
    return [make_instance(rng, task or TASKS[i % len(TASKS)], pairs) for i in range(n)]


def check(instance: Instance, output: str) -> bool:
    """True when the greedy output (text generated after the prompt, EOS excluded) is exactly the answer."""
    return output.strip() == instance.answer


# ----------------------------------------------------------------------------------------------------------------
# Training sequences
# ----------------------------------------------------------------------------------------------------------------
def training_sequence(encode, bos: int, eos: int, rng: random.Random, task: str = "recall", *,
                      pairs: tuple[int, int] = EVAL_PAIRS, n_queries: int = 8) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask) of one packed training sequence. `encode(text) -> ids` is the tokenizer's.

    recall: one context of `pairs` pairs (a range) then `n_queries` questions on distinct keys, the first outside
    the window (when the context has more than `WINDOW_PAIRS` pairs), the others anywhere.
    """
    ids, mask = [bos], [False]

    def ask(prompt: str, answer: str) -> None:
        p = encode(prompt)
        a = encode(answer) + [eos]
        ids.extend(p)
        mask.extend([False] * len(p))
        ids.extend(a)
        mask.extend([True] * len(a))

    if task == "recall":
        n = rng.randint(*pairs)
        ctx = recall_context(rng, n)
        order = list(range(n))
        rng.shuffle(order)
        far = [i for i in order if i < n - WINDOW_PAIRS]
        first = far[0] if far else order[0]
        rest = [i for i in order if i != first][: n_queries - 1]
        ids_text = recall_text(ctx)
        p = encode(ids_text)
        ids.extend(p)
        mask.extend([False] * len(p))
        for i in [first] + rest:
            k, v = ctx[i]
            ask(f"k{k}?", v)
    else:
        raise ValueError(f"unknown task {task!r}")
    return ids, mask


__all__ = ["TASKS", "Instance", "make_instance", "make_instances", "make_recall", "check", "training_sequence",
           "EVAL_PAIRS", "WINDOW_PAIRS", "PAIR_TOKENS"]
