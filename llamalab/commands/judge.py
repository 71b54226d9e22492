"""Judge models' answers with a model, Vicuna-80 / MT-bench style: ``llamalab judge --questions Q --models A,B``.

Each ``--models`` entry (``[NAME=]PATH-or-URL[@key=value...]``) answers every question (MT-bench's second
turn after its own first answer) into ``DIR/answers/NAME.jsonl``; ``--answers`` adds existing answer files
(ours or FastChat's). The judge is the endpoint of ``--base-url`` / ``--model`` (``llamalab serve``, any
OpenAI-compatible server, or ``local:PATH``): single-answer grades (``--mode single``), pairwise comparison
in both orders (``--mode pairwise``, a win needs both orders to agree) or both. ``--verdict likelihood`` (a
``local:PATH`` judge) scores the verdicts by the judge model's log-likelihood instead of parsing its text, for
judges too small to write one. Writes judgments.jsonl
(every prompt and reply), results.json (win/tie/loss, per-category tables, Bradley-Terry ratings with
bootstrap CIs), meta.json and report.html. Rerunning the same command resumes. See docs/judge.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalab.common import LlamalabError
from llamalab.eval.judge import REFERENCE_CATEGORIES, local_judge_path, run_judge
from llamalab.inference.quantize import QUANT_CHOICES
from llamalab.synth.client import ClientConfig


@dataclass
class Config(ClientConfig):
    questions: str = field(default="", metadata={
        "help": "question file (JSONL): Vicuna {question_id, text, category} or MT-bench {question_id, category, "
                "turns, reference?}"})
    models: list[str] = field(default_factory=list, metadata={
        "help": "models that answer: [NAME=]PATH-or-URL[@temperature=T@max_tokens=N@quantize=int8@seed=S"
                "@top_p=P@template=T@model=M]; PATH: model/run/HF folder or .gguf, URL: http(s)://host/v1"})
    answers: list[str] = field(default_factory=list, metadata={
        "help": "existing answer files ([NAME=]FILE.jsonl, ours or FastChat's model_answer format)"})
    out: str = field(default="", metadata={"help": "output folder (answers/, judgments.jsonl, results.json, "
                                                   "meta.json, report.html); rerun to resume"})
    mode: str = field(default="pairwise", metadata={"choices": ["pairwise", "single", "both"],
                                                    "help": "pairwise comparison (both orders), 1-10 grades, or both"})
    baseline: str = field(default="", metadata={"help": "pairwise: compare every model with this one only "
                                                        "(default: every pair)"})
    references: str = field(default="", metadata={
        "help": "reference answers (FastChat reference_answer JSONL) for --reference-categories; a question's own "
                "'reference' field is used otherwise"})
    reference_categories: list[str] = field(default_factory=lambda: list(REFERENCE_CATEGORIES), metadata={
        "help": "categories judged against a reference answer"})
    limit: int = field(default=0, metadata={"help": "only the first N questions (0 = all)"})
    max_tokens: int = field(default=512, metadata={"help": "answers: new tokens per turn"})
    temperature: float = field(default=0.7, metadata={"help": "answers: sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "answers: nucleus sampling"})
    seed: int = field(default=0, metadata={"help": "answers' sampling seeds and the bootstrap's"})
    slots: int = field(default=8, metadata={"help": "answers from a model path: requests decoded together"})
    quantize: str = field(default="none", metadata={"choices": list(QUANT_CHOICES),
                                                    "help": "answers from a model path: weight quantization"})
    max_seq_len: int = field(default=0, metadata={"help": "answers from a model path: cap the context and KV cache "
                                                          "at this many tokens (0 = the model's own)"})
    threads: int = field(default=0, metadata={"help": "answers from a model path: torch threads (0 = torch default; "
                                                      "1 is fastest on a busy machine)"})
    verdict: str = field(default="text", metadata={
        "choices": ["text", "likelihood"],
        "help": "text: the judge writes its verdict ([[A]], Rating: [[7]]), parsed from the reply; likelihood: a "
                "local judge (--base-url local:PATH) is scored in-process, the verdicts after 'My verdict: [[' / "
                "'Rating: [[' ranked by log-likelihood (for small judges that write no verdict)"})
    judge_max_tokens: int = field(default=512, metadata={"help": "judge: new tokens per judgment (text verdicts)"})
    judge_temperature: float = field(default=0.0, metadata={"help": "judge: temperature (0 = greedy; text verdicts)"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap rounds for the ratings' 95 percent intervals"})
    answer_only: bool = field(default=False, metadata={"help": "write the answers and stop (no judge needed)"})

    def validate(self) -> None:
        super().validate()
        if not self.questions:
            raise LlamalabError("judge needs --questions FILE (e.g. ../shared/data/judge/vicuna80_question.jsonl)")
        if not self.out:
            raise LlamalabError("judge needs --out DIR")
        if not self.models and not self.answers:
            raise LlamalabError("judge needs --models (paths or URLs that answer) and/or --answers (answer files)")
        if self.max_tokens < 1 or self.judge_max_tokens < 1:
            raise LlamalabError("max_tokens and judge_max_tokens must be >= 1")
        if self.limit < 0 or self.bootstrap < 0:
            raise LlamalabError("limit and bootstrap must be >= 0")
        if self.verdict == "likelihood" and not self.answer_only:
            local_judge_path(self.base_url)  # raises, naming --base-url, unless the judge is local:PATH


def main(cfg: Config) -> dict:
    return run_judge(cfg)


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
