"""The distributed protocol on real gloo ranks: one fetch per job (or node), the same weights on
every rank, and a failure raised on every rank at once.

Each test spawns 2, 4 or 8 real processes with the harness in tests/dist.py; every rank returns
what it saw, and the test asserts every rank. The servers run in this test process, so their
request logs count what the whole job fetched.
"""

from __future__ import annotations

import os

import pytest
import rank_jobs
from dist import assert_all_ok, can_unshare, run_ranks
from helpers import ckpt_bytes, digest, module
from servers import Fault

from pl_pretrain import LocalStrategy, Pretrainer
from pl_pretrain.errors import ConfigurationError

# Every test here starts other processes (ranks, launchers): not in the fast loop.
pytestmark = pytest.mark.slow

needs_root = pytest.mark.skipif(not can_unshare(), reason="simulated nodes need root for mount namespaces")


class Sources:
    """Publishes a distinct checkpoint per cell on a local folder, the URL server, the Hub or an object store."""

    def __init__(self, tmp_path, http_server, hub, request):
        self.tmp_path, self.http, self.hub = tmp_path, http_server, hub
        self.request = request
        self.seed = 0

    def store(self, kind: str):
        """The object store of `kind` ("s3", "gcs", "azure"), started on first use."""
        return self.request.getfixturevalue(kind)

    def publish(self, kind: str, name: str, dim: int = 8) -> tuple[str, str]:
        """Returns (source, expected digest) for a fresh checkpoint named after the cell."""
        self.seed += 1
        mod = module(seed=self.seed, dim=dim)
        data = ckpt_bytes(mod)
        if kind == "local":
            folder = self.tmp_path / "sources" / name
            folder.mkdir(parents=True)
            (folder / "encoder.ckpt").write_bytes(data)
            return str(folder), digest(mod)
        if kind == "url":
            self.http.add(f"{name}/encoder.ckpt", data)
            return f"{self.http.url}/{name}", digest(mod)
        if kind in OBJECT_STORES:
            self.store(kind).put(f"{name}/encoder.ckpt", data)
            return self.store(kind).url(name), digest(mod)
        self.hub.add_file(f"org/{name}", "encoder.ckpt", data)
        return f"org/{name}", digest(mod)

    def gets(self, kind: str, name: str) -> int:
        if kind == "url":
            return len(self.http.gets(f"/{name}/encoder.ckpt"))
        if kind == "hub":
            return len(self.hub.gets(f"/org/{name}/resolve/"))
        if kind in OBJECT_STORES:
            return self.store(kind).body_gets(f"{name}/encoder.ckpt")
        return 0

    def reset_logs(self, kinds) -> None:
        self.http.reset_log()
        self.hub.reset_log()
        for kind in set(kinds) & set(OBJECT_STORES):
            self.store(kind).proxy.reset()

    def heads(self, kind: str, name: str) -> int:
        if kind == "hub":
            return self.hub.count("HEAD", f"/org/{name}/resolve/")
        return 0


OBJECT_STORES = ("s3", "gcs", "azure")


@pytest.fixture
def sources(tmp_path, http_server, hub, request):
    return Sources(tmp_path, http_server, hub, request)


def _matrix(sources, tmp_path, kinds, strategies, collect_in_set=(True, False), present=(False, True)):
    cells, meta = [], []
    for kind in kinds:
        for strategy in strategies:
            for with_folder in collect_in_set:
                for already in present:
                    name = (
                        f"{kind}-{strategy.name}-{'dir' if with_folder else 'none'}-{'present' if already else 'fresh'}"
                    )
                    source, expected = sources.publish(kind, name)
                    collect_in = str(tmp_path / "collect" / name) if with_folder else None
                    cell = {"collect_in": collect_in, "source": source, "strategy": strategy.name}
                    if already:
                        # A previous job collected these files; this job must not fetch again.
                        Pretrainer(collect_in, {"encoder": module(0)}).collect_files(
                            default_source=source, local_strategy=strategy
                        )
                    cells.append(cell)
                    meta.append((name, kind, strategy, with_folder, already, expected))
    sources.reset_logs(kinds)  # count only what the job itself fetches
    return cells, meta


