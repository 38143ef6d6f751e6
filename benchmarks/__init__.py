"""Benchmarks: what merging buys at inference, what LoRA costs in training, what each merge costs.

One package for every measurement of speed and memory: the shared clocks (`timing`), the bench
options (`options`), one object per section (`sections/`: what it plans, how it measures, how the
dashboard draws it), the stage that stores figures (`stage`) and the command (`cli`). The
dashboard's Performance page draws the sections from their own chart specs; the demo's latency
figure uses the same clocks. See docs/ARCHITECTURE.md.
"""
