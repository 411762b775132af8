"""Check the vLLM backend on a real GPU against the hf backend on the same weights, in letter and cloze mode.

    python scripts/vllm_gpu_check.py [--model DIR_OR_HUB_ID] [--questions 64] [--dtype float32]

Needs a CUDA GPU and `pip install -e '.[vllm]'`. Without --model it saves a small random Llama (built with
kdflow.modeling, tokenizer trained on the questions) to a temporary directory, so no hub access is needed;
a real small model (e.g. Qwen/Qwen3-0.6B) also checks a real tokenizer and chat template. What it checks,
each printed as a line and all together as the exit code (0: all passed):
1. the installed vLLM passes kdflow's version floor and the limits of kdflow.label.engine_limits pass;
2. per mode, VLLMBackend's soft labels match HFBackend's (max |dprob| within --tolerance, same argmax);
3. an engine built in a thread other than the main one scores (Prefect runs tasks in threads);
4. two shards labeled through one engine host (kdflow.label.engine_host, the path of Dask and Ray
   workers) give the in-process labels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdflow.config import ArchitectureConfig, RunConfig, ScoringConfig, TeacherConfig
from kdflow.data.demo import generate_demo_questions
from kdflow.label.backends.hf import HFBackend
from kdflow.label.backends.vllm import VLLMBackend
from kdflow.label.engine_host import close_engine_hosts, score_in_engine_host
from kdflow.label.engine_limits import check_vllm_run
from kdflow.label.shard_files import KEY_METADATA
from kdflow.modeling import build_model, save_pretrained, train_tokenizer


def tiny_model(questions: list[dict], root: Path) -> str:
    tokenizer = train_tokenizer([" ".join([q["question"], *q["options"]]) for q in questions] * 4, 2048)
    torch.manual_seed(0)
    model = build_model(ArchitectureConfig(hidden_size=256, num_layers=4, num_heads=4, vocab_size=2048), tokenizer)
    return str(save_pretrained(model, tokenizer, root / "tiny-llama"))


def compare(name: str, vllm_labels: list, hf_labels: list, tolerance: float) -> bool:
    gap = max(abs(a - b) for v, h in zip(vllm_labels, hf_labels) for a, b in zip(v.label.probs, h.label.probs))
    same = sum(v.label.predicted == h.label.predicted for v, h in zip(vllm_labels, hf_labels))
    ok = gap <= tolerance and same == len(hf_labels)
    print(f"{'PASS' if ok else 'FAIL'} {name}: max |dprob| {gap:.2e} (tolerance {tolerance}), "
          f"argmax agrees on {same}/{len(hf_labels)}", flush=True)
    return ok


def in_a_thread(teacher: TeacherConfig, scoring: ScoringConfig, questions: list[dict]) -> list:
    result: dict[str, object] = {}

    def run() -> None:
        try:
            backend = VLLMBackend(teacher, scoring)
            result["scored"] = backend.score(questions)
            backend.close()
        except Exception as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=run, name="not-main")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["scored"]  # type: ignore[return-value]


def through_engine_host(cfg: RunConfig, questions: list[dict], root: Path) -> list[list[float]]:
    probs = []
    root.mkdir(parents=True, exist_ok=True)
    for i, half in enumerate((questions[: len(questions) // 2], questions[len(questions) // 2:])):
        rows = [dict(q, question_hash=q["question_id"]) for q in half]  # as the label stage's shards carry it
        table = pa.Table.from_pylist(rows).replace_schema_metadata({KEY_METADATA: b"t-gpu-check"})
        pq.write_table(table, root / f"in-{i}.parquet")
        score_in_engine_host(cfg, None, str(root / f"in-{i}.parquet"), str(root / f"out-{i}.parquet"), "0")
        probs += pq.read_table(root / f"out-{i}.parquet")["probs"].to_pylist()
    close_engine_hosts()
    return probs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory or hub id (default: a small random Llama)")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tolerance", type=float, default=None, help="default: 2e-3 in float32, 3e-2 otherwise")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL no CUDA GPU here", flush=True)
        return 1
    tolerance = args.tolerance or (2e-3 if args.dtype == "float32" else 3e-2)
    questions = generate_demo_questions(args.questions, seed=1).to_pylist()
    root = Path(tempfile.mkdtemp(prefix="kdflow-vllm-check-"))
    model = args.model or tiny_model(questions, root)
    passed = True
    for mode in ("letter", "cloze"):
        scoring = ScoringConfig(mode=mode, max_length=256)
        teacher = TeacherConfig(backend="vllm", model=model, dtype=args.dtype,
                                vllm={"max_model_len": 512, "gpu_memory_utilization": 0.4})
        cfg = RunConfig(teacher=teacher, scoring=scoring)
        print(f"PASS {mode}: limits and version check, engines on GPUs {check_vllm_run(cfg, questions)}", flush=True)
        vllm_labels = in_a_thread(teacher, scoring, questions)
        print(f"PASS {mode}: an engine built outside the main thread scored {len(vllm_labels)} questions", flush=True)
        hf_teacher = TeacherConfig(model=model, dtype=args.dtype, device="cuda", batch_size=16)
        hf = HFBackend.from_config(hf_teacher, scoring)
        hf_labels = hf.score(questions)
        hf.close()
        passed &= compare(f"{mode}: vLLM vs hf", vllm_labels, hf_labels, tolerance)
        hosted = through_engine_host(cfg, questions, root / mode)
        gap = max(abs(a - b) for row, v in zip(hosted, vllm_labels) for a, b in zip(row, v.label.probs))
        ok = gap <= tolerance
        passed &= ok
        print(f"{'PASS' if ok else 'FAIL'} {mode}: two shards through one engine host, max |dprob| {gap:.2e} "
              "against in-process vLLM", flush=True)
    print("all passed" if passed else "some checks FAILED", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
