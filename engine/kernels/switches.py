"""The kernel changes of issue 22 that can be switched off one by one, to measure what each buys on the GPU and to
drop one that does not pay without a revert: `CODELLAMA_TUI_OFF=prefill_rotary,prefill_add_norm` (`all` for every
one). Unknown names are an error, so a typo never measures the wrong tree.

- `prefill_rotary`: prefill's rotary embedding and KV-cache write in one Triton kernel (`triton_rotary`).
- `prefill_add_norm`: prefill's residual add inside the next RMSNorm's kernel (`add_rms_norm`).
- `attention_splits`: decode attention's split count fills whole waves of the programs its registers allow
  (`triton_attention.fill_splits`), the splits past a row's keys exit at once, and a row whose keys fit one split
  has it write the output (no partials, count or merge).
- `greedy_accept`: the greedy verify step's accept rule in one Triton kernel (`triton_accept`) instead of plain ops.
"""

from __future__ import annotations

import functools
import os

NAMES = ("prefill_rotary", "prefill_add_norm", "attention_splits", "greedy_accept")
ENV = "CODELLAMA_TUI_OFF"


@functools.cache
def _off(value: str) -> frozenset[str]:
    names = {n.strip() for n in value.split(",") if n.strip()}
    if "all" in names:
        return frozenset(NAMES)
    unknown = names - set(NAMES)
    if unknown:
        raise ValueError(f"{ENV}: unknown {', '.join(sorted(unknown))} (known: all, {', '.join(NAMES)})")
    return frozenset(names)


def on(name: str) -> bool:
    """Whether the change `name` (one of NAMES) is on: it is unless $CODELLAMA_TUI_OFF names it."""
    assert name in NAMES, name
    return name not in _off(os.environ.get(ENV, ""))
