"""`tune serve`: trained runs behind an OpenAI-compatible HTTP API.

    GET  /v1/models                  the runs served (a request's `model` names one)
    POST /v1/chat/completions        messages → an answer, as the run was trained to answer
    POST /v1/completions             raw text → its continuation (no template)

Three parts:
- `load_runs` builds each run's model (base + adapter). Runs over one base share its arrays: a
  weight equal to one already loaded is replaced by it, so N adapters over one base hold one base.
- `Engine` is one worker thread that owns the accelerator. Requests queue; the worker takes the
  oldest, waits up to serve.batch_wait_ms for more for the same run (serve.batch_size rows at most,
  each `n` choice a row), and decodes them as ONE batch through the KV-cache decoder
  (runtime.decode.RunningBatch): one prefill, then one jitted step per token for every row at once.
  Each row ends on its own (an end token, a stop string, its max_tokens). Between steps, requests
  that arrived meanwhile join the batch (continuous batching): a finished row's slot takes a new
  prompt, or the batch widens, up to serve.batch_size rows. Tokens reach each request as they come
  (server-sent events with stream=true).
- `make_app` is the FastAPI app: it checks a request (a bad one is a 400 with an OpenAI-style error
  body, never an exception that stops the server), builds the prompt with the run's Prompter — the
  user's text through the recipe's template and the model's chat template, as `tune generate`
  does — and turns the worker's events into the API's JSON.

A classification run answers within its label set (decoding follows the labels' prefix trie, as its
evaluation does) unless its plan says eval.mode=generate or the request says "constrained": false.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from core.errors import PlanError
from core.plan import Plan
from runtime.decode import (LabelTrie, RunningBatch, Sampling, bucket, classify,
                            end_token_ids)

MAX_N = 16                       # choices per request at most
MAX_STOP = 4                     # stop strings per request at most (as OpenAI)


# ------------------------------------------------------------------------------ the runs

@dataclass
class Served:
    """One run as the server holds it."""
    name: str
    run_dir: Path
    plan: Plan
    tokenizer: object
    prompter: object
    split: tuple                      # (graphdef, state): what the decoder runs
    model: object                     # the same, merged (classification decoding takes a model)
    eos_ids: tuple[int, ...]
    pad_id: int
    trie: LabelTrie | None            # the label set of a classification run
    created: int
    lock: threading.Lock = field(default_factory=threading.Lock)   # the Prompter keeps state

    @property
    def context(self) -> int:
        return self.plan.model.config.max_position_embeddings


def run_names(run_dirs) -> list[str]:
    """A name per run: its directory's name, with its parent's where two would be alike."""
    dirs = [Path(d).resolve() for d in run_dirs]
    names = [d.name for d in dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def load_runs(run_dirs) -> dict[str, Served]:
    """Each run's model, its base's arrays shared with the runs loaded before it."""
    from flax import nnx

    import jax

    from core.prompting import Prompter
    from core.tokenizer import load_tokenizer
    from runtime.build import scoring_model, trained_weights
    from runtime.progress import log

    served: dict[str, Served] = {}
    loaded: dict[tuple, list] = {}            # (path, shape, dtype) → arrays held already
    names = run_names(run_dirs)
    if len(set(names)) != len(names):
        raise PlanError("runs", "two runs have the same directory and parent names.",
                        hint="serve runs from directories with distinct names.")
    for name, run_dir in zip(names, run_dirs):
        rd = Path(run_dir).resolve()
        plan = Plan.load(rd / "plan.json")
        adapter = trained_weights(plan, rd)
        if adapter is None:
            log(f"{rd} has no trained adapter yet: `{name}` answers with the base model")
        graphdef, state = nnx.split(scoring_model(plan, adapter))
        shared = 0

        def share(path, leaf):
            nonlocal shared
            key = (jax.tree_util.keystr(path), leaf.shape, str(leaf.dtype))
            for other in loaded.get(key, ()):
                if other is leaf or bool(jax.numpy.array_equal(other, leaf)):
                    shared += leaf.size * leaf.dtype.itemsize
                    return other
            loaded.setdefault(key, []).append(leaf)
            return leaf

        state = jax.tree_util.tree_map_with_path(share, state)
        tokenizer = load_tokenizer(plan.model.dir)
        labels = plan.data.task == "classification" and plan.eval.mode != "generate" and \
            bool(plan.data.labels)
        served[name] = Served(
            name=name, run_dir=rd, plan=plan, tokenizer=tokenizer,
            prompter=Prompter(plan, tokenizer), split=(graphdef, state),
            model=nnx.merge(graphdef, state),
            eos_ids=end_token_ids(plan.model.eos_token_ids, tokenizer),
            pad_id=plan.model.pad_token_id,
            trie=LabelTrie.build([x.ids for x in plan.data.labels]) if labels else None,
            created=int((rd / "plan.json").stat().st_mtime))
        if shared:
            log(f"{name}: {shared / 2**20:,.0f} MiB of weights shared with the runs loaded before it")
    return served


# ------------------------------------------------------------------------------ the engine

class ApiError(Exception):
    """A request the API refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Job:
    """One request as the worker sees it: its prompts (one per completion prompt), n choices each."""
    served: Served
    prompts: list[list[int]]
    n: int
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    constrained: bool
    sink: object                      # sink(event): thread-safe, called from the worker
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def key(self):
        return self.served.name, self.constrained