def _assert_cells(results, meta, sources, http_server, hub):
    per_rank = assert_all_ok(results)
    for index, (name, kind, strategy, with_folder, already, expected) in enumerate(meta):
        seen = [outcomes[index] for outcomes in per_rank]
        for rank, outcome in enumerate(seen):
            assert outcome["error"] is None, f"{name}: rank {rank} raised {outcome['text']}"
            assert outcome["digest"] == expected, f"{name}: rank {rank} loaded other weights"
            assert outcome["paths"] == seen[0]["paths"], f"{name}: rank {rank} got other paths"
        path = seen[0]["paths"]["encoder"]
        if with_folder and strategy is not LocalStrategy.NO_LINK:
            assert path.endswith(f"/collect/{name}/encoder.ckpt"), (name, path)
        assert sources.gets(kind, name) == (0 if already else int(kind != "local")), f"{name}: downloads"
        # One fetch asks the Hub twice: our metadata request (retried by FetchConfig.retries), then
        # hf_hub_download's own. A second rank asking would make it four.
        assert sources.heads(kind, name) <= 2, f"{name}: more than one rank asked the Hub"


@pytest.mark.parametrize("kinds", [["local", "url", "hub"], ["s3"]], ids=["local-url-hub", "s3"])
def test_matrix_two_ranks(sources, tmp_path, http_server, hub, kinds):
    cells, meta = _matrix(sources, tmp_path, kinds, list(LocalStrategy))
    results = run_ranks(rank_jobs.collect_cells, 2, args=(cells,), timeout=240)
    _assert_cells(results, meta, sources, http_server, hub)


@pytest.mark.parametrize("kinds", [["local", "url", "hub"], ["s3"]], ids=["local-url-hub", "s3"])
def test_matrix_four_ranks(sources, tmp_path, http_server, hub, kinds):
    cells, meta = _matrix(
        sources,
        tmp_path,
        kinds,
        [LocalStrategy.SYMLINK, LocalStrategy.COPY_SKIP_CACHE, LocalStrategy.NO_LINK],
        present=(False,),
    )
    results = run_ranks(rank_jobs.collect_cells, 4, args=(cells,), timeout=240)
    _assert_cells(results, meta, sources, http_server, hub)


@pytest.mark.parametrize("kind", ["gcs", "azure"])
def test_gcs_and_azure_on_two_ranks(sources, tmp_path, http_server, hub, kind):
    cells, meta = _matrix(
        sources, tmp_path, [kind], [LocalStrategy.SYMLINK, LocalStrategy.COPY], collect_in_set=(True,), present=(False,)
    )
    results = run_ranks(rank_jobs.collect_cells, 2, args=(cells,), timeout=240)
    _assert_cells(results, meta, sources, http_server, hub)


@pytest.mark.parametrize("late_rank", [0, 1])
def test_a_rank_arriving_late(sources, tmp_path, http_server, hub, late_rank):
    cells, meta = _matrix(
        sources, tmp_path, ["local", "url", "hub"], [LocalStrategy.COPY], collect_in_set=(True,), present=(False,)
    )
    for cell in cells:
        cell.update(late_rank=late_rank, delay=3.0)
    results = run_ranks(rank_jobs.collect_cells, 2, args=(cells,), timeout=240)
    _assert_cells(results, meta, sources, http_server, hub)


def _assert_same_error_everywhere(outcomes, *, error, failing_rank, within_s=2.0):
    texts = {o["text"] for o in outcomes}
    assert len(texts) == 1, f"ranks raised different errors: {texts}"
    for rank, outcome in enumerate(outcomes):
        assert outcome["error"] == error, f"rank {rank}: {outcome}"
        assert outcome["key"] == "encoder"
        assert outcome["rank_in_error"] == failing_rank
    spread = max(o["raised_at"] for o in outcomes) - min(o["raised_at"] for o in outcomes)
    assert spread < within_s, f"the error reached the last rank {spread:.2f} s after the first"
    return texts.pop()


def test_404_on_the_fetching_rank_is_raised_on_every_rank(tmp_path, http_server):
    cell = {"collect_in": str(tmp_path / "c"), "source": f"{http_server.url}/missing", "strategy": "SYMLINK"}
    outcomes = [r[0] for r in assert_all_ok(run_ranks(rank_jobs.collect_cells, 4, args=([cell],)))]
    text = _assert_same_error_everywhere(outcomes, error="FetchError", failing_rank=0)
    assert all(o["value_error"] for o in outcomes)
    assert "HTTP 404" in text and f"{http_server.url}/missing" in text and "rank 0" in text
    assert http_server.count("GET") == 1
    assert not (tmp_path / "c" / "encoder.ckpt").exists()


