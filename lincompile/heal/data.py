"""Healing data: read text, tokenise with the model's tokenizer, pack into blocks, split, order deterministically.

Inputs (each a `--data` argument or a `heal.data.train` entry):
- a UTF-8 text file (.txt, .text, .md, .rst, or no extension): one document;
- a JSON Lines file (.jsonl): one document per line, from its "text" field;
- a directory: every such file inside (recursively, sorted, hidden files skipped; other extensions ignored);
- `hf:NAME` or `hf:NAME:SPLIT`: a Hugging Face dataset's "text" column (needs the `datasets` package and the
  dataset in its local cache: nothing is downloaded when HF_DATASETS_OFFLINE=1).
Every bad input is one clear line: missing path, empty file, binary file, unknown format, too little text.

Documents are tokenised without special tokens and joined with the tokenizer's EOS id (when it has one),
then cut into blocks of `seq_len` tokens (the remainder is dropped). Held-out blocks are the *last*
`holdout` fraction of the stream (contiguous text, so no window of it was trained on) unless separate eval
data is given. The training order is a pure function of (seed, sample index) so a run can resume from a
sample index alone, and data-parallel ranks agree on it without talking (see `BlockOrder`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", "")
JSONL_SUFFIXES = (".jsonl",)
_SNIFF = 8192


class DataError(UsageError):
    """Bad healing/eval data: exit 2 with one line."""


@dataclass
class Document:
    source: str
    text: str


def read_documents(refs: list[str]) -> list[Document]:
    """All documents of all inputs, in a stable order."""
    if not refs:
        raise DataError("no data given: pass --data PATH (a text file, a directory, a .jsonl file or hf:NAME)")
    docs: list[Document] = []
    for ref in refs:
        docs.extend(_read_ref(ref))
    return docs


def _read_ref(ref: str) -> list[Document]:
    if ref.startswith("hf:"):
        return _read_hf(ref[3:])
    path = Path(ref).expanduser()
    if not path.exists():
        raise DataError(f"data not found: {ref} (no such file or directory; for a Hugging Face dataset write hf:NAME)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _known(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{ref}: directory has no text files (.txt, .md, .jsonl)")
        return [d for f in files for d in _read_file(f)]
    return _read_file(path)


def _known(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES


def _read_file(path: Path) -> list[Document]:
    suffix = path.suffix.lower()
    if not _known(path):
        hint = " (JSON: give JSON Lines, one {\"text\": ...} object per line, as .jsonl)" if suffix == ".json" else ""
        raise DataError(f"{path}: unknown data format \"{suffix}\"{hint}; expected a text file (.txt, .md), "
                        "a .jsonl file with a \"text\" field, a directory of them, or hf:NAME")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: empty file")
    if b"\x00" in raw[:_SNIFF]:
        raise DataError(f"{path}: binary file, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {err.start})") from None
    if suffix in JSONL_SUFFIXES:
        return _parse_jsonl(path, text)
    return [Document(str(path), text)]


def _parse_jsonl(path: Path, text: str) -> list[Document]:
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: each line must be an object with a string \"text\" field")
        if record["text"].strip():
            docs.append(Document(f"{path}:{number}", record["text"]))
    if not docs:
        raise DataError(f"{path}: no non-empty \"text\" field in any line")
    return docs


def _read_hf(name: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name} needs the datasets package: pip install datasets") from None
    dataset, _, split = name.partition(":")
    try:
        table = datasets.load_dataset(dataset, split=split or "train")
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; one line is what the user needs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot load dataset hf:{name}: {first}") from None
    if "text" not in table.column_names:
        raise DataError(f"hf:{name} has no \"text\" column (columns: {', '.join(table.column_names)})")
    return [Document(f"hf:{name}#{i}", t) for i, t in enumerate(table["text"]) if t and t.strip()]


# --------------------------------------------------------------------------------------------------
# Tokenising


class ByteTokenizer:
    """The documented fallback when a model has no tokenizer: UTF-8 bytes are the ids (needs vocab >= 256)."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def get_tokenizer(tokenizer, mode: str, vocab_size: int):
    """The tokenizer to use: the model's own (mode auto), or bytes (explicit, or said in the error)."""
    if mode == "bytes" or tokenizer is None:
        if mode != "bytes":
            raise DataError("the model has no tokenizer: save one with it, or use byte ids with --tokenizer bytes")
        if vocab_size < 256:
            raise DataError(f"--tokenizer bytes needs a vocabulary of at least 256 ids; the model has {vocab_size}")
        return ByteTokenizer()
    return tokenizer


def encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    # Fast tokenizers warn when a document is longer than the model's maximum: packing handles that.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize(docs: list[Document], tokenizer) -> torch.Tensor:
    """One stream of token ids: documents joined with EOS (when the tokenizer has one)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(encode(tokenizer, doc.text))
    return torch.tensor(ids, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int, what: str) -> torch.Tensor:
    """[N, seq_len] blocks (the tail that does not fill a block is dropped)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise DataError(f"{what}: text shorter than one block ({stream.numel()} tokens < seq_len {seq_len})")
    return stream[: n * seq_len].view(n, seq_len)


@dataclass
class Split:
    train: torch.Tensor  # [N, seq_len]
    eval: torch.Tensor  # [M, seq_len]
    tokens_read: int
    notes: list


def load_split(train_refs, eval_refs, tokenizer, seq_len: int, holdout: float) -> Split:
    """Training and held-out blocks. With no eval data, the last `holdout` fraction of train is held out."""
    notes = []
    train_stream = tokenize(read_documents(train_refs), tokenizer)
    blocks = pack(train_stream, seq_len, " + ".join(train_refs))
    if eval_refs:
        eval_blocks = pack(tokenize(read_documents(eval_refs), tokenizer), seq_len, " + ".join(eval_refs))
        train = blocks
    else:
        n_eval = int(round(len(blocks) * holdout))
        if holdout > 0 and len(blocks) >= 2:
            n_eval = max(1, n_eval)
        if len(blocks) - n_eval < 1:
            raise DataError(f"{' + '.join(train_refs)}: {len(blocks)} block(s) of {seq_len} tokens leave nothing "
                            f"to train on after holding out {n_eval}")
        train, eval_blocks = blocks[: len(blocks) - n_eval], blocks[len(blocks) - n_eval:]
        if n_eval == 0:
            notes.append("no held-out blocks (holdout 0 and no eval data): periodic evaluation is off")
    return Split(train=train, eval=eval_blocks, tokens_read=int(train_stream.numel()), notes=notes)


# --------------------------------------------------------------------------------------------------
# Order


class BlockOrder:
    """Sample i of the endless training stream is block perm_e[i mod N] of epoch e = i // N.

    perm_e is a seeded permutation per epoch, so any sample index (a resume point) maps to its block with
    no state. A global micro-batch j holds samples [j·G, (j+1)·G) with G = batch_size · world_size;
    rank r takes the slice [r·batch_size, (r+1)·batch_size) of it. With the same G, one process with
    batch G and W processes with batch G/W see exactly the same blocks per step.
    """

    def __init__(self, num_blocks: int, seed: int):
        self.n, self.seed = num_blocks, seed
        self._cache: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self.perm(i // self.n)[i % self.n]) for i in range(start, start + count)]

    def micro_batch(self, blocks: torch.Tensor, micro_index: int, batch_size: int, rank: int = 0,
                    world: int = 1) -> torch.Tensor:
        start = micro_index * batch_size * world + rank * batch_size
        return blocks[self.indices(start, batch_size)]


def describe(split: Split, seq_len: int) -> str:
    return (f"{len(split.train)} training blocks and {len(split.eval)} held-out blocks of {seq_len} tokens "
            f"({split.tokens_read} tokens read)")
