"""Local embedding throughput: the bundled WordLlama model on short synthetic transcripts.

    .venv/bin/python benchmarks/embeddings.py [--n 20000] [--batch-size 256] [--repeats 3]

The bar is >= 2,000 transcripts/s on two cores. The model load (16 MB,
once per process) is timed separately; the figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

from resources.embeddings import EmbeddingResource

BAR = 2_000.0
_USER = [
    "hi, my order has not arrived yet",
    "I need a refund for the damaged item",
    "how do I reset my password?",
    "the invoice shows the wrong amount",
    "can I change my delivery address",
    "your app keeps crashing when I pay",
    "is there a discount for annual plans",
]
_AGENT = [
    "sorry to hear that, let me check the tracking number for you",
    "I have issued the refund, it will show in 3-5 business days",
    "you can reset it from the login page with the 'forgot password' link",
    "thanks, I have corrected the invoice and sent a new copy",
    "done, the address is updated for this and future orders",
    "could you tell me which version of the app you are using?",
    "yes, annual plans are 20% off, shall I switch you over?",
]


def synthetic_transcripts(n: int, seed: int = 7) -> list[str]:
    """Short multi-turn transcripts with speaker labels, about 40-120 tokens each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = [f"[session {i}]"]
        for _ in range(rng.randint(2, 4)):
            turns.append(f"user: {rng.choice(_USER)}")
            turns.append(f"assistant: {rng.choice(_AGENT)}")
        out.append("\n".join(turns))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="Transcripts per run.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    texts = synthetic_transcripts(args.n)
    resource = EmbeddingResource(batch_size=args.batch_size)
    started = time.perf_counter()
    dim = resource.dimension()  # loads the bundled model
    load_s = time.perf_counter() - started

    timings = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        vectors = resource.embed(texts)
        timings.append(time.perf_counter() - started)
    assert vectors.shape == (args.n, dim)

    best = min(timings)
    rate = args.n / best
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mean_chars = sum(map(len, texts)) / len(texts)
    print(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"cores available: {cores}; python {platform.python_version()}")
    print(
        f"local embeddings ({resource.model_name}, {dim}-d): {args.n:,} transcripts "
        f"(mean {mean_chars:.0f} chars), batch {args.batch_size}, model load {load_s:.2f} s"
    )
    print(
        f"  best of {args.repeats}: {best:.2f} s -> {rate:,.0f} transcripts/s "
        f"(runs: {', '.join(f'{t:.2f}' for t in timings)} s)"
    )
    verdict = "PASS" if rate >= BAR else "FAIL"
    print(f"  bar: >= {BAR:,.0f} transcripts/s on 2 cores -> {verdict}")


if __name__ == "__main__":
    main()
