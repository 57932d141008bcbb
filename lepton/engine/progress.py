"""generate()'s progress bar, as vLLM shows it: prompts done, input and output tokens/s."""

from __future__ import annotations

import time

from lepton.outputs import RequestOutput


class Progress:
    """generate()'s progress bar: prompts done, input and output tokens/s."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True,
                        postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        self.start, self.num_in, self.num_out = time.perf_counter(), 0, 0

    def update(self, out: RequestOutput) -> None:
        self.num_in += len(out.prompt_token_ids)
        self.num_out += sum(len(c.token_ids) for c in out.outputs)
        elapsed = time.perf_counter() - self.start
        self.bar.postfix = (f"est. speed input: {self.num_in / elapsed:.2f} toks/s, "
                            f"output: {self.num_out / elapsed:.2f} toks/s")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
