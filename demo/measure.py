"""Figures for the demo: merged-model latency vs separate adapters, start-up time, merge build time.

    OMP_NUM_THREADS=1 python -m demo.measure [--db results.duckdb] [--repeats 30] [--device cpu]

Latency is the median of `--repeats` timed forward passes at batch 1 (after 3 warm-up passes),
the variants interleaved (benchmarks/timing.py; `python -m training.bench` measures more):
one pass through the merged model of every task, against one pass per task through each task's own adapter
(its ΔW folded into a copy of the backbone), summed, and against each stored merge plan (one pass per planned
backbone). Start-up is the time from nothing loaded to the app answering HTTP (adapters read, backbone built,
default merge built, Gradio launched).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request

_START = time.perf_counter()

import torch  # noqa: E402

from benchmarks.timing import median_p95, time_interleaved  # noqa: E402
from mlvision.paths import DEFAULT_DB_PATH  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default=str(DEFAULT_DB_PATH))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import gradio  # noqa: F401  (counted in start-up, as `python demo/app.py` imports it)

    from demo.app import build_demo
    from demo.service import DemoService
    from mlvision.tasks import load_task

    service = DemoService(args.db, device=args.device)
    tasks = service.tasks
    default_method, _ = service.default_method(tasks)
    entry, _ = service.merged_model(tasks, default_method)
    demo = build_demo(service)
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    urllib.request.urlopen(demo.local_url, timeout=30).read()
    startup = time.perf_counter() - _START

    print(
        f"device: {service.device.type}; torch threads: {torch.get_num_threads()}; db: {args.db}; "
        f"{len(tasks)} tasks ({', '.join(tasks)}); seed {service.seed}; image size {service.preprocess.image_size}px"
    )
    print(
        f"app start-up (imports + adapters + default merge '{default_method}' + launch, until HTTP answers): "
        f"{startup:.1f} s"
    )

    image = load_task(tasks[0])["test"][0]["image"]
    batch = service.tensor(image.convert("RGB"))
    singles = {t: service.single_model(t) for t in tasks}
    plans = {}  # the stored merge plans (run_all's plan stage): each backbone of the plan, one pass each
    for target in service.plan_targets():
        method, plan = service.stored_plan(target)
        models = [
            singles[group[0]] if len(group) == 1 else service.merged_model(group, method)[0].model
            for group in plan["groups"]
        ]
        plans[f"plan {target:.0%} ({method}, {len(models)} backbones)"] = models
    with torch.inference_mode():  # interleaved, so drift of the machine hits every variant alike
        variants = {"merged": lambda: entry.model(batch), "separate": lambda: [singles[t](batch) for t in tasks]}
        variants.update({name: (lambda models=models: [m(batch) for m in models]) for name, models in plans.items()})
        times = time_interleaved(variants, args.repeats, warmup=3, device=service.device)
        merged_ms, separate_ms = (median_p95(times[name])[0] for name in ("merged", "separate"))
        per_adapter = {
            t: median_p95(values)[0]
            for t, values in time_interleaved(
                {t: (lambda t=t: singles[t](batch)) for t in tasks}, max(5, args.repeats // 3), 3, service.device
            ).items()
        }
    print(
        f"latency, batch 1, median of {args.repeats}: merged model, {len(tasks)} tasks in one pass: "
        f"{merged_ms:.1f} ms; {len(tasks)} separate adapters, one pass each: {separate_ms:.1f} ms "
        f"({separate_ms / merged_ms:.1f}x)"
    )
    print(
        "  per adapter (its ΔW folded into a backbone copy): "
        + ", ".join(f"{t} {v:.1f} ms" for t, v in per_adapter.items())
    )
    for name in plans:
        plan_ms = median_p95(times[name])[0]
        print(f"  merge {name}: {plan_ms:.1f} ms ({plan_ms / merged_ms:.1f}x one merged backbone)")

    for method in ("linear", "task_arithmetic", "ties", "dare_ties", "tsv_m"):
        if method not in service.methods:
            continue
        service._merged.clear()
        start = time.perf_counter()
        service.merged_model(tasks, method)
        print(
            f"merge build ({method}, k={len(tasks)}, as the UI does on a cache miss): "
            f"{time.perf_counter() - start:.2f} s"
        )
    demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
