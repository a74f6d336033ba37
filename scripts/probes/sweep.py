"""The command line the config-sweep probes share: --lengths and --configs (JSON objects), one probe call per
length with the parsed configs."""

import argparse
import json

import torch


def main(probe, default_lengths: str, configs_help: str) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default=default_lengths)
    p.add_argument("--configs", nargs="*", default=[], help=configs_help)
    args = p.parse_args()
    for T in (int(x) for x in args.lengths.split(",")):
        probe(T, [json.loads(x) for x in args.configs])
        torch.cuda.empty_cache()
