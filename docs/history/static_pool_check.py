"""Static mode's form of pool heads on the GPU (lab): the custom op with the modes naming each pool
head by its slot of the layer's union of pool heads (``pool_groups``, ``pool_heads``) against the
op on the plain modes, every output element compared, and both timed (the union's extra patch means
included), at FLUX.1-dev's 1024² and 2048² attention shapes.

    PYTHONPATH=src python docs/history/static_pool_check.py OUT.json
"""
import json
import random
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, "benchmarks")
import e2e  # noqa: E402
from ditfastattn import ops  # noqa: E402
from ditfastattn._geometry import POOL_FLAG, POOL_SLOT_SHIFT  # noqa: E402
from ditfastattn.model import TokenLayout  # noqa: E402


def main():
    rng = random.Random(0)
    rows = []
    for side in (64, 128):
        text, heads, dim = 512, 24, 128
        grid = (1, side, side)
        image = side * side
        layout = TokenLayout(text + image, text, image, grid)
        q, k, v = (torch.randn(1, text + image, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        choices = [ops.pool_mode(2), ops.pool_mode(4), 0, 1, ops.MODE_FULL, ops.MODE_SKIP]
        plain = [rng.choice(choices) for _ in range(heads)]
        # The union over a layer's steps: this row's pool heads and a few that pool at other steps.
        union = {2: {h for h, m in enumerate(plain) if m == ops.pool_mode(2)} | {0, 5},
                 4: {h for h, m in enumerate(plain) if m == ops.pool_mode(4)} | {7}}
        groups, slot_heads, slotted, slot = [], [], list(plain), 0
        for factor in (2, 4):
            members = sorted(union[factor])
            groups += [factor, len(members), *members]
            for head in members:
                if plain[head] == ops.pool_mode(factor):
                    slotted[head] = POOL_FLAG | slot << POOL_SLOT_SHIFT | factor
                slot_heads.append(head)
                slot += 1
        want = torch.zeros_like(q)
        got = torch.zeros_like(q)
        modes_plain, modes_slotted = ops.mode_tensor(plain, "cuda"), ops.mode_tensor(slotted, "cuda")
        pool_heads = torch.tensor(slot_heads, dtype=torch.int32, device="cuda")

        def dynamic():
            ops.headwise_attention(q, k, v, modes_plain, segments=layout, out=want)

        def static():
            torch.ops.ditfastattn.headwise_attention_(q, k, v, modes_slotted, 0, 0, got, dim**-0.5, "auto",
                                                      list(grid), None, [0, text], None, None, groups, pool_heads,
                                                      False)

        dynamic(), static()
        torch.cuda.synchronize()
        row = {"side": side, "plain_modes": plain, "union_extra_heads": slot - sum(m >= POOL_FLAG for m in plain),
               "equal": bool(torch.equal(got, want)), "max_abs_diff": float((got.float() - want.float()).abs().max()),
               "dynamic_ms": do_bench(dynamic), "static_ms": do_bench(static)}
        rows.append(row)
        print(row, flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump({"environment": e2e.environment(torch.device("cuda")), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
