"""TTFT of the seed example through vLLM: kvblend's connector against the
same vLLM without it, in one run (vLLM's defaults; the CPU build works).

vLLM keeps its KV-transfer group per process, so each engine runs in a
process of its own, one after the other (never holding memory or cores at
the same time): this script starts itself with ``--run baseline`` and
``--run blend``, each writing its rows to a JSON file, then prints the
table.  Both engines run the same requests in the same order: a short
warm-up, the first prompt (the blend stores its chunks), the reordered
prompt (the blend reuses them); the ratio is the reordered prompt's TTFT
without the connector over its TTFT with it.

    python benchmarks/bench_vllm_ttft.py [--model smollm2] [--ratio 0.15]
        [--max-tokens 24] [--passages-per-chunk 2] [--json out.json]
    python benchmarks/bench_vllm_ttft.py --run blend|baseline --out rows.json

The prompts and LMCache's blend defaults are examples/_prompts.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import _prompts  # noqa: E402


def parse_args(argv=None):
    p = _prompts.parser(__doc__.splitlines()[0])
    p.add_argument("--run", choices=("baseline", "blend"), default=None,
                   help="run one engine in this process and write its rows to --out")
    p.add_argument("--out", default=None, help="with --run: the rows' JSON file")
    return p.parse_args(argv)


def run_engine(args) -> list[dict]:
    """Run the warm-up and both prompts on one vLLM engine, with kvblend's
    connector (``--run blend``) or without it; return the two rows."""
    from vllm import SamplingParams
    from vllm.config import KVTransferConfig

    blend = args.run == "blend"
    extra = {"kv_transfer_config": _prompts.connector_config(KVTransferConfig)} if blend else {}
    # disable_log_stats=False: outputs carry vLLM's per-request metrics, so
    # the TTFT is its first_token_latency, not the whole generate call
    llm = _prompts.vllm_engine(args.model, disable_log_stats=False, **extra)
    first, reordered = _prompts.build_prompts(llm.get_tokenizer(), args.data,
                                              args.passages_per_chunk)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate({"prompt_token_ids": first[:64]}, SamplingParams(temperature=0.0, max_tokens=1))
    name = "kvblend" if blend else "no connector"
    return [_prompts.run_prompt(llm, first, sp, f"first, {name}", connector=blend),
            _prompts.run_prompt(llm, reordered, sp, f"reordered, {name}", connector=blend)]


def run_child(kind: str, argv: list[str], out: Path) -> list[dict]:
    """Run this script with ``--run kind`` in a new process; its rows."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--run", kind, "--out", str(out)]
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise SystemExit(f"the {kind} run failed (exit status {rc}): {' '.join(cmd)}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _prompts.set_env(args.ratio)  # the runs inherit the settings
    if args.run:
        if not args.out:
            raise SystemExit("--run needs --out")
        Path(args.out).write_text(json.dumps(run_engine(args)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        base = run_child("baseline", argv, Path(tmp) / "baseline.json")
        blend = run_child("blend", argv, Path(tmp) / "blend.json")
    _prompts.report("vllm", args, blend + base, blend[1], base[1], (
        "TTFT ratio (no connector / blended), reordered prompt",
        "TTFT ratio (no connector / kvblend's connector, NOT a blend)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
