"""Speed of the fused kernels on calls with a text mask (Qwen-Image, Z-Image, HunyuanImage 2.1 and
HunyuanVideo pass a key mask; Chroma a boolean or float 0/1 mask between queries and keys), against
what stock diffusers runs for them and against cuDNN dense.

Per shape, mask table and plan (full, arrow 1/8, ~68% sparse mixed; from ``kernel.py``): the Gluon
and the Triton kernel with the mask, the Gluon kernel on the same call without it (what the mask
costs), and in the same rounds torch SDPA with the mask as stock passes it (``(B, 1, 1, S)`` bool for
a key mask, ``(B, 1, S, S)`` bool or float for Chroma's; SDPA picks its backend) and cuDNN SDPA dense
without a mask (the yardstick of ``kernel.py``: "of ideal" is the speed-up over it times the plan's
density). The text masks pad each batch element's text to a different length.
``triton.testing.do_bench`` medians over three interleaved rounds, and CUDA-graph replays. Before
timing, the Gluon kernel's output is compared with the Triton kernel's on the same masked call
(relative Frobenius difference over the computed heads).

    PYTHONPATH=src python3 benchmarks/kernel_padded.py OUT.json [--shapes Chroma ...]
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
    "Chroma-1K 1x24x(512+4096)x128, text valid 300": {
        "batch": 1, "heads": 24, "text": 512, "image": 4096, "dim": 128, "text_first": True, "valid": (300,),
        "tables": ("pairs", "float 0/1")},
}
# Row labels and bias tables (ops.Padding) of the masks.
TABLES = {"keys": ("key mask", ops.KEY_PADDING), "pairs": ("pair mask", ops.PAIR_PADDING),
          "float 0/1": ("float mask", ((1.0, 0.0), (0.0, 0.0)))}
PLANS = ("full", "arrow 1/8", "mixed ~68% sparse")
ROUNDS = 3


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def stock_mask(mask: torch.Tensor, table: str) -> torch.Tensor:
    """The mask stock diffusers passes to SDPA for padding ``mask`` (True at padding) under ``table``."""
    real = ~mask
    if table == "keys":
        return real[:, None, None, :]
    pairs = real[:, None, :, None] & real[:, None, None, :]
    return pairs if table == "pairs" else pairs.to(torch.bfloat16)


def run_shape(shape) -> dict:
    batch, heads, text, image, dim = (shape[k] for k in ("batch", "heads", "text", "image", "dim"))
    seq = text + image
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    text_start = 0 if shape["text_first"] else image
    mask = torch.zeros(batch, seq, dtype=torch.bool, device="cuda")
    for b, valid in enumerate(shape["valid"]):
        mask[b, text_start + valid: text_start + text] = True
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.empty_like(q)
    # name: (call, density, the stock row it is compared with)
    cases = {"cuDNN SDPA (dense, no mask)": (lambda: cudnn_dense(q, k, v), 1.0, None)}
    tables = shape.get("tables", ("keys",))
    stock = {table: f"stock: SDPA with the {TABLES[table][0]}" for table in tables}
    for table in tables:
        cases[stock[table]] = (
            lambda m=stock_mask(mask, table): F.scaled_dot_product_attention(qh, kh, vh, attn_mask=m), 1.0, stock[table])
    agreement = {}
    for plan_name in PLANS:
        modes_list = plans(shape)[plan_name]
        modes = torch.tensor(modes_list, dtype=torch.int32, device="cuda")
        density = plan_density(modes_list, image, text)
        kept = [h for h, m in enumerate(modes_list) if m != MODE_SKIP]
        for table in tables:
            label, bias = TABLES[table]

            def call(impl, padding=ops.Padding(mask, bias), modes=modes):
                return headwise_attention(q, k, v, modes, text_start=text_start, text_len=text, out=out, impl=impl,
                                          key_padding=padding)

            triton_out = call("triton").clone()
            gluon_out = call("gluon").clone()
            reference = triton_out[:, :, kept].float()
            agreement[f"{label}: {plan_name}"] = float((gluon_out[:, :, kept].float() - reference).norm()
                                                       / reference.norm())
            cases[f"Gluon, {label}: {plan_name}"] = (lambda c=call: c("gluon"), density, stock[table])
            cases[f"Triton, {label}: {plan_name}"] = (lambda c=call: c("triton"), density, stock[table])
        cases[f"Gluon, no mask: {plan_name}"] = (
            lambda modes=modes: headwise_attention(q, k, v, modes, text_start=text_start, text_len=text, out=out,
                                                   impl="gluon"), density, None)
    times = {name: [] for name in cases}
    graph = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, (fn, _, _) in cases.items():
            times[name].append(bench(fn))
            graph[name].append(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    base = statistics.median(times["cuDNN SDPA (dense, no mask)"])
    base_graph = statistics.median(graph["cuDNN SDPA (dense, no mask)"])
    rows = []
    for name, (_, density, stock_row) in cases.items():
        ms, graph_ms = statistics.median(times[name]), statistics.median(graph[name])
        # A row without a mask against the first stock call.
        stock_ms = statistics.median(times[stock_row or stock[tables[0]]])
        rows.append({"row": name, "density": density, "ms": ms, "graph_ms": graph_ms, "ms_rounds": times[name],
                     "speedup_vs_cudnn": base / ms, "share_of_ideal": base / ms * density,
                     "graph_share_of_ideal": base_graph / graph_ms * density, "speedup_vs_stock": stock_ms / ms})
    return {"shape": {**shape, "seq": seq, "dtype": "bf16"}, "rows": rows,
            "gluon_vs_triton_relative_difference": agreement}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON results path")
    parser.add_argument("--shapes", nargs="*", help="run the shapes whose names contain one of these (default: all)")
    args = parser.parse_args()
    reason = ops.impl_unsupported("gluon", torch.device("cuda"), torch.bfloat16, [128])
    if reason is not None:
        raise SystemExit(f"the Gluon kernel cannot run here: {reason}")
    props = torch.cuda.get_device_properties(0)
    results = {"meta": {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
                        "cudnn": torch.backends.cudnn.version(), "date": datetime.datetime.now().isoformat()},
               "shapes": {}}
    for name, shape in SHAPES.items():
        if args.shapes and not any(part in name for part in args.shapes):
            continue
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