class Engine:
    """The one thread that decodes: requests in, batched through the decoder, events out.

    Events a job's sink receives, per choice index: ("delta", i, text), then ("done", i,
    finish_reason, completion_tokens); or ("error", message) for the whole job."""

    def __init__(self, served: dict[str, Served], *, batch_size: int, batch_wait_s: float,
                 max_tokens: int):
        self.served, self.batch_size, self.batch_wait_s = served, batch_size, batch_wait_s
        self.max_tokens = max_tokens
        self.batches: list[int] = []              # rows of each batch decoded (for tests, stats)
        self.joined = 0                           # rows that joined a running batch
        self._pending: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="tune-decoder", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise ApiError(503, "the server is shutting down.", kind="server_error")
            self._pending.append(job)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # -- the worker

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the jobs queued behind it for the same run and way
        of decoding, once batch_wait_s has passed or the batch is full."""
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            first = self._pending[0]
            deadline = time.monotonic() + self.batch_wait_s
            while True:
                same = [j for j in self._pending if j.key() == first.key()]
                if sum(j.rows for j in same) >= self.batch_size or self._closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, rows = [], 0
            for j in list(self._pending):
                if j.key() == first.key() and (not batch or rows + j.rows <= self.batch_size):
                    batch.append(j)
                    rows += j.rows
                    self._pending.remove(j)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            try:
                if batch[0].constrained:
                    self._labels(batch)
                else:
                    self._generate(batch)
            except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
                for j in batch:
                    j.sink(("error", f"{type(e).__name__}: {e}"))

    def _labels(self, batch: list[Job]) -> None:
        s = batch[0].served
        prompts = [p for j in batch for p in j.prompts]
        self.batches.append(len(prompts))
        picked, _ = classify(s.model, prompts, s.trie, batch_size=max(1, len(prompts)),
                             pad_id=s.pad_id, eos_ids=s.eos_ids)
        k = 0
        for j in batch:
            for p in range(len(j.prompts)):
                label = s.plan.data.labels[picked[k]]
                k += 1
                for c in range(j.n):
                    i = p * j.n + c
                    j.sink(("delta", i, label.text))
                    j.sink(("done", i, "stop", len(label.ids)))

    def _generate(self, batch: list[Job]) -> None:
        """Decode the batch's rows; between steps, jobs queued for the same run join the rows that
        are done (or a wider batch) when their prompt and tokens fit the running cache."""
        s = batch[0].served
        rows = [r for j in batch for r in _rows(j)]
        longest = max(r.job.max_tokens for r in rows)
        # room for rows that join later: as many tokens again as the first rows may write
        cache_len = bucket(bucket(max(len(r.ids) for r in rows)) + 2 * longest)
        running = RunningBatch(s.split, cache_len=cache_len, pad_id=s.pad_id,
                               max_rows=max(self.batch_size, len(rows)))
        first = running.start([r.ids for r in rows], [r.sampling for r in rows])
        slots: list[_Row | None] = rows + [None] * (running.rows - len(rows))
        end = set(s.eos_ids)
        self.batches.append(len(rows))
        fresh = list(zip(range(len(rows)), first.tolist()))        # (slot, token) to deliver
        while True:
            for k, t in fresh:
                r = slots[k]
                if r is None or r.done:
                    continue
                if r.job.cancelled:
                    r.done = True
                elif t in end:
                    r.finish(s.tokenizer, "stop")
                else:
                    r.add(s.tokenizer, t)
            for k, r in enumerate(slots):
                if r is not None and r.done:
                    running.release(k)
            fresh = self._join(running, slots, batch[0].key())
            if all(r is None or r.done for r in slots):
                break
            if running.full:                # cannot happen: every row's budget fits the cache
                break
            tokens = running.step()
            fresh += [(k, t) for k, t in enumerate(tokens.tolist()) if slots[k] is not None]
        for r in slots:
            if r is not None and not r.done:
                r.finish(s.tokenizer, "length")

    def _join(self, running: "RunningBatch", slots: list, key) -> list[tuple[int, int]]:
        """Queued jobs for this run that fit the running batch take its free rows (widening it up
        to batch_size rows): [(slot, first token)] of the rows that joined."""
        with self._cv:
            waiting = [j for j in self._pending if j.key() == key and not j.cancelled
                       and all(running.fits(len(p), j.max_tokens) for p in j.prompts)]
            free = [k for k, r in enumerate(slots) if r is None or r.done]
            joining = []
            for j in waiting:
                busy = len(slots) - len(free) + sum(x.rows for x in joining)
                if busy + j.rows > self.batch_size:
                    break
                joining.append(j)
                self._pending.remove(j)
        if not joining:
            return []
        new_rows = [r for j in joining for r in _rows(j)]
        if len(new_rows) > len(free):
            running.widen(len(slots) - len(free) + len(new_rows))
            free += list(range(len(slots), running.rows))
            slots.extend([None] * (running.rows - len(slots)))
        self.batches[-1] += len(new_rows)
        self.joined += len(new_rows)
        out = []
        for k, r in zip(free, new_rows):
            slots[k] = r
            out.append((k, running.join(k, r.ids, r.sampling)))
        return out


def _rows(job: "Job") -> list["_Row"]:
    """A job's rows: each prompt × each of its n choices (choice c samples with seed + c)."""
    out = []
    for p, ids in enumerate(job.prompts):
        for c in range(job.n):
            seed = None if job.sampling.seed is None else (job.sampling.seed + c) % 2**32
            out.append(_Row(job, p * job.n + c, ids, Sampling(job.sampling.temperature,
                                                            job.sampling.top_p, seed)))
    return out


