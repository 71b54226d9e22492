"""Byte-level BPE (GPT-2, Llama 3, SmolLM2) behind llamalab's tokenizer interface.

LLaMA 1/2 use SentencePiece (:mod:`llamalab.tokenizer.spm`); Llama 3 and most small LLaMA-layout models
(SmolLM2) use byte-level BPE. Every source is turned into one Hugging Face ``tokenizers`` tokenizer (the
Rust library transformers uses; imported where used, it comes with the ``hf`` extra), so there is one
implementation whatever the file:

- a Hugging Face ``tokenizer.json``, with the special tokens and the BOS rule from
  ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``config.json`` beside it
  (:meth:`BPETokenizer.from_folder`);
- tiktoken ranks (Llama 3's ``tokenizer.model``: one ``base64(token bytes) rank`` line per token),
  converted as transformers' ``TikTokenConverter`` does: the merges are read off the ranks, the
  pre-tokenizer is Llama 3's regex, the 256 special tokens follow (:func:`tiktoken_spec`);
- a GGUF vocabulary (tokens, merges, token types), turned into the same spec by
  :mod:`llamalab.interop.gguf` with :func:`byte_level_spec`.

:class:`BPETokenizer` has the surface of :class:`llamalab.tokenizer.Tokenizer` (``encode(text, bos,
eos)``, ``decode``, ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``, piece lookups, ``add_bos``), so the
engine, the server, the evaluators and SFT never ask which kind they hold. Special tokens written in
the text (``<|eot_id|>``) encode as their ids, as Hugging Face's tokenizers do.

**BOS rule.** ``add_bos`` says whether a prompt starts with BOS, by the tokenizer's own rule, as
transformers applies it: for a tokenizer.json, whether its post-processor puts a special token first
(Llama 3's does; SmolLM2's does not; transformers 5 ignores ``add_bos_token`` in tokenizer_config.json for
these files, so a disagreeing flag is reported and not followed); for tiktoken ranks, Meta's rule (BOS)
unless tokenizer_config.json sets ``add_bos_token``; for a GGUF vocabulary, ``tokenizer.ggml.add_bos_token``.
Prompt encoders call ``encode(text, bos=tok.add_bos)``.

**Export.** :meth:`BPETokenizer.save` writes ``tokenizer.json``, ``tokenizer_config.json`` (with the chat
template when given) and ``special_tokens_map.json``, which ``AutoTokenizer.from_pretrained`` loads
with the same encodings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from llamalab.common import LlamalabError, write_json_atomic
from llamalab.tokenizer.spm import with_specials

# The pre-tokenizer regexes, as the model cards' tokenizer.json files spell them.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# gpt2: ByteLevel's own regex (GPT-2, most GGUF 'gpt2' vocabularies); llama3: the Llama 3 regex;
# digits: every digit alone, then GPT-2's regex (SmolLM2, StarCoder: their tokenizer.json's Digits step)
PRE_TOKENIZERS = ("gpt2", "llama3", "digits")

# Llama 3.1/3.2's 256 special tokens (ids 128000..128255), as their tokenizer.json names them.
LLAMA3_SPECIAL_TOKENS = (
    ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
     "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
     "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
)
LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA3_STOPS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # Meta's stop_tokens

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def spell(token: bytes) -> str:
    """Token bytes in the byte-level alphabet (b' the' -> 'Ġthe')."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


# ----------------------------------------------------------------------------- tiktoken ranks


