"""Sample from a trained checkpoint with the KV cache.

    python examples/sample.py --checkpoint runs/gpt_tiny/checkpoint --prompt "def forward("
    python examples/sample.py --checkpoint runs/gpt_tiny/checkpoint --task needle --length 512
    python examples/sample.py --checkpoint runs/dense/checkpoint --set attention=msa   # load into another variant

With --task, a held-out synthetic sample is used as the prompt (cut before its answer) and the
expected answer is printed beside the generated one.
"""

import argparse

import torch
import yaml

from sparsezoo.models import Data, DataConfig, load_model
from sparsezoo.models.checkpoint import load_config
from sparsezoo.models.data import BOS, batch_generator, decode


def field_value(text):
    """FIELD=VALUE -> (field, value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (e.g. attention=msa), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"the value of {text!r} is not valid YAML: {e}") from None


def at_least(low):
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (model.safetensors + config.yaml)")
    p.add_argument("--prompt", default="", help="text prompt (byte-level)")
    p.add_argument("--task", choices=["needle"], help="prompt with a held-out passkey sample")
    p.add_argument("--length", type=at_least(1), default=512, help="synthetic sample length")
    p.add_argument("--max-new-tokens", type=at_least(0), default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=at_least(1), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=field_value,
                   help="model config override, e.g. attention=msa or attention_overrides={backend: reference}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    overrides = dict(args.set)
    model, report = load_model(args.checkpoint, overrides or None, device=args.device)
    print(model.describe())
    if not report.exact:
        print(report)
    run = load_config(args.checkpoint)
    data = Data(DataConfig.from_dict(run.get("data", {})), model.config.vocab_size, seed=args.seed)
    expected = None
    if args.task:
        if args.task not in data.tasks:
            raise SystemExit(f"the checkpoint's data config has no {args.task!r} task; it has {sorted(data.tasks)}")
        x, y = data.batch(args.task, 1, args.length, batch_generator(args.seed, 0, stream=99), "val")
        first = int((y[0] != -100).nonzero()[0])  # the prompt ends where the first scored token is predicted
        prompt = x[:, :first + 1]
        expected = x[0, first + 1:].tolist() + [int(y[0, -1])]
        args.max_new_tokens = len(expected)
    else:
        prompt = torch.tensor([[BOS] + list(args.prompt.encode())])
    torch.manual_seed(args.seed)
    out = model.generate(prompt.to(args.device), args.max_new_tokens, greedy=args.temperature <= 0,
                         temperature=max(args.temperature, 1e-6), top_k=args.top_k)
    new = out[0, prompt.shape[1]:].tolist()
    if expected is not None:
        print(f"prompt: {prompt.shape[1]} tokens ending {decode(prompt[0, -8:].tolist(), data.layout)}")
        print(f"expected : {decode(expected, data.layout)}")
        print(f"generated: {decode(new, data.layout)}   ({'correct' if new == expected else 'wrong'})")
    else:
        print(decode(prompt[0].tolist() + new, data.layout))


if __name__ == "__main__":
    main()
