"""Speed of the fused kernels on calls with a text key mask (Qwen-Image, Z-Image, HunyuanImage 2.1,
HunyuanVideo pass one), against what stock diffusers runs for them and against cuDNN dense.

Per shape and plan (full, arrow 1/8, ~68% sparse mixed; from ``kernel.py``): the Gluon and the Triton
kernel with the key mask, the Gluon kernel on the same call without it (what the mask costs), and in
the same rounds torch SDPA with the mask as a ``(B, 1, 1, S)`` bool tensor (the stock call; SDPA picks
its backend) and cuDNN SDPA dense without a mask (the yardstick of ``kernel.py``: "of ideal" is the
speed-up over it times the plan's density). The text masks pad each batch element's text to a
different length. ``triton.testing.do_bench`` medians over three interleaved rounds, and CUDA-graph
replays. Before timing, the Gluon kernel's output is compared with the Triton kernel's on the same
masked call (relative Frobenius difference over the computed heads).

    PYTHONPATH=src python3 benchmarks/kernel_padded.py OUT.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditfastattn import ops
from ditfastattn.ops import MODE_SKIP, headwise_attention
from kernel import cudnn_dense, plan_density, plans

# Text lengths as the pipelines pad them; valid tokens per batch element.
SHAPES = {
    "Qwen-Image-1K 2x24x(512+4096)x128, text valid 300/120": {
        "batch": 2, "heads": 24, "text": 512, "image": 4096, "dim": 128, "text_first": True, "valid": (300, 120)},
    "HunyuanVideo 33x30x40 1x24x(39600+256)x128, text valid 80": {
        "batch": 1, "heads": 24, "text": 256, "image": 39600, "dim": 128, "text_first": False, "valid": (80,)},
}
PLANS = ("full", "arrow 1/8", "mixed ~68% sparse")
ROUNDS = 3


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_shape(shape) -> dict:
    batch, heads, text, image, dim = (shape[k] for k in ("batch", "heads", "text", "image", "dim"))
    seq = text + image
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    text_start = 0 if shape["text_first"] else image
    mask = torch.zeros(batch, seq, dtype=torch.bool, device="cuda")
    for b, valid in enumerate(shape["valid"]):
        mask[b, text_start + valid: text_start + text] = True
    keep = (~mask)[:, None, None, :]  # SDPA's bool mask: True where attended
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.empty_like(q)
    cases = {"cuDNN SDPA (dense, no mask)": (lambda: cudnn_dense(q, k, v), 1.0),
             "stock: SDPA with the key mask": (lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep), 1.0)}
    agreement = {}
    for plan_name in PLANS:
        modes_list = plans(shape)[plan_name]
        modes = torch.tensor(modes_list, dtype=torch.int32, device="cuda")
        density = plan_density(modes_list, image, text)

        def call(impl, padded, modes=modes):
            return headwise_attention(q, k, v, modes, text_start=text_start, text_len=text, out=out, impl=impl,
                                      key_padding=mask if padded else None)

        kept = [h for h, m in enumerate(modes_list) if m != MODE_SKIP]
        triton_out = call("triton", True).clone()
        gluon_out = call("gluon", True).clone()
        reference = triton_out[:, :, kept].float()
        agreement[plan_name] = float((gluon_out[:, :, kept].float() - reference).norm() / reference.norm())
        cases[f"Gluon, key mask: {plan_name}"] = (lambda c=call: c("gluon", True), density)
        cases[f"Triton, key mask: {plan_name}"] = (lambda c=call: c("triton", True), density)
        cases[f"Gluon, no mask: {plan_name}"] = (lambda c=call: c("gluon", False), density)
    times = {name: [] for name in cases}
    graph = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, (fn, _) in cases.items():
            times[name].append(bench(fn))
            graph[name].append(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    base = statistics.median(times["cuDNN SDPA (dense, no mask)"])
    base_graph = statistics.median(graph["cuDNN SDPA (dense, no mask)"])
    stock = statistics.median(times["stock: SDPA with the key mask"])
    rows = []
    for name, (_, density) in cases.items():
        ms, graph_ms = statistics.median(times[name]), statistics.median(graph[name])
        rows.append({"row": name, "density": density, "ms": ms, "graph_ms": graph_ms, "ms_rounds": times[name],
                     "speedup_vs_cudnn": base / ms, "share_of_ideal": base / ms * density,
                     "graph_share_of_ideal": base_graph / graph_ms * density, "speedup_vs_stock": stock / ms})
    return {"shape": {**shape, "seq": seq, "dtype": "bf16"}, "rows": rows,
            "gluon_vs_triton_relative_difference": agreement}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON results path")
    args = parser.parse_args()
    reason = ops.impl_unsupported("gluon", torch.device("cuda"), torch.bfloat16, [128])
    if reason is not None:
        raise SystemExit(f"the Gluon kernel cannot run here: {reason}")
    props = torch.cuda.get_device_properties(0)
    results = {"meta": {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
                        "cudnn": torch.backends.cudnn.version(), "date": datetime.datetime.now().isoformat()},
               "shapes": {}}
    for name, shape in SHAPES.items():
        result = results["shapes"][name] = run_shape(shape)
        print(f"\n{name}: Gluon vs Triton on the masked call {result['gluon_vs_triton_relative_difference']}")
        print(f"{'row':44s} {'ms':>8s} {'density':>8s} {'x cuDNN':>8s} {'of ideal':>8s} {'graph':>8s} {'x stock':>8s}")
        for r in result["rows"]:
            print(f"{r['row']:44s} {r['ms']:8.3f} {r['density']:8.3f} {r['speedup_vs_cudnn']:8.2f} "
                  f"{r['share_of_ideal']:8.1%} {r['graph_share_of_ideal']:8.1%} {r['speedup_vs_stock']:8.2f}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