def is_tiktoken(path: str | Path) -> bool:
    """Whether ``path`` holds tiktoken ranks (text lines ``base64 rank``), read from its content.

    A SentencePiece ``tokenizer.model`` is a binary protobuf (it starts with byte 0x0a), so the two files
    of that name never look alike.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.split(b"\n", 1)[0]
    return bool(first) and _TIKTOKEN_LINE.match(first) is not None


def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    """tiktoken ranks: token bytes -> rank; a bad line is an error naming file and line."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected 'base64-token rank'")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise LlamalabError(f"{path}:{lineno}: not a tiktoken rank line ({e})") from None
            if token in ranks:
                raise LlamalabError(f"{path}:{lineno}: token {token!r} is listed twice")
            ranks[token] = rank
    if not ranks:
        raise LlamalabError(f"{path}: no tiktoken ranks in the file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LlamalabError(f"{path}: the ranks are not 0..{len(ranks) - 1} (each once)")
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce tiktoken's rank order (transformers' TikTokenConverter): every split of a
    token into two tokens is a merge, ordered by the rank of the merged token, then of its halves."""
    found: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                found.append((rank, lr, rr, left, right))
    found.sort(key=lambda m: m[:3])
    return [(spell(m[3]), spell(m[4])) for m in found]


def tiktoken_spec(path: str | Path, special_tokens: Sequence[str] = LLAMA3_SPECIAL_TOKENS,
                  pattern: str = LLAMA3_SPLIT) -> dict[str, Any]:
    """A tokenizer.json spec from tiktoken ranks (Llama 3's by default: its regex and special tokens, BOS first)."""
    ranks = read_tiktoken(path)
    n = len(ranks)
    vocab = {spell(t): r for t, r in ranks.items()}
    added = [(n + i, s, True) for i, s in enumerate(special_tokens)]
    return byte_level_spec(vocab, merges_from_ranks(ranks), added, pre="llama3" if pattern == LLAMA3_SPLIT else pattern,
                           ignore_merges=True, bos=(n, special_tokens[0]) if special_tokens else None, add_bos=True)


# ----------------------------------------------------------------------------- tokenizer.json specs


def pre_tokenizer_spec(pre: str) -> dict[str, Any]:
    """The tokenizer.json pre_tokenizer for one of :data:`PRE_TOKENIZERS` (or a custom split regex)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "gpt2":
        return byte_level
    if pre == "digits":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    pattern = LLAMA3_SPLIT if pre == "llama3" else pre
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}


def bos_post_processor(bos: tuple[int, str] | None) -> dict[str, Any] | None:
    """A post-processor that puts ``bos`` (id, text) first, as Llama 3's tokenizer.json does; None without one."""
    if bos is None:
        return None
    i, text = bos
    first = {"SpecialToken": {"id": text, "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": text, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text: {"id": text, "ids": [int(i)], "tokens": [text]}}}


def byte_level_spec(vocab: dict[str, int], merges: Iterable[Any], added: Iterable[tuple[int, str, bool]],
                    pre: str = "gpt2", ignore_merges: bool = False, bos: tuple[int, str] | None = None,
                    add_bos: bool = False) -> dict[str, Any]:
    """A tokenizers ``tokenizer.json`` for a byte-level BPE vocabulary.

    ``vocab`` maps tokens (in the byte-level alphabet) to ids; ``merges`` are pairs or ``"a b"`` strings in
    priority order; ``added`` lists (id, text, special) tokens matched whole in the text (special ones are
    skipped when decoding); ``pre`` is one of :data:`PRE_TOKENIZERS` or a split regex; with ``add_bos`` the
    post-processor puts ``bos`` (id, text) first.
    """
    added_tokens = [{"id": int(i), "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": bool(s)} for i, t, s in added]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens, "normalizer": None,
        "pre_tokenizer": pre_tokenizer_spec(pre),
        "post_processor": bos_post_processor(bos) if add_bos else None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": bool(ignore_merges), "vocab": vocab,
                  "merges": [m if isinstance(m, str) else list(m) for m in merges]},
    }


def leading_special(post_processor: Any) -> str | None:
    """The special token a tokenizer.json post-processor puts before the text (its BOS), or None."""
    if not isinstance(post_processor, dict):
        return None
    if post_processor.get("type") == "Sequence":
        for p in post_processor.get("processors") or []:
            found = leading_special(p)
            if found is not None:
                return found
        return None
    if post_processor.get("type") == "TemplateProcessing":
        single = post_processor.get("single") or []
        if single and isinstance(single[0], dict) and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"].get("id")
    return None


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _read_optional_json(path: Path) -> dict[str, Any]:
    from llamalab.common import read_json

    if not path.exists():
        return {}
    data = read_json(path, what=path.name)
    if not isinstance(data, dict):
        raise LlamalabError(f"{path}: must be a JSON object, got {type(data).__name__}")
    return data


def _ids(v: Any) -> list[int]:
    """An ``eos_token_id``-style field (an int, a list of ints or null) as a list."""
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


# ----------------------------------------------------------------------------- the tokenizer


