"""Device check (stop 54): calibrate's release_pinned gives torch's cached pinned blocks back (torch 2.11: through
torch._C._host_emptyCache). PYTHONPATH=src python docs/history/host_release.py  (writes $OUT/host_release.json)"""
import json
import os

import torch
from ditfastattn._host_outputs import HostOutputs, release_pinned

device = torch.device("cuda")
has = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) is not None
has_private = hasattr(torch._C, "_host_emptyCache")
store = HostOutputs(device)
outputs = {(layer, 0): torch.randn(8, 4096, 24, 128, device=device, dtype=torch.bfloat16) for layer in range(4)}
for key, tensor in outputs.items():
    store.store(key, tensor)
for key, tensor in outputs.items():
    assert torch.equal(store.take(key, device), tensor)
torch.cuda.synchronize()
store.drop(0)
del store


def stats():
    return {k: v for k, v in torch.cuda.host_memory_stats().items() if "current" in k}


torch.cuda.synchronize()
x = torch.empty(1, pin_memory=True); del x  # lets the allocator process the freed blocks' events
before = stats()
release_pinned()
after = stats()
row = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "has_empty_host_cache": has,
       "has_host_emptyCache": has_private, "before": before, "after": after,
       "allocated_after_gib": after.get("allocated_bytes.current", float("nan")) / 2**30,
       "requested_gib": sum(t.nbytes for t in outputs.values()) / 2**30}
print(json.dumps(row))
json.dump(row, open(os.path.join(os.environ.get("OUT", "/tmp"), "host_release.json"), "w"), indent=1)
