"""Run the key-major KL once at a small bf16 shape with one config, in its own process, and compare it with
the query-major KL: a probe for configs that fault (run under compute-sanitizer to find the access).

    python scripts/probes/kl_keys_config.py --di 64 --config '{"BM": 128, "num_warps": 4}'
"""

import argparse
import json

import torch

from sparsezoo.kernels import index_kl_keys, index_kl_triton
from sparsezoo.ops import references as ref

p = argparse.ArgumentParser()
p.add_argument("--di", type=int, default=64)
p.add_argument("--T", type=int, default=1500)
p.add_argument("--S", type=int, default=2048)
p.add_argument("--config", default="{}")
a = p.parse_args()
gen = torch.Generator().manual_seed(11)
mk = lambda *s: torch.randn(*s, generator=gen).to("cuda", torch.bfloat16)
q, k, q_idx, k_idx = mk(1, 32, a.T, 128), mk(1, 2, a.S, 128), mk(1, 2, a.T, a.di), mk(1, a.S, a.di)
sel = ref.msa_select_reference(q_idx.float(), k_idx.float(), 128, 6, 0.125)
args = (q, k, q_idx, k_idx, sel, 128, 128**-0.5, 0.125, 1.0, 1.0)
want = index_kl_triton.index_kl_forward(*args)
torch.cuda.synchronize()
got = index_kl_keys.index_kl_keys_forward(*args, None, True, json.loads(a.config))
torch.cuda.synchronize()
err = [float((g - w).abs().max() / w.abs().max()) for g, w in zip(got[2:], want[2:])]
print(json.dumps(dict(di=a.di, T=a.T, config=a.config, loss=[float(got[0]), float(want[0])], grad_err=err)))