class BPETokenizer:
    """Byte-level BPE with llamalab's tokenizer interface.

    ``BPETokenizer(path)`` reads a tokenizer.json file, a tiktoken ``tokenizer.model`` file (by content)
    or a folder holding either (see :meth:`from_folder`). ``stop_ids`` holds every id that ends a
    generation (EOS and the others the model declares: Llama 3.1 Instruct lists three).
    """

    kind = "bpe"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            other = BPETokenizer.from_folder(path)
            self.__dict__.update(other.__dict__)
            return
        if not path.exists():
            raise LlamalabError(f"tokenizer file not found: {path}")
        if is_tiktoken(path):
            self._init(tiktoken_spec(path), path, bos=LLAMA3_BOS, eos=LLAMA3_EOS,
                       stops=list(LLAMA3_STOPS))
        else:
            self._init(_read_spec(path), path)

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | str, bos: int | str | None = None, eos: int | str | None = None,
                  pad: int | str | None = None, add_bos: bool | None = None,
                  stop_ids: Sequence[int] = (), where: str = "<memory>") -> BPETokenizer:
        """Build from an in-memory tokenizer.json spec (a dict or its JSON text); ``path`` is None.

        ``bos``/``eos``/``pad`` are ids or token texts; ``add_bos`` None takes the spec's post-processor rule.
        """
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise LlamalabError(f"{where}: not a valid tokenizer.json ({e})") from None
        self = cls.__new__(cls)
        self._init(spec, None, bos=bos, eos=eos, pad=pad, add_bos=add_bos, stops=list(stop_ids), where=where)
        return self

    @classmethod
    def from_folder(cls, folder: str | Path) -> BPETokenizer:
        """The tokenizer of a Hugging Face-style folder.

        The vocabulary comes from ``tokenizer.json``, else from a tiktoken ``tokenizer.model``. The special
        tokens come from ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``), else
        ``special_tokens_map.json``, else ``config.json`` (``bos_token_id``, ``eos_token_id``,
        ``pad_token_id``); ``add_bos`` from the post-processor (tiktoken: ``add_bos_token``, else yes), as
        transformers decides it. Every EOS id in ``config.json`` and ``generation_config.json`` goes into
        ``stop_ids``.
        """
        folder = Path(folder)
        tj, tm = folder / "tokenizer.json", folder / "tokenizer.model"
        tiktoken = False
        if tj.exists():
            spec, where = _read_spec(tj), tj
        elif tm.exists() and is_tiktoken(tm):
            spec, where, tiktoken = tiktoken_spec(tm), tm, True
        else:
            raise LlamalabError(f"{folder}: no tokenizer.json (or tiktoken tokenizer.model) for a byte-level BPE "
                                f"tokenizer")
        tcfg = _read_optional_json(folder / "tokenizer_config.json")
        smap = _read_optional_json(folder / "special_tokens_map.json")
        mcfg = _read_optional_json(folder / "config.json")
        gcfg = _read_optional_json(folder / "generation_config.json")

        def pick(name: str) -> int | str | None:
            for v in (tcfg.get(name), smap.get(name)):
                if _token_text(v) is not None:
                    return _token_text(v)
            ids = _ids(mcfg.get(f"{name}_id")) or _ids(gcfg.get(f"{name}_id"))
            return ids[0] if ids else None

        bos, eos, pad = pick("bos_token"), pick("eos_token"), pick("pad_token")
        if tiktoken:
            bos = LLAMA3_BOS if bos is None else bos
            eos = LLAMA3_EOS if eos is None else eos
        flag = tcfg.get("add_bos_token") if isinstance(tcfg.get("add_bos_token"), bool) else None
        stops = _ids(mcfg.get("eos_token_id")) + _ids(gcfg.get("eos_token_id"))
        self = cls.__new__(cls)
        self._init(spec, where, bos=bos, eos=eos, pad=pad, add_bos=flag if tiktoken else None,
                   stops=stops + (list(LLAMA3_STOPS) if tiktoken else []))
        if flag is not None and not tiktoken and flag != self.add_bos and self.bos_id >= 0:
            import sys

            print(f"tokenizer: {folder / 'tokenizer_config.json'} says add_bos_token={str(flag).lower()} but the "
                  f"post-processor of {tj.name} {'adds' if self.add_bos else 'adds no'} BOS; following "
                  f"{tj.name}, as transformers does", file=sys.stderr)
        return self

    def _init(self, spec: dict[str, Any], path: Path | None, bos: int | str | None = None,
              eos: int | str | None = None, pad: int | str | None = None, add_bos: bool | None = None,
              stops: list[int | str] | None = None, where: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        where = where or str(path)
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise LlamalabError(f"{where}: not a tokenizer.json (no 'model' object)")
        if spec["model"].get("type") not in (None, "BPE"):
            raise LlamalabError(f"{where}: model.type is {spec['model'].get('type')!r}; llamalab reads byte-level "
                                f"BPE tokenizer.json files (model.type 'BPE')")
        ours = spec.get("llamalab") or {}  # older llamalab folders kept the special ids in the spec itself
        try:
            self.tk = HFTokenizer.from_str(json.dumps({k: v for k, v in spec.items() if k != "llamalab"}))
        except Exception as e:  # tokenizers raises a bare Exception for a spec it cannot read
            raise LlamalabError(f"{where}: tokenizers cannot read this tokenizer.json ({e})") from None
        self.path = path
        lead = leading_special(spec.get("post_processor"))
        self.bos_id = self._id(bos, where, "bos_token")
        if self.bos_id < 0 and isinstance(ours.get("bos_id"), int):
            self.bos_id = ours["bos_id"]
        if self.bos_id < 0 and lead is not None:
            self.bos_id = self._id(lead, where, "post_processor")
        self.eos_id = self._id(eos, where, "eos_token")
        if self.eos_id < 0 and isinstance(ours.get("eos_id"), int):
            self.eos_id = ours["eos_id"]
        self.pad_id = self._id(pad, where, "pad_token")
        self.unk_id = -1
        if add_bos is None:
            add_bos = ours["add_bos"] if isinstance(ours.get("add_bos"), bool) else lead is not None
            if add_bos and lead is not None:  # the token the post-processor puts first is the one prepended
                self.bos_id = self._id(lead, where, "post_processor")
        self.add_bos: bool = bool(add_bos) and self.bos_id >= 0
        ids = [self._id(s, where, "eos_token_id") for s in (stops or [])]
        self.stop_ids: list[int] = sorted({i for i in ids + [self.eos_id] if i >= 0})

    def _id(self, v: int | str | None, where: str, name: str) -> int:
        if v is None:
            return -1
        if isinstance(v, int):
            if not 0 <= v < self.vocab_size:
                raise LlamalabError(f"{where}: {name} id {v} is outside the vocabulary (size {self.vocab_size})")
            return v
        i = self.tk.token_to_id(v)
        if i is None:
            raise LlamalabError(f"{where}: {name} {v!r} is not a token of the vocabulary")
        return i

    # ------------------------------------------------------------------ the interface

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]
        return [with_specials(x, self.bos_id if bos else -1, self.eos_id if eos else -1) for x in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(x) for x in batch]

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(int(i)) or ""

    def piece_to_id(self, piece: str) -> int:
        i = self.tk.token_to_id(piece)
        return -1 if i is None else i

    def token_text(self, i: int) -> str:
        return self.tk.decode([int(i)], skip_special_tokens=False)

    def special_ids(self) -> list[int]:
        """Ids of the special added tokens (``<|eot_id|>``, ``<|im_end|>`` ...)."""
        return sorted(i for i, t in self.tk.get_added_tokens_decoder().items() if t.special)

    def _piece(self, i: int) -> str | None:
        return self.id_to_piece(i) if i >= 0 else None

    def sha256(self) -> str:
        """What the tokenizer encodes: its tokenizer.json and special ids (not ``stop_ids``, a generation setting)."""
        ids = json.dumps([self.bos_id, self.eos_id, self.pad_id, self.add_bos])
        return hashlib.sha256((self.tk.to_str() + ids).encode("utf-8")).hexdigest()

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "add_bos": self.add_bos, "stop_ids": self.stop_ids,
                "sha256": self.sha256()}

    def spec(self) -> dict[str, Any]:
        """The tokenizer.json of this tokenizer, its post-processor agreeing with ``add_bos``."""
        spec = json.loads(self.tk.to_str())
        lead = leading_special(spec.get("post_processor"))
        bos = self._piece(self.bos_id)
        if (lead is not None) != self.add_bos or (self.add_bos and lead != bos):
            spec["post_processor"] = bos_post_processor((self.bos_id, bos)) if self.add_bos and bos else None
        return spec

    def save(self, folder: str | Path, chat_template: str | None = None,
             model_max_length: int | None = None) -> list[str]:
        """Write the Hugging Face tokenizer files into ``folder``; returns their names.

        ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, ``add_bos_token``, the ``chat_template``
        Jinja when given) and ``special_tokens_map.json``: ``AutoTokenizer.from_pretrained(folder)`` encodes
        as this tokenizer does, and :meth:`from_folder` reads them back.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(json.dumps(self.spec(), ensure_ascii=False), encoding="utf-8")
        special = {k: self._piece(i) for k, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                                                   ("pad_token", self.pad_id))}
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                               "add_bos_token": self.add_bos, "add_eos_token": False,
                               "clean_up_tokenization_spaces": False}
        if model_max_length:
            cfg["model_max_length"] = int(model_max_length)
        if chat_template:
            cfg["chat_template"] = chat_template
        write_json_atomic(folder / "tokenizer_config.json", cfg)
        write_json_atomic(folder / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamalabError(f"{path}: not a valid tokenizer.json ({e})") from None
    if not isinstance(spec, dict):
        raise LlamalabError(f"{path}: not a valid tokenizer.json (a JSON object is needed)")
    return spec
