"""`tune generate`: answer a prompt with a run's tuned model, the way it was trained to answer.

The text given is put where the data's input went in training: when the recipe's `template.prompt`
has one placeholder (e.g. "Clause: {text}\\nCategory:"), the text fills it; when it has several, a
JSON object with those fields fills them (`prompt='{"question": "...", "context": "..."}'`); any
other text, or raw=True, is sent as it is. Then, as in training, the model's own chat template wraps
it (template.chat, with template.system as the system message) or the plain prompt gets the
tokenizer's usual prefix. The answer is streamed token by token until an end token: greedy, or
sampled with temperature / top_p / seed.

With no prompt, an interactive loop reads prompts from stdin until EOF or "exit"; with a chat
template the conversation history is kept (each turn sees the earlier ones).

A run of a classification task answers with one of its labels: decoding follows the label set's
prefix trie, as its evaluation does — unless the run's plan says eval.mode=generate, or the command
line does. A run with a classification head (adapter.head=classifier) answers with its head
instead: the likeliest label, then the likeliest few with their probabilities (the softmax of the
head's logits), from one forward pass.
"""
from __future__ import annotations

import sys
from pathlib import Path

from core.errors import PlanError
from core.plan import Plan
from core.prompting import Prompter
from core.tokenizer import load_tokenizer
from runtime.decode import GREEDY, LabelTrie, Sampling, classify, end_token_ids, stream_tokens

EXIT_WORDS = ("exit", "quit", ":q")
HEAD_SHOWN = 5              # labels shown with their probabilities after a head's answer


class Chat:
    """A model, its tokenizer and the plan's Prompter: turns text into prompt ids, answers back."""

    def __init__(self, plan: Plan, adapter_dir=None, *, model=None, tokenizer=None,
                 labels: bool = False):
        from runtime.build import scoring_model

        self.plan = plan
        self.tokenizer = tokenizer or load_tokenizer(plan.model.dir)
        self.model = model if model is not None else scoring_model(plan, adapter_dir)
        self.prompter = Prompter(plan, self.tokenizer)
        self.chat = self.prompter.chat
        self.eos_ids = end_token_ids(plan.model.eos_token_ids, self.tokenizer)
        self.pad_id = plan.model.pad_token_id
        # A classification run answers with one of its labels (decoding within the label set).
        self.trie = LabelTrie.build([x.ids for x in plan.data.labels]) if labels else None
        # ... by its classification head, when the run trained one
        self.head = labels and getattr(self.model, "score", None) is not None

    def fill(self, text: str, *, raw: bool = False) -> tuple[str, str | None]:
        return self.prompter.fill(text, raw=raw)

    @property
    def retrieved(self) -> list[str]:
        return self.prompter.retrieved

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.prompter.prompt_ids(messages)

    # -- answering

    def stream(self, ids: list[int], *, max_new_tokens: int, sampling: Sampling = GREEDY):
        """Yield the answer as text pieces, as the tokens come."""
        out: list[int] = []
        shown = ""
        for t in stream_tokens(self.model, ids, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
                               pad_id=self.pad_id, sampling=sampling):
            out.append(t)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            # A multi-byte character split over tokens decodes to U+FFFD until it is complete.
            if text.endswith("\ufffd"):
                continue
            if text.startswith(shown):
                yield text[len(shown):]
            shown = text
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        if text != shown and text.startswith(shown):
            yield text[len(shown):]

    def answer(self, messages: list[dict], *, max_new_tokens: int, out=None,
               sampling: Sampling = GREEDY) -> str:
        if self.head:
            return self._head_answer(messages, out)
        if self.trie is not None:
            (k,), _ = classify(self.model, [self.prompt_ids(messages)], self.trie, batch_size=1,
                               pad_id=self.pad_id, eos_ids=self.eos_ids)
            label = self.plan.data.labels[k].text
            if out is not None:
                out.write(label + "\n")
                out.flush()
            return label
        ids = self.prompt_ids(messages)
        limit = self.plan.model.config.max_position_embeddings
        if len(ids) + max_new_tokens > limit:
            raise PlanError("prompt", f"the prompt is {len(ids)} tokens; with max_new_tokens="
                            f"{max_new_tokens} it does not fit the model's context of {limit} "
                            "tokens.", hint=f"shorten the prompt, or give max_new_tokens="
                                            f"{max(1, limit - len(ids))} or less.")
        pieces = []
        for piece in self.stream(ids, max_new_tokens=max_new_tokens, sampling=sampling):
            pieces.append(piece)
            if out is not None:
                out.write(piece)
                out.flush()
        if out is not None:
            out.write("\n")
            out.flush()
        return "".join(pieces).strip()

    def _head_answer(self, messages: list[dict], out) -> str:
        """The head's likeliest label; written with the likeliest few and their probabilities."""
        from runtime.head import predict, probabilities

        labels = self.plan.data.labels
        p = probabilities(predict(self.model, [self.prompt_ids(messages)], batch_size=1,
                                  pad_id=self.pad_id))[0]
        order = sorted(range(len(p)), key=lambda k: -p[k])
        label = labels[order[0]].text
        if out is not None:
            out.write(label + "\n" + "  " + " · ".join(
                f"{labels[k].text} {p[k]:.3f}" for k in order[:HEAD_SHOWN]) + "\n")
            out.flush()
        return label