class _Row:
    """One choice being decoded: its tokens, the text sent so far, its stop strings."""

    def __init__(self, job: Job, index: int, ids: list[int], sampling: Sampling):
        self.job, self.index, self.ids, self.sampling = job, index, ids, sampling
        self.tokens: list[int] = []
        self.sent = 0                     # characters of the answer's text sent
        self.done = False
        self._hold = max((len(x) for x in job.stop), default=1) - 1

    def add(self, tokenizer, token: int) -> None:
        self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = _first_stop(text, self.job.stop)
        if cut is not None:
            self._send(text[:cut])
            self._end("stop")
            return
        if len(self.tokens) >= self.job.max_tokens:
            self._send(text)
            self._end("length")
            return
        # hold back a character still being spelled (U+FFFD) and what could begin a stop string
        safe = len(text) - self._hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        self._send(text[:safe])

    def finish(self, tokenizer, reason: str) -> None:
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = _first_stop(text, self.job.stop)
        self._send(text if cut is None else text[:cut])
        self._end(reason if cut is None else "stop")

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.job.sink(("delta", self.index, text[self.sent:]))
            self.sent = len(text)

    def _end(self, reason: str) -> None:
        self.done = True
        self.job.sink(("done", self.index, reason, len(self.tokens)))


def _first_stop(text: str, stops) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


