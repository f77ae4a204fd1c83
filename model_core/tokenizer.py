"""Tokenizers: the byte-level one generated checkpoints carry, and any other tokenizer.json via `tokenizers`."""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


class TokenizerError(ValueError):
    """tokenizer.json is there but unusable (not a regular file, not JSON, not a tokenizer); the message names the
    file and the cause."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


class ByteTokenizer:
    """Token ids: the special tokens first, then one id per byte value."""

    def __init__(self, byte_ids: dict[int, int], specials: dict[str, int]) -> None:
        if len(byte_ids) != 256:
            raise ValueError(f"byte-level vocabulary: expected 256 byte tokens, found {len(byte_ids)}")
        self.byte_ids = byte_ids
        self.id_bytes = {i: b for b, i in byte_ids.items()}
        self.specials = specials
        self.bos_id = specials.get("<|bos|>")
        self.eos_id = specials.get("<|eos|>")
        longest_first = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")") if specials else None

    @classmethod
    def default(cls) -> ByteTokenizer:
        specials = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        return cls({b: len(SPECIAL_TOKENS) + b for b in range(256)}, specials)

    @property
    def size(self) -> int:
        return len(self.byte_ids) + len(self.specials)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Bytes to ids; a special token's text (a chat template's `<|bos|>`) is that token, as `tokenizers`
        treats added special tokens."""
        ids = []
        for piece in self._special_re.split(text) if self._special_re is not None else [text]:
            if piece in self.specials:
                ids.append(self.specials[piece])
            else:
                ids.extend(self.byte_ids[b] for b in piece.encode("utf-8"))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(self.id_bytes[i] for i in ids if i in self.id_bytes)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        """tokenizer.json in the `tokenizers` format: byte-level BPE with no merges."""
        chars = bytes_to_unicode()
        vocab = {tok: i for tok, i in self.specials.items()}
        vocab.update({chars[b]: i for b, i in self.byte_ids.items()})
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {
                    "id": i,
                    "content": tok,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
                for tok, i in self.specials.items()
            ],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": False,
            },
            "post_processor": None,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": False,
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": vocab,
                "merges": [],
            },
        }

    def save(self, directory: str | Path) -> None:
        Path(directory, "tokenizer.json").write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1))

    @classmethod
    def from_dir(cls, directory: str | Path) -> ByteTokenizer:
        """Load a byte-level tokenizer.json without merges (what `make-model` writes)."""
        file = Path(directory, "tokenizer.json")
        if not file.is_file():
            raise FileNotFoundError(f"{file}: not found; pass token ids instead of text")
        return cls.from_json(json.loads(file.read_text()))

    @classmethod
    def from_json(cls, data: Any) -> ByteTokenizer:
        """From a parsed tokenizer.json; ValueError (or KeyError, TypeError) when it is not a plain byte-level
        vocabulary."""
        model = data.get("model", {})
        if model.get("type") != "BPE" or model.get("merges"):
            raise ValueError(
                f"model.type={model.get('type')!r} with merges is not a plain byte-level "
                "vocabulary; only tokenizers written by `expertmesh make-model` are supported"
            )
        vocab: dict[str, int] = model["vocab"]
        chars = {c: b for b, c in bytes_to_unicode().items()}
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        byte_ids = {chars[tok]: i for tok, i in vocab.items() if tok in chars}
        return cls(byte_ids, specials)


class HFTokenizer:
    """Any other tokenizer.json, through the `tokenizers` library (special tokens as its post-processor adds them)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(directory: str | Path) -> ByteTokenizer | HFTokenizer:
    """The model's tokenizer: the byte-level one `make-model` writes, else any tokenizer.json via `tokenizers`.

    Raises FileNotFoundError when there is no tokenizer.json (callers then take token ids only), TokenizerError
    naming the file and the cause when it is unusable.
    """
    file = Path(directory, "tokenizer.json")
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found; pass token ids instead of text")
    if not file.is_file():  # a FIFO would block the read
        raise TokenizerError(f"{file}: not a regular file")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON or UTF-8
        raise TokenizerError(f"{file}: unusable tokenizer ({exc})") from None
    try:
        return ByteTokenizer.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError):  # not make-model's vocabulary: `tokenizers` decides
        pass
    try:
        return HFTokenizer(file)
    except Exception as exc:  # `tokenizers` raises a bare Exception for a file it cannot read
        raise TokenizerError(f"{file}: unusable tokenizer ({exc})") from None


def load_tokenizer_or_none(directory: str | Path) -> ByteTokenizer | HFTokenizer | None:
    """The model's tokenizer, or None (prompts must then be token ids): logged once, as a warning naming the file
    and the cause when tokenizer.json is unusable, so a server still starts and serves token ids."""
    try:
        return load_tokenizer(directory)
    except FileNotFoundError:
        logger.info("%s has no tokenizer.json: prompts must be token ids", directory)
    except TokenizerError as exc:
        logger.warning("%s; prompts must be token ids", exc)
    return None