def turn_sampling(sampling: Sampling, turn: int) -> Sampling:
    """The sampling of one turn of a conversation: a given seed moves on each turn (turn 0 keeps
    it), so the conversation as a whole is reproducible without every turn drawing alike."""
    if sampling.seed is None or turn == 0:
        return sampling
    return Sampling(sampling.temperature, sampling.top_p, (sampling.seed + turn) % 2**32)


def _load_plan(run):
    if isinstance(run, Plan):                                    # the base model, no run dir
        return run, None
    from runtime.build import trained_weights

    run_dir = Path(run)
    plan = Plan.load(run_dir / "plan.json")
    return plan, trained_weights(plan, run_dir)


def generate(run_dir, prompt: str | None = None, *, max_new_tokens: int, raw: bool = False,
             free: bool | None = None, out=None, input_fn=input,
             sampling: Sampling = GREEDY) -> str | None:
    """Answer `prompt` with the run's model (base + run_dir/adapter) and print it as it is generated;
    return the answer. prompt None: an interactive loop until EOF or "exit"; returns None.
    `run_dir` may also be a Plan (then the base model answers). The plan decides how to answer, as
    its evaluation does: a classification plan scored within its label set answers with one of its
    labels, a plan with eval.mode=generate answers freely; `free` (the command line's own
    eval.mode) overrides it when given. `sampling`: greedy unless a temperature is given (a
    label is always the likeliest: decoding within a label set does not sample)."""
    from runtime.progress import log

    out = sys.stdout if out is None else out
    plan, adapter = _load_plan(run_dir)
    if adapter is None and not isinstance(run_dir, Plan):
        log(f"{run_dir} has no trained adapter yet: answering with the base model")
    if free is None:
        free = plan.eval.mode == "generate"
    chat = Chat(plan, adapter, labels=plan.data.task == "classification" and not free)

    if prompt is not None:
        user, system = chat.fill(str(prompt), raw=raw)
        if chat.retrieved:
            log(f"retrieved: {', '.join(chat.retrieved)}")
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": user}]
        return chat.answer(messages, max_new_tokens=max_new_tokens, out=out, sampling=sampling)

    keep_history = chat.chat
    log("interactive: type a prompt, Enter to send; EOF (Ctrl-D) or `exit` to leave"
        + ("" if keep_history else " (no chat template: each prompt is answered on its own)"))
    history: list[dict] = []          # user/assistant turns so far
    turn = 0
    system = None
    limit = plan.model.config.max_position_embeddings
    while True:
        try:
            text = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return None
        if text.strip() in EXIT_WORDS:
            return None
        if not text.strip():
            continue
        user, turn_system = chat.fill(text, raw=raw)
        if chat.retrieved:
            log(f"retrieved: {', '.join(chat.retrieved)}")
        system = system or turn_system
        turns = (history if keep_history else []) + [{"role": "user", "content": user}]
        head = [{"role": "system", "content": system}] if system else []
        # Forget the oldest turns once the conversation would outgrow the model's context.
        while len(turns) > 1 and len(chat.prompt_ids(head + turns)) + max_new_tokens > limit:
            turns = turns[2:]
        try:
            reply = chat.answer(head + turns, max_new_tokens=max_new_tokens, out=out,
                                sampling=turn_sampling(sampling, turn))
        except PlanError as e:          # this prompt alone is too long: say so, take the next
            log(f"{e.message} {e.hint or ''}".strip())
            continue
        turn += 1
        if keep_history:
            history = turns + [{"role": "assistant", "content": reply}]