# ------------------------------------------------------------------------------ requests

def _get(body: dict, name: str, kinds, default=None, *, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"`{name}` must be {what or ' or '.join(k.__name__ for k in kinds)}, "
                       f"got {json.dumps(value)[:80]}.", param=name)
    if check is not None and not check(value):
        raise ApiError(400, f"`{name}` must be {what}, got {json.dumps(value)[:80]}.", param=name)
    return value


UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "logprobs",
               "top_logprobs", "echo", "best_of", "suffix")


def _options(engine: Engine, body: dict) -> tuple[Served, dict]:
    """The run a request names and its decoding options, checked."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise ApiError(400, f"`{name}` is not supported by this server.", param=name,
                           code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), 0, what="a number") != 0:
            raise ApiError(400, f"`{name}` is not supported by this server (only 0).", param=name,
                           code="unsupported_parameter")
    model = _get(body, "model", (str,), what="a string")
    if model is None:
        if len(engine.served) != 1:
            raise ApiError(400, f"`model` is required: this server serves "
                           f"{', '.join(engine.served)}.", param="model")
        model = next(iter(engine.served))
    if model not in engine.served:
        raise ApiError(404, f"the model `{model}` does not exist; this server serves "
                       f"{', '.join(engine.served)}.", param="model", code="model_not_found")
    served = engine.served[model]
    limit = engine.max_tokens
    max_tokens = _get(body, "max_completion_tokens", (int,), None, what="a positive integer",
                      check=lambda v: v >= 1)
    max_tokens = _get(body, "max_tokens", (int,), max_tokens, what="a positive integer",
                      check=lambda v: v >= 1) or limit
    if max_tokens > limit:
        raise ApiError(400, f"`max_tokens` is {max_tokens}; this server gives at most {limit} "
                       "(serve.max_tokens).", param="max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or \
            not all(isinstance(x, str) and x for x in stop):
        raise ApiError(400, f"`stop` must be a string or a list of at most {MAX_STOP} non-empty "
                       "strings.", param="stop")
    opts = dict(
        max_tokens=max_tokens, stop=tuple(stop),
        n=_get(body, "n", (int,), 1, what=f"an integer from 1 to {MAX_N}",
               check=lambda v: 1 <= v <= MAX_N),
        sampling=Sampling(
            # greedy unless asked (the run's evaluation decoded greedily; OpenAI's default is 1)
            temperature=float(_get(body, "temperature", (int, float), 0.0,
                                   what="a number from 0 to 2", check=lambda v: 0 <= v <= 2)),
            top_p=float(_get(body, "top_p", (int, float), 1.0, what="a number above 0, at most 1",
                             check=lambda v: 0 < v <= 1)),
            seed=_get(body, "seed", (int,), None, what="an integer from 0 to 2^63",
                      check=lambda v: 0 <= v < 2**63)),
        stream=_get(body, "stream", (bool,), False, what="true or false"),
        usage=bool(_get(body, "stream_options", (dict,), {}, what="an object").get("include_usage")),
        constrained=_get(body, "constrained", (bool,), served.trie is not None,
                         what="true or false"))
    if opts["sampling"].seed is not None:
        opts["sampling"] = Sampling(opts["sampling"].temperature, opts["sampling"].top_p,
                                    opts["sampling"].seed % 2**32)
    if opts["constrained"] and served.trie is None:
        raise ApiError(400, f"`{model}` has no label set to answer within (it is not a "
                       "classification run).", param="constrained")
    return served, opts


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"`{where}.content` must be a string or a list of text parts.",
                   param=where)


def chat_prompt(served: Served, messages) -> list[int]:
    """Prompt ids for a conversation: each user message through the recipe's template, the
    request's system message (else the recipe's), then the model's chat template."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list.", param="messages")
    turns, system = [], None
    with served.lock:
        for k, m in enumerate(messages):
            where = f"messages[{k}]"
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                                 "assistant"):
                raise ApiError(400, f"`{where}.role` must be system, developer, user or "
                               "assistant.", param=where)
            text = _text(m.get("content"), where)
            if m["role"] in ("system", "developer"):
                system = text if system is None else system + "\n\n" + text
            elif m["role"] == "user":
                user, recipe_system = served.prompter.fill(text)
                system = system if system is not None else recipe_system
                turns.append({"role": "user", "content": user})
            else:
                turns.append({"role": "assistant", "content": text})
        if not turns or turns[-1]["role"] != "user":
            raise ApiError(400, "the last message must be the user's.", param="messages")
        head = [{"role": "system", "content": system}] if system else []
        return served.prompter.prompt_ids(head + turns)


