"""What `eval.fast_cpu_matmul` buys on this CPU: target forwards of 1 and k+1 tokens, F.linear vs W @ x^T.

    .venv/bin/python bench/cpu_matmul.py [--rounds 7] [--tokens 1,2,4,8] [--threads N]

On the embedded SmolLM2-135M-Instruct (fp32, a 200-token prompt in the KV cache, each forward
cropped back so every measurement sees the same cache), times one forward of N new tokens with the
plain `nn.Linear`s and with core.evaluate.cpu_matmul.fast_cpu_linears, alternating the two in
every round; prints the medians, each N's cost relative to the one-token forward of the same
setting (what speculative decoding's verify pays for k drafts), and fast/plain. The logits of both
settings are compared too (max abs difference).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10, help="forwards per timing")
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from core.assets import demo_target
    from core.evaluate.cpu_matmul import fast_cpu_linears
    from core.evaluate.spec_decode import _new_cache, crop_cache

    if a.threads:
        torch.set_num_threads(a.threads)
    target = demo_target()
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    torch.manual_seed(0)
    prompt = torch.randint(100, 10000, (1, 200))
    sizes = [int(x) for x in a.tokens.split(",")]
    times: dict[tuple[str, int], list[float]] = {}
    diffs: dict[int, float] = {}
    with torch.no_grad():
        cache = _new_cache(model)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)

        def forward(n: int) -> torch.Tensor:
            out = model(input_ids=prompt[:, :n], past_key_values=cache, use_cache=True)
            crop_cache(cache, prompt.shape[1])
            return out.logits

        for n in sizes:  # warm-up of both, and the logits compared
            plain = forward(n)
            with fast_cpu_linears(model):
                fast = forward(n)
            diffs[n] = float((plain - fast).abs().max())
        for r in range(a.rounds):
            for fast_on in ((False, True) if r % 2 == 0 else (True, False)):
                with fast_cpu_linears(model, enabled=fast_on):
                    for n in sizes:
                        t0 = time.perf_counter()
                        for _ in range(a.reps):
                            forward(n)
                        times.setdefault(("fast" if fast_on else "plain", n), []).append(
                            (time.perf_counter() - t0) / a.reps * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, 200-token cache; medians of {a.rounds} "
          f"alternating rounds x {a.reps} forwards (ms)")
    print(f"{'tokens':>6} {'plain ms':>9} {'vs 1 tok':>8} {'fast ms':>8} {'vs 1 tok':>8} {'fast/plain':>10} "
          f"{'max |Δlogit|':>12}")
    for n in sizes:
        p, f = med[("plain", n)], med[("fast", n)]
        print(f"{n:>6} {p:>9.1f} {p / med[('plain', sizes[0])]:>8.2f} {f:>8.1f} "
              f"{f / med[('fast', sizes[0])]:>8.2f} {f / p:>10.2f} {diffs[n]:>12.2e}")


if __name__ == "__main__":
    main()
