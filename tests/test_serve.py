"""`tune serve`: the OpenAI-compatible server, tested with the official `openai` client against
127.0.0.1 — answers equal to the decoder's own, streaming, concurrent clients batched together,
sampling, stop strings, classification runs, errors, several adapters over one base, the CLI."""
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")

from conftest import TINY_CHAT_TEMPLATE, tiny_plan  # noqa: E402

EOS, IM_END = 2, 4
PROMPTS = ["w30 w31 w32", "w40", "w50 w51 w52 w53 w54", "w12 w13", "w60 w61", "w70 w71 w72",
           "w80", "w90 w91", "w20 w21 w22 w23", "w33", "w44 w45", "w55 w56 w57", "w66", "w77 w78",
           "w88 w89 w11", "w15 w16"]


def _train(tiny_chat_dir, run_dir, *, seed, rank=4, chat=False):
    from runtime.run import train

    plan = tiny_plan(tiny_chat_dir, run_dir, max_steps=6, seed=seed, rank=rank)
    if chat:
        plan = dataclasses.replace(plan, template=dataclasses.replace(
            plan.template, chat=True, chat_template=TINY_CHAT_TEMPLATE, prompt="Q : {text} A :",
            system="w40"))
    plan.write(run_dir / "plan.json")
    train(plan, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_chat_dir, tmp_path_factory):
    """Three runs over the tiny base: `plain` (a plain prompt), `chatty` (the chat template and a
    system message, another adapter) and `labels` (plain's adapter, as a classification run)."""
    from core.plan import Label

    root = tmp_path_factory.mktemp("serve")
    plain = _train(tiny_chat_dir, root / "plain", seed=0)
    chatty = _train(tiny_chat_dir, root / "chatty", seed=1, rank=8, chat=True)
    labels = root / "labels"
    shutil.copytree(plain, labels)
    from core.plan import Plan

    plan = Plan.load(plain / "plan.json")
    lab = tuple(Label(f"w{t}", (t, EOS), 3) for t in (50, 51, 52))
    plan = dataclasses.replace(plan, data=dataclasses.replace(plan.data, labels=lab, n_labels=3,
                                                              task="classification"),
                               eval=dataclasses.replace(plan.eval, mode="constrained"))
    plan.write(labels / "plan.json")
    return {"plain": plain, "chatty": chatty, "labels": labels}


@pytest.fixture(scope="module")
def server(runs):
    from runtime.serve import Engine, Server, bind, load_runs

    engine = Engine(load_runs([runs["plain"], runs["chatty"], runs["labels"]]), batch_size=16,
                    batch_wait_s=0.05, max_tokens=24)
    srv = Server(engine, bind("127.0.0.1", 0)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, timeout=120)


def _want(server, name, messages, max_new=24):
    """The answer the decoder gives on its own: greedy over the Prompter's prompt, to its end."""
    from runtime.decode import greedy_generate
    from runtime.serve import chat_prompt

    s = server.engine.served[name]
    ids = chat_prompt(s, messages)
    out = greedy_generate(s.model, [ids], max_new_tokens=max_new, eos_ids=s.eos_ids,
                          pad_id=s.pad_id, batch_size=1)[0]
    return s.tokenizer.decode(out, skip_special_tokens=True), len(out)


def _user(text):
    return [{"role": "user", "content": text}]


def _talkative(server, name="plain", words=3):
    """A prompt of PROMPTS whose answer has at least `words` words (what the tiny model says
    depends on its few training steps)."""
    for p in PROMPTS:
        text, _ = _want(server, name, _user(p))
        if len(text.split()) >= words:
            return p
    raise AssertionError("no prompt gets a long enough answer")


