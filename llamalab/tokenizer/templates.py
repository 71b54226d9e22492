"""Chat templates: one implementation shared by inference (prompts) and SFT (ids + loss mask).

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``: an optional
system message first, then user and assistant turns alternating, starting with a user turn.
Each template turns it into *parts*: text, or the BOS/EOS token ids. Consecutive text parts are
encoded together (one SentencePiece call, so pieces at part boundaries are the ones the model saw),
and special tokens are inserted as ids, never as text a user could type.

Templates (exactly as their reference implementations):

- ``llama2``: Meta's ``chat_completion``: per turn ``BOS [INST] {user} [/INST] {answer} EOS``, the
  system prompt inside the first turn as ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n``; contents stripped.
- ``vicuna``: FastChat ``vicuna_v1.1``: ``{system} USER: {user} ASSISTANT: {answer}EOS`` with
  FastChat's default system prompt.
- ``alpaca``: Stanford Alpaca's prompt (no-input form), turns chained:
  ``{preamble}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{answer}EOS``.
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the turn closer ``<|im_end|>`` is
  the special id when the vocabulary has one, text otherwise (then it is also a stop string).
- ``llama3``: Meta's Llama 3 Instruct template (the ``chat_template`` of Meta-Llama-3-8B-Instruct):
  BOS (``<|begin_of_text|>``) then per message
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` (contents stripped), the generation
  prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` (also after a final assistant message, as
  Meta's Jinja does); header and turn tokens are special ids when the vocabulary has them, text otherwise;
  ``<|eot_id|>`` ends a turn (:func:`stop_token_ids`).

BOS follows the tokenizer's own rule: the ``BOS`` parts of a template are left out when the tokenizer
says it adds no BOS (``add_bos`` False: SmolLM2's GGUF, whose BOS id is ``<|im_start|>``).

``render`` returns (ids, loss_mask): the mask is 1 on assistant-content tokens and on the token(s)
closing each assistant turn (EOS, or ``<|im_end|>``), 0 elsewhere. ``render_text`` is the same
conversation as a string (special tokens spelled ``<s>`` / ``</s>``), for display and debugging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from llamalab.common import LlamalabError

TEMPLATES = ("llama2", "vicuna", "alpaca", "chatml", "llama3")
DEFAULT_TEMPLATE = "llama2"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
BOS, EOS = "<s>", "</s>"
L3_START, L3_END, L3_EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# The chat_template of Meta-Llama-3-8B-Instruct's tokenizer_config.json, verbatim; `llama3` renders as it does.
LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


class _Tok(Protocol):
    bos_id: int
    eos_id: int
    add_bos: bool

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


@dataclass
class Part:
    text: str  # BOS / EOS for the special tokens
    loss: bool = False
    special: bool = False


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Validate roles and contents; errors name messages[i]."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LlamalabError("messages: must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise LlamalabError(f"messages[{i}]: must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise LlamalabError(f"messages[{i}].role: must be system, user or assistant, got {role!r}")
        if not isinstance(content, str):
            raise LlamalabError(f"messages[{i}].content: must be a string")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    for j, m in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            i = j + (len(out) - len(turns))
            raise LlamalabError(f"messages[{i}].role: expected {want} (after an optional system message, "
                                f"user and assistant alternate starting with user), got {m['role']!r}")
    return out


def _split(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[tuple[str, str | None]]]:
    msgs = check_messages(messages)
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    turns = msgs[1:] if system is not None else msgs
    pairs = [(turns[j]["content"], turns[j + 1]["content"] if j + 1 < len(turns) else None)
             for j in range(0, len(turns), 2)]
    return system, pairs


def parts(messages: Sequence[Mapping[str, Any]], template: str, add_generation_prompt: bool = True,
          chatml_end_special: bool = False) -> list[Part]:
    """The template's parts for a conversation. With ``add_generation_prompt`` a final user turn
    ends with the assistant prefix (what the model continues); a final assistant turn is closed."""
    system, pairs = _split(messages)
    if template not in TEMPLATES:
        raise LlamalabError(f"chat_template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    out: list[Part] = []
    for j, (user, answer) in enumerate(pairs):
        last_open = answer is None
        if last_open and not add_generation_prompt:
            _user_only(out, template, system if j == 0 else None, user, j)
            continue
        if template == "llama2":
            u = user.strip()
            if j == 0 and system is not None:
                u = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{u}"
            out += [Part(BOS, special=True), Part(f"[INST] {u} [/INST]")]
            if answer is not None:
                out += [Part(f" {answer.strip()} ", loss=True), Part(EOS, loss=True, special=True)]
        elif template == "vicuna":
            if j == 0:
                out += [Part(BOS, special=True), Part((system if system is not None else VICUNA_SYSTEM) + " ")]
            out.append(Part(f"USER: {user} ASSISTANT:"))
            if answer is not None:
                out += [Part(f" {answer}", loss=True), Part(EOS, loss=True, special=True)]
        elif template == "alpaca":
            pre = ""
            if j == 0:
                out.append(Part(BOS, special=True))
                pre = (system if system is not None else ALPACA_PREAMBLE) + "\n\n"
            else:
                pre = "\n\n"
            out.append(Part(f"{pre}### Instruction:\n{user}\n\n### Response:\n"))
            if answer is not None:
                out += [Part(answer, loss=True), Part(EOS, loss=True, special=True)]
        elif template == "llama3":
            if j == 0:
                out.append(Part(BOS, special=True))
                if system is not None:
                    out += _l3_message("system", system)
            out += _l3_message("user", user) + _l3_header("assistant")
            if answer is not None:
                out += [Part(answer.strip(), loss=True), Part(L3_EOT, loss=True, special=True)]
                if add_generation_prompt and j == len(pairs) - 1:
                    out += _l3_header("assistant")  # Meta's Jinja opens a new assistant turn after any last message
        else:  # chatml
            if j == 0:
                out.append(Part(BOS, special=True))
                if system is not None:
                    out.append(Part(f"<|im_start|>system\n{system}<|im_end|>\n"))
            out.append(Part(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"))
            if answer is not None:
                out += [Part(answer, loss=True), Part("<|im_end|>", loss=True, special=chatml_end_special),
                        Part("\n")]
    return out


def _l3_header(role: str) -> list[Part]:
    return [Part(L3_START, special=True), Part(role), Part(L3_END, special=True), Part("\n\n")]


def _l3_message(role: str, content: str) -> list[Part]:
    return _l3_header(role) + [Part(content.strip()), Part(L3_EOT, special=True)]


def _user_only(out: list[Part], template: str, system: str | None, user: str, j: int) -> None:
    """A trailing user turn without the assistant prefix (add_generation_prompt=False)."""
    if template == "llama2":
        u = user.strip() if system is None else f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user.strip()}"
        out += [Part(BOS, special=True), Part(f"[INST] {u} [/INST]")]
    elif template == "vicuna":
        if j == 0:
            out += [Part(BOS, special=True), Part((system if system is not None else VICUNA_SYSTEM) + " ")]
        out.append(Part(f"USER: {user}"))
    elif template == "alpaca":
        if j == 0:
            out += [Part(BOS, special=True), Part((system if system is not None else ALPACA_PREAMBLE) + "\n\n")]
        else:
            out.append(Part("\n\n"))
        out.append(Part(f"### Instruction:\n{user}"))
    elif template == "llama3":
        if j == 0:
            out.append(Part(BOS, special=True))
            if system is not None:
                out += _l3_message("system", system)
        out += _l3_message("user", user)
    else:
        if j == 0:
            out.append(Part(BOS, special=True))
            if system is not None:
                out.append(Part(f"<|im_start|>system\n{system}<|im_end|>\n"))
        out.append(Part(f"<|im_start|>user\n{user}<|im_end|>\n"))


def render_text(messages: Sequence[Mapping[str, Any]], template: str, add_generation_prompt: bool = True) -> str:
    return "".join(p.text for p in parts(messages, template, add_generation_prompt))


def _special_id(tok: _Tok, text: str) -> int | None:
    if text == BOS:
        return tok.bos_id if tok.bos_id >= 0 else None
    if text == EOS:
        return tok.eos_id if tok.eos_id >= 0 else None
    piece_to_id = getattr(tok, "piece_to_id", None)
    if piece_to_id is None:
        return None
    i = piece_to_id(text)
    return i if i is not None and i >= 0 and i != getattr(tok, "unk_id", -1) else None



def _encode_unit(tok: _Tok, unit: list[Part]) -> tuple[list[int], list[int]]:
    """Encode consecutive text parts as one string; mask tokens by part boundaries."""
    full = "".join(p.text for p in unit)
    ids = tok.encode(full)
    mask = [0] * len(ids)
    pos = 0
    for p in unit:
        start_ids = _prefix_len(tok, full[:pos], ids)
        pos += len(p.text)
        end_ids = _prefix_len(tok, full[:pos], ids)
        if p.loss:
            for t in range(start_ids, end_ids):
                mask[t] = 1
    return ids, mask


def _prefix_len(tok: _Tok, prefix: str, ids: list[int]) -> int:
    """Number of leading tokens of ``ids`` that spell ``prefix`` (longest common prefix of encodings)."""
    if not prefix:
        return 0
    pid = tok.encode(prefix)
    n = 0
    while n < min(len(pid), len(ids)) and pid[n] == ids[n]:
        n += 1
    return n


def render(messages: Sequence[Mapping[str, Any]], template: str, tokenizer: _Tok,
           add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = assistant content and its closing token) of a conversation."""
    chatml_special = template == "chatml" and _special_id(tokenizer, "<|im_end|>") is not None
    ids: list[int] = []
    mask: list[int] = []
    unit: list[Part] = []

    def flush() -> None:
        if unit:
            i, m = _encode_unit(tokenizer, unit)
            ids.extend(i)
            mask.extend(m)
            unit.clear()

    add_bos = getattr(tokenizer, "add_bos", True)
    for p in parts(messages, template, add_generation_prompt, chatml_end_special=chatml_special):
        if p.special:
            if p.text == BOS and not add_bos:
                continue  # the tokenizer's own rule: no BOS (SmolLM2)
            sid = _special_id(tokenizer, p.text)
            if sid is None and p.text not in (BOS, EOS):  # a named token the vocabulary lacks: written as text
                unit.append(Part(p.text, loss=p.loss))
                continue
            flush()
            if sid is not None:
                ids.append(sid)
                mask.append(int(p.loss))
        else:
            unit.append(p)
    flush()
    return ids, mask


