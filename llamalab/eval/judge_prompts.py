"""The judge's prompts: single-answer grading (1-10) and pairwise comparison, with and without a reference.

Written for llamalab after the method of Zheng et al. 2023 ("Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena"): the judge explains first and ends with a machine-readable verdict, ``Rating: [[7]]`` for a
grade or ``[[A]]`` / ``[[B]]`` / ``[[C]]`` (tie) for a comparison; for math, reasoning and coding a reference
answer is shown so the judge checks correctness against it instead of solving the problem itself; a second
turn is judged with the whole conversation in view. The texts are our own. :func:`prompts_sha256` names the
exact set a run used (meta.json), so results made with different prompts are never mixed unknowingly.
"""

from __future__ import annotations

import hashlib
import json

SYSTEM = ("You are a careful, impartial judge of the answers AI assistants give. You read closely, check facts "
          "and reasoning, and you are not swayed by length, confidence, style or the order in which answers "
          "appear.")

CRITERIA = ("Consider helpfulness, relevance, accuracy, depth, creativity where it is wanted, and whether the "
            "answer does exactly what the user asked.")

REFERENCE_NOTE = ("A reference answer is provided: use it to check correctness. An answer that contradicts the "
                  "reference on the result is wrong, however well it is written.")

SINGLE_TASK = ("Grade the assistant's answer to the user's question below. {criteria} {reference_note}"
               "Write a short justification first. Then give your grade from 1 (useless or wrong) to 10 "
               "(excellent) on a line of its own, in exactly this form: Rating: [[5]]")

SINGLE_MULTI_TASK = ("Grade the assistant's answer to the user's SECOND question in the conversation below; "
                     "the first exchange is context. {criteria} {reference_note}"
                     "Write a short justification first. Then give your grade from 1 (useless or wrong) to 10 "
                     "(excellent) on a line of its own, in exactly this form: Rating: [[5]]")

PAIR_TASK = ("Compare the answers two AI assistants, A and B, gave to the user's question below, and decide which "
             "one answers it better. {criteria} {reference_note}"
             "Do not let the order of the answers, their length or the assistants' names influence you. "
             "Explain your comparison briefly. Then give your verdict on a line of its own, exactly one of: "
             "[[A]] if A is better, [[B]] if B is better, [[C]] if they are equally good.")

PAIR_MULTI_TASK = ("Two conversations follow, between a user and AI assistant A, and between the same user and "
                   "AI assistant B. Compare the assistants' answers to the user's SECOND question; the first "
                   "exchange is context. {criteria} {reference_note}"
                   "Do not let the order of the conversations, their length or the assistants' names influence "
                   "you. Explain your comparison briefly. Then give your verdict on a line of its own, exactly "
                   "one of: [[A]] if A is better, [[B]] if B is better, [[C]] if they are equally good.")

# the last words of every request: a judge reads the instructions before long answers and may lose them
SINGLE_REMINDER = "Now write your short justification, then end with your grade as Rating: [[N]], N from 1 to 10."
PAIR_REMINDER = "Now write your brief comparison, then end with your verdict: [[A]], [[B]] or [[C]]."

# blocks: {q}/{a}/{r} are filled with the texts; the markers keep the texts apart from the instructions
QUESTION = "[User question]\n{q}\n[End of user question]"
REFERENCE = "[Reference answer]\n{r}\n[End of reference answer]"
ANSWER = "[Answer of assistant {name}]\n{a}\n[End of answer of assistant {name}]"
SINGLE_ANSWER = "[Assistant's answer]\n{a}\n[End of assistant's answer]"
TURN = "### User:\n{q}\n\n### Assistant{name}:\n{a}"
CONVERSATION = "[Conversation{name}]\n{turns}\n[End of conversation{name}]"
REFERENCE_TURNS = "[Reference answers, turn by turn]\n{r}\n[End of reference answers]"

# likelihood verdicts (``--verdict likelihood``, for a local judge too weak to write the verdict itself): the
# judge's reply is opened with the prefix, and each choice + VERDICT_CLOSE ("A]]" ... or "1]]" ... "10]]") is
# scored by log-likelihood after it instead of being generated
PAIR_VERDICT_PREFIX = "My verdict: [["
SINGLE_VERDICT_PREFIX = "Rating: [["
VERDICT_CLOSE = "]]"
PAIR_CHOICES = ("A", "B", "C")  # C: a tie, as in the text prompts
SINGLE_CHOICES = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10")

ALL = {k: v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, (str, tuple))}


def prompts_sha256() -> str:
    """The sha256 of every prompt text above (sorted JSON): two runs with the same value used the same prompts."""
    return hashlib.sha256(json.dumps(ALL, sort_keys=True).encode("utf-8")).hexdigest()


def likelihood_choices(kind: str) -> tuple[str, list[str]]:
    """(the assistant prefix that opens the verdict, the continuations scored after it) of a ``single`` or
    ``pair`` judgment in likelihood mode."""
    if kind == "pair":
        return PAIR_VERDICT_PREFIX, [c + VERDICT_CLOSE for c in PAIR_CHOICES]
    if kind == "single":
        return SINGLE_VERDICT_PREFIX, [c + VERDICT_CLOSE for c in SINGLE_CHOICES]
    raise ValueError(f"kind must be 'single' or 'pair', got {kind!r}")


def _task(template: str, reference: bool) -> str:
    return template.format(criteria=CRITERIA, reference_note=REFERENCE_NOTE + " " if reference else "")


def _conversation(questions: list[str], answers: list[str], name: str = "") -> str:
    turns = "\n\n".join(TURN.format(q=q, a=a, name=f" {name}" if name else "") for q, a in zip(questions, answers))
    return CONVERSATION.format(turns=turns, name=f" with assistant {name}" if name else "")


def _references(refs: list[str]) -> str:
    return REFERENCE_TURNS.format(r="\n\n".join(f"Turn {i}: {r}" for i, r in enumerate(refs, 1)))


def single_messages(questions: list[str], answers: list[str], references: list[str] | None = None) -> list[dict]:
    """The chat messages asking for a 1-10 grade of the last answer (``len(questions)`` turns so far)."""
    ref = bool(references)
    if len(questions) == 1:
        parts = [_task(SINGLE_TASK, ref), QUESTION.format(q=questions[0])]
        if ref:
            parts.append(REFERENCE.format(r=references[0]))
        parts.append(SINGLE_ANSWER.format(a=answers[0]))
    else:
        parts = [_task(SINGLE_MULTI_TASK, ref)]
        if ref:
            parts.append(_references(references))
        parts.append(_conversation(questions, answers))
    parts.append(SINGLE_REMINDER)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def pair_messages(questions: list[str], answers_a: list[str], answers_b: list[str],
                  references: list[str] | None = None) -> list[dict]:
    """The chat messages asking which of A and B answered the last question better."""
    ref = bool(references)
    if len(questions) == 1:
        parts = [_task(PAIR_TASK, ref), QUESTION.format(q=questions[0])]
        if ref:
            parts.append(REFERENCE.format(r=references[0]))
        parts += [ANSWER.format(a=answers_a[0], name="A"), ANSWER.format(a=answers_b[0], name="B")]
    else:
        parts = [_task(PAIR_MULTI_TASK, ref)]
        if ref:
            parts.append(_references(references))
        parts += [_conversation(questions, answers_a, "A"), _conversation(questions, answers_b, "B")]
    parts.append(PAIR_REMINDER)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]