def completion_prompts(served: Served, prompt) -> list[list[int]]:
    """Prompt ids for /v1/completions: text (or token ids) as it is, no template."""
    from core.tokenizer import encode_prompt

    vocab = served.plan.model.config.vocab_size
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_N:
        raise ApiError(400, f"`prompt` must be a string, a list of at most {MAX_N} strings, or "
                       "token ids.", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(encode_prompt(served.tokenizer, p, chat=False).tolist())
        elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < vocab for t in p):
            out.append(list(p))
        else:
            raise ApiError(400, f"`prompt` token ids must be integers from 0 to {vocab - 1}.",
                           param="prompt")
    return out


def _check_length(served: Served, prompts, max_tokens: int) -> None:
    for ids in prompts:
        if len(ids) + max_tokens > served.context:
            raise ApiError(400, f"this prompt is {len(ids)} tokens and asks for {max_tokens} more; "
                           f"{served.name}'s context is {served.context} tokens.",
                           param="messages", code="context_length_exceeded")


# ------------------------------------------------------------------------------ the app

def make_app(engine: Engine):
    """The FastAPI application over an Engine."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tune", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind=kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def failure(_, e: Exception):
        return JSONResponse(ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body(),
                            status_code=500)

    def model_card(s: Served) -> dict:
        return {"id": s.name, "object": "model", "created": s.created, "owned_by": "tune",
                "root": s.plan.model.name, "plan_hash": s.plan.hash,
                "labels": [x.text for x in s.plan.data.labels] if s.trie is not None else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(s) for s in engine.served.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in engine.served:
            raise ApiError(404, f"the model `{name}` does not exist.", param="model",
                           code="model_not_found")
        return model_card(engine.served[name])

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    async def body_of(request: Request) -> dict:
        try:
            return json.loads(await request.body())
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON.") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request)
        served, opts = _options(engine, body)
        prompts = [chat_prompt(served, body.get("messages"))]
        return await respond(served, opts, prompts, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        served, opts = _options(engine, body)
        if opts["constrained"] and "constrained" not in body:
            opts["constrained"] = False       # raw text: free continuation unless asked
        prompts = completion_prompts(served, body.get("prompt"))
        return await respond(served, opts, prompts, chat=False)

    async def respond(served: Served, opts: dict, prompts, *, chat: bool):
        _check_length(served, prompts, opts["max_tokens"])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(served=served, prompts=prompts, n=opts["n"], max_tokens=opts["max_tokens"],
                  sampling=opts["sampling"], stop=opts["stop"], constrained=opts["constrained"],
                  sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        engine.submit(job)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": ident, "created": created, "model": served.name,
                "system_fingerprint": f"tune-{served.plan.hash[:12]}"}
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
        if opts["stream"]:
            return StreamingResponse(_stream(job, events, head, usage, chat=chat,
                                             include_usage=opts["usage"]),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts, reasons = [""] * job.rows, [None] * job.rows
        try:
            left = job.rows
            while left:
                ev = await events.get()
                if ev[0] == "error":
                    raise ApiError(500, ev[1], kind="server_error")
                if ev[0] == "delta":
                    texts[ev[1]] += ev[2]
                else:
                    reasons[ev[1]] = ev[2]
                    usage["completion_tokens"] += ev[3]
                    left -= 1
        finally:
            job.cancelled = True               # a client gone mid-answer frees its rows
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage}
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "object": "text_completion", "choices": choices, "usage": usage}

    return app


async def _stream(job: Job, events: asyncio.Queue, head: dict, usage: dict, *, chat: bool,
                  include_usage: bool):
    """Server-sent events: a chunk per piece of text, a last chunk per choice with its
    finish_reason, the usage if asked for, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, **extra) -> str:
        return "data: " + json.dumps({**head, "object": kind, "choices": choices, **extra}) + "\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for i in range(job.rows)])
        left = job.rows
        while left:
            ev = await events.get()
            if ev[0] == "error":
                yield "data: " + json.dumps(ApiError(500, ev[1], kind="server_error").body()) + "\n\n"
                break
            if ev[0] == "delta":
                piece = {"delta": {"content": ev[2]}} if chat else {"text": ev[2]}
                yield chunk([{"index": ev[1], **piece, "logprobs": None, "finish_reason": None}])
            else:
                usage["completion_tokens"] += ev[3]
                left -= 1
                end = {"delta": {}} if chat else {"text": ""}
                yield chunk([{"index": ev[1], **end, "logprobs": None, "finish_reason": ev[2]}])
        if include_usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