@pytest.mark.parametrize("failing_rank", [0, 2])
def test_a_hook_failing_on_one_rank_is_raised_on_every_rank(tmp_path, failing_rank):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "encoder.ckpt").write_bytes(ckpt_bytes(module(1)))
    cell = {"collect_in": str(tmp_path / "c"), "source": str(tmp_path / "src"), "hook_fails_on": failing_rank}
    outcomes = [r[0] for r in assert_all_ok(run_ranks(rank_jobs.collect_cells, 4, args=([cell],)))]
    text = _assert_same_error_everywhere(outcomes, error="TransferError", failing_rank=failing_rank)
    assert f"layer missing on rank {failing_rank}" in text


def test_a_slow_download_outlives_the_process_group_timeout(tmp_path, http_server):
    # The default process group here times out after 3 s; the download takes about 6 s.
    data = ckpt_bytes(module(3))
    http_server.add("slow/encoder.ckpt", data)
    http_server.fail("slow/encoder.ckpt", Fault("slow", times=-1, delay=6.0 / (len(data) // 256 + 1), chunk=256))
    cell = {"collect_in": str(tmp_path / "c"), "source": f"{http_server.url}/slow", "strategy": "COPY"}
    results = run_ranks(rank_jobs.collect_cells, 2, args=([cell],), pg_timeout_s=3.0, timeout=120)
    outcomes = [r[0] for r in assert_all_ok(results)]
    assert [o["error"] for o in outcomes] == [None, None], outcomes
    assert outcomes[0]["finished"] - outcomes[0]["started"] > 3.0
    assert outcomes[0]["digest"] == outcomes[1]["digest"] == digest(module(3))
    assert http_server.count("GET") == 1


def test_a_crashed_fetcher_does_not_leave_the_others_hanging():
    results = run_ranks(rank_jobs.crash_while_fetching, 3, timeout=60, check=False)
    assert not results[0].ok  # rank 0 died without reporting
    for result in results[1:]:
        assert result.ok, result.traceback
        assert result.value["error"] == "PretrainerError"
        assert (
            "Lost contact with the other ranks while waiting for the fetch: a peer closed its connection"
            in (result.value["text"])
        )
        assert "gloo" not in result.value["text"] and ".cc:" not in result.value["text"]  # no raw transport text
        assert result.value["waited"] < 15


def test_topology_groups_ranks_by_node():
    views = assert_all_ok(run_ranks(rank_jobs.world_view, 4, nodes=2))
    assert [v["node"] for v in views] == [0, 0, 1, 1]
    assert all(v["nodes"] == 2 and v["node_of"] == (0, 0, 1, 1) for v in views)


def test_launcher_without_process_group_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "encoder.ckpt").write_bytes(ckpt_bytes(module(1)))
    pt = Pretrainer(tmp_path / "c", {"encoder": module(2)})
    with pytest.raises(ConfigurationError, match="WORLD_SIZE=4 but torch.distributed is not initialised"):
        pt.collect_files(default_source=tmp_path / "src", internal_ddp_handling=True)
    assert not (tmp_path / "c" / "encoder.ckpt").exists()


# ------------------------------------------------------------------------------------------
# Simulated nodes
# ------------------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("kind", ["url", "hub", "s3"])
def test_nodes_that_do_not_share_the_folder_fetch_once_per_job(sources, tmp_path, http_server, hub, kind):
    # Two nodes, each with its own collection folder: rank 0 fetches once and streams the file to
    # rank 2, the first rank of the other node (the default, collect_per_node="auto").
    source, expected = sources.publish(kind, f"pernode-{kind}")
    node_root = tmp_path / "node_local"
    cell = {"collect_in": str(node_root / "collect"), "source": source, "strategy": "SYMLINK"}
    private = [str(node_root)]
    if kind == "hub":
        private.append(os.environ["HF_HUB_CACHE"])
    if kind == "s3":
        private.append(os.environ["PL_PRETRAIN_CACHE"])  # each node's own object cache, as on a real cluster
    sources.reset_logs([kind])
    results = run_ranks(rank_jobs.collect_cells, 4, args=([cell],), nodes=2, private=private, timeout=180)
    outcomes = [r[0] for r in assert_all_ok(results)]
    for rank, outcome in enumerate(outcomes):
        assert outcome["error"] is None, f"rank {rank}: {outcome['text']}"
        assert outcome["digest"] == expected, f"rank {rank} loaded other weights"
        assert outcome["paths"] == outcomes[0]["paths"]
    assert sources.gets(kind, f"pernode-{kind}") == 1  # one per job, whatever the number of nodes
    assert not (node_root / "collect" / "encoder.ckpt").exists()  # nothing leaked onto the real disk


@needs_root
def test_three_nodes_without_a_shared_folder_fetch_once(sources, tmp_path, http_server, hub):
    # Three nodes in a chain 0 -> 1 -> 2; a checkpoint of several chunks (64 KiB each here).
    source, expected = sources.publish("url", "three-nodes", dim=256)
    node_root = tmp_path / "node_local"
    cell = {"collect_in": str(node_root / "collect"), "source": source, "strategy": "COPY", "dim": 256}
    results = run_ranks(
        rank_jobs.collect_cells,
        3,
        args=([cell],),
        nodes=3,
        private=[str(node_root)],
        env={"PL_PRETRAIN_STREAM_CHUNK": str(64 * 1024)},
        timeout=180,
    )
    outcomes = [r[0] for r in assert_all_ok(results)]
    assert [o["error"] for o in outcomes] == [None, None, None], [o.get("text") for o in outcomes]
    assert {o["digest"] for o in outcomes} == {expected}
    assert sources.gets("url", "three-nodes") == 1


@needs_root
def test_per_node_true_on_unshared_folders_fetches_once_per_node(sources, tmp_path, http_server, hub):
    # For sites where every node is near the source: each node's first rank fetches for its node.
    source, expected = sources.publish("url", "pernode-true")
    node_root = tmp_path / "node_local"
    cell = {"collect_in": str(node_root / "collect"), "source": source, "per_node": True}
    results = run_ranks(rank_jobs.collect_cells, 4, args=([cell],), nodes=2, private=[str(node_root)], timeout=180)
    outcomes = [r[0] for r in assert_all_ok(results)]
    assert all(o["error"] is None and o["digest"] == expected for o in outcomes), outcomes
    assert sources.gets("url", "pernode-true") == 2


def _stream_fault(sources, tmp_path, name, fault_rank, fault):
    """Runs 2 nodes x 2 ranks on private folders with the stream fault `fault` on `fault_rank`."""
    source, _ = sources.publish("url", name, dim=256)
    node_root = tmp_path / "node_local"
    cell = {"collect_in": str(node_root / "collect"), "source": source, "strategy": "COPY", "dim": 256}
    results = run_ranks(
        rank_jobs.collect_cells,
        4,
        args=([cell],),
        nodes=2,
        private=[str(node_root)],
        env={"PL_PRETRAIN_STREAM_CHUNK": str(64 * 1024), "PL_PRETRAIN_STREAM_TIMEOUT": "5"},
        rank_env=lambda rank: {"PL_PRETRAIN_TEST_STREAM_FAULT": fault} if rank == fault_rank else {},
        timeout=120,
        check=False,
    )
    assert sources.gets("url", name) == 1
    return {r.rank: r.value[0] for r in results if r.ok}


@needs_root
@pytest.mark.parametrize("dying_rank", [2, 0], ids=["receiver", "sender"])
def test_a_rank_killed_mid_stream_ends_every_rank_naming_it(sources, tmp_path, http_server, hub, dying_rank):
    outcomes = _stream_fault(sources, tmp_path, f"killed-{dying_rank}", dying_rank, "exit:2")
    assert sorted(outcomes) == sorted({0, 1, 2, 3} - {dying_rank})  # the dead rank never reported
    texts = {o["text"] for o in outcomes.values()}
    assert len(texts) == 1, texts
    for rank, outcome in outcomes.items():
        assert outcome["error"] == "PretrainerError", (rank, outcome)
        assert outcome["rank_in_error"] == dying_rank
        assert f"Rank {dying_rank} died or stopped while the collected files were streamed" in outcome["text"]
    # Rank 3 shares node 1's folder: nothing was placed there, and no live writer left a temporary file.
    assert outcomes[3]["placed"] is False
    if dying_rank == 0:
        assert outcomes[3]["temporary"] == []
    spread = max(o["raised_at"] for o in outcomes.values()) - min(o["raised_at"] for o in outcomes.values())
    assert spread < 15, f"the error reached the last rank {spread:.1f} s after the first"


@needs_root
def test_a_byte_flipped_in_transit_is_a_checksum_error_everywhere(sources, tmp_path, http_server, hub):
    outcomes = _stream_fault(sources, tmp_path, "flipped", 0, "flip:1")
    assert sorted(outcomes) == [0, 1, 2, 3]
    assert len({o["text"] for o in outcomes.values()}) == 1
    for outcome in outcomes.values():
        assert outcome["error"] == "ChecksumError"
        assert outcome["value_error"] and outcome["key"] == "encoder" and outcome["rank_in_error"] == 2
        assert "corrupted on the way; nothing was placed" in outcome["text"]
    assert outcomes[3]["placed"] is False and outcomes[3]["temporary"] == []
    assert outcomes[1]["placed"] is True  # the fetcher's own copy is intact


@needs_root
def test_per_node_false_on_unshared_folders_fails_everywhere_with_a_hint(sources, tmp_path, http_server, hub):
    source, _ = sources.publish("url", "unshared")
    node_root = tmp_path / "node_local"
    cell = {"collect_in": str(node_root / "collect"), "source": source, "per_node": False}
    outcomes = [
        r[0]
        for r in assert_all_ok(run_ranks(rank_jobs.collect_cells, 4, args=([cell],), nodes=2, private=[str(node_root)]))
    ]
    assert {o["error"] for o in outcomes} == {"PretrainerError"}
    assert len({o["text"] for o in outcomes}) == 1
    assert "Rank 2 cannot read the files that rank 0 collected" in outcomes[0]["text"]
    assert "collect_per_node='auto' or True" in outcomes[0]["text"]


def test_nodes_sharing_the_folder_fetch_once_per_job(sources, tmp_path, http_server, hub):
    source, expected = sources.publish("url", "shared")
    cell = {"collect_in": str(tmp_path / "collect"), "source": source}
    outcomes = [r[0] for r in assert_all_ok(run_ranks(rank_jobs.collect_cells, 4, args=([cell],), nodes=2))]
    assert all(o["error"] is None and o["digest"] == expected for o in outcomes)
    assert sources.gets("url", "shared") == 1


def test_per_node_true_on_a_shared_folder_still_downloads_once(sources, tmp_path, http_server, hub):
    # Both nodes' first ranks collect into the same folder: the lock makes the second reuse the first's file.
    source, expected = sources.publish("url", "pernode-shared")
    cell = {"collect_in": str(tmp_path / "collect"), "source": source, "per_node": True}
    outcomes = [r[0] for r in assert_all_ok(run_ranks(rank_jobs.collect_cells, 4, args=([cell],), nodes=2))]
    assert all(o["error"] is None and o["digest"] == expected for o in outcomes)
    assert sources.gets("url", "pernode-shared") == 1


# ------------------------------------------------------------------------------------------
# No race
# ------------------------------------------------------------------------------------------


def test_no_race_eight_ranks_twenty_repetitions(sources, tmp_path, http_server, hub):
    # SpeechBrain fetches local sources on every rank: FileExistsError and torn reads here.
    source, expected = sources.publish("local", "race")
    cells = [
        {"collect_in": str(tmp_path / "race-symlink"), "source": source, "strategy": "SYMLINK"},
        {
            "collect_in": str(tmp_path / "race-copy"),
            "source": source,
            "strategy": "COPY",
            "fetch_config": {"overwrite": True},
        },
    ]
    results = run_ranks(rank_jobs.collect_repeatedly, 8, args=(cells, 20), timeout=400)
    outcomes = assert_all_ok(results)
    failures = [(rank, o["text"]) for rank, per in enumerate(outcomes) for o in per if o["error"]]
    assert failures == []
    assert {o["digest"] for per in outcomes for o in per} == {expected}
    assert all(len(per) == 40 for per in outcomes)
