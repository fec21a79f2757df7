"""Hugging Face Hub datasets as data: `data.path=hf://datasets/ORG/NAME` with data.split,
data.subset and data.revision, read through huggingface_hub's cache.

No network here, ever: every test builds a Hub cache in tmp_path with the layout huggingface_hub
reads offline (datasets--ORG--NAME/refs/main naming a commit, snapshots/<commit>/... linking into
blobs/) and sets HF_HUB_CACHE and HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time

import pytest

from core.errors import PlanError
from core.plan import HubSource, Plan, content_hash
from tests.conftest import clf_rows, write_jsonl
from tests.test_checks import flat, refused

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
CARD = """---
license: mit
configs:
- config_name: contracts
  data_files:
  - split: train
    path: contracts/train.jsonl
  - split: test
    path: contracts/test.jsonl
- config_name: leases
  default: true
  data_files:
  - split: train
    path: leases/train-*.jsonl
---
# Clauses

Two subsets of clauses.
"""


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, read offline (huggingface_hub reads both variables
    when imported: its constants are set too)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put(cache, repo: str, files: dict, *, commit: str = COMMIT, ref: str | None = "main"):
    """A dataset repo's files into the cache as huggingface_hub lays them out: the content in
    blobs/, snapshots/<commit>/<path> a relative link to it, refs/<ref> naming the commit. Returns
    the snapshot folder."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return folder / "snapshots" / commit


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def parquet(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def plan_of(tune_cli, tmp_path, run, *overrides) -> tuple[Plan, str]:
    rc, out, err = tune_cli("plan", f"hydra.run.dir={run}", *overrides)
    assert rc == 0, err
    return Plan.load(tmp_path / run / "plan.json"), out


def examples_of(plan):
    from core.token_cache import load_examples

    ex = load_examples(plan.data.cache)
    return {s: (ex.split(s)[0].flat.tolist(), ex.split(s)[1].tolist()) for s in ("train", "val",
                                                                                  "test")}


def same_rows(a: Plan, b: Plan) -> None:
    """Two plans read the same rows: counts, fields, token statistics and the tokens themselves."""
    for x, y in ((a.data.train, b.data.train), (a.data.test, b.data.test)):
        if x is None:
            assert y is None
            continue
        assert (x.fields, x.read, x.kept, x.dropped, x.sampled, x.train, x.val, x.cleaning) == \
            (y.fields, y.read, y.kept, y.dropped, y.sampled, y.train, y.val, y.cleaning)
    assert a.data.sizes == b.data.sizes and a.data.tokens == b.data.tokens
    assert a.data.labels == b.data.labels
    assert examples_of(a) == examples_of(b)


def resolve(value, **d):
    from compiler import hub

    return hub.resolve("data.path", value, {"split": "train", "subset": None, "revision": None,
                                            "max_file_mb": 1024, **d})


# ------------------------------------------------------------------------------ reading a split

def test_parquet_split_reads_as_the_same_file_given_locally(tune_cli, hub_cache, tmp_path):
    train, test = parquet(clf_rows(300)), parquet(clf_rows(40, seed=1))
    put(hub_cache, "acme/clauses", {"README.md": "# Clauses\n", ".gitattributes": "",
                                    "data/train-00000-of-00001.parquet": train,
                                    "data/test-00000-of-00001.parquet": test})
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "train.parquet").write_bytes(train)
    (tmp_path / "local" / "test.parquet").write_bytes(test)
    hub, out = plan_of(tune_cli, tmp_path, "hub", "data.path=hf://datasets/acme/clauses",
                       "data.test_path=hf://datasets/acme/clauses")
    local, _ = plan_of(tune_cli, tmp_path, "local", "data.path=local/train.parquet",
                       "data.test_path=local/test.parquet")
    same_rows(hub, local)
    assert hub.data.key == local.data.key               # one file: its sha256, as given locally
    assert hub.data.train.sha256 == local.data.train.sha256
    assert hub.data.train.file == hub.config["data"]["path"] == "hf://datasets/acme/clauses"
    assert hub.data.train.hub == HubSource(repo="acme/clauses", split="train", subset=None,
                                           revision=None, commit=COMMIT,
                                           files=("data/train-00000-of-00001.parquet",))
    assert hub.data.test.hub.split == "test" and local.data.train.hub is None
    text = flat(out)                                    # the summary: id, split, revision, commit
    assert "hf://datasets/acme/clauses · split train · revision main" in text
    assert "hf://datasets/acme/clauses · split test" in text and COMMIT in text