def test_models_lists_the_runs(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["plain", "chatty", "labels"]
    assert client.models.retrieve("labels").id == "labels"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("name", ["plain", "chatty"])
def test_chat_answer_is_the_decoders(client, server, name):
    messages = _user("w30 w31 w32")
    r = client.chat.completions.create(model=name, messages=messages)
    want, n = _want(server, name, messages)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("stop" if n < 24 else "length")
    assert r.usage.completion_tokens == n
    s = server.engine.served[name]
    from runtime.serve import chat_prompt

    assert r.usage.prompt_tokens == len(chat_prompt(s, messages))
    assert r.model == name and r.system_fingerprint == f"tune-{s.plan.hash[:12]}"


def test_chat_template_and_system_message(server):
    """The user's text fills the recipe's template; the request's system message replaces the
    recipe's; then the model's chat template (as `tune generate` builds it)."""
    from runtime.serve import chat_prompt

    s = server.engine.served["chatty"]
    tok = s.tokenizer
    ids = chat_prompt(s, _user("w30"))
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|> system w40 <|im_end|> <|im_start|> user Q : w30 A : " \
                              "<|im_end|> <|im_start|> assistant"
    ids = chat_prompt(s, [{"role": "system", "content": "w41"}, {"role": "user", "content": "w30"},
                          {"role": "assistant", "content": "w33"},
                          {"role": "user", "content": [{"type": "text", "text": "w31"}]}])
    assert tok.decode(ids, skip_special_tokens=False).split() == (
        "<|im_start|> system w41 <|im_end|> <|im_start|> user Q : w30 A : <|im_end|> <|im_start|> "
        "assistant w33 <|im_end|> <|im_start|> user Q : w31 A : <|im_end|> <|im_start|> "
        "assistant").split()


def test_streaming_gives_the_same_answer(client, server):
    messages = _user(_talkative(server))
    chunks = list(client.chat.completions.create(model="plain", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want, n = _want(server, "plain", messages)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3, pieces                                    # as the tokens come
    assert chunks[-1].usage.completion_tokens == n


def test_completions_continue_raw_text(client, server):
    from core.tokenizer import encode_prompt
    from runtime.decode import greedy_generate

    s = server.engine.served["plain"]
    r = client.completions.create(model="plain", prompt=["w30 w31", "w44"], max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1]
    for c, p in zip(r.choices, ["w30 w31", "w44"]):
        ids = encode_prompt(s.tokenizer, p, chat=False).tolist()
        out = greedy_generate(s.model, [ids], max_new_tokens=8, eos_ids=s.eos_ids, pad_id=s.pad_id,
                              batch_size=1)[0]
        assert c.text == s.tokenizer.decode(out, skip_special_tokens=True)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="plain", prompt="w44", max_tokens=8, stream=True))
    assert streamed == r.choices[1].text


def test_sixteen_concurrent_clients_are_batched(client, server):
    want = [_want(server, "plain", _user(p))[0] for p in PROMPTS]
    before = len(server.engine.batches)

    def ask(p):
        return client.chat.completions.create(model="plain", messages=_user(p)).choices[0]\
            .message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, PROMPTS))
    assert got == want
    batches = server.engine.batches[before:]
    assert sum(batches) == 16 and max(batches) > 1, batches


def test_a_request_joins_a_running_batch(server):
    """Continuous batching: a request that arrives while a batch decodes joins it between two steps
    (here: submitted as soon as the first request's first piece of text is out) and gets the
    answer it gets alone."""
    import queue

    from runtime.decode import Sampling
    from runtime.serve import Job, chat_prompt

    engine, s = server.engine, server.engine.served["plain"]
    first, second = _talkative(server), PROMPTS[1]
    events = {0: queue.Queue(), 1: queue.Queue()}

    def job(k, text, sink):
        return Job(s, [chat_prompt(s, _user(text))], 1, 24, Sampling(), (), False, sink)

    def sink_first(ev):
        events[0].put(ev)
        if ev[0] == "delta" and not hasattr(sink_first, "sent"):
            sink_first.sent = True
            engine.submit(job(1, second, events[1].put))

    joined = engine.joined
    engine.submit(job(0, first, sink_first))
    for k, text in ((0, first), (1, second)):
        pieces = []
        while (ev := events[k].get(timeout=120))[0] != "done":
            assert ev[0] == "delta", ev
            pieces.append(ev[2])
        assert "".join(pieces) == _want(server, "plain", _user(text))[0]
    assert engine.joined == joined + 1


