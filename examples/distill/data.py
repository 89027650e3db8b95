"""Text that ships with Python, a BPE tokenizer trained on its train split, and fixed windows of tokens.

Documents: every topic of the standard library's ``pydoc_data`` (the language reference and
library topics that ``help()`` shows) and, for the full study, the docstrings of the standard
library's modules, one document per module. A document is held out when the CRC-32 of its name is
0 modulo 10, so the split does not depend on the order documents are found in. Everything derived
(the docstring text, the tokenizer, the token ids) is cached under the cache directory, keyed by a
hash of what it was built from; the same Python version gives the same bytes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

EOT = "<|endoftext|>"
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo"}


def topics() -> dict[str, str]:
    """The ``pydoc_data`` topics: about 465k characters of English documentation in Python 3.11."""
    from pydoc_data.topics import topics as table

    return {f"topic:{name}": table[name] for name in sorted(table)}


def docstrings(cache_dir: Path) -> dict[str, str]:
    """The docstrings of the standard library's modules (one document per module, each docstring
    kept once across the library), read with ``ast`` and cached as JSON (parsing takes seconds)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in lib.rglob("*.py") if not SKIPPED_PACKAGES & set(f.relative_to(lib).parts))
    key = hashlib.sha256("\n".join(f"{f.relative_to(lib)}:{f.stat().st_size}" for f in files).encode()).hexdigest()[:16]
    path = cache_dir / f"docstrings-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    seen, documents = set(), {}
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        kept = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc not in seen:
                    seen.add(doc)
                    kept.append(doc)
        if kept:
            documents[f"module:{f.relative_to(lib).as_posix()}"] = "\n\n".join(kept)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(documents))
    return documents


def held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % 10 == 0


@dataclass
class Corpus:
    """Token ids of the train and held-out splits (documents joined by ``EOT``) and the tokenizer."""

    tokenizer: object
    train: torch.Tensor
    heldout: torch.Tensor
    key: str
    documents: int
    characters: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def build(source: str, vocab_size: int, cache_dir: Path) -> Corpus:
    """Load ``source`` ("topics" or "topics+docstrings"), split it, train (or load) the BPE
    tokenizer on the train split and encode both splits (or load them)."""
    documents = topics()
    if source == "topics+docstrings":
        documents.update(docstrings(cache_dir))
    elif source != "topics":
        raise ValueError(f"source must be 'topics' or 'topics+docstrings', got {source!r}")
    train = [text for name, text in documents.items() if not held_out(name)]
    heldout = [text for name, text in documents.items() if held_out(name)]
    digest = hashlib.sha256("\0".join(train + [EOT] + heldout).encode()).hexdigest()[:16]
    key = f"{digest}-v{vocab_size}"
    tokenizer_path, ids_path = cache_dir / f"tokenizer-{key}.json", cache_dir / f"tokens-{key}.pt"
    tokenizer = _tokenizer(train, vocab_size, tokenizer_path)
    if ids_path.exists():
        ids = torch.load(ids_path)
    else:
        ids = {"train": _encode(tokenizer, train), "heldout": _encode(tokenizer, heldout)}
        torch.save(ids, ids_path)
    return Corpus(tokenizer, ids["train"], ids["heldout"], key, len(documents), sum(map(len, documents.values())))


def _tokenizer(texts: list[str], vocab_size: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


def _encode(tokenizer, texts: list[str]) -> torch.Tensor:
    eot = tokenizer.token_to_id(EOT)
    ids = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int64)


def windows(ids: torch.Tensor, context: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``context + 1`` tokens, ``[n, context + 1]`` (inputs are
    ``w[:, :-1]``, labels ``w[:, 1:]``); at most ``limit`` of them, evenly spaced."""
    n = (ids.numel() - 1) // context
    w = ids[: n * context + 1].unfold(0, context + 1, context)
    if limit is not None and limit < n:
        w = w[torch.linspace(0, n - 1, limit).long()]
    return w.contiguous()