def stop_strings(template: str, tokenizer: _Tok | None = None) -> list[str]:
    """Strings that end an assistant turn in text (in case the model writes them instead of EOS)."""
    return {"llama2": ["[INST]"], "vicuna": ["USER:"], "alpaca": ["### Instruction:"],
            "chatml": ["<|im_end|>", "<|im_start|>"], "llama3": [L3_EOT, L3_START]}.get(template, [])


def stop_token_ids(template: str, tokenizer: _Tok) -> list[int]:
    """Token ids besides EOS that end an assistant turn: the tokenizer's other ``stop_ids`` (EOS ids its model
    declares: Llama 3.1 Instruct lists three) and the template's turn closers (``<|eot_id|>``, ``<|eom_id|>``
    for llama3; a special ``<|im_end|>`` for chatml). Decoding drops special tokens, so these stop by id, not
    as text. EOS itself is left to the engine (``ignore_eos`` keeps its meaning)."""
    ids = list(getattr(tokenizer, "stop_ids", None) or [])
    names = {"llama3": [L3_EOT, "<|eom_id|>", "<|end_of_text|>"], "chatml": ["<|im_end|>"]}.get(template, [])
    for name in names:
        i = _special_id(tokenizer, name)
        if i is not None:
            ids.append(i)
    return sorted(set(ids) - {tokenizer.eos_id})


