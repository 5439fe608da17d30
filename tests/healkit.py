"""Offline fixtures for the healing tests: a tiny BPE tokenizer, a tiny model directory with it, text files.

The tokenizer is trained here on a few kilobytes of Austen (no download) to a 128-id vocabulary, the size
of the tiny test models, and saved with the model so `lincompile apply` copies it into OUT as for a real
model.
"""

from __future__ import annotations

from pathlib import Path

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
VOCAB = 128


def austen_text(name: str = "emma.txt", start: int = 20_000, chars: int = 40_000) -> str:
    path = AUSTEN / name
    if path.exists():
        return path.read_text(encoding="utf-8")[start:start + chars]
    # CI without shared/: a deterministic stand-in with some structure to learn.
    words = ("the lady said that she would walk to the house of her friend in the morning and "
             "he was not sure whether the letter had come before the dinner or after it").split()
    out, i = [], 0
    while sum(len(w) + 1 for w in out) < chars:
        out.append(words[(i * 7 + (i // 5)) % len(words)])
        i += 1
    return " ".join(out)


def tiny_tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(set(pre_tokenizers.ByteLevel.alphabet()) & set(_bytelevel(text)))
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"], initial_alphabet=alphabet,
                                  show_progress=False, limit_alphabet=len(alphabet))
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _bytelevel(text: str) -> str:
    from tokenizers import pre_tokenizers

    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    return "".join(p for p, _ in pieces)


def tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    from conftest import tiny_model

    model = tiny_model(arch, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer(austen_text()).save_pretrained(path)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