def test_shards_of_a_split_are_read_in_order_as_one_table(tune_cli, hub_cache, tmp_path):
    rows = clf_rows(300)
    shards = {f"data/train-0000{i}-of-00003.parquet": parquet(rows[i * 100:(i + 1) * 100])
              for i in range(3)}
    put(hub_cache, "acme/clauses", {**shards, "data/validation-00000-of-00001.parquet":
                                    parquet(clf_rows(30, seed=2))})
    (tmp_path / "all.parquet").write_bytes(parquet(rows))
    hub, _ = plan_of(tune_cli, tmp_path, "hub", "data.path=hf://datasets/acme/clauses")
    local, _ = plan_of(tune_cli, tmp_path, "local", "data.path=all.parquet")
    same_rows(hub, local)
    assert hub.data.train.hub.files == tuple(sorted(shards))
    digests = "".join(hashlib.sha256(shards[f]).hexdigest() for f in sorted(shards))
    assert hub.data.train.sha256 == hashlib.sha256(digests.encode()).hexdigest()


def test_jsonl_subset_named_by_the_card(tune_cli, hub_cache, tmp_path):
    train, test = jsonl(clf_rows(300)), jsonl(clf_rows(40, seed=1))
    leases = clf_rows(240, seed=3)
    put(hub_cache, "acme/legal", {"README.md": CARD, "contracts/train.jsonl": train,
                                  "contracts/test.jsonl": test,
                                  "leases/train-0.jsonl": jsonl(leases[:120]),
                                  "leases/train-1.jsonl": jsonl(leases[120:]),
                                  # named like a split, but not in the card: never read
                                  "extra/train.jsonl": jsonl(clf_rows(7, seed=9))})
    write_jsonl(tmp_path / "train.jsonl", clf_rows(300))
    write_jsonl(tmp_path / "test.jsonl", clf_rows(40, seed=1))
    hub, _ = plan_of(tune_cli, tmp_path, "hub", "data.path=hf://datasets/acme/legal",
                     "data.subset=contracts", "data.test_path=hf://datasets/acme/legal",
                     "data.test_subset=contracts")
    local, _ = plan_of(tune_cli, tmp_path, "local", "data.path=train.jsonl",
                       "data.test_path=test.jsonl")
    same_rows(hub, local)
    assert hub.data.key == local.data.key
    assert hub.data.train.hub.subset == "contracts" and hub.data.test.hub.files == \
        ("contracts/test.jsonl",)
    # no subset named: the card's default one, both of its files
    default, _ = plan_of(tune_cli, tmp_path, "default", "data.path=hf://datasets/acme/legal")
    assert default.data.train.hub.subset == "leases" and default.data.train.read == 240
    assert default.data.train.hub.files == ("leases/train-0.jsonl", "leases/train-1.jsonl")


def test_one_file_of_the_repo(hub_cache):
    snap = put(hub_cache, "acme/legal", {"README.md": CARD, "contracts/train.jsonl": "{}\n"})
    found = resolve("hf://datasets/acme/legal/contracts/train.jsonl")
    assert found.files == (snap / "contracts" / "train.jsonl",)
    assert found.source.files == ("contracts/train.jsonl",) and found.source.split is None
    with pytest.raises(PlanError) as e:                 # a split of one file means nothing
        resolve("hf://datasets/acme/legal/contracts/train.jsonl", split="test")
    assert e.value.key == "data.split" and "one file" in e.value.message


def test_a_folder_of_the_repo(hub_cache):
    """hf://datasets/ORG/NAME/FOLDER: the split found by name inside it (the card is not read)."""
    put(hub_cache, "acme/legal", {"README.md": CARD, "raw/v2/train.csv": "text,label\na,b\n",
                                  "raw/v2/test.csv": "text,label\nc,d\n", "raw/v1/train.csv": ""})
    assert resolve("hf://datasets/acme/legal/raw/v2").source.files == ("raw/v2/train.csv",)
    with pytest.raises(PlanError) as e:
        resolve("hf://datasets/acme/legal/raw/v3")
    assert e.value.key == "data.path" and "raw/v3" in e.value.message