def resolve_template(meta: Mapping[str, Any] | None, override: str | None = None) -> str:
    """The template to use: an explicit override, else the model folder's ``chat_template``, else the
    imported source's Jinja template: the one of ours it renders exactly like, else ours of its family
    (ChatML markers -> chatml ...), else llama2. (The server renders a non-identical source template
    itself: :func:`llamalab.tokenizer.jinja_template.chat_template_for`.)"""
    name = override or (meta or {}).get("chat_template")
    if not name:
        from llamalab.tokenizer.jinja_template import family_of, ours_by_content, source_template_of

        found = source_template_of(meta)
        name = (found and (ours_by_content(found[0]) or family_of(found[0]))) or DEFAULT_TEMPLATE
    if name not in TEMPLATES:
        where = "--chat-template" if override else "config.json chat_template"
        raise LlamalabError(f"{where}: unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return name


def _jinja_str(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string literal is a valid Jinja string literal


def hf_chat_template(template: str, add_bos: bool = True) -> str:
    """The template as a Hugging Face ``chat_template`` (Jinja) that renders exactly like :func:`render_text`.

    Written into ``tokenizer_config.json`` on HF export, so ``tokenizer.apply_chat_template`` in
    transformers (and tools built on it) format conversations the way the model was tuned. ``add_bos``
    False (a tokenizer that adds no BOS, SmolLM2's) writes no ``bos_token``, as :func:`render` leaves it out.
    """
    if template not in TEMPLATES:
        raise LlamalabError(f"chat_template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "llama3":
        return LLAMA3_JINJA if add_bos else LLAMA3_JINJA.replace("bos_token + content", "content")
    b = "bos_token + " if add_bos else ""
    head = ("{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}")
    gen = "(not loop.last or add_generation_prompt)"
    if template == "llama2":
        body = ("{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
                "{%- if loop.first and system is not none -%}"
                "{%- set u = '<<SYS>>\n' + (system | trim) + '\n<</SYS>>\n\n' + (m['content'] | trim) -%}"
                "{%- else -%}{%- set u = m['content'] | trim -%}{%- endif -%}"
                "{{ " + b + "'[INST] ' + u + ' [/INST]' }}"
                "{%- else -%}{{ ' ' + (m['content'] | trim) + ' ' + eos_token }}{%- endif -%}{%- endfor -%}")
    elif template == "vicuna":
        body = ("{{ " + b + "(system if system is not none else " + _jinja_str(VICUNA_SYSTEM) + ") + ' ' }}"
                "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{{ 'USER: ' + m['content'] }}"
                "{%- if " + gen + " %}{{ ' ASSISTANT:' }}{%- endif -%}"
                "{%- else -%}{{ ' ' + m['content'] + eos_token }}{%- endif -%}{%- endfor -%}")
    elif template == "alpaca":
        body = ("{{ " + b + "(system if system is not none else " + _jinja_str(ALPACA_PREAMBLE) + ") }}"
                "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
                "{{ '\n\n### Instruction:\n' + m['content'] }}"
                "{%- if " + gen + " %}{{ '\n\n### Response:\n' }}{%- endif -%}"
                "{%- else -%}{{ m['content'] + eos_token }}{%- endif -%}{%- endfor -%}")
    else:
        body = ("{{ bos_token }}" if add_bos else "") + ("{%- if system is not none -%}"
                "{{ '<|im_start|>system\n' + system + '<|im_end|>\n' }}{%- endif -%}"
                "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
                "{{ '<|im_start|>user\n' + m['content'] + '<|im_end|>\n' }}"
                "{%- if " + gen + " %}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
                "{%- else -%}{{ m['content'] + '<|im_end|>\n' }}{%- endif -%}{%- endfor -%}")
    return head + body

