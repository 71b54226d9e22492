"""Tiny models with a byte-level BPE ``tokenizer.json`` trained in-test with the ``tokenizers`` library, in the two
shapes real checkpoints ship (imported by the interop, finetune and eval tests):

- ``smollm``: SmolLM2's layout: digits split one by one, then GPT-2's byte-level regex; ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>`` as special tokens; no BOS added (its tokenizer_config names ``<|im_start|>`` as
  BOS and ``<|im_end|>`` as EOS, as SmolLM2-Instruct's does), a ChatML Jinja chat template;
- ``llama3``: Llama 3's layout: its split regex, merges ignored for whole words, ``<|begin_of_text|>`` put first by
  the post-processor, ``<|eot_id|>`` a second stop id (generation_config.json lists both, as Llama 3.1 does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import shared_path

SMOLLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# SmolLM2-Instruct's chat template, shortened (no default system prompt)
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
STYLES = ("smollm", "llama3")


def train_tokenizer_json(folder: Path, style: str = "smollm", vocab_size: int = 390) -> Path:
    """A byte-level BPE trained on Botchan by ``tokenizers`` into ``folder`` (tokenizer.json, tokenizer_config.json
    and, for llama3, generation_config.json): the files a Hugging Face checkpoint of that style ships."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from llamalab.tokenizer.bpe import LLAMA3_SPLIT

    folder.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in shared_path("corpus/botchan.txt").read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    lines += ["Numbers 12345 and 2024, code: def f(x): return x ** 2", "naïve café 🦙 東京"]
    specials = SMOLLM_SPECIALS if style == "smollm" else LLAMA3_SPECIALS
    tk = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(lines, trainer)
    if style == "llama3":
        bos = specials[0]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    tk.save(str(folder / "tokenizer.json"))
    if style == "smollm":
        cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
               "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
               "chat_template": CHATML_JINJA}
    else:
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": "<|end_of_text|>"}
        eos = [tk.token_to_id("<|end_of_text|>"), tk.token_to_id("<|eot_id|>")]
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder / "tokenizer.json"


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Sharper next-token distributions than std-0.02 weights give, so greedy decoding has clear winners."""
    with torch.no_grad():
        model.output.weight.mul_(25.0) if not model.cfg.tie_embeddings else model.tok_embeddings.weight.mul_(5.0)
    return model


def bpe_model_folder(root: Path, style: str = "smollm", seed: int = 0, tie: bool = False, max_seq_len: int = 128,
                     extra: dict | None = None) -> Path:
    """A llamalab model folder: a small random model over the in-test BPE vocabulary (embedding rows padded to a
    multiple of 8, as real checkpoints pad them) with the tokenizer files of ``style``."""
    from llamalab.model import ModelConfig, Transformer
    from llamalab.model.folder import save_model
    from llamalab.tokenizer import BPETokenizer

    src = root / f"tok-{style}"
    if not (src / "tokenizer.json").exists():
        train_tokenizer_json(src, style)
    tok = BPETokenizer.from_folder(src)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-(-tok.vocab_size // 8) * 8,
                      multiple_of=16, max_seq_len=max_seq_len, tie_embeddings=tie)
    torch.manual_seed(seed)
    model = sharpen(Transformer(cfg).eval())
    meta = {"hf_chat_template": CHATML_JINJA} if style == "smollm" else {"chat_template": "llama3"}
    return save_model(root / f"model-{style}", model, extra={**meta, **(extra or {})}, tokenizer=tok)