def test_a_card_whose_header_is_not_yaml(hub_cache):
    card = put(hub_cache, "acme/broken", {"README.md": "---\nconfigs: [unclosed\n---\n",
                                          "train.jsonl": "{}\n"}) / "README.md"
    with pytest.raises(PlanError) as e:
        resolve("hf://datasets/acme/broken")
    assert e.value.key == "data.path" and e.value.file == str(card)
    assert "YAML header" in e.value.message


def test_a_bad_row_names_its_file_in_the_cache_and_its_line(tune_cli, hub_cache, tmp_path):
    rows = clf_rows(300)
    second = rows[150:]
    second[2] = {"text": "a clause", "label": ["Alpha", "Beta"]}      # line 3 of the second file
    snap = put(hub_cache, "acme/clauses", {"train-00000-of-00002.jsonl": jsonl(rows[:150]),
                                           "train-00001-of-00002.jsonl": jsonl(second)})
    shard = snap / "train-00001-of-00002.jsonl"
    refused(tune_cli("plan", "hydra.run.dir=run", "data.path=hf://datasets/acme/clauses"),
            f"{shard}:3", "data.path", "field `label`", tmp_path=tmp_path)


def test_preference_pairs_from_the_hub(tune_cli, hub_cache, tmp_path):
    from tests.conftest import pref_rows

    rows = pref_rows(40)
    put(hub_cache, "acme/pairs", {"data/train-00000-of-00002.jsonl": jsonl(rows[:20]),
                                  "data/train-00001-of-00002.jsonl": jsonl(rows[20:])})
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    common = ("objective=dpo", "schedule.batch_size=2")
    hub, _ = plan_of(tune_cli, tmp_path, "hub", "data.path=hf://datasets/acme/pairs", *common)
    local, _ = plan_of(tune_cli, tmp_path, "local", "data.path=pairs.jsonl", *common)
    assert (hub.data.train.read, hub.data.train.kept, hub.data.sizes, hub.data.tokens) == \
        (local.data.train.read, local.data.train.kept, local.data.sizes, local.data.tokens)
    assert hub.data.train.hub.files == ("data/train-00000-of-00002.jsonl",
                                        "data/train-00001-of-00002.jsonl")


# ------------------------------------------------------------------------------ refusals

def test_a_missing_split_lists_the_splits_there_are(tune_cli, hub_cache, tmp_path):
    put(hub_cache, "acme/legal", {"README.md": CARD, "contracts/train.jsonl": jsonl(clf_rows(5)),
                                  "contracts/test.jsonl": jsonl(clf_rows(5, seed=1))})
    text = refused(tune_cli("plan", "hydra.run.dir=run", "data.path=hf://datasets/acme/legal",
                            "data.subset=contracts", "data.split=validation"),
                   "data.split", "no split `validation`", "train, test", tmp_path=tmp_path)
    assert "subset contracts" in text
    put(hub_cache, "acme/plain", {"data/train-00000-of-00001.parquet": b"x",
                                  "data/test-00000-of-00001.parquet": b"x"})
    with pytest.raises(PlanError) as e:                 # the file names say the splits
        resolve("hf://datasets/acme/plain", split="valid")
    assert e.value.key == "data.split" and "its splits: train, test" in e.value.message


def test_a_missing_subset_lists_the_subsets(tune_cli, hub_cache, tmp_path):
    put(hub_cache, "acme/legal", {"README.md": CARD, "contracts/train.jsonl": jsonl(clf_rows(5))})
    refused(tune_cli("plan", "hydra.run.dir=run", "data.path=hf://datasets/acme/legal",
                     "data.subset=lease"),
            "data.subset", "no subset `lease`", "contracts, leases", "Did you mean `leases`?",
            tmp_path=tmp_path)
    # no card: subsets are folders, and a split found in several of them is not mixed
    put(hub_cache, "acme/langs", {"en/train-0.jsonl": "{}\n", "fr/train-0.jsonl": "{}\n"})
    with pytest.raises(PlanError) as e:
        resolve("hf://datasets/acme/langs")
    assert e.value.key == "data.subset" and "en, fr" in e.value.message
    assert resolve("hf://datasets/acme/langs", subset="fr").source.files == ("fr/train-0.jsonl",)


