"""Where does a packed NaViT train step spend its time on the GPU? (device diagnostic)"""
import harness  # noqa: F401  (before torch)
import sys, time, warnings
import torch
import torch.nn.functional as F
from harness import registry
from harness.bench_packing import make_batch
from harness.metrics.speed import adamw, autocast, profiled

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
bs = int(sys.argv[2]) if len(sys.argv) > 2 else 256
maxs = 128 if dev.type == "cuda" else 32
cfg = {"input_size": maxs, "max_seq_len": 1024 if dev.type == "cuda" else 128, "max_grid": maxs // 4,
       "patch_size": 4, "in_channels": 1, "num_classes": 10, "depth": 12 if dev.type == "cuda" else 2}
images = make_batch(bs, 1, 8, maxs, 8, 2.0, 0, dev)
labels = torch.randint(0, 10, (bs,)).to(dev)
def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()
impls = ["auto", "grouped", "dense_mask"] if dev.type == "cuda" else ["auto", "grouped"]
arms = {f"pack_{i}": {"batching": "pack", "attn_impl": i} for i in impls}
arms["pad"] = {"batching": "pad"}
res = {}
for name, extra in arms.items():
    t0 = time.perf_counter()
    model, _ = registry.build("navit-ti", {**cfg, **extra}, device=dev, seed=0)
    model.train()
    opt = adamw(model.parameters(), dev)
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dev, True):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(8):
            step()
        sync()
    warm = time.perf_counter() - t0
    ts = []
    for _ in range(10):
        t = time.perf_counter(); step(); sync(); ts.append(time.perf_counter() - t)
    ts.sort()
    # CPU-side time alone: launch everything, time before the sync
    t = time.perf_counter(); step(); cpu_only = time.perf_counter() - t; sync()
    res[name] = ts[5]
    print(f"{name}: median {ts[5]*1e3:.1f} ms (min {ts[0]*1e3:.1f}), host-side {cpu_only*1e3:.1f} ms, "
          f"warm-up {warm:.1f} s, path {model.tags().get('attn_path')}, warnings: "
          f"{sorted(set(str(x.message)[:120] for x in w))}", flush=True)
    if name == "pack_auto":
        with profiled(dev) as prof:  # CPU, and CUDA on a GPU; no Kineto lines on stderr
            for _ in range(3):
                step()
            sync()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=70))
        try:
            from torch._dynamo.utils import counters
            print("dynamo counters:", {k: dict(v) for k, v in counters.items() if v})
        except Exception as e:
            print("counters:", e)
    del model, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
print({k: round(v * 1e3, 1) for k, v in res.items()})
