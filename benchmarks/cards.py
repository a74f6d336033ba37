"""Result files are named after the card that produced them: `card_tag("NVIDIA H200")` is "h200", so a run
on an H200 writes prefill_h200.json, never a name that claims another card."""

from __future__ import annotations


def card_tag(card: str) -> str:
    """The short lower-case name of a device, as torch.cuda.get_device_name() gives it ("NVIDIA H100 80GB
    HBM3" -> "h100"); "cpu" for an empty name."""
    words = card.lower().replace("nvidia ", "").split()
    return words[0] if words else "cpu"