@pytest.mark.parametrize("url", ["hf://acme/clauses", "hf://datasets/acme", "hf://datasets/",
                                 "hf://models/acme/clauses", "hf://datasets/acme/clauses@v2",
                                 "hf://datasets/acme/clauses/../x", "hf://datasets/-a/b"])
def test_a_malformed_url_says_the_form(url, hub_cache):
    start = time.perf_counter()
    with pytest.raises(PlanError) as e:
        resolve(url)
    assert time.perf_counter() - start < 1.0
    assert e.value.key == "data.path" and url in e.value.message
    assert "hf://datasets/ORG/NAME" in e.value.render() or "data.revision=v2" in e.value.hint


def test_a_malformed_url_exits_2(tune_cli, hub_cache, tmp_path):
    refused(tune_cli("plan", "hydra.run.dir=run", "data.path=hf://acme/clauses"),
            "data.path", "not a Hub dataset URL", "hf://datasets/ORG/NAME", tmp_path=tmp_path)


def test_not_cached_offline_says_how_to_fill_the_cache(tune_cli, hub_cache, tmp_path):
    text = refused(tune_cli("plan", "hydra.run.dir=run", "data.path=hf://datasets/acme/absent"),
                   "data.path", "acme/absent is not in the local Hugging Face cache",
                   f"HF_HUB_CACHE={hub_cache}", "HF_HUB_OFFLINE=1 is set",
                   "hf download acme/absent --repo-type dataset",
                   "huggingface-cli download --repo-type dataset acme/absent", tmp_path=tmp_path)
    assert "Traceback" not in text
    start = time.perf_counter()
    with pytest.raises(PlanError):
        resolve("hf://datasets/acme/absent")
    assert time.perf_counter() - start < 1.0


