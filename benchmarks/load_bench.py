"""Loading time and peak host memory (RSS) of a ~1.1B-parameter Llama: lepton vs transformers.

    python benchmarks/load_bench.py [--folder DIR] [--dtype float32|bfloat16]

Writes (once) a random bfloat16 checkpoint with TinyLlama's shapes (hidden 2048, 22 layers,
intermediate 5632, 32 query / 4 kv heads, vocab 32000), sharded like the hub does, into DIR
(default: a temporary folder, removed afterwards). Each loader then runs in a fresh subprocess,
so peak RSS (ru_maxrss) is its own: import, build the model, read the weights, cast to --dtype.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SHARD_BYTES = 1024**3   # 1 GiB shards: peak RSS = model + about one shard (mapped pages)


def write_checkpoint(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        size += nbytes
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config_dict = config.to_dict()
    config_dict["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config_dict))
    print(f"wrote {sum(p.numel() for s in shards for p in s.values()) / 1e9:.2f}B parameters, "
          f"{len(shards)} shards", file=sys.stderr)


def child(loader: str, folder: str, dtype_name: str) -> None:
    start = time.perf_counter()
    import torch
    dtype = getattr(torch, dtype_name)
    imported = time.perf_counter()
    if loader == "lepton":
        from lepton.engine.engine import Engine
        model = Engine(folder, device="cpu", dtype=dtype_name, max_model_len=128).model
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    done = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    # On a CPU in float32 lepton holds its matmul weights prepacked (oneDNN), outside parameters().
    packed = [m.packed for m in model.modules() if getattr(m, "packed", None) is not None]
    packed += [h for h in [getattr(model, "lm_head_packed", None)] if h is not None]
    params += sum(p.out_features * p.in_features for p in packed)
    print(json.dumps({"loader": loader, "load_s": round(done - imported, 2), "import_s": round(imported - start, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
                      "params": params}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "FOLDER"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.dtype)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="lepton_load_bench_"))
    try:
        if not (folder / "config.json").exists():
            write_checkpoint(folder)
        for loader in ("lepton", "transformers"):
            out = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--child", loader, str(folder)],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1])
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
