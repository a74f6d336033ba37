"""Train the example GPT with any attention variant (the implementation is sparsezoo.models.train).

    python examples/train.py --config configs/gpt_tiny.yaml --set model.attention=msa
    torchrun --nproc_per_node 2 examples/train.py --config configs/gpt_tiny.yaml     # DDP
    torchrun --nproc_per_node 2 examples/train.py --config configs/gpt_tiny.yaml --set train.parallel=fsdp  # FSDP2
    python examples/train.py --config configs/gpt_tiny.yaml --resume                 # continue
"""

from sparsezoo.models.train import main

if __name__ == "__main__":
    main()