def test_split_files_the_cache_lacks(hub_cache):
    """huggingface_hub's cached file list names a shard the cache does not hold (an interrupted
    download): the split is refused as not cached, not read in part."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    snap = put(hub_cache, "acme/clauses", {"data/train-00000-of-00002.parquet": b"x"})
    names = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    write_tree_cache(str(snap.parent.parent), COMMIT,
                     {n: TreeCacheEntry(size=1, blob_id="0" * 40) for n in names})
    with pytest.raises(PlanError) as e:
        resolve("hf://datasets/acme/clauses")
    assert e.value.key == "data.path" and "not in the local Hugging Face cache" in e.value.message
    assert "hf download acme/clauses" in e.value.hint


def test_an_unknown_revision_offline(hub_cache):
    put(hub_cache, "acme/clauses", {"train.jsonl": "{}\n"})
    with pytest.raises(PlanError) as e:
        resolve("hf://datasets/acme/clauses", revision="v9")
    assert e.value.key == "data.path" and "at revision v9" in e.value.message


def test_no_file_of_a_supported_format(hub_cache):
    put(hub_cache, "acme/archive", {"data/train-00000-of-00001.arrow": b"x",
                                    "data/test-00000-of-00001.arrow": b"x"})
    with pytest.raises(PlanError) as e:
        resolve("hf://datasets/acme/archive")
    assert e.value.key == "data.path" and ".arrow" in e.value.message
    assert ".jsonl, .json, .csv and .parquet" in e.value.hint


def test_a_split_larger_than_max_file_mb(hub_cache):
    put(hub_cache, "acme/clauses", {"data/train-00000-of-00002.jsonl": "x" * 700_000,
                                    "data/train-00001-of-00002.jsonl": "x" * 700_000})
    with pytest.raises(PlanError) as e:                 # each file is under the limit, not both
        resolve("hf://datasets/acme/clauses", max_file_mb=1)
    assert e.value.key == "data.path" and "data.max_file_mb=1" in e.value.message


@pytest.mark.parametrize("override", ["data.split=validation", "data.subset=en",
                                      "data.revision=v1"])
def test_split_keys_apply_only_to_hub_paths(override, tune_cli, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", clf_rows(20))
    key = override.split("=")[0]
    text = refused(tune_cli("plan", "hydra.run.dir=run", "data.path=train.jsonl", override),
                   key, "applies only to a Hugging Face Hub dataset", tmp_path=tmp_path)
    assert "train.jsonl" in text


def test_test_split_keys_apply_only_to_hub_paths():
    from compiler import hub

    d = {"test_split": "validation"}
    with pytest.raises(PlanError) as e:
        hub.check_keys("data.test_path", "test.jsonl", d)
    assert e.value.key == "data.test_split"
    hub.check_keys("data.test_path", "hf://datasets/acme/x", d)        # fine with a Hub path
    hub.check_keys("data.path", "train.jsonl", d)                      # not data.path's key


# ------------------------------------------------------------------------------ caches, hashes

def test_a_cache_filled_by_datasets_without_a_main_ref(hub_cache):
    """`datasets.load_dataset` downloads a card-less repo's files by commit, leaving no refs/main:
    its one snapshot is the dataset; with several, data.revision must say which."""
    snap = put(hub_cache, "acme/clauses", {"data/train-00000-of-00001.jsonl": "{}\n"}, ref=None)
    found = resolve("hf://datasets/acme/clauses")
    assert found.source.commit == COMMIT and found.files[0].parent.parent == snap
    put(hub_cache, "acme/clauses", {"data/train-00000-of-00001.jsonl": "{}\n"}, commit=OTHER,
        ref=None)
    with pytest.raises(PlanError) as e:
        resolve("hf://datasets/acme/clauses")
    assert e.value.key == "data.revision" and COMMIT in e.value.message and OTHER in e.value.message
    assert resolve("hf://datasets/acme/clauses", revision=OTHER).source.commit == OTHER


def test_the_hash_covers_the_split_not_the_cache_path(tune_cli, hub_cache, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    files = {"data/train-00000-of-00001.parquet": parquet(clf_rows(300))}
    put(hub_cache, "acme/clauses", files)
    put(hub_cache, "acme/clauses", files, commit=OTHER, ref="v1")     # the same data, tagged
    a, _ = plan_of(tune_cli, tmp_path, "a", "data.path=hf://datasets/acme/clauses")
    moved = tmp_path / "elsewhere"
    shutil.copytree(hub_cache, moved, symlinks=True)                  # another machine's cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(moved))
    b, _ = plan_of(tune_cli, tmp_path, "b", "data.path=hf://datasets/acme/clauses")
    assert a.hash == b.hash and a.data.train.sha256 == b.data.train.sha256
    tagged, _ = plan_of(tune_cli, tmp_path, "c", "data.path=hf://datasets/acme/clauses",
                        "data.revision=v1")
    assert tagged.data.train.hub.commit == OTHER and tagged.hash != a.hash
    # split, subset and revision enter the hash; the commit and the file's name do not
    data = a.config["data"]
    for key, value in (("split", "test"), ("subset", "en"), ("revision", "v1")):
        changed = dataclasses.replace(a, config={**a.config, "data": {**data, key: value}})
        assert content_hash(changed) != a.hash, key
    train = dataclasses.replace(a.data.train, file="hf://datasets/x/y",
                                hub=dataclasses.replace(a.data.train.hub, commit=OTHER))
    assert content_hash(dataclasses.replace(a, data=dataclasses.replace(a.data, train=train))) \
        == a.hash
    # a plan of a local file hashes as it did before these keys existed
    old = {k: v for k, v in data.items() if k not in ("split", "subset", "revision", "test_split",
                                                      "test_subset", "test_revision")}
    assert content_hash(dataclasses.replace(a, config={**a.config, "data": old})) == a.hash


def test_rerunning_a_plan_after_the_dataset_changed(tune_cli, hub_cache, tmp_path):
    from tune.commands import _checked_plan

    put(hub_cache, "acme/clauses", {"train.jsonl": jsonl(clf_rows(300))})
    plan, _ = plan_of(tune_cli, tmp_path, "run", "data.path=hf://datasets/acme/clauses")
    put(hub_cache, "acme/clauses", {"train.jsonl": jsonl(clf_rows(300, seed=5))}, commit=OTHER)
    with pytest.raises(PlanError) as e:                 # main moved on: the plan is not re-run
        _checked_plan(plan, tmp_path / "run" / "plan.json")
    assert e.value.key == "data.path" and "changed since the plan was compiled" in e.value.message
    assert COMMIT in e.value.message and OTHER in e.value.message