def test_sampling_seed_n_and_temperature(client):
    ask = dict(model="plain", messages=_user("w30 w31"), temperature=1.5, top_p=0.95, seed=11,
               n=4, max_tokens=10)
    a = client.chat.completions.create(**ask)
    b = client.chat.completions.create(**ask)
    assert len(a.choices) == 4 and [c.index for c in a.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]        # the same seed: the same draws
    assert len(set(texts)) > 1                                    # each choice draws its own
    greedy = client.chat.completions.create(model="plain", messages=_user("w30 w31"), n=2,
                                            max_tokens=10)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_stop_strings_and_max_tokens(client, server):
    messages = _user(_talkative(server))
    full, n = _want(server, "plain", messages)
    words = full.split()
    assert len(words) >= 3, full
    r = client.chat.completions.create(model="plain", messages=messages, stop=[words[2]])
    assert r.choices[0].message.content == full[:full.index(words[2])]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="plain", messages=messages, stop=words[2], stream=True) if c.choices)
    assert streamed == r.choices[0].message.content
    r = client.chat.completions.create(model="plain", messages=messages, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_classification_run_answers_within_its_labels(client, server):
    from runtime.decode import classify
    from runtime.serve import chat_prompt

    s = server.engine.served["labels"]
    for p in PROMPTS[:4]:
        r = client.chat.completions.create(model="labels", messages=_user(p))
        (k,), _ = classify(s.model, [chat_prompt(s, _user(p))], s.trie, batch_size=1,
                           pad_id=s.pad_id, eos_ids=s.eos_ids)
        assert r.choices[0].message.content == s.plan.data.labels[k].text
    free = client.chat.completions.create(model="labels", messages=_user("w30 w31 w32"),
                                          extra_body={"constrained": False})
    assert free.choices[0].message.content == _want(server, "labels", _user("w30 w31 w32"))[0]
    assert client.models.retrieve("labels").model_extra["labels"] == ["w50", "w51", "w52"]


@pytest.mark.parametrize("change, param", [
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
    ({"max_tokens": 10_000}, "max_tokens"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"model": None}, "model"),
    ({"extra_body": {"constrained": True}}, "constrained"),
])
def test_bad_requests_get_400_and_the_server_goes_on(client, change, param):
    ask = dict(model="plain", messages=_user("w30"))
    ask.update(change)
    if ask.get("model") is None:
        ask.pop("model")
        with pytest.raises(TypeError):          # the client itself insists on a model
            client.chat.completions.create(**ask)
        return
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="plain", messages=_user("w30")).choices


def test_malformed_bodies_and_unknown_models(server, client):
    import httpx

    url = server.url + "/chat/completions"
    for body in (b"{not json", b"[1, 2]", json.dumps({"model": "plain"}).encode(),
                 json.dumps({"model": "plain", "messages": _user("w30"), "n": "two"}).encode(),
                 json.dumps({"messages": _user("w30")}).encode()):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, body
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=_user("w30"))
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="plain", messages=_user(" ".join(["w30"] * 400)),
                                       max_tokens=24)
    assert e.value.body["code"] == "context_length_exceeded"
    assert httpx.get(server.url.rsplit("/v1", 1)[0] + "/health").json() == {"status": "ok"}


def test_runs_over_one_base_share_its_weights(server):
    import jax

    served = server.engine.served
    leaves = {n: dict(jax.tree_util.tree_leaves_with_path(served[n].split[1])) for n in served}
    paths = {jax.tree_util.keystr(p): a for p, a in leaves["plain"].items()}
    other = {jax.tree_util.keystr(p): a for p, a in leaves["chatty"].items()}
    base = [k for k in paths if "lora" not in k and k in other]
    adapter = [k for k in paths if "lora" in k]
    assert base and adapter
    assert all(paths[k] is other[k] for k in base)               # one copy of the base
    assert not any(k in other and paths[k] is other[k] for k in adapter)
    # the classification run holds the plain run's very adapter: all of it is shared
    same = {jax.tree_util.keystr(p): a for p, a in leaves["labels"].items()}
    assert all(same[k] is paths[k] for k in paths)


def test_a_failing_batch_answers_500_and_the_server_goes_on(client, server, monkeypatch):
    import runtime.serve as S

    def boom(*a, **k):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(S.RunningBatch, "start", boom)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="plain", messages=_user("w30"))
    assert "boom" in e.value.body["message"]
    assert client.chat.completions.create(model="plain", messages=_user("w30")).choices


# --- the command line ---------------------------------------------------------------------------

def test_tune_serve_command(runs, tmp_path):
    """`tune serve run=DIR port=0`: says where it listens, answers, stops cleanly on Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "-m", "tune", "serve", f"run={runs['plain']}",
                             "port=0"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving plain at (http://127\.0\.0\.1:\d+/v1)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["plain"]
        r = c.chat.completions.create(model="plain", messages=_user("w30"), max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]          # no run directory left


def test_tune_serve_refuses_a_taken_port_and_a_missing_run(runs, tmp_path):
    import socket

    from test_cli import run_tune

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        rc, _, err = run_tune(["serve", f"run={runs['plain']}", f"port={port}"], tmp_path)
    assert rc == 2 and "port" in err and "Traceback" not in err
    rc, _, err = run_tune(["serve"], tmp_path)
    assert rc == 2 and "needs the run directory" in err
    rc, _, err = run_tune(["serve", f"run={tmp_path}"], tmp_path)
    assert rc == 2 and "not a run directory" in err
