"""Counter-based noise for the exponential race: Exp(1) draws that are a pure function of a row's
key and a token id, so a row's draw needs no generator call and depends on nothing else.

    key(seed, step)  = mix(seed + G) xor mix(step + H)
    bits(key, t)     = mix(key + t * G)                   (splitmix64; G, H odd constants)
    U                = (low 52 bits of bits + 1/2) / 2**52 in (0, 1), exact in float64
    E                = -log U  ~ Exp(1), rounded to float32
where mix is splitmix64's finalizer (Steele, Lea, Flood 2014), all in wrapping 64-bit arithmetic.
The native cpu implementation (csrc/sampling_cpu.cpp) computes the same bits.
"""

from __future__ import annotations

import numpy as np
import torch


def as_int64(value: int) -> int:
    """The int64 with the same 64 bits as value in [0, 2**64)."""
    return value - 2**64 if value >= 2**63 else value


GOLDEN = as_int64(0x9E3779B97F4A7C15)   # 2**64 / golden ratio: splitmix64's increment
STEP_SALT = as_int64(0xD6E8FEB86659FD93)   # another odd constant, so steps and token ids never line up
MIX_MUL1, MIX_MUL2 = as_int64(0xBF58476D1CE4E5B9), as_int64(0x94D049BB133111EB)


def mix64_(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer, in place on int64: torch's multiply wraps, and >> is arithmetic,
    so a mask keeps only the bits a logical shift would. One scratch tensor serves the three
    shifts (fresh [B, V] temporaries cost more than the arithmetic)."""
    scratch = torch.empty_like(x)
    for shift, multiplier in ((30, MIX_MUL1), (27, MIX_MUL2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=scratch).bitwise_and_(2**(64 - shift) - 1)
        x.bitwise_xor_(scratch)
        if multiplier is not None:
            x.mul_(multiplier)
    return x


def stream_keys(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """key(seed, step) [R] i64 of seeded rows, on the host: a handful of numpy ops on R numbers
    cost less than the torch ops would, and the keys then travel with the step's other inputs."""
    def u64(value: int) -> np.uint64:
        return np.uint64(value & (2**64 - 1))

    def mix(x: np.ndarray) -> np.ndarray:   # uint64 arrays wrap silently, as splitmix64 wants
        x = (x ^ (x >> u64(30))) * u64(MIX_MUL1)
        x = (x ^ (x >> u64(27))) * u64(MIX_MUL2)
        return x ^ (x >> u64(31))

    seeds = np.asarray(seeds, dtype=np.int64).view(np.uint64)
    steps = np.asarray(steps, dtype=np.int64).view(np.uint64)
    keys = mix(seeds + u64(GOLDEN)) ^ mix(steps + u64(STEP_SALT))
    return keys.view(np.int64)


def exponential_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """E [R, K] f32 ~ Exp(1), a function of (keys[r], token_ids[r, k]) alone; token_ids [R, K]
    or [1, K] (the same ids for every row)."""
    bits = mix64_(torch.add(keys[:, None], token_ids, alpha=GOLDEN)).bitwise_and_(2**52 - 1)
    # float64 holds (j + 1/2) / 2**52 exactly: U is never 0 or 1, E never inf or 0.
    u = bits.view(torch.float64).copy_(bits)   # converted in place of the bits
    return u.mul_(2.0**-52).add_(2.0**-53).log_().neg_().float()