# ------------------------------------------------------------------------------ serving

def bind(host: str, port: int):
    """A listening socket on host:port (port 0: any free one), or a PlanError naming the key."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise PlanError("host", f"cannot resolve {host!r}: {e.strerror}.",
                        hint="give an address such as 127.0.0.1 (this machine only) or 0.0.0.0.") \
            from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise PlanError("port", f"cannot listen on {host}:{port}: {e.strerror}.",
                        hint="another program holds it: give another port=N (port=0 picks a free "
                             "one).") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Server:
    """uvicorn serving the app on a bound socket, in this thread (run) or another (start/stop)."""

    def __init__(self, engine: Engine, sock):
        import uvicorn

        self.engine, self.sock = engine, sock
        self.host, self.port = sock.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn.Config(make_app(engine), log_level="warning",
                                                     access_log=False, lifespan="off"))
        self._thread = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def run(self) -> None:
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self.engine.close()

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]},
                                        daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.close()


def serve(run_dirs, *, host: str, port: int, batch_size: int, batch_wait_ms: float,
          max_tokens: int) -> None:
    """`tune serve`: load the runs, listen, answer until Ctrl-C."""
    from runtime.progress import log

    sock = bind(host, port)                   # a taken port is said before the models load
    engine = Engine(load_runs(run_dirs), batch_size=batch_size,
                    batch_wait_s=batch_wait_ms / 1000, max_tokens=max_tokens)
    server = Server(engine, sock)
    names = ", ".join(engine.served)
    log(f"serving {names} at {server.url} (OpenAI-compatible: /models, /chat/completions, "
        "/completions); Ctrl-C stops")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"listening on {host}: anyone who reaches this machine on port {server.port} can use "
            "the model (there is no API key)")
    try:
        server.run()
    except KeyboardInterrupt:          # uvicorn re-raises the Ctrl-C it shut down on: a normal stop
        pass
    log("stopped")
